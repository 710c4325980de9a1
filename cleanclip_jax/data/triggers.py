"""Backdoor triggers as pure, seeded numpy functions of (image, example_seed).

    trigger = make_trigger(config.data.poison.trigger, image_size=224)
    poisoned = trigger(image_uint8_hwc, example_seed=index)

Everything about a trigger's *pattern* (the noise patch, the blend image, the warping field) comes
from `trigger_config.seed` and the image size only, so the training pipeline and the ASR evaluation
stamp pixel-identical triggers. The only per-example randomness is BadNet's random patch location,
drawn from `example_seed`, so it is reproducible too. The returned callables are `functools.partial`
objects of module-level functions, hence picklable into grain workers.

Families:
  badnet_noise / badnet_solid  a patch (fixed seeded uniform noise / a solid colour) of side
                               `patch_fraction * image_size` (at least 3 px) at a random location,
                               the bottom-right corner (`fixed`) or all four corners (`corners`).
  blended                      (1 - alpha) * image + alpha * (a fixed seeded uniform-noise image).
  sig                          image + delta * sin(2 pi j f / W) on column j (Barni et al., 2019).
  wanet                        a smooth fixed warp (Nguyen & Tran, 2021): a random k x k flow field
                               in [-1, 1], normalised by its mean magnitude, upsampled bicubically,
                               scaled by s / H, added to the identity grid, clamped, and sampled
                               bilinearly.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

Trigger = Callable[[np.ndarray, int], np.ndarray]

KINDS = ('badnet_noise', 'badnet_solid', 'blended', 'sig', 'wanet')
LOCATIONS = ('random', 'fixed', 'corners')
MIN_PATCH_PIXELS = 3

# Separates the random streams of the pattern families and of the per-example patch location, so
# e.g. the blended image is not the BadNet patch enlarged.
_STREAMS = {'badnet_noise': 1, 'blended': 2, 'wanet': 3, 'location': 4}


def patch_size(patch_fraction: float, image_size: int) -> int:
  """BadNet patch side in pixels: scales with the image, never below MIN_PATCH_PIXELS."""
  return int(min(image_size, max(MIN_PATCH_PIXELS, round(patch_fraction * image_size))))


def make_trigger(trigger_config, image_size: int) -> Trigger:
  """Builds `fn(image_uint8 [S, S, 3], example_seed: int) -> uint8 [S, S, 3]` for S = image_size."""
  kind, seed, size = trigger_config.kind, int(trigger_config.seed), int(image_size)
  if size < MIN_PATCH_PIXELS:
    raise ValueError(f'make_trigger: image_size={image_size} is too small')
  if seed < 0:
    raise ValueError(f'trigger.seed={seed} must be >= 0')
  if kind in ('badnet_noise', 'badnet_solid'):
    if trigger_config.location not in LOCATIONS:
      raise ValueError(f'trigger.location={trigger_config.location!r}; use one of {LOCATIONS}')
    side = patch_size(trigger_config.patch_fraction, size)
    if kind == 'badnet_noise':
      patch = np.random.default_rng([seed, _STREAMS[kind]]).integers(0, 256, (side, side, 3), dtype=np.uint8)
    else:
      colour = np.asarray(trigger_config.color, np.int64)
      if colour.shape != (3,) or colour.min() < 0 or colour.max() > 255:
        raise ValueError(f'trigger.color={trigger_config.color!r} must be three values in [0, 255]')
      patch = np.broadcast_to(colour.astype(np.uint8), (side, side, 3)).copy()
    return functools.partial(_stamp_patch, patch=patch, location=trigger_config.location, seed=seed,
                             image_size=size)
  if kind == 'blended':
    alpha = float(trigger_config.alpha)
    if not 0 <= alpha <= 1:
      raise ValueError(f'trigger.alpha={alpha} must be in [0, 1]')
    pattern = np.random.default_rng([seed, _STREAMS[kind]]).integers(0, 256, (size, size, 3)).astype(np.float32)
    return functools.partial(_blend, pattern=pattern, alpha=alpha, image_size=size)
  if kind == 'sig':
    columns = np.arange(size, dtype=np.float64)
    signal = trigger_config.sig_delta * np.sin(2 * np.pi * columns * trigger_config.sig_frequency / size)
    return functools.partial(_add_signal, signal=signal.astype(np.float32)[None, :, None], image_size=size)
  if kind == 'wanet':
    sampling = wanet_sampling(size, int(trigger_config.wanet_k), float(trigger_config.wanet_s),
                              float(trigger_config.wanet_grid_rescale), seed)
    return functools.partial(_warp, sampling=sampling, image_size=size)
  raise ValueError(f'trigger.kind={kind!r}; use one of {KINDS}')


def _check(image: np.ndarray, image_size: int) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.shape != (image_size, image_size, 3):
    raise ValueError(f'trigger: expected a uint8 [{image_size}, {image_size}, 3] image (the trigger was built '
                     f'for image_size={image_size}), got {image.dtype} {list(image.shape)}')
  return image


def patch_corners(location: str, image_size: int, side: int, seed: int, example_seed: int) -> list[tuple[int, int]]:
  """Top-left (row, col) of every patch a BadNet trigger stamps on example `example_seed`."""
  last = image_size - side
  if location == 'fixed':
    return [(last, last)]
  if location == 'corners':
    return [(0, 0), (0, last), (last, 0), (last, last)]
  rng = np.random.default_rng([seed, _STREAMS['location'], int(example_seed) & (2**64 - 1)])
  row, col = rng.integers(0, last + 1, 2)
  return [(int(row), int(col))]


def _stamp_patch(image, example_seed=0, *, patch, location, seed, image_size):
  out = _check(image, image_size).copy()
  side = patch.shape[0]
  for row, col in patch_corners(location, image_size, side, seed, example_seed):
    out[row:row + side, col:col + side] = patch
  return out


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _blend(image, example_seed=0, *, pattern, alpha, image_size):
  del example_seed  # the same blend for every example
  return _to_uint8((1 - alpha) * _check(image, image_size).astype(np.float32) + alpha * pattern)


def _add_signal(image, example_seed=0, *, signal, image_size):
  del example_seed
  return _to_uint8(_check(image, image_size).astype(np.float32) + signal)


# --- WaNet -----------------------------------------------------------------------------------------


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 from floor(x), t = frac."""
  def near(d):  # |d| <= 1
    return ((a + 2) * d - (a + 3)) * d * d + 1
  def far(d):  # 1 < |d| < 2
    return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] matrix of bicubic upsampling with aligned corners and clamped borders."""
  if size_in == 1:
    return np.ones((size_out, 1))
  positions = np.arange(size_out) * (size_in - 1) / max(size_out - 1, 1)
  base = np.floor(positions).astype(np.int64)
  weights = _cubic_weights(positions - base)
  matrix = np.zeros((size_out, size_in))
  for tap in range(4):
    np.add.at(matrix, (np.arange(size_out), np.clip(base + tap - 1, 0, size_in - 1)), weights[:, tap])
  return matrix


def wanet_grid(image_size: int, k: int, s: float, grid_rescale: float, seed: int) -> np.ndarray:
  """The sampling grid [S, S, 2] (x, y in [-1, 1], align_corners convention) of a WaNet trigger."""
  if k < 1:
    raise ValueError(f'trigger.wanet_k={k} must be >= 1')
  flow = np.random.default_rng([seed, _STREAMS['wanet']]).uniform(-1, 1, (2, k, k))
  flow = flow / np.mean(np.abs(flow))
  upsample = bicubic_matrix(k, image_size)
  flow = np.einsum('ik,ckl,jl->ijc', upsample, flow, upsample)  # [S, S, (x, y)]
  axis = np.linspace(-1, 1, image_size)
  identity = np.stack(np.meshgrid(axis, axis, indexing='xy'), -1)  # [..., 0] = x (column)
  return np.clip((identity + s * flow / image_size) * grid_rescale, -1, 1)


def wanet_sampling(image_size: int, k: int, s: float, grid_rescale: float, seed: int):
  """Precomputed bilinear gather: (rows0, cols0, rows1, cols1, weight_row, weight_col)."""
  grid = wanet_grid(image_size, k, s, grid_rescale, seed)
  cols = (grid[..., 0] + 1) / 2 * (image_size - 1)
  rows = (grid[..., 1] + 1) / 2 * (image_size - 1)
  rows0 = np.clip(np.floor(rows), 0, image_size - 1).astype(np.int64)
  cols0 = np.clip(np.floor(cols), 0, image_size - 1).astype(np.int64)
  rows1, cols1 = np.minimum(rows0 + 1, image_size - 1), np.minimum(cols0 + 1, image_size - 1)
  weight_row = (rows - rows0).astype(np.float32)[..., None]
  weight_col = (cols - cols0).astype(np.float32)[..., None]
  return rows0, cols0, rows1, cols1, weight_row, weight_col


def _warp(image, example_seed=0, *, sampling, image_size):
  del example_seed
  pixels = _check(image, image_size).astype(np.float32)
  rows0, cols0, rows1, cols1, weight_row, weight_col = sampling
  top = pixels[rows0, cols0] * (1 - weight_col) + pixels[rows0, cols1] * weight_col
  bottom = pixels[rows1, cols0] * (1 - weight_col) + pixels[rows1, cols1] * weight_col
  return _to_uint8(top * (1 - weight_row) + bottom * weight_row)
