"""The report's activation-patching tables (from `patch/<job>/*.json`).

Rows are the patch stage's: `target` (nothing patched), `source`, and per
budget each patched channel set (`act[<score>]@rho`, `weight_diff@rho`,
`random@rho`, seeds pooled). Every ability is teacher-forced (the QA
ability's answer perplexity). The recovery of the transferred ability,

  recovery = (log ppl_target - log ppl_patched) /
             (log ppl_target - log ppl_source)

(1 = the source's loss, 0 = the target's), carries a paired bootstrap
interval over the same items (and seeds), and each activation-based set is
compared with random and weight-diff channels of the same budget on it,
with a verdict read from the interval of the difference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from act_jax.pipeline import intervals


def recovery(view: intervals.JobView, cand: str, ability: str
             ) -> tuple[float, np.ndarray]:
  """(recovery of `ability` by row `cand`, its `[B]` bootstrap values)."""
  def lg(c):
    return np.log(view.value(c, ability)), np.log(view.reps(c, ability))
  (t, t_r), (s, s_r), (x, x_r) = lg('target'), lg('source'), lg(cand)
  with np.errstate(divide='ignore', invalid='ignore'):
    reps = (t_r - x_r) / (t_r - s_r)
  value = (t - x) / (t - s) if abs(t - s) > 1e-12 else float('nan')
  return float(value), reps


def _ci(view, reps) -> tuple[float, float]:
  ok = reps[np.isfinite(reps)]
  return view.rs.interval(ok) if ok.size else (float('nan'),) * 2


def patch_section(view: intervals.JobView, label: str
                  ) -> tuple[list[str], dict[str, Any]]:
  """(Markdown lines, results record) of one job's patching on one split."""
  ability = view.job.pairs[0].ability
  cols = [f'{a} ppl' for a in view.abilities]
  lines = [f'## Activation patching: {label}', '',
           'The target runs beside the source and takes the source\'s '
           'activations in a channel set, at every layer and token '
           '(teacher-forced, so the QA ability is its answer perplexity). '
           f'Recovery of `{ability}` = (log ppl target - log ppl patched) / '
           '(log ppl target - log ppl source).', '',
           '| channels | ' + ' | '.join(cols) + f' | {ability} recovery | '
           'channels patched |', '|---' * (len(cols) + 3) + '|']
  res: dict[str, Any] = {'values': {}, 'recovery': {}, 'comparisons': []}
  for cand in view.order:
    cells = [view.cell(cand, a) for a in view.abilities]
    value, reps = recovery(view, cand, ability)
    lo, hi = _ci(view, reps)
    cells.append(f'{value:+.3f} [{lo:+.3f}, {hi:+.3f}]')
    n = view.record(cand).get('channels')
    cells.append('-' if not n else f'{n:,}')
    lines.append(f'| {cand} | ' + ' | '.join(cells) + ' |')
    res['values'][cand] = {a: {'value': view.value(cand, a),
                               'ci': view.rs.interval(view.reps(cand, a))}
                           for a in view.abilities}
    res['recovery'][cand] = {'value': value, 'ci': [lo, hi],
                             'seeds': view.seeds(cand)}
  lines += ['', f'Patched channel sets against random and weight-diff '
            f'channels of the same budget, on `{ability}` recovery:', '',
            '| channels | reference | difference [95% CI] | verdict |',
            '|---|---|---|---|']
  for cand in view.order:
    if '@' not in cand or cand.startswith('random'):
      continue
    rho = cand.split('@', 1)[1]
    for ref in (f'random@{rho}', f'weight_diff@{rho}'):
      if ref == cand or not view.has(ref):
        continue
      v1, r1 = recovery(view, cand, ability)
      v2, r2 = recovery(view, ref, ability)
      lo, hi = _ci(view, r1 - r2)
      row = {'candidate': cand, 'reference': ref, 'ability': ability,
             'metric': 'recovery', 'difference': v1 - v2, 'lo': lo,
             'hi': hi, 'verdict': intervals.verdict(lo, hi, True)}
      res['comparisons'].append(row)
      lines.append(f'| {cand} | {ref} | {v1 - v2:+.3f} [{lo:+.3f}, '
                   f'{hi:+.3f}] | {row["verdict"]} |')
  return lines + [''], res
