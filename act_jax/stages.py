"""The stage runner: ordered stages, atomic outputs, skip-when-complete.

Each stage writes under `workdir/<stage>/`. While it runs it writes into
`workdir/<stage>.partial/` (a stage may keep resumable sub-artifacts there:
`StageContext.sub_done` / `sub_dir`); on success it writes `COMPLETE.json`
(time, wall seconds, the stage's config snapshot) and renames the folder to
`workdir/<stage>/`. So a finished stage is skipped on rerun, a killed stage
resumes from its finished sub-artifacts, and nothing half-written ever sits
under a final name. A rerun whose config snapshot differs from the one a
completed stage recorded fails by name instead of silently reusing it.

A subset (`only=('collect', 'localize')`) runs just those stages; each input
stage they need must already be complete, else `StageError` names the
missing folders before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Sequence

from absl import logging

MARKER = 'COMPLETE.json'


class StageError(RuntimeError):
  """A stage that cannot run (missing inputs, config drift, unknown name)."""


@dataclasses.dataclass
class StageContext:
  """What a stage body sees: where to write and where its inputs are."""
  workdir: str
  name: str
  out_dir: str  # the `.partial` folder; renamed to the final one on success

  def input_dir(self, stage: str) -> str:
    """The completed output folder of an earlier stage."""
    return stage_dir(self.workdir, stage)

  def sub_dir(self, sub: str) -> str:
    """Final path of a resumable sub-artifact inside this stage's output."""
    return os.path.join(self.out_dir, sub)

  def sub_done(self, sub: str) -> bool:
    """Whether a sub-artifact was finished by this or an earlier attempt."""
    return os.path.exists(self.sub_dir(sub))


@dataclasses.dataclass(frozen=True)
class Stage:
  """A named step: `run(ctx) -> summary dict` plus the stages it reads."""
  name: str
  run: Callable[[StageContext], Any]
  inputs: tuple[str, ...] = ()
  snapshot: Any = None  # JSON-able config the stage depends on (drift check)


def stage_dir(workdir: str, name: str) -> str:
  """`workdir/<name>`: where a completed stage's artifacts live."""
  return os.path.join(workdir, name)


def is_complete(workdir: str, name: str) -> bool:
  """True when `workdir/<name>/COMPLETE.json` exists."""
  return os.path.isfile(os.path.join(stage_dir(workdir, name), MARKER))


def read_marker(workdir: str, name: str) -> dict[str, Any]:
  """The completion record of a finished stage."""
  with open(os.path.join(stage_dir(workdir, name), MARKER)) as f:
    return json.load(f)


def check_plan(stages: Sequence[Stage], workdir: str,
               only: Sequence[str] | None) -> list[Stage]:
  """The stages to consider, validated before any runs.

  Raises:
    StageError: an unknown stage name in `only`, or a selected stage whose
      input stage is neither selected nor complete (names its folder).
  """
  names = [s.name for s in stages]
  if only:
    unknown = [n for n in only if n not in names]
    if unknown:
      raise StageError(f'unknown stages {unknown}; this mode has stages: '
                       f'{", ".join(names)}')
    selected = [s for s in stages if s.name in only]
  else:
    selected = list(stages)
  will_run = {s.name for s in selected}
  missing = []
  for s in selected:
    for dep in s.inputs:
      if dep not in will_run and not is_complete(workdir, dep):
        missing.append(f'{s.name} needs {stage_dir(workdir, dep)}/ '
                       f'(stage {dep!r} has not completed)')
  if missing:
    raise StageError('missing stage inputs:\n  ' + '\n  '.join(missing))
  return selected


def _check_drift(stage: Stage, workdir: str):
  if stage.snapshot is None:
    return
  recorded = read_marker(workdir, stage.name).get('config')
  now = json.loads(json.dumps(stage.snapshot, sort_keys=True, default=str))
  if recorded is not None and recorded != now:
    raise StageError(
        f'stage {stage.name!r} in {stage_dir(workdir, stage.name)} was '
        'completed with a different config; use a fresh --workdir or remove '
        f'that folder to recompute it.\n recorded: {recorded}\n now: {now}')


def run_stage(stage: Stage, workdir: str) -> dict[str, Any]:
  """Runs one stage into `<name>.partial/`, marks it, renames it final."""
  final = stage_dir(workdir, stage.name)
  partial = final + '.partial'
  os.makedirs(partial, exist_ok=True)
  if os.listdir(partial):
    logging.info('stage %s: resuming from %s', stage.name, partial)
  t0 = time.time()
  summary = stage.run(StageContext(workdir, stage.name, partial))
  record = {
      'stage': stage.name,
      'finished': time.strftime('%Y-%m-%d %H:%M:%S'),
      'wall_s': round(time.time() - t0, 2),
      'config': json.loads(json.dumps(stage.snapshot, sort_keys=True,
                                      default=str)),
      'summary': summary if summary is not None else {},
  }
  tmp = os.path.join(partial, MARKER + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, os.path.join(partial, MARKER))
  if os.path.exists(final):  # a stale, unmarked folder from an old layout
    shutil.rmtree(final)
  os.replace(partial, final)
  logging.info('stage %s: done in %.1fs -> %s', stage.name, record['wall_s'],
               final)
  return record


def run_stages(stages: Sequence[Stage], workdir: str,
               only: Sequence[str] | None = None) -> dict[str, dict]:
  """Runs the (selected) stages in order, skipping completed ones.

  Returns:
    `{stage: completion record}` for every selected stage.
  """
  os.makedirs(workdir, exist_ok=True)
  selected = check_plan(stages, workdir, only)
  records = {}
  for stage in selected:
    if is_complete(workdir, stage.name):
      _check_drift(stage, workdir)
      logging.info('stage %s: complete, skipping (%s)', stage.name,
                   stage_dir(workdir, stage.name))
      records[stage.name] = read_marker(workdir, stage.name)
      continue
    logging.info('stage %s: running', stage.name)
    records[stage.name] = run_stage(stage, workdir)
  return records


def write_atomic_json(path: str, obj: Any):
  """Writes JSON to `path` via a temp file and rename."""
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  """Reads a JSON file."""
  with open(path) as f:
    return json.load(f)
