"""Localization: statistics -> per-channel scores -> channel masks.

The only implementation of steps 3 and 4 of docs/method.md.

Scores, for one (source, target) model pair, from the collected statistics
(`io.stats` layout: per site `{'sum', 'sum_abs', 'sum_sq': [M, L, C],
'pair_abs_diff': [M, M, L, C]}` float32 sums over the probe tokens, plus
`count: [M]`). A score is a float32 `[L, C]` array per site; higher means
"this channel differs more between the two models":
  mean_abs_diff        mean_t |h_src(t) - h_tgt(t)|  (default; token-aligned)
  diff_of_mean_abs     |mean_t |h_src| - mean_t |h_tgt||
  attribution          mean_t |(h_src - h_tgt)(t) * dL_tgt/dh_tgt(t)| at the
                       target: the difference weighed by its first-order
                       effect on the target's probe loss (statistics
                       collected with attribution, act/attribution.py)
  *_norm               either, divided by the site's mean score over all its
                       layers and channels (makes sites comparable for a
                       global selection)
  weight_diff          ||W_src[:, c] - W_tgt[:, c]||_2 over the kernel column
                       plus the bias entry (needs params; output sites, and
                       the '.in' sites as kernel rows)
  random               uniform [0, 1), seeded per (seed, site)

Selection, scores `{site: [L, C]}` -> masks `{site: [L, C] bool}`:
  per_site   top `rho` of each (site, layer): k = ceil(rho * C) channels (at
             least 1; `rho * C` is rounded to 9 decimals first so 0.1 * 30
             gives 3, not 4).
  global     top `rho` of all channels of all sites and layers together.
  threshold  every channel with score >= `value` (absolute).
  mass       per (site, layer) the smallest top set whose score sum reaches
             `value` (in (0, 1]) of the layer's total score.
Per-site overrides `{regex: value}` replace rho / threshold / mass for the
sites they fully match (first matching pattern wins; not for `global`).
Ties break deterministically: stable sort on descending score, so the lower
(site order, layer, channel) index wins.

`localize(stats, source, target, ...)` does both on a loaded statistics
artifact and returns `Localized(mask, scores, meta)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from act_jax.act import masks as masks_lib
from act_jax.io import stats as stats_io
from act_jax.model import sharding
from act_jax.model.config import ModelConfig

SCORES = ('mean_abs_diff', 'diff_of_mean_abs', 'mean_abs_diff_norm',
          'diff_of_mean_abs_norm', 'attribution', 'attribution_norm',
          'weight_diff', 'random')
ACTIVATION_BASES = ('mean_abs_diff', 'diff_of_mean_abs', 'attribution')
DEFAULT_SCORE = 'mean_abs_diff'

Stats = Mapping[str, Mapping[str, Any]]


class ScoreError(ValueError):
  """Bad score request (unknown score, site, model index, missing stat)."""


def _check_sites(stats: Stats, sites: Sequence[str] | None) -> list[str]:
  known = [s for s in stats if s != 'count']
  if sites is None:
    return known
  unknown = [s for s in sites if s not in known]
  if unknown:
    raise ScoreError(f'unknown site(s) {unknown}; known sites: '
                     f'{", ".join(known)}')
  return list(sites)


def _check_pair(count: np.ndarray, src: int, tgt: int) -> None:
  m = count.shape[0]
  for name, i in (('source', src), ('target', tgt)):
    if not 0 <= i < m:
      raise ScoreError(f'{name} model index {i} out of range [0, {m})')
  if src == tgt:
    raise ScoreError(f'source and target are the same model ({src})')
  if np.any(count[[src, tgt]] <= 0):
    raise ScoreError(f'no tokens counted for models {src}/{tgt}: '
                     f'count={count.tolist()}')


def activation_scores(stats: Stats, count, src: int, tgt: int,
                      score: str = DEFAULT_SCORE,
                      sites: Sequence[str] | None = None
                      ) -> dict[str, np.ndarray]:
  """Activation-based scores `{site: [L, C] float32}` for `src` vs `tgt`.

  Args:
    stats: `{site: {stat: array}}` in the stats artifact layout.
    count: `[M]` tokens counted per model.
    src, tgt: model indices.
    score: one of the activation scores in `SCORES`.
    sites: subset of sites (default: all in `stats`).
  """
  base = score[:-len('_norm')] if score.endswith('_norm') else score
  if base not in ACTIVATION_BASES:
    raise ScoreError(f'{score!r} is not an activation score; activation '
                     f'scores: {", ".join(ACTIVATION_BASES)} (+ _norm)')
  count = np.asarray(count, np.float64).reshape(-1)
  _check_pair(count, src, tgt)
  out = {}
  for site in _check_sites(stats, sites):
    st = stats[site]
    if base == 'mean_abs_diff':
      if 'pair_abs_diff' not in st:
        raise ScoreError(f'site {site}: stats lack pair_abs_diff (collect '
                         'with pairwise=True or use --score=diff_of_mean_abs)')
      # Token-aligned: the same tokens go through every model, so the
      # source's count is the pair's count.
      s = np.asarray(st['pair_abs_diff'][src, tgt], np.float64) / count[src]
    elif base == 'attribution':
      if 'pair_attribution' not in st:
        raise ScoreError(f'site {site}: stats lack pair_attribution (collect '
                         'with attribution, e.g. --config.collect.'
                         'attribution=true)')
      # Row = the model whose loss gradient weighs the difference: the
      # target's (the model the channels go into).
      s = (np.asarray(st['pair_attribution'][tgt, src], np.float64) /
           count[tgt])
    else:
      a = np.asarray(st['sum_abs'][src], np.float64) / count[src]
      b = np.asarray(st['sum_abs'][tgt], np.float64) / count[tgt]
      s = np.abs(a - b)
    if score.endswith('_norm'):
      mean = s.mean()
      s = s / mean if mean > 0 else s
    out[site] = s.astype(np.float32)
  return out


def _site_module(site: str) -> tuple[str, str]:
  """(module path under layers, 'out'|'in') of a transferable site."""
  if site.endswith('.in'):
    return site[:-len('.in')], 'in'
  return site, 'out'


def _module(params: Mapping[str, Any], module: str):
  node = params['layers']
  for p in module.split('.'):
    if p not in node:
      raise ScoreError(f'params have no module layers.{module}')
    node = node[p]
  return node


def weight_scores(params_src, params_tgt,
                  sites: Sequence[str]) -> dict[str, np.ndarray]:
  """`weight_diff` scores: L2 norm of the param difference per channel.

  An output site's channel c is kernel column `[l, :, c]` plus `bias[l, c]`;
  an input site ('mlp.down_proj.in', 'self_attn.o_proj.in') is the kernel
  row `[l, c, :]`. Computed on device; only `[L, C]` comes back.
  """
  out = {}
  for site in sites:
    module, side = _site_module(site)
    if site not in masks_lib.TRANSFERABLE_SITES:
      raise ScoreError(f'weight_diff is undefined for site {site}; sites '
                       f'with weights: {", ".join(masks_lib.TRANSFERABLE_SITES)}')
    a, b = _module(params_src, module), _module(params_tgt, module)
    d = (jnp.asarray(a['kernel'], jnp.float32) -
         jnp.asarray(b['kernel'], jnp.float32))
    sq = jnp.sum(d * d, axis=1 if side == 'out' else 2)
    if side == 'out' and 'bias' in a:
      db = (jnp.asarray(a['bias'], jnp.float32) -
            jnp.asarray(b['bias'], jnp.float32))
      sq = sq + db * db
    out[site] = sharding.to_host(jnp.sqrt(sq)).astype(np.float32)
  return out


def random_scores(shapes: Mapping[str, tuple[int, int]],
                  seed: int = 0) -> dict[str, np.ndarray]:
  """Uniform [0, 1) scores; each site's stream depends only on (seed, site)."""
  out = {}
  for site, shape in shapes.items():
    digest = hashlib.sha256(f'{seed}:{site}'.encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], 'little'))
    out[site] = rng.random(shape, dtype=np.float32)
  return out


def channel_scores(stats: Stats, count, src: int, tgt: int,
                   score: str = DEFAULT_SCORE, *,
                   sites: Sequence[str] | None = None,
                   params_src=None, params_tgt=None,
                   seed: int = 0) -> dict[str, np.ndarray]:
  """Scores `{site: [L, C] float32}` of any kind in `SCORES`.

  `weight_diff` needs `params_src`/`params_tgt` (stats only fix the sites
  and shapes); `random` needs only shapes (taken from `stats`).
  """
  if score not in SCORES:
    raise ScoreError(f'unknown score {score!r}; known: {", ".join(SCORES)}')
  sites = _check_sites(stats, sites)
  if score == 'weight_diff':
    if params_src is None or params_tgt is None:
      raise ScoreError('--score=weight_diff needs the source and target '
                       'params (checkpoints)')
    return weight_scores(params_src, params_tgt, sites)
  if score == 'random':
    shapes = {s: tuple(np.shape(stats[s]['sum'])[-2:]) for s in sites}
    return random_scores(shapes, seed)
  return activation_scores(stats, count, src, tgt, score, sites)


# -------------------------------------------------------------- selection


METHODS = ('per_site', 'global', 'threshold', 'mass')
DEFAULT_TOP_FRAC = 0.05


class SelectError(ValueError):
  """Bad selection arguments; the message names the flag."""


def top_count(rho: float, n: int) -> int:
  """Number of channels kept out of `n` for fraction `rho` (exact rule)."""
  return max(1, math.ceil(round(rho * n, 9))) if n else 0


def check_frac(value: float, flag: str) -> float:
  """`value` as a float in (0, 1], else a SelectError naming `flag`."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise SelectError(f'{flag}={value!r} is not a number') from None
  if not 0.0 < v <= 1.0 or math.isnan(v):
    raise SelectError(f'{flag}={value!r} must be in (0, 1]')
  return v


def _rank_desc(s: np.ndarray) -> np.ndarray:
  """Indices sorting the last axis by descending score; ties: lower first."""
  return np.argsort(-s, axis=-1, kind='stable')


def _site_value(site: str, default: float,
                overrides: Mapping[str, float] | None) -> float:
  for pattern, value in (overrides or {}).items():
    if re.fullmatch(pattern, site):
      return value
  return default


def _check_scores(scores: Mapping[str, np.ndarray]) -> None:
  for site, s in scores.items():
    s = np.asarray(s)
    if s.ndim != 2:
      raise SelectError(f'scores[{site!r}] must be [L, C], got {s.shape}')
    if np.isnan(s).any():
      raise SelectError(f'scores[{site!r}] contain NaN')


def select_top_frac(s_lc: np.ndarray, rho: float) -> np.ndarray:
  """Per layer top ceil(rho * C) channels of one site; `[L, C]` bool."""
  k = top_count(rho, s_lc.shape[1])
  order = _rank_desc(s_lc)[:, :k]
  out = np.zeros(s_lc.shape, bool)
  np.put_along_axis(out, order, True, axis=1)
  return out


def select_mass(s_lc: np.ndarray, mass: float) -> np.ndarray:
  """Per layer smallest top set holding `mass` of the score sum."""
  if (s_lc < 0).any():
    raise SelectError('mass selection needs non-negative scores')
  order = _rank_desc(s_lc)
  sorted_s = np.take_along_axis(s_lc.astype(np.float64), order, axis=1)
  cum = np.cumsum(sorted_s, axis=1)
  total = cum[:, -1:]
  # k = 1 + number of prefixes still below the target (relative tolerance
  # so mass=1.0 does not demand channels beyond float round-off).
  below = cum < mass * total * (1 - 1e-12)
  k = np.where(total[:, 0] > 0, below.sum(axis=1) + 1, 0)
  keep = np.arange(s_lc.shape[1])[None] < k[:, None]
  out = np.zeros(s_lc.shape, bool)
  np.put_along_axis(out, order, keep, axis=1)
  return out


def select_global(scores: Mapping[str, np.ndarray],
                  rho: float) -> dict[str, np.ndarray]:
  """Top ceil(rho * total) channels over all sites and layers."""
  sites = list(scores)
  flat = np.concatenate([np.asarray(scores[s], np.float64).ravel()
                         for s in sites])
  k = top_count(rho, flat.size)
  chosen = np.zeros(flat.size, bool)
  chosen[np.argsort(-flat, kind='stable')[:k]] = True
  out, start = {}, 0
  for s in sites:
    n = np.asarray(scores[s]).size
    out[s] = chosen[start:start + n].reshape(np.shape(scores[s]))
    start += n
  return out


def select_channels(scores: Mapping[str, np.ndarray],
                    method: str = 'per_site',
                    top_frac: float = DEFAULT_TOP_FRAC,
                    threshold: float | None = None,
                    mass: float | None = None,
                    overrides: Mapping[str, float] | None = None
                    ) -> dict[str, np.ndarray]:
  """Channel masks `{site: [L, C] bool}` from scores.

  Args:
    scores: `{site: [L, C]}`.
    method: one of `METHODS`.
    top_frac: rho for per_site / global, in (0, 1].
    threshold: absolute score threshold (method='threshold').
    mass: score mass fraction in (0, 1] (method='mass').
    overrides: `{site regex: value}` replacing the method's value per site.
  """
  if method not in METHODS:
    raise SelectError(f'--select={method!r} unknown; one of '
                      f'{", ".join(METHODS)}')
  _check_scores(scores)
  scores = {s: np.asarray(v, np.float32) for s, v in scores.items()}
  if method == 'global':
    if overrides:
      raise SelectError('--site_overrides cannot be used with --select=global')
    return select_global(scores, check_frac(top_frac, '--top_frac'))
  if method == 'threshold' and threshold is None:
    raise SelectError('--select=threshold needs --threshold')
  if method == 'mass' and mass is None:
    raise SelectError('--select=mass needs --mass')
  default = {'per_site': top_frac, 'threshold': threshold, 'mass': mass}[method]
  flag = {'per_site': '--top_frac', 'threshold': '--threshold',
          'mass': '--mass'}[method]
  for pattern in overrides or {}:
    try:
      re.compile(pattern)
    except re.error as e:
      raise SelectError(f'--site_overrides: bad regex {pattern!r}: {e}') from e
  out = {}
  for site, s in scores.items():
    value = _site_value(site, default, overrides)
    if method == 'per_site':
      out[site] = select_top_frac(s, check_frac(value, flag))
    elif method == 'mass':
      out[site] = select_mass(s, check_frac(value, flag))
    else:
      out[site] = s >= float(value)
  return out


def budget_matched(counts: Mapping[str, np.ndarray],
                   scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Masks with exactly `counts[site][l]` top channels per (site, layer).

  Used for baselines at the same channel budget as an ACT mask (weight-diff
  or random channels): `counts` is `mask.sum(-1)` of that mask.
  """
  out = {}
  for site, k_l in counts.items():
    if site not in scores:
      raise SelectError(f'no scores for site {site!r}; have {list(scores)}')
    s = np.asarray(scores[site], np.float32)
    order = _rank_desc(s)
    keep = np.arange(s.shape[1])[None] < np.asarray(k_l)[:, None]
    m = np.zeros(s.shape, bool)
    np.put_along_axis(m, order, keep, axis=1)
    out[site] = m
  return out


# ------------------------------------------------------------ localize


class LocalizeError(ValueError):
  """Bad localization request; names the flag or file."""


@dataclasses.dataclass
class Localized:
  """A localization result: the mask, the scores it came from, provenance."""
  mask: masks_lib.Mask
  scores: dict[str, np.ndarray]
  meta: dict[str, Any]


def resolve_model(stats: stats_io.Stats, spec: str | int, flag: str) -> int:
  """Index of a model given as index, path, or path basename."""
  paths = stats.model_paths
  s = str(spec)
  if s.lstrip('-').isdigit():
    i = int(s)
    if not 0 <= i < len(paths):
      raise LocalizeError(f'{flag}={s}: index out of range, the stats hold '
                          f'{len(paths)} models: {paths}')
    return i
  hits = [i for i, p in enumerate(paths)
          if s in (p, os.path.basename(os.path.normpath(p)))
          or os.path.realpath(s) == os.path.realpath(p)]
  names = [m.get('name') for m in stats.manifest['models']]
  hits += [i for i, n in enumerate(names) if n == s and i not in hits]
  if len(hits) != 1:
    raise LocalizeError(f'{flag}={s!r} matches {len(hits)} models; the stats '
                        f'hold {paths} (give an index or a unique name)')
  return hits[0]


def default_sites(stats: stats_io.Stats) -> list[str]:
  """The stats' sites that map to params (analysis-only sites dropped)."""
  return [s for s in stats.sites if s in masks_lib.TRANSFERABLE_SITES]


def localize(stats: stats_io.Stats, source: str | int, target: str | int, *,
             score: str = DEFAULT_SCORE,
             select: str = 'per_site',
             top_frac: float = DEFAULT_TOP_FRAC,
             threshold: float | None = None, mass: float | None = None,
             overrides: Mapping[str, float] | None = None,
             sites: Sequence[str] | None = None, unit: str = 'channel',
             seed: int = 0, params_src=None, params_tgt=None,
             cfg=None) -> Localized:
  """Scores and selects the channels where `source` differs from `target`.

  Args:
    stats: a loaded statistics artifact.
    source, target: model index, path, or path basename in the stats.
    score: one of `SCORES`.
    select, top_frac, threshold, mass, overrides: see `select_channels`.
    sites: sites to localize (default: the transferable sites in stats).
    unit: 'channel', 'neuron' or 'head' (masks.couple; needs `cfg`).
    seed: for score='random'.
    params_src, params_tgt: params, for score='weight_diff'.
    cfg: ModelConfig (default: from the stats manifest).
  """
  if select in ('per_site', 'global'):
    check_frac(top_frac, '--top_frac')
  if cfg is None:
    cfg = ModelConfig.from_dict(stats.manifest['model_config'],
                                source=stats.manifest.get('dir', 'stats'))
  if sites is None:
    sites = default_sites(stats)
  else:
    masks_lib.check_sites(sites, known=[
        s for s in stats.sites if s in masks_lib.TRANSFERABLE_SITES],
                          what='--sites')
  if not sites:
    raise LocalizeError(f'no transferable sites in the stats ({stats.sites})')
  i = resolve_model(stats, source, '--source')
  j = resolve_model(stats, target, '--target')
  s = channel_scores(stats.arrays, stats.count, i, j, score, sites=sites,
                     params_src=params_src, params_tgt=params_tgt, seed=seed)
  mask = select_channels(s, select, top_frac, threshold, mass, overrides)
  if unit != 'channel':
    mask = masks_lib.couple(mask, cfg, unit)
  paths = stats.model_paths
  meta = {
      'kind': 'act' if score not in ('weight_diff', 'random') else score,
      'stats_dir': stats.manifest.get('dir'),
      'source': i, 'target': j,
      'source_path': paths[i], 'target_path': paths[j],
      'model_paths': paths,
      'model_config': cfg.to_dict(),
      'score': score, 'select': select, 'top_frac': top_frac,
      'threshold': threshold, 'mass': mass,
      'overrides': dict(overrides or {}), 'unit': unit, 'seed': seed,
  }
  return Localized(mask, s, meta)
