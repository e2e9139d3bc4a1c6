"""Device mesh, logical axis rules, and the one helper that builds shardings.

Params carry logical axis names (model.py: `vocab embed heads kv_heads mlp
norm head_dim layers`); activations use `batch length embed`; stacked related
models add `models`. A short rules list maps logical names to the mesh axes
`data`, `fsdp`, `tensor` (Flax lm1b style). A dimension that a mesh axis does
not divide is replicated along it rather than failing, and reported once
(`indivisible` lists them, so a pipeline can refuse such a mesh up front).

Multi-process meshes: `put` places a host value that every process holds
(the same batch, the same mask) onto any sharding, and `to_host` brings a
global array back to every process (a replicated one without a collective).
`track_meshes` records which meshes the code under it placed arrays on, so
a caller can check that nothing fell back to a default mesh or device.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('models', None),
    ('layers', None),
    ('length', None),
    ('norm', None),
    ('head_dim', None),
)

# Mesh axes that shard the batch ('batch' rule); a weight is gathered over
# them where a matmul uses it.
BATCH_AXES = ('data', 'fsdp')
_ACTIVE: list[tuple[Mesh, tuple]] = []
_REPORTED: set = set()
_TRACKERS: list[list[dict[str, Any]]] = []


def describe(mesh: Mesh) -> dict[str, Any]:
  """`{'axes': {name: size}, 'devices': n}`: what a mesh is, JSON-able."""
  return {'axes': {str(k): int(v) for k, v in mesh.shape.items()},
          'devices': int(mesh.devices.size)}


def _note(what: dict[str, Any]) -> None:
  for seen in _TRACKERS:
    if what not in seen:
      seen.append(what)


@contextlib.contextmanager
def track_meshes() -> Iterator[list[dict[str, Any]]]:
  """Yields the list of meshes (`describe`) used while the body runs.

  A mesh is noted when a mesh is built (`make_mesh`), a sharding is made on
  it (`named_sharding`, `replicated`), activations are constrained on it, or
  an array is placed on one device because no mesh was given
  (`single_device`, noted as `{'axes': {}, 'devices': 1}`).
  """
  seen: list[dict[str, Any]] = []
  _TRACKERS.append(seen)
  try:
    yield seen
  finally:
    _TRACKERS.remove(seen)


def make_mesh(shape: Sequence[int] = (-1, 1, 1),
              axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh of `shape` (one -1 allowed: all remaining devices), Auto axes.

  Raises:
    ValueError naming the shape when it does not match the device count.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(axis_names):
    raise ValueError(f'mesh shape {shape} does not match axes {axis_names}')
  if shape.count(-1) > 1:
    raise ValueError(f'mesh shape {shape}: at most one -1')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f'mesh shape {shape} does not divide {len(devices)} '
                       'devices')
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f'mesh shape {tuple(shape)} needs {int(np.prod(shape))} '
                     f'devices, found {len(devices)}')
  mesh = jax.make_mesh(
      tuple(shape), tuple(axis_names),
      axis_types=(jax.sharding.AxisType.Auto,) * len(shape), devices=devices)
  _note(describe(mesh))
  return mesh


def note_single_device() -> None:
  """Records (for `track_meshes`) that an array goes to one device because
  no mesh was given."""
  _note({'axes': {}, 'devices': 1})


def single_device() -> jax.sharding.SingleDeviceSharding:
  """This process's first device: where arrays go when no mesh is given."""
  note_single_device()
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int] | None,
                    mesh: Mesh, rules=DEFAULT_RULES) -> P:
  """PartitionSpec for logical axis names, dropping axes that do not divide."""
  table = dict(rules)
  spec, used = [], set()
  for i, name in enumerate(logical):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a in mesh.shape and a not in used)
    if shape is not None and axes:
      size = int(np.prod([mesh.shape[a] for a in axes]))
      if shape[i] % size:
        key = (name, shape[i], axes)
        if key not in _REPORTED:
          _REPORTED.add(key)
          logging.info('replicating %s (size %d) instead of sharding it over '
                       '%s (size %d)', name, shape[i], axes, size)
        axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def named_sharding(mesh: Mesh, logical: Sequence[str | None],
                   shape: Sequence[int] | None = None,
                   rules=DEFAULT_RULES) -> NamedSharding:
  """The one helper that builds a NamedSharding from logical axis names."""
  _note(describe(mesh))
  return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))


def indivisible(mesh: Mesh, logical_tree, shape_tree, rules=DEFAULT_RULES
               ) -> list[tuple[str, str, int, tuple[str, ...], int]]:
  """Dimensions the rules would shard but the mesh axes do not divide.

  Returns:
    `(leaf path, logical name, size, mesh axes, their size)` per dimension
    that `logical_to_spec` would replicate instead.
  """
  table = dict(rules)
  out = []
  flat_names = jax.tree_util.tree_leaves_with_path(
      logical_tree, is_leaf=lambda n: isinstance(n, tuple))
  flat_shapes = jax.tree.leaves(shape_tree)
  for (path, names), x in zip(flat_names, flat_shapes):
    used = set()
    for name, size in zip(names, x.shape):
      target = table.get(name) if name is not None else None
      axes = (target,) if isinstance(target, str) else tuple(target or ())
      axes = tuple(a for a in axes if a in mesh.shape and a not in used)
      total = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
      if total > 1 and size % total:
        out.append(('.'.join(str(getattr(k, 'key', k)) for k in path), name,
                    int(size), axes, total))
      else:
        used.update(axes)
  return out


def tree_shardings(mesh: Mesh, logical_tree, shape_tree, rules=DEFAULT_RULES,
                   prefix: tuple[str, ...] = ()):
  """NamedShardings for a pytree, given matching logical-name and shape trees.

  `prefix` prepends logical names for leading axes that stacking added (e.g.
  `('models',)` for stacked related models).
  """
  return jax.tree.map(
      lambda names, x: named_sharding(mesh, prefix + tuple(names),
                                      x.shape, rules),
      logical_tree, shape_tree,
      is_leaf=lambda n: isinstance(n, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on `mesh`."""
  _note(describe(mesh))
  return NamedSharding(mesh, P())


def put(x, target):
  """A host value that every process holds, placed onto `target`.

  `jax.jit` refuses numpy inputs for non-replicated `in_shardings` in a
  multi-process run; `device_put` of the same host value on every process
  builds the global array (each process fills its own shards). Works on
  pytrees, with one sharding for every leaf or a tree of shardings like
  `x`; arrays already on their sharding are returned as they are.
  """
  def one(a, sh):
    if isinstance(a, jax.Array) and a.sharding == sh:
      return a
    return jax.device_put(np.asarray(a) if not isinstance(a, jax.Array)
                          else a, sh)
  if isinstance(target, jax.sharding.Sharding):
    return jax.tree.map(lambda a: one(a, target), x)
  return jax.tree.map(one, x, target)


def batch_axes_size(mesh: Mesh) -> int:
  """How many ways the mesh splits a batch (`data` x `fsdp`)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def pad_rows(batch: dict[str, Any], multiple: int
             ) -> tuple[dict[str, np.ndarray], int]:
  """`(batch with empty rows appended, real row count)`: B becomes a
  multiple of `multiple` (all-zero rows: every mask zero), so a batch
  divides over the batch axes."""
  b = batch['tokens_bt'].shape[0]
  extra = (-b) % multiple
  if not extra:
    return batch, b
  return {k: np.concatenate([np.asarray(v), np.zeros(
      (extra,) + np.shape(v)[1:], np.asarray(v).dtype)])
          for k, v in batch.items()}, b


def to_host(x) -> np.ndarray:
  """The value of a (possibly multi-process) array on this host.

  Fully addressable arrays are fetched; replicated global arrays are read
  from a local shard (no collective); sharded global arrays are gathered
  from every process (`process_allgather`: every process must call it).
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
  """While tracing inside this context, block-boundary activations are
  constrained on `mesh` (see `constrain_activation`)."""
  _note(describe(mesh))
  _ACTIVE.append((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.pop()



def constrain_weight(w: jax.Array, logical: Sequence[str]) -> jax.Array:
  """A weight as a matmul uses it: gathered over the batch axes (FSDP), still
  split over 'tensor'; a no-op with no mesh set.

  Weights rest sharded over 'fsdp' (their 'embed' axis); without this, XLA
  may instead contract over the fsdp-sharded axis and all-gather the
  activations, so every device holds the whole global batch's `[B*T, V]`
  logits or `[B*T, F]` MLP activations.
  """
  if not _ACTIVE:
    return w
  mesh, rules = _ACTIVE[-1]
  spec = logical_to_spec(logical, w.shape, mesh, rules)
  keep = []
  for axes in spec:
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in BATCH_AXES)
    keep.append(axes[0] if len(axes) == 1 else (axes or None))
  # At rest first: in a backward the transpose of this pair reduce-scatters
  # the weight's gradient right here (inside the layer scan), instead of
  # stacking every layer's full-size gradient until after the loop.
  w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, spec))
  return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P(*keep)))


def constrain_activation(x: jax.Array, logical: Sequence[str]) -> jax.Array:
  """Constrains an activation at a block boundary; a no-op with no mesh set.

  Under `jax.vmap` (stacked models) the constraint applies per model.
  """
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  return jax.lax.with_sharding_constraint(
      x, named_sharding(mesh, logical, x.shape, rules))
