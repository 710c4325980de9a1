"""Pre-LN transformer pieces shared by the text tower, the ViT tower and ResNet attention pooling.

Mixed precision: parameters are float32; matmuls run in the compute `dtype`; the residual stream,
layer norms and the attention softmax stay float32 so bf16 compute does not drift from fp32
numerics more than the matmuls themselves require.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def partitioned(init: Callable, *names: str | None) -> Callable:
  """An initializer whose parameter carries logical axis names (see `sharding.py`)."""
  return nn.with_logical_partitioning(init, names)


def normal(std: float) -> Callable:
  return nn.initializers.normal(stddev=std)


def quick_gelu(x):
  """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x):
  """Exact GELU in torch.nn.GELU()'s own form, x / 2 (1 + erf(x / sqrt 2))."""
  # Not jax.nn.gelu(approximate=False): it goes through erfc, whose XLA:CPU expansion made the
  # forward and gradient 2.8x / 1.4x slower than erf's on the Zen 5 CPU (2.5-2.7% of the CLIP
  # step there; README, 'Performance').
  return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(2 ** -0.5, x.dtype)))


def activation(quick: bool) -> Callable:
  return quick_gelu if quick else gelu


ATTENTION_IMPLS = ('xla', 'cudnn', 'auto')


def LayerNorm(name: str) -> nn.LayerNorm:  # pylint: disable=invalid-name
  """LayerNorm computed and returned in float32 with torch's epsilon, whatever the compute dtype."""
  return nn.LayerNorm(
      epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
      scale_init=partitioned(nn.initializers.ones, 'norm'),
      bias_init=partitioned(nn.initializers.zeros, 'norm'))


def einsum_attention(q, k, v, causal: bool, dtype, mask=None):
  """softmax(q k^T) v for pre-scaled q [B, Q, H, D], k/v [B, K, H, D], softmax in float32.

  `mask` (bool, broadcastable to [B, H, Q, K]; True = attend) replaces the causal mask when given.
  """
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  if mask is None and causal:
    mask = jnp.tril(jnp.ones(logits.shape[-2:], bool))
  if mask is not None:
    # A finite minimum, not -inf: its exp is exactly 0 next to any real logit, and a row with
    # nothing to attend to (an empty packed column) stays finite.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def fused_attention(q, k, v, causal: bool, implementation: str):
  """The same through `jax.nn.dot_product_attention` ('cudnn': cuDNN's flash attention).

  cuDNN's kernel trains only on even sequence lengths (ViT's 197 tokens and the text's 77 are
  odd): an odd length is padded by one position that the sequence lengths mask out, then dropped.
  """
  q_len, kv_len = q.shape[1], k.shape[1]
  pad_q, pad_kv = q_len % 2, kv_len % 2
  lengths = {}
  if pad_q or pad_kv:
    q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, pad_kv), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad_kv), (0, 0), (0, 0)))
    lengths = {'query_seq_lengths': jnp.full((q.shape[0],), q_len, jnp.int32),
               'key_value_seq_lengths': jnp.full((q.shape[0],), kv_len, jnp.int32)}
  context = jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=causal,
                                         implementation=implementation, **lengths)
  return context[:, :q_len]


def _cudnn_applies(dtype, head_dim: int) -> bool:
  return (jax.default_backend() == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)


class MultiHeadAttention(nn.Module):
  """Multi-head attention with separate q/k/v projections (kernels [embed, heads, kv]).

  `out_features` lets ResNet attention pooling project to the embedding size in the same layer.
  `attention` picks the kernel, not the numbers: 'xla' spells softmax(q k^T) v out as einsums with
  a float32 softmax (any backend; what the parity tests check); 'cudnn' is cuDNN's fused flash
  attention (NVIDIA GPUs, bf16/fp16 compute), which never materialises the [heads, q, k] logits
  (1.27x on a ViT-B/16 training step on an H200, README 'Performance on a GPU'); 'auto' is
  'cudnn' where that applies (a GPU backend, 16-bit compute, head dim a multiple of 8 up to 128)
  and 'xla' elsewhere.
  """
  num_heads: int
  out_features: int | None = None
  in_std: float = 0.02
  out_std: float = 0.02
  dtype: Dtype = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, causal: bool = False, mask=None):
    """`mask` (bool [B, 1, Q, K], True = attend): an explicit mask instead of `causal` (queries
    that are a subset of the positions, packed captions); the einsum form computes it."""
    width = inputs_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'attention width {width} is not divisible by {self.num_heads} heads')
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f'attention={self.attention!r}: use one of {ATTENTION_IMPLS}')
    head_dim = width // self.num_heads

    def project(name, inputs):
      return nn.DenseGeneral(
          (self.num_heads, head_dim), dtype=self.dtype, param_dtype=jnp.float32, name=name,
          kernel_init=partitioned(normal(self.in_std), 'embed', 'heads', 'kv'),
          bias_init=partitioned(nn.initializers.zeros, 'heads', 'kv'))(inputs)

    q = project('query', inputs_q) * jnp.asarray(head_dim ** -0.5, self.dtype)
    k = project('key', inputs_kv)
    v = project('value', inputs_kv)
    context = None
    if mask is not None:
      # A pooled block's few query rows, or packed captions (not a mask cuDNN's kernel takes).
      context = einsum_attention(q, k, v, causal, self.dtype, mask)
    elif self.attention == 'cudnn':
      context = fused_attention(q, k, v, causal, 'cudnn')
    elif self.attention == 'auto' and _cudnn_applies(self.dtype, head_dim):
      try:
        context = fused_attention(q, k, v, causal, 'cudnn')
      except (NotImplementedError, RuntimeError) as error:  # at trace time: an older GPU or cuDNN
        logging.getLogger(__name__).warning('cuDNN attention unavailable (%s); using einsums', error)
    if context is None:
      context = einsum_attention(q, k, v, causal, self.dtype)
    return nn.DenseGeneral(
        self.out_features or width, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=partitioned(normal(self.out_std), 'heads', 'kv', 'embed'),
        bias_init=partitioned(nn.initializers.zeros, 'embed'), name='out')(context)


@jax.custom_vjp
def _rows_dot_narrowing(x, kernel):
  """x [R, I] @ kernel [I, O] for I > O, whose weight gradient is formed as (dy^T x)^T."""
  return jax.lax.dot_general(x, kernel, (((1,), (0,)), ((), ())))


def _rows_dot_narrowing_fwd(x, kernel):
  return _rows_dot_narrowing(x, kernel), (x, kernel)


def _rows_dot_narrowing_bwd(residuals, dy):
  x, kernel = residuals
  dx = jax.lax.dot_general(dy, kernel, (((1,), (1,)), ((), ())))  # [R, I], as JAX's own rule
  # The weight gradient, summed over the R rows: JAX's rule asks for x^T dy, an [I, O] product
  # whose left operand is contracted over its major dimension, which XLA:CPU's default dots leave
  # to Eigen; for I > O Eigen runs it at ~105 GFLOP/s, and the same product computed as
  # dy^T x ([O, I]) at ~190 ([4160, 1024] rows: 21 vs 11.7 ms, the transpose included; README,
  # 'Performance'). The barrier stops XLA folding the transpose back into the dot.
  dkernel = jax.lax.optimization_barrier(
      jax.lax.dot_general(dy, x, (((0,), (0,)), ((), ())))).T
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_rows_dot_narrowing.defvjp(_rows_dot_narrowing_fwd, _rows_dot_narrowing_bwd)


def narrowing_dense_dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`nn.Dense`'s dot_general for a layer on token rows ([R, I] -> [R, O], I > O) on CPU: the same
  product, its weight gradient computed in the orientation XLA:CPU's dots run fastest. Any other
  call (another rank, a precision, a wider output) is plain `lax.dot_general`."""
  narrowing_rows = (lhs.ndim == 2 and rhs.ndim == 2 and dimension_numbers == (((1,), (0,)), ((), ()))
                    and precision is None and preferred_element_type is None
                    and rhs.shape[0] > rhs.shape[1])
  if not narrowing_rows:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  return _rows_dot_narrowing(lhs, rhs)


class MLP(nn.Module):
  hidden: int
  quick_gelu: bool = False
  fc_std: float = 0.02
  proj_std: float = 0.02
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # On token rows ([B * T, W], a reshape only): for a Dense on [B, T, W] JAX's gradient rule
    # hands the weight gradient the output gradient transposed to [W, B * T], which XLA keeps as
    # a copy and passes to the CPU's oneDNN matmul with both operands transposed, a form it runs
    # at ~65 GFLOP/s once B * T passes ~4,000 rows (on [B, T, W] the CLIP step took 2-5% longer;
    # README, 'Performance').
    shape = x.shape
    width = shape[-1]
    x = x.reshape(-1, width)
    x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32, name='c_fc',
                 kernel_init=partitioned(normal(self.fc_std), 'embed', 'mlp'),
                 bias_init=partitioned(nn.initializers.zeros, 'mlp'))(x)
    x = activation(self.quick_gelu)(x)
    # On CPU c_proj's weight gradient goes through `narrowing_dense_dot` (the CLIP step 5-6% faster
    # with XLA's default dots); elsewhere the kernels take either orientation alike.
    x = nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name='c_proj',
                 kernel_init=partitioned(normal(self.proj_std), 'mlp', 'embed'),
                 bias_init=partitioned(nn.initializers.zeros, 'embed'),
                 dot_general=narrowing_dense_dot if jax.default_backend() == 'cpu' else None)(x)
    return x.reshape(shape)


def attention_mask(length: int | None, kv_length: int, causal: bool, query_positions=None,
                   segments=None):
  """The explicit [B, 1, Q, K] attention mask for queries at `query_positions` (int [B, Q]; None:
  every one of `length` positions) and/or `segments` (int [B, K]); None when neither is given
  (`causal` alone is the plain lower triangle, which the attention kernels build themselves)."""
  if query_positions is None and segments is None:
    return None
  keys = jnp.arange(kv_length)
  queries = keys[None, :length] if query_positions is None else query_positions  # [B or 1, Q]
  # Not causal (ViT's pooled block): all True, which still selects the einsum form, right for a
  # few query rows.
  mask = keys[None, None, :] <= queries[:, :, None] if causal else jnp.ones((1, 1, kv_length), bool)
  if segments is not None:
    query_segments = segments if query_positions is None else jnp.take_along_axis(
        segments, query_positions, axis=1)
    mask = mask & (query_segments[:, :, None] == segments[:, None, :])
  return mask[:, None]


class ResidualAttentionBlock(nn.Module):
  """x + attn(ln_1(x)); x + mlp(ln_2(x)). The residual stream is float32."""
  num_heads: int
  mlp_ratio: float = 4.0
  quick_gelu: bool = False
  causal: bool = False
  num_layers: int = 12  # of the whole stack, for the init scale of the output projections
  dtype: Dtype = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x, query_positions=None, segments=None):
    """x [B, T, W] -> [B, T, W]; with `query_positions` (int [B] or [B, Q]) -> [B, W] or
    [B, Q, W], the output rows at those positions only (every position still serves as key and
    value). `segments` (int [B, T]): a position attends only to positions of its own segment
    (packed captions, see `text_packing`)."""
    width = x.shape[-1]
    attn_std = width ** -0.5
    proj_std = attn_std * (2 * self.num_layers) ** -0.5
    h = LayerNorm(name='ln_1')(x)
    h_q = h
    one_query = query_positions is not None and query_positions.ndim == 1
    if one_query:
      query_positions = query_positions[:, None]  # [B, 1]
    if query_positions is not None:
      x = jnp.take_along_axis(x, query_positions[:, :, None], axis=1)  # [B, Q, W]
      h_q = jnp.take_along_axis(h, query_positions[:, :, None], axis=1)
    mask = attention_mask(x.shape[1] if query_positions is None else None, h.shape[1],
                          self.causal, query_positions, segments)
    h = MultiHeadAttention(self.num_heads, in_std=attn_std, out_std=proj_std, dtype=self.dtype,
                           attention=self.attention, name='attn')(h_q, h, causal=self.causal,
                                                                 mask=mask)
    x = x + h.astype(jnp.float32)
    h = LayerNorm(name='ln_2')(x)
    h = MLP(int(width * self.mlp_ratio), self.quick_gelu, fc_std=(2 * width) ** -0.5,
            proj_std=proj_std, dtype=self.dtype, name='mlp')(h)
    x = x + h.astype(jnp.float32)
    return x[:, 0] if one_query else x


class Transformer(nn.Module):
  """A stack of `layers` blocks named resblocks_0..N-1; `remat` recomputes each block's
  activations in the backward pass (memory for FLOPs).

  `__call__(x, pool_at=None, segments=None)`: x [B, T, W] -> [B, T, W]; with `pool_at` (int [B],
  the position each sequence is pooled at) -> [B, W], that position's output only. Packed
  sequences (`text_packing`): `segments` (int [S * R, T]) keeps attention within each segment, and
  `pool_at` (int [S, N]) indexes the N pooled positions of each group of R rows flattened
  (R * T positions) -> [S * N, W]. With `pooled_last_block` the last
  block computes just that row (its query, attention output and MLP for 1 of the T rows; every
  row still feeds it through attention); otherwise every row is computed and the pooled one
  taken after. The pooled row is the same function of the inputs either way, so towers that pool
  one token (ViT: the class token, text: EOT) lose nothing, and a 6-layer tower runs ~14% fewer
  FLOPs.
  """
  layers: int
  num_heads: int
  mlp_ratio: float = 4.0
  quick_gelu: bool = False
  causal: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  attention: str = 'auto'
  pooled_last_block: bool = True

  @nn.compact
  def __call__(self, x, pool_at=None, segments=None):
    block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
    pool_in_block = pool_at is not None and self.pooled_last_block and self.layers > 0
    packed = segments is not None
    if packed and (pool_at is None or pool_at.ndim != 2):
      raise ValueError('packed sequences (segments) need pool_at of shape [groups, pooled]')

    def grouped(x, segments):
      # A group's rows as one sequence: each pooled query sees its own segment's positions, which
      # lie in one row, and nothing else.
      groups = pool_at.shape[0]
      return (x.reshape(groups, -1, x.shape[-1]), segments.reshape(groups, -1))

    for i in range(self.layers):
      last = pool_in_block and i == self.layers - 1
      layer = block(self.num_heads, self.mlp_ratio, self.quick_gelu, self.causal, self.layers,
                    self.dtype, self.attention, name=f'resblocks_{i}')
      if last and packed:
        x_groups, segment_groups = grouped(x, segments)
        x = layer(x_groups, pool_at, segment_groups)  # [S, N, W]
      elif last:
        x = layer(x, pool_at)
      else:
        x = layer(x, None, segments)
    if pool_at is not None and not pool_in_block:
      if packed:
        x = jnp.take_along_axis(grouped(x, segments)[0], pool_at[:, :, None], axis=1)
      else:
        x = jnp.take_along_axis(x, pool_at[:, None, None], axis=1)[:, 0]
    if packed:
      x = x.reshape(-1, x.shape[-1])  # [S * N, W]
    return x
