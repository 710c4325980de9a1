"""Parity with open_clip: the same weights, imported through `load_pretrained`, give the same
features. open_clip models are randomly initialised here (nothing is downloaded); small custom
configs of both tower families keep it fast, plus one full-size named architecture (ViT-B-32)."""

import dataclasses
import os

import numpy as np
import pytest

from torch_ref import import_open_clip, torch

open_clip = import_open_clip()

import cleanclip_jax as cc  # pylint: disable=wrong-import-position
from cleanclip_jax import convert, models  # pylint: disable=wrong-import-position

CAPTIONS = ['a photo of a banana', 'two dogs playing in the snow, 4k photo', '']
# Head width 64 as in every released CLIP: the head count is not in the weights, so import assumes it.
TEXT_CFG = dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2)
SMALL_VIT = dict(embed_dim=48, vision_cfg=dict(image_size=32, layers=2, width=128, patch_size=8),
                 text_cfg=TEXT_CFG)
SMALL_RN = dict(embed_dim=48, vision_cfg=dict(image_size=64, layers=[1, 2, 1, 1], width=16),
                text_cfg=TEXT_CFG)


def _randomise(model, seed):
  """open_clip's init leaves norms at 1/0, biases at 0 and bn3 at 0: perturb them so every
  parameter and BatchNorm statistic reaches the comparison."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
      if tensor.ndim != 1 or not tensor.is_floating_point():
        continue
      noise = torch.randn(tensor.shape, generator=gen)
      if name.endswith('running_var'):
        tensor.copy_(0.5 + noise.abs())
      elif name.endswith('.weight') and any(n in name for n in ('bn', 'ln', 'downsample.1')):
        tensor.copy_(1.0 + 0.1 * noise)
      else:
        tensor.copy_(0.05 * noise)
  return model.eval()


def _compare(torch_model, path, quick_gelu, image_size, batch=2, atol=1e-4):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
  tokens = cc.tokenize(CAPTIONS[:batch])
  with torch.no_grad():
    ref_img = torch_model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    ref_txt = torch_model.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy()
  model, params = cc.load_pretrained(path, quick_gelu=quick_gelu)
  img = model.apply({'params': params}, images, normalize=False, method=model.encode_image)
  txt = model.apply({'params': params}, tokens, normalize=False, method=model.encode_text)
  np.testing.assert_allclose(img, ref_img, atol=atol, rtol=1e-3)
  np.testing.assert_allclose(txt, ref_txt, atol=atol, rtol=1e-3)
  # The public jitted helpers return the normalised versions of the same features.
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(cc.encode_image(model, params, images), unit(ref_img), atol=atol)
  np.testing.assert_allclose(cc.encode_text(model, params, tokens), unit(ref_txt), atol=atol)
  np.testing.assert_allclose(params['logit_scale'], torch_model.logit_scale.item(), rtol=1e-6)
  return model


def test_vit_quickgelu_parity_through_pt_file(tmp_path):
  torch_model = _randomise(open_clip.model.CLIP(**SMALL_VIT, quick_gelu=True), seed=0)
  path = os.path.join(tmp_path, 'vit.pt')
  torch.save({'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in torch_model.state_dict().items()}}, path)
  model = _compare(torch_model, path, quick_gelu=True, image_size=32)
  assert model.config.quick_gelu and model.image_size == 32 and model.config.vision.patch_size == 8


def test_resnet_gelu_parity_through_safetensors(tmp_path):
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  torch_model = _randomise(open_clip.model.CLIP(**SMALL_RN, quick_gelu=False), seed=1)
  path = os.path.join(tmp_path, 'rn.safetensors')
  save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, path)
  model = _compare(torch_model, path, quick_gelu=False, image_size=64)
  assert model.config.vision.layers == (1, 2, 1, 1) and model.image_size == 64


def test_full_size_vit_b_32_image_parity(tmp_path):
  torch_model = _randomise(open_clip.create_model('ViT-B-32', pretrained=None), seed=2)
  path = os.path.join(tmp_path, 'vitb32.pt')
  torch.save(torch_model.state_dict(), path)
  images = np.random.default_rng(1).normal(size=(1, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    ref = torch_model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  model, params = cc.load_pretrained(path, 'ViT-B-32')
  assert convert.config_name(model.config) == 'ViT-B-32'
  img = model.apply({'params': params}, images, normalize=False, method=model.encode_image)
  np.testing.assert_allclose(img, ref, atol=2e-4, rtol=1e-3)


@pytest.mark.filterwarnings('ignore:.*torch.jit.script.*:DeprecationWarning')
def test_wrong_architecture_and_torchscript_are_refused(tmp_path):
  torch_model = open_clip.model.CLIP(**SMALL_VIT)
  path = os.path.join(tmp_path, 'vit.pt')
  torch.save(torch_model.state_dict(), path)
  with pytest.raises(convert.CheckpointError, match='vit.pt'):
    cc.load_pretrained(path, 'tiny-vit')  # same family, other widths: names the parameter
  with pytest.raises(convert.CheckpointError, match='lacks .visual.bn1.weight'):
    cc.load_pretrained(path, 'tiny-rn')
  # A shorter context keeps the first text positions.
  config = convert.infer_config(convert.read_state_dict(path))
  short = models.CLIP(dataclasses.replace(config, text=dataclasses.replace(config.text, context_length=16)))
  _, params = cc.load_pretrained(path, short)
  np.testing.assert_array_equal(params['text']['positional_embedding'],
                                torch_model.positional_embedding.detach().numpy()[:16])

  # The activation is not in the weights: an explicit one that contradicts the model is refused.
  with pytest.raises(convert.CheckpointError, match='quick_gelu=False but the model uses QuickGELU'):
    cc.load_pretrained(path, models.CLIP(config), quick_gelu=False)

  scripted = torch.jit.script(torch.nn.Linear(2, 2))
  script_path = os.path.join(tmp_path, 'openai.pt')
  scripted.save(script_path)
  with pytest.raises(convert.CheckpointError, match='TorchScript'):
    cc.load_pretrained(script_path)


def test_inferred_wide_vits_get_their_head_width_and_exact_mlp_width():
  # open_clip's ViT-g-14: vision width 1408 in 16 heads of 88, MLP 6144 (6144 / 1408 * 1408 is
  # 6143.99... in floating point); its text tower has 64-wide heads. Shapes only (no memory).
  shapes = {'ln_final.weight': (1024,), 'positional_embedding': (77, 1024),
            'token_embedding.weight': (49408, 1024), 'transformer.resblocks.0.mlp.c_fc.weight': (4096, 1024),
            'text_projection': (1024, 1024), 'visual.proj': (1408, 1024),
            'visual.conv1.weight': (1408, 3, 14, 14), 'visual.positional_embedding': (257, 1408),
            'visual.transformer.resblocks.0.mlp.c_fc.weight': (6144, 1408)}
  state = {key: np.broadcast_to(np.float32(0), shape) for key, shape in shapes.items()}
  config = convert.infer_config(state)
  assert config.vision.heads == 16 and config.text.heads == 16
  assert int(config.vision.width * config.vision.mlp_ratio) == 6144
  assert int(config.text.width * config.text.mlp_ratio) == 4096
  assert config.text.mlp_ratio == 4.0  # a whole ratio stays whole


def test_inferred_config_is_found_by_name():
  # Shapes of a registry model's state dict (ViT-B-32): the inferred config must equal the
  # registry's (a ratio of 4.0009765625 for 2048 / 512 hidden units made config_name miss it).
  cfg = models.get_config('ViT-B-32-quickgelu')
  v, t = cfg.vision, cfg.text
  shapes = {'ln_final.weight': (t.width,), 'positional_embedding': (t.context_length, t.width),
            'token_embedding.weight': (t.vocab_size, t.width),
            'transformer.resblocks.0.mlp.c_fc.weight': (int(t.width * t.mlp_ratio), t.width),
            'text_projection': (t.width, cfg.embed_dim), 'visual.proj': (v.width, cfg.embed_dim),
            'visual.conv1.weight': (v.width, 3, v.patch_size, v.patch_size),
            'visual.positional_embedding': ((v.image_size // v.patch_size) ** 2 + 1, v.width),
            'visual.transformer.resblocks.0.mlp.c_fc.weight': (int(v.width * v.mlp_ratio), v.width)}
  for prefix, layers in (('transformer', t.layers), ('visual.transformer', v.layers)):
    shapes.update({f'{prefix}.resblocks.{i}.ln_1.weight': (1,) for i in range(layers)})
  state = {key: np.broadcast_to(np.float32(0), shape) for key, shape in shapes.items()}
  assert convert.config_name(convert.infer_config(state)) == 'ViT-B-32-quickgelu'
