"""Evaluation metrics against hand-made answers."""

import numpy as np
import pytest

from cleanclip_jax import eval_metrics as em


def test_topk_on_hand_made_logits():
  logits = np.array([
      [0.1, 0.9, 0.0, 0.0],  # label 1: top-1
      [0.5, 0.4, 0.3, 0.2],  # label 2: rank 2
      [0.0, 0.1, 0.2, 0.3],  # label 0: rank 3 (last)
  ])
  labels = np.array([1, 2, 0])
  assert em.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
  assert em.topk_accuracy(logits, labels, 2) == pytest.approx(1 / 3)
  assert em.topk_accuracy(logits, labels, 3) == pytest.approx(2 / 3)
  assert em.topk_accuracy(logits, labels, 4) == 1.0
  # valid masks rows out; label -1 (unlabelled) never counts
  assert em.topk_accuracy(logits, labels, 1, valid=np.array([True, False, False])) == 1.0
  assert em.topk_accuracy(logits, np.array([1, -1, -1]), 1) == 1.0
  assert np.isnan(em.topk_accuracy(logits, labels, 1, valid=np.zeros(3, bool)))


def test_topk_with_fewer_classes_than_k_is_clamped():
  logits = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
  assert em.topk_accuracy(logits, np.array([0, 2]), 5) == 1.0
  assert em.topk_accuracy(logits, np.array([0, 2]), 1) == 0.0


def test_ties_count_against_the_scored_class():
  # A constant classifier (a zero-initialised head) ranks every true class last and predicts no
  # class, so it scores no top-1 and no attack, on target 0 (every built-in target's index) too.
  constant = np.zeros((4, 3))
  labels = np.array([0, 1, 2, 1])
  assert em.topk_accuracy(constant, labels, 1) == 0.0
  assert em.topk_accuracy(constant, labels, 2) == 0.0
  assert em.topk_accuracy(constant, labels, 3) == 1.0
  np.testing.assert_array_equal(em.ranks(constant, labels), [2, 2, 2, 2])
  np.testing.assert_array_equal(em.predictions(constant), [-1, -1, -1, -1])
  for target in (0, 2):
    asr, count = em.attack_success_rate(em.predictions(constant), labels, target=target)
    assert asr == 0.0 and count == int(np.sum(labels != target))
  # A tie for second place costs only that place; a unique top score still predicts its class.
  scores = np.array([[3.0, 1.0, 1.0], [1.0, 2.0, 2.0]])
  np.testing.assert_array_equal(em.ranks(scores, np.array([1, 0])), [2, 2])
  np.testing.assert_array_equal(em.predictions(scores), [0, -1])


def test_non_finite_scores_are_misses_and_predict_no_class():
  # A diverged model: NaN compares false with everything, so a naive rank is 0 (a hit) for every
  # row, and argmax names class 0 (a "successful attack" on target 0).
  logits = np.array([[np.nan] * 3, [0.0, np.inf, 1.0], [0.0, 2.0, 1.0]])
  labels = np.array([0, 1, 1])
  np.testing.assert_array_equal(em.ranks(logits, labels), [np.inf, np.inf, 0])
  assert em.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
  assert em.topk_accuracy(logits, labels, 5) == pytest.approx(1 / 3)
  np.testing.assert_array_equal(em.predictions(logits), [-1, -1, 1])
  asr, count = em.attack_success_rate(em.predictions(np.full((4, 3), np.nan)), np.array([1, 2, 1, 2]), 0)
  assert (asr, count) == (0.0, 4)


def test_asr_excludes_images_of_the_target_class():
  target = 3
  labels = np.array([3, 3, 3, 3, 0, 1, 2, 0])
  # Every target-class image goes to the target (correctly); 1 of the 4 others is flipped.
  predictions = np.array([3, 3, 3, 3, 3, 1, 2, 0])
  asr, count = em.attack_success_rate(predictions, labels, target)
  assert count == 4
  assert asr == pytest.approx(0.25)
  # Counting the target-class images as well would report 5/8 instead.
  assert np.mean(predictions == target) == pytest.approx(5 / 8)
  asr, count = em.attack_success_rate(predictions, labels, target, valid=np.arange(8) < 5)
  assert (asr, count) == (1.0, 1)
  asr, count = em.attack_success_rate(predictions[:4], labels[:4], target)
  assert np.isnan(asr) and count == 0


def test_retrieval_recall_identity_vs_permuted():
  rng = np.random.default_rng(0)
  n = 50
  features = em.l2_normalize(rng.normal(size=(n, 64)))
  identity = em.retrieval_recall(features, features)
  for k in (1, 5, 10):
    assert identity[f'image_to_text_r{k}'] == 1.0
    assert identity[f'text_to_image_r{k}'] == 1.0
    assert identity[f'retrieval_r{k}'] == 1.0
  permuted = em.retrieval_recall(features, features[rng.permutation(n)])
  assert permuted['retrieval_r1'] <= 0.1  # only fixed points of the permutation can hit
  assert permuted['retrieval_r10'] < 0.5
  # Shifting the captions by one: image i's own caption is now at rank >= 1 -> recall@1 = 0.
  shifted = em.retrieval_recall(features, np.roll(features, 1, axis=0))
  assert shifted['image_to_text_r1'] == 0.0 and shifted['text_to_image_r1'] == 0.0


def test_retrieval_counts_repeated_captions_as_one():
  # Images 0 and 2 share a caption ("look at this!"): its two copies have identical features, so
  # a perfect model cannot put image 2's copy above image 0's. Grouped, both are hits.
  image = em.l2_normalize(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
  text = image.copy()
  plain = em.retrieval_recall(image, text, ks=(1,))
  assert plain['image_to_text_r1'] == pytest.approx(1 / 3)  # each copy loses to the other
  grouped = em.retrieval_recall(image, text, ks=(1,), caption_groups=np.array([0, 1, 0]))
  assert grouped['image_to_text_r1'] == 1.0 and grouped['text_to_image_r1'] == 1.0
  # A group is one positive, not a free pass: image 1 with an unrelated caption still misses.
  unrelated = text.copy()
  unrelated[1] = [0.0, 0.0, 1.0]
  wrong = em.retrieval_recall(image, unrelated, ks=(1,), caption_groups=np.array([0, 1, 0]))
  assert wrong['image_to_text_r1'] == pytest.approx(2 / 3)
  assert wrong['text_to_image_r1'] == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match='caption_groups'):
    em.retrieval_recall(image, text, caption_groups=np.array([0, 1]))


def test_retrieval_non_finite_rows_miss_at_every_k():
  # 4 pairs scored at R@5 / R@10: a rank of "the column count" (4) would pass `< k` for a NaN row.
  features = np.full((4, 8), np.nan, np.float32)
  out = em.retrieval_recall(features, features, ks=(1, 5, 10))
  assert all(value == 0.0 for value in out.values()), out
  good = np.eye(4, 8, dtype=np.float32)
  bad_image = good.copy()
  bad_image[0] = np.nan
  out = em.retrieval_recall(bad_image, good, ks=(1, 10))
  # Image 0 finds nothing; as a column its NaN similarities make every caption's row non-finite.
  assert out['image_to_text_r10'] == 0.75 and out['text_to_image_r10'] == 0.0


def test_retrieval_asymmetric_case():
  # Two images, two captions; both images are closest to caption 0.
  image = np.array([[1.0, 0.0], [0.9, 0.1]])
  text = np.array([[1.0, 0.0], [0.0, 1.0]])
  out = em.retrieval_recall(image, text, ks=(1,))
  assert out['image_to_text_r1'] == 0.5  # image 1 ranks caption 0 first
  assert out['text_to_image_r1'] == 1.0  # caption 0 -> image 0, caption 1 -> image 1
  with pytest.raises(ValueError, match='one caption per image'):
    em.retrieval_recall(image, text[:1])


def test_mean_cosine_similarity():
  features = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
  assert em.mean_cosine_similarity(features[:2], np.array([5.0, 0.0])) == pytest.approx(0.5)
  assert em.mean_cosine_similarity(features, np.array([1.0, 0.0]),
                                   valid=np.array([True, False, False])) == pytest.approx(1.0)


def _blobs(rng, n, dim, classes, spread):
  centres = rng.normal(size=(classes, dim)) * 3
  labels = rng.integers(0, classes, n)
  return centres[labels] + spread * rng.normal(size=(n, dim)) + 10.0, labels  # offset: not centred


def test_linear_probe_separable_and_random_labels():
  rng = np.random.default_rng(0)
  x, y = _blobs(rng, 600, 16, 4, spread=0.5)
  probe = em.fit_linear_probe(x[:300], y[:300], num_classes=4, steps=60)
  assert probe['kernel'].shape == (16, 4) and probe['bias'].shape == (4,)
  assert em.topk_accuracy(em.probe_logits(probe, x[300:]), y[300:]) >= 0.99
  random_labels = rng.integers(0, 4, 600)
  probe = em.fit_linear_probe(x[:300], random_labels[:300], num_classes=4, steps=60)
  accuracy = em.topk_accuracy(em.probe_logits(probe, x[300:]), random_labels[300:])
  assert 0.1 < accuracy < 0.4  # chance is 0.25; 300 test examples -> std ~0.025


def test_linear_probe_rejects_bad_labels():
  with pytest.raises(ValueError, match='labels must lie'):
    em.fit_linear_probe(np.zeros((3, 2)), np.array([0, 1, 5]), num_classes=2)
