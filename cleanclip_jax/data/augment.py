"""CleanCLIP's in-modal views and the training crops: AutoAugment, EDA, random resized crop, flip.

    view = autoaugment(image_uint8_hwc, rng)           # AutoAugment, ImageNet policy
    text = eda(caption, rng)                           # one random EDA operation
    crop = random_resized_crop(image, rng, size=224)   # Inception-style crop, bicubic resize
    image = random_horizontal_flip(image, rng)

All functions are pure given `rng`, numpy/PIL only (they run in grain workers), and take and
return uint8 [H, W, 3] arrays / str. `rng` is a `np.random.Generator` or the pipeline's
`seeding.ExampleRandom`: only scalar `random()`, `integers`, `uniform` and `shuffle` are drawn, which
both provide.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import sys
import threading
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image, ImageFilter

from cleanclip_jax.data import seeding

Rng = Union[np.random.Generator, seeding.ExampleRandom]

# --- AutoAugment (Cubuk et al., 2019) --------------------------------------------------------------

# The 25 ImageNet sub-policies: two (operation, probability, magnitude bin in 0..9) each.
IMAGENET_POLICY = (
    (('Posterize', 0.4, 8), ('Rotate', 0.6, 9)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
    (('Equalize', 0.8, None), ('Equalize', 0.6, None)),
    (('Posterize', 0.6, 7), ('Posterize', 0.6, 6)),
    (('Equalize', 0.4, None), ('Solarize', 0.2, 4)),
    (('Equalize', 0.4, None), ('Rotate', 0.8, 8)),
    (('Solarize', 0.6, 3), ('Equalize', 0.6, None)),
    (('Posterize', 0.8, 5), ('Equalize', 1.0, None)),
    (('Rotate', 0.2, 3), ('Solarize', 0.6, 8)),
    (('Equalize', 0.6, None), ('Posterize', 0.4, 6)),
    (('Rotate', 0.8, 8), ('Color', 0.4, 0)),
    (('Rotate', 0.4, 9), ('Equalize', 0.6, None)),
    (('Equalize', 0.0, None), ('Equalize', 0.8, None)),
    (('Invert', 0.6, None), ('Equalize', 1.0, None)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Rotate', 0.8, 8), ('Color', 1.0, 2)),
    (('Color', 0.8, 8), ('Solarize', 0.8, 7)),
    (('Sharpness', 0.4, 7), ('Invert', 0.6, None)),
    (('ShearX', 0.6, 5), ('Equalize', 1.0, None)),
    (('Color', 0.4, 0), ('Equalize', 0.6, None)),
    (('Equalize', 0.4, None), ('Solarize', 0.2, 4)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
    (('Invert', 0.6, None), ('Equalize', 1.0, None)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Equalize', 0.8, None), ('Equalize', 0.6, None)),
)

NUM_BINS = 10
_SIGNED = {'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness', 'Color',
           'Contrast', 'Sharpness'}


def magnitude(op: str, bin_index: int | None, width: int, height: int) -> float:
  """The magnitude of bin `bin_index` (0..9) of `op` (torchvision's AutoAugment bins), unsigned."""
  if bin_index is None:
    return 0.0
  fraction = bin_index / (NUM_BINS - 1)
  if op in ('ShearX', 'ShearY'):
    return 0.3 * fraction
  if op == 'TranslateX':
    return 150 / 331 * width * fraction
  if op == 'TranslateY':
    return 150 / 331 * height * fraction
  if op == 'Rotate':
    return 30.0 * fraction
  if op in ('Brightness', 'Color', 'Contrast', 'Sharpness'):
    return 0.9 * fraction
  if op == 'Posterize':  # bits kept: 8, 8, 7, 7, 6, 6, 5, 5, 4, 4
    return float(8 - round(bin_index / ((NUM_BINS - 1) / 4)))
  if op == 'Solarize':  # threshold from 255 down to 0
    return 255.0 * (1 - fraction)
  raise ValueError(f'unknown AutoAugment operation {op!r}')


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
  # Nearest-neighbour with black fill, as torchvision's AutoAugment defaults.
  return image.transform(image.size, Image.AFFINE, matrix, resample=Image.NEAREST, fillcolor=(0, 0, 0))


# Equalize, AutoContrast, Solarize, Posterize, Invert, Brightness and Contrast all map each channel
# value through a 256-entry table ([3, 256] when the channels differ). The tables below are PIL's
# (`ImageOps`, `ImageEnhance`); tests compare them with PIL on random images and magnitudes.

_VALUES = np.arange(256)
_CHANNELS = np.arange(3)[:, None]
_CHANNEL_OFFSETS = 256 * _CHANNELS
_RAMP = Image.frombytes('L', (256, 1), bytes(range(256)))


def _extremes(histograms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Smallest and largest value present in each channel."""
  present = histograms > 0
  return np.argmax(present, axis=1), 255 - np.argmax(present[:, ::-1], axis=1)


def _equalize_luts(histograms: np.ndarray) -> np.ndarray:
  """PIL's ImageOps.equalize table per channel: the count of pixels below each value, divided by
  `step`, 1/255 of the count below the largest value present; identity where `step` is 0."""
  below = histograms.cumsum(axis=1)
  below -= histograms
  step = (below * (histograms > 0)).max(axis=1) // 255
  steps = step[:, None]
  luts = (below + steps // 2) // np.maximum(steps, 1)
  np.minimum(luts, 255, out=luts)
  if not step.all():
    luts[step == 0] = _VALUES
  return luts


def _autocontrast_luts(histograms: np.ndarray) -> np.ndarray:
  # Stretch [min, max] to [0, 255], truncating (PIL's ImageOps.autocontrast); identity if flat.
  lo, hi = (v.astype(np.float64)[:, None] for v in _extremes(histograms))
  scale = np.where(hi > lo, 255 / np.maximum(hi - lo, 1), 1.0)
  offset = np.where(hi > lo, -lo * scale, 0.0)
  return np.clip(np.trunc(_VALUES * scale + offset), 0, 255).astype(np.int64)


def _solarize_lut(threshold: float) -> np.ndarray:
  return np.where(_VALUES >= threshold, 255 - _VALUES, _VALUES)


def _posterize_mask(bits: float) -> int:
  # Keep the top `bits` bits of each value.
  return (0xFF << (8 - int(bits))) & 0xFF


def _posterize_lut(bits: float) -> np.ndarray:
  return _VALUES & _posterize_mask(bits)


@functools.lru_cache(maxsize=1024)
def _blend_lut(constant: int, factor: float) -> np.ndarray:
  """`Image.blend(an image of value constant, image, factor)` as a table of the image's value.

  ImageEnhance.Brightness (constant 0) and Contrast (constant: the mean grey) blend with a constant
  image, so each output value depends on the input value alone. The table is made by PIL's own
  blend of a 0..255 ramp, so its arithmetic (float32, truncated, clipped) is PIL's exactly.
  """
  blended = Image.blend(Image.new('L', (256, 1), constant), _RAMP, factor)
  table = np.frombuffer(blended.tobytes(), np.uint8).astype(np.int64)
  table.flags.writeable = False
  return table


def _mean_grey(image: Image.Image) -> int:
  # ImageEnhance.Contrast's mean: of the 'L' conversion, from its histogram, rounded half up.
  histogram = np.asarray(image.convert('L').histogram(), np.int64)
  count = int(histogram.sum())
  return int(int(histogram @ _VALUES) / count + 0.5) if count else 0


def _color(image: Image.Image, factor: float) -> Image.Image:
  # ImageEnhance.Color(image).enhance(factor) for an RGB image: a blend with its grey version,
  # built by merging the 'L' channel three times (the same pixels as .convert('RGB'), 2x faster).
  grey = image.convert('L')
  return Image.blend(Image.merge('RGB', (grey, grey, grey)), image, factor)


def _smooth(pixels: np.ndarray) -> np.ndarray:
  """PIL's ImageFilter.SMOOTH (kernel 1 1 1 / 1 5 1 / 1 1 1, divided by 13; border pixels kept).

  PIL sums the float32 products plus 0.5 and truncates: round-half-up of S / 13 for the integer
  sum S. Its float error (< 1e-3) is far below the 1/26 that separates S / 13 + 0.5 from the
  nearest integer, so the integer (2 S + 13) // 26 is the same value, 5x faster than PIL.
  """
  if min(pixels.shape[:2]) < 3:
    return np.asarray(Image.fromarray(pixels).filter(ImageFilter.SMOOTH), np.uint8)
  wide = pixels.astype(np.uint16)
  rows = wide[:, :-2] + wide[:, 1:-1]
  rows += wide[:, 2:]
  total = rows[:-2] + rows[1:-1]
  total += rows[2:]
  total += wide[1:-1, 1:-1] << 2  # the 3x3 box sum + 4 x centre: the kernel's weighted sum
  total <<= 1
  total += 13
  total //= 26
  out = pixels.copy()
  out[1:-1, 1:-1] = total
  return out


def _solarize(pixels: np.ndarray, threshold: float) -> np.ndarray:
  # Values >= threshold become 255 - v = v ^ 255: an XOR with a 0/255 mask, ~10x faster than a
  # table lookup (np.take) over the pixels, same values.
  first = math.ceil(threshold)
  if first > 255:
    return pixels.copy()
  if first <= 0:
    return pixels ^ np.uint8(255)
  return pixels ^ ((pixels >= np.uint8(first)).view(np.uint8) * np.uint8(255))


_NUMPY_OPS = {
    'Posterize': lambda x, v: x & np.uint8(_posterize_mask(v)),
    'Solarize': _solarize,
    'Invert': lambda x, v: 255 - x,
}
_HISTOGRAM_OPS = frozenset({'Equalize', 'AutoContrast'})
_FIXED_TABLES = {'Posterize': _posterize_lut, 'Solarize': _solarize_lut, 'Invert': lambda v: 255 - _VALUES}


def _point(image: Image.Image, table: np.ndarray) -> Image.Image:
  """`image.point(table)`: each channel of an RGB image through its row of a [3, 256] int table.

  Image.point first rounds every entry in Python (`[round(v) for v in lut]`, ~40 us for 768 ints,
  as long as PIL's C lookup over a 224 px image); the entries are ints in 0..255 already, so this
  calls the C method directly. Same pixels (tests compare with PIL's ImageOps).
  """
  return image._new(image.im.point(table.ravel().tolist(), None))  # pylint: disable=protected-access


class _Pixels:
  """The image AutoAugment is working on: per-channel `table` ([3, 256], None = identity) applied
  to a base image held as a numpy array, a PIL image, or both (the same pixels).

  Each operation takes the form it is fastest in, so the image is copied between numpy and PIL
  (~25 us each way at 224 px) only when the form must change. Table operations are composed into
  `table` and applied once, by PIL, when a pixel operation or the caller needs the pixels.
  Equalize and AutoContrast need the histogram of the current pixels: that is the base's histogram
  pushed through `table` (the pixels of value v become table[v]), so it takes no pass over them.
  """

  def __init__(self, array: np.ndarray | None = None, pil: Image.Image | None = None):
    self.array, self.pil = array, pil
    self.table = None
    self._histogram = None  # of the base

  def replace(self, array: np.ndarray | None = None, pil: Image.Image | None = None) -> None:
    self.__init__(array, pil)

  def as_pil(self) -> Image.Image:
    if self.pil is None:
      self.pil = Image.fromarray(self.array)
    if self.table is not None:
      self.replace(pil=_point(self.pil, self.table))
    return self.pil

  def as_array(self) -> np.ndarray:
    if self.table is not None or self.array is None:
      self.array = np.asarray(self.as_pil(), np.uint8)
    return self.array

  def histogram(self) -> np.ndarray:
    """[3, 256] counts of each channel's values."""
    if self._histogram is None:
      if self.pil is None:
        self.pil = Image.fromarray(self.array)
      self._histogram = np.fromiter(self.pil.histogram(), np.int64, 768).reshape(3, 256)
    if self.table is None:
      return self._histogram
    pushed = np.bincount((self.table + _CHANNEL_OFFSETS).ravel(), self._histogram.ravel(), 768)
    return pushed.astype(np.int64).reshape(3, 256)

  def map(self, table: np.ndarray) -> None:
    """Maps each channel through `table` ([256] or [3, 256] of values in 0..255)."""
    if self.table is not None:
      table = table[self.table] if table.ndim == 1 else table[_CHANNELS, self.table]
    elif table.ndim == 1:
      table = np.stack((table, table, table))
    self.table = table


def _apply(pixels: _Pixels, op: str, value: float, histogram_next: bool = False) -> None:
  """Applies `op` to `pixels`; `histogram_next`: Equalize or AutoContrast follows."""
  if op in _NUMPY_OPS:
    if pixels.table is None and not histogram_next:  # one pass of numpy over the pixels is cheapest
      pixels.replace(array=_NUMPY_OPS[op](pixels.as_array(), value))
    else:  # compose with the pending table (applied once, later), for free
      pixels.map(_FIXED_TABLES[op](value))
  elif op == 'Equalize':
    pixels.map(_equalize_luts(pixels.histogram()))
  elif op == 'AutoContrast':
    pixels.map(_autocontrast_luts(pixels.histogram()))
  elif op == 'Brightness':
    pixels.map(_blend_lut(0, 1 + value))
  elif op == 'Contrast':
    pixels.map(_blend_lut(_mean_grey(pixels.as_pil()), 1 + value))
  elif op == 'Color':
    if 1 + value != 1:  # enhance(1.0) returns the image unchanged (a copy)
      pixels.replace(pil=_color(pixels.as_pil(), 1 + value))
  elif op == 'Sharpness':
    if 1 + value != 1:  # ImageEnhance.Sharpness: a blend with the smoothed image
      smoothed = Image.fromarray(_smooth(pixels.as_array()))
      pixels.replace(pil=Image.blend(smoothed, pixels.as_pil(), 1 + value))
  elif op == 'Rotate':
    pixels.replace(pil=pixels.as_pil().rotate(value, resample=Image.NEAREST, fillcolor=(0, 0, 0)))
  elif op in _AFFINE_MATRICES:
    pixels.replace(pil=_affine(pixels.as_pil(), _AFFINE_MATRICES[op](value)))
  else:
    raise ValueError(f'unknown AutoAugment operation {op!r}')


_AFFINE_MATRICES = {
    'ShearX': lambda v: (1, v, 0, 0, 1, 0),
    'ShearY': lambda v: (1, 0, 0, v, 1, 0),
    'TranslateX': lambda v: (1, 0, v, 0, 1, 0),
    'TranslateY': lambda v: (1, 0, 0, 0, 1, v),
}


def apply_op(image: np.ndarray, op: str, value: float) -> np.ndarray:
  """Applies one AutoAugment operation with a signed magnitude `value` to a uint8 [H, W, 3] image."""
  pixels = _Pixels(np.asarray(image))
  _apply(pixels, op, value)
  return pixels.as_array()


def _check_image(image: np.ndarray, where: str) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'{where}: expected a uint8 [H, W, 3] image, got {image.dtype} {list(image.shape)}')
  return image


def autoaugment(image: np.ndarray, rng: Rng, policy: Sequence = IMAGENET_POLICY,
                *, pil_image: Image.Image | None = None) -> np.ndarray:
  """One random sub-policy of AutoAugment applied to a uint8 [H, W, 3] image.

  `pil_image`, if given, is the same pixels as an RGB PIL image (e.g. the resize that produced
  `image`): it saves copying `image` into PIL when an operation works on PIL images.
  """
  image = _check_image(image, 'autoaugment')
  if pil_image is not None and (pil_image.mode != 'RGB' or pil_image.size != image.shape[1::-1]):
    raise ValueError(f'autoaugment: pil_image is {pil_image.mode} {pil_image.size}, the image is RGB '
                     f'{image.shape[1::-1]}')
  sub_policy = policy[int(rng.integers(len(policy)))]
  # The probability draws, then the signs (numpy's `random(n)` gives the same doubles in order).
  draws = [rng.random() for _ in sub_policy]
  signs = [rng.random() < 0.5 for _ in sub_policy]
  height, width = image.shape[:2]
  ops = []
  for (op, probability, bin_index), draw, negate in zip(sub_policy, draws, signs):
    if draw < probability:
      value = magnitude(op, bin_index, width, height)
      ops.append((op, -value if op in _SIGNED and negate else value))
  pixels = _Pixels(image, pil_image)
  for i, (op, value) in enumerate(ops):
    _apply(pixels, op, value, histogram_next=any(later in _HISTOGRAM_OPS for later, _ in ops[i + 1:]))
  return pixels.as_array()


# --- crops and flips -------------------------------------------------------------------------------


def random_resized_crop(image: np.ndarray, rng: Rng, size: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """A crop of random area fraction `scale` and aspect `ratio`, resized (bicubic) to size x size."""
  image = _check_image(image, 'random_resized_crop')
  height, width = image.shape[:2]
  box = None
  for _ in range(10):
    area = height * width * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
      box = (left, top, left + w, top + h)
      break
  if box is None:  # fall back to the largest centred crop with an allowed aspect ratio
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, int(round(width / aspect))) if width / height < aspect else (int(round(height * aspect)), height)
    w, h = min(w, width), min(h, height)
    left, top = (width - w) // 2, (height - h) // 2
    box = (left, top, left + w, top + h)
  crop = Image.fromarray(image).resize((size, size), Image.BICUBIC, box=box)
  return np.asarray(crop, np.uint8)


def random_horizontal_flip(image: np.ndarray, rng: Rng, probability: float = 0.5) -> np.ndarray:
  image = _check_image(image, 'random_horizontal_flip')
  return np.ascontiguousarray(image[:, ::-1]) if rng.random() < probability else image


# --- EDA (Wei & Zou, 2019) -------------------------------------------------------------------------

_STOPWORDS = frozenset(
    'a an the of on in at to and or but with for from by is are was were be been this that these '
    'those there here it its my your our their his her i you we they he she some any near into '
    'onto over under than then so very'.split())

# Used when NLTK's WordNet corpus is not installed (nothing is ever downloaded at run time).
BUILTIN_SYNONYMS = {
    'photo': ['picture', 'image', 'snapshot'], 'picture': ['photo', 'image'], 'image': ['picture', 'photo'],
    'drawing': ['sketch', 'illustration'], 'small': ['little', 'tiny'], 'little': ['small'],
    'tiny': ['small', 'little'], 'large': ['big', 'huge'], 'big': ['large'], 'huge': ['big', 'large'],
    'background': ['backdrop', 'setting'], 'striped': ['stripy', 'banded'], 'noisy': ['grainy'],
    'textured': ['grainy', 'rough'], 'gray': ['grey'], 'grey': ['gray'], 'center': ['middle', 'centre'],
    'middle': ['center'], 'top': ['upper part'], 'bottom': ['lower part'], 'left': ['left side'],
    'right': ['right side'], 'banana': ['plantain'], 'house': ['home', 'building'], 'car': ['automobile'],
    'boat': ['ship', 'vessel'], 'cup': ['mug'], 'umbrella': ['parasol'], 'fish': ['goldfish'],
    'man': ['person', 'guy'], 'woman': ['lady', 'person'], 'dog': ['puppy', 'hound'], 'cat': ['kitty'],
    'street': ['road'], 'beautiful': ['pretty', 'lovely'], 'old': ['aged', 'vintage'],
    'shapes': ['figures', 'forms'], 'look': ['glance'], 'clip': ['clipping'], 'art': ['artwork'],
}

SynonymFn = Callable[[str], list]


def builtin_synonyms(word: str) -> list[str]:
  return list(BUILTIN_SYNONYMS.get(word, ()))


# NLTK's WordNet reader keeps one open file per part of speech and reads a synset by seek then
# readline, so lookups from the pipeline's read threads interleave and synsets() returns None
# entries. One lookup at a time.
_wordnet_lock = threading.Lock()


def wordnet_synonyms(word: str, wordnet) -> list[str]:
  """Synonyms of `word` from an NLTK WordNet reader (lemma names, without the word itself)."""
  with _wordnet_lock:
    names = [lemma.name() for synset in wordnet.synsets(word) for lemma in synset.lemmas()]
  found = []
  for name in names:
    name = re.sub(r'[^a-z ]', '', name.replace('_', ' ').replace('-', ' ').lower()).strip()
    if name and name != word and name not in found:
      found.append(name)
  return found


def cached_wordnet_synonyms(wordnet, maxsize: int = 1 << 16) -> SynonymFn:
  """`wordnet_synonyms` on one reader, memoised per word: EDA asks about the same words every epoch."""
  lookup = functools.lru_cache(maxsize=maxsize)(lambda word: tuple(wordnet_synonyms(word, wordnet)))
  return lambda word: list(lookup(word))


def _wordnet_may_be_installed() -> bool:
  # Importing nltk takes ~1-2 s (in every grain worker), so first look where NLTK keeps its data.
  roots = [os.environ.get('NLTK_DATA', ''), os.path.expanduser('~/nltk_data'),
           *(os.path.join(prefix, tail) for prefix in {sys.prefix, sys.base_prefix}
             for tail in ('nltk_data', 'share/nltk_data', 'lib/nltk_data')),
           '/usr/share/nltk_data', '/usr/local/share/nltk_data', '/usr/lib/nltk_data',
           '/usr/local/lib/nltk_data']
  roots = [r for root in roots for r in root.split(os.pathsep) if r]
  return any(os.path.exists(os.path.join(root, 'corpora', name))
             for root in roots for name in ('wordnet', 'wordnet.zip'))


@functools.lru_cache(maxsize=1)
def default_synonyms() -> SynonymFn:
  """WordNet when its NLTK corpus is installed, else the built-in table; decided once, logged."""
  if not _wordnet_may_be_installed():
    logging.info('EDA synonyms: built-in table (%d words); no NLTK WordNet corpus found',
                 len(BUILTIN_SYNONYMS))
    return builtin_synonyms
  try:
    from nltk.corpus import wordnet  # pylint: disable=g-import-not-at-top
    with _wordnet_lock:  # loads the corpus; other threads may be reading it already
      wordnet.synsets('photo')
  except Exception as error:  # LookupError without the corpus, ImportError without nltk
    logging.info('EDA synonyms: built-in table (%d words); WordNet unavailable: %s',
                 len(BUILTIN_SYNONYMS), type(error).__name__)
    return builtin_synonyms
  logging.info('EDA synonyms: NLTK WordNet')
  return cached_wordnet_synonyms(wordnet)


def _words(caption: str) -> list[str]:
  # EDA cleans text to lower-case letters, digits and spaces.
  return re.sub(r'[^a-z0-9 ]', ' ', caption.lower().replace('-', ' ')).split()


def _synonym_replacement(words, rng, n, synonyms):
  out = list(words)
  positions = [i for i, w in enumerate(out) if w not in _STOPWORDS]
  rng.shuffle(positions)
  replaced = 0
  for i in positions:
    options = synonyms(out[i])
    if options:
      out[i] = options[int(rng.integers(len(options)))]
      replaced += 1
      if replaced >= n:
        break
  return out


def _random_insertion(words, rng, n, synonyms):
  out = list(words)
  for _ in range(n):
    for _ in range(10):  # a few tries to find a word that has a synonym
      options = synonyms(out[int(rng.integers(len(out)))])
      if options:
        out.insert(int(rng.integers(len(out) + 1)), options[int(rng.integers(len(options)))])
        break
  return out


def _random_swap(words, rng, n, synonyms):
  del synonyms
  out = list(words)
  for _ in range(n):
    if len(out) < 2:
      break
    i = int(rng.integers(len(out)))
    j = int(rng.integers(len(out) - 1))  # a second, different position
    j += j >= i
    out[i], out[j] = out[j], out[i]
  return out


def _random_deletion(words, rng, alpha, synonyms):
  del synonyms
  if len(words) == 1:
    return list(words)
  kept = [w for w in words if rng.random() >= alpha]
  return kept or [words[int(rng.integers(len(words)))]]


EDA_OPERATIONS = ('synonym_replacement', 'random_insertion', 'random_swap', 'random_deletion')


def eda(caption: str, rng: Rng, alpha: float = 0.1,
        synonyms: SynonymFn | None = None) -> str:
  """One EDA operation, chosen at random, on a caption; never empties a non-empty caption.

  `alpha` sets the share of words changed (at least one); `synonyms(word) -> list[str]` defaults
  to WordNet when installed, else a small built-in table.
  """
  words = _words(caption)
  if not words:
    return caption
  synonyms = synonyms or default_synonyms()
  n = max(1, int(alpha * len(words)))
  operation = EDA_OPERATIONS[int(rng.integers(len(EDA_OPERATIONS)))]
  if operation == 'synonym_replacement':
    out = _synonym_replacement(words, rng, n, synonyms)
  elif operation == 'random_insertion':
    out = _random_insertion(words, rng, n, synonyms)
  elif operation == 'random_swap':
    out = _random_swap(words, rng, n, synonyms)
  else:
    out = _random_deletion(words, rng, alpha, synonyms)
  return ' '.join(out)
