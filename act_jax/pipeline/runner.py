"""The stage runner: ordered stages, atomic outputs, skip / resume, drift key.

Each stage writes under `workdir/<stage>/`. While it runs it writes into
`workdir/<stage>.partial/` (a stage may keep resumable sub-artifacts there:
`StageContext.sub_done` / `sub_dir`); on success it writes `COMPLETE.json`
(time, wall seconds, peak resident memory, the device mesh it ran on, the
stage's drift key and config snapshot) and renames the folder to `workdir/<stage>/`. So a finished stage
is skipped on rerun, a killed stage resumes from its finished sub-artifacts,
and nothing half-written ever sits under a final name.

The drift key of a stage digests its config snapshot AND the source of the
code it runs (`Stage.code`: act_jax packages / modules), so a rerun whose
config or code differs from what a completed stage recorded fails by name
instead of silently reusing an artifact made by other settings or older
code.

A subset (`only=('collect', 'localize')`) runs just those stages; each input
stage they need must already be complete, else `StageError` names the
missing folders before anything runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import shutil
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging

from act_jax import distributed
from act_jax.io import atomic

MARKER = 'COMPLETE.json'
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  """A named step: `run(ctx) -> summary dict` plus what it depends on."""
  name: str
  run: Callable[[StageContext], Any]
  inputs: tuple[str, ...] = ()
  snapshot: Any = None  # JSON-able config the stage depends on (drift)
  code: tuple[str, ...] = ()  # act_jax paths it runs ('model', 'act/...')
  mesh: Any = None  # the device mesh it runs on (sharding.describe)


def stage_dir(workdir: str, name: str) -> str:
  """`workdir/<name>`: where a completed stage's artifacts live."""
  return os.path.join(workdir, name)


def is_complete(workdir: str, name: str) -> bool:
  """True when `workdir/<name>/COMPLETE.json` exists."""
  return os.path.isfile(os.path.join(stage_dir(workdir, name), MARKER))


def read_marker(workdir: str, name: str) -> dict[str, Any]:
  """The completion record of a finished stage."""
  return atomic.read_json(os.path.join(stage_dir(workdir, name), MARKER))


def code_digest(paths: Sequence[str]) -> str:
  """Short SHA-256 of the act_jax source under `paths` (files or folders,
  relative to the package), in a stable order."""
  h = hashlib.sha256()
  files = []
  for rel in paths:
    full = os.path.join(_PACKAGE, rel)
    if os.path.isdir(full):
      for d, _, fs in os.walk(full):
        files += [os.path.join(d, f) for f in fs if f.endswith('.py')]
    elif os.path.isfile(full):
      files.append(full)
    else:
      raise StageError(f'stage code path {rel!r} is not in {_PACKAGE}')
  for f in sorted(set(files)):
    with open(f, 'rb') as fh:
      h.update(os.path.relpath(f, _PACKAGE).encode() + b'\0' + fh.read())
  return h.hexdigest()[:16]


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, sort_keys=True, default=str))


def drift_key(stage: Stage) -> dict[str, Any]:
  """What a completed stage must match to be reused."""
  return {'config': _jsonable(stage.snapshot),
          'code': code_digest(stage.code) if stage.code else None}


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
  if stage.snapshot is None and not stage.code:
    return
  recorded = read_marker(workdir, stage.name)
  now = drift_key(stage)
  where = stage_dir(workdir, stage.name)
  if recorded.get('config') is not None and recorded['config'] != now[
      'config']:
    raise StageError(
        f'stage {stage.name!r} in {where} was completed with a different '
        'config; use a fresh --workdir or remove that folder to recompute '
        f'it.\n recorded: {recorded["config"]}\n now: {now["config"]}')
  if recorded.get('code') and now['code'] and recorded['code'] != now['code']:
    raise StageError(
        f'stage {stage.name!r} in {where} was completed by other act-jax code '
        f'(code digest {recorded["code"]}, now {now["code"]}); use a fresh '
        '--workdir or remove that folder to recompute it')


def rss_mb() -> float:
  """Current resident set size in MiB (lifetime peak where unavailable)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (1024.0 * 1024.0 if sys.platform == 'darwin' else 1024.0)


@contextlib.contextmanager
def peak_rss(interval_s: float = 0.2) -> Iterator[list[float]]:
  """Samples this process's RSS while the body runs; yields `[peak MiB]`."""
  peak = [rss_mb()]
  stop = threading.Event()

  def sample():
    while not stop.wait(interval_s):
      peak[0] = max(peak[0], rss_mb())

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  try:
    yield peak
  finally:
    stop.set()
    thread.join()
    peak[0] = max(peak[0], rss_mb())


def run_stage(stage: Stage, workdir: str) -> dict[str, Any]:
  """Runs one stage into `<name>.partial/`, marks it, renames it final."""
  final = stage_dir(workdir, stage.name)
  partial = final + '.partial'
  if distributed.is_primary():
    os.makedirs(partial, exist_ok=True)
    if os.listdir(partial):
      logging.info('stage %s: resuming from %s', stage.name, partial)
  distributed.barrier(f'stage_start:{stage.name}')
  t0 = time.time()
  with peak_rss() as peak:
    summary = stage.run(StageContext(workdir, stage.name, partial))
  record = {
      'stage': stage.name,
      'finished': time.strftime('%Y-%m-%d %H:%M:%S'),
      'wall_s': round(time.time() - t0, 2),
      'peak_rss_mb': round(peak[0], 1),
      'mesh': stage.mesh,
      **drift_key(stage),
      'summary': summary if summary is not None else {},
  }
  distributed.barrier(f'stage_done:{stage.name}')
  if distributed.is_primary():
    atomic.write_json(os.path.join(partial, MARKER), record)
    if os.path.exists(final):  # a stale, unmarked folder from an old layout
      shutil.rmtree(final)
    os.replace(partial, final)
  distributed.barrier(f'stage_end:{stage.name}')
  logging.info('stage %s: done in %.1fs (peak RSS %.0f MiB) -> %s',
               stage.name, record['wall_s'], record['peak_rss_mb'], final)
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
