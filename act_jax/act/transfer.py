"""Channel transplant and multi-source merge on param pytrees.

  transplant(target, source, mask_tree, alpha)
      theta' = theta_tgt + alpha * M * (theta_src - theta_tgt), per leaf,
      in one jitted `jnp.where` (weights stay on device and keep their
      sharding). Leaves whose mask is all False are returned as the very
      same arrays, so an empty mask gives the target bitwise; with alpha = 1
      the masked entries are copied (`where(M, src, tgt)`), so a full mask
      gives the source bitwise.
  merge(base, sources, masks, scores, policy, alpha)
      start from `base`, transplant each source's channel set; a channel
      (site, layer, c) claimed by several sources is resolved by `policy`
      (average | max_score | priority) and listed in the conflict report.
      `plan_merge` (claims -> leaf masks, no weights) and `apply_merge` are
      its halves; they work on whole trees or on one tensor (act.stream).
Every function also takes single arrays as one-leaf trees, so the same
arithmetic runs per HF tensor in the out-of-core path (act/stream.py).
Embeddings, norms and lm_head are untouched unless `include` names them.

CLI: `python -m act_jax.transfer --target=DIR --source=DIR[,...]
--masks=DIR[,...] --out=DIR` (act_jax/transfer.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from act_jax.act import masks as masks_lib

POLICIES = ('average', 'max_score', 'priority')


class TransferError(ValueError):
  """Incompatible params / masks / policy; names the leaf or argument."""


def _flatten(tree, what: str):
  try:
    return jax.tree_util.tree_flatten_with_path(tree)
  except Exception as e:  # pragma: no cover - defensive
    raise TransferError(f'{what}: not a param tree ({e})') from e


def check_compatible(target, other, what: str = 'source') -> None:
  """Raises TransferError naming the first leaf whose path/shape differs."""
  t, t_def = _flatten(target, 'target')
  o, o_def = _flatten(other, what)
  t_paths = {jax.tree_util.keystr(p): x for p, x in t}
  o_paths = {jax.tree_util.keystr(p): x for p, x in o}
  missing = sorted(set(t_paths) - set(o_paths))
  extra = sorted(set(o_paths) - set(t_paths))
  if missing or extra:
    raise TransferError(f'{what} param tree differs from the target: '
                        f'missing {missing[:5]}, extra {extra[:5]}')
  for k, x in t_paths.items():
    if tuple(x.shape) != tuple(o_paths[k].shape):
      raise TransferError(f'{what}: leaf {k} has shape '
                          f'{tuple(o_paths[k].shape)}, target has '
                          f'{tuple(x.shape)}')


def _mix(t, s, m, alpha: float):
  """One leaf: where(m, t + alpha (s - t), t); alpha == 1 copies exactly."""
  s = s.astype(t.dtype)
  if alpha == 1.0:
    return jnp.where(m, s, t)
  t32 = t.astype(jnp.float32)
  new = (t32 + alpha * (s.astype(jnp.float32) - t32)).astype(t.dtype)
  return jnp.where(m, new, t)


@functools.partial(jax.jit, static_argnames=('alpha',))
def _mix_leaves(ts, ss, ms, alpha):
  return tuple(_mix(t, s, m, alpha) for t, s, m in zip(ts, ss, ms))


@functools.partial(jax.jit, static_argnames=('alpha',), donate_argnums=(0,))
def _mix_leaves_donate(ts, ss, ms, alpha):
  return tuple(_mix(t, s, m, alpha) for t, s, m in zip(ts, ss, ms))


def _mask_leaves(mask_tree, n: int, treedef) -> list[np.ndarray | None]:
  leaves, mdef = jax.tree_util.tree_flatten(mask_tree)
  if mdef != treedef or len(leaves) != n:
    raise TransferError('mask tree structure does not match the params '
                        '(build it with masks.leaf_masks(mask, params))')
  out = []
  for m in leaves:
    m = np.asarray(m, bool)
    out.append(m if m.any() else None)
  return out


def transplant(target, source, mask_tree, alpha: float = 1.0, *,
               donate: bool = False):
  """Moves the masked entries of `source` into `target` (see module doc).

  Args:
    target, source: param trees of the same structure and shapes.
    mask_tree: bool tree aligned with the params, leaves broadcastable to
      the leaf shapes (`masks.leaf_masks(channel_mask, target)`).
    alpha: interpolation factor (1 = copy).
    donate: donate the target's touched leaves to the computation (saves
      one copy of them; the caller must not use `target` afterwards).

  Returns:
    The new param tree; untouched leaves are `target`'s own arrays.
  """
  check_compatible(target, source)
  t_leaves, treedef = jax.tree_util.tree_flatten(target)
  s_leaves = jax.tree_util.tree_leaves(source)
  m_leaves = _mask_leaves(mask_tree, len(t_leaves), treedef)
  idx = [i for i, m in enumerate(m_leaves) if m is not None]
  if not idx:
    return target
  fn = _mix_leaves_donate if donate else _mix_leaves
  # Host masks: jit treats them as replicated, also across processes.
  new = fn(tuple(t_leaves[i] for i in idx), tuple(s_leaves[i] for i in idx),
           tuple(m_leaves[i] for i in idx), alpha=float(alpha))
  out = list(t_leaves)
  for i, x in zip(idx, new):
    out[i] = x
  return jax.tree_util.tree_unflatten(treedef, out)


def transplant_channels(target, source, channel_mask: masks_lib.Mask,
                        alpha: float = 1.0, include: Sequence[str] = (),
                        **kw):
  """`transplant` with a compact channel mask `{site: [L, C] bool}`."""
  tree = masks_lib.leaf_masks(channel_mask, target, include=include)
  return transplant(target, source, tree, alpha, **kw)


# ---------------------------------------------------------------- merge


@functools.partial(jax.jit, static_argnames=('alpha',))
def _average_leaves(cur, base, srcs, ms, alpha):
  """Per leaf: base + alpha * mean over claiming sources of (src - base)."""
  out = []
  for i, (c, b) in enumerate(zip(cur, base)):
    b32 = b.astype(jnp.float32)
    num = jnp.zeros(jnp.broadcast_shapes(b.shape, *(m[i].shape for m in ms)),
                    jnp.float32)
    den = jnp.zeros_like(num)
    for s, m in zip(srcs, ms):
      num = num + jnp.where(m[i], s[i].astype(jnp.float32) - b32, 0.0)
      den = den + m[i].astype(jnp.float32)
    new = (b32 + alpha * num / jnp.maximum(den, 1.0)).astype(c.dtype)
    out.append(jnp.where(den > 0, new, c))
  return tuple(out)


def _resolve(masks: Sequence[masks_lib.Mask], names: Sequence[str],
             policy: str, scores, order: Sequence[int]):
  """Per site: disjoint winner masks, shared (averaged) masks, conflicts."""
  k = len(masks)
  sites = []
  for m in masks:
    sites += [s for s in m if s not in sites]
  owned = [dict() for _ in range(k)]
  shared = [dict() for _ in range(k)]
  conflicts = []
  rank = np.empty(k, np.int64)
  rank[np.asarray(order)] = np.arange(k)
  for site in sites:
    shape = next(m[site].shape for m in masks if site in m)
    claims = np.stack([np.asarray(m.get(site, np.zeros(shape, bool)), bool)
                       for m in masks])  # [K, L, C]
    n = claims.sum(0)
    multi = n >= 2
    if policy == 'average':
      winner = None
    elif policy == 'priority':
      key = np.where(claims, -rank[:, None, None], -k - 1)
      winner = np.argmax(key, axis=0)  # highest = earliest in order
    else:
      s = np.stack([np.asarray(scores[i][site], np.float64)
                    for i in range(k)])
      key = np.where(claims, s, -np.inf)
      winner = np.argmax(key, axis=0)  # ties: lower source index
    for i in range(k):
      if winner is None:
        owned[i][site] = claims[i] & ~multi
        shared[i][site] = claims[i] & multi
      else:
        owned[i][site] = claims[i] & (winner == i)
        shared[i][site] = np.zeros(shape, bool)
    for l, c in zip(*np.nonzero(multi)):
      who = [names[i] for i in range(k) if claims[i, l, c]]
      conflicts.append({
          'site': site, 'layer': int(l), 'channel': int(c), 'sources': who,
          'resolved': ('average' if winner is None else
                       names[int(winner[l, c])])})
  return owned, shared, conflicts


@dataclasses.dataclass(frozen=True)
class MergePlan:
  """A resolved merge, before any weight is read.

  `owned[i]` is source i's leaf-mask tree (aligned with the params, or one
  leaf's slice of it: `slice_leaf`) of the entries it alone moves;
  `shared[i]` (policy 'average' only, else None) the entries it shares with
  other claimers, averaged. `order` is the priority order.
  """
  order: tuple[int, ...]
  alpha: float
  owned: tuple[Any, ...]
  shared: tuple[Any, ...] | None
  report: dict[str, Any]

  def slice_leaf(self, path: Sequence[str], layer: int | None) -> 'MergePlan':
    """The plan of one leaf (`path`), or of one layer of a stacked leaf:
    what `apply_merge` needs for one HF tensor (in param layout)."""
    def cut(tree):
      return leaf_slice(tree, path, layer)
    return dataclasses.replace(
        self, owned=tuple(cut(t) for t in self.owned),
        shared=None if self.shared is None else tuple(
            cut(t) for t in self.shared))


def leaf_slice(mask_tree, path: Sequence[str], layer: int | None):
  """Leaf `path` of a leaf-mask tree, cut to `layer` for stacked leaves
  (a broadcast axis of size 1 stays broadcast)."""
  m = mask_tree
  for p in path:
    m = m[p]
  m = np.asarray(m, bool)
  if layer is None:
    return m
  return m[layer] if m.shape[0] > 1 else m[0]


def plan_merge(params_like, masks: Sequence[masks_lib.Mask],
               scores: Sequence[Mapping[str, np.ndarray]] | None = None,
               policy: str = 'average', alpha: float = 1.0, *,
               names: Sequence[str] | None = None,
               priority: Sequence[int] | None = None,
               include: Sequence[str] = ()) -> MergePlan:
  """Resolves the sources' channel claims (see `merge`); reads only the
  shapes of `params_like` (params or `forward.abstract_params`)."""
  k = len(masks)
  if k == 0:
    raise TransferError('merge needs at least one source mask')
  if policy not in POLICIES:
    raise TransferError(f'--policy={policy!r} unknown; one of '
                        f'{", ".join(POLICIES)}')
  if policy == 'max_score' and (scores is None or len(scores) != k):
    raise TransferError('--policy=max_score needs one score dict per source')
  names = list(names or [f'source{i}' for i in range(k)])
  order = list(priority) if priority is not None else list(range(k))
  if sorted(order) != list(range(k)):
    raise TransferError(f'priority {order} is not a permutation of '
                        f'0..{k - 1}')
  owned, shared, conflicts = _resolve(masks, names, policy, scores, order)
  owned_trees = tuple(
      masks_lib.leaf_masks(owned[i], params_like, include=(
          include if (policy != 'average' and i == order[0]) else ()))
      for i in range(k))
  shared_trees = None
  if policy == 'average' and (any(masks_lib.count(m) for m in shared) or
                              include):
    shared_trees = tuple(masks_lib.leaf_masks(m, params_like,
                                              include=include)
                         for m in shared)
  report = {
      'policy': policy, 'alpha': alpha, 'sources': names,
      'priority': [names[i] for i in order],
      'num_conflicts': len(conflicts), 'conflicts': conflicts,
      'channels_per_source': {names[i]: masks_lib.count(masks[i])
                              for i in range(k)},
  }
  return MergePlan(tuple(order), float(alpha), owned_trees, shared_trees,
                   report)


def apply_merge(plan: MergePlan, base, sources: Sequence[Any]):
  """The merged params of a plan: whole trees, or one leaf (slice) of each
  with `plan.slice_leaf` (the same arithmetic either way)."""
  params = base
  # Apply lowest priority first so the earliest source wins any element
  # where a row site and a column site cross.
  for i in reversed(plan.order):
    params = transplant(params, sources[i], plan.owned[i], plan.alpha)
  if plan.shared is None:
    return params
  flat = [jax.tree_util.tree_leaves(t) for t in plan.shared]
  cur, treedef = jax.tree_util.tree_flatten(params)
  base_l = jax.tree_util.tree_leaves(base)
  src_l = [jax.tree_util.tree_leaves(s) for s in sources]
  idx = [j for j in range(len(cur))
         if any(np.asarray(f[j]).any() for f in flat)]
  if not idx:
    return params
  new = _average_leaves(
      tuple(cur[j] for j in idx), tuple(base_l[j] for j in idx),
      tuple(tuple(s[j] for j in idx) for s in src_l),
      tuple(tuple(np.asarray(f[j]) for j in idx) for f in flat),
      alpha=plan.alpha)
  for j, x in zip(idx, new):
    cur[j] = x
  return jax.tree_util.tree_unflatten(treedef, cur)


def merge(base, sources: Sequence[Any], masks: Sequence[masks_lib.Mask],
          scores: Sequence[Mapping[str, np.ndarray]] | None = None,
          policy: str = 'average', alpha: float = 1.0, *,
          names: Sequence[str] | None = None,
          priority: Sequence[int] | None = None,
          include: Sequence[str] = ()) -> tuple[Any, dict[str, Any]]:
  """Merges several sources' channel sets into `base`.

  Args:
    base: the starting params (the base model or any chosen model).
    sources: K param trees with the base's shapes.
    masks: K channel masks `{site: [L, C] bool}` (couple them first if
      whole units are wanted).
    scores: K score dicts `{site: [L, C]}` (needed for 'max_score').
    policy: how a channel claimed by several sources is resolved:
      'average'  base + alpha * mean of the claimers' (src - base);
      'max_score' the claimer with the highest score (ties: lower index);
      'priority' the first claimer in `priority` (default: source order).
    alpha: interpolation factor for every transplant.
    names: source names for the report (default 'source0', ...).
    priority: source indices, most important first.
    include: extra whole leaves (regexes on dotted paths): averaged over
      all sources for 'average', else taken from the first in priority.

  Returns:
    (params, report) with report {'policy', 'num_conflicts', 'conflicts':
    [{site, layer, channel, sources, resolved}], 'channels_per_source'}.
    Elements where a row site and a column site of the same kernel cross
    (only with '.in' sites) go to the later source in priority order.
    `plan_merge` + `apply_merge` are the two halves (act.stream runs them
    one tensor at a time).
  """
  k = len(sources)
  if k == 0 or len(masks) != k:
    raise TransferError(f'merge needs one mask per source: {k} sources, '
                        f'{len(masks)} masks')
  names = list(names or [f'source{i}' for i in range(k)])
  for i, s in enumerate(sources):
    check_compatible(base, s, f'source {names[i]}')
  plan = plan_merge(base, masks, scores, policy, alpha, names=names,
                    priority=priority, include=include)
  return apply_merge(plan, base, sources), plan.report
