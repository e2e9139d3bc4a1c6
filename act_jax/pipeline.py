"""The ACT stages as bodies for the stage runner (see stages.py, main.py).

`make_stages(config, workdir)` returns the ordered stages of `config.mode`:
  build_models  (toy configs only) train the toy base and specialists
  convert       every model of `config.models` -> a params dir
  collect       per ability: activation statistics of all models on its
                probe set, two disjoint halves + their sum (`full`)
  localize      per job: channel scores, ACT / weight-diff / random masks at
                the same budget, the four analyses (analysis.json)
  transfer      per job: ACT transplant or merge, and the baselines
  finetune      per job: the compatibility fine-tune of the ACT result
  evaluate      every candidate on every ability (+ sufficiency sweep)
  report        report.md, plots, results.json from the artifacts alone
A *job* is a recover job (`config.recover`: one ability from source into
target) or a merge job (`config.merge`: specialists into a base). Each stage
body receives only the sub-configs it needs.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import ml_collections

from act_jax import stages as stages_lib

MODES = ('recover', 'merge', 'analyze')
WORKDIR_TOKEN = '{workdir}'


def parse_modes(mode: str) -> list[str]:
  """'recover,merge' -> ['recover', 'merge']; errors name the bad entry."""
  out = [m.strip() for m in mode.split(',') if m.strip()]
  bad = [m for m in out if m not in MODES]
  if not out or bad:
    raise ValueError(f'config.mode={mode!r}: expected a comma list of '
                     f'{", ".join(MODES)}')
  return out


def parse_pairs(spec: str, what: str) -> dict[str, str]:
  """'a:x,b:y' -> {'a': 'x', 'b': 'y'}."""
  out = {}
  for part in filter(None, (p.strip() for p in spec.split(','))):
    k, sep, v = part.partition(':')
    if not sep or not k or not v:
      raise ValueError(f'{what}={spec!r}: entry {part!r} is not name:value')
    out[k] = v
  return out


def parse_list(spec: str) -> list[str]:
  """'a, b' -> ['a', 'b']."""
  return [p.strip() for p in spec.split(',') if p.strip()]


def resolve(value: Any, workdir: str) -> Any:
  """Replaces '{workdir}' in strings of a (nested) value."""
  if isinstance(value, str):
    return value.replace(WORKDIR_TOKEN, workdir)
  if isinstance(value, dict):
    return {k: resolve(v, workdir) for k, v in value.items()}
  return value


def jobs(config) -> list[dict[str, Any]]:
  """The recover / merge jobs of `config` as plain dicts.

  recover job: {kind, name, ability, source, target, abilities (all scored)}
  merge job: {kind, name, base, specialists {model: ability}, abilities}
  Each localizes one (ability, source, target) triple per `pairs` entry.
  """
  modes = parse_modes(config.mode)
  all_abilities = sorted(config.abilities.keys())
  out = []
  if 'recover' in modes or 'analyze' in modes:
    r = config.recover
    out.append({
        'kind': 'recover', 'name': 'recover',
        'pairs': [{'ability': r.ability, 'source': r.source,
                   'target': r.target}],
        'abilities': all_abilities,
        'analyze_only': 'recover' not in modes})
  if 'merge' in modes:
    m = config.merge
    specs = parse_pairs(m.specialists, 'merge.specialists')
    out.append({
        'kind': 'merge', 'name': 'merge', 'base': m.base,
        'specialists': specs,
        'pairs': [{'ability': a, 'source': s, 'target': m.base}
                  for s, a in specs.items()],
        'abilities': all_abilities, 'analyze_only': False})
  return out


def needed_models(config) -> list[str]:
  """Model names used by the jobs, in `config.models` order."""
  used = set()
  for job in jobs(config):
    for p in job['pairs']:
      used |= {p['source'], p['target']}
    if job['kind'] == 'merge':
      used.add(job['base'])
  return [m for m in config.models.keys() if m in used]


def needed_abilities(config) -> list[str]:
  """Abilities localized by some job (probe sets needed)."""
  out = []
  for job in jobs(config):
    for p in job['pairs']:
      if p['ability'] not in out:
        out.append(p['ability'])
  return out


def _snap(*subs) -> list[Any]:
  out = []
  for s in subs:
    out.append(s.to_dict() if isinstance(s, ml_collections.ConfigDict) else s)
  return out


def make_stages(config, workdir: str) -> list[stages_lib.Stage]:
  """The ordered stages for `config.mode` (bodies get only sub-configs)."""
  # Imported here so `--help` and pre-flight stay light.
  from act_jax import stage_act as sa  # pylint: disable=g-import-not-at-top
  from act_jax import stage_bodies as sb  # pylint: disable=g-import-not-at-top
  models = {k: resolve(v, workdir) for k, v in config.models.items()}
  abil = {k: resolve(v.to_dict(), workdir) for k, v in config.abilities.items()}
  job_list = jobs(config)
  names = needed_models(config)
  modes = parse_modes(config.mode)
  out = []
  if config.get('toy') and config.toy.enabled:
    out.append(stages_lib.Stage(
        'build_models', lambda ctx: sb.build_models(config.toy, ctx),
        snapshot=_snap(config.toy)))
  pre = ('build_models',) if out else ()
  out.append(stages_lib.Stage(
      'convert', lambda ctx: sb.convert(config.convert, models, names, ctx),
      inputs=pre, snapshot=_snap(config.convert, models, names)))
  out.append(stages_lib.Stage(
      'collect', lambda ctx: sb.collect(
          config.collect, abil, names, needed_abilities(config), ctx),
      inputs=('convert',),
      snapshot=_snap(config.collect, abil, names)))
  out.append(stages_lib.Stage(
      'localize', lambda ctx: sb.localize(config.localize, job_list, names,
                                          ctx),
      inputs=('convert', 'collect'),
      snapshot=_snap(config.localize, job_list)))
  if modes == ['analyze']:
    out.append(stages_lib.Stage(
        'report', lambda ctx: sa.report(config.report, ctx),
        inputs=('localize',), snapshot=None))
    return out
  out.append(stages_lib.Stage(
      'transfer', lambda ctx: sa.transfer(config.transfer, job_list, ctx),
      inputs=('convert', 'localize'),
      snapshot=_snap(config.transfer, job_list)))
  out.append(stages_lib.Stage(
      'finetune', lambda ctx: sa.finetune(config.train, config.sft, abil,
                                          job_list, ctx),
      inputs=('convert', 'localize', 'transfer'),
      snapshot=_snap(config.train, config.sft, job_list)))
  out.append(stages_lib.Stage(
      'evaluate', lambda ctx: sa.evaluate(config.evaluate, config.transfer,
                                          abil, job_list, ctx),
      inputs=('convert', 'localize', 'transfer', 'finetune'),
      snapshot=_snap(config.evaluate, config.transfer, job_list)))
  out.append(stages_lib.Stage(
      'report', lambda ctx: sa.report(config.report, ctx),
      inputs=('localize', 'evaluate'), snapshot=None))
  logging.info('stages: %s', ', '.join(s.name for s in out))
  return out
