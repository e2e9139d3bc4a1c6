"""Wall time and peak resident memory of each stage of a run.

`Meter.stage(name)` is a context manager: it samples this process's resident
set size (Linux `/proc/self/status` VmRSS) every `interval_s` in a daemon
thread and records `{'wall_s', 'peak_rss_mb'}` for the stage. Elsewhere it
falls back to the process-lifetime peak (`resource.getrusage`).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time
from typing import Iterator


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


class Meter:
  """Collects per-stage wall time and peak RSS."""

  def __init__(self, interval_s: float = 0.2):
    self.interval_s = interval_s
    self.stages: dict[str, dict[str, float]] = {}

  @contextlib.contextmanager
  def stage(self, name: str) -> Iterator[None]:
    """Measures the body; repeated names accumulate time and keep the max."""
    peak = [rss_mb()]
    stop = threading.Event()

    def sample():
      while not stop.wait(self.interval_s):
        peak[0] = max(peak[0], rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.time()
    try:
      yield
    finally:
      stop.set()
      thread.join()
      peak[0] = max(peak[0], rss_mb())
      old = self.stages.get(name, {'wall_s': 0.0, 'peak_rss_mb': 0.0})
      self.stages[name] = {
          'wall_s': old['wall_s'] + time.time() - start,
          'peak_rss_mb': max(old['peak_rss_mb'], peak[0]),
      }
