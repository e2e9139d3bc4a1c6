"""The SmolLM2 case's report: Markdown tables + plots from results.json.

Every number comes from the run's results (nothing is typed in by hand);
`write_report` writes `workdir/report.md` (and `config.report.out` when set)
with the plots in a sibling folder, and returns the Markdown text, which
the run prints.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

_ORDER = ('source', 'specialist', 'act', 'random', 'weight_diff', 'merge',
          'full_ft')


def _fmt(v, nd=3) -> str:
  if v is None:
    return '-'
  if isinstance(v, float):
    return f'{v:.{nd}f}'
  return str(v)


def _recovered(row, src, spec) -> str:
  gap = src['qa_acc'] - spec['qa_acc']
  if abs(gap) < 1e-9:
    return '-'
  return f'{(row["qa_acc"] - spec["qa_acc"]) / gap:+.2f}'


def _sorted_rows(rows: dict[str, Any]) -> list[tuple[str, dict]]:
  def key(item):
    name, r = item
    fam = r.get('family', '')
    return (_ORDER.index(fam) if fam in _ORDER else 99,
            r.get('score') or '', r.get('rho') or 0.0, bool(r.get('ft')),
            name)
  return sorted(rows.items(), key=key)


def main_table(data: dict[str, Any]) -> str:
  """Each ability for source, specialist and every variant."""
  rows = data['rows']
  n = data['info'].get('num_params', 1)
  src, spec = rows.get('source'), rows.get('specialist')
  head = ('| variant | qa_acc | recovered | english_ppl | conlang_ppl | '
          'params from source | fine-tune s | eval s |\n'
          '|---|---|---|---|---|---|---|---|\n')
  lines = []
  for name, r in _sorted_rows(rows):
    moved = r.get('params_moved')
    moved_s = ('-' if moved is None else
               f'{moved / n * 100:.2f}%' if r.get('family') != 'full_ft'
               else 'all (trained)')
    rec = _recovered(r, src, spec) if src and spec else '-'
    lines.append(
        f'| {name} | {_fmt(r["qa_acc"])} | {rec} | '
        f'{_fmt(r["english_ppl"], 2)} | {_fmt(r["conlang_ppl"], 2)} | '
        f'{moved_s} | {_fmt(r.get("ft_s"), 0)} | {_fmt(r.get("eval_s"), 0)} |')
  return head + '\n'.join(lines) + '\n'


def stage_table(data: dict[str, Any]) -> str:
  """Wall time and peak RSS per stage."""
  out = ['| stage | wall s | peak RSS MiB |', '|---|---|---|']
  total = 0.0
  for name, st in data['stages'].items():
    out.append(f'| {name} | {st["wall_s"]:.0f} | {st["peak_rss_mb"]:.0f} |')
    total += st['wall_s']
  peak = max([s['peak_rss_mb'] for s in data['stages'].values()] or [0])
  out.append(f'| total | {total:.0f} | {peak:.0f} |')
  return '\n'.join(out) + '\n'


def concentration_table(ana: dict[str, Any]) -> str:
  """Median (quartiles) fraction of a module's channels per mass level."""
  out = ['| score | 50% of mass | 80% of mass | 90% of mass | '
         'modules with 80% in <= 5% of channels |', '|---|---|---|---|---|']
  for score, c in ana.get('concentration', {}).items():
    cells = [f'{c[l]["median"]:.3f} ({c[l]["q25"]:.3f}-{c[l]["q75"]:.3f})'
             for l in ('0.50', '0.80', '0.90')]
    out.append(f'| {score} | ' + ' | '.join(cells) +
               f' | {c["0.80"]["share_modules_le_5pct"]:.2f} |')
  if not ana.get('concentration'):
    return '(not computed yet)\n'
  sites = ['| score | ' + ' | '.join(
      next(iter(ana['concentration'].values()))['0.80']['by_site']) + ' |']
  sites.append('|---' * (len(sites[0].split('|')) - 2) + '|')
  for score, c in ana.get('concentration', {}).items():
    sites.append(f'| {score} | ' + ' | '.join(
        f'{v:.3f}' for v in c['0.80']['by_site'].values()) + ' |')
  return '\n'.join(out) + '\n\nMedian fraction for 80% of the mass, by ' \
      'site:\n\n' + '\n'.join(sites) + '\n'


def overlap_table(block: dict[str, Any]) -> str:
  """Jaccard (random expectation) per rho and score."""
  scores = sorted({s for v in block.values() for s in v})
  out = ['| rho | ' + ' | '.join(scores) + ' |',
         '|---' * (len(scores) + 1) + '|']
  for rho, v in block.items():
    out.append(f'| {rho} | ' + ' | '.join(
        f'{v[s]["jaccard"]:.3f} (random {v[s]["random"]:.3f})'
        for s in scores) + ' |')
  return '\n'.join(out) + '\n'


def sufficiency_table(rows: dict[str, Any]) -> str:
  """qa_acc (no fine-tune) per rho for each channel selector."""
  series: dict[str, dict[float, float]] = {}
  for r in rows.values():
    if r.get('ft') or r.get('rho') is None:
      continue
    label = (f'act[{r["score"]}]' if r['family'] == 'act' else r['family'])
    series.setdefault(label, {})[r['rho']] = r['qa_acc']
  rhos = sorted({x for s in series.values() for x in s})
  out = ['| selector | ' + ' | '.join(f'rho={x:g}' for x in rhos) + ' |',
         '|---' * (len(rhos) + 1) + '|']
  for label in sorted(series):
    out.append(f'| {label} | ' + ' | '.join(
        _fmt(series[label].get(x)) for x in rhos) + ' |')
  return '\n'.join(out) + '\n'


def verdicts(data: dict[str, Any]) -> str:
  """Plain statements computed from the results (no hand-typed numbers)."""
  rows, ana = data['rows'], data['analyses']
  src, spec = rows.get('source'), rows.get('specialist')
  if not src or not spec:
    return ''
  out = [
      f'- Forgetting: qa_acc {src["qa_acc"]:.3f} -> {spec["qa_acc"]:.3f}, '
      f'English perplexity {src["english_ppl"]:.2f} -> '
      f'{spec["english_ppl"]:.2f}; the specialist gained the new language: '
      f'conlang perplexity {src["conlang_ppl"]:.1f} -> '
      f'{spec["conlang_ppl"]:.2f}.']
  by = {}
  for name, r in rows.items():
    by[(r.get('family'), r.get('score'), r.get('rho'), bool(r.get('ft')))] = r
  for rho in sorted({r['rho'] for r in rows.values()
                     if r.get('family') == 'act'}):
    rnd = by.get(('random', None, rho, False))
    wdf = by.get(('weight_diff', None, rho, False))
    for score in sorted({r['score'] for r in rows.values()
                         if r.get('family') == 'act'}):
      a = by.get(('act', score, rho, False))
      if not a:
        continue
      parts = [f'act[{score}] qa_acc {a["qa_acc"]:.3f}']
      if rnd:
        parts.append(f'random {rnd["qa_acc"]:.3f}')
      if wdf:
        parts.append(f'weight_diff {wdf["qa_acc"]:.3f}')
      others = max([x['qa_acc'] for x in (rnd, wdf) if x] or [-1.0])
      win = ('ACT wins' if a['qa_acc'] > others + 1e-9 else 'tie'
             if abs(a['qa_acc'] - others) <= 1e-9 else 'ACT does NOT win')
      out.append(f'- Transplant only, rho={rho:g}: ' + ', '.join(parts) +
                 f' ({win}; conlang ppl {a["conlang_ppl"]:.2f} vs '
                 f'specialist {spec["conlang_ppl"]:.2f}).')
  fts = {n: r for n, r in rows.items() if r.get('ft')}
  if fts:
    best_name = max(fts, key=lambda n: fts[n]['qa_acc'])
    out.append('- With fine-tuning, best qa_acc: ' + ', '.join(
        f'{n} {r["qa_acc"]:.3f} (conlang ppl {r["conlang_ppl"]:.2f})'
        for n, r in sorted(fts.items(), key=lambda kv: -kv[1]['qa_acc'])[:4])
        + f'; best is {best_name}.')
  merges = {n: r for n, r in rows.items() if r.get('family') == 'merge'}
  if merges:
    out.append('- Merging baselines: ' + ', '.join(
        f'{n} qa_acc {r["qa_acc"]:.3f} / conlang ppl {r["conlang_ppl"]:.2f}'
        for n, r in sorted(merges.items())) + '.')
  for score, c in ana.get('concentration', {}).items():
    med = c['0.80']['median']
    out.append(f'- Concentration ({score}): the median module needs '
               f'{med:.1%} of its channels for 80% of the score mass; '
               f'"under 5%" {"holds" if med <= 0.05 else "does not hold"} '
               f'({c["0.80"]["share_modules_le_5pct"]:.0%} of modules are '
               'under 5%).')
  for rho, v in ana.get('stability', {}).items():
    out.append(f'- Stability at rho={rho}: ' + ', '.join(
        f'{s} Jaccard {x["jaccard"]:.3f} (random {x["random"]:.3f})'
        for s, x in v.items()) + '.')
  return '\n'.join(out) + '\n'


def plot(data: dict[str, Any], plot_dir: str) -> list[str]:
  """sufficiency.png and concentration.png; returns the file names."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(plot_dir, exist_ok=True)
  rows = data['rows']
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for metric, ax in zip(('qa_acc', 'conlang_ppl'), axes):
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows.values():
      if r.get('rho') is None:
        continue
      label = (f'act[{r["score"]}]' if r['family'] == 'act'
               else r['family']) + (' +ft' if r.get('ft') else '')
      series.setdefault(label, []).append((r['rho'], r[metric]))
    for label, pts in sorted(series.items()):
      pts.sort()
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o',
              linestyle='--' if 'ft' in label else '-', label=label)
    for ref, style in (('source', ':'), ('specialist', '-.')):
      if ref in rows:
        ax.axhline(rows[ref][metric], color='gray', linestyle=style,
                   label=ref)
    ax.set_xscale('log')
    ax.set_xlabel('rho (fraction of channels per module)')
    ax.set_ylabel(metric)
    if metric == 'conlang_ppl':
      ax.set_yscale('log')
  axes[0].legend(fontsize=7)
  axes[0].set_title('sufficiency: QA accuracy vs rho')
  axes[1].set_title('new language perplexity vs rho')
  fig.tight_layout()
  fig.savefig(os.path.join(plot_dir, 'sufficiency.png'), dpi=100)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(5, 4))
  for score, c in data['analyses'].get('concentration', {}).items():
    levels = ('0.50', '0.80', '0.90')
    ax.errorbar([float(l) for l in levels], [c[l]['median'] for l in levels],
                yerr=[[c[l]['median'] - c[l]['q25'] for l in levels],
                      [c[l]['q75'] - c[l]['median'] for l in levels]],
                marker='o', capsize=3, label=score)
  ax.axhline(0.05, color='gray', linestyle=':', label='5% of channels')
  ax.set_xlabel('share of score mass')
  ax.set_ylabel('fraction of channels (median module, IQR)')
  ax.set_title('concentration')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(plot_dir, 'concentration.png'), dpi=100)
  plt.close(fig)
  return ['sufficiency.png', 'concentration.png']


def render(data: dict[str, Any], config, plot_rel: str,
           plots: list[str], missing: list[str] | None = None) -> str:
  """The Markdown text."""
  info, ana = data['info'], data['analyses']
  banner = []
  if missing:
    banner = [f'**PARTIAL RESULTS: {len(missing)} rows of the configured '
              f'sweep are missing (the run was stopped before them): '
              f'{", ".join(missing)}. Resume with the same command.**', '']
  files = info['data']['files']
  spec = info.get('specialist', {})
  lines = [
      '# ACT on real weights: SmolLM2-135M-Instruct forgets English QA',
      '',
      'Generated by `act_jax.smollm2.run` from the run\'s results.json; '
      'every number below is what that command printed.',
      '',
  ] + banner + [
      f'Command: `{config.report.command}`',
      '',
      '## Setup',
      '',
      f'- Source: {info["source"]} ({info["num_params"]:,} params).',
      f'- Specialist: continued training of the source, scope full, on '
      f'{files["conlang_train"]["records"]} paragraphs of a constructed '
      f'language (Python-stdlib prose, word-by-word hashed into new words): '
      f'{config.specialist.num_steps} steps x {config.specialist.batch_size}'
      f' x {config.specialist.max_seq_len} tokens, lr '
      f'{config.specialist.lr:g} ({config.specialist.schedule}); cached at '
      f'`{spec.get("dir")}` (cached this run: {spec.get("cached")}).',
      f'- Abilities: `qa_acc` = greedy answers to {files["qa_eval"]["records"]}'
      f' held-out English questions (chat template, '
      f'{config.eval.max_new_tokens} new tokens, accepted answer in the '
      f'first line); `english_ppl` on {files["english_eval"]["records"]} '
      f'held-out English paragraphs; `conlang_ppl` on '
      f'{files["conlang_eval"]["records"]} held-out conlang paragraphs '
      f'(first {config.eval.max_seq_len} tokens each). Same sets, same '
      'order, greedy (no sampling) for every row.',
      f'- Probe set (localization): {files["qa_train"]["records"]} training '
      f'QA items in the chat template + {files["english_probe"]["records"]}'
      f' English paragraphs, split into two disjoint halves '
      f'({info.get("probe_tokens", {}).get("half_a")} / '
      f'{info.get("probe_tokens", {}).get("half_b")} tokens); the full set '
      'is their union.',
      f'- Selection: per (layer, site) top-rho of 7 output sites; transplant '
      'copies the source\'s kernel columns into the specialist (alpha 1).',
      f'- Compatibility fine-tune (`+ft`): scope channels (only transplanted '
      f'columns move), {config.compat.train.num_steps} steps x '
      f'{config.compat.train.batch_size} x {config.compat.train.max_seq_len}'
      f', lr {config.compat.train.lr:g}, {config.compat.qa_weight:.0%} of '
      'tokens English QA (train half, response-only loss) and the rest '
      'conlang text. `full_ft` = the same data, steps and lr, every param.',
      '- `recovered` = (qa_acc - specialist) / (source - specialist).',
      '',
      '## What came out',
      '',
      verdicts(data),
      '## Abilities of every model',
      '',
      main_table(data),
      '## Analyses',
      '',
      '### Concentration: fraction of a module\'s channels holding X% of '
      'the score mass',
      '',
      'Median over the 7 x L (site, layer) modules, quartiles in brackets.',
      '',
      concentration_table(ana),
      '### Sufficiency: QA accuracy after transplant only (no fine-tune)',
      '',
      sufficiency_table(data['rows']),
      '### Activation- vs weight-based channel sets (Jaccard, random '
      'expectation in brackets)',
      '',
      overlap_table(ana.get('overlap_act_vs_weight', {})),
      'Between the two activation scores:',
      '',
      overlap_table({r: {'mean_abs_diff vs diff_of_mean_abs': v}
                     for r, v in ana.get('overlap_scores', {}).items()}),
      '### Stability: channel sets from the two disjoint probe halves',
      '',
      overlap_table(ana.get('stability', {})),
      '## Wall time and peak memory per stage',
      '',
      'Peak RSS of the whole process during the stage (the models stay '
      'loaded, so it includes them). `eval`, `transplant`, '
      '`compat_finetune` sum over every variant. Times add up across '
      'resumed processes; work a killed process did before its last save '
      'is not counted.',
      '',
      stage_table(data),
  ]
  if plots:
    lines += ['## Plots', ''] + [f'![{p}]({plot_rel}/{p})' for p in plots]
  return '\n'.join(lines) + '\n'


def write_report(data: dict[str, Any], config, workdir: str,
                 missing: list[str] | None = None) -> str:
  """Writes report.md (+ plots) to workdir and to `config.report.out`."""
  plots = []
  if config.report.plots:
    plots = plot(data, os.path.join(workdir, 'plots'))
  text = render(data, config, 'plots', plots, missing)
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(text)
  out = config.report.out
  if out:
    stem = os.path.splitext(os.path.basename(out))[0]
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    if plots:
      os.makedirs(os.path.join(out_dir, stem), exist_ok=True)
      for p in plots:
        shutil.copyfile(os.path.join(workdir, 'plots', p),
                        os.path.join(out_dir, stem, p))
    with open(out, 'w') as f:
      f.write(render(data, config, stem, plots, missing))
  return text
