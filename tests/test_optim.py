"""Schedule, weight-decay mask, lr rules / freezing and gradient accumulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cleanclip_jax import config as config_lib
from cleanclip_jax import models, optim


def _config(**changes):
  config = config_lib.base_config()
  config.learning_rate = 1e-2
  config.warmup_steps = 10
  config.total_steps = 110
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.weight_decay = 0.0
  config.update_from_flattened_dict(changes)  # {'optimizer.accum_steps': 2, ...}
  return config


def test_cosine_schedule_values():
  schedule = optim.make_schedule(_config())
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 5e-3, 1e-2], rtol=1e-6)
  np.testing.assert_allclose(schedule(60), 5e-3, rtol=1e-5)  # half-way through the cosine
  np.testing.assert_allclose([schedule(110), schedule(200)], [0.0, 0.0], atol=1e-9)


def test_constant_schedule_values():
  schedule = optim.make_schedule(_config(**{'optimizer.schedule': 'constant'}))
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(1000)],
                             [0.0, 5e-3, 1e-2, 1e-2], rtol=1e-6)
  no_warmup = optim.make_schedule(_config(warmup_steps=0, **{'optimizer.schedule': 'constant'}))
  np.testing.assert_allclose(no_warmup(0), 1e-2)


def test_weight_decay_mask_on_model_params():
  model = models.create_model('tiny-vit')
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                          jnp.zeros((1, 77), jnp.int32))
  params = models.unbox(shapes)['params']
  mask = {optim.path_str(p): m for p, m in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))}
  decayed = {k for k, m in mask.items() if m}
  not_decayed = set(mask) - decayed
  for name in ('visual/conv1/kernel', 'visual/proj', 'text/text_projection',
               'visual/transformer/resblocks_0/attn/query/kernel',
               'text/transformer/resblocks_0/mlp/c_fc/kernel'):
    assert name in decayed, name
  for name in ('logit_scale', 'visual/class_embedding', 'visual/positional_embedding',
               'text/positional_embedding', 'text/token_embedding/embedding', 'visual/ln_pre/scale',
               'visual/transformer/resblocks_0/attn/query/bias',  # a 2-d bias
               'text/transformer/resblocks_0/ln_1/bias'):
    assert name in not_decayed, name
  assert all(k.endswith(('kernel', 'proj', 'projection')) for k in decayed)


def _toy_params():
  rng = np.random.default_rng(0)
  return {'tower': {'kernel': jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)},
          'head': {'kernel': jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
                   'bias': jnp.zeros((2,), jnp.float32)}}


def _one_update(config, params, grads):
  tx = optim.make_optimizer(config)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_lr_rules_scale_and_freeze():
  params = _toy_params()
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.3, params)
  base = _config(warmup_steps=0, **{'optimizer.weight_decay': 0.1})
  plain, _ = _one_update(base, params, grads)
  ruled, state = _one_update(_config(warmup_steps=0, **{'optimizer.weight_decay': 0.1,
                                                          'optimizer.lr_rules': (('^tower/', 0.0),
                                                                                 ('bias$', 0.5))}),
                             params, grads)
  np.testing.assert_array_equal(ruled['tower']['kernel'], params['tower']['kernel'])
  np.testing.assert_allclose(ruled['head']['kernel'], plain['head']['kernel'], rtol=1e-6)
  np.testing.assert_allclose(ruled['head']['bias'] - params['head']['bias'],
                             0.5 * (plain['head']['bias'] - params['head']['bias']), rtol=1e-6)
  # The frozen tower has no AdamW moments: only the head's 3x2 + 2 entries, twice (mu, nu).
  moment_sizes = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert moment_sizes == 2 * (3 * 2 + 2)


def test_freeze_tower_rule_for_supervised():
  config = _config(**{'objective.name': 'supervised', 'objective.freeze_tower': True})
  assert optim.effective_lr_rules(config)[0] == ('^clip/', 0.0)
  labels = optim.param_labels({'clip': {'w': 0.0}, 'head': {'kernel': 0.0}}, optim.effective_lr_rules(config))
  assert labels == {'clip': {'w': 'frozen'}, 'head': {'kernel': 'trainable'}}
  with pytest.raises(ValueError, match='bad regex'):
    optim.effective_lr_rules(_config(**{'optimizer.lr_rules': (('(', 1.0),)}))


def test_supervised_finetuning_leaves_the_text_tower_alone():
  # The supervised loss never reaches the text tower, yet AdamW's weight decay shrank its kernels
  # every step (by 1 - lr * wd): a supervised checkpoint's zero-shot class embeddings moved.
  config = _config(**{'objective.name': 'supervised', 'optimizer.weight_decay': 0.1})
  params = {'clip': {'text': {'kernel': jnp.ones((2, 2))}, 'visual': {'kernel': jnp.ones((2, 2))},
                     'logit_scale': jnp.array(1.0)},
            'head': {'kernel': jnp.ones((2, 3))}}
  labels = optim.param_labels(params, optim.effective_lr_rules(config))
  assert labels == {'clip': {'text': {'kernel': 'frozen'}, 'visual': {'kernel': 'trainable'},
                             'logit_scale': 'frozen'}, 'head': {'kernel': 'trainable'}}
  tx = optim.make_optimizer(config)
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  grads['clip']['visual']['kernel'] = jnp.ones((2, 2))
  for _ in range(12):  # past the 10 warmup steps
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params['clip']['text']['kernel'], np.ones((2, 2)))
  assert float(params['clip']['logit_scale']) == 1.0
  assert float(jnp.abs(params['clip']['visual']['kernel'] - 1).max()) > 0  # the rest trains


def test_clipping_uses_global_norm():
  params = _toy_params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
  config = _config(warmup_steps=0, **{'optimizer.grad_clip_norm': 1.0, 'optimizer.b1': 0.0,
                                      'optimizer.b2': 0.0, 'optimizer.eps': 1.0})
  # With b1 = b2 = 0 and eps = 1 the step is lr * g / (|g| + 1): it shows the clipped g.
  new, _ = _one_update(config, params, grads)
  clipped = 100.0 / np.sqrt(sum(p.size for p in jax.tree.leaves(params)) * 100.0 ** 2)
  expected = 1e-2 * clipped / (clipped + 1.0)
  np.testing.assert_allclose(params['tower']['kernel'] - new['tower']['kernel'], expected, rtol=1e-4)


def test_accumulation_equals_full_batch_for_mean_losses():
  rng = np.random.default_rng(1)
  batch = {'x': jnp.asarray(rng.standard_normal((12, 4)), jnp.float32),
           'y': jnp.asarray(rng.standard_normal((12, 2)), jnp.float32)}
  params = {'w': jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)}

  def loss(params, batch):
    err = batch['x'] @ params['w'] - batch['y']
    value = jnp.mean(err ** 2)
    return value, {'loss': value}

  loss_and_grad = jax.value_and_grad(loss, has_aux=True)
  full = loss_and_grad(params, batch)
  for steps in (2, 3):
    accumulated = jax.jit(functools.partial(optim.accumulate_gradients, loss_and_grad, accum_steps=steps))(
        params, batch)
    np.testing.assert_allclose(accumulated[0][0], full[0][0], rtol=1e-5)
    np.testing.assert_allclose(accumulated[1]['w'], full[1]['w'], rtol=1e-5)
  micro = optim.split_micro_batches(batch, 3)
  np.testing.assert_array_equal(micro['x'][1], batch['x'][1::3])
