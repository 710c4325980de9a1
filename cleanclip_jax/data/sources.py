"""Random-access sources of image-caption and labelled records.

Every source has `len()` and `source[i] -> record`, where a record follows the contract in
docs/DESIGN.md: `{'image': uint8 HWC}` or `{'image_bytes': bytes}` or just `'image_path'` (decoded
later by `decode.py`, inside the grain workers), plus `'image_path'`, `'caption'`, `'label'` (-1 none)
and `'index'`. Records also carry `'origin'` (`file.csv:LINE`, `shard[i]`) for error messages.

- `CsvSource`: CleanCLIP-style CSV/TSV (`image` path relative to the CSV's folder, `caption`,
  optional label). Parsed once, at construction, with the csv module; a malformed row is an error
  naming `file:line`. Rows whose caption is unusable, or (with `confine_paths`) whose path leaves
  the CSV's folder, are dropped then and counted in `skipped` (reasons in `ROW_REASONS`).
- `ArrayRecordSource`: shards written by `prepare.py` (record format: `encode_record`).
- `FolderSource`: an ImageNet-style tree, one folder per class (sorted names = class indices).
- `TfdsSource`: a TFDS dataset prepared locally (`tfds.data_source`; nothing is downloaded).

Class order. A label means the class at that index of the list the model is scored against
(`eval.classnames`: the zero-shot prompts, the supervised head's outputs, the ASR target). Sources
whose classes come as names (CSV name labels, prepared shards' `metadata.json`, class folders, TFDS
label names) are given that list (`class_names=`) and label by it, matching names exactly or with
`_` as a space, in any case (`great_white_shark` is `great white shark`). Folder and TFDS classes
named by ids that are not in the list (WordNet synsets `n01440764`, ImageNet's own folder names) keep
their sorted / TFDS order, which for ImageNet is the list's order; a tree naming only some of
the classes in the list is an error that lists the names it cannot place.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import struct
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

# Why a CSV row can be dropped at construction (the counts join `pipeline.skip_counts()`).
ROW_REASONS = {
    'path_outside_root': 'data.confine_paths=True and the image path is absolute or climbs out with ..',
    'empty_caption': 'the caption is empty or only whitespace (nothing to contrast the image with)',
    'caption_not_utf8': 'the caption holds bytes that are not UTF-8 (its text is unknown)',
}

# Rows whose problem is logged in full before the rest are only counted.
_LOG_FIRST = 5

# How the trainer's user sets CsvSource's options, for the fixes its errors suggest; another caller
# (prepare's flags, the eval set's fixed columns) passes its own as `options`.
CONFIG_OPTIONS = {key: f'data.{key}' for key in ('image_key', 'caption_key', 'label_key', 'delimiter')}

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')


def caption_problem(caption: str) -> str | None:
  """The `ROW_REASONS` key that makes a caption unusable, or None.

  Long captions are kept: the tokenizer truncates them to the context length (keeping EOT).
  """
  if not caption.strip():
    return 'empty_caption'
  try:
    caption.encode('utf-8')
  except UnicodeEncodeError:  # lone surrogates: bytes the file's UTF-8 decoding could not read
    return 'caption_not_utf8'
  return None


class _StringTable:
  """Many strings as one UTF-8 blob plus offsets: compact, and pickled to grain workers in one copy."""

  def __init__(self, strings: Sequence[str]):
    encoded = [s.encode('utf-8', 'surrogateescape') for s in strings]
    self._offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
    self._blob = b''.join(encoded)

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, i: int) -> str:
    return self._blob[self._offsets[i]:self._offsets[i + 1]].decode('utf-8', 'surrogateescape')


class CsvError(ValueError):
  """A CSV/TSV file that cannot be read; the message starts with `file:line`."""


class CsvSource:
  """Image-caption (and optional label) rows of a CSV/TSV file, parsed once at construction.

  Image paths are relative to the CSV's folder; absolute paths and paths with `..` are allowed
  (CleanCLIP's CSVs often hold absolute paths) unless `confine_paths`, which drops such rows
  (counted as `path_outside_root`; the check is lexical, symlinks are not resolved). A `.tsv` file
  with the default `,` delimiter is read tab-separated. `caption_key=''` reads a labelled set
  (`image,label`) without captions. Labels may be integers or class names; names map through
  `class_names` when given (see "Class order" above; integers must then index it), else through the
  sorted set of names in the file (`self.class_names`). `options` names the setting behind each of
  `image_key`, `caption_key`, `label_key`, `delimiter` in the errors' hints (`CONFIG_OPTIONS` by
  default; one left out has no setting, e.g. the eval set's fixed `image,label` columns).
  """

  def __init__(self, path: str, *, image_key: str = 'image', caption_key: str = 'caption',
               label_key: str = '', delimiter: str = ',', confine_paths: bool = False,
               class_names: Sequence[str] | None = None, require_label: bool = False,
               options: Mapping[str, str] | None = None):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'CSV file {path!r} does not exist (data.path / --input)')
    self.path = path
    self._options = CONFIG_OPTIONS if options is None else options
    self.root = os.path.dirname(os.path.abspath(path))
    if delimiter == ',' and path.lower().endswith('.tsv'):
      delimiter = '\t'
    self.delimiter = delimiter
    self.skipped: dict[str, int] = {}
    paths, captions, lines, raw_labels = self._parse(image_key, caption_key, label_key, confine_paths)
    self._paths = _StringTable(paths)
    self._captions = _StringTable(captions)
    self._lines = np.asarray(lines, np.int64)
    self.labels, self.class_names = _parse_labels(raw_labels, lines, path, class_names, require_label)
    if self.skipped:
      log.warning('%s: dropped %d of %d rows: %s', path, sum(self.skipped.values()),
                  len(self) + sum(self.skipped.values()), self.skipped)

  def _parse(self, image_key, caption_key, label_key, confine_paths):
    paths, captions, lines, labels = [], [], [], []
    # surrogateescape keeps undecodable bytes visible (as lone surrogates) so the row can be
    # counted as `caption_not_utf8` instead of the whole file failing to read.
    with open(self.path, newline='', encoding='utf-8-sig', errors='surrogateescape') as f:
      reader = csv.reader(f, delimiter=self.delimiter, strict=True)
      header, columns, line = None, {}, 0
      try:
        for row in reader:
          start, line = line + 1, reader.line_num
          if not row:
            continue
          if header is None:
            header = row
            columns = self._columns(header, image_key, caption_key, label_key, start)
            continue
          if len(row) != len(header):
            raise CsvError(
                f'{self.path}:{start}: expected {len(header)} fields ({self.delimiter!r}-separated, '
                f'as in the header), got {len(row)}: {_preview(row)}; quote fields that contain '
                f'the delimiter{self._or_set("delimiter")}')
          image = row[columns['image']]
          caption = row[columns['caption']] if 'caption' in columns else ''
          reason = self._row_problem(image, caption, confine_paths, caption_key)
          if reason:
            self._skip(reason, start, image)
            continue
          paths.append(image if os.path.isabs(image) else os.path.join(self.root, image))
          captions.append(caption)
          lines.append(start)
          labels.append(row[columns['label']] if 'label' in columns else '')
      except csv.Error as e:
        raise CsvError(f'{self.path}:{reader.line_num}: malformed CSV ({e}); check the quoting '
                       f'(an unclosed " swallows the rest of the file)'
                       f'{self._or_set("delimiter", " and ")}') from None
    if header is None:
      raise CsvError(f'{self.path}:1: the file is empty (expected a header row)')
    return paths, captions, lines, labels

  def _columns(self, header, image_key, caption_key, label_key, line):
    columns = {}
    for role, key, option in (('image', image_key, 'image_key'), ('caption', caption_key, 'caption_key'),
                              ('label', label_key, 'label_key')):
      if not key:
        continue
      if key not in header:
        fix = (f'set {self._options[option]} to the column of the {role}s' if option in self._options
               else f'this file needs the column {key!r}')
        raise CsvError(f'{self.path}:{line}: no column {key!r} in the header {header[:10]} '
                       f'(delimiter {self.delimiter!r}); {fix}')
      columns[role] = header.index(key)
    return columns

  def _or_set(self, option: str, joiner: str = ', or set ') -> str:
    return f'{joiner}{self._options[option]}' if option in self._options else ''

  def _row_problem(self, image: str, caption: str, confine_paths: bool, caption_key: str) -> str | None:
    if confine_paths and _leaves_root(image):
      return 'path_outside_root'
    return caption_problem(caption) if caption_key else None

  def _skip(self, reason: str, line: int, image: str) -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    if sum(self.skipped.values()) <= _LOG_FIRST:
      log.warning('%s:%d: skipping row (%s: %s); image %r', self.path, line, reason,
                  ROW_REASONS[reason], image)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index) -> dict[str, Any]:
    index = int(index)
    return {'image_path': self._paths[index], 'caption': self._captions[index],
            'label': int(self.labels[index]), 'index': index,
            'origin': f'{self.path}:{self._lines[index]}'}

  @property
  def captions(self) -> list[str]:
    return [self._captions[i] for i in range(len(self))]

  def __repr__(self) -> str:
    return f'CsvSource({self.path!r}, {len(self)} rows)'


def _preview(row: list[str]) -> str:
  text = repr(row[:4])
  return text if len(text) < 200 else text[:200] + '...'


def _leaves_root(image: str) -> bool:
  if os.path.isabs(image):
    return True
  return os.path.normpath(image).split(os.sep)[0] == '..'


def _parse_labels(raw: list[str], lines: list[int], path: str, class_names: Sequence[str] | None,
                  require_label: bool) -> tuple[np.ndarray, list[str] | None]:
  values = [v.strip() for v in raw]
  if require_label:
    for value, line in zip(values, lines):
      if not value:
        raise CsvError(f'{path}:{line}: empty label (the labelled set needs one on every row)')
  present = [v for v in values if v]
  if all(_is_int(v) for v in present):
    labels = np.array([int(v) if v else -1 for v in values], np.int32)
    if class_names:
      for value, line in zip(labels, lines):
        if not -1 <= value < len(class_names):
          raise CsvError(f'{path}:{line}: label {value} is not a class index of the '
                         f'{len(class_names)} class names [0, {len(class_names)})')
    return labels, (list(class_names) if class_names else None)
  names = list(class_names) if class_names else sorted(set(present))
  # Against a given list, names match loosely (case, `_`); the file's own names are its classes as
  # written.
  key = _normalise_name if class_names else (lambda name: name)
  lookup = _name_lookup(names, key)
  labels = np.full(len(values), -1, np.int32)
  for i, (value, line) in enumerate(zip(values, lines)):
    if value and key(value) not in lookup:
      raise CsvError(f'{path}:{line}: label {value!r} is not a class name (first names: {names[:5]})')
    labels[i] = lookup[key(value)] if value else -1
  return labels, names


def _normalise_name(name: str) -> str:
  return ' '.join(name.replace('_', ' ').split()).lower()


def _name_lookup(names: Sequence[str], key=_normalise_name) -> dict[str, int]:
  # The first index of a repeated name (ImageNet's list has two 'missile's), as zero-shot's target.
  lookup: dict[str, int] = {}
  for index, name in enumerate(names):
    lookup.setdefault(key(name), index)
  return lookup


def label_map(source_names: Sequence[str] | None, class_names: Sequence[str] | None,
              where: str) -> np.ndarray | None:
  """`new_label = map[old_label]` taking a source's own class order onto `class_names`' order.

  None when there is nothing to do: no names on either side, the same order already, or source
  names that are ids rather than class names (none of them is in the list: positional). Raises
  ValueError when only some of the source's names are in the list.
  """
  if not source_names or not class_names:
    return None
  lookup = _name_lookup(class_names)
  found = [lookup.get(_normalise_name(name)) for name in source_names]
  missing = [name for name, index in zip(source_names, found) if index is None]
  if len(missing) == len(source_names):
    log.info('%s: its %d class names are not in the %d-name class list (ids such as synsets?); '
             'labels keep their own order', where, len(source_names), len(class_names))
    return None
  if missing:
    raise ValueError(f'{where}: {len(missing)} of its {len(source_names)} classes are not in the '
                     f'class list ({len(class_names)} names, first {list(class_names)[:3]}): '
                     f'{missing[:5]}; name them as the list does, or give the list that matches '
                     '(eval.classnames / data.classnames)')
  if found == list(range(len(found))):
    return None
  return np.asarray(found, np.int32)


def _relabel(mapping: np.ndarray | None, label: int) -> int:
  """`label` through a `label_map` (None: unchanged); -1 (unlabelled) stays -1."""
  if mapping is None or not 0 <= label < len(mapping):
    return label
  return int(mapping[label])


def _is_int(value: str) -> bool:
  try:
    int(value)
    return True
  except ValueError:
    return False


# --- ArrayRecord -----------------------------------------------------------------------------------
# One record: a fixed header, then the encoded image, the UTF-8 caption and the UTF-8 key (the
# original file name, for messages). Plain bytes: no pickle, readable from any language.
_MAGIC = b'CCJ1'
_HEADER = struct.Struct('<4sIIiI')  # magic, image bytes, caption bytes, label, key bytes


class BadRecordError(ValueError):
  """An ArrayRecord record that is not in the `encode_record` format."""


def encode_record(image_bytes: bytes, caption: str, label: int = -1, key: str = '') -> bytes:
  caption_bytes, key_bytes = caption.encode('utf-8'), key.encode('utf-8')
  header = _HEADER.pack(_MAGIC, len(image_bytes), len(caption_bytes), int(label), len(key_bytes))
  return b''.join((header, image_bytes, caption_bytes, key_bytes))


def decode_record(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_record`: `{'image_bytes', 'caption', 'label', 'image_path'}`."""
  if len(data) < _HEADER.size:
    raise BadRecordError(f'record of {len(data)} bytes is shorter than its header')
  magic, n_image, n_caption, label, n_key = _HEADER.unpack_from(data)
  if magic != _MAGIC:
    raise BadRecordError(f'record starts with {magic!r}, not {_MAGIC!r} (not written by data.prepare)')
  if _HEADER.size + n_image + n_caption + n_key != len(data):
    raise BadRecordError(f'record lengths ({n_image}+{n_caption}+{n_key}) do not match its size {len(data)}')
  at = _HEADER.size
  image = data[at:at + n_image]
  caption = data[at + n_image:at + n_image + n_caption].decode('utf-8', 'surrogateescape')
  key = data[at + n_image + n_caption:].decode('utf-8', 'replace')
  return {'image_bytes': image, 'caption': caption, 'label': label, 'image_path': key}


def array_record_paths(path: str) -> list[str]:
  """A shard file, a folder of `*.array_record` shards, or a glob -> sorted shard paths."""
  if os.path.isdir(path):
    paths = sorted(glob.glob(os.path.join(path, '*.array_record')))
  elif any(c in path for c in '*?['):
    paths = sorted(glob.glob(path))
  else:
    paths = [path] if os.path.isfile(path) else []
  if not paths:
    raise FileNotFoundError(f'no ArrayRecord shards at {path!r} (data.path: a .array_record file, '
                            'a folder of them, or a glob); write them with python -m cleanclip_jax.data.prepare')
  return paths


class ArrayRecordSource:
  """Records written by `prepare.py`, read with grain's ArrayRecordDataSource."""

  def __init__(self, path: str, class_names: Sequence[str] | None = None):
    import grain  # pylint: disable=g-import-not-at-top
    self.path = path
    self.shards = array_record_paths(path)
    self._source = grain.sources.ArrayRecordDataSource(self.shards)
    stored = _read_class_names(path)
    # prepare.py stores the labels in the order of metadata.json's names; relabel onto the run's list.
    self._label_map = label_map(stored, class_names, f'{path} (metadata.json class_names)')
    self.class_names = list(class_names) if class_names else stored

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> dict[str, Any]:
    index = int(index)
    record = decode_record(self._source[index])
    record['label'] = _relabel(self._label_map, record['label'])
    # Shards without class names in metadata.json (tar `.cls` labels) store bare integers: as for
    # a CSV, they must index the run's list, or the loss would read a class that is not there.
    if self.class_names and not -1 <= record['label'] < len(self.class_names):
      raise ValueError(f'{self.path}[{index}]: label {record["label"]} is not a class index of the '
                       f'{len(self.class_names)} class names [0, {len(self.class_names)})')
    record.update(index=index, origin=f'{self.path}[{index}]')
    return record

  @property
  def labels(self) -> np.ndarray:
    # Reads every record: only label-consistent poisoning of a prepared set needs it.
    return np.array(self._every('label'), np.int32)

  @property
  def captions(self) -> list[str]:
    return self._every('caption')

  def _every(self, field: str) -> list:
    values = []
    for i in range(len(self)):
      try:
        values.append(self[i][field])
      except BadRecordError as e:  # at start-up, before the pipeline could skip it: say which record
        raise BadRecordError(f'{self.path}[{i}]: {e}') from None
    return values

  def __repr__(self) -> str:
    return f'ArrayRecordSource({self.path!r}, {len(self.shards)} shards, {len(self)} records)'


def _read_class_names(path: str) -> list[str] | None:
  import json  # pylint: disable=g-import-not-at-top
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  metadata = os.path.join(folder, 'metadata.json')
  if not os.path.isfile(metadata):
    return None
  with open(metadata, encoding='utf-8') as f:
    return json.load(f).get('class_names') or None


# --- labelled evaluation sets ----------------------------------------------------------------------


class FolderSource:
  """An ImageNet-style tree `root/<class>/**/<image>`: class index = position in sorted folder
  names, or in `class_names` where the folders are named as that list names its classes."""

  def __init__(self, root: str, class_names: Sequence[str] | None = None):
    if not os.path.isdir(root):
      raise FileNotFoundError(f'image folder {root!r} does not exist (eval.path)')
    self.root = root
    self.class_names = sorted(d for d in os.listdir(root)
                              if not d.startswith('.') and os.path.isdir(os.path.join(root, d)))
    relabel = label_map(self.class_names, class_names, f'image folder {root!r}')
    paths, labels = [], []
    for label, name in enumerate(self.class_names):
      for folder, dirs, files in os.walk(os.path.join(root, name)):
        dirs.sort()
        for file in sorted(files):
          if file.lower().endswith(IMAGE_EXTENSIONS):
            paths.append(os.path.join(folder, file))
            labels.append(label)
    if not paths:
      raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {root!r}/<class>/')
    self._paths = _StringTable(paths)
    self.labels = np.asarray(labels, np.int32)
    if relabel is not None:  # class folders named as the list names them, in another order
      self.labels, self.class_names = relabel[self.labels], list(class_names)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index) -> dict[str, Any]:
    index = int(index)
    path = self._paths[index]
    return {'image_path': path, 'caption': '', 'label': int(self.labels[index]), 'index': index,
            'origin': path}


class TfdsSource:
  """A TFDS dataset prepared under `data_dir` (default: TFDS_DATA_DIR or ~/tensorflow_datasets)."""

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               class_names: Sequence[str] | None = None):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      builder = tfds.builder(name, data_dir=data_dir)
      if not builder.is_prepared():
        raise FileNotFoundError(f'{builder.data_dir} does not exist')
      self._source = builder.as_data_source(split=split)
      label = builder.info.features.get('label') if hasattr(builder.info.features, 'get') else None
      self.class_names = list(getattr(label, 'names', None) or []) or None
    except Exception as e:  # pylint: disable=broad-except
      where = data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
      raise FileNotFoundError(
          f'TFDS dataset {name!r} split {split!r} is not available under {where} '
          f'({type(e).__name__}: {e}); prepare it where there is network access '
          f'(`tfds build {name} --file_format=array_record` with tensorflow installed: random access '
          'needs ArrayRecord) and copy '
          'it there, or set TFDS_DATA_DIR. Nothing is downloaded at run time.') from None
    self.name = name
    self._label_map = label_map(self.class_names, class_names, f'TFDS dataset {name!r}')
    if self._label_map is not None:
      self.class_names = list(class_names)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> dict[str, Any]:
    index = int(index)
    example = self._source[index]
    image = example['image']
    label = _relabel(self._label_map, int(example.get('label', -1)))
    record = {'image_path': '', 'caption': '', 'label': label, 'index': index,
              'origin': f'tfds:{self.name}[{index}]'}
    record['image_bytes' if isinstance(image, bytes) else 'image'] = image
    return record
