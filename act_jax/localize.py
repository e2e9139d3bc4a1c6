"""`python -m act_jax.localize`: statistics -> channel masks, with analyses.

  python -m act_jax.localize --stats=DIR --out=DIR \
      [--source=0 --target=1 --score=mean_abs_diff --select=per_site \
       --top_frac=0.05 --unit=channel --baselines --compare_stats=DIR2 \
       --other_masks=DIR,...]
A thin shell over `act.localize.localize` (what the pipeline's localize
stage runs); the selection flags are the config's `localize.*` fields.
Output directory (atomic):
  channels.json summary.json meta.json   the ACT mask (a mask directory)
  scores.safetensors                     float32 `[L, C]` score per site
  analysis.json                          concentration (+ stability,
                                         disentanglement, act-vs-weight)
  *.png                                  heatmap, curves, overlap bars
  baselines/{weight_diff,random}/        same-budget masks (--baselines)
An existing --out is an error unless --overwrite, and even then only an
act-jax localize output is replaced, never one of the inputs (--stats,
--compare_stats, --other_masks, the models of --baselines); the output is
locked for the run and its folder checked for room first.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from absl import flags
from absl import logging

from act_jax import cli
from act_jax.act import analysis
from act_jax.act import baselines
from act_jax.act import localize as localize_lib
from act_jax.act import masks as masks_lib
from act_jax.io import atomic
from act_jax.io import models as models_io
from act_jax.io import stats as stats_io
from act_jax.pipeline import jobs
from act_jax.pipeline import plots as plots_lib
from act_jax.pipeline import preflight

ANALYSIS_FILE = 'analysis.json'


def define_flags() -> None:
  """The CLI's flags (its own first; config-field names for selection)."""
  flags.DEFINE_string('stats', None, 'Statistics directory (act_jax.collect).')
  flags.DEFINE_string('out', None, 'Output directory (mask + analyses).')
  flags.DEFINE_string('source', '0', 'Model with the ability: index, path or '
                      'basename in the stats manifest.')
  flags.DEFINE_string('target', '1', 'Model that receives it.')
  flags.DEFINE_string('site_overrides', '', 'JSON {site regex: value} '
                      'replacing the selection value per site, e.g. '
                      '{"mlp\\\\..*": 0.1}.')
  flags.DEFINE_list('sites', None, 'Sites (default: transferable sites in '
                    'the stats).')
  flags.DEFINE_bool('baselines', False, 'Also write weight-diff and random '
                    'masks at the same budget (loads the two checkpoints).')
  flags.DEFINE_string('compare_stats', None, 'Second stats dir (other probe '
                      'subset / seed): stability of the channel sets.')
  flags.DEFINE_list('other_masks', [], 'Mask dirs of other abilities: '
                    'Jaccard overlap against random (disentanglement).')
  flags.DEFINE_bool('plots', True, 'Write PNG plots.')
  cli.define_section_flags(jobs.LocalizeConfig)
  cli.define_output_flags()


def write_localized(out_dir: str, result: localize_lib.Localized,
                    baseline_masks: Mapping[str, masks_lib.Mask] | None = None,
                    analyses: Mapping[str, Any] | None = None,
                    plots: bool = True, overwrite: bool = False) -> str:
  """Writes the output directory (see module doc) atomically; an existing
  one is replaced only with `overwrite` and only if it is a localize
  output."""
  analyses = dict(analyses or {})
  analyses.setdefault('concentration', analysis.concentration(result.scores))
  with atomic.atomic_dir(out_dir, overwrite, kind='localize') as tmp:
    masks_lib.write_mask_files(tmp, result.mask, result.meta, result.scores)
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


def run_cli(fl) -> str:
  """Runs the CLI with parsed flags `fl`; returns the output dir."""
  for name in ('stats', 'out'):
    if not getattr(fl, name):
      raise localize_lib.LocalizeError(f'--{name} is required')
  try:
    overrides = json.loads(fl.site_overrides) if fl.site_overrides else None
  except json.JSONDecodeError as e:
    raise localize_lib.LocalizeError(
        f'--site_overrides is not JSON: {e}') from e
  if fl.select in ('per_site', 'global'):
    localize_lib.check_frac(fl.top_frac, '--top_frac')
  preflight.check_ranges('localize', {
      k: getattr(fl, k) for k in ('top_frac', 'threshold', 'mass')},
                         prefix='--')
  stats = stats_io.load_stats(fl.stats)
  out = atomic.check_output(
      fl.out, 'localize', overwrite=fl.overwrite,
      inputs=[fl.stats, fl.compare_stats, *fl.other_masks,
              *stats.model_paths])
  preflight.check_output_space(out, 0, '--out')
  with atomic.output_lock(out):
    return _localize(fl, stats, overrides, out)


def _localize(fl, stats, overrides, out) -> str:
  """Localizes, analyses, writes; under the output's lock."""
  kw = dict(score=fl.score, select=fl.select, top_frac=fl.top_frac,
            threshold=fl.threshold, mass=fl.mass, overrides=overrides,
            sites=fl.sites, unit=fl.unit, seed=fl.seed)
  params = {}
  if fl.score == 'weight_diff' or fl.baselines:
    want = stats.manifest['model_config']
    for role in ('source', 'target'):
      i = localize_lib.resolve_model(stats, getattr(fl, role), f'--{role}')
      path = stats.model_paths[i]
      cfg, params[role] = models_io.load_model(
          path, follow_symlinks=fl.follow_symlinks)
      diff = {k for k, v in cfg.to_dict().items()
              if k not in models_io.ARCH_IGNORED and want.get(k) != v}
      if diff:
        raise localize_lib.LocalizeError(
            f'{path} ({role}) has a different architecture than the stats '
            f'in {fl.stats} were collected with ({sorted(diff)[0]})')
  result = localize_lib.localize(stats, fl.source, fl.target,
                                 params_src=params.get('source'),
                                 params_tgt=params.get('target'), **kw)
  analyses: dict[str, Any] = {}
  base_masks = {}
  if fl.baselines:
    base_masks['weight_diff'] = baselines.weight_diff_mask(
        result.mask, params['source'], params['target'])
    base_masks['random'] = baselines.random_mask(result.mask, fl.seed)
    analyses['act_vs_weight'] = analysis.overlap(result.mask,
                                                 base_masks['weight_diff'])
  if fl.compare_stats:
    other = stats_io.load_stats(fl.compare_stats)
    kw2 = dict(kw, params_src=params.get('source'),
               params_tgt=params.get('target'))
    res2 = localize_lib.localize(other, fl.source, fl.target, **kw2)
    analyses['stability'] = analysis.stability(result.mask, res2.mask)
    analyses['stability']['other_stats'] = os.path.abspath(fl.compare_stats)
  if fl.other_masks:
    sets = {'this': result.mask}
    for d in fl.other_masks:
      sets[os.path.basename(os.path.normpath(d))] = masks_lib.load_masks(d)[0]
    analyses['disentanglement'] = analysis.disentanglement(sets)
  conc = analyses['concentration'] = analysis.concentration(result.scores)
  out = write_localized(out, result, base_masks, analyses, fl.plots,
                        overwrite=fl.overwrite)
  logging.info('wrote %s: %d channels (%.2f%%); median fraction for 80%% '
               'mass %.3f', out, masks_lib.count(result.mask),
               100 * masks_lib.summarize(result.mask)['fraction'],
               conc['overall_median']['0.8'])
  return out


def main(argv):
  if len(argv) > 1:
    raise localize_lib.LocalizeError(f'unexpected arguments {argv[1:]}')
  run_cli(flags.FLAGS)


def console():
  """The `act-jax-localize` console script."""
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  console()
