"""The text tower: token + positional embedding, causal pre-LN blocks, final LN, the features at the
EOT token (the largest id in each row), linear projection. It also takes captions packed several
to a row (`PackedTokens`, made by `text_packing`): the same features for fewer rows."""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from cleanclip_jax import sharding
from cleanclip_jax.models.transformer import Dtype, LayerNorm, Transformer, normal, partitioned


@flax.struct.dataclass
class PackedTokens:
  """Captions packed several to a row (layout in `text_packing`'s docstring): token ids, positions
  within the caption and segment ids [S * R, T]; each caption's EOT as a flat index into its
  group of R rows, [S, N]. The tower returns the N captions of each group in order: [S * N, ...]."""
  tokens: jax.Array
  positions: jax.Array
  segments: jax.Array
  eot: jax.Array


class TextTransformer(nn.Module):
  context_length: int
  vocab_size: int
  width: int
  layers: int
  heads: int
  output_dim: int
  mlp_ratio: float = 4.0
  quick_gelu: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  attention: str = 'auto'
  pooled_last_block: bool = True  # the last block computes the EOT row only (see Transformer)

  @nn.compact
  def __call__(self, tokens):
    """tokens: int [B, L] with L <= context_length, or `PackedTokens` of B captions
    -> [B, output_dim] (not normalised)."""
    packed = isinstance(tokens, PackedTokens)
    ids = tokens.tokens if packed else tokens
    length = ids.shape[-1]
    if length > self.context_length:
      raise ValueError(f'text tower has context length {self.context_length}, got tokens {ids.shape}')
    # Looked up where each device's slice of the FSDP-split table serves it, then split over the
    # batch like the other activations (no-ops unless traced under sharding.tracing_mesh).
    layouts = sharding.lookup_layouts(self.width)
    if layouts:
      ids = jax.lax.with_sharding_constraint(ids, layouts[0])
    x = nn.Embed(self.vocab_size, self.width, dtype=jnp.float32, param_dtype=jnp.float32,
                 embedding_init=partitioned(normal(0.02), 'vocab', 'embed'),
                 name='token_embedding')(ids)
    if layouts:
      x = jax.lax.with_sharding_constraint(x, layouts[1])
    pos = self.param('positional_embedding', partitioned(normal(0.01), None, 'embed'),
                     (self.context_length, self.width))
    if packed:
      x = x + jnp.take(pos, tokens.positions, axis=0)
      eot, segments = tokens.eot, tokens.segments
    else:
      x = x + pos[:length]
      # The EOT token has the largest id, so argmax finds it (CLIP's convention).
      eot, segments = jnp.argmax(tokens, axis=-1), None
    x = sharding.split_over_batch(x)
    x = Transformer(self.layers, self.heads, self.mlp_ratio, self.quick_gelu, causal=True,
                    remat=self.remat, dtype=self.dtype, attention=self.attention,
                    pooled_last_block=self.pooled_last_block, name='transformer')(
                        x, pool_at=eot, segments=segments)
    x = LayerNorm(name='ln_final')(x)  # per row: the same before or after pooling
    proj = self.param('text_projection', partitioned(normal(self.width ** -0.5), 'embed', None),
                      (self.width, self.output_dim))
    return jnp.dot(x.astype(self.dtype), proj.astype(self.dtype),
                   preferred_element_type=jnp.float32)
