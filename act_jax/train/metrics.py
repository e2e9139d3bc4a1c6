"""Training metrics: JSONL per step, TensorBoard event files, console ETA.

No TensorFlow/tensorboard dependency: TensorBoard event files are a
TFRecord of `Event` protos, which `TBWriter` encodes by hand (scalars only:
`Event{wall_time, step, summary{value{tag, simple_value}}}` with masked
CRC32C framing). `metrics.jsonl` holds the same numbers, one JSON object
per logged step, and is the source of truth.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Any

from absl import logging


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`."""
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field(num: int, wire: int) -> bytes:
  return _varint((num << 3) | wire)


def _len_field(num: int, payload: bytes) -> bytes:
  return _field(num, 2) + _varint(len(payload)) + payload


def _event(step: int, wall: float, *, scalars=None, version=None) -> bytes:
  msg = _field(1, 1) + struct.pack('<d', wall) + _field(2, 0) + _varint(step)
  if version is not None:
    msg += _len_field(3, version.encode())
  if scalars:
    summary = b''
    for tag, value in scalars.items():
      val = _len_field(1, tag.encode()) + _field(2, 5) + struct.pack(
          '<f', float(value))
      summary += _len_field(1, val)
    msg += _len_field(5, summary)
  return msg


class TBWriter:
  """Appends scalar summaries to a TensorBoard event file in `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}'
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, 'ab')
    self._write(_event(0, time.time(), version='brain.Event:2'))

  def _write(self, data: bytes) -> None:
    header = struct.pack('<Q', len(data))
    self._f.write(header + struct.pack('<I', _masked_crc(header)) + data +
                  struct.pack('<I', _masked_crc(data)))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._write(_event(step, time.time(), scalars=values))
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def read_tb_scalars(path: str) -> list[tuple[int, str, float]]:
  """Decodes (step, tag, value) from an event file written by TBWriter."""
  out = []
  with open(path, 'rb') as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (n,) = struct.unpack_from('<Q', data, pos)
    rec = data[pos + 12:pos + 12 + n]
    if struct.unpack_from('<I', data, pos + 12 + n)[0] != _masked_crc(rec):
      raise ValueError(f'{path}: bad CRC at byte {pos}')
    pos += 16 + n
    step = 0
    i = 9  # wall_time: tag byte + 8
    while i < len(rec):
      key = rec[i]
      i += 1
      if key == 0x10:
        step, i = _read_varint(rec, i)
      elif key in (0x1A, 0x2A):
        ln, i = _read_varint(rec, i)
        body = rec[i:i + ln]
        i += ln
        if key == 0x2A:
          out.extend((step, t, v) for t, v in _read_summary(body))
  return out


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
  n = shift = 0
  while True:
    x = b[i]
    i += 1
    n |= (x & 0x7F) << shift
    shift += 7
    if not x & 0x80:
      return n, i


def _read_summary(body: bytes):
  i = 0
  while i < len(body):
    i += 1  # field 1, wire 2
    ln, i = _read_varint(body, i)
    val = body[i:i + ln]
    i += ln
    tl, j = _read_varint(val, 1)
    tag = val[j:j + tl].decode()
    (value,) = struct.unpack_from('<f', val, j + tl + 1)
    yield tag, value


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
        self._tb = TBWriter(os.path.join(workdir, 'tb'))

  def log(self, step: int, metrics: dict[str, Any], console: bool) -> None:
    """Writes one step's metrics; prints progress when `console`."""
    row = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    if self._jsonl:
      self._jsonl.write(json.dumps(row) + '\n')
      self._jsonl.flush()
    if self._tb:
      self._tb.scalars(step, {k: v for k, v in row.items() if k != 'step'})
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
