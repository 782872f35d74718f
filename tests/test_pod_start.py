"""A pod run's start and restart at production scale, on several jax.distributed processes on localhost (4 CPU devices
each, as tests/test_pod.py): a start from a checkpoint costs each host no more memory than a random start (the
checkpoint is restored into the shards, never gathered); a run saved on N hosts resumes on M hosts bit for bit like
the uninterrupted run (the data state is saved per reading stream); a relaunch compiles nothing twice (the persistent
compilation cache); a SIGTERM before the first step of a resumed run keeps a consistent step on every host.

One chain of launches covers the restart scenarios (each launch of jax.distributed processes costs tens of seconds):
the reference (1 process, from a checkpoint), 2 hosts stopped after step 2, 1 host resuming it and stopped after
step 4 (2 -> 1), 2 hosts resuming that and told SIGTERM before their first step, the same 2 hosts finishing it
(1 -> 2, with every program from the cache).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import pytest

from tests import pod_helpers as pod
from tests.cli_helpers import user_env

from janusflow_jax import checkpoint

ROOT = pod.ROOT
STEPS = 10  # room for a SIGTERM's agreed step to come one or two steps late on a loaded host
# The memory scenario's model: stage2:tiny with a 100k vocabulary at width 512 (embedding + LM head: 410 MB in
# fp32), every parameter sharded over all 8 devices (the pod layout, FSDP).
BIG = {"model.llm.vocab_size": 100_000, "model.llm.hidden_size": 512, "model.llm.head_dim": 128,
       "model.repa.hidden_dim": 512, "model.llm.num_layers": 1, "model.und_encoder.depth": 1,
       "model.gen_encoder.num_blocks": 1, "model.gen_decoder.num_blocks": 1, "model.repa.layer": 1,
       "mesh.data": 1, "mesh.fsdp": -1}

# Each process: make the plan, then measure its peak resident memory around `initial_params` (the start), and with
# "random" save the parameters as the checkpoint the "checkpoint" start reads.
MEMORY_DRIVER = """
import json, resource, sys, time
from janusflow_jax import hosts

kind, path, address, count, pid, overrides = sys.argv[1:]
hosts.initialize(address, int(count), int(pid))
import jax
from configs import stage2
from janusflow_jax import checkpoint
from janusflow_jax.train.init import initial_params
from janusflow_jax.train.plan import make_plan
from tests.pod_helpers import apply

config = apply(stage2.get_config("tiny"), json.loads(overrides))
with config.unlocked():
    config.init.kind, config.init.path = kind, (path if kind == "checkpoint" else "")
plan = make_plan(config)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before, start = peak(), time.perf_counter()
params = jax.block_until_ready(initial_params(plan))
row = dict(kind=kind, process=jax.process_index(), before=before, after=peak(), seconds=time.perf_counter() - start,
           bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
if kind == "random":
    checkpoint.save_params(path, plan.model_cfg, params)
print("MEMORY " + json.dumps(row), flush=True)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(user_env(tmp_path_factory.mktemp("jax_cache")), JAX_PLATFORMS="cpu")


@pytest.mark.slow  # several jax.distributed launches
def test_a_start_from_a_checkpoint_costs_each_host_what_a_random_start_does(env, tmp_path):
    """2 processes x 4 CPU devices, a 410 MB model sharded over all 8: the random start (which saves the checkpoint)
    and the start from that checkpoint, each in fresh processes, raise each process's peak memory by about its own
    half of the model; before the checkpoint was restored into the shards it was 8 copies of the whole model."""
    ckpt = str(tmp_path / "ckpt")
    rows = {}
    for kind in ("random", "checkpoint"):
        results = pod._launch_script(env, MEMORY_DRIVER, [kind, ckpt, json.dumps(BIG)], 2, ROOT)
        pod._ok(results)
        rows[kind] = [json.loads(line[len("MEMORY "):]) for r in results for line in r["out"].splitlines()
                      if line.startswith("MEMORY ")]
        assert [r["process"] for r in rows[kind]] == [0, 1]
    model = rows["random"][0]["bytes"]
    assert model > 400e6
    for random, restored in zip(rows["random"], rows["checkpoint"]):
        grew = {kind: row["after"] - row["before"] for kind, row in (("random", random), ("checkpoint", restored))}
        print(f"process {random['process']}: peak memory +{grew['random'] / 2**20:.0f} MiB random start "
              f"({random['seconds']:.1f} s), +{grew['checkpoint'] / 2**20:.0f} MiB from the checkpoint "
              f"({restored['seconds']:.1f} s); the model is {model / 2**20:.0f} MiB")
        assert grew["checkpoint"] < grew["random"] + 0.15 * model, grew


def test_every_init_kind_places_the_host_values_in_the_plans_shardings(tmp_path):
    """In this process (8 CPU devices, parameters sharded over all 8): a checkpoint in the run's layout and in the
    other one (scanned), and the official PyTorch layout, each start with exactly the saved values, in the plan's
    shardings and storage dtype."""
    import flax.linen as nn
    from flax.traverse_util import flatten_dict

    from configs import stage2
    from janusflow_jax.convert import janusflow as convert
    from janusflow_jax.models.janusflow import abstract_params
    from janusflow_jax.sharding import param_shardings
    from janusflow_jax.train.init import initial_params
    from janusflow_jax.train.plan import make_plan

    config = pod.apply(stage2.get_config("tiny"), {"mesh.data": 1, "mesh.fsdp": -1})
    plan = make_plan(config)
    cfg = plan.model_cfg
    rng = np.random.default_rng(0)
    values = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype),
                          nn.unbox(abstract_params(cfg)))
    checkpoint.save_params(tmp_path / "plain", cfg, values)
    scanned = cfg.replace(scan_layers=True)
    checkpoint.save_params(tmp_path / "scanned", scanned, convert.scan_params(values, scanned))
    convert.to_pytorch(cfg, values, tmp_path / "official", torch_dtype="float32")
    shardings = flatten_dict(param_shardings(cfg, plan.mesh), sep="/")
    for kind, path in (("checkpoint", "plain"), ("checkpoint", "scanned"), ("official", "official")):
        with config.unlocked():
            config.init.kind, config.init.path = kind, str(tmp_path / path)
        placed = flatten_dict(initial_params(make_plan(config)), sep="/")
        want = flatten_dict(values, sep="/")
        assert placed.keys() == want.keys(), (kind, path)
        for key, got in placed.items():
            assert got.sharding == shardings[key] and got.dtype == cfg.storage_dtype, (kind, path, key)
            if not (kind == "official" and key.startswith("repa_projector/")):  # ours: the release has none
                np.testing.assert_array_equal(np.asarray(got), want[key], err_msg=f"{kind} {path} {key}")


# --------------------------------------------------------------------------------------------- restart chain
# stage2:tiny with one block per tower (test_pod's run, 6 steps) on a prepared dataset read in 2 streams, started
# from a checkpoint in the other layer layout (scanned; the run is per-layer: changed on the mesh).
CHAIN = {**pod.OVERRIDES, "steps": STEPS, "mixture": ((STEPS, (1, 1, 1)),), "init.kind": "checkpoint"}

# launch.train with one fault: "after:<host>:<step>" (that host sends itself SIGTERM after the step) or
# "restore:<host>" (SIGTERM during the restore of a resumed run: the notice comes before the first step).
TRAIN_DRIVER = """
import json, os, signal, sys, time
from janusflow_jax import hosts

workdir, fault, address, count, pid, overrides = sys.argv[1:]
hosts.initialize(address, int(count), int(pid))  # also for 1 process: collectives through gloo, as on 2
import jax
from configs import stage2
from janusflow_jax.train import checkpointing
from janusflow_jax.train import loop as trainer
from tests.pod_helpers import apply

config = apply(stage2.get_config("tiny"), json.loads(overrides))
kind, host, *at = fault.split(":")
mine = jax.process_index() == int(host or 0)


def after(step, state, metrics):
    if kind == "after" and mine and step == int(at[0]):
        os.kill(os.getpid(), signal.SIGTERM)


if kind == "restore":
    real_restore = checkpointing.restore_state

    def restore_and_term(*args):
        out = real_restore(*args)
        if mine:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3)  # every host: the notice's step agreement is done before the first step
        return out

    checkpointing.restore_state = restore_and_term
trainer.train(config, workdir, callbacks=[after], progress=False)
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """test_pod's 8 examples per type, prepared in this process (local paths)."""
    from configs import prepare_data as prepare_configs
    from janusflow_jax.data import prepare

    root = pod.write_inputs(tmp_path_factory.mktemp("start_inputs"))
    config = prepare_configs.get_config("tiny")
    with config.unlocked():
        config.prepare.update(pod.prepare_job(str(root), str(root / "prepared")))
    assert prepare.run(config, progress=False)["counts"] == {"gen": 8, "und": 8, "text": 8}
    return str(root / "prepared")


def _start_checkpoint(directory) -> str:
    """Random weights of the chain's model, saved in the scanned layout (numpy: nothing to compile)."""
    import flax.linen as nn

    from configs import stage2
    from janusflow_jax.convert import janusflow as convert
    from janusflow_jax.models.config import JanusFlowConfig
    from janusflow_jax.models.janusflow import abstract_params

    config = pod.apply(stage2.get_config("tiny"), CHAIN)
    model = JanusFlowConfig.from_dict(config.model.to_dict()).replace(scan_layers=True)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype),
                          nn.unbox(abstract_params(model.replace(scan_layers=False))))
    checkpoint.save_params(directory, model, convert.scan_params(params, model))
    return str(directory)


def _run(env, workdir, fault, hosts, overrides, cwd) -> list[dict]:
    results = pod._launch_script(env, TRAIN_DRIVER, [str(workdir), fault, json.dumps(overrides)], hosts, cwd)
    pod._ok(results)
    return results


def _steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow  # several jax.distributed launches
def test_restarts_on_other_host_counts_and_before_the_first_step_continue_bit_for_bit(env, dataset, tmp_path):
    """One chain: 1 process from the checkpoint (the reference); 2 hosts from the same checkpoint, SIGTERM on host 1
    after step 1 (every host saves the agreed step s); 1 host resumes s (2 -> 1), SIGTERM after s + 1 (saves the
    agreed step t); 2 hosts resume t (1 -> 2) and get SIGTERM during the restore (every host keeps t, exits 0);
    the same 2 hosts finish, their step program loaded from the persistent cache. The final weights, EMA and every
    logged loss equal the reference's bit for bit."""
    overrides = {**CHAIN, "data.dir": dataset, "init.path": _start_checkpoint(tmp_path / "start")}
    reference, workdir = tmp_path / "reference", tmp_path / "run"
    timings = {}
    began = time.monotonic()
    _run(env, reference, "none:", 1, overrides, tmp_path)
    timings["reference (1 host)"] = time.monotonic() - began

    began = time.monotonic()
    first = _run(env, workdir, "after:1:1", 2, overrides, tmp_path)
    timings["2 hosts, SIGTERM"] = time.monotonic() - began
    saved = [int(line.split()[3]) for line in first[0]["out"].splitlines() if line.startswith("preempted: saved")]
    assert len(saved) == 1 and 2 <= saved[0] <= 4 and _steps(workdir)[-1] == saved[0], first[0]["out"]
    s = saved[0]
    assert sorted(p.name for p in (workdir / "checkpoints" / str(s) / "data").glob("*.json")) == [
        "stream_0-of-2.json", "stream_1-of-2.json"]  # per reading stream, not per process

    began = time.monotonic()
    (one,) = _run(env, workdir, f"after:0:{s + 1}", 1, overrides, tmp_path)  # 2 -> 1
    timings["1 host, resumed"] = time.monotonic() - began
    assert f"resuming from step {s}" in one["out"], one["out"]
    (t,) = [int(line.split()[3]) for line in one["out"].splitlines() if line.startswith("preempted: saved")]
    assert s + 1 < t < STEPS and _steps(workdir)[-1] == t, one["out"]  # the agreed step: after the notice

    began = time.monotonic()
    held = _run(env, workdir, "restore:1", 2, overrides, tmp_path)  # 1 -> 2, the notice before the first step
    timings["2 hosts, SIGTERM in the restore"] = time.monotonic() - began
    assert f"preempted: saved step {t} in" in held[0]["out"] and "before the first step" in held[0]["out"]
    assert not [line for line in pod._said(held[0]) if line.startswith("step ")]  # no step ran
    assert _steps(workdir)[-1] == t

    began = time.monotonic()
    last = _run(env, workdir, "none:", 2, overrides, tmp_path)
    timings["2 hosts, finish"] = time.monotonic() - began
    out = last[0]["out"]
    assert f"resuming from step {t}" in out
    assert " 0 compiled)" in next(line for line in out.splitlines() if line.startswith("first step after")), out
    assert next(line for line in out.splitlines() if line.startswith("goodput: "))
    for weights in ("params", "ema"):  # bitwise
        x, y = (checkpoint.load_params(w / "checkpoints", weights=weights)[1] for w in (reference, workdir))
        assert jax.tree.structure(x) == jax.tree.structure(y)
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
            np.testing.assert_array_equal(u, v)
    rows, ref_rows = ([json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
                      for w in (workdir, reference))
    keys = ("step", "loss", "ar", "rf", "repa", "grad_norm")
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in ref_rows]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all("time_to_first_step_s" in rows[k - 1] for k in (1, s + 1, t + 1))  # each launch's first step
    goodput = [json.loads(line) for line in (workdir / "goodput.jsonl").read_text().splitlines()]
    assert len(goodput) == 4 and all(g["total_s"] > 0 for g in goodput)
    print("launch seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    for line in out.splitlines():
        if line.startswith(("first step after", "goodput: ")):
            print(line)


def test_goodput_counts_steps_redone_after_a_restart_as_lost(tmp_path):
    """The rows a killed launch logged past the checkpoint the next one resumes from are its lost progress; the
    summary line, goodput.jsonl and the buckets add up to the launch's time."""
    from janusflow_jax.train import goodput

    clock = goodput.Goodput()
    clock.resumed = True
    clock.redone([{"step": 5, "step_time": 2.0}, {"step": 6, "step_time": 4.0}])
    clock.add("program_startup", 1.5)
    clock.saved(0.5)
    assert clock.row_fields() == {"checkpoint_save_s": 0.5} and clock.row_fields() == {}
    line = clock.report(tmp_path, None, step=8, steps_done=4)
    (row,) = [json.loads(r) for r in (tmp_path / "goodput.jsonl").read_text().splitlines()]
    assert row["steps_redone"] == 2 and row["wasted_progress_from_disruption_s"] == 6.0 and row["step"] == 8
    assert row["program_startup_s"] == 1.5 and row["unproductive_checkpoint_save_time_s"] == 0.5
    lost = sum(row[f"{k}_s"] for k in goodput.BUCKETS if k != "wasted_progress_from_disruption")
    assert row["productive_s"] == max(0.0, row["total_s"] - lost)  # (here the buckets were made up: 0)
    assert line.startswith("goodput: ") and "compile 1.5 s" in line and "checkpoint save 0.5 s" in line
    assert line.endswith("; 2 steps redone after the restart (6.0 s of the previous launch)")
