"""Several hosts: starting the JAX distributed runtime, and the checks that every host runs the same job in one place.

On a TPU pod slice every host runs the same command. `initialize` starts `jax.distributed` from the flags a person
gives (`--coordinator_address`, `--num_processes`, `--process_id`: jax's own names) or, with none given, from what jax
detects (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes); with nothing to detect the run stays single-process.

Once the runtime is up it watches the hosts: a host that sends no heartbeat for `heartbeat_timeout_seconds` (killed,
hung, lost) makes the runtime abort every other host, so a pod never hangs on a dead peer; rerunning the same command
on every host resumes from the newest complete checkpoint. It also owns SIGTERM: jax's preemption sync manager
catches it on any host and agrees with the others on a step at which every host saves (`reached_preemption`).

`check_same_config`, `check_writable`, `check_shared_directory` and `check_slices` turn the silent ways a
multi-host run goes wrong (hosts started with different flags or workdirs; a directory a host cannot write; a "shared"
directory that is in fact each host's own disk; a mesh that does not match the slices) into one-line errors raised on
every host at start, before any host waits on another in a collective.
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
    from janusflow_jax.train import compilation_cache

    compilation_cache.same_cpu_key_on_every_process()  # every process finds the programs process 0 cached
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


def check_same_config(text: str, what: str = "run config", show: bool = False):
    """Every host compares the hash of `text` (e.g. the config's JSON, the workdir) with every other's; a mismatch
    raises ValueError on every host, naming the hosts that differ from process 0 (and, with `show`, this host's
    `text`)."""
    import jax

    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    digests = _allgather(digest)
    differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
    if differ:
        here = f" (process {jax.process_index()} has {text})" if show else ""
        raise ValueError(f"the {what} differs between hosts: process(es) {differ} do not match process 0{here}; "
                         f"start every host with the same command and flags")


def check_writable(directory: str | os.PathLike, what: str = "workdir"):
    """Every host creates `directory` (if needed), writes a probe file of its own there and deletes it; if any host
    cannot, every host raises one ValueError naming the hosts that failed (each its own reason), instead of the first
    checkpoint failing on one host while the others wait for it."""
    import jax

    directory = paths.user_path(directory)
    probe = directory / f".janusflow-write-probe-{jax.process_index()}-{secrets.token_hex(4)}"
    error = ""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("a probe of write access, written and deleted at the start of a run\n")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - permission, read-only bucket, full disk: one line on every host
        error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    ok = np.ravel(_allgather(np.int32(not error))) if jax.process_count() > 1 else [not error]
    failed = [i for i, s in enumerate(ok) if not s]
    if failed:
        raise ValueError(f"cannot write to the {what} {directory}: process(es) {failed} could not write a file there"
                         + (f" ({error})" if error else "") + "; give this account write access (gs://: the "
                         f"roles/storage.objectUser role on the bucket) or choose another {what}")


def slice_count(devices) -> int:
    """The number of slices `devices` span (TPU devices carry `slice_index`; other platforms report one slice)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def check_slices(dcn_data: int, devices):
    """`mesh.dcn_data` must be the number of slices the job spans (jax devices' `slice_index`): a multi-slice job
    without it, or with another number, would fail deep inside jax (or place the data axis across the slow network
    wrongly). On platforms with one slice index (CPUs, GPUs) processes stand for slices, so `dcn_data` > 1 must be the
    number of processes. Raises ValueError (the same on every host: every host sees every device)."""
    devices = list(devices)
    slices = slice_count(devices)
    if slices > 1 and dcn_data != slices:
        raise ValueError(f"the job spans {slices} slices (jax devices' slice_index) but mesh.dcn_data is {dcn_data}: "
                         f"set --config.mesh.dcn_data={slices} (the data axis across the slices)")
    if slices == 1 and dcn_data > 1:
        platform = devices[0].platform
        processes = len({d.process_index for d in devices})
        if platform == "tpu" or dcn_data != processes:
            stand_in = "" if platform == "tpu" else f" (on {platform} the {processes} process(es) stand for slices)"
            raise ValueError(f"mesh.dcn_data is {dcn_data} but the job spans 1 slice{stand_in}: set "
                             f"--config.mesh.dcn_data={1 if platform == 'tpu' else processes}")


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
