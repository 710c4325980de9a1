"""The device mesh, the rules that place parameters on it, and global batch assembly.

Two mesh axes: `data` (pure data parallelism: parameters replicated) and `fsdp` (data parallelism
whose parameters and optimiser state are split across the axis and all-gathered per layer by
XLA). The batch is split over both axes, so every device sees `batch_size / num_devices` examples.

Parameters carry logical axis names (`nn.with_logical_partitioning` in `models/`).
`LOGICAL_AXIS_RULES` maps them to mesh axes: each rule, in order, shards the first dimension with
that logical name if its mesh axis is still unused in the tensor's spec and divides the
dimension; everything else is replicated, and so is any tensor below `MIN_SHARDED_SIZE`
elements (gathering a bias costs more in latency than it saves in memory).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp')
# The batch dimension is split over every mesh axis.
BATCH_AXES = MESH_AXES

# (logical axis, mesh axis) in order of preference. FSDP shards a tensor along any one dimension,
# so transformer weights use `embed`, ResNet convolutions (no `embed`) their output channels, and
# the rest are fallbacks for tensors whose `embed` dimension the axis does not divide.
LOGICAL_AXIS_RULES: tuple[tuple[str, str], ...] = (
    ('embed', 'fsdp'),
    ('conv_out', 'fsdp'),
    ('mlp', 'fsdp'),
    ('vocab', 'fsdp'),
    ('classes', 'fsdp'),
)
MIN_SHARDED_SIZE = 2 ** 14


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh; a -1 entry takes the remaining devices.

  Auto axis types (what `Mesh(...)` gives; `jax.make_mesh` would make them Explicit): the step
  relies on jit's sharding propagation from its in/out shardings, not on sharding-in-types.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(mesh_config['data']), int(mesh_config['fsdp'])]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh: at most one of data/fsdp may be -1, got data={sizes[0]} fsdp={sizes[1]}')
  fixed = math.prod(s for s in sizes if s != -1)
  if fixed <= 0 or len(devices) % fixed:
    raise ValueError(f'mesh: data={sizes[0]} x fsdp={sizes[1]} does not divide {len(devices)} devices')
  sizes = [len(devices) // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(f'mesh: data={sizes[0]} x fsdp={sizes[1]} != {len(devices)} devices '
                     '(use -1 to fill, or pass the devices to use)')
  try:
    # Orders devices so the fsdp axis (the most communication) stays within a slice / host.
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # pylint: disable=broad-except
    # Backends without a topology model (CPU, a devices subset): plain row-major order.
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Dimension 0 split over every mesh axis; other dimensions whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def tracing_mesh(mesh: Mesh):
  """Context for tracing model code on `mesh`, so that `split_over_batch` and `lookup_layouts`
  can name its axes (the train step's loss and the evaluator's text encoder are traced in it)."""
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def _traced_mesh():
  """The abstract mesh `tracing_mesh` set, or None outside it (or for a mesh without our axes)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) else mesh


def split_over_batch(x: jax.Array) -> jax.Array:
  """`x` split along dimension 0 over the batch axes, when traced under `tracing_mesh`; else `x`.

  Why the text tower needs it: XLA gives an embedding lookup's output the sharding of the table,
  whose `embed` dimension FSDP splits, so the tower's activations were split along `embed` and
  every block all-gathered and all-reduced the whole global batch's activations
  (`[batch x tokens, 4 x width]` tensors; README, 'Training step: mesh, sharding, ...'). Pinned to
  the batch split, the activations stay local and only the weights are gathered, as FSDP means.
  """
  return x if _traced_mesh() is None else jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def lookup_layouts(width: int):
  """(ids spec, rows spec) for looking up an FSDP-split table: ids split over `data` only, the
  looked-up rows over `data` and their `width` features over `fsdp`, which each device can gather
  from its own slice of the table; None outside `tracing_mesh` or when `fsdp` does not divide
  `width` (the table is then split another way). The backward pass then scatters each device's
  rows into its own slice and sums over `data`; left to propagation, a mesh with `data` and
  `fsdp` both above 1 gathered the global batch's embedding gradient on every device."""
  mesh = _traced_mesh()
  if mesh is None or width % mesh.shape['fsdp']:
    return None
  return P('data'), P('data', None, 'fsdp')


def spec_for(shape: Sequence[int], logical_names: Sequence[str | None] | None, mesh: Mesh,
             rules: Sequence[tuple[str, str]] = LOGICAL_AXIS_RULES,
             min_size: int = MIN_SHARDED_SIZE) -> P:
  """The PartitionSpec for one tensor of `shape` whose dimensions have `logical_names`."""
  if not logical_names or math.prod(shape) < min_size:
    return P()
  if len(logical_names) != len(shape):
    raise ValueError(f'logical names {tuple(logical_names)} do not match shape {tuple(shape)}')
  assigned: list[str | None] = [None] * len(shape)
  for logical, mesh_axis in rules:
    if mesh_axis in assigned or mesh.shape.get(mesh_axis, 1) == 1:
      continue
    for dim, name in enumerate(logical_names):
      if name == logical and assigned[dim] is None and shape[dim] % mesh.shape[mesh_axis] == 0:
        assigned[dim] = mesh_axis
        break
  while assigned and assigned[-1] is None:
    assigned.pop()
  return P(*assigned)


def _is_box(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def param_shardings(boxed_params: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = LOGICAL_AXIS_RULES,
                    min_size: int = MIN_SHARDED_SIZE) -> Any:
  """NamedShardings for a (possibly abstract) param tree with `LogicallyPartitioned` boxes.

  Returns a tree shaped like the unboxed params. Unannotated leaves are replicated.
  """
  def one(leaf):
    if _is_box(leaf):
      return NamedSharding(mesh, spec_for(leaf.value.shape, leaf.names, mesh, rules, min_size))
    return replicated(mesh)
  return jax.tree.map(one, boxed_params, is_leaf=_is_box)


def shardings_like_params(tree: Any, params: Any, params_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree holding per-parameter copies (optimiser moments, EMA, ...).

  A leaf whose key path ends with a parameter's full path and has that parameter's shape takes
  that parameter's sharding; every other leaf (counters, scalars) is replicated. This relies only
  on the convention that optimiser states nest parameter-shaped trees, not on optax internals.
  """
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params),
                                    jax.tree.leaves(params_shardings)):
    by_path[tuple(path)] = (tuple(leaf.shape), sharding)

  def one(path, leaf):
    path = tuple(path)
    for start in range(len(path)):
      match = by_path.get(path[start:])
      if match and match[0] == tuple(np.shape(leaf)):
        return match[1]
    return replicated(mesh)
  return jax.tree_util.tree_map_with_path(one, tree)


def host_batch_to_global(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-host numpy batch -> global arrays split on dimension 0 over all mesh axes.

  Each process passes its own `batch_size // process_count` rows; the global batch is their
  concatenation in process order.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for key, value in host_batch.items():
    value = np.asarray(value)
    if value.dtype == np.int64 and not jax.config.jax_enable_x64:
      # Without x64 JAX would truncate silently; example indices fit in int32 for any real dataset.
      if value.size and (value.max() > np.iinfo(np.int32).max or value.min() < np.iinfo(np.int32).min):
        raise ValueError(f'batch[{key!r}] has int64 values outside int32; enable jax_enable_x64')
      value = value.astype(np.int32)
    if value.ndim == 0:
      raise ValueError(f'batch[{key!r}] is a scalar; every batch entry needs a leading batch dimension')
    local_devices = len(mesh.local_devices)
    if value.shape[0] % local_devices:
      raise ValueError(f'batch[{key!r}] has {value.shape[0]} rows on this host, not divisible by its '
                       f'{local_devices} devices')
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def log_param_shardings(params: Any, shardings: Any) -> None:
  """One line per parameter: path, shape, spec (for the launch log)."""
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shardings)):
    logging.info('param %-70s %-20s %s', jax.tree_util.keystr(path), tuple(np.shape(leaf)), sharding.spec)

