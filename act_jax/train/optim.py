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
AdamW runs on those, and `Optimizer.apply` writes the compact updates into
the selected entries only (a scatter-set, see `lean_adamw`).

Slice gradients (channels scope, `make_optimizer(..., slice_grads=True)`,
the default): a layer kernel whose selection is whole columns (or rows) per
layer gets its weight gradient only for those slices, through a zero probe
(`slice_probes`, `slices_tree`, model.decoder.dot_slice_grads), and frozen
leaves get none: with a few percent of channels trainable this skips about
a third of a step's FLOPs. The compact gradients feed lean state directly;
full state scatters them into its dense leaves first. `slice_grads=False`
keeps dense gradients, the reference the tests compare with.

The mask is an ARGUMENT of the update, not a constant inside it: what is
static is only which leaves are wholly trainable, wholly frozen or partly
trainable (`Optimizer.kinds`, and for lean the gather axes); the boolean
entries and the lean gather indices travel as `Optimizer.masks`, passed to
`tx.update(..., masks=...)` and `apply_updates`. So one compiled train step
serves every channel set with the same structure (every selector at one
budget in a sweep).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from act_jax.act import masks

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


def path_key(path) -> str:
  """A leaf's dotted path ('layers.mlp.up_proj.kernel'): the key of the
  flat `kinds` / `masks` dicts."""
  return '.'.join(str(getattr(k, 'key', k)) for k in path)


def leaf_kinds(mask: Params) -> dict[str, str]:
  """`{leaf path: 'all' | 'none' | 'part'}` of a normalized mask (static)."""
  out = {}
  for path, m in jax.tree_util.tree_leaves_with_path(mask):
    out[path_key(path)] = ('all' if np.all(m) else
                           'none' if not np.any(m) else 'part')
  return out


def mask_args(mask: Params, kinds: dict[str, str]) -> dict[str, np.ndarray]:
  """The partly trainable leaves' boolean masks, keyed by leaf path."""
  return {path_key(p): np.asarray(m, bool)
          for p, m in jax.tree_util.tree_leaves_with_path(mask)
          if kinds[path_key(p)] == 'part'}


def _select(tree, kinds, masks, fn):
  """`fn(x, kind, mask_or_None)` over the leaves of `tree`."""
  def one(path, x):
    k = path_key(path)
    return fn(x, kinds[k], masks.get(k) if masks else None)
  return jax.tree_util.tree_map_with_path(one, tree)


def mask_tree(tree, kinds, masks):
  """Zeros the frozen entries of `tree` (grads or updates)."""
  def one(u, kind, m):
    if kind == 'all':
      return u
    if kind == 'none':
      return jnp.zeros_like(u)
    return jnp.where(m, u, jnp.zeros((), u.dtype))
  return _select(tree, kinds, masks, one)


def masked_updates(kinds: dict[str, str],
                   slices: dict[str, bool] | None = None
                  ) -> optax.GradientTransformationExtraArgs:
  """Multiplies updates by the mask given as `update(..., masks=...)`.

  Used first on the gradients and last on the final updates. Leaves that are
  wholly trainable pass through, wholly frozen ones become zeros. Given
  `slices` (the first use), slice gradients passed as `update(...,
  compact=...)` are first scattered into their dense leaves.
  """

  def update(updates, state, params=None, *, masks=None, compact=None,
             **extra):
    del params, extra
    if compact and slices is not None:  # slice gradients into dense leaves
      updates = expand_compact(updates, compact, masks, slices)
    return mask_tree(updates, kinds, (masks or {}).get('write')), state

  return optax.GradientTransformationExtraArgs(
      lambda p: optax.EmptyState(), update)


def expand_compact(tree, compact: dict[str, Any], masks,
                   slices: dict[str, bool]) -> Params:
  """`tree` with the leaves named in `compact` replaced by those compact
  slices scattered into zeros (the full-state optimizer's dense layout)."""
  def one(path, x):
    k = path_key(path)
    if k not in compact:
      return x
    g = _Gather('axis', 1 if slices[k] else 2, masks['idx'][k],
                masks['valid'][k], True)
    return _scatter(compact[k], g, x)
  return jax.tree_util.tree_map_with_path(one, tree)


def apply_updates(params: Params, updates: Params,
                  kinds: dict[str, str] | None = None,
                  write: dict[str, Any] | None = None) -> Params:
  """`params + updates`, writing only trainable entries when `kinds` given.

  `where` rather than `+ 0` keeps frozen entries bitwise equal (even -0.0).
  """
  if kinds is None:
    return optax.apply_updates(params, updates)

  def one(path, p, u):
    k = path_key(path)
    kind = kinds[k]
    if kind == 'none':
      return p
    new = (p.astype(jnp.float32) + u.astype(jnp.float32)).astype(p.dtype)
    return new if kind == 'all' else jnp.where(write[k], new, p)

  return jax.tree_util.tree_map_with_path(one, params, updates)


# ------------------------------------------------------------------ lean


class _Gather(NamedTuple):
  """How one leaf's selected entries are gathered.

  kind 'all' (whole leaf), 'none', 'axis' (selected indices `idx [L?, k]`
  along `axis`, `valid` marks real vs padding slots) or 'flat' (flat indices).
  `idx` / `valid` may be host arrays or the step's traced arguments.
  """
  kind: str
  axis: int = -1
  idx: Any = None
  valid: Any = None
  stacked: bool = False

  @property
  def static(self) -> tuple[str, int, bool]:
    """What the compiled step depends on (not the indices themselves)."""
    return (self.kind, self.axis, self.stacked)


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


def plan_lean(mask: Params, params: Params) -> dict[str, _Gather]:
  """Per-leaf gather plans (host numpy indices), keyed by leaf path."""
  out = {}
  for (path, m), p in zip(jax.tree_util.tree_leaves_with_path(mask),
                          jax.tree.leaves(params)):
    stacked = bool(path) and getattr(path[0], 'key', None) == 'layers'
    out[path_key(path)] = _plan_leaf(m, p.shape, stacked)
  return out


def lean_args(plans: dict[str, _Gather]) -> dict[str, dict[str, Any]]:
  """The plans' indices as step arguments: `{'idx': {path}, 'valid': ...}`."""
  return {'idx': {k: g.idx for k, g in plans.items()
                  if g.kind in ('axis', 'flat')},
          'valid': {k: g.valid for k, g in plans.items() if g.kind == 'axis'}}


def lean_adamw(inner: optax.GradientTransformation,
               static: dict[str, tuple[str, int, bool]],
               init_masks: dict[str, Any]
              ) -> optax.GradientTransformationExtraArgs:
  """Runs `inner` (clip + AdamW) only on the gathered selected slices.

  `static` holds each leaf's `_Gather.static`; the gather indices come with
  every update as `masks={'idx': ..., 'valid': ...}` (see `lean_args`);
  `init_masks` are the ones `init` gathers with (only their shapes matter
  for the state).
  Frozen leaves are dropped from the compact tree entirely, so the optimizer
  state holds exactly the selected columns/rows (plus padding when layers
  select different counts).
  """

  def plan(key, masks):
    kind, axis, stacked = static[key]
    return _Gather(kind, axis, masks['idx'].get(key),
                   masks['valid'].get(key), stacked)

  def init(params):
    return inner.init(compact_tree(params, init_masks))

  def update(updates, state, params=None, *, masks=None, compact=None,
             **extra):
    del extra
    cu = compact_tree(updates, masks, zero_padding=True, given=compact)
    cp = None if params is None else compact_tree(params, masks)
    return inner.update(cu, state, cp)

  def compact_tree(tree, masks, zero_padding=False, given=None):
    given = given or {}

    def one(path, x):
      k = path_key(path)
      return given[k] if k in given else gather(k, x, masks, zero_padding)

    return jax.tree_util.tree_map_with_path(one, tree)

  def gather(key, x, masks, zero_padding):
    g = plan(key, masks)
    if g.kind == 'none':
      return None
    c = _gather(x, g)
    if zero_padding and g.kind == 'axis':  # padding must not feed the clip
      c = jnp.where(_valid_like(g, x), c, 0)
    return c

  def apply(params, updates, masks, ok):
    """Writes the compact updates into `params`: only selected entries are
    touched (a scatter-set; padding slots are dropped), so frozen entries
    stay bitwise; nothing changes where `ok` is False."""
    def one(path, p):
      k = path_key(path)
      g = plan(k, masks)
      if g.kind == 'none':
        return p
      u = _leaf_at(updates, path)
      old = _gather(p, g)
      new = jnp.where(ok, (old.astype(jnp.float32) +
                           u.astype(jnp.float32)).astype(p.dtype), old)
      return _scatter_set(p, new, g)
    return jax.tree_util.tree_map_with_path(one, params)

  return LeanTransformation(init, update, apply)


class LeanTransformation(NamedTuple):
  """`lean_adamw`'s optax-style pair plus `apply(params, compact updates,
  masks, ok)`: its updates are compact (the selected slices only)."""
  init: Callable
  update: Callable
  apply: Callable


def _valid_like(g: _Gather, x):
  """`g.valid` broadcastable against the gathered slices of leaf `x`."""
  shape = [1] * x.ndim
  if g.stacked:
    shape[0], shape[g.axis] = g.valid.shape
  else:
    shape[g.axis] = g.valid.shape[0]
  return jnp.asarray(g.valid).reshape(shape)


def _scatter_set(p, new, g: _Gather):
  """`p` with its selected entries set to `new` (gathered layout)."""
  if g.kind == 'all':
    return new
  if g.kind == 'flat':
    return p.reshape(-1).at[g.idx].set(new).reshape(p.shape)
  # Padding slots repeat a real index: send them out of bounds and drop
  # them, so every real entry is written exactly once (deterministic).
  idx = jnp.where(_valid_like(g, p), _index_like(g, p), p.shape[g.axis])
  if g.stacked:
    layer = jnp.broadcast_to(
        jnp.arange(p.shape[0]).reshape([-1] + [1] * (p.ndim - 1)), new.shape)
    index = [layer] + [
        jnp.broadcast_to(jnp.arange(new.shape[a]).reshape(
            [1] * a + [-1] + [1] * (p.ndim - a - 1)), new.shape)
        for a in range(1, p.ndim)]
    index[g.axis] = jnp.broadcast_to(idx, new.shape)
    return p.at[tuple(index)].set(new, mode='drop')
  index = [slice(None)] * p.ndim
  index[g.axis] = idx.reshape(-1)
  return p.at[tuple(index)].set(new, mode='drop')


def _index_like(g: _Gather, x):
  """`g.idx` broadcastable against the gathered slices of leaf `x`."""
  shape = [1] * x.ndim
  idx = jnp.asarray(g.idx)
  if g.stacked:
    shape[0], shape[g.axis] = idx.shape
  else:
    shape[g.axis] = idx.shape[0]
  return idx.reshape(shape)


def _leaf_at(tree, path):
  for k in path:
    tree = tree[getattr(k, 'key', k)]
  return tree


# ----------------------------------------------------------- the builder


class Optimizer(NamedTuple):
  """What the train step needs.

  tx: `init(params)` / `update(grads, state, params, masks=masks,
    compact=slice_grads)`.
  kinds: static `{leaf path: 'all' | 'none' | 'part'}`; None = every param
    moves (scope full).
  masks: the step's mask argument: `{'write': {path: bool}}` plus, for lean
    and slice gradients, `'idx'` / `'valid'` gather indices; `{}` for scope
    full.
  schedule: the lr schedule.
  static: hashable description of everything the compiled step depends on
    besides shapes (the jitted step is cached by it).
  slices: static `{leaf path: rows?}`: the kernels whose weight gradients
    the step computes only for the selected columns (rows when True), fed to
    `tx.update` as `compact=` (see `slice_probes`); `{}` = dense gradients.
  apply: `(params, updates, masks, ok) -> params`: writes `tx`'s updates
    (compact ones for lean) into the trainable entries only, and changes
    nothing when `ok` is False.
  """
  tx: optax.GradientTransformation
  kinds: dict[str, str] | None
  masks: dict[str, Any]
  schedule: Callable[[Any], Any]
  static: Any
  slices: dict[str, bool]
  apply: Callable[..., Params]


def _adamw(train_cfg, schedule) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(float(train_cfg.clip_norm))
      if train_cfg.clip_norm else optax.identity(),
      optax.adamw(schedule, b1=float(getattr(train_cfg, 'b1', 0.9)),
                  b2=float(getattr(train_cfg, 'b2', 0.999)),
                  eps=float(getattr(train_cfg, 'eps', 1e-8)),
                  weight_decay=float(train_cfg.weight_decay)))


def build_tx(train_cfg, kinds: dict[str, str] | None,
             lean_static: dict[str, tuple[str, int, bool]] | None = None,
             lean_init: dict[str, Any] | None = None,
             slices: dict[str, bool] | None = None):
  """(tx, schedule, apply) from the static structure; mask values come
  later, as `update(..., masks=...)` (lean: `lean_init` for the state's
  shapes); `apply` as `Optimizer.apply`."""
  schedule = make_schedule(train_cfg)
  inner = _adamw(train_cfg, schedule)
  if kinds is None:
    def apply_all(params, updates, masks, ok):
      del masks
      return jax.tree.map(lambda p, n: jnp.where(ok, n, p), params,
                          optax.apply_updates(params, updates))
    return inner, schedule, apply_all
  if lean_static is not None:
    tx = lean_adamw(inner, lean_static, lean_init)
    return tx, schedule, tx.apply
  # Leaves with no selected entry keep no state (set_to_zero), the rest keep
  # full-shape moments of which only the masked entries ever become nonzero.
  # The mask is applied before the chain (so clipping sees only trainable
  # gradients) and to the final updates (so weight decay cannot leak).
  labels = _labels_tree(kinds)
  tx = optax.chain(
      masked_updates(kinds, slices),
      optax.multi_transform({'train': inner, 'freeze': optax.set_to_zero()},
                            labels),
      masked_updates(kinds))

  def apply_dense(params, updates, masks, ok):
    new = apply_updates(params, updates, kinds, masks.get('write'))
    return jax.tree.map(lambda n, p: jnp.where(ok, n, p), new, params)

  return tx, schedule, apply_dense


def _labels_tree(kinds: dict[str, str]):
  """A callable giving multi_transform's labels from the kinds."""
  def labels(tree):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: 'freeze' if kinds[path_key(p)] == 'none' else 'train',
        tree)
  return labels


def slice_leaves(plans: dict[str, _Gather]) -> dict[str, bool]:
  """`{leaf path: rows?}` of the layer kernels whose selection is whole
  columns (rows) per layer: their weight gradients can be computed as
  slices. Other partly trainable leaves (biases, coupled rows + columns)
  keep dense gradients."""
  out = {}
  for k, g in plans.items():
    if (g.kind == 'axis' and g.stacked and k.startswith('layers.') and
        k.endswith('.kernel') and g.axis in (1, 2) and
        np.asarray(g.idx).ndim == 2):
      out[k] = g.axis == 1
  return out


def slice_probes(opt: Optimizer, params: Params, masks) -> dict[str, Any]:
  """Zero probes `{leaf path: [L, d_in, k] | [L, k, d_out]}`, in the
  params' dtype, whose gradients are the selected slices' weight
  gradients (see `slices_tree`)."""
  out = {}
  flat = {path_key(p): x for p, x in
          jax.tree_util.tree_leaves_with_path(params)}
  for k, rows in opt.slices.items():
    x = flat[k]
    n = masks['idx'][k].shape[1]
    shape = ((x.shape[0], n, x.shape[2]) if rows else
             (x.shape[0], x.shape[1], n))
    out[k] = jnp.zeros(shape, x.dtype)
  return out


def slices_tree(probes: dict[str, Any], opt: Optimizer, masks) -> Params:
  """The `slices` tree `forward.apply` takes: per module
  `{'delta_cols'|'delta_rows': probe, 'idx_cols'|'idx_rows': [L, k]}`."""
  tree: Params = {}
  for k, rows in opt.slices.items():
    node = tree
    for name in k.split('.')[:-1]:  # drop 'kernel'
      node = node.setdefault(name, {})
    kind = 'rows' if rows else 'cols'
    node[f'delta_{kind}'] = probes[k]
    node[f'idx_{kind}'] = masks['idx'][k]
  return tree


def zero_slice_padding(grads: dict[str, Any], opt: Optimizer, masks):
  """Slice gradients with the padding slots (layers that select fewer
  entries than the widest) zeroed, as the optimizer expects them."""
  out = {}
  for k, g in grads.items():
    valid = masks['valid'][k]
    shape = ((valid.shape[0], valid.shape[1], 1) if opt.slices[k] else
             (valid.shape[0], 1, valid.shape[1]))
    out[k] = jnp.where(valid.reshape(shape), g, jnp.zeros((), g.dtype))
  return out


def make_optimizer(train_cfg, params: Params, mask=None,
                   slice_grads: bool = True) -> Optimizer:
  """Builds the optimizer for `train_cfg.scope` (see module docstring).

  Args:
    train_cfg: reads lr, num_steps, warmup_frac, schedule, weight_decay,
      clip_norm, scope, lean.
    params: the params (or ShapeDtypeStructs) to train.
    mask: bool pytree aligned with params (True = trainable) or a compact
      channel mask `{site: [L, C]}`; required for `channels` and `modules`.
    slice_grads: scope channels: compute the weight gradients of kernels
      whose selection is whole columns (or rows) per layer only for those
      slices (`Optimizer.slices`); False = dense gradients, then masked
      (the reference the equality tests compare with).

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
  if scope == 'full':
    tx, schedule, apply = build_tx(train_cfg, None, None)
    return Optimizer(tx, None, {}, schedule, ('full',), {}, apply)
  if mask is None:
    raise ValueError(f'train.scope={scope!r} needs a channel mask')
  mask = normalize_mask(mask, params)
  if mask_counts(mask, params)[0] == 0:
    raise ValueError('the channel mask selects no entries: nothing to train')
  if scope == 'modules':
    mask = module_mask(mask, params)
  kinds = leaf_kinds(mask)
  masks = {'write': mask_args(mask, kinds)}
  lean_static, slices = None, {}
  if lean or (slice_grads and scope == 'channels'):
    plans = plan_lean(mask, params)
    if slice_grads and scope == 'channels':
      slices = slice_leaves(plans)
    if lean:
      lean_static = {k: g.static for k, g in plans.items()}
    else:  # full state: only the slice leaves' indices travel
      plans = {k: g for k, g in plans.items() if k in slices}
    masks.update(lean_args(plans))
  tx, schedule, apply = build_tx(train_cfg, kinds, lean_static, masks,
                                 slices)
  static = (tuple(sorted(kinds.items())),
            tuple(sorted(lean_static.items())) if lean_static else None,
            tuple(sorted(slices.items())))
  return Optimizer(tx, kinds, masks, schedule, static, slices, apply)


def tree_bytes(tree) -> int:
  """Bytes held by the array leaves of a pytree (state or its eval_shape)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, 'shape'))


def opt_state_bytes(tx: optax.GradientTransformation, params: Params) -> int:
  """Optimizer-state bytes of `tx` for `params` (no allocation)."""
  return tree_bytes(jax.eval_shape(tx.init, params))
