"""Statistics -> channel scores -> channel masks, with the analyses.

Library: `localize(stats, source, target, ...) -> Localized(mask, scores,
meta)` on a loaded `stats_io.Stats`; `write_localized(out_dir, ...)` writes
the output directory.

CLI:
  python -m act_jax.localize --stats=DIR --out=DIR \
      [--source=0 --target=1 --score=mean_abs_diff --select=per_site \
       --top_frac=0.05 --unit=channel --baselines --compare_stats=DIR2 \
       --other_masks=DIR,...]
Output directory (atomic):
  channels.json summary.json meta.json   the ACT mask (a mask directory)
  scores.safetensors                     float32 `[L, C]` score per site
  analysis.json                          concentration (+ stability,
                                         disentanglement, act-vs-weight)
  *.png                                  heatmap, curves, overlap bars
  baselines/{weight_diff,random}/        same-budget masks (--baselines)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from safetensors.numpy import save_file

from act_jax import analysis
from act_jax import masks as masks_lib
from act_jax import scores as scores_lib
from act_jax import selection
from act_jax import stats_io

SCORES_FILE = 'scores.safetensors'
ANALYSIS_FILE = 'analysis.json'


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
             score: str = scores_lib.DEFAULT_SCORE,
             select: str = 'per_site',
             top_frac: float = selection.DEFAULT_TOP_FRAC,
             threshold: float | None = None, mass: float | None = None,
             overrides: Mapping[str, float] | None = None,
             sites: Sequence[str] | None = None, unit: str = 'channel',
             seed: int = 0, params_src=None, params_tgt=None,
             cfg=None) -> Localized:
  """Scores and selects the channels where `source` differs from `target`.

  Args:
    stats: a loaded statistics artifact.
    source, target: model index, path, or path basename in the stats.
    score: one of `scores.SCORES`.
    select, top_frac, threshold, mass, overrides: see `selection`.
    sites: sites to localize (default: the transferable sites in stats).
    unit: 'channel', 'neuron' or 'head' (masks.couple; needs `cfg`).
    seed: for score='random'.
    params_src, params_tgt: params, for score='weight_diff'.
    cfg: ModelConfig (default: from the stats manifest).
  """
  if select in ('per_site', 'global'):
    selection.check_frac(top_frac, '--top_frac')
  if cfg is None:
    from act_jax.model_config import ModelConfig  # pylint: disable=g-import-not-at-top
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
  s = scores_lib.channel_scores(stats.arrays, stats.count, i, j, score,
                                sites=sites, params_src=params_src,
                                params_tgt=params_tgt, seed=seed)
  mask = selection.select_channels(s, select, top_frac, threshold, mass,
                                   overrides)
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


def _scores_bytes(scores: Mapping[str, np.ndarray], tmp: str) -> None:
  save_file({k: np.ascontiguousarray(v, np.float32)
             for k, v in scores.items()}, os.path.join(tmp, SCORES_FILE))


def load_scores(mask_dir: str) -> dict[str, np.ndarray]:
  """The per-site scores saved beside a mask (for merge --policy=max_score)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(mask_dir, SCORES_FILE)
  if not os.path.isfile(path):
    raise LocalizeError(f'{mask_dir}: no {SCORES_FILE} (needed for '
                        '--policy=max_score)')
  return load_file(path)


def write_localized(out_dir: str, result: Localized,
                    baseline_masks: Mapping[str, masks_lib.Mask] | None = None,
                    analyses: Mapping[str, Any] | None = None,
                    plots: bool = True) -> str:
  """Writes the output directory (see module doc) atomically."""
  from act_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from act_jax import plots as plots_lib  # pylint: disable=g-import-not-at-top
  analyses = dict(analyses or {})
  analyses.setdefault('concentration', analysis.concentration(result.scores))
  with checkpoint.atomic_dir(out_dir, overwrite=True) as tmp:
    for name, content in masks_lib.mask_files(result.mask,
                                              result.meta).items():
      with open(os.path.join(tmp, name), 'w') as f:
        json.dump(content, f, indent=1, sort_keys=True)
    _scores_bytes(result.scores, tmp)
    with open(os.path.join(tmp, ANALYSIS_FILE), 'w') as f:
      json.dump(analyses, f, indent=1, sort_keys=True)
    for kind, m in (baseline_masks or {}).items():
      masks_lib.save_masks(os.path.join(tmp, 'baselines', kind), m,
                           dict(result.meta, kind=kind))
    if plots:
      conc = analyses['concentration']
      plots_lib.concentration_heatmap(
          conc, os.path.join(tmp, 'concentration_heatmap.png'))
      plots_lib.concentration_curves(
          conc, os.path.join(tmp, 'concentration_curves.png'))
      bars = {}
      for key in ('act_vs_weight', 'stability'):
        if key in analyses:
          bars[key] = analyses[key]
      for key, v in analyses.get('disentanglement', {}).items():
        bars[key] = v
      if bars:
        plots_lib.overlap_bars(bars, os.path.join(tmp, 'overlap.png'))
  return out_dir


# ---------------------------------------------------------------- CLI


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags
  f.DEFINE_string('stats', None, 'Statistics directory (act_jax.collect).')
  f.DEFINE_string('out', None, 'Output directory (mask + analyses).')
  f.DEFINE_string('source', '0', 'Model with the ability: index, path or '
                  'basename in the stats manifest.')
  f.DEFINE_string('target', '1', 'Model that receives it.')
  f.DEFINE_enum('score', scores_lib.DEFAULT_SCORE, scores_lib.SCORES,
                'Channel score.')
  f.DEFINE_enum('select', 'per_site', selection.METHODS, 'Selection rule.')
  f.DEFINE_float('top_frac', selection.DEFAULT_TOP_FRAC,
                 'rho in (0, 1] for per_site / global (k = ceil(rho * C)).')
  f.DEFINE_float('threshold', None, 'Absolute score threshold.')
  f.DEFINE_float('mass', None, 'Score mass fraction in (0, 1] (select=mass).')
  f.DEFINE_string('site_overrides', '', 'JSON {site regex: value} replacing '
                  'the selection value per site, e.g. {"mlp\\\\..*": 0.1}.')
  f.DEFINE_list('sites', None, 'Sites (default: transferable sites in stats).')
  f.DEFINE_enum('unit', 'channel', masks_lib.UNITS, 'Grow to whole units.')
  f.DEFINE_integer('seed', 0, 'Seed for random scores / random baseline.')
  f.DEFINE_bool('baselines', False, 'Also write weight-diff and random masks '
                'at the same budget (loads the two checkpoints).')
  f.DEFINE_string('compare_stats', None, 'Second stats dir (other probe '
                  'subset / seed): stability of the channel sets.')
  f.DEFINE_list('other_masks', [], 'Mask dirs of other abilities: Jaccard '
                'overlap against random (disentanglement).')
  f.DEFINE_bool('plots', True, 'Write PNG plots.')
  return flags.FLAGS


def _arch(cfg_dict: Mapping[str, Any]) -> dict[str, Any]:
  ignored = ('dtype', 'param_dtype', 'max_position_embeddings')
  return {k: v for k, v in cfg_dict.items() if k not in ignored}


def run_cli(fl) -> str:
  """Runs the CLI with parsed flags `fl`; returns the output dir."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  for name in ('stats', 'out'):
    if not getattr(fl, name):
      raise LocalizeError(f'--{name} is required')
  try:
    overrides = json.loads(fl.site_overrides) if fl.site_overrides else None
  except json.JSONDecodeError as e:
    raise LocalizeError(f'--site_overrides is not JSON: {e}') from e
  if fl.select in ('per_site', 'global'):
    selection.check_frac(fl.top_frac, '--top_frac')
  stats = stats_io.load_stats(fl.stats)
  kw = dict(score=fl.score, select=fl.select, top_frac=fl.top_frac,
            threshold=fl.threshold, mass=fl.mass, overrides=overrides,
            sites=fl.sites, unit=fl.unit, seed=fl.seed)
  params = {}
  if fl.score == 'weight_diff' or fl.baselines:
    from act_jax import checkpoint  # pylint: disable=g-import-not-at-top
    want = _arch(stats.manifest['model_config'])
    for role in ('source', 'target'):
      i = resolve_model(stats, getattr(fl, role), f'--{role}')
      path = stats.model_paths[i]
      cfg, params[role] = checkpoint.load_model(path)
      if _arch(cfg.to_dict()) != want:
        raise LocalizeError(f'{path} ({role}) has a different architecture '
                            f'than the stats in {fl.stats} were collected '
                            'with')
  result = localize(stats, fl.source, fl.target,
                    params_src=params.get('source'),
                    params_tgt=params.get('target'), **kw)
  analyses: dict[str, Any] = {}
  base_masks = {}
  if fl.baselines:
    from act_jax import baselines  # pylint: disable=g-import-not-at-top
    base_masks['weight_diff'] = baselines.weight_diff_mask(
        result.mask, params['source'], params['target'])
    base_masks['random'] = baselines.random_mask(result.mask, fl.seed)
    analyses['act_vs_weight'] = analysis.overlap(result.mask,
                                                 base_masks['weight_diff'])
  if fl.compare_stats:
    other = stats_io.load_stats(fl.compare_stats)
    kw2 = dict(kw, params_src=params.get('source'),
               params_tgt=params.get('target'))
    res2 = localize(other, fl.source, fl.target, **kw2)
    analyses['stability'] = analysis.stability(result.mask, res2.mask)
    analyses['stability']['other_stats'] = os.path.abspath(fl.compare_stats)
  if fl.other_masks:
    sets = {'this': result.mask}
    for d in fl.other_masks:
      sets[os.path.basename(os.path.normpath(d))] = masks_lib.load_masks(d)[0]
    analyses['disentanglement'] = analysis.disentanglement(sets)
  conc = analyses['concentration'] = analysis.concentration(result.scores)
  out = write_localized(fl.out, result, base_masks, analyses, fl.plots)
  logging.info('wrote %s: %d channels (%.2f%%); median fraction for 80%% '
               'mass %.3f', out, masks_lib.count(result.mask),
               100 * masks_lib.summarize(result.mask)['fraction'],
               conc['overall_median']['0.8'])
  return out


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise LocalizeError(f'unexpected arguments {argv[1:]}')
  run_cli(flags.FLAGS)


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
