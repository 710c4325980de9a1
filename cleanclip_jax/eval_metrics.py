"""Evaluation metrics as pure functions of features, logits and labels (numpy in, floats out).

Nothing here touches a model, a dataset or a device mesh: `evaluate.py` produces the arrays, these
functions turn them into numbers, and the tests check them against hand-made answers.

A tie counts against the class being scored: the true class ranks below every other class with
an equal score, and a row whose top score is shared predicts no class. So a classifier that gives
every class the same score (a zero-initialised head, collapsed features) scores no top-1 hit and
no successful attack, whichever index the true class or the target has (breaking ties towards the
lower index, as `argmax` does, credited it with every attack on a target of class 0, which the
built-in targets are). A row with a non-finite score (a diverged model's NaN features) is a miss
and predicts no class: NaN compares false with everything, so without this rule every such row
would rank its label first and a NaN model would score 100% top-1.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """The 0-based rank of `targets[i]` in row `scores[i]` (0 = top): the number of other classes
  scoring at least as high (ties count against it); infinity (a miss at every k) for a row with
  a non-finite score.

  Args:
    scores: float [N, C].
    targets: int [N], each in [0, C).
  """
  scores = np.asarray(scores)
  targets = np.asarray(targets, np.int64)
  if scores.ndim != 2 or targets.shape != scores.shape[:1]:
    raise ValueError(f'ranks: scores {scores.shape} and targets {targets.shape} do not match')
  if targets.size and (targets.min() < 0 or targets.max() >= scores.shape[1]):
    raise ValueError(f'ranks: targets must lie in [0, {scores.shape[1]}), got '
                     f'[{targets.min()}, {targets.max()}]')
  return _rank_of_best_positive(scores, np.arange(scores.shape[1])[None, :] == targets[:, None])


def predictions(scores: np.ndarray) -> np.ndarray:
  """The top class of each row; -1 where the top score is shared (no class wins) or a score is
  non-finite (argmax would name class 0 for both)."""
  scores = np.asarray(scores)
  top = scores.argmax(axis=1)
  unique = (scores == scores.max(axis=1, keepdims=True)).sum(axis=1) == 1
  return np.where(np.isfinite(scores).all(axis=1) & unique, top, -1)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1,
                  valid: np.ndarray | None = None) -> float:
  """Fraction of valid rows whose label is among the k highest logits.

  With fewer than k classes, k is clamped to the number of classes, so top-5 over 3 classes is
  1.0 by definition (every class is in the top 5) rather than undefined. NaN when no row is valid.
  """
  logits = np.asarray(logits)
  labels = np.asarray(labels)
  keep = _valid_mask(labels, valid)
  if not keep.any():
    return float('nan')
  k = min(int(k), logits.shape[1])
  return float(np.mean(ranks(logits[keep], labels[keep]) < k))


def attack_success_rate(predictions: np.ndarray, labels: np.ndarray, target: int,
                        valid: np.ndarray | None = None) -> tuple[float, int]:
  """Fraction of triggered images from classes other than `target` that are predicted `target`.

  Images whose true class is the target are excluded: predicting the target for them is a correct
  answer, not an attack. Returns (asr, number of images it was measured on); NaN when there are
  none.
  """
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  eligible = _valid_mask(labels, valid) & (labels != target)
  count = int(eligible.sum())
  if not count:
    return float('nan'), 0
  return float(np.mean(predictions[eligible] == target)), count


def retrieval_recall(image_features: np.ndarray, text_features: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10),
                     caption_groups: np.ndarray | None = None) -> dict[str, float]:
  """Recall@k for paired embeddings: image i's caption is text i (and vice versa).

  `caption_groups` (int [N]) marks captions the model cannot tell apart (the same tokens: a
  dataset's repeated captions), which are then one caption: each is a hit for every image that
  has it, and each of those images a hit for it. Without it a repeated caption always loses to
  its own copy (a tie counts against the scored item), capping recall below 1 for a perfect model.

  Returns `image_to_text_r{k}` and `text_to_image_r{k}` for each k, and `retrieval_r{k}`, their
  mean. Similarities are dot products, so pass L2-normalised features for cosine retrieval.
  """
  image_features = np.asarray(image_features, np.float32)
  text_features = np.asarray(text_features, np.float32)
  if image_features.shape != text_features.shape:
    raise ValueError(f'retrieval_recall: {image_features.shape} image vs {text_features.shape} '
                     'text features; retrieval needs one caption per image')
  groups = np.arange(len(image_features)) if caption_groups is None else np.asarray(caption_groups)
  if groups.shape != image_features.shape[:1]:
    raise ValueError(f'retrieval_recall: caption_groups {groups.shape} for {len(image_features)} '
                     'pairs')
  similarity = image_features @ text_features.T
  positive = groups[:, None] == groups[None, :]
  image_ranks = _rank_of_best_positive(similarity, positive)
  text_ranks = _rank_of_best_positive(similarity.T, positive)
  out = {}
  for k in ks:
    out[f'image_to_text_r{k}'] = float(np.mean(image_ranks < k))
    out[f'text_to_image_r{k}'] = float(np.mean(text_ranks < k))
    out[f'retrieval_r{k}'] = (out[f'image_to_text_r{k}'] + out[f'text_to_image_r{k}']) / 2
  return out


def _rank_of_best_positive(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
  """Per row: how many non-positive columns score at least as high as its best positive (ties
  count against it); infinity for a row with a non-finite score, a miss at every k (the column
  count would be a hit for k above it: a retrieval set of 10 pairs scored at R@10). `ranks` is
  the case of one positive a row."""
  best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
  beaten_by = (scores >= best) & ~positive
  return np.where(np.isfinite(scores).all(axis=1), beaten_by.sum(axis=1).astype(np.float64), np.inf)


def mean_cosine_similarity(features: np.ndarray, direction: np.ndarray,
                           valid: np.ndarray | None = None) -> float:
  """Mean cosine similarity between each row of `features` [N, D] and one vector [D]."""
  features = np.asarray(features, np.float32)
  direction = np.asarray(direction, np.float32)
  if valid is not None:
    features = features[np.asarray(valid, bool)]
  if not len(features):
    return float('nan')
  features = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
  direction = direction / max(float(np.linalg.norm(direction)), 1e-12)
  return float(np.mean(features @ direction))


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, num_classes: int,
                     l2: float = 1e-4, steps: int = 100) -> dict[str, np.ndarray]:
  """Multinomial logistic regression on frozen features, fitted full-batch with optax L-BFGS.

  Features are standardised with the training set's mean and std (folded into the returned
  weights), which keeps the problem well conditioned whatever the embedding's scale. The loss is
  mean cross-entropy + `l2` * ||kernel||^2 (the bias is not penalised).

  Returns {'kernel': [D, C], 'bias': [C]} acting on raw features: logits = x @ kernel + bias.
  """
  x = np.asarray(features, np.float32)
  y = np.asarray(labels, np.int32)
  if x.ndim != 2 or y.shape != x.shape[:1]:
    raise ValueError(f'fit_linear_probe: features {x.shape} and labels {y.shape} do not match')
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f'fit_linear_probe: labels must lie in [0, {num_classes}); '
                     f'got [{y.min()}, {y.max()}] (unlabelled examples must be dropped first)')
  mean = x.mean(axis=0)
  std = x.std(axis=0) + 1e-6
  kernel, bias = _lbfgs_fit(jnp.asarray((x - mean) / std), jnp.asarray(y), jnp.float32(l2),
                            num_classes=num_classes, steps=int(steps))
  kernel = np.asarray(kernel) / std[:, None]
  bias = np.asarray(bias) - mean @ kernel
  return {'kernel': kernel, 'bias': bias}


def probe_logits(probe: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
  return np.asarray(features, np.float32) @ probe['kernel'] + probe['bias']


@functools.partial(jax.jit, static_argnames=('num_classes', 'steps'))
def _lbfgs_fit(x, y, l2, *, num_classes, steps):
  def loss_fn(params):
    logits = x @ params['kernel'] + params['bias']
    data_loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return data_loss + l2 * jnp.sum(params['kernel'] ** 2)

  params = {'kernel': jnp.zeros((x.shape[1], num_classes), jnp.float32),
            'bias': jnp.zeros((num_classes,), jnp.float32)}
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def step(_, carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  params, _ = jax.lax.fori_loop(0, steps, step, (params, solver.init(params)))
  return params['kernel'], params['bias']


def _valid_mask(labels: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
  keep = np.ones(labels.shape, bool) if valid is None else np.asarray(valid, bool)
  return keep & (labels >= 0)
