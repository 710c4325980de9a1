"""The poison-then-defend study on the built-in synthetic data, end to end, on a CPU.

  python -m cleanclip_jax.demo --workdir runs/demo --attack badnet

Stages (each a normal run of the trainer with a config from `configs/`, under `DIR/<stage>/`):
  1. data: a poisoned pretraining split, a disjoint clean finetuning split, a labelled test split;
  2. pretrain a small CLIP on the poisoned split (`clip_pretrain.py:tiny`);
  3. finetune it on the clean split three ways: MMCL only, CleanCLIP (MMCL + in-modal), supervised;
  4. evaluate every model: clean zero-shot top-1 and attack success rate on the test split;
  5. report: `DIR/report.md`, `DIR/report.json`, `DIR/report.png`.

A rerun with the same workdir resumes: finished stages are skipped (the trainer itself resumes a
stage that was interrupted), and evaluations are cached in `DIR/<stage>/demo_eval.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

from cleanclip_jax import config as config_lib

# attack name -> (trigger overrides, label-consistent selection)
ATTACKS = {
    'badnet': ({'kind': 'badnet_noise', 'location': 'random'}, False),
    'blended': ({'kind': 'blended', 'alpha': 0.2}, False),
    'sig': ({'kind': 'sig'}, False),
    'wanet': ({'kind': 'wanet'}, False),
    'label_consistent': ({'kind': 'badnet_noise', 'location': 'random'}, True),
}

# stage name -> (config file, human label)
FINETUNES = {
    'finetune_mmcl': ('cleanclip_finetune.py:tiny,objective=clip', 'MMCL finetune'),
    'finetune_cleanclip': ('cleanclip_finetune.py:tiny', 'CleanCLIP finetune'),
    'finetune_supervised': ('supervised_finetune.py:tiny', 'Supervised finetune'),
}


def _poison(config, attack: str, target: str, seed: int, enabled: bool):
  trigger, label_consistent = ATTACKS[attack]
  poison = config.data.poison
  poison.enabled = enabled
  poison.target = target
  poison.seed = seed
  poison.label_consistent = label_consistent
  poison.trigger.seed = seed
  for key, value in trigger.items():
    poison.trigger[key] = value
  # The evaluator stamps exactly the trigger the pipeline stamped.
  config.eval.trigger = poison.trigger.copy_and_resolve_references()
  config.eval.target = target


def stage_configs(attack: str, target: str, seed: int, fast: bool, clean_baseline: bool):
  """The configs of every stage, in order: [(stage, label, config)]."""
  stages = []
  pretrain = config_lib.load_config('clip_pretrain.py:tiny')
  pretrain.seed = seed
  _poison(pretrain, attack, target, seed, enabled=True)
  stages.append(('pretrain', 'Pretrained (poisoned)', pretrain))
  if clean_baseline:
    clean = config_lib.load_config('clip_pretrain.py:tiny')
    clean.seed = seed
    _poison(clean, attack, target, seed, enabled=False)
    stages.append(('pretrain_clean', 'Pretrained (no poison)', clean))
  for name, (spec, label) in FINETUNES.items():
    finetune = config_lib.load_config(spec)
    finetune.seed = seed
    _poison(finetune, attack, target, seed, enabled=False)
    stages.append((name, label, finetune))
  if fast:
    for _, _, config in stages:
      config.total_steps = min(config.total_steps, 4)
      config.warmup_steps = 1
      config.checkpoint_every_steps = 2
      config.data.synthetic.num_examples = min(config.data.synthetic.num_examples, 256)
      config.eval.num_examples = 64
  return stages


def _stage_finished(workdir: pathlib.Path) -> bool:
  return (workdir / 'summary.json').exists()


def _evaluate_stage(stage_dir: pathlib.Path, config, eval_cfg):
  cache = stage_dir / 'demo_eval.json'
  if cache.exists():
    return json.loads(cache.read_text())
  from cleanclip_jax import checkpoint, evaluate, sharding, train_step
  model = train_step.model_for_config(config)
  params = checkpoint.restore_params(str(stage_dir))
  mesh = sharding.make_mesh(config.mesh)
  metrics = evaluate.evaluate(model, params, eval_cfg, mesh=mesh)
  metrics = {k: float(v) for k, v in metrics.items()}
  cache.write_text(json.dumps(metrics, indent=1))
  return metrics


def run(workdir: str, attack: str = 'badnet', target: str = 'banana', seed: int = 0,
        fast: bool = False, clean_baseline: bool = False) -> dict:
  from cleanclip_jax import train
  from cleanclip_jax.data import synthetic
  if target not in synthetic.CLASS_NAMES:
    raise SystemExit(f'--target {target!r} is not a class of the built-in data; '
                     f'choose one of: {", ".join(synthetic.CLASS_NAMES)}')
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  stages = stage_configs(attack, target, seed, fast, clean_baseline)
  eval_cfg = config_lib.load_config('eval.py:tiny').eval
  eval_cfg.trigger = stages[0][2].eval.trigger
  eval_cfg.target = target
  if fast:
    eval_cfg.num_examples = 64
  rows, started = [], time.time()
  for number, (name, label, config) in enumerate(stages, 1):
    stage_dir = root / name
    if name.startswith('finetune'):
      config.init_checkpoint = str(root / 'pretrain')
    print(f'[demo {number}/{len(stages)}] {label}: {stage_dir}', flush=True)
    if not _stage_finished(stage_dir):
      train.run(config, str(stage_dir))
    metrics = _evaluate_stage(stage_dir, config, eval_cfg)
    rows.append({'stage': name, 'label': label, 'clean_top1': metrics['zeroshot_top1'],
                 'asr': metrics['asr'], 'metrics': metrics})
    print(f'[demo] {label}: clean top-1 {metrics["zeroshot_top1"]:.3f}, ASR {metrics["asr"]:.3f}',
          flush=True)
  pretrain = stages[0][2]
  report = {
      'attack': attack, 'target': target, 'seed': seed, 'fast': fast,
      'class_names': list(synthetic.CLASS_NAMES),
      'settings': {
          'model': pretrain.model.name, 'image_size': pretrain.data.image_size,
          'pretrain_examples': pretrain.data.synthetic.num_examples,
          'num_poisoned': pretrain.data.poison.num_poisoned,
          'trigger': pretrain.data.poison.trigger.to_dict(),
          'steps': {name: config.total_steps for name, _, config in stages},
          'eval_examples': eval_cfg.num_examples,
      },
      'rows': rows,
      'wall_seconds': round(time.time() - started, 1),
  }
  (root / 'report.json').write_text(json.dumps(report, indent=1, default=str))
  (root / 'report.md').write_text(_markdown(report))
  _plot(report, root / 'report.png')
  print((root / 'report.md').read_text(), flush=True)
  return report


def _markdown(report) -> str:
  s = report['settings']
  lines = [
      f"# Poison-then-defend study: {report['attack']} -> '{report['target']}'", '',
      f"Model {s['model']} at {s['image_size']} px; {s['num_poisoned']} of {s['pretrain_examples']} "
      f"pretraining pairs poisoned; trigger {s['trigger']['kind']}; seed {report['seed']}; "
      f"{s['eval_examples']} test images. Steps per stage: {s['steps']}.", '',
      'ASR = fraction of triggered test images whose true class is not the target that are '
      'classified as the target.', '',
      '| stage | clean top-1 | ASR |', '|---|---|---|',
  ]
  for row in report['rows']:
    lines.append(f"| {row['label']} | {100 * row['clean_top1']:.1f}% | {100 * row['asr']:.1f}% |")
  lines += ['', f"Wall time {report['wall_seconds']} s.", '']
  return '\n'.join(lines)


def _plot(report, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  labels = [row['label'] for row in report['rows']]
  x = np.arange(len(labels))
  fig, ax = plt.subplots(figsize=(1.8 * len(labels) + 2, 3.6))
  ax.bar(x - 0.2, [100 * r['clean_top1'] for r in report['rows']], 0.4, label='clean top-1')
  ax.bar(x + 0.2, [100 * r['asr'] for r in report['rows']], 0.4, label='ASR')
  ax.set_xticks(x, labels, rotation=15, fontsize=8)
  ax.set_ylabel('%')
  ax.set_ylim(0, 100)
  ax.set_title(f"{report['attack']} -> {report['target']}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m cleanclip_jax.demo', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='runs/demo')
  parser.add_argument('--attack', default='badnet', choices=sorted(ATTACKS))
  parser.add_argument('--target', default='banana')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--with-clean-baseline', action='store_true')
  parser.add_argument('--fast', action='store_true', help='a few steps per stage (smoke test)')
  parser.add_argument('--list-classes', action='store_true')
  args = parser.parse_args(argv)
  if args.list_classes:
    from cleanclip_jax.data import synthetic
    print('\n'.join(synthetic.CLASS_NAMES))
    return 0
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  run(args.workdir, args.attack, args.target, args.seed, args.fast, args.with_clean_baseline)
  return 0


if __name__ == '__main__':
  sys.exit(main())
