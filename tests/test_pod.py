"""Pod reality: every path on gs:// (a real GCS emulator in its own process, `conftest.gcs`), several hosts for real
(N=2 `launch.train` / `launch.prepare_data` processes on localhost, jax.distributed with a local coordinator, 4 CPU
devices each, gloo collectives), and preemption and faults across hosts.

The reference is one process with 8 CPU devices and jax.distributed initialised for that one process: jax's CPU
collectives then run through gloo as on several hosts (measured: XLA's in-process CPU all-reduce sums in another
order, so without the runtime the same sum differs in the last bits, ~2e-4 on a sum of 8 x 1000 floats). The run
config is stage2:tiny, smaller still (one block per tower, 4 steps of 24 rows, one mixture phase), on a dataset
prepared by `launch.prepare_data` onto gs:// and read in 2 streams (`data.streams`), so any host count dividing 2
feeds the same global batch. All processes share one persistent compilation cache: the reference and the two-host
program are each compiled once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath
from PIL import Image

from tests.cli_helpers import run_cli, user_env

from janusflow_jax import paths  # also: fresh gs:// listings in this process (subprocesses write there)

ROOT = Path(__file__).parents[1]
WORDS = "a the red blue cat dog bird photo of what is this on in big small sky grass tree two".split()
STEPS = 4
# stage2:tiny with one block per tower, 24 rows (8 per data type) and one mixture phase: one program to compile.
OVERRIDES = {
    "data.source": "prepared", "data.streams": 2,
    "model.gen_encoder.in_channels": 192, "model.gen_decoder.out_channels": 192,  # the prepared space_to_depth latents
    "model.llm.num_layers": 1, "model.und_encoder.depth": 1, "model.gen_encoder.num_blocks": 1,
    "model.gen_decoder.num_blocks": 1, "model.repa.layer": 1,
    "batch_size": 24, "steps": STEPS, "mixture": ((STEPS, (1, 1, 1)),),
}


def _flag(key, value) -> str:
    return f"--config.{key}={value if isinstance(value, str) else repr(value).replace(' ', '')}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A launch.train stand-in that injects one fault: "<kind>:<host>:<step>" with kind sigterm (the host sends itself
# SIGTERM after that step), sigkill (SIGKILL after that step: a crashed host) or killsave (SIGKILL while that step's
# asynchronous save is writing: once its first object exists on gs://, before the commit marker).
DRIVER = """
import json, os, signal, sys, time
from janusflow_jax import hosts

workdir, fault, address, count, pid, heartbeat, overrides = sys.argv[1:]
if int(count):
    hosts.initialize(address, int(count), int(pid), heartbeat_timeout_seconds=int(heartbeat))
import jax
from configs import stage2
from janusflow_jax.train import checkpointing
from janusflow_jax.train import loop as trainer

config = stage2.get_config("tiny")
for key, value in json.loads(overrides).items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = tuple((a, tuple(b)) for a, b in value) if key == "mixture" else value
kind, host, at = fault.split(":")
mine = jax.process_index() == int(host)


def fault_after(step, state, metrics):
    if mine and step == int(at) and kind in ("sigterm", "sigkill"):
        print(f"host {host}: {kind} after step {step}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)


if kind == "killsave":
    from etils import epath
    real_save = checkpointing.save_state

    def save_and_die(mngr, plan, state, source, step):
        real_save(mngr, plan, state, source, step)
        if mine and step == int(at):
            folder = epath.Path(workdir) / "checkpoints" / str(step)
            while not (folder.exists() and any(folder.iterdir())):
                time.sleep(0.005)
            os.kill(os.getpid(), signal.SIGKILL)

    checkpointing.save_state = save_and_die
trainer.train(config, workdir, callbacks=[fault_after], progress=False)
"""


@pytest.fixture(scope="module")
def env(gcs, tmp_path_factory):
    return dict(user_env(tmp_path_factory.mktemp("jax_cache")), JAX_PLATFORMS="cpu")


def _devices(env, count: int) -> dict:
    return dict(env, XLA_FLAGS=f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count={count}".strip())


def _launch(env, argv, hosts: int, cwd, per_host=None, timeout=600) -> list[dict]:
    """Starts `argv` as `hosts` processes of one jax.distributed run (a local coordinator), each with 8 / hosts CPU
    devices; `per_host(i)` adds arguments. Returns per process {rc, out, err, seconds (to its exit)}."""
    port = _free_port()
    start = time.monotonic()
    procs = []
    for i in range(hosts):
        args = [*argv, f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={hosts}", f"--process_id={i}"]
        procs.append(subprocess.Popen(args + (per_host(i) if per_host else []), cwd=cwd, env=_devices(env, 8 // hosts),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return _collect(procs, start, timeout)


def _collect(procs, start, timeout) -> list[dict]:
    import threading

    results = [None] * len(procs)

    def wait(i, p):
        out, err = p.communicate()
        results[i] = dict(rc=p.returncode, out=out, err=err, seconds=time.monotonic() - start)

    threads = [threading.Thread(target=wait, args=(i, p)) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for t in threads:
        t.join()
    return results


def _train_argv(data: str, workdir: str, **more) -> list[str]:
    return [sys.executable, "-m", "launch.train", "--config=stage2:tiny", f"--workdir={workdir}", "--progress=false",
            _flag("data.dir", data), *(_flag(k, v) for k, v in {**OVERRIDES, **more}.items())]


def _launch_driver(env, data, workdir, fault, hosts, cwd, heartbeat=100, **more) -> list[dict]:
    """The DRIVER on `hosts` processes of one jax.distributed run."""
    port = _free_port()
    start = time.monotonic()
    procs = []
    overrides = json.dumps({**OVERRIDES, **more, "data.dir": data})
    for i in range(hosts):
        argv = [sys.executable, "-c", DRIVER, workdir, fault, f"127.0.0.1:{port}", str(hosts), str(i), str(heartbeat),
                overrides]
        procs.append(subprocess.Popen(argv, cwd=cwd, env=_devices(env, 8 // hosts), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return _collect(procs, start, 600)


def _said(result) -> list[str]:
    """A process's stdout lines, less gloo's own connection notices (its C++ prints them on every process, from
    several threads: a notice can be cut in two, e.g. "[Gloo] Rank " + "7 is connected to 7 peer ranks. ...")."""
    return [line for line in result["out"].splitlines()
            if line.strip() and not line.startswith("[Gloo]") and "peer ranks" not in line]


def _ok(results):
    for i, r in enumerate(results):
        assert r["rc"] == 0, f"process {i} exited {r['rc']}:\n{r['err'][-4000:]}"


def _params(workdir, weights):
    from janusflow_jax import checkpoint

    return checkpoint.load_params(f"{workdir}/checkpoints", weights=weights)[1]


def _assert_same_run(a: str, b: str):
    """Bitwise: parameters and EMA of the final checkpoint, and every logged loss."""
    for weights in ("params", "ema"):
        x, y = _params(a, weights), _params(b, weights)
        assert jax.tree.structure(x) == jax.tree.structure(y)
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
            np.testing.assert_array_equal(u, v)
    rows = [[json.loads(line) for line in epath.Path(w, "metrics.jsonl").read_text().splitlines()] for w in (a, b)]
    keys = ("step", "loss", "ar", "rf", "repa", "grad_norm")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
    assert [r["step"] for r in rows[0]] == list(range(1, STEPS + 1))


def _objects(prefix: str) -> list[str]:
    """Every object name under a gs:// prefix, relative to it."""
    root = epath.Path(prefix)
    out = []

    def visit(folder):
        for p in folder.iterdir():
            if p.is_dir():
                visit(p)
            else:
                out.append(os.fspath(p)[len(os.fspath(root)) + 1:])

    if root.exists():
        visit(root)
    return sorted(out)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def inputs(gcs, tmp_path_factory) -> tuple[Path, str]:
    """Images, manifests and a tokenizer, written locally and uploaded to gs:// (the preparation job reads them
    there)."""
    from janusflow_jax.data.processor import make_tokenizer

    root = tmp_path_factory.mktemp("pod_inputs")
    rng = np.random.default_rng(0)
    gen, und, text = [], [], []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (64 + 16 * (i % 2), 64, 3), np.uint8)).save(root / f"{i}.png")
        gen.append({"image": f"{i}.png", "caption": f"a photo of {WORDS[i]}"})
        und.append({"image": f"{i}.png", "question": f"what is {i}", "answer": " ".join(WORDS[i:i + 1 + i % 4])})
        text.append({"text": " ".join(WORDS[i:i + 4 + i % 5])})
    for name, rows in (("gen", gen), ("und", und), ("text", text)):
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    make_tokenizer(root / "tokenizer", WORDS + [str(i) for i in range(10)])
    paths.upload_tree(root, f"{gcs}/inputs")
    return root, f"{gcs}/inputs"


def _prepare_argv(remote_inputs: str, out: str) -> list[str]:
    job = dict(out=out, tokenizer=f"{remote_inputs}/tokenizer", gen_jsonl=f"{remote_inputs}/gen.jsonl",
               und_jsonl=f"{remote_inputs}/und.jsonl", text_jsonl=f"{remote_inputs}/text.jsonl", seq_len=64,
               prompt_len=8, records_per_shard=4, encode_batch_per_device=1, num_threads=2, system_prompt="")
    return [sys.executable, "-m", "launch.prepare_data", "--config=configs/prepare_data.py:tiny", "--progress=false",
            *(f"--config.prepare.{k}={v}" for k, v in job.items())]


@pytest.fixture(scope="module")
def dataset(gcs, inputs, env) -> str:
    """`launch.prepare_data` in one process, inputs and output on gs://."""
    out = f"{gcs}/prepared"
    run = subprocess.run(_prepare_argv(inputs[1], out), cwd=ROOT, env=_devices(env, 8), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"prepared 8 gen / 8 und / 8 text records in {out}" in run.stdout
    return out


@pytest.fixture(scope="module")
def reference(gcs, dataset, env, tmp_path_factory) -> dict:
    """`launch.train` in one process with 8 devices, workdir and data on gs://, from an empty directory."""
    cwd = tmp_path_factory.mktemp("pod_cwd")
    workdir = f"{gcs}/reference"
    (result,) = _launch(env, _train_argv(dataset, workdir), 1, cwd)
    _ok([result])
    return dict(result, workdir=workdir, cwd=cwd)


# --------------------------------------------------------------------------------------------------------- GCS
def test_training_on_gcs_keeps_everything_there(reference):
    assert not list(reference["cwd"].iterdir())  # nothing local: no "gs:" folder, no stray files
    workdir = reference["workdir"]
    names = _objects(workdir)
    steps = sorted({n.split("/")[1] for n in names if n.startswith("checkpoints/")})
    assert steps == ["2", "4"] and "checkpoints/4/commit_success.txt" in names
    assert [n for n in names if n.startswith("tensorboard/events.out.tfevents")]
    assert epath.Path(workdir, "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in epath.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["ar"] > 0 and r["rf"] > 0 for r in rows)
    out = reference["out"]
    assert len([line for line in out.splitlines() if line.startswith("step ")]) == STEPS
    assert f"checkpoints in {workdir}/checkpoints" in out


def test_kill_during_an_async_save_on_gcs_resumes_from_the_previous_step(gcs, dataset, reference, env, tmp_path):
    workdir = f"{gcs}/killed_in_save"
    (killed,) = _launch_driver(env, dataset, workdir, "killsave:0:4", 1, tmp_path)
    assert killed["rc"] == -signal.SIGKILL, killed["err"][-3000:]
    names = _objects(f"{workdir}/checkpoints")
    assert any(n.startswith("4/") for n in names) and "4/commit_success.txt" not in names  # a half-written step
    assert "2/commit_success.txt" in names
    from janusflow_jax.train import recipe

    assert recipe.finished(workdir, 2) and not recipe.finished(workdir, 4)  # the stage hand-off's test on gs://
    (resumed,) = _launch(env, _train_argv(dataset, workdir), 1, tmp_path)
    _ok([resumed])
    assert f"resuming from step 2 in {workdir}/checkpoints" in resumed["out"]
    assert recipe.finished(workdir, 4)
    _assert_same_run(reference["workdir"], workdir)


def test_bad_bucket_and_missing_credentials_are_one_line(dataset, env, tmp_path, monkeypatch):
    run = subprocess.run(_train_argv(dataset, "gs://no-such-bucket/run"), cwd=tmp_path, env=_devices(env, 1),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "error: gs://no-such-bucket does not exist (or these credentials cannot list it): create it (gcloud storage "
        "buckets create gs://no-such-bucket) or fix the path")
    assert not epath.Path("gs://no-such-bucket").exists()  # and nothing created it

    monkeypatch.delenv("STORAGE_EMULATOR_HOST")  # as outside the tests: credentials are looked up
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    with pytest.raises(paths.RemoteAccessError, match=r"^no Google Cloud credentials for gs://b \(File .*absent.json "
                                                       r"was not found.\): on a TPU VM"):
        paths.check_access("gs://b/run", "/local/dir")


def test_convert_generate_and_chat_with_gcs_paths(gcs, inputs, tmp_path, capsys):
    """launch.convert to and from gs:// (official layout uploaded with config.json last; orbax native), then
    launch.generate and launch.chat from the gs:// orbax checkpoint, images read from and written to gs://."""
    from safetensors.numpy import load_file

    from janusflow_jax.convert import vae as vae_convert
    from janusflow_jax.data.processor import Processor
    from janusflow_jax.models import vae as vae_lib
    from launch import chat as chat_cli
    from launch import convert as convert_cli
    from launch import generate as generate_cli

    official, orbax, again = f"{gcs}/official", f"{gcs}/orbax", f"{gcs}/again"
    assert run_cli(convert_cli, "--to=torch", "--random_config=tiny", f"--out={official}") == 0
    assert _objects(official) == ["config.json", "model.safetensors"]
    extras = tmp_path / "extras"  # the tokenizer/processor files and a tiny VAE, beside the weights
    Processor.from_pretrained(inputs[0] / "tokenizer", num_image_tokens=16, image_size=64).save_pretrained(extras)
    vae_config = vae_lib.VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
    vae_convert.to_diffusers(vae_config, vae_lib.init_vae_params(vae_config, jax.random.key(1)), f"{official}/vae")
    paths.upload_tree(extras, official)

    assert run_cli(convert_cli, "--to=jax", f"--torch_dir={official}", f"--out={orbax}") == 0
    names = _objects(orbax)
    assert "0/commit_success.txt" in names and "tokenizer.json" in names and "vae/config.json" in names
    assert run_cli(convert_cli, "--to=torch", f"--ckpt={orbax}", f"--out={again}") == 0
    with paths.local_copy(official) as a, paths.local_copy(again) as b:
        first, second = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    capsys.readouterr()

    samples = f"{gcs}/samples"
    assert run_cli(generate_cli, f"--checkpoint={orbax}", f"--out={samples}", "--prompt=a red cat", "--num_images=2",
                   "--steps=2") == 0
    assert _objects(samples) == ["000_00.png", "000_01.png", "grid.png"]
    assert f"to {samples}" in capsys.readouterr().out
    assert run_cli(chat_cli, f"--checkpoint={orbax}", f"--image={inputs[1]}/0.png", "--question=what is this",
                   "--max_new_tokens=4") == 0
    assert capsys.readouterr().out.strip()


def test_a_profile_to_gcs_is_traced_locally_and_copied(gcs):
    """jax.profiler writes local files only: the trace goes to a temporary directory and then to gs://, where
    `summarize` reads it."""
    import jax.numpy as jnp

    from janusflow_jax.perf import profile

    x = jnp.ones((64, 64))
    step = jax.jit(lambda a: a @ a)
    step(x).block_until_ready()
    trace = profile.trace(lambda: step(x), 2, f"{gcs}/profile")
    assert os.fspath(trace).startswith(f"{gcs}/profile/") and os.fspath(trace).endswith("perfetto_trace.json.gz")
    assert profile.summarize(trace, 2)["op_seconds"] > 0


# ------------------------------------------------------------------------------------------------ several hosts
def test_prepare_data_on_two_hosts_writes_the_same_dataset(inputs, dataset, env, tmp_path):
    out = tmp_path / "prepared"
    results = _launch(env, _prepare_argv(inputs[1], str(out)), 2, ROOT)
    _ok(results)
    assert "prepared 8 gen / 8 und / 8 text" in results[0]["out"] and not _said(results[1])
    local = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    remote = {name: epath.Path(dataset, name).read_bytes() for name in _objects(dataset)}
    meta = [json.loads(files.pop("metadata.json")) for files in (local, remote)]
    assert local == remote  # every shard and marker, byte for byte
    for m in meta:
        m["config"]["prepare"]["out"] = "OUT"
    assert meta[0] == meta[1]


def test_two_hosts_preempted_on_one_save_the_same_step_and_train_bit_for_bit_like_one_process(
        reference, dataset, env, tmp_path):
    """Two hosts, SIGTERM on host 1: every host saves the same step and exits; the relaunch resumes and ends bit for
    bit where the one-process reference ends. On a mesh whose data axis spans the hosts as two slices over DCN
    (`mesh.dcn_data`: processes stand for slices on CPUs), which places the devices as the plain mesh does: the same
    program, the same numbers."""
    workdir = tmp_path / "preempted"
    dcn = {"mesh.dcn_data": 2}
    results = _launch_driver(env, dataset, str(workdir), "sigterm:1:1", 2, tmp_path, **dcn)
    _ok(results)  # every host exits cleanly
    saved = [int(line.split()[3]) for line in results[0]["out"].splitlines() if line.startswith("preempted: saved")]
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, results[0]["out"]
    step = saved[0]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == sorted({2, step})
    assert sorted(p.name for p in (workdir / "checkpoints" / str(step) / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]  # both hosts saved that step
    resumed = _launch(env, _train_argv(dataset, str(workdir), **dcn), 2, tmp_path)
    _ok(resumed)
    assert f"resuming from step {step}" in resumed[0]["out"]
    assert "jax.distributed: 2 processes, 8 devices (4 per process)" in resumed[0]["out"]
    assert len([line for line in _said(resumed[0]) if line.startswith("step ")]) == STEPS - step
    assert not _said(resumed[1])  # one progress log: process 0's
    _assert_same_run(reference["workdir"], str(workdir))
    # Each host saved its own reader's position (grain: one file per process).
    assert sorted(p.name for p in (workdir / "checkpoints" / str(STEPS) / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]


def test_a_killed_host_stops_the_others_and_the_relaunch_resumes_on_gcs(gcs, reference, dataset, env, tmp_path):
    heartbeat = 10
    workdir = f"{gcs}/killed_host"
    results = _launch_driver(env, dataset, workdir, "sigkill:1:3", 2, tmp_path, heartbeat=heartbeat)
    survivor, dead = results
    assert dead["rc"] == -signal.SIGKILL, dead["err"][-3000:]
    detected = survivor["seconds"] - dead["seconds"]
    assert survivor["rc"] != 0 and detected < heartbeat + 30, (detected, survivor["err"][-3000:])
    assert "stopped sending heartbeats" in survivor["err"]  # the runtime says what happened
    assert f"a process silent for {heartbeat} s aborts the run on every host" in survivor["out"]
    print(f"a killed host was detected by the survivor after {detected:.1f} s (heartbeat timeout {heartbeat} s)")
    resumed = _launch(env, _train_argv(dataset, workdir), 2, tmp_path)
    _ok(resumed)
    assert f"resuming from step 2 in {workdir}/checkpoints" in resumed[0]["out"]
    _assert_same_run(reference["workdir"], workdir)


def test_hosts_must_share_the_config_and_the_workdir(dataset, env, tmp_path):
    argv = _train_argv(dataset, str(tmp_path / "run"))
    mismatched = _launch(env, argv, 2, tmp_path, per_host=lambda i: [f"--config.optimizer.lr={1e-3 * (i + 1)}"])
    unshared = _launch(env, argv, 2, tmp_path, per_host=lambda i: [f"--workdir={tmp_path / f'host{i}'}"])
    for results, message in ((mismatched, "error: the run config differs between hosts: process(es) [1] do not "
                                          "match process 0"),
                             (unshared, "is not shared by the hosts: process(es) [1] do not see the file process 0 "
                                        "wrote there")):
        for r in results:
            assert r["rc"] == 1 and "Traceback" not in r["err"], r["err"][-3000:]
            assert message in r["err"].strip().splitlines()[-1]
