"""Multi-process start-up: call `jax.distributed.initialize` when asked to.

Settings come from explicit arguments, else the absl flags below (when
parsed), else the environment variables that launch/local_multiprocess.sh
sets: ACT_JAX_COORDINATOR (host:port), ACT_JAX_NUM_PROCESSES,
ACT_JAX_PROCESS_ID. With none of them set this is a single-process run and
nothing happens. Call it before any other JAX call.
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging
import jax

_COORD = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0 for jax.distributed (multi-process runs).')
_NUM = flags.DEFINE_integer('num_processes', None,
                            'Total number of processes (multi-process runs).')
_PID = flags.DEFINE_integer('process_id', None,
                            'This process index in [0, num_processes).')

ENV_COORD = 'ACT_JAX_COORDINATOR'
ENV_NUM = 'ACT_JAX_NUM_PROCESSES'
ENV_PID = 'ACT_JAX_PROCESS_ID'


def _flag(holder):
  return holder.value if flags.FLAGS.is_parsed() else None


def maybe_initialize(coordinator_address: str | None = None,
                     num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Initializes jax.distributed if a multi-process run is configured.

  Returns:
    True when jax.distributed was initialized (num_processes > 1).

  Raises:
    ValueError naming the missing setting when only some are given.
  """
  coord = coordinator_address or _flag(_COORD) or os.environ.get(ENV_COORD)
  num = num_processes or _flag(_NUM) or os.environ.get(ENV_NUM)
  pid = process_id
  if pid is None:
    pid = _flag(_PID)
  if pid is None and os.environ.get(ENV_PID) is not None:
    pid = os.environ[ENV_PID]
  if num is None or int(num) <= 1:
    return False
  if coord is None or pid is None:
    raise ValueError(
        f'num_processes={num} needs --coordinator_address (or {ENV_COORD}) '
        f'and --process_id (or {ENV_PID})')
  jax.distributed.initialize(coordinator_address=coord,
                             num_processes=int(num), process_id=int(pid))
  logging.info('jax.distributed: process %d of %d, %d local / %d global '
               'devices', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True
