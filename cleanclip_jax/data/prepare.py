"""Convert an image-caption CSV/TSV or a folder of WebDataset `.tar` shards into ArrayRecord shards.

    python -m cleanclip_jax.data.prepare --input data/train.csv --output data/train_ar [--image-size 256]
    python -m cleanclip_jax.data.prepare --input shards/ --output data/train_ar   # img2dataset output

Images are decoded with the training pipeline's decoder (so the same inputs are skipped), shrunk so
the shorter side is `--image-size` (smaller images are kept as they are: the pipeline resizes
anyway) and re-encoded as JPEG; each record holds the JPEG, the caption, the label (-1 none) and the
original file name (`sources.encode_record`). Shards are `DIR/data-NNNNN.array_record` plus
`DIR/metadata.json`; point `--config.data.source=array_record --config.data.path=DIR` at them.

A tar shard holds pairs `KEY.jpg|jpeg|png|webp` + `KEY.txt` (caption), optionally `KEY.cls` (an
integer label) and `KEY.json` (used for the caption when there is no .txt).

Unusable inputs are skipped, counted by reason and logged (the first few in full); the run ends by
printing exactly one JSON line, `{"written": N, "skipped": {"reason": count}}`, and exits 0. An
unusable *input* (missing path, malformed CSV row, output folder already holding shards or not a
folder, nothing to write: no rows, or every one skipped) exits 2 with a message naming the file and
row (or the skip counts).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import logging
import os
import sys
import tarfile
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from cleanclip_jax.data import decode, sources

log = logging.getLogger('cleanclip_jax.prepare')

_LOG_FIRST = 5
_IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
# A tar member larger than this is not read into memory (no real web image is this big).
_MAX_MEMBER_BYTES = 64 << 20
# The flags that set CsvSource's options here (`--image-key`), for its errors' hints.
_CSV_FLAGS = {key: '--' + key.replace('_', '-') for key in sources.CONFIG_OPTIONS}


class InputError(Exception):
  """Input that cannot be converted at all (exit status 2)."""


# --- items: one dict per example, from either input kind -------------------------------------------


def csv_items(path: str, args: argparse.Namespace, skipped: dict[str, int]) -> tuple[Iterator[dict], int, list | None]:
  try:
    source = sources.CsvSource(path, image_key=args.image_key, caption_key=args.caption_key,
                               label_key=args.label_key, delimiter=args.delimiter,
                               confine_paths=args.confine_paths, options=_CSV_FLAGS)
  except sources.CsvError as e:
    raise InputError(str(e)) from None
  for reason, count in source.skipped.items():
    skipped[reason] = skipped.get(reason, 0) + count
  items = ({'image_path': r['image_path'], 'caption': r['caption'], 'label': r['label'],
            'key': r['image_path'], 'origin': r['origin']} for r in map(source.__getitem__, range(len(source))))
  return items, len(source), source.class_names


def tar_items(folder: str, skipped: dict[str, int]) -> Iterator[dict]:
  shards = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.tar'))
  if not shards:
    raise InputError(f'{folder}: no .tar shards (expected WebDataset shards as written by img2dataset)')
  for shard in shards:
    yield from _tar_examples(shard, skipped)


def _tar_examples(shard: str, skipped: dict[str, int]) -> Iterator[dict]:
  group, key, tar, reading, lost = {}, None, None, None, None
  try:
    # Members are read in order, never extracted; not streamed ('r|'), so the end can be checked.
    with tarfile.open(shard, 'r:*') as tar:
      for member in tar:
        if not member.isfile():
          continue
        directory, base = os.path.split(member.name)
        if '.' not in base:
          continue
        stem, ext = base.split('.', 1)
        member_key = os.path.join(directory, stem)
        if member_key != key:
          if group:
            yield _tar_example(shard, key, group)
          group, key = {}, member_key
        if member.size > _MAX_MEMBER_BYTES:
          group[ext.lower()] = None
          continue
        reading = member
        group[ext.lower()] = tar.extractfile(member).read()
        reading = None
      # tarfile ends an archive quietly at an invalid or truncated header past the first one, so
      # the examples after it would be lost uncounted. A whole archive holds only zero blocks there.
      if _holds_data_from(tar.fileobj, tar.offset):
        lost = (tar.offset, 'data past the last readable tar header (damaged or cut short); '
                            'the rest of the shard is lost')
  except (tarfile.TarError, EOFError, OSError) as e:
    if reading is not None:
      group = {}  # the example being read is incomplete
    lost = (reading.offset if reading else tar.offset if tar else 0, f'{type(e).__name__}: {e}')
  # The examples before a damaged spot are whole and kept, and so is the last one when all its
  # members were read before the next header failed; at a clean end the last group is kept as is
  # (`_tar_example` counts what it lacks).
  if group and (lost is None or _has_image_and_caption(group)):
    yield _tar_example(shard, key, group)
  if lost is not None:
    _count(skipped, 'corrupt_tar', f'{shard} at byte {lost[0]} (after {key}): {lost[1]}')


def _holds_data_from(fileobj, offset: int) -> bool:
  fileobj.seek(offset)
  while chunk := fileobj.read(1 << 20):
    if chunk.count(0) < len(chunk):
      return True
  return False


def _has_image_and_caption(group: dict[str, bytes | None]) -> bool:
  return any(e in group for e in _IMAGE_EXTENSIONS) and ('txt' in group or 'json' in group)


def _tar_example(shard: str, key: str, group: dict[str, bytes | None]) -> dict[str, Any]:
  origin = f'{shard}:{key}'
  image_ext = next((e for e in _IMAGE_EXTENSIONS if e in group), None)
  item = {'key': f'{os.path.basename(shard)}/{key}', 'origin': origin, 'label': -1, 'caption': ''}
  if image_ext is None:
    return dict(item, problem='missing_image')
  if group[image_ext] is None:
    return dict(item, problem='too_large')
  item['image_bytes'] = group[image_ext]
  caption = group.get('txt')
  if caption is None and group.get('json'):
    try:
      value = json.loads(group['json']).get('caption')
    except (ValueError, AttributeError):
      value = None
    # Only a string is a caption: `null` or a number would be stored as the text "None" / "12345".
    caption = value.encode('utf-8') if isinstance(value, str) else None
  if caption is None:
    return dict(item, problem='missing_caption')
  try:
    item['caption'] = caption.decode('utf-8').strip()
  except UnicodeDecodeError:
    return dict(item, problem='caption_not_utf8')
  if group.get('cls'):
    try:
      item['label'] = int(group['cls'].decode('ascii').strip())
    except (UnicodeDecodeError, ValueError):
      return dict(item, problem='bad_label')
  return item


# --- conversion (runs in worker processes) ---------------------------------------------------------


def convert(item: dict[str, Any], image_size: int, quality: int) -> tuple[bytes | None, str, str]:
  """An item -> (record bytes, '', '') or (None, reason, detail)."""
  if item.get('problem'):
    return None, item['problem'], item['origin']
  problem = sources.caption_problem(item['caption'])
  if problem:
    return None, problem, item['origin']
  image, error = decode.decode_or_none(item, draft_size=image_size)
  if error is not None:
    return None, error.reason, f'{item["origin"]}: {error}'
  return sources.encode_record(encode_jpeg(image, image_size, quality), item['caption'], item['label'],
                               item['key']), '', ''


def encode_jpeg(image: np.ndarray, image_size: int, quality: int) -> bytes:
  """Shrinks so the shorter side is `image_size` (bicubic; never enlarges) and encodes as JPEG."""
  picture = Image.fromarray(image)
  height, width = image.shape[:2]
  scale = image_size / min(height, width)
  if scale < 1:
    picture = picture.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                             Image.Resampling.BICUBIC)
  buffer = io.BytesIO()
  picture.save(buffer, 'JPEG', quality=quality)
  return buffer.getvalue()


def _convert_star(args):
  return convert(*args)


# --- output ----------------------------------------------------------------------------------------


class ShardWriter:
  """Writes records into `data-NNNNN.array_record` files of at most `shard_size` records."""

  def __init__(self, output: str, shard_size: int):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self._module = array_record_module
    self.output, self.shard_size = output, shard_size
    self.written, self.shards, self._writer, self._in_shard = 0, [], None, 0

  def write(self, record: bytes) -> None:
    if self._writer is None or self._in_shard == self.shard_size:
      self._close_shard()
      path = os.path.join(self.output, f'data-{len(self.shards):05d}.array_record')
      # group_size:1 keeps every record individually addressable: fast random access for grain.
      self._writer = self._module.ArrayRecordWriter(path, 'group_size:1')
      self.shards.append(path)
      self._in_shard = 0
    self._writer.write(record)
    self._in_shard += 1
    self.written += 1

  def _close_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def close(self) -> None:
    self._close_shard()


def _count(skipped: dict[str, int], reason: str, detail: str) -> None:
  skipped[reason] = skipped.get(reason, 0) + 1
  total = sum(skipped.values())
  if total <= _LOG_FIRST:
    log.warning('skipping (%s) %s', reason, detail)
  elif total == _LOG_FIRST + 1:
    log.warning('further skipped inputs are only counted (see the final JSON line)')


def _prepare_output(output: str) -> bool:
  """Makes the output folder; True when it was made here (so it can be removed if left empty)."""
  if os.path.exists(output) and not os.path.isdir(output):
    raise InputError(f'{output}: is a file, not a folder (--output names the folder for the shards)')
  if os.path.isdir(output):
    if any(f.endswith('.array_record') for f in os.listdir(output)):
      raise InputError(f'{output}: already holds .array_record shards; use an empty or new folder')
    return False
  try:
    os.makedirs(output)
  except OSError as e:
    raise InputError(f'{output}: cannot create the output folder ({e.strerror}) (--output)') from None
  return True


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Converts `args.input` into shards under `args.output`; returns {'written', 'skipped'}."""
  if not os.path.exists(args.input):
    raise InputError(f'{args.input}: no such file or folder (--input)')
  skipped: dict[str, int] = {}
  class_names = None
  if os.path.isdir(args.input):
    items, total = tar_items(args.input, skipped), None
    first = next(items, None)  # fails now, before any output, if the folder holds no shards
    items = iter([]) if first is None else _chain(first, items)
  else:
    items, total, class_names = csv_items(args.input, args, skipped)
  created = _prepare_output(args.output)
  writer = ShardWriter(args.output, args.shard_size)
  try:
    for record, reason, detail in tqdm(_convert_all(items, args), total=total, unit='img',
                                       desc='prepare', file=sys.stderr, disable=args.quiet):
      if record is None:
        _count(skipped, reason, detail)
      else:
        writer.write(record)
  finally:
    writer.close()
  result = {'written': writer.written, 'skipped': dict(sorted(skipped.items()))}
  if not writer.written:
    # A folder with only metadata.json would read as a data set of 0 examples.
    if created:
      os.rmdir(args.output)
    if skipped:
      why = f'every input was skipped: {result["skipped"]}'
    else:
      why = ('its shards hold no examples' if os.path.isdir(args.input)
             else 'the CSV has a header but no rows')
    raise InputError(f'{args.input}: nothing was written to {args.output}: {why}')
  with open(os.path.join(args.output, 'metadata.json'), 'w', encoding='utf-8') as f:
    json.dump(dict(result, image_size=args.image_size, source=os.path.abspath(args.input),
                   shards=[os.path.basename(s) for s in writer.shards], class_names=class_names), f,
              indent=1)
  return result


def _chain(first, rest):
  yield first
  yield from rest


def _convert_all(items: Iterable[dict], args: argparse.Namespace) -> Iterator[tuple]:
  tasks = ((item, args.image_size, args.quality) for item in items)
  if args.workers <= 1:
    yield from map(_convert_star, tasks)
    return
  with concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
    # Bounded submission keeps memory flat on inputs of millions of rows; order is preserved.
    window = []
    for task in tasks:
      window.append(pool.submit(convert, *task))
      if len(window) >= 64 * args.workers:
        yield window.pop(0).result()
    for future in window:
      yield future.result()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m cleanclip_jax.data.prepare', description=__doc__.split('\n')[0])
  parser.add_argument('--input', required=True, help='a .csv/.tsv file, or a folder of WebDataset .tar shards')
  parser.add_argument('--output', required=True, help='folder for the .array_record shards')
  parser.add_argument('--image-size', type=int, default=256, help='shorter side after resizing (never enlarged)')
  parser.add_argument('--shard-size', type=int, default=10_000, help='records per shard')
  parser.add_argument('--quality', type=int, default=90, help='JPEG quality of the re-encoded images')
  parser.add_argument('--image-key', default='image')
  parser.add_argument('--caption-key', default='caption')
  parser.add_argument('--label-key', default='', help='optional label column (an integer or a class name)')
  parser.add_argument('--delimiter', default=',', help="CSV delimiter (a .tsv file is read with tabs)")
  parser.add_argument('--confine-paths', action='store_true', help='skip image paths outside the CSV folder')
  parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1), help='decoding processes')
  parser.add_argument('--quiet', action='store_true', help='no progress bar')
  args = parser.parse_args(argv)
  if args.image_size < 1 or args.shard_size < 1:
    parser.error('--image-size and --shard-size must be positive')
  if args.delimiter == '\\t':
    args.delimiter = '\t'
  return args


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s', stream=sys.stderr)
  args = parse_args(argv)
  try:
    result = run(args)
  except (InputError, FileNotFoundError) as e:
    print(f'prepare: error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(result), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
