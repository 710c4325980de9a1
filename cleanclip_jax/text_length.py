"""Cutting a batch's caption tokens after its longest caption (`config.data.token_bucket`).

The text tower masks attention causally and reads its features at each row's EOT token (the
largest id, `argmax`). A position after a row's EOT therefore never reaches that row's features,
nor its gradients: the columns after every row's EOT are dead work, which open_clip computes
anyway (it pads every caption to 77). CC3M captions average ~10 words, so most of a 77-token
batch is padding. Cutting those columns gives the same loss and gradients (to float rounding) for
less work.

Each distinct length is a new input shape, so the jitted step compiles once per length used;
rounding the length up to a multiple of `token_bucket` bounds that to a handful of shapes
(16 -> at most 5 for a 77-token context). On several processes every one must feed the same shape,
so the hosts agree on the longest caption of the global batch (one small all-gather a step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np

TOKEN_KEYS = ('tokens', 'aug_tokens')


def needed_length(tokens: np.ndarray) -> int:
  """The shortest prefix that holds every row's EOT (argmax, as the text tower pools)."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] == 0:
    raise ValueError(f'tokens must be [batch, length] with length > 0, got shape {tokens.shape}')
  if tokens.shape[0] == 0:
    return 1
  return int(np.argmax(tokens, axis=1).max()) + 1


def bucketed_length(needed: int, bucket: int, context: int) -> int:
  """`needed` rounded up to a multiple of `bucket`, at most `context` (`bucket` 0: `context`)."""
  if bucket < 0:
    raise ValueError(f'token_bucket must be >= 0, got {bucket}')
  if not 0 < needed <= context:
    raise ValueError(f'needed length {needed} outside 1..{context}')
  if bucket == 0:
    return context
  return min(context, bucket * math.ceil(needed / bucket))


def hosts_max(value: int) -> int:
  """The largest of every process's `value` (every process must call it at the same point)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def trim_tokens(batch: Mapping[str, np.ndarray], bucket: int) -> dict[str, np.ndarray]:
  """`batch` with its token arrays cut to one common bucketed length (the other keys as they are).

  Every process must call it at the same step (it agrees on the length across processes).
  """
  keys = [k for k in TOKEN_KEYS if k in batch]
  out = dict(batch)
  if bucket == 0 or not keys:
    return out
  contexts = {np.shape(batch[k])[-1] for k in keys}
  if len(contexts) != 1:
    raise ValueError(f'token arrays of different lengths: '
                     f'{ {k: np.shape(batch[k]) for k in keys} }')
  context = contexts.pop()
  if bucket >= context:  # nothing to cut (and no need to ask the other hosts)
    return out
  needed = hosts_max(max(needed_length(batch[k]) for k in keys))
  length = bucketed_length(needed, bucket, context)
  if length < context:
    for k in keys:
      out[k] = np.ascontiguousarray(np.asarray(batch[k])[:, :length])
  return out
