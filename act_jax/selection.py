"""Channel selection: scores `{site: [L, C]}` -> channel masks `{site: [L, C]}`.

Methods (ACT_METHOD.md step 4):
  per_site   top `rho` of each (site, layer): k = ceil(rho * C) channels (at
             least 1; `rho * C` is rounded to 9 decimals first so 0.1 * 30
             gives 3, not 4).
  global     top `rho` of all channels of all sites and layers together:
             k = ceil(rho * total).
  threshold  every channel with score >= `value` (absolute).
  mass       per (site, layer) the smallest top set whose score sum reaches
             `value` (in (0, 1]) of the layer's total score; a layer with zero
             total score selects nothing.
Per-site overrides `{regex: value}` replace rho / threshold / mass for the
sites they fully match (first matching pattern wins; not for `global`).
Ties break deterministically: stable sort on descending score, so the lower
(site order, layer, channel) index wins.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np

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
