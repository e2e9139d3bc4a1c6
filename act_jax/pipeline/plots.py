"""PNG plots of the analyses and the report (matplotlib Agg; no display)."""

from __future__ import annotations

from typing import Any, Mapping

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from act_jax.io import atomic


def _save(fig, path: str) -> str:
  with atomic.atomic_file(path) as tmp:
    fig.savefig(tmp, dpi=110, bbox_inches='tight', format='png')
  plt.close(fig)
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


def sufficiency_curves(points: Mapping[str, list], ylabel: str,
                       path: str) -> str:
  """Metric vs rho per selector, with 95% interval bars (no fine-tune)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, pts in points.items():
    pts = sorted(pts)
    x = [p[0] for p in pts]
    y = [p[1] for p in pts]
    err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
    ax.errorbar(x, y, yerr=err, marker='o', capsize=3, label=label)
  ax.set_xscale('log')
  ax.set_xlabel('rho (fraction of channels per module)')
  ax.set_ylabel(ylabel)
  ax.set_title('Sufficiency: transplant only (95% bootstrap intervals)')
  ax.legend(fontsize=7)
  return _save(fig, path)


def concentration_bars(analysis: Mapping[str, Any], path: str) -> str:
  """Per (job/ability, score): median fraction of channels for 50/80/90% of
  the score mass, quartile bars, and the 5% line of the paper's claim."""
  conc = analysis.get('concentration', {})
  fig, ax = plt.subplots(figsize=(6, 4))
  levels = ('0.5', '0.8', '0.9')
  for key, per in conc.items():
    for score, c in per.items():
      o = c['overall']
      med = [o[l]['median'] for l in levels]
      err = [[o[l]['median'] - o[l]['q25'] for l in levels],
             [o[l]['q75'] - o[l]['median'] for l in levels]]
      ax.errorbar([float(l) for l in levels], med, yerr=err, marker='o',
                  capsize=3, label=f'{key} {score}')
  ax.axhline(0.05, color='gray', linestyle=':', label='5% of channels')
  ax.set_xlabel('share of score mass')
  ax.set_ylabel('fraction of channels (median module, IQR)')
  ax.set_title('Concentration')
  ax.legend(fontsize=6)
  return _save(fig, path)


def curves_by_run(curves: Mapping[str, Mapping[str, Any]], path: str) -> str:
  """One panel per score: share of score mass vs fraction of top channels
  (mean over sites), one line per run (`{score: {label: (x, y)}}`)."""
  scores = list(curves)
  fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3.6),
                           squeeze=False)
  for ax, score in zip(axes[0], scores):
    for label, (x, y) in curves[score].items():
      ax.plot(x, y, label=label)
    ax.plot([0, 1], [0, 1], 'k:', label='uniform')
    ax.set_title(score, fontsize=9)
    ax.set_xlabel('fraction of channels (top by score)')
    ax.set_ylabel('fraction of score mass')
    ax.legend(fontsize=7)
  return _save(fig, path)


def series_vs_length(points: Mapping[str, list], ylabel: str, title: str,
                     path: str, hline: float | None = None) -> str:
  """Value vs specialist length (log x) per series, with interval bars
  (`{name: [(steps, value, lo, hi)]}`)."""
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for name, pts in points.items():
    pts = sorted(pts)
    x = [p[0] for p in pts]
    y = [p[1] for p in pts]
    err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
    ax.errorbar(x, y, yerr=err, marker='o', capsize=3, label=name)
  if hline is not None:
    ax.axhline(hline, color='gray', linestyle=':')
  if all(p[0] > 0 for pts in points.values() for p in pts):
    ax.set_xscale('log')
  ax.set_xlabel('specialist training steps')
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=6)
  return _save(fig, path)
