"""Localization and the four analyses for one (source, specialist) pair.

  probe_halves(...)      the ability's probe set (English QA in the chat
                         template + English prose) as two disjoint halves of
                         fixed-shape batches
  collect_models(...)    `collect.collect_stats` of K models on batches ->
                         `{site: {stat: array}}`, count; `collect_pair` for
                         [source, specialist]
  add_stats(a, b)        statistics of the union of two probe sets (sums)
  act_mask(...)          per-(layer, site) top-rho channels of a score
  concentration(...)     fraction of channels holding 50/80/90% of the score
                         mass per (site, layer) module, summarized over
                         modules (`analysis.mass_fraction_lc`)
  overlap(a, b)          Jaccard of two channel masks and its expectation
                         for random sets of the same sizes
                         (`analysis.overlap`)
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from act_jax import analysis, capture, collect, data, masks, scores
from act_jax import selection
from act_jax.smollm2 import models

SOURCE, SPECIALIST = 0, 1
MASS_LEVELS = (0.5, 0.8, 0.9)


def probe_halves(qa_records, english_records, tokenizer, max_seq_len: int,
                 batch_size: int) -> tuple[list, list]:
  """(half A, half B) probe batches: even / odd items of each source.

  QA items are packed several to a row (positions restart per item); each
  English paragraph gets its own row (cut at `max_seq_len`). Statistics
  count every real token.
  """
  halves = []
  for parity in (0, 1):
    qa_ex = models.chat_examples(qa_records[parity::2], tokenizer,
                                 max_seq_len, add_eos=False)
    en_ex = [models.text_examples([r], tokenizer, max_seq_len)[0]
             for r in english_records[parity::2]]
    batches = (data.make_batches(qa_ex, batch_size, max_seq_len, pack=True) +
               data.make_batches(en_ex, batch_size, max_seq_len))
    halves.append(batches)
  return halves[0], halves[1]


def collect_models(params_list: Sequence[Any], cfg, batches,
                   sites: Sequence[str] = capture.OUTPUT_SITES,
                   ckpt_dir: str | None = None) -> dict[str, Any]:
  """Statistics of K related models on `batches` (one vmapped forward).

  Returns `{'stats': {site: {stat: array}}, 'count': [K]}`; model k of the
  statistics is `params_list[k]`.
  """
  flat = collect.collect_stats(list(params_list), cfg, batches,
                               capture.CaptureSpec(tuple(sites)),
                               ckpt_dir=ckpt_dir)
  nested: dict[str, dict[str, np.ndarray]] = {}
  for key, v in flat.items():
    if key == 'count':
      continue
    site, stat = key.rsplit('/', 1)
    nested.setdefault(site, {})[stat] = np.asarray(v)
  return {'stats': nested, 'count': np.asarray(flat['count'])}


def collect_pair(source_params, specialist_params, cfg, batches,
                 sites: Sequence[str] = capture.OUTPUT_SITES,
                 ckpt_dir: str | None = None) -> dict[str, Any]:
  """`collect_models` of [source, specialist] (`SOURCE`, `SPECIALIST`)."""
  return collect_models([source_params, specialist_params], cfg, batches,
                        sites, ckpt_dir)


def cached_pair(path: str, compute) -> dict[str, Any]:
  """`compute()`'s statistics, saved to / reloaded from an .npz `path`."""
  if os.path.isfile(path):
    with np.load(path) as z:
      flat = dict(z)
    nested: dict[str, dict[str, np.ndarray]] = {}
    for key, v in flat.items():
      if key != 'count':
        site, stat = key.rsplit('/', 1)
        nested.setdefault(site, {})[stat] = v
    return {'stats': nested, 'count': flat['count']}
  pair = compute()
  flat = {f'{s}/{k}': v for s, d in pair['stats'].items() for k, v in d.items()}
  flat['count'] = pair['count']
  tmp = path + '.tmp.npz'
  np.savez(tmp, **flat)
  os.replace(tmp, path)
  return pair


def add_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
  """Statistics of the union of two disjoint probe sets (every stat is a
  sum over tokens, so the union's is the sum)."""
  return {'stats': {s: {k: a['stats'][s][k] + b['stats'][s][k]
                        for k in a['stats'][s]} for s in a['stats']},
          'count': a['count'] + b['count']}


def channel_scores(pair: dict[str, Any], score: str, *,
                   source_params=None, specialist_params=None,
                   seed: int = 0) -> dict[str, np.ndarray]:
  """`scores.channel_scores` of source vs specialist for `score`."""
  return scores.channel_scores(pair['stats'], pair['count'], SOURCE,
                               SPECIALIST, score, params_src=source_params,
                               params_tgt=specialist_params, seed=seed)


def act_mask(score_lc: dict[str, np.ndarray], rho: float) -> masks.Mask:
  """Per-(site, layer) top-rho channels."""
  return selection.select_channels(score_lc, 'per_site', top_frac=rho)


def concentration(score_lc: dict[str, np.ndarray],
                  levels: Sequence[float] = MASS_LEVELS) -> dict[str, Any]:
  """Fraction of a module's channels that holds `level` of its score mass.

  A module is one (site, layer); the fractions are
  `analysis.mass_fraction_lc`. Returns, per level ('0.80'), the median and
  the quartiles over all modules, the share of modules needing at most 5%
  of their channels, and per site the median (`by_site`).
  """
  out: dict[str, Any] = {}
  for level in levels:
    per_site = {site: analysis.mass_fraction_lc(np.abs(s), level)
                for site, s in score_lc.items()}
    allv = np.concatenate(list(per_site.values()))
    out[f'{level:.2f}'] = {
        'median': float(np.median(allv)),
        'q25': float(np.quantile(allv, 0.25)),
        'q75': float(np.quantile(allv, 0.75)),
        'share_modules_le_5pct': float(np.mean(allv <= 0.05)),
        'by_site': {site: float(np.median(v)) for site, v in per_site.items()},
    }
  return out


def overlap(a: masks.Mask, b: masks.Mask) -> dict[str, float]:
  """`{'jaccard', 'random'}`: `analysis.overlap` of two channel masks over
  every (site, layer, channel), and its expectation for random sets of the
  same per-(site, layer) sizes."""
  o = analysis.overlap(a, b)
  return {'jaccard': float(o['jaccard']),
          'random': float(o['random_expected'])}
