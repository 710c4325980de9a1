"""The poison-then-defend study on the built-in synthetic data, end to end, on a CPU.

  python -m cleanclip_jax.demo --workdir runs/demo --attack badnet [--with-clean-baseline]

Stages (each a normal run of the trainer, `train.run`, with a preset of `configs/demo.py`, which
starts from the `tiny` presets of the real config files; under `DIR/<stage>/`):
  1. data: a poisoned pretraining split, a disjoint clean finetuning split, a labelled test split;
  2. pretrain a small CLIP on the poisoned split (and, optionally, one without poison);
  3. finetune it on the clean split three ways: MMCL only, CleanCLIP (MMCL + in-modal), supervised;
  4. evaluate every model with `evaluate.evaluate`: clean top-1 and attack success rate;
  5. report: `DIR/report.md`, `DIR/report.json`, `DIR/report.png`.

A rerun with the same workdir resumes: finished stages are skipped (the trainer itself resumes a
stage that was interrupted), and evaluations are cached in `DIR/<stage>/demo_eval.json`. The
workdir records the arguments and a hash of every stage's config: another setting, or a changed
`configs/demo.py`, is refused rather than mixed with the cached stages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time

from cleanclip_jax import config as config_lib
from cleanclip_jax import cpu_dots, host_memory, metrics_log

# stage (a preset of configs/demo.py) -> human label, in the order they run
LABELS = {
    'pretrain': 'Pretrained (poisoned)',
    'pretrain_clean': 'Pretrained (no poison)',
    'finetune_mmcl': 'MMCL finetune',
    'finetune_cleanclip': 'CleanCLIP finetune',
    'finetune_supervised': 'Supervised finetune',
}
ATTACKS = ('badnet', 'blended', 'sig', 'wanet', 'label_consistent')


def stage_configs(attack: str, target: str, seed: int, fast: bool, clean_baseline: bool):
  """The configs of every stage, in order: [(stage, label, config)]."""
  stages = []
  for name, label in LABELS.items():
    if name == 'pretrain_clean' and not clean_baseline:
      continue
    config = config_lib.load_config(
        f'demo.py:{name},attack={attack},target={target},seed={seed},fast={fast}')
    stages.append((name, label, config))
  return stages


def _check_workdir(root: pathlib.Path, settings: dict) -> None:
  """Refuses to resume a workdir that holds a study with other settings (it would mix them).

  `settings['stages']` maps each stage to a fingerprint of its config: a stage whose config has
  changed is refused by name; a stage the study did not have (`--with-clean-baseline` added
  later) is welcome, and is recorded for the next run.
  """
  path = root / 'demo_settings.json'
  if path.exists():
    try:
      previous = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      # Without it the stages' settings cannot be checked, and a guess could mix two studies.
      raise SystemExit(f'{path} is damaged ({e}); delete it to resume this study with the '
                       'current settings, or use another --workdir') from e
    changed = {k: (previous.get(k), v) for k, v in settings.items()
               if k != 'stages' and previous.get(k) != v}
    if 'stages' not in previous:  # a study recorded before per-stage fingerprints
      changed.update({'configs': (previous.get('configs'), 'per-stage fingerprints')}
                     if previous.get('configs') else {})
    old_stages = previous.get('stages', {})
    changed.update({f'stage {name}': ('config', 'another config')
                    for name, print_ in settings['stages'].items()
                    if name in old_stages and old_stages[name] != print_})
    if changed:
      raise SystemExit(f'{root} holds a study with other settings ({changed}, as (old, new)); '
                       'use another --workdir or the same settings to resume it')
    settings = dict(settings, stages={**old_stages, **settings['stages']})
  metrics_log.write_text_atomic(path, json.dumps(settings, indent=1))


def _fingerprints(stages) -> dict[str, str]:
  import hashlib  # pylint: disable=import-outside-toplevel
  return {name: hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]
          for name, _, config in stages}


def _stage_finished(workdir: pathlib.Path) -> bool:
  return (workdir / 'summary.json').exists()


def _train_seconds(stage_dir: pathlib.Path) -> float:
  return float(json.loads((stage_dir / 'summary.json').read_text()).get('wall_seconds', 0.0))


def _evaluate_stage(stage_dir: pathlib.Path, config):
  """The evaluator's metrics of the stage's final checkpoint (cached in `demo_eval.json`)."""
  cache = stage_dir / 'demo_eval.json'
  if cache.exists():
    try:
      return json.loads(cache.read_text())
    except json.JSONDecodeError:
      # Written whole now; a study killed mid-write by older code may hold a torn one.
      logging.warning('%s is damaged; evaluating the stage again', cache)
  from cleanclip_jax import checkpoint, evaluate, sharding
  # The evaluation job's own path: the model comes from the config the trainer stored with the
  # checkpoint (e.g. the supervised head's class count), the trigger from the stage's config.eval.
  step = checkpoint.committed_steps(str(stage_dir))[-1]
  metrics = evaluate.evaluate_checkpoint(str(stage_dir), step, config,
                                         sharding.make_mesh(config.mesh))
  metrics = {k: float(v) for k, v in metrics.items()}
  metrics_log.write_text_atomic(cache, json.dumps(metrics, indent=1))
  return metrics


def run(workdir: str, attack: str = 'blended', target: str = 'banana', seed: int = 0,
        fast: bool = False, clean_baseline: bool = False) -> dict:
  from cleanclip_jax import train
  from cleanclip_jax.data import synthetic
  if target not in synthetic.CLASS_NAMES:
    raise SystemExit(f'--target {target!r} is not a class of the built-in data; '
                     f'choose one of: {", ".join(synthetic.CLASS_NAMES)}')
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  stages = stage_configs(attack, target, seed, fast, clean_baseline)
  # The stage configs themselves, not just the arguments: finished stages and their cached
  # evaluations must not be reused after configs/demo.py (steps, rates, weights) has changed.
  _check_workdir(root, {'attack': attack, 'target': target, 'seed': seed, 'fast': fast,
                        'stages': _fingerprints(stages)})
  rows, started, retrained = [], time.time(), set()
  for number, (name, label, config) in enumerate(stages, 1):
    stage_dir = root / name
    if name.startswith('finetune'):
      config.init_checkpoint = str(root / 'pretrain')
    stage_started = time.time()
    trained = not _stage_finished(stage_dir)
    if name.startswith('finetune') and not trained and 'pretrain' in retrained:
      raise SystemExit(f'{stage_dir} finetuned an earlier pretraining (pretrain was trained again '
                       'just now); delete the finetune_* folders to redo them, or use another --workdir')
    if trained:
      retrained.add(name)
    print(f'[demo {number}/{len(stages)}] {label}: {config.total_steps} steps -> {stage_dir}'
          + ('' if trained else ' (finished earlier)'), flush=True)
    if trained:
      summary = train.run(config, str(stage_dir))
      if not summary['completed']:  # SIGTERM: the trainer saved a checkpoint; rerun to resume
        raise SystemExit(f'[demo] {label} stopped at step {summary["steps"]} (checkpoint saved); '
                         'rerun the same command to resume')
    metrics = _evaluate_stage(stage_dir, config)
    # top1/asr come from the model's own classifier: the linear head after supervised
    # finetuning, zero-shot otherwise (zeroshot_* are always in `metrics` too).
    rows.append({'stage': name, 'label': label, 'clean_top1': metrics['top1'],
                 'asr': metrics['asr'],
                 'classifier': 'head' if metrics.get('used_head') else 'zero-shot',
                 # The image tower's own backdoor, whatever classifier sits on top: a linear head
                 # can score ASR 0 while the tower still maps triggered images onto the target's
                 # caption embedding (the zero-shot ASR of the same tower).
                 'zeroshot_asr': metrics['zeroshot_asr'],
                 # Mean cosine of non-target test images to the target's class embedding, with
                 # and without the trigger: how far the trigger pulls an image towards the target.
                 'target_similarity_triggered': metrics['backdoor_sim_triggered'],
                 'target_similarity_clean': metrics['backdoor_sim_clean'],
                 'steps': int(config.total_steps), 'trained_now': trained,
                 'seconds': round(time.time() - stage_started, 1),
                 # training (the trainer's own clock, from the invocation that finished the stage)
                 # plus evaluation: the stage's cost even when it ran in an earlier invocation.
                 'stage_seconds': round(_train_seconds(stage_dir) + metrics.get('eval_seconds', 0), 1),
                 'metrics': metrics})
    print(f'[demo {number}/{len(stages)}] {label}: clean top-1 {metrics["top1"]:.3f}, '
          f'ASR {metrics["asr"]:.3f} ({rows[-1]["classifier"]}); stage {rows[-1]["seconds"]:.0f} s, '
          f'{time.time() - started:.0f} s so far', flush=True)
  pretrain = stages[0][2]
  report = {
      'attack': attack, 'target': target, 'seed': seed, 'fast': fast,
      'class_names': list(synthetic.CLASS_NAMES),
      'settings': {
          'model': pretrain.model.name, 'image_size': pretrain.data.image_size,
          'pretrain_examples': pretrain.data.synthetic.num_examples,
          'finetune_examples': stages[-1][2].data.synthetic.num_examples,
          'num_poisoned': pretrain.data.poison.num_poisoned,
          'label_consistent': pretrain.data.poison.label_consistent,
          'trigger': pretrain.data.poison.trigger.to_dict(),
          'steps': {name: int(config.total_steps) for name, _, config in stages},
          'learning_rates': {name: config.learning_rate for name, _, config in stages},
          'inmodal_weight': stages[-2][2].objective.inmodal_weight,
          'eval_examples': pretrain.eval.num_examples,
      },
      'rows': rows,
      'wall_seconds': round(time.time() - started, 1),
      'study_seconds': round(sum(row['stage_seconds'] for row in rows), 1),
      'load_average': [round(x, 2) for x in os.getloadavg()],
  }
  metrics_log.write_text_atomic(root / 'report.json', json.dumps(report, indent=1, default=str))
  metrics_log.write_text_atomic(root / 'report.md', _markdown(report))
  _plot(report, root / 'report.png')
  print((root / 'report.md').read_text(), flush=True)
  return report


def _markdown(report) -> str:
  s = report['settings']
  kind = 'label-consistent ' if s['label_consistent'] else ''
  lines = [
      f"# Poison-then-defend study: {report['attack']} -> '{report['target']}'", '',
      f"Model {s['model']} at {s['image_size']} px; {s['num_poisoned']} of {s['pretrain_examples']} "
      f"pretraining pairs poisoned ({kind}trigger {s['trigger']['kind']}); finetuning on "
      f"{s['finetune_examples']} clean pairs (in-modal weight {s['inmodal_weight']}); seed "
      f"{report['seed']}; {s['eval_examples']} test images. Steps: {s['steps']}; learning rates: "
      f"{s['learning_rates']}.", '',
      'Clean top-1: accuracy on the clean test images. ASR: the fraction of triggered test images '
      'whose true class is not the target that are classified as the target. Tower zero-shot ASR: '
      "the same, classifying with the text tower's class embeddings (differs from ASR only where a "
      'linear head classifies). Target similarity: mean cosine of those test images to the '
      "target's class embedding, triggered / clean.", '',
      '| stage | classifier | clean top-1 | ASR | tower zero-shot ASR | target similarity | '
      'seconds (train + eval) |', '|---|---|---|---|---|---|---|',
  ]
  for row in report['rows']:
    lines.append(f"| {row['label']} | {row['classifier']} | {100 * row['clean_top1']:.1f}% | "
                 f"{100 * row['asr']:.1f}% | {100 * row['zeroshot_asr']:.1f}% | "
                 f"{row['target_similarity_triggered']:.2f} / {row['target_similarity_clean']:.2f} | "
                 f"{row['stage_seconds']:.0f} |")
  load = ', '.join(f'{x:.1f}' for x in report['load_average'])
  lines += ['', f"Study time {report['study_seconds']:.0f} s (sum of the stages); this invocation "
            f"{report['wall_seconds']:.0f} s wall; load average at the end {load} on "
            f"{os.cpu_count()} CPUs.", '']
  return '\n'.join(lines)


def _plot(report, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  labels = [row['label'] for row in report['rows']]
  x = np.arange(len(labels))
  fig, ax = plt.subplots(figsize=(1.8 * len(labels) + 2, 3.6))
  ax.bar(x - 0.27, [100 * r['clean_top1'] for r in report['rows']], 0.27, label='clean top-1')
  ax.bar(x, [100 * r['asr'] for r in report['rows']], 0.27, label='ASR')
  ax.bar(x + 0.27, [100 * r['zeroshot_asr'] for r in report['rows']], 0.27, hatch='//',
         label='tower zero-shot ASR')
  ax.set_xticks(x, labels, rotation=15, fontsize=8)
  ax.set_ylabel('%')
  ax.set_ylim(0, 118)  # headroom for the legend above 100%
  ax.set_yticks(range(0, 101, 20))
  ax.set_title(f"{report['attack']} -> {report['target']}")
  ax.legend(loc='upper center', ncol=3, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _use_compilation_cache(path: pathlib.Path) -> None:
  """JAX's persistent compilation cache under the workdir, unless the user configured one.

  Stages whose programs are identical (the poisoned and the clean pretraining step; the encoders
  the evaluator compiles for every CLIP stage) and a resumed study then compile once.
  """
  import jax
  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update('jax_compilation_cache_dir', str(path))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


class _ProjectInfoOnly(logging.Filter):
  """Passes warnings and errors, and INFO records only from this package's own modules."""

  _package = str(pathlib.Path(__file__).resolve().parent)

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.pathname.startswith(self._package)


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m cleanclip_jax.demo', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='runs/demo')
  # Blended is the default because it is the attack whose backdoor a few CPU-minutes of
  # pretraining plants (README, 'The study'); every attack runs with --attack.
  parser.add_argument('--attack', default='blended', choices=ATTACKS)
  parser.add_argument('--target', default='banana')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--with-clean-baseline', action='store_true',
                      help='also pretrain the same model without poison')
  parser.add_argument('--fast', action='store_true', help='a few steps per stage (smoke test)')
  parser.add_argument('--list-classes', action='store_true')
  args = parser.parse_args(argv)
  if args.list_classes:
    from cleanclip_jax.data import synthetic
    print('\n'.join(synthetic.CLASS_NAMES))
    return 0
  host_memory.keep_freed_memory()  # unless CLEANCLIP_KEEP_FREED_MEMORY=0; before JAX makes its CPU client
  cpu_dots.route_dots_to_onednn()  # only with CLEANCLIP_ONEDNN_DOTS=1; likewise before the CPU client
  _use_compilation_cache(pathlib.Path(args.workdir) / 'jax_cache')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  # orbax narrates every save at INFO through absl; keep the trainer's progress lines (its step
  # log when stderr is not a terminal) and warnings from everything else.
  logging.getLogger('absl').addFilter(_ProjectInfoOnly())
  run(args.workdir, args.attack, args.target, args.seed, args.fast, args.with_clean_baseline)
  return 0


if __name__ == '__main__':
  sys.exit(main())
