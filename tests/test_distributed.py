"""distributed.from_process_0: process 0's view handed to every process, its failures too, with
one process, with two simulated ones, and with two real ones (launch/local.py); and
distributed.all_processes, every process's value on every process."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from cleanclip_jax import checkpoint, distributed

REPO = pathlib.Path(__file__).resolve().parent.parent


class TwoProcesses:
  """Plays process 0 and then process 1 in this one process: process 0's broadcasts are recorded,
  and process 1's receive them in the same order."""

  def __init__(self, monkeypatch):
    self.process, self.sent = 0, []
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(jax, 'process_index', lambda: self.process)
    monkeypatch.setattr(distributed.multihost_utils, 'broadcast_one_to_all', self._broadcast)

  def _broadcast(self, value):
    if self.process == 0:
      self.sent.append(np.asarray(value))
      return np.asarray(value)
    return self.sent.pop(0)

  def on(self, process, function, *args):
    """`function(*args)` as `process` sees it: its result, or the error it raised."""
    self.process = process
    try:
      return function(*args)
    except Exception as e:  # pylint: disable=broad-except
      return e


def test_one_process_computes_in_place_without_a_collective(monkeypatch):
  def no_collective(value):
    raise AssertionError('a collective in a single-process run')
  monkeypatch.setattr(distributed.multihost_utils, 'broadcast_one_to_all', no_collective)
  # As JSON decodes it, as the other processes of a multi-process run get it.
  assert distributed.from_process_0(lambda: (3, {4: None})) == [3, {'4': None}]
  assert distributed.from_process_0([1, 2]) == [1, 2]
  with pytest.raises(KeyError, match='its own error'):
    distributed.from_process_0(lambda: {}['its own error'])
  monkeypatch.setattr(distributed.multihost_utils, 'process_allgather', no_collective)
  assert distributed.all_processes({'not_an_image': 2, 3: (4,)}) == [{'not_an_image': 2, '3': [4]}]


def test_process_0_alone_computes_and_the_others_get_its_value_or_its_failure(monkeypatch):
  processes = TwoProcesses(monkeypatch)
  calls = []
  listing = lambda: calls.append(processes.process) or [2, 4]
  assert processes.on(0, distributed.from_process_0, listing) == [2, 4]
  assert processes.on(1, distributed.from_process_0, listing) == [2, 4]
  assert calls == [0]  # process 1 read nothing itself

  def unreadable():
    raise PermissionError('checkpoints/ is not readable')
  mine = processes.on(0, distributed.from_process_0, unreadable)
  theirs = processes.on(1, distributed.from_process_0, unreadable)
  assert isinstance(mine, PermissionError)  # process 0: its own error
  assert isinstance(theirs, distributed.ProcessZeroFailed)  # the others: no hang, its message
  assert 'PermissionError: checkpoints/ is not readable' in str(theirs)
  # A value JSON cannot carry fails the same way, rather than on process 0 alone.
  assert isinstance(processes.on(0, distributed.from_process_0, lambda: {1j}), TypeError)
  assert isinstance(processes.on(1, distributed.from_process_0, lambda: {1j}),
                    distributed.ProcessZeroFailed)



def test_broadcast_buffers_come_in_few_sizes(monkeypatch):
  # Each buffer shape compiles its own broadcast program: listings of 1..300 steps (a follow job's
  # polls) must share a handful of shapes, not bring one each.
  processes = TwoProcesses(monkeypatch)
  for n in range(1, 301):
    listing = list(range(0, 2 * n, 2))
    assert processes.on(0, distributed.from_process_0, listing) == listing
    assert processes.on(1, distributed.from_process_0, listing) == listing
  shapes = set()
  monkeypatch.setattr(distributed.multihost_utils, 'broadcast_one_to_all',
                      lambda value: shapes.add(np.shape(value)) or np.asarray(value))
  for n in range(1, 301):
    processes.on(0, distributed.from_process_0, list(range(0, 2 * n, 2)))
  assert len(shapes) <= 8, sorted(shapes)

def _commit(workdir, step):
  step_dir = workdir / 'checkpoints' / str(step)
  (step_dir / 'state').mkdir(parents=True)
  (step_dir / 'state' / 'data').write_bytes(b'x')
  checkpoint.write_manifest(step_dir)


def test_the_init_checkpoint_is_the_one_process_0_chose(tmp_path, monkeypatch):
  processes = TwoProcesses(monkeypatch)
  _commit(tmp_path, 2)
  _commit(tmp_path, 5)
  chosen = str(tmp_path / 'checkpoints' / '5')
  assert processes.on(0, checkpoint.agreed_step_dir, tmp_path) == chosen
  _commit(tmp_path, 7)  # the run saves on: process 1 still gets process 0's choice
  assert processes.on(1, checkpoint.agreed_step_dir, tmp_path) == chosen
  for process in (0, 1):
    assert isinstance(processes.on(process, checkpoint.agreed_step_dir, tmp_path / 'empty'),
                      checkpoint.NoCheckpointError)


def test_a_resume_process_0_cannot_choose_stops_every_process(tmp_path, monkeypatch):
  saver = checkpoint.Checkpointer(tmp_path)  # before the fake processes: orbax syncs hosts

  def storage_fails():
    raise checkpoint.CheckpointRestoreError('reading checkpoint 7 failed: OSError: EIO')
  monkeypatch.setattr(saver, '_newest_intact_moving_damaged_aside', storage_fails)
  processes = TwoProcesses(monkeypatch)
  mine, theirs = processes.on(0, saver._choose_step), processes.on(1, saver._choose_step)
  monkeypatch.undo()
  saver.close()
  assert isinstance(mine, checkpoint.CheckpointRestoreError) and 'EIO' in str(mine)
  assert isinstance(theirs, checkpoint.CheckpointRestoreError) and 'EIO' in str(theirs)


SCRIPT = '''
import jax
from cleanclip_jax import distributed
distributed.initialize()
rank = jax.process_index()
print('value', distributed.from_process_0(lambda: {'chosen_by': jax.process_index()}), flush=True)
def fails():
  raise OSError('disk gone on process 0')
try:
  distributed.from_process_0(fails)
except Exception as e:
  print('raised', type(e).__name__, e, flush=True)
print('after', distributed.from_process_0(rank * 10), flush=True)
# Values of different lengths, the longer one past the smallest buffer.
print('gathered', distributed.all_processes({'rank': rank, 'pad': 'x' * (100 * rank)}), flush=True)
'''


def test_two_real_processes_agree_and_fail_together():
  env = {k: v for k, v in os.environ.items() if not k.startswith('CLEANCLIP_')}
  done = subprocess.run([sys.executable, str(REPO / 'launch' / 'local.py'), '--num_processes', '2',
                         '--devices_per_process', '1', '--', sys.executable, '-c', SCRIPT],
                        cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  for rank in (0, 1):
    assert f"[rank {rank}] value {{'chosen_by': 0}}" in done.stdout
    assert f'[rank {rank}] after 0' in done.stdout
    assert f"[rank {rank}] gathered [{{'rank': 0, 'pad': ''}}, {{'rank': 1, 'pad': '{'x' * 100}'}}]" in done.stdout
  assert '[rank 0] raised OSError disk gone on process 0' in done.stdout
  assert ('[rank 1] raised ProcessZeroFailed process 0 failed: OSError: disk gone on process 0'
          in done.stdout)
