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
import resource
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import test_pod as pod
from tests.cli_helpers import user_env

from janusflow_jax import checkpoint

ROOT = pod.ROOT
STEPS = 6
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
from tests.test_pod_start import apply

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
    port = pod._free_port()
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", script, *args[:2], f"127.0.0.1:{port}", str(hosts), str(i),
                               *args[2:]], cwd=cwd, env=pod._devices(env, 8 // hosts), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(hosts)]
    return pod._collect(procs, start, timeout)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(user_env(tmp_path_factory.mktemp("jax_cache")), JAX_PLATFORMS="cpu")


def test_a_start_from_a_checkpoint_costs_each_host_what_a_random_start_does(env, tmp_path):
    """2 processes x 4 CPU devices, a 410 MB model sharded over all 8: the random start (which saves the checkpoint)
    and the start from that checkpoint, each in fresh processes, raise each process's peak memory by about its own
    half of the model; before the checkpoint was restored into the shards it was 8 copies of the whole model."""
    ckpt = str(tmp_path / "ckpt")
    rows = {}
    for kind in ("random", "checkpoint"):
        results = _launch_script(env, MEMORY_DRIVER, [kind, ckpt, json.dumps(BIG)], 2, ROOT)
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
