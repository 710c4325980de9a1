"""CLIP models in flax.linen: `create_model(name)` -> `CLIP` module, `list_models()`.

```python
model = models.create_model('tiny-vit', dtype='bfloat16', remat=True)
variables = model.init(rng, images, tokens)          # boxed: nn.LogicallyPartitioned leaves
specs = nn.get_partition_spec(variables)             # logical axis names per parameter
params = models.unbox(variables)['params']           # plain arrays
img, txt, logit_scale = model.apply({'params': params}, images, tokens)
```
Logical axis names used: embed, mlp, heads, kv, vocab, conv_in, conv_out, classes, norm (None
elsewhere). `jax.eval_shape(model.init, ...)` gives the shapes and names without allocating.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cleanclip_jax.models.clip import CLIP, ImageClassifier, l2_normalize
from cleanclip_jax.models.text import PackedTokens
from cleanclip_jax.models.transformer import ATTENTION_IMPLS
from cleanclip_jax.models.registry import (MODELS, ModelConfig, TextConfig, VisionConfig, get_config,
                                           list_models)

LOGICAL_AXES = ('embed', 'mlp', 'heads', 'kv', 'vocab', 'conv_in', 'conv_out', 'classes', 'norm')

_DTYPES = {'float32': jnp.float32, 'fp32': jnp.float32, 'bfloat16': jnp.bfloat16,
           'bf16': jnp.bfloat16, 'float16': jnp.float16, 'fp16': jnp.float16}


def create_model(name: str, dtype: Any = 'float32', remat: bool = False,
                 context_length: int | None = None, attention: str = 'auto',
                 pooled_last_block: bool = True, **overrides) -> CLIP:
  """The named CLIP (see `list_models()`); `dtype` is the compute dtype (params stay float32).

  `context_length` (None = the config's 77) and `overrides` (`image_size`, `vocab_size`,
  `embed_dim`, `quick_gelu`, `vision_<field>`, `text_<field>`) change the architecture;
  `attention` ('auto' | 'xla' | 'cudnn') picks the attention kernel, not the numbers it computes
  ('auto': cuDNN flash attention on a GPU with 16-bit compute, einsums elsewhere).
  `pooled_last_block` (default on) computes only the pooled row in each transformer tower's last
  block: the same features, fewer FLOPs; off computes every row, as open_clip does.
  """
  if context_length is not None:
    overrides['context_length'] = int(context_length)
  return CLIP(get_config(name, **overrides), dtype=resolve_dtype(dtype), remat=bool(remat),
              attention=attention, pooled_last_block=bool(pooled_last_block))


def resolve_dtype(dtype: Any) -> jnp.dtype:
  """'float32' / 'bfloat16' / 'float16' (or a dtype) -> a numpy dtype."""
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f'model dtype {dtype!r}: use one of {sorted(_DTYPES)}')
    dtype = _DTYPES[dtype]
  return jnp.dtype(dtype)


def unbox(variables):
  """Strips `nn.LogicallyPartitioned` boxes, leaving plain arrays (or ShapeDtypeStructs)."""
  return nn.meta.unbox(variables)


def logical_specs(variables):
  """The logical `PartitionSpec` of every parameter (a tree shaped like `variables`)."""
  return nn.get_partition_spec(variables)


__all__ = ['ATTENTION_IMPLS', 'CLIP', 'ImageClassifier', 'MODELS', 'ModelConfig', 'TextConfig', 'VisionConfig',
           'LOGICAL_AXES', 'create_model', 'resolve_dtype', 'get_config', 'list_models', 'l2_normalize', 'unbox',
           'logical_specs']
