"""CLIP pretraining, optionally on poisoned data (the "attack" half of CleanCLIP, Bansal et al. 2023).

    # The paper's setting: ResNet-50 CLIP on CC3M, 64 epochs, global batch 128, AdamW 5e-4 / wd 0.1.
    python -m cleanclip_jax.train --config configs/clip_pretrain.py:rn50_cc3m --workdir runs/rn50 \
        --config.data.path=/data/cc3m/train-*.array_record --config.data.source=array_record
    # ... with 1,500 BadNet-poisoned pairs (target 'banana'), as in the paper:
    python -m cleanclip_jax.train --config configs/clip_pretrain.py:rn50_cc3m,poison=True \
        --workdir runs/rn50_badnet --config.data.path=/data/cc3m/train.csv
    # A tiny ViT on the built-in synthetic data, on a CPU (about 1.4 s/step at batch 64 measured on
    # a heavily shared 2-core VM; logs every step):
    python -m cleanclip_jax.train --config configs/clip_pretrain.py:tiny,poison=True --workdir /tmp/tiny

Expected results: per the paper (see its tables for the figures), RN50 pretrained on CC3M reaches
an ImageNet zero-shot top-1 in the high teens to ~20%, and 1,500 BadNet-poisoned pairs give an
attack success rate close to 100%. `tiny` starts near the chance-level contrastive loss
ln(64) ~ 4.16 (batch 64; ~4.4-4.5 at the first steps, the initial temperature 1/0.07 spreading
the random logits); its clean accuracy and ASR after pretraining are what the demo study
(`python -m cleanclip_jax.demo`) measures and reports. Evaluate any run with `python -m cleanclip_jax.evaluate --config configs/eval.py:tiny --workdir /tmp/tiny`.

Preset arguments (`:preset,key=value,...`): `poison` (plant the backdoor), `num_poisoned`,
`trigger` (badnet_noise | badnet_solid | blended | sig | wanet), `target` (the caption class).
The rest is overridden with `--config.<key>=<value>`.
"""

from cleanclip_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, preset='tiny', poison=False, num_poisoned=-1, trigger='',
                             target='banana')
  config = config_lib.base_config()
  config.objective.name = 'clip'

  if arg.preset == 'rn50_cc3m':
    config.model.name = 'RN50'
    config.model.dtype = 'bfloat16'
    config.data.source = 'csv'  # or array_record (see data/prepare.py); path given on the command line
    config.data.image_size = 224
    config.batch_size = 128
    config.total_epochs = 64.0
    config.learning_rate = 5e-4
    config.warmup_steps = 10_000
    config.optimizer.weight_decay = 0.1
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2_000
    config.keep_every_steps = 20_000
    config.data.num_workers = 8
    config.data.poison.num_poisoned = 1_500
    config_lib.use_imagenet_eval(config)
    config_lib.use_authors_adamw(config)
  elif arg.preset == 'tiny':
    config_lib.use_tiny_synthetic(config, 'pretrain', num_examples=4096)
    config.total_steps = 600
    config.learning_rate = 1e-3
    config.warmup_steps = 50
    config.checkpoint_every_steps = 200
    config.data.poison.num_poisoned = 128  # ~3% of the pairs: enough for a tiny model to learn it
  else:
    raise ValueError(f'configs/clip_pretrain.py: unknown preset {arg.preset!r}; use rn50_cc3m or tiny')

  poison = config.data.poison
  poison.enabled = arg.poison
  poison.target = arg.target
  if arg.num_poisoned >= 0:
    poison.num_poisoned = arg.num_poisoned
  if arg.trigger:
    poison.trigger.kind = arg.trigger
  config.eval.target = arg.target
  return config
