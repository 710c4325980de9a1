"""Per-example random generators: `np.random.default_rng([seed, epoch, index, stage])`, cheaper.

Every training example draws its augmentations from generators keyed by four small ints, so a run
is reproducible and resumable from any step. numpy builds such a generator by mixing the words
through `SeedSequence` (its hash, then 4 uint64 words of PCG64 state). In a grain worker that costs
24-34 us a generator, not the 7 us of a tight loop: it runs right after an image decode, which has
evicted numpy's code and data from the caches. `example_generator` computes the same SeedSequence
words in straight-line integer arithmetic and hands them to PCG64, which seeds itself from them:
the same stream, bit for bit, for 6-11 us less per generator there (no faster in a tight loop;
tests compare it with `default_rng` on thousands of keys; numpy fixes SeedSequence's algorithm
across versions, NEP 19).

The SeedSequence algorithm (O'Neill's `seed_seq`, as numpy implements it), for 4 uint32 entropy words
and a pool of 4: each word is hashed into the pool (`hashmix`); every pool word is then mixed into
every other (`mix`); the output hashes the pool words in turn with a second multiplier sequence.
The hash multipliers depend only on the call count, so they are precomputed below.
"""

from __future__ import annotations

import numpy as np

_MASK = 0xFFFFFFFF
_MIX_LEFT, _MIX_RIGHT = 0xCA01F9DD, 0x4973F715


def _hash_constants(start: int, multiplier: int, count: int) -> tuple[int, ...]:
  # hashmix number k XORs with h_k and multiplies by h_{k+1}, where h_{k+1} = h_k * multiplier.
  values = [start]
  for _ in range(count):
    values.append(values[-1] * multiplier & _MASK)
  return tuple(values)


_POOL_HASH = _hash_constants(0x43B0D7E5, 0x931E8875, 16)  # 4 words in + 12 cross mixes
_OUTPUT_HASH = _hash_constants(0x8B51F9DD, 0x58F38DED, 8)  # 8 uint32 out = 4 uint64 words


def _pool(w0: int, w1: int, w2: int, w3: int) -> tuple[int, int, int, int]:
  """SeedSequence's entropy pool for four uint32 words (numpy's `mix_entropy`)."""
  h = _POOL_HASH
  v = (w0 ^ h[0]) * h[1] & _MASK
  p0 = v ^ v >> 16
  v = (w1 ^ h[1]) * h[2] & _MASK
  p1 = v ^ v >> 16
  v = (w2 ^ h[2]) * h[3] & _MASK
  p2 = v ^ v >> 16
  v = (w3 ^ h[3]) * h[4] & _MASK
  p3 = v ^ v >> 16
  # Source 0 into 1, 2, 3; source 1 into 0, 2, 3; ... (mix(dst, hashmix(src)), in numpy's order).
  v = (p0 ^ h[4]) * h[5] & _MASK
  v = (_MIX_LEFT * p1 - _MIX_RIGHT * (v ^ v >> 16)) & _MASK
  p1 = v ^ v >> 16
  v = (p0 ^ h[5]) * h[6] & _MASK
  v = (_MIX_LEFT * p2 - _MIX_RIGHT * (v ^ v >> 16)) & _MASK
  p2 = v ^ v >> 16
  v = (p0 ^ h[6]) * h[7] & _MASK
  v = (_MIX_LEFT * p3 - _MIX_RIGHT * (v ^ v >> 16)) & _MASK
  p3 = v ^ v >> 16
  v = (p1 ^ h[7]) * h[8] & _MASK
  v = (_MIX_LEFT * p0 - _MIX_RIGHT * (v ^ v >> 16)) & _MASK
  p0 = v ^ v >> 16
  v = (p1 ^ h[8]) * h[9] & _MASK
  v = (_MIX_LEFT * p2 - _MIX_RIGHT * (v ^ v >> 16)) & _MASK
  p2 = v ^ v >> 16
  v = (p1 ^ h[9]) * h[10] & _MASK
  v = (_MIX_LEFT * p3 - _MIX_RIGHT * (v ^ v >> 16)) & _MASK
  p3 = v ^ v >> 16
  v = (p2 ^ h[10]) * h[11] & _MASK
  v = (_MIX_LEFT * p0 - _MIX_RIGHT * (v ^ v >> 16)) & _MASK
  p0 = v ^ v >> 16
  v = (p2 ^ h[11]) * h[12] & _MASK
  v = (_MIX_LEFT * p1 - _MIX_RIGHT * (v ^ v >> 16)) & _MASK
  p1 = v ^ v >> 16
  v = (p2 ^ h[12]) * h[13] & _MASK
  v = (_MIX_LEFT * p3 - _MIX_RIGHT * (v ^ v >> 16)) & _MASK
  p3 = v ^ v >> 16
  v = (p3 ^ h[13]) * h[14] & _MASK
  v = (_MIX_LEFT * p0 - _MIX_RIGHT * (v ^ v >> 16)) & _MASK
  p0 = v ^ v >> 16
  v = (p3 ^ h[14]) * h[15] & _MASK
  v = (_MIX_LEFT * p1 - _MIX_RIGHT * (v ^ v >> 16)) & _MASK
  p1 = v ^ v >> 16
  v = (p3 ^ h[15]) * h[16] & _MASK
  v = (_MIX_LEFT * p2 - _MIX_RIGHT * (v ^ v >> 16)) & _MASK
  p2 = v ^ v >> 16
  return p0, p1, p2, p3


def _pcg64_words(w0: int, w1: int, w2: int, w3: int) -> np.ndarray:
  """`SeedSequence([w0, w1, w2, w3]).generate_state(4, np.uint64)`."""
  p0, p1, p2, p3 = _pool(w0, w1, w2, w3)
  h = _OUTPUT_HASH
  # 8 uint32 words, hashing pool words 0, 1, 2, 3, 0, 1, 2, 3; paired little-endian into uint64s.
  a = (p0 ^ h[0]) * h[1] & _MASK
  b = (p1 ^ h[1]) * h[2] & _MASK
  c = (p2 ^ h[2]) * h[3] & _MASK
  d = (p3 ^ h[3]) * h[4] & _MASK
  e = (p0 ^ h[4]) * h[5] & _MASK
  f = (p1 ^ h[5]) * h[6] & _MASK
  g = (p2 ^ h[6]) * h[7] & _MASK
  k = (p3 ^ h[7]) * h[8] & _MASK
  return np.array([(a ^ a >> 16) | (b ^ b >> 16) << 32, (c ^ c >> 16) | (d ^ d >> 16) << 32,
                   (e ^ e >> 16) | (f ^ f >> 16) << 32, (g ^ g >> 16) | (k ^ k >> 16) << 32], np.uint64)


class _Words(np.random.bit_generator.ISeedSequence):
  """Seed material that is already SeedSequence's output (PCG64 asks for 4 uint64 words)."""

  __slots__ = ('words',)

  def __init__(self, words: np.ndarray):
    self.words = words

  def generate_state(self, n_words: int, dtype=np.uint32) -> np.ndarray:
    if n_words != 4 or np.dtype(dtype) != np.uint64:
      raise ValueError(f'holds PCG64 seed words only, asked for {n_words} x {np.dtype(dtype)}')
    return self.words


def example_generator(seed: int, epoch: int, index: int, stage: int) -> np.random.Generator:
  """`np.random.default_rng([seed, epoch, index, stage])`: the same stream.

  Keys with a word outside 0..2**32-1 (SeedSequence splits those into several words) go through
  numpy itself. The generator's `bit_generator.seed_seq` is not a SeedSequence, so it cannot
  `spawn`; nothing in the pipeline does.
  """
  # Python ints: numpy ints would wrap at 64 bits in the products below.
  seed, epoch, index, stage = int(seed), int(epoch), int(index), int(stage)
  if 0 <= seed <= _MASK and 0 <= epoch <= _MASK and 0 <= index <= _MASK and 0 <= stage <= _MASK:
    return np.random.Generator(np.random.PCG64(_Words(_pcg64_words(seed, epoch, index, stage))))
  return np.random.default_rng([seed, epoch, index, stage])
