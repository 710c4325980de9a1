"""The poison-then-defend study's stages (`python -m cleanclip_jax.demo`), one config per stage.

    python -m cleanclip_jax.demo --workdir /tmp/demo_runs/blended --attack blended --with-clean-baseline
    # One stage by hand, with the same trainer the demo calls:
    python -m cleanclip_jax.train --config configs/demo.py:pretrain,attack=sig --workdir /tmp/sig/pretrain
    python -m cleanclip_jax.train --config configs/demo.py:finetune_cleanclip,attack=sig \
        --workdir /tmp/sig/finetune_cleanclip --config.init_checkpoint=/tmp/sig/pretrain

Each stage starts from the `tiny` preset of its real config file (`clip_pretrain.py`,
`cleanclip_finetune.py`, `supervised_finetune.py`) and changes only what makes the study fit in a
few minutes on 2 CPU cores: the `demo-vit` model (patch 8 at 32 px, width 64, 2+2 layers, context
24), the step counts and learning rates, and the attack's trigger.

Stages (preset names): `pretrain` (poisoned), `pretrain_clean` (the same, no poison),
`finetune_mmcl` (CLIP loss only), `finetune_cleanclip` (CLIP + in-modal, weights 1:1 as in the
paper), `finetune_supervised` (linear head + whole image tower, cross-entropy on labels). The
finetunes follow the paper's schedule: 10 epochs over the clean subset at 1/50 of the pretraining
learning rate.
Preset arguments: `attack` (see `ATTACKS`), `target` (a class name), `seed`, `fast` (a few steps,
for the tests).

Measured (2 CPU cores, one study at a time; README, "The study", has the analysis, the
experiments behind these settings and the commands; the reports are in docs/study/):
  (clean top-1 / ASR in %, 600 test images, chance top-1 8.3%; seed 0; supervised: the head's ASR,
  then in brackets the image tower's zero-shot ASR)
  attack            clean baseline  poisoned      MMCL ft       CleanCLIP ft  supervised ft       minutes
  blended           16.7 / 15.5     15.7 /  88.2  15.5 /  39.8  17.7 /   9.8  14.8 / 1.3 (88.9)   5.0
  badnet (corner)   -               13.3 / 100.0  14.0 / 100.0  13.8 / 100.0  13.8 / 0.0 (100.0)  3.5
  sig (amp. 40)     -               15.0 / 100.0  17.0 / 100.0  15.2 / 100.0  15.2 / 0.7 (100.0)  3.8
  wanet (s=3)       -               17.2 /   3.1  16.8 /   3.6  14.7 /   6.7  15.2 / 0.7 (0.7)    4.1
  label_consistent  -               16.0 /  19.8  16.0 /  19.8  16.5 /  14.2  16.2 / 1.8 (6.5)    4.6
  blended, seed 1   18.0 /  5.6     18.2 /  99.1  18.5 /  99.1  17.3 /  95.5  15.3 / 1.8 (99.1)   5.2
  blended, seed 2   -               16.3 /  22.4  15.5 /  20.5  14.3 /   6.7  15.0 / 3.8 (9.8)    3.5
  blended, seed 3   -               14.0 /  97.8  14.2 /  98.5  15.2 /  79.3  13.8 / 6.0 (98.5)   3.8
A backdoor planted but not saturated (blended seed 0) shows the paper's pattern; saturated ones
(badnet, sig, blended seeds 1 and 3) survive MMCL and CleanCLIP, and the supervised head scores
them near 0 while its tower keeps them; WaNet is not learnt at 32 px.
"""

from cleanclip_jax import config as config_lib

BADNET_PATCH = 6 / 32
# The BadNet patch in the bottom-right corner, where BadNets (Gu et al., 2017) put it. The CleanCLIP
# paper stamps it at a random location; at this scale that was never learnt (6 px patch: ASR 4.5%
# after 1,000 steps, 4.9% after 3,000), while the fixed corner is learnt to 100% in 1,000 steps.
BADNET = {'kind': 'badnet_noise', 'location': 'fixed', 'patch_fraction': BADNET_PATCH}

# attack -> (trigger overrides, label-consistent selection)
ATTACKS = {
    'badnet': (BADNET, False),
    'blended': ({'kind': 'blended', 'alpha': 0.2}, False),
    # Amplitude 40/255 (twice the usual 20): at 20 this model reached ASR 19.8% in 1,000 steps (the
    # floor is ~15%), at 40 it reaches 100%.
    'sig': ({'kind': 'sig', 'sig_delta': 40.0}, False),
    # At the paper's s=0.5 the warp moves pixels by < 1 px at 32 px; s=3 moves them by ~1-4 px.
    'wanet': ({'kind': 'wanet', 'wanet_s': 3.0}, False),
    'label_consistent': (BADNET, True),
}

# CleanCLIP's in-modal weight: the paper's 1:1. (Weight 3 was the default until it was found to be
# tuned on one seed's outcome; README, 'The study'.)
INMODAL_WEIGHT = 1.0

# stage -> the real config it starts from
STAGES = {
    'pretrain': 'clip_pretrain.py:tiny',
    'pretrain_clean': 'clip_pretrain.py:tiny',
    'finetune_mmcl': 'cleanclip_finetune.py:tiny,objective=clip',
    'finetune_cleanclip': f'cleanclip_finetune.py:tiny,inmodal_weight={INMODAL_WEIGHT}',
    'finetune_supervised': 'supervised_finetune.py:tiny',
}

MODEL = 'demo-vit'
CONTEXT_LENGTH = 24  # the synthetic and poisoned captions are at most 18 tokens
# Every pretraining pair is seen once (1,000 x 64): a tiny CLIP that sees 4,096 pairs 16 times
# memorises them (its loss on unseen pairs rose above chance) and learns no zero-shot classifier.
# 3,000 steps double clean accuracy but plant a backdoor that no defence removes at this finetuning
# budget (README, 'The study').
PRETRAIN = dict(total_steps=1000, learning_rate=1e-3, warmup_steps=50, num_examples=64_000,
                num_poisoned=4_000)
# Finetuning follows the paper's schedule rather than any outcome here: 10 epochs over the clean
# subset (4,096 pairs / batch 64 = 64 steps an epoch) at 1/50 of the pretraining learning rate
# (the paper: 5e-4 -> 1e-5).
FINETUNE = dict(total_steps=640, learning_rate=2e-5, warmup_steps=10, num_examples=4_096)
EVAL_EXAMPLES = 600


def _poison(config, attack: str, target: str, seed: int, enabled: bool) -> None:
  trigger, label_consistent = ATTACKS[attack]
  poison = config.data.poison
  poison.enabled = enabled
  poison.target = target
  poison.seed = seed
  poison.label_consistent = label_consistent
  poison.trigger.seed = seed
  for key, value in trigger.items():
    poison.trigger[key] = value
  # Every stage evaluates the planted backdoor, including the finetunes (which plant nothing).
  config.eval.trigger = poison.trigger.copy_and_resolve_references()
  config.eval.target = target


def get_config(arg=None):
  # attack: the demo command's default too, so a stage run by hand plants the default study's trigger.
  arg = config_lib.parse_arg(arg, preset='pretrain', attack='blended', target='banana', seed=0,
                             fast=False)
  if arg.preset not in STAGES:
    raise ValueError(f'configs/demo.py: unknown stage {arg.preset!r}; use one of {", ".join(STAGES)}')
  if arg.attack not in ATTACKS:
    raise ValueError(f'configs/demo.py: unknown attack {arg.attack!r}; use one of {", ".join(ATTACKS)}')
  config = config_lib.load_config(STAGES[arg.preset])
  config.seed = arg.seed
  config.model.name = MODEL
  config.model.context_length = CONTEXT_LENGTH
  schedule = PRETRAIN if arg.preset.startswith('pretrain') else FINETUNE
  config.total_steps = schedule['total_steps']
  config.learning_rate = schedule['learning_rate']
  config.warmup_steps = schedule['warmup_steps']
  config.data.synthetic.num_examples = schedule['num_examples']
  config.data.synthetic.seed = arg.seed
  config.log_every_steps = 10
  config.checkpoint_every_steps = config.total_steps // 2
  config.keep_checkpoints = 1
  config.eval.num_examples = EVAL_EXAMPLES
  config.eval.linear_probe = False
  config.eval.retrieval = False
  config.data.poison.num_poisoned = PRETRAIN['num_poisoned']
  _poison(config, arg.attack, arg.target, arg.seed, enabled=arg.preset == 'pretrain')
  if arg.fast:
    config.total_steps = 2
    config.warmup_steps = 1
    config.checkpoint_every_steps = 2
    config.data.synthetic.num_examples = 256
    config.data.poison.num_poisoned = 16
    config.eval.num_examples = 32
  return config
