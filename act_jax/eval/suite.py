"""One model on a set of abilities: each ability's records prepared once,
then scored per model (the pipeline's evaluate and patch stages, the toy
case's builder).

A `Task` says how one ability is scored: teacher-forced perplexity of the
response (`metrics.perplexity`) or greedy generation matched against the
accepted answers (`metrics.generation`), with the rendering of its records
(`data.DataConfig`). `prepare` turns records into rows once; `score` runs
one model over every prepared ability, logging each ability's rate and the
model's ETA.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

from absl import logging

from act_jax import data
from act_jax.eval import metrics
from act_jax.model.config import ModelConfig

METRICS = ('perplexity', 'exact_match')


@dataclasses.dataclass(frozen=True)
class Task:
  """How one ability is scored.

  Attributes:
    metric: 'perplexity' (of the response, teacher-forced) or
      'exact_match' (greedy generation against the accepted answers).
    rendering: how a record becomes tokens (`batch_size`: the perplexity
      batch).
    answers_field: the record field of the accepted answers (exact_match).
    match: 'exact' | 'contains' | 'regex' (see `metrics.answer_correct`).
    pattern: the regex of match='regex'.
    contains_tokens: match='contains' searches the first N reply tokens
      (0: the first non-empty line).
    max_new_tokens: the generation length.
  """
  metric: str
  rendering: data.DataConfig
  answers_field: str = 'answers'
  match: str = 'exact'
  pattern: str = ''
  contains_tokens: int = 0
  max_new_tokens: int = 32

  def __post_init__(self):
    if self.metric not in METRICS:
      raise ValueError(f'Task.metric={self.metric!r}: expected one of '
                       f'{METRICS}')


def prepare(task: Task, records: Sequence[dict[str, Any]], tokenizer,
            source: str = '') -> dict[str, Any]:
  """`{'task', 'batches' | 'items'}`: `records` as the task scores them
  (`source` names their file in errors)."""
  if task.metric == 'perplexity':
    return {'task': task,
            'batches': data.load_batches(task.rendering, tokenizer,
                                         records)[0]}
  return {'task': task, 'items': data.generation_items(
      records, tokenizer, task.rendering, task.answers_field, source=source)}


def score(params, cfg: ModelConfig, sets: Mapping[str, dict[str, Any]],
          tokenizer, *, gen_batch_size: int = 8, stop_ids: Sequence[int] = (),
          mesh=None, label: str = '',
          seconds: dict[str, float] | None = None
         ) -> dict[str, dict[str, Any]]:
  """`{ability: {metric: value, 'items': per-item outcomes}}` of one model
  on every prepared ability (`prepare`); perplexity rows also carry `nll`.

  Args:
    params, cfg: the model.
    sets: `{ability: prepare(...)}`.
    tokenizer: decodes generated replies.
    gen_batch_size: prompts per generation batch.
    stop_ids: a reply ends at the first of these.
    mesh: the device mesh to run on.
    label: names the model in the progress log.
    seconds: the last measured wall time per ability (updated): the
      model's ETA in the log.
  """
  out = {}
  seconds = {} if seconds is None else seconds
  for k, (name, s) in enumerate(sets.items(), start=1):
    t0 = time.time()
    task = s['task']
    if task.metric == 'perplexity':
      r = metrics.perplexity(params, cfg, s['batches'], mesh=mesh)
      out[name] = {'perplexity': r['ppl'], 'nll': r['nll'],
                   'items': r['items']}
    else:
      r = metrics.generation(
          params, cfg, tokenizer, s['items'], match=task.match,
          pattern=task.pattern, contains_tokens=task.contains_tokens,
          max_new_tokens=task.max_new_tokens, batch_size=gen_batch_size,
          stop_ids=stop_ids, mesh=mesh)
      out[name] = {'exact_match': r['acc'], 'items': r['items']}
    seconds[name] = dt = time.time() - t0
    n = len(s['items'] if 'items' in s else out[name]['items']['nll'])
    left = sum(seconds.get(b, dt) for b in list(sets)[k:])
    logging.info('evaluate %s: ability %d/%d %s: %d items in %.1fs (%.1f '
                 'items/s; candidate ETA %.0fs)', label, k, len(sets), name,
                 n, dt, n / max(dt, 1e-9), left)
  return out
