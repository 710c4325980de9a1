"""Imports torch and open_clip for reference tests, or skips the calling test module cleanly.

torchvision's CUDA build registers ops that fail to load on CPU-only machines and breaks
`import open_clip`; defining the two op schemas first lets the import succeed. The library object
must stay alive for the definitions to remain registered, hence the module global.
"""

import pytest

torch = pytest.importorskip('torch')

_TORCHVISION_SHIM = None


def import_open_clip():
  """open_clip, imported with the torchvision workaround; skips the test if unavailable."""
  global _TORCHVISION_SHIM
  if _TORCHVISION_SHIM is None:
    try:
      lib = torch.library.Library('torchvision', 'DEF')
      lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
      lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
      _TORCHVISION_SHIM = lib
    except RuntimeError:
      # Already defined (by another module's shim or a working torchvision): nothing to do.
      _TORCHVISION_SHIM = False
  return pytest.importorskip('open_clip')
