"""CLIP training step on one accelerator in bf16: throughput and MFU, JAX vs open_clip (PyTorch).

  python benchmarks/accelerator_step.py --model ViT-B-16 --batch 256 --steps 10

The GPU counterpart of `train_step.py` (which measures the CPU). In one process, on the first
device: the bf16 8192^3 matmul rate (the measured peak that MFU is taken against; the datasheet's
dense bf16 figure is printed beside it), then for each `--attention` kernel the jitted CLIP step
(bf16 compute, float32 params, AdamW, gradient clipping, donated state) and the CleanCLIP step, and
then open_clip's step for the same architecture and batch under `torch.autocast(bfloat16)` with
the same optimizer (skipped with `--skip-torch` or when open_clip is not importable). Each step
is timed as the median of `--steps` steps, each synchronised (block_until_ready /
cuda.synchronize), after `--warmup` untimed ones; MFU = analytic FLOPs per example (flops.py,
the same count for both frameworks) x examples/s / the measured matmul rate. Device memory:
JAX's allocator keeps one peak for the process, which nothing resets, so `jax_peak_gib_so_far`
after a kernel includes every earlier kernel's (compile and warm-up too): only the first kernel's
is its own (run one `--attention` value to compare kernels); torch's `peak_gib` is reset after
its warm-up. With torch in the process, JAX does not preallocate 75% of the device
(XLA_PYTHON_CLIENT_PREALLOCATE=false) so that torch has room. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# Dense bf16 tensor-core rate by datasheet (H100/H200 SXM), for reference beside the measured peak.
DATASHEET_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='ViT-B-16')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--attention', default='xla,cudnn', help='comma-separated model.attention values')
  parser.add_argument('--cleanclip-attention', default='cudnn',
                      help="time the CleanCLIP step with this attention kernel only ('' = skip)")
  parser.add_argument('--skip-torch', action='store_true')
  parser.add_argument('--torch-compile', action='store_true', help='also time torch.compile(model)')
  parser.add_argument('--matmul-size', type=int, default=8192)
  return parser.parse_args(argv)


def _median_time(run, steps: int, sync) -> float:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run()
    sync()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak(size: int) -> float:
  import jax
  import jax.numpy as jnp
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), jnp.bfloat16)
  b = jax.random.normal(key_b, (size, size), jnp.bfloat16)
  matmul = jax.jit(jnp.matmul)
  for _ in range(3):
    matmul(a, b).block_until_ready()
  holder = {}

  def run():
    holder['out'] = matmul(a, b)
  seconds = _median_time(run, 10, lambda: holder['out'].block_until_ready())
  return 2 * size ** 3 / seconds


def jax_step(args, objective: str, attention: str):
  """(run, sync, first_step_seconds) for the jitted step of `objective` with `attention`."""
  import jax
  from benchmarks.train_step import build_jax_step
  step_fn, state, global_batch = build_jax_step(args.model, args.batch, objective, 'bfloat16', attention)
  holder = {'state': state, 'metrics': None}

  def run():
    holder['state'], holder['metrics'] = step_fn(holder['state'], global_batch)

  def sync():
    jax.block_until_ready(holder['metrics'])

  start = time.perf_counter()
  run()
  sync()
  first = time.perf_counter() - start
  for _ in range(max(0, args.warmup - 1)):
    run()
  sync()
  return run, sync, first, float(holder['metrics']['loss'])


def torch_step(args, compile_model: bool = False):
  import torch
  try:
    try:
      import open_clip
    except RuntimeError:  # a torchvision build without its C++ ops: stub them (tests/torch_ref.py)
      from benchmarks.train_step import _torch_open_clip
      torch, open_clip, _lib = _torch_open_clip()
  except Exception as error:  # pylint: disable=broad-except
    print(f'open_clip not importable ({type(error).__name__}: {error}); skipping the reference', flush=True)
    return None
  from benchmarks.train_step import _synthetic_batch, open_clip_model
  from cleanclip_jax import models
  from cleanclip_jax.data.normalize import CLIP_MEAN, CLIP_STD
  cfg = models.get_config(args.model)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  model = open_clip_model(open_clip, cfg).to(device)
  model.train()
  forward = torch.compile(model) if compile_model else model
  optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                                weight_decay=0.1, fused=device.type == 'cuda')
  loss_fn = open_clip.ClipLoss()
  batch = _synthetic_batch(args.batch, cfg.vision.image_size, cfg.text.context_length)
  images_u8 = torch.from_numpy(batch['image']).permute(0, 3, 1, 2).contiguous().to(device)
  tokens = torch.from_numpy(batch['tokens']).long().to(device)
  mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
  std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)

  def run():
    images = (images_u8.float() / 255.0 - mean) / std
    with torch.autocast(device.type, dtype=torch.bfloat16):
      image_features, text_features, logit_scale = forward(images, tokens)[:3]
      loss = loss_fn(image_features, text_features, logit_scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

  start = time.perf_counter()
  run()
  sync()
  first = time.perf_counter() - start
  for _ in range(args.warmup - 1):
    run()
  sync()
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  return run, sync, first


def main(argv=None):
  args = _parse_args(argv)
  if not args.skip_torch:  # before JAX starts: leave the device's memory to share with torch
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  import jax
  from cleanclip_jax import flops, models
  device = jax.devices()[0]
  kind = getattr(device, 'device_kind', str(device))
  print(f'jax {jax.__version__} on {jax.default_backend()}: {kind}; model {args.model}, batch '
        f'{args.batch}, bf16 compute', flush=True)
  peak = matmul_peak(args.matmul_size)
  datasheet = next((v for k, v in DATASHEET_BF16.items() if k in kind), None)
  print(f'bf16 {args.matmul_size}^3 matmul: {peak / 1e12:.0f} TFLOP/s measured'
        + (f' (datasheet dense bf16 {datasheet / 1e12:.0f})' if datasheet else ''), flush=True)
  cfg = models.get_config(args.model)
  clip_flops = flops.train_flops_per_example(cfg, 'clip', global_batch=args.batch)
  clean_flops = flops.train_flops_per_example(cfg, 'cleanclip', global_batch=args.batch)
  summary = {'device': kind, 'model': args.model, 'batch': args.batch, 'jax': jax.__version__,
             'matmul_tflops': round(peak / 1e12, 1), 'gflop_per_example': round(clip_flops / 1e9, 2)}

  def report(name, seconds, flops_per_example):
    rate = args.batch / seconds
    mfu = flops.mfu(flops_per_example, rate, peak)
    line = f'{name}: {seconds * 1e3:.1f} ms/step, {rate:.0f} img/s, MFU {mfu:.3f} of measured peak'
    if datasheet:
      line += f', {flops.mfu(flops_per_example, rate, datasheet):.3f} of datasheet'
    print(line, flush=True)
    summary[name] = {'ms_per_step': round(seconds * 1e3, 2), 'img_per_s': round(rate, 1),
                     'mfu': round(mfu, 4)}
    return rate

  for attention in args.attention.split(','):
    try:
      run, sync, first, loss = jax_step(args, 'clip', attention)
    except Exception as error:  # pylint: disable=broad-except
      print(f'jax clip [{attention}] failed: {type(error).__name__}: {str(error)[:400]}', flush=True)
      continue
    print(f'jax clip [{attention}]: first step {first:.1f}s (compile + run), loss {loss:.4f}', flush=True)
    clip_seconds = _median_time(run, args.steps, sync)
    report(f'jax_clip_{attention}', clip_seconds, clip_flops)
    stats = device.memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      summary[f'jax_clip_{attention}']['jax_peak_gib_so_far'] = round(
          stats['peak_bytes_in_use'] / 2**30, 2)
      print(f'  peak device memory so far {stats["peak_bytes_in_use"] / 2**30:.2f} GiB', flush=True)
    del run, sync
    if attention == args.cleanclip_attention:
      try:
        run, sync, first, loss = jax_step(args, 'cleanclip', attention)
      except Exception as error:  # pylint: disable=broad-except
        print(f'jax cleanclip [{attention}] failed: {type(error).__name__}: {str(error)[:400]}', flush=True)
        continue
      clean_seconds = _median_time(run, args.steps, sync)
      report(f'jax_cleanclip_{attention}', clean_seconds, clean_flops)
      summary[f'jax_cleanclip_{attention}']['over_clip_time'] = round(clean_seconds / clip_seconds, 3)
      print(f'  cleanclip / clip step time {clean_seconds / clip_seconds:.2f}', flush=True)
      del run, sync

  if not args.skip_torch:
    for compiled in ([False, True] if args.torch_compile else [False]):
      name = 'torch_open_clip' + ('_compiled' if compiled else '')
      try:
        runner = torch_step(args, compile_model=compiled)
      except Exception as error:  # pylint: disable=broad-except
        print(f'{name} failed: {type(error).__name__}: {str(error)[:400]}', flush=True)
        continue
      if runner is None:
        break
      run, sync, first = runner
      print(f'{name}: first step {first:.1f}s', flush=True)
      report(name, _median_time(run, args.steps, sync), clip_flops)
      import torch
      if torch.cuda.is_available():
        summary[name]['peak_gib'] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
  best_jax = max((v['img_per_s'] for k, v in summary.items() if k.startswith('jax_clip_')), default=0)
  if 'torch_open_clip' in summary and best_jax:
    summary['jax_over_torch'] = round(best_jax / summary['torch_open_clip']['img_per_s'], 3)
    print(f'best jax clip step / open_clip: {summary["jax_over_torch"]:.2f}x throughput', flush=True)
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  main()
