"""Faults: kill -9 / SIGTERM at random moments, half-written and corrupted checkpoints, a full disk.

The kill test runs the real CLI in subprocesses (1 CPU device each, a shared persistent compilation
cache so restarts skip XLA) and checks that a run killed over and over ends with exactly the loss
trace and parameters of one uninterrupted run.
"""

import errno
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import grain.checkpoint
import jax
import ml_collections
import numpy as np
import pytest

from cleanclip_jax import checkpoint, metrics_log, sharding, train
from test_checkpoint import abstract, make_iterator, make_state, save_steps

REPO = pathlib.Path(__file__).resolve().parent.parent
TOTAL = 30
NUM_KILLS = 10
NUM_TERMS = 1


def _env(cache_dir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', PYTHONUNBUFFERED='1')
  env.pop('CLEANCLIP_NUM_PROCESSES', None)
  return env


def _command(workdir):
  return [sys.executable, '-m', 'cleanclip_jax.train', '--config', 'configs/clip_pretrain.py:tiny',
          '--workdir', str(workdir), f'--config.total_steps={TOTAL}', '--config.checkpoint_every_steps=1',
          '--config.keep_checkpoints=2', '--config.warmup_steps=2', '--config.batch_size=8',
          '--config.model.name=demo-vit', '--config.model.context_length=8', '--config.data.synthetic.num_examples=64']


def _start(workdir, cache_dir, log):
  return subprocess.Popen(_command(workdir), cwd=REPO, env=_env(cache_dir), stdout=log,
                          stderr=subprocess.STDOUT)


def _last_step(workdir) -> int:
  records = metrics_log.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl')
  return records[-1]['step'] if records else 0


def _trace(workdir):
  return [(r['step'], r['loss']) for r in metrics_log.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl')]


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  with open(workdir / 'log.txt', 'w') as log:
    assert _start(workdir, cache_dir, log).wait(timeout=600) == 0, (workdir / 'log.txt').read_text()[-3000:]
  return workdir


@pytest.mark.slow
def test_kill9_and_sigterm_at_random_moments_resume_exactly(uninterrupted, cache_dir, tmp_path):
  rng = random.Random(0)
  signals = [signal.SIGKILL] * NUM_KILLS + [signal.SIGTERM] * NUM_TERMS
  rng.shuffle(signals)
  killed_while_saving = 0
  log_path = tmp_path / 'log.txt'
  with open(log_path, 'w') as log:
    for trial, sig in enumerate(signals):
      resumed_at = _last_step(tmp_path)
      proc = _start(tmp_path, cache_dir, log)
      # Let this incarnation train 1-2 steps, then strike at a random moment of the next ones.
      target = min(resumed_at + rng.randint(1, 2), TOTAL - 3)  # leave steps to interrupt
      deadline = time.time() + 300
      while _last_step(tmp_path) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
      time.sleep(rng.uniform(0.0, 0.5))
      assert proc.poll() is None, f'trial {trial}: the run ended before it could be interrupted'
      killed_while_saving += any('orbax-checkpoint-tmp' in p.name for p in (tmp_path / 'checkpoints').iterdir())
      proc.send_signal(sig)
      code = proc.wait(timeout=300)
      if sig == signal.SIGTERM:
        assert code == train.PREEMPTED_EXIT_CODE, log_path.read_text()[-3000:]
        # The notice was honoured at the current step: its checkpoint is the newest committed one.
        assert checkpoint.committed_steps(tmp_path)[-1] == _last_step(tmp_path)
      else:
        assert code == -signal.SIGKILL
    assert _start(tmp_path, cache_dir, log).wait(timeout=600) == 0, log_path.read_text()[-3000:]
  assert killed_while_saving >= 1, 'no kill landed during an asynchronous checkpoint write'
  assert _trace(tmp_path) == _trace(uninterrupted)  # every step once, bit-identical losses
  jax.tree.map(np.testing.assert_array_equal, checkpoint.restore_params(tmp_path),
               checkpoint.restore_params(uninterrupted))


# --- damaged checkpoint directories (unit level: a small sharded state) -------------------------------


@pytest.fixture
def mesh():
  return sharding.make_mesh({'data': -1, 'fsdp': 1})


def _restore(workdir, mesh):
  restorer = checkpoint.Checkpointer(workdir)
  result = restorer.restore_latest(abstract(make_state(0, mesh)), make_iterator())
  restorer.close()
  return result


def _files(step_dir, part):
  return sorted(p for p in (step_dir / 'state').rglob('*') if p.is_file() and part in str(p))


def test_half_written_checkpoint_is_skipped_with_a_warning(tmp_path, mesh, caplog):
  save_steps(tmp_path, mesh, [1, 2])
  root = tmp_path / 'checkpoints'
  # A save killed half-way (orbax's temporary name) ...
  (root / '3.orbax-checkpoint-tmp' / 'state').mkdir(parents=True)
  (root / '3.orbax-checkpoint-tmp' / 'state' / 'partial').write_bytes(b'\0' * 10)
  assert checkpoint.committed_steps(tmp_path) == [1, 2]
  # ... and a committed-looking directory whose manifest never got written (copied by hand, say).
  os.remove(root / '2' / checkpoint.MANIFEST_NAME)
  assert checkpoint.committed_steps(tmp_path) == [1]
  with caplog.at_level('WARNING'):
    step, state = _restore(tmp_path, mesh)
  assert step == 1 and float(state.params['logit_scale']) == 1.0
  assert '3.orbax-checkpoint-tmp' in caplog.text and 'half-written' in caplog.text
  assert f'{root / "2"}: {checkpoint.MANIFEST_NAME} is missing' in caplog.text
  assert not (root / '3.orbax-checkpoint-tmp').exists()


@pytest.mark.parametrize('damage', ['flip_byte', 'truncate'])
def test_corrupted_checkpoint_falls_back_with_a_warning(tmp_path, mesh, caplog, damage):
  save_steps(tmp_path, mesh, [1, 2])
  newest = tmp_path / 'checkpoints' / '2'
  victim = _files(newest, '/d/')[0]
  data = bytearray(victim.read_bytes())
  if damage == 'flip_byte':
    data[len(data) // 2] ^= 0xFF
  else:
    data = data[:len(data) // 2]
  victim.write_bytes(bytes(data))
  with caplog.at_level('WARNING'):
    assert float(checkpoint.restore_params(tmp_path)['logit_scale']) == 1.0  # read-only fallback
    step, _ = _restore(tmp_path, mesh)
  assert step == 1
  assert victim.name in caplog.text and f'Skipping checkpoint {newest}' in caplog.text
  # The damaged step is moved aside, so the resumed run can write step 2 again.
  assert checkpoint.committed_steps(tmp_path) == [1]
  assert len(list((tmp_path / checkpoint.REJECTED_SUBDIR).iterdir())) == 1
  with pytest.raises(checkpoint.NoCheckpointError):
    checkpoint.restore_params(tmp_path / checkpoint.REJECTED_SUBDIR)


def _disk_full(*args, **kwargs):
  raise OSError(errno.ENOSPC, 'No space left on device')


@pytest.mark.parametrize('where', ['data_item', 'background_commit'])
def test_disk_full_while_saving_is_reported_and_previous_checkpoint_survives(tmp_path, mesh, monkeypatch,
                                                                             where):
  save_steps(tmp_path, mesh, [1])
  saver = checkpoint.Checkpointer(tmp_path)
  if where == 'data_item':  # a synchronous file write during save()
    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, 'save', _disk_full)
  else:  # a write in the background thread, before the commit
    monkeypatch.setattr(checkpoint, 'write_manifest', _disk_full)
  with pytest.raises(checkpoint.CheckpointSaveError) as error:
    saver.save(2, make_state(2, mesh), make_iterator(), ml_collections.ConfigDict({'a': 1}))
    saver.wait()
  message = str(error.value)
  assert 'step 2' in message and 'the disk is full' in message
  assert 'last intact checkpoint is step 1' in message and 'rerun the same command' in message
  monkeypatch.undo()
  saver.close()
  assert checkpoint.committed_steps(tmp_path) == [1]
  step, state = _restore(tmp_path, mesh)
  assert step == 1 and float(state.params['logit_scale']) == 1.0
