"""Evaluation presets for `python -m cleanclip_jax.evaluate` (zero-shot accuracy, ASR, ...).

    # ImageNet-1K validation zero-shot top-1/top-5 + ASR, as in the CleanCLIP paper
    python -m cleanclip_jax.evaluate --config configs/eval.py:imagenet --workdir DIR
    #   ... from a folder tree (class folders in ImageNet's synset order) or a CSV instead of TFDS:
    python -m cleanclip_jax.evaluate --config configs/eval.py:imagenet \
        --config.eval.source=folder --config.eval.path=/data/imagenet/val --workdir DIR
    # CIFAR-10 / CIFAR-100 test sets (TFDS), and the built-in synthetic test split
    python -m cleanclip_jax.evaluate --config configs/eval.py:cifar10 --workdir DIR
    python -m cleanclip_jax.evaluate --config configs/eval.py:tiny --workdir DIR --follow

The model comes from the config stored with each checkpoint; this config only says what to
evaluate on (`config.eval`) and how to lay out devices (`config.mesh`). By default the trigger and
target are also taken from the checkpoint's config (`eval.trigger_from_run`), i.e. the backdoor
the run planted; `--config.eval.trigger_from_run=False --config.eval.trigger.kind=blended ...`
measures another one. Preset arguments: `imagenet,num_examples=10000,batch_size=512`.
"""

from cleanclip_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, preset='tiny', num_examples=-1, batch_size=-1)
  config = config_lib.base_config()
  ev = config.eval
  if arg.preset == 'imagenet':
    config_lib.use_imagenet_eval(config)  # all 50,000 validation images
    ev.batch_size = 1024
    ev.probe_split = 'train'
    ev.probe_num_examples = 50_000
  elif arg.preset in ('cifar10', 'cifar100'):
    ev.source = 'tfds'
    ev.path = arg.preset
    ev.split = 'test'
    ev.classnames = arg.preset
    ev.templates = 'cifar'
    ev.num_examples = 0  # all 10,000
    ev.batch_size = 1024
    ev.probe_split = 'train'
    ev.probe_num_examples = 10_000
    ev.target = 'airplane' if arg.preset == 'cifar10' else 'apple'
  elif arg.preset == 'tiny':
    ev.source = 'synthetic'
    ev.split = 'test'
    ev.classnames = 'synthetic'
    ev.templates = 'synthetic'
    ev.num_examples = 512
    ev.batch_size = 128
    ev.image_size = 32
    ev.probe_split = 'finetune'
    ev.probe_num_examples = 1024
    ev.linear_probe = True
    ev.retrieval = True
  else:
    raise ValueError(f'configs/eval.py: unknown preset {arg.preset!r}; use imagenet, cifar10, '
                     'cifar100 or tiny')
  if arg.num_examples >= 0:
    ev.num_examples = arg.num_examples
  if arg.batch_size > 0:
    ev.batch_size = arg.batch_size
  return config
