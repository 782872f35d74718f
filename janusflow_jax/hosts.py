"""Several hosts: starting the JAX distributed runtime, and the checks that every host runs the same job in one place.

On a TPU pod slice every host runs the same command. `initialize` starts `jax.distributed` from the flags a person
gives (`--coordinator_address`, `--num_processes`, `--process_id`: jax's own names) or, with none given, from what jax
detects (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes); with nothing to detect the run stays single-process.

Once the runtime is up it watches the hosts: a host that sends no heartbeat for `heartbeat_timeout_seconds` (killed,
hung, lost) makes the runtime abort every other host, so a pod never hangs on a dead peer; rerunning the same command
on every host resumes from the newest complete checkpoint. It also owns SIGTERM: jax's preemption sync manager
catches it on any host and agrees with the others on a step at which every host saves (`reached_preemption`).

`check_same_config` and `check_shared_directory` turn the two silent ways a multi-host run goes wrong (hosts started
with different flags; a "shared" directory that is in fact each host's own disk) into one-line errors on every host.
"""

from __future__ import annotations

import hashlib
import os
import secrets

import numpy as np

from janusflow_jax import paths


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_seconds: int = 100) -> bool:
    """Starts `jax.distributed` (before any other jax call). Returns whether it runs (False: single-process)."""
    import jax

    given = any(v is not None for v in (coordinator_address, num_processes, process_id))
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    except ValueError as e:
        # jax's detection found no cluster (no TPU pod, SLURM, MPI, Kubernetes, JAX_COORDINATOR_ADDRESS): one process.
        if given or "coordinator_address should be defined" not in str(e):
            raise
        return False
    if jax.process_index() == 0:
        print(f"jax.distributed: {jax.process_count()} processes, {jax.device_count()} devices "
              f"({jax.local_device_count()} per process); a process silent for {heartbeat_timeout_seconds} s "
              f"aborts the run on every host (rerun the same command on every host to resume)", flush=True)
    return True


def runtime_initialized() -> bool:
    """Whether jax.distributed runs in this process (then jax, not Python, handles SIGTERM)."""
    import jax

    return jax.distributed.is_initialized()


def barrier(name: str, timeout_s: int = 3600):
    """Every host waits here until all have arrived (`name`: unique per use). The distributed runtime's barrier, not
    a device collective: hosts that reach their first collective far apart (one loads its programs from the
    compilation cache, another compiles them) would otherwise outlast the collectives' connection timeout."""
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the runtime's client (jax exports no barrier with a timeout of its own)

    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def _allgather(x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def check_same_config(text: str, what: str = "run config"):
    """Every host compares the hash of `text` (e.g. the config's JSON) with every other's; a mismatch raises
    ValueError on every host, naming the hosts that differ from process 0."""
    import jax

    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    digests = _allgather(digest)
    differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
    if differ:
        raise ValueError(f"the {what} differs between hosts: process(es) {differ} do not match process 0; start "
                         f"every host with the same command and flags")


def check_shared_directory(directory: str | os.PathLike, what: str = "directory"):
    """Every host must see the same `directory` (a local path on a multi-host run must be a shared file system;
    gs:// is shared by construction and not checked). Process 0 writes a marker named by a fresh token there; every
    host looks for it; all agree, then process 0 removes it. Raises ValueError on every host otherwise."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1 or paths.is_remote(directory):
        return
    directory = paths.user_path(directory)
    token = np.frombuffer(secrets.token_bytes(8), np.uint8)
    token = np.asarray(multihost_utils.broadcast_one_to_all(token)).tobytes().hex()  # process 0's
    marker = directory / f".janusflow-shared-{token}"
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"written by process 0 of {jax.process_count()} to check that every host sees {directory}\n")
    multihost_utils.sync_global_devices("janusflow_jax.hosts: shared-directory marker written")
    seen = _allgather(np.int32(marker.exists()))
    multihost_utils.sync_global_devices("janusflow_jax.hosts: shared-directory marker checked")
    if jax.process_index() == 0:
        marker.unlink()
    missing = [i for i, s in enumerate(np.ravel(seen)) if not s]
    if missing:
        raise ValueError(f"the {what} {directory} is not shared by the hosts: process(es) {missing} do not see the "
                         f"file process 0 wrote there; use gs://... or a file system every host mounts")
