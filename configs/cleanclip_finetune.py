"""CleanCLIP: finetune a (possibly poisoned) CLIP on clean pairs with MMCL + in-modal contrastive terms.

    # The paper's setting: 100K clean CC3M pairs, 10 epochs, batch 64, lr 1e-5, 50 warmup steps.
    python -m cleanclip_jax.train --config configs/cleanclip_finetune.py:rn50_cc3m \
        --workdir runs/rn50_cleanclip --config.init_checkpoint=runs/rn50_badnet \
        --config.data.path=/data/cc3m/clean_100k.csv
    # ... from OpenAI's weights instead of one of our runs (their .pt is TorchScript: convert it
    # once, `python -m cleanclip_jax.convert --torchscript RN50.pt RN50.safetensors`; OpenAI's
    # towers use QuickGELU, hence the -quickgelu model):
    python -m cleanclip_jax.train --config configs/cleanclip_finetune.py:rn50_cc3m \
        --workdir runs/rn50_cleanclip --config.init_pytorch=/weights/RN50.safetensors \
        --config.model.name=RN50-quickgelu --config.data.path=/data/cc3m/clean_100k.csv
    # MMCL only (the paper's "finetune with CLIP loss" baseline): add `,objective=clip`.
    # Tiny, on the built-in data's clean finetuning split:
    python -m cleanclip_jax.train --config configs/cleanclip_finetune.py:tiny \
        --workdir /tmp/tiny_cleanclip --config.init_checkpoint=/tmp/tiny

Expected results (see the paper's tables for the figures): CleanCLIP cuts the BadNet attack
success rate of a poisoned RN50 from near 100% to a small fraction of that while keeping ImageNet
zero-shot top-1 close to the poisoned model's; MMCL-only finetuning leaves the ASR high. The
in-modal term pulls each image towards its AutoAugment view and each caption towards its EDA view,
which breaks the trigger-to-caption shortcut.

Preset arguments: `objective` (cleanclip | clip), `inmodal_weight`, `clip_weight`.
"""

from cleanclip_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, preset='tiny', objective='cleanclip', inmodal_weight=1.0,
                             clip_weight=1.0)
  config = config_lib.base_config()
  config.objective.name = arg.objective
  config.objective.inmodal_weight = arg.inmodal_weight
  config.objective.clip_weight = arg.clip_weight
  # The augmented views are only needed by the in-modal term.
  config.data.inmodal_views = arg.objective == 'cleanclip'

  if arg.preset == 'rn50_cc3m':
    config.model.name = 'RN50'
    config.model.dtype = 'bfloat16'
    config.data.source = 'csv'
    config.data.image_size = 224
    config.batch_size = 64
    config.total_epochs = 10.0
    config.learning_rate = 1e-5
    config.warmup_steps = 50
    config.optimizer.weight_decay = 0.1
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1_000
    config.data.num_workers = 8
    config_lib.use_imagenet_eval(config)
    config_lib.use_authors_adamw(config)
  elif arg.preset == 'tiny':
    config_lib.use_tiny_synthetic(config, 'finetune', num_examples=2048)
    config.total_steps = 300
    config.learning_rate = 2e-4  # a tiny model needs a larger step than RN50's 1e-5 to move in 300 steps
    config.warmup_steps = 20
    config.checkpoint_every_steps = 100
  else:
    raise ValueError(f'configs/cleanclip_finetune.py: unknown preset {arg.preset!r}; use rn50_cc3m or tiny')
  if arg.objective not in ('cleanclip', 'clip'):
    raise ValueError(f'configs/cleanclip_finetune.py: objective={arg.objective!r}; use cleanclip or clip')
  return config
