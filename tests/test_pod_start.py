"""A pod run's start and restart at production scale, on several jax.distributed processes on localhost (4 CPU devices
each, as tests/test_pod.py): a start from a checkpoint costs each host no more memory than a random start (the
checkpoint is restored into the shards, never gathered); a run saved on N hosts resumes on M hosts bit for bit like
the uninterrupted run (the data state is saved per reading stream); a relaunch compiles nothing twice (the persistent
compilation cache); a SIGTERM before the first step of a resumed run keeps a consistent step on every host.

One chain of launches covers the restart scenarios (each launch of jax.distributed processes costs tens of seconds),
with grain worker processes and the workdir on gs://: the reference (1 process, from a checkpoint), 2 hosts
preempted after step 1, 1 host resuming it and preempted after the next step (2 -> 1), 2 hosts resuming that and
told SIGTERM before their first step, the same 2 hosts finishing it (1 -> 2, with every program from the cache).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import pytest
from etils import epath

from tests import pod_helpers as pod

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


@pytest.mark.slow  # several jax.distributed launches
def test_a_start_from_a_checkpoint_costs_each_host_what_a_random_start_does(pod_env, tmp_path):
    """2 processes x 4 CPU devices, a 410 MB model sharded over all 8: the random start (which saves the checkpoint)
    and the start from that checkpoint, each in fresh processes, raise each process's peak memory by about its own
    half of the model; before the checkpoint was restored into the shards it was 8 copies of the whole model."""
    ckpt = str(tmp_path / "ckpt")
    rows = {}
    for kind in ("random", "checkpoint"):
        results = pod._launch_script(pod_env, MEMORY_DRIVER, [kind, ckpt, json.dumps(BIG)], 2, ROOT)
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
# test_pod's run (stage2:tiny with one block per tower, pod_helpers.OVERRIDES) for 10 steps, on the session's dataset
# on gs:// read in 2 streams by grain worker processes (data.num_workers=2, as the stage configs read), started from a
# checkpoint in the other layer layout (scanned; the run is per-layer: changed on the mesh). Two hosts stand for two
# slices (`mesh.dcn_data`=2), which places the devices as the plain mesh does.
CHAIN = {**pod.OVERRIDES, "steps": STEPS, "mixture": ((STEPS, (1, 1, 1)),), "init.kind": "checkpoint",
         "data.num_workers": 2}
SLICES = {"mesh.dcn_data": 2}


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


def _preempted_at(result) -> int:
    """The step a preempted launch saved (process 0's "preempted: saved step N ..." line)."""
    (step,) = [int(line.split()[3]) for line in result["out"].splitlines() if line.startswith("preempted: saved")]
    return step


@pytest.mark.slow  # several jax.distributed launches
def test_restarts_on_other_host_counts_with_grain_workers_continue_bit_for_bit(gcs, pod_dataset, pod_env, tmp_path):
    """One chain, workdirs on gs://, every launch reading through grain worker processes: 1 process from the
    checkpoint (the reference); 2 hosts from the same checkpoint, SIGTERM to host 1's process group (trainer and
    workers, as a VM shutdown sends it) after step 1: every host saves the agreed step s and exits 0; 1 host resumes s
    (2 -> 1), SIGTERM after s + 1 (saves the agreed step t); 2 hosts resume t (1 -> 2) and get SIGTERM during the
    restore (every host keeps t, exits 0); `launch.train` on the same 2 hosts finishes, every program loaded from
    the persistent cache. The final weights, EMA and every logged loss equal the reference's bit for bit."""
    overrides = {**CHAIN, "init.path": _start_checkpoint(tmp_path / "start")}
    reference, workdir = f"{gcs}/chain_reference", f"{gcs}/chain"
    timings = {}

    def launch(name, *args, **more):
        began = time.monotonic()
        results = pod._launch_driver(pod_env, pod_dataset, *args, tmp_path, **overrides, **more)
        timings[name] = time.monotonic() - began
        pod._ok(results)  # every host exits cleanly
        return results

    launch("reference (1 host)", reference, "none:0:0", 1)

    first = launch("2 hosts, SIGTERM", workdir, "sigterm:1:1", 2, **SLICES)
    s = _preempted_at(first[0])
    assert 2 <= s <= 4 and pod._committed(workdir) == sorted({2, s}), first[0]["out"]
    assert sorted(n for n in pod._objects(f"{workdir}/checkpoints/{s}/data") if n.startswith("stream_")) == [
        "stream_0-of-2.json", "stream_1-of-2.json"]  # both hosts saved that step, per reading stream

    (one,) = launch("1 host, resumed", workdir, f"sigterm:0:{s + 1}", 1)  # 2 -> 1
    assert f"resuming from step {s}" in one["out"], one["out"]
    t = _preempted_at(one)
    assert s + 1 < t < STEPS and pod._committed(workdir)[-1] == t, one["out"]  # the agreed step: after the notice

    held = launch("2 hosts, SIGTERM in the restore", workdir, "restore:1:0", 2, **SLICES)  # 1 -> 2
    assert f"preempted: saved step {t} in" in held[0]["out"] and "before the first step" in held[0]["out"]
    assert not [line for line in pod._said(held[0]) if line.startswith("step ")]  # no step ran
    assert pod._committed(workdir)[-1] == t

    began = time.monotonic()
    logged = {**pod_env, "JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}  # jax's cache hits and misses, per host
    last = pod._launch(logged, pod._train_argv(pod_dataset, workdir, **overrides, **SLICES), 2, tmp_path)
    timings["2 hosts, finish (launch.train)"] = time.monotonic() - began
    pod._ok(last)
    out = last[0]["out"]
    assert f"resuming from step {t}" in out and "jax.distributed: 2 processes, 8 devices (4 per process)" in out
    assert " 0 compiled)" in next(line for line in out.splitlines() if line.startswith("first step after")), out
    for host in last:  # process 1 too loads the step process 0 wrote (compilation_cache.py: one key on every host)
        assert "Persistent compilation cache hit for 'jit_step_fn'" in host["err"], host["err"][-3000:]
        assert "PERSISTENT COMPILATION CACHE MISS for 'jit_step_fn'" not in host["err"], host["err"][-3000:]
    assert len([line for line in pod._said(last[0]) if line.startswith("step ")]) == STEPS - t
    assert not pod._said(last[1])  # one progress log: process 0's
    pod._assert_same_run(reference, workdir, STEPS)
    rows = [json.loads(line) for line in epath.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    assert all("time_to_first_step_s" in rows[k - 1] for k in (1, s + 1, t + 1))  # each launch's first step
    goodput = [json.loads(line) for line in epath.Path(workdir, "goodput.jsonl").read_text().splitlines()]
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
