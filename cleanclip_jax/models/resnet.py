"""OpenAI's ModifiedResNet image tower: a 3-conv stem with average pooling, anti-aliased bottlenecks
(an average pool before every strided step instead of a strided conv) and attention pooling.

BatchNorm is a frozen per-channel affine (`FrozenBatchNorm`): imported checkpoints have their
running statistics folded into it (exact in eval mode) and the model needs no mutable
`batch_stats` collection, so every model is `{'params': ...}` for the trainer. From scratch, each
bottleneck's last affine starts at zero (the residual branch starts as the identity), which keeps
the un-normalised network trainable.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from cleanclip_jax.models.transformer import Dtype, MultiHeadAttention, normal, partitioned


class FrozenBatchNorm(nn.Module):
  """y = x * scale + bias per channel (a BatchNorm with its statistics folded in)."""
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param('scale', partitioned(self.scale_init, 'norm'), (channels,))
    bias = self.param('bias', partitioned(nn.initializers.zeros, 'norm'), (channels,))
    return x * scale.astype(x.dtype) + bias.astype(x.dtype)


def _conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name,
                 kernel_init=partitioned(nn.initializers.variance_scaling(2.0, 'fan_in', 'normal'), None, None, 'conv_in', 'conv_out'))


def _avg_pool(x, size: int):
  return nn.avg_pool(x, (size, size), strides=(size, size)) if size > 1 else x


class Bottleneck(nn.Module):
  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x):
    out_channels = self.planes * self.expansion
    out = nn.relu(FrozenBatchNorm(name='bn1')(_conv(self.planes, 1, self.dtype, 'conv1')(x)))
    out = nn.relu(FrozenBatchNorm(name='bn2')(_conv(self.planes, 3, self.dtype, 'conv2')(out)))
    out = _avg_pool(out, self.stride)
    out = FrozenBatchNorm(nn.initializers.zeros, name='bn3')(_conv(out_channels, 1, self.dtype, 'conv3')(out))
    identity = x
    if self.stride > 1 or x.shape[-1] != out_channels:
      identity = _avg_pool(x, self.stride)
      identity = FrozenBatchNorm(name='downsample_bn')(
          _conv(out_channels, 1, self.dtype, 'downsample_conv')(identity))
    return nn.relu(out + identity)


class AttentionPool(nn.Module):
  """The mean of the feature map (plus positions) attends to every position; that one output is
  projected to `output_dim`."""
  heads: int
  output_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height * width, channels).astype(jnp.float32)
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    pos = self.param('positional_embedding', partitioned(normal(channels ** -0.5), None, 'embed'),
                     (x.shape[1], channels))
    x = x + pos
    std = channels ** -0.5
    # One query token over 50: too small for a fused kernel to matter, and the einsum form is the
    # one checked against open_clip on every backend.
    out = MultiHeadAttention(self.heads, self.output_dim, in_std=std, out_std=std, dtype=self.dtype,
                             attention='xla', name='attn')(x[:, :1], x)
    return out[:, 0].astype(jnp.float32)


class ModifiedResNet(nn.Module):
  layers: tuple[int, int, int, int]
  output_dim: int
  heads: int
  image_size: int = 224
  width: int = 64
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    """images: float [B, H, W, 3] (CLIP-normalised) -> [B, output_dim] (not normalised)."""
    if images.shape[1:3] != (self.image_size, self.image_size) or self.image_size % 32:
      raise ValueError(f'ResNet tower expects {self.image_size}x{self.image_size} images '
                       f'(a multiple of 32), got {images.shape}')
    x = images.astype(self.dtype)
    half = self.width // 2
    x = nn.relu(FrozenBatchNorm(name='bn1')(_conv(half, 3, self.dtype, 'conv1', stride=2)(x)))
    x = nn.relu(FrozenBatchNorm(name='bn2')(_conv(half, 3, self.dtype, 'conv2')(x)))
    x = nn.relu(FrozenBatchNorm(name='bn3')(_conv(self.width, 3, self.dtype, 'conv3')(x)))
    x = _avg_pool(x, 2)
    block = nn.remat(Bottleneck) if self.remat else Bottleneck
    for stage, num_blocks in enumerate(self.layers):
      planes = self.width * 2 ** stage
      for i in range(num_blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        x = block(planes, stride, self.dtype, name=f'layer{stage + 1}_{i}')(x)
    return AttentionPool(self.heads, self.output_dim, self.dtype, name='attnpool')(x)
