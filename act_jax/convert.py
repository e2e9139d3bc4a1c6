"""Command line: HF checkpoint dir <-> act-jax params dir.

  python -m act_jax.convert --hf_dir=IN --params_dir=OUT \
      [--param_dtype=bfloat16]
  python -m act_jax.convert --to_hf --params_dir=IN --hf_dir=OUT \
      [--max_shard_bytes=1073741824]

HF -> params reads config.json + safetensors strictly (see hf.py) and
writes model_config.json, hf_config.json, tokenizer files and an orbax
`params/` checkpoint. --to_hf writes sharded safetensors, config.json (the
source config.json's other fields kept), tokenizer files and a README.md.
Outputs appear atomically: on any error no output directory is left behind.
An existing output is an error unless --overwrite, and even then only an
act-jax params dir / HF export of the same kind is replaced; the output is
locked for the run and checked for room first. Checkpoint files that are
symlinks resolving outside the checkpoint are refused unless
--follow_symlinks (the HF hub cache's snapshots/ -> blobs/ layout needs it);
an export drops `auto_map` (code references) from config.json and
tokenizer_config.json.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
from absl import logging

from act_jax import cli
from act_jax.io import atomic
from act_jax.io import card
from act_jax.io import hf
from act_jax.io import models as models_io
from act_jax.io import params as params_io
from act_jax.model.config import ModelConfig
from act_jax.pipeline import preflight

_HF_DIR = flags.DEFINE_string('hf_dir', None, 'HF checkpoint directory '
                              'or Hub id org/name (input), or output '
                              'directory with --to_hf.')
_PARAMS_DIR = flags.DEFINE_string('params_dir', None, 'act-jax params '
                                  'directory (output, or input with --to_hf).')
_TO_HF = flags.DEFINE_bool('to_hf', False, 'Convert params_dir -> hf_dir '
                           'instead of hf_dir -> params_dir.')
_PARAM_DTYPE = flags.DEFINE_enum(
    'param_dtype', None, ['float32', 'bfloat16', 'float16'],
    'Dtype of the written params; default: the input checkpoint\'s dtype.')
_MAX_SHARD_BYTES = flags.DEFINE_integer(
    'max_shard_bytes', 2**30, 'With --to_hf: largest safetensors shard, '
    'bytes.', lower_bound=1)
cli.define_output_flags()
_OVERWRITE = flags.FLAGS['overwrite']
_FOLLOW = flags.FLAGS['follow_symlinks']


def convert_hf_to_params(hf_dir: str, params_dir: str, *,
                         param_dtype: str | None = None,
                         overwrite: bool = False,
                         follow_symlinks: bool = False) -> ModelConfig:
  """HF checkpoint dir -> params dir (all checks happen before writing)."""
  params_dir = atomic.check_output(params_dir, 'params', overwrite=overwrite,
                                   inputs=[hf_dir], flag='--params_dir')
  start = time.time()
  hf_config = hf.read_hf_config_dict(hf_dir, follow_symlinks)
  cfg = hf.load_hf_config(hf_dir, param_dtype=param_dtype or
                          hf.checkpoint_dtype(hf_config),
                          follow_symlinks=follow_symlinks)
  preflight.check_output_space(params_dir, preflight.params_bytes(cfg),
                               '--params_dir')
  with atomic.output_lock(params_dir):
    cfg, params = hf.load_hf_params(hf_dir, param_dtype=param_dtype,
                                    follow_symlinks=follow_symlinks)
    params_io.save_params_dir(
        params_dir, params, cfg, tokenizer_dir=hf_dir, hf_config=hf_config,
        meta={'source': os.path.abspath(hf_dir), 'format': 'hf'},
        overwrite=overwrite, follow_symlinks=follow_symlinks)
  logging.info('converted %s -> %s in %.1f s', hf_dir, params_dir,
               time.time() - start)
  return cfg


def convert_params_to_hf(params_dir: str, hf_dir: str, *,
                         param_dtype: str | None = None,
                         max_shard_bytes: int = 2**30,
                         overwrite: bool = False,
                         follow_symlinks: bool = False) -> ModelConfig:
  """Params dir -> HF checkpoint dir loadable by transformers."""
  hf_dir = atomic.check_output(hf_dir, 'hf', overwrite=overwrite,
                               inputs=[params_dir], flag='--hf_dir')
  start = time.time()
  preflight.check_output_space(
      hf_dir, preflight.params_bytes(params_io.load_model_config(params_dir),
                                     param_dtype), '--hf_dir')
  with atomic.output_lock(hf_dir):
    cfg, params = params_io.load_params_dir(
        params_dir, param_dtype=param_dtype, follow_symlinks=follow_symlinks)
    hf.save_hf(params, cfg, hf_dir,
               hf_config=params_io.load_hf_config_dict(params_dir),
               tokenizer_dir=params_dir, model_card=card.short_card(
                   cfg, params, f'Converted from the act-jax params dir '
                   f'`{os.path.abspath(params_dir)}`.'),
               max_shard_bytes=max_shard_bytes,
               overwrite=overwrite, follow_symlinks=follow_symlinks)
  logging.info('converted %s -> %s in %.1f s', params_dir, hf_dir,
               time.time() - start)
  return cfg


def _check_flags() -> tuple[str, str]:
  """(input, output) directories, or app.UsageError naming the flag."""
  for flag in (_HF_DIR, _PARAMS_DIR):
    if not flag.value:
      raise app.UsageError(f'--{flag.name} is required')
  src, dst = ((_PARAMS_DIR, _HF_DIR) if _TO_HF.value else
              (_HF_DIR, _PARAMS_DIR))
  # An input --hf_dir may be a Hub id (org/name): its local snapshot.
  where = src.value if _TO_HF.value else models_io.resolve_model(src.value)
  if not os.path.isdir(where):
    raise app.UsageError(f'--{src.name}={src.value}: not a directory')
  if os.path.abspath(where) == os.path.abspath(dst.value):
    raise app.UsageError(f'--{dst.name} must differ from --{src.name}')
  try:
    atomic.check_output(dst.value, 'hf' if _TO_HF.value else 'params',
                        overwrite=_OVERWRITE.value, inputs=[where],
                        flag=f'--{dst.name}')
  except atomic.OutputError as e:
    raise app.UsageError(str(e)) from None
  return where, dst.value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  src, dst = _check_flags()
  if _TO_HF.value:
    convert_params_to_hf(src, dst, param_dtype=_PARAM_DTYPE.value,
                         max_shard_bytes=_MAX_SHARD_BYTES.value,
                         overwrite=_OVERWRITE.value,
                         follow_symlinks=_FOLLOW.value)
  else:
    convert_hf_to_params(src, dst, param_dtype=_PARAM_DTYPE.value,
                         overwrite=_OVERWRITE.value,
                         follow_symlinks=_FOLLOW.value)


def console():
  """The `act-jax-convert` console script."""
  cli.run(main)


if __name__ == '__main__':
  console()
