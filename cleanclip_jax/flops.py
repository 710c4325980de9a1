"""Analytic training FLOPs and model FLOPs utilisation (MFU).

Counts are matmul/convolution FLOPs (a multiply-add = 2 FLOPs) of the forward pass, from the
architecture in `models.registry`; a training step costs 3x the forward (the backward pass is two
matmuls per forward matmul). Elementwise work (norms, softmax, GELU) is left out, as in the PaLM
MFU convention, so MFU is comparable across implementations. Attention scores are counted in full
for the causal text tower (that is what the model computes). Convolutions count every kernel tap,
padding included; XLA's cost analysis skips padded taps, which matters only for tiny feature maps
(tiny-rn at 32 px: 14% fewer; ViTs: the count is within 5% of XLA's).

The count is the model's, whatever the implementation skips: with `model.pooled_last_block` (the
default) each transformer tower's last block computes only its pooled row, which executes fewer
FLOPs than counted (`executed=True` counts those); MFU still credits the model's count, as it does
for open_clip, which computes every row.

MFU = achieved model FLOP/s / peak FLOP/s. The denominator is measured, not a datasheet figure
(there is none for a CPU): `measure_matmul_peak()` times a jitted square matmul on the current
backend in the model's compute dtype (the trainer's `mfu`: a bf16 model on a GPU is set against the
bf16 peak, not the TF32/f32 one, which is about half of it). `benchmarks/accelerator_step.py` also
prints MFU against the datasheet.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from cleanclip_jax.models.registry import ModelConfig, TextConfig, VisionConfig


def transformer_forward_flops(tokens: int, width: int, layers: int, mlp_ratio: float,
                              pooled_last_block: bool = False) -> float:
  """Pre-LN blocks: q/k/v/out projections, scores and context, and the 2-layer MLP.

  `pooled_last_block`: the last block computes one pooled row; the other rows' query and output
  projections, scores, context and MLP are not run there (their keys and values still are).
  """
  hidden = int(width * mlp_ratio)
  projections = 4 * 2 * tokens * width * width
  attention = 2 * 2 * tokens * tokens * width
  mlp = 2 * 2 * tokens * width * hidden
  total = layers * (projections + attention + mlp)
  if pooled_last_block and layers > 0:
    per_row = 2 * 2 * width * width + 2 * 2 * tokens * width + 2 * 2 * width * hidden
    total -= (tokens - 1) * per_row
  return float(total)


def vit_forward_flops(vision: VisionConfig, embed_dim: int, executed: bool = False) -> float:
  """`executed`: less what the pooled last block skips (the model's count otherwise)."""
  patches = (vision.image_size // vision.patch_size) ** 2
  patch_embed = 2 * patches * vision.patch_size ** 2 * 3 * vision.width
  blocks = transformer_forward_flops(patches + 1, vision.width, vision.layers, vision.mlp_ratio,
                                     pooled_last_block=executed)
  return float(patch_embed + blocks + 2 * vision.width * embed_dim)


def resnet_forward_flops(vision: VisionConfig, embed_dim: int) -> float:
  """OpenAI's ModifiedResNet: 3-conv stem, bottlenecks (pooling before strided steps), attention pool."""
  def conv(size, c_in, c_out, kernel):
    return 2 * size * size * kernel * kernel * c_in * c_out

  size, width, half = vision.image_size // 2, vision.width, vision.width // 2
  total = conv(size, 3, half, 3) + conv(size, half, half, 3) + conv(size, half, width, 3)
  size //= 2
  channels = width
  for stage, blocks in enumerate(vision.layers):
    planes = width * 2 ** stage
    for i in range(blocks):
      stride = 2 if stage > 0 and i == 0 else 1
      total += conv(size, channels, planes, 1) + conv(size, planes, planes, 3)
      out_size = size // stride
      total += conv(out_size, planes, 4 * planes, 1)
      if stride > 1 or channels != 4 * planes:
        total += conv(out_size, channels, 4 * planes, 1)
      channels, size = 4 * planes, out_size
  tokens = size * size + 1
  # Attention pooling: one query (the mean token) against all tokens.
  total += 2 * channels * channels + 2 * 2 * tokens * channels * channels  # q; k and v
  total += 2 * 2 * tokens * channels + 2 * channels * embed_dim  # scores, context; output projection
  return float(total)


def image_forward_flops(config: ModelConfig, executed: bool = False) -> float:
  if config.vision.is_resnet:
    return resnet_forward_flops(config.vision, config.embed_dim)
  return vit_forward_flops(config.vision, config.embed_dim, executed)


def text_forward_flops(text: TextConfig, embed_dim: int, executed: bool = False,
                       length: int = 0, rows: float = 1.0) -> float:
  """Per caption. `length`: the token columns fed to the tower (`data.token_bucket` cuts them);
  0 = the context. `rows`: token rows fed per caption (< 1 when `data.pack_captions` packs
  several captions to a row); the rows' blocks are counted in full, as the model computes them.

  With `executed` and packing, the last block runs one pooled row per caption, its attention over
  the caption's group of rows (`text_packing`); that attention is left out of the count (< 0.1%
  of the step for `bench-vit`)."""
  length = length or text.context_length
  blocks = transformer_forward_flops(length, text.width, text.layers, text.mlp_ratio)
  if executed and text.layers > 0:
    hidden = int(text.width * text.mlp_ratio)
    per_row = 2 * 2 * text.width * text.width + 2 * 2 * length * text.width + 2 * 2 * text.width * hidden
    blocks -= (length - 1 / rows) * per_row  # the last block: one row per caption, not per token
  return float(rows * blocks + 2 * text.width * embed_dim)


def train_flops_per_example(config: ModelConfig, objective: str = 'clip', global_batch: int = 0,
                            num_classes: int = 0, freeze_tower: bool = False,
                            executed: bool = False, text_length: int = 0,
                            text_rows: float = 1.0) -> float:
  """Training FLOPs per example (forward + backward = 3x forward) for an objective.

  `executed`: what a step with `model.pooled_last_block` computes (for a hardware-utilisation
  figure); the default is the model's count, which MFU uses. `text_length`: the token columns the
  step is fed (0 = the context length; `data.token_bucket` cuts batches shorter); `text_rows`: the
  token rows fed per caption (`data.pack_captions` packs several captions to a row).

  cleanclip runs both towers on the original and the augmented view; the contrastive logits add
  2 * global_batch * embed_dim per example and logits matrix (1 for clip/siglip, 3 for cleanclip).
  A frozen tower (supervised) costs its forward only.
  """
  image = image_forward_flops(config, executed)
  text = text_forward_flops(config.text, config.embed_dim, executed, text_length, text_rows)
  logits = 2 * global_batch * config.embed_dim
  if objective in ('clip', 'siglip'):
    return 3 * (image + text + logits)
  if objective == 'cleanclip':
    return 3 * (2 * (image + text) + 3 * logits)
  if objective == 'supervised':
    head = 2 * config.embed_dim * num_classes
    return (image if freeze_tower else 3 * image) + 3 * head
  raise ValueError(f'unknown objective {objective!r}')


def measure_matmul_peak(size: int = 2048, repeats: int = 10, dtype=jnp.float32,
                        device: jax.Device | None = None) -> float:
  """FLOP/s of a jitted size x size matmul on `device` (default: this process's first device:
  on another process's device nothing would run here, and the time would be the dispatch's),
  median of `repeats` timed runs after a warm-up."""
  device = device or jax.local_devices()[0]
  rng = np.random.default_rng(0)
  a = jax.device_put(jnp.asarray(rng.standard_normal((size, size)), dtype), device)
  b = jax.device_put(jnp.asarray(rng.standard_normal((size, size)), dtype), device)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / float(np.median(times))


def mfu(flops_per_example: float, examples_per_second: float, peak_flops_per_second: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
  return flops_per_example * examples_per_second / peak_flops_per_second
