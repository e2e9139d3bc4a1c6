"""The stage runner: ordered stages, atomic outputs, skip / resume, drift key.

Each stage writes under `workdir/<stage>/`. While it runs it writes into
`workdir/<stage>.partial/` (a stage may keep resumable sub-artifacts there:
`StageContext.sub_done` / `sub_dir`); on success it writes `COMPLETE.json`
(time, wall seconds, peak resident memory, the device mesh it ran on, the
stage's drift key and config snapshot) and renames the folder to
`workdir/<stage>/`. So a finished stage is skipped on rerun, a killed stage resumes from its finished sub-artifacts,
and nothing half-written ever sits under a final name.

The drift key of a stage digests its config snapshot, the source of the
code it runs (`Stage.code`: act_jax packages / modules), the content
fingerprints of the files and model dirs it reads from outside the workdir
(`Stage.paths`: safetensors headers + tensor bytes, data file bytes; see
`io.inputs`) and the drift keys of the stages it reads (`Stage.inputs`). So
a rerun whose config, code or inputs differ from what a completed stage
recorded fails by name instead of silently reusing an artifact made from
something else; with `overwrite` the stage (and, through the chain, every
later one) is recomputed and its folder replaced. A killed stage records
the same key in `<stage>.partial/STARTED.json`; a rerun resumes it only
when nothing changed ("... changed since the interrupted run"), and
`restart` discards the interrupted work instead.

The workdir is act-jax's: it carries `.act-jax.json` (kind 'workdir'); a
non-empty folder without it is refused, so a run never writes stage folders
into a folder of unrelated files, and a folder under a stage's name that no
stage completed is never removed. One run at a time: the runner holds
`<workdir>/.lock` (fcntl) for the whole run; a second one fails at once
naming the holder's pid.

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
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging

import act_jax
from act_jax import distributed
from act_jax.io import atomic
from act_jax.io import faults
from act_jax.io import inputs as inputs_lib
from act_jax.io import models as models_io

MARKER = 'COMPLETE.json'
STARTED = 'STARTED.json'
LOCK = '.lock'
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
  paths: tuple[str, ...] = ()  # model dirs / data files it reads (content)
  follow_symlinks: bool = False  # model dirs may link outside themselves
  mesh: Any = None  # the device mesh it runs on (sharding.describe)
  # Derived from the workdir alone and cheap (report, export): a changed
  # key recomputes it without `overwrite` instead of refusing the rerun.
  rederive: bool = False


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


def code_version() -> dict[str, Any]:
  """The act-jax version, and the git commit of its checkout when it runs
  from one (`dirty`: act_jax/ or configs/ differ from that commit)."""
  out: dict[str, Any] = {'act_jax': act_jax.__version__}
  root = os.path.dirname(_PACKAGE)
  if not os.path.exists(os.path.join(root, '.git')):
    return out
  try:
    git = lambda *a: subprocess.run(  # pylint: disable=g-long-lambda
        ('git', '-C', root) + a, capture_output=True, text=True, timeout=20,
        check=True).stdout.strip()
    out['commit'] = git('rev-parse', 'HEAD')
    out['dirty'] = bool(git('status', '--porcelain', '--untracked-files=no',
                            '--', 'act_jax', 'configs'))
  except (OSError, subprocess.SubprocessError):
    pass
  return out


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, sort_keys=True, default=str))


def path_fingerprint(path: str, follow_symlinks: bool = False
                     ) -> dict[str, Any]:
  """Content fingerprint of a stage input: a model dir (either kind), a data
  file or dataset dir; `{'missing': True}` when it does not exist yet. A
  Hub id is its local snapshot (pre-flight has fetched it)."""
  if models_io.is_hub_id(path):
    path = models_io.resolve_model(path)
  if os.path.isdir(path) and (
      os.path.isfile(os.path.join(path, 'config.json')) or
      os.path.isfile(os.path.join(path, 'model_config.json'))):
    return models_io.model_fingerprint(path, follow_symlinks)
  if os.path.exists(path):
    return inputs_lib.data_fingerprint(path)
  return {'missing': True}


def _key_digest(key: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(
      {k: key.get(k) for k in ('config', 'code', 'inputs', 'upstream')},
      sort_keys=True).encode()).hexdigest()[:16]


WORKDIR = '<workdir>'  # how keys write paths inside the run's workdir


def relative_to(x: Any, workdir: str | None) -> Any:
  """`x` (JSON-able) with every path string inside `workdir` written as
  `<workdir>/...` (dict keys too): a key that holds no absolute workdir path
  still matches after the workdir is copied or moved."""
  if workdir is None:
    return x
  root = os.path.abspath(workdir)

  def rel(v):
    if isinstance(v, str) and (v == root or v.startswith(root + os.sep)):
      return WORKDIR + v[len(root):]
    if isinstance(v, dict):
      return {rel(k): rel(w) for k, w in v.items()}
    if isinstance(v, list):
      return [rel(w) for w in v]
    return v

  return rel(x)


def drift_key(stage: Stage, workdir: str | None = None) -> dict[str, Any]:
  """What a completed (or interrupted) stage must match to be reused: its
  config snapshot, code digest, input fingerprints and, given `workdir`,
  the digests of its completed input stages' keys; paths inside `workdir`
  relative to it (`relative_to`)."""
  upstream = {}
  if workdir is not None:
    for dep in stage.inputs:
      if is_complete(workdir, dep):
        upstream[dep] = _key_digest(read_marker(workdir, dep))
  return relative_to({
      'config': _jsonable(stage.snapshot),
      'code': code_digest(stage.code) if stage.code else None,
      'inputs': {p: path_fingerprint(p, stage.follow_symlinks)
                 for p in stage.paths},
      'upstream': upstream}, workdir)


def config_changes(old: Any, new: Any, where: str = '', limit: int = 8
                   ) -> list[str]:
  """The changed leaves of two config snapshots, `field: old -> new`
  (at most `limit`, then how many more)."""
  out: list[str] = []

  def walk(a, b, path):
    if isinstance(a, dict) and isinstance(b, dict):
      for k in sorted(set(a) | set(b), key=str):
        walk(a.get(k, '<unset>'), b.get(k, '<unset>'),
             f'{path}.{k}' if path else str(k))
    elif (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
          and any(isinstance(x, (dict, list)) for x in a)):
      for i, (x, y) in enumerate(zip(a, b)):
        walk(x, y, f'{path}[{i}]')
    elif a != b:
      out.append(f'{path or "config"}: {a!r} -> {b!r}')

  if (isinstance(old, list) and isinstance(new, list) and
      len(old) == len(new) and not where):
    # A stage snapshot is a list of config sections: name fields, not parts.
    for a, b in zip(old, new):
      walk(a, b, '')
  else:
    walk(old, new, where)
  if len(out) > limit:
    out = out[:limit] + [f'... {len(out) - limit} more']
  return out


def key_change(recorded: dict[str, Any], now: dict[str, Any],
               workdir: str | None = None) -> tuple[str, str] | None:
  """`(what, detail)` of the first difference between two drift keys:
  ('config' | 'code' | 'input' | 'upstream', ...), or None. Given the
  `workdir`, a key recorded with absolute paths inside it (an earlier
  version) is compared as `relative_to` writes it."""
  recorded = relative_to(recorded, workdir)
  if recorded.get('config') is not None and recorded['config'] != now[
      'config']:
    return 'config', ', '.join(config_changes(recorded['config'],
                                              now['config']))
  if recorded.get('code') and now['code'] and recorded['code'] != now['code']:
    return 'code', f'code digest {recorded["code"]}, now {now["code"]}'
  changed = inputs_lib.first_change(recorded.get('inputs', {}),
                                    now['inputs'])
  if changed:
    return 'input', changed
  for dep, digest in now['upstream'].items():
    if recorded.get('upstream', {}).get(dep) != digest:
      return 'upstream', dep
  return None


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


def _drift_error(stage: Stage, where: str, change: tuple[str, str],
                 interrupted: bool) -> Exception:
  """The one-line error of a stage whose drift key changed."""
  what, detail = change
  if interrupted:
    fix = ('rerun with --config.restart=True to discard the interrupted '
           'work')
    done = f'stage {stage.name!r} was interrupted in {where}'
  else:
    fix = ('rerun with --config.overwrite=True to recompute it (and the '
           'stages after it), or use a fresh --workdir')
    done = f'stage {stage.name!r} in {where} was completed'
  since = 'the interrupted run' if interrupted else 'it was completed'
  if what == 'input':
    return inputs_lib.InputChangedError(
        f'{detail} changed since {since} (stage {stage.name!r}, {where}); '
        f'{fix}')
  if what == 'upstream':
    return StageError(f'{done} from another result of stage {detail!r} '
                      f'(recomputed since); {fix}')
  if what == 'code':
    return StageError(f'{done} by other act-jax code ({detail}); {fix}')
  return StageError(f'{done} with a different config ({detail}); {fix}')


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


def _prepare_partial(stage: Stage, workdir: str, key: dict[str, Any],
                     restart: bool) -> str:
  """`<stage>.partial/` ready to (re)run into: resumed only when its
  STARTED.json records the same drift key; discarded with `restart`."""
  partial = stage_dir(workdir, stage.name) + '.partial'
  started = os.path.join(partial, STARTED)
  if os.path.isdir(partial) and not restart:
    if os.path.isfile(started):
      change = key_change(atomic.read_json(started), key, workdir)
      if change and stage.rederive:
        restart = True  # nothing worth resuming: derive it again
      elif change:
        raise _drift_error(stage, partial, change, interrupted=True)
    elif os.listdir(partial):
      raise StageError(
          f'{partial} holds work no act-jax run of this version started (no '
          f'{STARTED}); rerun with --config.restart=True to discard it')
  distributed.barrier(f'stage_check:{stage.name}')
  if distributed.is_primary():
    if restart and os.path.isdir(partial):
      logging.info('stage %s: discarding the interrupted work in %s (restart)',
                   stage.name, partial)
      shutil.rmtree(partial)
    os.makedirs(partial, exist_ok=True)
    if os.path.isfile(started):
      logging.info('stage %s: resuming from %s', stage.name, partial)
    else:
      atomic.write_json(started, key)
  return partial


def run_stage(stage: Stage, workdir: str, restart: bool = False,
              key: dict[str, Any] | None = None) -> dict[str, Any]:
  """Runs one stage into `<name>.partial/`, marks it, renames it final
  (replacing a completed folder of the same stage: a recomputation)."""
  final = stage_dir(workdir, stage.name)
  key = key or drift_key(stage, workdir)
  partial = _prepare_partial(stage, workdir, key, restart)
  distributed.barrier(f'stage_start:{stage.name}')
  t0 = time.time()
  with peak_rss() as peak, faults.failpoint_scope(stage.name), (
      inputs_lib.declared_reads(stage.name, stage.paths, workdir)):
    summary = stage.run(StageContext(workdir, stage.name, partial))
  record = {
      'stage': stage.name,
      'finished': time.strftime('%Y-%m-%d %H:%M:%S'),
      'wall_s': round(time.time() - t0, 2),
      'peak_rss_mb': round(peak[0], 1),
      'mesh': stage.mesh,
      'code_version': code_version(),
      **key,
      'summary': summary if summary is not None else {},
  }
  distributed.barrier(f'stage_done:{stage.name}')
  if distributed.is_primary():
    with faults.failpoint_scope(stage.name):
      faults.failpoint('stage.before_complete')
      atomic.write_json(os.path.join(partial, MARKER), record)
      faults.failpoint('stage.before_rename')
    old = os.path.join(workdir, f'.{stage.name}.old')
    if os.path.lexists(final):
      if not is_complete(workdir, stage.name):
        raise StageError(f'{final} exists but no stage completed it (no '
                         f'{MARKER}); refusing to replace it')
      shutil.rmtree(old, ignore_errors=True)
      os.rename(final, old)
    os.rename(partial, final)
    shutil.rmtree(old, ignore_errors=True)
  distributed.barrier(f'stage_end:{stage.name}')
  logging.info('stage %s: done in %.1fs (peak RSS %.0f MiB) -> %s',
               stage.name, record['wall_s'], record['peak_rss_mb'], final)
  return record


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` with its marker, or checks an existing one is an
  act-jax workdir (by its marker, nothing else).

  Raises:
    StageError naming `workdir` when it holds anything else.
  """
  workdir = os.path.abspath(workdir)
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise StageError(f'--workdir={workdir} exists and is not a folder')
  # Every process reads the folder before process 0 marks it, and all meet
  # at the same barriers whatever they read.
  distributed.barrier(f'workdir_check:{workdir}')
  marker = atomic.read_marker(workdir)
  if marker is not None:
    if marker.get('kind') != 'workdir':
      raise StageError(f'--workdir={workdir} holds an act-jax '
                       f'{marker.get("kind")} artifact, not a workdir; '
                       'choose another folder')
    distributed.barrier(f'workdir:{workdir}')
    return
  # An act-jax workdir is recognized by its marker only: stage-like names
  # (`*.partial`, a COMPLETE.json) in a user's folder prove nothing, and a
  # lone `.lock` is not act-jax's unless the marker is there too.
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise StageError(
        f'--workdir={workdir} holds files and is not an act-jax workdir (no '
        f'{atomic.MARKER}); choose a new or empty folder')
  if distributed.is_primary():
    os.makedirs(workdir, exist_ok=True)
    atomic.write_marker(workdir, 'workdir')
  distributed.barrier(f'workdir:{workdir}')


def run_stages(stages: Sequence[Stage], workdir: str,
               only: Sequence[str] | None = None, *, overwrite: bool = False,
               restart: bool = False) -> dict[str, dict]:
  """Runs the (selected) stages in order, skipping completed ones.

  Args:
    stages: every stage of the plan, in order.
    workdir: the run's folder (created; an existing one must be act-jax's).
    only: run just these stages (their inputs must be complete).
    overwrite: recompute a completed stage whose config, code or inputs
      changed (replacing its folder) instead of failing.
    restart: discard an interrupted stage's work instead of resuming it.

  Returns:
    `{stage: completion record}` for every selected stage.

  Raises:
    StageError / InputChangedError naming the stage and what changed;
    LockedError when another run holds the workdir.
  """
  workdir = os.path.abspath(workdir)
  prepare_workdir(workdir)
  lock = (atomic.hold_lock(os.path.join(workdir, LOCK), workdir,
                           guards=workdir) if distributed.is_primary()
          else contextlib.nullcontext())
  with lock:
    selected = check_plan(stages, workdir, only)
    records = {}
    for stage in selected:
      key = None
      if is_complete(workdir, stage.name):
        key = drift_key(stage, workdir)
        change = key_change(read_marker(workdir, stage.name), key,
                            workdir)
        if change is None:
          logging.info('stage %s: complete, skipping (%s)', stage.name,
                       stage_dir(workdir, stage.name))
          records[stage.name] = read_marker(workdir, stage.name)
          continue
        if not (overwrite or stage.rederive):
          raise _drift_error(stage, stage_dir(workdir, stage.name), change,
                             interrupted=False)
        logging.info('stage %s: its %s changed; recomputing (%s)',
                     stage.name, change[0],
                     'overwrite' if overwrite else 'derived stage')
      elif os.path.lexists(stage_dir(workdir, stage.name)):
        raise StageError(
            f'{stage_dir(workdir, stage.name)} exists but no stage completed '
            f'it (no {MARKER}); move it away: act-jax replaces only its own '
            'stage folders')
      logging.info('stage %s: running', stage.name)
      records[stage.name] = run_stage(stage, workdir, restart, key)
  return records
