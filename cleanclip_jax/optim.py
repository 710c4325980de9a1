"""The optimiser: AdamW on a warmup + cosine schedule, weight-decay mask, global-norm clipping,
per-group learning-rate multipliers and freezing, and gradient accumulation over micro-batches.

Parameter groups are chosen by regex on '/'-joined parameter paths (`visual/transformer/
resblocks_0/attn/query/kernel`), big_vision style: `optimizer.lr_rules = (('^visual/', 0.1),
('^text/', 0.0))`. The first matching rule wins; unmatched parameters get multiplier 1. A
multiplier of 0 freezes: those parameters go through `optax.set_to_zero` and have no AdamW
moments at all (`optax.multi_transform`), and they are left out of clipping and the grad norm.

Weight decay (`NO_DECAY_PATTERN`) is off for gains and biases (LayerNorm/BatchNorm `scale`,
every `bias`), embeddings (token `embedding`, `positional_embedding`, `class_embedding`) and the
temperature / SigLIP bias (`logit_scale`, `logit_bias`), and for any parameter with < 2 dims; it
is on for every kernel and projection (including the patch-embedding convolution).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding

NO_DECAY_PATTERN = re.compile(
    r'(^|/)(bias|scale|embedding|positional_embedding|class_embedding|logit_scale|logit_bias)$')
FROZEN, TRAINABLE = 'frozen', 'trainable'


def path_str(path) -> str:
  """A tree key path as 'a/b/c'."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator='/')


def make_schedule(config: ml_collections.ConfigDict, total_steps: int | None = None) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine to 0 at
  `total_steps` (or constant for `optimizer.schedule='constant'`).

  The first update runs at schedule(0) = 0 (optax's and big_vision's convention; open_clip's
  warmup starts at lr / warmup_steps), so warmup reaches the peak one step later than there."""
  peak = float(config.learning_rate)
  total = int(config.total_steps if total_steps is None else total_steps)
  warmup = max(0, min(int(config.warmup_steps), total - 1))
  kind = config.optimizer.schedule
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1), end_value=0.0)
  if kind == 'constant':
    if warmup == 0:
      return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                [warmup])
  raise ValueError(f'optimizer.schedule={kind!r}: use cosine or constant')


def weight_decay_mask(params: Any) -> Any:
  """True where weight decay applies (see the module docstring)."""
  def decays(path, leaf):
    return jnp.ndim(leaf) >= 2 and not NO_DECAY_PATTERN.search(path_str(path))
  return jax.tree_util.tree_map_with_path(decays, params)


def effective_lr_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, float], ...]:
  """`optimizer.lr_rules`, preceded, for the supervised objective, by a rule freezing what its loss
  never reaches: the text tower and the temperature (or, with `freeze_tower`, the whole CLIP
  model). Their gradients are zero, but AdamW's weight decay would still shrink the text kernels
  every step (by exp(-wd * sum lr): ~10% over 10 ImageNet epochs), moving the zero-shot class
  embeddings of a supervised checkpoint; frozen, they keep their values and need no moments."""
  rules = tuple((str(pattern), float(mult)) for pattern, mult in config.optimizer.lr_rules)
  if config.objective.name == 'supervised':
    unused = '^clip/' if config.objective.freeze_tower else '^clip/(text/|logit_scale$|logit_bias$)'
    rules = ((unused, 0.0),) + rules
  for pattern, mult in rules:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f'optimizer.lr_rules: bad regex {pattern!r}: {e}') from e
    if mult < 0:
      raise ValueError(f'optimizer.lr_rules: multiplier {mult} for {pattern!r} is negative')
  return rules


def lr_multipliers(params: Any, rules: Sequence[tuple[str, float]]) -> Any:
  """The learning-rate multiplier of every parameter (first matching rule, else 1)."""
  compiled = [(re.compile(pattern), mult) for pattern, mult in rules]

  def multiplier(path, _):
    name = path_str(path)
    for pattern, mult in compiled:
      if pattern.search(name):
        return mult
    return 1.0
  return jax.tree_util.tree_map_with_path(multiplier, params)


def param_labels(params: Any, rules: Sequence[tuple[str, float]]) -> Any:
  """'frozen' (multiplier 0) or 'trainable' for every parameter."""
  return jax.tree.map(lambda m: FROZEN if m == 0 else TRAINABLE, lr_multipliers(params, rules))


def trainable_mask(params: Any, rules: Sequence[tuple[str, float]]) -> Any:
  return jax.tree.map(lambda m: m != 0, lr_multipliers(params, rules))


def _scale_by_multipliers(rules: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's multiplier. After AdamW this is exactly a
  per-group learning rate (AdamW's update, decay included, is linear in the learning rate)."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    scaled = jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, lr_multipliers(updates, rules))
    return scaled, state
  return optax.GradientTransformation(init, update)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int | None = None
                   ) -> optax.GradientTransformation:
  """The full transformation; `total_steps` defaults to `config.total_steps`."""
  opt = config.optimizer
  rules = effective_lr_rules(config)
  trainable = []
  if opt.grad_clip_norm and opt.grad_clip_norm > 0:
    trainable.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
  trainable.append(optax.adamw(make_schedule(config, total_steps), b1=float(opt.b1), b2=float(opt.b2),
                               eps=float(opt.eps), weight_decay=float(opt.weight_decay),
                               mask=weight_decay_mask))
  if any(mult not in (0.0, 1.0) for _, mult in rules):
    trainable.append(_scale_by_multipliers(rules))
  return optax.multi_transform({TRAINABLE: optax.chain(*trainable), FROZEN: optax.set_to_zero()},
                               lambda params: param_labels(params, rules))


def split_micro_batches(batch: Any, accum_steps: int, sharding: NamedSharding | None = None) -> Any:
  """[B, ...] -> [accum_steps, B / accum_steps, ...], micro-batch k = rows k, k + accum_steps, ...

  Strided rather than contiguous because the batch is split over devices in contiguous blocks:
  this way every micro-batch has B / (accum_steps * devices) rows on every device, and no data
  moves. `sharding` (e.g. P(None, batch axes)) pins that layout.
  """
  def split(x):
    if x.shape[0] % accum_steps:
      raise ValueError(f'batch of {x.shape[0]} rows does not split into {accum_steps} micro-batches')
    x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
  return jax.tree.map(split, batch)


def accumulate_gradients(loss_and_grad: Callable[[Any, Any], tuple[tuple[jax.Array, Any], Any]],
                         params: Any, batch: Any, accum_steps: int,
                         micro_batch_sharding: NamedSharding | None = None):
  """Mean loss, aux and gradients over `accum_steps` micro-batches, with one `lax.scan`.

  `loss_and_grad(params, batch) -> ((loss, aux), grads)`. With `accum_steps == 1` this is a plain
  call. The result is the mean of the micro-batch results; for a loss that is a mean over
  examples it equals the full-batch gradient (the supervised objective weights each micro-batch by
  its share of the labelled rows: `train_step.loss_and_grads`), but a contrastive loss over
  micro-batches only contrasts each example with its own micro-batch, so it is NOT the full-batch
  CLIP loss.
  """
  if accum_steps <= 1:
    return loss_and_grad(params, batch)
  micro = split_micro_batches(batch, accum_steps, micro_batch_sharding)
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(loss_and_grad, params, first))

  def body(total, micro_batch):
    result = loss_and_grad(params, micro_batch)
    return jax.tree.map(jnp.add, total, result), None

  total, _ = jax.lax.scan(body, zeros, micro)
  return jax.tree.map(lambda x: x / accum_steps, total)
