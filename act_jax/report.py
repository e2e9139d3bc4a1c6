"""The run report, rebuilt from stage artifacts alone.

`build_report(workdir, out_dir, report_cfg)` reads `evaluate/<job>.json`,
`localize/analysis.json`, `localize/<job>/<ability>/scores.npz`,
`build_models/build.json` (toy runs) and every stage's COMPLETE.json, and
writes `report.md`, `results.json` and PNG plots into `out_dir`. Nothing is
recomputed, so `python -m act_jax.report --workdir=DIR` regenerates it.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from act_jax import stages as stages_lib

STAGE_ORDER = ('build_models', 'convert', 'collect', 'localize', 'transfer',
               'finetune', 'evaluate', 'report')


def _read(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _fmt(v: float, metric: str) -> str:
  if metric == 'exact_match':
    return f'{100 * v:.1f}%'
  return f'{v:.3f}'


def results_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
  """Markdown: one row per candidate, one column per ability (its metric)."""
  cols = []
  for per in results.values():
    for a, ms in per.items():
      for m in ms:
        if (a, m) not in cols:
          cols.append((a, m))
  short = {'exact_match': 'acc', 'perplexity': 'ppl'}
  head = ' | '.join(f'{a} {short.get(m, m)}' for a, m in cols)
  lines = [f'| model | {head} |', '|---|' + '---|' * len(cols)]
  for cand, per in results.items():
    cells = [_fmt(per[a][m], m) if a in per and m in per[a] else '-'
             for a, m in cols]
    lines.append(f'| {cand} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _plot(path: str, draw) -> str | None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  fig, ax = plt.subplots(figsize=(7, 3.6))
  draw(ax)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return os.path.basename(path)


def _concentration_plot(analysis, out_dir):
  conc = analysis.get('concentration', {})
  if not conc:
    return None

  def draw(ax):
    keys = sorted(conc)
    sites = list(next(iter(conc.values()))['per_site'])
    w = 0.8 / len(keys)
    for i, k in enumerate(keys):
      vals = [conc[k]['per_site'][s]['80'] for s in sites]
      ax.bar(np.arange(len(sites)) + i * w, vals, w, label=k)
    ax.set_xticks(np.arange(len(sites)) + 0.4 - w / 2)
    ax.set_xticklabels([s.split('.')[-1] for s in sites], fontsize=8)
    ax.set_ylabel('channel fraction for 80% mass')
    ax.axhline(0.05, color='k', lw=0.8, ls='--')
    ax.legend(fontsize=7)
    ax.set_title('Concentration (median over layers; dashed: 5%)')

  return _plot(os.path.join(out_dir, 'concentration.png'), draw)


def _overlap_plot(analysis, out_dir):
  rows = []
  for group in ('overlap', 'act_vs_weight', 'stability'):
    for k, v in sorted(analysis.get(group, {}).items()):
      rows.append((f'{group}: {k}', v['jaccard'], v['random_expectation']))
  if not rows:
    return None

  def draw(ax):
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r[1] for r in rows], 0.4, label='Jaccard')
    ax.barh(y + 0.2, [r[2] for r in rows], 0.4, label='random expectation')
    ax.set_yticks(y)
    ax.set_yticklabels([r[0] for r in rows], fontsize=6)
    ax.legend(fontsize=7)
    ax.set_title('Overlap, weight vs activation, stability')

  return _plot(os.path.join(out_dir, 'overlap.png'), draw)


def _sufficiency_plot(curve, ability, out_dir):
  if not curve:
    return None
  metric = next(iter(curve[0]['act']))

  def draw(ax):
    x = [r['rho'] for r in curve]
    for kind in ('act', 'random', 'weight_diff'):
      ax.plot(x, [r[kind][metric] for r in curve], marker='o', label=kind)
    ax.set_xscale('log')
    ax.set_xlabel('rho (fraction of channels transplanted)')
    ax.set_ylabel(f'{ability} {metric}')
    ax.legend(fontsize=7)
    ax.set_title('Sufficiency: transplant only, no fine-tune')

  return _plot(os.path.join(out_dir, 'sufficiency.png'), draw)


def build_report(workdir: str, out_dir: str, report_cfg=None) -> dict:
  """Writes report.md, results.json and plots; returns a small summary."""
  title = getattr(report_cfg, 'title', None) or 'ACT run'
  os.makedirs(out_dir, exist_ok=True)
  markers = {}
  for s in STAGE_ORDER:
    if stages_lib.is_complete(workdir, s):
      markers[s] = stages_lib.read_marker(workdir, s)
  jobs = {}
  paths = sorted(glob.glob(os.path.join(workdir, 'evaluate', '*.json')),
                 key=lambda p: (not p.endswith('recover.json'), p))
  for path in paths:
    name = os.path.splitext(os.path.basename(path))[0]
    if name != 'COMPLETE':
      jobs[name] = _read(path)
  apath = os.path.join(workdir, 'localize', 'analysis.json')
  analysis = _read(apath) if os.path.isfile(apath) else {}
  bpath = os.path.join(workdir, 'build_models', 'build.json')
  build = _read(bpath) if os.path.isfile(bpath) else None
  loc_cfg = markers.get('localize', {}).get('config')
  results = {
      'title': title, 'jobs': jobs, 'analysis': analysis,
      'toy_build': build and {k: v['scores']
                              for k, v in build['models'].items()},
      'stage_wall_s': {s: m['wall_s'] for s, m in markers.items()},
      'stage_configs': {s: m.get('config') for s, m in markers.items()},
  }
  lines = [f'# {title}', '']
  toy = markers.get('build_models', {}).get('config')
  if toy:
    lines += [f'Seed: {toy[0].get("seed")} (toy), localization config: '
              f'`{json.dumps(loc_cfg[0]) if loc_cfg else "-"}`', '']
  if build:
    lines += ['## Toy models after building (before ACT)', '',
              results_table({k: v['scores'] for k, v in
                             build['models'].items()}), '']
  plots = []
  for name, job in jobs.items():
    ordered = {k: job['results'][k] for k in job.get('order',
                                                      job['results'])}
    lines += [f'## {name}', '', results_table(ordered), '']
    if name == 'recover':
      lines += ['(recover: `source` has the ability and is also the full-'
                'copy baseline; ties / dare / task_arithmetic use the source '
                "as base and the target's delta as the task vector; with one "
                'task vector task_arithmetic(lam) = linear(t = 1 - lam).)', '']
    curve = job.get('sufficiency')
    if curve:
      ability = _job_ability(workdir, name)
      metric = next(iter(curve[0]['act']))
      lines += [f'Sufficiency ({ability} {metric}, transplant only):', '',
                '| rho | channels | act | random | weight_diff |',
                '|---|---|---|---|---|']
      for r in curve:
        lines.append(f'| {r["rho"]} | {r["channels"]} | ' + ' | '.join(
            _fmt(r[k][metric], metric) for k in
            ('act', 'random', 'weight_diff')) + ' |')
      lines.append('')
      p = _sufficiency_plot(curve, ability, out_dir)
      if p:
        plots.append(p)
  if analysis:
    lines += ['## Analyses', '', '### Concentration '
              '(median fraction of channels holding X% of the score mass)',
              '', '| job/ability | 50% | 80% | 90% |', '|---|---|---|---|']
    for k, v in sorted(analysis['concentration'].items()):
      m = v['median']
      lines.append(f'| {k} | {m["50"]:.3f} | {m["80"]:.3f} | {m["90"]:.3f} |')
    for group, label in (('overlap', 'Overlap between abilities'),
                         ('act_vs_weight', 'Activation- vs weight-based'),
                         ('stability', 'Stability across probe halves')):
      lines += ['', f'### {label} (Jaccard vs random expectation)', '',
                '| sets | Jaccard | random |', '|---|---|---|']
      for k, v in sorted(analysis[group].items()):
        lines.append(f'| {k} | {v["jaccard"]:.3f} | '
                     f'{v["random_expectation"]:.3f} |')
    for p in (_concentration_plot(analysis, out_dir),
              _overlap_plot(analysis, out_dir)):
      if p:
        plots.append(p)
  lines += ['', '## Plots', ''] + [f'![{p}]({p})' for p in plots]
  lines += ['', '## Stage wall times (s)', '',
            ' '.join(f'{s}={w}' for s, w in results['stage_wall_s'].items())]
  text = '\n'.join(lines) + '\n'
  stages_lib.write_atomic_json(os.path.join(out_dir, 'results.json'), results)
  tmp = os.path.join(out_dir, 'report.md.tmp')
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, os.path.join(out_dir, 'report.md'))
  return {'plots': plots, 'jobs': sorted(jobs)}


def _job_ability(workdir: str, job: str) -> str:
  d = os.path.join(workdir, 'localize', job)
  subs = sorted(os.listdir(d)) if os.path.isdir(d) else []
  return subs[0] if subs else '?'


def main(argv):
  """Regenerates DIR/report/ from the artifacts: --workdir=DIR."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  wd = flags.FLAGS.workdir
  print(build_report(wd, os.path.join(wd, 'report')))


if __name__ == '__main__':
  from absl import app, flags as _f  # pylint: disable=g-import-not-at-top,g-multiple-import
  _f.DEFINE_string('workdir', None, 'run directory')
  app.run(main)
