"""glibc malloc settings that keep freed host memory in the process, for XLA's CPU runtime.

XLA's CPU executables allocate their temporaries afresh on every step, from the runtime's worker
threads. glibc gives each such thread its own malloc arena, and an arena other than the main one
serves any block over 64 MB with a fresh mmap and unmaps it on free; the main arena also returns
its free top to the system. So every step faults its whole working set back in, page by page,
and the kernel zeroes each page first. Measured with `resource.getrusage` on the `bench-vit` step
(batch 64, 1 thread): the CLIP step took 0.49M minor page faults, 0.73 s of system time on top of
3.7 s of user time; the CleanCLIP step 0.93M faults, 1.5 s. With one arena (the brk-grown main
heap), no mmap-served blocks, no trimming and 1 GB of top padding, both took 0 faults. (The kept
heap can still grow now and then: the runtime frees a call's temporaries just after its output is
ready, so they may be alive when the next call allocates; tests/test_host_memory.py.)

The cost: host memory that was freed stays mapped (the process's resident size stays near its
peak, as with tcmalloc or jemalloc), and all threads share one arena lock. That second cost is
real: the demo study, whose input pipeline runs in threads of the training process, took 400 s
instead of 267-275 s with the settings (58 s of system time), although its train steps alone are
faster. So the settings are **opt-in**: CLEANCLIP_KEEP_FREED_MEMORY=1 in the environment (or
`force=True`, as `benchmarks/train_step.py --keep-freed-memory` does). The entry points call
`keep_freed_memory()` before JAX starts its CPU client (the settings act on later allocations).
Linux with glibc only; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_TOP_PAD_BYTES = 1 << 30

_applied = False


def keep_freed_memory(force: bool = False) -> bool:
  """Applies the settings once per process if CLEANCLIP_KEEP_FREED_MEMORY=1 (or `force`); True if
  they are in effect."""
  global _applied
  if _applied:
    return True
  if not (force or os.environ.get('CLEANCLIP_KEEP_FREED_MEMORY', '0') == '1'):
    return False
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
    # gnu_get_libc_version exists only in glibc (musl has a mallopt that ignores everything).
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # -1 is SIZE_MAX to glibc: never trim. Each call returns 1 on success.
  ok = all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, _TOP_PAD_BYTES)))
  if not ok:
    logging.warning('host_memory: glibc refused a mallopt setting; XLA CPU steps may page-fault')
  _applied = ok
  return ok
