"""Pre-flight: every check that can fail before heavy work, by name.

`check_plan(plan)` validates values and cross references of a typed plan
(modes, scores / selectors / units / policies, budgets, train fields, the
models and abilities jobs name, each ability's rendering, metric and
matching). `check_models(plan)` reads only small files of each checkpoint
(config.json or model_config.json, the safetensors index and headers, the
tokenizer) and fails on a missing directory, an unreadable checkpoint,
models that do not share architecture and tokenizer, or a param dimension
the mesh does not divide. `check_mesh(plan)` builds the run's mesh after
checking it against the devices and the batch sizes it shards.
`check_data(plan)` checks that every data file exists and that its first record has the fields
its ability reads (any file type, `save_to_disk` directory or Hub data set
name `data.load_records` reads). Unknown config keys are rejected by `jobs.
plan_from_config` (and by `config_flags` when overridden).

`check_ranges(section, values)` is the one range check of numeric fields
(every float finite, sizes >= 1, fractions in range; `RANGES`), used by the
pipeline for every section and by the CLIs for their flags.
`check_output_space(path, bytes)` checks, before heavy work, that an output
can be written (a probe file is created and removed in the nearest existing
folder) and that the file system has room for an estimate of the
artifact's size (`params_bytes`, `stats_bytes`); `check_workdir` does it for
a pipeline run and refuses inputs that live inside a stage folder a rerun
may replace.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from act_jax import data
from act_jax.act import localize
from act_jax.act import masks as masks_lib
from act_jax.act import transfer
from act_jax.eval import metrics as eval_metrics
from act_jax.io import atomic
from act_jax.io import models as models_io
from act_jax.model import capture
from act_jax.model import forward
from act_jax.model import sharding
from act_jax.model.config import ModelConfig
from act_jax.pipeline import candidates as cand_lib
from act_jax.pipeline import jobs as jobs_lib
from act_jax.pipeline import report as report_lib
from act_jax.train import finetune

ACTIVATION_SCORES = tuple(s for s in localize.SCORES
                          if s not in ('weight_diff', 'random'))
METRICS = ('perplexity', 'exact_match')


class PreflightError(ValueError):
  """A configuration or checkpoint problem found before any heavy work."""


# Ranges of numeric fields, per config section ('ability' = an abilities
# entry): '>=0', '>=1', '>0', or an interval '[0,1]', '(0,1]', '[0,1)',
# '(0,1)'. Every float field must also be finite (NaN is refused even where
# no range is given).
RANGES: dict[str, dict[str, str]] = {
    'collect': {'num_probe': '>=0', 'max_seq_len': '>=1',
                'batch_size': '>=1', 'save_every': '>=0'},
    'localize': {'top_frac': '(0,1]', 'mass': '(0,1]'},
    'transfer': {'alpha': '[0,1]'},
    'baselines': {'interp_t': '[0,1]', 'ties_density': '(0,1]',
                  'dare_drop': '[0,1)'},
    'sft': {'ability_weight': '>=0', 'retain_weight': '>=0',
            'num_records': '>=1'},
    'evaluate': {'num_eval': '>=0', 'batch_size': '>=1',
                 'gen_batch_size': '>=1', 'max_seq_len': '>=1'},
    'report': {'bootstrap': '>=1', 'confidence': '(0,1)'},
    'train': {'num_steps': '>=1', 'lr': '>=0', 'warmup_frac': '[0,1)',
              'final_lr_frac': '[0,1]', 'weight_decay': '>=0',
              'clip_norm': '>=0', 'grad_accum': '>=1', 'batch_size': '>=1',
              'max_seq_len': '>=1', 'save_every': '>=0',
              'keep_checkpoints': '>=1', 'log_every': '>=0', 'b1': '[0,1)',
              'b2': '[0,1)', 'eps': '>0'},
    'ability': {'max_new_tokens': '>=1'},
    'export': {'max_shard_bytes': '>=1'},
}


def _in_range(v: float, spec: str) -> bool:
  if spec.startswith('>='):
    return v >= float(spec[2:])
  if spec.startswith('>'):
    return v > float(spec[1:])
  lo, hi = (float(x) for x in spec[1:-1].split(','))
  return ((v >= lo if spec[0] == '[' else v > lo) and
          (v <= hi if spec[-1] == ']' else v < hi))


def _describe(spec: str) -> str:
  if spec[0] in '[(':
    return f'a number in {spec}'
  return f'{spec[:2] if spec[1] == "=" else spec[0]} {spec.lstrip(">=")}'


def check_ranges(section: str, values: Any, prefix: str | None = None
                 ) -> None:
  """Every numeric field of `values` (a section dataclass or a mapping) is
  finite and in its `RANGES[section]` range.

  Args:
    section: the RANGES key ('collect', 'train', ...).
    values: the section's values.
    prefix: how errors name a field: `--config.<section>.` by default; the
      CLIs pass '--' (their flags are named as the fields).

  Raises:
    PreflightError naming the flag, its value and the range.
  """
  if dataclasses.is_dataclass(values):
    values = dataclasses.asdict(values)
  prefix = f'--config.{section}.' if prefix is None else prefix
  for name, v in dict(values).items():
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      continue
    spec = RANGES.get(section, {}).get(name)
    if isinstance(v, float) and not math.isfinite(v):
      raise PreflightError(f'{prefix}{name}={v}: expected a finite number' +
                           (f' ({_describe(spec)})' if spec else ''))
    if spec and not _in_range(v, spec):
      raise PreflightError(f'{prefix}{name}={v}: expected {_describe(spec)}')


def _choice(value, choices, flag: str):
  if value not in choices:
    raise PreflightError(f'--config.{flag}={value!r}: expected one of '
                         f'{", ".join(map(str, choices))}')


def _frac(value: float, flag: str):
  if not (isinstance(value, (int, float)) and 0 < value <= 1):
    raise PreflightError(f'--config.{flag}={value!r}: expected a fraction '
                         'in (0, 1]')


def _sweep(plan: jobs_lib.Plan) -> None:
  loc, sw = plan.localize, plan.sweep
  for s in plan.scores:
    _choice(s, ACTIVATION_SCORES, 'sweep.scores' if sw.scores else
            'localize.score')
  if loc.score not in plan.scores:
    raise PreflightError(f'--config.localize.score={loc.score!r} must be '
                         f'one of sweep.scores ({", ".join(plan.scores)})')
  _choice(loc.select, localize.METHODS, 'localize.select')
  _choice(loc.unit, masks_lib.UNITS, 'localize.unit')
  rhos = jobs_lib.parse_floats(sw.rhos, 'sweep.rhos')
  extra = jobs_lib.parse_floats(sw.extra_rhos, 'sweep.extra_rhos')
  ft_rhos = jobs_lib.parse_floats(sw.finetune_rhos, 'sweep.finetune_rhos')
  if loc.select in ('threshold', 'mass') and (rhos or extra):
    raise PreflightError(f'--config.localize.select={loc.select!r} chooses '
                         'its own budget: leave sweep.rhos and '
                         'sweep.extra_rhos empty')
  if loc.select == 'threshold' and not (math.isfinite(loc.threshold) and
                                        loc.threshold > 0):
    # Scores are >= 0: a threshold of 0 selects every channel (a full copy).
    raise PreflightError(f'--config.localize.threshold={loc.threshold}: '
                         'select=threshold needs a score threshold > 0')
  for r in rhos:
    _frac(r, 'sweep.rhos')
  for r in extra:
    _frac(r, 'sweep.extra_rhos')
  if rhos and loc.top_frac not in rhos:
    raise PreflightError(f'--config.localize.top_frac={loc.top_frac:g} must '
                         f'be one of sweep.rhos ({sw.rhos})')
  for r in ft_rhos:
    if r not in plan.rhos:
      raise PreflightError(f'--config.sweep.finetune_rhos: {r:g} is not one '
                           f'of the sweep rhos ({sw.rhos})')
  if ft_rhos and 'act' in jobs_lib.parse_list(sw.finetune) and (
      loc.top_frac not in ft_rhos):
    raise PreflightError(f'--config.sweep.finetune_rhos={sw.finetune_rhos!r} '
                         f'must include localize.top_frac={loc.top_frac:g} '
                         '(the finetune stage\'s result)')
  selectors = jobs_lib.parse_list(sw.selectors)
  for s in selectors:
    _choice(s, jobs_lib.SELECTORS, 'sweep.selectors')
  for s in jobs_lib.parse_list(sw.finetune):
    if s not in selectors:
      raise PreflightError(f'--config.sweep.finetune: {s!r} is not one of '
                           f'sweep.selectors ({sw.selectors})')
  for c in jobs_lib.parse_list(sw.candidates):
    _choice(c, cand_lib.whole_model_kinds(), 'sweep.candidates')
  for s in jobs_lib.parse_list(sw.patch):
    _choice(s, jobs_lib.SELECTORS, 'sweep.patch')
  seeds = plan.seeds
  if len(set(seeds)) != len(seeds):
    raise PreflightError(f'--config.sweep.seeds={sw.seeds!r}: a seed is '
                         'named twice')
  attr = [s for s in plan.scores if s.startswith('attribution')]
  if attr and not plan.collect.attribution:
    raise PreflightError(f'--config.sweep.scores: {attr[0]!r} needs the '
                         'attribution statistics: set '
                         '--config.collect.attribution=true')


def _abilities(plan: jobs_lib.Plan) -> None:
  probed = set(plan.probed_abilities)
  for name, a in plan.abilities.items():
    f = f'abilities.{name}'
    _choice(a.template, data.TEMPLATES, f'{f}.template')
    if a.template == 'qa':
      try:
        data.check_qa_format(a.qa_format)
      except data.TemplateError as e:
        raise PreflightError(f'--config.{f}.qa_format: {e}') from None
    _choice(a.metric, METRICS, f'{f}.metric')
    _choice(a.match, eval_metrics.MATCHES, f'{f}.match')
    _choice(a.overflow, data.OVERFLOWS, f'{f}.overflow')
    if a.pattern:
      try:
        re.compile(a.pattern)
      except re.error as e:
        raise PreflightError(f'--config.{f}.pattern={a.pattern!r}: not a '
                             f'regular expression ({e})') from None
    if a.metric == 'exact_match':
      if a.template == 'text':
        raise PreflightError(f'--config.{f}: metric exact_match needs a '
                             'prompt to generate from: template qa or chat')
      if a.match == 'regex' and not a.pattern:
        raise PreflightError(f'--config.{f}.pattern is empty (match=regex)')
      if a.contains_tokens < 0 or (a.contains_tokens and
                                   a.match != 'contains'):
        raise PreflightError(
            f'--config.{f}.contains_tokens={a.contains_tokens}: a token '
            f'window is searched only by match=contains (match={a.match})')
    if name in probed and not a.probe:
      raise PreflightError(f'--config.{f}.probe is empty, but a job '
                           'localizes with it')
  splits = plan.splits
  if not splits or len(set(splits)) != len(splits):
    raise PreflightError(f'--config.evaluate.split={plan.evaluate.split!r}: '
                         'expected a comma list of test, dev (each once)')
  for sp in splits:
    _choice(sp, ('test', 'dev'), 'evaluate.split')
  for job in plan.jobs:
    if not job.analyze_only and not job.abilities:
      raise PreflightError('no ability has an eval file: set '
                           'abilities.<name>.eval for what to measure')
    for a in () if job.analyze_only else job.abilities:
      for sp in splits:
        field = 'dev' if sp == 'dev' else 'eval'
        if not getattr(plan.abilities[a], field):
          raise PreflightError(
              f'--config.abilities.{a}.{field} is empty, but '
              f'evaluate.split={plan.evaluate.split!r} measures {a} on '
              f'the {sp} split')
  tunes = jobs_lib.parse_list(plan.sweep.finetune) or (
      'full_ft' in jobs_lib.parse_list(plan.sweep.candidates))
  if tunes and any(not j.analyze_only for j in plan.jobs) and not any(
      a.sft for a in plan.abilities.values()):
    raise PreflightError('no ability has SFT data for the compatibility '
                         'fine-tune: set abilities.<name>.sft (or '
                         "sweep.finetune='' to transplant only)")


def check_plan(plan: jobs_lib.Plan) -> None:
  """Values and cross references; raises PreflightError naming the flag."""
  for name in jobs_lib.SECTIONS:
    check_ranges(name, getattr(plan, name))
  for name, a in plan.abilities.items():
    check_ranges('ability', a, f'--config.abilities.{name}.')
  _sweep(plan)
  _abilities(plan)
  _choice(plan.transfer.policy, transfer.POLICIES, 'transfer.policy')
  co = plan.collect
  _choice(co.dtype, ('float32', 'bfloat16'), 'collect.dtype')
  _choice(co.count_tokens, ('all', 'response'), 'collect.count_tokens')
  _choice(plan.convert.param_dtype, ('', 'float32', 'bfloat16', 'float16'),
          'convert.param_dtype')
  _choice(plan.sft.mix_by, ('records', 'tokens'), 'sft.mix_by')
  _choice(plan.export.dtype, ('', 'float32', 'bfloat16', 'float16'),
          'export.dtype')
  try:
    finetune.check_train_config(plan.train)
  except ValueError as e:
    raise PreflightError(f'--config.{e}') from None
  if not plan.models:
    raise PreflightError('config.models is empty: name at least two models')
  for job in plan.jobs:
    where = 'recover' if job.kind == 'recover' else 'merge'
    for m in job.models:
      if m not in plan.models:
        raise PreflightError(
            f'--config.{where}: model {m!r} is not in config.models '
            f'({", ".join(sorted(plan.models))})')
    for p in job.pairs:
      for a in (p.ability,) + p.probe:
        if a not in plan.abilities:
          raise PreflightError(
              f'--config.{where}: ability {a!r} is not in config.abilities '
              f'({", ".join(sorted(plan.abilities))})')


def check_models(plan: jobs_lib.Plan,
                 mesh: jax.sharding.Mesh | None = None
                 ) -> dict[str, ModelConfig]:
  """All models exist (a Hub id is fetched or found in the cache), are
  readable, share architecture and tokenizer (and `mesh`, if given, divides
  every param dimension it shards); a chat ability's tokenizer has a chat
  template. Returns their configs."""
  try:
    dirs = {n: models_io.resolve_model(plan.models[n])
            for n in plan.model_names}
    cfgs = models_io.check_related(
        dirs, follow_symlinks=plan.convert.follow_symlinks)
  except models_io.ModelDirError as e:
    raise PreflightError(str(e)) from None
  chat = [n for n, a in plan.abilities.items() if a.template == 'chat']
  for job in plan.jobs:
    base = dirs.get(job.base)
    if chat and base and not models_io.has_chat_template(base):
      raise PreflightError(
          f'--config.abilities.{chat[0]}.template=chat: the tokenizer of '
          f'{job.base} ({plan.models[job.base]}) has no chat template '
          '(chat_template.jinja or tokenizer_config.json chat_template); '
          'use template qa')
  if mesh is not None and cfgs:
    name = next(iter(cfgs))
    check_model_mesh(cfgs[name], mesh, f'model {name} ({dirs[name]})')
  return cfgs


def check_model_mesh(cfg, mesh: jax.sharding.Mesh, where: str) -> None:
  """Raises PreflightError naming the first param dimension the mesh axis it
  would be sharded over does not divide (and the mesh)."""
  bad = sharding.indivisible(mesh, forward.logical_axes(cfg),
                             forward.abstract_params(cfg))
  if bad:
    path, name, size, axes, total = bad[0]
    raise PreflightError(
        f'{where}: param {path} has {name} = {size}, which mesh axis '
        f'{"x".join(axes)} = {total} of --config.mesh_shape='
        f'{",".join(str(v) for v in mesh.shape.values())} does not divide '
        f'({len(bad)} such dimensions); choose mesh sizes that divide it')


def check_mesh(plan: jobs_lib.Plan) -> jax.sharding.Mesh:
  """The run's mesh, after checking `mesh_shape` fits this run's devices
  and divides the batch sizes sharded over ('data', 'fsdp').

  Raises:
    PreflightError naming the mesh and the device count or the field.
  """
  shape = plan.mesh_shape
  spec = ','.join(str(v) for v in shape)
  n = jax.device_count()
  where = (f'the {n} devices of this run ({jax.process_count()} '
           f'process(es) x {jax.local_device_count()})')
  known = int(np.prod([v for v in shape if v != -1]))
  if n % known or (-1 not in shape and known != n):
    raise PreflightError(f'--config.mesh_shape={spec} ({known} devices) does '
                         f'not divide {where}')
  sizes = tuple(n // known if v == -1 else v for v in shape)
  rows = sizes[0] * sizes[1]
  batches = [('collect.batch_size', plan.collect.batch_size,
              plan.collect.batch_size * jax.process_count()),
             ('train.batch_size', plan.train.batch_size,
              plan.train.batch_size)]
  for field, value, total in batches:
    if total % rows:
      per = (f' (x {jax.process_count()} processes = {total} rows)'
             if total != value else '')
      raise PreflightError(
          f'--config.{field}={value}{per} does not divide over the mesh '
          f'batch axes data x fsdp = {sizes[0]} x {sizes[1]} of '
          f'--config.mesh_shape={spec}')
  return sharding.make_mesh(sizes)


# Pre-flight reads every record of a data file up to this size (and the
# first SCAN_RECORDS records of a larger file or another kind of source), so
# a bad record fails before any heavy work rather than after the fine-tune.
SCAN_BYTES = 64 << 20
SCAN_RECORDS = 10000


def _scanned(path: str) -> list[dict]:
  """The records pre-flight checks: all of a JSON/JSONL file up to
  SCAN_BYTES, else the first SCAN_RECORDS (via `data.load_records`)."""
  whole = (os.path.isfile(path) and path.lower().endswith(('.jsonl', '.json'))
           and os.path.getsize(path) <= SCAN_BYTES)
  try:
    return data.load_records(path, limit=0 if whole else SCAN_RECORDS)
  except data.DataError as e:
    raise PreflightError(str(e)) from None


def check_data(plan: jobs_lib.Plan) -> None:
  """Every data source exists and is readable, and every record pre-flight
  scans (`_scanned`) has the fields its rendering needs, as strings."""
  for name, a in plan.abilities.items():
    for use in ('probe', 'eval', 'dev', 'sft'):
      path = getattr(a, use)
      if not path:
        continue
      if not os.path.exists(path) and (
          path.startswith(('/', '.', '~')) or
          os.path.splitext(path)[1].lower() in data.FILE_TYPES):
        raise PreflightError(f'config.abilities.{name}.{use}: no such file '
                             f'{path}')
      cfg = data.DataConfig(
          path=path, template=a.template, text_field=a.text_field,
          prompt_field=a.prompt_field, response_field=a.response_field,
          qa_format=a.qa_format)
      try:
        data.check_fields(_scanned(path), cfg,
                          f'{path} (abilities.{name}.{use})')
      except data.DataError as e:
        raise PreflightError(str(e)) from None


# ------------------------------------------------------- outputs and space


def params_bytes(cfg: ModelConfig, dtype: str | None = None) -> int:
  """Bytes of one model's params in `dtype` (default `cfg.param_dtype`)."""
  itemsize = np.dtype(dtype or cfg.param_dtype).itemsize
  return forward.count_params(forward.abstract_params(cfg)) * itemsize


def stats_bytes(cfg: ModelConfig, sites: Iterable[str],
                num_models: int) -> int:
  """Bytes of a statistics artifact: float32 sum / sum_abs / sum_sq
  `[M, L, C]` and, M >= 2, pair_abs_diff `[M, M, L, C]` per site."""
  per = 3 * num_models + (num_models ** 2 if num_models >= 2 else 0)
  return sum(4 * per * cfg.num_layers * capture.site_channels(cfg, s)
             for s in sites)


def check_output_space(path: str, need_bytes: int, flag: str) -> None:
  """`path` can be written and its file system has room for `need_bytes`
  (plus 10%), checked before heavy work.

  Writability is tried, not guessed: a probe file is created and removed
  in the nearest folder that exists (permission bits say nothing for root
  or on a read-only mount).

  Raises:
    PreflightError naming `flag`, the folder and the reason.
  """
  anc = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(anc):
    anc = os.path.dirname(anc)
  if not os.path.isdir(anc):
    raise PreflightError(f'{flag}={path}: {anc} is not a folder')
  try:
    fd, probe = tempfile.mkstemp(prefix='.act-jax-write-probe-', dir=anc)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise PreflightError(f'{flag}={path}: cannot write in {anc} '
                         f'({e.strerror})') from None
  free = shutil.disk_usage(anc).free
  if need_bytes * 1.1 > free:
    raise PreflightError(
        f'{flag}={path}: needs about {need_bytes * 1.1 / 2**20:,.0f} MiB, '
        f'{free / 2**20:,.0f} MiB free on the file system of {anc}')


def workdir_bytes(plan: jobs_lib.Plan, cfgs: Mapping[str, ModelConfig]
                  ) -> int:
  """An estimate of what a run writes: a params dir per converted model,
  per job a transplant, a fine-tuned model and the fine-tune's checkpoints
  (params + 2 Adam moments, `train.keep_checkpoints` of them), and the
  statistics of every probed ability (full + two halves)."""
  if not cfgs:
    return 0
  cfg = next(iter(cfgs.values()))
  one = params_bytes(cfg, plan.convert.param_dtype or None)
  jobs = sum(not j.analyze_only for j in plan.jobs)
  ckpt = 3 * params_bytes(cfg, 'float32') * plan.train.keep_checkpoints
  sites = jobs_lib.parse_list(plan.collect.sites) or capture.OUTPUT_SITES
  stats = 3 * len(plan.probed_abilities) * stats_bytes(
      cfg, sites, len(plan.model_names))
  return len(cfgs) * one + jobs * (2 * one + ckpt) + stats


def check_workdir(plan: jobs_lib.Plan, workdir: str,
                  stage_names: Iterable[str],
                  cfgs: Mapping[str, ModelConfig] | None = None) -> None:
  """The workdir can hold the run, and no input lives where a rerun with
  `overwrite` would replace it (inside a stage folder other than the case
  build's, whose products the models and data of a case are).

  Raises:
    PreflightError naming the input or the missing room.
  """
  workdir = os.path.abspath(workdir)
  paths = [(f'models.{n}', p) for n, p in plan.models.items()]
  for name, a in plan.abilities.items():
    paths += [(f'abilities.{name}.{u}', getattr(a, u))
              for u in ('probe', 'eval', 'dev', 'sft') if getattr(a, u)]
  for stage in stage_names:
    if stage == 'build_models':
      continue
    folder = os.path.join(workdir, stage)
    for field, p in paths:
      real = os.path.abspath(p)
      if real == folder or real.startswith(folder + os.sep):
        raise PreflightError(
            f'--config.{field}={p} lies inside the stage folder {folder}, '
            'which a rerun replaces; keep inputs outside the workdir')
  check_output_space(workdir, workdir_bytes(plan, cfgs or {}), '--workdir')
  if plan.report.out:
    try:
      report_lib.check_publish(plan.report.out, plan.overwrite,
                               [p for _, p in paths], workdir)
    except atomic.OutputError as e:
      raise PreflightError(str(e)) from None
