"""The sharded state and the jitted step on 8 emulated devices, with a 1-layer tiny model."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cleanclip_jax import config as config_lib
from cleanclip_jax import flops, models, sharding, text_length, text_packing, train_step

BATCH = 16
IMAGE = 32
CONTEXT = 16


def _clip_model(text_layers=1):
  return models.create_model('tiny-vit', vision_layers=1, text_layers=text_layers, vision_width=64,
                             vision_head_width=32, text_width=64, text_heads=2, embed_dim=32,
                             vocab_size=512, context_length=CONTEXT)


def _config(objective='clip', data=4, fsdp=2, **changes):
  config = config_lib.base_config()
  config.batch_size = BATCH
  config.warmup_steps = 0
  config.learning_rate = 1e-3
  config.objective.name = objective
  config.mesh.data, config.mesh.fsdp = data, fsdp
  config.update_from_flattened_dict(changes)  # {'optimizer.accum_steps': 2, ...}
  return config


def _mesh(config):
  count = config.mesh.data * config.mesh.fsdp
  return sharding.make_mesh(config.mesh, jax.devices()[:count])


def _host_batch(seed=0, labels=4):
  rng = np.random.default_rng(seed)
  batch = {'image': rng.integers(0, 256, (BATCH, IMAGE, IMAGE, 3), dtype=np.uint8),
           'tokens': rng.integers(1, 500, (BATCH, CONTEXT)).astype(np.int32),
           'label': rng.integers(0, labels, BATCH).astype(np.int32)}
  batch['aug_image'] = np.flip(batch['image'], axis=2).copy()
  batch['aug_tokens'] = np.roll(batch['tokens'], 1, axis=1)
  return batch


def _grads_on_mesh(config, model, host_params, host_batch):
  mesh = _mesh(config)
  state, shardings = train_step.create_train_state(config, model, mesh, jax.random.PRNGKey(0),
                                                   init_params=host_params)
  fn = jax.jit(functools.partial(train_step.loss_and_grads, model=model, config=config, mesh=mesh),
               in_shardings=(shardings.params, sharding.batch_sharding(mesh)))
  (loss, _), grads = fn(state.params, sharding.host_batch_to_global(host_batch, mesh))
  return float(loss), jax.device_get(grads), state


def test_loss_and_grads_do_not_depend_on_the_mesh():
  model = _clip_model()
  config = _config('cleanclip', 1, 1)
  mesh = _mesh(config)
  state, _ = train_step.create_train_state(config, model, mesh, jax.random.PRNGKey(0))
  host_params = jax.device_get(state.params)
  batch = _host_batch()
  reference_loss, reference_grads, _ = _grads_on_mesh(config, model, host_params, batch)
  for data, fsdp, impl in ((8, 1, 'gather'), (4, 2, 'ring')):
    config = _config('cleanclip', data, fsdp)
    config.objective.sharded_loss_impl = impl  # not yet a base_config key; the step reads it with .get
    loss, grads, sharded_state = _grads_on_mesh(config, model, host_params, batch)
    np.testing.assert_allclose(loss, reference_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5), grads, reference_grads)
  # On the 4x2 mesh the big kernels really are split over fsdp (state created sharded).
  kernel = sharded_state.params['text']['transformer']['resblocks_0']['mlp']['c_fc']['kernel']
  assert kernel.sharding.spec[0] == 'fsdp'
  assert kernel.addressable_shards[0].data.shape == (32, 256)


def test_siglip_step_updates_and_skips_non_finite_batches():
  model = _clip_model()
  config = _config('siglip', on_nan='skip')
  mesh = _mesh(config)
  state, shardings = train_step.create_train_state(config, model, mesh, jax.random.PRNGKey(0))
  np.testing.assert_allclose(state.params['logit_bias'], -10.0)
  np.testing.assert_allclose(state.params['logit_scale'], np.log(10.0), rtol=1e-6)
  step_fn = train_step.make_train_step(config, model, mesh, shardings)
  # Float images go through the same on-device normalisation; they let a NaN into the batch.
  batch = _host_batch()
  batch['image'] = batch['image'].astype(np.float32)
  before = jax.device_get(state.params)
  state, metrics = step_fn(state, sharding.host_batch_to_global(batch, mesh))
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics['loss']) and metrics['skipped'] == 0 and int(state.step) == 1
  for key in ('siglip_loss', 'logit_scale', 'logit_bias', 'grad_norm', 'param_norm', 'learning_rate'):
    assert key in metrics, key
  np.testing.assert_allclose(metrics['learning_rate'], 1e-3, rtol=1e-6)
  after = jax.device_get(state.params)
  assert not np.allclose(after['visual']['proj'], before['visual']['proj'])
  assert after['logit_bias'] != before['logit_bias']

  batch['image'][3, 0, 0, 0] = np.nan
  state, metrics = step_fn(state, sharding.host_batch_to_global(batch, mesh))
  metrics = jax.device_get(metrics)
  assert not np.isfinite(metrics['loss']) and metrics['skipped'] == 1 and int(state.step) == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), after)
  # AdamW's count stays (its moments did not move); the schedule's follows the global step, so
  # the logged learning rate is the one the next update uses.
  is_count = lambda x: isinstance(x, (optax.ScaleByScheduleState, optax.ScaleByAdamState))
  counts = {type(node).__name__: int(node.count)
            for node in jax.tree.leaves(state.opt_state, is_leaf=is_count) if is_count(node)}
  assert counts == {'ScaleByAdamState': 1, 'ScaleByScheduleState': 2}


def test_supervised_frozen_tower_with_accumulation_only_moves_the_head():
  clip = _clip_model()
  clip_config = _config('clip')
  mesh = _mesh(clip_config)
  clip_state, _ = train_step.create_train_state(clip_config, clip, mesh, jax.random.PRNGKey(1))
  clip_params = jax.device_get(clip_state.params)

  config = _config('supervised', **{'objective.num_classes': 4, 'objective.freeze_tower': True,
                                    'optimizer.accum_steps': 2})
  model = models.ImageClassifier(clip, 4)
  # Finetuning from a CLIP tree: wrapped under 'clip', a fresh zero head, a fresh optimiser state.
  state, shardings = train_step.create_train_state(config, model, mesh, jax.random.PRNGKey(0),
                                                   init_params=clip_params)
  assert int(state.step) == 0
  np.testing.assert_array_equal(state.params['head']['kernel'], 0.0)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params['clip']), clip_params)
  step_fn = train_step.make_train_step(config, model, mesh, shardings)
  state, metrics = step_fn(state, sharding.host_batch_to_global(_host_batch(), mesh))
  assert np.isfinite(float(metrics['loss'])) and 'accuracy' in metrics
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params['clip']), clip_params)
  assert np.abs(np.asarray(state.params['head']['kernel'])).max() > 0


@pytest.mark.parametrize('unlabelled', [False, True])
def test_accumulated_grads_equal_full_batch_grads_for_supervised(unlabelled):
  clip = _clip_model()
  model = models.ImageClassifier(clip, 4)
  # One device: the math of the scan (the sharded layout is exercised by the test above).
  config = _config('supervised', 1, 1, **{'objective.num_classes': 4})
  mesh = _mesh(config)
  state, _ = train_step.create_train_state(config, model, mesh, jax.random.PRNGKey(0))
  # A non-zero head so the tower gets gradients too.
  params = jax.device_get(state.params)
  params['head']['kernel'] = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
  batch = {k: v for k, v in _host_batch().items() if k in ('image', 'label')}
  if unlabelled:
    # Micro-batches are strided (rows k, k + 2, ...): leave one labelled row among the odd rows,
    # so the two micro-batches' means average over very different numbers of rows.
    batch['label'][3::2] = -1
  full_loss, full_grads, _ = _grads_on_mesh(config, model, params, batch)
  accumulated = _config('supervised', 1, 1, **{'objective.num_classes': 4, 'optimizer.accum_steps': 2})
  loss, grads, _ = _grads_on_mesh(accumulated, model, params, batch)
  np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-6), grads, full_grads)


def test_init_params_errors_name_the_path():
  model = _clip_model()
  config = _config('clip', 8, 1)
  mesh = _mesh(config)
  abstract, _ = train_step.abstract_train_state(config, model, mesh)
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract.params)
  params['visual']['proj'] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match="visual/proj"):
    train_step.create_train_state(config, model, mesh, jax.random.PRNGKey(0), init_params=params)
  del params['visual']['proj']
  with pytest.raises(ValueError, match='missing'):
    train_step.create_train_state(config, model, mesh, jax.random.PRNGKey(0), init_params=params)


@pytest.mark.parametrize('pooled', [False, True])
def test_flops_match_xla_cost_analysis(pooled):
  # The model's count against the step that computes every row; the executed count against the
  # pooled step (the default).
  model = _clip_model().clone(pooled_last_block=pooled)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, IMAGE, IMAGE, 3)),
                             jnp.zeros((1, CONTEXT), jnp.int32))
  params = models.unbox(variables)['params']
  images = jax.ShapeDtypeStruct((2, IMAGE, IMAGE, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((2, CONTEXT), jnp.int32)
  image_cost = jax.jit(lambda p, x: model.apply({'params': p}, x, method=model.encode_image)).lower(
      params, images).compile().cost_analysis()['flops'] / 2
  text_cost = jax.jit(lambda p, t: model.apply({'params': p}, t, method=model.encode_text)).lower(
      params, tokens).compile().cost_analysis()['flops'] / 2
  # XLA also counts elementwise work (norms, softmax, GELU): the matmul count is a bit lower.
  assert 0.75 < flops.image_forward_flops(model.config, executed=pooled) / image_cost <= 1.0
  text = model.config.text
  assert 0.75 < flops.text_forward_flops(text, model.config.embed_dim, executed=pooled) / text_cost <= 1.0
  if pooled:  # and the full count would be above XLA's for the pooled step
    assert flops.text_forward_flops(text, model.config.embed_dim) > text_cost


def _short_caption_case(model, objective, seed, eot_range):
  """(4x2-mesh config, host params, batch) whose captions end (EOT, the vocabulary's largest id)
  at `eot_range` (low inclusive, high exclusive), zeros after."""
  config = _config(objective, 4, 2)
  state, _ = train_step.create_train_state(config, model, _mesh(config), jax.random.PRNGKey(0))
  batch = _host_batch()
  rng = np.random.default_rng(seed)
  for key in ('tokens', 'aug_tokens'):
    eot = rng.integers(*eot_range, BATCH)
    batch[key] = np.where(np.arange(CONTEXT) < eot[:, None], batch[key], 0).astype(np.int32)
    batch[key][np.arange(BATCH), eot] = model.config.text.vocab_size - 1
  return config, jax.device_get(state.params), batch


@pytest.mark.parametrize('objective', ['clip', 'cleanclip'])
def test_cut_tokens_give_the_same_loss_and_grads(objective):
  # Columns after every row's EOT never reach the features (causal mask, EOT pooling), so the
  # trainer's `data.token_bucket` cut changes nothing but the work.
  model = _clip_model()
  config, host_params, batch = _short_caption_case(model, objective, seed=1, eot_range=(2, 7))
  cut = text_length.trim_tokens(batch, bucket=4)
  assert cut['tokens'].shape == (BATCH, 8)
  loss, grads, _ = _grads_on_mesh(config, model, host_params, batch)
  cut_loss, cut_grads, _ = _grads_on_mesh(config, model, host_params, cut)
  np.testing.assert_allclose(cut_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), cut_grads, grads)
  # The positions the cut removes get no gradient in the full batch either.
  positional = grads['text']['positional_embedding']
  assert not positional[8:].any() and positional[:7].any()


@pytest.mark.parametrize('objective', ['clip', 'cleanclip'])
def test_packed_captions_give_the_same_loss_and_grads(objective):
  # Captions packed several to a row (`data.pack_captions`), each device's own captions in its own
  # rows, attention kept within each caption: the same loss and gradients as one caption a row.
  # Two text blocks, so both the packed blocks and the pooled last block run.
  model = _clip_model(text_layers=2)
  config, host_params, batch = _short_caption_case(model, objective, seed=2, eot_range=(1, 8))
  packed = text_packing.pack_tokens(batch, shards=8)
  assert packed['tokens_packed'].shape == (8, CONTEXT)  # 2 captions a device, in one row
  assert (packed['tokens_segments'].max(axis=1) == 2).all()
  loss, grads, _ = _grads_on_mesh(config, model, host_params, batch)
  packed_loss, packed_grads, _ = _grads_on_mesh(config, model, host_params, packed)
  np.testing.assert_allclose(packed_loss, loss, rtol=1e-6)
  # Float rounding only (sums in another order: e.g. the positional embedding's gradient is now a
  # scatter-add over the packed positions).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), packed_grads, grads)


def test_text_flops_at_a_cut_length_match_xla_cost_analysis():
  model = _clip_model().clone(pooled_last_block=False)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, IMAGE, IMAGE, 3)),
                             jnp.zeros((1, CONTEXT), jnp.int32))
  params = models.unbox(variables)['params']
  text = model.config.text
  ratios = []
  for length in (8, CONTEXT):
    tokens = jax.ShapeDtypeStruct((2, length), jnp.int32)
    cost = jax.jit(lambda p, t: model.apply({'params': p}, t, method=model.encode_text)).lower(
        params, tokens).compile().cost_analysis()['flops'] / 2
    ratios.append(flops.text_forward_flops(text, model.config.embed_dim, length=length) / cost)
  assert all(0.75 < r <= 1.0 for r in ratios), ratios
  assert flops.text_forward_flops(text, model.config.embed_dim, length=CONTEXT) == \
      flops.text_forward_flops(text, model.config.embed_dim)


@pytest.mark.parametrize('data,fsdp', [(1, 8), (4, 2)])
def test_fsdp_moves_weights_not_the_text_towers_activations(data, fsdp):
  # FSDP gathers weights per layer; activations stay split over the batch. Before the text
  # tower's input was pinned to the batch split (sharding.split_over_batch, lookup_layouts), XLA
  # split the tower's activations along `embed` like the embedding table, and gathered or summed
  # the whole global batch's token rows in every block: collectives of shape [B, L, ...] or
  # [B * L, ...]. Tokens of 12 columns make those dims unlike any weight's.
  length = 12
  model = _clip_model(text_layers=2)
  config = _config('clip', data, fsdp)
  mesh = _mesh(config)
  state, shardings = train_step.create_train_state(config, model, mesh, jax.random.PRNGKey(0))
  host = _host_batch()
  host = {'image': host['image'], 'tokens': host['tokens'][:, :length]}
  host['tokens'][:, -1] = 511  # EOT: the largest id
  step = train_step.make_train_step(config, model, mesh, shardings)
  hlo = step.lower(state, sharding.host_batch_to_global(host, mesh)).compile().as_text()
  collectives = re.findall(r'= (.*?) (?:all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)'
                           r'(?:-start)?\(', hlo)
  assert collectives  # the weights are gathered
  for result in collectives:
    # Float results only: the token ids themselves may be gathered (int32, 1/width of the rows).
    for dims in re.findall(r'(?:f32|bf16|f16)\[([\d,]*)\]', result):
      dims = [int(d) for d in dims.split(',') if d]
      assert BATCH * length not in dims, result
      assert not any(dims[i:i + 2] == [BATCH, length] for i in range(len(dims))), result
