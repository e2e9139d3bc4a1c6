"""Pre-flight: every check that can fail before heavy work, by name.

`check_plan(plan)` validates values and cross references of a typed plan
(modes, scores / selectors / units / policies, budgets, train fields, the
models and abilities jobs name, each ability's rendering, metric and
matching). `check_models(plan)` reads only small files of each checkpoint
(config.json or model_config.json, the safetensors index and headers, the
tokenizer) and fails on a missing directory, an unreadable checkpoint, or
models that do not share architecture and tokenizer. `check_data(plan)`
checks that every data file exists and that its first record has the fields
its ability reads. Unknown config keys are rejected by `jobs.
plan_from_config` (and by `config_flags` when overridden).
"""

from __future__ import annotations

import json
import math
import os

from act_jax import data
from act_jax.act import localize
from act_jax.act import masks as masks_lib
from act_jax.act import transfer
from act_jax.eval import metrics as eval_metrics
from act_jax.io import models as models_io
from act_jax.pipeline import jobs as jobs_lib
from act_jax.train import finetune

ACTIVATION_SCORES = tuple(s for s in localize.SCORES
                          if s not in ('weight_diff', 'random'))
METRICS = ('perplexity', 'exact_match')


class PreflightError(ValueError):
  """A configuration or checkpoint problem found before any heavy work."""


def _choice(value, choices, flag: str):
  if value not in choices:
    raise PreflightError(f'--config.{flag}={value!r}: expected one of '
                         f'{", ".join(map(str, choices))}')


def _frac(value: float, flag: str):
  if not (isinstance(value, (int, float)) and 0 < value <= 1):
    raise PreflightError(f'--config.{flag}={value!r}: expected a fraction '
                         'in (0, 1]')


def _positive(value: int, flag: str):
  if value < 1:
    raise PreflightError(f'--config.{flag}={value}: expected >= 1')


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
  if loc.select == 'mass':
    _frac(loc.mass, 'localize.mass')
  _frac(loc.top_frac, 'localize.top_frac')
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
    _choice(c, jobs_lib.WHOLE_MODEL, 'sweep.candidates')
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
    if a.metric == 'exact_match':
      _choice(a.match, eval_metrics.MATCHES, f'{f}.match')
      _positive(a.max_new_tokens, f'{f}.max_new_tokens')
      if a.template == 'text':
        raise PreflightError(f'--config.{f}: metric exact_match needs a '
                             'prompt to generate from: template qa or chat')
      if a.match == 'regex' and not a.pattern:
        raise PreflightError(f'--config.{f}.pattern is empty (match=regex)')
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
  _sweep(plan)
  _abilities(plan)
  tr = plan.transfer
  _choice(tr.policy, transfer.POLICIES, 'transfer.policy')
  if not (math.isfinite(tr.alpha) and 0 <= tr.alpha <= 1):
    raise PreflightError(f'--config.transfer.alpha={tr.alpha}: expected a '
                         'number in [0, 1]')
  bl = plan.baselines
  _frac(bl.ties_density, 'baselines.ties_density')
  if not 0 <= bl.dare_drop < 1:
    raise PreflightError(f'--config.baselines.dare_drop={bl.dare_drop}: '
                         'expected [0, 1)')
  co = plan.collect
  _choice(co.dtype, ('float32', 'bfloat16'), 'collect.dtype')
  _choice(co.count_tokens, ('all', 'response'), 'collect.count_tokens')
  _positive(co.batch_size, 'collect.batch_size')
  _positive(co.max_seq_len, 'collect.max_seq_len')
  _choice(plan.convert.param_dtype, ('', 'float32', 'bfloat16', 'float16'),
          'convert.param_dtype')
  _choice(plan.sft.mix_by, ('records', 'tokens'), 'sft.mix_by')
  if min(plan.sft.ability_weight, plan.sft.retain_weight) < 0:
    raise PreflightError('--config.sft weights must be >= 0')
  ev = plan.evaluate
  for f in ('batch_size', 'gen_batch_size', 'max_seq_len'):
    _positive(getattr(ev, f), f'evaluate.{f}')
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


def check_models(plan: jobs_lib.Plan) -> None:
  """All models exist, are readable, share architecture and tokenizer."""
  try:
    models_io.check_related({n: plan.models[n] for n in plan.model_names})
  except models_io.ModelDirError as e:
    raise PreflightError(str(e)) from None


def _first_record(path: str) -> dict | None:
  """The first record of a JSONL file (None for other formats)."""
  if not path.endswith('.jsonl'):
    return None
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, start=1):
      if line.strip():
        try:
          return json.loads(line)
        except json.JSONDecodeError as e:
          raise PreflightError(f'{path}: line {n} is not JSON ({e.msg})'
                               ) from None
  raise PreflightError(f'{path}: the data file is empty (no records)')


def check_data(plan: jobs_lib.Plan) -> None:
  """Every data file exists; its first record has the fields it needs."""
  for name, a in plan.abilities.items():
    for use in ('probe', 'eval', 'dev', 'sft'):
      path = getattr(a, use)
      if not path:
        continue
      if not os.path.isfile(path):
        raise PreflightError(f'config.abilities.{name}.{use}: no such file '
                             f'{path}')
      rec = _first_record(path)
      if rec is None:
        continue
      need = data.required_fields(a.template, a.text_field, a.prompt_field,
                                  a.response_field)
      missing = [f for f in need if f not in rec]
      if missing:
        raise PreflightError(
            f'{path} (abilities.{name}.{use}): the first record has no field '
            f'{missing[0]!r} (template {a.template}); it has '
            f'{sorted(rec)}')
