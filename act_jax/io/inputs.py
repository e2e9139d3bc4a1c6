"""Inputs from strangers: files inside a checkpoint, and content fingerprints.

`resolve_inside(root, name)` is the one check of a file act-jax reads from a
checkpoint directory (shards, config, tokenizer and chat-template files): a
symlink that resolves outside the directory is refused unless
`follow_symlinks`, so a link to any readable file never ends up copied into
an output that users share. The HF hub cache keeps
`models--ORG--NAME/snapshots/<rev>/<file>` as symlinks into
`models--ORG--NAME/blobs/`: for a snapshot directory that is its checkpoint,
so Hub ids (`io.models.resolve_model`) and snapshot paths need no flag.

Fingerprints say whether an input is still what a resumable run started
from, by content rather than path:
  file_digest(path)          SHA-256 of the bytes, streamed
  safetensors_digest(path)   the header (tensor names, dtypes, shapes) and
                             the tensor bytes, digested separately
  dir_fingerprint(root, files)  `{'digest', 'files': {name: digest}}` of the
                             named files; cached in `root/.act-jax-
                             fingerprint.json` by each file's size, mtime,
                             ctime and inode (written atomically, never into
                             a read-only directory; no cache then)
  data_fingerprint(path)     a data file or saved-dataset directory
`first_change(recorded, now)` names the first input whose fingerprint
differs; `InputChangedError` is what resumable steps raise then.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
from typing import Any, Iterable, Iterator, Mapping

from absl import logging

from act_jax.io import atomic

CACHE_FILE = '.act-jax-fingerprint.json'
CACHE_FORMAT = 'act-jax-fingerprint-1'
# Files an act-jax writer adds that say nothing about the content.
IGNORED = (CACHE_FILE, atomic.MARKER)
_CHUNK = 16 << 20
# A file modified this recently may still change within the same mtime
# tick: its digest is not cached (as git does with "racily clean" files).
_RACY_NS = 2_000_000_000
RESTART_HINT = ('rerun with --restart (the pipeline: --config.restart=True) '
                'to start it over')


class UnsafeInputError(ValueError):
  """An input file that is a symlink resolving outside its checkpoint."""


class InputChangedError(ValueError):
  """An input whose content differs from what a resumable run started with."""


def resolve_inside(root: str, name: str, follow_symlinks: bool = False,
                   what: str = '') -> str:
  """The path of `name` inside checkpoint dir `root`, checked.

  Args:
    root: the checkpoint directory (itself may be a symlink).
    name: a relative file name inside it.
    follow_symlinks: accept a symlink that resolves outside `root`.
    what: how errors name the file's origin (default its path).

  Raises:
    UnsafeInputError when `root/name` resolves outside `root` and
    `follow_symlinks` is False.
  """
  path = os.path.join(root, name)
  if follow_symlinks:
    return path
  real = os.path.realpath(path)
  if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep)
             for r in _checkpoint_roots(root)):
    raise UnsafeInputError(
        f'{what or path} is a symlink to {real}, outside the checkpoint '
        f'directory {root}; refusing to read it (pass --follow_symlinks, or '
        '--config.convert.follow_symlinks=True, for a trusted layout such as '
        "the HF hub cache's snapshots/ -> blobs/)")
  return path


def _checkpoint_roots(root: str) -> list[str]:
  """Where files of checkpoint `root` may resolve: inside it, and for a
  hub-cache snapshot (`models--*/snapshots/<rev>`) its repo's `blobs/`."""
  real_root = os.path.realpath(root)
  roots = [real_root]
  snapshots = os.path.dirname(os.path.abspath(root))
  repo = os.path.dirname(snapshots)
  if (os.path.basename(snapshots) == 'snapshots' and
      os.path.basename(repo).startswith(('models--', 'datasets--'))):
    roots.append(os.path.realpath(os.path.join(repo, 'blobs')))
  return roots


def file_digest(path: str) -> str:
  """SHA-256 (hex) of a file's bytes, read in 16 MiB chunks."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def safetensors_digest(path: str) -> str:
  """'<header digest>:<tensor bytes digest>' of a safetensors file (the
  tensor bytes streamed), so a change says whether names / shapes or only
  values changed. A file too short to be safetensors is digested whole."""
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      return 'file:' + file_digest(path)
    (n,) = struct.unpack('<Q', head)
    if n > os.path.getsize(path) - 8:
      return 'file:' + file_digest(path)
    header = hashlib.sha256(head + f.read(n)).hexdigest()
    data = hashlib.sha256()
    while chunk := f.read(_CHUNK):
      data.update(chunk)
  return f'{header[:32]}:{data.hexdigest()}'


def _digest_file(path: str) -> str:
  if path.endswith('.safetensors'):
    return safetensors_digest(path)
  return file_digest(path)


def _stat_key(st: os.stat_result) -> list[int]:
  return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_cache(root: str) -> dict[str, Any]:
  try:
    with open(os.path.join(root, CACHE_FILE), encoding='utf-8') as f:
      cache = json.load(f)
  except (OSError, ValueError):
    return {}
  if not isinstance(cache, dict) or cache.get('format') != CACHE_FORMAT:
    return {}
  files = cache.get('files')
  return files if isinstance(files, dict) else {}


def _write_cache(root: str, entries: dict[str, Any]) -> None:
  """Best effort: a read-only or foreign directory simply has no cache."""
  if not os.access(root, os.W_OK):
    return
  try:
    atomic.write_json(os.path.join(root, CACHE_FILE),
                      {'format': CACHE_FORMAT, 'files': entries}, indent=None)
  except (OSError, atomic.WriteError) as e:
    logging.info('fingerprint cache not written in %s (%s)', root, e)


def combine(files: Mapping[str, str]) -> str:
  """One digest of `{name: digest}` (order-independent)."""
  return hashlib.sha256(json.dumps(dict(sorted(files.items()))).encode()
                        ).hexdigest()


def dir_fingerprint(root: str, files: Iterable[str],
                    follow_symlinks: bool = False,
                    cache: bool = True) -> dict[str, Any]:
  """`{'digest': ..., 'files': {name: digest}}` of `files` inside `root`.

  Digests are reused from `root/.act-jax-fingerprint.json` while a file's
  size, mtime, ctime and inode are unchanged; the cache is rewritten
  atomically when an entry changed (never where `root` is read-only).

  Raises:
    UnsafeInputError for a file that resolves outside `root`.
  """
  old = _read_cache(root) if cache else {}
  new, out = {}, {}
  now = time.time_ns()
  for name in sorted(set(files)):
    path = resolve_inside(root, name, follow_symlinks)
    st = os.stat(path)
    key = _stat_key(st)
    hit = old.get(name)
    if isinstance(hit, dict) and hit.get('stat') == key and hit.get('digest'):
      digest = hit['digest']
    else:
      digest = _digest_file(path)
    out[name] = digest
    if now - st.st_mtime_ns > _RACY_NS:
      new[name] = {'stat': key, 'digest': digest}
  if cache and new != old:
    _write_cache(root, new)
  return {'digest': combine(out), 'files': out}


def tree_files(root: str, sub: str = '') -> list[str]:
  """Relative paths of the files under `root/sub` (sorted; act-jax's own
  marker and cache files left out)."""
  out = []
  for d, dirs, fs in os.walk(os.path.join(root, sub)):
    dirs.sort()
    for f in fs:
      if f not in IGNORED:
        out.append(os.path.relpath(os.path.join(d, f), root))
  return sorted(out)


def data_fingerprint(path: str) -> dict[str, Any]:
  """Fingerprint of a data source: a file's bytes, a saved dataset
  directory's files, or (a Hub name) just the name, which cannot be
  checked offline."""
  if os.path.isfile(path):
    return {'digest': file_digest(path)}
  if os.path.isdir(path):
    return dir_fingerprint(path, tree_files(path), follow_symlinks=True,
                           cache=False)
  return {'digest': 'name:' + path}


def first_change(recorded: Mapping[str, Any], now: Mapping[str, Any]
                 ) -> str | None:
  """The first input (sorted) whose fingerprint differs, with the first
  differing file when both sides list them ('DIR/model.safetensors');
  None when all agree."""
  for name in sorted(set(recorded) | set(now)):
    a, b = recorded.get(name), now.get(name)
    if a == b:
      continue
    da = a.get('files', {}) if isinstance(a, dict) else {}
    db = b.get('files', {}) if isinstance(b, dict) else {}
    for f in sorted(set(da) | set(db)):
      if da.get(f) != db.get(f):
        return os.path.join(name, f)
    return name
  return None


# ---------------------------------------------------- reads against the key


class UndeclaredReadError(RuntimeError):
  """A pipeline stage read a data file its drift key does not fingerprint."""


_DECLARED: list[tuple[str, tuple[str, ...], str]] = []  # (stage, reals, root)


@contextlib.contextmanager
def declared_reads(stage: str, paths: Iterable[str], workdir: str
                   ) -> Iterator[None]:
  """While a stage runs: every data file it opens (`note_read`) must be one
  of `paths` (its drift key's inputs, or inside one of them) or lie inside
  `workdir` (the stage chain's artifacts, keyed through upstream digests).
  So a file a stage reads can never be missing from its fingerprint: the
  drift key is checked against what the stage actually opens."""
  reals = tuple(os.path.realpath(p) for p in paths if p)
  _DECLARED.append((stage, reals, os.path.realpath(workdir)))
  try:
    yield
  finally:
    _DECLARED.pop()


def _inside(inner: str, outer: str) -> bool:
  return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def note_read(path: str) -> None:
  """Called by every data reader before it opens `path`.

  Raises:
    UndeclaredReadError naming the stage and the file, inside a stage whose
    declared inputs (`declared_reads`) do not cover `path`.
  """
  if not _DECLARED or not os.path.exists(path):
    return  # outside a stage, or a Hub name (its id is in the key)
  stage, reals, root = _DECLARED[-1]
  real = os.path.realpath(path)
  if _inside(real, root) or any(_inside(real, r) for r in reals):
    return
  raise UndeclaredReadError(
      f'stage {stage!r} read {path}, which its drift key does not '
      'fingerprint (a changed file would be silently reused); add it to the '
      "stage's paths in pipeline/stages.py")
