"""Runs N copies of a command on this machine as one multi-process JAX job on CPU.

    python launch/local.py --num_processes 2 --devices_per_process 4 -- \
        python -m cleanclip_jax.train --config configs/clip_pretrain.py:tiny --workdir /tmp/run

Each process gets `JAX_PLATFORMS=cpu`, `--xla_force_host_platform_device_count=<devices>`, the
coordinator address and its id (read by `cleanclip_jax.distributed.initialize`), so the multi-host
code paths (per-process data shards, global batch assembly, collective checkpoints) run on one
machine with gloo collectives. Output lines are prefixed with `[rank i]`. If any process fails
the others are stopped (they would wait forever in a collective) and the launcher exits with the
first non-zero code. SIGINT / SIGTERM are forwarded to every process.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], rank: int, num_processes: int, devices: int,
                coordinator: str) -> dict[str, str]:
  env = dict(base)
  flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = f'{flags.strip()} --xla_force_host_platform_device_count={devices}'.strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_COORDINATOR_ADDRESS'] = coordinator
  env['CLEANCLIP_NUM_PROCESSES'] = str(num_processes)
  env['CLEANCLIP_PROCESS_ID'] = str(rank)
  env['PYTHONUNBUFFERED'] = '1'
  return env


def _stream(rank: int, pipe, lock: threading.Lock) -> None:
  for line in iter(pipe.readline, b''):
    with lock:
      sys.stdout.write(f'[rank {rank}] {line.decode(errors="replace")}')
      sys.stdout.flush()
  pipe.close()


def _stop(procs: list[subprocess.Popen], grace_seconds: float = 30.0) -> None:
  for proc in procs:
    if proc.poll() is None:
      proc.terminate()
  deadline = time.time() + grace_seconds
  while time.time() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.1)
  for proc in procs:
    if proc.poll() is None:
      proc.kill()


def launch(command: list[str], num_processes: int, devices_per_process: int,
           port: int | None = None) -> int:
  """Starts the processes, waits for all, returns 0 or the first failing exit code."""
  coordinator = f'127.0.0.1:{port or free_port()}'
  lock = threading.Lock()
  procs, threads = [], []
  for rank in range(num_processes):
    env = process_env(os.environ, rank, num_processes, devices_per_process, coordinator)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    procs.append(proc)
    thread = threading.Thread(target=_stream, args=(rank, proc.stdout, lock), daemon=True)
    thread.start()
    threads.append(thread)

  def forward(signum, _frame):
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  first_failure = 0
  try:
    while True:
      codes = [p.poll() for p in procs]  # poll every process: returncode is only set by poll()
      if all(code is not None for code in codes):
        break
      failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
      if failed and not first_failure:
        rank, first_failure = failed[0]
        with lock:
          print(f'[launch] rank {rank} exited with {first_failure}; stopping the others', flush=True)
        _stop(procs)
      time.sleep(0.05)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  for thread in threads:
    thread.join(timeout=5)
  if not first_failure:
    first_failure = next((p.returncode for p in procs if p.returncode), 0)
  return first_failure


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=4,
                      help='emulated CPU devices per process')
  parser.add_argument('--port', type=int, default=None, help='coordinator port (default: a free one)')
  parser.add_argument('command', nargs=argparse.REMAINDER, help='-- then the command to run')
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('give the command to run after --')
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error('--num_processes and --devices_per_process must be >= 1')
  if shutil.which(command[0]) is None:
    parser.error(f'{command[0]!r}: no such program (on PATH or as a path)')
  code = launch(command, args.num_processes, args.devices_per_process, args.port)
  return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + signum


if __name__ == '__main__':
  sys.exit(main())
