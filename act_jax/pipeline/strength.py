"""The specialization-strength report: several runs of one study, side by side.

Each run is a workdir of `python -m act_jax.main` whose report stage wrote
`results.json` (the same study at another specialist length, e.g.
`configs/smollm2_strength.py:<steps>`). Nothing is re-measured: every value,
interval and verdict below is the run's own (paired bootstrap over items and
seeds, `intervals.py`), read for one eval split (`--split`, default test).
Sections, per run (columns ordered by the specialist's training steps):

  forgetting          the source and the specialist (target) on every ability
  concentration       median (IQR) fraction of a module's channels holding
                      80% of each score's mass; does it grow with length?
  ACT vs the others   every `act[score]@rho` (+ft) against random and
                      weight-diff channels of the same budget (and full_ft)
                      on the transferred ability: difference [CI], verdict
  whole-model rows    source, target, linear, task arithmetic, TIES, DARE,
                      full_ft on the transferred ability
  patching            recovery by activation patching, act vs random / wd
Plots: concentration curves of every score (one panel per score, one line
per length), concentration against length, ACT's advantage against length.

  python -m act_jax.pipeline.strength --workdirs=W50,W200,W800 \\
      --out=docs/results/smollm2_strength.md [--split=test]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import numpy as np

from act_jax.io import atomic
from act_jax.pipeline import intervals
from act_jax.pipeline import plots

RESULTS = 'results.json'
WHOLE = ('source', 'target', 'linear', 'task_arithmetic', 'ties', 'dare',
         'full_ft')


class StrengthError(ValueError):
  """A run that cannot be compared; the message names its workdir."""


def load_run(workdir: str, split: str) -> dict[str, Any]:
  """One run's results on `split`: `{'label', 'steps', 'job', 'patch',
  'analysis', 'workdir', 'ability'}` (the recover job)."""
  path = os.path.join(workdir, RESULTS)
  if not os.path.isfile(path):
    raise StrengthError(f'{workdir}: no {RESULTS} (run its report stage '
                        'first)')
  res = atomic.read_json(path)
  job = res['jobs'].get('recover')
  if job is None:
    raise StrengthError(f'{path}: no recover job')
  if job.get('split', 'test') != split:
    if split not in job.get('splits', {}):
      have = [job.get('split')] + list(job.get('splits', {}))
      raise StrengthError(f'{path}: the run has no {split} split (it has '
                          f'{", ".join(have)})')
    job = job['splits'][split]
  steps = res.get('setup', {}).get('specialist', {}).get('num_steps')
  patch = res.get('patch', {}).get('recover', {}).get(split)
  ability = next((c['ability'] for c in job['comparisons']
                  if c['group'] == 'ACT vs the alternatives'), None)
  return {'workdir': workdir, 'steps': steps,
          'scores': res.get('setup', {}).get('scores', []),
          'label': f'{steps} steps' if steps else os.path.basename(
              os.path.normpath(workdir)),
          'job': job, 'patch': patch, 'ability': ability,
          'analysis': res.get('analysis', {})}


def _ci_cell(v: dict[str, Any], fmt=lambda x: f'{x:.3f}') -> str:
  lo, hi = v['ci']
  return f'{fmt(v["value"])} [{fmt(lo)}, {fmt(hi)}]'


def forgetting_table(runs) -> str:
  """Source and specialist on every ability, per run."""
  abilities = list(next(iter(runs[0]['job']['values'].values())))
  lines = ['| run | model | ' + ' | '.join(abilities) + ' |',
           '|---' * (len(abilities) + 2) + '|']
  for r in runs:
    for m in ('source', 'target'):
      v = r['job']['values'].get(m)
      if v:
        lines.append(f'| {r["label"]} | {m} | ' + ' | '.join(
            _ci_cell(v[a]) for a in abilities) + ' |')
  return '\n'.join(lines) + '\n'


def concentration_points(runs, key: str = 'recover/',
                         level: str = '0.8') -> dict[str, list]:
  """`{score: [(steps, median, q25, q75)]}` of the recover pair."""
  out: dict[str, list] = {}
  for r in runs:
    for k, per in r['analysis'].get('concentration', {}).items():
      if not k.startswith(key):
        continue
      for score, c in per.items():
        o = c['overall'][level]
        out.setdefault(score, []).append(
            (r['steps'] or 0, o['median'], o['q25'], o['q75']))
  return out


def concentration_table(runs, level: str = '0.8') -> str:
  """Median (IQR) fraction of channels holding `level` of the mass."""
  pts = concentration_points(runs, level=level)
  lines = ['| score | ' + ' | '.join(r['label'] for r in runs) + ' |',
           '|---' * (len(runs) + 1) + '|']
  for score, p in pts.items():
    lines.append(f'| {score} | ' + ' | '.join(
        f'{m:.3f} ({lo:.3f}-{hi:.3f})' for _, m, lo, hi in p) + ' |')
  return '\n'.join(lines) + '\n'


def _comparisons(run) -> dict[tuple[str, str], dict[str, Any]]:
  return {(c['candidate'], c['reference']): c for c in run['job'][
      'comparisons'] if c['group'] == 'ACT vs the alternatives' and
          c['ability'] == run['ability']}


def advantage_table(runs) -> str:
  """ACT rows against random / weight-diff / full_ft, per run."""
  keys = []
  for r in runs:
    keys += [k for k in _comparisons(r) if k not in keys]
  lines = ['| ACT | reference | ' + ' | '.join(r['label'] for r in runs) +
           ' |', '|---' * (len(runs) + 2) + '|']
  for k in keys:
    cells = []
    for r in runs:
      c = _comparisons(r).get(k)
      cells.append('-' if c is None else
                   f'{intervals.fmt_diff(c)} {c["verdict"]}')
    lines.append(f'| {k[0]} | {k[1]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def whole_model_table(runs) -> str:
  """The whole-model rows on the transferred ability, per run."""
  lines = ['| row | ' + ' | '.join(r['label'] for r in runs) + ' |',
           '|---' * (len(runs) + 1) + '|']
  for row in WHOLE:
    cells = [_ci_cell(r['job']['values'][row][r['ability']])
             if row in r['job']['values'] else '-' for r in runs]
    if any(c != '-' for c in cells):
      lines.append(f'| {row} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def patch_table(runs) -> str:
  """Patching recovery per channel set and the verdicts against random."""
  names = []
  for r in runs:
    names += [n for n in (r['patch'] or {}).get('recovery', {})
              if n not in names]
  lines = ['| patched channels | ' + ' | '.join(r['label'] for r in runs) +
           ' |', '|---' * (len(runs) + 1) + '|']
  for n in names:
    cells = []
    for r in runs:
      v = (r['patch'] or {}).get('recovery', {}).get(n)
      cells.append('-' if v is None else _ci_cell(v, lambda x: f'{x:+.3f}'))
    lines.append(f'| {n} | ' + ' | '.join(cells) + ' |')
  comps = []
  for r in runs:
    comps += [(c['candidate'], c['reference']) for c in
              (r['patch'] or {}).get('comparisons', [])
              if (c['candidate'], c['reference']) not in comps]
  if comps:
    lines += ['', '| channels | reference | ' + ' | '.join(
        r['label'] for r in runs) + ' |', '|---' * (len(runs) + 2) + '|']
    for k in comps:
      cells = []
      for r in runs:
        c = {(x['candidate'], x['reference']): x for x in (
            r['patch'] or {}).get('comparisons', [])}.get(k)
        cells.append('-' if c is None else
                     f'{c["difference"]:+.3f} [{c["lo"]:+.3f}, '
                     f'{c["hi"]:+.3f}] {c["verdict"]}')
      lines.append(f'| {k[0]} | {k[1]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def advantage_points(runs, finetuned: bool) -> dict[str, list]:
  """`{'<act> - <ref>': [(steps, diff, lo, hi)]}` of the first score's
  ACT rows (+ft or not) against random and weight-diff channels."""
  out: dict[str, list] = {}
  for r in runs:
    head = f'act[{r["scores"][0]}]@' if r['scores'] else 'act['
    for (cand, ref), c in _comparisons(r).items():
      if (not cand.startswith(head) or cand.endswith('+ft') != finetuned or
          ref == 'full_ft'):
        continue
      out.setdefault(f'{cand} - {ref}', []).append(
          (r['steps'] or 0, c['difference'], c['lo'], c['hi']))
  return out


def build_strength_report(workdirs: Sequence[str], out: str, *,
                          split: str = 'test', title: str = '',
                          command: str = '', make_plots: bool = True) -> str:
  """Writes the cross-run report to `out` (plots into `<out stem>/`)."""
  runs = sorted((load_run(w, split) for w in workdirs),
                key=lambda r: (r['steps'] is None, r['steps'] or 0))
  if len({r['ability'] for r in runs}) > 1:
    raise StrengthError('the runs transfer different abilities: '
                        f'{[(r["workdir"], r["ability"]) for r in runs]}')
  title = title or 'Specialization strength: when does ACT win?'
  lines = [f'# {title}', '']
  if command:
    lines += [f'Regenerate: `{command}`', '']
  lines += [f'Every number is the named run\'s own ({split} split): values '
            'and differences with 95% paired bootstrap intervals over the '
            'same items (and seeds, where a row has several); each verdict '
            'is read from the interval of the difference.', '',
            '| run | workdir |', '|---|---|'] + [
                f'| {r["label"]} | {r["workdir"]} |' for r in runs] + [
                    '', '## Forgetting: the source and the specialist', '',
                    forgetting_table(runs),
                    '## Concentration: fraction of a module\'s channels '
                    'holding 80% of the score mass (median, IQR)', '',
                    concentration_table(runs),
                    f'## ACT against random and weight-diff channels '
                    f'(`{runs[0]["ability"]}`)', '', advantage_table(runs),
                    f'## Whole-model rows (`{runs[0]["ability"]}`)', '',
                    whole_model_table(runs)]
  if any(r['patch'] for r in runs):
    lines += ['## Activation patching: recovery', '', patch_table(runs)]
  stem = os.path.splitext(os.path.basename(out))[0]
  pngs = []
  if make_plots:
    d = os.path.join(os.path.dirname(os.path.abspath(out)), stem)
    os.makedirs(d, exist_ok=True)
    curves = {}
    for r in runs:
      for k, per in r['analysis'].get('concentration', {}).items():
        if k.startswith('recover/'):
          for score, c in per.items():
            curves.setdefault(score, {})[r['label']] = (
                c['curve_x'], np.mean([v['curve'] for v in
                                       c['sites'].values()], 0).tolist())
    if curves:
      pngs.append(plots.curves_by_run(
          curves, os.path.join(d, 'concentration_curves.png')))
      pngs.append(plots.series_vs_length(
          concentration_points(runs), 'fraction of channels for 80% of mass',
          'Concentration against specialist length',
          os.path.join(d, 'concentration_vs_length.png'), hline=0.05))
    for ft in (False, True):
      adv = advantage_points(runs, ft)
      if adv:
        pngs.append(plots.series_vs_length(
            adv, f'{runs[0]["ability"]}: ACT minus reference (95% CI)',
            'ACT\'s advantage against specialist length' + (
                ' (+ fine-tune)' if ft else ' (transplant only)'),
            os.path.join(d, f'advantage{"_ft" if ft else ""}_vs_length.png'),
            hline=0.0))
  if pngs:
    lines += ['## Plots', ''] + [
        f'![{os.path.basename(p)}]({stem}/{os.path.basename(p)})'
        for p in pngs]
  return atomic.write_text(out, '\n'.join(lines) + '\n')


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m act_jax.pipeline.strength`; errors: one line, exit 2."""
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdirs', required=True,
                 help='comma list of run workdirs (each with results.json)')
  p.add_argument('--out', required=True, help='the Markdown report to write')
  p.add_argument('--split', default='test', choices=('test', 'dev'),
                 help='the eval split every number is read from')
  p.add_argument('--title', default='', help='report heading')
  p.add_argument('--no_plots', action='store_true', help='skip the PNGs')
  args = p.parse_args(argv)
  workdirs = [w for w in args.workdirs.split(',') if w.strip()]
  command = 'python -m act_jax.pipeline.strength ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  try:
    path = build_strength_report(workdirs, args.out, split=args.split,
                                 title=args.title, command=command,
                                 make_plots=not args.no_plots)
  except (StrengthError, OSError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
