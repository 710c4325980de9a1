"""The training loop in-process (8 emulated devices): logging, checkpoints, exact resume, NaN policy."""

import errno
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from cleanclip_jax import checkpoint, metrics_log, train, train_step
from cleanclip_jax import config as config_lib

TOTAL = 6


def tiny_config(**changes):
  """The `tiny` preset shrunk so a run compiles and trains in seconds."""
  config = config_lib.load_config('clip_pretrain.py:tiny')
  config.model.name = 'demo-vit'  # the smallest registered CLIP: quick to compile
  config.model.context_length = 8
  config.batch_size = 16
  config.total_steps = TOTAL
  config.warmup_steps = 2
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.data.synthetic.num_examples = 64
  config.update_from_flattened_dict(changes)  # {'optimizer.accum_steps': 2, ...}
  return config


def losses(workdir):
  return [(r['step'], r['loss']) for r in metrics_log.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """One uninterrupted run, shared by the tests below."""
  workdir = tmp_path_factory.mktemp('reference')
  summary = train.run(tiny_config(), workdir)
  return workdir, summary


def test_run_logs_every_step_and_checkpoints(reference):
  workdir, summary = reference
  records = metrics_log.read_jsonl(workdir / 'metrics.jsonl')
  assert [r['step'] for r in records] == list(range(1, TOTAL + 1))
  for key in ('loss', 'clip_loss', 'logit_scale', 'grad_norm', 'param_norm', 'learning_rate'):
    assert all(np.isfinite(r[key]) for r in records), key
  for key in ('images_per_second', 'step_seconds', 'mfu'):
    assert all(r[key] > 0 for r in records[1:]), key
  assert records[0]['learning_rate'] == 0.0 and records[2]['learning_rate'] == pytest.approx(1e-3)
  assert checkpoint.committed_steps(workdir) == [2, 4, 6]
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir / 'tensorboard'))
  stored = json.loads((workdir / 'summary.json').read_text())
  assert stored['completed'] and stored['steps'] == TOTAL and stored['nan_skips'] == 0
  assert stored['data_skips'] == {} and stored['data_skips_by_process'] == [{}]
  assert stored['wall_seconds'] > 0
  assert summary['final_loss'] == records[-1]['loss']
  config = checkpoint.load_config(workdir)
  assert config.total_steps == TOTAL and config.model.context_length == 8


def test_stop_and_resume_matches_uninterrupted_run(reference, tmp_path, monkeypatch):
  ref_dir, _ = reference
  workdir = tmp_path / 'resumed'
  write = metrics_log.MetricsWriter.write

  def write_then_preempt(self, step, values):
    write(self, step, values)
    if step == 3:  # a real SIGTERM at step 3, handled by the trainer's signal handler
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(metrics_log.MetricsWriter, 'write', write_then_preempt)
  first = train.run(tiny_config(), workdir)
  assert first['preempted'] and not first['completed'] and first['steps'] == 3
  assert checkpoint.committed_steps(workdir) == [2, 3]
  assert not (workdir / 'summary.json').exists()
  monkeypatch.setattr(metrics_log.MetricsWriter, 'write', write)

  second = train.run(tiny_config(), workdir)
  assert second['completed'] and second['start_step'] == 3
  assert losses(workdir) == losses(ref_dir)  # one record per step, equal losses
  resumed = checkpoint.restore_params(workdir)
  expected = checkpoint.restore_params(ref_dir)
  jax.tree.map(np.testing.assert_array_equal, resumed, expected)


def test_sigterm_in_the_last_step_completes_the_run(reference, tmp_path, monkeypatch):
  ref_dir, _ = reference
  workdir = tmp_path / 'last'
  write, save, wait = (metrics_log.MetricsWriter.write, checkpoint.Checkpointer.save,
                       checkpoint.Checkpointer.wait)
  handlers, logged_at_save, in_flight = [], {}, []

  def write_then_preempt(self, step, values):
    write(self, step, values)
    if step == TOTAL:
      os.kill(os.getpid(), signal.SIGTERM)

  def save_and_look(self, step, *args, **kwargs):
    # What TensorBoard holds on disk when a checkpoint is taken: a kill -9 after it loses no
    # logged step the resumed run would not log again.
    logged_at_save[step] = sorted(metrics_log.tensorboard_scalars(workdir / 'tensorboard')['loss'])
    save(self, step, *args, **kwargs)
    in_flight.append(step)

  def wait_and_look(self):
    if in_flight:  # a wait for a commit (not the no-op one of `close`)
      handlers.append(signal.getsignal(signal.SIGTERM))
      in_flight.clear()
    return wait(self)

  monkeypatch.setattr(metrics_log.MetricsWriter, 'write', write_then_preempt)
  monkeypatch.setattr(checkpoint.Checkpointer, 'save', save_and_look)
  monkeypatch.setattr(checkpoint.Checkpointer, 'wait', wait_and_look)
  summary = train.run(tiny_config(), workdir)
  # The final checkpoint is saved: done, with summary.json (and exit 0, not a requeue).
  assert summary['preempted'] and summary['completed'] and summary['steps'] == TOTAL
  assert json.loads((workdir / 'summary.json').read_text())['completed']
  assert losses(workdir) == losses(ref_dir)
  assert logged_at_save == {step: list(range(1, step + 1)) for step in (2, 4, TOTAL)}
  # Every wait for a commit, the last one too, ran with the trainer's handler, not the default
  # one that would kill the process mid-commit.
  assert len(handlers) == 3 and signal.SIG_DFL not in handlers


def test_kill_between_final_commit_and_summary(reference, tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / 'copy'
  shutil.copytree(ref_dir, workdir)
  (workdir / 'summary.json').unlink()
  summary = train.run(tiny_config(), workdir)
  last = metrics_log.read_jsonl(workdir / 'metrics.jsonl')[-1]
  assert summary['completed'] and summary['start_step'] == TOTAL
  assert summary['final_loss'] == last['loss'] and summary['final_metrics']['step_seconds'] > 0
  assert json.loads((workdir / 'summary.json').read_text())['final_loss'] == last['loss']


def test_a_damaged_summary_of_a_finished_run_is_written_again(reference, tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / 'copy'
  shutil.copytree(ref_dir, workdir)
  (workdir / 'summary.json').write_text('{"steps": 6, "comp')  # torn by a crash or a full disk
  summary = train.run(tiny_config(), workdir)
  assert summary['completed'] and summary['final_loss'] == losses(ref_dir)[-1][1]
  assert json.loads((workdir / 'summary.json').read_text())['completed']


def test_resume_cuts_a_metrics_log_with_a_damaged_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo\n{"step": 4}\n{"step": 5}\n')
  with pytest.raises(ValueError, match='metrics.jsonl:3'):
    metrics_log.read_jsonl(path)
  assert metrics_log.truncate_jsonl(path, 4) == 2  # the damaged line and step 5
  assert [r['step'] for r in metrics_log.read_jsonl(path)] == [1, 2, 4]


def test_an_interrupted_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / 'summary.json'
  metrics_log.write_text_atomic(path, '{"steps": 1}')

  def killed(*_):
    raise KeyboardInterrupt  # as if the process died between writing and renaming
  monkeypatch.setattr(metrics_log.os, 'replace', killed)
  with pytest.raises(KeyboardInterrupt):
    metrics_log.write_text_atomic(path, '{"steps": 2}')
  assert json.loads(path.read_text()) == {'steps': 1}


def test_an_atomic_write_syncs_the_data_before_the_rename(tmp_path, monkeypatch):
  # A host crash after an unsynced rename can leave the new name on an empty file.
  path = tmp_path / 'summary.json'
  events, real_fsync, real_replace = [], os.fsync, os.replace

  def fsync(fd):
    events.append(('fsync', os.path.realpath(f'/proc/self/fd/{fd}')))
    real_fsync(fd)

  def replace(src, dst):
    events.append(('replace', str(dst)))
    real_replace(src, dst)
  monkeypatch.setattr(metrics_log.os, 'fsync', fsync)
  monkeypatch.setattr(metrics_log.os, 'replace', replace)
  metrics_log.write_text_atomic(path, '{"steps": 3}')
  assert json.loads(path.read_text()) == {'steps': 3}
  tmp = os.path.realpath(path.with_name(path.name + '.tmp'))
  assert events[:2] == [('fsync', tmp), ('replace', str(path))]
  assert ('fsync', os.path.realpath(tmp_path)) in events[2:]


def test_preemption_sync_point_counts_checks_not_steps(monkeypatch):
  # jax's sync manager, given a notice before any check, stops at the id one past the last one it
  # saw (0): 1. A run resumed at step 1000 asked it about steps 1001, 1002, ... and never stopped.
  from jax.experimental import multihost_utils
  asked = []

  def notice_before_the_first_check(check_id):
    asked.append(check_id)
    return check_id == 1

  monkeypatch.setattr(multihost_utils, 'reached_preemption_sync_point', notice_before_the_first_check)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(train.PreemptionWatch, '_sync_checks', 0)
  with train.PreemptionWatch() as watch:  # resumed at step 1000: its first check
    assert watch.should_stop()
  with train.PreemptionWatch() as watch:  # a later run in the process (the demo's stages)
    assert not watch.should_stop()
  assert asked == [1, 2]


def test_a_workdir_of_another_objective_is_refused(reference, tmp_path):
  # A finetune given its pretraining run's workdir by mistake: the train states have the same
  # arrays, so only the stored config tells them apart (it returned the pretraining's summary).
  ref_dir, _ = reference
  workdir = tmp_path / 'copy'
  shutil.copytree(ref_dir, workdir)
  finetune = tiny_config(**{'objective.name': 'cleanclip', 'data.inmodal_views': True})
  with pytest.raises(checkpoint.CheckpointMismatchError, match="objective.name: checkpoint 'clip'"):
    train.run(finetune, workdir)
  assert checkpoint.committed_steps(workdir) == [2, 4, 6]  # nothing moved aside


def test_an_io_error_is_not_damage(reference, tmp_path, monkeypatch):
  # EIO while checksumming the newest step: the storage failed, not the checkpoint, so it must
  # stay in place (and no older step be resumed instead).
  ref_dir, _ = reference
  workdir = tmp_path / 'copy'
  shutil.copytree(ref_dir, workdir)
  (workdir / 'summary.json').unlink()
  digests = checkpoint._file_digests

  def failing(step_dir):
    if step_dir.name == '6':
      raise OSError(errno.EIO, 'Input/output error', str(step_dir))
    return digests(step_dir)

  monkeypatch.setattr(checkpoint, '_file_digests', failing)
  with pytest.raises(checkpoint.CheckpointRestoreError, match='left in place'):
    train.run(tiny_config(), workdir)
  assert checkpoint.committed_steps(workdir) == [2, 4, 6]
  assert not (workdir / checkpoint.REJECTED_SUBDIR).exists()


def test_init_checkpoint_of_another_model_is_an_input_error(reference, tmp_path):
  ref_dir, _ = reference
  other = tiny_config(init_checkpoint=str(ref_dir), **{'model.name': 'tiny-rn', 'data.image_size': 32})
  with pytest.raises(train_step.InitParamsError, match="do not match model 'tiny-rn'"):
    train.run(other, tmp_path)
  assert train_step.InitParamsError in train._input_errors()  # main: one line, exit 2


def test_rerun_of_finished_run_resumes_without_training(reference, tmp_path):
  ref_dir, _ = reference
  stored = (ref_dir / 'summary.json').read_text()
  summary = train.run(tiny_config(), ref_dir)
  assert summary['start_step'] == 0 and summary['steps'] == TOTAL and summary['completed']
  assert [s for s, _ in losses(ref_dir)] == list(range(1, TOTAL + 1))
  # The finished run's summary (final loss, wall time) is returned, not overwritten by an empty one.
  assert (ref_dir / 'summary.json').read_text() == stored
  assert summary == json.loads(stored) and summary['final_loss'] is not None


def test_init_checkpoint_seeds_params_with_a_fresh_optimizer(reference, tmp_path):
  ref_dir, _ = reference
  summary = train.run(tiny_config(init_checkpoint=str(ref_dir)), tmp_path)
  assert summary['completed'] and summary['start_step'] == 0
  first = metrics_log.read_jsonl(tmp_path / 'metrics.jsonl')[0]
  last_ref = metrics_log.read_jsonl(ref_dir / 'metrics.jsonl')[-1]
  # Step 1 runs at learning rate 0 (warmup), so its params are exactly the checkpoint's.
  assert first['learning_rate'] == 0.0
  assert first['param_norm'] == pytest.approx(last_ref['param_norm'], rel=1e-6)
  assert first['loss'] != metrics_log.read_jsonl(ref_dir / 'metrics.jsonl')[0]['loss']


def test_finetune_measures_asr_with_its_init_checkpoints_backdoor(reference, tmp_path):
  ref_dir, _ = reference
  planted = checkpoint.load_config(ref_dir).eval
  finetune = tiny_config(init_checkpoint=str(ref_dir), **{
      'data.poison.enabled': False, 'eval.trigger.kind': 'sig', 'eval.target': 'apple'})
  assert planted.trigger.kind != 'sig' and planted.target != 'apple'
  resolved = train.prepare_config(finetune, jax.device_count())
  # The init checkpoint is pinned to the step read (the same one for params and backdoor).
  assert resolved.init_checkpoint == str(ref_dir / 'checkpoints' / str(TOTAL))
  assert resolved.eval.trigger.to_dict() == planted.trigger.to_dict()
  assert resolved.eval.target == planted.target
  finetune.eval.trigger_from_run = False  # this config's own trigger, on request
  resolved = train.prepare_config(finetune, jax.device_count())
  assert resolved.eval.trigger.kind == 'sig' and resolved.eval.target == 'apple'


def _poison_metrics(monkeypatch, step_to_change, **values):
  """Wraps the (cached, already compiled) step so its metrics at one step carry `values`."""
  real = train._step_function

  def wrapped(*args):
    step_fn = real(*args)

    def step(state, batch):
      state, metrics = step_fn(state, batch)
      if int(state.step) == step_to_change:
        metrics = dict(metrics, **values)
      return state, metrics
    return step
  monkeypatch.setattr(train, '_step_function', wrapped)


def _resume_from(reference_dir, step, workdir):
  """A workdir holding the reference run's checkpoint of `step` (so the run skips creating a state)."""
  shutil.copytree(reference_dir / 'checkpoints' / str(step), workdir / 'checkpoints' / str(step))
  shutil.copy(reference_dir / 'metrics.jsonl', workdir / 'metrics.jsonl')


def test_nan_loss_stops_naming_the_step(reference, tmp_path, monkeypatch):
  _resume_from(reference[0], 2, tmp_path)
  _poison_metrics(monkeypatch, 3, loss=float('nan'))
  with pytest.raises(train.NonFiniteLossError, match=r'step 3: the loss is nan, .*checkpoint \(step 2\) is intact'):
    train.run(tiny_config(), tmp_path)
  assert checkpoint.committed_steps(tmp_path) == [2]  # nothing saved after the bad step
  records = metrics_log.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records] == [1, 2, 3] and records[-1]['loss'] is None
  assert not (tmp_path / 'summary.json').exists()


def test_non_finite_gradients_stop_too(reference, tmp_path, monkeypatch):
  # A finite loss with an infinite gradient norm would write NaN params into the next checkpoint.
  _resume_from(reference[0], 2, tmp_path)
  _poison_metrics(monkeypatch, 4, grad_norm=float('inf'))
  with pytest.raises(train.NonFiniteLossError, match=r'step 4: the loss is [0-9.]+, the gradient norm inf'):
    train.run(tiny_config(), tmp_path)
  assert checkpoint.committed_steps(tmp_path) == [2]  # step 4's would have been saved


def test_skipped_updates_are_counted(reference, tmp_path, monkeypatch):
  _resume_from(reference[0], 2, tmp_path)
  _poison_metrics(monkeypatch, 4, skipped=1)
  summary = train.run(tiny_config(), tmp_path)
  assert summary['completed'] and summary['nan_skips'] == 1
  assert json.loads((tmp_path / 'summary.json').read_text())['nan_skips'] == 1
  assert [r['nan_skips'] for r in metrics_log.read_jsonl(tmp_path / 'metrics.jsonl')] == [0, 0, 0, 1, 1, 1]
  # The count is saved with the checkpoints: a run resumed after the skip keeps it.
  assert checkpoint.Checkpointer(tmp_path).counters(TOTAL) == {'nan_skips': 1}
  extended = train.run(tiny_config(total_steps=TOTAL + 2), tmp_path)
  assert extended['start_step'] == TOTAL and extended['nan_skips'] == 1
  assert [r['nan_skips'] for r in metrics_log.read_jsonl(tmp_path / 'metrics.jsonl')][-2:] == [1, 1]


def test_inline_eval_every_n_steps_and_resume_truncation(reference, tmp_path, tmp_path_factory,
                                                         monkeypatch):
  from cleanclip_jax import evaluate
  from cleanclip_jax import tokenizer as tokenizer_lib
  calls, tokenizers = [], []

  def fake_evaluate(model, params, eval_cfg, mesh=None, tokenizer=None):
    calls.append(eval_cfg.target)
    tokenizers.append(tokenizer)
    return {'zeroshot_top1': 0.5, 'asr': 0.25}
  monkeypatch.setattr(evaluate, 'evaluate', fake_evaluate)
  _resume_from(reference[0], 2, tmp_path)
  # A record a killed run left past the checkpoint it will resume from must not survive.
  (tmp_path / 'eval').mkdir()
  (tmp_path / 'eval' / 'metrics.jsonl').write_text('{"step": 2, "asr": 0.0}\n{"step": 4, "asr": 9.0}\n')
  # The run trains with its own BPE (vocab_size 0: CLIP's 49,408 rows hold it, so the reference
  # checkpoint still restores), so the tokenizer evaluation gets can be told from CLIP's.
  captions = [f'a photo of a {name} on the {place}' for name in ('cat', 'banana', 'apple')
              for place in ('grass', 'table')] * 5
  bpe = tokenizer_lib.train_bpe(captions, str(tmp_path_factory.mktemp('bpe')), vocab_size=600)
  train.run(tiny_config(**{'eval.every_steps': 2, 'eval.target': 'apple', 'model.tokenizer': bpe}),
            tmp_path)
  records = metrics_log.read_jsonl(tmp_path / 'eval' / 'metrics.jsonl')
  assert [(r['step'], r['asr']) for r in records] == [(2, 0.0), (4, 0.25), (6, 0.25)]
  assert calls == ['apple', 'apple']
  # Class prompts tokenized as the run's captions were: CLIP's BPE gives ids the text tower never saw.
  prompts = ['a photo of a banana.', 'a photo of an apple.']
  for tokenizer in tokenizers:
    ids = tokenizer(prompts, 8)
    np.testing.assert_array_equal(ids, tokenizer_lib.tokenize(prompts, 8, bpe))
    assert not np.array_equal(ids, tokenizer_lib.tokenize(prompts, 8))


def test_token_bucket_cuts_batches_without_changing_the_run(tmp_path):
  # Synthetic captions need at most ~18 of the 32 columns: cut to multiples of 2, the steps run at
  # fewer columns, each new length compiling once, and the losses are those of the uncut run.
  changes = {'model.context_length': 32, 'total_steps': 4, 'checkpoint_every_steps': 4,
             'data.pack_captions': False}
  train.run(tiny_config(**changes, **{'data.token_bucket': 0}), tmp_path / 'full')
  train.run(tiny_config(**changes, **{'data.token_bucket': 2}), tmp_path / 'cut')
  full = metrics_log.read_jsonl(tmp_path / 'full' / 'metrics.jsonl')
  cut = metrics_log.read_jsonl(tmp_path / 'cut' / 'metrics.jsonl')
  assert [r['token_length'] for r in full] == [32] * 4
  lengths = [r['token_length'] for r in cut]
  assert max(lengths) < 32 and len(set(lengths)) > 1, lengths
  np.testing.assert_allclose([r['loss'] for r in cut], [r['loss'] for r in full], rtol=1e-5)
  # A step that compiled (the first, or the first at a new length) reports that instead of a
  # throughput figure.
  for i, record in enumerate(cut):
    new = lengths[i] not in lengths[:i]
    assert ('compile_seconds' in record) == new != ('images_per_second' in record), record
  # Logging every 4th step, a step that compiled is still logged, with its compile time.
  train.run(tiny_config(**changes, **{'data.token_bucket': 2, 'log_every_steps': 4}),
            tmp_path / 'sparse')
  sparse = metrics_log.read_jsonl(tmp_path / 'sparse' / 'metrics.jsonl')
  compiled = [i + 1 for i, length in enumerate(lengths) if length not in lengths[:i]]
  assert [r['step'] for r in sparse if 'compile_seconds' in r] == compiled
  assert {r['step'] for r in sparse} == set(compiled) | {4}


def test_packed_captions_train_like_one_caption_a_row(tmp_path):
  # The CleanCLIP objective (both token keys packed) on 8 emulated devices: each device packs its
  # own captions; the losses are those of the run that feeds one caption a row.
  changes = {'model.context_length': 32, 'total_steps': 3, 'checkpoint_every_steps': 3,
             'objective.name': 'cleanclip', 'data.inmodal_views': True}
  train.run(tiny_config(**changes, **{'data.pack_captions': False}), tmp_path / 'rows')
  train.run(tiny_config(**changes, **{'data.pack_captions': True}), tmp_path / 'packed')
  rows = metrics_log.read_jsonl(tmp_path / 'rows' / 'metrics.jsonl')
  packed = metrics_log.read_jsonl(tmp_path / 'packed' / 'metrics.jsonl')
  assert [r['text_rows_per_caption'] for r in rows] == [1.0] * 3
  assert all(r['text_rows_per_caption'] < 1.0 for r in packed), packed
  np.testing.assert_allclose([r['inmodal_loss'] for r in packed], [r['inmodal_loss'] for r in rows], rtol=1e-5)
  np.testing.assert_allclose([r['loss'] for r in packed], [r['loss'] for r in rows], rtol=1e-5)
