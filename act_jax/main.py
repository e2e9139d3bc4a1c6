"""act-jax entry point: run the ACT stages of a config into a workdir.

  python -m act_jax.main --config=configs/demo.py --workdir=/tmp/act_demo
  python -m act_jax.main --config=configs/recover.py \
      --config.models.source=/ckpt/a --config.models.target=/ckpt/b \
      --config.stages=collect,localize --workdir=/runs/x
Stages and artifacts: act_jax/pipeline/stages.py and BUILD.md. A rerun
skips the completed stages and resumes a killed one.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from act_jax import cli
from act_jax import distributed
from act_jax.pipeline import run

_DEMO = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs', 'demo.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEMO, 'ml_collections config file (default: the demo).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (required).')
_HELP_CONFIG = flags.DEFINE_bool(
    'help_config', False, 'List every config field with its default and '
    'help, then exit.')


def _config():
  """The loaded config; a missing or broken config file is one line."""
  path = flags.FLAGS['config'].serialize().split('=', 1)[-1].split(':')[0]
  if path and not os.path.isfile(path):
    raise app.UsageError(f'--config={path}: no such file (a config is a '
                         'Python file, e.g. configs/demo.py[:size])')
  try:
    config = _CONFIG.value
    list(config.keys())  # a lazy proxy: a failed load raises only on use
    return config
  except (OSError, AttributeError, KeyError, SyntaxError) as e:
    raise app.UsageError(
        f'--config: cannot load the config file ({cli.one_line(e)[:300]})'
    ) from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if _HELP_CONFIG.value:
    print(cli.config_help())
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required (the run\'s output folder)')
  config = _config()  # before any JAX work: a bad file is one line
  distributed.maybe_initialize()
  logging.info('JAX %s: process %d/%d, %d local / %d global devices',
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  run.run_pipeline(config, _WORKDIR.value)


def console():
  """The `act-jax` console script."""
  cli.run(main)


if __name__ == '__main__':
  console()
