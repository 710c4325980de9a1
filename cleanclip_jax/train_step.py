"""The training state, its sharded creation, and the pure jit-compiled training step.

```python
model = train_step.model_for_config(config)
state, state_shardings = train_step.create_train_state(config, model, mesh, rng, init_params=None)
step_fn = train_step.make_train_step(config, model, mesh, state_shardings)  # jitted, donates state
state, metrics = step_fn(state, sharding.host_batch_to_global(host_batch, mesh))
```
The jit signature (in/out shardings, donation) is built in `jit_train_step` only, so
`lower_train_step(...).compile().memory_analysis()` inspects exactly what the trainer runs.

Parameter trees by objective: clip / cleanclip: the CLIP tree; siglip: the CLIP tree plus a
top-level scalar `logit_bias` (and `logit_scale` initialised to log 10, SigLIP's values);
supervised: `{'clip': <CLIP tree>, 'head': {'kernel', 'bias'}}`.

The temperature parameter is clamped to [0, ln 100] after every update (CLIP's and CleanCLIP's
rule; the losses themselves do not clamp). With `on_nan='skip'` a step whose loss or gradient
norm is not finite leaves params and optimiser state unchanged (metric `skipped` = 1); with
'stop' the update is applied and the trainer stops on the non-finite `loss` metric.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cleanclip_jax import losses, models, optim, sharding, text_packing
from cleanclip_jax.data.normalize import normalize

LOGIT_SCALE_MAX = math.log(100.0)
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0
# Entries that finetuning may add to (or drop from) a checkpoint's params: a new classifier head,
# SigLIP's bias. Anything else missing or extra is an error.
_OPTIONAL_PARAMS = ('head/kernel', 'head/bias', 'logit_bias')


class InitParamsError(ValueError):
  """`init_checkpoint` / `init_pytorch` weights that do not fit the run's model (names or shapes)."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data (checkpoints store it as a plain array)


def model_for_config(config: ml_collections.ConfigDict) -> nn.Module:
  """The CLIP model of `config.model`, wrapped in an `ImageClassifier` for the supervised objective."""
  # .get: configs stored by runs before the keys existed
  vocab = {'vocab_size': int(config.model.vocab_size)} if config.model.get('vocab_size', 0) else {}
  clip = models.create_model(config.model.name, dtype=config.model.dtype, remat=config.model.remat,
                             context_length=config.model.context_length,
                             attention=config.model.attention,
                             pooled_last_block=config.model.get('pooled_last_block', True), **vocab)
  if config.objective.name != 'supervised':
    return clip
  if config.objective.num_classes <= 0:
    raise ValueError('objective.num_classes must be set (> 0) for the supervised objective; the '
                     'trainer fills it from the dataset, or pass --config.objective.num_classes=N')
  return models.ImageClassifier(clip, int(config.objective.num_classes))


def _is_classifier(model: nn.Module) -> bool:
  return isinstance(model, models.ImageClassifier)


def _clip_module(model: nn.Module) -> models.CLIP:
  return model.clip if _is_classifier(model) else model


def _dummy_inputs(model: nn.Module) -> tuple:
  clip = _clip_module(model)
  images = jnp.zeros((1, clip.image_size, clip.image_size, 3), jnp.float32)
  if _is_classifier(model):
    return (images,)
  return images, jnp.zeros((1, clip.context_length), jnp.int32)


def _boxed_params(model: nn.Module, rng) -> Any:
  return model.init(rng, *_dummy_inputs(model))['params']


def _fresh_params(model: nn.Module, config: ml_collections.ConfigDict, rng) -> dict:
  params = dict(nn.meta.unbox(_boxed_params(model, rng)))
  if config.objective.name == 'siglip':
    params['logit_scale'] = jnp.full((), SIGLIP_LOGIT_SCALE_INIT, jnp.float32)
    params['logit_bias'] = jnp.full((), SIGLIP_LOGIT_BIAS_INIT, jnp.float32)
  return params


def clamp_logit_scale(params: Any) -> Any:
  """Clamps every `logit_scale` leaf to [0, ln 100]."""
  def clamp(path, leaf):
    if optim.path_str(path).split('/')[-1] == 'logit_scale':
      return jnp.clip(leaf, 0.0, LOGIT_SCALE_MAX)
    return leaf
  return jax.tree_util.tree_map_with_path(clamp, params)


def _param_shardings(model: nn.Module, config: ml_collections.ConfigDict, mesh: Mesh) -> dict:
  boxed = jax.eval_shape(functools.partial(_boxed_params, model), jax.random.PRNGKey(0))
  shardings = dict(sharding.param_shardings(boxed, mesh))
  if config.objective.name == 'siglip':
    shardings['logit_bias'] = sharding.replicated(mesh)
  return shardings


def _raw_key(rng) -> jax.Array:
  if jnp.issubdtype(getattr(rng, 'dtype', None), jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return jnp.asarray(rng, jnp.uint32)


def _state_shardings(abstract: TrainState, params_shardings: Any, mesh: Mesh) -> TrainState:
  return TrainState(
      step=sharding.replicated(mesh), params=params_shardings,
      opt_state=sharding.shardings_like_params(abstract.opt_state, abstract.params, params_shardings, mesh),
      rng=sharding.replicated(mesh))


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh, rng,
                       init_params: Any = None) -> tuple[TrainState, TrainState]:
  """A new state, created directly in its sharded layout, and the tree of its shardings.

  Without `init_params` every parameter is initialised on device inside one jit whose
  `out_shardings` are the target shardings (nothing is materialised whole on one device). With
  `init_params` (finetuning: a host numpy or a sharded tree, e.g. from `checkpoint.restore_params`
  or `convert.load_pretrained`) the params are placed on the target shardings and the optimiser
  state is fresh; a CLIP tree is accepted for the supervised objective (a zero head is added) and
  a supervised tree's 'clip' part for the CLIP objectives.
  """
  tx = optim.make_optimizer(config)
  init_rng, state_rng = jax.random.split(_raw_key(rng))
  params_shardings = _param_shardings(model, config, mesh)

  def init_state(params, state_rng):
    params = clamp_logit_scale(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)

  abstract_params = jax.eval_shape(functools.partial(_fresh_params, model, config), init_rng)
  abstract = jax.eval_shape(init_state, abstract_params, state_rng)
  state_shardings = _state_shardings(abstract, params_shardings, mesh)

  if init_params is None:
    create = jax.jit(lambda r, s: init_state(_fresh_params(model, config, r), s),
                     out_shardings=state_shardings)
    return create(init_rng, state_rng), state_shardings

  params = _match_init_params(init_params, abstract_params, config)
  missing = [k for k in _OPTIONAL_PARAMS if _get_path(params, k) is None and _get_path(abstract_params, k) is not None]
  if missing:
    logging.info('init_params: initialising %s fresh (not in the checkpoint)', ', '.join(missing))
    fresh = jax.jit(functools.partial(_fresh_params, model, config), out_shardings=params_shardings)(init_rng)
    for key in missing:
      _set_path(params, key, _get_path(fresh, key))
  params = jax.tree.map(_place, params, params_shardings)
  create = jax.jit(init_state, out_shardings=state_shardings)
  return create(params, state_rng), state_shardings


def _place(value, target: NamedSharding) -> jax.Array:
  if isinstance(value, jax.Array):
    return jax.device_put(value.astype(jnp.float32), target)
  host = np.asarray(value, np.float32)
  # make_array_from_callback also works on multi-host meshes (each host fills its own shards).
  return jax.make_array_from_callback(host.shape, target, lambda index: host[index])


def _get_path(tree: Mapping, path: str):
  node = tree
  for part in path.split('/'):
    if not isinstance(node, Mapping) or part not in node:
      return None
    node = node[part]
  return node


def _set_path(tree: dict, path: str, value) -> None:
  parts = path.split('/')
  for part in parts[:-1]:
    tree = tree.setdefault(part, {})
  tree[parts[-1]] = value


def _to_dict(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def _match_init_params(init_params: Any, abstract_params: Any, config) -> dict:
  """Adapts a checkpoint's params to the target tree and checks every path and shape."""
  params = _to_dict(nn.meta.unbox(init_params))
  target_is_classifier = 'clip' in abstract_params
  if target_is_classifier and 'clip' not in params:
    params = {'clip': params}
  elif not target_is_classifier and 'clip' in params:
    logging.info('init_params: using the checkpoint\'s CLIP tower (dropping %s)', sorted(set(params) - {'clip'}))
    params = params['clip']
  for owner in (params, params.get('clip', {})):
    if 'logit_bias' in owner and config.objective.name != 'siglip':
      logging.info('init_params: dropping logit_bias (objective %s has none)', config.objective.name)
      owner.pop('logit_bias')

  given = {optim.path_str(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
  wanted = {optim.path_str(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(abstract_params)}
  missing = sorted(set(wanted) - set(given) - set(_OPTIONAL_PARAMS))
  extra = sorted(set(given) - set(wanted))
  if missing or extra:
    raise InitParamsError(f'init_params do not match model {config.model.name!r}: missing {missing[:5]} '
                     f'({len(missing)} in all), unexpected {extra[:5]} ({len(extra)} in all)')
  for path, shape in given.items():
    if tuple(shape) != wanted[path]:
      hint = ' (objective.num_classes differs from the checkpoint\'s head)' if path.startswith('head/') else ''
      raise InitParamsError(f'init_params[{path!r}] has shape {tuple(shape)}, model {config.model.name!r} '
                       f'needs {wanted[path]}{hint}')
  return params


# ---------------------------------------------------------------------------------------------
# The step.


def text_input(batch: Mapping[str, jax.Array], key: str = 'tokens'):
  """The text tower's input for batch key `key`: its token array, or a `models.PackedTokens` where
  the trainer packed the captions (`text_packing`)."""
  if text_packing.is_packed(batch, key):
    return models.PackedTokens(*(batch[f'{key}_{field}'] for field in text_packing.FIELDS))
  return batch[key]


def _objective_loss(params, batch, model: nn.Module, config, mesh: Mesh, labelled_share=None):
  """(loss, metrics) of one (micro-)batch for `config.objective`.

  `labelled_share` (supervised, accumulating): this micro-batch's weight, its number of labelled
  rows x accum_steps / the global batch's; the mean of the weighted micro-batch means is then the
  global batch's mean, however the labelled rows fall into micro-batches."""
  objective = config.objective
  dtype = _clip_module(model).dtype
  loss_mesh = mesh if objective.sharded_loss else None
  # 'gather' (default) or 'ring'; read with .get until config.py has the key.
  impl = objective.get('sharded_loss_impl', 'gather')
  if objective.name == 'supervised':
    if objective.freeze_tower:
      # No backward pass through a frozen tower (the optimiser also freezes it).
      params = dict(params, clip=jax.lax.stop_gradient(params['clip']))
    logits = model.apply({'params': params}, normalize(batch['image'], dtype))
    terms = losses.supervised_loss(logits, batch['label'])
    if labelled_share is not None:
      weight = terms.num_labelled * labelled_share
      terms = terms._replace(loss=terms.loss * weight, accuracy=terms.accuracy * weight)
    return terms.loss, {
        'supervised_loss': terms.loss, 'accuracy': terms.accuracy,
        'labelled_fraction': terms.num_labelled / batch['label'].shape[0],
        'logit_scale': jnp.exp(params['clip']['logit_scale'])}

  clip_params = {k: v for k, v in params.items() if k != 'logit_bias'}
  img, txt, logit_scale = model.apply({'params': clip_params}, normalize(batch['image'], dtype),
                                      text_input(batch))
  metrics = {'logit_scale': jnp.exp(logit_scale)}
  if objective.name == 'clip':
    loss = losses.clip_loss(img, txt, logit_scale, loss_mesh, impl)
    metrics['clip_loss'] = loss
  elif objective.name == 'cleanclip':
    for key in ('aug_image', 'aug_tokens'):
      if key not in batch and not text_packing.is_packed(batch, key):
        raise KeyError(f'objective cleanclip needs batch[{key!r}]: set --config.data.inmodal_views=True')
    aug_img, aug_txt, _ = model.apply({'params': clip_params}, normalize(batch['aug_image'], dtype),
                                      text_input(batch, 'aug_tokens'))
    terms = losses.cleanclip_loss(img, txt, aug_img, aug_txt, logit_scale, objective.clip_weight,
                                  objective.inmodal_weight, loss_mesh, impl)
    loss = terms.loss
    metrics.update(clip_loss=terms.clip_loss, inmodal_loss=terms.inmodal_loss)
  elif objective.name == 'siglip':
    loss = losses.siglip_loss(img, txt, logit_scale, params['logit_bias'], loss_mesh)
    metrics.update(siglip_loss=loss, logit_bias=params['logit_bias'])
  else:
    raise ValueError(f'objective.name={objective.name!r}: use clip, cleanclip, siglip or supervised')
  return loss, metrics


def loss_and_grads(params, batch: Mapping[str, jax.Array], *, model: nn.Module,
                   config: ml_collections.ConfigDict, mesh: Mesh):
  """((loss, metrics), grads) of the global batch, accumulated over `optimizer.accum_steps`
  micro-batches: exactly what `train_step` feeds the optimiser."""
  accum_steps = max(1, int(config.optimizer.accum_steps))
  share = None
  if config.objective.name == 'supervised' and accum_steps > 1:
    # A mean over labelled rows: micro-batches holding fewer of them must weigh less.
    share = accum_steps / jnp.maximum(jnp.sum(batch['label'] >= 0), 1).astype(jnp.float32)

  def loss_and_grad(params, micro_batch):
    with sharding.tracing_mesh(mesh):
      return jax.value_and_grad(_objective_loss, has_aux=True)(params, micro_batch, model, config,
                                                               mesh, share)

  micro_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
  return optim.accumulate_gradients(loss_and_grad, params, dict(batch), accum_steps, micro_sharding)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
               config: ml_collections.ConfigDict, mesh: Mesh,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
  """One optimiser step on the global batch (pure; see `jit_train_step` for the compiled form)."""
  (loss, metrics), grads = loss_and_grads(state.params, batch, model=model, config=config, mesh=mesh)
  rules = optim.effective_lr_rules(config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = clamp_logit_scale(optax.apply_updates(state.params, updates))

  trainable = optim.trainable_mask(grads, rules)
  grad_norm = optax.tree.norm(jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if config.on_nan == 'skip':
    # A skipped step keeps the params and AdamW's moments and count, but the learning-rate
    # schedule still advances (as open_clip's scheduler does over an AMP-skipped step): the
    # schedule stays a function of the global step, which is what `learning_rate` logs.
    schedule_count = lambda x: isinstance(x, optax.ScaleByScheduleState)
    keep = lambda new, old: jax.tree.map(
        lambda n, o: n if schedule_count(n) else jnp.where(finite, n, o), new, old,
        is_leaf=schedule_count)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, param_norm=optax.tree.norm(params),
                 learning_rate=optim.make_schedule(config)(state.step),
                 skipped=jnp.logical_and(config.on_nan == 'skip', ~finite).astype(jnp.int32))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def jit_train_step(config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh,
                   state_shardings: TrainState):
  """The jitted step: state sharded as created, batch split over all devices on dim 0, metrics
  replicated, state donated (its buffers are reused for the new state)."""
  step = functools.partial(train_step, model=model, config=config, mesh=mesh,
                           tx=optim.make_optimizer(config))
  return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


make_train_step = jit_train_step


def abstract_batch(config: ml_collections.ConfigDict, model: nn.Module, batch_size: int | None = None
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of the step's batch for `config.objective` (for `lower_train_step`)."""
  batch_size = int(config.batch_size if batch_size is None else batch_size)
  clip = _clip_module(model)
  size = clip.image_size
  batch = {'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
           'tokens': jax.ShapeDtypeStruct((batch_size, clip.context_length), jnp.int32),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  if config.objective.name == 'cleanclip':
    batch['aug_image'] = batch['image']
    batch['aug_tokens'] = batch['tokens']
  return batch


def lower_train_step(config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh,
                     state_shardings: TrainState, state: Any, batch: Any) -> jax.stages.Lowered:
  """The lowered step for `state` / `batch` (arrays or ShapeDtypeStructs):
  `.compile().memory_analysis()` gives its per-device memory, `.compile().cost_analysis()` its FLOPs."""
  return jit_train_step(config, model, mesh, state_shardings).lower(state, batch)


def abstract_train_state(config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh
                         ) -> tuple[TrainState, TrainState]:
  """(ShapeDtypeStruct state, shardings) without allocating anything (for ahead-of-time lowering)."""
  tx = optim.make_optimizer(config)
  key = jax.random.PRNGKey(0)
  params = jax.eval_shape(functools.partial(_fresh_params, model, config), key)
  abstract = jax.eval_shape(
      lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), key), params)
  shardings = _state_shardings(abstract, _param_shardings(model, config, mesh), mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings
