"""The poison-then-defend study end to end (`--fast`: a few steps per stage), and its resume."""

import importlib
import json
import pathlib

import pytest

from cleanclip_jax import config as config_lib
from cleanclip_jax import checkpoint, demo, metrics_log

STAGES = ['pretrain', 'pretrain_clean', 'finetune_mmcl', 'finetune_cleanclip', 'finetune_supervised']
# The end-to-end test skips the clean baseline (one stage less to compile); its config is checked below.
RUN_STAGES = [stage for stage in STAGES if stage != 'pretrain_clean']


def _checkpoint_steps(stage_dir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (stage_dir / 'checkpoints').iterdir())


@pytest.mark.timeout(600)
def test_fast_study_reports_every_stage_and_resumes(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / 'study'
  report = demo.run(str(workdir), attack='badnet', target='apple', seed=3, fast=True)
  on_disk = json.loads((workdir / 'report.json').read_text())
  assert on_disk['attack'] == 'badnet' and on_disk['target'] == 'apple' and on_disk['seed'] == 3
  assert on_disk['class_names'][1] == 'apple' and len(on_disk['class_names']) == 12
  assert [row['stage'] for row in on_disk['rows']] == RUN_STAGES
  for row in on_disk['rows']:
    assert set(row) >= {'stage', 'clean_top1', 'asr', 'zeroshot_asr'}
    assert 0.0 <= row['clean_top1'] <= 1.0 and 0.0 <= row['asr'] <= 1.0, row
    assert 0.0 <= row['zeroshot_asr'] <= 1.0, row
    for key in ('target_similarity_triggered', 'target_similarity_clean'):
      assert -1.0 <= row[key] <= 1.0, (key, row)
    assert (workdir / row['stage'] / 'summary.json').exists()
    assert list((workdir / row['stage'] / 'tensorboard').iterdir()), row['stage']
  by_stage = {row['stage']: row for row in on_disk['rows']}
  assert by_stage['finetune_supervised']['classifier'] == 'head'
  assert by_stage['finetune_cleanclip']['classifier'] == 'zero-shot'
  # Zero-shot rows classify with the text tower: their ASR is the tower's zero-shot ASR.
  assert by_stage['finetune_cleanclip']['zeroshot_asr'] == by_stage['finetune_cleanclip']['asr']
  # Every finetune starts from the poisoned pretraining, and is measured with its trigger.
  planted = checkpoint.load_config(workdir / 'pretrain')
  pretrained = workdir / 'pretrain' / 'checkpoints' / str(checkpoint.committed_steps(workdir / 'pretrain')[-1])
  for stage in RUN_STAGES[1:]:
    stored = checkpoint.load_config(workdir / stage)
    assert stored.init_checkpoint == str(pretrained), stage  # the trainer pins the step it read
    assert stored.eval.trigger.to_dict() == planted.data.poison.trigger.to_dict(), stage
  assert (workdir / 'report.png').stat().st_size > 1000
  # The trainer feeds captions to the objectives that read them: packed for the CLIP objectives,
  # dropped for the supervised one.
  for stage, packed in (('finetune_cleanclip', True), ('finetune_supervised', False)):
    logged = metrics_log.read_jsonl(workdir / stage / 'metrics.jsonl')
    assert all((0 < r['text_rows_per_caption'] < 1) == packed for r in logged), (stage, logged)
  markdown = (workdir / 'report.md').read_text()
  for row in on_disk['rows']:
    assert row['label'] in markdown
  assert 'badnet' in markdown
  printed = capsys.readouterr().out
  assert '[demo 4/4]' in printed

  # A rerun resumes: nothing is trained again, the checkpoints are untouched, same numbers.
  before = {stage: _checkpoint_steps(workdir / stage) for stage in RUN_STAGES}
  mtimes = {stage: (workdir / stage / 'summary.json').stat().st_mtime_ns for stage in RUN_STAGES}
  again = demo.run(str(workdir), attack='badnet', target='apple', seed=3, fast=True)
  assert not any(row['trained_now'] for row in again['rows'])
  assert {stage: _checkpoint_steps(workdir / stage) for stage in RUN_STAGES} == before
  assert {stage: (workdir / stage / 'summary.json').stat().st_mtime_ns for stage in RUN_STAGES} == mtimes
  assert [(r['clean_top1'], r['asr']) for r in again['rows']] == \
      [(r['clean_top1'], r['asr']) for r in report['rows']]
  # Those come from the cache; evaluating a stage again from its checkpoint gives them too, as it
  # does for a cache torn by a kill.
  (workdir / 'finetune_cleanclip' / 'demo_eval.json').write_text('{"clean_top1": 0.')
  fresh = demo.run(str(workdir), attack='badnet', target='apple', seed=3, fast=True)
  assert fresh['rows'][2]['stage'] == 'finetune_cleanclip'
  assert fresh['rows'][2]['metrics'] == report['rows'][2]['metrics'] | {
      'eval_seconds': fresh['rows'][2]['metrics']['eval_seconds']}

  # Other settings in the same workdir are refused rather than mixed in, a changed stage config too.
  with pytest.raises(SystemExit, match='other settings'):
    demo.run(str(workdir), attack='sig', target='apple', seed=3, fast=True)
  real = demo.stage_configs

  def edited(*args):
    stages = real(*args)
    stages[2][2].learning_rate *= 2  # as if configs/demo.py had changed since
    return stages
  monkeypatch.setattr(demo, 'stage_configs', edited)
  with pytest.raises(SystemExit, match=r"other settings \({'stage finetune_cleanclip'"):
    demo.run(str(workdir), attack='badnet', target='apple', seed=3, fast=True)


def test_workdir_check_names_a_changed_stage_and_welcomes_an_added_one(tmp_path):
  base = {'attack': 'blended', 'target': 'banana', 'seed': 0, 'fast': False}
  demo._check_workdir(tmp_path, dict(base, stages={'pretrain': 'a', 'finetune_cleanclip': 'b'}))
  # --with-clean-baseline later: the new stage is added, nothing else changes.
  demo._check_workdir(tmp_path, dict(base, stages={'pretrain': 'a', 'pretrain_clean': 'c',
                                                   'finetune_cleanclip': 'b'}))
  recorded = json.loads((tmp_path / 'demo_settings.json').read_text())
  assert recorded['stages'] == {'pretrain': 'a', 'pretrain_clean': 'c', 'finetune_cleanclip': 'b'}
  demo._check_workdir(tmp_path, dict(base, stages={'pretrain': 'a', 'finetune_cleanclip': 'b'}))
  with pytest.raises(SystemExit, match=r"'stage finetune_cleanclip': \('config', 'another config'\)"):
    demo._check_workdir(tmp_path, dict(base, stages={'pretrain': 'a', 'finetune_cleanclip': 'x'}))
  with pytest.raises(SystemExit, match=r"'seed': \(0, 1\)"):
    demo._check_workdir(tmp_path, dict(base, seed=1, stages={'pretrain': 'a'}))
  (tmp_path / 'demo_settings.json').write_text('{"attack": "blen')  # torn by a kill (older code)
  with pytest.raises(SystemExit, match='demo_settings.json is damaged'):
    demo._check_workdir(tmp_path, dict(base, stages={'pretrain': 'a'}))


def test_list_classes_and_bad_target(capsys, tmp_path):
  assert demo.main(['--list-classes']) == 0
  names = capsys.readouterr().out.split('\n')
  assert names[:2] == ['banana', 'apple'] and len([n for n in names if n]) == 12
  with pytest.raises(SystemExit, match='not a class'):
    demo.run(str(tmp_path / 'x'), target='zebra', fast=True)


@pytest.mark.parametrize('attack', demo.ATTACKS)
def test_stage_configs_plant_and_measure_the_same_trigger(attack):
  stages = demo.stage_configs(attack, 'banana', 0, fast=False, clean_baseline=True)
  assert [name for name, _, _ in stages] == STAGES
  pretrain = stages[0][2]
  assert pretrain.data.poison.enabled and pretrain.data.poison.num_poisoned > 0
  assert pretrain.data.poison.label_consistent == (attack == 'label_consistent')
  for name, _, config in stages:
    assert config.data.poison.enabled == (name == 'pretrain'), name
    assert config.eval.trigger.to_dict() == pretrain.data.poison.trigger.to_dict(), name
    assert config.eval.target == 'banana'
    assert config.data.synthetic.split == ('pretrain' if name.startswith('pretrain') else 'finetune')
  by_name = {name: config for name, _, config in stages}
  assert by_name['finetune_cleanclip'].objective.name == 'cleanclip'
  demo_config = importlib.import_module('configs.demo')  # the same file the stages load
  assert by_name['finetune_cleanclip'].objective.inmodal_weight == demo_config.INMODAL_WEIGHT > 0
  assert by_name['finetune_cleanclip'].learning_rate == by_name['finetune_mmcl'].learning_rate
  assert by_name['finetune_mmcl'].objective.name == 'clip'
  assert by_name['finetune_supervised'].objective.name == 'supervised'


def test_demo_config_rejects_unknown_stage_and_attack():
  with pytest.raises(ValueError, match='unknown stage'):
    config_lib.load_config('demo.py:pretrian')
  with pytest.raises(ValueError, match='unknown attack'):
    config_lib.load_config('demo.py:pretrain,attack=trojan')
