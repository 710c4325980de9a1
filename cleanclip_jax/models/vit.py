"""The ViT image tower: conv patch embedding, class token, learned positions, ln_pre, pre-LN blocks,
ln_post on the class token, linear projection."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cleanclip_jax.models.transformer import Dtype, LayerNorm, Transformer, normal, partitioned


class VisionTransformer(nn.Module):
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  output_dim: int
  mlp_ratio: float = 4.0
  quick_gelu: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  attention: str = 'auto'
  pooled_last_block: bool = True  # the last block computes the class token's row only (see Transformer)

  @nn.compact
  def __call__(self, images):
    """images: float [B, H, W, 3] (CLIP-normalised) -> [B, output_dim] (not normalised)."""
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f'ViT tower expects {self.image_size}x{self.image_size} images, got {images.shape}')
    scale = self.width ** -0.5
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', use_bias=False,
                dtype=self.dtype, param_dtype=jnp.float32, name='conv1',
                kernel_init=partitioned(nn.initializers.lecun_normal(), None, None, None, 'embed'))(images)
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.width).astype(jnp.float32)
    cls = self.param('class_embedding', partitioned(normal(scale), 'embed'), (self.width,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)), x], axis=1)
    pos = self.param('positional_embedding', partitioned(normal(scale), None, 'embed'),
                     (x.shape[1], self.width))
    x = LayerNorm(name='ln_pre')(x + pos)
    x = Transformer(self.layers, self.heads, self.mlp_ratio, self.quick_gelu, causal=False,
                    remat=self.remat, dtype=self.dtype, attention=self.attention,
                    pooled_last_block=self.pooled_last_block,
                    name='transformer')(x, pool_at=jnp.zeros((batch,), jnp.int32))  # the class token
    x = LayerNorm(name='ln_post')(x)
    proj = self.param('proj', partitioned(normal(scale), 'embed', None), (self.width, self.output_dim))
    return jnp.dot(x.astype(self.dtype), proj.astype(self.dtype),
                   preferred_element_type=jnp.float32)
