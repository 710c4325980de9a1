"""The synthetic dataset: record contract, determinism, disjoint splits, captions, difficulty, speed."""

import pickle
import re
import time

import numpy as np
import pytest
import scipy.optimize

from cleanclip_jax import config as config_lib
from cleanclip_jax.data import synthetic
from cleanclip_jax.data.synthetic import CLASS_NAMES, SYNONYMS, TEMPLATES, SyntheticCaptions


def test_record_contract():
  source = SyntheticCaptions(5, image_size=32)
  assert len(source) == 5
  for i in range(5):
    record = source[i]
    assert set(record) == {'image', 'image_path', 'caption', 'label', 'index'}
    assert record['image'].dtype == np.uint8 and record['image'].shape == (32, 32, 3)
    assert record['image_path'] == '' and record['index'] == i
    assert isinstance(record['caption'], str) and record['caption']
    assert isinstance(record['label'], int) and 0 <= record['label'] < len(CLASS_NAMES)
  assert source[np.int64(3)]['index'] == 3  # grain may index with numpy integers


@pytest.mark.parametrize('size', [64, 224])
def test_other_sizes(size):
  image = SyntheticCaptions(2, image_size=size)[1]['image']
  assert image.shape == (size, size, 3) and image.dtype == np.uint8 and image.std() > 5


def test_class_names_and_templates():
  assert 'banana' in CLASS_NAMES and len(set(CLASS_NAMES)) == len(CLASS_NAMES) >= 10
  assert 5 <= len(TEMPLATES) <= 10 and all('{}' in t for t in TEMPLATES)
  # A synonym never names another class, so a caption never names two classes.
  for name, words in SYNONYMS.items():
    for other in CLASS_NAMES:
      if other != name:
        assert not any(re.search(rf'\b{other}\b', w) for w in words), (name, other)


def test_deterministic_across_instances_and_pickling():
  a, b = SyntheticCaptions(50, 32, seed=3), SyntheticCaptions(50, 32, seed=3)
  restored = pickle.loads(pickle.dumps(a))
  for i in (0, 17, 49):
    for other in (b, restored):
      np.testing.assert_array_equal(a[i]['image'], other[i]['image'])
      assert a[i]['caption'] == other[i]['caption'] and a[i]['label'] == other[i]['label']
  c = SyntheticCaptions(50, 32, seed=4)
  assert sum(np.array_equal(a[i]['image'], c[i]['image']) for i in range(10)) == 0


def test_splits_never_share_an_example():
  seen = {}
  for split in synthetic.SPLITS:
    source = SyntheticCaptions(150, 32, split=split)
    for i in range(len(source)):
      key = source[i]['image'].tobytes()
      assert key not in seen, f'{split}[{i}] equals {seen[key]}'
      seen[key] = (split, i)


def test_labels_balanced_and_cheap():
  source = SyntheticCaptions(10 * len(CLASS_NAMES), 32, split='finetune')
  labels = source.labels()
  assert np.bincount(labels, minlength=len(CLASS_NAMES)).tolist() == [10] * len(CLASS_NAMES)
  assert [source[i]['label'] for i in range(20)] == labels[:20].tolist()
  assert labels[:len(CLASS_NAMES)].tolist() != list(range(len(CLASS_NAMES)))  # not the index order
  assert source.caption(7) == source[7]['caption']


def test_captions_name_their_class_and_vary():
  source = SyntheticCaptions(400, 32)
  named, other_class, texts = 0, 0, set()
  for i in range(len(source)):
    label, caption = source.label(i), source.caption(i)
    texts.add(caption)
    words = [CLASS_NAMES[label]] + SYNONYMS[CLASS_NAMES[label]]
    named += any(re.search(rf'\b{re.escape(w)}\b', caption) for w in words)
    other_class += any(re.search(rf'\b{n}\b', caption) for n in CLASS_NAMES if n != CLASS_NAMES[label])
  assert 0.85 * len(source) <= named < len(source)  # mostly informative, a few are not
  assert other_class == 0
  assert len(texts) > 0.7 * len(source)


def test_colour_does_not_identify_the_class():
  source = SyntheticCaptions(240, 32)
  colours = {}
  for i in range(len(source)):
    scene = source.scene(i)
    colours.setdefault(scene.label, set()).add(synthetic._colour_name(*scene.body_hsv))
  assert all(len(names) >= 5 for names in colours.values()), colours


def test_from_config_and_errors():
  data = config_lib.data_config()
  data.image_size = 32
  data.synthetic.num_examples, data.synthetic.split, data.synthetic.seed = 7, 'test', 2
  source = SyntheticCaptions.from_config(data)
  assert (len(source), source.image_size, source.split, source.seed) == (7, 32, 'test', 2)
  assert len(SyntheticCaptions.from_config(data, split='finetune', num_examples=3)) == 3
  with pytest.raises(IndexError):
    source[7]
  with pytest.raises(ValueError, match='split'):
    SyntheticCaptions(3, 32, split='train')


def test_difficulty_knobs_change_the_images():
  plain = SyntheticCaptions(4, 32, max_distractors=0, occlusion_prob=0.0, noise_std=0.0)
  busy = SyntheticCaptions(4, 32, max_distractors=6, occlusion_prob=1.0, noise_std=30.0)
  assert all(len(plain.scene(i).distractors) == 0 and not plain.scene(i).occluders for i in range(4))
  assert all(busy.scene(i).occluders for i in range(4))
  assert not np.array_equal(plain[0]['image'], busy[0]['image'])


def _gradient_histograms(images: np.ndarray, cells: int = 4, bins: int = 8) -> np.ndarray:
  """A tiny HOG-like feature: gradient-orientation histograms over a cells x cells grid."""
  gray = images.astype(np.float32).mean(-1) / 255
  gx, gy = np.zeros_like(gray), np.zeros_like(gray)
  gx[:, :, 1:-1] = gray[:, :, 2:] - gray[:, :, :-2]
  gy[:, 1:-1] = gray[:, 2:] - gray[:, :-2]
  magnitude = np.hypot(gx, gy)
  orientation = np.minimum((np.arctan2(gy, gx) % np.pi / np.pi * bins).astype(int), bins - 1)
  n, size = len(images), images.shape[1]
  step = size // cells
  feats = [(magnitude * (orientation == b)).reshape(n, cells, step, cells, step).sum((2, 4)) for b in range(bins)]
  return np.sqrt(np.stack(feats, -1).reshape(n, -1))


def _softmax_regression_accuracy(x, y, x_test, y_test, num_classes, l2=1e-2):
  mean, std = x.mean(0), x.std(0) + 1e-6
  x = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
  x_test = np.hstack([(x_test - mean) / std, np.ones((len(x_test), 1))])
  one_hot = np.eye(num_classes)[y]

  def loss_and_grad(w):
    w = w.reshape(x.shape[1], num_classes)
    logits = x @ w
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y] + 1e-12).mean() + l2 / 2 * (w**2).sum()
    return loss, (x.T @ (p - one_hot) / len(y) + l2 * w).ravel()

  w = scipy.optimize.minimize(loss_and_grad, np.zeros(x.shape[1] * num_classes), jac=True,
                              method='L-BFGS-B', options={'maxiter': 200}).x
  return float(((x_test @ w.reshape(x.shape[1], num_classes)).argmax(1) == y_test).mean())


def test_difficulty_is_between_chance_and_solved():
  """A linear classifier on a tiny shape feature is clearly above chance but far from perfect."""
  train, test = SyntheticCaptions(900, 32, split='pretrain'), SyntheticCaptions(300, 32, split='test')
  x = _gradient_histograms(np.stack([train[i]['image'] for i in range(len(train))]))
  x_test = _gradient_histograms(np.stack([test[i]['image'] for i in range(len(test))]))
  accuracy = _softmax_regression_accuracy(x, train.labels(), x_test, test.labels(), len(CLASS_NAMES))
  print(f'linear probe on gradient histograms: {accuracy:.3f} (chance {1 / len(CLASS_NAMES):.3f})')
  assert 1.5 / len(CLASS_NAMES) < accuracy < 0.95


def test_generation_is_fast():
  source = SyntheticCaptions(200, 32)
  source[0]
  start = time.perf_counter()
  for i in range(200):
    source[i]
  per_example = (time.perf_counter() - start) / 200
  print(f'{per_example * 1e6:.0f} us per 32 px example')
  assert per_example < 5e-3  # ~0.5 ms on an idle core; generous for a shared machine
