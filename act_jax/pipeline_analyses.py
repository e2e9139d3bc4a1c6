"""The four ACT analyses of a pipeline run, in the shape report.py reads.

Thin adapter over `act_jax.analysis` (the one implementation):
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

from act_jax import analysis


def _percent(level: str) -> str:
  return str(int(round(float(level) * 100)))


def concentration(scores: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """`{'per_site': {site: {'50'|'80'|'90': median fraction}}, 'median'}`."""
  c = analysis.concentration(scores)
  per_site = {s: {_percent(k): v for k, v in d['median'].items()}
              for s, d in c['sites'].items()}
  return {'per_site': per_site,
          'median': {_percent(k): v for k, v in c['overall_median'].items()}}


def jaccard(a: Mapping[str, np.ndarray],
            b: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Pooled Jaccard of two masks and its random expectation."""
  o = analysis.overlap(a, b)
  return {'jaccard': float(o['jaccard']),
          'random_expectation': float(o['random_expected']),
          'size_a': sum(v['size_a'] for v in o['sites'].values()),
          'size_b': sum(v['size_b'] for v in o['sites'].values())}


def run_all(found: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """All four analyses. `found[key]` holds masks act, weight_diff, random,
  half0, half1 and the full `scores` of one (job, ability)."""
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
