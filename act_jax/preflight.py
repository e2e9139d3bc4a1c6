"""Pre-flight: every check that can fail before heavy work, by name.

`check_config(config)` validates field values and cross references (modes,
score / select / unit / policy choices, train fields, models and abilities
named by `recover` / `merge`). `check_models(models)` reads only small files
of each checkpoint (config.json or model_config.json, the safetensors index
and headers, the tokenizer) and fails on a missing directory, an unreadable
checkpoint, or models that do not share architecture and tokenizer.
Unknown config keys are already rejected by `config_flags` when overridden.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from act_jax import pipeline

BASELINES = ('linear', 'task_arithmetic', 'ties', 'dare')
ENGINES = ('toy', 'act')


class PreflightError(ValueError):
  """A configuration or checkpoint problem found before any heavy work."""


def _choice(value, choices, flag: str):
  if value not in choices:
    raise PreflightError(f'--config.{flag}={value!r}: expected one of '
                         f'{", ".join(map(str, choices))}')


def check_config(config) -> None:
  """Field values and cross references; raises PreflightError by flag."""
  from act_jax import masks, scores, selection, train, transfer  # pylint: disable=g-import-not-at-top,g-multiple-import
  try:
    modes = pipeline.parse_modes(config.mode)
    jobs = pipeline.jobs(config)
  except ValueError as e:
    raise PreflightError(str(e)) from None
  _choice(config.localize.score, scores.SCORES, 'localize.score')
  _choice(config.localize.select, selection.METHODS, 'localize.select')
  _choice(config.localize.unit, masks.UNITS, 'localize.unit')
  if not 0 < config.localize.top_frac <= 1:
    raise PreflightError(f'--config.localize.top_frac='
                         f'{config.localize.top_frac}: expected (0, 1]')
  _choice(config.transfer.policy, transfer.POLICIES, 'transfer.policy')
  for b in pipeline.parse_list(config.transfer.baselines):
    _choice(b, BASELINES, 'transfer.baselines')
  _choice(config.evaluate.engine, ENGINES, 'evaluate.engine')
  if config.collect.dtype not in ('float32', 'bfloat16'):
    raise PreflightError(f'--config.collect.dtype={config.collect.dtype!r}: '
                         'expected float32 or bfloat16')
  for r in pipeline.parse_list(config.evaluate.rho_sweep):
    try:
      ok = 0 < float(r) <= 1
    except ValueError:
      ok = False
    if not ok:
      raise PreflightError(f'--config.evaluate.rho_sweep: {r!r} is not a '
                           'fraction in (0, 1]')
  try:
    train.check_train_config(config.train)
  except ValueError as e:
    raise PreflightError(f'--config.{e}') from None
  models = set(config.models.keys())
  abilities = set(config.abilities.keys())
  if not models:
    raise PreflightError('config.models is empty: name at least two models')
  for job in jobs:
    for p in job['pairs']:
      where = 'recover' if job['kind'] == 'recover' else 'merge'
      for role in ('source', 'target'):
        if p[role] not in models:
          raise PreflightError(
              f'--config.{where}: model {p[role]!r} is not in config.models '
              f'({", ".join(sorted(models))})')
      if p['ability'] not in abilities:
        raise PreflightError(
            f'--config.{where}: ability {p["ability"]!r} is not in '
            f'config.abilities ({", ".join(sorted(abilities))})')
  for name, a in config.abilities.items():
    need = ('probe', 'eval', 'sft') if modes != ['analyze'] else ('probe',)
    for field in need:
      if not a.get(field):
        raise PreflightError(f'--config.abilities.{name}.{field} is empty')


def check_data(abilities: Mapping[str, Mapping[str, str]],
               names) -> None:
  """Each named ability's data files exist."""
  for name in names:
    for field in ('probe', 'eval', 'sft'):
      path = abilities[name].get(field)
      if path and not os.path.isfile(path):
        raise PreflightError(f'config.abilities.{name}.{field}: no such file '
                             f'{path}')


def _model_config(path: str):
  from act_jax import checkpoint, hf_convert  # pylint: disable=g-import-not-at-top,g-multiple-import
  if not os.path.isdir(path):
    raise PreflightError(f'missing checkpoint directory {path}')
  try:
    if os.path.isfile(os.path.join(path, checkpoint.MODEL_CONFIG)):
      return checkpoint.load_model_config(path)
    cfg = hf_convert.load_hf_config(path)
    files, key_file = hf_convert.checkpoint_files(path)
    headers = hf_convert.read_headers(files)
    hf_convert.validate_checkpoint(cfg, headers, key_file, path)
    return cfg
  except (ValueError, OSError) as e:
    raise PreflightError(f'{path}: {e}') from None


def _tokenizer_fingerprint(path: str) -> str:
  tj = os.path.join(path, 'tokenizer.json')
  if os.path.isfile(tj):
    with open(tj) as f:
      tok = json.load(f)
    return json.dumps({'model': tok.get('model'),
                       'added': tok.get('added_tokens')}, sort_keys=True)
  for name in ('tokenizer.model', 'vocab.json'):
    p = os.path.join(path, name)
    if os.path.isfile(p):
      with open(p, 'rb') as f:
        return f.read().hex()
  raise PreflightError(f'{path}: no tokenizer files (tokenizer.json, '
                       'tokenizer.model or vocab.json)')


def check_models(models: Mapping[str, str]) -> None:
  """All models exist, are readable, share architecture and tokenizer."""
  ref_name = ref_cfg = ref_tok = None
  for name, path in models.items():
    cfg = _model_config(path).replace(dtype='float32', param_dtype='float32')
    tok = _tokenizer_fingerprint(path)
    if ref_cfg is None:
      ref_name, ref_cfg, ref_tok = name, cfg, tok
      continue
    if cfg != ref_cfg:
      diff = {k: (v, getattr(cfg, k)) for k, v in ref_cfg.to_dict().items()
              if v != cfg.to_dict()[k]}
      raise PreflightError(
          f'models {ref_name!r} and {name!r} ({path}) do not share an '
          f'architecture: {ref_name} vs {name}: {diff}')
    if tok != ref_tok:
      raise PreflightError(f'models {ref_name!r} and {name!r} ({path}) do '
                           'not share a tokenizer (tokenizer files differ)')
