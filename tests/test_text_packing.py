"""text_packing: captions packed several to a token row give the text tower's own features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleanclip_jax import models, text_packing

CONTEXT = 24
VOCAB = 512


def _captions(count, seed=0, longest=CONTEXT - 1):
  """Captions whose EOT (the vocabulary's largest id) sits at 1..longest, zeros after it."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((count, CONTEXT), np.int32)
  for i, eot in enumerate(rng.integers(1, longest + 1, count)):
    tokens[i, :eot] = rng.integers(1, VOCAB - 1, eot)
    tokens[i, eot] = VOCAB - 1
  return tokens


def test_first_fit_places_every_caption_once_within_its_row():
  lengths = np.random.default_rng(0).integers(1, 17, 50)
  rows, offsets, used = text_packing.first_fit_rows(lengths, 16)
  assert used >= -(-lengths.sum() // 16)
  occupied = np.zeros((used, 16), int)
  for row, offset, n in zip(rows, offsets, lengths):
    assert 0 <= row < used and offset + n <= 16
    occupied[row, offset:offset + n] += 1
  assert occupied.max() == 1 and occupied.sum() == lengths.sum()
  # Deterministic, and a full row holds nothing else.
  np.testing.assert_array_equal(text_packing.first_fit_rows(lengths, 16)[0], rows)
  assert text_packing.first_fit_rows([16, 16, 1], 16)[2] == 3
  with pytest.raises(ValueError, match='1..16'):
    text_packing.first_fit_rows([17], 16)


def test_pack_keeps_each_caption_with_its_positions_segment_and_eot():
  tokens = _captions(12, seed=1)
  shards, rows = 3, 4
  packed = text_packing.pack(tokens, shards, CONTEXT, rows)
  assert packed['packed'].shape == (shards * rows, CONTEXT) and packed['eot'].shape == (shards, 4)
  lengths = text_packing.caption_lengths(tokens)
  for shard in range(shards):
    flat = {k: packed[k][shard * rows:(shard + 1) * rows].reshape(-1) for k in ('packed', 'positions', 'segments')}
    assert set(np.unique(flat['segments'])) <= set(range(5))
    for i in range(4):
      caption = shard * 4 + i
      span = np.flatnonzero(flat['segments'] == i + 1)
      assert span.size == lengths[caption] and np.all(np.diff(span) == 1)  # one contiguous span
      assert span[0] // CONTEXT == span[-1] // CONTEXT  # inside one row
      np.testing.assert_array_equal(flat['packed'][span], tokens[caption, :lengths[caption]])
      np.testing.assert_array_equal(flat['positions'][span], np.arange(lengths[caption]))
      assert packed['eot'][shard, i] == span[-1] and flat['packed'][span[-1]] == VOCAB - 1
    assert not flat['packed'][flat['segments'] == 0].any()
  with pytest.raises(ValueError, match='needs .* rows'):
    text_packing.pack(tokens, 1, CONTEXT, 1)
  with pytest.raises(ValueError, match='equal shards'):
    text_packing.pack(tokens, 5, CONTEXT, rows)


def test_pack_tokens_replaces_both_token_keys_with_one_shape():
  tokens = _captions(64, seed=2, longest=10)
  batch = {'tokens': tokens, 'aug_tokens': np.roll(tokens, 3, axis=0), 'label': np.arange(64)}
  packed = text_packing.pack_tokens(batch, shards=2)
  assert 'tokens' not in packed and 'aug_tokens' not in packed and packed['label'] is batch['label']
  length = packed['tokens_packed'].shape[1]
  assert length == CONTEXT  # rows as long as the context, however short the captions
  assert packed['tokens_packed'].shape == packed['aug_tokens_packed'].shape
  rows = packed['tokens_packed'].shape[0] // 2
  assert rows % text_packing.row_bucket(32) == 0
  assert rows >= text_packing.placement(tokens, 2, length)[2]
  assert text_packing.packed_shape(packed) == (length, 2 * rows / 64)
  assert text_packing.packed_shape(batch) == (CONTEXT, 1.0)
  assert text_packing.packed_shape({'label': batch['label']}) == (0, 0.0)
  assert text_packing.pack_tokens({'label': batch['label']}, 2) == {'label': batch['label']}


def _text_model(pooled_last_block):
  return models.create_model('tiny-vit', vision_layers=1, text_layers=3, vision_width=64,
                             vision_head_width=32, text_width=64, text_heads=2, embed_dim=32,
                             vocab_size=VOCAB, context_length=CONTEXT,
                             pooled_last_block=pooled_last_block)


def _packed_input(packed):
  return models.PackedTokens(*(jnp.asarray(packed[f'tokens_{k}'])
                               for k in text_packing.FIELDS))


@pytest.mark.parametrize('pooled_last_block', [True, False])
def test_packed_captions_have_their_own_features(pooled_last_block):
  model = _text_model(pooled_last_block)
  tokens = _captions(16, seed=3)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.asarray(tokens[:1]))['params']
  encode = jax.jit(lambda p, t: model.apply({'params': p}, t, method=model.encode_text))
  reference = encode(params, jnp.asarray(tokens))
  for shards in (1, 2, 4):
    packed = text_packing.pack_tokens({'tokens': tokens}, shards)
    assert packed['tokens_packed'].shape[0] < 16  # several captions share rows
    np.testing.assert_allclose(encode(params, _packed_input(packed)), reference, atol=2e-6)
  # The segment mask is what keeps captions apart: one segment a row mixes them.
  mixed = dict(packed, tokens_segments=np.where(packed['tokens_segments'] > 0, 1, 0))
  mixed['tokens_segments'] = mixed['tokens_segments'].astype(np.int32)
  assert np.abs(np.asarray(encode(params, _packed_input(mixed))) - np.asarray(reference)).max() > 1e-3
