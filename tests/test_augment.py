"""AutoAugment, EDA, random resized crop and flip."""

import itertools
import os
import random
import string
import sys
import threading
import types
import warnings

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from cleanclip_jax.data import augment
from cleanclip_jax.data.synthetic import SyntheticCaptions


def _image(size=32, seed=0):
  return SyntheticCaptions(1, size, seed=seed)[0]['image']


def test_autoaugment_deterministic_shape_and_changes_images():
  image = _image()
  a = [augment.autoaugment(image, np.random.default_rng(s)) for s in range(40)]
  b = [augment.autoaugment(image, np.random.default_rng(s)) for s in range(40)]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
    assert x.shape == image.shape and x.dtype == np.uint8
  changed = [np.abs(x.astype(int) - image).mean() for x in a]
  assert np.mean(changed) > 10 and np.mean([c > 0 for c in changed]) > 0.6


def test_magnitude_bins():
  assert [augment.magnitude('Posterize', b, 32, 32) for b in range(10)] == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
  assert augment.magnitude('Solarize', 0, 32, 32) == 255 and augment.magnitude('Solarize', 9, 32, 32) == 0
  assert augment.magnitude('Rotate', 9, 32, 32) == pytest.approx(30)
  assert augment.magnitude('ShearX', 9, 32, 32) == pytest.approx(0.3)
  assert augment.magnitude('TranslateX', 9, 331, 10) == pytest.approx(150)
  assert augment.magnitude('Color', 9, 32, 32) == pytest.approx(0.9)
  assert len(augment.IMAGENET_POLICY) == 25 and all(len(p) == 2 for p in augment.IMAGENET_POLICY)


@pytest.mark.parametrize('op', ['ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness',
                                'Color', 'Contrast', 'Sharpness', 'Posterize', 'Solarize'])
def test_every_op_keeps_shape_and_acts(op):
  image = _image(48)
  out = augment.apply_op(image, op, augment.magnitude(op, 9, 48, 48) * (0.9 if op == 'Posterize' else 1))
  assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)


def test_pixel_ops_match_pil():
  rng = np.random.default_rng(0)
  for trial in range(20):
    image = (rng.integers(0, rng.integers(2, 60), (12, 12, 3)) * rng.integers(1, 5) + rng.integers(0, 20)).astype(np.uint8)
    pil = Image.fromarray(image)
    for op, value, reference in (('Equalize', 0, ImageOps.equalize(pil)), ('AutoContrast', 0, ImageOps.autocontrast(pil)),
                                 ('Invert', 0, ImageOps.invert(pil)), ('Posterize', 5, ImageOps.posterize(pil, 5)),
                                 ('Solarize', 100, ImageOps.solarize(pil, 100))):
      np.testing.assert_array_equal(augment.apply_op(image, op, value), np.asarray(reference), err_msg=op)


# PIL's own AutoAugment operations (torchvision's definitions), the reference for `apply_op`.
_PIL_OPS = {
    'ShearX': lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0), resample=Image.NEAREST,
                                         fillcolor=(0, 0, 0)),
    'ShearY': lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0), resample=Image.NEAREST,
                                         fillcolor=(0, 0, 0)),
    'TranslateX': lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v, 0, 1, 0), resample=Image.NEAREST,
                                             fillcolor=(0, 0, 0)),
    'TranslateY': lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v), resample=Image.NEAREST,
                                             fillcolor=(0, 0, 0)),
    'Rotate': lambda im, v: im.rotate(v, resample=Image.NEAREST, fillcolor=(0, 0, 0)),
    'Brightness': lambda im, v: ImageEnhance.Brightness(im).enhance(1 + v),
    'Color': lambda im, v: ImageEnhance.Color(im).enhance(1 + v),
    'Contrast': lambda im, v: ImageEnhance.Contrast(im).enhance(1 + v),
    'Sharpness': lambda im, v: ImageEnhance.Sharpness(im).enhance(1 + v),
    'Posterize': lambda im, v: ImageOps.posterize(im, int(v)),
    'Solarize': lambda im, v: ImageOps.solarize(im, v),
    'Invert': lambda im, v: ImageOps.invert(im),
    'AutoContrast': lambda im, v: ImageOps.autocontrast(im),
    'Equalize': lambda im, v: ImageOps.equalize(im),
}
# torchvision's signed operations (a random sign per application).
_SIGNED_OPS = {'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness', 'Color', 'Contrast',
               'Sharpness'}


def _random_images(seed, count, max_side=40):
  """Images of random size and kind: noise, a few grey levels, a flat channel, gradients, a scene."""
  rng = np.random.default_rng(seed)
  images = []
  for k in range(count):
    height, width = (int(n) for n in rng.integers(1, max_side, 2))
    kind = k % 5
    if kind == 0:
      image = rng.integers(0, 256, (height, width, 3))
    elif kind == 1:
      image = rng.integers(0, rng.integers(1, 8), (height, width, 3)) * rng.integers(1, 40) + rng.integers(0, 30)
    elif kind == 2:
      image = rng.integers(0, 256, (height, width, 3))
      image[..., rng.integers(3)] = rng.integers(256)
    elif kind == 3:
      ramp = np.linspace(rng.integers(0, 128), rng.integers(128, 256), width)
      image = ramp[None, :, None] + rng.normal(0, rng.uniform(0, 20), (height, width, 3))
    else:
      image = _image(max(height, 8), seed=int(rng.integers(1000)))
    images.append(np.clip(image, 0, 255).astype(np.uint8))
  return images


def _magnitudes(op, width, height, rng):
  """Every bin's magnitude with both signs, plus a few random values."""
  if op in ('Invert', 'AutoContrast', 'Equalize'):
    return [0.0]
  values = [augment.magnitude(op, b, width, height) for b in range(augment.NUM_BINS)]
  if op in _SIGNED_OPS:
    values += [-v for v in values]
  if op == 'Posterize':
    values += [1.0, 2.0, 3.0]
  elif op == 'Solarize':
    values += list(rng.uniform(-10, 270, 4)) + [0.0, 1.0, 255.0, 256.0]
  elif op in ('Brightness', 'Color', 'Contrast', 'Sharpness'):
    values += list(rng.uniform(-1.5, 2.5, 6))
  else:
    values += list(rng.uniform(-1, 1, 2) * (30 if op == 'Rotate' else 0.5 * max(width, height)))
  return values


@pytest.mark.parametrize('op', sorted(_PIL_OPS))
def test_every_op_matches_pil_on_random_images(op):
  rng = np.random.default_rng(len(op))
  for image in _random_images(len(op), 40):
    height, width = image.shape[:2]
    for value in _magnitudes(op, width, height, rng):
      expected = np.asarray(_PIL_OPS[op](Image.fromarray(image), value))
      np.testing.assert_array_equal(augment.apply_op(image, op, value), expected, err_msg=f'{op} {value}')


def test_contrast_and_brightness_tables_match_pil_for_every_value_and_mean():
  # Each channel holds all 256 values; the other rows move the mean grey (Contrast's blend constant)
  # across 0..255. Factors: the policy's, extrapolations beyond [0, 1], and random ones.
  rng = np.random.default_rng(0)
  factors = [1 + s * augment.magnitude('Contrast', b, 1, 1) for b in range(augment.NUM_BINS) for s in (1, -1)]
  factors += [0.0, 1.0, 2.0, -1.0, 3.5] + list(rng.uniform(-2, 4, 20))
  for fill in range(0, 256, 3):
    image = np.full((48, 256, 3), fill, np.uint8)
    image[0] = np.stack([rng.permutation(256) for _ in range(3)], axis=1)
    pil = Image.fromarray(image)
    for factor in factors:
      for op, enhancer in (('Contrast', ImageEnhance.Contrast), ('Brightness', ImageEnhance.Brightness)):
        np.testing.assert_array_equal(augment.apply_op(image, op, factor - 1),
                                      np.asarray(enhancer(pil).enhance(factor)), err_msg=f'{op} {factor} {fill}')


def test_smooth_matches_pil_filter():
  images = _random_images(7, 60) + [np.full((9, 7, 3), 255, np.uint8), np.zeros((3, 3, 3), np.uint8)]
  images += [np.random.default_rng(s).integers(0, 256, (h, w, 3)).astype(np.uint8)
             for s, (h, w) in enumerate([(1, 1), (1, 5), (2, 9), (3, 2), (4, 3), (224, 224)])]
  checker = (np.indices((30, 30)).sum(axis=0) % 2 * 255).astype(np.uint8)
  images.append(np.stack([checker, 255 - checker, checker], axis=-1))
  for image in images:
    expected = np.asarray(Image.fromarray(image).filter(ImageFilter.SMOOTH))
    np.testing.assert_array_equal(augment._smooth(image), expected, err_msg=str(image.shape))


def _pil_autoaugment(image, rng, policy=augment.IMAGENET_POLICY):
  """AutoAugment written directly with PIL's operations, drawing from `rng` as `autoaugment` does."""
  sub_policy = policy[int(rng.integers(len(policy)))]
  draws, signs = rng.random(len(sub_policy)), rng.random(len(sub_policy)) < 0.5
  pil = Image.fromarray(image)
  for (op, probability, bin_index), draw, negate in zip(sub_policy, draws, signs):
    if draw < probability:
      value = augment.magnitude(op, bin_index, image.shape[1], image.shape[0])
      pil = _PIL_OPS[op](pil, -value if op in _SIGNED_OPS and negate else value)
  return np.asarray(pil)


@pytest.mark.parametrize('index', range(len(augment.IMAGENET_POLICY)))
def test_autoaugment_matches_pil_for_every_sub_policy(index):
  # Covers the merged tables (e.g. Equalize then Equalize, Solarize then AutoContrast), the
  # numpy/PIL hand-overs, and the `pil_image` start.
  policy = (augment.IMAGENET_POLICY[index],)
  for k, image in enumerate(_random_images(100 + index, 10, max_side=48)):
    for seed in range(8):
      expected = _pil_autoaugment(image, np.random.default_rng([index, k, seed]), policy)
      got = augment.autoaugment(image, np.random.default_rng([index, k, seed]), policy)
      np.testing.assert_array_equal(got, expected, err_msg=f'{policy} image {k} seed {seed}')
      got = augment.autoaugment(image, np.random.default_rng([index, k, seed]), policy,
                                pil_image=Image.fromarray(image))
      np.testing.assert_array_equal(got, expected, err_msg=f'{policy} image {k} seed {seed}, pil_image')


def test_autoaugment_matches_pil_on_a_224_px_scene():
  image = _image(224, seed=5)
  for seed in range(60):
    np.testing.assert_array_equal(augment.autoaugment(image, np.random.default_rng(seed)),
                                  _pil_autoaugment(image, np.random.default_rng(seed)), err_msg=str(seed))


def test_autoaugment_rejects_a_pil_image_of_other_pixels():
  image = _image()
  with pytest.raises(ValueError, match='pil_image'):
    augment.autoaugment(image, np.random.default_rng(0), pil_image=Image.fromarray(image[:16]))
  with pytest.raises(ValueError, match='pil_image'):
    augment.autoaugment(image, np.random.default_rng(0), pil_image=Image.fromarray(image).convert('L'))


def test_random_resized_crop():
  image = _image(64)
  a = augment.random_resized_crop(image, np.random.default_rng(3), 32)
  np.testing.assert_array_equal(a, augment.random_resized_crop(image, np.random.default_rng(3), 32))
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  assert not np.array_equal(a, augment.random_resized_crop(image, np.random.default_rng(4), 32))
  whole = augment.random_resized_crop(image, np.random.default_rng(0), 32, scale=(1, 1), ratio=(1, 1))
  np.testing.assert_array_equal(whole, np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC)))
  tall = augment.random_resized_crop(np.zeros((100, 10, 3), np.uint8), np.random.default_rng(0), 16, scale=(0.9, 1))
  assert tall.shape == (16, 16, 3)  # falls back to a centre crop when no random box fits


def test_random_horizontal_flip():
  image = _image()
  np.testing.assert_array_equal(augment.random_horizontal_flip(image, np.random.default_rng(0), 1.0), image[:, ::-1])
  np.testing.assert_array_equal(augment.random_horizontal_flip(image, np.random.default_rng(0), 0.0), image)


CAPTIONS = ['a photo of a small yellow banana on a striped background.', 'banana', 'a the of',
            'there is a large car near the top!', '  Two  words ']


@pytest.mark.parametrize('synonyms', [augment.builtin_synonyms, None])
def test_eda_never_empties_and_is_deterministic(synonyms):
  for caption in CAPTIONS:
    outs = [augment.eda(caption, np.random.default_rng(s), synonyms=synonyms) for s in range(50)]
    assert all(o.strip() for o in outs), caption
    assert outs == [augment.eda(caption, np.random.default_rng(s), synonyms=synonyms) for s in range(50)]
  assert augment.eda('', np.random.default_rng(0)) == ''
  assert augment.eda('!!', np.random.default_rng(0)) == '!!'


def test_eda_changes_captions():
  caption = 'a photo of a small yellow banana on a striped background'
  outs = [augment.eda(caption, np.random.default_rng(s), synonyms=augment.builtin_synonyms) for s in range(100)]
  assert np.mean([o != caption for o in outs]) > 0.7
  assert len(set(outs)) > 20


def test_eda_with_a_wordnet_reader():
  # A stand-in with NLTK's WordNet reader interface: synsets(word) -> [synset.lemmas() -> [lemma.name()]].
  def synsets(word):
    lemmas = {'photo': ['photo', 'photograph', 'exposure'], 'banana': ['banana', 'banana_tree']}.get(word, [])
    return [types.SimpleNamespace(lemmas=lambda: [types.SimpleNamespace(name=lambda n=n: n) for n in lemmas])]
  reader = types.SimpleNamespace(synsets=synsets)
  assert augment.wordnet_synonyms('banana', reader) == ['banana tree']
  synonyms = lambda word: augment.wordnet_synonyms(word, reader)
  outs = {augment.eda('a photo of a banana', np.random.default_rng(s), synonyms=synonyms) for s in range(60)}
  assert any('photograph' in o or 'exposure' in o or 'banana tree' in o for o in outs)


def test_default_synonyms_detects_once():
  first = augment.default_synonyms()
  assert first is augment.default_synonyms() and callable(first)
  assert isinstance(first('photo'), list)


def test_wordnet_lookup_respects_nltk_data(tmp_path, monkeypatch):
  # Every per-user and per-environment place NLTK looks is moved into tmp_path, so only the
  # system-wide folders could hold a corpus, which they do not on the machines the suite runs on.
  monkeypatch.setenv('NLTK_DATA', str(tmp_path / 'data'))
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.setattr(sys, 'prefix', str(tmp_path / 'prefix'))
  monkeypatch.setattr(sys, 'base_prefix', str(tmp_path / 'base_prefix'))
  system_wide = any(os.path.exists(f'/usr/{where}/nltk_data/corpora') for where in
                    ('share', 'local/share', 'lib', 'local/lib'))
  assert augment._wordnet_may_be_installed() == system_wide
  (tmp_path / 'data' / 'corpora' / 'wordnet').mkdir(parents=True)
  assert augment._wordnet_may_be_installed()


def _write_wordnet(root, words):
  """A minimal WordNet corpus in NLTK's format: one noun synset per word, with lemmas word, word_alias."""
  root.mkdir(parents=True)
  (root / 'lexnames').write_text('00\tadj.all\t3\n01\tnoun.Tops\t1\n')
  (root / 'index.sense').write_text('')
  for pos in ('adj', 'adv', 'noun', 'verb'):
    (root / f'{pos}.exc').write_text('')
    data, index = '  1 header\n', []
    if pos == 'noun':
      for word in words:
        index.append(f'{word} n 1 0 1 0 {len(data):08d}\n')
        data += f'{len(data):08d} 01 n 02 {word} 0 {word}_alias 0 000 | a gloss\n'
    (root / f'data.{pos}').write_text(data)
    (root / f'index.{pos}').write_text('  1 header\n' + ''.join(sorted(index)))


def test_wordnet_synonyms_from_many_threads(tmp_path, monkeypatch):
  # The pipeline's read threads run EDA concurrently. A fresh reader per round: NLTK caches a synset
  # once read, so only first lookups touch the shared file.
  nltk = pytest.importorskip('nltk')
  from nltk.corpus.reader.wordnet import WordNetCorpusReader  # pylint: disable=g-import-not-at-top
  words = [''.join(letters) for letters in itertools.product(string.ascii_lowercase, repeat=3)][:1000]
  _write_wordnet(tmp_path / 'corpora' / 'wordnet', words)
  monkeypatch.setenv('NLTK_DATA', str(tmp_path))
  monkeypatch.setattr(nltk.data, 'path', [str(tmp_path), *nltk.data.path])  # read at nltk's import
  expected = {word: [f'{word} alias'] for word in words}
  errors, results = [], []

  def look_up(synonyms, seed):
    found = {}
    for word in random.Random(seed).sample(words, len(words)):
      try:
        found[word] = synonyms(word)
      except Exception as error:  # pylint: disable=broad-except
        errors.append(repr(error))
    results.append(found)

  switch_interval = sys.getswitchinterval()
  sys.setswitchinterval(1e-6)  # switch threads often, as a busy pipeline does
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # "no multilingual functions", "no synset found"
      for round_index in range(4):
        reader = WordNetCorpusReader(str(tmp_path / 'corpora' / 'wordnet'), None)
        plain = lambda word, reader=reader: augment.wordnet_synonyms(word, reader)
        synonyms = plain if round_index % 2 == 0 else augment.cached_wordnet_synonyms(reader)
        threads = [threading.Thread(target=look_up, args=(synonyms, seed)) for seed in range(8)]
        for thread in threads:
          thread.start()
        for thread in threads:
          thread.join()
  finally:
    sys.setswitchinterval(switch_interval)
  assert not errors, errors[:3]
  assert len(results) == 32 and all(found == expected for found in results)
