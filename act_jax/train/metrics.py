"""Training metrics: JSONL per step, TensorBoard event files, console ETA.

`metrics.jsonl` holds every logged number, one JSON object per step, and is
the source of truth (the report reads it); TensorBoard scalars under `tb/`
are written by tensorboardX (no TensorFlow needed).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
import tensorboardX


class MetricsLogger:
  """JSONL + TensorBoard + console progress (rate and ETA) for one run."""

  def __init__(self, workdir: str | None, total_steps: int,
               tensorboard: bool = True):
    self.total = total_steps
    self._start = time.time()
    self._start_step = None
    self._jsonl = None
    self._tb = None
    if workdir:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      if tensorboard:
        # flush_secs: a killed run keeps what it logged up to a few s ago.
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tb'),
                                              flush_secs=10)

  def log(self, step: int, metrics: dict[str, Any], console: bool) -> None:
    """Writes one step's metrics; prints progress when `console`."""
    row = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    if self._jsonl:
      self._jsonl.write(json.dumps(row) + '\n')
      self._jsonl.flush()
    if self._tb:
      for k, v in row.items():
        if k != 'step':
          self._tb.add_scalar(k, v, global_step=int(step))
    if self._start_step is None:
      self._start_step, self._start = step - 1, time.time()
    if console:
      done = step - self._start_step
      rate = done / max(time.time() - self._start, 1e-9)
      eta = (self.total - step) / max(rate, 1e-9)
      logging.info('step %d/%d loss %.4f lr %.3g grad_norm %.3g '
                   '%.0f tok/s | %.2f steps/s ETA %.0fs', step, self.total,
                   row.get('loss', float('nan')), row.get('lr', 0.0),
                   row.get('grad_norm', 0.0), row.get('tokens_per_s', 0.0),
                   rate, eta)

  def close(self) -> None:
    for f in (self._jsonl, self._tb):
      if f:
        f.close()
