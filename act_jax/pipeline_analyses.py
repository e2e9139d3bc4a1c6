"""The four ACT analyses over the masks and scores of a run (pure numpy).

  concentration  per site (median over layers) the fraction of channels that
                 holds 50/80/90% of the score mass
  overlap        Jaccard between the ACT channel sets of different abilities,
                 with the expectation for random sets of the same sizes
  act_vs_weight  Jaccard between the activation- and weight-diff sets
  stability      Jaccard between sets selected on two disjoint probe halves,
                 with the random expectation
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping

import numpy as np

MASS_LEVELS = (0.5, 0.8, 0.9)


def mass_fraction(s_c: np.ndarray, mass: float) -> float:
  """Smallest fraction of channels whose scores sum to `mass` of the total."""
  s = np.sort(np.maximum(np.asarray(s_c, np.float64), 0))[::-1]
  total = s.sum()
  if total <= 0:
    return 1.0
  k = int(np.searchsorted(np.cumsum(s) / total, mass - 1e-12)) + 1
  return min(k, len(s)) / len(s)


def concentration(scores: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Per site and mass level: median (over layers) channel fraction."""
  out = {}
  for site, s_lc in scores.items():
    s_lc = np.asarray(s_lc)
    out[site] = {f'{int(m * 100)}': float(np.median(
        [mass_fraction(s_lc[l], m) for l in range(s_lc.shape[0])]))
                 for m in MASS_LEVELS}
  allv = {lvl: float(np.median([v[lvl] for v in out.values()]))
          for lvl in next(iter(out.values()))}
  return {'per_site': out, 'median': allv}


def jaccard(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]
           ) -> dict[str, float]:
  """Jaccard of two masks over all sites, and its random expectation."""
  inter = union = 0
  expect_inter = 0.0
  n_a = n_b = n = 0
  for site in a:
    x, y = np.asarray(a[site], bool), np.asarray(b[site], bool)
    inter += int((x & y).sum())
    union += int((x | y).sum())
    # Random sets of the same sizes per (site, layer): E|X n Y| = kx ky / n.
    for l in range(x.shape[0]):
      expect_inter += x[l].sum() * y[l].sum() / x.shape[1]
    n_a += int(x.sum())
    n_b += int(y.sum())
    n += x.size
  j = inter / union if union else 0.0
  denom = n_a + n_b - expect_inter
  return {'jaccard': float(j),
          'random_expectation': float(expect_inter / denom if denom else 0.0),
          'intersection': inter, 'size_a': n_a, 'size_b': n_b}


def run_all(found: Mapping[str, Mapping[str, Any]], loc_cfg) -> dict[str, Any]:
  """All four analyses. `found[key]` holds masks act, weight_diff, random,
  half0, half1 and the full `scores` of one (job, ability)."""
  del loc_cfg
  out = {'concentration': {}, 'overlap': {}, 'act_vs_weight': {},
         'stability': {}}
  for key, f in found.items():
    out['concentration'][key] = concentration(f['scores'])
    out['act_vs_weight'][key] = jaccard(f['act'], f['weight_diff'])
    out['stability'][key] = jaccard(f['half0'], f['half1'])
  for k1, k2 in itertools.combinations(sorted(found), 2):
    out['overlap'][f'{k1} vs {k2}'] = jaccard(found[k1]['act'],
                                              found[k2]['act'])
  return out
