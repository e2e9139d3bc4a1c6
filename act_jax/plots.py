"""PNG plots of the analyses (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

import os
from typing import Any, Mapping

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def _save(fig, path: str) -> str:
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=110, bbox_inches='tight')
  plt.close(fig)
  os.replace(tmp, path)
  return path


def concentration_heatmap(conc: Mapping[str, Any], path: str,
                          level: str = '0.8') -> str:
  """Site x layer heatmap of the channel fraction holding `level` mass."""
  sites = list(conc['sites'])
  grid = np.array([conc['sites'][s]['per_layer'][level] for s in sites])
  fig, ax = plt.subplots(figsize=(max(4, grid.shape[1] * 0.35 + 2),
                                  0.45 * len(sites) + 1.5))
  im = ax.imshow(grid, aspect='auto', cmap='viridis', vmin=0, vmax=1)
  ax.set_yticks(range(len(sites)), sites)
  ax.set_xlabel('layer')
  ax.set_title(f'fraction of channels holding {float(level):.0%} of the '
               'score mass')
  fig.colorbar(im, ax=ax)
  return _save(fig, path)


def concentration_curves(conc: Mapping[str, Any], path: str) -> str:
  """Per site: share of score mass vs fraction of top channels."""
  fig, ax = plt.subplots(figsize=(5.5, 4))
  xs = conc['curve_x']
  for s, v in conc['sites'].items():
    ax.plot(xs, v['curve'], label=s)
  ax.plot([0, 1], [0, 1], 'k:', label='uniform')
  ax.set_xlabel('fraction of channels (top by score)')
  ax.set_ylabel('fraction of score mass')
  ax.legend(fontsize=7)
  return _save(fig, path)


def overlap_bars(overlaps: Mapping[str, Mapping[str, Any]], path: str,
                 title: str = 'Jaccard overlap vs random') -> str:
  """Bars of observed vs random-expected Jaccard for several comparisons."""
  names = list(overlaps)
  obs = [overlaps[n]['jaccard'] for n in names]
  rnd = [overlaps[n]['random_expected'] for n in names]
  x = np.arange(len(names))
  fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.5))
  ax.bar(x - 0.2, obs, 0.4, label='observed')
  ax.bar(x + 0.2, rnd, 0.4, label='random sets, same sizes')
  ax.set_xticks(x, names, rotation=20, ha='right', fontsize=8)
  ax.set_ylabel('Jaccard')
  ax.set_title(title)
  ax.legend(fontsize=8)
  return _save(fig, path)
