"""The pipeline's entry: config -> plan -> pre-flight -> stages -> runner."""

from __future__ import annotations

import os

from absl import logging

from act_jax import distributed
from act_jax.pipeline import jobs
from act_jax.pipeline import preflight
from act_jax.pipeline import runner
from act_jax.pipeline import stages


def run_pipeline(config, workdir: str) -> dict[str, dict]:
  """Runs the configured stages of `config` into `workdir`.

  Everything that can be checked before heavy work is: the config (keys,
  values and ranges, cross references), the mesh (`config.mesh_shape`
  against the devices and the batch sizes), the stage plan (missing
  inputs), the models (architecture, tokenizer, dimensions the mesh divides;
  after the case build when there is one), the data files, and that the
  workdir can be written and has room. `config.overwrite` recomputes
  completed stages whose config, code or inputs changed; `config.restart`
  discards interrupted stages' work.

  Returns:
    `{stage: completion record}`.
  """
  workdir = os.path.abspath(workdir)
  plan = jobs.plan_from_config(config, workdir)
  preflight.check_plan(plan)
  # The one mesh of the run (config.mesh_shape), built once: every stage
  # but the case build runs on it.
  mesh = preflight.check_mesh(plan)
  stage_list = stages.make_stages(plan, mesh)
  runner.check_plan(stage_list, workdir, plan.stages)
  cfgs = {}
  if not plan.case or runner.is_complete(workdir, 'build_models'):
    # A case's models and data only exist after its build (convert checks
    # the models again).
    cfgs = preflight.check_models(plan, mesh)
    preflight.check_data(plan)
  preflight.check_workdir(plan, workdir, [s.name for s in stage_list], cfgs)
  records = runner.run_stages(stage_list, workdir, plan.stages,
                              overwrite=plan.overwrite, restart=plan.restart)
  report = os.path.join(workdir, 'report.md')
  if 'report' in records and os.path.isfile(report) and (
      distributed.is_primary()):
    with open(report, encoding='utf-8') as f:
      logging.info('report: %s', report)
      print(f.read())
  return records
