"""Which library runs the matrix products of XLA's CPU backend: oneDNN for every dot, on request.

By default XLA:CPU (jaxlib 0.10) hands dots to YNNPACK fusions, except those YNNPACK does not
take: a left operand contracted over its major dimension, which is every weight gradient of a
dense layer (`x^T dy`, summed over the token rows). Those go to Eigen, with a transposed copy of
the other operand, at 60-80 GFLOP/s where YNNPACK reaches ~95; in the `bench-vit` CLIP step they
were 20% of the step's time (README, 'Performance'). XLA can instead send every dot to a oneDNN
matmul thunk (`--xla_cpu_use_onednn=true` with
`--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`): the same f32
products, summed in another order (the first-step loss agrees to 1e-6; the open_clip parity tests
pass with it). Measured on `bench-vit`, batch 64, in alternating processes: the CLIP step takes
5-8% less time at 1 thread and 5-7% at 2 threads, the CleanCLIP step 7-10% (README,
'Performance'). (`--xla_cpu_use_onednn=true` alone changes
nothing; the fusion type `LIBRARY_FUSION_TYPE_DOT`, which would also fuse the dots' neighbours,
fails to compile the step.)

`route_dots_to_onednn()` appends those flags to XLA_FLAGS, which XLA reads once, when JAX creates
its first backend, so it must run before anything touches a device (the entry points call it first
thing). Since the nineteenth session it is **opt-in**: it acts only where CLEANCLIP_ONEDNN_DOTS=1
is set, and even then leaves XLA_FLAGS alone when:
  - XLA_FLAGS already names either flag (the user's own setting wins);
  - an accelerator plugin (a `jax_plugins` package or libtpu) is installed and JAX_PLATFORMS does
    not say cpu: there the CPU backend computes nothing that matters, and an XLA_FLAGS entry that
    a jaxlib does not know aborts the process, so a GPU or TPU machine running another jaxlib than
    the pinned one must not be handed flags it may not know;
  - JAX's backends already exist (the flags would be ignored; it logs a warning instead);
  - the CPU has no AVX-512 (`/proc/cpuinfo` lists no `avx512f`, or there is no such file).

Why off by default: the route runs XLA's oneDNN integration (oneDNN 3.7.3 inside jaxlib 0.10.2),
and that path is not trustworthy enough to be the default for a library whose users need numbers
they can trust.
  - On an AVX2-only AMD EPYC (family 25, model 1) the `bench-vit` step corrupted the heap within
    its first steps on 2 threads in every one of 7 runs ("malloc(): unaligned tcache chunk
    detected", "double free or corruption"; torch not imported; the route's first code alike),
    and ran with XLA's own dots or with oneDNN on one thread.
  - On AVX-512 CPUs, with the route on, the test suite died of a native abort three times (a full
    run in the thirteenth and in the fifteenth session, and CI's run of the eighteenth session's
    code), each time in `tests/test_models.py`, in XLA compiling or JAX lowering right after the
    first small-model steps had run, as a heap corrupted earlier would; none is recorded with XLA's
    own dots (sessions 1-9, and the AVX2 machine's full runs). It did not reproduce in isolation
    (README, 'Nineteenth session').
  - oneDNN's matmul has had memory-safety fixes since 3.7 for the kind of products these models
    hand it: size-1 dimensions (the pooled last block's one query row) and 4-D operands in
    permuted layouts (e.g. oneDNN pull requests 4632 and 5043).
The cost of leaving it off, on the nineteenth session's Zen 5 guest: the CLIP step 10-16% slower
at 1 thread and 3% at 2, CleanCLIP's 10-14% at 1 thread (README, 'Performance'). The same f32
products either way (the first-step loss agrees to 1e-6), so a user who wants the speed sets
CLEANCLIP_ONEDNN_DOTS=1 (or the flags themselves, which also works without AVX-512).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os

import jax
from jax._src import xla_bridge

FLAGS = ('--xla_cpu_use_onednn=true',
         '--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT')
_OPT_IN = 'CLEANCLIP_ONEDNN_DOTS'


def route_dots_to_onednn() -> bool:
  """Appends `FLAGS` to XLA_FLAGS if CLEANCLIP_ONEDNN_DOTS=1, unless one of the cases above; True
  if they are in effect (also when the user set them by hand)."""
  existing = os.environ.get('XLA_FLAGS', '')
  if all(flag in existing.split() for flag in FLAGS):
    return True
  if os.environ.get(_OPT_IN, '0') != '1' or 'onednn' in existing:
    return False
  if not cpu_is_the_backend() or not cpu_has_avx512():
    return False
  if xla_bridge.backends_are_initialized():
    logging.warning('cpu_dots: JAX backends already exist, so XLA CPU dots stay as they are; '
                    'call route_dots_to_onednn() before the first computation')
    return False
  os.environ['XLA_FLAGS'] = ' '.join([existing.strip(), *FLAGS]).strip()
  return True


def cpu_is_the_backend() -> bool:
  """Whether JAX will compute on the CPU: JAX_PLATFORMS names only cpu, or names nothing and no
  accelerator plugin (a `jax_plugins` package or entry point, libtpu) is installed."""
  platforms = os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms or ''
  named = {p.strip() for p in platforms.split(',') if p.strip()}
  if named:
    return named == {'cpu'}
  return not (importlib.util.find_spec('libtpu') is not None
              or importlib.util.find_spec('jax_plugins') is not None
              or bool(importlib.metadata.entry_points(group='jax_plugins')))


def cpu_has_avx512() -> bool:
  """Whether /proc/cpuinfo lists `avx512f` for the first CPU (False where it cannot be read)."""
  return 'avx512f' in _first_cpu_fields().get('flags', '').split()


def _first_cpu_fields() -> dict[str, str]:
  # The first processor's block of /proc/cpuinfo as {field: value}; {} where there is none.
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      block = f.read().split('\n\n')[0]
  except OSError:
    return {}
  fields = dict(line.split(':', 1) for line in block.splitlines() if ':' in line)
  return {key.strip(): value.strip() for key, value in fields.items()}


def cpu_model() -> str:
  """The host CPU as /proc/cpuinfo names it (with its family / model numbers, which tell CPU
  generations apart where the name does not, e.g. 'AMD EPYC'), for benchmark records: the
  matmul peak, and so every MFU and speed ratio, depend on it."""
  fields = _first_cpu_fields()
  if not fields:
    import platform  # pylint: disable=g-import-not-at-top
    return platform.processor() or platform.machine()
  return (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, "
          f"model {fields.get('model', '?')})")
