"""Trigger families: pure, seeded, size-scaled, identical between training and evaluation."""

import pickle

import numpy as np
import pytest

from cleanclip_jax import config as config_lib
from cleanclip_jax.data import triggers

SIZE = 32


def _config(kind, **changes):
  trigger_config = config_lib.trigger_config()
  trigger_config.kind = kind
  for key, value in changes.items():
    trigger_config[key] = value
  return trigger_config


def _images(n=3, size=SIZE, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize('kind', triggers.KINDS)
def test_shape_dtype_determinism_and_change(kind):
  image = _images(1)[0]
  train_trigger = triggers.make_trigger(_config(kind), SIZE)
  eval_trigger = triggers.make_trigger(_config(kind), SIZE)  # built separately, as the evaluator does
  out = train_trigger(image, 5)
  assert out.shape == image.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out, eval_trigger(image, 5))
  np.testing.assert_array_equal(out, pickle.loads(pickle.dumps(train_trigger))(image, 5))
  assert not np.array_equal(out, image)
  assert np.array_equal(image, _images(1)[0])  # the input is not modified


@pytest.mark.parametrize('kind,changes', [
    ('badnet_noise', {'location': 'fixed'}), ('blended', {}), ('wanet', {'wanet_s': 4.0})])
def test_pattern_depends_on_the_trigger_seed(kind, changes):
  image = _images(1)[0]
  a = triggers.make_trigger(_config(kind, seed=0, **changes), SIZE)(image, 0)
  b = triggers.make_trigger(_config(kind, seed=1, **changes), SIZE)(image, 0)
  assert not np.array_equal(a, b)


def test_noise_patch_is_the_same_on_every_image():
  trigger = triggers.make_trigger(_config('badnet_noise', location='fixed'), SIZE)
  side = triggers.patch_size(16 / 224, SIZE)
  patches = [trigger(image, i)[-side:, -side:] for i, image in enumerate(_images(3))]
  np.testing.assert_array_equal(patches[0], patches[1])
  np.testing.assert_array_equal(patches[0], patches[2])
  assert patches[0].std() > 20  # noise, not a flat colour


def test_patch_size_scales_with_the_image():
  assert triggers.patch_size(16 / 224, 224) == 16
  assert triggers.patch_size(16 / 224, 64) == 5
  assert triggers.patch_size(16 / 224, 32) == triggers.MIN_PATCH_PIXELS == 3
  for size in (32, 64, 224):
    image = np.zeros((size, size, 3), np.uint8)
    out = triggers.make_trigger(_config('badnet_solid', location='fixed'), size)(image, 0)
    assert (out.any(-1)).sum() == triggers.patch_size(16 / 224, size) ** 2


def test_random_location_varies_with_example_seed_and_is_reproducible():
  side = triggers.patch_size(16 / 224, SIZE)
  corners = [tuple(triggers.patch_corners('random', SIZE, side, 0, s)[0]) for s in range(20)]
  assert len(set(corners)) > 10
  assert corners == [tuple(triggers.patch_corners('random', SIZE, side, 0, s)[0]) for s in range(20)]
  assert all(0 <= r <= SIZE - side and 0 <= c <= SIZE - side for r, c in corners)
  trigger = triggers.make_trigger(_config('badnet_solid'), SIZE)
  image = np.zeros((SIZE, SIZE, 3), np.uint8)
  r, c = corners[7]
  out = trigger(image, 7)
  assert (out[r:r + side, c:c + side] == (255, 255, 0)).all() and out.any(-1).sum() == side**2


def test_corners_stamps_all_four():
  image = np.zeros((SIZE, SIZE, 3), np.uint8)
  out = triggers.make_trigger(_config('badnet_solid', location='corners', color=(9, 8, 7)), SIZE)(image, 0)
  side = triggers.patch_size(16 / 224, SIZE)
  for rows in (slice(0, side), slice(SIZE - side, SIZE)):
    for cols in (slice(0, side), slice(SIZE - side, SIZE)):
      assert (out[rows, cols] == (9, 8, 7)).all()
  assert out.any(-1).sum() == 4 * side**2


def test_blended_formula():
  image = _images(1)[0]
  np.testing.assert_array_equal(triggers.make_trigger(_config('blended', alpha=0.0), SIZE)(image, 0), image)
  full = triggers.make_trigger(_config('blended', alpha=1.0), SIZE)
  np.testing.assert_array_equal(full(image, 0), full(_images(1, seed=9)[0], 3))  # the pattern alone
  half = triggers.make_trigger(_config('blended', alpha=0.5), SIZE)(image, 0).astype(int)
  assert np.abs(half - (image.astype(int) + full(image, 0)) / 2).max() <= 1


def test_sig_formula():
  image = np.full((SIZE, SIZE, 3), 128, np.uint8)
  out = triggers.make_trigger(_config('sig', sig_delta=20.0, sig_frequency=6.0), SIZE)(image, 0)
  expected = np.rint(128 + 20 * np.sin(2 * np.pi * np.arange(SIZE) * 6 / SIZE))
  np.testing.assert_array_equal(out[:, :, 0], np.broadcast_to(expected, (SIZE, SIZE)))
  assert (out == out[:1]).all()  # the same on every row and channel
  bright = triggers.make_trigger(_config('sig'), SIZE)(np.full_like(image, 250), 0)
  assert bright.max() == 255  # clipped, not wrapped


def test_wanet_zero_strength_is_identity_and_stronger_moves_more():
  image = _images(1)[0]
  identity = triggers.make_trigger(_config('wanet', wanet_s=0.0), SIZE)(image, 0)
  assert np.abs(identity.astype(int) - image).max() <= 1
  diffs = [np.abs(triggers.make_trigger(_config('wanet', wanet_s=s), SIZE)(image, 0).astype(int) - image).mean()
           for s in (0.5, 2.0, 8.0)]
  assert 0 < diffs[0] < diffs[1] < diffs[2]


def test_wanet_matches_torch_grid_sample():
  torch = pytest.importorskip('torch')
  functional = torch.nn.functional
  k, s = 4, 3.0
  flow = np.random.default_rng([0, triggers._STREAMS['wanet']]).uniform(-1, 1, (2, k, k))
  flow = torch.tensor(flow / np.abs(flow).mean())[None]
  upsampled = functional.interpolate(flow, size=SIZE, mode='bicubic', align_corners=True).permute(0, 2, 3, 1)
  axis = torch.linspace(-1, 1, SIZE, dtype=torch.float64)
  rows, cols = torch.meshgrid(axis, axis, indexing='ij')
  grid = torch.clamp(torch.stack((cols, rows), 2)[None] + s * upsampled / SIZE, -1, 1)
  np.testing.assert_allclose(triggers.wanet_grid(SIZE, k, s, 1.0, 0), grid[0].numpy(), atol=1e-9)
  image = _images(1)[0]
  reference = functional.grid_sample(torch.tensor(image, dtype=torch.float64).permute(2, 0, 1)[None], grid,
                                     align_corners=True)[0].permute(1, 2, 0).numpy()
  out = triggers.make_trigger(_config('wanet', wanet_s=s), SIZE)(image, 0)
  assert np.abs(out.astype(int) - np.clip(np.rint(reference), 0, 255)).max() <= 1


def test_errors_name_the_key():
  with pytest.raises(ValueError, match='trigger.kind'):
    triggers.make_trigger(_config('nope'), SIZE)
  with pytest.raises(ValueError, match='trigger.location'):
    triggers.make_trigger(_config('badnet_noise', location='middle'), SIZE)
  with pytest.raises(ValueError, match='image_size=32'):
    triggers.make_trigger(_config('sig'), SIZE)(np.zeros((64, 64, 3), np.uint8), 0)
  with pytest.raises(ValueError, match='trigger.alpha'):
    triggers.make_trigger(_config('blended', alpha=1.5), SIZE)
