"""Joining a multi-process run (`jax.distributed.initialize()` where there is more than one
process), handing process 0's view of shared state to every process (`from_process_0`), and every
process's own figures to all of them (`all_processes`).

Three ways a process learns its place, tried in order:
  1. `launch/local.py` sets `JAX_COORDINATOR_ADDRESS`, `CLEANCLIP_NUM_PROCESSES` and
     `CLEANCLIP_PROCESS_ID` (N processes on one machine, CPU collectives);
  2. JAX's own cluster detection (Cloud TPU pods, SLURM `srun`, Open MPI, Kubernetes);
  3. neither: a single process, nothing to do.
Must run before anything touches a JAX device, so the trainer calls it first thing in `main`.
`CLEANCLIP_NO_DISTRIBUTED=1` skips it (e.g. a single-process run inside a SLURM allocation).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'  # read by jax.distributed itself as well
ENV_NUM_PROCESSES = 'CLEANCLIP_NUM_PROCESSES'
ENV_PROCESS_ID = 'CLEANCLIP_PROCESS_ID'
ENV_DISABLE = 'CLEANCLIP_NO_DISTRIBUTED'


def is_initialized() -> bool:
  return jax.distributed.is_initialized()


def initialize() -> None:
  """Initialises jax.distributed when this process is one of several; a no-op otherwise."""
  if os.environ.get(ENV_DISABLE, '') not in ('', '0') or is_initialized():
    return
  if ENV_NUM_PROCESSES in os.environ:
    missing = [k for k in (ENV_COORDINATOR, ENV_PROCESS_ID) if k not in os.environ]
    if missing:
      raise RuntimeError(f'{ENV_NUM_PROCESSES} is set but {", ".join(missing)} is not; '
                         'launch with launch/local.py or set all three.')
    jax.distributed.initialize(
        coordinator_address=os.environ[ENV_COORDINATOR],
        num_processes=int(os.environ[ENV_NUM_PROCESSES]),
        process_id=int(os.environ[ENV_PROCESS_ID]))
  else:
    try:
      jax.distributed.initialize()  # auto-detects TPU pods, SLURM, MPI, k8s
    except ValueError as e:
      # No cluster detected and no coordinator given: jax says so before connecting anything.
      # Any other ValueError is a half-described cluster (e.g. JAX_COORDINATOR_ADDRESS without a
      # process count): running on as one process there would make N independent runs write
      # the same workdir.
      if 'coordinator_address should be defined' not in str(e) or os.environ.get(ENV_COORDINATOR):
        raise RuntimeError(
            f'jax.distributed.initialize() failed: {e} Set all of {ENV_COORDINATOR}, '
            f'{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (launch/local.py does), launch under '
            f'SLURM / a TPU pod, or set {ENV_DISABLE}=1 for a single process.') from e
      logging.info('Single-process run (%s)', e)
      return
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


class ProcessZeroFailed(RuntimeError):
  """Raised on the other processes when process 0 failed to compute what `from_process_0` hands
  out (process 0 itself raises its own error)."""


def from_process_0(value: Any) -> Any:
  """Process 0's `value` on every process (a collective: every process must call it).

  Processes that each read a shared filesystem on their own can see it at different moments (a
  run still saving, retention deleting) and would then take different branches and wait at
  different collectives; this hands them all process 0's view. `value` is JSON-able, or a
  callable returning that, called on process 0 only (the others read nothing for it). When it
  raises, process 0 raises that error and every other process `ProcessZeroFailed`, instead of
  waiting forever for a value that is not coming.

  The value comes back as JSON decodes it (tuples as lists, dict keys as strings) with one
  process as well, where no collective runs: code tested alone sees what it sees on a pod.
  """
  if jax.process_count() == 1:
    return json.loads(json.dumps(value() if callable(value) else value))
  failure, message = None, b''
  if jax.process_index() == 0:
    try:
      message = json.dumps({'value': value() if callable(value) else value}).encode()
    except Exception as e:  # pylint: disable=broad-except
      failure = e
      message = json.dumps({'failed': f'{type(e).__name__}: {e}'}).encode()
  received = json.loads(_broadcast_bytes(message))
  if failure is not None:
    raise failure
  if 'failed' in received:
    raise ProcessZeroFailed(f'process 0 failed: {received["failed"]} (its log has the details)')
  return received['value']


def all_processes(value: Any) -> list[Any]:
  """Every process's JSON-able `value`, in process order (a collective: every process must call
  it), as JSON decodes them, with one process as well."""
  message = json.dumps(value).encode()
  if jax.process_count() == 1:
    return [json.loads(message)]
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(message)))).reshape(-1)
  buffer = np.zeros(_buffer_size(int(lengths.max())), np.uint8)
  buffer[:len(message)] = np.frombuffer(message, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buffer))
  return [json.loads(bytes(row[:length])) for row, length in zip(rows, lengths)]


def _buffer_size(length: int) -> int:
  # A power of two: each buffer shape compiles a collective of its own, and a follow job sends a
  # listing of another length at almost every poll.
  return max(64, 1 << (length - 1).bit_length())


def _broadcast_bytes(data: bytes) -> bytes:
  """Process 0's `data` on every process (the others pass b''): its length first, so every
  process can allocate the buffer the second broadcast fills."""
  length = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
  buffer = np.zeros(_buffer_size(length), np.uint8)
  buffer[:len(data)] = np.frombuffer(data, np.uint8)
  return bytes(multihost_utils.broadcast_one_to_all(buffer)[:length])
