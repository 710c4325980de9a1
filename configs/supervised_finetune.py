"""Supervised finetuning: a linear head on the CLIP image tower, trained with cross-entropy on labels.

    # ImageNet-style labelled data as a CSV (image path, class index or name), e.g. a 50K subset:
    python -m cleanclip_jax.train --config configs/supervised_finetune.py:imagenet \
        --workdir runs/rn50_supervised --config.init_checkpoint=runs/rn50_badnet \
        --config.data.path=/data/imagenet/train_50k.csv
    # Only the head (a linear probe trained by SGD): add `--config.objective.freeze_tower=True`.
    # Tiny, on the built-in data's labelled finetuning split:
    python -m cleanclip_jax.train --config configs/supervised_finetune.py:tiny \
        --workdir /tmp/tiny_supervised --config.init_checkpoint=/tmp/tiny

Expected results: the CleanCLIP paper finds that supervised finetuning of the whole image tower
on clean labelled data also removes most of a BadNet backdoor (ASR falls towards chance), at the
cost of the model's zero-shot generality; with a frozen tower (a linear probe) the poisoned
features are unchanged, so expect the backdoor to survive.
Evaluation uses the head (`eval.classifier='auto'`), so `top1` / `asr` are the head's.

Preset arguments: `freeze_tower` (train only the head).
"""

from cleanclip_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, preset='tiny', freeze_tower=False)
  config = config_lib.base_config()
  config.objective.name = 'supervised'
  config.objective.freeze_tower = arg.freeze_tower

  if arg.preset == 'imagenet':
    config.model.name = 'RN50'
    config.model.dtype = 'bfloat16'
    config.data.source = 'csv'
    config.data.label_key = 'label'
    config.data.image_size = 224
    config.data.train_transform = 'random_resized_crop'
    config.objective.num_classes = 1000
    config.batch_size = 64
    config.total_epochs = 10.0
    config.learning_rate = 1e-5
    config.warmup_steps = 50
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1_000
    config.data.num_workers = 8
    config_lib.use_imagenet_eval(config)
  elif arg.preset == 'tiny':
    # The finetune split is labelled: every synthetic example has its class.
    config_lib.use_tiny_synthetic(config, 'finetune', num_examples=2048)
    config.objective.num_classes = 0  # taken from the data set (12 classes)
    config.total_steps = 300
    config.learning_rate = 2e-4
    config.warmup_steps = 20
    config.checkpoint_every_steps = 100
  else:
    raise ValueError(f'configs/supervised_finetune.py: unknown preset {arg.preset!r}; use imagenet or tiny')
  return config
