"""The benchmark scripts still run end to end (tiny model, one timed round each).

They are not imported by the library, so nothing else would notice when a config check or an API
change breaks them: the thirteenth session's `data.image_size` check did, unseen, until the next
session ran `benchmarks/train_step.py`. Figures are not checked here (README, 'Performance')."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks import cpu_thunk_profile  # pylint: disable=wrong-import-position


def _run(script: str, *args: str, timeout: int = 300) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  # One device, as the benchmarks measure it; their memory check makes its own emulated devices.
  env['XLA_FLAGS'] = ' '.join(flag for flag in env.get('XLA_FLAGS', '').split()
                              if 'force_host_platform_device_count' not in flag)
  done = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', script), *args], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
  assert done.returncode == 0, f'{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}'
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_train_step_benchmark_runs():
  summary = _run('train_step.py', '--model', 'tiny-vit', '--batch', '8', '--threads', '1',
                 '--steps', '1', '--warmup', '1', '--skip-every-row', '--skip-memory',
                 '--profile-torch', '--profile-jax')
  for clock in ('wall', 'cpu'):
    figures = summary[clock]
    assert figures['jax_img_per_s'] > 0 and figures['matmul_peak_gflops'] > 0
    assert 0 < figures['mfu_at_tokens_fed'] <= figures['mfu']
    assert figures['cleanclip_over_clip_time'] > 0 and figures['torch_img_per_s'] > 0
  assert summary['pack_captions'] and summary['text_rows'] < 8  # packed, as the trainer feeds it
  profile = summary['torch_profile']  # the reference's step under torch.profiler
  assert 0 < profile['matmul_ms'] < profile['step_self_cpu_ms'] and profile['matmul_gflop'] > 0
  thunks = summary['jax_profile']  # the JAX CLIP step's XLA thunks by kind
  assert thunks['thunk_ms'] > 0 and set(thunks['category_ms']) == set(cpu_thunk_profile.CATEGORIES)
  assert abs(sum(thunks['category_ms'].values()) - thunks['thunk_ms']) < 0.5
  assert sum(thunks['category_gflop'].values()) > 0 and thunks['matmul_gflops'] > 0  # found, counted
  assert 0 < thunks['mfu_at_tokens_fed_strict'] <= summary['cpu']['mfu_at_tokens_fed']


def test_thunk_classes_count_dot_flops_and_copies():
  # Compiled here on the CPU backend: whichever kernel XLA picks for the dot, its FLOPs are
  # counted once, and a bare transpose is a layout copy.
  a, b = jnp.ones((96, 80), jnp.float32), jnp.ones((80, 112), jnp.float32)
  kinds = cpu_thunk_profile.classify(jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(a, b).compile().as_text())
  assert sum(flops for _, flops, _ in kinds.values()) == 2 * 96 * 80 * 112
  assert {category for category, flops, _ in kinds.values() if flops} <= {'YNNPACK matmuls', 'Eigen dots'}
  batched = jax.jit(lambda a, b: jnp.einsum('bij,bjk->bik', a, b))
  x, y = jnp.ones((3, 16, 24)), jnp.ones((3, 24, 8))
  kinds = cpu_thunk_profile.classify(batched.lower(x, y).compile().as_text())
  assert sum(flops for _, flops, _ in kinds.values()) == 2 * 3 * 16 * 24 * 8
  moved = cpu_thunk_profile.classify(jax.jit(lambda a: a.T * 1).lower(a).compile().as_text())
  assert {category for category, _, _ in moved.values()} == {'copies and fills'}


def test_accelerator_step_benchmark_runs_on_cpu():
  summary = _run('accelerator_step.py', '--model', 'tiny-vit', '--batch', '8', '--steps', '1',
                 '--warmup', '1', '--attention', 'xla', '--cleanclip-attention', '', '--skip-torch',
                 '--matmul-size', '256')
  assert summary['model'] == 'tiny-vit' and summary['jax_clip_xla']['img_per_s'] > 0


@pytest.mark.parametrize('extra', [(), ('--poison-fraction', '1', '--no-views')])
def test_pipeline_benchmark_runs(extra):
  summary = _run('pipeline.py', '--image-size', '64', '--num-examples', '8', '--seconds', '0.1',
                 '--rounds', '1', *extra)
  assert summary['decode_img_per_s'] > 0 and summary['pipeline_img_per_s'] > 0
  assert summary['poisoned'] == (8 if extra else 0)
