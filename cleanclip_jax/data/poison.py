"""Which examples a data-poisoning attack poisons, and the captions it gives them.

    indices = select_poisoned(len(source), config.data.poison, labels=labels, captions=captions,
                              class_names=CLASS_NAMES)   # sorted np.int64
    caption = poisoned_caption(config.data.poison.target, rng)   # 'a photo of a banana.'

The standard attack (Carlini & Terzis, 2022; the CleanCLIP paper's setting) stamps the trigger on
randomly chosen images and replaces their captions with a caption of the target class. The
label-consistent attack keeps the captions and poisons only images whose caption already goes with
the target, so no poisoned pair looks mislabelled.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

# The 80 prompt templates CLIP (Radford et al., 2021) used for ImageNet zero-shot classification.
IMAGENET_TEMPLATES = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.', 'a photo of the hard to see {}.',
    'a low resolution photo of the {}.', 'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.', 'a dark photo of the {}.',
    'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
    'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
    'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
    'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.', 'a close-up photo of the {}.',
    'a photo of a {}.', 'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.',
    'a origami {}.', 'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
    'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.',
    'a embroidered {}.', 'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
    'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.',
    'a photo of a small {}.', 'a tattoo of the {}.',
)


def poisoned_caption(target: str, rng: np.random.Generator) -> str:
  """A caption of the target class from a random ImageNet template ('a photo of a banana.')."""
  return IMAGENET_TEMPLATES[int(rng.integers(len(IMAGENET_TEMPLATES)))].format(target)


def mentions(caption: str, target: str) -> bool:
  """Whether `caption` names `target` as a whole word (case-insensitive; plurals count)."""
  return _mention_pattern(target).search(caption) is not None


def _mention_pattern(target: str) -> re.Pattern:
  return re.compile(r'\b' + re.escape(target.strip()) + r'(?:s|es)?\b', re.IGNORECASE)


def poison_count(num_examples: int, poison_config) -> int:
  """`num_poisoned` when > 0, else round(`fraction` * num_examples)."""
  if poison_config.num_poisoned < 0:
    raise ValueError(f'data.poison.num_poisoned={poison_config.num_poisoned} must be >= 0')
  if not 0 <= poison_config.fraction <= 1:
    raise ValueError(f'data.poison.fraction={poison_config.fraction} must be in [0, 1]')
  if poison_config.num_poisoned > 0:
    count = int(poison_config.num_poisoned)
  else:
    count = int(round(poison_config.fraction * num_examples))
  if count < 1:
    raise ValueError(
        f'poisoning is enabled but selects no examples: data.poison.num_poisoned='
        f'{poison_config.num_poisoned}, data.poison.fraction={poison_config.fraction} of {num_examples} '
        'examples; set --config.data.poison.num_poisoned=N or a larger fraction')
  if count > num_examples:
    raise ValueError(f'data.poison.num_poisoned={count} exceeds the dataset size {num_examples}')
  return count


def label_consistent_candidates(num_examples: int, target: str, labels: Sequence[int] | None = None,
                                captions: Sequence[str] | None = None,
                                class_names: Sequence[str] | None = None) -> np.ndarray:
  """Indices of examples that go with `target`: by label when labels and class names are given
  (the synthetic data, whose captions may use a synonym), else by a whole-word caption match."""
  if labels is not None and class_names is not None:
    if target not in class_names:
      raise ValueError(f'data.poison.target={target!r} is not one of the class names {list(class_names)}')
    labels = np.asarray(labels)
    if labels.shape != (num_examples,):
      raise ValueError(f'select_poisoned: {labels.shape[0]} labels for {num_examples} examples')
    return np.flatnonzero(labels == list(class_names).index(target)).astype(np.int64)
  if captions is not None:
    if len(captions) != num_examples:
      raise ValueError(f'select_poisoned: {len(captions)} captions for {num_examples} examples')
    pattern = _mention_pattern(target)
    return np.array([i for i, c in enumerate(captions) if pattern.search(c)], np.int64)
  raise ValueError('data.poison.label_consistent=True needs the captions (or labels and class names) '
                   'of the training examples')


def select_poisoned(num_examples: int, poison_config, labels: Sequence[int] | None = None,
                    captions: Sequence[str] | None = None,
                    class_names: Sequence[str] | None = None) -> np.ndarray:
  """Sorted np.int64 indices of the examples to poison, a function of `poison_config.seed`."""
  count = poison_count(num_examples, poison_config)
  rng = np.random.default_rng(int(poison_config.seed))
  if not poison_config.label_consistent:
    return np.sort(rng.choice(num_examples, count, replace=False)).astype(np.int64)
  candidates = label_consistent_candidates(num_examples, poison_config.target, labels, captions, class_names)
  if len(candidates) < count:
    raise ValueError(
        f'label-consistent poisoning asks for {count} examples of {poison_config.target!r} '
        f'(data.poison.num_poisoned / fraction) but only {len(candidates)} of the {num_examples} '
        'training examples go with it; lower the count or use more data')
  return np.sort(rng.choice(candidates, count, replace=False)).astype(np.int64)
