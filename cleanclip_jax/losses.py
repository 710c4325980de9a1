"""Training objectives as pure functions of features, over the GLOBAL batch.

Every contrastive term has a dense and a sharded form that give the same numbers:
- dense (`mesh=None`): the full [N, N] logits matrix; simple, memory quadratic in the batch;
- sharded (`mesh=...`), a `jax.shard_map` over the batch axes, `impl=`:
  - 'gather': each device scores its own rows against the all-gathered columns ([N / devices, N]
    logits per device, linear in the global batch at a fixed per-device batch).
    `jax.lax.all_gather` is differentiable (its transpose is a reduce-scatter), so gradients flow
    to the rows of every device, as in open_clip's `gather_with_grad`;
  - 'ring': column blocks travel around the devices with `ppermute` and a running logsumexp, with
    a custom VJP that replays the ring; [N / devices]^2 logits per device, constant in the number
    of devices (for batches where even [b, N] does not fit).

`logit_scale` is the raw (log) temperature parameter; the losses exponentiate it. Its clamp at
ln(100) is applied to the parameter by the train step after each update (as CLIP and CleanCLIP do),
not here, so the losses stay plain functions of their inputs.

CleanCLIP (Bansal et al. 2023, as defined in the paper and the authors' code):
  L = clip_weight * L_CLIP + inmodal_weight * L_SS,
  L_CLIP = (CE(img -> txt) + CE(txt -> img)) / 2,
  L_SS   = (CE(img -> aug_img) + CE(txt -> aug_txt)) / 2,
where CE(a -> b) is the mean over rows i of the cross-entropy of exp(t) * a_i . b^T with target i,
over the global batch and with the same temperature t as L_CLIP.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from cleanclip_jax.sharding import BATCH_AXES


def _row_cross_entropy_sum(logits, targets):
  """Sum over rows of -log softmax(logits)[target]."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked)


def _one_way_dense(rows, cols, logit_scale):
  logits = jnp.exp(logit_scale) * rows @ cols.T
  return _row_cross_entropy_sum(logits, jnp.arange(rows.shape[0])) / rows.shape[0]


def _one_way_sharded(rows, cols, logit_scale, mesh: Mesh):
  """CE(rows -> cols) with rows local and columns all-gathered; same value as the dense form."""
  batch = rows.shape[0]

  def local(rows, cols, logit_scale):
    all_cols = jax.lax.all_gather(cols, BATCH_AXES, axis=0, tiled=True)
    logits = jnp.exp(logit_scale) * rows @ all_cols.T  # [local, global]
    offset = jax.lax.axis_index(BATCH_AXES) * rows.shape[0]
    targets = offset + jnp.arange(rows.shape[0])
    return jax.lax.psum(_row_cross_entropy_sum(logits, targets), BATCH_AXES)

  spec = P(BATCH_AXES)
  total = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P()), out_specs=P())(
      rows, cols, logit_scale)
  return total / batch


def _ring_shift(x, num_shards: int):
  """Sends x to the next device along the batch axes (the last one wraps to the first)."""
  return jax.lax.ppermute(x, BATCH_AXES, [(i, (i + 1) % num_shards) for i in range(num_shards)])


def _ring_ce_sum(num_shards: int):
  """Per-device sum of CE(rows -> all columns), columns visiting every device in a ring.

  Forward: each of `num_shards` steps scores the local rows against one [b, d] block of columns
  and folds it into a running logsumexp, then passes the block on. Backward (custom VJP) replays
  the ring, recomputing each block's softmax from the saved logsumexp, and passes a gradient
  accumulator along with each block so it arrives home holding d loss / d block from every
  device. Per-device memory is O(b^2 + b d), independent of the number of devices.
  """
  def forward_pass(rows, cols, logit_scale):
    scale = jnp.exp(logit_scale)

    def body(_, carry):
      block, running_max, running_sum = carry
      logits = scale * rows @ block.T
      new_max = jnp.maximum(running_max, logits.max(axis=-1))
      running_sum = (running_sum * jnp.exp(running_max - new_max)
                     + jnp.exp(logits - new_max[:, None]).sum(axis=-1))
      return _ring_shift(block, num_shards), new_max, running_sum

    init_max = jnp.full(rows.shape[:1], -jnp.inf, rows.dtype)
    init_max = jax.lax.pcast(init_max, BATCH_AXES, to='varying')
    _, running_max, running_sum = jax.lax.fori_loop(
        0, num_shards, body, (cols, init_max, jnp.zeros_like(init_max)))
    logsumexp = running_max + jnp.log(running_sum)
    positive = scale * jnp.sum(rows * cols, axis=-1)  # row i's own column lives on this device
    return jnp.sum(logsumexp - positive), (logsumexp, positive)

  @jax.custom_vjp
  def ce_sum(rows, cols, logit_scale):
    return forward_pass(rows, cols, logit_scale)[0]

  def fwd(rows, cols, logit_scale):
    total, (logsumexp, positive) = forward_pass(rows, cols, logit_scale)
    return total, (rows, cols, logit_scale, logsumexp, positive)

  def bwd(residuals, g):
    rows, cols, logit_scale, logsumexp, positive = residuals
    scale = jnp.exp(logit_scale)

    def body(_, carry):
      block, block_grad, rows_grad, scale_grad = carry
      logits = scale * rows @ block.T
      probs = jnp.exp(logits - logsumexp[:, None])
      rows_grad = rows_grad + (g * scale) * probs @ block
      block_grad = block_grad + (g * scale) * probs.T @ rows
      scale_grad = scale_grad + g * jnp.sum(probs * logits)  # d logits / d logit_scale = logits
      return _ring_shift(block, num_shards), _ring_shift(block_grad, num_shards), rows_grad, scale_grad

    zero = jax.lax.pcast(jnp.zeros((), rows.dtype), BATCH_AXES, to='varying')
    _, cols_grad, rows_grad, scale_grad = jax.lax.fori_loop(
        0, num_shards, body, (cols, jnp.zeros_like(cols), jnp.zeros_like(rows), zero))
    # The -positive term: -scale * rows_i . cols_i.
    rows_grad = rows_grad - (g * scale) * cols
    cols_grad = cols_grad - (g * scale) * rows
    scale_grad = scale_grad - g * jnp.sum(positive)
    return rows_grad, cols_grad, scale_grad

  ce_sum.defvjp(fwd, bwd)
  return ce_sum


def _one_way_ring(rows, cols, logit_scale, mesh: Mesh):
  num_shards = 1
  for axis in BATCH_AXES:
    num_shards *= mesh.shape[axis]
  ce_sum = _ring_ce_sum(num_shards)

  def local(rows, cols, logit_scale):
    # Varying (per-device) so the custom VJP returns a per-device partial; JAX sums them.
    logit_scale = jax.lax.pcast(logit_scale, BATCH_AXES, to='varying')
    return jax.lax.psum(ce_sum(rows, cols, logit_scale), BATCH_AXES)

  spec = P(BATCH_AXES)
  total = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P()), out_specs=P())(
      rows, cols, logit_scale)
  return total / rows.shape[0]


SHARDED_IMPLS = ('gather', 'ring')


def contrastive_loss(rows, cols, logit_scale, mesh: Mesh | None = None, impl: str = 'gather'):
  """One-directional InfoNCE: mean over i of CE(exp(t) * rows_i . cols^T, target i).

  `mesh=None`: dense. Otherwise sharded over the mesh's batch axes with `impl`: 'gather' (local
  rows vs all-gathered columns, [b, N] logits per device) or 'ring' (column blocks passed around
  the devices, [b, b] logits per device; see `_ring_ce_sum`).
  """
  rows, cols = rows.astype(jnp.float32), cols.astype(jnp.float32)
  logit_scale = jnp.asarray(logit_scale, jnp.float32)
  if mesh is None:
    return _one_way_dense(rows, cols, logit_scale)
  if impl == 'gather':
    return _one_way_sharded(rows, cols, logit_scale, mesh)
  if impl == 'ring':
    return _one_way_ring(rows, cols, logit_scale, mesh)
  raise ValueError(f'sharded loss impl {impl!r}: use one of {SHARDED_IMPLS}')


def clip_loss(image_features, text_features, logit_scale, mesh: Mesh | None = None, impl: str = 'gather'):
  """CLIP's symmetric cross-entropy (MMCL) over the global batch."""
  return 0.5 * (contrastive_loss(image_features, text_features, logit_scale, mesh, impl)
                + contrastive_loss(text_features, image_features, logit_scale, mesh, impl))


class CleanClipTerms(NamedTuple):
  loss: jax.Array
  clip_loss: jax.Array
  inmodal_loss: jax.Array


def cleanclip_loss(image_features, text_features, aug_image_features, aug_text_features, logit_scale,
                   clip_weight: float = 1.0, inmodal_weight: float = 1.0,
                   mesh: Mesh | None = None, impl: str = 'gather') -> CleanClipTerms:
  """CleanCLIP: weighted MMCL plus the in-modal (self-supervised) term; see the module docstring."""
  mmcl = clip_loss(image_features, text_features, logit_scale, mesh, impl)
  inmodal = 0.5 * (contrastive_loss(image_features, aug_image_features, logit_scale, mesh, impl)
                   + contrastive_loss(text_features, aug_text_features, logit_scale, mesh, impl))
  return CleanClipTerms(clip_weight * mmcl + inmodal_weight * inmodal, mmcl, inmodal)


def _sigmoid_sum(rows, cols, logit_scale, logit_bias, row_offset):
  logits = jnp.exp(logit_scale) * rows @ cols.T + logit_bias
  positive = (row_offset + jnp.arange(rows.shape[0]))[:, None] == jnp.arange(cols.shape[0])[None, :]
  signs = jnp.where(positive, 1.0, -1.0)
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits))


def siglip_loss(image_features, text_features, logit_scale, logit_bias, mesh: Mesh | None = None):
  """SigLIP's pairwise sigmoid loss (Zhai et al. 2023): -1/N sum_ij log sigmoid(z_ij (t x_i.y_j + b)),
  z_ij = 1 on matching pairs and -1 elsewhere, over the global batch (all N^2 pairs). The sharded
  form is the all-gather one."""
  img = image_features.astype(jnp.float32)
  txt = text_features.astype(jnp.float32)
  logit_scale = jnp.asarray(logit_scale, jnp.float32)
  logit_bias = jnp.asarray(logit_bias, jnp.float32)
  batch = img.shape[0]
  if mesh is None:
    return _sigmoid_sum(img, txt, logit_scale, logit_bias, 0) / batch

  def local(img, txt, logit_scale, logit_bias):
    all_txt = jax.lax.all_gather(txt, BATCH_AXES, axis=0, tiled=True)
    offset = jax.lax.axis_index(BATCH_AXES) * img.shape[0]
    return jax.lax.psum(_sigmoid_sum(img, all_txt, logit_scale, logit_bias, offset), BATCH_AXES)

  spec = P(BATCH_AXES)
  total = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())(
      img, txt, logit_scale, logit_bias)
  return total / batch


class SupervisedTerms(NamedTuple):
  loss: jax.Array
  accuracy: jax.Array
  num_labelled: jax.Array


def supervised_loss(logits, labels) -> SupervisedTerms:
  """Mean softmax cross-entropy over the examples with a label (label >= 0; -1 = unlabelled).

  A batch without labels gives loss 0 and `num_labelled` 0 (the trainer's data checks catch a
  dataset with no labels before training starts).
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f'supervised_loss: logits {logits.shape} and labels {labels.shape} do not match')
  valid = labels >= 0
  safe = jnp.where(valid, labels, 0)
  picked = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
  per_example = jax.nn.logsumexp(logits, axis=-1) - picked
  count = jnp.sum(valid)
  denominator = jnp.maximum(count, 1).astype(jnp.float32)
  loss = jnp.sum(jnp.where(valid, per_example, 0.0)) / denominator
  correct = jnp.where(valid, jnp.argmax(logits, axis=-1) == safe, False)
  return SupervisedTerms(loss, jnp.sum(correct) / denominator, count)
