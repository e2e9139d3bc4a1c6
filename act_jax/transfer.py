"""`python -m act_jax.transfer`: transplant, merge or baseline-merge models.

  python -m act_jax.transfer --target=DIR --source=DIR[,DIR...] \
      --masks=DIR[,DIR...] --out=DIR [--hf_out=DIR --policy=average \
      --alpha=1.0 --include=REGEX,... --unit=channel]
  python -m act_jax.transfer --method=ties --target=BASE \
      --source=A,B,C --hf_out=DIR [--ties_density=0.2]
--method=act (default): one source transplants its masked channels into
the target; several sources (one mask dir each) merge into the target,
conflicts resolved by --policy (the report goes into the output's meta).
--method=linear | task_arithmetic | ties | dare: the whole-model baselines
with the target as the base (the config's `baselines.*` fields as flags;
linear with one source is (1 - interp_t) target + interp_t source).

Out of core: when the target and every source are HF checkpoints and only
--hf_out is asked for, `act.stream.transfer_checkpoints` reads one tensor
at a time from every input and writes the output shards as it goes (peak
memory about one tensor per input, not a model). Otherwise (a converted
params dir in or out) models load whole with `io.models.load_model` and
`act.transfer` / `act.baselines` run on the trees: the same arithmetic.
`--alpha` and `--policy` are the config's `transfer.*` fields.

Checks before loading weights: --alpha is a finite number in [0, 1]; the
outputs do not exist (or, with --overwrite, are act-jax's own params / HF
exports, never an input such as --target); they can be written and have
room; every mask dir's model_config matches the target's architecture, its
sites are known, and (unless --allow_other_models) the stats' source/target
paths recorded in the mask are the checkpoints given. The outputs are locked
for the run.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from absl import flags
from absl import logging

from act_jax import cli
from act_jax.act import baselines
from act_jax.act import masks as masks_lib
from act_jax.act import stream
from act_jax.act import transfer
from act_jax.io import card
from act_jax.io import hf
from act_jax.io import models as models_io
from act_jax.io import params as params_io
from act_jax.io import atomic
from act_jax.model.config import ModelConfig
from act_jax.pipeline import jobs
from act_jax.pipeline import preflight


def define_flags() -> None:
  """The CLI's flags (its own first; `transfer.*` config-field names)."""
  f = flags
  f.DEFINE_enum('method', 'act', stream.METHODS, 'act: the masks\' '
                'channels; the others: whole-model baselines.')
  f.DEFINE_string('target', None, 'Model receiving the channels (or the base '
                  'of a merge): params dir or HF dir.')
  f.DEFINE_list('source', None, 'Source model dir(s), one per mask dir.')
  f.DEFINE_list('masks', None, 'Mask dir(s) from act_jax.localize; one, or '
                'one per source (--method=act).')
  f.DEFINE_string('out', None, 'Output params dir (optional with --hf_out).')
  f.DEFINE_integer('max_shard_bytes', 2**30, 'Largest output safetensors '
                   'shard, bytes.', lower_bound=1)
  f.DEFINE_string('hf_out', None, 'Optional HF checkpoint output dir.')
  f.DEFINE_list('include', [], 'Regexes of whole leaves to transfer too '
                '(e.g. "norm.scale", "embed_tokens.*"); default none.')
  f.DEFINE_enum('unit', 'channel', masks_lib.UNITS,
                'Grow masks to whole neurons / heads before transfer.')
  f.DEFINE_list('priority', None, 'Source indices, most important first '
                '(--policy=priority).')
  f.DEFINE_bool('allow_other_models', False, 'Skip the check that the masks '
                'were localized on these very checkpoints.')
  cli.define_output_flags()
  cli.define_section_flags(jobs.TransferConfig)
  cli.define_section_flags(jobs.BaselinesConfig)


def _arch(d: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in d.items() if k not in models_io.ARCH_IGNORED}


def check_mask_meta(meta: dict[str, Any], mask_dir: str, cfg: ModelConfig,
                    source: str, target: str, check_paths: bool) -> None:
  """Raises TransferError when a mask does not belong to these checkpoints."""
  mc = meta.get('model_config')
  if mc is None:
    raise transfer.TransferError(f'{mask_dir}/meta.json has no model_config')
  want, got = _arch(cfg.to_dict()), _arch(mc)
  diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
  if diff:
    raise transfer.TransferError(
        f'{mask_dir}: masks are for a different architecture than {target}: '
        + ', '.join(f'{k}={got.get(k)!r} vs {want.get(k)!r}' for k in diff))
  if not check_paths:
    return
  for role, given in (('source', source), ('target', target)):
    rec = meta.get(f'{role}_path')
    if rec and os.path.realpath(rec) != os.path.realpath(given):
      raise transfer.TransferError(
          f'{mask_dir}: masks were localized with {role} {rec}, but '
          f'--{role}={given} (pass --allow_other_models to override)')


def _is_hf(path: str) -> bool:
  return os.path.isfile(os.path.join(path, 'config.json'))


def _baseline_kwargs(fl) -> dict[str, Any]:
  """lam / density / drop / seed of a baseline, as the pipeline sets them."""
  return {'lam': fl.ta_lambda if fl.method == 'task_arithmetic' else 1.0,
          'density': fl.ties_density, 'drop': fl.dare_drop, 'seed': fl.seed}


def _in_memory_baseline(fl, target, src_params):
  kw = _baseline_kwargs(fl)
  if fl.method == 'linear':
    if len(src_params) == 1:
      return baselines.linear_interpolation(target, src_params[0],
                                            fl.interp_t)
    return baselines.average(src_params)
  if fl.method == 'task_arithmetic':
    return baselines.task_arithmetic(target, src_params, kw['lam'])
  if fl.method == 'ties':
    return baselines.ties(target, src_params, kw['density'])
  return baselines.dare(target, src_params, kw['drop'], seed=kw['seed'])


def run_cli(fl) -> str:
  """Runs the CLI with parsed flags `fl`; returns the output dir."""
  needed = ('target', 'source') + (('masks',) if fl.method == 'act' else ())
  for name in needed:
    if not getattr(fl, name):
      raise transfer.TransferError(f'--{name} is required')
  if not fl.out and not fl.hf_out:
    raise transfer.TransferError('--out or --hf_out is required')
  sources = list(fl.source)
  mask_dirs = list(fl.masks or []) if fl.method == 'act' else []
  if fl.method == 'act':
    if len(mask_dirs) == 1 and len(sources) > 1:
      mask_dirs *= len(sources)
    if len(mask_dirs) != len(sources):
      raise transfer.TransferError(f'--masks has {len(mask_dirs)} dirs for '
                                   f'{len(sources)} --source dirs')
  preflight.check_ranges('transfer', {'alpha': fl.alpha}, prefix='--')
  preflight.check_ranges('baselines', {
      'interp_t': fl.interp_t, 'ties_density': fl.ties_density,
      'dare_drop': fl.dare_drop}, prefix='--')
  ins = [fl.target, *sources, *mask_dirs]
  outs = {}
  if fl.out:
    outs['--out'] = atomic.check_output(fl.out, 'params',
                                        overwrite=fl.overwrite, inputs=ins)
  if fl.hf_out:
    outs['--hf_out'] = atomic.check_output(
        fl.hf_out, 'hf', overwrite=fl.overwrite, inputs=ins, flag='--hf_out')
  if len(outs) == 2:
    a, b = (os.path.realpath(o) for o in outs.values())
    if a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep):
      raise atomic.OutputError(
          f'--out={fl.out} and --hf_out={fl.hf_out} overlap: give two '
          'separate folders (params dir and HF dir)')
  cfg = models_io.load_config(fl.target, fl.follow_symlinks)
  for flag, out in outs.items():
    preflight.check_output_space(out, preflight.params_bytes(cfg), flag)
  with contextlib.ExitStack() as locks:
    for out in outs.values():
      locks.enter_context(atomic.output_lock(out))
    return _transfer(fl, sources, mask_dirs)


def _transfer(fl, sources, mask_dirs) -> str:
  """Loads, transplants or merges, writes; under the outputs' locks."""
  follow = fl.follow_symlinks
  loaded = [masks_lib.load_masks(d) for d in mask_dirs]
  # Architecture and provenance checks before any weights are read.
  cfg = models_io.load_config(fl.target, follow)
  for (_, meta), d, s in zip(loaded, mask_dirs, sources):
    check_mask_meta(meta, d, cfg, s, fl.target, not fl.allow_other_models)
  chan_masks = [masks_lib.couple(m, cfg, fl.unit) for m, _ in loaded]
  scores = None
  if fl.method == 'act' and fl.policy == 'max_score':
    scores = [masks_lib.load_mask_scores(d) for d in mask_dirs]
  priority = [int(x) for x in fl.priority] if fl.priority else None
  names = [os.path.basename(os.path.normpath(s)) for s in sources]
  meta_out: dict[str, Any] = {'target': os.path.abspath(fl.target),
                              'sources': [os.path.abspath(s) for s in sources],
                              'masks': [os.path.abspath(d) for d in mask_dirs],
                              'method': fl.method, 'alpha': fl.alpha,
                              'unit': fl.unit, 'include': list(fl.include)}
  if not fl.out and all(_is_hf(d) for d in [fl.target] + sources):
    stream.transfer_checkpoints(
        fl.method, fl.target, sources, fl.hf_out, masks=chan_masks,
        scores=scores, policy=fl.policy, alpha=fl.alpha,
        include=fl.include, names=names, priority=priority,
        interp_t=fl.interp_t, meta=meta_out,
        max_shard_bytes=fl.max_shard_bytes, overwrite=fl.overwrite,
        follow_symlinks=follow, **_baseline_kwargs(fl))
    return fl.hf_out
  cfg, target = models_io.load_model(fl.target, follow_symlinks=follow)
  src_params = []
  for s in sources:
    scfg, p = models_io.load_model(s, follow_symlinks=follow)
    if _arch(scfg.to_dict()) != _arch(cfg.to_dict()):
      raise transfer.TransferError(f'--source={s} has a different '
                                   f'architecture than --target={fl.target}')
    transfer.check_compatible(target, p, f'--source={s}')
    src_params.append(p)
  if fl.method != 'act':
    params = _in_memory_baseline(fl, target, src_params)
  elif len(sources) == 1:
    params = transfer.transplant_channels(target, src_params[0],
                                          chan_masks[0], fl.alpha,
                                          include=fl.include)
    meta_out['channels'] = masks_lib.count(chan_masks[0])
  else:
    params, report = transfer.merge(
        target, src_params, chan_masks, scores, fl.policy, fl.alpha,
        names=names, priority=priority, include=fl.include)
    meta_out['merge_report'] = report
    logging.info('merged %d sources: %d conflicting channels (%s)',
                 len(sources), report['num_conflicts'], fl.policy)
  tok = fl.target if models_io.has_tokenizer(fl.target) else None
  if fl.out:
    params_io.save_params_dir(fl.out, params, cfg, tokenizer_dir=tok,
                              meta=meta_out, overwrite=fl.overwrite,
                              follow_symlinks=follow)
  if fl.hf_out:
    if _is_hf(fl.target):
      hf_cfg = hf.read_hf_config_dict(fl.target, follow)
    else:
      hf_cfg = params_io.load_hf_config_dict(fl.target)
    notes = (f'`{fl.method}` of {", ".join(f"`{s}`" for s in meta_out["sources"])}'
             f' into `{meta_out["target"]}` (act_jax.transfer).')
    hf.save_hf(params, cfg, fl.hf_out, hf_config=hf_cfg,
               tokenizer_dir=tok, model_card=card.short_card(cfg, params,
                                                             notes),
               max_shard_bytes=fl.max_shard_bytes,
               overwrite=fl.overwrite, follow_symlinks=follow)
  return fl.out or fl.hf_out


def main(argv):
  if len(argv) > 1:
    raise transfer.TransferError(f'unexpected arguments {argv[1:]}')
  run_cli(flags.FLAGS)


def console():
  """The `act-jax-transfer` console script."""
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  console()
