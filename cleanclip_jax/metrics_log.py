"""Run metrics: `metrics.jsonl` (one JSON object per logged step) and TensorBoard, from process 0.

A resumed run must leave one line per step, so opening a writer at a resume step first drops every
line past it (and a line torn by a kill), and TensorBoard is told to purge events past it too.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
from typing import Any, Mapping

import jax
from absl import logging


def read_jsonl(path: str | os.PathLike, skip_malformed: bool = False) -> list[dict[str, Any]]:
  """The records of a JSONL file; a torn last line (a killed writer) is ignored, a malformed one
  elsewhere is an error naming it (or, with `skip_malformed`, skipped with a warning)."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  records = []
  lines = path.read_text().splitlines()
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number == len(lines):
        break
      if not skip_malformed:
        raise ValueError(f'{path}:{number}: not a JSON object: {line[:80]!r}') from None
      logging.warning('%s:%d: skipping a malformed line: %r', path, number, line[:80])
  return records


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> int:
  """Keeps only records with `step <= last_step` (atomic rewrite); returns how many were dropped."""
  path = pathlib.Path(path)
  if not path.exists():
    return 0
  # A damaged line must not block resuming from a good checkpoint: it is dropped, with a warning.
  records = read_jsonl(path, skip_malformed=True)
  kept = [r for r in records if r.get('step', 0) <= last_step]
  raw_lines = sum(1 for line in path.read_text().splitlines() if line.strip())
  if raw_lines == len(kept):
    return 0
  write_text_atomic(path, ''.join(json.dumps(r) + '\n' for r in kept))
  return raw_lines - len(kept)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to a sibling temporary file and renames it over `path`: a kill leaves the old
  file or the new one, never a torn one that the next run (a resume, a cached stage) cannot read.

  The data is fsynced before the rename and the directory after it: without the first, a host
  crash (not just a killed process) can leave the renamed name pointing at an empty file, since
  the kernel may write the rename to disk before the data."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + '.tmp')
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_directory(path.parent)


def _fsync_directory(directory: pathlib.Path) -> None:
  """Makes a rename inside `directory` durable; best effort, as some file systems (and every
  non-POSIX one) refuse to open or sync a directory."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _jsonable(value: Any) -> Any:
  value = getattr(value, 'item', lambda: value)()  # numpy / jax scalars
  if isinstance(value, float) and not math.isfinite(value):
    return None  # strict JSON has no NaN / Inf (the same convention as eval/metrics.jsonl)
  return value


class JsonlWriter:
  """Appends one record per call to a JSONL file, flushed so a killed run keeps what it logged."""

  def __init__(self, path: str | os.PathLike, resume_step: int = 0, enabled: bool | None = None):
    self.path = pathlib.Path(path)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._file = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    dropped = truncate_jsonl(self.path, resume_step)
    if dropped:
      logging.info('Dropped %d records past step %d from %s (resumed run)', dropped, resume_step,
                   self.path)
    self._file = self.path.open('a')

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    if self._file is None:
      return
    record = {'step': int(step), **{k: _jsonable(v) for k, v in values.items()}}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


_writers_opened = 0


def tensorboard_writer(logdir: str | os.PathLike, **kwargs):
  """A tensorboardX SummaryWriter whose event file name no other writer can take.

  tensorboardX names the file after the second it was opened and the host, and opens it for
  writing from scratch: a second writer in the same directory within the same second (the
  trainer's inline evaluation and a following evaluation job on one host, or a quick restart)
  would truncate the first one's events. The process id and a per-process count make it unique.
  """
  global _writers_opened
  _writers_opened += 1
  suffix = f'.{os.getpid()}.{_writers_opened:06d}'  # padded: names sort in opening order
  return _summary_writer_class()(str(logdir), filename_suffix=suffix, **kwargs)


def _summary_writer_class():
  """tensorboardX.SummaryWriter, imported without torch.

  tensorboardX imports torch at module level only to accept torch tensors, which costs seconds
  of every run's start-up; hiding torch for the duration of the import skips that.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules['torch'] = None  # makes `import torch` raise ImportError, which tensorboardX handles
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return SummaryWriter


def tensorboard_events(folder: str | os.PathLike) -> list:
  """The events (tensorboardX `event_pb2.Event`) on disk in a TensorBoard folder, its event files
  in name order, for checks and scripts without TensorBoard; a torn last record (a killed writer)
  is ignored."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events = []
  for path in sorted(pathlib.Path(folder).glob('events.out.tfevents.*')):
    data, offset = path.read_bytes(), 0
    while offset + 12 <= len(data):  # TFRecord framing: length, its CRC, the event, its CRC
      length = int.from_bytes(data[offset:offset + 8], 'little')
      if offset + 12 + length + 4 > len(data):
        break
      event = event_pb2.Event()
      event.ParseFromString(data[offset + 12:offset + 12 + length])
      events.append(event)
      offset += 12 + length + 4
  return events


def tensorboard_scalars(folder: str | os.PathLike) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the scalars on disk in a TensorBoard folder (a later point at a step
  replaces an earlier one)."""
  scalars: dict[str, dict[int, float]] = {}
  for event in tensorboard_events(folder):
    for value in event.summary.value:
      scalars.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
  return scalars


class MetricsWriter:
  """`workdir/metrics.jsonl` plus TensorBoard events under `workdir/tensorboard/`."""

  def __init__(self, workdir: str | os.PathLike, resume_step: int = 0, enabled: bool | None = None,
               tensorboard: bool = True):
    workdir = pathlib.Path(workdir)
    self.jsonl = JsonlWriter(workdir / 'metrics.jsonl', resume_step, enabled)
    self._tb = None
    self._tb_dir = workdir / 'tensorboard'
    if self.jsonl.enabled and tensorboard:
      # purge_step makes TensorBoard hide events a killed run logged past the resume step.
      self._tb = tensorboard_writer(self._tb_dir, purge_step=resume_step + 1, flush_secs=30)

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    self.jsonl.write(step, values)
    if self._tb is not None:
      for key, value in values.items():
        value = _jsonable(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(key, value, step)

  def flush(self) -> None:
    """Puts every scalar written so far on disk (metrics.jsonl is flushed line by line).

    tensorboardX's own `flush` misses the events still queued for its writer thread; closing
    the writer joins that thread once it has written them. Later scalars go to a new event file
    of the same run (TensorBoard reads a folder's files as one stream)."""
    if self._tb is not None:
      self._tb.close()
      self._tb = tensorboard_writer(self._tb_dir, flush_secs=30)

  def close(self) -> None:
    self.jsonl.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None
