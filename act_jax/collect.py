"""`python -m act_jax.collect`: activation statistics of related models.

  python -m act_jax.collect --models=DIR1,DIR2 --probe=probe.jsonl \
      --out=stats/run [--template=qa --max_seq_len=256 --batch_size=8 ...]
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      launch/local_multiprocess.sh 2 act_jax.collect <flags>
A thin shell over `act.collect.collect_stats` (what the pipeline's collect
stage runs); flags are named as the config fields (`collect.*`, and the
ability's rendering fields). Writes an `io.stats` directory; every
`--save_every` batches the sums are checkpointed beside it (`OUT.ckpt`) and
a rerun resumes, unless a model or the probe file changed since (checked by
content: `io.models.model_fingerprint`, `io.inputs.data_fingerprint`), which
is an error naming the file; `--restart` discards the checkpoint instead.

Before any heavy work: numeric flags are range-checked, `--out` must not
exist (or, with `--overwrite`, must be act-jax statistics, never one of the
`--models` or a folder holding the probe), an `OUT.ckpt` must be act-jax's,
the output folder must be writable with room for the artifact, and the
output is locked (`.OUT.lock`) for the whole run, so a second run to the
same output fails at once naming the first one's pid.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

from absl import flags
from absl import logging
import jax

import act_jax
from act_jax import cli
from act_jax import data
from act_jax import distributed
from act_jax.act import collect as collect_lib
from act_jax.io import atomic
from act_jax.io import inputs
from act_jax.io import models as models_io
from act_jax.io import stats as stats_io
from act_jax.model import capture
from act_jax.model import sharding
from act_jax.pipeline import jobs
from act_jax.pipeline import preflight

CKPT_KIND = 'collect-checkpoint'

_RENDER = ('template', 'qa_format', 'text_field', 'prompt_field',
           'response_field', 'probe_pack')


def define_flags() -> None:
  """The CLI's flags (its own first; config-field names)."""
  flags.DEFINE_list('models', None, 'Comma-separated model dirs (HF or params).')
  flags.DEFINE_string('probe', None, 'Probe set: jsonl/json/parquet/txt file, '
                      'saved dataset dir, or Hub name.')
  flags.DEFINE_string('out', None, 'Output statistics directory.')
  flags.DEFINE_string('tokenizer', None, 'Tokenizer dir (default: the first '
                      'model).')
  flags.DEFINE_string('split', 'train', 'Dataset split (dirs and Hub names).')
  flags.DEFINE_enum('overflow', 'truncate', ['truncate', 'chunk', 'error'],
                    'Texts longer than max_seq_len: truncate (counted), '
                    'chunk or fail.')
  flags.DEFINE_list('mesh_shape', ['-1', '1', '1'], 'Mesh (data, fsdp, '
                    'tensor).')
  flags.DEFINE_string('models_axis', None, 'Mesh axis to shard the models '
                      'axis over (e.g. tensor) when K models do not fit one '
                      'device.')
  flags.DEFINE_integer('models_per_pass', 0, '0 = all models in one pass; 2 = '
                       'run each pair separately and combine.')
  flags.DEFINE_float('throttle_s', 0.0, 'Sleep after each batch (testing '
                     'resume on a fast machine; sharing a busy one).')
  flags.DEFINE_integer('shuffle_seed', None, 'Shuffle records with this seed.')
  cli.define_output_flags(restart=True)
  cli.define_section_flags(jobs.CollectConfig,
                           defaults={'max_seq_len': 256, 'dtype': ''})
  cli.define_section_flags(jobs.AbilityConfig, only=_RENDER,
                           defaults={'template': 'text'})


def _check_flags(fl) -> None:
  """Required flags and numeric ranges, before anything is read."""
  for name in ('models', 'probe', 'out'):
    if not getattr(fl, name):
      raise jobs.ConfigError(f'--{name} is required')
  preflight.check_ranges('collect', {
      f.name: getattr(fl, f.name) for f in dataclasses.fields(
          jobs.CollectConfig)}, prefix='--')
  if fl.models_per_pass not in (0, 2):
    raise jobs.ConfigError(f'--models_per_pass={fl.models_per_pass}: '
                           'expected 0 (all models at once) or 2 (pairs)')
  if not (math.isfinite(fl.throttle_s) and fl.throttle_s >= 0):
    raise jobs.ConfigError(f'--throttle_s={fl.throttle_s}: expected >= 0')


def run_cli(fl) -> str | None:
  """The CLI body; returns the statistics dir (process 0) or None."""
  _check_flags(fl)
  paths = list(fl.models)
  tok_path = fl.tokenizer or paths[0]
  out = atomic.check_output(fl.out, 'stats', overwrite=fl.overwrite,
                            inputs=paths + [fl.probe, tok_path])
  ckpt_dir = out + '.ckpt' if fl.save_every else None
  if ckpt_dir and os.path.lexists(ckpt_dir):
    # Resumed or discarded, it must be one this CLI wrote.
    atomic.check_replaceable(ckpt_dir, CKPT_KIND, f'{ckpt_dir} (the resume '
                             'checkpoint of --out)')
  preflight.check_output_space(out, 0, '--out')  # the room: once sized
  with atomic.output_lock(out):
    return _collect(fl, paths, tok_path, out, ckpt_dir)


def _collect(fl, paths, tok_path, out, ckpt_dir) -> str | None:
  """Checks the inputs, collects, writes; under the output's lock."""
  follow = fl.follow_symlinks
  sites = [s.strip() for s in fl.sites.split(',')] if fl.sites else list(
      capture.OUTPUT_SITES)
  spec = capture.CaptureSpec(tuple(sites))
  models_io.check_related(paths, follow_symlinks=follow)
  tokenizer = models_io.load_tokenizer(tok_path)
  cfg0 = models_io.load_config(paths[0], follow)
  models_io.check_tokenizer_fits(tokenizer, tok_path, cfg0)
  need = preflight.stats_bytes(cfg0, spec.sites, len(paths))
  preflight.check_output_space(out, need * (3 if ckpt_dir else 1), '--out')
  dcfg = data.DataConfig(
      path=fl.probe, split=fl.split, template=fl.template,
      text_field=fl.text_field, prompt_field=fl.prompt_field,
      response_field=fl.response_field, qa_format=fl.qa_format,
      max_seq_len=fl.max_seq_len, batch_size=fl.batch_size,
      pack=fl.probe_pack, loss_on=fl.count_tokens, overflow=fl.overflow,
      shuffle_seed=fl.shuffle_seed, limit=fl.num_probe)
  batches, info = data.load_batches(dcfg, tokenizer)
  mine = data.local_batches(batches, jax.process_index(), jax.process_count())
  # What a resume must find unchanged, by content (paths may move).
  fingerprints = {p: models_io.model_fingerprint(p, follow) for p in paths}
  fingerprints[fl.probe] = inputs.data_fingerprint(fl.probe)
  if tok_path not in fingerprints:
    fingerprints[tok_path] = models_io.tokenizer_files_fingerprint(
        tok_path, follow)
  if ckpt_dir and distributed.is_primary():
    if fl.restart and os.path.lexists(ckpt_dir):
      logging.info('discarding %s (--restart)', ckpt_dir)
      atomic.remove_artifact(ckpt_dir, CKPT_KIND)
    atomic.make_artifact_dir(ckpt_dir, CKPT_KIND)
  distributed.barrier('act_jax.collect checkpoint dir')
  cfg, params = models_io.load_related(paths, fl.dtype or None,
                                       follow_symlinks=follow)

  rules = sharding.DEFAULT_RULES
  if fl.models_axis:
    rules = tuple((k, v) for k, v in rules if k != 'models') + (
        ('models', fl.models_axis),)
  mesh = sharding.make_mesh([int(s) for s in fl.mesh_shape])
  fingerprint = {'probe': info}
  t0 = time.time()
  flat = collect_lib.collect_stats(
      params, cfg, mine, spec, mesh=mesh, rules=rules, ckpt_dir=ckpt_dir,
      save_every=fl.save_every, num_batches=len(mine),
      models_per_pass=fl.models_per_pass, fingerprint=fingerprint,
      inputs=fingerprints, throttle_s=fl.throttle_s)
  seconds = time.time() - t0
  manifest = stats_io.make_manifest(
      paths, cfg, spec.sites, info, flat,
      tokenizer=os.path.abspath(tok_path),
      num_truncated=info['num_truncated'], max_seq_len=dcfg.max_seq_len,
      batch_size=dcfg.batch_size * jax.process_count(),
      capture={'count_tokens': dcfg.loss_on,
               'models_per_pass': fl.models_per_pass,
               'mesh_shape': dict(mesh.shape),
               'process_count': jax.process_count()},
      seconds=round(seconds, 3), act_jax_version=act_jax.__version__)
  result = None
  if distributed.is_primary():
    result = stats_io.save_stats(out, flat, manifest, overwrite=fl.overwrite)
    if ckpt_dir:
      atomic.remove_artifact(ckpt_dir, CKPT_KIND)
    logging.info('wrote %s (%d tokens, %d truncated texts, %.1fs)', out,
                 manifest['num_tokens'], info['num_truncated'], seconds)
  distributed.barrier('act_jax.collect done')
  return result


def main(argv):
  if len(argv) > 1:
    raise jobs.ConfigError(f'unexpected arguments {argv[1:]}')
  distributed.maybe_initialize()
  run_cli(flags.FLAGS)


def console():
  """The `act-jax-collect` console script."""
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  console()
