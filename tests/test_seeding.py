"""`seeding.example_generator` is `np.random.default_rng([seed, epoch, index, stage])`, bit for bit."""

import numpy as np
import pytest

from cleanclip_jax.data import seeding


def _same_stream(key):
  ours, numpy_own = seeding.example_generator(*key), np.random.default_rng(list(key))
  assert ours.bit_generator.state == numpy_own.bit_generator.state, key
  # And the draws the augmentations make, in their order (integers, random, choice, shuffle).
  def draws(rng):
    return (rng.integers(25), rng.random(2).tolist(), rng.choice(9, 2, replace=False).tolist(),
            rng.permutation(7).tolist(), rng.integers(0, 2**62, 3).tolist())
  assert draws(ours) == draws(numpy_own), key


def test_edge_keys():
  top = 2**32 - 1
  for key in [(0, 0, 0, 0), (top, top, top, top), (0, 0, 5, 2), (1234, 7, top, 3), (top, 0, 0, 1),
              (np.int64(7), np.int64(3), np.int32(11), 2)]:
    _same_stream(key)


def test_random_keys():
  keys = np.random.default_rng(0).integers(0, 2**32, (3000, 4))
  keys[::2, 1] %= 5  # small epochs and stages, as in training
  keys[::2, 3] %= 5
  for key in keys.tolist():
    _same_stream(tuple(key))


def test_keys_beyond_32_bits_go_through_numpy():
  for key in [(2**32, 0, 1, 2), (3, 2**40 + 5, 7, 2), (1, 2, 3, 2**63)]:
    _same_stream(key)


def test_negative_key_is_refused_as_numpy_refuses_it():
  with pytest.raises(ValueError):
    seeding.example_generator(-1, 0, 0, 0)
