"""What every act-jax benchmark shares: the run header and the GEMM ceilings.

Every benchmark prints `header()` first (date, load average, CPUs, library
versions, threads) so a figure can be judged by the conditions it was taken
in, and measures the GEMM rates of jax and torch in the same run, because a
rate is only comparable with the ceiling of the same machine at the same
moment. `best_time` takes the fastest of several rounds: on a shared machine
other jobs only ever add time.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from typing import Callable


def load_average() -> str:
  """`1/5/15-minute load averages` as a short string."""
  return '/'.join(f'{x:.1f}' for x in os.getloadavg())


def header(name: str, command: str) -> str:
  """The lines that head every benchmark's output."""
  # Lazy imports: convert_bench's subprocesses measure their own RSS.
  # pylint: disable=g-import-not-at-top
  import jax
  import torch
  import transformers
  # pylint: enable=g-import-not-at-top
  now = datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')
  return (f'# {name}\n'
          f'command: {command}\n'
          f'date {now}; load average {load_average()}; cpus '
          f'{os.cpu_count()}; {platform.machine()}; jax {jax.__version__} '
          f'({jax.devices()[0].platform}, {jax.device_count()} devices); '
          f'torch {torch.__version__} ({torch.get_num_threads()} threads); '
          f'transformers {transformers.__version__}')


def best_time(fn: Callable[[], object], rounds: int) -> float:
  """Fastest wall seconds of `rounds` calls of `fn` (which must block)."""
  best = float('inf')
  for _ in range(max(rounds, 1)):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def jax_gemm_gflops(dtype: str = 'float32', n: int = 2048,
                    rounds: int = 3) -> float:
  """Best `jnp.dot` rate of an n x n x n product (GFLOP/s)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  return 2 * n**3 / best_time(lambda: f(a, a).block_until_ready(),
                              rounds) / 1e9


def torch_gemm_gflops(dtype: str = 'float32', n: int = 2048,
                      rounds: int = 3) -> float:
  """Best `torch.mm` rate of an n x n x n product (GFLOP/s)."""
  import torch  # pylint: disable=g-import-not-at-top
  a = torch.ones((n, n), dtype=getattr(torch, dtype))
  torch.mm(a, a)
  return 2 * n**3 / best_time(lambda: torch.mm(a, a), rounds) / 1e9
