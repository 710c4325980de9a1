"""Config files load and validate; bad configs fail before anything compiles, saying how to fix them."""

import os
import subprocess
import sys

import jax
import pytest

from cleanclip_jax import config as config_lib
from cleanclip_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = [
    'clip_pretrain.py:tiny', 'clip_pretrain.py:tiny,poison=True,trigger=blended',
    'clip_pretrain.py:rn50_cc3m', 'cleanclip_finetune.py:tiny', 'cleanclip_finetune.py:tiny,objective=clip',
    'cleanclip_finetune.py:rn50_cc3m', 'supervised_finetune.py:tiny', 'supervised_finetune.py:imagenet',
]


def _dotted_keys(tree, prefix=''):
  """Every leaf of a nested config dict as its command-line name ('data.poison.trigger.kind')."""
  keys = set()
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      keys |= _dotted_keys(value, f'{prefix}{key}.')
    else:
      keys.add(prefix + key)
  return keys


@pytest.mark.parametrize('spec', PRESETS)
def test_presets_load_and_validate(spec):
  config = config_lib.load_config(spec)
  base = config_lib.base_config()
  # Config files change values, never add keys: every key is overridable from the command line.
  # Compared at every depth: a preset's typo is nested far more often than not
  # (`config.data.shufle_buffer = 10` adds a key nothing reads and leaves the real one at its default).
  keys, base_keys = _dotted_keys(config.to_dict()), _dotted_keys(base.to_dict())
  assert keys == base_keys, (sorted(keys - base_keys), sorted(base_keys - keys))
  if config.data.source == 'synthetic':
    config_lib.validate(config, 8)
  else:
    with pytest.raises(config_lib.ConfigError, match='--config.data.path'):
      config_lib.validate(config, 8)


@pytest.mark.parametrize('spec', ['eval.py:imagenet', 'eval.py:cifar10', 'eval.py:cifar100', 'eval.py:tiny',
                                  *(f'demo.py:{stage},fast=True' for stage in (
                                      'pretrain', 'pretrain_clean', 'finetune_mmcl',
                                      'finetune_cleanclip', 'finetune_supervised'))])
def test_eval_and_demo_presets_name_no_ignored_path(spec):
  # tfds presets set eval.path (the dataset name) with their own source: only a path the source
  # would ignore is refused.
  config = config_lib.load_config(spec)
  config_lib.check_eval_source(config.eval)
  if spec.startswith('demo.py'):
    config_lib.validate(config, 8)


def test_eval_path_with_synthetic_source_is_refused_where_eval_sets_are_made():
  # The evaluation job runs no `validate`: the pipeline checks the eval config itself.
  from cleanclip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  eval_cfg = config_lib.load_config('eval.py:tiny').eval
  for key in ('path', 'probe_path'):
    bad = eval_cfg.copy_and_resolve_references()
    bad[key] = '/data/val.csv'
    with pytest.raises(config_lib.ConfigError,
                       match=rf"eval.{key}='/data/val.csv' is set but eval.source='synthetic'.*"
                             r'--config.eval.source=csv\|folder\|tfds'):
      pipeline.eval_source(bad)


def test_paper_hyperparameters():
  pretrain = config_lib.load_config('clip_pretrain.py:rn50_cc3m')
  assert (pretrain.model.name, pretrain.learning_rate, pretrain.optimizer.weight_decay) == ('RN50', 5e-4, 0.1)
  assert (pretrain.warmup_steps, pretrain.batch_size, pretrain.total_epochs) == (10_000, 128, 64)
  finetune = config_lib.load_config('cleanclip_finetune.py:rn50_cc3m')
  assert finetune.objective.name == 'cleanclip' and finetune.data.inmodal_views
  assert (finetune.learning_rate, finetune.batch_size, finetune.total_epochs, finetune.warmup_steps) == (
      1e-5, 64, 10, 50)
  assert config_lib.load_config('supervised_finetune.py:tiny').objective.name == 'supervised'
  # The authors' AdamW (torch's betas and eps, no gradient clipping), not open_clip's.
  for config in (pretrain, finetune):
    assert (config.optimizer.b2, config.optimizer.eps, config.optimizer.grad_clip_norm) == (0.999, 1e-8, 0.0)


def test_unknown_preset_and_argument():
  with pytest.raises(ValueError, match='unknown preset'):
    config_lib.load_config('clip_pretrain.py:huge')
  with pytest.raises(KeyError, match='unknown preset argument'):
    config_lib.load_config('clip_pretrain.py:tiny,poisson=True')


def _bad(change):
  config = config_lib.load_config('clip_pretrain.py:tiny')
  change(config)
  return config


@pytest.mark.parametrize('change, expected', [
    (lambda c: setattr(c, 'batch_size', 12), r'batch_size=12 is not divisible .*--config.batch_size'),
    (lambda c: setattr(c.mesh, 'fsdp', 16), r'needs 16 devices but 8 .*--config.mesh'),
    (lambda c: setattr(c.data, 'source', 'csv'), r"data.source='csv' needs --config.data.path"),
    (lambda c: (setattr(c.data, 'source', 'csv'), setattr(c.data, 'path', '/nonexistent/train.csv')),
     r'/nonexistent/train.csv.* does not exist.*--config.data.path'),
    (lambda c: setattr(c, 'init_checkpoint', '/nonexistent/run'), r'init_checkpoint=.* does not exist'),
    (lambda c: setattr(c.model, 'attention', 'flash'), r"model.attention='flash': use one of"),
    (lambda c: setattr(c.model, 'attention', 'cudnn'), r'cudnn needs a 16-bit .*--config.model.dtype'),
    (lambda c: setattr(c, 'checkpoint_every_steps', 0), r'checkpoint_every_steps=0: use a positive'),
    (lambda c: (setattr(c.data, 'source', 'array_record'), setattr(c.data, 'path', 'gs://b/cc3m-*')),
     r"data.path='gs://b/cc3m-\*': remote URLs .*gcsfuse"),
    (lambda c: setattr(c, 'log_every_steps', 0), r'log_every_steps=0: use a positive'),
    (lambda c: setattr(c.data, 'path', 'train.csv'),
     r"data.path='train.csv' is set but data.source='synthetic' .*--config.data.source=csv\|array_record"),
    (lambda c: setattr(c.eval, 'path', 'val.csv'),
     r"eval.path='val.csv' is set but eval.source='synthetic' .*--config.eval.source=csv\|folder\|tfds"),
    (lambda c: setattr(c.optimizer, 'schedule', 'cosin'), r"optimizer.schedule='cosin': use cosine"),
    (lambda c: setattr(c.objective, 'sharded_loss_impl', 'rings'), r"sharded_loss_impl='rings'"),
    (lambda c: setattr(c.optimizer, 'lr_rules', (('^visual/(', 0.1),)), r"lr_rules: bad regex '\^visual/\('"),
    (lambda c: (setattr(c.mesh, 'data', 2), setattr(c.mesh, 'fsdp', 2)),
     r'data=2 x fsdp=2 uses 4 of the 8 devices.*--config.mesh.data=-1'),
    (lambda c: setattr(c.model, 'name', 'ViT-B-32'), r'data.image_size=32 but model ViT-B-32 takes 224px'),
    (lambda c: setattr(c.model, 'name', 'ViT-X'), r"model.name: unknown model 'ViT-X'"),
    (lambda c: setattr(c, 'keep_every_steps', 3), r'keep_every_steps=3 is not a multiple of checkpoint_every_steps'),
    (lambda c: (setattr(c.objective, 'name', 'supervised'), setattr(c.data.poison, 'enabled', True)),
     r'data.poison with objective.name=supervised: .*label_consistent=True'),
])
def test_config_errors_fail_before_compiling(change, expected, tmp_path, monkeypatch):
  def no_jit(*args, **kwargs):
    raise AssertionError('something was jit-compiled before the config was checked')
  monkeypatch.setattr(jax, 'jit', no_jit)
  with pytest.raises(config_lib.ConfigError, match=expected):
    train.run(_bad(change), tmp_path / 'run')
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_remote_workdir_is_refused_with_advice(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r'--workdir gs://bucket/run: remote URLs .*gcsfuse'):
    train.run(config_lib.load_config('clip_pretrain.py:tiny'), 'gs://bucket/run')
  assert not os.path.exists('gs:')


def _cli(*overrides, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', 'cleanclip_jax.train', '--config', 'configs/clip_pretrain.py:tiny',
       '--workdir', '/nonexistent-never-created', *overrides],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_unknown_key_names_it_and_suggests():
  result = _cli('--config.optimizer.weight_decy=0.2', '--config.bach_size=8')
  assert result.returncode == 2, result.stderr[-2000:]
  assert "'weight_decy' is not a key of optimizer" in result.stderr
  assert 'Did you mean weight_decay?' in result.stderr
  assert "'bach_size' is not a key of the config" in result.stderr and 'batch_size' in result.stderr


def test_cli_wrong_type_and_bad_batch_fail_fast():
  result = _cli('--config.batch_size=lots')
  assert result.returncode == 2
  assert 'Config error:' in result.stderr and '--config.batch_size=lots' in result.stderr
  assert 'Traceback' not in result.stderr
  result = _cli('--config.batch_size=12')  # 8 emulated devices (conftest)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Config error: batch_size=12 is not divisible' in result.stderr
  assert 'Starting at step' not in result.stderr


def test_model_vocab_size_follows_a_trained_bpe(tmp_path):
  from cleanclip_jax import tokenizer, train_step
  captions = [f'a photo of a {name} on the {place}' for name in ('cat', 'banana', 'horse')
              for place in ('grass', 'table')] * 5
  path = tokenizer.train_bpe(captions, str(tmp_path), vocab_size=600, min_frequency=2)
  needed = tokenizer.Tokenizer(path).vocab_size
  config = config_lib.load_config('clip_pretrain.py:tiny')
  config.model.tokenizer = path
  config.model.vocab_size = needed
  config_lib.validate(config, 8)
  assert train_step.model_for_config(config).vocab_size == needed  # the embedding has its rows
  config.model.vocab_size = needed - 1  # ids past the embedding: NaN text features
  with pytest.raises(config_lib.ConfigError, match=f'--config.model.vocab_size={needed}'):
    config_lib.validate(config, 8)
  config.model.vocab_size = 0  # the architecture's 49,408 rows hold it (unused rows, no error)
  config_lib.validate(config, 8)
  assert train_step.model_for_config(config).vocab_size == 49408
