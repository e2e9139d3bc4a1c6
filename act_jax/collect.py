"""`python -m act_jax.collect`: activation statistics of related models.

  python -m act_jax.collect --models=DIR1,DIR2 --probe=probe.jsonl \
      --out=stats/run [--template=qa --max_seq_len=256 --batch_size=8 ...]
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      launch/local_multiprocess.sh 2 act_jax.collect <flags>
A thin shell over `act.collect.collect_stats` (what the pipeline's collect
stage runs); flags are named as the config fields (`collect.*`, and the
ability's rendering fields). Writes an `io.stats` directory; every
`--save_every` batches the sums are checkpointed beside it (`OUT.ckpt`) and
a rerun resumes.
"""

from __future__ import annotations

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
from act_jax.io import models as models_io
from act_jax.io import stats as stats_io
from act_jax.model import capture
from act_jax.model import sharding
from act_jax.pipeline import jobs

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
  cli.define_section_flags(jobs.CollectConfig,
                           defaults={'max_seq_len': 256, 'dtype': ''})
  cli.define_section_flags(jobs.AbilityConfig, only=_RENDER,
                           defaults={'template': 'text'})


def run_cli(fl) -> str | None:
  """The CLI body; returns the statistics dir (process 0) or None."""
  for name in ('models', 'probe', 'out'):
    if not getattr(fl, name):
      raise jobs.ConfigError(f'--{name} is required')
  paths = list(fl.models)
  sites = [s.strip() for s in fl.sites.split(',')] if fl.sites else list(
      capture.OUTPUT_SITES)
  spec = capture.CaptureSpec(tuple(sites))
  tok_path = fl.tokenizer or paths[0]
  models_io.check_related(paths)
  tokenizer = models_io.load_tokenizer(tok_path)
  cfg0 = models_io.load_config(paths[0])
  models_io.check_tokenizer_fits(tokenizer, tok_path, cfg0)
  dcfg = data.DataConfig(
      path=fl.probe, split=fl.split, template=fl.template,
      text_field=fl.text_field, prompt_field=fl.prompt_field,
      response_field=fl.response_field, qa_format=fl.qa_format,
      max_seq_len=fl.max_seq_len, batch_size=fl.batch_size,
      pack=fl.probe_pack, loss_on=fl.count_tokens, overflow=fl.overflow,
      shuffle_seed=fl.shuffle_seed, limit=fl.num_probe)
  batches, info = data.load_batches(dcfg, tokenizer)
  mine = data.local_batches(batches, jax.process_index(), jax.process_count())
  cfg, params = models_io.load_related(paths, fl.dtype or None)

  rules = sharding.DEFAULT_RULES
  if fl.models_axis:
    rules = tuple((k, v) for k, v in rules if k != 'models') + (
        ('models', fl.models_axis),)
  mesh = sharding.make_mesh([int(s) for s in fl.mesh_shape])
  out = os.path.abspath(fl.out)
  ckpt_dir = out + '.ckpt' if fl.save_every else None
  fingerprint = {'models': [os.path.abspath(p) for p in paths], 'probe': info}
  t0 = time.time()
  flat = collect_lib.collect_stats(
      params, cfg, mine, spec, mesh=mesh, rules=rules, ckpt_dir=ckpt_dir,
      save_every=fl.save_every, num_batches=len(mine),
      models_per_pass=fl.models_per_pass, fingerprint=fingerprint,
      throttle_s=fl.throttle_s)
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
    result = stats_io.save_stats(out, flat, manifest)
    if ckpt_dir:
      atomic.remove_tree(ckpt_dir)
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
