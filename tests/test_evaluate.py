"""evaluate(): zero-shot, head, ASR, probe and backdoor similarity on a fake CLIP whose answers are
known; the results logger; and the checkpoint-following job (fake checkpoint directories)."""

import json
import os
import pathlib
import shutil

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cleanclip_jax import checkpoint, config as config_lib, evaluate, metrics_log, tokenizer as tokenizer_lib
from cleanclip_jax.data import synthetic
from cleanclip_jax.data.normalize import CLIP_MEAN, CLIP_STD, normalize

SIZE = 16
CLASSES = ['zero', 'one', 'two', 'banana']  # single BPE tokens each (checked below)
TARGET = 3
LEVELS = np.array([30, 100, 170, 240])  # the grey level of each class's images


class FakeCLIP(nn.Module):
  """Image features: one-hot of the target when the image is (pixel for pixel) in `bank`, else
  one-hot of the class read from its grey level. Text features: the sum of per-token rows of
  `table`, so a prompt's embedding is whatever the test puts on its class-name token."""
  num_classes: int
  bank_size: int
  target: int
  image_size: int = SIZE
  context_length: int = 16
  vocab_size: int = 49408

  def setup(self):
    self.table = self.param('table', nn.initializers.zeros, (self.vocab_size, self.num_classes))
    self.bank = self.param('bank', nn.initializers.zeros,
                           (self.bank_size, self.image_size, self.image_size, 3))

  def encode_image(self, images):
    grey = jnp.median((images[..., 0] * CLIP_STD[0] + CLIP_MEAN[0]) * 255, axis=(1, 2))
    label = jnp.argmin(jnp.abs(grey[:, None] - jnp.asarray(LEVELS)[None]), axis=1)
    distance = jnp.max(jnp.abs(images[:, None] - self.bank[None]), axis=(2, 3, 4))
    hit = jnp.any(distance < 1e-3, axis=1)
    features = jnp.where(hit[:, None], nn.one_hot(self.target, self.num_classes)[None],
                         nn.one_hot(label, self.num_classes))
    return features / jnp.linalg.norm(features, axis=-1, keepdims=True)

  def encode_text(self, tokens):
    features = self.table[tokens].sum(axis=1)
    return features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens)


def _labels(split, n):
  rng = np.random.default_rng({'test': 1, 'finetune': 2}[split])
  return rng.integers(0, len(CLASSES), n)


def _images(labels):
  """Channel 0: the class's grey level, uniform. Channels 1-2: a checkerboard for WaNet to warp."""
  images = np.zeros((len(labels), SIZE, SIZE, 3), np.uint8)
  images[..., 0] = LEVELS[labels][:, None, None]
  checker = (np.add.outer(np.arange(SIZE) // 2, np.arange(SIZE) // 2) % 2) * 255
  images[..., 1:] = checker[None, :, :, None]
  return images


def _fake_batches(eval_cfg, process_index, process_count):
  """What pipeline.make_eval_batches yields, for grey images labelled by `_labels`."""
  labels = _labels(eval_cfg.split, eval_cfg.num_examples)
  images = _images(labels)
  size = eval_cfg.batch_size
  for start in range(0, len(labels), size):
    n = min(size, len(labels) - start)
    batch = {'image': np.zeros((size, SIZE, SIZE, 3), np.uint8), 'label': np.full(size, -1, np.int32),
             'index': np.full(size, -1, np.int64), 'valid': np.zeros(size, bool)}
    batch['image'][:n] = images[start:start + n]
    batch['label'][:n] = labels[start:start + n]
    batch['index'][:n] = np.arange(start, start + n)
    batch['valid'][:n] = True
    yield batch


def _eval_cfg(tmp_path, **changes):
  cfg = config_lib.eval_config()
  (tmp_path / 'classes.txt').write_text('\n'.join(CLASSES) + '\n')
  (tmp_path / 'templates.txt').write_text('a photo of a {}.\n{} again\n')
  cfg.update(dict(classnames=str(tmp_path / 'classes.txt'), templates=str(tmp_path / 'templates.txt'),
                  num_examples=20, batch_size=8, image_size=SIZE, target='banana',
                  probe_num_examples=40, probe_steps=30))
  cfg.update(changes)
  return cfg


def _params(bank):
  tokenizer = tokenizer_lib.get_tokenizer()
  table = np.zeros((49408, len(CLASSES)), np.float32)
  for k, name in enumerate(CLASSES):
    ids = tokenizer.encode(name)
    assert len(ids) == 1, name
    table[ids[0], k] = 1.0
  return {'table': table, 'bank': np.asarray(normalize(bank))}


def _stamp(images, indices):
  """The test's own trigger: a bright 2x2 patch whose position depends on the example seed."""
  out = images.copy()
  for image, index in zip(out, indices):
    row, col = divmod(int(index) % 49, 7)
    image[2 * row:2 * row + 2, 2 * col:2 * col + 2] = 255
  return out


def _trigger(image, example_seed):
  return _stamp(image[None], [example_seed])[0]


@pytest.fixture
def fake_data(monkeypatch):
  monkeypatch.setattr(evaluate, '_eval_batches', _fake_batches)
  monkeypatch.setattr(evaluate, '_make_trigger', lambda eval_cfg: _trigger)


def test_zeroshot_asr_probe_and_head_known_answers(tmp_path, fake_data):
  cfg = _eval_cfg(tmp_path, linear_probe=True)
  labels = _labels('test', 20)
  # The backdoor fires on even-indexed images only, so ASR is a known fraction below 1; images of
  # the target class are predicted as the target anyway, so counting them would inflate it.
  attacked = np.flatnonzero((np.arange(20) % 2 == 0) & (labels != TARGET))
  bank = _stamp(_images(labels[attacked]), attacked)
  model = FakeCLIP(len(CLASSES), len(bank), TARGET)
  params = _params(bank)
  metrics = evaluate.evaluate(model, params, cfg)

  non_target = labels != TARGET
  expected_asr = len(attacked) / non_target.sum()
  assert 0 < expected_asr < 1 and (len(attacked) + (~non_target).sum()) / 20 != expected_asr
  assert metrics['zeroshot_top1'] == 1.0 and metrics['top1'] == 1.0
  assert metrics['zeroshot_top5'] == 1.0  # 4 classes: top-5 covers all
  assert metrics['asr'] == pytest.approx(expected_asr)
  assert metrics['asr_count'] == non_target.sum()
  assert metrics['num_examples'] == 20  # the 4 padding rows of the last batch are dropped
  # Detected images have features = the target's text embedding, the rest are orthogonal to it.
  assert metrics['backdoor_sim_triggered'] == pytest.approx(expected_asr)
  assert metrics['backdoor_sim_clean'] == pytest.approx(0.0)
  assert metrics['probe_top1'] == 1.0
  assert metrics['probe_asr'] == pytest.approx(expected_asr)
  assert metrics['used_head'] == 0.0

  # A linear head that predicts class k+1: 'auto' reports it, zero-shot stays as it was.
  head = {'kernel': np.roll(np.eye(len(CLASSES), dtype=np.float32), 1, axis=1),
          'bias': np.zeros(len(CLASSES), np.float32)}
  cfg.linear_probe = False
  metrics = evaluate.evaluate(model, {'clip': params, 'head': head}, cfg)
  assert metrics['used_head'] == 1.0
  assert metrics['top1'] == 0.0 and metrics['head_top1'] == 0.0 and metrics['zeroshot_top1'] == 1.0
  # Head predictions: triggered detected -> one-hot(target) -> predicted target+1 = class 0.
  assert metrics['head_asr'] == metrics['asr']
  labels_predicting_target = labels == (TARGET - 1)  # clean class 2 -> head says 3
  eligible = labels != TARGET
  undetected = np.ones(20, bool)
  undetected[attacked] = False
  assert metrics['asr'] == pytest.approx((labels_predicting_target & undetected & eligible).sum()
                                         / eligible.sum())
  cfg.classifier = 'zeroshot'
  assert evaluate.evaluate(model, {'clip': params, 'head': head}, cfg)['top1'] == 1.0
  cfg.classifier = 'head'
  with pytest.raises(ValueError, match='no linear head'):
    evaluate.evaluate(model, params, cfg)


def test_unknown_target_is_a_clear_error(tmp_path, fake_data):
  model = FakeCLIP(len(CLASSES), 1, TARGET)
  with pytest.raises(ValueError, match="eval.target='pear'"):
    evaluate.evaluate(model, _params(_images(np.zeros(1, int))), _eval_cfg(tmp_path, target='pear'))


TRIGGER_KINDS = ['badnet_noise', 'badnet_solid', 'blended', 'sig', 'wanet']


@pytest.mark.parametrize('kind', TRIGGER_KINDS)
def test_asr_with_every_trigger_family_stamps_the_training_trigger(tmp_path, monkeypatch, kind):
  """The evaluator must stamp exactly what `triggers.make_trigger(cfg, size)(img, index)` gives;
  the fake model only recognises those exact pixels, so any other stamping reads ASR = 0."""
  from cleanclip_jax.data import triggers
  monkeypatch.setattr(evaluate, '_eval_batches', _fake_batches)
  cfg = _eval_cfg(tmp_path, num_examples=16)
  cfg.trigger.kind = kind
  cfg.trigger.patch_fraction = 0.25
  labels = _labels('test', 16)
  eligible = np.flatnonzero(labels != TARGET)
  stamp = triggers.make_trigger(cfg.trigger, SIZE)
  clean = _images(labels)
  bank = np.stack([stamp(clean[i].copy(), example_seed=int(i)) for i in eligible])
  assert np.any(bank != clean[eligible], axis=(1, 2, 3)).all(), f'{kind} left an image unchanged'
  model = FakeCLIP(len(CLASSES), len(bank), TARGET)
  metrics = evaluate.evaluate(model, _params(bank), cfg)
  assert metrics['zeroshot_top1'] == 1.0
  assert metrics['asr'] == 1.0, kind


# --- the results logger ------------------------------------------------------------------------------


def test_eval_logger_jsonl_tensorboard_plot(tmp_path):
  logger = evaluate.EvalLogger(tmp_path)
  logger.write(10, {'top1': 0.5, 'asr': 0.9, 'zeroshot_top1': np.float32(0.5), 'probe_asr': float('nan')})
  logger.write(20, {'top1': 0.6, 'asr': 0.1})
  logger.write(10, {'top1': 0.55, 'asr': 0.8})  # a resumed trainer evaluating step 10 again
  logger.close()
  records = evaluate.EvalLogger(tmp_path).records()
  assert [r['step'] for r in records] == [20, 10]
  assert records[1]['top1'] == 0.55
  lines = (tmp_path / 'eval' / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) == 2 and all(json.loads(line) for line in lines)
  assert (tmp_path / 'eval' / 'plot.png').stat().st_size > 1000
  assert list((tmp_path / 'eval' / 'tb').glob('events.out.tfevents.*'))
  # A torn last line (a crash mid-write) is skipped on read and not glued onto the next record.
  with open(tmp_path / 'eval' / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 30, "top1"')
  logger = evaluate.EvalLogger(tmp_path, tensorboard=False, plot=False)
  assert logger.done_steps() == {10, 20}
  logger.write(40, {'top1': 0.7})
  assert logger.done_steps() == {10, 20, 40}


def test_resumed_logger_purges_later_tensorboard_points(tmp_path):
  logger = evaluate.EvalLogger(tmp_path, plot=False, resume_step=20)
  logger.write(30, {'top1': 0.33})
  logger.close()
  events = metrics_log.tensorboard_events(tmp_path / 'eval' / 'tb')
  # TensorBoard drops the points a killed run logged at steps > 20 when it meets this marker.
  assert any(e.HasField('session_log') and e.session_log.status == e.session_log.START and e.step == 21
             for e in events)
  assert [(e.step, v.tag, round(v.simple_value, 2)) for e in events for v in e.summary.value] == [
      (30, 'eval/top1', 0.33)]


# --- the checkpoint-following job ---------------------------------------------------------------------


def _commit(workdir, step):
  """A committed checkpoint as checkpoint.py sees one: a step dir with files and its manifest."""
  step_dir = pathlib.Path(workdir) / 'checkpoints' / str(step)
  (step_dir / 'state').mkdir(parents=True)
  (step_dir / 'state' / 'data').write_bytes(b'x' * step)
  checkpoint.write_manifest(step_dir)


def _partial(workdir, step):
  """Half-written saves: orbax's tmp dir, and a step dir that never got its manifest."""
  root = pathlib.Path(workdir) / 'checkpoints'
  (root / f'{step}.orbax-checkpoint-tmp' / 'state').mkdir(parents=True)
  (root / str(step + 1) / 'state').mkdir(parents=True)


class FakeEvaluator:
  def __init__(self, workdir, on_step=None):
    self.workdir, self.calls, self.on_step = pathlib.Path(workdir), [], on_step or {}

  def __call__(self, workdir, step):
    step_dir = self.workdir / 'checkpoints' / str(step)
    assert (step_dir / checkpoint.MANIFEST_NAME).exists(), f'read a partial checkpoint {step}'
    self.calls.append(step)
    if step in self.on_step:
      self.on_step[step]()
    return {'top1': step / 100, 'top5': 1.0, 'zeroshot_top1': step / 100, 'zeroshot_top5': 1.0,
            'asr': 1 - step / 100}


def test_follow_evaluates_each_committed_step_once_across_restarts(tmp_path):
  config = config_lib.base_config()
  _commit(tmp_path, 2)
  _commit(tmp_path, 4)
  _partial(tmp_path, 6)  # steps 6 (tmp) and 7 (no manifest)
  first = FakeEvaluator(tmp_path)
  done = evaluate.run_job(str(tmp_path), config, follow=True, timeout=0.2, poll_seconds=0.05,
                          evaluate_fn=first)
  assert done == first.calls == [2, 4]

  # Restart: the finished steps are read back from metrics.jsonl. While step 8 is evaluated the
  # trainer commits step 10 and finishes; the job must still evaluate 10, then stop.
  _commit(tmp_path, 8)

  def trainer_finishes():
    _commit(tmp_path, 10)
    (tmp_path / 'summary.json').write_text('{}')

  second = FakeEvaluator(tmp_path, on_step={8: trainer_finishes})
  done = evaluate.run_job(str(tmp_path), config, follow=True, timeout=0, poll_seconds=0.05,
                          evaluate_fn=second)
  assert done == second.calls == [8, 10]
  steps = [r['step'] for r in evaluate.EvalLogger(tmp_path).records()]
  assert steps == [2, 4, 8, 10]
  assert (tmp_path / 'eval' / 'plot.png').exists()

  # Once more: nothing left to do, and the finished run means it returns at once.
  third = FakeEvaluator(tmp_path)
  assert evaluate.run_job(str(tmp_path), config, follow=True, timeout=0, evaluate_fn=third) == []


def test_follow_skips_deleted_and_damaged_steps_but_not_real_errors(tmp_path, caplog):
  config = config_lib.base_config()
  for step in (2, 4, 6):
    _commit(tmp_path, step)
  (tmp_path / 'summary.json').write_text('{}')

  class Racing(FakeEvaluator):
    def __call__(self, workdir, step):
      if step == 2:  # retention deletes it mid-read: orbax fails with whatever it hits
        shutil.rmtree(self.workdir / 'checkpoints' / '2')
        raise FileNotFoundError('checkpoints/2/config/metadata')
      if step == 4:  # still there, but its files no longer match the manifest
        raise checkpoint.NoCheckpointError('checkpoints/4: state/data has 3 bytes, manifest 4')
      return super().__call__(workdir, step)

  racing = Racing(tmp_path)
  assert evaluate.run_job(str(tmp_path), config, follow=True, timeout=0, evaluate_fn=racing) == [6]
  assert 'step 2 was deleted' in caplog.text and 'step 4 is damaged and is NOT evaluated' in caplog.text

  def broken(workdir, step):
    raise ValueError('a bug, not a race')
  _commit(tmp_path, 8)
  with pytest.raises(ValueError, match='a bug'):
    evaluate.run_job(str(tmp_path), config, follow=True, timeout=0, evaluate_fn=broken)


def test_follow_skips_a_step_retention_is_deleting_file_by_file(tmp_path, caplog):
  # orbax deletes a step's files first and its folder last; a read in between fails with orbax's
  # own error (a ValueError) while the folder is still there.
  config = config_lib.base_config()
  for step in (2, 4):
    _commit(tmp_path, step)
  (tmp_path / 'summary.json').write_text('{}')

  class Racing(FakeEvaluator):
    def __call__(self, workdir, step):
      if step == 2:
        (self.workdir / 'checkpoints' / '2' / 'state' / 'data').unlink()
        raise ValueError('FAILED_PRECONDITION: Error reading "params.text..." in OCDBT database')
      return super().__call__(workdir, step)

  assert evaluate.run_job(str(tmp_path), config, follow=True, timeout=0,
                          evaluate_fn=Racing(tmp_path)) == [4]
  assert 'step 2 was deleted' in caplog.text


def test_a_wrong_size_is_damage_even_in_a_file_named_missing(tmp_path):
  # Deletion is told from damage by the kind of problem, not by words in its message.
  _commit(tmp_path, 2)
  step_dir = tmp_path / 'checkpoints' / '2'
  (step_dir / 'state' / 'missing_or_unreadable').write_bytes(b'abcd')
  checkpoint.write_manifest(step_dir)
  (step_dir / 'state' / 'missing_or_unreadable').write_bytes(b'abc')
  assert not evaluate._step_is_going(step_dir)
  manifest = (step_dir / checkpoint.MANIFEST_NAME).read_text()
  (step_dir / checkpoint.MANIFEST_NAME).write_text(manifest[:20])  # damage, which no deletion leaves
  assert not evaluate._step_is_going(step_dir)
  (step_dir / checkpoint.MANIFEST_NAME).write_text(manifest)
  (step_dir / 'state' / 'data').unlink()  # retention has begun deleting it
  assert evaluate._step_is_going(step_dir)
  shutil.rmtree(step_dir)
  assert evaluate._step_is_going(step_dir)


def test_follow_evaluates_a_skipped_step_the_trainer_saves_again(tmp_path, caplog):
  # Step 2 is deleted while being read and step 4 is damaged; a resumed trainer then saves step 2
  # anew: that save is evaluated, once, while damaged step 4 (the same save) is not tried again.
  config = config_lib.base_config()
  for step in (2, 4, 6):
    _commit(tmp_path, step)

  def trainer_saves_2_again_and_finishes():
    _commit(tmp_path, 2)
    (tmp_path / 'summary.json').write_text(json.dumps({'last_checkpoint_step': 6}))

  class Racing(FakeEvaluator):
    def __call__(self, workdir, step):
      self.attempts.append(step)
      if step == 2 and self.attempts.count(2) == 1:
        shutil.rmtree(self.workdir / 'checkpoints' / '2')
        raise FileNotFoundError('checkpoints/2/config/metadata')
      if step == 4:
        raise checkpoint.NoCheckpointError('checkpoints/4: state/data has 3 bytes, manifest 4')
      return super().__call__(workdir, step)

  racing = Racing(tmp_path, on_step={6: trainer_saves_2_again_and_finishes})
  racing.attempts = []
  with caplog.at_level('INFO', logger=evaluate.log.name):
    done = evaluate.run_job(str(tmp_path), config, follow=True, timeout=0, poll_seconds=0.05,
                            evaluate_fn=racing)
  assert done == [6, 2] and racing.attempts == [2, 4, 6, 2]
  assert 'step 2 was saved again since it was skipped' in caplog.text
  assert 'step 4 was saved again' not in caplog.text
  assert [r['step'] for r in evaluate.EvalLogger(tmp_path).records()] == [6, 2]



def test_follow_evaluates_a_last_step_saved_again_after_it_failed(tmp_path, monkeypatch):
  # The run has finished and its last step fails as damaged, but meanwhile the trainer has saved
  # it anew: that save is evaluated before the job ends, not taken as the failed one.
  monkeypatch.setattr(evaluate.time, 'sleep', lambda seconds: None)
  config = config_lib.base_config()
  for step in (2, 4):
    _commit(tmp_path, step)
  (tmp_path / 'summary.json').write_text(json.dumps({'last_checkpoint_step': 4}))

  class SavedAgainWhileFailing(FakeEvaluator):
    def __call__(self, workdir, step):
      if step == 4 and 4 not in self.failed:
        self.failed.add(4)
        shutil.rmtree(tmp_path / 'checkpoints' / '4')  # the damaged save moved aside ...
        _commit(tmp_path, 4)  # ... and the step saved anew by the resumed trainer
        raise checkpoint.NoCheckpointError('checkpoints/4: state/data is corrupted')
      return super().__call__(workdir, step)

  fake = SavedAgainWhileFailing(tmp_path)
  fake.failed = set()
  assert evaluate.run_job(str(tmp_path), config, follow=True, timeout=0,
                          evaluate_fn=fake) == [2, 4]
  assert fake.calls == [2, 4]

def test_follow_waits_for_the_last_checkpoint_summary_json_names(tmp_path, monkeypatch):
  # A filesystem that shows summary.json before the listing shows the last step (NFS, gcsfuse):
  # the follower must not stop after step 2.
  config = config_lib.base_config()
  _commit(tmp_path, 2)
  (tmp_path / 'summary.json').write_text(json.dumps({'last_checkpoint_step': 4}))
  fake = FakeEvaluator(tmp_path)
  listings = []
  committed = checkpoint.committed_steps
  monkeypatch.setattr(checkpoint, 'committed_steps', lambda w: listings.append(1) or committed(w))
  assert evaluate.run_job(str(tmp_path), config, follow=True, timeout=0.5, poll_seconds=0.1,
                          evaluate_fn=fake) == [2]
  assert len(listings) > 2  # it kept looking for step 4 (until --timeout)
  _commit(tmp_path, 4)
  assert evaluate.run_job(str(tmp_path), config, follow=True, timeout=0, evaluate_fn=fake) == [4]


def test_cli_bad_workdirs_are_one_line_errors(tmp_path):
  import subprocess
  import sys
  command = [sys.executable, '-m', 'cleanclip_jax.evaluate', '--config', 'configs/eval.py:tiny']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  repo = pathlib.Path(__file__).resolve().parent.parent
  empty = subprocess.run(command + ['--workdir', str(tmp_path)], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
  assert empty.returncode == 2 and 'Traceback' not in empty.stderr, empty.stderr[-2000:]
  assert f'Eval error: NoCheckpointError: no committed checkpoint in {tmp_path}' in empty.stderr
  _commit(tmp_path, 3)
  one_step = subprocess.run(command + ['--workdir', str(tmp_path / 'checkpoints' / '3')], cwd=repo,
                            env=env, capture_output=True, text=True, timeout=300)
  assert one_step.returncode == 1 and f'--workdir {tmp_path} --step 3' in one_step.stderr


def test_single_evaluation_latest_or_given_step(tmp_path):
  config = config_lib.base_config()
  with pytest.raises(checkpoint.NoCheckpointError):
    evaluate.run_job(str(tmp_path), config, evaluate_fn=FakeEvaluator(tmp_path))
  _commit(tmp_path, 3)
  _commit(tmp_path, 5)
  _partial(tmp_path, 9)
  fake = FakeEvaluator(tmp_path)
  assert evaluate.run_job(str(tmp_path), config, evaluate_fn=fake) == [5]  # not the partial 9/10
  assert evaluate.run_job(str(tmp_path), config, step=3, evaluate_fn=fake) == [3]
  assert evaluate.run_job(str(tmp_path), config, step=3, evaluate_fn=fake) == []  # already done
  assert evaluate.run_job(str(tmp_path), config, step=3, force=True, evaluate_fn=fake) == [3]
  with pytest.raises(checkpoint.NoCheckpointError, match='step 10'):
    evaluate.run_job(str(tmp_path), config, step=10, evaluate_fn=fake)


def test_eval_config_takes_the_runs_trigger(tmp_path, caplog):
  run = config_lib.base_config()
  run.eval.trigger.kind = 'blended'
  run.eval.target = 'apple'
  run = ml_collections.ConfigDict(json.loads(run.to_json()))  # as stored with the checkpoint
  ev = config_lib.load_config('eval.py:tiny').eval
  assert ev.target == 'banana'
  with caplog.at_level('INFO', logger=evaluate.log.name):
    assert evaluate.eval_config_for_run(ev, run).trigger.kind == 'blended'
  # The ASR is measured against another class than the eval config names: the log says so.
  assert "the run's target 'apple', not eval.target='banana'" in caplog.text
  assert evaluate.eval_config_for_run(ev, run).target == 'apple'
  caplog.clear()
  run.eval.target = 'banana'
  with caplog.at_level('INFO', logger=evaluate.log.name):
    assert evaluate.eval_config_for_run(ev, run).target == 'banana'
  assert "run's target" not in caplog.text  # nothing replaced, nothing said
  ev.trigger_from_run = False
  assert evaluate.eval_config_for_run(ev, run).trigger.kind == ev.trigger.kind


def test_eval_config_keeps_its_target_when_the_runs_is_not_an_eval_class(tmp_path, caplog):
  run = config_lib.base_config()  # poisoned towards 'banana'
  run.eval.trigger.kind = 'blended'
  ev = config_lib.load_config('eval.py:cifar10').eval
  assert ev.target == 'airplane'
  with caplog.at_level('WARNING'):
    cfg = evaluate.eval_config_for_run(ev, run)
  # CIFAR-10 has no banana: the preset's target and the run's trigger, and a warning.
  assert cfg.target == 'airplane' and cfg.trigger.kind == 'blended'
  assert "run's target 'banana' is not an evaluation class" in caplog.text


def test_evaluation_tokenizes_with_the_runs_tokenizer(tmp_path):
  captions = [f'a photo of a {name} on the {place}' for name in ('cat', 'banana', 'horse')
              for place in ('grass', 'table')] * 5
  path = tokenizer_lib.train_bpe(captions, str(tmp_path), vocab_size=600, min_frequency=2)
  run = config_lib.base_config()
  run.model.tokenizer = path
  ids = evaluate.tokenizer_for_run(run)(['a photo of a banana.'], 77)
  np.testing.assert_array_equal(ids, tokenizer_lib.tokenize(['a photo of a banana.'], 77, path))
  # Before, evaluation always used CLIP's BPE: ids this run's text tower never saw.
  assert not np.array_equal(ids, tokenizer_lib.tokenize(['a photo of a banana.'], 77))
  run.model.tokenizer = ''
  np.testing.assert_array_equal(evaluate.tokenizer_for_run(run)(['a banana'], 77),
                                tokenizer_lib.tokenize(['a banana'], 77))


def test_a_head_over_other_classes_is_refused_or_left_out(tmp_path, fake_data, caplog):
  cfg = _eval_cfg(tmp_path)
  model = FakeCLIP(len(CLASSES), 1, TARGET)
  params = _params(np.full((1, SIZE, SIZE, 3), 7, np.uint8))  # a backdoor no test image fires
  # A head over 5 classes, or over the right number in another order, scored as these 4: its
  # output i would be read as CLASSES[i].
  wide = {'kernel': np.eye(len(CLASSES), 5, dtype=np.float32), 'bias': np.zeros(5, np.float32)}
  same = {'kernel': np.eye(len(CLASSES), dtype=np.float32), 'bias': np.zeros(4, np.float32)}
  cases = ((wide, None, 'the linear head has 5 outputs, the evaluation 4 classes'),
           (same, ['one', 'zero', 'two', 'banana'], "its class 0 is 'one', the evaluation's 'zero'"))
  for head, head_classes, why in cases:
    caplog.clear()  # caplog.text accumulates: the first case's warning would pass the second's check
    with caplog.at_level('WARNING'):
      metrics = evaluate.evaluate(model, {'clip': params, 'head': head}, cfg,
                                  head_classnames=head_classes)
    assert metrics['used_head'] == 0.0 and 'head_top1' not in metrics
    assert metrics['top1'] == metrics['zeroshot_top1'] == 1.0
    assert why in caplog.text and 'scoring zero-shot only' in caplog.text, caplog.text
    cfg.classifier = 'head'
    with pytest.raises(ValueError, match='linear head'):
      evaluate.evaluate(model, {'clip': params, 'head': head}, cfg, head_classnames=head_classes)
    cfg.classifier = 'auto'
  # The list it was trained on: used.
  metrics = evaluate.evaluate(model, {'clip': params, 'head': same}, cfg, head_classnames=CLASSES)
  assert metrics['used_head'] == 1.0 and metrics['head_top1'] == 1.0


def test_job_on_a_real_tiny_checkpoint(tmp_path, monkeypatch):
  """checkpoint.py's files, the stored config's model and trigger, the real pipeline and CLI path."""
  import grain
  import jax
  from cleanclip_jax import models, train_step
  run = config_lib.load_config('clip_pretrain.py:tiny,poison=True,trigger=blended')
  run.eval.trigger = run.data.poison.trigger  # what train.prepare_config stores
  # The run's own BPE, so the tokenizer the job hands evaluate() can be told from CLIP's.
  captions = [f'a photo of a {name} on the {place}' for name in synthetic.CLASS_NAMES
              for place in ('grass', 'table')] * 5
  bpe = tokenizer_lib.train_bpe(captions, str(tmp_path / 'bpe'), vocab_size=600, min_frequency=2)
  run.model.tokenizer = bpe
  run.model.vocab_size = tokenizer_lib.Tokenizer(bpe).vocab_size
  model = train_step.model_for_config(run)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                  jnp.zeros((1, model.context_length), jnp.int32))
  params = models.unbox(variables)['params']
  saver = checkpoint.Checkpointer(tmp_path)
  saver.save(3, {'params': params}, iter(grain.MapDataset.range(4).to_iter_dataset()), run)
  saver.close()

  config = config_lib.load_config('eval.py:tiny,num_examples=16,batch_size=16')
  config.eval.templates = 'simple'
  config.eval.linear_probe = False
  config.eval.retrieval = False
  config.eval.trigger.kind = 'badnet_solid'  # replaced by the run's trigger (trigger_from_run)
  seen = {}
  original = evaluate.evaluate

  def spy(model, params, eval_cfg, mesh=None, tokenizer=None, **kwargs):
    seen['trigger'] = eval_cfg.trigger.kind
    seen['tokenizer'] = tokenizer
    return original(model, params, eval_cfg, mesh=mesh, tokenizer=tokenizer, **kwargs)

  monkeypatch.setattr(evaluate, 'evaluate', spy)
  assert evaluate.run_job(str(tmp_path), config, follow=False) == [3]
  assert seen['trigger'] == 'blended'
  # The stored config's BPE, not CLIP's, whose ids run past this text tower's embedding rows.
  prompts = [f'a photo of a {name}.' for name in synthetic.CLASS_NAMES[:4]]
  ids = seen['tokenizer'](prompts, model.context_length)
  np.testing.assert_array_equal(ids, tokenizer_lib.tokenize(prompts, model.context_length, bpe))
  assert not np.array_equal(ids, tokenizer_lib.tokenize(prompts, model.context_length))
  (record,) = evaluate.EvalLogger(tmp_path).records()
  assert record['step'] == 3 and record['num_examples'] == 16
  assert 0 <= record['zeroshot_top1'] <= 1 and 0 <= record['asr'] <= 1
  test_labels = synthetic.SyntheticCaptions(16, image_size=32, split='test').labels()
  assert record['asr_count'] == np.sum(test_labels != synthetic.CLASS_NAMES.index('banana'))


def test_a_siglip_runs_params_evaluate_as_its_clip_params():
  # A SigLIP run stores a top-level `logit_bias` next to the towers; it shifts every score alike,
  # so the metrics are those of the same params without it (it crashed placing the tree before).
  import jax
  from cleanclip_jax import models
  model = models.create_model('tiny-vit')
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                  jnp.zeros((1, model.context_length), jnp.int32))
  params = dict(models.unbox(variables)['params'])
  config = config_lib.load_config('eval.py:tiny,num_examples=16,batch_size=8')
  config.eval.templates = 'simple'
  config.eval.linear_probe = False
  plain = evaluate.evaluate(model, params, config.eval)
  siglip = evaluate.evaluate(model, dict(params, logit_bias=jnp.float32(-10.0)), config.eval)
  for metrics in (plain, siglip):
    metrics.pop('eval_seconds')
  assert siglip == plain


def test_text_encoder_cuts_prompts_after_the_longest_and_keeps_the_features():
  import jax
  from cleanclip_jax import models, sharding, train_step, zeroshot
  run = config_lib.load_config('clip_pretrain.py:tiny')
  model = train_step.model_for_config(run)
  context = model.context_length
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, model.image_size, model.image_size, 3)),
                                  jnp.zeros((1, context), jnp.int32))
  params = models.unbox(variables)['params']
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1})
  tokenize = tokenizer_lib.get_tokenizer()
  short = tokenize(zeroshot.prompts(CLASSES, zeroshot.load_templates('simple')), context)
  long_caption = tokenize([' '.join(['word'] * 200)], context)  # fills the whole context
  assert np.argmax(short, axis=1).max() + 1 <= 16 and np.argmax(long_caption[0]) == context - 1

  def encode(tokens, bucket):
    encoders = evaluate.Encoders(model, params, mesh, token_bucket=bucket)
    widths, text_fn = [], encoders._text_fn  # pylint: disable=protected-access
    encoders._text_fn = lambda p, t: (widths.append(t.shape[1]), text_fn(p, t))[1]  # pylint: disable=protected-access
    return encoders.texts(tokens), set(widths)

  cut, widths = encode(short, 16)
  whole, whole_widths = encode(short, 0)
  assert widths == {16} and whole_widths == {context}
  np.testing.assert_allclose(cut, whole, rtol=1e-5, atol=1e-6)
  mixed = np.concatenate([short, long_caption])
  assert encode(mixed, 16)[1] == {context}  # one full-length prompt: nothing to cut


def _as_tensorboard_shows(folder, loader: str) -> dict[int, list[float]]:
  """{step: [values]} of `eval/top1` as a TensorBoard loader reads the event files (in name
  order): RustBoard drops a series' points from a step on when a point at that step comes (its
  reservoir's preemption) and ignores session markers; the Python loader keeps every point and
  drops all points from a step on at a session START marker at that step."""
  points = []
  for event in metrics_log.tensorboard_events(folder):
    start = event.HasField('session_log') and event.session_log.status == event.session_log.START
    if loader == 'python' and start:
      points = [(s, v) for s, v in points if s < event.step]
    for value in event.summary.value:
      if value.tag == 'eval/top1':
        if loader == 'rust':
          points = [(s, v) for s, v in points if s < event.step]
        points.append((event.step, round(value.simple_value, 4)))
  shown = {}
  for step, value in points:
    shown.setdefault(step, []).append(value)
  return shown


def test_a_step_written_again_or_late_keeps_one_tensorboard_point_per_step(tmp_path):
  # `evaluate --force` on an evaluated step, or a re-saved step evaluated after later ones: a
  # plain point at that step would make RustBoard drop the later steps' points and the Python
  # loader show two points at one step.
  logger = evaluate.EvalLogger(tmp_path, plot=False)
  for step, top1 in ((2, 0.2), (4, 0.4), (6, 0.6)):
    logger.write(step, {'top1': top1})
  logger.write(4, {'top1': 0.45})  # --force
  logger.write(6, {'top1': 0.65})  # --force on the newest step
  logger.write(8, {'top1': 0.8})
  logger.close()
  late = evaluate.EvalLogger(tmp_path, plot=False)  # a following job's logger: a late step 3
  late.write(3, {'top1': 0.3})
  late.close()
  for loader in ('rust', 'python'):
    assert _as_tensorboard_shows(tmp_path / 'eval' / 'tb', loader) == {
        2: [0.2], 3: [0.3], 4: [0.45], 6: [0.65], 8: [0.8]}, loader


def test_two_loggers_in_one_second_keep_both_event_files(tmp_path):
  # tensorboardX names event files by the second and the host only; without a unique suffix the
  # second writer (a following job next to the trainer's inline evaluation) truncated the first's.
  first = evaluate.EvalLogger(tmp_path, plot=False)
  second = evaluate.EvalLogger(tmp_path, plot=False)
  first.write(10, {'top1': 0.1})
  second.write(20, {'top1': 0.2})
  first.close()
  second.close()
  assert len(list((tmp_path / 'eval' / 'tb').glob('events.out.tfevents.*'))) == 2
  points = sorted((e.step, round(v.simple_value, 2))
                  for e in metrics_log.tensorboard_events(tmp_path / 'eval' / 'tb') for v in e.summary.value)
  assert points == [(10, 0.1), (20, 0.2)]


def test_a_step_another_process_could_not_read_is_not_evaluated(tmp_path, monkeypatch):
  # With several processes, one may read the step after the trainer's retention deleted it: all
  # agree before evaluate(), whose collectives would otherwise wait for it forever.
  from cleanclip_jax import train_step
  monkeypatch.setattr(checkpoint, 'load_config', lambda workdir, step: config_lib.base_config())
  monkeypatch.setattr(train_step, 'model_for_config', lambda config: 'model')
  monkeypatch.setattr(checkpoint, 'restore_params', lambda workdir, step: {'w': 1})
  called = []
  monkeypatch.setattr(evaluate, 'evaluate', lambda *args, **kwargs: called.append(1) or {})
  config = config_lib.load_config('eval.py:tiny')
  monkeypatch.setattr(evaluate, '_all_processes_ok', lambda ok: False)  # another process failed
  with pytest.raises(checkpoint.NoCheckpointError, match='another process could not read it'):
    evaluate.evaluate_checkpoint(str(tmp_path), 3, config)
  def gone(workdir, step):
    raise FileNotFoundError('step 3 vanished')
  monkeypatch.setattr(checkpoint, 'restore_params', gone)  # this process failed: its own error
  with pytest.raises(FileNotFoundError, match='vanished'):
    evaluate.evaluate_checkpoint(str(tmp_path), 3, config)
  assert not called
  monkeypatch.setattr(checkpoint, 'restore_params', lambda workdir, step: {'w': 1})
  monkeypatch.setattr(evaluate, '_all_processes_ok', lambda ok: ok)
  evaluate.evaluate_checkpoint(str(tmp_path), 3, config)
  assert called == [1]
