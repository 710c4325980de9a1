"""OpenAI CLIP / open_clip PyTorch checkpoints -> Flax params for `models.CLIP`.

Reads a state dict from `.safetensors`, or from `.pt`/`.bin` with `torch.load(weights_only=True)`
(no arbitrary unpickling; open_clip training checkpoints `{'state_dict': ...}` and DDP `module.`
prefixes are handled). OpenAI's released `.pt` files are TorchScript archives, whose loading runs
code from the file; they are refused with the one-line conversion to run once on a trusted machine:

    python -m cleanclip_jax.convert --torchscript ViT-B-32.pt ViT-B-32.safetensors

The architecture is inferred from tensor shapes when no model is given (activation: QuickGELU by
default, as OpenAI's weights need; open_clip's non-`-quickgelu` weights need `quick_gelu=False`).
BatchNorm running statistics are folded into the ResNet's frozen affine layers.
"""

from __future__ import annotations

import argparse
import os
import re
import zipfile
from typing import Any, Mapping

import numpy as np
from absl import logging

from cleanclip_jax.models.registry import MODELS, ModelConfig, TextConfig, VisionConfig

_BN_EPS = 1e-5
# Keys that carry no parameters (buffers, OpenAI's metadata scalars).
_IGNORED = re.compile(r'(^|\.)(attn_mask|num_batches_tracked|input_resolution|context_length|vocab_size)$')


class CheckpointError(ValueError):
  """A checkpoint that cannot be imported; the message names the file and key."""


# ----------------------------------------------------------------------------- reading


def _is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as zf:
    return any(n.endswith('/constants.pkl') or '/code/' in n for n in zf.namelist())


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The checkpoint's tensors as float32 numpy arrays, keys without a `module.` prefix."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint not found: {path}')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    raw: Mapping[str, Any] = load_file(path)
  else:
    if _is_torchscript(path):
      raise CheckpointError(
          f'{path} is a TorchScript archive (OpenAI\'s release format); loading it executes code '
          'from the file, so it is not read here. Convert it once on a trusted machine:\n'
          f'  python -m cleanclip_jax.convert --torchscript {path} {os.path.splitext(path)[0]}.safetensors')
    import torch  # pylint: disable=import-outside-toplevel
    try:
      raw = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle errors come in many types
      raise CheckpointError(f'{path}: torch.load(weights_only=True) failed ({e}); save a plain '
                            'state_dict or a .safetensors file') from e
    for wrapper in ('state_dict', 'model'):
      if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
        raw = raw[wrapper]
    if not isinstance(raw, Mapping):
      raise CheckpointError(f'{path}: expected a state dict, got {type(raw).__name__}')
  state = {}
  for key, value in raw.items():
    key = key[len('module.'):] if key.startswith('module.') else key
    if _IGNORED.search(key):
      continue
    if hasattr(value, 'detach'):
      value = value.detach().float().cpu().numpy()
    state[key] = np.asarray(value, np.float32)
  return state


# ----------------------------------------------------------------------------- architecture


def _count(state: Mapping[str, np.ndarray], pattern: str) -> int:
  rx = re.compile(pattern)
  return len({m.group(1) for k in state if (m := rx.match(k))})


# Vision widths whose released models do not use 64-wide heads (open_clip's ViT-H-14, ViT-g-14 and
# ViT-bigG-14: 16 heads each). The weights do not record the head count, and a wrong one still
# loads (the q/k/v reshape follows it) but computes other features; every text tower uses 64.
_VISION_HEAD_WIDTHS = {1280: 80, 1408: 88, 1664: 104}


def _mlp_ratio(hidden: int, width: int) -> float:
  # The model builds int(width * ratio) hidden units. A whole ratio is exact (and equals the
  # registry's, so `config_name` finds the model); otherwise hidden / width can land just below
  # an integer in floating point (6144 / 1408 * 1408 = 6143.99...), so aim at the middle.
  if hidden % width == 0:
    return float(hidden // width)
  return (hidden + 0.5) / width


def infer_config(state: Mapping[str, np.ndarray], quick_gelu: bool = True) -> ModelConfig:
  """The architecture a state dict was saved from (OpenAI/open_clip key layout)."""
  try:
    text_width = state['ln_final.weight'].shape[0]
    text = TextConfig(
        context_length=state['positional_embedding'].shape[0],
        vocab_size=state['token_embedding.weight'].shape[0], width=text_width,
        heads=text_width // 64, layers=_count(state, r'transformer\.resblocks\.(\d+)\.'),
        mlp_ratio=_mlp_ratio(state['transformer.resblocks.0.mlp.c_fc.weight'].shape[0], text_width))
    embed_dim = state['text_projection'].shape[1]
    if 'visual.proj' in state:
      width, _, patch, _ = state['visual.conv1.weight'].shape
      grid = int(round((state['visual.positional_embedding'].shape[0] - 1) ** 0.5))
      vision = VisionConfig(
          image_size=grid * patch, layers=_count(state, r'visual\.transformer\.resblocks\.(\d+)\.'),
          width=width, patch_size=patch, head_width=_VISION_HEAD_WIDTHS.get(width, 64),
          mlp_ratio=_mlp_ratio(state['visual.transformer.resblocks.0.mlp.c_fc.weight'].shape[0], width))
    else:
      layers = tuple(_count(state, rf'visual\.layer{s}\.(\d+)\.') for s in range(1, 5))
      grid = int(round((state['visual.attnpool.positional_embedding'].shape[0] - 1) ** 0.5))
      vision = VisionConfig(image_size=grid * 32, layers=layers,
                            width=state['visual.layer1.0.conv1.weight'].shape[0], patch_size=None)
  except KeyError as e:
    raise CheckpointError(f'not an OpenAI/open_clip CLIP state dict: missing key {e}') from e
  return ModelConfig(embed_dim, vision, text, quick_gelu)


def config_name(config: ModelConfig) -> str | None:
  """The registry name of an architecture, if it has one."""
  return next((name for name, cfg in MODELS.items() if cfg == config), None)


# ----------------------------------------------------------------------------- conversion


def _linear(w):  # torch Linear weight [out, in] -> flax kernel [in, out]
  return w.T


def _conv(w):  # torch [out, in, kh, kw] -> flax [kh, kw, in, out]
  return w.transpose(2, 3, 1, 0)


def _attention(q_w, k_w, v_w, q_b, k_b, v_b, out_w, out_b, heads):
  width = q_w.shape[1]
  head_dim = q_w.shape[0] // heads
  params = {}
  for name, w, b in (('query', q_w, q_b), ('key', k_w, k_b), ('value', v_w, v_b)):
    params[name] = {'kernel': w.T.reshape(width, heads, head_dim), 'bias': b.reshape(heads, head_dim)}
  params['out'] = {'kernel': out_w.T.reshape(heads, head_dim, out_w.shape[0]), 'bias': out_b}
  return params


def _ln(state, prefix):
  return {'scale': state[f'{prefix}.weight'], 'bias': state[f'{prefix}.bias']}


def _transformer(state, prefix, heads):
  blocks = {}
  for i in range(_count(state, rf'{re.escape(prefix)}\.resblocks\.(\d+)\.')):
    p = f'{prefix}.resblocks.{i}'
    q_w, k_w, v_w = np.split(state[f'{p}.attn.in_proj_weight'], 3)
    q_b, k_b, v_b = np.split(state[f'{p}.attn.in_proj_bias'], 3)
    blocks[f'resblocks_{i}'] = {
        'ln_1': _ln(state, f'{p}.ln_1'),
        'attn': _attention(q_w, k_w, v_w, q_b, k_b, v_b, state[f'{p}.attn.out_proj.weight'],
                           state[f'{p}.attn.out_proj.bias'], heads),
        'ln_2': _ln(state, f'{p}.ln_2'),
        'mlp': {name: {'kernel': _linear(state[f'{p}.mlp.{name}.weight']),
                       'bias': state[f'{p}.mlp.{name}.bias']} for name in ('c_fc', 'c_proj')},
    }
  return blocks


def _frozen_bn(state, prefix):
  scale = state[f'{prefix}.weight'] / np.sqrt(state[f'{prefix}.running_var'] + _BN_EPS)
  return {'scale': scale, 'bias': state[f'{prefix}.bias'] - state[f'{prefix}.running_mean'] * scale}


def _resnet(state, vision: VisionConfig):
  params = {}
  for i in (1, 2, 3):
    params[f'conv{i}'] = {'kernel': _conv(state[f'visual.conv{i}.weight'])}
    params[f'bn{i}'] = _frozen_bn(state, f'visual.bn{i}')
  for stage, num_blocks in enumerate(vision.layers, start=1):
    for i in range(num_blocks):
      p = f'visual.layer{stage}.{i}'
      block = {}
      for j in (1, 2, 3):
        block[f'conv{j}'] = {'kernel': _conv(state[f'{p}.conv{j}.weight'])}
        block[f'bn{j}'] = _frozen_bn(state, f'{p}.bn{j}')
      if f'{p}.downsample.0.weight' in state:
        block['downsample_conv'] = {'kernel': _conv(state[f'{p}.downsample.0.weight'])}
        block['downsample_bn'] = _frozen_bn(state, f'{p}.downsample.1')
      params[f'layer{stage}_{i}'] = block
  a = 'visual.attnpool'
  params['attnpool'] = {
      'positional_embedding': state[f'{a}.positional_embedding'],
      'attn': _attention(*(state[f'{a}.{n}_proj.weight'] for n in 'qkv'),
                         *(state[f'{a}.{n}_proj.bias'] for n in 'qkv'),
                         state[f'{a}.c_proj.weight'], state[f'{a}.c_proj.bias'], vision.heads),
  }
  return params


def _vit(state, vision: VisionConfig):
  return {
      'conv1': {'kernel': _conv(state['visual.conv1.weight'])},
      'class_embedding': state['visual.class_embedding'],
      'positional_embedding': state['visual.positional_embedding'],
      'ln_pre': _ln(state, 'visual.ln_pre'),
      'transformer': _transformer(state, 'visual.transformer', vision.heads),
      'ln_post': _ln(state, 'visual.ln_post'),
      'proj': state['visual.proj'],
  }


class _TrackedDict(dict):
  """A dict that records which keys were read, to report checkpoint keys the model ignores."""

  def __init__(self, *args):
    super().__init__(*args)
    self.used = set()

  def __getitem__(self, key):
    self.used.add(key)
    return super().__getitem__(key)


def convert_state_dict(state: Mapping[str, np.ndarray], config: ModelConfig) -> dict:
  """OpenAI/open_clip state dict -> the `params` tree of `CLIP(config)` (numpy float32).

  A shorter model context length keeps the first positions of the text positional embedding.
  """
  if 'text_projection.weight' in state:
    raise CheckpointError('linear text projections with a bias (open_clip proj_bias) are not supported')
  tracked = _TrackedDict(state)
  try:
    positional = tracked['positional_embedding']
    if config.text.context_length > positional.shape[0]:
      raise CheckpointError(f'model context_length {config.text.context_length} exceeds the '
                            f'checkpoint\'s {positional.shape[0]}')
    params = {
        'visual': _resnet(tracked, config.vision) if config.vision.is_resnet else _vit(tracked, config.vision),
        'text': {
            'token_embedding': {'embedding': tracked['token_embedding.weight']},
            'positional_embedding': positional[:config.text.context_length],
            'transformer': _transformer(tracked, 'transformer', config.text.heads),
            'ln_final': _ln(tracked, 'ln_final'),
            'text_projection': tracked['text_projection'],
        },
        'logit_scale': tracked['logit_scale'].reshape(()),
    }
  except KeyError as e:
    raise CheckpointError(f'checkpoint lacks {e} needed by this architecture') from e
  unused = sorted(set(state) - tracked.used)
  if unused:
    raise CheckpointError(f'checkpoint keys not used by the model (another architecture?): {unused[:10]}'
                          + (f' and {len(unused) - 10} more' if len(unused) > 10 else ''))
  return params


def check_params(params, model) -> None:
  """Raises CheckpointError naming the first parameter whose path or shape differs from `model`'s."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from cleanclip_jax import models  # pylint: disable=import-outside-toplevel
  expected = models.unbox(jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, model.image_size, model.image_size, 3)),
      jnp.zeros((1, model.context_length), jnp.int32)))['params']
  flat_expected = {jax.tree_util.keystr(k): v.shape
                   for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  flat_got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
  for key in sorted(set(flat_expected) | set(flat_got)):
    if flat_expected.get(key) != flat_got.get(key):
      raise CheckpointError(f'parameter {key}: model expects shape {flat_expected.get(key)}, '
                            f'checkpoint gives {flat_got.get(key)}')


def load_pretrained(path: str, model=None, *, quick_gelu: bool | None = None, dtype: Any = 'float32',
                    remat: bool = False):
  """(CLIP module, params) from an OpenAI/open_clip checkpoint.

  `model`: None (inferred from the weights), a registry name, or a `CLIP` module. `quick_gelu`:
  the activation the weights were trained with (OpenAI's: QuickGELU, the default when the model is
  inferred; most open_clip-trained ones: GELU). The weights do not record it, so a named model
  whose activation differs from an explicit `quick_gelu` is refused, and loading into a GELU model
  is logged (OpenAI's weights there shift every feature; use the `-quickgelu` name). `dtype`,
  `remat` apply when the model is built here.
  """
  from cleanclip_jax import models  # pylint: disable=import-outside-toplevel
  state = read_state_dict(path)
  if model is None:
    config = infer_config(state, True if quick_gelu is None else quick_gelu)
    model = models.CLIP(config, dtype=models.resolve_dtype(dtype), remat=remat)
  else:
    if isinstance(model, str):
      model = models.create_model(model, dtype=dtype, remat=remat)
    uses_quick_gelu = getattr(getattr(model, 'clip', model).config, 'quick_gelu', None)
    if quick_gelu is not None and uses_quick_gelu is not None and quick_gelu != uses_quick_gelu:
      raise CheckpointError(
          f'{path}: quick_gelu={quick_gelu} but the model uses '
          f'{"QuickGELU" if uses_quick_gelu else "GELU"}; name the model with (or without) '
          '"-quickgelu" to match the weights')
    if uses_quick_gelu is False and quick_gelu is None:
      logging.warning('%s: loading into a model with exact GELU; weights trained with QuickGELU '
                      '(all of OpenAI\'s) need the "-quickgelu" model name', path)
  try:
    params = convert_state_dict(state, model.config)
    check_params(params, model)
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}') from e
  return model, params


def _torchscript_to_safetensors(src: str, dst: str) -> None:
  """Runs TorchScript loading (code from the file): only for archives you trust."""
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  module = torch.jit.load(src, map_location='cpu')
  state = {k: v.float().contiguous() for k, v in module.state_dict().items()
           if not _IGNORED.search(k)}
  save_file(state, dst)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description='Convert a trusted OpenAI TorchScript CLIP archive '
                                   'to .safetensors (loading TorchScript runs code from the file).')
  parser.add_argument('--torchscript', required=True, help='OpenAI .pt TorchScript archive')
  parser.add_argument('output', help='output .safetensors path')
  args = parser.parse_args(argv)
  _torchscript_to_safetensors(args.torchscript, args.output)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
