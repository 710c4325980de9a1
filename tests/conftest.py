"""Every test runs on CPU with 8 emulated devices, so sharded code paths are exercised, and with the
XLA CPU settings the entry points use (`cpu_dots`), so the parity tests check what users run: XLA's
own dots by default, oneDNN's where CLEANCLIP_ONEDNN_DOTS=1 is set for the whole suite."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()

from cleanclip_jax import cpu_dots  # pylint: disable=g-import-not-at-top,wrong-import-position

cpu_dots.route_dots_to_onednn()  # before any test creates JAX's CPU client
