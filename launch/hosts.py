"""The flags that start a run on several hosts, shared by `launch.train` and `launch.prepare_data`: jax.distributed's
own names. Given on every host (or none of them: jax then detects a Cloud TPU pod slice, SLURM, Open MPI or
Kubernetes; with nothing to detect the run is single-process):

  python -m launch.train ... --coordinator_address=10.0.0.2:1234 --num_processes=4 --process_id=$RANK
"""

from __future__ import annotations

from absl import flags

_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator (several hosts; default: detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_seconds", 100,
                                  "Several hosts: a host silent this long (killed, hung) aborts the run on every "
                                  "host instead of leaving it hanging.")


def initialize() -> bool:
    """Starts jax.distributed from the flags (or what jax detects); False when the run is single-process."""
    from janusflow_jax import hosts

    return hosts.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _HEARTBEAT.value)
