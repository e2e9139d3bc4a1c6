"""Device mesh, logical axis rules, and the one helper that builds shardings.

Params carry logical axis names (model.py: `vocab embed heads kv_heads mlp
norm head_dim layers`); activations use `batch length embed`; stacked related
models add `models`. A short rules list maps logical names to the mesh axes
`data`, `fsdp`, `tensor` (Flax lm1b style). A dimension that a mesh axis does
not divide is replicated along it rather than failing, and reported once.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

from absl import logging
import jax
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

_ACTIVE: list[tuple[Mesh, tuple]] = []
_REPORTED: set = set()


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
  return jax.make_mesh(
      tuple(shape), tuple(axis_names),
      axis_types=(jax.sharding.AxisType.Auto,) * len(shape), devices=devices)


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
  return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))


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
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
  """While tracing inside this context, block-boundary activations are
  constrained on `mesh` (see `constrain_activation`)."""
  _ACTIVE.append((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.pop()


def constrain_activation(x: jax.Array, logical: Sequence[str]) -> jax.Array:
  """Constrains an activation at a block boundary; a no-op with no mesh set.

  Under `jax.vmap` (stacked models) the constraint applies per model.
  """
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  return jax.lax.with_sharding_constraint(
      x, named_sharding(mesh, logical, x.shape, rules))
