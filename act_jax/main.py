"""act-jax entry point: run the ACT stages of a config into a workdir.

  python -m act_jax.main --config=configs/demo.py --workdir=/tmp/act_demo
  python -m act_jax.main --config=configs/recover.py \
      --config.models.source=/ckpt/a --config.models.target=/ckpt/b \
      --config.stages=collect,localize --workdir=/runs/x
Stages and artifacts: act_jax/pipeline.py and BUILD.md. A rerun skips the
completed stages and resumes a killed one.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from act_jax import distributed, pipeline, preflight, stages

_DEMO = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs', 'demo.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEMO, 'ml_collections config file (default: the demo).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (required).')


def run(config, workdir: str) -> dict:
  """Pre-flight, then the configured stages; returns completion records."""
  workdir = os.path.abspath(workdir)
  preflight.check_config(config)
  stage_list = pipeline.make_stages(config, workdir)
  only = pipeline.parse_list(config.stages)
  stages.check_plan(stage_list, workdir, only)  # missing inputs, by name
  models = {k: pipeline.resolve(v, workdir) for k, v in config.models.items()}
  needed = {k: models[k] for k in pipeline.needed_models(config)}
  builds = any(s.name == 'build_models' for s in stage_list)
  if not builds or stages.is_complete(workdir, 'build_models'):
    # Toy models and data are checked after building (convert re-checks).
    preflight.check_models(needed)
    abilities = {k: pipeline.resolve(v.to_dict(), workdir)
                 for k, v in config.abilities.items()}
    preflight.check_data(abilities, list(abilities))
  records = stages.run_stages(stage_list, workdir, only)
  results = os.path.join(workdir, 'report.md')
  if 'report' in records and os.path.isfile(results):
    with open(results) as f:
      print(f.read())
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if os.environ.get('ACT_JAX_AUTO_DISTRIBUTED') == '1':
    jax.distributed.initialize()  # TPU pods / SLURM: detected from the env
  else:
    distributed.maybe_initialize()
  logging.info('JAX %s: process %d/%d, %d local / %d global devices: %s',
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices())
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
