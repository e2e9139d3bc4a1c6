"""The one temp-and-rename helper every act-jax writer uses, and what keeps
two runs from mixing or destroying data.

A file or directory either is complete under its final name or does not
exist: `atomic_dir(path)` yields a temporary sibling directory and renames it
to `path` when the body finishes; `atomic_file(path)` does the same for one
file; `write_json` / `write_text` / `write_bytes` are the small writes. On
any exception the temporary copy is removed and `path` is left as it was; a
failure to write (disk full, file too large, read-only file system) is
raised as `WriteError` whose message ends with the real cause.

Markers: every directory `atomic_dir` writes carries `.act-jax.json`
(`{"format", "kind", "act_jax"}`: what wrote it). An existing output is an
error unless `overwrite`, and even then only an act-jax artifact of the same
kind is replaced: a model directory, a folder of unrelated files or another
kind of artifact never is (`check_output` is the same rule as a pre-flight
check, plus: an output that is, or contains, one of the run's inputs is
refused).

Locks: `output_lock(path)` holds an advisory `fcntl.flock` on the sibling
`.NAME.lock` (holding the holder's pid) for a whole command, `hold_lock` on
any lock file (the pipeline's `<workdir>/.lock`); a second run fails at once
with `LockedError` naming that pid. Locks are re-entrant within a process.
A collective `atomic_dir` takes its output's lock too (unless a held lock
guards a folder above it), so its fixed temporary name (`.NAME.partial`) is
never another live run's.

Multi-process runs: `atomic_dir(..., collective=True)` (the default) is
entered by every process; process 0 creates, locks and renames, the others
wait at barriers, so all of them may write shards into the same temporary
directory. Small artifacts that only process 0 writes use
`collective=False` (a temporary name unique to the writer).

Fault injection for the kill tests: `io.faults` (its points are named there).
"""

from __future__ import annotations

import contextlib
import errno as errno_lib
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import uuid
from typing import Any, Iterator, Sequence

import act_jax
from act_jax import distributed
from act_jax.io import faults

MARKER = '.act-jax.json'
MARKER_FORMAT = 'act-jax-artifact'
# errno values that mean "the disk / file system refused the write".
_WRITE_ERRNOS = (errno_lib.ENOSPC, errno_lib.EDQUOT, errno_lib.EFBIG,
                 errno_lib.EROFS, errno_lib.EACCES, errno_lib.EPERM,
                 errno_lib.EIO)


class OutputError(FileExistsError):
  """An output that may not be written: it exists (and no overwrite), act-jax
  did not write it, it holds another kind of artifact, or it is an input."""


class LockedError(RuntimeError):
  """Another live process holds the lock of an output."""


class WriteError(RuntimeError):
  """Writing an artifact failed; the message ends with the real cause."""


# ------------------------------------------------------------------ markers


def write_marker(dir_: str, kind: str) -> None:
  """Writes `dir_/.act-jax.json` (what wrote the directory). Deterministic:
  no time or pid, so two runs' artifacts compare equal byte for byte."""
  path = os.path.join(dir_, MARKER)
  # Written beside and renamed: a marker hard-linked from a copied artifact
  # is replaced, never written through.
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump({'format': MARKER_FORMAT, 'kind': kind,
               'act_jax': act_jax.__version__}, f, sort_keys=True)
    f.write('\n')
  os.replace(path + '.tmp', path)


def read_marker(dir_: str) -> dict[str, Any] | None:
  """The marker of an act-jax artifact directory, or None (no marker, or not
  act-jax's)."""
  try:
    with open(os.path.join(dir_, MARKER), encoding='utf-8') as f:
      m = json.load(f)
  except (OSError, ValueError):
    return None
  return m if isinstance(m, dict) and m.get('format') == MARKER_FORMAT else None


def check_replaceable(path: str, kind: str, what: str = '') -> None:
  """Raises OutputError unless `path` is an act-jax `kind` artifact dir."""
  what = what or path
  if os.path.islink(path) or not os.path.isdir(path):
    raise OutputError(f'{what} exists and is not a directory act-jax wrote; '
                      'refusing to replace it')
  m = read_marker(path)
  if m is None:
    raise OutputError(f'{what} exists and was not written by act-jax (no '
                      f'{MARKER}); refusing to replace it: move it away or '
                      'choose another output')
  if m.get('kind') != kind:
    raise OutputError(f'{what} holds an act-jax {m.get("kind")} artifact, not '
                      f'{kind}; refusing to replace it')


def _within(inner: str, outer: str) -> bool:
  return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


FILE_MARKER = '<!-- act-jax {kind}: written by act-jax, replaced only by it -->'


def file_marker(kind: str) -> str:
  """The first line of a single-file artifact (a published report): what
  marks the file as act-jax's, where a directory has `.act-jax.json`."""
  return FILE_MARKER.format(kind=kind)


def _is_file_artifact(path: str, kind: str) -> bool:
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      return f.readline().rstrip('\n') == file_marker(kind)
  except OSError:
    return False


def check_output(path: str, kind: str, *, overwrite: bool = False,
                 inputs: Sequence[str | None] = (),
                 flag: str = '--out', file: bool = False) -> str:
  """Pre-flight of one output (a directory, or a single file with `file`);
  returns its absolute path. The one output check every writer of a
  user-named path goes through.

  Args:
    path: the output directory (or file).
    kind: the artifact kind it will hold ('stats', 'params', 'report', ...).
    overwrite: an existing act-jax artifact of `kind` may be replaced.
    inputs: the run's input files and directories (None entries skipped).
    flag: how errors name the output (`--out`, `--hf_out`, ...).
    file: the output is one file, marked by its first line (`file_marker`).

  Raises:
    OutputError: `path` is, contains or lies inside one of `inputs` (even
      with `overwrite`), or exists and `overwrite` is False, or exists and
      is not an act-jax `kind` artifact.
  """
  path = os.path.abspath(path)
  real = os.path.realpath(path)
  for p in inputs:
    if not p:
      continue
    rp = os.path.realpath(p)
    if _within(rp, real) or _within(real, rp):
      how = ('is' if rp == real else 'contains' if _within(rp, real) else
             'lies inside')
      raise OutputError(f'{flag}={path} {how} an input of this run ({p}); '
                        'choose another output')
  if os.path.lexists(path):
    if not overwrite:
      raise OutputError(f'{flag}={path} already exists (pass --overwrite to '
                        f'replace an act-jax {kind} artifact)')
    if file:
      if os.path.islink(path) or not os.path.isfile(path) or (
          not _is_file_artifact(path, kind)):
        raise OutputError(
            f'{flag}={path} exists and is not an act-jax {kind} (its first '
            f'line is not {file_marker(kind)!r}); refusing to replace it: '
            'move it away or choose another output')
    else:
      check_replaceable(path, kind, f'{flag}={path}')
  return path


# -------------------------------------------------------------------- locks

_HELD: dict[str, list[Any]] = {}  # lock file -> [fd, depth, guarded path]


def lock_file_of(path: str) -> str:
  """The lock file of an output: the sibling `.NAME.lock`."""
  parent, base = os.path.split(os.path.abspath(path))
  return os.path.join(parent, f'.{base}.lock')


def _holder(lock_file: str) -> str:
  try:
    with open(lock_file, encoding='utf-8') as f:
      return f.read().strip() or 'unknown'
  except OSError:
    return 'unknown'


def _covered(path: str) -> bool:
  """Whether a lock this process holds guards `path` (or a folder above)."""
  return any(g and _within(path, g) for _, _, g in _HELD.values())


@contextlib.contextmanager
def hold_lock(lock_file: str, what: str,
              guards: str | None = None) -> Iterator[None]:
  """Holds an exclusive advisory lock on `lock_file` (re-entrant).

  Args:
    lock_file: the file locked (created; removed when let go).
    what: how errors name the locked thing.
    guards: the path this lock protects: while it is held, `output_lock` of
      that path or of anything inside it is already held.

  Raises:
    LockedError naming `what` and the holder's pid when another process
    holds it.
  """
  lock_file = os.path.abspath(lock_file)
  if lock_file in _HELD:
    _HELD[lock_file][1] += 1
    try:
      yield
    finally:
      _HELD[lock_file][1] -= 1
    return
  os.makedirs(os.path.dirname(lock_file), exist_ok=True)
  while True:
    fd = _open_lock(lock_file, what)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno_lib.EAGAIN, errno_lib.EACCES):
        raise
      raise LockedError(
          f'{what} is in use by another act-jax run (pid '
          f'{_holder(lock_file)}, lock {lock_file}); wait for it to finish '
          'or choose another output') from None
    # The previous holder unlinks a lock file it created when it lets go: a
    # lock taken on an unlinked file guards nothing, so take the new one.
    try:
      same = os.fstat(fd).st_ino == os.lstat(lock_file).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  os.ftruncate(fd, 0)
  os.write(fd, f'{os.getpid()}\n'.encode())
  _HELD[lock_file] = [fd, 1, os.path.abspath(guards) if guards else None]
  try:
    yield
  finally:
    _HELD[lock_file][1] -= 1
    if not _HELD[lock_file][1]:
      del _HELD[lock_file]
      # The file is an act-jax lock (created here, or a killed run's pid-only
      # leftover that this process took over and rewrote): nothing else is
      # ever opened, so removing it removes nobody's data.
      with contextlib.suppress(OSError):
        os.unlink(lock_file)
      os.close(fd)


def _open_lock(lock_file: str, what: str) -> int:
  """An fd of a lock file, never through a link: a new file (O_EXCL), or an
  existing regular file holding nothing but a pid (a killed run's leftover).

  Raises:
    OutputError when `lock_file` is a link, not a regular file, or holds
    anything else.
  """
  flags = os.O_RDWR | os.O_NOFOLLOW | getattr(os, 'O_CLOEXEC', 0)
  try:
    return os.open(lock_file, flags | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    pass
  bad = (f'lock file {lock_file} (of {what}) exists and is not an act-jax '
         'lock')
  try:
    fd = os.open(lock_file, flags)
  except FileNotFoundError:  # its holder let go between the two opens
    return _open_lock(lock_file, what)
  except OSError as e:
    if e.errno == errno_lib.ELOOP:
      raise OutputError(f'{bad} (a symbolic link); refusing to follow it: '
                        'remove it') from None
    raise
  st = os.fstat(fd)
  head = os.pread(fd, 64, 0) if stat.S_ISREG(st.st_mode) else b'x'
  if not stat.S_ISREG(st.st_mode) or not re.fullmatch(rb'(\d+\n)?', head):
    os.close(fd)
    raise OutputError(f'{bad} (it holds other content); refusing to touch '
                      'it: move it away')
  return fd


def output_lock(path: str) -> contextlib.AbstractContextManager:
  """The lock of output `path` for a whole command: `.NAME.lock` beside it.

  Process 0 only (the others of a multi-process job write under its lock);
  nothing to take when a lock this process holds guards `path` already
  (e.g. the pipeline's workdir lock: no lock files inside stage folders).
  """
  path = os.path.abspath(path)
  if not distributed.is_primary() or _covered(path):
    return contextlib.nullcontext()
  return hold_lock(lock_file_of(path), path, guards=path)


# ------------------------------------------------------------ write errors


def write_failure(e: BaseException) -> str | None:
  """The real cause when `e` (or what caused it) is a refused write, e.g.
  '[Errno 28] No space left on device'; None for other errors."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
      where = f': {e.filename}' if e.filename else ''
      return f'[Errno {e.errno}] {os.strerror(e.errno)}{where}'
    # tensorstore (orbax) reports the OS error inside its own message.
    m = re.search(r"os_error_code='?(\d+)", str(e))
    if m and int(m.group(1)) in _WRITE_ERRNOS:
      code = int(m.group(1))
      return f'[Errno {code}] {os.strerror(code)} ({str(e)[:300]})'
    e = e.__cause__ or e.__context__
  return None


def _raise_write_error(path: str, e: BaseException) -> None:
  cause = write_failure(e) if isinstance(e, Exception) else None
  if cause:
    raise WriteError(f'cannot write {path}: {cause}') from e


# ------------------------------------------------------------------ writers

_HOST = socket.gethostname()


def _temp_name(parent: str, base: str, role: str, ext: str = '') -> str:
  """`.BASE.ROLE-<host>-<pid>-<random>EXT`: unique to this writer, and
  telling a later run whose leftover it is."""
  return os.path.join(parent, f'.{base}.{role}-{_HOST}-{os.getpid()}-'
                      f'{uuid.uuid4().hex[:8]}{ext}')


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _leftovers(parent: str, base: str, role: str, ext: str = '') -> list[str]:
  """Temporaries of `base` (`_temp_name`) whose writer, a process of this
  host, is dead: a killed run's. A live writer's are never listed."""
  prefix = f'.{base}.{role}-'
  try:
    names = os.listdir(parent)
  except OSError:
    return []
  out = []
  for n in names:
    if not n.startswith(prefix) or not n.endswith(ext):
      continue
    parts = n[len(prefix):len(n) - len(ext)].rsplit('-', 2)
    if (len(parts) == 3 and parts[0] == _HOST and parts[1].isdigit() and
        not _alive(int(parts[1]))):
      out.append(os.path.join(parent, n))
  return sorted(out)


def _recover(path: str) -> None:
  """Undoes what a killed writer of `path` left: the previous artifact a
  replace had moved aside comes back when `path` is missing (else it is
  removed), and its temporary copies are removed."""
  parent, base = os.path.split(path)
  for old in _leftovers(parent, base, 'old'):
    if not os.path.lexists(path):
      os.rename(old, path)
    else:
      shutil.rmtree(old, ignore_errors=True)
  for tmp in _leftovers(parent, base, 'partial'):
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False, collective: bool = True,
               kind: str = 'artifact') -> Iterator[str]:
  """Yields a temporary sibling of `path`; renames it to `path` on success.

  Collective: the temporary name is deterministic (`.NAME.partial`), so all
  processes of a multi-process job write into the same place; process 0
  holds the output's lock and does the file system moves. With
  `collective=False` the caller alone writes: no barriers, and a temporary
  name of its own (`.NAME.partial-<host>-<pid>-<random>`), so independent
  writers never share one. Either way a killed earlier writer's leftovers
  are cleaned up first (and an artifact it was replacing put back). The
  finished directory carries the marker of `kind`.

  Raises:
    OutputError when `path` exists and `overwrite` is False, or exists and
      is not an act-jax `kind` artifact.
    LockedError when another run writes `path` (collective).
    WriteError when the file system refuses the write (the real cause last).
  """
  path = os.path.abspath(path)
  parent, base = os.path.split(path)
  primary = distributed.is_primary() if collective else True
  barrier = distributed.barrier if collective else (lambda name: None)
  lock = (output_lock(path) if collective else contextlib.nullcontext())
  with lock:
    try:
      if primary:
        _recover(path)
      barrier(f'atomic_dir_recover:{path}')
      if os.path.lexists(path):
        if not overwrite:
          raise OutputError(f'{path}: output already exists (pass '
                            'overwrite)')
        check_replaceable(path, kind)
      tmp = (os.path.join(parent, f'.{base}.partial') if collective else
             _temp_name(parent, base, 'partial'))
      if primary:
        os.makedirs(parent, exist_ok=True)
        # Under the lock: a leftover of a killed run, never a live one's.
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    except OSError as e:
      _raise_write_error(path, e)
      raise
    barrier(f'atomic_dir_start:{path}')
    try:
      yield tmp
      barrier(f'atomic_dir_done:{path}')
      if primary:
        write_marker(tmp, kind)
        faults.failpoint('atomic.before_rename', path)
        old = None
        if os.path.lexists(path):
          check_replaceable(path, kind)
          old = _temp_name(parent, base, 'old')
          os.rename(path, old)
        os.rename(tmp, path)
        if old:
          shutil.rmtree(old, ignore_errors=True)
        faults.failpoint('atomic.after_rename', path)
      barrier(f'atomic_dir_end:{path}')
    except BaseException as e:
      if primary:
        shutil.rmtree(tmp, ignore_errors=True)
      _raise_write_error(path, e)
      raise


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it over `path` after.

  The temporary name is the writer's own (`.NAME.tmp-<host>-<pid>-<random>
  EXT`, keeping the extension: some writers, numpy's savez, append their
  own); a killed earlier writer's is removed first.
  """
  path = os.path.abspath(path)
  parent, name = os.path.split(path)
  ext = os.path.splitext(name)[1]
  tmp = _temp_name(parent, name, 'tmp', ext)
  try:
    os.makedirs(parent, exist_ok=True)
    for left in _leftovers(parent, name, 'tmp', ext):
      os.remove(left)
    yield tmp
    faults.failpoint('atomic.before_rename', path)
    os.replace(tmp, path)
    faults.failpoint('atomic.after_rename', path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    _raise_write_error(path, e)
    raise


def write_text(path: str, text: str) -> str:
  """Writes `text` to `path` atomically; returns `path`."""
  with atomic_file(path) as tmp:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
  return path


def write_bytes(path: str, data: bytes) -> str:
  """Writes `data` to `path` atomically; returns `path`."""
  with atomic_file(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(data)
  return path


def write_json(path: str, obj: Any, indent: int = 2) -> str:
  """Writes `obj` as sorted JSON to `path` atomically; returns `path`."""
  return write_text(path, json.dumps(obj, indent=indent, sort_keys=True,
                                     default=str) + '\n')


def read_json(path: str) -> Any:
  """Reads a JSON file."""
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def make_artifact_dir(path: str, kind: str) -> str:
  """Creates directory `path` with the marker of `kind` (a directory other
  code fills in place, e.g. an orbax checkpoint manager's); an existing one
  must be act-jax's `kind` already. Returns `path`."""
  path = os.path.abspath(path)
  if os.path.lexists(path):
    check_replaceable(path, kind)
    return path
  os.makedirs(path)
  write_marker(path, kind)
  return path


def remove_artifact(path: str, kind: str) -> None:
  """Removes act-jax's `kind` artifact at `path` (if present); refuses
  anything act-jax did not write (OutputError)."""
  if not os.path.lexists(path):
    return
  check_replaceable(path, kind)
  shutil.rmtree(path)


def remove_tree(path: str) -> None:
  """Removes a directory this run created (temporary work), if present."""
  shutil.rmtree(path, ignore_errors=True)
