"""Objectives against straightforward numpy references, and the dense vs sharded forms on 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleanclip_jax import losses, sharding


def _unit(rng, n, d):
  x = rng.standard_normal((n, d))
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _np_ce_rows(logits):
  """Mean over rows i of -log softmax(logits[i])[i], with an explicit loop."""
  total = 0.0
  for i, row in enumerate(logits.astype(np.float64)):
    row = row - row.max()
    total += -(row[i] - np.log(np.exp(row).sum()))
  return total / logits.shape[0]


def _np_clip(img, txt, t):
  logits = np.exp(t) * img.astype(np.float64) @ txt.T.astype(np.float64)
  return 0.5 * (_np_ce_rows(logits) + _np_ce_rows(logits.T))


@pytest.fixture(scope='module')
def features():
  rng = np.random.default_rng(0)
  return [_unit(rng, 16, 8) for _ in range(4)]


def test_clip_loss_matches_numpy(features):
  img, txt, _, _ = features
  t = np.log(1 / 0.07)
  np.testing.assert_allclose(losses.clip_loss(img, txt, t), _np_clip(img, txt, t), rtol=1e-5)


def test_clip_loss_known_value():
  # Orthonormal pairs: logits = s * I, so each row's CE = log(1 + (n - 1) e^{-s}).
  n, s = 4, 2.0
  eye = np.eye(n, dtype=np.float32)
  expected = np.log(1 + (n - 1) * np.exp(-s))
  np.testing.assert_allclose(losses.clip_loss(eye, eye, np.log(s)), expected, rtol=1e-6)


def test_cleanclip_loss_matches_numpy(features):
  img, txt, aug_img, aug_txt = features
  t = 2.5
  terms = losses.cleanclip_loss(img, txt, aug_img, aug_txt, t, clip_weight=0.7, inmodal_weight=1.3)
  s = np.exp(t)
  inmodal = 0.5 * (_np_ce_rows(s * img.astype(np.float64) @ aug_img.T)
                   + _np_ce_rows(s * txt.astype(np.float64) @ aug_txt.T))
  mmcl = _np_clip(img, txt, t)
  np.testing.assert_allclose(terms.clip_loss, mmcl, rtol=1e-5)
  np.testing.assert_allclose(terms.inmodal_loss, inmodal, rtol=1e-5)
  np.testing.assert_allclose(terms.loss, 0.7 * mmcl + 1.3 * inmodal, rtol=1e-5)


def test_siglip_loss_matches_numpy(features):
  img, txt, _, _ = features
  t, b = np.log(10.0), -10.0
  logits = np.exp(t) * img.astype(np.float64) @ txt.T + b
  labels = 2 * np.eye(len(img)) - 1
  expected = np.sum(np.log1p(np.exp(-labels * logits))) / len(img)
  np.testing.assert_allclose(losses.siglip_loss(img, txt, t, b), expected, rtol=1e-5)


def test_supervised_loss_ignores_unlabelled():
  logits = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [5.0, 5.0, 5.0], [0.0, 0.0, 1.0]], np.float32)
  labels = np.array([0, 2, -1, 2], np.int32)
  rows = [0, 1, 3]
  expected = np.mean([-(logits[i, labels[i]] - np.log(np.exp(logits[i]).sum())) for i in rows])
  terms = losses.supervised_loss(logits, labels)
  np.testing.assert_allclose(terms.loss, expected, rtol=1e-6)
  np.testing.assert_allclose(terms.accuracy, 2 / 3, rtol=1e-6)
  assert int(terms.num_labelled) == 3


@pytest.mark.parametrize('data,fsdp,impl', [(8, 1, 'gather'), (4, 2, 'gather'), (4, 2, 'ring')])
def test_sharded_losses_match_dense(features, data, fsdp, impl):
  assert jax.device_count() == 8
  mesh = sharding.make_mesh({'data': data, 'fsdp': fsdp})
  img, txt, aug_img, aug_txt = (jnp.asarray(f) for f in features)

  def total(mesh):
    def f(img, txt, aug_img, aug_txt, t, b):
      clean = losses.cleanclip_loss(img, txt, aug_img, aug_txt, t, 1.0, 0.5, mesh=mesh, impl=impl).loss
      return clean + losses.siglip_loss(img, txt, t, b, mesh=mesh)
    return jax.jit(jax.value_and_grad(f, argnums=tuple(range(6))))

  args = (img, txt, aug_img, aug_txt, jnp.float32(2.3), jnp.float32(-3.0))
  dense_value, dense_grads = total(None)(*args)
  sharded_value, sharded_grads = total(mesh)(*args)
  np.testing.assert_allclose(sharded_value, dense_value, rtol=1e-5)
  for dense, sharded in zip(dense_grads, sharded_grads):
    np.testing.assert_allclose(sharded, dense, rtol=1e-4, atol=1e-6)
