"""CleanCLIP's in-modal views and the training crops: AutoAugment, EDA, random resized crop, flip.

    view = autoaugment(image_uint8_hwc, rng)           # AutoAugment, ImageNet policy
    text = eda(caption, rng)                           # one random EDA operation
    crop = random_resized_crop(image, rng, size=224)   # Inception-style crop, bicubic resize
    image = random_horizontal_flip(image, rng)

All functions are pure given `rng` (a `np.random.Generator`), numpy/PIL only (they run in grain
workers), and take and return uint8 [H, W, 3] arrays / str.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import sys
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance

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


def _apply_channel_luts(pixels: np.ndarray, make_luts: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
  """Maps each channel through its own 256-entry table, built from the [3, 256] histograms.

  PIL computes the histograms and applies the tables in C for all channels at once, ~2x faster at
  224 px than numpy's per-channel bincount and fancy indexing (these two operations were
  AutoAugment's costliest); the tables, hence the pixels, are unchanged.
  """
  image = Image.fromarray(pixels)
  histograms = np.asarray(image.histogram(), np.int64).reshape(3, 256)
  return np.asarray(image.point(make_luts(histograms).ravel().tolist()), np.uint8)


def _solarize(pixels: np.ndarray, threshold: float) -> np.ndarray:
  # A table lookup: ~3x faster than np.where over the pixels, same values.
  values = np.arange(256)
  return np.take(np.where(values >= threshold, 255 - values, values).astype(np.uint8), pixels)


def _extremes(histograms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Smallest and largest value present in each channel."""
  present = histograms > 0
  return np.argmax(present, axis=1), 255 - np.argmax(present[:, ::-1], axis=1)


def _equalize_luts(histograms: np.ndarray) -> np.ndarray:
  # PIL's ImageOps.equalize table per channel; identity where all but one value is empty.
  _, last = _extremes(histograms)
  step = (histograms.sum(axis=1) - histograms[np.arange(3), last]) // 255
  below = np.cumsum(histograms, axis=1) - histograms
  luts = (below + step[:, None] // 2) // np.maximum(step, 1)[:, None]
  return np.where(step[:, None] > 0, np.clip(luts, 0, 255), np.arange(256))


def _autocontrast_luts(histograms: np.ndarray) -> np.ndarray:
  # Stretch [min, max] to [0, 255], truncating (PIL's ImageOps.autocontrast); identity if flat.
  lo, hi = (v.astype(np.float64)[:, None] for v in _extremes(histograms))
  scale = np.where(hi > lo, 255 / np.maximum(hi - lo, 1), 1.0)
  offset = np.where(hi > lo, -lo * scale, 0.0)
  return np.clip(np.trunc(np.arange(256) * scale + offset), 0, 255).astype(np.int64)


def _equalize(pixels: np.ndarray) -> np.ndarray:
  return _apply_channel_luts(pixels, _equalize_luts)


def _autocontrast(pixels: np.ndarray) -> np.ndarray:
  return _apply_channel_luts(pixels, _autocontrast_luts)


_PIXEL_OPS = {
    'Posterize': lambda x, v: x & np.uint8((0xFF << (8 - int(v))) & 0xFF),
    'Solarize': _solarize,
    'Invert': lambda x, v: 255 - x,
    'AutoContrast': lambda x, v: _autocontrast(x),
    'Equalize': lambda x, v: _equalize(x),
}


def apply_op(image: np.ndarray, op: str, value: float) -> np.ndarray:
  """Applies one AutoAugment operation with a signed magnitude `value` to a uint8 [H, W, 3] image."""
  if op in _PIXEL_OPS:
    return _PIXEL_OPS[op](image, value)
  pil = Image.fromarray(image)
  if op == 'ShearX':
    pil = _affine(pil, (1, value, 0, 0, 1, 0))
  elif op == 'ShearY':
    pil = _affine(pil, (1, 0, 0, value, 1, 0))
  elif op == 'TranslateX':
    pil = _affine(pil, (1, 0, value, 0, 1, 0))
  elif op == 'TranslateY':
    pil = _affine(pil, (1, 0, 0, 0, 1, value))
  elif op == 'Rotate':
    pil = pil.rotate(value, resample=Image.NEAREST, fillcolor=(0, 0, 0))
  elif op == 'Brightness':
    pil = ImageEnhance.Brightness(pil).enhance(1 + value)
  elif op == 'Color':
    pil = ImageEnhance.Color(pil).enhance(1 + value)
  elif op == 'Contrast':
    pil = ImageEnhance.Contrast(pil).enhance(1 + value)
  elif op == 'Sharpness':
    pil = ImageEnhance.Sharpness(pil).enhance(1 + value)
  else:
    raise ValueError(f'unknown AutoAugment operation {op!r}')
  return np.asarray(pil, np.uint8)


def _check_image(image: np.ndarray, where: str) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'{where}: expected a uint8 [H, W, 3] image, got {image.dtype} {list(image.shape)}')
  return image


def autoaugment(image: np.ndarray, rng: np.random.Generator,
                policy: Sequence = IMAGENET_POLICY) -> np.ndarray:
  """One random sub-policy of AutoAugment applied to a uint8 [H, W, 3] image."""
  image = _check_image(image, 'autoaugment')
  sub_policy = policy[int(rng.integers(len(policy)))]
  draws, signs = rng.random(len(sub_policy)), rng.random(len(sub_policy)) < 0.5
  height, width = image.shape[:2]
  for (op, probability, bin_index), draw, negate in zip(sub_policy, draws, signs):
    if draw < probability:
      value = magnitude(op, bin_index, width, height)
      if op in _SIGNED and negate:
        value = -value
      image = apply_op(image, op, value)
  return image


# --- crops and flips -------------------------------------------------------------------------------


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
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


def random_horizontal_flip(image: np.ndarray, rng: np.random.Generator, probability: float = 0.5) -> np.ndarray:
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


def wordnet_synonyms(word: str, wordnet) -> list[str]:
  """Synonyms of `word` from an NLTK WordNet reader (lemma names, without the word itself)."""
  found = []
  for synset in wordnet.synsets(word):
    for lemma in synset.lemmas():
      name = lemma.name().replace('_', ' ').replace('-', ' ').lower()
      name = re.sub(r'[^a-z ]', '', name).strip()
      if name and name != word and name not in found:
        found.append(name)
  return found


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
    wordnet.synsets('photo')
  except Exception as error:  # LookupError without the corpus, ImportError without nltk
    logging.info('EDA synonyms: built-in table (%d words); WordNet unavailable: %s',
                 len(BUILTIN_SYNONYMS), type(error).__name__)
    return builtin_synonyms
  logging.info('EDA synonyms: NLTK WordNet')
  return functools.partial(wordnet_synonyms, wordnet=wordnet)


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
    i, j = rng.choice(len(out), 2, replace=False)
    out[i], out[j] = out[j], out[i]
  return out


def _random_deletion(words, rng, alpha, synonyms):
  del synonyms
  if len(words) == 1:
    return list(words)
  kept = [w for w in words if rng.random() >= alpha]
  return kept or [words[int(rng.integers(len(words)))]]


EDA_OPERATIONS = ('synonym_replacement', 'random_insertion', 'random_swap', 'random_deletion')


def eda(caption: str, rng: np.random.Generator, alpha: float = 0.1,
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
