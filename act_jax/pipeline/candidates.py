"""The candidates a job compares, by name: a registry, as mergekit's methods.

A candidate is one row of a study: a way to build params from the job's
models, evaluated on every ability. Kinds (`REGISTRY`):
  act            the job's channels by an activation score, transplanted
                 (recover: T + alpha M (S - T)) or merged into the base
                 (merge: `transfer.merge` with the conflict policy)
  random         random channels at the same per-(site, layer) budget
  weight_diff    the channels whose weights differ most, same budget
  source/target  the recover job's two models (`source` is also the
                 full-copy baseline); `model` one merge input by name
  linear         recover: (1 - t) T + t S; merge: the specialists' mean
  task_arithmetic  recover: S + lam (T - S); merge: B + lam sum (S_k - B)
  ties / dare    TIES / DARE on the same task vectors
  full_ft        recover: every param of the target fine-tuned on the same
                 data, steps and lr as the channel fine-tunes
Each channel candidate exists at every budget (`rho`) of the sweep and, when
its selector is in `sweep.finetune`, also with the compatibility fine-tune
(`+ft`: only its channels move). Names: `act[mean_abs_diff]@0.05`,
`random@0.05+ft`, `weight_diff@0.2`, `linear`, `full_ft`, ...
With a seed axis (`sweep.seeds`), every seeded row exists once per seed,
named `<row>#s<seed>`: random channels (mask seed), every +ft and full_ft
(SFT order) and DARE (drop masks); `family(name)` strips the suffix (the
report pools a family's seeds). `enumerate_candidates(job, plan)` lists a
job's rows in report order, `enumerate_patch_candidates` the rows of the
activation-patching check; `Builder` makes their params (the mask logic is
`channel_masks`, the one place masks of a sweep are selected).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import jax
import numpy as np

from act_jax.act import baselines
from act_jax.act import localize
from act_jax.act import masks as masks_lib
from act_jax.act import transfer
from act_jax.io import models as models_io
from act_jax.io import stats as stats_io
from act_jax.pipeline import jobs as jobs_lib

SCORES_FILE = 'scores.safetensors'


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One row: which registry entry, at which score / budget / seed."""
  name: str  # row name, unique within the job
  kind: str  # key of REGISTRY
  score: str = ''  # act: the activation score
  rho: float = 0.0  # channel kinds: the budget
  finetune: bool = False  # + the compatibility fine-tune of its channels
  model: str = ''  # kind 'model': the model's name
  seed: int = 0  # random: mask seed; dare: drop seed; (+ft: SFT order when
  # `seeded`)
  seeded: bool = False  # from the seed axis: the name ends in '#s<seed>'

  @property
  def channels(self) -> bool:
    """Whether this candidate transplants a channel set."""
    return self.kind in jobs_lib.SELECTORS

  @property
  def file(self) -> str:
    """Its artifact name inside `evaluate/<job>/`."""
    return self.name + '.json'


SEED_SUFFIX = re.compile(r'#s(-?\d+)$')


def _rho(rho: float) -> str:
  return f'{rho:g}'


def family(name: str) -> str:
  """A row's name without its seed suffix: 'random@0.05#s1' ->
  'random@0.05'."""
  return SEED_SUFFIX.sub('', name)


def seeded_name(name: str, seed: int) -> str:
  """`name#s<seed>`."""
  return f'{name}#s{seed}'


def is_seeded(kind: str, finetune: bool) -> bool:
  """Whether a candidate of `kind` depends on a seed."""
  return kind in ('random', 'dare', 'full_ft') or finetune


def sft_seed(cand: 'Candidate', plan: jobs_lib.Plan) -> int:
  """The SFT mixture seed of a fine-tuned candidate."""
  return cand.seed if cand.seeded else plan.sft.seed


def with_sft_seed(plan: jobs_lib.Plan, cand: 'Candidate') -> jobs_lib.Plan:
  """`plan` whose SFT mixture is shuffled by `cand`'s seed."""
  return dataclasses.replace(plan, sft=dataclasses.replace(
      plan.sft, seed=sft_seed(cand, plan)))


def _expand(cand: 'Candidate', plan: jobs_lib.Plan) -> list['Candidate']:
  """One candidate per seed of the axis when it is seeded."""
  if not plan.seeds or not is_seeded(cand.kind, cand.finetune):
    return [cand]
  return [dataclasses.replace(cand, name=seeded_name(cand.name, s), seed=s,
                              seeded=True) for s in plan.seeds]


def channel_name(kind: str, rho: float, score: str = '',
                 finetune: bool = False) -> str:
  """`act[score]@rho`, `random@rho`, ... (+ '+ft')."""
  head = f'act[{score}]' if kind == 'act' else kind
  return f'{head}@{_rho(rho)}' + ('+ft' if finetune else '')


def enumerate_candidates(job: jobs_lib.Job,
                         plan: jobs_lib.Plan) -> list[Candidate]:
  """Every row of `job` in report order: the models, the channel variants
  (transplant then +ft), the whole-model baselines, full_ft."""
  sw = plan.sweep
  scores, rhos = plan.scores, plan.rhos
  extra = [r for r in jobs_lib.parse_floats(sw.extra_rhos, 'sweep.extra_rhos')
           if r not in rhos]
  selectors = jobs_lib.parse_list(sw.selectors)
  ft = set(jobs_lib.parse_list(sw.finetune))
  ft_rhos = jobs_lib.parse_floats(sw.finetune_rhos,
                                  'sweep.finetune_rhos') or rhos
  whole = jobs_lib.parse_list(sw.candidates)
  seed = plan.localize.seed
  out = []
  if job.kind == 'recover':
    out += [Candidate(k, k) for k in ('source', 'target') if k in whole]
  else:
    out += [Candidate(m, 'model', model=m)
            for m in (job.base,) + tuple(p.source for p in job.pairs)]
  for with_ft in (False, True):
    for rho in (rhos if with_ft else tuple(rhos) + tuple(extra)):
      if with_ft and rho not in ft_rhos:
        continue
      for kind in selectors:
        if with_ft and kind not in ft:
          continue
        # Extra budgets (the sufficiency curve) use the first score only.
        kind_scores = (scores if rho in rhos else scores[:1]) if (
            kind == 'act') else ('',)
        for s in kind_scores:
          out += _expand(Candidate(channel_name(kind, rho, s, with_ft), kind,
                                   score=s, rho=rho, finetune=with_ft,
                                   seed=seed), plan)
  for k in whole:
    if k in ('source', 'target'):
      continue
    if k == 'full_ft':
      if job.kind == 'recover':
        out += _expand(Candidate('full_ft', 'full_ft', finetune=True), plan)
      continue
    out += _expand(Candidate(k, k, seed=plan.baselines.seed), plan)
  return out


def enumerate_patch_candidates(job: jobs_lib.Job, plan: jobs_lib.Plan
                               ) -> list[Candidate]:
  """The activation-patching rows of a recover job: `target`, `source`,
  then per sweep rho every selector of `sweep.patch` (act: every score;
  random: every seed), named as the transplants are."""
  if job.kind != 'recover':
    return []
  out = [Candidate('target', 'target'), Candidate('source', 'source')]
  for rho in plan.rhos:
    for kind in jobs_lib.parse_list(plan.sweep.patch):
      for s in (plan.scores if kind == 'act' else ('',)):
        out += _expand(Candidate(channel_name(kind, rho, s), kind, score=s,
                                 rho=rho, seed=plan.localize.seed), plan)
  return out


def primary(plan: jobs_lib.Plan, finetune: bool) -> Candidate:
  """The ACT result the transfer / finetune stages save (+ft: with the
  first seed of the axis, when there is one)."""
  score, rho = plan.localize.score, plan.localize.top_frac
  cand = Candidate(channel_name('act', rho, score, finetune), 'act',
                   score=score, rho=rho, finetune=finetune,
                   seed=plan.localize.seed)
  return _expand(cand, plan)[0]


# ------------------------------------------------------------------ masks


def scores_path(localize_dir: str, job: str, ability: str) -> str:
  """The scores artifact of one (job, ability) localization."""
  return os.path.join(localize_dir, job, ability, SCORES_FILE)


def select_mask(scores: dict[str, np.ndarray], loc, rho: float,
                cfg) -> masks_lib.Mask:
  """The ACT selection at budget `rho` (coupled to `loc.unit`)."""
  m = localize.select_channels(scores, loc.select, rho, loc.threshold,
                               loc.mass)
  return masks_lib.couple(m, cfg, loc.unit)


def channel_masks(kind: str, score: str, rho: float, *, act_scores,
                  weight_scores, loc, cfg, seed: int
                  ) -> tuple[masks_lib.Mask, dict[str, np.ndarray]]:
  """(mask, the scores it was chosen by) of one selector at one budget.

  `act_scores` are `{score: {site: [L, C]}}` of one pair; random and
  weight-diff channels match the budget of the FIRST score's ACT mask.
  """
  if kind == 'act':
    return select_mask(act_scores[score], loc, rho, cfg), act_scores[score]
  ref = select_mask(next(iter(act_scores.values())), loc, rho, cfg)
  if kind == 'weight_diff':
    return baselines.budget_matched_mask(ref, weight_scores), weight_scores
  rnd = localize.random_scores({s: np.shape(m) for s, m in ref.items()},
                               seed)
  return baselines.budget_matched_mask(ref, rnd), rnd


class Builder:
  """Builds candidates' params for one job from the converted models."""

  def __init__(self, plan: jobs_lib.Plan, job: jobs_lib.Job,
               convert_dir: str, localize_dir: str, mesh=None):
    self.plan, self.job = plan, job
    self.mesh = mesh  # models are restored onto it (None: one device)
    self.convert_dir, self.localize_dir = convert_dir, localize_dir
    self._models: dict[str, Any] = {}
    self.cfg = None
    self._scores = {}

  def params(self, name: str):
    """The converted params of model `name` (loaded once)."""
    if name not in self._models:
      cfg, p = models_io.load_model(os.path.join(self.convert_dir, name),
                                    mesh=self.mesh)
      self.cfg = self.cfg or cfg
      self._models[name] = p
    return self._models[name]

  def config(self):
    """The job's ModelConfig (read from the base's small config files: no
    weights are loaded for it)."""
    if self.cfg is None:
      self.cfg = models_io.load_config(
          os.path.join(self.convert_dir, self.job.base))
    return self.cfg

  def pair_scores(self, k: int):
    """(`{score: scores}`, weight scores) of the job's k-th pair."""
    if k not in self._scores:
      pair = self.job.pairs[k]
      path = scores_path(self.localize_dir, self.job.name, pair.ability)
      act = {s: stats_io.load_scores(path, s) for s in self.plan.scores}
      self._scores[k] = (act, stats_io.load_scores(path, 'weight_diff'))
    return self._scores[k]

  def masks(self, cand: Candidate):
    """Per pair (mask, scores) of a channel candidate."""
    out = []
    for k in range(len(self.job.pairs)):
      act, wd = self.pair_scores(k)
      out.append(channel_masks(cand.kind, cand.score, cand.rho,
                               act_scores=act, weight_scores=wd,
                               loc=self.plan.localize, cfg=self.config(),
                               seed=cand.seed + k))
    return out

  def train_mask(self, cand: Candidate) -> masks_lib.Mask:
    """The channels the candidate's fine-tune may move (union over pairs)."""
    mask = None
    for m, _ in self.masks(cand):
      mask = m if mask is None else masks_lib.union(mask, m)
    return mask

  def build(self, cand: Candidate):
    """The candidate's params before any fine-tune."""
    fn = REGISTRY.get(cand.kind)
    if fn is None:
      raise KeyError(f'unknown candidate kind {cand.kind!r}; known: '
                     f'{", ".join(sorted(REGISTRY))}')
    return fn(self, cand)


# --------------------------------------------------------------- registry


def _channels(b: Builder, cand: Candidate):
  tr, job = b.plan.transfer, b.job
  found = b.masks(cand)
  if job.kind == 'recover':
    p = job.pairs[0]
    return transfer.transplant_channels(b.params(p.target), b.params(p.source),
                                        found[0][0], alpha=tr.alpha)
  srcs = [b.params(p.source) for p in job.pairs]
  out, _ = transfer.merge(b.params(job.base), srcs, [m for m, _ in found],
                          [s for _, s in found], policy=tr.policy,
                          alpha=tr.alpha,
                          names=[p.source for p in job.pairs])
  return out


def _model(b: Builder, cand: Candidate):
  if cand.kind == 'model':
    return b.params(cand.model)
  pair = b.job.pairs[0]
  return b.params(pair.source if cand.kind == 'source' else pair.target)


def _whole(b: Builder, cand: Candidate):
  bl, job = b.plan.baselines, b.job
  if job.kind == 'recover':
    p = job.pairs[0]
    src, tgt = b.params(p.source), b.params(p.target)
    base, tasks = src, [tgt]  # the source as base, T's delta as the task
  else:
    srcs = [b.params(p.source) for p in job.pairs]
    base, tasks = b.params(job.base), srcs
  if cand.kind == 'linear':
    if job.kind == 'recover':
      return baselines.linear_interpolation(tgt, src, bl.interp_t)
    return baselines.average(tasks)
  if cand.kind == 'task_arithmetic':
    return baselines.task_arithmetic(base, tasks, bl.ta_lambda)
  if cand.kind == 'ties':
    return baselines.ties(base, tasks, bl.ties_density)
  return baselines.dare(base, tasks, bl.dare_drop, seed=cand.seed)


def _full_ft(b: Builder, cand: Candidate):
  del cand
  return b.params(b.job.pairs[0].target)


REGISTRY: dict[str, Callable[[Builder, Candidate], Any]] = {
    'act': _channels, 'random': _channels, 'weight_diff': _channels,
    'source': _model, 'target': _model, 'model': _model,
    'linear': _whole, 'task_arithmetic': _whole, 'ties': _whole,
    'dare': _whole, 'full_ft': _full_ft,
}
# Rows that are not whole-model kinds `sweep.candidates` may name.
_NOT_WHOLE = jobs_lib.SELECTORS + ('model',)


def whole_model_kinds() -> tuple[str, ...]:
  """What `sweep.candidates` may name: every registered row kind but the
  channel selectors (`sweep.selectors`) and the merge job's input models."""
  return tuple(k for k in REGISTRY if k not in _NOT_WHOLE)


def register(kind: str, build: Callable[[Builder, Candidate], Any]) -> None:
  """Adds a whole-model baseline: `build(builder, candidate)` returns the
  row's params (`builder.params(name)` loads a job model; the job's kind
  and pairs are `builder.job`). `sweep.candidates` may then name `kind`;
  its row is built, scored and reported like the built-in merges.

  Raises:
    ValueError when `kind` is taken.
  """
  if kind in REGISTRY:
    raise ValueError(f'candidate kind {kind!r} is registered already')
  REGISTRY[kind] = build
