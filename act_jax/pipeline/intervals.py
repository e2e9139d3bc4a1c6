"""Paired bootstrap intervals over eval items (and seeds), and the views
every report reads its numbers through.

`Resampler` holds one fixed set of item resamples per ability (seeded by the
ability's name) and of seed draws per number of seeds, so every candidate
and every difference is computed on the same resamples; `verdict` reads
`better` / `worse` / `within noise` from the interval of a difference.
`load_job` reads a job's evaluate (or patch) records; `JobView` gives one
split's values, intervals and paired differences per row family (the seeds
of `<row>#s<seed>` pooled: the mean over seeds, resampled with the items).
Used by `report.py` (one run) and `strength.py` (across runs).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from act_jax.io import atomic
from act_jax.pipeline import candidates as cand_lib
from act_jax.pipeline import jobs as jobs_lib

HIGHER_IS_BETTER = {'exact_match': True, 'perplexity': False}
SHORT = {'exact_match': 'acc', 'perplexity': 'ppl'}


# -------------------------------------------------------------- bootstrap


class Resampler:
  """The paired bootstrap: one fixed set of resamples per ability."""

  def __init__(self, num: int, confidence: float):
    self.num, self.confidence = num, confidence
    self._idx: dict[tuple[str, int], np.ndarray] = {}
    self._seed_idx: dict[int, np.ndarray] = {}

  def seed_indices(self, num_seeds: int) -> np.ndarray:
    """`[B, S]` seed draws (with replacement) for families of S seeds."""
    if num_seeds not in self._seed_idx:
      self._seed_idx[num_seeds] = np.random.default_rng(
          1000 + num_seeds).integers(0, num_seeds, (self.num, num_seeds))
    return self._seed_idx[num_seeds]

  def indices(self, ability: str, n: int) -> np.ndarray:
    """`[B, n]` item indices of `ability` (the same for every candidate)."""
    key = (ability, n)
    if key not in self._idx:
      seed = int.from_bytes(hashlib.sha256(ability.encode()).digest()[:8],
                            'little')
      self._idx[key] = np.random.default_rng(seed).integers(
          0, n, (self.num, n))
    return self._idx[key]

  def replicates(self, ability: str, metric: str, rec: dict) -> np.ndarray:
    """`[B]` bootstrap values of one candidate's metric on one ability."""
    items = rec['items']
    if metric == 'perplexity':
      nll, tok = np.asarray(items['nll']), np.asarray(items['tokens'])
      idx = self.indices(ability, len(nll))
      return np.exp(nll[idx].sum(1) / np.maximum(tok[idx].sum(1), 1.0))
    ok = np.asarray([float(i['correct']) for i in items])
    return ok[self.indices(ability, len(ok))].mean(1)

  def interval(self, reps: np.ndarray) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap values."""
    a = (1 - self.confidence) / 2
    lo, hi = np.quantile(reps, [a, 1 - a])
    return float(lo), float(hi)


def verdict(lo: float, hi: float, higher_is_better: bool) -> str:
  """'better' / 'worse' / 'within noise' from the interval of a difference
  (candidate minus reference)."""
  if lo > 0:
    return 'better' if higher_is_better else 'worse'
  if hi < 0:
    return 'worse' if higher_is_better else 'better'
  return 'within noise'


# ------------------------------------------------------------------ data


def _metric(rec_metrics: dict) -> str:
  return next(k for k in rec_metrics if k in HIGHER_IS_BETTER)


def record_metrics(rec: dict[str, Any], split: str | None = None
                   ) -> dict[str, Any]:
  """`{ability: metrics}` of an evaluate / patch record on `split` (None:
  the record's main split, `metrics`; others are under `splits`)."""
  if split is None or rec.get('split', split) == split:
    return rec['metrics']
  if split not in rec.get('splits', {}):
    raise KeyError(f'{rec.get("candidate", {}).get("name")}: no metrics of '
                   f'split {split!r}')
  return rec['splits'][split]


def load_job(workdir: str, name: str, stage: str = 'evaluate'
             ) -> dict[str, Any]:
  """A job's table and its candidates' per-item records (`stage`:
  evaluate or patch); `splits` lists the eval splits, main first."""
  table = atomic.read_json(os.path.join(workdir, stage, name + '.json'))
  recs = {}
  for cand in table['order']:
    recs[cand] = atomic.read_json(os.path.join(workdir, stage, name,
                                               cand + '.json'))
  splits = [table.get('split', 'test')] + list(table.get('splits', {}))
  return {'order': table['order'], 'records': recs, 'splits': splits}


class JobView:
  """One job's numbers on one split: values, intervals, paired
  differences, per row family (a row's seeds pooled)."""

  def __init__(self, job: jobs_lib.Job, data: dict, rs: Resampler,
               split: str | None = None):
    self.job, self.rs, self.split = job, rs, split
    self.recs = data['records']
    self.members: dict[str, list[str]] = {}
    for name in data['order']:
      self.members.setdefault(cand_lib.family(name), []).append(name)
    self.order = list(self.members)
    self.abilities = list(job.abilities)
    first = self._metrics(data['order'][0])
    self.metric = {a: _metric(first[a]) for a in self.abilities}
    self._reps: dict[tuple[str, str], np.ndarray] = {}

  def _metrics(self, name: str) -> dict[str, Any]:
    return record_metrics(self.recs[name], self.split)

  def has(self, cand: str) -> bool:
    return cand in self.members

  def seeds(self, cand: str) -> int:
    """How many seeds a row family pools."""
    return len(self.members[cand])

  def record(self, cand: str) -> dict[str, Any]:
    """The (first seed's) evaluate record of a row family."""
    return self.recs[self.members[cand][0]]

  def value(self, cand: str, ability: str) -> float:
    """The row's metric (mean over its seeds)."""
    m = self.metric[ability]
    return float(np.mean([self._metrics(n)[ability][m]
                          for n in self.members[cand]]))

  def reps(self, cand: str, ability: str) -> np.ndarray:
    """`[B]` bootstrap values of the row: items resampled, and seeds."""
    key = (cand, ability)
    if key not in self._reps:
      per = np.stack([self.rs.replicates(ability, self.metric[ability],
                                         self._metrics(n)[ability])
                      for n in self.members[cand]])  # [S, B]
      if len(per) == 1:
        self._reps[key] = per[0]
      else:
        draws = self.rs.seed_indices(len(per))  # [B, S]
        self._reps[key] = per[draws, np.arange(per.shape[1])[:, None]].mean(1)
    return self._reps[key]

  def cell(self, cand: str, ability: str) -> str:
    lo, hi = self.rs.interval(self.reps(cand, ability))
    return fmt_ci(self.value(cand, ability), lo, hi, self.metric[ability])

  def compare(self, cand: str, ref: str, ability: str) -> dict[str, Any]:
    """The paired difference cand - ref on `ability`, with its verdict."""
    d = self.reps(cand, ability) - self.reps(ref, ability)
    lo, hi = self.rs.interval(d)
    m = self.metric[ability]
    return {'candidate': cand, 'reference': ref, 'ability': ability,
            'metric': m, 'difference': self.value(cand, ability) -
            self.value(ref, ability), 'lo': lo, 'hi': hi,
            'verdict': verdict(lo, hi, HIGHER_IS_BETTER[m])}


def fmt(v: float, metric: str) -> str:
  """A metric value as the report prints it."""
  return f'{v:.3f}' if metric == 'exact_match' else f'{v:.2f}'


def fmt_ci(v: float, lo: float, hi: float, metric: str) -> str:
  """`value [lo, hi]`."""
  return f'{fmt(v, metric)} [{fmt(lo, metric)}, {fmt(hi, metric)}]'


def fmt_diff(c: dict[str, Any]) -> str:
  """A comparison's signed difference `d [lo, hi]`."""
  m = c['metric']
  f = (lambda x: f'{x:+.3f}') if m == 'exact_match' else (
      lambda x: f'{x:+.2f}')
  return f'{f(c["difference"])} [{f(c["lo"])}, {f(c["hi"])}]'
