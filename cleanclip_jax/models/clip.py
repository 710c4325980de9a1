"""The CLIP dual encoder and an image classifier built on its image tower.

Parameter tree of `CLIP`: `{'visual': ..., 'text': ..., 'logit_scale': ()}`. Parameters are
float32; `dtype` is the compute dtype of the matmuls and convolutions (layer norms, softmax,
features and logits stay float32).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cleanclip_jax.models.registry import ModelConfig
from cleanclip_jax.models.resnet import ModifiedResNet
from cleanclip_jax.models.text import TextTransformer
from cleanclip_jax.models.transformer import partitioned
from cleanclip_jax.models.vit import VisionTransformer


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CLIP(nn.Module):
  """`__call__(images, tokens)` -> (image_features, text_features, logit_scale): L2-normalised
  float32 features and the raw (log) temperature parameter; the loss exponentiates it."""
  config: ModelConfig
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str = 'auto'  # the transformers' attention kernel (see transformer.MultiHeadAttention)
  # Each transformer tower's last block computes only the row it pools (ViT: the class token,
  # text: EOT): the same features with ~14% fewer FLOPs in a 6-layer tower (transformer.Transformer).
  pooled_last_block: bool = True

  @property
  def image_size(self) -> int:
    return self.config.vision.image_size

  @property
  def context_length(self) -> int:
    return self.config.text.context_length

  @property
  def vocab_size(self) -> int:
    return self.config.text.vocab_size

  @property
  def embed_dim(self) -> int:
    return self.config.embed_dim

  def setup(self):
    cfg, dtype = self.config, jnp.dtype(self.dtype)
    vision = cfg.vision
    if vision.is_resnet:
      self.visual = ModifiedResNet(vision.layers, cfg.embed_dim, vision.heads, vision.image_size,
                                   vision.width, self.remat, dtype)
    else:
      self.visual = VisionTransformer(vision.image_size, vision.patch_size, vision.width, vision.layers,
                                      vision.heads, cfg.embed_dim, vision.mlp_ratio, cfg.quick_gelu,
                                      self.remat, dtype, self.attention, self.pooled_last_block)
    text = cfg.text
    self.text = TextTransformer(text.context_length, text.vocab_size, text.width, text.layers,
                                text.heads, cfg.embed_dim, text.mlp_ratio, cfg.quick_gelu,
                                self.remat, dtype, self.attention, self.pooled_last_block)
    self.logit_scale = self.param(
        'logit_scale', partitioned(nn.initializers.constant(np.log(1 / 0.07)), *()), ())

  def encode_image(self, images, normalize: bool = True):
    features = self.visual(images).astype(jnp.float32)
    return l2_normalize(features) if normalize else features

  def encode_text(self, tokens, normalize: bool = True):
    features = self.text(tokens).astype(jnp.float32)
    return l2_normalize(features) if normalize else features

  def __call__(self, images, tokens, train: bool = False):
    del train  # no dropout or batch statistics: the same computation either way
    return self.encode_image(images), self.encode_text(tokens), self.logit_scale


class ImageClassifier(nn.Module):
  """CLIP's image tower + a linear head on the L2-normalised image features.

  Params: `{'clip': <full CLIP params>, 'head': {'kernel': [embed_dim, num_classes], 'bias'}}`.
  The text tower's params are created at init too, so a pretrained CLIP tree drops in under
  'clip' unchanged (the forward pass only reads the image tower). On normalised features a head
  set to `exp(logit_scale) * zero-shot class embeddings` reproduces zero-shot logits exactly.
  """
  clip: CLIP
  num_classes: int

  @property
  def image_size(self) -> int:
    return self.clip.image_size

  @property
  def embed_dim(self) -> int:
    return self.clip.embed_dim

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train
    features = self.clip.encode_image(images, normalize=True)
    if self.is_initializing():
      # Create the text tower's params so the tree is a whole CLIP's.
      self.clip.encode_text(jnp.zeros((1, self.clip.context_length), jnp.int32))
    return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name='head',
                    kernel_init=partitioned(nn.initializers.zeros, 'embed', 'classes'),
                    bias_init=partitioned(nn.initializers.zeros, 'classes'))(features)
