"""Mesh construction, partition rules and global batch assembly on 8 emulated devices."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from cleanclip_jax import sharding


def test_make_mesh_fills_and_is_auto():
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 2})
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert dict(sharding.make_mesh({'data': 2, 'fsdp': -1}).shape) == {'data': 2, 'fsdp': 4}
  assert dict(sharding.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1]).shape) == {'data': 1, 'fsdp': 1}


@pytest.mark.parametrize('mesh_config', [{'data': 3, 'fsdp': 1}, {'data': -1, 'fsdp': -1},
                                         {'data': 2, 'fsdp': 2}])
def test_make_mesh_rejects_bad_shapes(mesh_config):
  with pytest.raises(ValueError, match='mesh'):
    sharding.make_mesh(mesh_config)


def test_spec_rules():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4})
  # embed is preferred over mlp whatever the dimension order.
  assert sharding.spec_for((512, 256), ('mlp', 'embed'), mesh) == P(None, 'fsdp')
  # embed not divisible by 4 -> the next rule (mlp) takes the axis.
  assert sharding.spec_for((130, 512), ('embed', 'mlp'), mesh) == P(None, 'fsdp')
  # nothing divisible -> replicated.
  assert sharding.spec_for((130, 257), ('embed', 'mlp'), mesh) == P()
  # small tensors and unannotated ones are replicated.
  assert sharding.spec_for((64, 64), ('embed', 'mlp'), mesh) == P()
  assert sharding.spec_for((512, 512), None, mesh) == P()
  assert sharding.spec_for((3, 3, 64, 512), (None, None, 'conv_in', 'conv_out'), mesh) == P(None, None, None, 'fsdp')
  # No fsdp axis to shard over -> replicated.
  assert sharding.spec_for((512, 256), ('embed', 'mlp'), sharding.make_mesh({'data': 8, 'fsdp': 1})) == P()


def test_param_and_optimizer_state_shardings():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4})
  boxed = {'dense': {'kernel': nn.LogicallyPartitioned(jax.ShapeDtypeStruct((256, 1024), np.float32),
                                                       ('embed', 'mlp')),
                     'bias': jax.ShapeDtypeStruct((1024,), np.float32)}}
  shardings = sharding.param_shardings(boxed, mesh)
  assert shardings['dense']['kernel'].spec == P('fsdp')
  assert shardings['dense']['bias'].spec == P()
  params = nn.meta.unbox(boxed)
  opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
  opt_shardings = sharding.shardings_like_params(opt_state, params, shardings, mesh)
  mu = opt_shardings[0].mu
  assert mu['dense']['kernel'].spec == P('fsdp') and mu['dense']['bias'].spec == P()
  assert opt_shardings[0].count.spec == P()


def test_host_batch_to_global():
  mesh = sharding.make_mesh({'data': 4, 'fsdp': 2})
  batch = {'image': np.arange(16 * 2 * 2 * 3, dtype=np.uint8).reshape(16, 2, 2, 3),
           'label': np.arange(16, dtype=np.int32), 'index': np.arange(16, dtype=np.int64) + 7}
  out = sharding.host_batch_to_global(batch, mesh)
  for key, value in batch.items():
    assert out[key].shape == value.shape
    np.testing.assert_array_equal(np.asarray(out[key]), value)
    assert out[key].sharding.spec == P(('data', 'fsdp'))
    assert len(out[key].addressable_shards) == 8
    assert out[key].addressable_shards[0].data.shape[0] == 2
  assert out['index'].dtype == np.int32
  with pytest.raises(ValueError, match="batch\\['label'\\]"):
    sharding.host_batch_to_global({'label': np.arange(12)}, mesh)
