"""Per-example random streams: `example_random(seed, epoch, index, stage)`.

Every training example draws its augmentations from a stream keyed by four small ints, so a run is
reproducible and resumable from any step, and each random stage (crop, AutoAugment, EDA) has a
stream of its own: switching one stage off leaves the others' draws unchanged.

The stream is the standard library's Mersenne Twister (`random.Random`), chosen for its cost where
it runs, a grain worker right after an image decode: there numpy's `default_rng(key)` costs ~20 us
to build (SeedSequence hashing, then PCG64) and 2-5 us a scalar draw, `random.Random` ~10 us and
0.1 us; with the two in-modal views that is ~65 us of the ~1,650 us an example takes at 224 px
(`benchmarks/pipeline.py`).

The key is packed into 20 bytes (`struct` '<QIII'), which `random.Random` extends with their
SHA-512 before seeding. The hash matters: seeded with the key as one integer, the Twister's
`init_by_array` adds each 32-bit word's position to the word, so keys such as (0, 0, 0, 3),
(0, 0, 2, 3) and (0, 1, 2, 3) (words [3], [3, 2], [3, 2, 1]) would share one stream.

Only `random()` is drawn from, and the numpy-style helpers below derive everything from it: Python
promises that `random()` keeps its sequence for a given seed across versions (offering the old
seeder, should the default one change), which it does not promise for `randrange`, `shuffle` or
`choice`.
"""

from __future__ import annotations

import random
import struct
from typing import MutableSequence

_KEY = struct.Struct('<QIII')  # seed, epoch, index, stage
_FIELD_LIMIT = 1 << 32
_SEED_LIMIT = 1 << 64


class ExampleRandom(random.Random):
  """`random.Random` with the part of `np.random.Generator`'s interface the augmentations use
  (`random()`, `integers`, `uniform`, `shuffle`), so they accept either kind of generator."""

  def integers(self, low: int, high: int | None = None) -> int:
    """An int in [low, high), or in [0, low) when `high` is None (numpy's convention)."""
    if high is None:
      low, high = 0, low
    if high <= low:
      raise ValueError(f'integers({low}, {high}): empty range')
    # floor(u * n) for u in [0, 1): uniform up to n / 2**53, far below anything drawn here.
    return low + int(self.random() * (high - low))

  def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * self.random()

  def shuffle(self, values: MutableSequence) -> None:  # pylint: disable=arguments-differ
    """Fisher-Yates in place, from `random()` alone (see the module docstring)."""
    for i in range(len(values) - 1, 0, -1):
      j = int(self.random() * (i + 1))
      values[i], values[j] = values[j], values[i]


def example_random(seed: int, epoch: int, index: int, stage: int) -> ExampleRandom:
  """The stream of random stage `stage` of example `index` in epoch `epoch` of a run seeded `seed`.

  `seed` must be in [0, 2**64), the others in [0, 2**32) (the fields of the packed key).
  """
  seed, epoch, index, stage = int(seed), int(epoch), int(index), int(stage)
  if not (0 <= seed < _SEED_LIMIT and 0 <= epoch < _FIELD_LIMIT and 0 <= index < _FIELD_LIMIT
          and 0 <= stage < _FIELD_LIMIT):
    raise ValueError(f'example_random(seed={seed}, epoch={epoch}, index={index}, stage={stage}): '
                     f'seed must be in [0, 2**64) and epoch, index, stage in [0, 2**32)')
  return ExampleRandom(_KEY.pack(seed, epoch, index, stage))
