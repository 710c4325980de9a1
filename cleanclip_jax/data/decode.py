"""Robust image decoding: any record -> uint8 RGB [H, W, 3], or a `BadImageError` that names the reason.

Web-scraped image-caption data holds every kind of broken file, so decoding never lets a PIL error
escape: each failure becomes a `BadImageError` whose `reason` is one of `REASONS`, and the pipeline
turns it into a counted, logged skip or (with `data.on_bad_image='fail'`) an error naming the file.

What is decoded, and how:
- formats PIL reads; the first frame of animated images (GIF, APNG, WebP);
- EXIF orientation applied (a broken EXIF block is ignored: the pixels are still good);
- CMYK, YCbCr, LAB, HSV, grayscale and 1-bit images converted to RGB; 16-bit images (`I;16`, and
  PNG's 16-bit `I`) mapped onto 8 bits (value / 257, so 65535 is 255; larger 32-bit values clip);
  float (`F`) images in [0, 1] scaled by 255;
- transparency (RGBA, LA, palette images with a transparent colour) composited on **white**: logos
  and icons are dark-on-transparent far more often than light-on-transparent, and white is how a
  browser shows them;
- tiny images (even 1x1) are decoded; the pipeline's resize upsamples them;
- images over `MAX_PIXELS` (read from the header, before any pixel is decoded) are refused as
  `too_large`: a 64-megapixel PNG decompresses to ~200 MB per worker (a "decompression bomb").

Pure numpy/PIL (no jax): it runs inside grain worker processes.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Header-checked size limit (width x height). 40 MP admits any camera photo in the common web
# datasets while bounding a worker's memory; PIL's own bomb limit (~89 MP warns, 179 MP fails) is
# far higher.
MAX_PIXELS = 40_000_000

# Why an input can be skipped; the keys of `pipeline.skip_counts()` come from here and from
# `sources.ROW_REASONS`.
REASONS = {
    'missing_file': 'the image file does not exist',
    'unreadable_file': 'the image path cannot be read (a directory, no permission, I/O error)',
    'empty_file': 'the image file has zero bytes',
    'not_an_image': 'PIL cannot identify the bytes as an image (e.g. a text file named .jpg)',
    'truncated': 'the image data ends early',
    'corrupt': 'the image header is readable but its pixel data is not',
    'too_large': f'the image has more than MAX_PIXELS={MAX_PIXELS:,} pixels',
    'bad_array': 'an in-memory image that is not uint8 [H, W] or [H, W, 1|3|4]',
}


class BadImageError(Exception):
  """An input image that cannot be used; `reason` is a key of `REASONS`, `path` names the file."""

  def __init__(self, reason: str, path: str, detail: str = ''):
    self.reason = reason
    self.path = path
    self.detail = detail or REASONS[reason]
    super().__init__(f'{path or "<in-memory image>"}: {reason} ({self.detail})')


def decode_image(record: dict[str, Any], *, max_pixels: int = MAX_PIXELS,
                 draft_size: int | None = None) -> np.ndarray:
  """A source record (`image`, `image_bytes` or `image_path`) -> uint8 RGB [H, W, 3].

  `draft_size` lets JPEG decoding scale down by up to 8x in the DCT (much faster for big photos)
  while keeping both sides >= draft_size, so a later resize to that size loses nothing visible.
  Raises `BadImageError` for every unusable input.
  """
  return np.asarray(decode_native(record, max_pixels=max_pixels, draft_size=draft_size), np.uint8)


def decode_native(record: dict[str, Any], *, max_pixels: int = MAX_PIXELS,
                  draft_size: int | None = None) -> np.ndarray | Image.Image:
  """`decode_image`'s pixels in the form they come cheapest: an in-memory array as the uint8 RGB
  array, encoded bytes as an RGB PIL image (for a caller that resizes next: a copy into numpy and
  back costs ~100 us per 256 px image, 7% of decoding it)."""
  path = record.get('image_path', '') or ''
  if record.get('image') is not None:
    return _array_to_rgb(record['image'], path)
  data = record.get('image_bytes')
  if data is None:
    data = _read_file(path)
  if not data:
    raise BadImageError('empty_file', path)
  return _decode_bytes(data if isinstance(data, bytes) else bytes(data), path, max_pixels, draft_size)


def decode_or_none(record: dict[str, Any], *, native: bool = False,
                   **kwargs) -> tuple[np.ndarray | Image.Image | None, BadImageError | None]:
  """`decode_image` (`decode_native` if `native`) that returns `(image, None)` or `(None, error)`
  instead of raising."""
  try:
    return (decode_native if native else decode_image)(record, **kwargs), None
  except BadImageError as e:
    return None, e


def _read_file(path: str) -> bytes:
  if not path:
    raise BadImageError('missing_file', path, 'the record has no image, image_bytes or image_path')
  try:
    with open(path, 'rb') as f:
      return f.read()
  except FileNotFoundError:
    raise BadImageError('missing_file', path) from None
  except OSError as e:  # IsADirectoryError, PermissionError, EIO, ...
    raise BadImageError('unreadable_file', path, f'{type(e).__name__}: {e.strerror or e}') from None


def _decode_bytes(data: bytes, path: str, max_pixels: int, draft_size: int | None) -> Image.Image:
  # PIL warns (DecompressionBombWarning) of images over ~89 MP as it opens them; such an image is
  # over MAX_PIXELS and refused below as too_large, so the warning is left to show (once per
  # process). Silencing it per decode with `warnings.catch_warnings` would rewrite the process-wide
  # warning filters from every decoding thread at once: that context manager is not thread-safe.
  try:
    image = Image.open(io.BytesIO(data))
  except UnidentifiedImageError:
    raise BadImageError('not_an_image', path) from None
  except Image.DecompressionBombError as e:
    raise BadImageError('too_large', path, str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    # Damaged files raise more than OSError from PIL's plugins (TypeError, KeyError,
    # struct.error, NotImplementedError, ...); each is one bad image, never the run's end.
    raise BadImageError(_truncated_or_corrupt(e), path, f'{type(e).__name__}: {e}') from None
  width, height = image.size
  if width <= 0 or height <= 0:
    raise BadImageError('corrupt', path, f'header says {width}x{height}')
  if width * height > max_pixels:
    raise BadImageError('too_large', path, f'{width}x{height} > MAX_PIXELS={max_pixels:,}')
  # An opened image is at its first frame: a GIF's or a multi-page TIFF's first frame is what is
  # read, and damage in later frames does not cost it (asking for `n_frames` would walk them all).
  try:
    if draft_size and image.format == 'JPEG':
      image.draft(image.mode, (draft_size, draft_size))
    image.load()
  except OSError as e:
    raise BadImageError(_truncated_or_corrupt(e), path, str(e)) from None
  except Exception as e:  # pylint: disable=broad-except (as at open: any plugin error is one image)
    raise BadImageError('corrupt', path, f'{type(e).__name__}: {e}') from None
  image = _apply_orientation(image)
  try:
    return _to_rgb(image)
  except Exception as e:  # pylint: disable=broad-except
    raise BadImageError('corrupt', path, f'mode {image.mode}: {type(e).__name__}: {e}') from None


def _truncated_or_corrupt(error: Exception) -> str:
  # PIL reports an early end of data only in the message ("image file is truncated", "Truncated
  # File Read", "broken data stream").
  text = str(error).lower()
  return 'truncated' if 'truncated' in text or 'broken data stream' in text else 'corrupt'


# Where PIL looks for an orientation (`Image.getexif`): EXIF in `info`, a TIFF's own tags, XMP.
_ORIENTATION_KEYS = ('exif', 'Raw profile type exif', 'XML:com.adobe.xmp', 'xmp')


def _apply_orientation(image: Image.Image) -> Image.Image:
  # An image with none of the places PIL reads an orientation from (most web JPEGs) has none; the
  # check costs ~0.3 us against exif_transpose's ~2 us hot and ~10 us inside the pipeline, where
  # the decode has just pushed PIL's Python code out of the caches.
  info = image.info
  if not any(key in info for key in _ORIENTATION_KEYS) and not hasattr(image, 'tag_v2'):
    return image
  # In place: the default returns a copy of every image that needs no turning (~15 us at 256 px).
  try:
    ImageOps.exif_transpose(image, in_place=True)
  except Exception:  # pylint: disable=broad-except
    pass  # A malformed EXIF block must not cost a good image; it is then shown unrotated.
  return image


def _to_rgb(image: Image.Image) -> Image.Image:
  mode = image.mode
  if mode in ('P', 'L', 'RGB') and 'transparency' in image.info:
    # A transparent colour (PNG tRNS, GIF) rather than an alpha band: composited on white too.
    image, mode = image.convert('RGBA'), 'RGBA'
  if mode == 'RGB':
    return image
  if mode.startswith('I;16') or mode in ('I', 'F'):
    return Image.fromarray(_high_depth_to_rgb(image))
  if mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    image = image.convert('RGBA')
    background = Image.new('RGBA', image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert('RGB')
  # CMYK (PIL undoes Adobe's inverted CMYK), YCbCr, LAB, HSV, L, 1, P without transparency.
  return image.convert('RGB')


def _high_depth_to_rgb(image: Image.Image) -> np.ndarray:
  pixels = np.asarray(image).astype(np.float64)
  if image.mode == 'F':
    # Float images in [0, 1] are the common case; anything else is clipped to [0, 255].
    scale = 255.0 if pixels.size and pixels.max() <= 1.0 else 1.0
  else:
    # PIL opens 16-bit PNGs as I;16 or I: map the 16-bit range onto 8 bits (65535 / 257 = 255).
    scale = 1 / 257
  gray = np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8)
  return np.repeat(gray[..., None], 3, axis=-1)


def _array_to_rgb(array: Any, path: str) -> np.ndarray:
  array = np.asarray(array)
  if array.dtype != np.uint8 or array.ndim not in (2, 3) or min(array.shape[:2], default=0) < 1:
    raise BadImageError('bad_array', path, f'dtype {array.dtype}, shape {array.shape}')
  if array.ndim == 2:
    array = array[..., None]
  channels = array.shape[-1]
  if channels == 3:
    return array
  if channels == 1:
    return np.repeat(array, 3, axis=-1)
  if channels == 4:
    return np.asarray(_to_rgb(Image.fromarray(array, 'RGBA')), np.uint8)
  raise BadImageError('bad_array', path, f'{channels} channels')
