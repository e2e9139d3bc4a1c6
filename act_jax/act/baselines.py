"""Merging baselines on param pytrees (docs/method.md, "Baselines").

All functions take and return plain param trees (the same API as
`transfer.transplant`) and run jitted per leaf on device:
  full_copy(target, source)                  the source itself
  linear_interpolation(a, b, t)              (1 - t) a + t b
  average(models)                            the mean of K models
  task_arithmetic(base, sources, lam)        base + lam * sum_k (s_k - base)
  ties(base, sources, density, lam)          trim each task vector to its
      top-`density` magnitudes per tensor, elect the sign per entry by the
      sign of the summed trimmed deltas, disjoint mean of the agreeing
      ones, base + lam * that (Yadav et al. 2023; mergekit 'ties' defaults)
  dare(base, sources, drop, seed, combine)   drop each delta entry with
      probability `drop`, rescale kept ones by 1 / (1 - drop) (Yu et al.
      2023), then task arithmetic or TIES (without re-trimming)
  merge_tensor(method, base, sources, ...)   one HF tensor of TA / TIES /
      DARE, the same arithmetic (act/stream.py merges out of core with it)
  budget_matched_mask(act_mask, scores)      weight-diff or random channels
      with the same count per (site, layer) as an ACT mask
"Per tensor" means per HF tensor: a stacked layer leaf [L, ...] is trimmed
per layer slice, and DARE draws each layer slice from its own key, so
results match tools that see one tensor per layer and `merge_tensor`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from act_jax.act import masks as masks_lib
from act_jax.act import localize
from act_jax.act import transfer


def _check(base, sources):
  if not sources:
    raise transfer.TransferError('no source models given')
  for i, s in enumerate(sources):
    transfer.check_compatible(base, s, f'source {i}')


def full_copy(target, source):
  """The source's params (shapes checked against the target)."""
  transfer.check_compatible(target, source)
  return source


@functools.partial(jax.jit, static_argnames=('t',))
def _lerp(a, b, t):
  return jax.tree.map(
      lambda x, y: (x.astype(jnp.float32) * (1 - t) +
                    y.astype(jnp.float32) * t).astype(x.dtype), a, b)


def linear_interpolation(a, b, t: float = 0.5):
  """(1 - t) * a + t * b, leaf by leaf, in float32."""
  transfer.check_compatible(a, b)
  return _lerp(a, b, t=float(t))


@jax.jit
def _mean(models):
  return jax.tree.map(
      lambda *xs: (sum(x.astype(jnp.float32) for x in xs) /
                   len(xs)).astype(xs[0].dtype), *models)


def average(models: Sequence[Any]):
  """The mean of K models, leaf by leaf, in float32 (merge 'linear')."""
  if not models:
    raise transfer.TransferError('no models given')
  for i, m in enumerate(models[1:], start=1):
    transfer.check_compatible(models[0], m, f'model {i}')
  return _mean(tuple(models))


def _layered(path) -> bool:
  return bool(path) and getattr(path[0], 'key', None) == 'layers'


def _trim_magnitude(d, density: float, layered: bool):
  """Keeps the top-k |d| entries per tensor (per layer slice if layered).

  k = max(1, int(density * n)) like mergekit; ties in |d| keep the lower
  flat index (what a stable descending sort would keep). No sort: the k-th
  largest |d| is found by a 31-step bisection on the float32 bit patterns
  (monotone for non-negative floats), so the cost is ~32 passes over the
  tensor on any device (XLA:CPU's sort of a 28M-entry embedding takes
  minutes).
  """
  if density >= 1.0:
    return d
  x = d.reshape((d.shape[0], -1)) if layered else d.reshape((1, -1))
  n = x.shape[1]
  k = max(1, int(density * n))
  bits = jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)),
                                      jnp.int32)
  rows = x.shape[0]

  def step(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo + 1) // 2
    ok = jnp.sum(bits >= mid[:, None], axis=1) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  lo = jnp.zeros((rows,), jnp.int32)
  hi = jnp.full((rows,), 0x7f800000, jnp.int32)  # +inf
  t, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
  above = bits > t[:, None]
  eq = bits == t[:, None]
  need = k - jnp.sum(above, axis=1, keepdims=True)
  keep = above | (eq & (jnp.cumsum(eq, axis=1) <= need))
  return jnp.where(keep, x, 0).reshape(d.shape)


def _deltas(b, ss, keep_masks, rescale):
  """Float32 base and stacked task vectors `[K, ...]` (DARE-dropped)."""
  b32 = b.astype(jnp.float32)
  deltas = []
  for i, s in enumerate(ss):
    d = s.astype(jnp.float32) - b32
    if keep_masks is not None:
      d = jnp.where(keep_masks[i], d * rescale, 0.0)
    deltas.append(d)
  return b32, jnp.stack(deltas)


def _combine(b32, d_k, lam, consensus: bool, dtype):
  if consensus:
    sign = jnp.where(jnp.sum(d_k, 0) >= 0, 1.0, -1.0)
    agree = jnp.sign(d_k) == sign
    num = jnp.sum(jnp.where(agree, d_k, 0.0), 0)
    den = jnp.sum(agree.astype(jnp.float32), 0)
    mixed = num / jnp.where(den == 0, 1.0, den)
  else:
    mixed = jnp.sum(d_k, 0)
  return (b32 + lam * mixed).astype(dtype)


@functools.partial(jax.jit, static_argnames=('layered', 'lam', 'density',
                                             'consensus', 'drop'))
def _gta_leaf(b, ss, key, j, layer, *, layered, lam, density, consensus,
              drop):
  """One leaf (or one layer slice, `layer` >= 0) of the generalized task
  arithmetic (TA / TIES / DARE)."""
  keep = None
  if drop > 0:
    keep = [_keep(key, i, j, b.shape, drop, layered, layer)
            for i in range(len(ss))]
  b32, d_k = _deltas(b, ss, keep, 1.0 / (1.0 - drop))
  if density < 1.0:
    d_k = jnp.stack([_trim_magnitude(d, density, layered) for d in d_k])
  return _combine(b32, d_k, lam, consensus, b.dtype)


def _gta(base, sources, seed, *, lam, density, consensus, drop):
  """Leaf by leaf (one small compiled function per leaf shape and kind)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(base)
  src_leaves = [jax.tree_util.tree_leaves(s) for s in sources]
  key = jax.random.key(seed)
  out = []
  for j, (path, b) in enumerate(leaves):
    out.append(_gta_leaf(b, tuple(s[j] for s in src_leaves), key, j, -1,
                         layered=_layered(path),
                         lam=lam, density=density, consensus=consensus,
                         drop=drop))
  return jax.tree_util.tree_unflatten(treedef, out)


def _keep(key, source_index, leaf_index, shape, drop, layered=False,
          layer=-1):
  """DARE keep mask. A stacked layer leaf draws each layer slice from its
  own key (`fold_in(layer)`), so one HF tensor's draw (`layer` >= 0) is the
  same whether the whole leaf or only that tensor is in memory."""
  k = jax.random.fold_in(jax.random.fold_in(key, source_index), leaf_index)
  if layered:
    return jax.vmap(lambda l: jax.random.bernoulli(
        jax.random.fold_in(k, l), 1.0 - drop, shape[1:]))(
            jnp.arange(shape[0]))
  layer = jnp.asarray(layer, jnp.int32)
  k = jnp.where(layer >= 0,
                jax.random.key_data(jax.random.fold_in(
                    k, jnp.maximum(layer, 0))),
                jax.random.key_data(k))
  return jax.random.bernoulli(jax.random.wrap_key_data(k), 1.0 - drop,
                              shape)


@functools.partial(jax.jit, static_argnames=('shape', 'drop', 'layered'))
def dare_keep_mask(key, source_index: int, leaf_index: int, shape,
                   drop: float, layered: bool = False, layer: int = -1):
  """The DARE keep mask of one (source, leaf): Bernoulli(1 - drop), seeded.

  `layered`: the leaf is stacked over layers (`[L, ...]`, under `layers`);
  `layer` >= 0: one layer slice of such a leaf. Public so tests and
  references can reproduce the exact draw.
  """
  return _keep(key, source_index, leaf_index, shape, drop, layered, layer)


def merge_tensor(method: str, base, sources: Sequence[Any], *,
                 leaf_index: int, layer: int | None = None,
                 lam: float = 1.0, density: float = 1.0, drop: float = 0.0,
                 seed: int = 0, combine: str = 'task_arithmetic'):
  """One tensor of task_arithmetic | ties | dare, as the tree functions.

  Args:
    base, sources: one leaf of the base and of each source, or one layer
      slice of a stacked leaf (in param layout: an HF tensor transposed
      where `hf_names` says so).
    leaf_index: the leaf's index in the flattened param tree (DARE draws).
    layer: the layer of a slice of a stacked leaf, None for a whole leaf
      that is not stacked.
    lam, density, drop, seed, combine: as `task_arithmetic`, `ties`,
      `dare` (TIES: `density`, sign consensus; DARE: `drop`, `combine`).

  Returns the result in `base`'s dtype; equal to the tree function's leaf
  (slice) up to float rounding of a differently fused program.
  """
  if method == 'task_arithmetic':
    density, consensus, drop = 1.0, False, 0.0
  elif method == 'ties':
    consensus, drop = True, 0.0
  elif method == 'dare':
    consensus = combine == 'ties'
  else:
    raise transfer.TransferError(f'method {method!r}: one of '
                                 'task_arithmetic, ties, dare')
  return _gta_leaf(base, tuple(sources), jax.random.key(int(seed)),
                   leaf_index, -1 if layer is None else int(layer),
                   layered=False, lam=float(lam), density=float(density),
                   consensus=consensus, drop=float(drop))


def task_arithmetic(base, sources: Sequence[Any], lam: float = 1.0):
  """base + lam * sum_k (source_k - base)."""
  _check(base, sources)
  return _gta(base, tuple(sources), 0, lam=float(lam), density=1.0,
              consensus=False, drop=0.0)


def ties(base, sources: Sequence[Any], density: float = 0.2,
         lam: float = 1.0):
  """TIES-merging: trim (top `density` per tensor), elect sign, disjoint mean.

  Matches mergekit 'ties' with weight 1 per model, normalize=True: sign by
  the sum of trimmed deltas (>= 0 counts as +), mean over agreeing nonzero
  entries.
  """
  _check(base, sources)
  localize.check_frac(density, '--density')
  return _gta(base, tuple(sources), 0, lam=float(lam),
              density=float(density), consensus=True, drop=0.0)


def dare(base, sources: Sequence[Any], drop: float = 0.9, seed: int = 0,
         combine: str = 'task_arithmetic', lam: float = 1.0,
         density: float = 1.0):
  """DARE: drop-and-rescale task vectors, then task arithmetic or TIES.

  Args:
    drop: drop probability p in [0, 1); kept entries are scaled 1 / (1 - p).
    seed: PRNG seed (same seed, same result).
    combine: 'task_arithmetic' or 'ties' (sign election + disjoint mean;
      trimmed to `density` after the drop, 1.0 = no trim).
  """
  _check(base, sources)
  if not 0.0 <= drop < 1.0 or math.isnan(drop):
    raise transfer.TransferError(f'--drop={drop!r} must be in [0, 1)')
  if combine not in ('task_arithmetic', 'ties'):
    raise transfer.TransferError(f'--combine={combine!r}: one of '
                                 'task_arithmetic, ties')
  return _gta(base, tuple(sources), int(seed), lam=float(lam),
              density=float(density), consensus=combine == 'ties',
              drop=float(drop))


def budget_matched_mask(act_mask: masks_lib.Mask,
                        scores: Mapping[str, np.ndarray]) -> masks_lib.Mask:
  """Top channels by `scores` with the ACT mask's count per (site, layer)."""
  counts = {s: np.asarray(m).sum(-1) for s, m in act_mask.items()}
  return localize.budget_matched(counts, scores)


def weight_diff_mask(act_mask: masks_lib.Mask, source, target
                     ) -> masks_lib.Mask:
  """Weight-diff channels at the ACT mask's budget."""
  s = localize.weight_scores(source, target, list(act_mask))
  return budget_matched_mask(act_mask, s)


def random_mask(act_mask: masks_lib.Mask, seed: int = 0) -> masks_lib.Mask:
  """Random channels at the ACT mask's budget (seeded)."""
  shapes = {s: np.shape(m) for s, m in act_mask.items()}
  return budget_matched_mask(act_mask,
                             localize.random_scores(shapes, seed))
