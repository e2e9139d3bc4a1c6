"""Fault injection for the kill tests (tests/faults_test.py, inputs_test).

`failpoint(name, detail)` SIGKILLs the process at the n-th hit of a named
point when `ACT_JAX_FAILPOINT` asks for it (`[scope/]name[~text][@n]`,
comma separated; scope = the pipeline stage running, see `failpoint_scope`;
`~text`: only hits whose detail, the path being written, contains `text`);
unset, every point is a no-op. Points: `atomic.before_rename` (inside a
save: the temporary copy is complete, not yet renamed),
`atomic.after_rename` (between two saves), `checkpoint.saved` (an orbax
save of a resumable loop just started) and the stage runner's
`stage.before_complete` / `stage.before_rename`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sys
from typing import Iterator

FAILPOINT_ENV = 'ACT_JAX_FAILPOINT'

_SCOPE = ['']
_HITS: collections.Counter = collections.Counter()


@contextlib.contextmanager
def failpoint_scope(name: str) -> Iterator[None]:
  """Names what runs now (the pipeline stage), for scoped failpoints."""
  old = _SCOPE[0]
  _SCOPE[0] = name
  try:
    yield
  finally:
    _SCOPE[0] = old


def failpoint(name: str, detail: str = '') -> None:
  """SIGKILLs this process at the n-th hit of `name` when ACT_JAX_FAILPOINT
  says so (see module docstring); a no-op otherwise."""
  spec = os.environ.get(FAILPOINT_ENV)
  if not spec:
    return
  for entry in spec.split(','):
    point, _, nth = entry.strip().partition('@')
    point, _, text = point.partition('~')
    scope, _, point = point.partition('/')
    if not point:
      scope, point = '', scope
    if point != name or (scope and scope != _SCOPE[0]) or (
        text and text not in detail):
      continue
    _HITS[entry] += 1
    if _HITS[entry] == int(nth or 1):
      sys.stdout.flush()
      sys.stderr.flush()
      os.kill(os.getpid(), signal.SIGKILL)
