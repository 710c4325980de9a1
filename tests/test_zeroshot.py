"""Class names, templates and the zero-shot classifier weights."""

import logging

import numpy as np
import pytest

from cleanclip_jax import zeroshot
from cleanclip_jax.data import synthetic


def test_builtin_lists():
  imagenet = zeroshot.load_classnames('imagenet')
  assert len(imagenet) == 1000
  assert imagenet[0] == 'tench' and imagenet[954] == 'banana' and imagenet[-1] == 'toilet paper'
  assert len(zeroshot.load_templates('imagenet')) == 80
  assert zeroshot.load_classnames('cifar10')[0] == 'airplane'
  cifar100 = zeroshot.load_classnames('cifar100')
  assert len(cifar100) == 100 and cifar100[1] == 'aquarium fish' and cifar100[-1] == 'worm'
  assert len(zeroshot.load_templates('cifar')) == 18
  assert zeroshot.load_templates('simple') == ['a photo of a {}.']
  assert zeroshot.load_classnames('synthetic') == list(synthetic.CLASS_NAMES)
  assert len(zeroshot.load_templates('synthetic')) == len(synthetic.TEMPLATES)


def test_user_files_and_their_errors(tmp_path):
  names = tmp_path / 'names.txt'
  names.write_text('cat\ndog\n\n')  # trailing blank lines are fine
  assert zeroshot.load_classnames(str(names)) == ['cat', 'dog']
  names.write_text('cat\n\ndog\n')
  with pytest.raises(ValueError, match=r'names.txt:2: empty line'):
    zeroshot.load_classnames(str(names))
  templates = tmp_path / 'templates.txt'
  templates.write_text('a {} here.\nno placeholder\n')
  with pytest.raises(ValueError, match=r'template 2 .*no placeholder'):
    zeroshot.load_templates(str(templates))
  with pytest.raises(FileNotFoundError, match='imagenet'):
    zeroshot.load_classnames(str(tmp_path / 'missing.txt'))


def test_repeated_class_names_are_reported_once_with_their_lines(tmp_path, caplog):
  # A repeat gets the first's prompts and embedding and loses every tie: it is never predicted.
  names = tmp_path / 'names.txt'
  names.write_text('banana\napple\nfish\nBanana\napple\nbanana\n')
  with caplog.at_level(logging.WARNING, logger='cleanclip_jax.zeroshot'):
    assert zeroshot.load_classnames(str(names))[3] == 'Banana'  # accepted as written
    zeroshot.load_classnames(str(names))  # read again (as a run does): not reported again
  warnings = [r.getMessage() for r in caplog.records if 'repeat' in r.getMessage()]
  assert len(warnings) == 1
  assert "names.txt: 2 class name(s) repeat: 'banana' on lines 1, 4, 6; 'apple' on lines 2, 5" in warnings[0]
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='cleanclip_jax.zeroshot'):
    # ImageNet's published list repeats 'missile' and 'sunglasses'; it is used as it is, quietly.
    assert zeroshot.load_classnames('imagenet').count('missile') == 2
  assert not caplog.records


def test_target_index():
  assert zeroshot.target_index(['a', 'banana', 'c'], 'banana') == 1
  assert zeroshot.target_index(zeroshot.load_classnames('imagenet'), 'missile') == 657  # first of two
  with pytest.raises(ValueError, match="eval.target='bananas'.*similar names"):
    zeroshot.target_index(['banana', 'apple'], 'bananas')
  with pytest.raises(ValueError, match="eval.target='pear'"):
    zeroshot.target_index(['banana', 'apple'], 'pear')


def test_class_embeddings_average_normalised_templates():
  classnames = ['x', 'y']
  templates = ['big {}', 'small {}']
  # Hand-made text embeddings with different norms: the per-template normalisation must happen
  # before the average, or the long vector would dominate.
  table = {'big x': [3.0, 0.0, 0.0], 'small x': [0.0, 1.0, 0.0],
           'big y': [0.0, 0.0, 2.0], 'small y': [0.0, 0.0, 1.0]}
  prompts = zeroshot.prompts(classnames, templates)
  assert prompts == ['big x', 'small x', 'big y', 'small y']
  tokenize = lambda texts: np.array([prompts.index(t) for t in texts])
  encode = lambda ids: np.array([table[prompts[i]] for i in ids])
  weights = zeroshot.class_embeddings(encode, tokenize, classnames, templates)
  np.testing.assert_allclose(weights[0], [2 ** -0.5, 2 ** -0.5, 0.0], atol=1e-6)
  np.testing.assert_allclose(weights[1], [0.0, 0.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(weights, axis=1), 1.0, atol=1e-6)


def test_zeroshot_logits_pick_the_right_class():
  rng = np.random.default_rng(0)
  per_template = rng.normal(size=(5, 3, 16))  # 5 classes, 3 templates
  weights = zeroshot.ensemble(per_template)
  images = weights[[4, 0, 2]] + 0.05 * rng.normal(size=(3, 16))
  assert list((images @ weights.T).argmax(-1)) == [4, 0, 2]
