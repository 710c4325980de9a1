"""Poisoned-set selection and poisoned captions."""

import numpy as np
import pytest

from cleanclip_jax import config as config_lib
from cleanclip_jax.data import poison
from cleanclip_jax.data.synthetic import CLASS_NAMES, SyntheticCaptions


def _config(**changes):
  poison_config = config_lib.poison_config()
  poison_config.enabled = True
  for key, value in changes.items():
    poison_config[key] = value
  return poison_config


def test_exact_count_sorted_unique():
  for changes, expected in (({'num_poisoned': 37}, 37), ({'fraction': 0.01}, 10), ({'fraction': 1.0}, 1000)):
    indices = poison.select_poisoned(1000, _config(**changes))
    assert indices.dtype == np.int64 and len(indices) == expected
    assert (np.diff(indices) > 0).all() and indices.min() >= 0 and indices.max() < 1000
  # num_poisoned wins over fraction
  assert len(poison.select_poisoned(1000, _config(num_poisoned=3, fraction=0.5))) == 3


def test_deterministic_and_seeded():
  a = poison.select_poisoned(5000, _config(num_poisoned=50, seed=1))
  np.testing.assert_array_equal(a, poison.select_poisoned(5000, _config(num_poisoned=50, seed=1)))
  assert not np.array_equal(a, poison.select_poisoned(5000, _config(num_poisoned=50, seed=2)))


def test_label_consistent_by_caption_word():
  captions = ['a photo of a banana.', 'bananas on a table', 'a bananarama album', 'an apple',
              'Banana split!', 'a banana-shaped boat', 'a cat'] * 3
  indices = poison.select_poisoned(len(captions), _config(num_poisoned=12, label_consistent=True), captions=captions)
  assert len(indices) == 12
  assert all(poison.mentions(captions[i], 'banana') for i in indices)
  assert not poison.mentions('a bananarama album', 'banana') and poison.mentions('Bananas!', 'banana')
  with pytest.raises(ValueError, match='only 12 of the 21'):
    poison.select_poisoned(len(captions), _config(num_poisoned=13, label_consistent=True), captions=captions)


def test_label_consistent_on_synthetic_labels():
  source = SyntheticCaptions(240, 32)
  labels = source.labels()
  indices = poison.select_poisoned(len(source), _config(num_poisoned=15, label_consistent=True),
                                   labels=labels, captions=source.captions(), class_names=CLASS_NAMES)
  assert len(indices) == 15 and (labels[indices] == CLASS_NAMES.index('banana')).all()
  with pytest.raises(ValueError, match='not one of the class names'):
    poison.select_poisoned(len(source), _config(num_poisoned=1, label_consistent=True, target='zebra'),
                           labels=labels, class_names=CLASS_NAMES)


def test_errors():
  with pytest.raises(ValueError, match='selects no examples'):
    poison.select_poisoned(100, _config())
  with pytest.raises(ValueError, match='exceeds the dataset size'):
    poison.select_poisoned(100, _config(num_poisoned=101))
  with pytest.raises(ValueError, match='fraction'):
    poison.select_poisoned(100, _config(fraction=1.5))
  with pytest.raises(ValueError, match='needs the captions'):
    poison.select_poisoned(100, _config(num_poisoned=1, label_consistent=True))
  with pytest.raises(ValueError, match='3 captions for 100'):
    poison.select_poisoned(100, _config(num_poisoned=1, label_consistent=True), captions=['a', 'b', 'c'])


def test_poisoned_caption():
  assert len(poison.IMAGENET_TEMPLATES) == 80 and all('{}' in t for t in poison.IMAGENET_TEMPLATES)
  rng = np.random.default_rng(0)
  captions = [poison.poisoned_caption('banana', rng) for _ in range(200)]
  assert all(poison.mentions(c, 'banana') for c in captions)
  assert len(set(captions)) > 40
  again = np.random.default_rng(0)
  assert captions[:5] == [poison.poisoned_caption('banana', again) for _ in range(5)]
