"""Named CLIP architectures (open_clip's names and hyperparameters) and the tiny ones for tests.

A `-quickgelu` suffix selects OpenAI's QuickGELU activation (what OpenAI's released weights were
trained with); the plain open_clip names use exact GELU.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A ViT when `layers` is an int, a ModifiedResNet when it is a 4-tuple of block counts."""
  image_size: int = 224
  layers: int | tuple[int, int, int, int] = 12
  width: int = 768
  patch_size: int | None = 16  # ViT only
  head_width: int = 64  # heads = width // head_width (ResNet: width * 32 // head_width)
  mlp_ratio: float = 4.0

  @property
  def is_resnet(self) -> bool:
    return isinstance(self.layers, tuple)

  @property
  def heads(self) -> int:
    return (self.width * 32 if self.is_resnet else self.width) // self.head_width


@dataclasses.dataclass(frozen=True)
class TextConfig:
  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  heads: int = 8
  layers: int = 12
  mlp_ratio: float = 4.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  embed_dim: int
  vision: VisionConfig
  text: TextConfig
  quick_gelu: bool = False


def _rn(embed_dim, layers, width, image_size, text_width, text_heads):
  return ModelConfig(embed_dim, VisionConfig(image_size, tuple(layers), width, None),
                     TextConfig(width=text_width, heads=text_heads))


def _vit(embed_dim, layers, width, patch, text_width, text_heads, image_size=224):
  return ModelConfig(embed_dim, VisionConfig(image_size, layers, width, patch),
                     TextConfig(width=text_width, heads=text_heads))


_BASE = {
    'RN50': _rn(1024, (3, 4, 6, 3), 64, 224, 512, 8),
    'RN101': _rn(512, (3, 4, 23, 3), 64, 224, 512, 8),
    'RN50x4': _rn(640, (4, 6, 10, 6), 80, 288, 640, 10),
    'ViT-B-32': _vit(512, 12, 768, 32, 512, 8),
    'ViT-B-16': _vit(512, 12, 768, 16, 512, 8),
    'ViT-L-14': _vit(768, 24, 1024, 14, 768, 12),
}

MODELS: dict[str, ModelConfig] = {}
for _name, _cfg in _BASE.items():
  MODELS[_name] = _cfg
  MODELS[f'{_name}-quickgelu'] = dataclasses.replace(_cfg, quick_gelu=True)

# Small models for tests, smoke runs and benchmarks (the full 49408-token BPE vocabulary).
MODELS['tiny-vit'] = ModelConfig(
    128, VisionConfig(image_size=32, layers=4, width=128, patch_size=4, head_width=32),
    TextConfig(width=128, heads=4, layers=4))
MODELS['tiny-rn'] = ModelConfig(
    128, VisionConfig(image_size=32, layers=(1, 1, 1, 1), width=16, patch_size=None),
    TextConfig(width=128, heads=4, layers=4))
MODELS['bench-vit'] = ModelConfig(
    256, VisionConfig(image_size=64, layers=6, width=256, patch_size=8),
    TextConfig(width=256, heads=4, layers=6))
# The demo study's model (`configs/demo.py`): a few minutes per stage on 2 CPU cores. 16 patches of
# 8 px at 32 px (a 3 px BadNet patch falls inside one or two); the synthetic captions are <= 18
# tokens, so the demo runs it with context length 24.
MODELS['demo-vit'] = ModelConfig(
    64, VisionConfig(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
    TextConfig(width=64, heads=2, layers=2))


def list_models() -> list[str]:
  return sorted(MODELS)


_TOP_LEVEL = ('embed_dim', 'quick_gelu')
_SHORTHANDS = {'image_size': 'vision_image_size', 'patch_size': 'vision_patch_size',
               'vocab_size': 'text_vocab_size', 'context_length': 'text_context_length'}


def get_config(name: str, **overrides) -> ModelConfig:
  """The named config with overrides: `embed_dim`, `quick_gelu`, `image_size`, `patch_size`,
  `vocab_size`, `context_length`, or any field as `vision_<field>` / `text_<field>`."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; known: {", ".join(list_models())}')
  cfg = MODELS[name]
  top, vision, text = {}, {}, {}
  vision_fields = {f.name for f in dataclasses.fields(VisionConfig)}
  text_fields = {f.name for f in dataclasses.fields(TextConfig)}
  for key, value in overrides.items():
    full = _SHORTHANDS.get(key, key)
    if full in _TOP_LEVEL:
      top[full] = value
    elif full.startswith('vision_') and full[len('vision_'):] in vision_fields:
      vision[full[len('vision_'):]] = tuple(value) if full == 'vision_layers' and not isinstance(value, int) else value
    elif full.startswith('text_') and full[len('text_'):] in text_fields:
      text[full[len('text_'):]] = value
    else:
      raise ValueError(
          f'unknown model override {key!r} for {name!r}; use {", ".join(_TOP_LEVEL + tuple(_SHORTHANDS))}'
          ' or vision_<field> / text_<field> with fields '
          f'{sorted(vision_fields)} / {sorted(text_fields)}')
  return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vision),
                             text=dataclasses.replace(cfg.text, **text), **top)
