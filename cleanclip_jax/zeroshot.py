"""Zero-shot classifiers: class names and prompt templates -> one text embedding per class.

A class's embedding is the mean of its L2-normalised template embeddings ("a photo of a {}.",
...), normalised again (CLIP's prompt ensembling). Image logits are then cosine similarities.

Class-name and template lists are plain text files, one entry per line; templates mark the class
name with `{}`. Built-in names: class names `synthetic | imagenet | cifar10 | cifar100`, templates
`synthetic | imagenet` (CLIP's 80) `| cifar` (CLIP's 18) `| simple` ("a photo of a {}."); anything
else is read as a file path.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

ASSETS = pathlib.Path(__file__).resolve().parent / 'assets'
BUILTIN_CLASSNAMES = {
    'imagenet': 'imagenet_classnames.txt',
    'cifar10': 'cifar10_classnames.txt',
    'cifar100': 'cifar100_classnames.txt',
}
BUILTIN_TEMPLATES = {
    'imagenet': 'imagenet_templates.txt',
    'cifar': 'cifar_templates.txt',
}
SIMPLE_TEMPLATES = ('a photo of a {}.',)

# Class-name files whose repeated names were already reported (the list is read several times a run).
_REPORTED_REPEATS: set[str] = set()


def load_classnames(spec: str) -> list[str]:
  """Class names for a built-in name or a .txt file (one per line; the line number is the index)."""
  if spec == 'synthetic':
    from cleanclip_jax.data import synthetic
    return [str(name) for name in synthetic.CLASS_NAMES]
  if spec in BUILTIN_CLASSNAMES:
    # ImageNet's own list repeats 'missile' and 'sunglasses' (CLIP's names for two pairs of
    # classes); it is used as published, so only a user's file is checked.
    return _read_lines(ASSETS / BUILTIN_CLASSNAMES[spec], what='class names',
                       known=['synthetic', *BUILTIN_CLASSNAMES])
  path = pathlib.Path(spec)
  names = _read_lines(path, what='class names', known=['synthetic', *BUILTIN_CLASSNAMES])
  _report_repeats(path, names)
  return names


def _report_repeats(path: pathlib.Path, names: Sequence[str]) -> None:
  """Warns (once per file) about class names that repeat: they get the same prompts, so the same
  text embedding, and ties go to the first, so a later copy is never predicted."""
  lines: dict[str, list[int]] = {}
  for number, name in enumerate(names, 1):
    # As the tokenizer sees it (lower case, whitespace collapsed): such names embed identically.
    lines.setdefault(' '.join(name.split()).lower(), []).append(number)
  repeats = {name: numbers for name, numbers in lines.items() if len(numbers) > 1}
  key = str(path.resolve())
  if not repeats or key in _REPORTED_REPEATS:
    return
  _REPORTED_REPEATS.add(key)
  listed = '; '.join(f'{name!r} on lines {", ".join(map(str, numbers))}'
                     for name, numbers in list(repeats.items())[:10])
  more = f' (and {len(repeats) - 10} more)' if len(repeats) > 10 else ''
  log.warning('%s: %d class name(s) repeat: %s%s. A repeat is never predicted (it scores the same '
              'as the first, which wins ties); give each class a distinct name unless that is '
              'intended', path, len(repeats), listed, more)


def load_templates(spec: str) -> list[str]:
  """Prompt templates (each with exactly one `{}`) for a built-in name or a .txt file."""
  if spec == 'simple':
    return list(SIMPLE_TEMPLATES)
  if spec == 'synthetic':
    from cleanclip_jax.data import synthetic
    templates = [_as_format_string(t) for t in synthetic.TEMPLATES]
    source = 'data.synthetic.TEMPLATES'
  else:
    path = ASSETS / BUILTIN_TEMPLATES[spec] if spec in BUILTIN_TEMPLATES else pathlib.Path(spec)
    templates = _read_lines(path, what='templates',
                            known=['synthetic', 'simple', *BUILTIN_TEMPLATES])
    source = str(path)
  for number, template in enumerate(templates, 1):
    if template.count('{}') != 1:
      raise ValueError(f'{source}: template {number} {template!r} must contain exactly one "{{}}" '
                       'where the class name goes')
  return templates


def target_index(classnames: Sequence[str], target: str) -> int:
  """The class index of the attack target; the first one if a name repeats (ImageNet's do)."""
  try:
    return list(classnames).index(target)
  except ValueError:
    wanted = target.lower().strip()
    close = [name for name in classnames if wanted in name.lower() or name.lower() in wanted][:5]
    hint = f'; similar names: {close}' if close else ''
    raise ValueError(f'eval.target={target!r} is not one of the {len(classnames)} evaluation '
                     f'class names (eval.classnames){hint}') from None


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
  """All prompts, class-major: prompt c * len(templates) + t is template t filled with class c."""
  return [template.replace('{}', name) for name in classnames for template in templates]


def class_embeddings(encode_text: Callable[[np.ndarray], np.ndarray], tokenize: Callable,
                     classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
  """The zero-shot classifier weights, float32 [num_classes, embed_dim], rows of unit norm.

  Args:
    encode_text: int32 tokens [N, L] -> text embeddings [N, D] (any batching is the caller's).
    tokenize: list of strings -> int32 tokens [N, L].
  """
  if not classnames or not templates:
    raise ValueError('class_embeddings needs at least one class name and one template')
  embeddings = np.asarray(encode_text(tokenize(prompts(classnames, templates))), np.float32)
  embeddings = embeddings.reshape(len(classnames), len(templates), -1)
  return ensemble(embeddings)


def ensemble(template_embeddings: np.ndarray) -> np.ndarray:
  """[C, T, D] per-template embeddings -> [C, D]: normalise each, average, normalise again."""
  x = np.asarray(template_embeddings, np.float32)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  x = x.mean(axis=1)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _as_format_string(template) -> str:
  if callable(template):  # a `lambda c: f'...{c}...'` style template
    return template('{}')
  return str(template)


def _read_lines(path: pathlib.Path, what: str, known: list[str]) -> list[str]:
  if not path.is_file():
    raise FileNotFoundError(f'{what} file {str(path)!r} not found; give a path to a .txt file '
                            f'(one entry per line) or one of {known}')
  lines = path.read_text(encoding='utf-8').splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  for number, line in enumerate(lines, 1):
    if not line.strip():
      # Not skipped: in a class-name file the line number is the class index.
      raise ValueError(f'{path}:{number}: empty line in the {what} file; remove it')
  if not lines:
    raise ValueError(f'{path}: the {what} file is empty')
  return [line.strip() for line in lines]
