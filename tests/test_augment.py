"""AutoAugment, EDA, random resized crop and flip."""

import types

import numpy as np
import pytest
from PIL import Image, ImageOps

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
  monkeypatch.setenv('NLTK_DATA', str(tmp_path))
  found_before = augment._wordnet_may_be_installed()
  (tmp_path / 'corpora' / 'wordnet').mkdir(parents=True)
  assert augment._wordnet_may_be_installed()
  del found_before  # depends on the machine
