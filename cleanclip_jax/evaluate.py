"""Evaluation: zero-shot accuracy, attack success rate, linear probe, retrieval, backdoor similarity,
and the job that evaluates a run's checkpoints as they appear.

    # the latest checkpoint once, or every checkpoint as training writes it
    python -m cleanclip_jax.evaluate --config configs/eval.py:tiny --workdir DIR
    python -m cleanclip_jax.evaluate --config configs/eval.py:imagenet --workdir DIR --follow

The model is rebuilt from the config stored with the checkpoint, so the eval config only says what
to evaluate on. Results go to `DIR/eval/metrics.jsonl` (one line per step), `DIR/eval/tb`
(TensorBoard) and `DIR/eval/plot.png` (clean accuracy and ASR against step).

In code: `evaluate(model, params, config.eval, mesh)` -> {'top1', 'top5', 'asr', 'zeroshot_top1',
...}; `EvalLogger(workdir).write(step, metrics)` for the trainer's inline evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cleanclip_jax import (cpu_dots, distributed, eval_metrics, host_memory, metrics_log,
                           text_length, zeroshot)
from cleanclip_jax.data.normalize import normalize

log = logging.getLogger(__name__)

TOPK = (1, 5)
RECALL_AT = (1, 5, 10)


# --- encoders --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Encoders:
  """Jitted image and text encoders of one CLIP on one mesh; outputs are numpy on every host.

  Inputs are split over the batch like training's and parameters placed by the training partition
  rules; outputs come back replicated, so every process holds the features of the whole global
  batch and computes the same metrics.
  """
  model: Any
  params: Any
  mesh: jax.sharding.Mesh
  # `texts` cuts its tokens after the longest prompt, rounded up to this multiple (0: never cut);
  # as `data.token_bucket` in training, each length compiles the text encoder once.
  token_bucket: int = 16

  def __post_init__(self):
    from cleanclip_jax import models, sharding
    model, mesh = _clip_module(self.model), self.mesh
    # CLIP's text tower masks attention causally and pools at each row's EOT, so the columns after
    # every row's EOT change nothing (`text_length`); another text encoder gets its tokens whole.
    self._cut_tokens = isinstance(model, models.CLIP) and self.token_bucket > 0
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.num_devices = mesh.devices.size
    self.context_length = model.context_length
    self.image_size = model.image_size
    batch_fn, text_fn, param_shardings = _compiled(model, mesh)
    self.params = jax.device_put(self.params, param_shardings)
    self._batch_fn, self._text_fn = batch_fn, text_fn
    self._host_batch_to_global = sharding.host_batch_to_global

  def batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's slice of a global batch -> the global batch's `features` and other keys."""
    global_batch = self._host_batch_to_global(host_batch, self.mesh)
    return jax.tree.map(np.asarray, self._batch_fn(self.params, global_batch))

  def texts(self, tokens: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """int32 tokens [N, L], the same on every process -> text features [N, D].

    Prompts and captions are short (ImageNet's 80,000 prompts need at most 22 of the 77 columns),
    so the tokens are cut after the longest row's EOT (see `token_bucket`): the same features for
    a fraction of the text tower's work. Every process cuts the same tokens to the same length.
    """
    tokens = np.asarray(tokens)
    if self._cut_tokens and len(tokens):
      length = text_length.bucketed_length(text_length.needed_length(tokens), self.token_bucket,
                                           tokens.shape[1])
      tokens = tokens[:, :length]
    chunk = _round_up(max(1, min(chunk, len(tokens))), self.num_devices)
    out = []
    for start in range(0, len(tokens), chunk):
      piece = tokens[start:start + chunk]
      padded = np.zeros((chunk, tokens.shape[1]), np.int32)
      padded[:len(piece)] = piece
      # Every process holds all the tokens, so each device's shard is cut from the full array.
      global_tokens = jax.make_array_from_callback(padded.shape, self.batch_sharding,
                                                   lambda index: padded[index])
      out.append(np.asarray(self._text_fn(self.params, global_tokens))[:len(piece)])
    return np.concatenate(out)


def _clip_module(model):
  """The CLIP module, whether given a CLIP or an ImageClassifier wrapping one."""
  return getattr(model, 'clip', model)


@functools.lru_cache(maxsize=4)
def _compiled(model, mesh):
  """Jitted encoders and param shardings per (model, mesh); modules compare by value, so the
  checkpoints of one run share them and the follow job compiles once, not once per step."""
  from cleanclip_jax import sharding

  def encode_batch(params, batch):
    out = {key: value for key, value in batch.items() if key != 'image'}
    out['features'] = model.apply({'params': params}, normalize(batch['image']),
                                  method=model.encode_image)
    return out

  def encode_text(params, tokens):
    with sharding.tracing_mesh(mesh):
      return model.apply({'params': params}, tokens, method=model.encode_text)

  replicated = sharding.replicated(mesh)
  return (jax.jit(encode_batch, out_shardings=replicated),
          jax.jit(encode_text, out_shardings=replicated), _param_shardings(model, mesh))


def _param_shardings(model, mesh):
  """The training partition rules applied to the model's (abstract) parameter tree."""
  from cleanclip_jax import sharding
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, model.context_length), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
  return sharding.param_shardings(boxed['params'], mesh)


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


# --- datasets -> features --------------------------------------------------------------------------


@dataclasses.dataclass
class Features:
  """Image features of one evaluation set, clean and (optionally) with the trigger stamped."""
  clean: np.ndarray  # [N, D]
  labels: np.ndarray  # [N] int
  indices: np.ndarray  # [N] int, the example's index in its source
  triggered: np.ndarray | None = None  # [N, D]


def encode_dataset(encoders: Encoders, eval_cfg, trigger: Callable | None = None,
                   desc: str = 'eval') -> Features:
  """Runs `eval_cfg`'s dataset through the image encoder, with the trigger too when given.

  The trigger is stamped on the host on the uint8 image at model resolution with
  `example_seed=index`: the same function and seed the training pipeline uses.
  """
  process_index, process_count = jax.process_index(), jax.process_count()
  host_batch = _host_batch_size(eval_cfg.batch_size, encoders.num_devices, process_count)
  batches = _eval_batches(eval_cfg, process_index, process_count)
  total = None
  if eval_cfg.num_examples:
    total = math.ceil(eval_cfg.num_examples / (host_batch * process_count))
  clean, triggered, labels, indices, valid = [], [], [], [], []
  for batch in _progress(batches, total, desc):
    batch = {key: batch[key] for key in ('image', 'label', 'index', 'valid')}
    encoded = encoders.batch(batch)
    clean.append(encoded['features'])
    labels.append(encoded['label'])
    indices.append(encoded['index'])
    valid.append(encoded['valid'])
    if trigger is not None:
      stamped = np.stack([trigger(image, example_seed=int(index)) if ok else image
                          for image, index, ok in zip(batch['image'], batch['index'],
                                                      batch['valid'])])
      triggered.append(encoders.batch({'image': stamped})['features'])
  if not clean:
    raise ValueError(f'eval: the {eval_cfg.source!r} dataset (split {eval_cfg.split!r}, path '
                     f'{eval_cfg.path!r}) yielded no images')
  keep = np.concatenate(valid).astype(bool)
  if not keep.any():
    # Every image was skipped (logged above): the metrics over none would be NaN and the step
    # recorded as evaluated. `keep` is the global batch's, so every process raises alike.
    raise ValueError(f'eval: no usable image in the {eval_cfg.source!r} dataset (split '
                     f'{eval_cfg.split!r}, path {eval_cfg.path!r}): all were skipped (see the '
                     'skip warnings above); check the image paths and files it names')
  return Features(
      clean=np.concatenate(clean)[keep], labels=np.concatenate(labels)[keep].astype(np.int64),
      indices=np.concatenate(indices)[keep].astype(np.int64),
      triggered=np.concatenate(triggered)[keep] if triggered else None)


def _eval_batches(eval_cfg, process_index: int, process_count: int) -> Iterable:
  from cleanclip_jax.data import pipeline
  return pipeline.make_eval_batches(eval_cfg, eval_cfg.batch_size, process_index=process_index,
                                    process_count=process_count)


def _host_batch_size(batch_size: int, num_devices: int, process_count: int) -> int:
  if batch_size % num_devices:
    raise ValueError(f'eval.batch_size={batch_size} must be a multiple of the {num_devices} devices '
                     f'(--config.eval.batch_size={_round_up(batch_size, num_devices)})')
  return batch_size // process_count


def _progress(iterable: Iterable, total: int | None, desc: str) -> Iterator:
  if jax.process_index() != 0:
    return iter(iterable)
  from tqdm.auto import tqdm
  return iter(tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr))


# --- evaluate ---------------------------------------------------------------------------------------


def evaluate(model, params, eval_cfg, mesh=None, tokenizer=None,
             head_classnames: Sequence[str] | None = None) -> dict[str, float]:
  """Every enabled metric for one set of parameters; all values are floats.

  Always: `zeroshot_top1`, `zeroshot_top5` and, with `eval_cfg.asr`, `zeroshot_asr`. Then `top1`,
  `top5`, `asr` for the classifier `eval_cfg.classifier` picks (the linear head of supervised
  params `{'clip', 'head'}` under 'auto', else zero-shot; `head_*` keys when it is the head),
  `backdoor_sim_triggered` / `backdoor_sim_clean` with ASR, `probe_top1` / `probe_asr` with
  `linear_probe`, `retrieval_r{1,5,10}` (and per direction) with `retrieval`.

  Args:
    model: the CLIP module (`models.create_model`) or an `ImageClassifier`.
    params: CLIP params, or `{'clip': ..., 'head': {'kernel', 'bias'}}`.
    eval_cfg: `config.eval`.
    mesh: defaults to every device on the batch axis.
    tokenizer: `texts, context_length -> int32 tokens`; defaults to the packaged CLIP BPE.
    head_classnames: the classes of the linear head's outputs, in order, where known (a
      supervised run's class list); a head over other classes than `eval_cfg.classnames` is
      refused under classifier='head' and left out, with a warning, otherwise.
  """
  started = time.time()
  mesh = mesh if mesh is not None else _default_mesh()
  if tokenizer is None:
    from cleanclip_jax import tokenizer as tokenizer_lib
    tokenizer = tokenizer_lib.get_tokenizer()
  clip_params, head = _split_params(params)
  classnames = zeroshot.load_classnames(eval_cfg.classnames)
  head = _head_for_classes(eval_cfg.classifier, head, classnames, head_classnames)
  use_head = _use_head(eval_cfg.classifier, head)
  clip = _clip_module(model)
  if eval_cfg.image_size != clip.image_size:
    # The model fixes the resolution (ViT position embeddings); the trigger is stamped at it too,
    # as in training.
    log.info('eval: using the model\'s %dpx images (eval.image_size=%d)', clip.image_size,
             eval_cfg.image_size)
    eval_cfg = _with(eval_cfg, image_size=clip.image_size)
  encoders = Encoders(clip, clip_params, mesh)
  tokenize = lambda texts: tokenizer(texts, encoders.context_length)

  templates = zeroshot.load_templates(eval_cfg.templates)
  class_weights = zeroshot.class_embeddings(encoders.texts, tokenize, classnames, templates)
  target = zeroshot.target_index(classnames, eval_cfg.target) if eval_cfg.asr else None
  trigger = _make_trigger(eval_cfg) if eval_cfg.asr else None

  features = encode_dataset(encoders, eval_cfg, trigger)
  _check_labels(features.labels, len(classnames), eval_cfg)
  metrics = {'num_examples': float(len(features.labels))}
  nonfinite = _nonfinite_rows(features)
  if nonfinite:
    # Such rows count as misses (eval_metrics.ranks); say so, since it is the model, not the data.
    log.warning('eval: %d of %d images have non-finite features (a diverged model?); they count '
                'as misses and as failed attacks', nonfinite, len(features.labels))
  metrics['nonfinite_features'] = float(nonfinite)
  metrics.update(_classifier_metrics('zeroshot', features, lambda x: x @ class_weights.T, target))
  if head is not None:
    head_logits = lambda x: x @ head['kernel'] + head['bias']
    metrics.update(_classifier_metrics('head', features, head_logits, target))
  chosen = 'head' if use_head else 'zeroshot'
  for key in ('top1', 'top5', 'asr', 'asr_count'):
    if f'{chosen}_{key}' in metrics:
      metrics[key] = metrics[f'{chosen}_{key}']
  metrics['used_head'] = float(use_head)

  if eval_cfg.asr:
    eligible = features.labels != target
    metrics['backdoor_sim_triggered'] = eval_metrics.mean_cosine_similarity(
        features.triggered[eligible], class_weights[target])
    metrics['backdoor_sim_clean'] = eval_metrics.mean_cosine_similarity(
        features.clean[eligible], class_weights[target])
  if eval_cfg.linear_probe:
    metrics.update(_linear_probe(encoders, eval_cfg, features, len(classnames), target))
  if eval_cfg.retrieval:
    metrics.update(_retrieval(encoders, eval_cfg, features, tokenize))
  metrics['eval_seconds'] = time.time() - started
  return metrics


def _nonfinite_rows(features: Features) -> int:
  bad = ~np.isfinite(features.clean).all(axis=1)
  if features.triggered is not None:
    bad |= ~np.isfinite(features.triggered).all(axis=1)
  return int(bad.sum())


def _classifier_metrics(name: str, features: Features, logits_fn, target: int | None):
  logits = np.asarray(logits_fn(features.clean))
  out = {f'{name}_top{k}': eval_metrics.topk_accuracy(logits, features.labels, k) for k in TOPK}
  if target is not None:
    predictions = eval_metrics.predictions(logits_fn(features.triggered))
    asr, count = eval_metrics.attack_success_rate(predictions, features.labels, target)
    out[f'{name}_asr'] = asr
    out[f'{name}_asr_count'] = float(count)
  return out


def _linear_probe(encoders, eval_cfg, test: Features, num_classes: int, target: int | None):
  """Logistic regression on frozen features of the probe's train split, scored on the eval set."""
  if eval_cfg.source in ('csv', 'folder') and not eval_cfg.probe_path:
    raise ValueError(f'eval.linear_probe: a {eval_cfg.source} eval set has no splits, so the probe '
                     'would train on the test images; give its training set with '
                     '--config.eval.probe_path=PATH (or --config.eval.linear_probe=False)')
  train_cfg = _with(eval_cfg, split=eval_cfg.probe_split, num_examples=eval_cfg.probe_num_examples,
                    path=eval_cfg.probe_path or eval_cfg.path)
  train = encode_dataset(encoders, train_cfg, trigger=None, desc='probe features')
  _check_labels(train.labels, num_classes, train_cfg)
  probe = eval_metrics.fit_linear_probe(train.clean, train.labels, num_classes,
                                        l2=eval_cfg.probe_l2, steps=eval_cfg.probe_steps)
  out = _classifier_metrics('probe', test, lambda x: eval_metrics.probe_logits(probe, x), target)
  out['probe_train_top1'] = eval_metrics.topk_accuracy(
      eval_metrics.probe_logits(probe, train.clean), train.labels)
  return out


def _retrieval(encoders, eval_cfg, features: Features, tokenize):
  """Recall@k between the eval set's images and their own captions."""
  captions = _eval_captions(eval_cfg, features.indices)
  tokens = np.asarray(tokenize(list(captions)))
  text = encoders.texts(tokens)
  # Captions with the same tokens (a dataset's repeats) get the same features: one caption.
  groups = np.unique(tokens, axis=0, return_inverse=True)[1].reshape(-1)
  return eval_metrics.retrieval_recall(features.clean, text, RECALL_AT, caption_groups=groups)


def _eval_captions(eval_cfg, indices: np.ndarray) -> list[str]:
  """The captions of the eval set's examples `indices` (looked up by index, so every process
  gets all of them without a string all-gather)."""
  from cleanclip_jax.data import pipeline
  source = pipeline.eval_source(eval_cfg)
  if hasattr(source, 'caption'):  # the synthetic set captions without rendering the image
    captions = [source.caption(int(i)) for i in indices]
  else:
    captions = [source[int(i)].get('caption', '') for i in indices]
  missing = sum(not caption for caption in captions)
  if missing:
    raise ValueError(f'eval.retrieval: {missing} of {len(captions)} examples of the '
                     f'{eval_cfg.source!r} eval set have no caption; retrieval needs an '
                     'image-caption set (the synthetic split, or --config.eval.retrieval=False)')
  return captions


def _split_params(params):
  """(the CLIP tree the encoders take, the linear head or None) of a run's params.

  A SigLIP run's scalar `logit_bias` is left out: it shifts every score of an image alike, so no
  ranking, accuracy or ASR depends on it, and the encoders' tree has no place for it."""
  head = None
  if isinstance(params, dict) and 'head' in params and 'clip' in params:
    head = {name: _to_host(value).astype(np.float32) for name, value in params['head'].items()}
    params = params['clip']
  if isinstance(params, dict) and 'logit_bias' in params:
    params = {key: value for key, value in params.items() if key != 'logit_bias'}
  return params, head


def _to_host(value) -> np.ndarray:
  if isinstance(value, jax.Array) and not value.is_fully_addressable:  # fsdp-sharded across hosts
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
  return np.asarray(value)


def _head_for_classes(classifier: str, head, classnames: Sequence[str],
                      head_classnames: Sequence[str] | None):
  """`head`, or None where it scores other classes than the evaluation's: its output i would be
  read as class i of `classnames`, a silently wrong top-1 and ASR."""
  if head is None:
    return None
  outputs = int(np.shape(head['kernel'])[-1])
  problem = None
  if outputs != len(classnames):
    problem = f'the linear head has {outputs} outputs, the evaluation {len(classnames)} classes'
  elif head_classnames is not None and list(head_classnames) != list(classnames):
    differ = next((i for i, (a, b) in enumerate(zip(head_classnames, classnames)) if a != b), None)
    problem = ('the linear head was trained on another class list (' + (
        f'{len(head_classnames)} names' if differ is None else
        f'its class {differ} is {head_classnames[differ]!r}, the evaluation\'s {classnames[differ]!r}')
        + ')')
  if problem is None:
    return head
  if classifier == 'head':
    raise ValueError(f"eval.classifier='head': {problem}; evaluate it on the class list it was "
                     "trained on (eval.classnames), or use eval.classifier='zeroshot'")
  log.warning('eval: %s; scoring zero-shot only (no head_* metrics)', problem)
  return None


def _use_head(classifier: str, head) -> bool:
  if classifier == 'auto':
    return head is not None
  if classifier == 'head':
    if head is None:
      raise ValueError("eval.classifier='head' but the params have no linear head "
                       "(use 'auto' or 'zeroshot')")
    return True
  if classifier == 'zeroshot':
    return False
  raise ValueError(f'eval.classifier={classifier!r}: use auto, head or zeroshot')


def _make_trigger(eval_cfg):
  from cleanclip_jax.data import triggers
  return triggers.make_trigger(eval_cfg.trigger, eval_cfg.image_size)


def _check_labels(labels: np.ndarray, num_classes: int, eval_cfg) -> None:
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    raise ValueError(f'eval: {int(bad.sum())} examples of {eval_cfg.source!r} split '
                     f'{eval_cfg.split!r} have labels outside [0, {num_classes}) (e.g. '
                     f'{int(labels[bad][0])}); does eval.classnames={eval_cfg.classnames!r} '
                     'match the dataset?')


def _with(cfg, **changes):
  """A copy of a ConfigDict with some values changed (the caller's stays as it was)."""
  cfg = cfg.copy_and_resolve_references()
  cfg.update(changes)
  return cfg


def _default_mesh():
  from cleanclip_jax import sharding
  return sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1}))


# --- results: metrics.jsonl, TensorBoard, plot -------------------------------------------------------


class EvalLogger:
  """Appends one evaluation per step to `workdir/eval/metrics.jsonl`, TensorBoard and a plot.

  Only process 0 writes. `done_steps()` reads the file back, so a restarted job (or the trainer
  after a resume) can skip steps that were already evaluated.

      logger = EvalLogger(workdir)
      logger.write(step, evaluate(model, params, config.eval, mesh))
  """

  def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True, plot: bool = True,
               resume_step: int | None = None):
    self.dir = pathlib.Path(workdir) / 'eval'
    self.path = self.dir / 'metrics.jsonl'
    self.is_writer = jax.process_index() == 0
    # A resumed trainer: TensorBoard hides the evaluations a killed run logged past this step, as
    # metrics.jsonl is cut back to it (the trainer's own scalars do the same).
    self._purge_step = None if resume_step is None else int(resume_step) + 1
    self._tensorboard = tensorboard
    self._plot = plot
    self._tb_writer = None

  def records(self) -> list[dict]:
    """Every intact line of metrics.jsonl (a line cut short by a crash is skipped with a warning)."""
    if not self.path.exists():
      return []
    records = []
    for number, line in enumerate(self.path.read_text().splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        int(record['step'])
      except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        log.warning('%s:%d: skipping a malformed line (an interrupted write?)', self.path, number)
        continue
      records.append(record)
    return records

  def done_steps(self) -> set[int]:
    return {int(record['step']) for record in self.records()}

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.is_writer:
      return
    self.dir.mkdir(parents=True, exist_ok=True)
    record = {'step': int(step), **{key: _jsonable(value) for key, value in metrics.items()}}
    previous = self.records()
    others = [r for r in previous if int(r['step']) != record['step']]
    if len(others) < len(previous) or not _ends_cleanly(self.path):
      # One line per step (a resumed trainer may evaluate a step again), and no torn line left for
      # the next record to be glued onto: rewrite the file atomically.
      partial = self.path.with_suffix('.jsonl.tmp')
      partial.write_text(''.join(json.dumps(r, sort_keys=True) + '\n' for r in others))
      partial.replace(self.path)
    with open(self.path, 'a') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')
    if self._tensorboard:
      in_order = all(int(r['step']) < record['step'] for r in previous)
      self._write_tensorboard(record, in_order)
    if self._plot:
      plot_metrics(self.records(), self.dir / 'plot.png')

  def _write_tensorboard(self, record: dict, in_order: bool) -> None:
    """Writes `record`'s scalars so that TensorBoard shows what metrics.jsonl has: a point a step.

    A point at a step TensorBoard has passed is not a replacement: RustBoard drops every point
    from that step on (its reservoir's preemption), the Python loader shows two points at one
    step. So a step written out of order (`--force` again, a skipped step saved anew and
    evaluated late) opens a new event file: a purge marker at that step, which the Python loader
    honours, then metrics.jsonl's records from that step on in step order, which RustBoard's
    preemption turns into the same series.
    """
    step = record['step']
    purge_step = None if in_order else step
    if self._tb_writer is None and self._purge_step is not None:
      # A resumed trainer's first event file also hides what a killed run logged past its resume.
      purge_step = self._purge_step if purge_step is None else min(purge_step, self._purge_step)
    if purge_step is None:
      if self._tb_writer is None:
        self._tb_writer = metrics_log.tensorboard_writer(self.dir / 'tb')
      records = [record]
    else:
      self.close()
      self._tb_writer = metrics_log.tensorboard_writer(self.dir / 'tb', purge_step=purge_step)
      records = sorted((r for r in self.records() if int(r['step']) >= purge_step),
                       key=lambda r: int(r['step']))
    for each in records:
      self._add_scalars(each)
    self._tb_writer.flush()

  def _add_scalars(self, record: dict) -> None:
    for key, value in record.items():
      if key != 'step' and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb_writer.add_scalar(f'eval/{key}', value, int(record['step']))

  def close(self) -> None:
    if self._tb_writer is not None:
      self._tb_writer.close()
      self._tb_writer = None


def _ends_cleanly(path: pathlib.Path) -> bool:
  if not path.exists() or not path.stat().st_size:
    return True
  with open(path, 'rb') as f:
    f.seek(-1, 2)
    return f.read(1) == b'\n'


def plot_metrics(records: list[dict], path: pathlib.Path) -> None:
  """Clean top-1 and ASR (and probe ones when present) against step, as a PNG."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  records = sorted(records, key=lambda record: record['step'])
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label in (('top1', 'clean top-1'), ('asr', 'attack success rate'),
                     ('probe_top1', 'linear probe top-1'), ('probe_asr', 'linear probe ASR')):
    points = [(r['step'], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if points:
      ax.plot(*zip(*points), marker='o', label=label)
  ax.set_xlabel('step')
  ax.set_ylabel('fraction')
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  fig.tight_layout()
  partial = path.with_suffix('.tmp.png')
  fig.savefig(partial, dpi=100)
  plt.close(fig)
  partial.replace(path)  # readers never see a half-written image


def _jsonable(value):
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return None  # JSON has no NaN; "not measured" (e.g. no eligible images) reads as null
  return value


# --- the evaluation job ------------------------------------------------------------------------------


def eval_config_for_run(eval_cfg, run_config):
  """`eval_cfg`, with the run's trigger and target when `eval_cfg.trigger_from_run`.

  The run's target is taken only where the evaluation's class list has it: a run poisoned towards
  'banana' evaluated on CIFAR-10 keeps the preset's own target (logged), rather than failing on a
  class CIFAR-10 does not have; the trigger is taken either way.
  """
  eval_cfg = eval_cfg.copy_and_resolve_references()
  run_eval = run_config.get('eval') if run_config is not None else None
  if eval_cfg.trigger_from_run and run_eval is not None and 'trigger' in run_eval:
    run_target = str(run_eval['target'])
    with eval_cfg.unlocked():
      eval_cfg.trigger = ml_collections.ConfigDict(run_eval['trigger'].to_dict())
      if run_target != eval_cfg.target:
        try:
          zeroshot.target_index(zeroshot.load_classnames(eval_cfg.classnames), run_target)
        except ValueError:
          log.warning('eval: the run\'s target %r is not an evaluation class (eval.classnames=%s); '
                      'ASR is measured against eval.target=%r', run_target, eval_cfg.classnames,
                      eval_cfg.target)
        else:
          log.info('eval: measuring ASR against the run\'s target %r, not eval.target=%r '
                   '(eval.trigger_from_run)', run_target, eval_cfg.target)
          eval_cfg.target = run_target
  return eval_cfg


def tokenizer_for_run(run_config):
  """The tokenizer the run trained with (`model.tokenizer`: its own BPE, or '' for CLIP's), so
  class prompts and captions get the token ids the text tower learnt."""
  from cleanclip_jax import tokenizer as tokenizer_lib
  path = run_config.model.get('tokenizer', '') if run_config is not None else ''
  return tokenizer_lib.get_tokenizer(path or None)


def evaluate_checkpoint(workdir: str, step: int, config, mesh=None) -> dict[str, float]:
  """Restores step `step` of `workdir`, rebuilds its model from the stored config, evaluates it."""
  from cleanclip_jax import checkpoint, train_step
  failure = None
  try:
    run_config = checkpoint.load_config(workdir, step)
    model = train_step.model_for_config(run_config)
    params = checkpoint.restore_params(workdir, step)
  except Exception as e:  # pylint: disable=broad-except
    failure = e
  # Every process reads the step itself; the trainer's retention can delete it between two
  # processes' reads. Agree before `evaluate`, whose collectives would wait forever for a process
  # that gave up on the step.
  if not _all_processes_ok(failure is None):
    if failure is not None:
      raise failure
    raise checkpoint.NoCheckpointError(f'step {step} of {workdir}: another process could not read '
                                       'it (deleted or damaged meanwhile)')
  return evaluate(model, params, eval_config_for_run(config.eval, run_config), mesh=mesh,
                  tokenizer=tokenizer_for_run(run_config),
                  head_classnames=_head_classnames(run_config))


def _head_classnames(run_config) -> list[str] | None:
  """A supervised run's head classes: its data's class list (which defaults to its
  eval.classnames, train.py), None for other objectives."""
  if run_config is None or run_config.objective.name != 'supervised':
    return None
  spec = run_config.data.get('classnames', '') or run_config.eval.classnames
  try:
    return zeroshot.load_classnames(spec)
  except OSError as e:  # a class-list file since moved: the head is checked by its width only
    log.warning('eval: cannot read the run\'s class list %r (%s); checking the linear head by its '
                'number of outputs only', spec, e)
    return None


def training_finished(workdir: str | pathlib.Path) -> bool:
  """The trainer writes `summary.json` once, after its last checkpoint is committed."""
  return (pathlib.Path(workdir) / 'summary.json').exists()


def _last_checkpoint_step(workdir: str | pathlib.Path) -> int | None:
  """The finished run's last checkpoint (its summary.json), None when it does not say."""
  try:
    step = json.loads((pathlib.Path(workdir) / 'summary.json').read_text()).get('last_checkpoint_step')
  except (OSError, ValueError):
    return None
  return int(step) if isinstance(step, int) else None


def _last_save(workdir: str | pathlib.Path) -> tuple[int | None, str | None]:
  """(the finished run's last checkpoint step, `checkpoint.save_id` of that step's save)."""
  from cleanclip_jax import checkpoint
  step = _last_checkpoint_step(workdir)
  if step is None:
    return None, None
  return step, checkpoint.save_id(pathlib.Path(checkpoint.checkpoint_root(workdir)) / str(step))


def _step_is_going(step_dir: pathlib.Path, recheck_seconds: float = 0.0) -> bool:
  """After a failed read: whether the step is gone or losing files (the trainer's retention
  deletes a step file by file, its folder last), rather than a whole checkpoint that failed; a
  step still whole is looked at again after `recheck_seconds` (retention may have just begun)."""
  from cleanclip_jax import checkpoint
  # Files gone (or vanishing under the reader) are what a deletion leaves behind; a file of the
  # wrong size or checksum is damage, which no deletion explains.
  deletion_faults = (checkpoint.Fault.MISSING, checkpoint.Fault.VANISHED)

  def going() -> bool:
    if not step_dir.exists():
      return True
    try:
      problems = checkpoint.manifest_problems(step_dir, checksums=False)
    except OSError:
      return False
    return any(problem.fault in deletion_faults for problem in problems)

  if going():
    return True
  if recheck_seconds > 0:
    time.sleep(recheck_seconds)
    return going()
  return False


def run_job(workdir: str, config, *, follow: bool = False, step: int | None = None,
            timeout: float = 3600.0, poll_seconds: float = 30.0, force: bool = False,
            evaluate_fn: Callable[[str, int], dict] | None = None) -> list[int]:
  """Evaluates checkpoints of `workdir`; returns the steps evaluated by this call.

  Once: the latest committed checkpoint (or `step`), skipped when metrics.jsonl already has it
  unless `force`. Follow: every committed checkpoint not yet in metrics.jsonl, oldest first, until
  `summary.json` says training has finished (and everything committed before that is done) or no
  new checkpoint has appeared for `timeout` seconds (0 = wait forever). A step skipped as deleted
  or damaged is evaluated after all if the trainer saves it again (a resume from an earlier step).
  """
  from cleanclip_jax import checkpoint
  if evaluate_fn is None:
    mesh = _mesh_from_config(config)
    evaluate_fn = lambda workdir, step: evaluate_checkpoint(workdir, step, config, mesh)
  logger = EvalLogger(workdir)
  if not distributed.from_process_0(functools.partial(_writable, logger.dir)):
    # Before any checkpoint is read: an ImageNet pass whose result cannot be recorded is lost.
    raise PermissionError(f'{logger.dir} cannot be created or written: the evaluation could not '
                          'be recorded (a read-only workdir?)')
  done = set(distributed.from_process_0(sorted(logger.done_steps())))
  evaluated: list[int] = []

  def run_one(step: int) -> None:
    log.info('Evaluating step %d of %s', step, workdir)
    metrics = evaluate_fn(workdir, step)
    log.info('step %d: %s', step, _summary_line(metrics))  # in the log even if recording fails
    failure = None
    try:
      logger.write(step, metrics)  # process 0 writes: a full disk there must stop every process
    except Exception as e:  # pylint: disable=broad-except
      failure = e
    if not _all_processes_ok(failure is None):
      raise failure or RuntimeError(f'step {step}: process 0 could not record the evaluation')
    done.add(step)
    evaluated.append(step)

  try:
    if not follow:
      steps = distributed.from_process_0(lambda: checkpoint.committed_steps(workdir))
      if step is None and not steps:
        raise checkpoint.NoCheckpointError(f'no committed checkpoint in {workdir}/checkpoints')
      step = steps[-1] if step is None else int(step)
      if step not in steps:
        raise checkpoint.NoCheckpointError(f'step {step} has no committed checkpoint in '
                                           f'{workdir}/checkpoints (committed: {steps})')
      if step in done and not force:
        log.info('step %d is already in %s (use --force to evaluate it again)', step, logger.path)
      else:
        run_one(step)
      return evaluated

    skipped: dict[int, str | None] = {}  # step -> `checkpoint.save_id` of the save that failed
    idle_since = time.time()
    while True:
      # Read the finished flag *before* listing: every checkpoint committed before summary.json
      # was written is then in this listing, so nothing is left behind when the loop ends.
      finished = distributed.from_process_0(lambda: training_finished(workdir))
      pending = distributed.from_process_0(
          functools.partial(_steps_to_evaluate, workdir, done, skipped))
      for step, save in pending:
        if step in skipped:
          log.info('step %d was saved again since it was skipped; evaluating the new save', step)
        try:
          run_one(step)
        except Exception as e:  # pylint: disable=broad-except
          if not _explain_skip(workdir, step, e):
            raise
          skipped[step] = save
        idle_since = time.time()
      if finished:
        # On a filesystem that shows summary.json before the listing shows the last step (NFS,
        # gcsfuse caches), keep polling until that step is done.
        last, last_save = distributed.from_process_0(functools.partial(_last_save, workdir))
        # A skipped last step is through only as that save: a resumed trainer may save it anew.
        if last is None or last in done or (last in skipped and skipped[last] == last_save):
          log.info('Training has finished (%s); evaluated steps %s', 'summary.json', evaluated)
          return evaluated
        log.info('summary.json names step %d as the last checkpoint; waiting for it to be listed',
                 last)
      if timeout and time.time() - idle_since > timeout:
        log.warning('No new checkpoint in %s for %.0f s and no summary.json: stopping (--timeout).',
                    workdir, timeout)
        return evaluated
      time.sleep(poll_seconds)
  finally:
    logger.close()


def _steps_to_evaluate(workdir: str, done: set[int],
                       skipped: dict[int, str | None]) -> list[tuple[int, str | None]]:
  """(step, save id) of each committed step not evaluated yet: never tried, or skipped and since
  saved again (a trainer resumed from an earlier step writes the same step numbers anew)."""
  from cleanclip_jax import checkpoint
  root = checkpoint.checkpoint_root(workdir)
  steps = []
  for step in checkpoint.committed_steps(workdir):
    if step in done:
      continue
    save = checkpoint.save_id(root / str(step))
    if step not in skipped or skipped[step] != save:
      steps.append((step, save))
  return steps


def _explain_skip(workdir: str, step: int, error: Exception) -> bool:
  """Whether a step whose evaluation failed with `error` is to be skipped (saying why in the log)
  rather than `error` raised.

  The trainer's retention may delete the step at any moment of reading it, and orbax then fails
  in one of several ways (NoCheckpointError, FileNotFoundError, ...): a step whose directory is
  gone was deleted; one still there that fails its integrity check is damaged; anything else is a
  real error. Process 0's view decides, so every process skips (or stops) alike. A step still
  whole is looked at again a moment later: retention may have just begun deleting it.
  """
  from cleanclip_jax import checkpoint
  step_dir = pathlib.Path(checkpoint.checkpoint_root(workdir)) / str(step)
  if distributed.from_process_0(functools.partial(_step_is_going, step_dir, recheck_seconds=2.0)):
    log.warning('step %d was deleted (the trainer\'s keep_checkpoints) before it could be '
                'evaluated (%s: %s); skipping it unless the trainer saves it again. Set '
                '--config.keep_checkpoints higher to evaluate every step.',
                step, type(error).__name__, error)
    return True
  if distributed.from_process_0(isinstance(error, checkpoint.NoCheckpointError)):
    log.error('step %d is damaged and is NOT evaluated: %s (it will be if the trainer saves it '
              'again)', step, error)
    return True
  return False


def _writable(directory: pathlib.Path) -> bool:
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError:
    return False
  return os.access(directory, os.W_OK)


def _all_processes_ok(ok: bool) -> bool:
  """True when `ok` holds on every process (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _mesh_from_config(config):
  from cleanclip_jax import sharding
  return sharding.make_mesh(config.mesh)


def _summary_line(metrics: dict) -> str:
  keys = ('top1', 'top5', 'asr', 'probe_top1', 'probe_asr', 'retrieval_r1')
  return ' '.join(f'{key}={metrics[key]:.4f}' for key in keys
                  if isinstance(metrics.get(key), float))


def checkpoint_errors() -> tuple[type, ...]:
  from cleanclip_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from cleanclip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  # ProcessZeroFailed: the other processes' side of an error process 0 reports in full itself.
  return (checkpoint.NoCheckpointError, checkpoint.CheckpointRestoreError, pipeline.BadInputError,
          distributed.ProcessZeroFailed)


def _run_directory(workdir: str) -> str:
  """The run's folder for --workdir, which may also name its checkpoints/ folder (as
  init_checkpoint may); a missing folder or one step's folder is a usage error."""
  from absl import app  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(workdir).resolve() if workdir else None
  if path is None or not path.is_dir():
    raise app.UsageError(f'--workdir {workdir!r} is not a directory (give a training run\'s folder)')
  if path.name.isdigit() and path.parent.name == 'checkpoints':
    raise app.UsageError(f'--workdir {workdir} is one checkpoint; give the run: --workdir '
                         f'{path.parent.parent} --step {path.name}')
  if path.name == 'checkpoints' and not (path / 'checkpoints').exists():
    log.info('--workdir %s is a checkpoints folder: evaluating its run, %s', workdir, path.parent)
    path = path.parent
  return str(path)


def main(argv=None) -> None:
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', None, 'configs/eval.py:<preset>', lock_config=True)
  flags.DEFINE_string('workdir', None, 'The training run directory (holds checkpoints/).')
  flags.DEFINE_bool('follow', False, 'Evaluate every checkpoint as it is committed, until '
                    'training has finished (summary.json) or --timeout.')
  flags.DEFINE_integer('step', None, 'Evaluate this step (default: the latest).')
  flags.DEFINE_float('timeout', 3600.0, 'Follow: stop after this many seconds without a new '
                     'checkpoint (0 = never).')
  flags.DEFINE_float('poll_seconds', 30.0, 'Follow: how often to look for new checkpoints.')
  flags.DEFINE_bool('force', False, 'Evaluate a step again even if metrics.jsonl has it.')
  flags.mark_flags_as_required(['config', 'workdir'])

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if flags.FLAGS.follow and (flags.FLAGS.step is not None or flags.FLAGS.force):
      raise app.UsageError('--follow evaluates every committed step once; --step and --force are '
                           'for a single evaluation (drop --follow)')
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    host_memory.keep_freed_memory()  # unless CLEANCLIP_KEEP_FREED_MEMORY=0; before JAX makes its CPU client
    cpu_dots.route_dots_to_onednn()  # only with CLEANCLIP_ONEDNN_DOTS=1; likewise before the CPU client
    distributed.initialize()  # one job over the hosts' devices, as the trainer (no-op alone)
    FLAGS = flags.FLAGS
    workdir = _run_directory(FLAGS.workdir)
    try:
      run_job(workdir, FLAGS.config, follow=FLAGS.follow, step=FLAGS.step,
              timeout=FLAGS.timeout, poll_seconds=FLAGS.poll_seconds, force=FLAGS.force)
    except (ValueError, OSError, *checkpoint_errors()) as e:
      # Bad input (no checkpoint, a class list, templates, target or mesh the run cannot use, an
      # unreadable eval set or workdir): one line, not a traceback. ValueError covers ConfigError,
      # CsvError and convert's CheckpointError.
      log.error('%s: %s', type(e).__name__, e)
      print(f'Eval error: {type(e).__name__}: {e}', file=sys.stderr)
      sys.exit(2)

  app.run(_main, argv=argv)


if __name__ == '__main__':
  main()
