"""Input-pipeline throughput per worker: bare decode+resize vs the full training example.

    python benchmarks/pipeline.py                      # image_size 64 (synthetic images as 64 px JPEGs)
    python benchmarks/pipeline.py --image-size 224     # 224 px output from 256 px JPEGs
    python benchmarks/pipeline.py --profile            # + a cProfile of the full path (stderr)
    python benchmarks/pipeline.py --poison-fraction 1  # worst case: every example poisoned

Single process, no grain workers, so the figures are images/s *per worker* (a grain worker runs
exactly this code). The data is the synthetic set rendered once and held as JPEG bytes in memory,
so file-system speed is not measured.
  (a) decode: JPEG decode + bicubic resize of the shorter side + centre crop, written with PIL alone
      (the least any loader does), so that nothing of this repository can slow the reference down;
      the pipeline's `image` must equal it pixel for pixel (checked).
  (b) pipeline: `pipeline.TrainExample` - (a), then BadNet trigger and poisoned caption on the
      poisoned examples (`--poison-fraction`, default the paper's 1,500 of 3M = 0.05%, which rounds
      to none of the 256 examples; 1 = every example, the worst case), AutoAugment + EDA views
      (CleanCLIP finetuning's example; `--no-views`: pretraining's, without them), and tokenizing
      the captions; the shuffled epoch plan (over `--epoch-size`, CC3M's 3M by default) picks each
      step's example, as in training.
The last line printed is one JSON object: {"decode_img_per_s", "pipeline_img_per_s", "ratio"}.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import numpy as np
from PIL import Image

from cleanclip_jax import config as config_lib
from cleanclip_jax import cpu_dots
from cleanclip_jax.data import pipeline, synthetic


class JpegSource:
  """The synthetic set as in-memory JPEG records (what an ArrayRecord source yields).

  It claims `epoch_size` examples (index i is record i % num_examples), so that the epoch plan
  shuffles a dataset of a real size: grain's index shuffle costs ~100 us an index over 256
  examples but ~3.5 us from 64k examples up.
  """

  def __init__(self, num_examples: int, render_size: int, epoch_size: int, quality: int = 90):
    images = synthetic.SyntheticCaptions(num_examples, image_size=render_size, split='pretrain', seed=0)
    self.records = []
    for i in range(num_examples):
      record = images[i]
      buffer = io.BytesIO()
      Image.fromarray(record['image']).save(buffer, 'JPEG', quality=quality)
      self.records.append({'image_bytes': buffer.getvalue(), 'caption': record['caption'],
                           'label': record['label'], 'image_path': ''})
    self.epoch_size = max(epoch_size, num_examples)

  def __len__(self) -> int:
    return self.epoch_size

  def __getitem__(self, index: int) -> dict:
    return dict(self.records[index % len(self.records)], index=index)


def _rate(fn, count: int, min_seconds: float) -> float:
  """Images per CPU second of this process of `fn(i)` over i = 0..count-1, repeated until
  `min_seconds` of CPU time have passed. CPU time, not wall time: a grain worker is one process,
  and on a shared machine wall time mostly measures how often the scheduler runs us."""
  done, start = 0, time.process_time()
  while True:
    for i in range(count):
      fn(i)
    done += count
    elapsed = time.process_time() - start
    if elapsed >= min_seconds:
      return done / elapsed


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--image-size', type=int, default=64, help='pipeline output size (data.image_size)')
  parser.add_argument('--render-size', type=int, default=0,
                      help='size of the stored JPEGs; default 64 for image_size <= 64, else 256')
  parser.add_argument('--num-examples', type=int, default=256, help='distinct images timed')
  parser.add_argument('--epoch-size', type=int, default=3_000_000,
                      help='dataset size the shuffled epoch plan draws from (default: CC3M\'s)')
  parser.add_argument('--seconds', type=float, default=3.0, help='minimum timing per measurement')
  parser.add_argument('--poison-fraction', type=float, default=1500 / 3_000_000,
                      help='fraction of examples poisoned (default: CleanCLIP\'s 1,500 of CC3M\'s 3M)')
  parser.add_argument('--cold-captions', action='store_true',
                      help='empty the tokenizer\'s whole-caption cache before every example (a large '
                           'data set, whose captions do not recur within the cache)')
  parser.add_argument('--no-views', action='store_true',
                      help='leave out the in-modal views (AutoAugment image, EDA caption): the '
                           'pretraining pipeline (CLIP, poisoned), not CleanCLIP finetuning\'s')
  parser.add_argument('--rounds', type=int, default=3,
                      help='(a) and (b) are timed alternately this many times (best of each), so '
                           'load changes on a shared machine hit both')
  parser.add_argument('--profile', action='store_true', help='cProfile the full path, top functions to stderr')
  args = parser.parse_args(argv)
  size = args.image_size
  render = args.render_size or (64 if size <= 64 else 256)
  source = JpegSource(args.num_examples, render, args.epoch_size)
  count = args.num_examples
  config = config_lib.base_config()
  config.data.image_size = size
  config.data.inmodal_views = not args.no_views
  plan = pipeline.EpochPlan(len(source), config.seed, config.data.shuffle, 0, 1)  # shuffled, as training
  visited = [plan(step)[1] for step in range(count)]  # the source index of each timed step

  def decode_resize(step):
    # The image of step `step`, decoded with PIL alone.
    image = Image.open(io.BytesIO(source.records[visited[step] % count]['image_bytes']))
    image.draft('RGB', (size, size))
    if image.mode != 'RGB':
      image = image.convert('RGB')
    width, height = image.size
    if width != size or height != size:
      side = min(width, height)
      left, top = (width - side) / 2, (height - side) / 2
      image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    return np.asarray(image, np.uint8)

  num_poisoned = int(round(args.poison_fraction * count))
  config.data.poison.update(enabled=num_poisoned > 0, num_poisoned=max(1, num_poisoned),
                            trigger=dict(kind='badnet_noise'))
  poisoned = np.asarray(visited, np.int64)[np.linspace(0, count - 1, num_poisoned).round().astype(np.int64)]
  example = pipeline.TrainExample(source, plan, config.data, config.seed, config.model.context_length,
                                  None, config.model.tokenizer, poisoned)
  # One untimed pass of both: the warm-up (tokenizer vocabulary, EDA synonym table, trigger
  # pattern) and the check that the pipeline's clean images are the reference's.
  for step in range(count):
    out, reference = example(step), decode_resize(step)
    if not out['is_poisoned'] and not np.array_equal(out['image'], reference):
      raise AssertionError(f'step {step}: the pipeline\'s image differs from the reference decode')

  full_example = example
  if args.cold_captions:
    text_cache = getattr(example._tokenizer, '_text_cache', {})  # pylint: disable=protected-access

    def full_example(i):
      text_cache.clear()
      return example(i)

  decode_rate = pipeline_rate = 0.0
  for _ in range(max(1, args.rounds)):
    decode_rate = max(decode_rate, _rate(decode_resize, count, args.seconds))
    pipeline_rate = max(pipeline_rate, _rate(full_example, count, args.seconds))
  result = {'cpu_model': cpu_dots.cpu_model(),
            'decode_img_per_s': round(decode_rate, 1), 'pipeline_img_per_s': round(pipeline_rate, 1),
            'ratio': round(pipeline_rate / decode_rate, 3), 'poisoned': num_poisoned,
            'image_size': size, 'cold_captions': args.cold_captions, 'views': not args.no_views,
            'load_average': round(os.getloadavg()[0], 2)}
  print(f'image_size {size} (JPEGs stored at {render} px), {count} examples ({num_poisoned} poisoned), '
        f'one process, per CPU second, best of {args.rounds} alternating rounds, load average {os.getloadavg()[0]:.1f}:')
  print(f'  (a) decode + resize + crop:                      {decode_rate:9.1f} img/s')
  what = 'poison, tokens' if args.no_views else 'poison, views, both tokens'
  print(f'  (b) full example ({what}):'.ljust(51) + f'{pipeline_rate:9.1f} img/s')
  print(f'  ratio (b)/(a): {pipeline_rate / decode_rate:.3f}')
  if args.profile:
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(count):
      example(i)
    profiler.disable()
    pstats.Stats(profiler, stream=sys.stderr).sort_stats('tottime').print_stats(15)
  sys.stdout.flush()
  print(json.dumps(result), flush=True)
  return result


if __name__ == '__main__':
  main()
