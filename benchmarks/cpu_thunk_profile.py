"""Where a jitted step's time goes on XLA's CPU backend, thunk by thunk (`train_step.py --profile-jax`).

XLA's CPU runtime executes a compiled program as a sequence of thunks, one per instruction of the
entry computation (a dot, a fusion, a copy). With `--xla_cpu_enable_xprof_traceme=true` each
thunk is a `jax.profiler` trace event named after its instruction, so the trace can be joined to
the compiled HLO text and every millisecond attributed to a kind of work:

  YNNPACK matmuls       fusions that XLA hands to YNNPACK around a dot (epilogues included)
  YNNPACK convolutions  the patch embedding
  Eigen dots            dots XLA leaves to its own Eigen kernels (weight gradients, mostly)
  oneDNN matmuls        dots routed to oneDNN (`CLEANCLIP_ONEDNN_DOTS=1`, cleanclip_jax/cpu_dots.py)
  YNNPACK other         YNNPACK fusions without a dot: reductions (softmax, LayerNorm), element-wise
  copies and fills      copies, transposes and broadcasts (zero fills), fused or not: no arithmetic
  other XLA fusions     element-wise loops (GELU, residual adds, AdamW), scatters, everything else

The flag must be set before JAX starts its CPU backend (`enable_thunk_tracing`), so it is on for
the benchmark's timed runs too; while no trace is collected a TraceMe only checks that it is off
(the traced bench-vit step ran no slower than the timed ones: README, 'Twentieth session').

At more than one thread, thunks run side by side and Eigen's dots return once their work is handed
to Eigen's pool, so the sums are thunk time, not the step's time: read the 1-thread profile for
shares of the step.
"""

from __future__ import annotations

import collections
import glob
import math
import os
import re
import shutil
import tempfile
import time

TRACEME_FLAG = '--xla_cpu_enable_xprof_traceme=true'

CATEGORIES = ('YNNPACK matmuls', 'YNNPACK convolutions', 'Eigen dots', 'oneDNN matmuls',
              'YNNPACK other', 'copies and fills', 'other XLA fusions')

MATMULS = ('YNNPACK matmuls', 'Eigen dots', 'oneDNN matmuls')  # the kinds whose dots are counted

# Opcodes of a fused computation that move data without arithmetic.
_DATA_MOVEMENT = {'parameter', 'bitcast', 'copy', 'transpose', 'reshape', 'broadcast', 'slice',
                  'concatenate', 'constant', 'tuple', 'get-tuple-element', 'dynamic-slice',
                  'dynamic-update-slice', 'pad', 'reverse'}
# Entry instructions that the runtime executes without a thunk of their own.
_NO_THUNK = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast'}
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$')
_SHAPE = re.compile(r'^\w+\[([\d,]*)\]')


def enable_thunk_tracing() -> None:
  """Adds the thunk TraceMe flag to XLA_FLAGS; call before JAX initialises its CPU backend."""
  flags = os.environ.get('XLA_FLAGS', '')
  if TRACEME_FLAG not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {TRACEME_FLAG}'.strip()


def _dims(shape: str) -> list[int]:
  match = _SHAPE.match(shape)
  return [int(d) for d in match.group(1).split(',') if d] if match else []


def _dot_flops(shape: str, operands: str, shapes: dict[str, str]) -> int:
  """2 x output elements x contracted size of an HLO dot (operand shapes from `shapes`, the
  computation's instructions: the compiled text names operands without their shapes)."""
  lhs = re.match(r'\s*%?([\w.\-]+)', operands)
  contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', operands)
  if not lhs or not contracting or lhs.group(1) not in shapes:
    return 0
  lhs_dims = _dims(shapes[lhs.group(1)])
  contracted = math.prod(lhs_dims[int(d)] for d in contracting.group(1).split(',') if d)
  return 2 * math.prod(_dims(shape)) * contracted


def _computations(hlo_text: str) -> dict[str, list[tuple[str, str, str, str]]]:
  """{computation name: [(instruction, shape, opcode, rest of line)]}; the entry one is 'ENTRY'."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and not _INSTRUCTION.match(line):
      current = 'ENTRY' if line.startswith('ENTRY') else header.group(1)
      computations[current] = []
    elif current is not None and (instruction := _INSTRUCTION.match(line)):
      computations[current].append(instruction.groups())
  return computations


def classify(hlo_text: str) -> dict[str, tuple[str, int, str]]:
  """{entry instruction: (category, dot FLOPs, result shape)} of a compiled module's text."""
  computations = _computations(hlo_text)
  shapes = {c: {name: shape for name, shape, _, _ in body} for c, body in computations.items()}
  out = {}
  for name, shape, opcode, rest in computations.get('ENTRY', []):
    if opcode in _NO_THUNK:
      continue
    flops = 0
    if opcode == 'dot':
      category, flops = 'Eigen dots', _dot_flops(shape, rest, shapes['ENTRY'])
    elif opcode == 'fusion':
      called = re.search(r'calls=%?([\w.\-]+)', rest)
      callee = called.group(1) if called else ''
      body = computations.get(callee, [])
      opcodes = {op for _, _, op, _ in body}
      if 'onednn' in rest and 'dot' in opcodes:
        category = 'oneDNN matmuls'
        flops = sum(_dot_flops(s, r, shapes[callee]) for _, s, op, r in body if op == 'dot')
      elif '__ynn_fusion' in rest:
        if 'dot' in opcodes:
          category = 'YNNPACK matmuls'
          flops = sum(_dot_flops(s, r, shapes[callee]) for _, s, op, r in body if op == 'dot')
        elif 'convolution' in opcodes:
          category = 'YNNPACK convolutions'
        else:
          category = 'YNNPACK other'
      elif opcodes <= _DATA_MOVEMENT:
        category = 'copies and fills'
      else:
        category = 'other XLA fusions'
    elif opcode in ('copy', 'transpose', 'broadcast'):
      category = 'copies and fills'
    else:
      category = 'other XLA fusions'
    out[name] = (category, flops, shape.split('{')[0])
  return out


def profile(run, hlo_text: str, steps: int = 3, top: int = 12) -> dict:
  """Traces `steps` calls of `run` (one jitted step each), prints thunk time by category and the
  longest thunks, and returns the figures per step."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    raise SystemExit('--profile-jax reads XLA CPU thunks: run it on the CPU backend')
  if TRACEME_FLAG not in os.environ.get('XLA_FLAGS', ''):
    raise SystemExit(f'--profile-jax needs XLA_FLAGS={TRACEME_FLAG} before JAX starts')
  kinds = classify(hlo_text)
  directory = tempfile.mkdtemp(prefix='thunk_profile_')
  try:
    jax.profiler.start_trace(directory)
    start = time.perf_counter()
    for _ in range(steps):
      run()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    jax.profiler.stop_trace()
    traces = glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True)
    data = jax.profiler.ProfileData.from_file(traces[0])
    per_thunk = collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        for event in line.events:
          if event.name in kinds:
            per_thunk[event.name] += event.duration_ns / 1e6 / steps
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  if not per_thunk:
    raise SystemExit('no XLA thunk in the trace: was the TraceMe flag set before JAX started?')
  ms, count, flops = collections.Counter(), collections.Counter(), collections.Counter()
  for name, thunk_ms in per_thunk.items():
    category, thunk_flops, _ = kinds[name]
    ms[category] += thunk_ms
    count[category] += 1
    flops[category] += thunk_flops
  total = sum(ms.values())
  print(f'JAX step under jax.profiler, {steps} steps: {wall_ms:.0f} ms a step (traced), {total:.0f} ms of '
        'XLA thunks a step; by kind:')
  for category in (c for c in CATEGORIES if ms[c]):
    rate = (f', {flops[category] / 1e9:.1f} GFLOP at {flops[category] / ms[category] / 1e6:.1f} '
            'GFLOP/s') if flops[category] else ''
    print(f'  {ms[category]:8.1f} ms {100 * ms[category] / total:5.1f}% {count[category]:5d} thunks  '
          f'{category}{rate}')
  print('  longest thunks (ms a step):')
  for name, thunk_ms in per_thunk.most_common(top):
    category, _, shape = kinds[name]
    print(f'  {thunk_ms:8.2f}  {name} -> {shape} ({category})')
  matmul_ms = sum(ms[c] for c in MATMULS)
  return {'traced_step_ms': round(wall_ms, 1), 'thunk_ms': round(total, 1),
          'category_ms': {c: round(ms[c], 1) for c in CATEGORIES},
          'category_gflop': {c: round(flops[c] / 1e9, 2) for c in CATEGORIES if flops[c]},
          'matmul_gflops': round(sum(flops[c] for c in MATMULS) / matmul_ms / 1e6, 1) if matmul_ms else 0.0}
