"""Pod reality: every path on gs:// (a real GCS emulator in its own process, `conftest.gcs`), several hosts for real
(N=2 `launch.train` / `launch.prepare_data` processes on localhost, jax.distributed with a local coordinator, 4 CPU
devices each, gloo collectives), and preemption across hosts (grain workers and restarts on other host counts:
tests/test_pod_start.py; a hung, a killed host and a killed coordinator: tests/test_pod_faults.py).

The reference is one process with 8 CPU devices and jax.distributed initialised for that one process: jax's CPU
collectives then run through gloo as on several hosts (measured: XLA's in-process CPU all-reduce sums in another
order, so without the runtime the same sum differs in the last bits, ~2e-4 on a sum of 8 x 1000 floats). The run
config is stage2:tiny, smaller still (one block per tower, 4 steps of 24 rows, one mixture phase), on a dataset
prepared by `launch.prepare_data` onto gs:// and read in 2 streams (`data.streams`), so any host count dividing 2
feeds the same global batch. Every process of the test run shares one persistent compilation cache
(`cli_helpers.user_env`): the one-host and the two-host step are each compiled once for the three pod files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import jax
import numpy as np
import pytest
from etils import epath

from tests.cli_helpers import run_cli
from tests.pod_helpers import (OVERRIDES, ROOT, STEPS, _assert_same_run, _devices, _launch, _launch_driver,
                               _launch_script, _objects, _ok, _prepare_argv, _said, _train_argv, apply)

from janusflow_jax import paths  # also: fresh gs:// listings in this process (subprocesses write there)

pytestmark = pytest.mark.slow  # several jax.distributed processes, trains on the GCS emulator


# The session's pod fixtures (tests/pod_helpers.py), under this file's names.
@pytest.fixture
def env(pod_env):
    return pod_env


@pytest.fixture
def inputs(pod_inputs):
    return pod_inputs


@pytest.fixture
def dataset(pod_dataset):
    return pod_dataset


@pytest.fixture
def reference(pod_reference):
    return pod_reference


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


def test_convert_generate_and_chat_with_gcs_paths(gcs, inputs, tmp_path, capsys, monkeypatch):
    """launch.convert to and from gs:// (official layout uploaded with config.json last; orbax native), then
    launch.generate and launch.chat from the gs:// orbax checkpoint, images read from and written to gs://; nothing
    is written under the working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
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
    assert not list(cwd.iterdir())  # no ./gs:/... and no stray file


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


# launch.train's loop on 2 hosts over a mesh whose batch axis alternates between them (host 0's first device, host
# 1's first, host 0's second, ...), as a TPU topology can place the hosts' chips; process 0 saves every step's global
# batch, gathered, and the hosts of the batch's devices in mesh order to <workdir>/global_batches.npz.
INTERLEAVED_DRIVER = """
import json, sys
from janusflow_jax import hosts

workdir, overrides, address, count, pid = sys.argv[1:]
hosts.initialize(address, int(count), int(pid))
import jax
import numpy as np
from jax.experimental import multihost_utils
from configs import stage2
from janusflow_jax.train import loop as trainer
from tests.pod_helpers import apply

batches, hosts_in_mesh, place = [], [], trainer.global_batch


def gathered(local, shardings):
    batch = place(local, shardings)
    batches.append(multihost_utils.process_allgather(batch, tiled=True))
    hosts_in_mesh[:] = [d.process_index for d in next(iter(shardings.values())).mesh.devices.flat]
    return batch


trainer.global_batch = gathered
devices = [d for pair in zip(*(jax.local_devices(process_index=p) for p in range(jax.process_count()))) for d in pair]
trainer.train(apply(stage2.get_config("tiny"), json.loads(overrides)), workdir, progress=False, devices=devices)
if jax.process_index() == 0:
    np.savez(f"{workdir}/global_batches.npz", hosts_in_mesh=hosts_in_mesh,
             **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
"""


@pytest.mark.slow
def test_hosts_interleaved_on_the_mesh_feed_the_one_process_batch_and_train_bit_for_bit_like_it(
        reference, dataset, env, tmp_path):
    """Two hosts whose devices alternate on the mesh's batch axis (host 0's devices hold rows 0, 2, 4, 6 of each
    type's 8, but host 0 reads stream 0: the one process's rows 0-3): every step's global batch is the one
    process's, row for row, and the run ends bit for bit where the one-process reference ends. Before
    `sharding.global_batch` placed each host's rows as one block, the rows came as 0, 4, 1, 5, 2, 6, 3, 7 and the
    first step's loss differed by 0.027 (REPA 0.028 vs 0.005: t and the noise are drawn per batch position)."""
    from configs import stage2
    from janusflow_jax.train.plan import make_plan

    workdir = tmp_path / "interleaved"
    workdir.mkdir()
    overrides = json.dumps({**OVERRIDES, "data.dir": dataset})
    results = _launch_script(env, INTERLEAVED_DRIVER, [str(workdir), overrides], 2, ROOT)
    _ok(results)
    got = np.load(workdir / "global_batches.npz")
    assert got["hosts_in_mesh"].tolist() == [0, 1] * 4  # (data, fsdp, tensor) = (8, 1, 1)
    plan = make_plan(apply(stage2.get_config("tiny"), json.loads(overrides)))  # this process: 1 host
    source = plan.source(0)
    try:
        for step in range(STEPS):
            want = source.take(plan.host_sizes(plan.sizes_at(step)))
            assert sorted(k for k in got if k.startswith(f"{step}/")) == sorted(f"{step}/{k}" for k in want)
            for key, value in want.items():
                np.testing.assert_array_equal(got[f"{step}/{key}"], value, err_msg=f"step {step + 1} {key}")
    finally:
        source.close()
    _assert_same_run(reference["workdir"], str(workdir))


def test_hosts_must_share_the_config_and_the_workdir(dataset, env, tmp_path):
    """Hosts started with different flags or different workdirs: one line on every host (a workdir that is each
    host's own disk under one name: test_pod_faults.py, `check_shared_directory`)."""
    argv = _train_argv(dataset, str(tmp_path / "run"))
    mismatched = _launch(env, argv, 2, tmp_path, per_host=lambda i: [f"--config.optimizer.lr={1e-3 * (i + 1)}"])
    elsewhere = _launch(env, argv, 2, tmp_path, per_host=lambda i: [f"--workdir={tmp_path / f'host{i}'}"])
    for results, message in ((mismatched, lambda i: "error: the run config differs between hosts: process(es) [1] "
                                                    "do not match process 0"),
                             (elsewhere, lambda i: f"error: the workdir differs between hosts: process(es) [1] do "
                                                   f"not match process 0 (process {i} has {tmp_path / f'host{i}'})")):
        for i, r in enumerate(results):
            assert r["rc"] == 1 and "Traceback" not in r["err"], r["err"][-3000:]
            assert r["err"].strip().splitlines()[-1].startswith(message(i)), r["err"][-3000:]
