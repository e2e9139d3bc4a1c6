"""The ACT analyses on scores and channel masks (pure numpy, JSON-able).

  concentration(scores)       per site and layer, the fraction of channels
                              whose top scores hold 50 / 80 / 90% of the
                              layer's score mass, plus the mass curve
  overlap(a, b)               Jaccard of two channel sets per site (and
                              overall) against the exact expectation for
                              random sets of the same sizes
                              (hypergeometric intersection per site-layer)
  disentanglement({name: m})  pairwise `overlap` between abilities' sets
  stability(a, b)             `overlap` of sets from two statistics runs
                              (disjoint probe subsets, sizes or seeds)
Activation- vs weight-based overlap is `overlap(act_mask, weight_mask)`.
The one implementation of the four analyses (docs/method.md): the pipeline's
report, the localize CLI and the studies all read these.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np

MASS_LEVELS = (0.5, 0.8, 0.9)
CURVE_POINTS = 21  # mass curve sampled at channel fractions 0, 0.05, ..., 1


def mass_fraction_lc(s_lc: np.ndarray, mass: float) -> np.ndarray:
  """`[L]`: smallest fraction of channels holding `mass` of each layer's sum.

  A layer with zero total score reports 0.
  """
  s = -np.sort(-np.asarray(s_lc, np.float64), axis=1)
  cum = np.cumsum(s, axis=1)
  total = cum[:, -1:]
  k = (cum < mass * total * (1 - 1e-12)).sum(axis=1) + 1
  k = np.where(total[:, 0] > 0, k, 0)
  return k / s.shape[1]


def mass_curve(s_lc: np.ndarray, points: int = CURVE_POINTS) -> np.ndarray:
  """`[points]`: share of the site's mass in its top x fraction of channels.

  Channels are ranked per layer; the curve averages the layers' curves.
  """
  s = -np.sort(-np.asarray(s_lc, np.float64), axis=1)
  c = s.shape[1]
  cum = np.concatenate([np.zeros((s.shape[0], 1)), np.cumsum(s, 1)], 1)
  total = np.where(cum[:, -1:] > 0, cum[:, -1:], 1.0)
  xs = np.linspace(0, 1, points)
  idx = np.round(xs * c).astype(int)
  return (cum[:, idx] / total).mean(0)


def concentration(scores: Mapping[str, np.ndarray],
                  levels: Sequence[float] = MASS_LEVELS) -> dict[str, Any]:
  """How concentrated the score mass is, per module and summarized.

  A module is one (site, layer); its value at a level is
  `mass_fraction_lc` (the fraction of its channels that holds that share of
  its score mass). Level keys are strings ('0.8') so the result is JSON.

  Returns:
    {'levels', 'curve_x',
     'sites': {site: {'per_layer': {level: [L]}, 'median': {level},
                      'curve': [points]}},
     'overall': {level: {'median', 'q25', 'q75', 'share_le_5pct'}} over
       every module (share_le_5pct: modules holding the level in <= 5% of
       their channels, the paper's "under 5%"),
     'overall_median': {level: median over every module}}
  """
  out: dict[str, Any] = {'levels': list(levels), 'sites': {}}
  pooled = {str(m): [] for m in levels}
  for site, s in scores.items():
    s = np.abs(np.asarray(s))
    per_layer = {str(m): mass_fraction_lc(s, m).tolist() for m in levels}
    for m in levels:
      pooled[str(m)] += per_layer[str(m)]
    out['sites'][site] = {
        'per_layer': per_layer,
        'median': {k: float(np.median(v)) for k, v in per_layer.items()},
        'curve': mass_curve(s).tolist(),
    }
  out['overall'] = {}
  for k, v in pooled.items():
    v = np.asarray(v) if v else np.zeros(1)
    out['overall'][k] = {'median': float(np.median(v)),
                         'q25': float(np.quantile(v, 0.25)),
                         'q75': float(np.quantile(v, 0.75)),
                         'share_le_5pct': float(np.mean(v <= 0.05))}
  out['overall_median'] = {k: v['median'] for k, v in out['overall'].items()}
  out['curve_x'] = np.linspace(0, 1, CURVE_POINTS).tolist()
  return out


def _log_comb(n: int, k: int) -> float:
  return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def expected_random_jaccard(a: int, b: int, n: int) -> float:
  """E[|A n B| / |A u B|] for uniform random A, B of sizes a, b out of n.

  Exact: the intersection is hypergeometric(n, a, b).
  """
  if a == 0 and b == 0:
    return 0.0
  lo, hi = max(0, a + b - n), min(a, b)
  e = 0.0
  for k in range(lo, hi + 1):
    logp = _log_comb(a, k) + _log_comb(n - a, b - k) - _log_comb(n, b)
    e += math.exp(logp) * k / (a + b - k)
  return e


def _jaccard(x: np.ndarray, y: np.ndarray) -> float:
  u = np.logical_or(x, y).sum()
  return float(np.logical_and(x, y).sum() / u) if u else 0.0


def overlap(a: Mapping[str, np.ndarray],
            b: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Jaccard of two masks per site and overall, with random expectations.

  The random expectation of the pooled Jaccard is approximated by the
  ratio of expected intersection and union summed over (site, layer) (each
  site-layer set is drawn independently; exact in expectation of the
  numerator and denominator). Per site: mean of exact per-layer values.
  """
  sites = [s for s in a if s in b]
  out: dict[str, Any] = {'sites': {}}
  inter = union = e_inter = e_union = 0.0
  for s in sites:
    x, y = np.asarray(a[s], bool), np.asarray(b[s], bool)
    if x.shape != y.shape:
      raise ValueError(f'overlap: site {s} shapes {x.shape} vs {y.shape}')
    n = x.shape[1]
    exp_l, jac_l = [], []
    for l in range(x.shape[0]):
      ka, kb = int(x[l].sum()), int(y[l].sum())
      exp_l.append(expected_random_jaccard(ka, kb, n))
      jac_l.append(_jaccard(x[l], y[l]))
      ei = ka * kb / n
      e_inter += ei
      e_union += ka + kb - ei
    i, u = float((x & y).sum()), float((x | y).sum())
    inter += i
    union += u
    out['sites'][s] = {'jaccard': i / u if u else 0.0,
                       'jaccard_per_layer': jac_l,
                       'random_expected_per_layer': exp_l,
                       'random_expected': float(np.mean(exp_l)),
                       'size_a': int(x.sum()), 'size_b': int(y.sum())}
  out['jaccard'] = inter / union if union else 0.0
  out['random_expected'] = e_inter / e_union if e_union else 0.0
  out['ratio_to_random'] = (out['jaccard'] / out['random_expected']
                            if out['random_expected'] else None)
  return out


def disentanglement(masks: Mapping[str, Mapping[str, np.ndarray]]
                    ) -> dict[str, Any]:
  """Pairwise `overlap` of several abilities' channel sets."""
  return {f'{x}|{y}': overlap(masks[x], masks[y])
          for x, y in itertools.combinations(list(masks), 2)}


def stability(a: Mapping[str, np.ndarray],
              b: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Overlap of channel sets from two statistics runs (same selection)."""
  return overlap(a, b)
