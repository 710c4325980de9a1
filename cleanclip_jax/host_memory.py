"""Where XLA's CPU steps get their memory: kept, reused host memory instead of fresh pages per step.

XLA's CPU executables allocate their temporaries afresh on every call. By default JAX runs a CPU
call on a dispatch thread of its own, and glibc gives each such thread its own malloc arena; an
arena other than the main one serves any block over 64 MB with a fresh mmap and unmaps it on
free, and the main arena, too, maps blocks over 32 MB and returns its free top to the system. So
every step faults its whole working set back in, page by page, and the kernel zeroes each page
first. Measured with `resource.getrusage` on the `bench-vit` step (batch 64, 1 thread): the CLIP
step took 0.49M minor page faults, 0.73 s of system time on top of 3.7 s of user time; the
CleanCLIP step 0.93M faults, 1.5 s.

`keep_freed_memory()` does two things, before JAX starts its CPU client:
  - runs single-device CPU calls on the calling thread (`jax_cpu_enable_async_dispatch=False`),
    so a step's temporaries come from the main thread's arena, the brk-grown main heap;
  - tells glibc to serve no block by mmap, never to trim, and to grow the heap with 1 GB of
    padding, so memory a step frees stays in that heap for the next step.
Both steps then take 0 faults. Threads other than the caller's (the input pipeline's) keep their
own arenas: an earlier form of this module forced one arena for the whole process, which removed
the faults too but made the pipeline threads queue on its lock (the demo study took 400 s instead
of 267-275 s). With this form the demo took 207 s against 263 s without any setting, measured
back to back, same numbers to the last digit (README, 'Performance').

Why the loss of async dispatch costs nothing here: the trainer reads each step's metrics before
the next step (a blocking transfer), and the input pipeline prefetches in threads of its own.
Multi-device CPU calls are dispatched asynchronously regardless (JAX applies the flag to
single-device calls only).

The cost: host memory that was freed stays mapped (the resident size stays near its peak, as with
tcmalloc or jemalloc). On by default in the entry points (trainer, evaluation, demo, benchmarks);
CLEANCLIP_KEEP_FREED_MEMORY=0 in the environment leaves glibc and JAX's dispatch as they are.
The mallopt part is Linux with glibc only; elsewhere it does nothing. Where JAX will run on a GPU
or TPU (`JAX_PLATFORMS` names one first, or none is named and an accelerator plugin is installed)
it does nothing either: the steps' temporaries live on the device, and the host would only keep
checkpoint and restore buffers it could give back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

import jax

from cleanclip_jax import cpu_dots

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_TOP_PAD_BYTES = 1 << 30

_applied = False


def keep_freed_memory() -> bool:
  """Applies the settings once per process unless CLEANCLIP_KEEP_FREED_MEMORY=0; True if they are
  in effect. Call it before the first JAX computation: the dispatch setting is read when JAX
  creates its CPU client, and the malloc settings act on later allocations."""
  global _applied
  if _applied:
    return True
  if os.environ.get('CLEANCLIP_KEEP_FREED_MEMORY', '1') == '0':
    return False
  if not sys.platform.startswith('linux') or not cpu_dots.cpu_is_the_backend():
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
      (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, _TOP_PAD_BYTES)))
  if not ok:
    logging.warning('host_memory: glibc refused a mallopt setting; XLA CPU steps may page-fault')
    return False
  # Without this the step runs on a JAX dispatch thread, whose own arena maps big blocks anyway.
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  _applied = True
  return True
