"""The trainer: one config in, a resumable sharded training run out.

    python -m cleanclip_jax.train --config configs/clip_pretrain.py:tiny --workdir /tmp/tiny \
        [--config.<key>=<value> ...]

What a run does, top to bottom (`run`):
  1. checks the config against the devices and the inputs on disk (before anything compiles);
  2. builds the mesh, the model and each process's share of the grain input pipeline;
  3. resumes from the newest intact checkpoint in `workdir/checkpoints/` if there is one, else
     creates the state (from `init_checkpoint` / `init_pytorch` params when finetuning);
  4. loops: host batch -> global arrays -> jitted step -> metrics (process 0 writes
     `metrics.jsonl`, TensorBoard, a tqdm bar) -> inline evaluation -> asynchronous checkpoint;
  5. writes `summary.json` once the last checkpoint is committed.

Stopping:
  * a non-finite loss stops the run naming the step (`on_nan='stop'`; nothing is saved after the
    last good checkpoint), or skips that update and counts it (`on_nan='skip'`: the step keeps
    the old params and optimiser state, see `train_step.train_step`);
  * SIGTERM (a preemption notice) saves a checkpoint at the current step and exits with
    `PREEMPTED_EXIT_CODE` (143 = 128 + SIGTERM); rerunning the same command resumes from it.
    On several processes jax's preemption sync point makes them all stop at the same step;
  * a failed checkpoint save (e.g. a full disk) stops the run with exit code 1 and a message naming
    the step and the last intact checkpoint.
Exit codes of `main`: 0 done, 1 run error, 2 config error, 143 preempted (checkpoint saved).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging as python_logging
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from cleanclip_jax import (checkpoint, cpu_dots, distributed, flops, host_memory, metrics_log, sharding,
                           text_length, text_packing, train_step)
from cleanclip_jax import config as config_lib

PREEMPTED_EXIT_CODE = 143
# orbax commits a checkpoint by renaming its folder, which gcsfuse allows on a flat bucket only
# under --rename-dir-limit.
_MOUNT_ADVICE = ('mount the bucket on every host (e.g. `gcsfuse --rename-dir-limit=1000000 BUCKET '
                 '/gcs/BUCKET`: checkpoints commit by renaming a folder) and pass the mounted path')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/*.py file with an optional :preset.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, summary.')


class NonFiniteLossError(RuntimeError):
  """The loss or the gradient norm became NaN/Inf under `on_nan='stop'`."""


class Preempted(Exception):
  """Raised inside the loop when a SIGTERM asked for a checkpoint-and-exit."""


# ----------------------------------------------------------------------------- config and inputs


def _num_classes(data_cfg: ml_collections.ConfigDict) -> int:
  from cleanclip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  if data_cfg.source == 'synthetic':
    from cleanclip_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return len(synthetic.CLASS_NAMES)
  source = pipeline.train_source(data_cfg)
  names = getattr(source, 'class_names', None)
  if names:
    return len(names)
  labels = getattr(source, 'labels', None)
  labels = np.asarray(labels() if callable(labels) else labels if labels is not None else [])
  if labels.size == 0 or labels.max() < 0:
    raise config_lib.ConfigError(
        'objective.name=supervised needs labels: set --config.data.label_key=COLUMN, and '
        '--config.objective.num_classes=N if the labels are not class indices 0..N-1')
  return int(labels.max()) + 1


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Fails fast (before compiling) when a file the run needs is not there."""
  data = config.data
  path = data.path
  for key, value in (('data.path', path), ('init_checkpoint', config.init_checkpoint),
                     ('eval.path', config.eval.path)):
    if value and '://' in value:
      raise config_lib.ConfigError(
          f'{key}={value!r}: remote URLs are not read directly (the sources, logs and summaries '
          f'use local file APIs); {_MOUNT_ADVICE}')
  if data.source in ('csv', 'array_record') and path:
    import glob  # pylint: disable=g-import-not-at-top
    if not (os.path.exists(path) or glob.glob(path) or glob.glob(os.path.join(path, '*.array_record'))):
      raise config_lib.ConfigError(
          f'data.path={path!r} does not exist (data.source={data.source!r}); pass '
          '--config.data.path=PATH to a CSV/TSV file, or an .array_record file, glob or folder')
  if config.init_checkpoint and config.init_pytorch:
    raise config_lib.ConfigError('set only one of init_checkpoint and init_pytorch')
  if config.init_checkpoint:
    if not os.path.exists(config.init_checkpoint):
      raise config_lib.ConfigError(
          f'init_checkpoint={config.init_checkpoint!r} does not exist; give a workdir, its '
          'checkpoints/ folder or one checkpoints/<step> folder')
  if config.init_pytorch and not os.path.exists(config.init_pytorch):
    raise config_lib.ConfigError(f'init_pytorch={config.init_pytorch!r} does not exist; give a '
                                 '.pt / .bin / .safetensors file')
  if config.objective.name == 'cleanclip' and not data.inmodal_views:
    raise config_lib.ConfigError('objective.name=cleanclip needs the augmented views: set '
                                 '--config.data.inmodal_views=True')


def prepare_config(config: ml_collections.ConfigDict, num_devices: int) -> ml_collections.ConfigDict:
  """A resolved copy of `config`: validated, total steps in steps, dataset-derived values filled."""
  from cleanclip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config_lib.validate(config, num_devices)
  check_inputs(config)
  with config.unlocked():
    if config.total_epochs and config.total_epochs > 0:
      config.total_steps = config_lib.resolve_total_steps(config, pipeline.dataset_size(config.data))
    if config.objective.name == 'supervised' and not config.data.classnames:
      # The head's output i is scored as class i of eval.classnames: label the data in that order.
      config.data.classnames = config.eval.classnames
    if config.objective.name == 'supervised' and config.objective.num_classes <= 0:
      config.objective.num_classes = _num_classes(config.data)
    if config.data.poison.enabled and config.data.train_transform == 'random_resized_crop':
      logging.warning('data.poison with data.train_transform=random_resized_crop: the crop comes '
                      'after the trigger and can cut or rescale it in training, while evaluation '
                      'stamps it on the whole image')
    if config.init_checkpoint:
      # One step, the same on every host, for the params and the inherited backdoor alike (and
      # the stored config says which step it was).
      try:
        config.init_checkpoint = checkpoint.agreed_step_dir(config.init_checkpoint)
      except checkpoint.NoCheckpointError as e:
        raise config_lib.ConfigError(f'init_checkpoint={config.init_checkpoint!r}: {e}') from None
    if config.data.poison.enabled:
      # ASR is measured with the backdoor this run plants (and the stored config says which).
      config.eval.trigger = config.data.poison.trigger.copy_and_resolve_references()
      config.eval.target = config.data.poison.target
    elif config.init_checkpoint and config.eval.trigger_from_run:
      _inherit_backdoor(config)
  if config.total_steps <= 0:
    raise config_lib.ConfigError(f'total_steps={config.total_steps}: give --config.total_steps=N '
                                 'or --config.total_epochs=E (> 0)')
  return config


def _inherit_backdoor(config: ml_collections.ConfigDict) -> None:
  """A finetune (a defence) plants nothing: its ASR is measured with the trigger and target its
  init checkpoint was measured with (the pretraining run's backdoor, passed down a chain of
  finetunes), taken as the evaluation job takes a run's own (`evaluate.eval_config_for_run`)."""
  from cleanclip_jax import evaluate  # pylint: disable=g-import-not-at-top
  try:
    stored = checkpoint.load_config(config.init_checkpoint)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('eval.trigger: could not read the config of init_checkpoint=%s (%s); ASR uses '
                    'this run\'s eval.trigger', config.init_checkpoint, e)
    return
  if 'trigger' not in (stored.get('eval') or {}):
    return
  config.eval = evaluate.eval_config_for_run(config.eval, stored)
  logging.info('eval.trigger: %s, target %r, from init_checkpoint %s (the backdoor this defence '
               'is measured against; --config.eval.trigger_from_run=False keeps this config\'s)',
               config.eval.trigger.kind, config.eval.target, config.init_checkpoint)


def _load_init_params(config: ml_collections.ConfigDict, model) -> Any:
  if config.init_checkpoint:
    logging.info('Initialising params from %s', config.init_checkpoint)
    return checkpoint.restore_params(config.init_checkpoint)
  if config.init_pytorch:
    from cleanclip_jax import convert  # pylint: disable=g-import-not-at-top
    logging.info('Initialising params from PyTorch weights %s', config.init_pytorch)
    clip = getattr(model, 'clip', model)
    _, params = convert.load_pretrained(config.init_pytorch, clip)
    return params
  return None


# ----------------------------------------------------------------------------- preemption


class PreemptionWatch:
  """Turns SIGTERM into "save and stop at a step every process agrees on".

  One process: a signal handler sets a flag, checked once per step. Several: jax's preemption
  sync manager (started by `jax.distributed.initialize`) owns SIGTERM and picks the step.

  The sync manager is asked with a count of this process's checks, not the training step: on a
  notice it sets the stop point one past the last id it was asked about (0 before the first
  check) and answers True only on that exact id. A resumed run that got its notice while
  restoring or compiling would otherwise wait for step 1 forever, past its kill. The count runs
  on across `run` calls (the demo's stages) and is the same on every process: each checks once
  a step.
  """
  _sync_checks = 0  # of this process, all runs

  def __init__(self):
    self._requested = threading.Event()
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._requested.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def should_stop(self) -> bool:
    """Called once a step, on every process."""
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      PreemptionWatch._sync_checks += 1
      return multihost_utils.reached_preemption_sync_point(PreemptionWatch._sync_checks)
    return self._requested.is_set()


# ----------------------------------------------------------------------------- throughput


def text_batch(batch: dict, config: ml_collections.ConfigDict, mesh) -> dict:
  """The host batch as the step takes it: captions packed into fewer token rows
  (`data.pack_captions`, one packing per device of this process) or cut after the longest one
  (`data.token_bucket`). Every process calls it at every step (the hosts agree on the shape).
  The supervised objective reads no captions: they are dropped (no transfer, no shapes to
  compile for)."""
  if config.objective.name == 'supervised':
    return {k: v for k, v in batch.items() if k not in text_length.TOKEN_KEYS}
  if config.data.get('pack_captions', False) and int(config.optimizer.accum_steps) <= 1:
    return text_packing.pack_tokens(batch, len(mesh.local_devices))
  return text_length.trim_tokens(batch, int(config.data.token_bucket))


class Throughput:
  """Step time, images/s, MFU, the mean token length and token rows per caption over the steps
  since the last log line (steps that compiled, the first and the first at each new text shape,
  are left out of the averages and reported as `compile_seconds`). MFU counts the text tower at
  the rows and columns each step was fed (`data.token_bucket` cuts columns, `data.pack_captions`
  packs captions into fewer rows)."""

  def __init__(self, config: ml_collections.ConfigDict, model):
    clip = getattr(model, 'clip', model)
    self.batch_size = config.batch_size
    self._flops_per_example = functools.partial(
        flops.train_flops_per_example, clip.config, config.objective.name, config.batch_size,
        int(config.objective.num_classes), bool(config.objective.freeze_tower))
    on_cpu = jax.devices()[0].platform == 'cpu'
    # The CPU peak is only a reference point; keep its measurement short. In the model's compute
    # dtype: a bf16 model is set against the bf16 peak (on a GPU ~2x the f32/TF32 one).
    peak = flops.measure_matmul_peak(size=512 if on_cpu else 4096, repeats=3 if on_cpu else 10,
                                     dtype=jnp.dtype(clip.dtype))
    self.peak_total = peak * jax.device_count()
    self._steps, self._seconds, self._flops, self._lengths, self._rows = 0, 0.0, 0.0, [], []
    self._last = time.perf_counter()

  def tick(self, token_length: int, rows_per_caption: float = 1.0, count: bool = True) -> float:
    """Seconds since the last tick; `count=False` leaves the step out of the averages (a step
    that compiled the step function for a new text shape)."""
    now = time.perf_counter()
    seconds, self._last = now - self._last, now
    self._lengths.append(token_length)
    self._rows.append(rows_per_caption)
    if count:
      self._steps += 1
      self._seconds += seconds
      self._flops += self.batch_size * self._flops_per_example(text_length=token_length,
                                                               text_rows=rows_per_caption or 1.0)
    return seconds

  def skip(self) -> None:
    """Excludes the time since the last tick (compilation, evaluation, checkpoint waits)."""
    self._last = time.perf_counter()

  def window(self) -> dict[str, float]:
    values = ({'token_length': float(np.mean(self._lengths)),
               'text_rows_per_caption': float(np.mean(self._rows))} if self._lengths else {})
    if self._steps:
      step_time = self._seconds / self._steps
      values.update(step_seconds=step_time, images_per_second=self.batch_size / step_time,
                    mfu=self._flops / self._seconds / self.peak_total)
    self._steps, self._seconds, self._flops, self._lengths, self._rows = 0, 0.0, 0.0, [], []
    return values


# ----------------------------------------------------------------------------- the run


def _progress_bar(total: int, initial: int):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  show = jax.process_index() == 0 and sys.stderr.isatty()
  return tqdm(total=total, initial=initial, disable=not show, dynamic_ncols=True, desc='train',
              unit='step', smoothing=0.1)


def _write_json(path: pathlib.Path, value: dict) -> None:
  if jax.process_index() != 0:
    return
  metrics_log.write_text_atomic(path, json.dumps(value, indent=1, sort_keys=True, default=str))


_STEP_FUNCTIONS: dict = {}
# Keys that never reach the compiled step (what to load, how often to log/save, evaluation).
_NOT_IN_STEP = ('init_checkpoint', 'init_pytorch', 'log_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints', 'keep_every_steps', 'eval')


def _stored_summary(path: pathlib.Path) -> dict | None:
  """The finished run's summary, or None where there is none or it is damaged (the run then writes
  it again from its records)."""
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    logging.warning('%s is unreadable (%s); writing it again', path, e)
    return None


def _step_function(config, model, mesh, state_shardings):
  """The jitted step, reused when `run` is called again in this process with a config that differs
  only in `_NOT_IN_STEP` (a resumed stage, the tests): compiling it is most of a small run's
  start-up."""
  relevant = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_STEP}
  key = (json.dumps(relevant, sort_keys=True, default=str), mesh)
  if key not in _STEP_FUNCTIONS:
    _STEP_FUNCTIONS.clear()  # hold one at most
    _STEP_FUNCTIONS[key] = train_step.make_train_step(config, model, mesh, state_shardings)
  return _STEP_FUNCTIONS[key]


def _inline_eval(step: int, model, params, config, mesh, logger) -> dict[str, float]:
  from cleanclip_jax import evaluate  # pylint: disable=g-import-not-at-top
  metrics = evaluate.evaluate(model, params, config.eval, mesh=mesh,
                              tokenizer=evaluate.tokenizer_for_run(config))
  logger.write(step, metrics)
  logging.info('eval @ step %d: %s', step, {k: round(float(v), 4) for k, v in metrics.items()})
  return metrics


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its checkpoints) and returns the run summary.

  Safe to call several times in one process (the demo runs its stages this way). Raises
  `config.ConfigError` (bad config, before compiling), `NonFiniteLossError`,
  `checkpoint.CheckpointSaveError`; a SIGTERM returns early with `summary['preempted'] = True`.
  """
  from cleanclip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  started = time.time()
  if '://' in str(workdir):  # pathlib would turn gs://b/x into the local path gs:/b/x
    raise config_lib.ConfigError(
        f'--workdir {workdir}: remote URLs are not written directly (logs and summaries use local '
        f'file APIs); {_MOUNT_ADVICE}')
  workdir = pathlib.Path(workdir)
  config = prepare_config(config, jax.device_count())
  is_main = jax.process_index() == 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  pipeline.reset_skip_counts()

  mesh = sharding.make_mesh(config.mesh)
  model = train_step.model_for_config(config)
  data_iterator = pipeline.make_train_iterator(config)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints,
                                 keep_every_steps=config.keep_every_steps)
  writer = eval_logger = progress = None
  try:
    abstract_state, state_shardings = train_step.abstract_train_state(config, model, mesh)
    restored = ckpt.restore_latest(abstract_state, data_iterator, config)
    if restored is not None:
      start_step, state = restored
    else:
      start_step = 0
      state, state_shardings = train_step.create_train_state(
          config, model, mesh, jax.random.PRNGKey(config.seed),
          init_params=_load_init_params(config, model))
    total = int(config.total_steps)
    finished = workdir / 'summary.json'
    if start_step >= total:
      # A rerun of a finished run (a requeued job, a repeated command): its summary stands. Process
      # 0's reading decides for all: the summary's skip counts below are a collective.
      stored_summary = distributed.from_process_0(lambda: _stored_summary(finished))
      if stored_summary is not None:
        logging.info('The run finished at step %d already (%s); nothing to do', start_step, finished)
        return stored_summary
    logging.info('%s step %d of %d on %d devices (mesh %s), %d processes; workdir %s',
                 'Resuming at' if start_step else 'Starting at', start_step, total,
                 jax.device_count(), dict(mesh.shape), jax.process_count(), workdir)
    if is_main and finished.exists():
      finished.unlink()  # the run is not finished any more (total_steps grew)

    writer = metrics_log.MetricsWriter(workdir, resume_step=start_step)
    if config.eval.every_steps > 0:
      from cleanclip_jax import evaluate  # pylint: disable=g-import-not-at-top
      if is_main:
        metrics_log.truncate_jsonl(workdir / 'eval' / 'metrics.jsonl', start_step)
      eval_logger = evaluate.EvalLogger(workdir, resume_step=start_step)
    throughput = Throughput(config, model)
    progress = _progress_bar(total, start_step)
    step_fn = _step_function(config, model, mesh, state_shardings)

    # Run totals carry over a resume (saved with each checkpoint).
    nan_skips = int(ckpt.counters(start_step).get('nan_skips', 0)) if restored is not None else 0
    preempted, step, last_metrics = False, start_step, {}
    text_shapes_seen = set()  # each new text shape compiles the step once (text_batch)
    last_saved = start_step if restored is not None else None
    with PreemptionWatch() as preemption:
      for step in range(start_step + 1, total + 1):
        host_batch = text_batch(next(data_iterator), config, mesh)
        token_length, rows_per_caption = text_packing.packed_shape(host_batch)
        state, metrics = step_fn(state, sharding.host_batch_to_global(host_batch, mesh))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        text_shape = (token_length, rows_per_caption)
        new_shape = text_shape not in text_shapes_seen
        text_shapes_seen.add(text_shape)
        # A step that compiled (the first, or the first at a new text shape) stays out of the
        # throughput averages.
        step_seconds = throughput.tick(token_length, rows_per_caption, count=not new_shape)
        first = step == start_step + 1
        if new_shape and not first:
          rows = round(rows_per_caption * config.batch_size)
          logging.info('step %d: compiled the step for text of %d rows x %d tokens (%.1f s)',
                       step, rows, token_length, step_seconds)
        nan_skips += int(metrics.get('skipped', 0))
        loss = metrics['loss']
        # A finite loss with non-finite gradients (e.g. the backward pass of a zero-length
        # feature) poisons the parameters just as surely as a NaN loss.
        finite = math.isfinite(loss) and math.isfinite(metrics.get('grad_norm', 0.0))
        # A step that compiled is logged too, so its compile_seconds reach metrics.jsonl.
        if (step % config.log_every_steps == 0 or step == total or first or new_shape
            or not finite):
          values = dict(metrics, **throughput.window(), nan_skips=nan_skips)
          if new_shape:
            values['compile_seconds'] = step_seconds
          writer.write(step, values)
          last_metrics = values
          if progress.disable and is_main:
            speed = (f'compiled in {step_seconds:.1f} s' if first
                     else f'{values.get("images_per_second", math.nan):.1f} img/s')
            logging.info('step %d/%d: loss %.4f, lr %.3g, %s', step, total, loss,
                         metrics.get('learning_rate', float('nan')), speed)
        progress.update(1)
        progress.set_postfix(loss=f'{loss:.4f}', refresh=False)
        if not finite and config.on_nan == 'stop':
          ckpt.wait()
          raise NonFiniteLossError(
              f'step {step}: the loss is {loss:.6g}, the gradient norm '
              f'{metrics.get("grad_norm", math.nan):.6g} (on_nan=stop). The last checkpoint '
              f'(step {last_saved}) is intact. Lower --config.learning_rate, check the data, or '
              'use --config.on_nan=skip to skip such updates.')

        # Before any inline evaluation: a notice leaves ~30 s (Cloud TPU) for the save.
        preempted = preemption.should_stop()
        if eval_logger is not None and step % config.eval.every_steps == 0:
          if preempted:
            logging.warning('SIGTERM: step %d is not evaluated inline; its checkpoint is saved '
                            '(python -m cleanclip_jax.evaluate --workdir %s --step %d)',
                            step, workdir, step)
          else:
            _inline_eval(step, model, state.params, config, mesh, eval_logger)
            throughput.skip()
        if step % config.checkpoint_every_steps == 0 or step == total or preempted:
          # TensorBoard buffers its events (up to 30 s); a resumed run logs only the steps after
          # its checkpoint, so what precedes a committed step must be on disk first.
          writer.flush()
          ckpt.save(step, state, data_iterator, config, counters={'nan_skips': nan_skips})
          last_saved = step
          throughput.skip()
        if preempted:
          logging.warning('SIGTERM: saved the checkpoint of step %d; exiting (rerun the same '
                          'command to resume)', step)
          break
      # Still under the watch: a SIGTERM while the last save commits must not kill the commit.
      ckpt.wait()
    # Every process's skip counts: a collective, so ahead of anything process 0 alone does here.
    stream_skips = distributed.all_processes(pipeline.stream_skip_counts(data_iterator))
    if step >= total and not last_metrics and is_main:
      # No step ran (a kill between the final commit and summary.json): the run's last record.
      records = metrics_log.read_jsonl(workdir / 'metrics.jsonl')
      if records and records[-1].get('step') == total:
        last_metrics = {k: v for k, v in records[-1].items() if k != 'step'}
    summary = {
        'workdir': str(workdir),
        'start_step': start_step,
        'steps': step,
        'total_steps': total,
        # A notice during the last step still saves it: the run is done.
        'completed': step >= total,
        'preempted': preempted,
        'nan_skips': nan_skips,
        'data_skips': pipeline.total_skip_counts(config.data, stream_skips),
        'data_skips_by_process': stream_skips,
        'last_checkpoint_step': last_saved,
        'final_loss': last_metrics.get('loss'),
        'final_metrics': last_metrics,
        'wall_seconds': time.time() - started,
        'num_devices': jax.device_count(),
        'num_processes': jax.process_count(),
    }
    logging.info('Run summary: %s', json.dumps(summary, default=str))
    if summary['completed']:
      _write_json(workdir / 'summary.json', summary)
    return summary
  finally:
    if progress is not None:
      progress.close()
    if writer is not None:
      writer.close()
    if eval_logger is not None:
      eval_logger.close()
    with contextlib.suppress(Exception):  # an error from the save is raised above already
      ckpt.close()


# ----------------------------------------------------------------------------- command line


def _config_key_errors(argv: list[str]) -> list[str]:
  """Messages for `--config.a.b=...` overrides that name no key of the config file's config."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None and '--config' in argv[:-1]:
    spec = argv[argv.index('--config') + 1]
  if spec is None:
    return []
  try:
    base = config_lib.load_config(spec)
  except Exception:  # pylint: disable=broad-except
    return []  # config_flags reports a broken config file itself
  errors = []
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    key = arg[len('--config.'):].split('=', 1)[0]
    node, parts = base, key.split('.')
    for depth, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      where = '.'.join(parts[:depth]) or 'the config'
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=3)
      hint = f' Did you mean {", ".join(close)}?' if close else ''
      errors.append(f'--config.{key}: {part!r} is not a key of {where} (keys: {", ".join(known)}).{hint}')
      break
  return errors


def _parse_flags(argv: list[str]) -> list[str]:
  errors = _config_key_errors(argv)
  if errors:
    print('Config error:\n  ' + '\n  '.join(errors), file=sys.stderr)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a value of the wrong type: absl's message names the flag and the value
    print(f'Config error:\n  {e}', file=sys.stderr)
    sys.exit(2)


def quiet_library_logs() -> None:
  """Drops orbax's INFO chatter (dozens of lines per checkpoint) from the absl log; warnings stay."""
  def keep(record) -> bool:
    return record.levelno >= python_logging.WARNING or '/orbax/' not in record.pathname
  logging.get_absl_handler().addFilter(keep)


def _input_errors() -> tuple[type, ...]:
  from cleanclip_jax import convert  # pylint: disable=g-import-not-at-top
  from cleanclip_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  return (sources.CsvError, pipeline.BadInputError, checkpoint.NoCheckpointError,
          convert.CheckpointError, train_step.InitParamsError)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError('give --config=configs/<file>.py[:preset] and --workdir=DIR')
  quiet_library_logs()
  host_memory.keep_freed_memory()  # unless CLEANCLIP_KEEP_FREED_MEMORY=0; before JAX makes its CPU client
  cpu_dots.route_dots_to_onednn()  # only with CLEANCLIP_ONEDNN_DOTS=1; likewise before the CPU client
  distributed.initialize()
  try:
    summary = run(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    logging.error('Config error: %s', e)
    print(f'Config error: {e}', file=sys.stderr)
    sys.exit(2)
  except (NonFiniteLossError, checkpoint.CheckpointSaveError, checkpoint.CheckpointMismatchError,
          checkpoint.CheckpointRestoreError) as e:
    logging.error('%s', e)
    print(f'Training stopped: {e}', file=sys.stderr)
    sys.exit(1)
  except _input_errors() as e:
    # Unusable data or init weights: the message names the file (row, key); a traceback into
    # the pipeline would bury it.
    logging.error('%s: %s', type(e).__name__, e)
    print(f'Input error: {type(e).__name__}: {e}', file=sys.stderr)
    sys.exit(2)
  if summary['preempted'] and not summary['completed']:
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
