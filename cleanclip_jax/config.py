"""The one schema every config file starts from, the preset-argument parser, and validation.

Config files in `configs/` call `base_config()` and change what their preset needs, so every key a
user can override on the command line (`--config.optimizer.weight_decay=0.2`) exists in every run
and has a type: ml_collections rejects unknown keys and wrong types, naming the key.

Durations are `total_steps` (or `total_epochs`, converted with the dataset size in one place:
`resolve_total_steps`).
"""

from __future__ import annotations

import re

import ml_collections

ConfigDict = ml_collections.ConfigDict
FieldReference = ml_collections.FieldReference


def parse_arg(arg: str | None, **defaults):
  """Parses a preset argument `name,key=value,...` (big_vision style) into a ConfigDict.

  The first bare word (no `=`) is the preset name, stored as `preset`. Values are converted to the
  type of their default; keys without a default are rejected so a typo fails loudly.
  """
  parsed = ConfigDict(dict(defaults, preset=defaults.get('preset', '')))
  if not arg:
    return parsed
  for part in arg.split(','):
    part = part.strip()
    if not part:
      continue
    if '=' not in part:
      parsed.preset = part
      continue
    key, value = part.split('=', 1)
    if key not in defaults:
      raise KeyError(f'unknown preset argument {key!r}; known: {sorted(defaults)}')
    default = defaults[key]
    if isinstance(default, bool):
      parsed[key] = value.lower() in ('1', 'true', 'yes')
    elif default is None:
      parsed[key] = value
    else:
      parsed[key] = type(default)(value)
  return parsed


def trigger_config() -> ConfigDict:
  """Trigger parameters shared by training-time poisoning and ASR evaluation."""
  return ConfigDict({
      # badnet_noise | badnet_solid | blended | sig | wanet
      'kind': 'badnet_noise',
      'seed': 0,
      # BadNet: side of the patch as a fraction of the image side (16/224 in the paper).
      'patch_fraction': 16 / 224,
      # random | fixed | corners (fixed = bottom-right, corners = the four corners at once)
      'location': 'random',
      'color': (255, 255, 0),  # solid patch colour
      'alpha': 0.2,  # blended
      'sig_delta': 20.0,  # SIG amplitude in [0, 255] units
      'sig_frequency': 6.0,  # SIG cycles across the width
      'wanet_k': 4,  # WaNet control grid size
      'wanet_s': 0.5,  # WaNet warping strength
      'wanet_grid_rescale': 1.0,
  })


def poison_config() -> ConfigDict:
  return ConfigDict({
      'enabled': False,
      'num_poisoned': 0,  # exact count; used when > 0
      'fraction': 0.0,  # otherwise this fraction of the examples
      'seed': 0,
      'target': 'banana',  # target class name (the caption's label and the ASR target)
      'label_consistent': False,
      'trigger': trigger_config(),
  })


def data_config() -> ConfigDict:
  return ConfigDict({
      # synthetic | csv | array_record
      'source': 'synthetic',
      'path': '',  # CSV/TSV file, or a glob / folder of .array_record shards
      'image_key': 'image',
      'caption_key': 'caption',
      'label_key': '',  # optional label column (CSV) holding a class index or name
      # The class list label names map to (as eval.classnames: imagenet | cifar10 | ... | a .txt
      # file); '' = the names in the file, sorted. The supervised objective defaults it to
      # eval.classnames, the list its head is scored against.
      'classnames': '',
      'delimiter': ',',
      'confine_paths': False,  # refuse image paths that are absolute or leave the CSV's folder
      'on_bad_image': 'skip',  # skip (counted, logged) | fail
      'image_size': 224,
      'train_transform': 'center_crop',  # center_crop | random_resized_crop
      'inmodal_views': False,  # also yield aug_image / aug_tokens (CleanCLIP)
      # The trainer cuts each batch's tokens after its longest caption (EOT), rounded up to a
      # multiple of this: the same loss and gradients, less text-tower work; each length used
      # compiles once (see text_length.py). 0 = always model.context_length (one fixed shape).
      'token_bucket': 16,
      # The trainer packs several captions into each token row of model.context_length (each on
      # its own span of columns, attention kept within a caption): the same loss and gradients,
      # the text tower run over about as many rows as the captions fill (see text_packing.py).
      # token_bucket then plays no part. Not with optimizer.accum_steps > 1 (the cut applies).
      'pack_captions': True,
      'num_workers': 0,
      'prefetch_buffer': 2,
      'shuffle': True,
      'synthetic': ConfigDict({
          'num_examples': 4096,
          'split': 'pretrain',  # pretrain | finetune | test: disjoint by construction
          'seed': 0,
      }),
      'poison': poison_config(),
  })


def eval_config() -> ConfigDict:
  return ConfigDict({
      'every_steps': 0,  # inline evaluation in the trainer; 0 = off
      # synthetic | csv | folder | tfds
      'source': 'synthetic',
      'path': '',  # CSV (image,label) or folder tree; tfds dataset name for tfds
      'split': 'test',
      'classnames': 'synthetic',  # synthetic | imagenet | cifar10 | cifar100 | path to a .txt file
      'templates': 'synthetic',  # synthetic | imagenet | cifar | simple | path to a .txt file
      'num_examples': 1000,  # 0 = all
      'batch_size': 256,
      'image_size': 224,
      'classifier': 'auto',  # auto (head if the params have one, else zero-shot) | zeroshot | head
      'asr': True,
      'linear_probe': False,
      'probe_split': 'finetune',  # the probe's training split (synthetic / tfds sources)
      'probe_path': '',  # the probe's training set for csv / folder sources ('' = eval.path)
      'probe_num_examples': 1000,  # 0 = all
      'probe_l2': 1e-4,  # L2 penalty on the probe's weights (features standardised first)
      'probe_steps': 100,  # full-batch L-BFGS iterations
      'retrieval': False,  # recall@1/5/10 between the eval images and their own captions
      # The evaluation job takes trigger and target from the checkpoint's stored config.eval (the
      # run that planted the backdoor); False uses this config's.
      'trigger_from_run': True,
      # The trigger and target for ASR; by default the trainer copies data.poison.trigger/target.
      'target': 'banana',
      'trigger': trigger_config(),
  })


def base_config() -> ConfigDict:
  """Every key of a run, with defaults; config files change values, never add keys."""
  config = ConfigDict()
  config.seed = 0
  config.total_steps = 1000
  config.total_epochs = 0.0  # when > 0, overrides total_steps (see resolve_total_steps)
  config.batch_size = 128  # global, across all processes and devices
  config.learning_rate = 5e-4
  config.warmup_steps = 100
  config.log_every_steps = 10
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.keep_every_steps = 0  # also keep every N-th step forever; 0 = off
  config.on_nan = 'stop'  # stop | skip (skip the update and count it)
  config.init_checkpoint = ''  # finetuning: a workdir or checkpoint dir whose params seed the run
  config.init_pytorch = ''  # or a PyTorch/open_clip checkpoint (.pt/.bin/.safetensors)

  config.mesh = ConfigDict({'data': -1, 'fsdp': 1})  # -1 fills with the remaining devices

  config.model = ConfigDict({
      'name': 'tiny-vit',  # see cleanclip_jax.models.list_models()
      'dtype': 'float32',  # compute dtype; params stay float32
      'remat': False,
      # The attention kernel: 'auto' (cuDNN flash attention on a GPU with bf16/fp16 compute, the
      # einsum form elsewhere), 'xla' (the einsum form everywhere), 'cudnn' (always cuDNN).
      'attention': 'auto',
      # Each transformer tower's last block computes only the row the tower pools (class token,
      # EOT): the same features with ~14% fewer FLOPs in a 6-layer tower. False computes every
      # row, as open_clip does (for A/B timing; the numbers are the same).
      'pooled_last_block': True,
      'context_length': 77,
      'tokenizer': '',  # path to a bpe merges .txt.gz; '' = the copy shipped with the package
      # Token-embedding rows; 0 = the architecture's (49,408, CLIP's BPE). A BPE of your own
      # (`tokenizer.train_bpe`) wants its own size: `Tokenizer(PATH).vocab_size`.
      'vocab_size': 0,
  })

  config.objective = ConfigDict({
      'name': 'clip',  # clip | cleanclip | siglip | supervised
      'clip_weight': 1.0,
      'inmodal_weight': 1.0,
      'sharded_loss': True,  # shard_map form: each device scores its own rows (see losses.py)
      # gather: rows vs all-gathered columns (per-device logits b_local x B_global, as open_clip);
      # ring: column blocks passed around the devices (per-device logits b_local x b_local, flat
      # when the device count grows at a fixed per-device batch).
      'sharded_loss_impl': 'gather',
      'num_classes': 0,  # supervised head size; 0 = taken from the dataset
      'freeze_tower': False,  # supervised: train only the linear head
  })

  config.optimizer = ConfigDict({
      'b1': 0.9,
      'b2': 0.98,
      'eps': 1e-6,
      'weight_decay': 0.1,
      'grad_clip_norm': 1.0,  # 0 = off
      'schedule': 'cosine',  # cosine | constant
      'accum_steps': 1,  # gradient accumulation over micro-batches
      # (regex, multiplier) pairs on '/'-joined param paths; multiplier 0 freezes. First match wins.
      'lr_rules': (),
  })

  config.data = data_config()
  config.eval = eval_config()
  return config


def use_tiny_synthetic(config: ConfigDict, split: str, num_examples: int) -> ConfigDict:
  """The CPU-sized setting every config file's `tiny` preset shares: tiny-vit at 32 px on the
  built-in synthetic data, batch 64, a log line per step, evaluated on 512 test images."""
  config.model.name = 'tiny-vit'
  config.model.context_length = 32  # synthetic captions are at most ~18 tokens
  config.data.source = 'synthetic'
  config.data.synthetic.split = split
  config.data.synthetic.num_examples = num_examples
  config.data.image_size = 32
  config.batch_size = 64
  config.log_every_steps = 1
  config.eval.source = 'synthetic'
  config.eval.split = 'test'
  config.eval.num_examples = 512
  config.eval.batch_size = 128
  config.eval.image_size = 32
  return config


def use_authors_adamw(config: ConfigDict) -> ConfigDict:
  """AdamW as the CleanCLIP authors' code runs it (their parser's defaults: beta2 0.999, eps 1e-8;
  no gradient clipping), rather than open_clip's beta2 0.98, eps 1e-6 and the clipping at 1.0
  of `base_config`. (Their code decays the embeddings too; this project does not, see optim.py.)"""
  config.optimizer.b1, config.optimizer.b2, config.optimizer.eps = 0.9, 0.999, 1e-8
  config.optimizer.grad_clip_norm = 0.0
  return config


def use_imagenet_eval(config: ConfigDict) -> ConfigDict:
  """The paper's evaluation: zero-shot + ASR on all 50,000 ImageNet-1K validation images (TFDS
  `imagenet2012`, prepared locally), CLIP's 1,000 class names and 80 templates, 224 px."""
  config.eval.source = 'tfds'
  config.eval.path = 'imagenet2012'
  config.eval.split = 'validation'
  config.eval.classnames = 'imagenet'
  config.eval.templates = 'imagenet'
  config.eval.num_examples = 0
  config.eval.image_size = 224
  return config


def resolve_total_steps(config: ConfigDict, num_examples: int) -> int:
  """The one place epochs become steps."""
  if config.total_epochs and config.total_epochs > 0:
    return max(1, int(config.total_epochs * num_examples // config.batch_size))
  return int(config.total_steps)


class ConfigError(ValueError):
  """A config that cannot run; the message says which key and how to fix it."""


def validate(config: ConfigDict, num_devices: int) -> None:
  """Checks a config against the devices before anything is compiled."""
  data, fsdp = config.mesh.data, config.mesh.fsdp
  if fsdp < 1 and data < 1:
    raise ConfigError('mesh: at most one of mesh.data / mesh.fsdp may be -1')
  fixed = (data if data > 0 else 1) * (fsdp if fsdp > 0 else 1)
  if fixed > num_devices or num_devices % fixed:
    raise ConfigError(
        f'mesh: data={data} x fsdp={fsdp} needs {fixed} devices but {num_devices} are available; '
        f'set --config.mesh.data / --config.mesh.fsdp so their product divides {num_devices} '
        '(-1 fills the rest).')
  if data > 0 and fsdp > 0 and fixed != num_devices:
    raise ConfigError(
        f'mesh: data={data} x fsdp={fsdp} uses {fixed} of the {num_devices} devices; the mesh takes '
        f'them all: set one axis to -1 (--config.mesh.data=-1) or make the product {num_devices}.')
  accum = max(1, config.optimizer.accum_steps)
  if config.batch_size % (num_devices * accum):
    raise ConfigError(
        f'batch_size={config.batch_size} is not divisible by the {num_devices} devices x '
        f'optimizer.accum_steps={accum}; use a multiple of {num_devices * accum} '
        '(--config.batch_size=N).')
  if config.objective.name not in ('clip', 'cleanclip', 'siglip', 'supervised'):
    raise ConfigError(f'objective.name={config.objective.name!r}: use clip, cleanclip, siglip or supervised')
  poison = config.data.poison
  if config.objective.name == 'supervised' and poison.enabled and not poison.label_consistent:
    # The supervised loss reads labels, which dirty-label poisoning leaves as they are (it swaps
    # captions): the trigger would be stamped on correctly labelled images and plant nothing.
    raise ConfigError('data.poison with objective.name=supervised: poisoning swaps captions, which '
                      'the supervised loss does not read; poison a CLIP pretraining, or use '
                      '--config.data.poison.label_consistent=True')
  if config.data.source in ('csv', 'array_record') and not config.data.path:
    raise ConfigError(f'data.source={config.data.source!r} needs --config.data.path=PATH')
  if config.data.source == 'synthetic' and config.data.path:
    # The synthetic source generates its data: the file would be ignored and the run train on
    # generated images instead.
    raise ConfigError(f'data.path={config.data.path!r} is set but data.source=\'synthetic\' '
                      'generates its data and reads no file; say what the path holds with '
                      '--config.data.source=csv|array_record (or drop data.path)')
  check_eval_source(config.eval)
  if int(config.data.token_bucket) < 0:
    raise ConfigError(f'data.token_bucket={config.data.token_bucket}: use 0 (off) or a positive length multiple')
  if config.on_nan not in ('stop', 'skip'):
    raise ConfigError(f'on_nan={config.on_nan!r}: use stop or skip')
  for key in ('log_every_steps', 'checkpoint_every_steps'):
    if int(config[key]) < 1:  # unlike eval.every_steps / keep_every_steps, 0 is not "off" here
      raise ConfigError(f'{key}={config[key]}: use a positive number of steps (--config.{key}=N)')
  keep_every = int(config.get('keep_every_steps', 0))
  if keep_every > 0 and keep_every % int(config.checkpoint_every_steps):
    # Only saved steps can be kept: every keep_every_steps-th *saved* step would in fact be every
    # lcm(keep_every_steps, checkpoint_every_steps)-th.
    raise ConfigError(
        f'keep_every_steps={keep_every} is not a multiple of checkpoint_every_steps='
        f'{config.checkpoint_every_steps}, so fewer steps would be kept than it says; use a '
        f'multiple (--config.keep_every_steps=N).')
  if config.optimizer.schedule not in ('cosine', 'constant'):
    raise ConfigError(f'optimizer.schedule={config.optimizer.schedule!r}: use cosine or constant')
  impl = config.objective.get('sharded_loss_impl', 'gather')
  if impl not in ('gather', 'ring'):
    raise ConfigError(f'objective.sharded_loss_impl={impl!r}: use gather or ring')
  for rule in config.optimizer.lr_rules:
    if len(rule) != 2:
      raise ConfigError(f'optimizer.lr_rules: {rule!r} is not a (regex, multiplier) pair')
    try:
      re.compile(rule[0])
    except (re.error, TypeError) as e:
      raise ConfigError(f'optimizer.lr_rules: bad regex {rule[0]!r}: {e}') from None
    if not isinstance(rule[1], (int, float)) or rule[1] < 0:
      raise ConfigError(f'optimizer.lr_rules: multiplier {rule[1]!r} for {rule[0]!r} must be a number >= 0')
  from cleanclip_jax import models  # pylint: disable=import-outside-toplevel (jax, flax)
  try:
    model_cfg = models.get_config(config.model.name)
  except ValueError as e:
    raise ConfigError(f'model.name: {e}') from None
  if config.model.get('tokenizer', ''):
    from cleanclip_jax import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
    try:
      needed = tokenizer_lib.get_tokenizer(config.model.tokenizer).vocab_size
    except (OSError, ValueError) as e:
      raise ConfigError(f'model.tokenizer={config.model.tokenizer!r}: {e}') from None
    rows = int(config.model.get('vocab_size', 0)) or model_cfg.text.vocab_size
    if needed > rows:  # ids past the embedding would give NaN text features
      raise ConfigError(f'model.tokenizer has {needed} tokens but the model {rows} token rows; set '
                        f'--config.model.vocab_size={needed}')
  model_size = model_cfg.vision.image_size
  if int(config.data.image_size) != model_size:
    # The towers' position embeddings fix it; otherwise the first step fails, after set-up.
    raise ConfigError(f'data.image_size={config.data.image_size} but model {config.model.name} takes '
                      f'{model_size}px images; use --config.data.image_size={model_size}')
  if config.model.attention not in models.ATTENTION_IMPLS:
    raise ConfigError(f'model.attention={config.model.attention!r}: use one of {models.ATTENTION_IMPLS}')
  if config.model.attention == 'cudnn' and models.resolve_dtype(config.model.dtype).itemsize != 2:
    raise ConfigError(f'model.attention=cudnn needs a 16-bit compute dtype; model.dtype is '
                      f'{config.model.dtype!r} (--config.model.dtype=bfloat16)')


def check_eval_source(eval_cfg: ConfigDict) -> None:
  """Refuses an eval set path the source would ignore (the evaluation job calls this too, through
  `pipeline.eval_source`, since it does not run `validate`)."""
  if eval_cfg.source != 'synthetic':
    return
  for key in ('path', 'probe_path'):
    if eval_cfg.get(key, ''):
      # The synthetic test split would be scored in its place, under the path's name.
      raise ConfigError(f'eval.{key}={eval_cfg[key]!r} is set but eval.source=\'synthetic\' '
                        'generates its images and reads no file; say what the path holds with '
                        f'--config.eval.source=csv|folder|tfds (or drop eval.{key})')


def configs_dir():
  """The repository's `configs/` folder (next to the package in a source checkout)."""
  import pathlib
  return pathlib.Path(__file__).resolve().parent.parent / 'configs'


def load_config(spec: str) -> ConfigDict:
  """Loads `path/to/file.py[:arg]` the way `--config` does, for in-process callers (the demo).

  A bare file name (`clip_pretrain.py:tiny`) is looked up in the repository's `configs/` folder.
  """
  import importlib.util
  import pathlib
  path, _, arg = spec.partition(':')
  file = pathlib.Path(path)
  if not file.exists() and (configs_dir() / file.name).exists():
    file = configs_dir() / file.name
  if not file.exists():
    raise FileNotFoundError(f'config file {path!r} not found (looked in . and {configs_dir()})')
  module_spec = importlib.util.spec_from_file_location(f'_cleanclip_config_{file.stem}', file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
