"""host_memory.keep_freed_memory: XLA CPU steps stop page-faulting their working set back in."""

import os
import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent('''
    import os, resource, sys
    # One CPU, as XLA's thread pool then has one worker: with more, this toy computation has one
    # 96 MB buffer allocated by a pool thread, outside the main arena (24,578 faults a call at 2
    # CPUs; the bench-vit train steps measured 0 at 2 CPUs as at 1).
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from cleanclip_jax import host_memory
    applied = host_memory.keep_freed_memory()  # CLEANCLIP_KEEP_FREED_MEMORY decides
    import jax, jax.numpy as jnp
    assert jax.config.read('jax_cpu_enable_async_dispatch') == (not applied)
    # ~100 MB of temporaries a call (a train step's kind of allocation: inside the executable,
    # freed when it ends), above the 64 MB that glibc's per-thread heaps serve; a scalar out.
    f = jax.jit(lambda x: (jnp.cumsum(x * 1.5) * x[::-1]).sum())
    x = jnp.arange(24 << 20, dtype=jnp.float32) / 1e6
    for _ in range(6):  # the heap grows to its working size over the first calls
      f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(6):
      f(x).block_until_ready()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(applied, faults)
''')


def _faults(keep: bool) -> tuple[bool, int]:
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  env.pop('CLEANCLIP_KEEP_FREED_MEMORY', None)
  if not keep:
    env['CLEANCLIP_KEEP_FREED_MEMORY'] = '0'  # the opt-out; the default is on
  out = subprocess.run([sys.executable, '-c', _CHILD], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  applied, faults = out.stdout.split()[-2:]
  return applied == 'True', int(faults)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_repeated_steps_stop_faulting_pages_in():
  applied, faults = _faults(keep=True)
  off, faults_off = _faults(keep=False)
  assert applied and not off
  # Without: each call maps its temporaries afresh (measured ~98k faults of 4 KB pages a call).
  assert faults_off > 6 * 20_000, faults_off
  # With: the calls run on the main thread and reuse its kept heap. Measured 0 in 5 runs of 5
  # (the one-arena form this replaced grew its heap now and then, when the runtime freed a call's
  # temporaries on its own thread after the next call had allocated); a few stray pages allowed.
  assert faults <= 1_000, (faults, faults_off)
