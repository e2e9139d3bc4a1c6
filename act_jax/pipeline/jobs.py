"""The config schema and its typed, frozen form: config -> `Plan`.

Every section of an act-jax config is a frozen dataclass below; its fields,
defaults and trailing comments (meaning and unit) ARE the schema.
`default_config()` turns them into a ConfigDict whose sections are locked,
so `--config.localize.scroe=...` fails; `plan_from_config(config, workdir)`
checks every section strictly (a misspelt key is an error naming it and the
valid keys) and returns a `Plan`: the sections as dataclasses plus the
recover / merge `Job`s and the `Ability` specs. Only `pipeline/` reads
config; stages receive these dataclasses. Comma lists are parsed here only
(`parse_list`). This module imports nothing else of `pipeline/`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

import ml_collections

from act_jax import data
from act_jax.train import finetune

MODES = ('recover', 'merge', 'analyze')
WORKDIR_TOKEN = '{workdir}'
SELECTORS = ('act', 'random', 'weight_diff')


class ConfigError(ValueError):
  """A config that cannot run; the message names the field to fix."""


# ------------------------------------------------------------------ sections


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
  """`convert`: HF / params dirs -> the run's params dirs."""
  param_dtype: str = ''  # '' keeps the checkpoint dtype; float32 | bfloat16
  follow_symlinks: bool = False  # accept symlinks out of a model dir (HF cache)


@dataclasses.dataclass(frozen=True)
class CollectConfig:
  """`collect`: activation statistics on each ability's probe set."""
  num_probe: int = 0  # probe records per ability (0 = all)
  max_seq_len: int = 128  # T, tokens per probe row
  batch_size: int = 8  # probe rows per batch (global, all processes)
  sites: str = ''  # comma list of capture sites ('' = the 7 output sites)
  dtype: str = 'float32'  # compute dtype of the forward (stats are float32)
  count_tokens: str = 'all'  # tokens the statistics count: all | response
  save_every: int = 50  # checkpoint the sums every N batches (0 = never)
  attribution: bool = False  # also |diff * dL/dh| sums (one extra backward
  # per batch; the 'attribution' score needs it)


@dataclasses.dataclass(frozen=True)
class LocalizeConfig:
  """`localize`: the primary ACT selection (the transfer stage's result)."""
  score: str = 'mean_abs_diff'  # channel score (act.localize.SCORES)
  select: str = 'per_site'  # per_site | global | threshold | mass
  top_frac: float = 0.05  # rho: fraction of channels per (layer, site)
  threshold: float = 0.0  # select=threshold: absolute score threshold
  mass: float = 0.8  # select=mass: share of each layer's score mass
  unit: str = 'channel'  # channel | neuron | head (coupled units)
  seed: int = 0  # random-channel baseline seed


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """`sweep`: the variant axes every candidate row comes from.

  Rows: for every score x rho, `act[score]@rho`; for every rho,
  `random@rho` and `weight_diff@rho` at the budget of the first score's
  mask; each selector in `finetune` also `+ft` (the compatibility
  fine-tune of that transplant); plus the whole-model candidates. With
  `seeds`, every seeded row (random channels, each +ft's SFT order, DARE,
  full_ft) exists once per seed, named `<row>#s<seed>`. With `patch`, the
  patch stage checks those selectors' channels by activation patching.
  """
  scores: str = ''  # activation scores, comma list ('' = localize.score)
  rhos: str = ''  # budgets, comma list ('' = localize.top_frac)
  extra_rhos: str = ''  # transplant-only budgets (sufficiency curve)
  selectors: str = 'act,random,weight_diff'  # channel selectors per rho
  finetune: str = 'act'  # selectors that are also fine-tuned ('' = none)
  finetune_rhos: str = ''  # rhos that get +ft rows ('' = every rho)
  candidates: str = 'source,target,linear,task_arithmetic,ties,dare'  # whole-model rows
  seeds: str = ''  # seeds of every seeded row, comma list ('' = one row with
  # localize.seed, sft.seed and baselines.seed)
  patch: str = ''  # selectors checked by activation patching ('' = none)


@dataclasses.dataclass(frozen=True)
class TransferConfig:
  """`transfer`: theta' = tgt + alpha * M * (src - tgt), and merge conflicts."""
  alpha: float = 1.0  # interpolation factor; 1 = copy the source's entries
  policy: str = 'average'  # merge conflicts: average | max_score | priority


@dataclasses.dataclass(frozen=True)
class BaselinesConfig:
  """`baselines`: knobs of the whole-model merging baselines."""
  interp_t: float = 0.5  # linear: weight of the source (recover) / mean (merge)
  ta_lambda: float = 0.5  # task arithmetic scale (recover: S + lam (T - S))
  ties_density: float = 0.2  # TIES: kept fraction of each task-vector tensor
  dare_drop: float = 0.9  # DARE: drop probability of task-vector entries
  seed: int = 0  # DARE drop-mask seed


@dataclasses.dataclass(frozen=True)
class SftConfig:
  """`sft`: the compatibility fine-tune's data mixture."""
  ability_weight: float = 0.5  # share of the transferred abilities' SFT data
  retain_weight: float = 0.5  # share of the others', split evenly among them
  mix_by: str = 'records'  # shares count records | tokens
  num_records: int = 2048  # mix_by=records: records in the mixture
  pack: bool = False  # pack several records per row (segment ids keep apart)
  seed: int = 0  # mixture shuffle seed


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """`evaluate`: how every candidate is measured."""
  num_eval: int = 256  # eval records per ability (0 = all)
  batch_size: int = 16  # rows per perplexity / choice forward
  gen_batch_size: int = 8  # prompts per greedy-generation batch
  max_seq_len: int = 128  # T for perplexity rows (longer: truncated)
  split: str = 'test'  # comma list: test (abilities.<n>.eval) | dev
  # (abilities.<n>.dev); the first is the report's main table


@dataclasses.dataclass(frozen=True)
class ReportConfig:
  """`report`: the study's Markdown report, from the artifacts alone."""
  title: str = 'ACT run'  # report heading
  out: str = ''  # also write the report here (e.g. docs/results/x.md)
  command: str = ''  # the command that regenerates it (shown first)
  plots: bool = True  # PNG plots beside the report
  bootstrap: int = 2000  # paired bootstrap resamples per interval
  confidence: float = 0.95  # interval level


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """`export`: each result as an HF directory with a Hub model card."""
  dtype: str = ''  # '' = the base checkpoint's; float32 | bfloat16 | float16
  max_shard_bytes: int = 2**30  # start a new safetensors shard past this size


@dataclasses.dataclass(frozen=True)
class AbilityConfig:
  """One entry of `abilities`: its data files, rendering and metric."""
  probe: str = ''  # probe records for localization ('' = none)
  eval: str = ''  # held-out eval records: the test split ('' = none)
  dev: str = ''  # held-out dev-split records (evaluate.split=dev)
  sft: str = ''  # compatibility fine-tune records ('' = none)
  template: str = 'qa'  # rendering: text | qa | chat (data.TEMPLATES)
  qa_format: str = data.DEFAULT_QA_FORMAT  # template qa: {prompt} {response}
  text_field: str = 'text'  # record field of template text
  prompt_field: str = 'prompt'  # record field of the prompt (qa, chat)
  response_field: str = 'answer'  # record field of the response (qa, chat)
  answers_field: str = 'answers'  # optional list of accepted answers
  metric: str = 'perplexity'  # perplexity | exact_match (greedy generation)
  match: str = 'exact'  # exact_match scoring: exact | contains | regex |
  # last_number | hash (eval.metrics.MATCHES)
  pattern: str = ''  # match=regex: group 1 (else 0) is the answer
  contains_tokens: int = 0  # match=contains: search the reply's first N
  # tokens (0 = its first non-empty line)
  max_new_tokens: int = 32  # exact_match: greedy tokens per item
  probe_pack: bool = False  # pack probe records several to a row
  overflow: str = 'truncate'  # records longer than T: truncate | chunk |
  # error (SFT plain text always chunks)


SECTIONS = {
    'convert': ConvertConfig, 'collect': CollectConfig,
    'localize': LocalizeConfig, 'sweep': SweepConfig,
    'transfer': TransferConfig, 'baselines': BaselinesConfig,
    'train': finetune.TrainConfig, 'sft': SftConfig, 'evaluate': EvalConfig,
    'report': ReportConfig, 'export': ExportConfig,
}
TOP_FIELDS = {
    'mode': 'recover',  # comma list of recover | merge | analyze
    'stages': '',  # comma list of stages to run ('' = all of the mode)
    'seed': 0,  # global seed (random masks, DARE, SFT order default)
    'mesh_shape': '',  # (data, fsdp, tensor) sizes, e.g. '1,8,1'; '' = all data
    'overwrite': False,  # recompute completed stages whose inputs changed
    'restart': False,  # discard interrupted stages' work (no resume)
}
MESH_AXES = ('data', 'fsdp', 'tensor')


# ------------------------------------------------------------------- jobs


@dataclasses.dataclass(frozen=True)
class Ability(AbilityConfig):
  """An ability with its name (and `{workdir}` resolved in its paths)."""
  name: str = ''


@dataclasses.dataclass(frozen=True)
class Pair:
  """One localization: where `ability` differs between source and target."""
  ability: str  # the ability transferred
  source: str  # model name (has the ability)
  target: str  # model name (receives it)
  probe: tuple[str, ...]  # abilities whose probe statistics are pooled


@dataclasses.dataclass(frozen=True)
class Job:
  """A recover job (one pair) or a merge job (one pair per specialist)."""
  kind: str  # recover | merge
  name: str  # artifact folder name
  pairs: tuple[Pair, ...]
  base: str  # the model the channels go into (recover: the target)
  abilities: tuple[str, ...]  # every ability evaluated
  analyze_only: bool = False  # mode analyze: localize and report only

  @property
  def models(self) -> tuple[str, ...]:
    """Model names this job reads, base first."""
    out = [self.base]
    for p in self.pairs:
      out += [m for m in (p.source, p.target) if m not in out]
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a run does, typed: what `pipeline.run` executes."""
  modes: tuple[str, ...]
  stages: tuple[str, ...]
  seed: int
  mesh_shape: tuple[int, int, int]  # (data, fsdp, tensor); one may be -1
  overwrite: bool
  restart: bool
  case: dict[str, Any] | None  # the case's own sub-config (name + fields)
  models: dict[str, str]  # name -> checkpoint dir
  abilities: dict[str, Ability]
  jobs: tuple[Job, ...]
  convert: ConvertConfig
  collect: CollectConfig
  localize: LocalizeConfig
  sweep: SweepConfig
  transfer: TransferConfig
  baselines: BaselinesConfig
  train: finetune.TrainConfig
  sft: SftConfig
  evaluate: EvalConfig
  report: ReportConfig
  export: ExportConfig

  @property
  def model_names(self) -> tuple[str, ...]:
    """Models some job uses, in `models` order."""
    used = {m for j in self.jobs for m in j.models}
    return tuple(m for m in self.models if m in used)

  @property
  def probed_abilities(self) -> tuple[str, ...]:
    """Abilities whose probe statistics some job needs."""
    out = []
    for j in self.jobs:
      for p in j.pairs:
        out += [a for a in p.probe if a not in out]
    return tuple(out)

  @property
  def scores(self) -> tuple[str, ...]:
    """The activation scores of the sweep (first = the primary one)."""
    return parse_list(self.sweep.scores) or (self.localize.score,)

  @property
  def rhos(self) -> tuple[float, ...]:
    """The budgets of the sweep with +ft rows possible."""
    return parse_floats(self.sweep.rhos) or (self.localize.top_frac,)

  @property
  def seeds(self) -> tuple[int, ...]:
    """The seed axis (empty: one unsuffixed row per seeded candidate)."""
    return parse_ints(self.sweep.seeds, 'sweep.seeds')

  @property
  def splits(self) -> tuple[str, ...]:
    """The eval splits, the report's main one first."""
    return parse_list(self.evaluate.split)


# ------------------------------------------------------------ parsing


def parse_list(spec: str) -> tuple[str, ...]:
  """'a, b' -> ('a', 'b'); the one comma-list parser."""
  return tuple(p.strip() for p in str(spec).split(',') if p.strip())


def parse_floats(spec: str, field: str = '') -> tuple[float, ...]:
  """'0.1,0.2' -> (0.1, 0.2); errors name `field`."""
  out = []
  for p in parse_list(spec):
    try:
      out.append(float(p))
    except ValueError:
      raise ConfigError(f'--config.{field}: {p!r} is not a number') from None
  return tuple(out)


def parse_mesh_shape(spec: str) -> tuple[int, int, int]:
  """'1,8,1' -> (1, 8, 1): the (data, fsdp, tensor) sizes of the mesh.

  '' means every device on `data` ((-1, 1, 1)); one size may be -1 (all
  the remaining devices). Whether it fits the devices is checked in
  pre-flight, where the device count is known.
  """
  parts = parse_list(spec)
  if not parts:
    return (-1, 1, 1)
  try:
    sizes = tuple(int(p) for p in parts)
  except ValueError:
    sizes = ()
  if (len(sizes) != len(MESH_AXES) or sizes.count(-1) > 1 or
      any(s == 0 or s < -1 for s in sizes)):
    raise ConfigError(f'--config.mesh_shape={spec!r}: expected three sizes '
                      f'({", ".join(MESH_AXES)}), positive or one -1, '
                      "e.g. '1,8,1'")
  return sizes  # type: ignore[return-value]


def parse_ints(spec: str, field: str = '') -> tuple[int, ...]:
  """'0,1,2' -> (0, 1, 2); errors name `field`."""
  out = []
  for p in parse_list(spec):
    try:
      out.append(int(p))
    except ValueError:
      raise ConfigError(f'--config.{field}: {p!r} is not an integer'
                        ) from None
  return tuple(out)


def parse_pairs(spec: str, field: str) -> tuple[tuple[str, str], ...]:
  """'a:x,b:y' -> (('a', 'x'), ('b', 'y'))."""
  out = []
  for part in parse_list(spec):
    k, sep, v = part.partition(':')
    if not sep or not k or not v:
      raise ConfigError(f'--config.{field}={spec!r}: entry {part!r} is not '
                        'name:value')
    out.append((k.strip(), v.strip()))
  return tuple(out)


def resolve(value: Any, workdir: str) -> Any:
  """Replaces '{workdir}' in strings of a (nested) value."""
  if isinstance(value, str):
    return value.replace(WORKDIR_TOKEN, workdir)
  if isinstance(value, Mapping):
    return {k: resolve(v, workdir) for k, v in value.items()}
  return value


def _plain(x: Any) -> Any:
  return x.to_dict() if isinstance(x, ml_collections.ConfigDict) else x


def section(cls, values: Mapping[str, Any] | None, field: str):
  """`cls(**values)` with strict keys and types; errors name the field."""
  values = dict(_plain(values) or {})
  hints = typing.get_type_hints(cls)
  known = [f.name for f in dataclasses.fields(cls) if f.init]
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ConfigError(f'config.{field}: unknown key {unknown[0]!r}; valid '
                      f'keys: {", ".join(known)}')
  out = {}
  for k, v in values.items():
    want = hints[k]
    if want is bool and not isinstance(v, bool):
      raise ConfigError(f'--config.{field}.{k}={v!r}: expected true/false')
    if want is int and (isinstance(v, bool) or not isinstance(v, int)):
      raise ConfigError(f'--config.{field}.{k}={v!r}: expected an integer')
    if want is float:
      if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f'--config.{field}.{k}={v!r}: expected a number')
      v = float(v)
    if want is str and not isinstance(v, str):
      raise ConfigError(f'--config.{field}.{k}={v!r}: expected a string')
    out[k] = v
  return cls(**out)


def _as_configdict(cls) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(
      {f.name: f.default for f in dataclasses.fields(cls) if f.init})
  c.lock()
  return c


def ability(**fields) -> ml_collections.ConfigDict:
  """An `abilities` entry: AbilityConfig defaults updated by `fields`."""
  c = _as_configdict(AbilityConfig)
  for k, v in fields.items():
    if k not in c:
      raise ConfigError(f'ability field {k!r} unknown; valid keys: '
                        f'{", ".join(c.keys())}')
    c[k] = v
  return c


def default_config() -> ml_collections.ConfigDict:
  """The schema as a ConfigDict: top-level fields and locked sections.

  `models` and `abilities` are open (any name); add abilities with
  `ability(...)`. `case` selects a case builder by name (`case.name`, e.g.
  'toy'), whose own fields the case module checks.
  """
  c = ml_collections.ConfigDict(dict(TOP_FIELDS))
  c.case = ml_collections.ConfigDict({'name': ''})  # '' = no build stage
  c.models = ml_collections.ConfigDict()  # name -> HF or params dir
  c.abilities = ml_collections.ConfigDict()  # name -> ability(...)
  c.recover = ml_collections.ConfigDict(dict(
      source='',  # model that has the ability
      target='',  # model that lost it (receives the channels)
      ability='',  # ability (key of `abilities`) to recover
      probe='',  # abilities whose probes localize it ('' = ability's own)
  ))
  c.recover.lock()
  c.merge = ml_collections.ConfigDict(dict(
      base='',  # model to merge into
      specialists='',  # 'model:ability,model:ability'
  ))
  c.merge.lock()
  for name, cls in SECTIONS.items():
    c[name] = _as_configdict(cls)
  return c


# ------------------------------------------------------------------- plan


def _jobs(c, modes, abilities) -> tuple[Job, ...]:
  evaluated = tuple(a for a in abilities
                    if abilities[a].eval or abilities[a].dev)
  out = []
  if 'recover' in modes or 'analyze' in modes:
    r = section(_Recover, c.get('recover'), 'recover')
    probe = parse_list(r.probe) or (r.ability,)
    out.append(Job('recover', 'recover',
                   (Pair(r.ability, r.source, r.target, probe),),
                   base=r.target, abilities=evaluated,
                   analyze_only='recover' not in modes))
  if 'merge' in modes:
    m = section(_Merge, c.get('merge'), 'merge')
    specs = parse_pairs(m.specialists, 'merge.specialists')
    if not specs:
      raise ConfigError('--config.merge.specialists is empty: name '
                        'model:ability pairs')
    out.append(Job('merge', 'merge',
                   tuple(Pair(a, s, m.base, (a,)) for s, a in specs),
                   base=m.base, abilities=evaluated))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Recover:
  source: str = ''
  target: str = ''
  ability: str = ''
  probe: str = ''


@dataclasses.dataclass(frozen=True)
class _Merge:
  base: str = ''
  specialists: str = ''


def plan_from_config(config, workdir: str) -> Plan:
  """The typed plan of `config`; `{workdir}` resolved in every path.

  Raises:
    ConfigError naming the first unknown key, bad type or bad mode.
  """
  c = config
  top = {k: c.get(k, v) for k, v in TOP_FIELDS.items()}
  known = set(TOP_FIELDS) | set(SECTIONS) | {'case', 'models', 'abilities',
                                             'recover', 'merge'}
  extra = sorted(set(c.keys()) - known)
  if extra:
    raise ConfigError(f'config: unknown key {extra[0]!r}; valid keys: '
                      f'{", ".join(sorted(known))}')
  for k in ('overwrite', 'restart'):
    if not isinstance(top[k], bool):
      raise ConfigError(f'--config.{k}={top[k]!r}: expected true/false')
  modes = parse_list(top['mode'])
  bad = [m for m in modes if m not in MODES]
  if not modes or bad:
    raise ConfigError(f'--config.mode={top["mode"]!r}: expected a comma list '
                      f'of {", ".join(MODES)}')
  abilities = {}
  for name, a in dict(_plain(c.get('abilities')) or {}).items():
    spec = section(AbilityConfig, a, f'abilities.{name}')
    fields = resolve(dataclasses.asdict(spec), workdir)
    abilities[name] = Ability(name=name, **fields)
  case = _plain(c.get('case')) or {}
  sections = {name: section(cls, c.get(name), name)
              for name, cls in SECTIONS.items()}
  return Plan(
      modes=modes, stages=parse_list(top['stages']), seed=int(top['seed']),
      mesh_shape=parse_mesh_shape(str(top['mesh_shape'])),
      overwrite=top['overwrite'], restart=top['restart'],
      case=resolve(dict(case), workdir) if case.get('name') else None,
      models={k: resolve(str(v), workdir)
              for k, v in (_plain(c.get('models')) or {}).items()},
      abilities=abilities, jobs=_jobs(c, modes, abilities), **sections)


def snapshot(*parts: Any) -> Any:
  """A JSON-able view of dataclasses / dicts, for stage drift keys."""
  def one(x):
    if dataclasses.is_dataclass(x):
      return dataclasses.asdict(x)
    if isinstance(x, (list, tuple)):
      return [one(y) for y in x]
    if isinstance(x, Mapping):
      return {k: one(v) for k, v in x.items()}
    return x
  return [one(p) for p in parts]
