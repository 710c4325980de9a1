"""cleanclip_jax: CLIP training, data-poisoning backdoors and the CleanCLIP defense in JAX/Flax.

Public API (imported lazily, so `import cleanclip_jax.config` stays cheap and torch is only
imported when a PyTorch checkpoint is read):

```python
import cleanclip_jax as cc
model, params = cc.load_pretrained('ViT-B-32.safetensors')        # OpenAI / open_clip weights
tokens = cc.tokenize(['a photo of a banana'])                      # np.int32 [1, 77]
txt = cc.encode_text(model, params, tokens)                        # L2-normalised, jitted
img = cc.encode_image(model, params, images)                       # images: NHWC, CLIP-normalised
```
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ['load_pretrained', 'tokenize', 'encode_image', 'encode_text']


def load_pretrained(path: str, model=None, **kwargs):
  """(CLIP module, params) from an OpenAI/open_clip checkpoint; see `convert.load_pretrained`."""
  from cleanclip_jax import convert  # pylint: disable=import-outside-toplevel
  return convert.load_pretrained(path, model, **kwargs)


def tokenize(texts, context_length: int = 77):
  """CLIP BPE token ids, np.int32 [N, context_length] (SOT ... EOT, zero padded)."""
  from cleanclip_jax import tokenizer  # pylint: disable=import-outside-toplevel
  return tokenizer.tokenize(texts, context_length)


@functools.lru_cache(maxsize=16)
def _jitted(model, method: str):
  import jax  # pylint: disable=import-outside-toplevel

  def apply(params, inputs):
    return model.apply({'params': params}, inputs, method=method)
  return jax.jit(apply)


def encode_image(model, params: Any, images):
  """L2-normalised image features [N, embed_dim]; images float NHWC, CLIP-normalised."""
  return _jitted(model, 'encode_image')(params, images)


def encode_text(model, params: Any, tokens):
  """L2-normalised text features [N, embed_dim]; tokens int32 [N, L <= model.context_length]."""
  return _jitted(model, 'encode_text')(params, tokens)
