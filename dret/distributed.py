"""Multi-host start-up: `jax.distributed.initialize` from flags or the scheduler's environment.

Where the coordinator comes from, first match wins:
  1. explicit flags (--coordinator_address host:port --num_processes N --process_id i);
  2. DRET_COORDINATOR_ADDRESS, DRET_NUM_PROCESSES and DRET_PROCESS_ID (or a Kubernetes indexed Job's
     JOB_COMPLETION_INDEX), as launch/jobset.yaml sets them;
  3. SLURM with more than one task (srun, one task per node) or DRET_DISTRIBUTED=auto (launch/tpu_vm.sh):
     JAX reads the cluster itself.
Anything else is one process, and nothing is initialised.
"""

from __future__ import annotations

import logging
import os

import jax

from dret.errors import DretError

log = logging.getLogger(__name__)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise DretError(f"{name}={value!r}: expected an integer") from None


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Joins this process to the run's other processes, or does nothing for a one-process run."""
    coordinator_address = coordinator_address or os.environ.get("DRET_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or _env_int("DRET_NUM_PROCESSES", 0)
    if process_id < 0:
        process_id = _env_int("DRET_PROCESS_ID", _env_int("JOB_COMPLETION_INDEX", -1))
    # CPU devices of several processes talk through gloo; GPUs and TPUs ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DretError(f"coordinator {coordinator_address} needs num_processes >= 1 and 0 <= process_id < "
                            f"num_processes (got {num_processes} and {process_id})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _env_int("SLURM_NTASKS", 1) > 1 or os.environ.get("DRET_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
