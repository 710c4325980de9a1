"""CLIP model zoo: shapes, normalisation, named configs, mixed precision, remat, partitioning."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleanclip_jax import models

# rbg keys: threefry random-init graphs take several times longer to compile on CPU.
KEY = functools.partial(jax.random.key, impl='rbg')

# Parameter counts of open_clip's models with the same names (sum of numel over parameters).
OPEN_CLIP_PARAMS = {
    'RN50': 102_007_137, 'RN101': 119_688_033, 'RN50x4': 178_300_601,
    'ViT-B-32': 151_277_313, 'ViT-B-16': 149_620_737, 'ViT-L-14': 427_616_513,
}


def _inputs(model, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, model.image_size, model.image_size, 3)).astype(np.float32)
  tokens = np.zeros((batch, model.context_length), np.int32)
  for row in range(batch):
    length = 3 + row
    tokens[row, 0] = 49406
    tokens[row, 1:length] = rng.integers(1, 49000, length - 1)
    tokens[row, length] = 49407
  return jnp.asarray(images), jnp.asarray(tokens)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(models.unbox(tree)))


def _abstract_init(model):
  images, tokens = _inputs(model, batch=1)
  return jax.eval_shape(model.init, KEY(0), images, tokens)


# The tiny configs with fewer blocks: compile time dominates these tests on CPU.
SMALL = {'tiny-vit': dict(vision_layers=2, text_layers=1), 'tiny-rn': dict(text_layers=1)}


@functools.lru_cache(maxsize=None)
def _build(name, **kwargs):
  model = models.create_model(name, **SMALL[name], **kwargs)
  images, tokens = _inputs(model)
  variables = jax.jit(model.init)(KEY(0), images[:1], tokens[:1])
  return model, models.unbox(variables)['params'], variables


@pytest.fixture(scope='module', params=['tiny-vit', 'tiny-rn'])
def built(request):
  return _build(request.param)


def test_forward_shapes_and_normalisation(built):
  model, params, _ = built
  images, tokens = _inputs(model)
  img, txt, logit_scale = jax.jit(model.apply)({'params': params}, images, tokens)
  assert img.shape == txt.shape == (2, model.embed_dim)
  assert img.dtype == txt.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(logit_scale, np.log(1 / 0.07), rtol=1e-6)
  # Different inputs give different features (the towers are not constant).
  assert np.abs(np.asarray(img[0] - img[1])).max() > 1e-4
  assert np.abs(np.asarray(txt[0] - txt[1])).max() > 1e-4
  unnormalised = model.apply({'params': params}, images, normalize=False, method=model.encode_image)
  np.testing.assert_allclose(unnormalised / np.linalg.norm(unnormalised, axis=-1, keepdims=True), img,
                             atol=1e-5)


def test_text_features_come_from_the_eot_position(built):
  model, params, _ = built
  _, tokens = _inputs(model)
  encode = jax.jit(lambda t: model.apply({'params': params}, t, method=model.encode_text))
  base = encode(tokens)
  after_eot = tokens.at[:, -1].set(5)  # causal mask: positions after EOT cannot change it...
  np.testing.assert_allclose(encode(after_eot), base, atol=1e-5)
  before_eot = tokens.at[:, 1].set(7)  # ...positions before it do
  assert np.abs(np.asarray(encode(before_eot) - base)).max() > 1e-4


def test_partition_specs_cover_every_param(built):
  _, _, variables = built
  boxed = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxed and all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
  for leaf in boxed:
    assert len(leaf.names) == leaf.value.ndim, leaf
    assert set(leaf.names) <= set(models.LOGICAL_AXES) | {None}, leaf.names
  specs = models.logical_specs(variables)
  assert len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))) == len(boxed)


@pytest.mark.parametrize('name', models.list_models())
def test_named_config_builds_abstractly(name):
  model = models.create_model(name)
  abstract = _abstract_init(model)
  count = _count(abstract)
  base = name.removesuffix('-quickgelu')
  if base in OPEN_CLIP_PARAMS:
    assert count == OPEN_CLIP_PARAMS[base]
  specs = nn.get_partition_spec(abstract)
  assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) \
      .num_leaves == len(jax.tree.leaves(models.unbox(abstract)))


def test_bench_vit_size():
  assert abs(_count(_abstract_init(models.create_model('bench-vit'))) - 22.3e6) < 0.1e6


def test_bf16_compute_matches_fp32():
  fp32, params, _ = _build('tiny-vit')
  bf16 = models.create_model('tiny-vit', dtype='bfloat16', **SMALL['tiny-vit'])
  images, tokens = _inputs(fp32)
  out32 = jax.jit(fp32.apply)({'params': params}, images, tokens)
  out16 = jax.jit(bf16.apply)({'params': params}, images, tokens)
  for a, b in zip(out32[:2], out16[:2]):
    assert b.dtype == jnp.float32 and np.isfinite(np.asarray(b)).all()
    cosine = np.sum(np.asarray(a) * np.asarray(b), axis=-1)
    assert (cosine > 0.99).all(), cosine
  # ... and the bf16 model did compute in bf16 (fp32 compute would pass the checks above).
  hlo = {name: jax.jit(model.apply).lower({'params': params}, images, tokens).as_text()
         for name, model in (('fp32', fp32), ('bf16', bf16))}
  assert 'bf16' in hlo['bf16'] and 'bf16' not in hlo['fp32']


@pytest.mark.parametrize('name,with_grads', [('tiny-vit', True), ('tiny-rn', False)])
def test_remat_gives_same_outputs(name, with_grads):
  plain, params, _ = _build(name)
  remat = models.create_model(name, remat=True, **SMALL[name])
  images, tokens = _inputs(plain)

  def loss(model, p):
    img, txt, scale = model.apply({'params': p}, images, tokens)
    return jnp.sum(jnp.exp(scale) * img @ txt.T * jnp.eye(2))

  # The remat model does rematerialise (the same outputs alone would not show it).
  jaxprs = {name: str(jax.make_jaxpr(functools.partial(loss, model))(params))
            for name, model in (('plain', plain), ('remat', remat))}
  assert 'remat' in jaxprs['remat'] and 'remat' not in jaxprs['plain']  # jax.checkpoint's primitive
  if not with_grads:  # compiling the ResNet backward pass twice costs more than it tests
    np.testing.assert_allclose(jax.jit(loss, static_argnums=0)(remat, params),
                               jax.jit(loss, static_argnums=0)(plain, params), rtol=1e-6)
    return
  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  (value_a, grads_a), (value_b, grads_b) = grad_fn(plain, params), grad_fn(remat, params)
  np.testing.assert_allclose(value_a, value_b, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads_a, grads_b)


def test_pooled_last_block_matches_every_row():
  # The default computes only the pooled row (class token, EOT) in each tower's last block; the
  # features and every gradient must be those of the full computation (what open_clip does).
  pooled, params, _ = _build('tiny-vit')
  assert pooled.pooled_last_block
  full = models.create_model('tiny-vit', pooled_last_block=False, **SMALL['tiny-vit'])
  images, tokens = _inputs(pooled, batch=4, seed=3)
  tokens = np.asarray(tokens).copy()
  tokens[3] = np.random.default_rng(4).integers(1, 49000, pooled.context_length)
  tokens[3, 0], tokens[3, -1] = 49406, 49407  # EOT at the last position
  tokens[2, 1:] = 0
  tokens[2, 1] = 49407  # EOT right after SOT
  tokens = jnp.asarray(tokens)

  def loss(model, p):
    img, txt, scale = model.apply({'params': p}, images, tokens)
    return jnp.sum(jnp.exp(scale) * img @ txt.T * jnp.arange(1.0, 17.0).reshape(4, 4))

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  (value_a, grads_a), (value_b, grads_b) = grad_fn(full, params), grad_fn(pooled, params)
  np.testing.assert_allclose(value_b, value_a, rtol=1e-6)
  for a, b in zip(jax.jit(full.apply)({'params': params}, images, tokens)[:2],
                  jax.jit(pooled.apply)({'params': params}, images, tokens)[:2]):
    np.testing.assert_allclose(b, a, atol=1e-6)
  scale = jax.tree.map(lambda g: float(np.max(np.abs(g))), grads_a)
  # atol relative to each leaf's largest entry, with a floor for the key biases, whose true
  # gradient is 0 (softmax ignores a constant per query): both sides are float noise (~3e-6).
  jax.tree.map(lambda a, b, m: np.testing.assert_allclose(b, a, atol=1e-4 * m + 1e-5),
               grads_a, grads_b, scale)


@pytest.mark.parametrize('causal', [False, True])
def test_fused_attention_matches_einsum_attention(causal):
  # The `jax.nn.dot_product_attention` path that model.attention=cudnn takes on a GPU, here with
  # XLA's implementation: odd lengths (padded by one position and masked) and even ones give the
  # einsum form's values and gradients.
  from cleanclip_jax.models import transformer
  for length in (7, 8):
    keys = jax.random.split(KEY(length), 3)
    q, k, v = (jax.random.normal(key, (2, length, 3, 8)) for key in keys)
    probe = jax.random.normal(KEY(9), (2, length, 3, 8))

    def loss(fn, q, k, v):
      return jnp.sum(fn(q, k, v) * probe)
    einsum = lambda q, k, v: transformer.einsum_attention(q, k, v, causal, jnp.float32)
    fused = lambda q, k, v: transformer.fused_attention(q, k, v, causal, 'xla')
    np.testing.assert_allclose(fused(q, k, v), einsum(q, k, v), atol=1e-6)
    grads_a = jax.grad(loss, argnums=(1, 2, 3))(einsum, q, k, v)
    grads_b = jax.grad(loss, argnums=(1, 2, 3))(fused, q, k, v)
    for a, b in zip(grads_a, grads_b):
      np.testing.assert_allclose(b, a, atol=1e-5)


def test_attention_setting():
  # 'auto' (the default) is the einsum form off a GPU: the same numbers as 'xla'.
  plain, params, _ = _build('tiny-vit')
  assert plain.attention == 'auto'
  explicit = models.create_model('tiny-vit', attention='xla', **SMALL['tiny-vit'])
  images, tokens = _inputs(plain)
  for a, b in zip(jax.jit(plain.apply)({'params': params}, images, tokens),
                  jax.jit(explicit.apply)({'params': params}, images, tokens)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='attention'):
    models.create_model('tiny-vit', attention='flash').init(KEY(0), images[:1], tokens[:1])


def test_image_classifier():
  clip, clip_params, _ = _build('tiny-vit')
  classifier = models.ImageClassifier(clip, num_classes=2)
  images, tokens = _inputs(clip)
  abstract = jax.eval_shape(classifier.init, KEY(0), images[:1])
  params = models.unbox(abstract)['params']
  assert set(params) == {'clip', 'head'}
  assert params['head']['kernel'].shape == (clip.embed_dim, 2)
  assert jax.tree.structure(params['clip']) == jax.tree.structure(clip_params)
  assert set(nn.get_partition_spec(abstract)['params']['head']['kernel']) == {'embed', 'classes'}
  # With a zero-shot head (exp(scale) * class embeddings) the logits are CLIP's similarities.
  img, txt, scale = jax.jit(clip.apply)({'params': clip_params}, images, tokens)
  head = {'kernel': np.exp(scale) * txt.T, 'bias': np.zeros(2, np.float32)}
  logits = jax.jit(classifier.apply)({'params': {'clip': clip_params, 'head': head}}, images)
  np.testing.assert_allclose(logits, np.exp(scale) * img @ txt.T, rtol=1e-5, atol=1e-5)


def test_overrides_and_errors():
  model = models.create_model('tiny-vit', context_length=16, image_size=64, vocab_size=1000)
  assert (model.context_length, model.image_size, model.vocab_size) == (16, 64, 1000)
  params = models.unbox(_abstract_init(model))['params']
  assert params['text']['positional_embedding'].shape == (16, 128)
  assert params['text']['token_embedding']['embedding'].shape == (1000, 128)
  assert params['visual']['positional_embedding'].shape == ((64 // 4) ** 2 + 1, 128)
  with pytest.raises(ValueError, match='unknown model'):
    models.create_model('ViT-Q-99')
  with pytest.raises(ValueError, match='unknown model override'):
    models.create_model('tiny-vit', image_sise=64)
  with pytest.raises(ValueError, match='dtype'):
    models.create_model('tiny-vit', dtype='float8')


def test_gelu_is_torchs_exact_gelu():
  # The erf form (faster on XLA:CPU than jax.nn.gelu's erfc form) must stay the exact GELU that
  # torch.nn.GELU() computes, in value and in gradient, tails included.
  torch = pytest.importorskip('torch')
  from cleanclip_jax.models import transformer
  x = np.concatenate([np.linspace(-9, 9, 3001), [-30.0, -5.5, 0.0, 5.5, 30.0]]).astype(np.float32)
  value = transformer.gelu(jnp.asarray(x))
  grad = jax.grad(lambda v: jnp.sum(transformer.gelu(v)))(jnp.asarray(x))
  reference = torch.tensor(x, requires_grad=True)
  torch.nn.functional.gelu(reference).sum().backward()
  np.testing.assert_allclose(value, torch.nn.functional.gelu(torch.tensor(x)).numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grad, reference.grad.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(value, jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
  assert not np.allclose(value, jax.nn.gelu(x, approximate=True), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_narrowing_dense_dot_is_the_plain_product_and_gradient(dtype, tol):
  # c_proj's dot on CPU: its own backward rule forms the weight gradient as (dy^T x)^T (the
  # orientation XLA:CPU's default dots run fastest); values and both gradients must stay those
  # of lax.dot_general, and calls outside its case (3-D rows, a widening layer) are plain.
  from cleanclip_jax.models import transformer
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((48, 64)), dtype)
  kernel = jnp.asarray(rng.standard_normal((64, 16)) / 8, dtype)
  dy = jnp.asarray(rng.standard_normal((48, 16)), dtype)
  dims = (((1,), (0,)), ((), ()))

  def loss(fn):
    return lambda x, kernel: jnp.vdot(fn(x, kernel, dims).astype(jnp.float32), dy.astype(jnp.float32))

  got = jax.jit(jax.value_and_grad(loss(transformer.narrowing_dense_dot), argnums=(0, 1)))(x, kernel)
  want = jax.jit(jax.value_and_grad(loss(jax.lax.dot_general), argnums=(0, 1)))(x, kernel)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol,
                               atol=tol * float(np.abs(np.asarray(w, np.float32)).max()))
  # The weight gradient in f64 (x^T dy): both orientations are that product.
  exact = np.asarray(x, np.float64).T @ np.asarray(dy, np.float64)
  np.testing.assert_allclose(np.asarray(got[1][1], np.float64), exact, rtol=tol, atol=tol * np.abs(exact).max())
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(transformer.narrowing_dense_dot), argnums=1))(x, kernel))
  assert 'custom_vjp_call' in jaxpr and 'optimization_barrier' in jaxpr
  for other in (x.reshape(4, 12, 64), jnp.ones((48, 8), dtype)):  # [B, T, I]; I < O: plain
    kern = kernel if other.ndim == 3 else jnp.ones((8, 16), dtype)
    d = (((other.ndim - 1,), (0,)), ((), ()))
    plain = jax.make_jaxpr(lambda a, b, d=d: transformer.narrowing_dense_dot(a, b, d))(other, kern)
    assert 'custom_vjp_call' not in str(plain)
