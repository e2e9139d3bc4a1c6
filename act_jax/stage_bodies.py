"""Bodies of the ACT stages: each calls the owning module's public API.

Artifacts (all under the workdir; every write is atomic):
  convert/<model>/                    params dir (checkpoint.save_params_dir)
  collect/<ability>/{half0,half1,full}/  statistics (stats_io.save_stats)
  localize/<job>/<ability>/{act,weight_diff,random}/  mask dirs
  localize/<job>/<ability>/scores.npz score per site [L, C] (+ halves)
  localize/analysis.json              concentration, overlap, stability
  transfer/<job>/act/                 params dir of the ACT result;
                                      transfer/transfer.json (conflicts)
  finetune/<job>/act_ft/              params dir; finetune/<job>_work/ logs
  evaluate/<job>.json                 {candidate: {ability: {metric: v}}},
                                      order, sufficiency curve
Baselines are rebuilt in memory by evaluate (stage_act.build_candidates).
Models are always addressed through `convert/<model>`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np

from act_jax import checkpoint, stages as stages_lib

Ctx = stages_lib.StageContext


def _load(ctx: Ctx, model: str):
  return checkpoint.load_params_dir(os.path.join(ctx.input_dir('convert'),
                                                 model))


def _tokenizer(ctx: Ctx, model: str):
  return checkpoint.load_tokenizer(os.path.join(ctx.input_dir('convert'),
                                                model))


def _records(path: str) -> list[dict]:
  from act_jax import data  # pylint: disable=g-import-not-at-top
  return data.load_records(path)


# ------------------------------------------------------------ build, convert


def build_models(toy_cfg, ctx: Ctx) -> dict:
  """Toy configs: train and save the base and specialists (toy/build.py)."""
  from act_jax.toy import build  # pylint: disable=g-import-not-at-top
  rep = build.build_models(toy_cfg, ctx.out_dir)
  return {'scores': {k: v['scores'] for k, v in rep['models'].items()}}


def convert(convert_cfg, models: dict[str, str], names: list[str],
            ctx: Ctx) -> dict:
  """Every needed model -> `convert/<model>/` params dir (resumable)."""
  from act_jax import hf_convert, preflight  # pylint: disable=g-import-not-at-top,g-multiple-import
  preflight.check_models({n: models[n] for n in names})
  out = {}
  for name in names:
    path = models[name]
    out[name] = path
    if ctx.sub_done(name):
      continue
    cfg, params = checkpoint.load_model(
        path, param_dtype=convert_cfg.param_dtype or None)
    hf_cfg = None
    if os.path.isfile(os.path.join(path, 'config.json')):
      hf_cfg = hf_convert.read_hf_config_dict(path)
    checkpoint.save_params_dir(ctx.sub_dir(name), params, cfg,
                               tokenizer_dir=path, hf_config=hf_cfg,
                               meta={'source': os.path.abspath(path)})
  return {'models': out}


# ------------------------------------------------------------------ collect


def _data_cfg(ability: dict, max_seq_len: int, batch_size: int, **kw):
  from act_jax import data  # pylint: disable=g-import-not-at-top
  return data.DataConfig(
      template=ability.get('template', 'qa'), prompt_field='prompt',
      response_field='answer', text_field='text',
      qa_format=ability.get('qa_format', '{prompt}{response}'),
      max_seq_len=max_seq_len, batch_size=batch_size, **kw)


def collect(collect_cfg, abilities: dict[str, dict], names: list[str],
            needed: list[str], ctx: Ctx) -> dict:
  """Statistics of all models on each needed ability's probe set.

  The probe set is split into two disjoint halves (even / odd records);
  `full` is their sum, so stability needs no extra forward passes.
  """
  from act_jax import capture, collect as collect_lib, data, stats_io  # pylint: disable=g-import-not-at-top,g-multiple-import
  tok = _tokenizer(ctx, names[0])
  loaded = [_load(ctx, n) for n in names]
  cfg = loaded[0][0].replace(dtype=collect_cfg.dtype)
  params = [p for _, p in loaded]
  spec = capture.CaptureSpec(tuple(collect_lib_sites(collect_cfg)))
  out = {}
  for ability in needed:
    recs = _records(abilities[ability]['probe'])
    if collect_cfg.num_probe:
      recs = recs[:collect_cfg.num_probe]
    flats = []
    for h in range(2):
      sub = os.path.join(ability, f'half{h}')
      dcfg = _data_cfg(abilities[ability], collect_cfg.max_seq_len,
                       collect_cfg.batch_size, loss_on='all')
      batches, info = data.load_batches(dcfg, tok, records=recs[h::2])
      if not ctx.sub_done(sub):
        flat = collect_lib.collect_stats(params, cfg, batches, spec)
        stats_io.save_stats(ctx.sub_dir(sub), flat,
                            _manifest(names, cfg, spec, info, flat))
      flats.append(stats_io.load_stats(ctx.sub_dir(sub)))
    full = {'count': flats[0].count + flats[1].count}
    for site in spec.sites:
      for stat, arr in flats[0].arrays[site].items():
        full[f'{site}/{stat}'] = arr + flats[1].arrays[site][stat]
    stats_io.save_stats(ctx.sub_dir(os.path.join(ability, 'full')), full,
                        dict(flats[0].manifest, num_tokens=int(
                            full['count'][0]), probe={'halves': 2}))
    out[ability] = {'tokens': int(full['count'][0]), 'texts': len(recs)}
  return out


def collect_lib_sites(collect_cfg) -> list[str]:
  """Sites to capture: `collect.sites` (comma list) or all output sites."""
  from act_jax import capture  # pylint: disable=g-import-not-at-top
  from act_jax import pipeline  # pylint: disable=g-import-not-at-top
  sites = pipeline.parse_list(collect_cfg.sites)
  return sites or list(capture.OUTPUT_SITES)


def _manifest(names, cfg, spec, info, flat) -> dict[str, Any]:
  from act_jax import capture  # pylint: disable=g-import-not-at-top
  return {
      'models': [{'path': n} for n in names],
      'model_config': cfg.to_dict(), 'probe': info,
      'num_tokens': int(np.asarray(flat['count'])[0]),
      'sites': list(spec.sites),
      'channels': {s: capture.site_channels(cfg, s) for s in spec.sites},
      'num_layers': cfg.num_layers, 'pairwise': len(names) >= 2,
      'dtype': cfg.dtype}


# ----------------------------------------------------------------- localize


def localize(loc_cfg, jobs: list[dict], names: list[str], ctx: Ctx) -> dict:
  """Scores and masks per (job, ability); the four analyses."""
  from act_jax import baselines, masks, scores, selection, stats_io  # pylint: disable=g-import-not-at-top,g-multiple-import
  from act_jax import pipeline_analyses as analyses  # pylint: disable=g-import-not-at-top
  cache = {}
  summary = {}
  found = {}
  for job in jobs:
    for pair in job['pairs']:
      ability, src, tgt = pair['ability'], pair['source'], pair['target']
      key = f'{job["name"]}/{ability}'
      i, j = names.index(src), names.index(tgt)
      per_half = {}
      for part in ('full', 'half0', 'half1'):
        st = stats_io.load_stats(os.path.join(ctx.input_dir('collect'),
                                              ability, part))
        per_half[part] = scores.channel_scores(
            st.arrays, st.count, i, j, loc_cfg.score)
      for m in (src, tgt):
        if m not in cache:
          cache[m] = _load(ctx, m)
      cfg = cache[tgt][0]

      def select(s, frac=loc_cfg.top_frac):
        return masks.couple(selection.select_channels(
            s, loc_cfg.select, frac), cfg, loc_cfg.unit)

      act = select(per_half['full'])
      wd = baselines.weight_diff_mask(act, cache[src][1], cache[tgt][1])
      rnd = baselines.random_mask(act, seed=loc_cfg.seed)
      meta = {'job': job['name'], 'ability': ability, 'source': src,
              'target': tgt, 'score': loc_cfg.score,
              'select': loc_cfg.select, 'top_frac': loc_cfg.top_frac,
              'unit': loc_cfg.unit, 'model_config': cfg.to_dict()}
      for kind, m in (('act', act), ('weight_diff', wd), ('random', rnd)):
        sub = os.path.join(key, kind)
        if not ctx.sub_done(sub):
          masks.save_masks(ctx.sub_dir(sub), m, dict(meta, kind=kind))
      wscores = scores.weight_scores(cache[src][1], cache[tgt][1], list(act))
      arrays = {}
      for part, s in per_half.items():
        for site, a in s.items():
          arrays[f'{part}/{site}'] = np.asarray(a, np.float32)
      for site, a in wscores.items():
        arrays[f'weight/{site}'] = np.asarray(a, np.float32)
      _save_npz(ctx.sub_dir(os.path.join(key, 'scores.npz')), arrays)
      found[key] = {'act': act, 'weight_diff': wd, 'random': rnd,
                    'half0': select(per_half['half0']),
                    'half1': select(per_half['half1']),
                    'scores': per_half['full']}
      summary[key] = {'channels': int(masks.count(act)),
                      'total': int(sum(np.size(v) for v in act.values()))}
  analysis = analyses.run_all(found)
  stages_lib.write_atomic_json(ctx.sub_dir('analysis.json'), analysis)
  return summary


def _save_npz(path: str, arrays: dict[str, np.ndarray]):
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_scores(path: str, part: str = 'full') -> dict[str, np.ndarray]:
  """`{site: [L, C]}` of one part ('full', 'half0', 'half1', 'weight')."""
  with np.load(path) as z:
    return {k.split('/', 1)[1]: z[k] for k in z.files
            if k.startswith(part + '/')}
