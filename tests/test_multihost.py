"""launch/local.py: 2 processes x 4 CPU devices train exactly like 1 process x 8 devices."""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cleanclip_jax import checkpoint, metrics_log

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCHER = str(REPO / 'launch' / 'local.py')

TRAIN_ARGS = ['--config', 'configs/clip_pretrain.py:tiny', '--config.total_steps=4',
              '--config.checkpoint_every_steps=2', '--config.warmup_steps=1', '--config.batch_size=16',
              '--config.model.name=demo-vit', '--config.model.context_length=32', '--config.data.synthetic.num_examples=64',
              # packing off: cut to the global batch's longest caption (the hosts must agree on
              # the length); packing on: the hosts must agree on the row count
              '--config.data.token_bucket=2']


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith('CLEANCLIP_')}
  env.update(JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', **extra)
  return env


def _trace(workdir):
  return [(r['step'], r['loss']) for r in metrics_log.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl')]


@pytest.mark.slow
@pytest.mark.parametrize('pack', [True, False])
def test_two_processes_match_one_process(tmp_path, pack):
  single, multi = tmp_path / 'single', tmp_path / 'multi'
  train = [sys.executable, '-m', 'cleanclip_jax.train']
  train_args = TRAIN_ARGS + [f'--config.data.pack_captions={pack}']
  one = subprocess.Popen(train + train_args + ['--workdir', str(single)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'))
  two = subprocess.run([sys.executable, LAUNCHER, '--num_processes', '2', '--devices_per_process', '4',
                        '--'] + train + train_args + ['--workdir', str(multi)],
                       cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600)
  one_output = one.communicate(timeout=600)[0]
  assert one.returncode == 0, one_output[-3000:]
  assert two.returncode == 0, two.stdout[-3000:]
  assert '[rank 0]' in two.stdout and '[rank 1]' in two.stdout
  assert 'process 1 of 2, 4 local / 8 global devices' in two.stdout
  summary = json.loads((multi / 'summary.json').read_text())
  assert summary['num_processes'] == 2 and summary['data_skips_by_process'] == [{}, {}]

  # Hosts read interleaved shares of each global batch, so the multi-process batch holds the same
  # examples in another order: the losses agree to float rounding.
  expected, actual = _trace(single), _trace(multi)
  assert [s for s, _ in actual] == [1, 2, 3, 4]
  rows = [r['text_rows_per_caption'] for r in metrics_log.read_jsonl(multi / 'metrics.jsonl')]
  assert all(r < 1 for r in rows) if pack else rows == [1.0] * 4, rows
  np.testing.assert_allclose([l for _, l in actual], [l for _, l in expected], rtol=2e-5)
  assert checkpoint.committed_steps(multi) == [2, 4]
  assert sorted(p.name for p in (multi / 'checkpoints' / '4' / 'data').iterdir()
                if p.suffix == '.json') == ['process_0-of-2.json', 'process_1-of-2.json']
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               checkpoint.restore_params(multi), checkpoint.restore_params(single))
  if pack:
    _damaged_resume_and_evaluation(multi, train + train_args)


def _damaged_resume_and_evaluation(workdir, train_command):
  """Process 0 alone picks the step to resume (moving a damaged newer one aside) and every process
  restores it; then the evaluation job follows the run on two processes."""
  trace = _trace(workdir)
  metadata = workdir / 'checkpoints' / '4' / 'state' / '_METADATA'
  metadata.write_bytes(metadata.read_bytes()[:-10])
  (workdir / 'summary.json').unlink()  # the run must train steps 3-4 again
  launch = [sys.executable, LAUNCHER, '--num_processes', '2', '--devices_per_process', '4', '--']
  again = subprocess.run(launch + train_command + ['--workdir', str(workdir)], cwd=REPO,
                         capture_output=True, text=True, env=_env(), timeout=600)
  assert again.returncode == 0, again.stdout[-3000:]
  for rank in (0, 1):
    assert f'[rank {rank}]' in again.stdout and 'Resuming at step 2 of 4' in again.stdout
  assert [p.name.split('-')[0] for p in (workdir / 'checkpoints_rejected').iterdir()] == ['4']
  np.testing.assert_allclose([l for _, l in _trace(workdir)], [l for _, l in trace], rtol=1e-6)
  evaluation = subprocess.run(
      launch + [sys.executable, '-m', 'cleanclip_jax.evaluate', '--config',
                'configs/eval.py:tiny,num_examples=16,batch_size=16', '--config.eval.linear_probe=False',
                '--config.eval.retrieval=False', '--workdir', str(workdir), '--follow', '--timeout', '60'],
      cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600)
  assert evaluation.returncode == 0, evaluation.stdout[-3000:]
  assert [r['step'] for r in metrics_log.read_jsonl(workdir / 'eval' / 'metrics.jsonl')] == [2, 4]


def test_launcher_refuses_a_missing_program():
  done = subprocess.run([sys.executable, LAUNCHER, '--', 'no_such_program_here'], capture_output=True,
                        text=True, timeout=60)
  assert done.returncode == 2 and "'no_such_program_here': no such program" in done.stderr
  assert 'Traceback' not in done.stderr


def test_launcher_stops_everyone_when_one_rank_fails(tmp_path):
  # Rank 1 fails only once the others have printed (each leaves a file): on a busy machine it
  # could otherwise fail, and be noticed, before they have even started.
  script = ('import os, pathlib, sys, time\n'
            'rank = int(os.environ["CLEANCLIP_PROCESS_ID"])\n'
            'print("hello from", rank, os.environ["CLEANCLIP_NUM_PROCESSES"], os.environ["JAX_COORDINATOR_ADDRESS"],'
            ' os.environ["XLA_FLAGS"], flush=True)\n'
            f'ready = pathlib.Path({str(tmp_path)!r})\n'
            '(ready / str(rank)).touch()\n'
            'if rank != 1: time.sleep(120)\n'
            'deadline = time.time() + 30\n'
            'while not all((ready / r).exists() for r in "02") and time.time() < deadline: time.sleep(0.05)\n'
            'sys.exit(3)\n')
  started = time.time()
  result = subprocess.run([sys.executable, LAUNCHER, '--num_processes', '3', '--devices_per_process', '2',
                           '--', sys.executable, '-c', script], capture_output=True, text=True,
                          env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'), timeout=120)
  assert result.returncode == 3
  assert time.time() - started < 60  # the sleeping ranks were stopped, not waited for
  for rank in range(3):
    assert f'[rank {rank}] hello from {rank} 3 127.0.0.1:' in result.stdout
  assert '--xla_force_host_platform_device_count=2' in result.stdout
  assert 'count=8' not in result.stdout
  assert 'rank 1 exited with 3' in result.stdout


@pytest.mark.parametrize('message, single', [
    ('coordinator_address should be defined.', True),  # no cluster: one process
    ('Number of processes must be defined.', False),  # a coordinator without a process count
])
def test_only_a_missing_cluster_means_one_process(monkeypatch, message, single):
  from cleanclip_jax import distributed

  def initialize(*args, **kwargs):
    raise ValueError(message)
  for key in (distributed.ENV_NUM_PROCESSES, distributed.ENV_COORDINATOR, distributed.ENV_DISABLE):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setattr(jax.distributed, 'initialize', initialize)
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  if single:
    distributed.initialize()
  else:
    with pytest.raises(RuntimeError, match=r'Number of processes must be defined\. Set all of'):
      distributed.initialize()
