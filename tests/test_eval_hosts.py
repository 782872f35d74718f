"""Evaluation on several hosts: two `jax.distributed` processes on localhost (2 CPU devices each) run the in-training
understanding evaluator on globally sharded weights (each host answers its share, process 0 scores) and `und`'s
answering into one gs:// directory (one merged predictions file, written by process 0 after a barrier); both equal
what one host answers. Also: the training evaluators write only under a gs:// workdir."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from tests.cli_helpers import user_env
from tests.pod_helpers import _free_port
from janusflow_jax.data.processor import Processor, make_tokenizer
from janusflow_jax.eval import evaluators
from janusflow_jax.eval.understanding import UnderstandingSet
from janusflow_jax.models.janusflow import JanusFlow, abstract_params
from janusflow_jax.sharding import make_mesh, mesh_context

ROOT = Path(__file__).resolve().parents[1]
WORDS = "a the one two three four five six seven eight nine zero digit what is this shown".split()

# Both processes: the tiny model's weights sharded over the 4 devices of the two, a plan with the understanding
# evaluator's fields, the evaluator called once, then `und`'s answering into OUT with JAX's host split.
DRIVER = r"""
import json, sys, types
import jax
from janusflow_jax import hosts
coordinator, tokenizer, data, out = sys.argv[1:5]
hosts.initialize(coordinator, 2, int(sys.argv[5]))
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from configs import tiny
from janusflow_jax.eval import answering
from janusflow_jax.eval.understanding import UnderstandingSet
from janusflow_jax.models.config import JanusFlowConfig
from janusflow_jax.models.janusflow import JanusFlow
from janusflow_jax.sharding import make_mesh, mesh_context, shard_params
from test_eval_hosts import random_params

cfg = JanusFlowConfig.from_dict(tiny.get_config().model.to_dict())
mesh = make_mesh(data=1, fsdp=-1)
params = shard_params(random_params(cfg), cfg, mesh)
assert not jax.tree.leaves(params)[0].is_fully_addressable
config = ml_collections.ConfigDict(dict(data=dict(source="synthetic", dir=""), eval=dict(
    und_data=data, und_suite="digits", und_limit=0, und_batch_size=2, data_dir="", tokenizer=tokenizer)))
plan = types.SimpleNamespace(config=config, model=JanusFlow(cfg), model_cfg=cfg, mesh=mesh)
evaluator = UnderstandingSet(plan)
with mesh_context(mesh):
    result = evaluator(1, params)
device = jax.local_devices()[0]
local = jax.device_put(multihost_utils.process_allgather(params, tiled=True), device)
with mesh_context(jax.sharding.Mesh(np.array([device]).reshape(1, 1, 1), mesh.axis_names)):  # the evaluator's compile
    summary = answering.run(plan.model, local, evaluator.processor, "digits", data, out, batch_size=2,
                            progress=False)
print("RESULT " + json.dumps({"scalars": result["scalars"], "records": evaluator.last_records,
                              "answered": summary["answered"], "predictions": summary["predictions"]}), flush=True)
"""


def random_params(cfg) -> dict:
    """Random weights for the tiny model from numpy (the jitted init takes a minute on a loaded 2-core host)."""
    import flax.linen as nn

    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
                        nn.unbox(abstract_params(cfg)))


def _png(seed: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 20, 3), np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tokenizer/processor directory for the tiny model and a 5-question digits TSV (5: the hosts' shares differ)."""
    from configs import tiny
    from janusflow_jax.models.config import JanusFlowConfig

    root = tmp_path_factory.mktemp("eval_hosts")
    cfg = JanusFlowConfig.from_dict(tiny.get_config().model.to_dict())
    tokenizer = make_tokenizer(root / "tokenizer", WORDS)
    processor_dir = root / "processor"
    Processor.from_pretrained(tokenizer, num_image_tokens=cfg.und_encoder.num_patches,
                              image_size=cfg.und_encoder.image_size).save_pretrained(processor_dir)
    shutil.copy(tokenizer / "special_tokens_map.json", processor_dir)
    rows = ["index\tquestion\tanswer\timage"] + [f"{i}\twhat digit is this\t{w}\t{_png(i)}"
                                                 for i, w in enumerate(["one", "two", "three", "four", "five"])]
    data = root / "digits_und.tsv"
    data.write_text("\n".join(rows) + "\n")
    return processor_dir, data


@pytest.mark.slow  # jax.distributed processes
def test_two_hosts_answer_their_shares_and_equal_one_host(gcs, inputs, tmp_path):
    tokenizer, data = inputs
    out = f"{gcs}/und_two_hosts"
    env = dict(user_env(), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count=2".strip()
    port = _free_port()
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{ROOT / 'tests'}"  # the driver imports random_params from here
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, f"127.0.0.1:{port}", str(tokenizer), str(data), out,
                               str(i)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]

    # One host, meanwhile: the same weights unsharded, the same evaluator.
    from configs import tiny
    from janusflow_jax.models.config import JanusFlowConfig

    cfg = JanusFlowConfig.from_dict(tiny.get_config().model.to_dict())
    config = ml_collections.ConfigDict(dict(data=dict(source="synthetic", dir=""), eval=dict(
        und_data=str(data), und_suite="digits", und_limit=0, und_batch_size=2, data_dir="", tokenizer=str(tokenizer))))
    mesh = make_mesh()
    one = UnderstandingSet(types.SimpleNamespace(config=config, model=JanusFlow(cfg), model_cfg=cfg, mesh=mesh))
    params = random_params(cfg)
    with mesh_context(mesh):
        expected = one(1, params)

    results = []
    deadline = time.monotonic() + 300
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, stderr[-3000:]
        said = next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:]
        results.append(json.JSONDecoder().raw_decode(said)[0])  # (the runtime's C++ logging may share the line)

    assert len(one.last_records) == 5 and set(expected["scalars"]) == {"und_digits"}
    assert results[0]["scalars"] == expected["scalars"]  # process 0 scores, as one host
    assert results[1]["scalars"] == {}
    assert results[0]["records"] == results[1]["records"] == one.last_records  # every answer as one host's
    assert [r["answered"] for r in results] == [3, 2]  # each host answered its share only

    # `und` on JAX's two processes: one merged file on gs://, after both hosts' parts, equal to one host's answers.
    from etils import epath

    assert results[0]["predictions"] == results[1]["predictions"] == f"{out}/predictions.jsonl"
    merged = [json.loads(line) for line in epath.Path(out, "predictions.jsonl").read_text().splitlines()]
    assert merged == [{"index": int(r["index"]), "prediction": r["prediction"]} for r in one.last_records]


def test_evaluators_write_under_a_gcs_workdir(gcs, tmp_path, monkeypatch):
    from etils import epath

    monkeypatch.chdir(tmp_path)
    config = ml_collections.ConfigDict(dict(eval_every=1, steps=2, eval=dict(evaluators=())))
    runner = evaluators.Evaluators(types.SimpleNamespace(config=config), f"{gcs}/eval_run")
    image = np.zeros((4, 6, 3), np.uint8)
    runner._write(1, {"und/x": 0.5}, {"grid": image}, 0.1)
    runner._write(2, {"und/x": 0.75}, {}, 0.1)
    eval_dir = epath.Path(f"{gcs}/eval_run/eval")
    rows = [json.loads(line) for line in (eval_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["und/x"]) for r in rows] == [(1, 0.5), (2, 0.75)]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO((eval_dir / "grid_0000001.png").read_bytes()))), image)
    assert list(tmp_path.iterdir()) == []  # nothing local (no "gs:" folder)
