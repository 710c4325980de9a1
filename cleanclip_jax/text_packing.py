"""Packing a batch's captions into fewer token rows (`config.data.pack_captions`).

The text tower masks attention causally and reads each caption's features at its EOT token (the
largest id, `argmax`), so only a caption's tokens up to its EOT matter. Padded to a common length,
a batch of captions is mostly dead columns: uniform 6..76-token captions fill 54% of 77 columns,
CC3M's ~10-word captions a fifth. Cutting the columns after the longest caption
(`text_length.trim_tokens`) helps only when every caption in the batch is short. Packing places
several captions in one row, each on its own span of columns, and the tower masks attention to stay
within a caption (same segment id, and causal) and indexes the positional embedding by the
position within the caption: every caption's features and gradients are the same function of its
tokens as in its own row, for about as many rows as the captions fill.

Layout of the packed form of batch key K ('tokens' or 'aug_tokens'), which replaces K:
  K_packed     int32 [shards * rows, length]  the captions' tokens up to their EOT; 0 after
  K_positions  int32 [shards * rows, length]  each token's position within its caption
  K_segments   int32 [shards * rows, length]  1 + the caption's index within its shard; 0 = empty
  K_eot        int32 [shards, per_shard]      each caption's EOT, as a flat index into its shard's
                                              rows * length tokens (its features are read there)
The batch is split into `shards` equal contiguous parts, one a device, and each part is packed
into its own `rows` rows, so a device's captions never leave it: the step's batch sharding
(dimension 0 over every device) hands every device its own rows and its own EOT indices.

`length` is the token arrays' (the context length): long rows pack tightly, every host has the
same, and only the row count varies between batches. (Attention is the only cost that grows with
the row length, ~L / (6 width) of a block's FLOPs: 5% at 77 tokens and width 256.) `rows` is the
most any shard needs (first-fit decreasing bin packing), rounded up to a multiple of `row_bucket`
(each row count compiles the step once); on several processes the hosts agree on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from cleanclip_jax import text_length

# Batch key K's packed arrays are K_<field>, in `models.PackedTokens`' field order.
FIELDS = ('packed', 'positions', 'segments', 'eot')


def caption_lengths(tokens: np.ndarray) -> np.ndarray:
  """Each row's tokens up to and including its EOT (argmax + 1, as the tower pools)."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] == 0:
    raise ValueError(f'tokens must be [batch, length] with length > 0, got shape {tokens.shape}')
  return np.argmax(tokens, axis=1).astype(np.int64) + 1


def first_fit_rows(lengths: np.ndarray, row_length: int) -> tuple[np.ndarray, np.ndarray, int]:
  """First-fit decreasing: (row, offset) of each caption and the number of rows used.

  Within 11/9 of the fewest rows plus one; ties keep the batch order, so the result is a
  deterministic function of the lengths.
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and (lengths.min() < 1 or lengths.max() > row_length):
    raise ValueError(f'caption lengths must be in 1..{row_length}, got {lengths.min()}..{lengths.max()}')
  rows = np.zeros(lengths.size, np.int64)
  offsets = np.zeros(lengths.size, np.int64)
  free: list[int] = []  # free columns of each row opened so far (plain ints: a short loop)
  sizes = lengths.tolist()
  for i in np.argsort(-lengths, kind='stable').tolist():
    row = next((r for r, room in enumerate(free) if room >= sizes[i]), len(free))
    if row == len(free):
      free.append(row_length)
    rows[i], offsets[i] = row, row_length - free[row]
    free[row] -= sizes[i]
  return rows, offsets, len(free)


def _shard_lengths(tokens: np.ndarray, shards: int) -> np.ndarray:
  tokens = np.asarray(tokens)
  if shards < 1 or tokens.shape[0] % shards:
    raise ValueError(f'{tokens.shape[0]} captions do not split into {shards} equal shards')
  return caption_lengths(tokens).reshape(shards, -1)


def placement(tokens: np.ndarray, shards: int, row_length: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Each caption's row and offset within its shard ([shards, per_shard] each) and the most rows
  any of the `shards` equal parts of `tokens` packs into."""
  parts = [first_fit_rows(part, row_length) for part in _shard_lengths(tokens, shards)]
  return (np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]),
          max((p[2] for p in parts), default=0))


def pack(tokens: np.ndarray, shards: int, row_length: int, rows: int,
         placed: tuple[np.ndarray, np.ndarray, int] | None = None) -> dict[str, np.ndarray]:
  """The packed arrays, keyed by `FIELDS` (see the module docstring).
  `placed`: `placement(tokens, shards, row_length)`, if already computed."""
  tokens = np.asarray(tokens)
  lengths = _shard_lengths(tokens, shards)  # [shards, per_shard]
  row_of, offset_of, used = placed or placement(tokens, shards, row_length)
  if used > rows:
    raise ValueError(f'a shard needs {used} rows of {row_length} tokens, only {rows} given')
  per_shard = lengths.shape[1]
  shard_of = np.arange(shards)[:, None]
  # Each caption's first token as a flat index into its shard's rows * row_length tokens.
  start = row_of * row_length + offset_of
  caption, position = np.nonzero(np.arange(tokens.shape[1])[None, :] < lengths.reshape(-1, 1))
  destination = (shard_of * rows * row_length + start).reshape(-1)[caption] + position
  packed, positions, segments = (np.zeros(shards * rows * row_length, np.int32) for _ in range(3))
  packed[destination] = tokens[caption, position]
  positions[destination] = position
  segments[destination] = caption % per_shard + 1
  flat = lambda a: a.reshape(shards * rows, row_length)
  return {'packed': flat(packed), 'positions': flat(positions), 'segments': flat(segments),
          'eot': (start + lengths - 1).astype(np.int32)}


def row_bucket(per_shard: int) -> int:
  """Rows are rounded up to a multiple of this: 1/16 of a shard's captions (at least 1), which
  bounds the step's shapes to a few for batches of similar captions at a cost of < 1/16 of the
  captions' rows in padding."""
  return max(1, per_shard // 16)


def pack_tokens(batch: Mapping[str, np.ndarray], shards: int) -> dict[str, np.ndarray]:
  """`batch` with each token array replaced by its packed form (the other keys as they are).

  `shards`: the batch shards of this process (its devices in the mesh). Every process must call
  it at the same step (the hosts agree on the row count).
  """
  keys = [k for k in text_length.TOKEN_KEYS if k in batch]
  out = dict(batch)
  if not keys:
    return out
  contexts = {np.shape(batch[k])[-1] for k in keys}
  if len(contexts) != 1:
    raise ValueError(f'token arrays of different lengths: {({k: np.shape(batch[k]) for k in keys})}')
  length = contexts.pop()
  per_shard = np.shape(batch[keys[0]])[0] // max(1, shards)
  placed = {k: placement(batch[k], shards, length) for k in keys}
  rows = text_length.hosts_max(max(p[2] for p in placed.values()))
  bucket = row_bucket(per_shard)
  rows = bucket * math.ceil(rows / bucket)
  for k in keys:
    for name, value in pack(out.pop(k), shards, length, rows, placed[k]).items():
      out[f'{k}_{name}'] = value
  return out


def is_packed(batch: Mapping, key: str = 'tokens') -> bool:
  return f'{key}_{FIELDS[-1]}' in batch


def packed_shape(batch: Mapping) -> tuple[int, float]:
  """(length, rows per caption) of the batch's text input: (0, 0) without tokens, rows per caption
  1 when not packed."""
  if is_packed(batch):
    rows, length = np.shape(batch['tokens_packed'])
    return length, rows / np.size(batch['tokens_eot'])
  if 'tokens' in batch:
    return np.shape(batch['tokens'])[-1], 1.0
  return 0, 0.0
