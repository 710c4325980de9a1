"""Cutting token batches after their longest caption (`data.token_bucket`)."""

import numpy as np
import pytest

from cleanclip_jax import text_length

EOT = 49407


def _tokens(eot_positions, context=12):
  tokens = np.zeros((len(eot_positions), context), np.int32)
  for row, eot in enumerate(eot_positions):
    tokens[row, 0] = 49406
    tokens[row, 1:eot] = 7
    tokens[row, eot] = EOT
  return tokens


def test_needed_length_is_the_last_eot_plus_one():
  assert text_length.needed_length(_tokens([3, 9, 5])) == 10
  assert text_length.needed_length(_tokens([11])) == 12
  # Pooling follows argmax (the largest id), not the last non-zero token.
  tokens = _tokens([4])
  tokens[0, 8] = 3
  assert text_length.needed_length(tokens) == 5
  with pytest.raises(ValueError, match=r'\[batch, length\]'):
    text_length.needed_length(np.zeros(5, np.int32))


@pytest.mark.parametrize('needed, bucket, context, expected', [
    (10, 16, 77, 16), (16, 16, 77, 16), (17, 16, 77, 32), (70, 16, 77, 77), (77, 16, 77, 77),
    (3, 0, 77, 77), (5, 4, 6, 6)])
def test_bucketed_length(needed, bucket, context, expected):
  assert text_length.bucketed_length(needed, bucket, context) == expected


def test_bucketed_length_rejects_bad_values():
  with pytest.raises(ValueError, match='token_bucket'):
    text_length.bucketed_length(3, -1, 77)
  with pytest.raises(ValueError, match='outside'):
    text_length.bucketed_length(78, 16, 77)


def test_trim_tokens_cuts_both_views_to_one_length_and_keeps_the_rest():
  tokens, aug = _tokens([2, 5]), _tokens([6, 3])
  image = np.ones((2, 4, 4, 3), np.uint8)
  out = text_length.trim_tokens({'image': image, 'tokens': tokens, 'aug_tokens': aug}, bucket=4)
  assert out['tokens'].shape == out['aug_tokens'].shape == (2, 8)  # aug's EOT at 6 -> 7 -> 8
  np.testing.assert_array_equal(out['tokens'], tokens[:, :8])
  np.testing.assert_array_equal(out['aug_tokens'], aug[:, :8])
  assert out['image'] is image
  assert out['tokens'].flags['C_CONTIGUOUS']
  # Only padding was cut: every row's tokens after its EOT are zero.
  assert not tokens[:, 8:].any() and not aug[:, 8:].any()


def test_trim_tokens_off_or_full_keeps_the_batch():
  tokens = _tokens([11, 2])
  assert text_length.trim_tokens({'tokens': tokens}, bucket=0)['tokens'] is tokens
  assert text_length.trim_tokens({'tokens': tokens}, bucket=4)['tokens'] is tokens
  assert text_length.trim_tokens({'image': np.zeros((2, 1))}, bucket=4).keys() == {'image'}
  with pytest.raises(ValueError, match='different lengths'):
    text_length.trim_tokens({'tokens': tokens, 'aug_tokens': tokens[:, :6]}, bucket=4)
