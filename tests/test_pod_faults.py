"""Pod faults that would otherwise hang or lose a run: a host stuck in its data source, the coordinator killed, and the
start-up checks that turn a host's mistake into one line on every host (different workdirs, no write access, a mesh
that does not match the slices). Several processes of one jax.distributed run on localhost, workdirs on the GCS
emulator (tests/pod_helpers.py: the same tiny stage-2 run, dataset and one-process reference as tests/test_pod.py).

Every expectation about a relaunch follows what was committed before the fault (the checkpoint directory), not the
timing; the times to detect a fault are measured and printed, bounded loosely (a loaded 2-core machine)."""

from __future__ import annotations

import re
import subprocess
import sys
import types

import pytest

from tests.pod_helpers import (_assert_same_run, _committed, _devices, _free_port, _launch, _launch_driver,
                               _objects, _ok, _train_argv)

from janusflow_jax import hosts
from janusflow_jax.train import watchdog

BOUND = 30.0  # the watchdog's bound in the scenarios (seconds; a step takes ~2.5 s on 2 loaded cores)
HEARTBEAT = 10


# ------------------------------------------------------------------------------------------------ the watchdog
def test_the_watchdog_names_the_host_the_step_and_what_it_waited_on():
    exits = []
    dog = watchdog.Watchdog(seconds=0, floor_seconds=2.0, step_multiple=10.0, host="host 1 of 2 (h)",
                            exit=exits.append)
    assert dog.bound() == 2.0  # no step measured yet: the floor
    t0 = dog._last
    with dog.paused():  # a compile: not timed, and the clock restarts after it
        assert dog.check(now=t0 + 100) is None
    with dog.waiting("step", 1):  # the first step after it: at least the floor and twice the pause
        assert dog.check(now=dog._last + 2.5) is None and "step 1 waiting on step" in dog.check(now=dog._last + 3.5)
        dog._pause_seconds = 30.0  # (a compile of 30 s: another host may need as long)
        assert dog.check(now=dog._last + 59) is None and "(bound 60 s)" in dog.check(now=dog._last + 61)
    dog.completed(1)  # the first step after a pause is not measured
    for step in (2, 3, 4):
        dog._last -= 0.5  # each step took 0.5 s
        dog.completed(step)
    assert dog._steps == pytest.approx([0.5, 0.5, 0.5], abs=0.05) and dog.bound() == pytest.approx(5.0, abs=0.5)
    with dog.waiting("data", 5):
        assert dog.check(now=dog._last + 4.0) is None
        line = dog.check(now=dog._last + 6.0)
    assert re.fullmatch(r"error: host 1 of 2 \(h\): no step completed in 6.0 s \(bound 5.0 s\): step 5 waiting on "
                        r"data; exiting \(code 75\) .*", line), line
    with dog.waiting("step", 5):  # waiting on the peers: half a bound more, so that the stuck host speaks first
        assert dog.check(now=dog._last + 6.0) is None
        assert "waiting on step" in dog.check(now=dog._last + 8.0)
    assert not exits
    fixed = watchdog.Watchdog(seconds=0.2, host="host 0 of 1 (h)", poll_seconds=0.05, exit=exits.append).start()
    fixed.completed(6)
    with fixed.waiting("checkpoint", 7):
        deadline = watchdog.time.monotonic() + 5
        while not exits and watchdog.time.monotonic() < deadline:
            watchdog.time.sleep(0.05)
    fixed.stop()
    assert exits == [watchdog.EXIT_CODE] and "step 7 waiting on checkpoint" in fixed.fired
    assert watchdog.Watchdog(seconds=-1).start()._thread is None  # off


def _device(slice_index, process_index, platform="tpu"):
    return types.SimpleNamespace(slice_index=slice_index, process_index=process_index, platform=platform)


def test_dcn_data_must_match_the_slices():
    two_slices = [_device(s, p) for s in (0, 1) for p in (2 * s, 2 * s + 1) for _ in range(4)]
    hosts.check_slices(2, two_slices)
    with pytest.raises(ValueError, match=r"^the job spans 2 slices \(jax devices' slice_index\) but mesh.dcn_data is "
                                         r"1: set --config.mesh.dcn_data=2 "):
        hosts.check_slices(1, two_slices)  # a multi-slice job without dcn_data
    with pytest.raises(ValueError, match=r"spans 2 slices .* but mesh.dcn_data is 4: set --config.mesh.dcn_data=2"):
        hosts.check_slices(4, two_slices)
    one_slice = [_device(0, p) for p in range(4) for _ in range(4)]
    hosts.check_slices(1, one_slice)
    with pytest.raises(ValueError, match=r"^mesh.dcn_data is 2 but the job spans 1 slice: set "
                                         r"--config.mesh.dcn_data=1$"):
        hosts.check_slices(2, one_slice)
    cpus = [_device(0, p, "cpu") for p in range(2) for _ in range(4)]  # processes stand for slices
    hosts.check_slices(2, cpus)
    with pytest.raises(ValueError, match=r"spans 1 slice \(on cpu the 2 process\(es\) stand for slices\): set "
                                         r"--config.mesh.dcn_data=2"):
        hosts.check_slices(4, cpus)


# ------------------------------------------------------------------------------------- start-up checks, 2 hosts
CHECKS = """
import json, sys
from janusflow_jax import hosts

address, pid, ok_dir, readonly, local = sys.argv[1:]
hosts.initialize(address, 2, int(pid))
said = {}  # written to a file: the runtime's own C++ logging shares stdout, unsynchronised with print
import jax
from janusflow_jax import sharding


def attempt(name, fn):
    try:
        fn()
        said[name] = "ok"
    except ValueError as e:
        said[name] = str(e)


mine = jax.process_index()
attempt("workdir", lambda: hosts.check_same_config(f"{ok_dir}/run{mine}", "workdir", show=True))
attempt("writable", lambda: hosts.check_writable(readonly if mine == 1 else ok_dir, "workdir"))
attempt("writable_all", lambda: hosts.check_writable(ok_dir, "workdir"))
attempt("shared", lambda: hosts.check_shared_directory(f"{local}/host{mine}", "workdir"))
attempt("dcn_data", lambda: sharding.make_mesh(dcn_data=4))
attempt("dcn_data_ok", lambda: sharding.make_mesh(dcn_data=2))
with open(f"{local}/said{mine}.json", "w") as f:
    json.dump(said, f)
"""


@pytest.fixture(scope="module")
def readonly(gcs) -> str:
    """A bucket into which the emulator refuses every upload (conftest: a name ending in -readonly)."""
    import fsspec

    fsspec.filesystem("gs").mkdir("janusflow-readonly")
    return "gs://janusflow-readonly"


@pytest.mark.slow  # jax.distributed processes on the GCS emulator
def test_a_host_mistake_is_one_line_on_every_host(gcs, readonly, pod_env, tmp_path):
    import json

    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", CHECKS, f"127.0.0.1:{port}", str(i), f"{gcs}/checks",
                               f"{readonly}/run", str(tmp_path)], cwd=tmp_path,
                              env=_devices(pod_env, 4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    said = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        said.append(json.loads((tmp_path / f"said{len(said)}.json").read_text()))
    for i, got in enumerate(said):
        assert got["workdir"] == (f"the workdir differs between hosts: process(es) [1] do not match process 0 "
                                  f"(process {i} has {gcs}/checks/run{i}); start every host with the same command "
                                  f"and flags")
        assert got["writable"].startswith("cannot write to the workdir ") and "process(es) [1] could not write" in \
            got["writable"] and "choose another workdir" in got["writable"]
        assert ("Forbidden" in got["writable"]) == (i == 1)  # each host says its own reason
        assert got["writable_all"] == "ok" and got["dcn_data_ok"] == "ok"
        assert got["shared"].endswith("is not shared by the hosts: process(es) [1] do not see the file process 0 "
                                      "wrote there; use gs://... or a file system every host mounts")
        assert got["dcn_data"] == ("mesh.dcn_data is 4 but the job spans 1 slice (on cpu the 2 process(es) stand "
                                   "for slices): set --config.mesh.dcn_data=2")
    assert _objects(f"{gcs}/checks") == []  # the probes were deleted


@pytest.mark.slow  # jax.distributed processes on the GCS emulator
def test_a_read_only_workdir_is_one_line(readonly, pod_dataset, pod_env, tmp_path):
    run = subprocess.run(_train_argv(pod_dataset, f"{readonly}/run"), cwd=tmp_path,
                         env=_devices(pod_env, 8), capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write to the workdir gs://janusflow-readonly/run: process(es) [0] could "
                           "not write a file there (OSError: Forbidden"), last


# --------------------------------------------------------------------------------------- faults, 2 hosts, gs://
def _tails(results) -> str:
    """Each host's exit code and last lines (for a failing assertion)."""
    return "\n".join(f"host {i} rc {r['rc']}:\n" + "\n".join(
        [line for line in r["err"].splitlines() if line.strip() and not line.startswith(("    @", "  "))][-8:])
        for i, r in enumerate(results))


def _fault_time(result) -> float:
    (line,) = [line for line in result["err"].splitlines() if line.startswith("fault ")]
    return float(line.split()[-1])


@pytest.mark.slow  # jax.distributed processes on the GCS emulator
def test_a_hung_host_and_a_dead_coordinator_end_every_host_and_the_relaunch_resumes_bit_for_bit(
        gcs, pod_reference, pod_dataset, pod_env, tmp_path):
    """Host 1's data source blocks after step 3: its watchdog names it and exits; host 0 does not wait forever. The
    relaunch resumes from the newest committed step, and process 0 (the coordinator) is killed after step 3: host 1
    exits non-zero. The next relaunch resumes, and host 1 is killed after step 3: the coordinator sees its heartbeats
    stop and exits. The last relaunch ends bit for bit where the one-process reference ends."""
    workdir = f"{gcs}/faults"
    # The floor covers only the first step after a start or a compile: hosts restore, compile (or load the compiled
    # program) and open their readers at very different speeds on a loaded machine (seen: > 200 s apart).
    dog = {"watchdog.seconds": BOUND, "watchdog.floor_seconds": 600.0}
    measured = {}

    hung = _launch_driver(pod_env, pod_dataset, workdir, "hang:1:3", 2, tmp_path, heartbeat=HEARTBEAT, **dog)
    struck = _fault_time(hung[1])
    assert hung[1]["rc"] == watchdog.EXIT_CODE, _tails(hung)
    (line,) = [line for line in hung[1]["err"].splitlines() if line.startswith("error: host 1 of 2 ")]
    assert re.fullmatch(rf"error: host 1 of 2 \(.+\): no step completed in \d+ s \(bound {BOUND:.0f} s\): step 4 "
                        r"waiting on data; exiting \(code 75\) so that every host stops and the job restarts \(rerun "
                        r"the same command on every host to resume\)", line), line
    assert hung[0]["rc"] != 0, _tails(hung)
    measured["hung host exits"] = hung[1]["ended"] - struck
    measured["hung host: the other exits"] = hung[0]["ended"] - struck
    assert measured["hung host exits"] < BOUND + 30 and measured["hung host: the other exits"] < 1.5 * BOUND + 60
    committed = _committed(workdir)
    assert set(committed) <= {2}, committed

    dead = _launch_driver(pod_env, pod_dataset, workdir, "sigkill:0:3", 2, tmp_path, heartbeat=HEARTBEAT, **dog)
    survivor, coordinator = dead[1], dead[0]
    assert coordinator["rc"] == -9, _tails(dead)
    if committed:
        assert f"resuming from step {committed[-1]} in {workdir}/checkpoints" in coordinator["out"]
    assert survivor["rc"] != 0, _tails(dead)
    measured["coordinator killed: the other exits"] = survivor["ended"] - _fault_time(coordinator)
    assert measured["coordinator killed: the other exits"] < 1.5 * BOUND + HEARTBEAT + 60
    committed = _committed(workdir)
    assert set(committed) <= {2}, committed

    killed = _launch_driver(pod_env, pod_dataset, workdir, "sigkill:1:3", 2, tmp_path, heartbeat=HEARTBEAT, **dog)
    survivor, gone = killed
    assert gone["rc"] == -9, _tails(killed)
    measured["host 1 killed: the coordinator exits"] = survivor["ended"] - _fault_time(gone)
    assert survivor["rc"] != 0 and measured["host 1 killed: the coordinator exits"] < HEARTBEAT + 30, _tails(killed)
    assert "stopped sending heartbeats" in survivor["err"]  # the runtime says what happened, before the watchdog
    assert f"a process silent for {HEARTBEAT} s aborts the run on every host" in survivor["out"]
    committed = _committed(workdir)  # what the relaunch resumes from: what was committed, not what the clock allowed
    assert set(committed) <= {2}, committed

    resumed = _launch(pod_env, _train_argv(pod_dataset, workdir, **dog), 2, tmp_path)
    _ok(resumed)
    if committed:
        assert f"resuming from step {committed[-1]} in {workdir}/checkpoints" in resumed[0]["out"]
    _assert_same_run(pod_reference["workdir"], workdir)
    print("seconds from the fault to the exit:", {k: round(v, 1) for k, v in measured.items()},
          f"(watchdog bound {BOUND:.0f} s, heartbeat timeout {HEARTBEAT} s)")
    print("host 0 after host 1 hung:", hung[0]["err"].strip().splitlines()[-1][:300])
    print("host 1 after the coordinator died:", dead[1]["err"].strip().splitlines()[-1][:300])
