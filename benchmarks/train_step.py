"""Training-step throughput and MFU: the jitted JAX CLIP and CleanCLIP steps vs open_clip (PyTorch).

  python benchmarks/train_step.py --batch 64 --threads 2 --steps 5

Runs on the current JAX backend (CPU here, one device) and on the CPU for PyTorch, with the same
model (`bench-vit`: ViT 64px/8, width 256, 6 layers; text width 256, 6 layers, context 77), the same
batch, AdamW and gradient clipping in both. After `--warmup` untimed steps each (the first
compiles), the JAX CLIP step, the JAX CleanCLIP step, the JAX CLIP step computing every row of the
last blocks (`model.pooled_last_block=False`, the form before that change and open_clip's), the
open_clip step and the f32 2048^2 matmul are timed in alternation, `--steps` rounds, so a load
change on a shared machine hits all of them; in each round every one runs `--settle` untimed times
(default 1) right before its timed run, so it is timed as training runs it, back to back with
itself, not straight after another workload has filled the caches (on the twelfth session's
machine that cost the CleanCLIP step ~8% and the CLIP step ~3%, turning a 2.00x ratio into 2.16x);
each is reported as the median over rounds, in wall time and in process CPU time (CPU time
discounts the time other processes hold the cores; with 1 thread it is the work itself). MFU =
analytic FLOPs / step time over the matmul's FLOP/s measured with the same clock (the model's
count for every implementation; the FLOPs the pooled step executes are printed beside it).
Captions are 6..76 tokens by default (`--max-caption-tokens N`: 6..N). The JAX steps get the
batch as the trainer feeds it: the captions packed several to a token row of 77
(`data.pack_captions`, on by default), or with `--no-pack-captions` one caption a row, cut after
the longest caption (`data.token_bucket`); open_clip always computes 64 rows of 77. MFU is printed
for the model's FLOPs at all 77 columns (what open_clip computes) and at the rows and columns fed
(`mfu_at_tokens_fed`), since the full count would credit the skipped tokens. Then the
sharded-loss memory check: for the dense and the sharded CLIP loss, the per-device
temp bytes XLA plans for the loss gradient at 4 and 8 emulated CPU devices with a fixed per-device
batch (each in a subprocess, since the device count is fixed at JAX start-up). `--profile-torch`
then profiles two open_clip steps with torch.profiler (the reference's ops by self CPU time, and
its matmuls' rate); `--profile-jax` traces three JAX CLIP steps and sorts XLA's thunk time by kind
(YNNPACK and Eigen matmuls with their rates, copies, element-wise fusions; CPU only).
Last line: JSON.

Threads: XLA's CPU runtime sizes its thread pool from the process's CPU affinity (it has no
intra-op thread-count flag; `--xla_cpu_multi_thread_eigen=false` only switches Eigen threading off),
so `--threads N` pins the process to N CPUs with `os.sched_setaffinity` (what `taskset` does)
before JAX or PyTorch start, and PyTorch additionally gets `torch.set_num_threads(N)`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks import cpu_thunk_profile  # pylint: disable=wrong-import-position


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='bench-vit')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--steps', type=int, default=5, help='timed rounds (medians reported)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps first (compile, caches)')
  parser.add_argument('--settle', type=int, default=1,
                      help='untimed runs of each step right before its timed run in every round '
                           '(0: time it straight after the other workloads, the cold-cache case)')
  parser.add_argument('--skip-torch', action='store_true')
  parser.add_argument('--skip-every-row', action='store_true',
                      help='do not time the CLIP step with model.pooled_last_block=False (the '
                           'in-run reference for what the pooled last blocks save)')
  parser.add_argument('--max-caption-tokens', type=int, default=0,
                      help='captions (SOT and EOT included) are 6..N tokens long, uniformly; '
                           '0 = context - 1 (76 for bench-vit: every batch needs nearly all columns)')
  parser.add_argument('--token-bucket', type=int, default=16,
                      help="the JAX steps' data.token_bucket (0: every batch keeps all context "
                           'columns, as open_clip feeds them)')
  parser.add_argument('--pack-captions', action=argparse.BooleanOptionalAction, default=True,
                      help="the JAX steps' data.pack_captions (--no-pack-captions: one caption a "
                           'row, as open_clip feeds them)')
  parser.add_argument('--skip-memory', action='store_true')
  parser.add_argument('--profile-torch', action='store_true',
                      help='after the timing, profile two open_clip steps with torch.profiler: '
                           'where the reference\'s time goes')
  parser.add_argument('--profile-jax', action='store_true',
                      help='after the timing, trace three JAX CLIP steps (CPU backend) and print '
                           'where their time goes by kind of XLA thunk (cpu_thunk_profile.py)')
  parser.add_argument('--memory-devices', default='4,8')
  parser.add_argument('--memory-batch-per-device', type=int, default=256)
  # Internal: the memory-analysis child process.
  parser.add_argument('--memory-child', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.profile_torch and args.skip_torch:
    parser.error('--profile-torch profiles the open_clip step, which --skip-torch leaves out')
  return args


def _pin_threads(threads: int) -> None:
  available = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, set(available[:max(1, threads)]))


def _synthetic_batch(batch: int, image_size: int, context: int, seed: int = 0,
                     max_caption_tokens: int = 0):
  """Random images and captions of 6..`max_caption_tokens` tokens (0: context - 1), padded to
  `context` as open_clip's tokenizer pads them."""
  import numpy as np
  rng = np.random.default_rng(seed)
  tokens = np.zeros((batch, context), np.int32)
  longest = max_caption_tokens or context - 1
  if not 6 <= longest <= context:
    raise SystemExit(f'--max-caption-tokens {max_caption_tokens}: use 6..{context}')
  lengths = rng.integers(5, longest, batch)  # EOT positions
  for i, length in enumerate(lengths):
    tokens[i, 0] = 49406  # SOT
    tokens[i, 1:length] = rng.integers(1, 49000, length - 1)
    tokens[i, length] = 49407  # EOT: the largest id, where both models pool
  images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
  return {'image': images, 'tokens': tokens,
          'aug_image': np.flip(images, axis=2).copy(), 'aug_tokens': tokens.copy()}


class Timer:
  """Wall and process-CPU seconds of each call of `run`, kept per name."""

  def __init__(self):
    self.wall, self.cpu = {}, {}

  def time(self, name: str, run) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    self.wall.setdefault(name, []).append(time.perf_counter() - wall)
    self.cpu.setdefault(name, []).append(time.process_time() - cpu)

  def median(self, name: str, clock: str) -> float:
    return statistics.median((self.wall if clock == 'wall' else self.cpu)[name])


def build_jax_step(model_name: str, batch_size: int, objective: str, dtype: str = 'float32',
                   attention: str = 'xla', pooled_last_block: bool = True, token_bucket: int = 0,
                   max_caption_tokens: int = 0, pack_captions: bool = False):
  """(step_fn, state, global_batch): the trainer's jitted step on one device, its fresh state and
  a synthetic batch already on the device, its tokens packed (`pack_captions`) or cut as the
  trainer's `train.text_batch` makes them (shared with `accelerator_step.py`)."""
  import jax
  from cleanclip_jax import config as config_lib
  from cleanclip_jax import models, sharding, train, train_step

  config = config_lib.base_config()
  config.model.name = model_name
  config.data.image_size = models.get_config(model_name).vision.image_size
  config.model.dtype = dtype
  config.model.attention = attention
  config.model.pooled_last_block = pooled_last_block
  config.batch_size = batch_size
  config.objective.name = objective
  config.mesh.data, config.mesh.fsdp = 1, 1
  config.data.token_bucket = token_bucket
  config.data.pack_captions = pack_captions
  config.warmup_steps = 0
  config_lib.validate(config, 1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = train_step.model_for_config(config)
  state, shardings = train_step.create_train_state(config, model, mesh, jax.random.PRNGKey(0))
  step_fn = train_step.make_train_step(config, model, mesh, shardings)
  batch = _synthetic_batch(batch_size, model.image_size, model.context_length,
                           max_caption_tokens=max_caption_tokens)
  if objective != 'cleanclip':
    batch = {k: v for k, v in batch.items() if not k.startswith('aug_')}
  batch = train.text_batch(batch, config, mesh)
  return step_fn, state, sharding.host_batch_to_global(batch, mesh)


def jax_step_runner(args, objective: str, pooled_last_block: bool = True):
  """A no-argument callable running one jitted step for `objective` (state kept inside);
  `.text_shape` is (token columns, token rows per caption) of its batch."""
  import jax
  from cleanclip_jax import text_packing
  step_fn, state, global_batch = build_jax_step(args.model, args.batch, objective,
                                                pooled_last_block=pooled_last_block,
                                                token_bucket=args.token_bucket,
                                                max_caption_tokens=args.max_caption_tokens,
                                                pack_captions=args.pack_captions)
  holder = {'state': state}

  def run():
    holder['state'], metrics = step_fn(holder['state'], global_batch)
    jax.block_until_ready(metrics)
  start = time.perf_counter()
  run()
  print(f'jax {objective}{"" if pooled_last_block else " (every row)"}: first step (compile + run) '
        f'{time.perf_counter() - start:.1f}s', flush=True)
  for _ in range(max(0, args.warmup - 1)):
    run()
  run.text_shape = text_packing.packed_shape(global_batch)
  run.hlo_text = lambda: step_fn.lower(holder['state'], global_batch).compile().as_text()
  return run


def matmul_runner(size: int = 2048):
  """One jitted f32 size x size matmul (the MFU denominator, as `flops.measure_matmul_peak`)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((size, size)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((size, size)), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  return lambda: matmul(a, b).block_until_ready(), 2 * size ** 3


def _torch_open_clip():
  import torch
  # torchvision's CUDA build breaks `import open_clip` without these op stubs (see tests/torch_ref.py).
  lib = torch.library.Library('torchvision', 'DEF')
  lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  import open_clip
  return torch, open_clip, lib


def open_clip_model(open_clip, cfg):
  """open_clip's CLIP with the architecture of our `ModelConfig` `cfg` (a ViT)."""
  return open_clip.model.CLIP(
      embed_dim=cfg.embed_dim, quick_gelu=cfg.quick_gelu,
      vision_cfg=dict(image_size=cfg.vision.image_size, layers=cfg.vision.layers, width=cfg.vision.width,
                      patch_size=cfg.vision.patch_size, head_width=cfg.vision.head_width,
                      mlp_ratio=cfg.vision.mlp_ratio),
      text_cfg=dict(context_length=cfg.text.context_length, vocab_size=cfg.text.vocab_size,
                    width=cfg.text.width, heads=cfg.text.heads, layers=cfg.text.layers,
                    mlp_ratio=cfg.text.mlp_ratio))


def torch_step_runner(args):
  """A no-argument callable running one open_clip CLIP step (same architecture, f32, AdamW)."""
  from cleanclip_jax import models
  from cleanclip_jax.data.normalize import CLIP_MEAN, CLIP_STD
  torch, open_clip, _lib = _torch_open_clip()
  torch.set_num_threads(args.threads)
  cfg = models.get_config(args.model)
  if cfg.vision.is_resnet:
    raise SystemExit('the open_clip comparison is written for ViT models')
  model = open_clip_model(open_clip, cfg)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
  loss_fn = open_clip.ClipLoss()
  batch = _synthetic_batch(args.batch, cfg.vision.image_size, cfg.text.context_length,
                           max_caption_tokens=args.max_caption_tokens)
  images_u8 = torch.from_numpy(batch['image']).permute(0, 3, 1, 2).contiguous()
  tokens = torch.from_numpy(batch['tokens']).long()
  mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

  def run():
    images = (images_u8.float() / 255.0 - mean) / std
    image_features, text_features, logit_scale = model(images, tokens)[:3]  # logit_scale: exp'd
    loss = loss_fn(image_features, text_features, logit_scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
  run.keep_alive = _lib  # the op stubs must outlive the model
  for _ in range(args.warmup):
    run()
  return run


MATMUL_OPS = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm')


def _matmul_flops(name: str, shapes: list) -> int:
  """FLOPs of one call of a torch matmul op from its recorded input shapes (addmm / baddbmm
  take the added tensor first)."""
  left, right = shapes[1:3] if name in ('aten::addmm', 'aten::baddbmm') else shapes[:2]
  batch = left[0] if len(left) == 3 else 1
  return 2 * batch * left[-2] * left[-1] * right[-1]


def profile_torch(run, steps: int = 2, top: int = 15) -> dict:
  """torch.profiler over `steps` calls of the open_clip step: prints the ops with the most self
  CPU time per step; returns the step's profiled self CPU time and its matmuls' time and rate."""
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    for _ in range(steps):
      run()
  events = prof.key_averages()
  step_ms = sum(e.self_cpu_time_total for e in events) / steps / 1e3
  print(f'open_clip step under torch.profiler: {step_ms:.0f} ms of self CPU time a step; top ops:')
  for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
    print(f'  {e.self_cpu_time_total / steps / 1e3:8.1f} ms {e.count / steps:6.0f} calls  {e.key}')
  matmul_ms = matmul_flops = 0.0
  for e in prof.key_averages(group_by_input_shape=True):
    if e.key in MATMUL_OPS:
      matmul_ms += e.self_cpu_time_total / steps / 1e3
      matmul_flops += _matmul_flops(e.key, e.input_shapes) * e.count / steps
  rate = matmul_flops / 1e9 / (matmul_ms / 1e3) if matmul_ms else 0.0
  print(f'  matmuls ({", ".join(MATMUL_OPS)}): {matmul_ms:.0f} ms a step, '
        f'{matmul_flops / 1e9:.1f} GFLOP, {rate:.1f} GFLOP/s')
  return {'step_self_cpu_ms': round(step_ms, 1), 'matmul_ms': round(matmul_ms, 1),
          'matmul_gflop': round(matmul_flops / 1e9, 2), 'matmul_gflops': round(rate, 1)}


MEMORY_FORMS = ('dense', 'gather', 'ring')


def memory_child(args) -> None:
  """Temp bytes per device of d(loss)/d(features) for the dense and sharded CLIP loss."""
  import jax
  import jax.numpy as jnp
  from cleanclip_jax import losses, sharding
  devices = jax.device_count()
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1})
  batch = args.memory_batch_per_device * devices
  spec = jax.ShapeDtypeStruct((batch, 256), jnp.float32, sharding=sharding.batch_sharding(mesh))
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  result = {'devices': devices, 'global_batch': batch}
  for name, loss_mesh, impl in (('dense', None, 'gather'), ('gather', mesh, 'gather'), ('ring', mesh, 'ring')):
    loss = lambda i, t, s, m=loss_mesh, impl=impl: losses.clip_loss(i, t, s, m, impl)
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    analysis = grad.lower(spec, spec, scale).compile().memory_analysis()
    result[f'{name}_temp_bytes'] = int(analysis.temp_size_in_bytes)
  print('MEMORY ' + json.dumps(result), flush=True)


def run_memory(args) -> list[dict]:
  rows = []
  for devices in [int(d) for d in args.memory_devices.split(',')]:
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    out = subprocess.run([sys.executable, os.path.abspath(__file__), '--memory-child', str(devices),
                          '--memory-batch-per-device', str(args.memory_batch_per_device)],
                         env=env, capture_output=True, text=True, timeout=600, check=True)
    line = next(l for l in out.stdout.splitlines() if l.startswith('MEMORY '))
    rows.append(json.loads(line[len('MEMORY '):]))
  print(f'sharded-loss memory (per-device temp bytes of the loss gradient, '
        f'{args.memory_batch_per_device} examples per device, embed 256):')
  for row in rows:
    print(f"  {row['devices']} devices (global batch {row['global_batch']}): " + ', '.join(
        f"{name} {row[name + '_temp_bytes'] / 2**20:.2f} MiB" for name in MEMORY_FORMS))
  if len(rows) >= 2:
    print(f'  growth from {rows[0]["devices"]} to {rows[-1]["devices"]} devices: ' + ', '.join(
        f"{name} x{rows[-1][name + '_temp_bytes'] / max(1, rows[0][name + '_temp_bytes']):.2f}"
        for name in MEMORY_FORMS))
  return rows


def main(argv=None):
  args = _parse_args(argv)
  if args.memory_child:
    memory_child(args)
    return
  _pin_threads(args.threads)
  if args.profile_jax:
    cpu_thunk_profile.enable_thunk_tracing()  # before JAX starts its CPU backend
  from cleanclip_jax import cpu_dots, host_memory
  # As the trainer does (CLEANCLIP_KEEP_FREED_MEMORY=0 opts out); for open_clip's step too.
  kept = host_memory.keep_freed_memory()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  onednn = cpu_dots.route_dots_to_onednn()  # as the trainer does (CLEANCLIP_ONEDNN_DOTS=1 opts in)
  import jax
  from cleanclip_jax import flops, models

  memory = [] if args.skip_memory else run_memory(args)
  print(f'backend {jax.default_backend()}, {args.threads} threads '
        f'(affinity {sorted(os.sched_getaffinity(0))}), batch {args.batch}, model {args.model}, '
        f'host_memory.keep_freed_memory {"on" if kept else "off"}, '
        f'XLA CPU dots through oneDNN {"on" if onednn else "off"}', flush=True)
  runners = {'clip': jax_step_runner(args, 'clip'), 'cleanclip': jax_step_runner(args, 'cleanclip')}
  if not args.skip_every_row:
    runners['clip_every_row'] = jax_step_runner(args, 'clip', pooled_last_block=False)
  if not args.skip_torch:
    runners['torch'] = torch_step_runner(args)
  runners['matmul'], matmul_flops = matmul_runner()
  timer = Timer()
  for _ in range(max(1, args.steps)):
    for name, run in runners.items():
      for _ in range(max(0, args.settle)):
        run()
      timer.time(name, run)

  cfg = models.get_config(args.model)
  length, rows = runners['clip'].text_shape  # open_clip is fed 1 row of all context columns
  clean_length, clean_rows = runners['cleanclip'].text_shape
  longest = args.max_caption_tokens or cfg.text.context_length - 1
  clip_flops = flops.train_flops_per_example(cfg, 'clip', global_batch=args.batch)
  clean_flops = flops.train_flops_per_example(cfg, 'cleanclip', global_batch=args.batch,
                                              text_length=clean_length, text_rows=clean_rows)
  fed_flops = flops.train_flops_per_example(cfg, 'clip', global_batch=args.batch, text_length=length,
                                            text_rows=rows)
  executed_flops = flops.train_flops_per_example(cfg, 'clip', global_batch=args.batch, executed=True,
                                                 text_length=length, text_rows=rows)
  fed = f'{rows * args.batch:.0f} rows of {length} tokens'
  print(f'captions of 6..{longest} tokens; the JAX clip steps are fed {fed} '
        f'(pack_captions {args.pack_captions}; token_bucket {args.token_bucket} if not packed), open_clip '
        f'{args.batch} rows of {cfg.text.context_length}')
  summary = {'cpu_model': cpu_dots.cpu_model(), 'threads': args.threads, 'batch': args.batch, 'settle': args.settle,
             'keep_freed_memory': kept, 'onednn_dots': onednn,
             'load_average': round(os.getloadavg()[0], 2),
             'max_caption_tokens': longest, 'pack_captions': args.pack_captions,
             'token_columns': length, 'text_rows': round(rows * args.batch)}
  for clock in ('wall', 'cpu'):
    peak = matmul_flops / timer.median('matmul', clock)
    clip_time, clean_time = timer.median('clip', clock), timer.median('cleanclip', clock)
    rate = args.batch / clip_time
    print(f'[{clock} time] f32 2048^2 matmul {peak / 1e9:.1f} GFLOP/s')
    print(f'[{clock} time] jax clip:      {clip_time * 1e3:.0f} ms/step, {rate:.2f} img/s, '
          f'{clip_flops / 1e9:.2f} GFLOP/example (all {cfg.text.context_length} columns, as open_clip '
          f'runs them), MFU {flops.mfu(clip_flops, rate, peak):.3f}; at the {fed} fed {fed_flops / 1e9:.2f} GFLOP/example, MFU '
          f'{flops.mfu(fed_flops, rate, peak):.3f} (executed {executed_flops / 1e9:.2f} GFLOP/example: '
          f'{flops.mfu(executed_flops, rate, peak):.3f} of the peak)')
    # At the tokens fed, as the clip line's second figure (not its first, which counts all columns).
    print(f'[{clock} time] jax cleanclip: {clean_time * 1e3:.0f} ms/step, MFU at the tokens fed '
          f'{flops.mfu(clean_flops, args.batch / clean_time, peak):.3f}, x{clean_time / clip_time:.2f} the clip step time')
    row = {'jax_img_per_s': round(rate, 2), 'mfu': round(flops.mfu(clip_flops, rate, peak), 4),
           'cleanclip_over_clip_time': round(clean_time / clip_time, 3),
           'matmul_peak_gflops': round(peak / 1e9, 1),
           'mfu_at_tokens_fed': round(flops.mfu(fed_flops, rate, peak), 4),
           'executed_flops_utilisation': round(flops.mfu(executed_flops, rate, peak), 4)}
    if 'clip_every_row' in runners:
      every_rate = args.batch / timer.median('clip_every_row', clock)
      print(f'[{clock} time] jax clip, every row (pooled_last_block=False): {every_rate:.2f} img/s, MFU '
            f'{flops.mfu(clip_flops, every_rate, peak):.3f}; pooled / every row {rate / every_rate:.2f}')
      row.update(every_row_img_per_s=round(every_rate, 2),
                 pooled_over_every_row=round(rate / every_rate, 3))
    if 'torch' in runners:
      torch_rate = args.batch / timer.median('torch', clock)
      print(f'[{clock} time] open_clip (torch f32): {1e3 * args.batch / torch_rate:.0f} ms/step, {torch_rate:.2f} img/s, '
            f'MFU {flops.mfu(clip_flops, torch_rate, peak):.3f}; jax / torch throughput {rate / torch_rate:.2f}')
      row.update(torch_img_per_s=round(torch_rate, 2), ratio=round(rate / torch_rate, 3),
                 torch_mfu=round(flops.mfu(clip_flops, torch_rate, peak), 4))
    summary[clock] = row
  print(f'load average {os.getloadavg()}', flush=True)
  if args.profile_torch:
    summary['torch_profile'] = profile_torch(runners['torch'])
  if args.profile_jax:
    profile = summary['jax_profile'] = cpu_thunk_profile.profile(runners['clip'], runners['clip'].hlo_text())
    if args.threads == 1 and profile['matmul_gflops']:
      # Where the step's own dots run faster than the 2048^2 matmul, that yardstick is no peak and
      # the MFU above flatters the step; against the faster of the two rates it cannot.
      yardstick = summary['cpu']['matmul_peak_gflops']
      strict = summary['cpu']['mfu_at_tokens_fed'] * yardstick / max(yardstick, profile['matmul_gflops'])
      profile['mfu_at_tokens_fed_strict'] = round(strict, 4)
      print(f"the step's matmuls ran at {profile['matmul_gflops']:.1f} GFLOP/s, the 2048^2 matmul at "
            f'{yardstick:.1f}: MFU at the tokens fed against the faster of the two {strict:.3f}')
  if memory:
    for name in MEMORY_FORMS:
      summary[f'{name}_loss_temp_bytes'] = {r['devices']: r[f'{name}_temp_bytes'] for r in memory}
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
