"""Multi-process start-up and the two rules every writer follows.

`maybe_initialize()` calls `jax.distributed.initialize` when a multi-process
run is configured: explicit arguments, else the environment variables that
`launch/local_multiprocess.sh` and `launch/slurm_gpu.sh` set
(ACT_JAX_COORDINATOR host:port, ACT_JAX_NUM_PROCESSES, ACT_JAX_PROCESS_ID),
else ACT_JAX_AUTO_DISTRIBUTED=1 (TPU pods: `jax.distributed.initialize()`
reads the topology itself). With none of them it is a single-process run and
nothing happens. Call it before any other JAX call.

`is_primary()` (process 0 writes) and `barrier(name)` (the others wait) are
what every artifact writer in act-jax uses. This module imports nothing else
of act-jax, so every layer can use it.
"""

from __future__ import annotations

import os

from absl import logging
import jax
from jax.experimental import multihost_utils

ENV_COORD = 'ACT_JAX_COORDINATOR'
ENV_NUM = 'ACT_JAX_NUM_PROCESSES'
ENV_PID = 'ACT_JAX_PROCESS_ID'
ENV_AUTO = 'ACT_JAX_AUTO_DISTRIBUTED'


def maybe_initialize(coordinator_address: str | None = None,
                     num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Initializes jax.distributed if a multi-process run is configured.

  Returns:
    True when jax.distributed was initialized.

  Raises:
    ValueError naming the missing setting when only some are given.
  """
  if os.environ.get(ENV_AUTO) == '1':
    jax.distributed.initialize()
    return True
  coord = coordinator_address or os.environ.get(ENV_COORD)
  num = num_processes or os.environ.get(ENV_NUM)
  pid = process_id if process_id is not None else os.environ.get(ENV_PID)
  if num is None or int(num) <= 1:
    return False
  if coord is None or pid is None:
    raise ValueError(
        f'{ENV_NUM}={num} needs {ENV_COORD} (host:port of process 0) and '
        f'{ENV_PID} (this process index)')
  jax.distributed.initialize(coordinator_address=coord,
                             num_processes=int(num), process_id=int(pid))
  logging.info('jax.distributed: process %d of %d, %d local / %d global '
               'devices', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """True on the process that writes shared artifacts (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (a no-op in one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
