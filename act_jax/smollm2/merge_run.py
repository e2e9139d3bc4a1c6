"""The SmolLM2 merge case: two specialists of one source, merged into one.

  python -m act_jax.smollm2.merge_run --config=configs/smollm2_merge.py \
      --workdir=workdir/smollm2_merge \
      --config.report.out=docs/results/smollm2_merge.md

Two constructed languages (the same paragraph split translated with two
word mappings, `data.conlang_seed` and `merge.conlang_b_seed`) give two
specialists of SmolLM2-135M-Instruct, each continued (scope full) on one
language; specialist A is exactly the recover case's specialist, so with the
same config and cache it is not trained again. ACT merges them: from the
source, each specialist's top-rho channels (its activation difference to the
source on its own language's probe text) are transplanted, and a channel
both claim is resolved by `merge.policy`. Baselines at the same budget:
random and weight-diff channels through the same merge; and linear
averaging, task arithmetic, TIES and DARE of the two task vectors.

Every model is measured on both languages (held-out perplexity), English
perplexity and the English QA set. Results land in `workdir/results.json`
as each row is done, so a rerun resumes; the report is written from it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from ml_collections import config_flags

from act_jax import analysis, baselines, checkpoint, data, scores
from act_jax import transfer
from act_jax.smollm2 import abilities, corpus, merge_report, meter, models
from act_jax.smollm2 import run as run_lib
from act_jax.smollm2 import sweep

LANGS = ('a', 'b')


def probe_batches(records, tokenizer, max_seq_len: int, batch_size: int):
  """One row per paragraph (cut at `max_seq_len`), fixed-shape batches."""
  exs = [models.text_examples([r], tokenizer, max_seq_len)[0]
         for r in records]
  return data.make_batches(exs, batch_size, max_seq_len)


def expected_rows(config) -> list[str]:
  """Every row name a complete run of `config` produces."""
  mc = config.merge
  names = ['source', 'specialist_a', 'specialist_b']
  for rho in mc.rhos:
    names += [f'act@{rho:g}', f'random@{rho:g}', f'weight_diff@{rho:g}']
  names += [f'linear@{mc.lerp_t:g}', f'task_arith@{mc.ta_lambda:g}',
            f'ties@{mc.ties_density:g}', f'dare@{mc.dare_drop:g}']
  return names


def run(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the merge case; returns results.json's content."""
  os.makedirs(workdir, exist_ok=True)
  cd = config.to_dict()
  fp = models.digest({k: cd[k] for k in ('models', 'data', 'eval',
                                         'specialist', 'merge')})
  res = run_lib.Results(os.path.join(workdir, run_lib.RESULTS_FILE), fp)
  m = meter.Meter()
  m.stages.update(res.data['stages'])
  rows, mc = res.rows, config.merge

  def flush():
    res.data['stages'] = m.stages
    res.save()

  # ------------------------------------------------------------------ data
  with m.stage('data'):
    cfg_a = run_lib.sub_config(config.data, corpus.CorpusConfig)
    cfg_b = dataclasses.replace(cfg_a, conlang_seed=mc.conlang_b_seed)
    if cfg_b.conlang_seed == cfg_a.conlang_seed:
      raise ValueError(f'merge.conlang_b_seed={mc.conlang_b_seed} equals '
                       'data.conlang_seed: the two languages would be one')
    man, recs = {}, {}
    for lang, dc in zip(LANGS, (cfg_a, cfg_b)):
      d = os.path.join(workdir, f'data_{lang}')
      man[lang] = corpus.write_corpus(d, dc)
      recs[lang] = {n: corpus.read_jsonl(os.path.join(d, f'{n}.jsonl'))
                    for n in corpus.FILES}
  res.data['info']['data'] = man
  eval_cfg = run_lib.sub_config(config.eval, abilities.EvalConfig)

  with m.stage('source_load'):
    src_dir = models.source_dir(config.models.source, config.cache_dir)
    tok = checkpoint.load_tokenizer(src_dir)
    cfg, src = checkpoint.load_model(src_dir)
    sets = abilities.make_eval_sets(recs['a'], tok, eval_cfg)
    conlang_b = abilities.make_eval_sets(recs['b'], tok, eval_cfg).conlang
  res.data['info']['source'] = src_dir
  res.data['info']['num_params'] = int(sum(x.size for x in
                                           jax.tree.leaves(src)))

  def evaluate(name: str, params, **info):
    if name in rows:
      return
    with m.stage('eval'):
      t0 = time.time()
      vals, replies = abilities.evaluate_abilities(params, cfg, sets, tok,
                                                   eval_cfg)
      vals['conlang_a_ppl'] = vals.pop('conlang_ppl')
      vals['conlang_b_ppl'] = abilities.perplexity(params, cfg, conlang_b)
    row = dict(info, **vals, eval_s=time.time() - t0,
               replies=replies[:config.report.keep_replies])
    rows[name] = row
    logging.info('%-22s %s', name, {k: round(v, 4) for k, v in vals.items()})
    flush()

  evaluate('source', src, family='source')

  # ----------------------------------------------------------- specialists
  specs, dirs = [], []
  for lang in LANGS:
    with m.stage('specialist_train'):
      key = {'source': config.models.source or 'smollm2-135m-instruct',
             'conlang_train': man[lang]['files']['conlang_train']['sha256']}
      d, cached = models.specialist(src_dir, recs[lang]['conlang_train'], tok,
                                    config.specialist, config.cache_dir, key)
    res.data['info'][f'specialist_{lang}'] = {'dir': d, 'cached': cached}
    dirs.append(os.path.basename(d))
    specs.append(checkpoint.load_model(d)[1])
  # Rows measured with other specialists (other training code) are stale.
  if res.data['info'].get('specialist_dirs') != dirs:
    for name in [n for n in rows if n != 'source']:
      del rows[name]
    res.data['info']['specialist_dirs'] = dirs
  for lang, spec in zip(LANGS, specs):
    evaluate(f'specialist_{lang}', spec, family='specialist')

  # ------------------------------------------------------------ statistics
  # [source, A, B] on each language's probe text (training paragraphs, so
  # nothing evaluated is probed); specialist k's score compares model k+1
  # with the source on its own language.
  with m.stage('statistics'):
    stats_key = models.digest([fp] + dirs)
    pairs = []
    for k, lang in enumerate(LANGS):
      probe = recs[lang]['conlang_train'][:mc.probe_paragraphs]
      batches = probe_batches(probe, tok, mc.max_seq_len, mc.batch_size)
      pairs.append(sweep.cached_pair(
          os.path.join(workdir, f'stats_{lang}_{stats_key}.npz'),
          lambda b=batches: sweep.collect_models([src] + specs, cfg, b)))
    act = [scores.channel_scores(p['stats'], p['count'], k + 1, 0, mc.score)
           for k, p in enumerate(pairs)]
    wd = [scores.weight_scores(s, src, list(act[0])) for s in specs]
  res.data['info']['probe_tokens'] = {
      lang: int(p['count'][0]) for lang, p in zip(LANGS, pairs)}

  # ------------------------------------------------------------ the merges
  ana = res.data['analyses']
  ana['concentration'] = {lang: sweep.concentration(a)
                          for lang, a in zip(LANGS, act)}
  ana['overlap'] = {}
  names = [f'specialist_{lang}' for lang in LANGS]
  for rho in mc.rhos:
    r = f'{rho:g}'
    amasks = [sweep.act_mask(a, rho) for a in act]
    o = analysis.overlap(*amasks)
    ana['overlap'][r] = {'jaccard': o['jaccard'],
                         'random': o['random_expected']}
    # Random channels come with the random scores that chose them, so
    # every variant resolves conflicts by the same policy.
    rsc = [scores.random_scores({s: np.shape(x) for s, x in a.items()},
                                mc.random_seed + k)
           for k, a in enumerate(amasks)]
    variants = (
        ('act', amasks, act),
        ('random', [baselines.budget_matched_mask(a, r)
                    for a, r in zip(amasks, rsc)], rsc),
        ('weight_diff', [baselines.budget_matched_mask(a, w)
                         for a, w in zip(amasks, wd)], wd))
    for fam, ms, sc in variants:
      name = f'{fam}@{r}'
      if name in rows:
        continue
      with m.stage('merge'):
        merged, rep = transfer.merge(src, specs, ms, sc, mc.policy,
                                     names=names)
        changed = sum(int(np.sum(np.asarray(x))) for x in jax.tree.leaves(
            jax.tree.map(lambda a, b: a != b, merged, src)))
      evaluate(name, merged, family=fam, rho=rho,
               params_changed=changed, conflicts=rep['num_conflicts'],
               channels_per_source=rep['channels_per_source'])
      del merged
  merges = (
      (f'linear@{mc.lerp_t:g}',
       lambda: baselines.linear_interpolation(specs[0], specs[1], mc.lerp_t)),
      (f'task_arith@{mc.ta_lambda:g}',
       lambda: baselines.task_arithmetic(src, specs, mc.ta_lambda)),
      (f'ties@{mc.ties_density:g}',
       lambda: baselines.ties(src, specs, density=mc.ties_density)),
      (f'dare@{mc.dare_drop:g}',
       lambda: baselines.dare(src, specs, drop=mc.dare_drop,
                              seed=mc.random_seed)))
  for name, make in merges:
    if name not in rows:
      with m.stage('merge'):
        merged = make()
      evaluate(name, merged, family='merge')
      del merged
  flush()

  with m.stage('report'):
    missing = [n for n in expected_rows(config) if n not in rows]
    text = merge_report.write_report(res.data, config, workdir, missing)
  flush()
  print(text)
  return res.data


_FLAGS = {}


def _define_flags():
  """Flags exist only when this module is the program (see run.py)."""
  _FLAGS['config'] = config_flags.DEFINE_config_file(
      'config', None, 'configs/smollm2_merge.py (ml_collections)')
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', None,
                                          'run directory (resumable)')


def main(argv):
  del argv
  config, workdir = _FLAGS['config'].value, _FLAGS['workdir'].value
  if not workdir:
    raise app.UsageError('--workdir is required')
  if config is None:
    raise app.UsageError('--config is required')
  run(config, workdir)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
