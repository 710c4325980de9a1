"""The grain input pipeline: per-host, seeded, resumable batches of (image, caption tokens).

    it = make_train_iterator(config)            # infinite; host batch = batch_size // process_count
    batch = next(it)                            # docs/DESIGN.md "Batch"
    state = it.get_state(); it.set_state(state) # exact resume (orbax: grain.checkpoint.CheckpointSave)
    skip_counts()                               # {'reason': count} of inputs skipped so far
    run_skip_counts(config.data, it)            # ... by this run's stream, resumed parts included

How the example stream is laid out, so that it is reproducible and independent of the number of
grain workers:
- Element k of a host's stream is (epoch, position) = divmod(k, n // process_count); the source
  index is the epoch's permutation (grain's index shuffle, seeded by (config.seed, epoch)) at
  `process_index + position * process_count`. Hosts thus read disjoint shares of every epoch; the
  n % process_count examples at the end of each epoch's permutation are left out of that epoch.
- Each element is built by `TrainExample` from its own random generators, seeded by
  (config.seed, epoch, index, stage); nothing depends on which worker builds it.
- A bad input becomes a *skip record* (`{'skip_reason': ...}`) inside the worker. Skip records
  travel through grain to the main process like any element, where `_SkipCountingIterator` counts,
  logs and drops them before batching: the counts survive worker processes (and, in the iterator's
  checkpointed state, resumes), and batches stay full.
- Batching happens last, in the main process, so a batch holds the next `host_batch` good
  examples of the stream whatever the worker count.

Per example (`TrainExample`): decode -> resize shorter side (bicubic) + centre crop to
`data.image_size` -> trigger and poisoned caption if the index is in the poisoned set ->
`train_transform` -> AutoAugment / EDA views if `data.inmodal_views` -> tokenize. The poisoned
data set is fixed across epochs: the trigger is seeded by the index and the poisoned caption by
(poison.seed, index), as if the poisoned captions had been written into the CSV once.

Pure numpy/PIL up to the iterator: jax is imported only to read the process index.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator

import grain
import ml_collections
import numpy as np
from PIL import Image

from cleanclip_jax import config as config_lib
from cleanclip_jax.data import decode, seeding, sources

log = logging.getLogger(__name__)

Tokenizer = Callable[[list[str], int], np.ndarray]

# Skip records whose details are logged in full; after that only running totals are logged.
_LOG_FIRST = 5
# A stream that yields nothing but skips has no usable input (wrong image root, wrong format);
# stop with an error rather than spin forever.
_MAX_CONSECUTIVE_SKIPS = 1000

# Seed-sequence stage tags: each source of randomness of an example gets its own generator.
_STAGE_CROP, _STAGE_AUG_IMAGE, _STAGE_AUG_CAPTION, _STAGE_POISON_CAPTION = 1, 2, 3, 4


class BadInputError(RuntimeError):
  """An unusable input under `data.on_bad_image='fail'`; names the file and the CSV row."""


# --- skip accounting (main process) ----------------------------------------------------------------

_skip_lock = threading.Lock()
_skip_counts: collections.Counter = collections.Counter()
_logged_records = 0  # skip records seen by `_record_skip` (CSV rows are logged by sources.py)


def skip_counts() -> dict[str, int]:
  """{'reason': count} of inputs skipped in this process so far (CSV rows, train and eval images).

  Reasons: `decode.REASONS`, `sources.ROW_REASONS`, `corrupt_record` (ArrayRecord), and
  `poisoned_skipped`: how many of those skipped training examples were poisoned ones (not a
  reason of its own: each is also counted under its reason). Counts are per process and start
  from zero in a resumed run.
  """
  with _skip_lock:
    return dict(_skip_counts)


def reset_skip_counts() -> None:
  global _logged_records
  with _skip_lock:
    _skip_counts.clear()
    _logged_records = 0


def _count_skips(counts: dict[str, int]) -> None:
  with _skip_lock:
    _skip_counts.update(counts)


def _record_skip(record: dict[str, Any]) -> None:
  """Counts one skip record and logs it: in full for the first few, then as totals at 10, 100, ..."""
  global _logged_records
  with _skip_lock:
    _skip_counts[record['skip_reason']] += 1
    _logged_records += 1
    total = _logged_records
    summary = dict(_skip_counts)
  if total <= _LOG_FIRST:
    where = record.get('origin') or record.get('image_path') or f"index {record.get('index')}"
    log.warning('skipping %s: %s (%s); image %r', where, record['skip_reason'], record.get('detail', ''),
                record.get('image_path', ''))
  if total == _LOG_FIRST:
    log.warning('further skipped inputs are only counted (logged at 10, 100, 1000, ...)')
  elif total > _LOG_FIRST and math.log10(total).is_integer():
    log.warning('skipped %d input images so far; all skips: %s', total, summary)


# Skip counts' extra key: how many of the skipped examples were poisoned (already counted by reason).
POISONED_SKIPPED = 'poisoned_skipped'

# Keys of the training iterator's checkpointed state (`_SkipCountingIterator.get_state`).
_STREAM_STATE, _STREAM_SKIPS = 'cleanclip_stream', 'cleanclip_skipped'


class _SkipCountingIterator(grain.DatasetIterator):
  """The stream without its skip records (runs in the main process): each one is counted and
  logged (`_record_skip`), too many in a row stop the run, and the iterator keeps how many of each
  reason it has dropped since the run began.

  Those counts are part of the iterator's state, which every checkpoint saves per process (the
  `data` item), so a resumed run goes on counting where the checkpoint left off: `run_skip_counts`
  covers the whole run, not only the part since the last resume. The state of a checkpoint written
  before this carried counts (the parent's state alone) restores the position, counts from zero.
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self.skipped: collections.Counter = collections.Counter()

  def __next__(self):
    consecutive = 0
    while True:
      element = next(self._parent)
      if 'skip_reason' not in element:
        return element
      _record_skip(element)
      self.skipped[element['skip_reason']] += 1
      if element.get('poisoned'):
        # Also counted apart: a poisoned pair lost to a bad image weakens the attack a run reports.
        self.skipped[POISONED_SKIPPED] += 1
        _count_skips({POISONED_SKIPPED: 1})
      consecutive += 1
      if consecutive >= _MAX_CONSECUTIVE_SKIPS:
        raise BadInputError(
            f'the last {consecutive} inputs were all unusable (last: {element.get("origin", "")} '
            f'{element.get("image_path", "")!r}: {element["skip_reason"]}); skipped so far: '
            f'{skip_counts()}. Check data.path, the image paths in it, and data.source.')

  def get_state(self):
    return {_STREAM_STATE: self._parent.get_state(), _STREAM_SKIPS: dict(self.skipped)}

  def set_state(self, state):
    if isinstance(state, dict) and _STREAM_STATE in state:
      self._parent.set_state(state[_STREAM_STATE])
      self.skipped = collections.Counter(state.get(_STREAM_SKIPS, {}))
    else:  # a checkpoint from before the counts were saved
      self._parent.set_state(state)
      self.skipped = collections.Counter()


class _SkipCountingDataset(grain.IterDataset):

  def __iter__(self) -> _SkipCountingIterator:
    return _SkipCountingIterator(self._parent.__iter__())


def stream_skip_counts(iterator: grain.DatasetIterator) -> dict[str, int]:
  """{'reason': count} of the examples `iterator` (`make_train_iterator`'s, this process's share of
  the stream) dropped since the run began, resumed parts included."""
  state = iterator.get_state()
  return dict(state.get(_STREAM_SKIPS, {})) if isinstance(state, dict) else {}


def total_skip_counts(data_cfg: ml_collections.ConfigDict, streams: list[dict[str, int]]) -> dict[str, int]:
  """{'reason': count} of a run's skips: the rows the source dropped (CSV; every process reads the
  same rows, so they count once) plus the `stream_skip_counts` of each process in `streams`."""
  counts = collections.Counter(getattr(train_source(data_cfg), 'skipped', None) or {})
  for stream in streams:
    counts.update(stream)
  return dict(counts)


def run_skip_counts(data_cfg: ml_collections.ConfigDict, iterator: grain.DatasetIterator) -> dict[str, int]:
  """{'reason': count} of the inputs this process's share of a training run has skipped (the
  source's dropped rows and `iterator`'s dropped examples); the trainer's summary sums every
  process's with `total_skip_counts`."""
  return total_skip_counts(data_cfg, [stream_skip_counts(iterator)])


# --- sources ---------------------------------------------------------------------------------------


def train_source(data_cfg: ml_collections.ConfigDict):
  """The random-access source `config.data` names: len(source), source[i] -> record."""
  source = _cached_source(
      data_cfg.source, data_cfg.path, data_cfg.image_key, data_cfg.caption_key, data_cfg.label_key,
      data_cfg.delimiter, data_cfg.confine_paths, data_cfg.image_size, data_cfg.synthetic.num_examples,
      data_cfg.synthetic.split, data_cfg.synthetic.seed, data_cfg.get('classnames', ''))
  if not len(source):
    # Said here, naming the file: otherwise the epoch plan fails on sharing 0 examples among the
    # processes, which reads as a multi-process problem.
    if data_cfg.source == 'synthetic':
      raise config_lib.ConfigError(f'data.synthetic.num_examples={data_cfg.synthetic.num_examples}: '
                                   'use a positive number (--config.data.synthetic.num_examples=N)')
    dropped = getattr(source, 'skipped', None)
    if dropped:
      why = f'every row was dropped ({dropped}; the log names the first rows)'
    else:
      why = 'it has no rows after the header' if data_cfg.source == 'csv' else 'it holds no records'
    raise config_lib.ConfigError(
        f'data.path={data_cfg.path!r} (data.source={data_cfg.source!r}) has no usable examples: '
        f'{why}; fix the file or point --config.data.path at another')
  return source


def load_class_names(spec: str) -> list[str] | None:
  """The class list a `classnames` key names (`zeroshot.load_classnames`), None for ''."""
  if not spec:
    return None
  from cleanclip_jax import zeroshot  # pylint: disable=g-import-not-at-top
  return zeroshot.load_classnames(spec)


@functools.lru_cache(maxsize=4)
def _cached_source(kind, path, image_key, caption_key, label_key, delimiter, confine_paths,
                   image_size, synthetic_examples, synthetic_split, synthetic_seed, classnames):
  # Cached: the trainer asks for the size and then the iterator; a CSV is parsed (and its dropped
  # rows counted) once.
  if kind == 'synthetic':
    from cleanclip_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.SyntheticCaptions(synthetic_examples, image_size=image_size,
                                       split=synthetic_split, seed=synthetic_seed)
  if kind == 'csv':
    source = sources.CsvSource(path, image_key=image_key, caption_key=caption_key,
                               label_key=label_key, delimiter=delimiter, confine_paths=confine_paths,
                               class_names=load_class_names(classnames) if label_key else None)
    _count_skips(source.skipped)
    return source
  if kind == 'array_record':
    return sources.ArrayRecordSource(path, class_names=load_class_names(classnames))
  raise ValueError(f'data.source={kind!r}: use synthetic, csv or array_record')


def dataset_size(data_cfg: ml_collections.ConfigDict) -> int:
  """Examples in the training source (after dropped CSV rows), for `config.resolve_total_steps`."""
  return len(train_source(data_cfg))


def _labels_and_names(source) -> tuple[np.ndarray | None, list[str] | None]:
  # Labels only mean something with class names; without them poison.py matches the captions.
  names = getattr(source, 'class_names', None)
  if names is None and type(source).__name__ == 'SyntheticCaptions':
    from cleanclip_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    names = list(synthetic.CLASS_NAMES)
  if names is None:
    return None, None
  labels = source.labels
  return (labels() if callable(labels) else labels), names


def poisoned_indices(data_cfg: ml_collections.ConfigDict, source=None) -> np.ndarray:
  """Sorted source indices that carry the trigger (empty when poisoning is off)."""
  if not data_cfg.poison.enabled:
    return np.zeros(0, np.int64)
  from cleanclip_jax.data import poison  # pylint: disable=g-import-not-at-top
  source = train_source(data_cfg) if source is None else source
  kwargs = {}
  if data_cfg.poison.label_consistent:
    labels, names = _labels_and_names(source)
    if names is None:
      captions = source.captions
      kwargs = dict(captions=captions() if callable(captions) else captions)
    else:
      kwargs = dict(labels=labels, class_names=names)
  return np.asarray(poison.select_poisoned(len(source), data_cfg.poison, **kwargs), np.int64)


# --- preprocessing ---------------------------------------------------------------------------------


def resize_center_crop(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
  """Bicubic resize of the shorter side to `size`, then the central `size` x `size` square.

  Done as one PIL resize of the central square (the same pixels as resize-then-crop, without
  resampling the parts the crop throws away). `image`: uint8 RGB [H, W, 3] or an RGB PIL image.
  """
  return _resize_center_crop(image, size)[0]


def _resize_center_crop(image: np.ndarray | Image.Image,
                        size: int) -> tuple[np.ndarray, Image.Image | None]:
  # `resize_center_crop`, and the result as a PIL image too (None for an array that needed no
  # resize), which AutoAugment can start from instead of copying the array back into PIL.
  is_array = isinstance(image, np.ndarray)
  width, height = (image.shape[1], image.shape[0]) if is_array else image.size
  if height == width == size:
    return (image, None) if is_array else (np.asarray(image, dtype=np.uint8), image)
  if is_array:
    image = Image.fromarray(image)
  side = min(height, width)
  left, top = (width - side) / 2, (height - side) / 2
  resized = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
  return np.asarray(resized, dtype=np.uint8), resized


def _skip_record(reason: str, record: dict[str, Any], detail: str = '') -> dict[str, Any]:
  return {'skip_reason': reason, 'image_path': record.get('image_path', ''),
          'origin': record.get('origin', ''), 'index': record.get('index', -1), 'detail': detail}


def load_image(source, index: int, image_size: int, on_bad_image: str) -> tuple[dict, np.ndarray | None]:
  """Reads and decodes source[index] resized to `image_size`: (record, image) or (skip record, None).

  With on_bad_image='fail' an unusable image raises `BadInputError` naming the file and row.
  """
  return _load_image(source, index, image_size, on_bad_image)[:2]


def _load_image(source, index: int, image_size: int,
                on_bad_image: str) -> tuple[dict, np.ndarray | None, Image.Image | None]:
  # `load_image`, and the image as PIL too (see `_resize_center_crop`).
  try:
    record = source[index]
  except sources.BadRecordError as e:
    origin = f'{getattr(source, "path", "record")}[{index}]'  # as the source names its records
    return _fail_or_skip('corrupt_record', {'index': index, 'origin': origin}, str(e),
                         on_bad_image), None, None
  # Encoded images are decoded to PIL and resized there; in-memory arrays (the synthetic source)
  # stay arrays, uncopied when they are the right size already.
  image, error = decode.decode_or_none(record, native=True, draft_size=image_size)
  if error is not None:
    return _fail_or_skip(error.reason, record, error.detail, on_bad_image), None, None
  return record, *_resize_center_crop(image, image_size)


def _fail_or_skip(reason: str, record: dict[str, Any], detail: str, on_bad_image: str) -> dict:
  if on_bad_image == 'fail':
    raise BadInputError(
        f'{record.get("origin") or "index " + str(record.get("index"))}: unusable image '
        f'{record.get("image_path", "")!r}: {reason} ({detail}); '
        "set --config.data.on_bad_image=skip to count and skip such inputs")
  return _skip_record(reason, record, detail)


class EpochPlan:
  """Step k of one host's stream -> (epoch, source index); see the module docstring."""

  def __init__(self, num_examples: int, seed: int, shuffle: bool, process_index: int, process_count: int):
    self.num_examples = num_examples
    self.per_host = num_examples // process_count
    if self.per_host == 0:
      raise ValueError(f'{num_examples} examples cannot be shared by {process_count} processes')
    self.seed, self.shuffle = seed, shuffle
    self.process_index, self.process_count = process_index, process_count

  def __call__(self, step: int) -> tuple[int, int]:
    epoch, position = divmod(int(step), self.per_host)
    slot = self.process_index + position * self.process_count
    if not self.shuffle:
      return epoch, slot
    # grain's index shuffle (O(1) memory, so any dataset size works), called as
    # `MapDataset.range(n).shuffle(seed)[slot]` calls it, without that lookup's ~8 us an example.
    return epoch, int(grain.experimental.index_shuffle(
        slot, max_index=self.num_examples - 1, seed=self._epoch_seed(epoch), rounds=4))

  @functools.lru_cache(maxsize=2)
  def _epoch_seed(self, epoch: int) -> int:
    return int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])


class TrainExample:
  """Builds training example k of a host's stream (runs in grain workers; picklable)."""

  def __init__(self, source, plan: EpochPlan, data_cfg: ml_collections.ConfigDict, seed: int,
               context_length: int, tokenizer: Tokenizer | None, merges_path: str,
               poisoned: np.ndarray):
    if data_cfg.on_bad_image not in ('skip', 'fail'):
      raise ValueError(f'data.on_bad_image={data_cfg.on_bad_image!r}: use skip or fail')
    if data_cfg.train_transform not in ('center_crop', 'random_resized_crop'):
      raise ValueError(f'data.train_transform={data_cfg.train_transform!r}: use center_crop or random_resized_crop')
    self.source, self.plan, self.seed = source, plan, seed
    self.image_size = data_cfg.image_size
    self.on_bad_image = data_cfg.on_bad_image
    self.train_transform = data_cfg.train_transform
    self.inmodal_views = data_cfg.inmodal_views
    self.poison_cfg = data_cfg.poison
    self.poisoned = frozenset(int(i) for i in poisoned)
    self.context_length = context_length
    self._tokenizer, self._merges_path = tokenizer, merges_path

  def tokenize(self, text: str) -> np.ndarray:
    if self._tokenizer is None:
      from cleanclip_jax import tokenizer  # pylint: disable=g-import-not-at-top
      # Built lazily, once per worker process, rather than pickled into every worker.
      self._tokenizer = tokenizer.get_tokenizer(self._merges_path or None)
    encode_padded = getattr(self._tokenizer, 'encode_padded', None)
    if encode_padded is not None:  # the built-in tokenizer's one-caption path (no [1, L] batch)
      return encode_padded(text, self.context_length)
    return np.asarray(self._tokenizer([text], self.context_length)[0], np.int32)

  @functools.cached_property
  def _trigger(self):
    from cleanclip_jax.data import triggers  # pylint: disable=g-import-not-at-top
    return triggers.make_trigger(self.poison_cfg.trigger, self.image_size)

  def _rng(self, epoch: int, index: int, stage: int) -> seeding.ExampleRandom:
    return seeding.example_random(self.seed, epoch, index, stage)

  def __call__(self, step: int) -> dict[str, Any]:
    epoch, index = self.plan(step)
    is_poisoned = index in self.poisoned
    record, image, pil_image = _load_image(self.source, index, self.image_size, self.on_bad_image)
    if image is None:
      return dict(record, poisoned=is_poisoned)
    caption = record['caption']
    problem = sources.caption_problem(caption)
    if problem:
      return dict(_skip_record(problem, record), poisoned=is_poisoned)
    if is_poisoned:
      image, caption = self._poison(image, caption, index)
      pil_image = None
    if self.train_transform == 'random_resized_crop':
      from cleanclip_jax.data import augment  # pylint: disable=g-import-not-at-top
      image = augment.random_resized_crop(image, self._rng(epoch, index, _STAGE_CROP), self.image_size)
      pil_image = None
    example = {'image': image, 'tokens': self.tokenize(caption), 'label': np.int32(record.get('label', -1)),
               'is_poisoned': np.bool_(is_poisoned), 'index': np.int64(index)}
    if self.inmodal_views:
      from cleanclip_jax.data import augment  # pylint: disable=g-import-not-at-top
      example['aug_image'] = augment.autoaugment(image, self._rng(epoch, index, _STAGE_AUG_IMAGE),
                                                 pil_image=pil_image)
      example['aug_tokens'] = self.tokenize(augment.eda(caption, self._rng(epoch, index, _STAGE_AUG_CAPTION)))
    return example

  def _poison(self, image: np.ndarray, caption: str, index: int) -> tuple[np.ndarray, str]:
    image = self._trigger(image, index)
    if not self.poison_cfg.label_consistent:
      from cleanclip_jax.data import poison  # pylint: disable=g-import-not-at-top
      rng = np.random.default_rng([self.poison_cfg.seed, index, _STAGE_POISON_CAPTION])
      caption = poison.poisoned_caption(self.poison_cfg.target, rng)
    return image, caption


# --- iterators -------------------------------------------------------------------------------------


def _process_index_and_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count})')
  return process_index, process_count


def _leave_sigterm_to_the_trainer(worker_index: int, worker_count: int) -> None:
  """Grain worker start-up: SIGTERM is ignored in the workers.

  A preemption notice reaches every process of the job (SLURM's `--signal`, a `kill` of the
  process group): a worker it killed ended the trainer's stream ("Worker process was terminated
  unexpectedly") before the trainer could save at the step its processes agree on, so the job
  exited 1 instead of 143 and was not requeued. The trainer stops its workers itself (grain's
  close: an event, then SIGKILL), also at interpreter exit, before multiprocessing's own
  SIGTERM of daemonic children.
  """
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _ensure_absl_flags_parsed() -> None:
  # grain's multiprocessing reads absl flags; outside absl.app.run they are unparsed and reading
  # them raises. Parsing just the program name keeps any flags a caller defined at their defaults.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])


def make_train_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        *, num_epochs: int | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator of host batches (docs/DESIGN.md "Batch"), endless by default.

  `tokenizer(texts, context_length) -> int32 [N, L]` defaults to the CLIP BPE of
  `config.model.tokenizer`. `num_epochs` bounds the stream (tests, one-pass jobs); the last partial
  batch is dropped.
  """
  data_cfg = config.data
  process_index, process_count = _process_index_and_count(process_index, process_count)
  if config.batch_size % process_count:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by {process_count} processes')
  host_batch = config.batch_size // process_count
  source = train_source(data_cfg)
  plan = EpochPlan(len(source), config.seed, data_cfg.shuffle, process_index, process_count)
  if plan.per_host < host_batch:
    # Every batch would hold some pairs twice, and the contrastive loss would then score each copy
    # as a negative of its own caption: refused rather than trained on quietly.
    where = (f'data.synthetic.num_examples={len(source)}' if data_cfg.source == 'synthetic'
             else f'data.path={data_cfg.path!r} has {len(source)} usable examples')
    raise config_lib.ConfigError(
        f'{where}, fewer than a batch (batch_size={config.batch_size}'
        f'{f" over {process_count} processes" if process_count > 1 else ""}): every batch would '
        'repeat pairs; lower --config.batch_size or use more data')
  example = TrainExample(source, plan, data_cfg, config.seed, config.model.context_length, tokenizer,
                         config.model.tokenizer, poisoned_indices(data_cfg, source))
  length = sys.maxsize if num_epochs is None else num_epochs * plan.per_host
  ds = grain.MapDataset.range(length).map(example)
  workers = int(data_cfg.num_workers)
  buffer = max(1, data_cfg.prefetch_buffer) * host_batch
  if workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(2, buffer // workers)))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(2, buffer // workers)),
        worker_init_fn=_leave_sigterm_to_the_trainer)
  else:
    # Threads overlap file reads and PIL decoding (which release the GIL) with the training step.
    threads = min(8, os.cpu_count() or 1)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, buffer)))
  ds = _SkipCountingDataset(ds).batch(host_batch, drop_remainder=True)
  return iter(ds)


# --- evaluation ------------------------------------------------------------------------------------


def eval_source(eval_cfg: ml_collections.ConfigDict, class_names: list[str] | None = None):
  """The labelled set `config.eval` names: synthetic split, CSV (image,label), folder tree or TFDS,
  labelled in the order of `class_names` (default: `eval.classnames`, the list it is scored
  against; see `sources` "Class order")."""
  kind = eval_cfg.source
  config_lib.check_eval_source(eval_cfg)  # the evaluation job runs no `config.validate`
  names = class_names
  if names is None and kind != 'synthetic':
    names = load_class_names(eval_cfg.classnames)
  if kind == 'synthetic':
    from cleanclip_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    if eval_cfg.num_examples <= 0:
      raise ValueError('eval.source=synthetic needs eval.num_examples > 0 (the set is generated)')
    return synthetic.SyntheticCaptions(eval_cfg.num_examples, image_size=eval_cfg.image_size,
                                       split=eval_cfg.split)
  if kind == 'csv':
    # Its columns are fixed (image,label) and its delimiter follows the extension: no option to hint.
    source = sources.CsvSource(eval_cfg.path, caption_key='', label_key='label',
                               class_names=names, require_label=True, options={})
    _count_skips(source.skipped)
    return source
  if kind == 'folder':
    return sources.FolderSource(eval_cfg.path, class_names=names)
  if kind == 'tfds':
    return sources.TfdsSource(eval_cfg.path, eval_cfg.split, class_names=names)
  raise ValueError(f'eval.source={kind!r}: use synthetic, csv, folder or tfds')


def eval_indices(num_available: int, num_examples: int) -> np.ndarray:
  """All indices, or a seeded random subset of `num_examples` (folder trees are sorted by class, so
  a prefix would hold few classes)."""
  if num_examples <= 0 or num_examples >= num_available:
    return np.arange(num_available, dtype=np.int64)
  return np.sort(np.random.default_rng(0).choice(num_available, num_examples, replace=False))


def make_eval_batches(eval_cfg: ml_collections.ConfigDict, batch_size: int,
                      process_index: int | None = None, process_count: int | None = None, *,
                      source=None, with_captions: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Yields this host's eval batches: `image` uint8 [b, S, S, 3], `label` int32, `index` int64, `valid`.

  `batch_size` is global; each host yields `batch_size // process_count` rows per batch, and every
  host yields the same number of batches (padding rows have valid=False, label -1, index -1), so
  collective evaluation steps line up. Host p takes a contiguous block of the (sub)set. Unusable
  images are counted and logged as skips and yield valid=False rows. `with_captions` adds
  `caption` (a list of str) for retrieval.
  """
  process_index, process_count = _process_index_and_count(process_index, process_count)
  source = eval_source(eval_cfg) if source is None else source
  indices = eval_indices(len(source), eval_cfg.num_examples)
  host_batch = max(1, batch_size // process_count)
  per_host = -(-len(indices) // process_count)
  num_batches = -(-per_host // host_batch)
  start = process_index * per_host
  mine = indices[start:min(start + per_host, len(indices))]
  size = eval_cfg.image_size

  def load(slot: int) -> dict[str, Any]:
    if slot >= len(mine):
      return {'padding': True}
    record, image = load_image(source, int(mine[slot]), size, 'skip')
    return {'record': record, 'image': image}

  threads = min(8, os.cpu_count() or 1)
  stream = iter(grain.MapDataset.range(num_batches * host_batch).map(load).to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, 2 * host_batch))))
  for _ in range(num_batches):
    rows = [next(stream) for _ in range(host_batch)]
    yield _eval_batch(rows, size, with_captions)


def _eval_batch(rows: list[dict], size: int, with_captions: bool) -> dict[str, Any]:
  n = len(rows)
  batch = {'image': np.zeros((n, size, size, 3), np.uint8), 'label': np.full(n, -1, np.int32),
           'index': np.full(n, -1, np.int64), 'valid': np.zeros(n, bool)}
  captions = [''] * n
  for i, row in enumerate(rows):
    if row.get('padding'):
      continue
    record = row['record']
    if row['image'] is None:
      _record_skip(record)
      batch['index'][i] = record.get('index', -1)
      continue
    batch['image'][i] = row['image']
    batch['label'][i] = record.get('label', -1)
    batch['index'][i] = record['index']
    batch['valid'][i] = True
    captions[i] = record.get('caption', '')
  if with_captions:
    batch['caption'] = captions
  return batch
