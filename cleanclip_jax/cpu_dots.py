"""Which library runs the matrix products of XLA's CPU backend: oneDNN, for every dot.

By default XLA:CPU (jaxlib 0.10) hands dots to YNNPACK fusions, except those YNNPACK does not
take: a left operand contracted over its major dimension, which is every weight gradient of a
dense layer (`x^T dy`, summed over the token rows). Those go to Eigen, with a transposed copy of
the other operand, at 60-80 GFLOP/s where YNNPACK reaches ~95; in the `bench-vit` CLIP step they
were 20% of the step's time (README, 'Performance'). XLA can instead send every dot to a oneDNN
matmul thunk (`--xla_cpu_use_onednn=true` with
`--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`): the same f32
products, summed in another order (the first-step loss agrees to 1e-6; the open_clip parity tests
run with it). Measured on `bench-vit`, batch 64, in alternating processes: the CLIP step takes
5-8% less time at 1 thread and 5-7% at 2 threads, the CleanCLIP step 7-10% (README,
'Performance'). (`--xla_cpu_use_onednn=true` alone changes
nothing; the fusion type `LIBRARY_FUSION_TYPE_DOT`, which would also fuse the dots' neighbours,
fails to compile the step.)

`route_dots_to_onednn()` appends those flags to XLA_FLAGS, which XLA reads once, when JAX creates
its first backend, so it must run before anything touches a device (the entry points call it first
thing). It leaves XLA_FLAGS alone when:
  - CLEANCLIP_ONEDNN_DOTS=0 is set (the opt-out), or XLA_FLAGS already names either flag;
  - an accelerator plugin (a `jax_plugins` package or libtpu) is installed and JAX_PLATFORMS does
    not say cpu: there the CPU backend computes nothing that matters, and an XLA_FLAGS entry that
    a jaxlib does not know aborts the process, so a GPU or TPU machine running another jaxlib than
    the pinned one must not be handed flags it may not know;
  - JAX's backends already exist (the flags would be ignored; it logs a warning instead);
  - the CPU has no AVX-512 (`/proc/cpuinfo` lists no `avx512f`, or there is no such file). On an
    AVX2-only AMD EPYC (family 25, model 1; oneDNN 3.7.3 inside jaxlib 0.10.2, which then picks
    its `gemm:jit:f32` kernels) the `bench-vit` step corrupted the heap within its first steps on
    2 threads in every one of 7 runs ("malloc(): unaligned tcache chunk detected", "double free or
    corruption"; torch not imported; with and without `host_memory`; the tenth session's code
    alike), and ran with XLA's own dots. With `--xla_cpu_multi_thread_eigen=false` (oneDNN on one
    thread) it ran, so the fault lies in oneDNN's multi-threaded AVX2 path, not in this code. Every
    speed and thread figure behind this route is from AVX-512 CPUs (README, 'Performance'). A user
    who wants it anyway sets the flags in XLA_FLAGS.
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
_OPT_OUT = 'CLEANCLIP_ONEDNN_DOTS'


def route_dots_to_onednn() -> bool:
  """Appends `FLAGS` to XLA_FLAGS unless one of the cases above; True if they are in effect."""
  existing = os.environ.get('XLA_FLAGS', '')
  if all(flag in existing.split() for flag in FLAGS):
    return True
  if os.environ.get(_OPT_OUT, '1') == '0' or 'onednn' in existing:
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
