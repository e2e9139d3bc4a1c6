"""Stage bodies after localization: transfer, finetune, evaluate, report.

Candidates of a recover job (source S has the ability, target T lost it):
  target, source (= full copy), act (T + M (S - T)), random and weight_diff
  (same per-(site, layer) budget), linear (midpoint), task_arithmetic
  (S + lam (T - S)), ties and dare (S as the base, T's delta trimmed /
  dropped), act_ft (act after the compatibility fine-tune).
Candidates of a merge job (base B, specialists S_k): base, each specialist,
  act (transfer.merge with the conflict policy), random, weight_diff,
  linear (mean of the specialists), task_arithmetic, ties, dare, act_ft.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import numpy as np

from act_jax import checkpoint, stages as stages_lib
from act_jax.stage_bodies import Ctx, _load, _records, _tokenizer, _data_cfg
from act_jax.stage_bodies import load_scores

KINDS = ('act', 'weight_diff', 'random')


def _mask(ctx: Ctx, job: str, ability: str, kind: str):
  from act_jax import masks  # pylint: disable=g-import-not-at-top
  return masks.load_masks(os.path.join(ctx.input_dir('localize'), job,
                                       ability, kind))[0]


def _save(ctx: Ctx, sub: str, params, cfg, tok_model: str):
  if ctx.sub_done(sub):
    return
  tok_dir = os.path.join(ctx.input_dir('convert'), tok_model)
  checkpoint.save_params_dir(ctx.sub_dir(sub), params, cfg,
                             tokenizer_dir=tok_dir)


def build_candidates(transfer_cfg, job: dict, ctx: Ctx):
  """`(cfg, {candidate: thunk -> params}, report)` of one job.

  Thunks are cheap (a masked select or a merge), so only the ACT result is
  saved by the transfer stage; evaluate rebuilds the baselines in memory
  (saving every baseline of a 7B model would cost ~15 GB each).
  """
  from act_jax import baselines, transfer as transfer_lib  # pylint: disable=g-import-not-at-top,g-multiple-import
  from act_jax import pipeline  # pylint: disable=g-import-not-at-top
  wanted = pipeline.parse_list(transfer_cfg.baselines)
  name = job['name']
  report = {}
  if job['kind'] == 'recover':
    p = job['pairs'][0]
    cfg, tgt = _load(ctx, p['target'])
    _, src = _load(ctx, p['source'])
    build = {k: (lambda k=k: transfer_lib.transplant_channels(
        tgt, src, _mask(ctx, name, p['ability'], k),
        alpha=transfer_cfg.alpha)) for k in KINDS}
    build.update({
        'linear': lambda: baselines.linear_interpolation(
            tgt, src, transfer_cfg.interp_t),
        'task_arithmetic': lambda: baselines.task_arithmetic(
            src, [tgt], transfer_cfg.ta_lambda),
        'ties': lambda: baselines.ties(src, [tgt], transfer_cfg.ties_density),
        'dare': lambda: baselines.dare(src, [tgt], transfer_cfg.dare_drop,
                                       seed=transfer_cfg.seed)})
  else:
    cfg, base = _load(ctx, job['base'])
    specs = list(job['specialists'].items())
    srcs = [_load(ctx, s)[1] for s, _ in specs]
    names = [s for s, _ in specs]

    def merged(kind):
      ms = [_mask(ctx, name, a, kind) for _, a in specs]
      sc = [load_scores(os.path.join(ctx.input_dir('localize'), name, a,
                                     'scores.npz')) for _, a in specs]
      out, rep = transfer_lib.merge(base, srcs, ms, sc,
                                    policy=transfer_cfg.policy,
                                    alpha=transfer_cfg.alpha, names=names)
      report[f'{kind}_conflicts'] = rep['num_conflicts']
      return out

    build = {k: (lambda k=k: merged(k)) for k in KINDS}
    build.update({
        'linear': lambda: _mean(srcs),
        'task_arithmetic': lambda: baselines.task_arithmetic(
            base, srcs, transfer_cfg.ta_lambda),
        'ties': lambda: baselines.ties(base, srcs, transfer_cfg.ties_density),
        'dare': lambda: baselines.dare(base, srcs, transfer_cfg.dare_drop,
                                       seed=transfer_cfg.seed)})
  build = {k: v for k, v in build.items() if k in KINDS or k in wanted}
  return cfg, build, report


def transfer(transfer_cfg, jobs: list[dict], ctx: Ctx) -> dict:
  """The ACT transplant (recover) or merge of each job -> `<job>/act/`."""
  out = {}
  for job in jobs:
    if job['analyze_only']:
      continue
    sub = os.path.join(job['name'], 'act')
    cfg, build, report = build_candidates(transfer_cfg, job, ctx)
    if not ctx.sub_done(sub):
      tok = (job['pairs'][0]['target'] if job['kind'] == 'recover'
             else job['base'])
      _save(ctx, sub, build['act'](), cfg, tok)
    out[job['name']] = report
  stages_lib.write_atomic_json(ctx.sub_dir('transfer.json'), out)
  return out


def _mean(trees):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)


# ----------------------------------------------------------------- finetune


def _sft_records(sft_cfg, abilities: dict[str, dict], job: dict) -> list[dict]:
  """The mixed SFT data: the transferred abilities and the retained ones."""
  from act_jax import data  # pylint: disable=g-import-not-at-top
  moved = {p['ability'] for p in job['pairs']}
  sources = []
  for a in job['abilities']:
    w = sft_cfg.ability_weight if a in moved else sft_cfg.retain_weight
    if w > 0 and abilities[a].get('sft'):
      sources.append((_records(abilities[a]['sft']), w))
  return data.mix_sources(sources, seed=sft_cfg.seed, total=sft_cfg.num_records)


def finetune(train_cfg, sft_cfg, abilities: dict[str, dict], jobs: list[dict],
             ctx: Ctx) -> dict:
  """Compatibility fine-tune of each job's ACT result, channels only."""
  from act_jax import data, masks, train  # pylint: disable=g-import-not-at-top,g-multiple-import
  out = {}
  for job in jobs:
    if job['analyze_only']:
      continue
    name = job['name']
    sub = os.path.join(name, 'act_ft')
    if ctx.sub_done(sub):
      continue
    cfg, params = checkpoint.load_params_dir(os.path.join(
        ctx.input_dir('transfer'), name, 'act'))
    mask = None
    for p in job['pairs']:
      m = _mask(ctx, name, p['ability'], 'act')
      mask = m if mask is None else masks.union(mask, m)
    tok = _tokenizer(ctx, job['pairs'][0]['target'])
    recs = _sft_records(sft_cfg, abilities, job)
    dcfg = _data_cfg({'template': 'qa'}, train_cfg.max_seq_len,
                     train_cfg.batch_size, loss_on='response', add_eos=True,
                     overflow='truncate')
    batches, info = data.load_batches(dcfg, tok, records=recs)
    work = ctx.sub_dir(name + '_work')
    new = train.finetune(train_cfg, params, cfg, batches, mask=mask,
                         workdir=work)
    tgt = job['pairs'][0]['target']
    _save(ctx, sub, new, cfg, tgt)
    out[name] = {'sft_records': len(recs), 'tokens': info['num_tokens'],
                 'trainable_channels': int(masks.count(mask))}
  return out


# ----------------------------------------------------------------- evaluate


def _candidates(transfer_cfg, ctx: Ctx, job: dict):
  """Candidate name -> thunk returning params, in report order."""
  conv = ctx.input_dir('convert')
  out = {}

  def load(path):
    return lambda: checkpoint.load_params_dir(path)[1]

  if job['kind'] == 'recover':
    p = job['pairs'][0]
    out['target'] = load(os.path.join(conv, p['target']))
    out['source (= full copy)'] = load(os.path.join(conv, p['source']))
  else:
    out['base'] = load(os.path.join(conv, job['base']))
    for s in job['specialists']:
      out[s] = load(os.path.join(conv, s))
  cfg, build, _ = build_candidates(transfer_cfg, job, ctx)
  for k, fn in build.items():
    if k != 'act':
      out[k] = fn
  out['act (no fine-tune)'] = load(os.path.join(ctx.input_dir('transfer'),
                                                job['name'], 'act'))
  out['act + fine-tune'] = load(os.path.join(ctx.input_dir('finetune'),
                                             job['name'], 'act_ft'))
  return cfg, out


def _score_fn(eval_cfg, abilities: dict[str, dict], names: list[str],
              tokenizer):
  """`fn(params, cfg, only=None) -> {ability: {metric: value}}`.

  engine 'toy': act_jax.toy.metrics (exact match on one fixed-shape greedy
  buffer, answer perplexity); 'act': act_jax.evaluate (KV-cache greedy
  generation with answer extraction, perplexity over answer tokens).
  """
  sets = {a: _records(abilities[a]['eval'])[:eval_cfg.num_eval or None]
          for a in names}
  if eval_cfg.engine == 'toy':
    from act_jax.toy import metrics  # pylint: disable=g-import-not-at-top

    def fn(params, cfg, only=None):
      return {a: metrics.score(params, cfg, a, sets[a], eval_cfg.max_seq_len)
              for a in (only or names)}
    return fn
  from act_jax import data, evaluate as ev  # pylint: disable=g-import-not-at-top,g-multiple-import
  eval_sets = {}
  for a in names:
    ab = abilities[a]
    if ab.get('metric', 'perplexity') == 'exact_match':
      eval_sets[a] = ev.EvalSet(gen=sets[a], extract=ab.get('extract', 'raw'),
                                max_new_tokens=ab.get('max_new_tokens', 32))
    else:
      dcfg = _data_cfg(ab, eval_cfg.max_seq_len, eval_cfg.batch_size,
                       loss_on='response', add_eos=True)
      eval_sets[a] = ev.EvalSet(ppl=data.load_batches(dcfg, tokenizer,
                                                      records=sets[a])[0])
  short = {'em': 'exact_match', 'ppl': 'perplexity'}

  def fn_act(params, cfg, only=None):
    chosen = {a: eval_sets[a] for a in (only or names)}
    res = ev.evaluate_models({'m': params}, cfg, chosen, tokenizer=tokenizer,
                             batch_size=eval_cfg.batch_size)['m']
    return {a: {short[k]: v for k, v in r.items() if k in short}
            for a, r in res.items()}
  return fn_act


def evaluate(eval_cfg, transfer_cfg, abilities: dict[str, dict],
             jobs: list[dict], ctx: Ctx) -> dict:
  """Every candidate on every ability, plus the sufficiency sweep."""
  from act_jax import baselines, masks, selection, transfer as transfer_lib  # pylint: disable=g-import-not-at-top,g-multiple-import
  from act_jax import pipeline  # pylint: disable=g-import-not-at-top
  out = {}
  for job in jobs:
    if job['analyze_only']:
      continue
    tok = _tokenizer(ctx, job['pairs'][0]['target'])
    fn = _score_fn(eval_cfg, abilities, job['abilities'], tok)
    res = {}
    cfg, cands = _candidates(transfer_cfg, ctx, job)
    for cand, thunk in cands.items():
      res[cand] = fn(thunk(), cfg)
      logging.info('evaluate %s/%s: %s', job['name'], cand, res[cand])
    result = {'results': res, 'order': list(res)}
    rhos = [float(r) for r in pipeline.parse_list(eval_cfg.rho_sweep)]
    if job['kind'] == 'recover' and rhos:
      p = job['pairs'][0]
      cfg, tgt = _load(ctx, p['target'])
      _, src = _load(ctx, p['source'])
      kdir = os.path.join(ctx.input_dir('localize'), job['name'], p['ability'])
      meta = masks.load_masks(os.path.join(kdir, 'act'))[1]
      sc = load_scores(os.path.join(kdir, 'scores.npz'))
      curve = []
      for rho in rhos:
        m = masks.couple(selection.select_channels(sc, meta['select'], rho),
                         cfg, meta['unit'])
        row = {'rho': rho, 'channels': int(masks.count(m))}
        for kind, mm in (('act', m), ('random', baselines.random_mask(m, 0)),
                         ('weight_diff', baselines.weight_diff_mask(
                             m, src, tgt))):
          new = transfer_lib.transplant_channels(tgt, src, mm)
          row[kind] = fn(new, cfg, only=[p['ability']])[p['ability']]
        curve.append(row)
        logging.info('sufficiency rho=%s: %s', rho, row)
      result['sufficiency'] = curve
    stages_lib.write_atomic_json(ctx.sub_dir(job['name'] + '.json'), result)
    out[job['name']] = res
  return out


def report(report_cfg, ctx: Ctx) -> dict:
  """report.md, plots and results.json; copies to the workdir root."""
  from act_jax import report as report_lib  # pylint: disable=g-import-not-at-top
  info = report_lib.build_report(ctx.workdir, ctx.out_dir, report_cfg)
  for name in ('results.json', 'report.md'):
    src = os.path.join(ctx.out_dir, name)
    tmp = os.path.join(ctx.workdir, name + '.tmp')
    with open(src) as f, open(tmp, 'w') as g:
      g.write(f.read())
    os.replace(tmp, os.path.join(ctx.workdir, name))
  return info
