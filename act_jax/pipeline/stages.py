"""The ACT stages: one function per stage, each taking its sub-configs.

`make_stages(plan)` returns the ordered stages of the plan's modes:
  build_models  (config.case set) the case builder, chosen by name
                (`act_jax.cases.<name>.build`): toy models, SmolLM2 data
                and specialists, ...
  convert       every model a job uses -> `convert/<model>/` params dir
  collect       per probed ability: activation statistics of all models on
                its probe set, two disjoint halves + their sum (`full`)
  localize      per job and ability: the sweep's scores (pooled over the
                pair's probe abilities), the primary ACT / weight-diff /
                random masks at one budget, and the four analyses
  transfer      per job: the primary ACT transplant or merge
  finetune      per job: its compatibility fine-tune (channels only)
  evaluate      per job: every candidate of the sweep on every ability, with
                per-item outcomes (one sub-artifact per candidate)
  patch         (sweep.patch set) per recover job: activation patching of
                the sweep's channel sets, teacher-forced on every ability
  report        report.md, plots, results.json from the artifacts alone
  export        per job: each saved result (act, act_ft) as an HF directory
                with a Hub model card and HF-named channel masks
                (pipeline/export.py)
Every stage but build_models (the case chooses its devices) runs on the one
mesh of `config.mesh_shape` (`make_stages(plan, mesh)`): params are
restored straight onto it and statistics, fine-tune and evaluation run on
it; a stage that placed arrays on any other mesh or device fails by name,
and its COMPLETE.json records the mesh. Under jax.distributed every process
runs every stage body; process 0 writes the small artifacts while the
others wait (`_primary`), and params dirs are written collectively.
Artifacts (every write is atomic; sub-artifacts make killed stages resume):
  convert/<model>/                        params dir
  collect/<ability>/{half0,half1,full}/   statistics (io.stats)
  localize/<job>/<ability>/scores.safetensors  `<score>[.half0|.half1]/<site>`
                                          and `weight_diff/<site>`
  localize/<job>/<ability>/{act,weight_diff,random}/  primary masks
  localize/analysis.json                  concentration, overlaps, stability
  transfer/<job>/act/, finetune/<job>/act_ft/  params dirs
  evaluate/<job>/<candidate>.json         metrics + per-item outcomes
  evaluate/<job>/samples/<candidate>/<ability>.jsonl  one line per item
                                          (prompt, answers, generation,
                                          extracted, correct | nll, tokens)
  evaluate/<job>.json                     the job's table, in row order
  export/<job>/{act,act_ft}/              HF dirs: safetensors, config,
                                          tokenizer, README.md (ModelCard),
                                          channel_masks.json
  patch/<job>/<candidate>.json, patch/<job>.json   the same for patching
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from act_jax import data
from act_jax import distributed
from act_jax.act import analysis
from act_jax.act import collect as collect_lib
from act_jax.act import localize as localize_lib
from act_jax.act import masks as masks_lib
from act_jax.act import patching
from act_jax.eval import metrics as eval_metrics
from act_jax.eval import suite as eval_suite
from act_jax.io import atomic
from act_jax.io import hf
from act_jax.io import models as models_io
from act_jax.io import params as params_io
from act_jax.io import stats as stats_io
from act_jax.model import capture
from act_jax.model import forward
from act_jax.model import sharding
from act_jax.pipeline import candidates as cand_lib
from act_jax.pipeline import export as export_lib
from act_jax.pipeline import jobs as jobs_lib
from act_jax.pipeline import preflight
from act_jax.pipeline import report as report_lib
from act_jax.pipeline import runner
from act_jax.train import finetune as finetune_lib
from act_jax.train import optim

Ctx = runner.StageContext
PARTS = ('full', 'half0', 'half1')
# The act_jax code each stage runs (its drift key digests these sources).
_CORE = ('model', 'io', 'data.py', 'distributed.py', 'pipeline/stages.py')
CODE = {
    'build_models': ('cases', 'act', 'train', 'eval') + _CORE,
    'convert': _CORE,
    'collect': ('act/collect.py',) + _CORE,
    'localize': ('act', 'pipeline/candidates.py') + _CORE,
    'transfer': ('act', 'pipeline/candidates.py') + _CORE,
    'finetune': ('act', 'train', 'pipeline/candidates.py') + _CORE,
    'evaluate': ('act', 'train', 'eval', 'pipeline/candidates.py') + _CORE,
    'export': ('act', 'pipeline/candidates.py', 'pipeline/export.py') + _CORE,
    'patch': ('act', 'pipeline/candidates.py') + _CORE,
    'report': ('pipeline/report.py', 'pipeline/intervals.py',
               'pipeline/plots.py', 'pipeline/patch_report.py',
               'pipeline/stages.py', 'io'),
}
# What an ability's evaluation reads: every split the plan scores, and the
# SFT data its fine-tuned rows train on.
EVAL_USES = ('eval', 'dev')


def make_stages(plan: jobs_lib.Plan, mesh: jax.sharding.Mesh | None = None
               ) -> list[runner.Stage]:
  """The ordered stages of `plan` (each body gets only what it needs).

  `mesh` (default: built from `plan.mesh_shape`) is the one every stage but
  build_models runs on.
  """
  if mesh is None:
    mesh = sharding.make_mesh(plan.mesh_shape)
  snap = jobs_lib.snapshot
  models = {n: plan.models[n] for n in plan.model_names}
  probed = {a: plan.abilities[a] for a in plan.probed_abilities}
  out = []
  if plan.case:
    out.append(runner.Stage(
        'build_models', lambda ctx: build_models(plan.case, ctx),
        snapshot=snap(plan.case), code=CODE['build_models']))
  pre = ('build_models',) if plan.case else ()
  def S(name, body, **kw):  # pylint: disable=invalid-name
    return runner.Stage(name, on_mesh(name, mesh, body),
                        mesh=sharding.describe(mesh), **kw)

  # The files each stage reads from outside the workdir's stage chain: their
  # content fingerprints enter its drift key (runner.drift_key).
  def files(use, names):
    return tuple(getattr(plan.abilities[a], use) for a in names
                 if getattr(plan.abilities[a], use))

  evaluated = tuple(a for j in plan.jobs for a in j.abilities)
  eval_files = tuple(p for use in EVAL_USES for p in files(use, evaluated))
  out.append(S('convert', lambda ctx: convert(plan.convert, models, ctx,
                                              mesh),
               inputs=pre, snapshot=snap(plan.convert, models),
               code=CODE['convert'], paths=tuple(models.values()),
               follow_symlinks=plan.convert.follow_symlinks))
  out.append(S('collect', lambda ctx: collect(plan.collect, probed,
                                              plan.model_names, ctx, mesh),
               inputs=('convert',), snapshot=snap(plan.collect, probed,
                                                  plan.model_names),
               code=CODE['collect'], paths=files('probe', probed)))
  out.append(S('localize', lambda ctx: localize(plan, ctx, mesh),
               inputs=('convert', 'collect'),
               snapshot=snap(plan.localize, plan.scores, plan.rhos,
                             plan.jobs), code=CODE['localize']))
  if plan.modes != ('analyze',):
    out.append(S('transfer', lambda ctx: transfer(plan, ctx, mesh),
                 inputs=('convert', 'localize'),
                 snapshot=snap(plan.localize, plan.transfer, plan.jobs),
                 code=CODE['transfer']))
    out.append(S('finetune', lambda ctx: finetune(plan, ctx, mesh),
                 inputs=('convert', 'localize', 'transfer'),
                 snapshot=snap(plan.train, plan.sft, plan.abilities,
                               plan.jobs, plan.seeds),  # seeds: SFT order
                 code=CODE['finetune'], paths=files('sft', plan.abilities)))
    out.append(S('evaluate', lambda ctx: evaluate(plan, ctx, mesh),
                 inputs=('convert', 'localize', 'transfer', 'finetune'),
                 snapshot=snap(plan.evaluate, plan.sweep, plan.localize,
                               plan.transfer, plan.baselines, plan.train,
                               plan.sft, plan.abilities, plan.jobs),
                 code=CODE['evaluate'],
                 paths=eval_files + files('sft', plan.abilities)))
  patched = ()
  if plan.sweep.patch and any(j.kind == 'recover' for j in plan.jobs):
    patched = ('patch',)
    out.append(S('patch', lambda ctx: patch(plan, ctx, mesh),
                 inputs=('convert', 'localize'),
                 snapshot=snap(plan.evaluate, plan.sweep, plan.localize,
                               plan.abilities, plan.jobs),
                 code=CODE['patch'], paths=eval_files))
  # The report and the export are derived from the workdir alone and cheap:
  # a changed report config or report code recomputes them (`rederive`)
  # instead of refusing the rerun.
  out.append(S('report', lambda ctx: report(plan, ctx),
               inputs=(('localize',) if plan.modes == ('analyze',) else
                       ('localize', 'evaluate')) + patched,
               snapshot=snap(plan.report, plan.models, plan.abilities,
                             plan.jobs, plan.localize, plan.sweep,
                             plan.train, plan.sft, plan.evaluate),
               code=CODE['report'], rederive=True))
  if plan.modes != ('analyze',):
    out.append(S('export', lambda ctx: export_lib.export_results(
        plan, ctx.workdir, ctx.out_dir, ctx.sub_done, mesh),
                 inputs=('convert', 'localize', 'transfer', 'finetune',
                         'evaluate', 'report'),
                 snapshot=snap(plan.export, plan.models, plan.localize,
                               plan.transfer, plan.train, plan.sft,
                               plan.jobs, {'bootstrap': plan.report.bootstrap,
                                           'confidence':
                                               plan.report.confidence}),
                 code=CODE['export'], rederive=True))
  logging.info('stages: %s', ', '.join(s.name for s in out))
  return out


def on_mesh(name: str, mesh: jax.sharding.Mesh, body):
  """`body` as a stage run that fails if it used another mesh than `mesh`.

  Library calls without a mesh fall back to a default mesh or to one device
  (`sharding.track_meshes` sees both), which on a pod would mean replicas
  of every model on every chip; so a forgotten `mesh=` is an error here.
  """
  want = sharding.describe(mesh)

  def run(ctx: Ctx):
    with sharding.track_meshes() as used:
      out = body(ctx)
    other = [m for m in used if m != want]
    if other:
      raise runner.StageError(
          f'stage {name!r} placed arrays on {other}, not only on the '
          f'configured mesh {want} (--config.mesh_shape)')
    return out

  return run


def _primary(tag: str, write, *args, **kwargs) -> None:
  """Process 0 runs the small write `write(*args)`; every process waits.

  Every process calls this at the same point (whatever the file system
  says), so the barrier always matches and later reads see the file.
  """
  if distributed.is_primary():
    write(*args, **kwargs)
  distributed.barrier(tag)


def _done(ctx: Ctx, sub: str) -> bool:
  """`ctx.sub_done(sub)`, decided by all processes at the same moment (a
  process ahead of the others could otherwise already have written it)."""
  distributed.barrier(f'{ctx.name}:check:{sub}')
  return ctx.sub_done(sub)


def _model_dir(ctx: Ctx, name: str) -> str:
  return os.path.join(ctx.input_dir('convert'), name)


# ------------------------------------------------------------ build, convert


def build_models(case: dict[str, Any], ctx: Ctx) -> dict:
  """The case's builder, loaded by name (`act_jax.cases.<name>.build`, as
  big_vision loads evaluators): the core never imports a case."""
  try:
    module = importlib.import_module(f'act_jax.cases.{case["name"]}.build')
  except ModuleNotFoundError:
    raise jobs_lib.ConfigError(
        f'--config.case.name={case["name"]!r}: no such case (a package '
        f'act_jax/cases/<name>/ with build.py)') from None
  return module.build(dict(case), ctx.out_dir)


def convert(convert_cfg: jobs_lib.ConvertConfig, models: dict[str, str],
            ctx: Ctx, mesh: jax.sharding.Mesh) -> dict:
  """Every needed model -> `convert/<model>/` params dir (resumable).

  A model given as a Hub id (`org/name`) is read from its local snapshot
  (`models_io.resolve_model`)."""
  models = {n: models_io.resolve_model(p) for n, p in models.items()}
  follow = convert_cfg.follow_symlinks
  cfgs = models_io.check_related(models, follow_symlinks=follow)
  name0 = next(iter(cfgs))
  preflight.check_model_mesh(cfgs[name0], mesh,
                             f'model {name0} ({models[name0]})')
  for name, path in models.items():
    if _done(ctx, name):
      continue
    cfg, params = models_io.load_model(
        path, param_dtype=convert_cfg.param_dtype or None, mesh=mesh,
        follow_symlinks=follow)
    hf_cfg = None
    if os.path.isfile(os.path.join(path, 'config.json')):
      hf_cfg = hf.read_hf_config_dict(path, follow)
    else:
      hf_cfg = params_io.load_hf_config_dict(path)
    params_io.save_params_dir(ctx.sub_dir(name), params, cfg,
                              tokenizer_dir=path, hf_config=hf_cfg,
                              meta={'source': os.path.abspath(path)},
                              follow_symlinks=follow)
  return {'models': models}


# ------------------------------------------------------------------ collect


def data_config(ability: jobs_lib.Ability, use: str, max_seq_len: int,
                batch_size: int = 8, count_tokens: str = 'all'
               ) -> data.DataConfig:
  """How `ability`'s records become rows for one use: probe | eval | sft.

  One rendering per ability whatever the use (`data.encode_record`). The
  response is the answer (+ EOS for template qa; a chat template ends the
  turn itself); SFT plain text is cut into chunks of T so no token is
  lost, other records longer than T follow the ability's `overflow`.
  """
  return data.DataConfig(
      template=ability.template, text_field=ability.text_field,
      prompt_field=ability.prompt_field,
      response_field=ability.response_field, qa_format=ability.qa_format,
      max_seq_len=max_seq_len, batch_size=batch_size,
      pack=ability.probe_pack if use == 'probe' else False,
      loss_on=count_tokens if use == 'probe' else 'response',
      overflow=('chunk' if use == 'sft' and ability.template == 'text'
                else ability.overflow),
      add_eos=use != 'probe' and ability.template == 'qa')


def collect(collect_cfg: jobs_lib.CollectConfig,
            abilities: dict[str, jobs_lib.Ability], names: tuple[str, ...],
            ctx: Ctx, mesh: jax.sharding.Mesh) -> dict:
  """Statistics of all models on each probed ability's probe set.

  The probe set is split into two disjoint halves (even / odd records);
  `full` is their sum, so stability needs no extra forward passes.
  """
  dirs = [_model_dir(ctx, n) for n in names]
  tok = models_io.load_tokenizer(dirs[0])
  loaded = [models_io.load_model(d, mesh=mesh) for d in dirs]
  cfg = loaded[0][0].replace(dtype=collect_cfg.dtype)
  params = [p for _, p in loaded]
  spec = capture.CaptureSpec(jobs_lib.parse_list(collect_cfg.sites) or
                             capture.OUTPUT_SITES)
  out = {}
  for name, ability in abilities.items():
    recs = data.load_records(ability.probe)
    if collect_cfg.num_probe:
      recs = recs[:collect_cfg.num_probe]
    halves = []
    for h in range(2):
      sub = os.path.join(name, f'half{h}')
      if not _done(ctx, sub):
        dcfg = data_config(ability, 'probe', collect_cfg.max_seq_len,
                           collect_cfg.batch_size, collect_cfg.count_tokens)
        batches, info = data.load_batches(dcfg, tok, records=recs[h::2])
        mine = data.local_batches(batches, jax.process_index(),
                                  jax.process_count())
        flat = collect_lib.collect_stats(
            params, cfg, mine, spec, mesh=mesh,
            ckpt_dir=ctx.sub_dir(sub + '.ckpt'),
            save_every=collect_cfg.save_every, num_batches=len(mine),
            fingerprint={'probe': info, 'models': list(names)},
            attribution=collect_cfg.attribution)
        manifest = stats_io.make_manifest(
            names, cfg, spec.sites, dict(info, path=ability.probe, half=h),
            flat, attribution=collect_cfg.attribution)
        _primary(f'collect:{sub}', stats_io.save_stats, ctx.sub_dir(sub),
                 flat, manifest)
        _primary(f'collect:{sub}.ckpt', atomic.remove_tree,
                 ctx.sub_dir(sub + '.ckpt'))
      halves.append(stats_io.load_stats(ctx.sub_dir(sub)))
    full = stats_io.add_stats(halves)
    _primary(f'collect:{name}/full', stats_io.save_stats,
             ctx.sub_dir(os.path.join(name, 'full')), full,
             dict(halves[0].manifest, num_tokens=int(full['count'][0]),
                  probe={'path': ability.probe, 'halves': 2}),
             overwrite=True)  # a resumed stage writes it again
    out[name] = {'tokens': int(full['count'][0]), 'texts': len(recs)}
  return out


# ----------------------------------------------------------------- localize


def pair_stats(collect_dir: str, pair: jobs_lib.Pair
              ) -> dict[str, stats_io.Stats]:
  """`{part: Stats}` of a pair, pooled over its probe abilities."""
  out = {}
  for part in PARTS:
    parts = [stats_io.load_stats(os.path.join(collect_dir, a, part))
             for a in pair.probe]
    if len(parts) == 1:
      out[part] = parts[0]
    else:
      out[part] = stats_io.as_stats(stats_io.add_stats(parts),
                                    parts[0].manifest)
  return out


def localize(plan: jobs_lib.Plan, ctx: Ctx, mesh: jax.sharding.Mesh) -> dict:
  """Scores of the sweep, primary masks and the analyses, per job pair."""
  names = list(plan.model_names)
  loc = plan.localize
  summary, found = {}, {}
  analyses = {'concentration': {}, 'act_vs_weight': {}, 'stability': {},
              'overlap_scores': {}, 'overlap': {}}
  for job in plan.jobs:
    builder = cand_lib.Builder(plan, job, ctx.input_dir('convert'),
                               ctx.out_dir, mesh=mesh)
    cfg = builder.config()
    for k, pair in enumerate(job.pairs):
      key = f'{job.name}/{pair.ability}'
      st = pair_stats(ctx.input_dir('collect'), pair)
      i, j = names.index(pair.source), names.index(pair.target)
      arrays = {}
      for score in plan.scores:
        for part in PARTS:
          s = localize_lib.channel_scores(st[part].arrays, st[part].count, i,
                                          j, score)
          prefix = score if part == 'full' else f'{score}.{part}'
          arrays.update({f'{prefix}/{site}': a for site, a in s.items()})
      sites = [s for s in st['full'].sites
               if s in masks_lib.TRANSFERABLE_SITES]
      wd = localize_lib.weight_scores(builder.params(pair.source),
                                      builder.params(pair.target), sites)
      arrays.update({f'weight_diff/{s}': a for s, a in wd.items()})
      path = cand_lib.scores_path(ctx.out_dir, job.name, pair.ability)
      _primary(f'localize:{key}:scores', stats_io.save_scores, path, arrays)
      act_scores = {s: stats_io.load_scores(path, s) for s in plan.scores}
      meta = {'job': job.name, 'ability': pair.ability,
              'source': pair.source, 'target': pair.target,
              'probe': list(pair.probe), 'score': loc.score,
              'select': loc.select, 'top_frac': loc.top_frac,
              'unit': loc.unit, 'model_config': cfg.to_dict()}
      masks = {}
      for kind in jobs_lib.SELECTORS:
        m, sc = cand_lib.channel_masks(
            kind, loc.score, loc.top_frac, act_scores=act_scores,
            weight_scores=wd, loc=loc, cfg=cfg, seed=loc.seed + k)
        masks[kind] = m
        sub = os.path.join(key, kind)
        _primary(f'localize:{sub}', _save_masks_once, ctx, sub, m,
                 dict(meta, kind=kind), sc)
      found[key] = masks['act']
      summary[key] = {'channels': int(masks_lib.count(masks['act'])),
                      'total': int(sum(np.size(v) for v in
                                       masks['act'].values()))}
      _analyze(plan, key, act_scores, wd, path, cfg, analyses)
  for k1, k2 in itertools.combinations(sorted(found), 2):
    analyses['overlap'][f'{k1} vs {k2}'] = analysis.overlap(found[k1],
                                                            found[k2])
  _primary('localize:analysis', atomic.write_json,
           ctx.sub_dir('analysis.json'), analyses)
  return summary


def _save_masks_once(ctx: Ctx, sub: str, mask, meta, scores) -> None:
  if not ctx.sub_done(sub):
    masks_lib.save_masks(ctx.sub_dir(sub), mask, meta, scores=scores)


def _analyze(plan, key, act_scores, wd, path, cfg, out) -> None:
  """Concentration, act-vs-weight overlap, stability of one pair."""
  loc = plan.localize
  out['concentration'][key] = {s: analysis.concentration(v)
                               for s, v in act_scores.items()}
  out['concentration'][key]['weight_diff'] = analysis.concentration(wd)
  halves = {s: [stats_io.load_scores(path, f'{s}.half{h}') for h in (0, 1)]
            for s in plan.scores}
  for rho in plan.rhos:
    r = f'{rho:g}'
    wmask, _ = cand_lib.channel_masks('weight_diff', '', rho,
                                      act_scores=act_scores,
                                      weight_scores=wd, loc=loc, cfg=cfg,
                                      seed=loc.seed)
    for s in plan.scores:
      amask = cand_lib.select_mask(act_scores[s], loc, rho, cfg)
      out['act_vs_weight'].setdefault(key, {}).setdefault(r, {})[s] = (
          _brief(analysis.overlap(amask, wmask)))
      a, b = (cand_lib.select_mask(x, loc, rho, cfg) for x in halves[s])
      out['stability'].setdefault(key, {}).setdefault(r, {})[s] = _brief(
          analysis.stability(a, b))
    if len(plan.scores) >= 2:
      m0, m1 = (cand_lib.select_mask(act_scores[s], loc, rho, cfg)
                for s in plan.scores[:2])
      out['overlap_scores'].setdefault(key, {})[r] = _brief(
          analysis.overlap(m0, m1))


def _brief(o: dict[str, Any]) -> dict[str, float]:
  return {'jaccard': float(o['jaccard']),
          'random': float(o['random_expected'])}


# ----------------------------------------------------- transfer, finetune


def transfer(plan: jobs_lib.Plan, ctx: Ctx, mesh: jax.sharding.Mesh) -> dict:
  """The primary ACT transplant (recover) or merge of each job."""
  out = {}
  for job in plan.jobs:
    if job.analyze_only:
      continue
    sub = os.path.join(job.name, 'act')
    b = cand_lib.Builder(plan, job, ctx.input_dir('convert'),
                         ctx.input_dir('localize'), mesh=mesh)
    cand = cand_lib.primary(plan, finetune=False)
    if not _done(ctx, sub):
      params_io.save_params_dir(ctx.sub_dir(sub), b.build(cand), b.config(),
                                tokenizer_dir=_model_dir(ctx, job.base),
                                meta={'candidate': cand.name})
    out[job.name] = {'candidate': cand.name,
                     'channels': masks_lib.count(b.train_mask(cand))}
  return out


def sft_batches(plan: jobs_lib.Plan, job: jobs_lib.Job, tokenizer
               ) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
  """The compatibility fine-tune's batches: the job's abilities' SFT data.

  The transferred abilities share `sft.ability_weight`, the others (with
  SFT data) share `sft.retain_weight`, each group split evenly; shares
  count records or tokens (`sft.mix_by`).
  """
  sft, tc = plan.sft, plan.train
  moved = {p.ability for p in job.pairs}
  with_sft = [a for a in plan.abilities.values() if a.sft]
  groups = ([a for a in with_sft if a.name in moved],
            [a for a in with_sft if a.name not in moved])
  sources = []
  for group, share in zip(groups, (sft.ability_weight, sft.retain_weight)):
    for a in group:
      if share > 0:
        sources.append((a, share / len(group)))
  if not sources:
    raise jobs_lib.ConfigError(f'job {job.name}: no ability has SFT data '
                               '(abilities.<name>.sft) for the fine-tune')

  def examples(a, records):
    dcfg = data_config(a, 'sft', tc.max_seq_len)
    return data.tokenize_records(records, tokenizer, dcfg,
                                 source=a.sft).examples

  info = {'sources': {a.name: {'path': a.sft, 'weight': w}
                      for a, w in sources}, 'mix_by': sft.mix_by}
  if sft.mix_by == 'tokens':
    total = tc.num_steps * tc.batch_size * tc.max_seq_len
    mixed = data.mix_examples(
        [(examples(a, data.load_records(a.sft)), w) for a, w in sources],
        total, seed=sft.seed)
  else:
    # Each record keeps its own ability's rendering through the mixture.
    recs = data.mix_sources(
        [([dict(r, _ability=a.name) for r in data.load_records(a.sft)], w)
         for a, w in sources], seed=sft.seed, total=sft.num_records)
    mixed = _tokenize_mixed(recs, sources, tokenizer, tc)
  batches = data.make_batches(mixed, tc.batch_size, tc.max_seq_len,
                              pack=sft.pack, loss_on='response')
  info.update(examples=len(mixed), batches=len(batches),
              tokens=int(sum(len(e.ids) for e in mixed)))
  return batches, info


def _tokenize_mixed(records, sources, tokenizer, tc):
  """Tokenizes a record mixture, each record with its own ability's
  rendering (records carry their ability's name in `_ability`)."""
  out = []
  specs = {a.name: a for a, _ in sources}
  for r in records:
    a = specs[r['_ability']]
    rec = {k: v for k, v in r.items() if k != '_ability'}
    dcfg = data_config(a, 'sft', tc.max_seq_len)
    out += data.tokenize_records([rec], tokenizer, dcfg,
                                 source=a.sft).examples
  return out


def finetune(plan: jobs_lib.Plan, ctx: Ctx, mesh: jax.sharding.Mesh) -> dict:
  """Compatibility fine-tune of each job's primary ACT result (nothing
  when `sweep.finetune` has no `act`)."""
  out = {}
  if 'act' not in jobs_lib.parse_list(plan.sweep.finetune):
    return {'skipped': 'sweep.finetune does not fine-tune act'}
  for job in plan.jobs:
    if job.analyze_only:
      continue
    sub = os.path.join(job.name, 'act_ft')
    if _done(ctx, sub):
      continue
    b = cand_lib.Builder(plan, job, ctx.input_dir('convert'),
                         ctx.input_dir('localize'), mesh=mesh)
    cand = cand_lib.primary(plan, finetune=True)
    cfg, start = models_io.load_model(os.path.join(
        ctx.input_dir('transfer'), job.name, 'act'), mesh=mesh)
    tok = models_io.load_tokenizer(_model_dir(ctx, job.base))
    batches, info = sft_batches(cand_lib.with_sft_seed(plan, cand), job, tok)
    mask = b.train_mask(cand)
    new = finetune_lib.compat_finetune(plan.train, start, cfg, mask, batches,
                                       ctx.sub_dir(job.name + '_work'),
                                       mesh=mesh)
    params_io.save_params_dir(ctx.sub_dir(sub), new, cfg,
                              tokenizer_dir=_model_dir(ctx, job.base),
                              meta={'candidate': cand.name, 'sft': info})
    out[job.name] = {'sft': info,
                     'trainable_channels': int(masks_lib.count(mask))}
  return out


# ----------------------------------------------------------------- evaluate


def split_file(ability: jobs_lib.Ability, split: str) -> str:
  """The eval records of `ability` in `split` (test: `eval`, dev: `dev`)."""
  return ability.dev if split == 'dev' else ability.eval


def eval_task(ability: jobs_lib.Ability, ev: jobs_lib.EvalConfig,
              metric: str | None = None) -> eval_suite.Task:
  """How the evaluate stage scores `ability` (`metric='perplexity'` makes
  any ability teacher-forced: the response's perplexity, for patching)."""
  if (metric or ability.metric) == 'perplexity':
    return eval_suite.Task('perplexity', data_config(
        ability, 'eval', ev.max_seq_len, ev.batch_size))
  return eval_suite.Task(
      'exact_match', data_config(ability, 'eval', ev.max_seq_len),
      answers_field=ability.answers_field, match=ability.match,
      pattern=ability.pattern, contains_tokens=ability.contains_tokens,
      max_new_tokens=ability.max_new_tokens)


def eval_sets(plan: jobs_lib.Plan, names, tokenizer, split: str = 'test',
              metric: str | None = None) -> dict[str, dict]:
  """`{ability: eval_suite.prepare(...)}` of one split, built once."""
  out = {}
  for name in names:
    a, path = plan.abilities[name], split_file(plan.abilities[name], split)
    recs = data.load_records(path)[:plan.evaluate.num_eval or None]
    out[name] = eval_suite.prepare(eval_task(a, plan.evaluate, metric), recs,
                                   tokenizer, source=path)
  return out


def _moved(builder: cand_lib.Builder, cand: cand_lib.Candidate) -> int | None:
  if not cand.channels:
    return None
  params = builder.params(builder.job.base)
  tree = masks_lib.leaf_masks(builder.train_mask(cand), params)
  return optim.mask_counts(optim.normalize_mask(tree, params), params)[0]


def evaluate(plan: jobs_lib.Plan, ctx: Ctx, mesh: jax.sharding.Mesh) -> dict:
  """Every candidate of every job on every evaluated ability."""
  out = {}
  for job in plan.jobs:
    if job.analyze_only:
      continue
    b = cand_lib.Builder(plan, job, ctx.input_dir('convert'),
                         ctx.input_dir('localize'), mesh=mesh)
    cfg = b.config()
    base_dir = _model_dir(ctx, job.base)
    tok = models_io.load_tokenizer(base_dir)
    stop_ids = models_io.generation_stop_ids(base_dir, tok)
    splits = plan.splits
    sets = {sp: eval_sets(plan, job.abilities, tok, sp) for sp in splits}
    cands = cand_lib.enumerate_candidates(job, plan)
    primary = {cand_lib.primary(plan, False).name: ('transfer', 'act'),
               cand_lib.primary(plan, True).name: ('finetune', 'act_ft')}
    sft = {}  # SFT seed -> batches
    t0, done, seconds = time.time(), 0, {}
    for n, cand in enumerate(cands, start=1):
      sub = os.path.join(job.name, cand.file)
      if _done(ctx, sub):
        continue
      logging.info('evaluate %s: %d/%d %s started (ETA %s)', job.name, n,
                   len(cands), cand.name,
                   f'{(time.time() - t0) / done * (len(cands) - n + 1):.0f}s'
                   if done else 'after the first candidate')
      t1 = time.time()
      info: dict[str, Any] = {'candidate': dataclasses.asdict(cand)}
      if cand.name in primary:
        stage, leaf = primary[cand.name]
        params = models_io.load_model(os.path.join(
            ctx.input_dir(stage), job.name, leaf), mesh=mesh)[1]
      else:
        params = b.build(cand)
        if cand.finetune:
          seed = cand_lib.sft_seed(cand, plan)
          if seed not in sft:
            sft[seed] = sft_batches(cand_lib.with_sft_seed(plan, cand), job,
                                    tok)
          work = ctx.sub_dir(os.path.join(job.name, cand.name + '.work'))
          tf = time.time()
          # finetune never donates the caller's arrays: the shared leaves
          # of a transplant and its target stay valid.
          params = finetune_lib.compat_finetune(
              plan.train, params, cfg,
              None if cand.kind == 'full_ft' else b.train_mask(cand),
              sft[seed][0], work,
              scope='full' if cand.kind == 'full_ft' else None, mesh=mesh)
          info['finetune_s'] = round(time.time() - tf, 2)
          info['sft'] = sft[seed][1]
      info['params_moved'] = _moved(b, cand)
      info['num_params'] = forward.count_params(params)
      te = time.time()
      # The first split is `metrics`; the others go under `splits`.
      info['split'] = splits[0]
      label = f'{job.name} {n}/{len(cands)} {cand.name}'
      gen = dict(gen_batch_size=plan.evaluate.gen_batch_size,
                 stop_ids=stop_ids, mesh=mesh)
      info['metrics'] = eval_suite.score(params, cfg, sets[splits[0]], tok,
                                         label=label, seconds=seconds, **gen)
      if len(splits) > 1:
        info['splits'] = {sp: eval_suite.score(
            params, cfg, sets[sp], tok, label=f'{label} ({sp})', **gen)
                          for sp in splits[1:]}
      info['eval_s'] = round(time.time() - te, 2)
      info['wall_s'] = round(time.time() - t1, 2)
      # Per-item samples (lm-eval --log_samples style) before the metrics
      # file, whose presence marks the candidate done.
      for a, m in info['metrics'].items():
        _primary(f'evaluate:{sub}:{a}', data.write_jsonl, ctx.sub_dir(
            os.path.join(job.name, eval_metrics.samples_file(cand.name, a))),
                 eval_metrics.sample_rows(m['items']))
      _primary(f'evaluate:{sub}', atomic.write_json, ctx.sub_dir(sub), info)
      _primary(f'evaluate:{sub}.work', atomic.remove_tree,
               ctx.sub_dir(os.path.join(job.name, cand.name + '.work')))
      done += 1
      rate = (time.time() - t0) / done
      logging.info('evaluate %s: %d/%d %s (%.0fs; ETA %.0fs): %s', job.name,
                   n, len(cands), cand.name, info['wall_s'],
                   rate * (len(cands) - n),
                   {a: {k: round(v, 4) for k, v in m.items() if k != 'items'}
                    for a, m in info['metrics'].items()})
      del params
    write_table(ctx, job.name, cands, splits)
    out[job.name] = {'candidates': len(cands)}
  return out


def write_table(ctx: Ctx, job_name: str, cands, splits) -> None:
  """`<job>.json`: every row's metrics (no per-item outcomes) in order,
  the first split under `results`, the others under `splits`."""
  tables = {sp: {} for sp in splits}
  for cand in cands:
    rec = atomic.read_json(ctx.sub_dir(os.path.join(job_name, cand.file)))
    per = dict(rec.get('splits', {}), **{splits[0]: rec['metrics']})
    for sp in splits:
      tables[sp][cand.name] = {a: {k: v for k, v in m.items()
                                   if k not in ('items', 'nll')}
                               for a, m in per[sp].items()}
  out = {'results': tables[splits[0]], 'split': splits[0],
         'order': [c.name for c in cands]}
  if len(splits) > 1:
    out['splits'] = {sp: tables[sp] for sp in splits[1:]}
  _primary(f'table:{ctx.name}:{job_name}', atomic.write_json,
           ctx.sub_dir(job_name + '.json'), out)


def patch(plan: jobs_lib.Plan, ctx: Ctx, mesh: jax.sharding.Mesh) -> dict:
  """Activation patching of each recover job's channel sets: the target
  runs beside the source and takes the source's activations in the
  channels (act.patching), teacher-forced on every ability's eval split(s);
  one sub-artifact per row, as the evaluate stage's."""
  out = {}
  for job in plan.jobs:
    cands = cand_lib.enumerate_patch_candidates(job, plan)
    if not cands:
      continue
    b = cand_lib.Builder(plan, job, ctx.input_dir('convert'),
                         ctx.input_dir('localize'), mesh=mesh)
    cfg, pair = b.config(), job.pairs[0]
    tok = models_io.load_tokenizer(_model_dir(ctx, job.base))
    splits = plan.splits
    sets = {sp: eval_sets(plan, job.abilities, tok, sp, metric='perplexity')
            for sp in splits}
    for sp, per in sets.items():
      for a, s in per.items():
        if not any(np.any(bt['token_mask_bt'][:, 1:]) for bt in s['batches']):
          raise jobs_lib.ConfigError(
              f'patch: ability {a} ({sp} split) has no response token '
              f'within evaluate.max_seq_len={plan.evaluate.max_seq_len}; '
              'raise it')
    stacked = patching.stack_pair(b.params(pair.target),
                                  b.params(pair.source))
    sites = masks_lib.site_shapes(cfg)
    t0 = time.time()
    for cand in cands:
      sub = os.path.join(job.name, cand.file)
      if _done(ctx, sub):
        continue
      # Every row patches the same sites (zeros where a set has none), so
      # one compiled forward serves all; target: nothing patched; source:
      # its own, clean row of the pair.
      mask = masks_lib.empty_mask(sites)
      if cand.channels:
        mask.update(b.train_mask(cand))
      hooks = patching.patch_hooks(mask, cfg)
      row = 1 if cand.kind == 'source' else 0
      per = {}
      for sp in splits:
        per[sp] = {}
        for a, s in sets[sp].items():
          r = patching.patched_perplexity(stacked, cfg, s['batches'],
                                          hooks, mesh=mesh)[row]
          per[sp][a] = {'perplexity': r['ppl'], 'nll': r['nll'],
                        'items': r['items']}
      info = {'candidate': dataclasses.asdict(cand), 'split': splits[0],
              'metrics': per[splits[0]],
              'params_moved': None,
              'channels': int(masks_lib.count(mask))}
      if len(splits) > 1:
        info['splits'] = {sp: per[sp] for sp in splits[1:]}
      _primary(f'patch:{sub}', atomic.write_json, ctx.sub_dir(sub), info)
    write_table(ctx, job.name, cands, splits)
    out[job.name] = {'candidates': len(cands),
                     'wall_s': round(time.time() - t0, 1)}
  return out


def report_inputs(plan: jobs_lib.Plan) -> list[str]:
  """What `report.out` may never be, contain or lie inside: every model
  and data file the plan names."""
  return list(plan.models.values()) + [
      getattr(a, u) for a in plan.abilities.values()
      for u in ('probe', 'eval', 'dev', 'sft') if getattr(a, u)]


def report(plan: jobs_lib.Plan, ctx: Ctx) -> dict:
  """report.md, plots and results.json; copied to the workdir root (and to
  `report.out` when set)."""
  if not distributed.is_primary():
    return {}  # the report reads artifacts only: process 0 writes it
  info = report_lib.build_report(ctx.workdir, ctx.out_dir, plan)
  for name in ('results.json', 'report.md'):
    with open(os.path.join(ctx.out_dir, name), encoding='utf-8') as f:
      atomic.write_text(os.path.join(ctx.workdir, name), f.read())
  if plan.report.out:
    report_lib.publish(ctx.out_dir, plan.report.out, plan.overwrite,
                       report_inputs(plan), ctx.workdir)
  return info

