"""Checkpoints: orbax `CheckpointManager` plus an integrity manifest, fallback and params-only restore.

Layout: `workdir/checkpoints/<step>/` with the items `state` (the sharded `TrainState`, RNG
included), `data` (the grain iterator state, one JSON file per process), `config` (JSON) and
`counters` (JSON: the trainer's run totals, e.g. `nan_skips`, so a resumed run keeps counting).

Orbax makes a save atomic: it writes `<step>.orbax-checkpoint-tmp/` and renames it to `<step>/`
once every process has finished (on object stores, where there is no rename, it writes
`commit_success.txt` last instead). A step directory that exists is therefore complete *as
written*. What orbax cannot see is a file damaged afterwards (a truncated copy, a bad disk block),
so just before the rename we write `cleanclip_manifest.json` (size and CRC-32 of every file) into
the step directory. A checkpoint counts as intact when it is committed and every file matches its
manifest; restore walks from the newest step down to the first intact one, warning about each one
it skips, and moves a bad one aside (`workdir/checkpoints_rejected/`) so later saves of the same
step number are not blocked by it.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import functools
import json
import os
import time
import zlib
from typing import Any, Iterable

import grain.checkpoint as grain_checkpoint
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint.path import step as ocp_step

from cleanclip_jax import distributed

CHECKPOINT_SUBDIR = 'checkpoints'
REJECTED_SUBDIR = 'checkpoints_rejected'
MANIFEST_NAME = 'cleanclip_manifest.json'
_TMP_SUFFIX = '.orbax-checkpoint-tmp'
# Written by orbax after our manifest (commit timestamp / commit marker), so not covered by it.
_UNCOVERED = frozenset({MANIFEST_NAME, '_CHECKPOINT_METADATA', 'commit_success.txt'})


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the message names the step, the cause and the way out."""


class CheckpointMismatchError(ValueError):
  """An intact checkpoint whose structure differs from the run's state (a changed config)."""


class CheckpointRestoreError(RuntimeError):
  """An intact checkpoint that fits the run's state could not be read back (I/O, data iterator)."""


class NoCheckpointError(FileNotFoundError):
  """No committed, intact checkpoint where one was asked for."""


# ----------------------------------------------------------------------------- paths and listing


def _absolute(path_or_workdir: epath.PathLike) -> epath.Path:
  """orbax refuses relative paths; `--workdir runs/x` means the folder below the current one."""
  path = epath.Path(path_or_workdir)
  return path if path.is_absolute() else epath.Path(os.path.abspath(os.fspath(path)))


def checkpoint_root(path_or_workdir: epath.PathLike) -> epath.Path:
  """The orbax root for a workdir; accepts the root itself too (a dir named `checkpoints`)."""
  path = _absolute(path_or_workdir)
  if path.name == CHECKPOINT_SUBDIR:
    return path
  return path / CHECKPOINT_SUBDIR


def _resolve(path_or_workdir: epath.PathLike, step: int | None) -> tuple[epath.Path, int | None]:
  """(root, step) for a workdir, a checkpoints root or one step directory."""
  path = _absolute(path_or_workdir)
  if path.name.isdigit() and (path / 'state').exists():
    if step is not None and step != int(path.name):
      raise ValueError(f'{path} is the checkpoint of step {path.name}, not of step {step}')
    return path.parent, int(path.name)
  return checkpoint_root(path), step


def _files(directory: epath.Path) -> list[epath.Path]:
  # epath refuses recursive globs (they are slow on object stores), so walk explicitly.
  files = []
  for entry in directory.iterdir():
    files.extend(_files(entry) if entry.is_dir() else [entry])
  return sorted(files)


def _file_digests(step_dir: epath.Path) -> dict[str, list[int]]:
  digests = {}
  for file in _files(step_dir):
    relative = str(file.relative_to(step_dir))
    if relative in _UNCOVERED:
      continue
    crc, size = 0, 0
    with file.open('rb') as f:
      while chunk := f.read(1 << 22):
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
    digests[relative] = [size, crc]
  return digests


def write_manifest(step_dir: epath.PathLike) -> None:
  """Records size and CRC-32 of every file in a finished (not yet renamed) step directory."""
  step_dir = epath.Path(step_dir)
  manifest = {'version': 1, 'written_at': time.time(), 'files': _file_digests(step_dir)}
  (step_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


class Fault(enum.Enum):
  """How a file of a step directory fails its manifest."""
  MISSING = 'missing'  # not there (the manifest itself included)
  VANISHED = 'vanished'  # gone while being read (retention, or another process, deleting it)
  MALFORMED = 'malformed'  # the manifest does not parse: damage (no deletion truncates a file)
  WRONG_SIZE = 'wrong size'
  CORRUPTED = 'corrupted'  # right size, wrong CRC-32


@dataclasses.dataclass(frozen=True)
class Problem:
  """One file of a step directory that fails its manifest; `str()` is the line for a log."""
  file: str  # as the manifest names it (a file that vanished mid-read: the path its error named)
  fault: Fault
  message: str

  def __str__(self) -> str:
    return self.message


def manifest_problems(step_dir: epath.PathLike, checksums: bool = True) -> list[Problem]:
  """The files of a committed step directory that fail its manifest; [] when intact.

  With `checksums=False` only presence and sizes are compared (cheap enough for listing). A file
  that is not there is a problem (damage, or retention deleting the step meanwhile); any other
  `OSError` (EIO, ESTALE, EACCES: the storage, not the checkpoint) is raised, so that nobody
  takes an intact checkpoint for a damaged one.
  """
  step_dir = epath.Path(step_dir)
  manifest_path = step_dir / MANIFEST_NAME
  try:
    expected = json.loads(manifest_path.read_text())['files']
  except FileNotFoundError:
    return [Problem(MANIFEST_NAME, Fault.MISSING,
                    f'{MANIFEST_NAME} is missing (the save never reached its commit)')]
  except (ValueError, KeyError) as e:
    return [Problem(MANIFEST_NAME, Fault.MALFORMED, f'{MANIFEST_NAME} is unreadable: {e}')]
  try:
    if checksums:
      actual = _file_digests(step_dir)
    else:
      actual = {name: [(step_dir / name).stat().length, None] for name in expected
                if (step_dir / name).exists()}
  except FileNotFoundError as e:  # e.g. retention or another process removed it meanwhile
    return [Problem(str(e.filename or ''), Fault.VANISHED, f'unreadable: {e}')]
  problems = []
  for name, (size, crc) in expected.items():
    if name not in actual:
      problems.append(Problem(name, Fault.MISSING, f'{name} is missing'))
    elif actual[name][0] != size:
      problems.append(Problem(name, Fault.WRONG_SIZE,
                              f'{name} has {actual[name][0]} bytes, expected {size}'))
    elif checksums and actual[name][1] != crc:
      problems.append(Problem(name, Fault.CORRUPTED, f'{name} is corrupted (CRC-32 mismatch)'))
  return problems


def verify(step_dir: epath.PathLike, checksums: bool = True) -> list[str]:
  """`manifest_problems` as lines for a log (and an error message); [] when intact."""
  return [str(problem) for problem in manifest_problems(step_dir, checksums)]


def save_id(step_dir: epath.PathLike) -> str | None:
  """What tells one save of a step from another save of the same step number (a trainer resumed
  from an earlier step writes it again): the CRC-32 of its manifest, which records the time of
  its save. None when the step has no readable manifest."""
  try:
    return f'{zlib.crc32((epath.Path(step_dir) / MANIFEST_NAME).read_bytes()):08x}'
  except OSError:
    return None


def _finalized_steps(root: epath.Path) -> list[int]:
  return sorted(ocp_step.checkpoint_steps(root)) if root.exists() else []


def uncommitted_dirs(path_or_workdir: epath.PathLike) -> list[epath.Path]:
  """Half-written step directories (an interrupted save); orbax deletes them on the next run."""
  root = checkpoint_root(path_or_workdir)
  if not root.exists():
    return []
  return sorted(p for p in root.iterdir() if _TMP_SUFFIX in p.name)


def committed_steps(path_or_workdir: epath.PathLike) -> list[int]:
  """Steps with a committed checkpoint whose files are all present at their recorded sizes.

  Never lists a half-written checkpoint; full checksums are left to restore (`verify`). A step
  that cannot be read now (an I/O error) is left out of this listing, with a warning.
  """
  root = checkpoint_root(path_or_workdir)
  steps = []
  for step in _finalized_steps(root):
    try:
      if not verify(root / str(step), checksums=False):
        steps.append(step)
    except OSError as e:
      logging.warning('Not listing checkpoint %s: %s: %s', root / str(step), type(e).__name__, e)
  return steps


# ----------------------------------------------------------------------------- params-only restore


def _intact_steps_newest_first(root: epath.Path, step: int | None) -> Iterable[int]:
  """Yields intact steps (a given step, or newest first), warning about each one skipped."""
  candidates = [step] if step is not None else list(reversed(_finalized_steps(root)))
  for candidate in candidates:
    step_dir = root / str(candidate)
    if not step_dir.exists():
      raise NoCheckpointError(f'no committed checkpoint of step {candidate} in {root} '
                              f'(committed: {committed_steps(root)})')
    try:
      problems = verify(step_dir)
    except OSError as e:  # the storage failed, not the checkpoint: never the one asked for
      if step is not None:
        raise
      problems = [f'cannot be read now: {type(e).__name__}: {e}']
    if problems:
      if step is not None:
        raise NoCheckpointError(f'checkpoint {step_dir} is damaged: ' + '; '.join(problems))
      logging.warning('Skipping checkpoint %s: %s', step_dir, '; '.join(problems))
      continue
    yield candidate


def newest_intact_step(path_or_workdir: epath.PathLike) -> int:
  """The step `restore_params` / `load_config` read when given none (a step directory: its own)."""
  root, step = _resolve(path_or_workdir, None)
  for candidate in _intact_steps_newest_first(root, step):
    return candidate
  raise NoCheckpointError(f'no committed, intact checkpoint in {root}')


def restore_params(path_or_workdir: epath.PathLike, step: int | None = None,
                   abstract_params: Any = None) -> Any:
  """The `params` tree of a committed, intact checkpoint (the newest one when `step` is None).

  `path_or_workdir` is a workdir, its `checkpoints/` directory or one `checkpoints/<step>/`.
  Arrays come back as numpy arrays, or, given `abstract_params` (a tree of
  `jax.ShapeDtypeStruct` with shardings), straight onto those shardings.
  """
  root, step = _resolve(path_or_workdir, step)
  checkpointer = ocp.PyTreeCheckpointer()
  errors = []
  for candidate in _intact_steps_newest_first(root, step):
    state_dir = root / str(candidate) / 'state'
    try:
      target = abstract_params
      if target is None:
        metadata = checkpointer.metadata(state_dir)
        target = metadata.item_metadata.tree['params']
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
      else:
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
      restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
          item={'params': target}, restore_args={'params': restore_args}, partial_restore=True))
    except Exception as e:  # pylint: disable=broad-except
      if step is not None:
        raise
      logging.warning('Skipping checkpoint %s: restore failed: %s', state_dir.parent, e)
      errors.append(f'{candidate}: {e}')
      continue
    logging.info('Restored params of step %d from %s', candidate, root)
    return restored['params']
  raise NoCheckpointError(f'no committed, intact checkpoint in {root}'
                          + (f' (failed: {errors})' if errors else ''))


def agreed_step_dir(path_or_workdir: epath.PathLike) -> str:
  """The directory of the checkpoint `restore_params` / `load_config` would read from
  `path_or_workdir` (its newest intact step), chosen by process 0 for every process: a run still
  saving could otherwise hand each host another step, and the config and the params could come
  from different ones. Raises `NoCheckpointError` on every process when there is none."""
  step = distributed.from_process_0(functools.partial(_newest_intact_step_or_none, path_or_workdir))
  root, _ = _resolve(path_or_workdir, None)
  if step is None:
    raise NoCheckpointError(f'no committed, intact checkpoint in {root}')
  return os.fspath(root / str(step))


def _newest_intact_step_or_none(path_or_workdir: epath.PathLike) -> int | None:
  try:
    return newest_intact_step(path_or_workdir)
  except NoCheckpointError:
    return None


# What makes a run that run: a checkpoint written with other values is another run's, not this
# one's to resume (total_steps, logging, evaluation or data paths may change on a resume).
IDENTITY_KEYS = ('objective.name', 'model.name', 'seed', 'data.poison.enabled',
                 'data.poison.num_poisoned', 'data.poison.target', 'data.poison.trigger.kind')


def config_changes(step_dir: epath.PathLike, config: ml_collections.ConfigDict) -> list[str]:
  """`IDENTITY_KEYS` whose value in the config saved in `step_dir` differs from `config`'s, as
  'key: checkpoint X, this run Y' lines ([] also when the saved config cannot be read: the
  array check and the restore judge then)."""
  try:
    stored = json.loads((epath.Path(step_dir) / 'config' / 'metadata').read_text())
  except (OSError, ValueError):
    return []
  wanted = json.loads(config.to_json())
  changes = []
  for key in IDENTITY_KEYS:
    values = []
    for tree in (stored, wanted):
      for part in key.split('.'):
        tree = tree.get(part) if isinstance(tree, dict) else None
      values.append(tree)
    if values[0] != values[1]:
      changes.append(f'{key}: checkpoint {values[0]!r}, this run {values[1]!r}')
  return changes


def load_config(path_or_workdir: epath.PathLike, step: int | None = None) -> ml_collections.ConfigDict:
  """The config saved with a checkpoint (the newest intact one when `step` is None)."""
  root, step = _resolve(path_or_workdir, step)
  for candidate in _intact_steps_newest_first(root, step):
    text = (root / str(candidate) / 'config' / 'metadata').read_text()
    return ml_collections.ConfigDict(json.loads(text))
  raise NoCheckpointError(f'no committed, intact checkpoint in {root}')


# ----------------------------------------------------------------------------- the trainer's side


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/tower/kernel': shape} of every array leaf, whatever the containers (dataclass fields,
  dict keys, tuple positions: a `TrainState` and the nested dicts of its saved metadata agree)."""
  return {jax.tree_util.keystr(path, simple=True, separator='/'): tuple(getattr(leaf, 'shape', ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_mismatches(state_dir: epath.PathLike, abstract_state: Any, limit: int = 8) -> list[str]:
  """How the saved train state in `state_dir` differs from `abstract_state` in its arrays' names
  and shapes, one line per array (at most `limit`, then a count); [] when they agree.

  Read from the checkpoint's metadata, before any array is: orbax itself reports only a shape
  that it cannot restore, without saying which array, and only after starting to read them all.
  Dtypes are not compared: restore converts them.
  """
  stored = _leaf_shapes(ocp.PyTreeCheckpointer().metadata(epath.Path(state_dir)).item_metadata.tree)
  wanted = _leaf_shapes(abstract_state)
  problems = []
  for path in sorted(stored.keys() | wanted.keys()):
    if path not in stored:
      problems.append(f'{path}: not in the checkpoint (this run: {wanted[path]})')
    elif path not in wanted:
      problems.append(f'{path}: in the checkpoint {stored[path]}, not in this run\'s state')
    elif stored[path] != wanted[path]:
      problems.append(f'{path}: checkpoint {stored[path]}, this run {wanted[path]}')
  if len(problems) > limit:
    problems = problems[:limit] + [f'... and {len(problems) - limit} more']
  return problems


def _is_disk_full(error: BaseException) -> bool:
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
      return True
    if 'No space left' in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


@functools.cache
def _avoid_replica_slicing_on_cpu() -> None:
  # Orbax splits the host copy of replicated arrays across replicas (fast on TPU); on CPU each
  # distinct shape x device is a small compiled slice, which costs seconds per process.
  if jax.devices()[0].platform == 'cpu':
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
  """The trainer's checkpoints: asynchronous saves, exact resume, fallback past damaged ones.

  Saves are forced at the steps the caller chooses (the trainer owns the schedule); orbax keeps
  the newest `keep` checkpoints plus every `keep_every_steps`-th one.
  """

  def __init__(self, workdir: epath.PathLike, keep: int = 3, keep_every_steps: int = 0):
    self.workdir = _absolute(workdir)
    self.root = checkpoint_root(workdir)
    for leftover in uncommitted_dirs(self.root):
      logging.warning('Skipping half-written checkpoint %s (its save was interrupted); '
                      'removing it.', leftover)
    self._saving_step: int | None = None
    _avoid_replica_slicing_on_cpu()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        keep_period=keep_every_steps or None,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest),
    )
    self._manager = ocp.CheckpointManager(self.root, options=options)

  def _write_manifest(self) -> None:
    # Runs on the primary process after every process has written its files, before the rename
    # that commits the checkpoint: a committed checkpoint always has its manifest.
    step = self._saving_step
    tmp_dirs = [p for p in uncommitted_dirs(self.root) if p.name.startswith(f'{step}{_TMP_SUFFIX}')]
    write_manifest(tmp_dirs[0] if tmp_dirs else self.root / str(step))

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def _save_failed(self, error: BaseException) -> CheckpointSaveError:
    step = self._saving_step
    intact = committed_steps(self.root)
    previous = [s for s in intact if step is None or s < step]
    fallback = (f'the last intact checkpoint is step {previous[-1]} ({self.root / str(previous[-1])})'
                if previous else 'there is no earlier intact checkpoint')
    disk_full = _is_disk_full(error)
    return CheckpointSaveError(
        f'Saving the checkpoint of step {step} to {self.root} failed: '
        f'{"the disk is full: " if disk_full else ""}{type(error).__name__}: {error}. '
        f'{fallback[0].upper()}{fallback[1:]}; {"free space" if disk_full else "fix the cause"} '
        'and rerun the same command to resume from it.')

  def save(self, step: int, state: Any, data_iterator: Any, config: ml_collections.ConfigDict,
           counters: dict[str, int] | None = None) -> None:
    """Starts an asynchronous save of step `step` (returns once arrays are copied off device)."""
    self.wait()  # one save in flight at a time; surfaces the previous save's error here
    self._saving_step = step
    items = dict(
        state=ocp.args.StandardSave(state),
        data=grain_checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(config.to_json())),
    )
    if counters is not None:
      items['counters'] = ocp.args.JsonSave(dict(counters))
    args = ocp.args.Composite(**items)
    try:
      self._manager.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from e

  def wait(self) -> None:
    """Blocks until the save in flight is committed; raises CheckpointSaveError if it failed."""
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from e

  def _reject(self, step: int, reason: str) -> None:
    logging.warning('Skipping checkpoint %s: %s', self.root / str(step), reason)
    destination = self.workdir / REJECTED_SUBDIR / f'{step}-{int(time.time())}'
    destination.parent.mkdir(parents=True, exist_ok=True)
    (self.root / str(step)).rename(destination)
    logging.warning('Moved it to %s so the run can write step %d again.', destination, step)

  def _choose_step(self) -> int | None:
    """The newest intact step, chosen by process 0 for every process (each one listing and
    checksumming on its own could pick another step on a lagging filesystem, and wait at a
    different barrier); damaged newer ones are moved aside on the way."""
    try:
      chosen, rejected = distributed.from_process_0(self._newest_intact_moving_damaged_aside)
    except distributed.ProcessZeroFailed as e:
      raise CheckpointRestoreError(f'could not choose a checkpoint in {self.root}: {e}') from e
    if rejected:
      self._manager.reload()
    return chosen

  def _newest_intact_moving_damaged_aside(self) -> tuple[int | None, int]:
    """(the newest intact step or None, how many damaged newer steps were moved aside)."""
    rejected = 0
    for step in reversed(_finalized_steps(self.root)):
      try:
        problems = verify(self.root / str(step))
      except OSError as e:
        # Not damage: a good checkpoint stays where it is (and nothing older is taken).
        raise CheckpointRestoreError(
            f'reading checkpoint {self.root / str(step)} failed: {type(e).__name__}: {e}. '
            'The checkpoint is left in place; fix the storage and rerun.') from e
      if problems:
        self._reject(step, '; '.join(problems))
        rejected += 1
        continue
      return step, rejected
    return None, rejected

  def restore_latest(self, abstract_state: Any, data_iterator: Any,
                     config: ml_collections.ConfigDict | None = None) -> tuple[int, Any] | None:
    """Restores the newest intact checkpoint into `data_iterator` and onto `abstract_state`'s shardings.

    Returns (step, state), or None when there is nothing to resume from. Given the run's
    `config`, a checkpoint written under another objective, model, seed or poisoning (a finetune
    pointed at its pretraining run's workdir) is refused, as one with other arrays is.
    """
    step = self._choose_step()
    if step is not None:
      if config is not None:
        changed = config_changes(self.root / str(step), config)
        if changed:
          raise self._mismatch(step, 'written by another run: ' + '; '.join(changed))
      # Every file matched its manifest, so the checkpoint is intact; if it does not fit this
      # run's state (another model or objective in the same workdir), moving it aside would
      # discard good work: stop and say so instead.
      try:
        mismatches = state_mismatches(self.root / str(step) / 'state', abstract_state)
        compared = True
      except Exception as e:  # pylint: disable=broad-except
        # Unreadable metadata: leave the verdict to the restore itself.
        logging.warning('Could not compare checkpoint %s with this run\'s state: %s', step, e)
        mismatches, compared = [], False
      if mismatches:
        raise self._mismatch(step, 'arrays differ: ' + '; '.join(mismatches))
      args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                data=grain_checkpoint.CheckpointRestore(data_iterator))
      try:
        restored = self._manager.restore(step, args=args)
      except Exception as e:  # pylint: disable=broad-except
        if not compared:
          raise self._mismatch(step, f'{type(e).__name__}: {e}') from e
        # Its arrays fit this run, so this is not a changed config: do not send the user away
        # from a good workdir.
        raise CheckpointRestoreError(
            f'reading checkpoint {self.root / str(step)} failed: {type(e).__name__}: {e}. Its '
            'arrays match this run\'s state and its files their manifest. If the number of '
            'processes or data.num_workers changed since it was written, its data-iterator '
            'positions (one per process and worker) do not fit: resume with the values that '
            'wrote it (its config item has them). Otherwise fix the cause above (storage?) and '
            'rerun; the checkpoint is left in place.') from e
      logging.info('Resumed from checkpoint %s', self.root / str(step))
      return step, restored['state']
    return None

  def counters(self, step: int) -> dict[str, int]:
    """The run totals saved with step `step`'s checkpoint ({} for one written without them)."""
    if not (self.root / str(step) / 'counters').exists():
      return {}
    restored = self._manager.restore(step, args=ocp.args.Composite(counters=ocp.args.JsonRestore()))
    return dict(restored['counters'] or {})

  def _mismatch(self, step: int, detail: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f'checkpoint {self.root / str(step)} is intact but does not match this run\'s train state '
        f'({detail}). Resume with the config that wrote it (stored in its config item), or use a '
        'new --workdir.')

  def close(self) -> None:
    """Waits for the save in flight (raising if it failed) and releases the manager."""
    try:
      self.wait()
    finally:
      self._manager.close()

