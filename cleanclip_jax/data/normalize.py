"""CLIP's input normalisation, applied on device so the pipeline ships uint8 (4x less host->device traffic)."""

import jax.numpy as jnp
import numpy as np

# OpenAI CLIP's per-channel statistics (RGB, [0, 1] scale).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def normalize(images, dtype=jnp.float32):
  """uint8 [..., H, W, 3] in [0, 255] -> float, CLIP-normalised."""
  x = images.astype(jnp.float32) / 255.0
  return ((x - CLIP_MEAN) / CLIP_STD).astype(dtype)
