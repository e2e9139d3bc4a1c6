"""The export stage: each result of the run as an HF model people can load.

For every job, each result the run saved (`act`: the transplant,
`transfer/<job>/act/`; `act_ft`: after the compatibility fine-tune,
`finetune/<job>/act_ft/`) becomes `export/<job>/<result>/`:
  model.safetensors (or shards + index), config.json
                      the params in the base checkpoint's dtype
                      (`export.dtype` overrides), config from the base's
  tokenizer and generation_config.json files   the base model's
  README.md           a `huggingface_hub.ModelCard`: YAML front matter
                      (`base_model` = the job's models as configured, Hub
                      ids stay ids; `tags: [act-jax, merge]`;
                      `library_name: transformers`) over the provenance body
                      of `io.card.build_model_card` (channels per site and
                      layer, probe and fine-tune data, hyperparameters, the
                      before/after table with the report's intervals)
  channel_masks.json  the transferred channels keyed by HF tensor name
                      (`act.masks.hf_tensor_masks`); a merge also writes
                      `channel_masks.<specialist>.json` per specialist
The stage runs after `report` because the card's table is the report's
(values with their paired-bootstrap intervals, from `results.json`); the
report stays cheap to rebuild, and writing whole checkpoints (GBs for 7B
models) is a stage of its own that `--config.stages` can skip or rerun.
"""

from __future__ import annotations

import json
import os
from typing import Any

from act_jax import distributed
from act_jax.act import masks as masks_lib
from act_jax.io import atomic
from act_jax.io import card
from act_jax.io import hf
from act_jax.io import models as models_io
from act_jax.io import params as params_io
from act_jax.pipeline import candidates as cand_lib
from act_jax.pipeline import jobs as jobs_lib
from act_jax.pipeline import runner

MASKS_FILE = 'channel_masks.json'
# result -> (stage that saved it, whether it is the fine-tuned one)
RESULTS = {'act': ('transfer', False), 'act_ft': ('finetune', True)}


def masks_json(masks: dict[str, Any]) -> str:
  """HF-named masks as JSON, one tensor a line (readable at 7B sizes)."""
  lines = [f'  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}'
           for k, v in sorted(masks.items())]
  return '{\n' + ',\n'.join(lines) + '\n}\n'


def result_dirs(workdir: str, job: jobs_lib.Job) -> dict[str, str]:
  """`{result: params dir}` of the results `job` saved (act, act_ft)."""
  out = {}
  for name, (stage, _) in RESULTS.items():
    d = os.path.join(runner.stage_dir(workdir, stage), job.name, name)
    if os.path.isdir(d):
      out[name] = d
  return out


def _table(results: dict[str, Any], workdir: str, job: jobs_lib.Job,
           cand: str) -> dict[str, dict[str, dict[str, list[float]]]]:
  """Before / after rows `{model: {ability: {metric: [v, lo, hi]}}}` from
  the report's results.json (the job's models, then this result)."""
  view = results.get('jobs', {}).get(job.name)
  if not view:
    return {}
  refs = (['target', 'source'] if job.kind == 'recover' else
          [job.base] + [p.source for p in job.pairs])
  table = atomic.read_json(os.path.join(
      runner.stage_dir(workdir, 'evaluate'), job.name + '.json'))['results']
  metrics = {a: next(iter(m)) for a, m in table[cand].items()}
  out = {}
  for name in refs + [cand]:
    vals = view['values'].get(name)
    if vals is None:
      continue
    label = f'{name} (this model)' if name == cand else name
    out[label] = {a: {metrics.get(a, 'value'): [v['value'], *v['ci']]}
                  for a, v in vals.items()}
  return out


def _card(plan: jobs_lib.Plan, job: jobs_lib.Job, result: str, cand: str,
          mask, cfg, meta: dict, workdir: str, results: dict) -> str:
  """The README.md text of one exported result."""
  sources = {p.ability: plan.models[p.source] for p in job.pairs}
  collected = {}
  if runner.is_complete(workdir, 'collect'):
    collected = runner.read_marker(workdir, 'collect').get('summary', {})
  probes = {a: dict(path=plan.abilities[a].probe, **collected.get(a, {}))
            for p in job.pairs for a in p.probe}
  tuned = RESULTS[result][1]
  loc = plan.localize
  body = card.build_model_card(
      name=f'{job.name} {result}', cfg=cfg, sources=sources,
      target=plan.models[job.base], mask=mask, probe_data=probes,
      finetune_data=meta.get('sft') if tuned else None,
      train_cfg=plan.train if tuned else None,
      results=_table(results, workdir, job, cand),
      notes=(f'Candidate `{cand}`: channels by `{loc.score}`, selection '
             f'`{loc.select}` at rho {loc.top_frac:g} ({loc.unit}s), '
             f'alpha {plan.transfer.alpha:g}'
             + (f', merge policy `{plan.transfer.policy}`'
                if job.kind == 'merge' else '') +
             ('; then the compatibility fine-tune of those channels only'
              if tuned else '; transplant only, no fine-tune') +
             f'. `{MASKS_FILE}` lists the transferred entries by HF tensor '
             'name (rows = output channels, cols = input channels). '
             'Evaluate it with lm-evaluation-harness: `lm_eval --model hf '
             '--model_args pretrained=<this directory> --tasks <tasks>`.'))
  bases = [plan.models[m] for m in job.models]
  return str(card.hub_card(body, base_models=bases))


def export_results(plan: jobs_lib.Plan, workdir: str, out_dir: str,
                   sub_done, mesh=None) -> dict[str, Any]:
  """Writes `out_dir/<job>/<result>/` for every saved result; returns
  `{<job>/<result>: {candidate, dir, channels}}`. Resumable: `sub_done(p)`
  says whether `out_dir/p` exists (a result is done once its
  channel_masks.json is written, last). Params are restored onto `mesh`;
  under jax.distributed every process takes part in the HF write and
  process 0 writes the mask files."""
  rpath = os.path.join(runner.stage_dir(workdir, 'report'), 'results.json')
  results = atomic.read_json(rpath) if os.path.isfile(rpath) else {}
  convert = runner.stage_dir(workdir, 'convert')
  summary = {}
  for job in plan.jobs:
    if job.analyze_only:
      continue
    base_dir = os.path.join(convert, job.base)
    builder = cand_lib.Builder(plan, job, convert,
                               runner.stage_dir(workdir, 'localize'),
                               mesh=mesh)
    for result, src in result_dirs(workdir, job).items():
      sub = os.path.join(job.name, result)
      cand = cand_lib.primary(plan, finetune=RESULTS[result][1])
      per_pair = [m for m, _ in builder.masks(cand)]
      mask = builder.train_mask(cand)
      out = os.path.join(out_dir, sub)
      summary[sub] = {'candidate': cand.name, 'dir': out,
                      'channels': masks_lib.count(mask)}
      distributed.barrier(f'export:check:{sub}')  # all decide together
      if sub_done(os.path.join(sub, MASKS_FILE)):
        continue
      cfg, params = models_io.load_model(src, mesh=mesh)
      meta_path = os.path.join(src, params_io.META)
      meta = atomic.read_json(meta_path) if os.path.isfile(meta_path) else {}
      hf_config = params_io.load_hf_config_dict(base_dir)
      dtype = plan.export.dtype or (hf.checkpoint_dtype(hf_config)
                                    if hf_config else None)
      text = _card(plan, job, result, cand.name, mask, cfg, meta, workdir,
                   results)
      card.export_hf(params, cfg, out, card=text, tokenizer_dir=base_dir,
                     hf_config=hf_config, dtype=dtype,
                     max_shard_bytes=plan.export.max_shard_bytes,
                     overwrite=True)
      files = {}
      if job.kind == 'merge':
        for pair, m in zip(job.pairs, per_pair):
          files[f'channel_masks.{pair.source}.json'] = (
              masks_lib.hf_tensor_masks(m, cfg))
      # The union file goes last: its presence marks the result done.
      files[MASKS_FILE] = masks_lib.hf_tensor_masks(mask, cfg)
      if distributed.is_primary():
        for name, content in files.items():
          atomic.write_text(os.path.join(out, name), masks_json(content))
      distributed.barrier(f'export:done:{sub}')
  return summary
