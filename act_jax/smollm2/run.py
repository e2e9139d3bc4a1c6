"""The SmolLM2 forgetting case end to end: specialist, recover sweep,
baselines, the four analyses and the report, resumable.

  python -m act_jax.smollm2.run --config=configs/smollm2_recover.py:case \
      --workdir=workdir/smollm2 --config.report.out=docs/results/smollm2.md

Stages (each result is saved in `workdir/results.json` as it lands, so a
rerun skips what is done; trained specialists are cached outside the repo):
  data        corpus.write_corpus -> workdir/data/*.jsonl
  source      SmolLM2-135M-Instruct (or models.source) + its abilities
  specialist  train.finetune(scope=full) on conlang text + its abilities
  statistics  collect.collect_stats of [source, specialist] on two disjoint
              probe halves (their sum is the full probe set)
  recover     for each score x rho: transplant the top channels of the
              source into the specialist (transfer.transplant_channels),
              with and without the compatibility fine-tune (scope channels)
  baselines   random / weight-diff channels at the same budget, linear
              interpolation, task arithmetic, TIES, DARE, full fine-tune on
              the same data and steps, random channels + the same fine-tune
  report      concentration, activation vs weight overlap, sufficiency,
              stability; Markdown table + plots
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from act_jax import baselines, checkpoint, masks, optim, train, transfer
from act_jax.smollm2 import abilities, corpus, meter, models, report, sweep

_FLAGS = {}


def _define_flags():
  """Flags exist only when this module is the program: importing it (tests,
  other entry points that define --config/--workdir) must not clash."""
  _FLAGS['config'] = config_flags.DEFINE_config_file(
      'config', None, 'configs/smollm2_recover.py:case (ml_collections)')
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', None,
                                          'run directory (resumable)')
  _FLAGS['report_only'] = flags.DEFINE_bool(
      'report_only', False, 'only (re)write the report from results.json; '
      'rows still missing are listed and the report is marked PARTIAL')


RESULTS_FILE = 'results.json'


def sub_config(cfg_dict, cls):
  """A dataclass from an ml_collections sub-config; names unknown fields."""
  values = dict(cfg_dict)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f'{cls.__name__}: unknown fields {unknown}; known: '
                     f'{sorted(known)}')
  return cls(**values)


class Results:
  """results.json: rows per variant, stages, analyses; saved atomically."""

  def __init__(self, path: str, fingerprint: str):
    self.path = path
    self.data: dict[str, Any] = {'fingerprint': fingerprint, 'rows': {},
                                 'analyses': {}, 'stages': {}, 'info': {}}
    if os.path.isfile(path):
      with open(path) as f:
        old = json.load(f)
      if old.get('fingerprint') == fingerprint:
        self.data = old
      else:
        logging.warning('%s: config changed, starting over', path)

  def save(self) -> None:
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(self.data, f, indent=1, sort_keys=True)
    os.replace(tmp, self.path)

  @property
  def rows(self) -> dict[str, Any]:
    return self.data['rows']


def expected_rows(config) -> list[str]:
  """Every row name a complete run of `config` produces."""
  loc, bl, cp = config.localize, config.baselines, config.compat
  names = ['source', 'specialist']
  for rho in tuple(loc.rhos) + tuple(loc.curve_extra_rhos):
    for s in (loc.scores if rho in loc.rhos else loc.scores[:1]):
      names.append(f'act[{s}]@{rho:g}')
    names += [f'random@{rho:g}', f'weight_diff@{rho:g}']
  names += [f'linear@{bl.lerp_t:g}', f'task_arith@{bl.ta_lambda:g}',
            f'ties@{bl.ties_density:g}', f'dare@{bl.dare_drop:g}']
  if cp.enabled:
    for rho in tuple(cp.rhos) or tuple(loc.rhos):
      names += [f'act[{s}]@{rho:g}+ft' for s in loc.scores]
      if any(abs(rho - r) < 1e-9 for r in bl.random_ft_rhos):
        names.append(f'random@{rho:g}+ft')
    names.append('full_ft')
  return names


def write_report_only(config, workdir: str) -> str:
  """The report of whatever results.json holds (PARTIAL if rows miss)."""
  with open(os.path.join(workdir, RESULTS_FILE)) as f:
    data = json.load(f)
  missing = [n for n in expected_rows(config) if n not in data['rows']]
  text = report.write_report(data, config, workdir, missing=missing)
  print(text)
  return text


def _moved(mask_tree, params) -> int:
  """Parameter entries a leaf mask selects."""
  return optim.mask_counts(optim.normalize_mask(mask_tree, params),
                           params)[0]


def run(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the whole case; returns results.json's content."""
  os.makedirs(workdir, exist_ok=True)
  # Rows are named by their own knobs (score, rho, ...) and carry a key of
  # what else they depend on: the specialist (every row but the source) and
  # the fine-tune (rows with +ft); only data/eval changes drop everything.
  cd = config.to_dict()
  fp = models.digest({k: cd[k] for k in ('models', 'data', 'eval')})
  # spec_key / ft_key also name the specialist's directory (its cache key
  # digests the training code), set once it is known below.
  spec_key = ft_key = None
  res = Results(os.path.join(workdir, RESULTS_FILE), fp)
  m = meter.Meter()
  for k, v in res.data['stages'].items():
    m.stages[k] = v
  rows = res.rows

  def stage(name):
    return m.stage(name)

  def flush():
    res.data['stages'] = m.stages
    res.save()

  # ------------------------------------------------------------------ data
  with stage('data'):
    data_cfg = sub_config(config.data, corpus.CorpusConfig)
    manifest = corpus.write_corpus(os.path.join(workdir, 'data'), data_cfg)
    recs = {n: corpus.read_jsonl(os.path.join(workdir, 'data', f'{n}.jsonl'))
            for n in corpus.FILES}
  res.data['info']['data'] = manifest
  eval_cfg = sub_config(config.eval, abilities.EvalConfig)

  # ---------------------------------------------------------------- source
  with stage('source_load'):
    src_dir = models.source_dir(config.models.source, config.cache_dir)
    tok = checkpoint.load_tokenizer(src_dir)
    cfg, src = checkpoint.load_model(src_dir)
    sets = abilities.make_eval_sets(recs, tok, eval_cfg)
  res.data['info']['source'] = src_dir
  res.data['info']['num_params'] = int(sum(x.size for x in
                                           jax.tree.leaves(src)))

  def row_key(name):
    return (fp if name == 'source' else ft_key if name.endswith('ft')
            else spec_key)

  def done(name):
    return name in rows and rows[name].get('key') == row_key(name)

  def evaluate(name: str, params, **info):
    if done(name):
      return
    t0 = time.time()
    with stage('eval'):
      vals, replies = abilities.evaluate_abilities(params, cfg, sets, tok,
                                                   eval_cfg)
    row = dict(info)
    row.update(vals)
    row['eval_s'] = time.time() - t0
    row['key'] = row_key(name)
    row['replies'] = replies[:config.report.keep_replies]
    rows[name] = row
    logging.info('%-28s %s', name, {k: round(v, 4) for k, v in vals.items()})
    flush()

  evaluate('source', src, family='source')

  # ------------------------------------------------------------ specialist
  with stage('specialist_train'):
    key = {'source': config.models.source or 'smollm2-135m-instruct',
           'conlang_train': manifest['files']['conlang_train']['sha256']}
    spec_dir, cached = models.specialist(src_dir, recs['conlang_train'], tok,
                                         config.specialist,
                                         config.cache_dir, key)
  res.data['info']['specialist'] = {'dir': spec_dir, 'cached': cached}
  spec_key = models.digest([cd['specialist'], os.path.basename(spec_dir)])
  ft_key = models.digest([spec_key, cd['compat']])
  _, spec = checkpoint.load_model(spec_dir)
  evaluate('specialist', spec, family='specialist')

  # ------------------------------------------------------------ statistics
  loc = config.localize
  with stage('statistics'):
    half_a, half_b = sweep.probe_halves(recs['qa_train'],
                                        recs['english_probe'], tok,
                                        loc.max_seq_len, loc.batch_size)
    stats_key = models.digest([fp, spec_key, loc.max_seq_len,
                               loc.batch_size])
    pair_a, pair_b = (
        sweep.cached_pair(os.path.join(workdir, f'stats_{h}_{stats_key}.npz'),
                          lambda b=b: sweep.collect_pair(src, spec, cfg, b))
        for h, b in (('a', half_a), ('b', half_b)))
    pair = sweep.add_stats(pair_a, pair_b)
  res.data['info']['probe_tokens'] = {
      'half_a': int(pair_a['count'][0]), 'half_b': int(pair_b['count'][0])}

  # -------------------------------------------------------------- localize
  with stage('localize'):
    sc = {s: sweep.channel_scores(pair, s) for s in loc.scores}
    sc_a = {s: sweep.channel_scores(pair_a, s) for s in loc.scores}
    sc_b = {s: sweep.channel_scores(pair_b, s) for s in loc.scores}
    wd = sweep.channel_scores(pair, 'weight_diff', source_params=src,
                              specialist_params=spec)
    ana = res.data['analyses']
    ana['concentration'] = {s: sweep.concentration(sc[s])
                            for s in loc.scores}
    ana['concentration']['weight_diff'] = sweep.concentration(wd)
    ana['overlap_act_vs_weight'], ana['stability'] = {}, {}
    ana['overlap_scores'] = {}
    for rho in loc.rhos:
      r = f'{rho:g}'
      wmask = sweep.act_mask(wd, rho)
      ana['overlap_act_vs_weight'][r], ana['stability'][r] = {}, {}
      for s in loc.scores:
        amask = sweep.act_mask(sc[s], rho)
        ana['overlap_act_vs_weight'][r][s] = sweep.overlap(amask, wmask)
        ana['stability'][r][s] = sweep.overlap(
            sweep.act_mask(sc_a[s], rho), sweep.act_mask(sc_b[s], rho))
      if len(loc.scores) >= 2:
        m0, m1 = (sweep.act_mask(sc[s], rho) for s in loc.scores[:2])
        ana['overlap_scores'][r] = sweep.overlap(m0, m1)
  flush()

  def ft_at(rho, rhos):
    return config.compat.enabled and any(abs(rho - r) < 1e-9 for r in rhos)

  # ------------------------------------------------- compat fine-tune data
  ft_cfg = train.check_train_config(config.compat.train)
  with stage('compat_data'):
    ft_batches = models.batches_for(
        models.compat_examples(recs['qa_train'], recs['conlang_train'], tok,
                               ft_cfg, config.compat.qa_weight), ft_cfg)

  def finetune(name, start, channel_mask, scope, **info):
    if done(name):
      return
    tc = dataclasses.replace(ft_cfg, scope=scope)
    mask_tree = (masks.leaf_masks(channel_mask, start)
                 if channel_mask is not None else None)
    t0 = time.time()
    # finetune donates its start params; a transplant shares untouched
    # leaves with the specialist, so train on a copy.
    start = jax.tree.map(jnp.copy, start)
    with stage('compat_finetune' if scope != 'full' else 'full_finetune'):
      new = train.finetune(tc, start, cfg, ft_batches, mask=mask_tree)
    evaluate(name, new, ft_s=time.time() - t0, ft_steps=tc.num_steps,
             **info)

  def transplant(name, channel_mask, ft: bool, **info):
    if done(name) and (not ft or done(name + '+ft')):
      return
    with stage('transplant'):
      tree = masks.leaf_masks(channel_mask, spec)
      new = transfer.transplant(spec, src, tree)
      moved = _moved(tree, spec)
    evaluate(name, new, params_moved=moved, **info)
    if ft:
      finetune(name + '+ft', new, channel_mask, 'channels',
               params_moved=moved, **dict(info, ft=True))

  # ------------------------------------- recover + baselines, no fine-tune
  # Cheapest and most informative rows first, fine-tunes last, so an
  # interrupted run still has the whole sufficiency picture.
  bl = config.baselines
  ref = loc.scores[0]
  all_rhos = tuple(loc.rhos) + tuple(loc.curve_extra_rhos)
  for rho in all_rhos:
    for s in (loc.scores if rho in loc.rhos else loc.scores[:1]):
      transplant(f'act[{s}]@{rho:g}', sweep.act_mask(sc[s], rho), ft=False,
                 family='act', score=s, rho=rho)
    amask = sweep.act_mask(sc[ref], rho)
    with stage('localize'):
      rmask = baselines.random_mask(amask, bl.random_seed)
      wmask = baselines.budget_matched_mask(amask, wd)
    transplant(f'random@{rho:g}', rmask, ft=False, family='random', rho=rho)
    transplant(f'weight_diff@{rho:g}', wmask, ft=False,
               family='weight_diff', rho=rho)
  merges = (
      (f'linear@{bl.lerp_t:g}',
       lambda: baselines.linear_interpolation(spec, src, bl.lerp_t)),
      (f'task_arith@{bl.ta_lambda:g}',
       lambda: baselines.task_arithmetic(src, [spec], bl.ta_lambda)),
      (f'ties@{bl.ties_density:g}',
       lambda: baselines.ties(src, [spec], density=bl.ties_density)),
      (f'dare@{bl.dare_drop:g}',
       lambda: baselines.dare(src, [spec], drop=bl.dare_drop,
                              seed=bl.random_seed)))
  for name, make in merges:
    if not done(name):
      with stage('merge'):
        merged = make()
      evaluate(name, merged, family='merge')
      del merged
  flush()

  # ------------------------------------------------------------ fine-tunes
  if config.compat.enabled:
    ft_rhos = tuple(config.compat.rhos) or tuple(loc.rhos)
    first = [r for r in loc.rhos if abs(r - ft_rhos[0]) < 1e-9][:1]
    for rho in first + [r for r in ft_rhos if r not in first]:
      for s in loc.scores:
        transplant(f'act[{s}]@{rho:g}', sweep.act_mask(sc[s], rho), ft=True,
                   family='act', score=s, rho=rho)
      if ft_at(rho, bl.random_ft_rhos):
        with stage('localize'):
          rmask = baselines.random_mask(sweep.act_mask(sc[ref], rho),
                                        bl.random_seed)
        transplant(f'random@{rho:g}', rmask, ft=True, family='random',
                   rho=rho)
      if rho in first:
        finetune('full_ft', spec, None, 'full', family='full_ft', ft=True,
                 params_moved=res.data['info']['num_params'])
  flush()

  # ---------------------------------------------------------------- report
  with stage('report'):
    missing = [n for n in expected_rows(config) if not done(n)]
    text = report.write_report(res.data, config, workdir, missing=missing)
  flush()
  print(text)
  return res.data


def main(argv):
  del argv
  config, workdir = _FLAGS['config'].value, _FLAGS['workdir'].value
  if not workdir:
    raise app.UsageError('--workdir is required')
  if config is None:
    raise app.UsageError('--config is required')
  if _FLAGS['report_only'].value:
    write_report_only(config, workdir)
  else:
    run(config, workdir)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
