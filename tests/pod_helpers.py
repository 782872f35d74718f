"""What the pod tests (tests/test_pod.py, tests/test_pod_start.py, tests/test_pod_faults.py) share: several
`launch.train` / DRIVER processes of one jax.distributed run on localhost, the GCS emulator's listings, and the
session's fixtures (registered in conftest.py, so one dataset and one one-process reference serve the three files).

The run config is stage2:tiny, smaller still (one block per tower, 4 steps of 24 rows, one mixture phase), on a
dataset prepared by `launch.prepare_data` onto gs:// and read in 2 streams (`data.streams`), so any host count
dividing 2 feeds the same global batch. All processes share one persistent compilation cache: the reference and the
two-host program are each compiled once.
"""

from __future__ import annotations

import json
import os
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

from tests.cli_helpers import user_env

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
    # The step watchdog's floor well above what hosts' start-up and compiles differ by on a loaded 2-core machine
    # (seen: > 200 s): only tests/test_pod_faults.py's hung host is meant to trip it (its own bound).
    "watchdog.floor_seconds": 1800.0,
}


def _flag(key, value) -> str:
    return f"--config.{key}={value if isinstance(value, str) else repr(value).replace(' ', '')}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A launch.train stand-in that injects one fault: "<kind>:<host>:<step>" with kind none, sigterm (after that step the
# host's process group gets SIGTERM: the trainer and its grain workers), sigkill (SIGKILL after that step: a crashed
# host), killsave (SIGKILL while that step's asynchronous save is writing: once its first object exists on gs://,
# before the commit marker), hang (after that step the host's data source blocks forever: a host stuck in a GCS read
# or a grain worker) or restore (the host's process group gets SIGTERM while a resumed run restores, before its first
# step; every host then waits 3 s, so that the notice is agreed on before any step). Each fault but restore prints
# "fault <kind> at <wall clock>" to stderr when it strikes.
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
from tests.pod_helpers import apply

config = apply(stage2.get_config("tiny"), json.loads(overrides))
kind, host, at = fault.split(":")
mine = jax.process_index() == int(host)


def fault_after(step, state, metrics):
    if mine and step == int(at) and kind in ("sigterm", "sigkill", "hang"):
        print(f"host {host}: {kind} after step {step}", file=sys.stderr, flush=True)
        print(f"fault {kind} at {time.time()}", file=sys.stderr, flush=True)
        if kind == "hang":
            hung.append(step)
        elif kind == "sigterm":  # to the host's whole process group (its grain workers too), as a VM shutdown does
            os.killpg(os.getpgid(0), signal.SIGTERM)
        else:
            os.kill(os.getpid(), signal.SIGKILL)


hung = []
if kind == "hang":
    from janusflow_jax.data import loader

    real_take = loader.MixtureIterator.take

    def take(self, sizes):
        while hung:
            time.sleep(1)
        return real_take(self, sizes)

    loader.MixtureIterator.take = take


if kind == "restore":
    real_restore = checkpointing.restore_state

    def restore_and_term(*args):
        out = real_restore(*args)
        if mine:
            os.killpg(os.getpgid(0), signal.SIGTERM)
        time.sleep(3)
        return out

    checkpointing.restore_state = restore_and_term


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


@pytest.fixture(scope="session")
def pod_env(gcs, tmp_path_factory):
    return dict(user_env(), JAX_PLATFORMS="cpu")


def _devices(env, count: int) -> dict:
    return dict(env, XLA_FLAGS=f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count={count}".strip())


def _launch(env, argv, hosts: int, cwd, per_host=None, timeout=600) -> list[dict]:
    """Starts `argv` as `hosts` processes of one jax.distributed run (a local coordinator), each with 8 / hosts CPU
    devices; `per_host(i)` adds arguments. Returns per process {rc, out, err, seconds (to its exit), ended (its exit's
    wall clock)}."""
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
        results[i] = dict(rc=p.returncode, out=out, err=err, seconds=time.monotonic() - start, ended=time.time())

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


def apply(config, overrides: dict):
    """`config` with dotted-key `overrides` (the drivers' way of taking test_pod's flags)."""
    with config.unlocked():
        for key, value in overrides.items():
            *parents, leaf = key.split(".")
            node = config
            for name in parents:
                node = node[name]
            node[leaf] = tuple((a, tuple(b)) for a, b in value) if key == "mixture" else value
    return config


def _launch_script(env, script, args, hosts, cwd, timeout=600) -> list[dict]:
    """`script` (python -c) on `hosts` processes of one jax.distributed run, each with 8 / hosts CPU devices and in a
    process group of its own (a host's trainer and its grain workers, which a fault may signal together); its argv:
    args[:2], the coordinator's address, the process count, the process id, args[2:]."""
    port = _free_port()
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", script, *args[:2], f"127.0.0.1:{port}", str(hosts), str(i),
                               *args[2:]], cwd=cwd, env=_devices(env, 8 // hosts), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for i in range(hosts)]
    return _collect(procs, start, timeout)


def _train_argv(data: str, workdir: str, **more) -> list[str]:
    return [sys.executable, "-m", "launch.train", "--config=stage2:tiny", f"--workdir={workdir}", "--progress=false",
            _flag("data.dir", data), *(_flag(k, v) for k, v in {**OVERRIDES, **more}.items())]


def _launch_driver(env, data, workdir, fault, hosts, cwd, heartbeat=100, **more) -> list[dict]:
    """The DRIVER on `hosts` processes of one jax.distributed run."""
    overrides = json.dumps({**OVERRIDES, **more, "data.dir": data})
    return _launch_script(env, DRIVER, [workdir, fault, str(heartbeat), overrides], hosts, cwd)


def _said(result) -> list[str]:
    """A process's stdout lines, less gloo's own connection notices (its C++ prints them on every process, from
    several threads: a notice can be cut in two, e.g. "[Gloo] Rank " + "7 is connected to 7 peer ranks. ...")."""
    return [line for line in result["out"].splitlines()
            if line.strip() and not line.startswith("[Gloo]") and "peer ranks" not in line]


def _ok(results):
    """Every process exited 0; else each one's exit code and the end of its stderr."""
    assert all(r["rc"] == 0 for r in results), "\n".join(
        f"process {i} exited {r['rc']}:\n{r['err'][-3000:]}" for i, r in enumerate(results))


def _params(workdir, weights):
    from janusflow_jax import checkpoint

    return checkpoint.load_params(f"{workdir}/checkpoints", weights=weights)[1]


def _assert_same_run(a: str, b: str, steps: int = STEPS):
    """Bitwise: parameters and EMA of the final checkpoint, and every logged loss (of `steps` steps)."""
    for weights in ("params", "ema"):
        x, y = _params(a, weights), _params(b, weights)
        assert jax.tree.structure(x) == jax.tree.structure(y)
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
            np.testing.assert_array_equal(u, v)
    rows = [[json.loads(line) for line in epath.Path(w, "metrics.jsonl").read_text().splitlines()] for w in (a, b)]
    keys = ("step", "loss", "ar", "rf", "repa", "grad_norm")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
    assert [r["step"] for r in rows[0]] == list(range(1, steps + 1))


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


def _committed(workdir: str) -> list[int]:
    """The steps whose checkpoint is complete in `workdir` (gs://: the commit marker orbax writes last)."""
    return sorted(int(n.split("/")[0]) for n in _objects(f"{workdir}/checkpoints")
                  if n.endswith("/commit_success.txt") and n.count("/") == 1)


# ------------------------------------------------------------------------------------------------------ fixtures
def write_inputs(root: Path) -> Path:
    """The pod runs' inputs under `root`: 8 images, the gen / und / text manifests and a tokenizer."""
    from janusflow_jax.data.processor import make_tokenizer

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
    return root


def prepare_job(inputs: str, out: str) -> dict:
    """The preparation job's fields for the inputs `write_inputs` wrote at `inputs` (a local or gs:// directory)."""
    return dict(out=out, tokenizer=f"{inputs}/tokenizer", gen_jsonl=f"{inputs}/gen.jsonl",
                und_jsonl=f"{inputs}/und.jsonl", text_jsonl=f"{inputs}/text.jsonl", seq_len=64, prompt_len=8,
                records_per_shard=4, encode_batch_per_device=1, num_threads=2, system_prompt="")


@pytest.fixture(scope="session")
def pod_inputs(gcs, tmp_path_factory) -> tuple[Path, str]:
    """`write_inputs`, locally and uploaded to gs:// (the preparation job reads them there)."""
    root = write_inputs(tmp_path_factory.mktemp("pod_inputs"))
    paths.upload_tree(root, f"{gcs}/inputs")
    return root, f"{gcs}/inputs"


def _prepare_argv(remote_inputs: str, out: str) -> list[str]:
    return [sys.executable, "-m", "launch.prepare_data", "--config=configs/prepare_data.py:tiny", "--progress=false",
            *(f"--config.prepare.{k}={v}" for k, v in prepare_job(remote_inputs, out).items())]


@pytest.fixture(scope="session")
def pod_dataset(gcs, pod_inputs, pod_env) -> str:
    """`launch.prepare_data` in one process, inputs and output on gs://."""
    out = f"{gcs}/prepared"
    run = subprocess.run(_prepare_argv(pod_inputs[1], out), cwd=ROOT, env=_devices(pod_env, 8), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"prepared 8 gen / 8 und / 8 text records in {out}" in run.stdout
    return out


@pytest.fixture(scope="session")
def pod_reference(gcs, pod_dataset, pod_env, tmp_path_factory) -> dict:
    """`launch.train` in one process with 8 devices, workdir and data on gs://, from an empty directory."""
    cwd = tmp_path_factory.mktemp("pod_cwd")
    workdir = f"{gcs}/reference"
    (result,) = _launch(pod_env, _train_argv(pod_dataset, workdir), 1, cwd)
    _ok([result])
    return dict(result, workdir=workdir, cwd=cwd)
