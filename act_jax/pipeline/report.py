"""The report of every study, generated from the run's artifacts alone.

`build_report(workdir, out_dir, plan)` reads `evaluate/<job>.json` and the
per-candidate `evaluate/<job>/<candidate>.json` (with per-item outcomes),
`localize/analysis.json`, the case build's summary and every stage's
COMPLETE.json, and writes `report.md`, `results.json` and PNG plots into
`out_dir`. Nothing is re-measured.

Every compared number carries a 95% interval from a paired bootstrap over
the same eval items: each ability's items are resampled once (`B` index
sets, seeded by the ability's name), and every candidate's metric and every
difference between two candidates is computed on those same resamples. A
verdict (`better`, `worse`, `within noise`) comes from the interval of the
difference, never from the bare difference. Perplexity resamples items
(rows) and recomputes exp(sum nll / sum tokens). A row with several seeds
(`<row>#s<seed>`, `sweep.seeds`) is one family: its value is the mean over
its seeds, and each resample also draws the seeds with replacement (the
same seed draws for every family of that many seeds, so seeds pair too).
Every section names the eval split its numbers use (`evaluate.split`), and
activation patching (the patch stage) gets its own tables.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any

import numpy as np

from act_jax.io import atomic
from act_jax.pipeline import intervals
from act_jax.pipeline import jobs as jobs_lib
from act_jax.pipeline import patch_report
from act_jax.pipeline import plots
from act_jax.pipeline import runner

STAGE_ORDER = ('build_models', 'convert', 'collect', 'localize', 'transfer',
               'finetune', 'evaluate', 'patch', 'report')
# The bootstrap and the views live in intervals.py; these names stay here.
HIGHER_IS_BETTER = intervals.HIGHER_IS_BETTER
SHORT = intervals.SHORT
Resampler = intervals.Resampler
JobView = intervals.JobView
verdict = intervals.verdict
load_job = intervals.load_job
record_metrics = intervals.record_metrics
# ------------------------------------------------------------- sections


def main_table(view: JobView) -> str:
  """Every candidate on every ability, value [95% interval]; recover jobs
  also show how much of the source-target gap of the ability came back."""
  cols = [f'{a} {SHORT[view.metric[a]]}' for a in view.abilities]
  rec_ability = view.job.pairs[0].ability if view.job.kind == 'recover' \
      else None
  extra = ['recovered'] if rec_ability and view.has('source') and \
      view.has('target') else []
  seeded = any(view.seeds(c) > 1 for c in view.order)
  extra += ['seeds'] if seeded else []
  head = ['| candidate | ' + ' | '.join(cols + extra +
                                        ['params moved']) + ' |',
          '|---' * (len(cols) + len(extra) + 2) + '|']
  total = view.record(view.order[0]).get('num_params')
  lines = []
  for cand in view.order:
    cells = [view.cell(cand, a) for a in view.abilities]
    if 'recovered' in extra:
      gap = view.value('source', rec_ability) - view.value('target',
                                                           rec_ability)
      got = view.value(cand, rec_ability) - view.value('target', rec_ability)
      cells.append(f'{got / gap:+.2f}' if abs(gap) > 1e-12 else '-')
    if seeded:
      cells.append(str(view.seeds(cand)))
    moved = view.record(cand).get('params_moved')
    cells.append('-' if moved is None else
                 f'{moved:,}' if not total else f'{100 * moved / total:.2f}%')
    lines.append(f'| {cand} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(head + lines) + '\n'


def comparisons(view: JobView) -> list[dict[str, Any]]:
  """The paired comparisons a study of this job should state."""
  out = []
  names = set(view.order)
  job = view.job
  ref = 'target' if job.kind == 'recover' else job.base
  channel = [c for c in view.order if '@' in c]
  moved = {p.ability for p in job.pairs}
  for cand in view.order:
    if cand == ref or not view.has(ref):
      continue
    if cand in channel and cand.startswith(('random', 'weight_diff')):
      continue  # shown against ACT below
    for a in view.abilities:
      # Every candidate against the reference on what was transferred; on
      # the other abilities (what must be kept) the ACT rows.
      if a in moved or cand.startswith('act['):
        out.append(dict(view.compare(cand, ref, a), group=f'vs {ref}'))
  for cand in channel:
    if not cand.startswith('act['):
      continue
    rho_ft = cand.split('@', 1)[1]
    for other in (f'random@{rho_ft}', f'weight_diff@{rho_ft}') + (
        ('full_ft',) if rho_ft.endswith('+ft') else ()):
      if other in names:
        for a in view.abilities:
          out.append(dict(view.compare(cand, other, a),
                          group='ACT vs the alternatives'))
  return out


def comparison_table(rows: list[dict[str, Any]], abilities) -> str:
  """Markdown of comparisons on the given abilities."""
  lines = ['| candidate | reference | ability | difference [95% CI] | '
           'verdict |', '|---|---|---|---|---|']
  for r in rows:
    if r['ability'] in abilities:
      lines.append(f'| {r["candidate"]} | {r["reference"]} | {r["ability"]} '
                   f'{SHORT[r["metric"]]} | {intervals.fmt_diff(r)} | '
                   f'{r["verdict"]} |')
  return '\n'.join(lines) + '\n'


def merge_score(view: JobView) -> dict[str, Any] | None:
  """Merge jobs: geometric mean over the merged (perplexity) abilities of
  the candidate's perplexity over that ability's specialist's (1 = each
  ability as good as its specialist; lower is better), with intervals."""
  job = view.job
  if job.kind != 'merge':
    return None
  pairs = [(p.ability, p.source) for p in job.pairs]
  if any(view.metric[a] != 'perplexity' for a, _ in pairs):
    return None

  def reps(cand):
    logs = [np.log(view.reps(cand, a) / view.reps(s, a)) for a, s in pairs]
    return np.exp(np.mean(logs, 0))

  def value(cand):
    return float(np.exp(np.mean([np.log(view.value(cand, a) /
                                        view.value(s, a))
                                 for a, s in pairs])))

  out = {}
  for cand in view.order:
    r = reps(cand)
    lo, hi = view.rs.interval(r)
    out[cand] = {'value': value(cand), 'lo': lo, 'hi': hi, 'reps': r}
  return out


def merge_table(view: JobView, score: dict[str, Any]) -> str:
  """The merge score of each candidate and ACT vs the alternatives on it."""
  lines = ['| candidate | merge score [95% CI] |', '|---|---|']
  for cand, s in score.items():
    lines.append(f'| {cand} | {s["value"]:.3f} [{s["lo"]:.3f}, '
                 f'{s["hi"]:.3f}] |')
  lines += ['', '| ACT | reference | difference [95% CI] | verdict |',
            '|---|---|---|---|']
  for cand in score:
    if not cand.startswith('act['):
      continue
    rho = cand.split('@', 1)[1]
    refs = [f'random@{rho}', f'weight_diff@{rho}'] + [
        c for c in score if '@' not in c and c not in
        (view.job.base,) + tuple(p.source for p in view.job.pairs)]
    for ref in refs:
      if ref not in score:
        continue
      d = score[cand]['reps'] - score[ref]['reps']
      lo, hi = view.rs.interval(d)
      diff = score[cand]['value'] - score[ref]['value']
      lines.append(f'| {cand} | {ref} | {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] '
                   f'| {verdict(lo, hi, False)} |')
  return '\n'.join(lines) + '\n'


def sufficiency(view: JobView) -> tuple[str, dict[str, list]]:
  """Transplant only (no fine-tune): the transferred ability per budget."""
  ability = view.job.pairs[0].ability
  series: dict[str, dict[float, str]] = {}
  points: dict[str, list] = {}
  for cand in view.order:
    if '@' not in cand or cand.endswith('+ft'):
      continue
    label, rho = cand.rsplit('@', 1)
    series.setdefault(label, {})[float(rho)] = view.cell(cand, ability)
    lo, hi = view.rs.interval(view.reps(cand, ability))
    points.setdefault(label, []).append(
        (float(rho), view.value(cand, ability), lo, hi))
  rhos = sorted({r for s in series.values() for r in s})
  lines = [f'| selector | ' + ' | '.join(f'rho={r:g}' for r in rhos) + ' |',
           '|---' * (len(rhos) + 1) + '|']
  for label, s in series.items():
    lines.append(f'| {label} | ' + ' | '.join(s.get(r, '-') for r in rhos) +
                 ' |')
  return '\n'.join(lines) + '\n', points


def concentration_table(analysis: dict[str, Any]) -> str:
  """Median (quartiles) fraction of a module's channels holding X% of the
  score mass, and the share of modules under 5%, per (job/ability, score)."""
  lines = ['| job/ability | score | 50% of mass | 80% of mass | 90% of mass '
           '| modules with 80% in <= 5% |', '|---|---|---|---|---|---|']
  for key, per in analysis.get('concentration', {}).items():
    for score, c in per.items():
      o = c['overall']
      cells = [f'{o[l]["median"]:.3f} ({o[l]["q25"]:.3f}-{o[l]["q75"]:.3f})'
               for l in ('0.5', '0.8', '0.9')]
      lines.append(f'| {key} | {score} | ' + ' | '.join(cells) +
                   f' | {o["0.8"]["share_le_5pct"]:.2f} |')
  return '\n'.join(lines) + '\n'


def by_site_table(analysis: dict[str, Any]) -> str:
  """Median fraction for 80% of the mass, by site."""
  out = []
  for key, per in analysis.get('concentration', {}).items():
    sites = list(next(iter(per.values()))['sites'])
    out += [f'| {key} | ' + ' | '.join(s.split('.')[-1] for s in sites) +
            ' |', '|---' * (len(sites) + 1) + '|']
    for score, c in per.items():
      out.append(f'| {score} | ' + ' | '.join(
          f'{c["sites"][s]["median"]["0.8"]:.3f}' for s in sites) + ' |')
    out.append('')
  return '\n'.join(out)


def overlap_table(block: dict[str, Any]) -> str:
  """`{key: {rho: {score: {jaccard, random}}}}` as Markdown."""
  lines = ['| job/ability | rho | sets | Jaccard | random sets |',
           '|---|---|---|---|---|']
  for key, per_rho in block.items():
    for rho, v in per_rho.items():
      items = v.items() if 'jaccard' not in v else [('', v)]
      for name, o in items:
        lines.append(f'| {key} | {rho} | {name} | {o["jaccard"]:.3f} | '
                     f'{o["random"]:.3f} |')
  return '\n'.join(lines) + '\n'


def stage_table(markers: dict[str, dict]) -> str:
  """Wall time and peak resident memory of each stage."""
  lines = ['| stage | wall s | peak RSS MiB |', '|---|---|---|']
  for s, m in markers.items():
    lines.append(f'| {s} | {m.get("wall_s", 0):.0f} | '
                 f'{m.get("peak_rss_mb", 0):.0f} |')
  total = sum(m.get('wall_s', 0) for m in markers.values())
  peak = max([m.get('peak_rss_mb', 0) for m in markers.values()] or [0])
  lines.append(f'| total | {total:.0f} | {peak:.0f} |')
  return '\n'.join(lines) + '\n'


def _scores_table(scores: dict[str, dict[str, dict[str, float]]]) -> str:
  cols = []
  for per in scores.values():
    for a, ms in per.items():
      cols += [(a, m) for m in ms if (a, m) not in cols]
  lines = ['| model | ' + ' | '.join(f'{a} {SHORT.get(m, m)}'
                                     for a, m in cols) + ' |',
           '|---' * (len(cols) + 1) + '|']
  for name, per in scores.items():
    lines.append(f'| {name} | ' + ' | '.join(
        intervals.fmt(per[a][m], m) if m in per.get(a, {}) else '-'
        for a, m in cols) + ' |')
  return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------- report


def _version(v: dict[str, Any]) -> str:
  c = v.get('commit')
  return (f'commit {c[:12]}' + (' with uncommitted changes' if v.get('dirty')
                                else '')) if c else f'act-jax {v["act_jax"]}'


def code_line(markers: dict[str, dict]) -> str:
  """Which code made the run: the stages' recorded versions (COMPLETE.json)
  and the report's own."""
  ran = {}
  for name, m in markers.items():
    if m.get('code_version'):
      ran.setdefault(_version(m['code_version']), []).append(name)
  now = _version(runner.code_version())
  stages = ('; '.join(f'{v} ({", ".join(n)})' for v, n in ran.items()) or
            'an act-jax that did not record its commit')
  return f'Code: the report by {now}; the stages by {stages}.'


def build_report(workdir: str, out_dir: str, plan: jobs_lib.Plan) -> dict:
  """Writes report.md, results.json and plots; returns a small summary."""
  rc = plan.report
  os.makedirs(out_dir, exist_ok=True)
  markers = {s: runner.read_marker(workdir, s) for s in STAGE_ORDER
             if runner.is_complete(workdir, s)}
  apath = os.path.join(workdir, 'localize', 'analysis.json')
  analysis = atomic.read_json(apath) if os.path.isfile(apath) else {}
  rs = Resampler(rc.bootstrap, rc.confidence)
  lines = [f'# {rc.title}', '']
  if rc.command:
    lines += [f'Regenerate: `{rc.command}`', '']
  lines += ['Generated by `act_jax.main` (report stage) from the run\'s '
            'artifacts; every number is what the run measured. Intervals: '
            f'{rc.confidence:.0%} paired bootstrap over the same eval items '
            f'({rc.bootstrap} resamples); a verdict is read from the '
            'interval of the difference, never from the bare difference.',
            '', code_line(markers), '', '## Setup', '']
  lines += _setup(plan, workdir)
  build = markers.get('build_models', {}).get('summary', {})
  if build.get('scores'):
    lines += ['## Models after building (before ACT)', '',
              _scores_table(build['scores'])]
  results: dict[str, Any] = {'title': rc.title, 'jobs': {}, 'patch': {},
                             'setup': _setup_record(plan),
                             'analysis': analysis,
                             'build': build,
                             'stages': {s: {k: m.get(k) for k in
                                            ('wall_s', 'peak_rss_mb')}
                                        for s, m in markers.items()}}
  plot_files = []
  for job in plan.jobs:
    if job.analyze_only or not os.path.isfile(
        os.path.join(workdir, 'evaluate', job.name + '.json')):
      continue
    data = load_job(workdir, job.name)
    per_split = {}
    for k, sp in enumerate(data['splits']):
      view = JobView(job, data, rs, sp)
      text, per_split[sp], pngs = _job_section(
          view, rc, out_dir, '' if k == 0 else f'_{sp}')
      lines += text
      plot_files += pngs
    main = data['splits'][0]
    results['jobs'][job.name] = dict(per_split[main], split=main, splits={
        sp: r for sp, r in per_split.items() if sp != main})
    if os.path.isfile(os.path.join(workdir, 'patch', job.name + '.json')):
      pdata = load_job(workdir, job.name, 'patch')
      results['patch'][job.name] = {}
      for sp in pdata['splits']:
        view = JobView(job, pdata, rs, sp)
        text, results['patch'][job.name][sp] = patch_report.patch_section(
            view, f'{job.name}, {_split_name(sp)}')
        lines += text
  if analysis:
    lines += ['## Analyses', '', '### Concentration', '',
              'Fraction of a module\'s channels that holds X% of its score '
              'mass: median over the (site, layer) modules, quartiles in '
              'brackets.', '', concentration_table(analysis),
              'Median fraction for 80% of the mass, by site:', '',
              by_site_table(analysis),
              '### Activation- vs weight-based channel sets', '',
              overlap_table(analysis.get('act_vs_weight', {})),
              '### Stability: channel sets from two disjoint probe halves',
              '', overlap_table(analysis.get('stability', {}))]
    if analysis.get('overlap_scores'):
      lines += ['### Between the first two activation scores', '',
                overlap_table(analysis['overlap_scores'])]
    if analysis.get('overlap'):
      lines += ['### Between abilities (disentanglement)', '',
                '| sets | Jaccard | random sets |', '|---|---|---|'] + [
                    f'| {k} | {v["jaccard"]:.3f} | '
                    f'{v["random_expected"]:.3f} |'
                    for k, v in analysis['overlap'].items()] + ['']
    if rc.plots:
      plot_files.append(plots.concentration_bars(
          analysis, os.path.join(out_dir, 'concentration.png')))
  lines += ['## Wall time and peak memory per stage', '',
            stage_table(markers)]
  plot_files = [os.path.basename(p) for p in plot_files if p]
  if plot_files:
    lines += ['## Plots', ''] + [f'![{p}]({p})' for p in plot_files]
  text = '\n'.join(lines) + '\n'
  atomic.write_json(os.path.join(out_dir, 'results.json'), results)
  atomic.write_text(os.path.join(out_dir, 'report.md'), text)
  return {'plots': plot_files, 'jobs': sorted(results['jobs'])}


def _split_name(split: str) -> str:
  return ('dev split (abilities.*.dev)' if split == 'dev' else
          'test split (abilities.*.eval)')


def _job_section(view: JobView, rc, out_dir: str, suffix: str
                 ) -> tuple[list[str], dict[str, Any], list[str]]:
  """(Markdown lines, results record, plot paths) of one job on one
  split; `suffix` tells the plots of a second split apart."""
  job = view.job
  comps = comparisons(view)
  moved = [p.ability for p in job.pairs]
  lines = [f'## {job.name}, {_split_name(view.split)}', '', _job_line(job) +
           f' Every number in this section is measured on the '
           f'{view.split} split.', '',
           '### Every candidate on every ability', '', main_table(view),
           f'### Paired comparisons on the transferred '
           f'abilit{"y" if len(moved) == 1 else "ies"} ({", ".join(moved)})',
           '', comparison_table(comps, moved)]
  kept = [a for a in view.abilities if a not in moved]
  if kept:
    lines += [f'### Paired comparisons on the other abilities '
              f'({", ".join(kept)})', '', comparison_table(comps, kept)]
  score = merge_score(view)
  if score:
    lines += ['### Merge score (geometric mean of perplexity / the '
              'specialist\'s, over the merged abilities)', '',
              merge_table(view, score)]
  job_res = {'order': view.order, 'comparisons': comps,
             'seeds': {c: view.seeds(c) for c in view.order},
             'values': {c: {a: {'value': view.value(c, a),
                                'ci': view.rs.interval(view.reps(c, a))}
                            for a in view.abilities} for c in view.order}}
  pngs = []
  if job.kind == 'recover':
    table, points = sufficiency(view)
    lines += [f'### Sufficiency: {moved[0]} after transplant only (no '
              'fine-tune)', '', table]
    if rc.plots and points:
      pngs.append(plots.sufficiency_curves(
          points, f'{moved[0]} {SHORT[view.metric[moved[0]]]}',
          os.path.join(out_dir, f'sufficiency_{job.name}{suffix}.png')))
    job_res['sufficiency'] = points
  if score:
    job_res['merge_score'] = {c: {k: v for k, v in s.items() if k != 'reps'}
                              for c, s in score.items()}
  return lines, job_res, pngs


def _setup_record(plan: jobs_lib.Plan) -> dict[str, Any]:
  """The knobs a cross-run report needs (results.json `setup`)."""
  case = plan.case or {}
  return {'splits': list(plan.splits), 'seeds': list(plan.seeds),
          'scores': list(plan.scores), 'rhos': list(plan.rhos),
          'specialist': dict(case.get('specialist') or {}),
          'train': {k: getattr(plan.train, k) for k in
                    ('num_steps', 'lr', 'batch_size', 'max_seq_len')}}


def _job_line(job: jobs_lib.Job) -> str:
  if job.kind == 'recover':
    p = job.pairs[0]
    return (f'Recover `{p.ability}` from `{p.source}` into `{p.target}`; '
            f'localized on the probe sets of {", ".join(p.probe)}.')
  specs = ', '.join(f'`{p.source}` ({p.ability})' for p in job.pairs)
  return f'Merge {specs} into `{job.base}`.'


def _where(path: str, workdir: str) -> str:
  """`path` as the report shows it: `<workdir>/...` inside the run's
  workdir (a report names no machine's folders)."""
  rel = os.path.relpath(os.path.abspath(path), os.path.abspath(workdir))
  return path if rel.startswith('..') else f'<workdir>/{rel}'


def _setup(plan: jobs_lib.Plan, workdir: str = '') -> list[str]:
  loc, sw = plan.localize, plan.sweep
  w = (lambda p: _where(p, workdir)) if workdir else (lambda p: p)
  out = ['- Models: ' + ', '.join(f'`{n}` = {w(plan.models[n])}'
                                  for n in plan.model_names) + '.']
  for name, a in plan.abilities.items():
    if a.eval or a.dev:
      how = (f'greedy generation ({a.max_new_tokens} tokens), match '
             f'`{a.match}`' if a.metric == 'exact_match' else
             'perplexity')
      out.append(f'- Ability `{name}`: {a.template} rendering, {how}; '
                 + '; '.join(f'{sp} split {w(_file(a, sp))}'
                             for sp in plan.splits)
                 + (f'; probe {w(a.probe)}' if a.probe else '') +
                 (f'; SFT {w(a.sft)}' if a.sft else '') + '.')
  out.append(f'- Eval splits: {", ".join(plan.splits)} (`evaluate.split`); '
             'each section below names the split its numbers use.')
  out.append(f'- Localization: scores {", ".join(plan.scores)}, selection '
             f'{loc.select} ({loc.unit}s) at rho '
             f'{", ".join(f"{r:g}" for r in plan.rhos)}'
             + (f' (+ {sw.extra_rhos} transplant only)' if sw.extra_rhos
                else '') + '; random and weight-diff channels at the same '
             'per-(site, layer) budget.')
  tc = plan.train
  out.append(f'- Compatibility fine-tune (`+ft`): scope {tc.scope}, '
             f'{tc.num_steps} steps x {tc.batch_size} x {tc.max_seq_len} '
             f'tokens, lr {tc.lr:g}; SFT mix by {plan.sft.mix_by} '
             f'(transferred {plan.sft.ability_weight:g}, retained '
             f'{plan.sft.retain_weight:g}). `full_ft`: the same data, steps '
             'and lr, every param.')
  if plan.seeds:
    out.append(f'- Seeds {", ".join(map(str, plan.seeds))} (`sweep.seeds`) '
               'for every seeded row (random channels: the mask; +ft and '
               'full_ft: the SFT order; DARE: the drop masks): a seeded '
               'row\'s value is the mean over its seeds, and its interval '
               'resamples the seeds as well as the items.')
  if sw.patch:
    out.append(f'- Activation patching of {sw.patch} channel sets at every '
               'rho (patch stage).')
  return out + ['']


def _file(a: jobs_lib.Ability, split: str) -> str:
  return a.dev if split == 'dev' else a.eval


def publish(out_dir: str, dest: str, overwrite: bool = False,
            inputs: list[str] | None = None, workdir: str = '') -> str:
  """Copies report.md to `dest` and its plots to `<dest stem>/`, with the
  image links rewritten to that folder.

  `dest` goes through the one output check (`atomic.check_output`): it is
  never a model or data file of the run (`inputs`) nor inside one; an
  existing `dest` is replaced only when it is an act-jax report (its first
  line is `atomic.file_marker('report')`) published from this `workdir`, or
  from another one with `overwrite`; the plot folder only when it is an
  act-jax `report_plots` folder (or absent).

  Raises:
    atomic.OutputError naming `report.out` and what is in the way.
  """
  check_publish(dest, overwrite, inputs or [], workdir)
  stem = os.path.splitext(os.path.basename(dest))[0]
  dest_dir = os.path.dirname(os.path.abspath(dest))
  with open(os.path.join(out_dir, 'report.md'), encoding='utf-8') as f:
    text = f.read()
  pngs = sorted(p for p in os.listdir(out_dir) if p.endswith('.png'))
  if pngs:
    with atomic.atomic_dir(os.path.join(dest_dir, stem), overwrite=True,
                           collective=False, kind='report_plots') as tmp:
      for p in pngs:
        shutil.copyfile(os.path.join(out_dir, p), os.path.join(tmp, p))
  for p in pngs:
    text = text.replace(f']({p})', f']({stem}/{p})')
  head = atomic.file_marker('report')
  return atomic.write_text(dest, f'{head}\n<!-- {_owner(workdir)} -->\n'
                           + text)


def _owner(workdir: str) -> str:
  """Which workdir published a report (a digest: no path in the doc)."""
  digest = hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()
  return f'workdir {digest[:12]}'


def check_publish(dest: str, overwrite: bool, inputs: list[str],
                  workdir: str) -> None:
  """Pre-flight of `report.out` (see `publish`); raises atomic.OutputError."""
  flag = '--config.report.out'
  mine = False
  if os.path.isfile(dest) and not os.path.islink(dest):
    with open(dest, encoding='utf-8', errors='replace') as f:
      mine = (f.readline().rstrip('\n') == atomic.file_marker('report') and
              f.readline().strip() == f'<!-- {_owner(workdir)} -->')
  atomic.check_output(dest, 'report', overwrite=overwrite or mine,
                      inputs=inputs, flag=flag, file=True)
  stem = os.path.splitext(os.path.basename(dest))[0]
  plots_dir = os.path.join(os.path.dirname(os.path.abspath(dest)), stem)
  atomic.check_output(plots_dir, 'report_plots', overwrite=True,
                      inputs=inputs, flag=f'{flag} (its plot folder)')
