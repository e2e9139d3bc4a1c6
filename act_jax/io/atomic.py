"""The one temp-and-rename helper every act-jax writer uses.

A file or directory either is complete under its final name or does not
exist: `atomic_dir(path)` yields a temporary sibling directory and renames it
to `path` when the body finishes; `atomic_file(path)` does the same for one
file; `write_json` / `write_text` / `write_bytes` are the small writes. On
any exception the temporary copy is removed and `path` is left as it was.

Multi-process runs: `atomic_dir(..., collective=True)` (the default) is
entered by every process; process 0 creates and renames, the others wait at
barriers, so all of them may write shards into the same temporary directory.
Small artifacts that only process 0 writes use `collective=False`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Iterator

from act_jax import distributed


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False,
               collective: bool = True) -> Iterator[str]:
  """Yields a temporary sibling of `path`; renames it to `path` on success.

  Collective: the temporary name is deterministic (`.NAME.partial`), so all
  processes of a multi-process job write into the same place; process 0
  does the file system moves. With `collective=False` the caller alone
  writes: no barriers, and a temporary name of its own
  (`.NAME.partial-<pid>-<random>`), so independent writers never share one.

  Raises:
    FileExistsError naming `path` when it exists and `overwrite` is False.
  """
  path = os.path.abspath(path)
  parent, base = os.path.split(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path}: output already exists (pass overwrite)')
  tmp = os.path.join(parent, f'.{base}.partial')
  if not collective:
    tmp += f'-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  primary = distributed.is_primary() if collective else True
  barrier = distributed.barrier if collective else (lambda name: None)
  if primary:
    os.makedirs(parent, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier run
    os.makedirs(tmp)
  barrier(f'atomic_dir_start:{path}')
  try:
    yield tmp
    barrier(f'atomic_dir_done:{path}')
    if primary:
      old = tmp + '.old'

      if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    barrier(f'atomic_dir_end:{path}')
  except BaseException:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it over `path` after."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  base, ext = os.path.splitext(path)
  # Keep the extension: some writers (numpy's savez) append their own.
  tmp = f'{base}.tmp{os.getpid()}{ext}'
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
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


def remove_tree(path: str) -> None:
  """Removes a directory this run created (temporary work), if present."""
  shutil.rmtree(path, ignore_errors=True)
