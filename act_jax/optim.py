"""Optimizer for compatibility fine-tuning: AdamW, schedules, trainable scope.

The chain is `clip_by_global_norm -> adamw(schedule)`; what may move is set
by `scope`:
  full      every param (the baseline).
  channels  only the True entries of a boolean mask pytree aligned with the
            params (leaves with no True entry keep no optimizer state). Gradients are masked before clipping (so the clip norm and
            the moments see only trainable entries) and the FINAL updates are
            masked after the whole chain, weight decay included: `optax.masked`
            would pass frozen leaves' raw gradients through, so it is not used.
            `apply_updates` then writes only masked entries (`where`), so
            frozen entries stay bitwise unchanged.
  modules   whole (layer, module) units that hold any True entry move: leaves
            with no trainable entry are frozen with `multi_transform` +
            `set_to_zero` (no optimizer state), stacked layer leaves keep a
            per-layer mask, and siblings (kernel and bias of one module) share
            it.
`lean=True` (channels scope only) keeps Adam state only for the selected
slices: per leaf the selected columns/rows are gathered into compact arrays,
AdamW runs on those, and the updates are scattered back (see `lean_adamw`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = dict[str, Any]
SCOPES = ('full', 'channels', 'modules')


def make_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup (`warmup_frac` of `num_steps`) then linear/cosine decay.

  Reads `lr`, `num_steps`, `warmup_frac`, `schedule` ('cosine' | 'linear' |
  'constant') and `final_lr_frac` (absent = 0): the decay reaches
  `final_lr_frac * lr` at `num_steps`.
  """
  steps = int(train_cfg.num_steps)
  warm = int(round(float(train_cfg.warmup_frac) * steps))
  lr = float(train_cfg.lr)
  final = float(getattr(train_cfg, 'final_lr_frac', 0.0))
  kind = train_cfg.schedule
  if kind not in ('cosine', 'linear', 'constant'):
    raise ValueError(f'train.schedule={kind!r}: expected cosine, linear or '
                     'constant')
  warmup = optax.linear_schedule(0.0, lr, max(warm, 1))
  rest = max(steps - warm, 1)
  if kind == 'cosine':
    decay = optax.cosine_decay_schedule(lr, rest, alpha=final)
  elif kind == 'linear':
    decay = optax.linear_schedule(lr, final * lr, rest)
  else:
    decay = optax.constant_schedule(lr)
  if warm == 0:
    return decay
  return optax.join_schedules([warmup, decay], [warm])


# ----------------------------------------------------------------- masks


def _broadcast_leaf_mask(m, x, name: str) -> np.ndarray:
  """A mask leaf as a host bool array broadcastable to param `x`.

  Accepts None/False (frozen), True (whole leaf), an array of `x.shape`, or
  a per-channel array that drops `x`'s input axis (`[L, C]` for a kernel
  `[L, d_in, C]`, `[C]` for `[d_in, C]`).
  """
  if m is None:
    return np.zeros((1,) * x.ndim, bool)
  m = np.asarray(m).astype(bool)
  if m.ndim == 0:
    return m.reshape((1,) * x.ndim)
  if m.ndim == x.ndim - 1 and x.ndim >= 2 and m.shape[-1] == x.shape[-1]:
    m = np.expand_dims(m, -2)
  try:
    np.broadcast_shapes(m.shape, x.shape)
  except ValueError:
    raise ValueError(f'mask leaf {name} has shape {m.shape}, which does not '
                     f'broadcast to the param shape {x.shape}') from None
  if m.ndim != x.ndim:
    raise ValueError(f'mask leaf {name} has shape {m.shape}; param is '
                     f'{x.shape}')
  return m


def normalize_mask(mask, params: Params) -> Params:
  """A bool mask tree with the params' structure (host numpy leaves).

  Missing keys in `mask` (a prefix/sub tree) count as frozen. A compact
  channel mask `{site: [L, C]}` (masks.py) is expanded with
  `masks.leaf_masks`. Raises ValueError naming a mask key that is not a param.
  """
  if isinstance(mask, dict) and mask and all('.' in k for k in mask):
    from act_jax import masks  # pylint: disable=g-import-not-at-top
    mask = masks.leaf_masks(mask, params)

  def walk(m, p, path):
    if isinstance(p, dict):
      if m is None or isinstance(m, (bool, np.bool_)):
        return {k: walk(m, v, path + (k,)) for k, v in p.items()}
      if not isinstance(m, dict):
        raise ValueError(f'mask at {".".join(path) or "<root>"} is a leaf, '
                         'params there are a subtree')
      extra = sorted(set(m) - set(p))
      if extra:
        raise ValueError(f'mask keys {extra} under {".".join(path) or "<root>"}'
                         ' are not params')
      return {k: walk(m.get(k), v, path + (k,)) for k, v in p.items()}
    return _broadcast_leaf_mask(m, p, '.'.join(path))

  return walk(mask, params, ())


def mask_counts(mask: Params, params: Params) -> tuple[int, int]:
  """(trainable entries, total entries) of a normalized mask."""
  sel = sum(int(np.broadcast_to(m, p.shape).sum())
            for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params)))
  return sel, sum(int(p.size) for p in jax.tree.leaves(params))


def module_mask(mask: Params, params: Params) -> Params:
  """Widens a channel mask to whole (layer, module) units.

  A leaf under `layers` gets a per-layer mask `[L, 1, ...]`; other leaves are
  all or nothing. Sibling leaves (kernel, bias of one module) share a unit.
  """

  def unit(node_m, node_p, stacked):
    if not isinstance(node_p, dict):
      return None
    leaves = {k: v for k, v in node_p.items() if not isinstance(v, dict)}
    out = {}
    if leaves:
      if stacked:
        num_layers = next(iter(leaves.values())).shape[0]
        any_l = np.zeros((num_layers,), bool)
        for k, v in leaves.items():
          m = np.broadcast_to(node_m[k], v.shape)
          any_l |= m.reshape(num_layers, -1).any(-1)
        for k, v in leaves.items():
          out[k] = any_l.reshape((-1,) + (1,) * (v.ndim - 1))
      else:
        anyv = any(bool(np.any(node_m[k])) for k in leaves)
        for k, v in leaves.items():
          out[k] = np.full((1,) * v.ndim, anyv)
    for k, v in node_p.items():
      if isinstance(v, dict):
        out[k] = unit(node_m[k], v, stacked or k == 'layers')
    return out

  return unit(mask, params, False)


def _is_all(m) -> bool:
  return bool(np.all(m))


def _is_none(m) -> bool:
  return not bool(np.any(m))


def masked_updates(mask: Params) -> optax.GradientTransformation:
  """Multiplies updates by a fixed mask (used first on grads, last on updates).

  Leaves that are all True pass through untouched, all False become zeros.
  """

  def mul(u, m):
    if _is_all(m):
      return u
    if _is_none(m):
      return jnp.zeros_like(u)
    return jnp.where(jnp.asarray(m), u, jnp.zeros((), u.dtype))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(mul, updates, mask), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def apply_updates(params: Params, updates: Params,
                  mask: Params | None = None) -> Params:
  """`params + updates`, writing only masked entries when `mask` is given.

  `where` rather than `+ 0` keeps frozen entries bitwise equal (even -0.0).
  """
  if mask is None:
    return optax.apply_updates(params, updates)

  def one(p, u, m):
    if _is_none(m):
      return p
    new = (p.astype(jnp.float32) + u.astype(jnp.float32)).astype(p.dtype)
    return new if _is_all(m) else jnp.where(jnp.asarray(m), new, p)

  return jax.tree.map(one, params, updates, mask)


# ------------------------------------------------------------------ lean


class _Gather(NamedTuple):
  """How one leaf's selected entries are gathered.

  kind 'all' (whole leaf), 'none', 'axis' (selected indices `idx [L?, k]`
  along `axis`, `valid` marks real vs padding slots) or 'flat' (flat indices).
  """
  kind: str
  axis: int = -1
  idx: Any = None
  valid: Any = None
  stacked: bool = False


def _plan_leaf(m: np.ndarray, shape: tuple[int, ...], stacked: bool) -> _Gather:
  m = np.broadcast_to(m, shape)
  if m.all():
    return _Gather('all')
  if not m.any():
    return _Gather('none')
  first = 1 if stacked else 0
  for axis in range(len(shape) - 1, first - 1, -1):
    other = tuple(a for a in range(first, len(shape)) if a != axis)
    sel = m.any(axis=other, keepdims=True) if other else m
    if np.array_equal(np.broadcast_to(sel, shape), m):
      sel = sel.reshape((shape[0], shape[axis]) if stacked else (shape[axis],))
      rows = sel if stacked else sel[None]
      kmax = int(rows.sum(-1).max())
      idx = np.zeros((rows.shape[0], kmax), np.int32)
      valid = np.zeros((rows.shape[0], kmax), bool)
      for r, row in enumerate(rows):
        nz = np.flatnonzero(row)
        idx[r, :len(nz)] = nz
        idx[r, len(nz):] = nz[0] if len(nz) else 0
        valid[r, :len(nz)] = True
      if not stacked:
        idx, valid = idx[0], valid[0]
      return _Gather('axis', axis, idx, valid, stacked)
  return _Gather('flat', idx=np.flatnonzero(m.reshape(-1)).astype(np.int32))


def _gather(x, g: _Gather):
  if g.kind == 'all':
    return x
  if g.kind == 'flat':
    return x.reshape(-1)[g.idx]
  idx = jnp.asarray(g.idx)
  if g.stacked:  # idx [L, k]: per-layer selection along g.axis
    shape = [1] * x.ndim
    shape[0], shape[g.axis] = idx.shape
    return jnp.take_along_axis(x, idx.reshape(shape), axis=g.axis)
  return jnp.take(x, idx, axis=g.axis)


def _scatter(c, g: _Gather, like):
  """Compact updates `c` back into a zero leaf shaped like `like`."""
  if g.kind == 'all':
    return c
  zeros = jnp.zeros(like.shape, c.dtype)
  if g.kind == 'flat':
    return zeros.reshape(-1).at[g.idx].set(c).reshape(like.shape)
  valid = jnp.asarray(g.valid)
  idx = jnp.asarray(g.idx)
  shape = [1] * like.ndim
  if g.stacked:
    shape[0], shape[g.axis] = idx.shape
  else:
    shape[g.axis] = idx.shape[0]
  c = jnp.where(valid.reshape(shape), c, 0)  # padding slots add nothing
  if g.stacked:
    full_idx = jnp.broadcast_to(idx.reshape(shape), c.shape)
    layer_idx = jnp.broadcast_to(
        jnp.arange(like.shape[0]).reshape([-1] + [1] * (like.ndim - 1)),
        c.shape)
    index = [layer_idx] + [
        jnp.broadcast_to(
            jnp.arange(c.shape[a]).reshape(
                [1] * a + [-1] + [1] * (like.ndim - a - 1)), c.shape)
        for a in range(1, like.ndim)]
    index[g.axis] = full_idx
    return zeros.at[tuple(index)].add(c)
  index = [slice(None)] * like.ndim
  index[g.axis] = idx
  return zeros.at[tuple(index)].add(c)


def plan_lean(mask: Params, params: Params) -> Params:
  """Per-leaf gather plans (host numpy indices) for `lean_adamw`."""

  def walk(m, p, stacked):
    if isinstance(p, dict):
      return {k: walk(m[k], v, stacked or k == 'layers') for k, v in p.items()}
    return _plan_leaf(m, p.shape, stacked)

  return walk(mask, params, False)


def _is_plan(x) -> bool:
  return isinstance(x, _Gather)


def lean_adamw(inner: optax.GradientTransformation,
               plans: Params) -> optax.GradientTransformation:
  """Runs `inner` (clip + AdamW) only on the gathered selected slices.

  Frozen leaves (plan 'none') are dropped from the compact tree entirely, so
  the optimizer state holds exactly the selected columns/rows (plus padding
  when layers select different counts).
  """

  def compact(tree, zero_padding=False):
    def one(g, x):
      if g.kind == 'none':
        return None
      c = _gather(x, g)
      if zero_padding and g.kind == 'axis':  # padding must not feed the clip
        shape = [1] * x.ndim
        if g.stacked:
          shape[0], shape[g.axis] = g.valid.shape
        else:
          shape[g.axis] = g.valid.shape[0]
        c = jnp.where(jnp.asarray(g.valid).reshape(shape), c, 0)
      return c
    return jax.tree.map(one, plans, tree, is_leaf=_is_plan)

  def init(params):
    return inner.init(compact(params))

  def update(updates, state, params=None):
    cu = compact(updates, zero_padding=True)
    cp = None if params is None else compact(params)
    new_cu, state = inner.update(cu, state, cp)
    full = jax.tree.map(
        lambda g, c, x: (jnp.zeros_like(x) if g.kind == 'none' else
                         _scatter(c, g, x)),
        plans, new_cu, updates, is_leaf=_is_plan)
    return full, state

  return optax.GradientTransformation(init, update)


# ----------------------------------------------------------- the builder


class Optimizer(NamedTuple):
  """What the train loop needs: the transformation, the mask it writes
  through (None = everything moves) and the lr schedule."""
  tx: optax.GradientTransformation
  write_mask: Params | None
  schedule: Callable[[Any], Any]


def _adamw(train_cfg, schedule) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(float(train_cfg.clip_norm))
      if train_cfg.clip_norm else optax.identity(),
      optax.adamw(schedule, b1=float(getattr(train_cfg, 'b1', 0.9)),
                  b2=float(getattr(train_cfg, 'b2', 0.999)),
                  eps=float(getattr(train_cfg, 'eps', 1e-8)),
                  weight_decay=float(train_cfg.weight_decay)))


def make_optimizer(train_cfg, params: Params, mask=None) -> Optimizer:
  """Builds the optimizer for `train_cfg.scope` (see module docstring).

  Args:
    train_cfg: reads lr, num_steps, warmup_frac, schedule, weight_decay,
      clip_norm, scope, lean.
    params: the params (or ShapeDtypeStructs) to train.
    mask: bool pytree aligned with params (True = trainable); required for
      `channels` and `modules`.

  Raises:
    ValueError for an unknown scope, a missing or empty mask, or lean with a
    scope other than channels.
  """
  scope = train_cfg.scope
  if scope not in SCOPES:
    raise ValueError(f'train.scope={scope!r}: expected one of {SCOPES}')
  lean = bool(getattr(train_cfg, 'lean', False))
  if lean and scope != 'channels':
    raise ValueError(f'train.lean=True needs train.scope=channels, got '
                     f'{scope!r}')
  schedule = make_schedule(train_cfg)
  inner = _adamw(train_cfg, schedule)
  if scope == 'full':
    return Optimizer(inner, None, schedule)
  if mask is None:
    raise ValueError(f'train.scope={scope!r} needs a channel mask')
  mask = normalize_mask(mask, params)
  if mask_counts(mask, params)[0] == 0:
    raise ValueError('the channel mask selects no entries: nothing to train')
  if scope == 'modules':
    mask = module_mask(mask, params)
  elif lean:
    tx = lean_adamw(inner, plan_lean(mask, params))
    return Optimizer(tx, mask, schedule)
  # Leaves with no selected entry keep no state (set_to_zero), the rest keep
  # full-shape moments of which only the masked entries ever become nonzero.
  # The mask is applied before the chain (so clipping sees only trainable
  # gradients) and to the final updates (so weight decay cannot leak).
  labels = jax.tree.map(lambda m: 'freeze' if _is_none(m) else 'train', mask)
  tx = optax.chain(
      masked_updates(mask),
      optax.multi_transform({'train': inner, 'freeze': optax.set_to_zero()},
                            labels),
      masked_updates(mask))
  return Optimizer(tx, mask, schedule)


def tree_bytes(tree) -> int:
  """Bytes held by the array leaves of a pytree (state or its eval_shape)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, 'shape'))


def opt_state_bytes(tx: optax.GradientTransformation, params: Params) -> int:
  """Optimizer-state bytes of `tx` for `params` (no allocation)."""
  return tree_bytes(jax.eval_shape(tx.init, params))
