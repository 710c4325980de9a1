"""cpu_dots.route_dots_to_onednn: off unless asked for; asked for, XLA CPU dots run as oneDNN
matmuls, with the same numbers."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from cleanclip_jax import cpu_dots

# In a fresh process (XLA reads XLA_FLAGS once per process): whether the flags were applied, and
# which thunks the compiled dots became, and the gradients of a least-squares dense layer: its
# weight gradient is the dot XLA otherwise leaves to Eigen (`x^T r`, contracted over the rows).
_CHILD = textwrap.dedent('''
    import json
    import numpy as np
    from cleanclip_jax import cpu_dots
    applied = cpu_dots.route_dots_to_onednn()
    import jax, jax.numpy as jnp
    rng = np.random.default_rng(0)
    x, w, y = (rng.standard_normal(shape).astype(np.float32) for shape in ((96, 64), (64, 32), (96, 32)))
    f = jax.jit(jax.grad(lambda w, x: 0.5 * jnp.sum((x @ w - y) ** 2), argnums=(0, 1)))
    hlo = f.lower(w, x).compile().as_text()
    gw, gx = f(w, x)
    again = cpu_dots.route_dots_to_onednn()  # after the backend exists: reports, changes nothing
    print(json.dumps({'applied': applied, 'again': again, 'onednn': hlo.count('onednn'),
                      'gw': np.asarray(gw).tolist(), 'gx': np.asarray(gx).tolist()}))
''')


def _child(**env_changes):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  env.pop('CLEANCLIP_ONEDNN_DOTS', None)
  env.update(env_changes)
  env = {key: value for key, value in env.items() if value is not None}
  out = subprocess.run([sys.executable, '-c', _CHILD], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_dots_become_onednn_matmuls_only_when_asked_with_f32_accuracy():
  default = _child()
  asked = _child(CLEANCLIP_ONEDNN_DOTS='1')
  off = _child(CLEANCLIP_ONEDNN_DOTS='0')
  # JAX_PLATFORMS unset, as on a user's CPU machine: no GPU / TPU plugin here, so the CPU it is.
  asked_unset = _child(CLEANCLIP_ONEDNN_DOTS='1', JAX_PLATFORMS=None)
  # The flags set by hand, as a user does to have them on a CPU without AVX-512 (the route's
  # own check keeps them off there): they are reported as in effect and every dot is oneDNN's.
  forced = _child(XLA_FLAGS=' '.join(('--xla_force_host_platform_device_count=1', *cpu_dots.FLAGS)))
  routed = cpu_dots.cpu_has_avx512()
  for result in (default, off):  # XLA's own dots unless asked (cpu_dots docstring: why)
    assert not result['applied'] and not result['again'] and result['onednn'] == 0
  for result in (asked, asked_unset):
    assert result['applied'] == result['again'] == routed
    assert (result['onednn'] > 0) == routed
  assert forced['applied'] and forced['again'] and forced['onednn'] > 0
  rng = np.random.default_rng(0)  # the child's inputs, and its gradients in float64
  x, w, y = (rng.standard_normal(shape).astype(np.float32).astype(np.float64)
             for shape in ((96, 64), (64, 32), (96, 32)))
  residual = x @ w - y
  exact = {'gw': x.T @ residual, 'gx': residual @ w.T}
  for result in (default, asked, asked_unset, forced):  # the same products, summed in other orders: all f32-accurate
    for name, value in exact.items():
      np.testing.assert_allclose(result[name], value, rtol=1e-5, atol=1e-5 * np.abs(value).max())


def test_routes_only_on_cpus_with_avx512(monkeypatch):
  # XLA's oneDNN matmuls corrupted the heap on 2 threads of an AVX2-only CPU (cpu_dots docstring).
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('CLEANCLIP_ONEDNN_DOTS', '1')
  monkeypatch.setattr(cpu_dots.xla_bridge, 'backends_are_initialized', lambda: False)
  avx2 = {'model name': 'AMD EPYC', 'flags': 'fpu sse2 avx avx2 fma'}
  monkeypatch.setattr(cpu_dots, '_first_cpu_fields', lambda: avx2)
  assert not cpu_dots.cpu_has_avx512()
  assert not cpu_dots.route_dots_to_onednn()
  assert os.environ['XLA_FLAGS'] == ''
  monkeypatch.setattr(cpu_dots, '_first_cpu_fields', dict)  # no /proc/cpuinfo
  assert not cpu_dots.route_dots_to_onednn()
  assert os.environ['XLA_FLAGS'] == ''
  avx512 = dict(avx2, flags=avx2['flags'] + ' avx512f avx512bw')
  monkeypatch.setattr(cpu_dots, '_first_cpu_fields', lambda: avx512)
  assert cpu_dots.cpu_has_avx512()
  assert cpu_dots.route_dots_to_onednn()
  assert os.environ['XLA_FLAGS'].split() == list(cpu_dots.FLAGS)


def test_leaves_xla_flags_alone_unless_asked_or_when_not_on_cpu(monkeypatch):
  monkeypatch.setattr(cpu_dots.xla_bridge, 'backends_are_initialized', lambda: False)
  monkeypatch.setattr(cpu_dots, 'cpu_has_avx512', lambda: True)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  for unasked in (None, '0', 'yes'):  # only '1' asks
    monkeypatch.setenv('XLA_FLAGS', '')
    if unasked is None:
      monkeypatch.delenv('CLEANCLIP_ONEDNN_DOTS', raising=False)
    else:
      monkeypatch.setenv('CLEANCLIP_ONEDNN_DOTS', unasked)
    assert not cpu_dots.route_dots_to_onednn()
    assert os.environ['XLA_FLAGS'] == ''
  monkeypatch.setenv('CLEANCLIP_ONEDNN_DOTS', '1')
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_use_onednn=false')  # the user's own setting wins
  assert not cpu_dots.route_dots_to_onednn()
  assert os.environ['XLA_FLAGS'] == '--xla_cpu_use_onednn=false'
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')  # a GPU job: its jaxlib may not know the flags
  assert not cpu_dots.route_dots_to_onednn()
  assert os.environ['XLA_FLAGS'] == ''
