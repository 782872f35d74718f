"""Stage 2's start from the two stage-1 runs (train/merge.py): each run contributes what its freeze rules trained,
read back from trainer-style orbax roots (params + config + run config); a parameter both trained, or one neither
trained that differs, is one error naming every such parameter."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import omnimamba_stage1_mmu, omnimamba_stage1_t2i, omnimamba_stage2
from janusflow_jax import checkpoint
from janusflow_jax.models import omnimamba
from janusflow_jax.train import merge, optimizer

MMU = omnimamba_stage1_mmu.get_config("tiny")
T2I = omnimamba_stage1_t2i.get_config("tiny")
SYSTEM = omnimamba.OmniMambaSystemConfig.from_dict(MMU.model.to_dict())


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def start():
    return jax.tree.map(np.asarray, nn.unbox(omnimamba.init_system_params(SYSTEM, jax.random.key(0))))


def trained(params, run_config, seed: int) -> dict:
    """`params` with every parameter `run_config.freeze` trains moved (what a stage-1 run changes)."""
    labels = optimizer.labels(params, run_config.freeze)
    rng = np.random.default_rng(seed)
    out = {k: v + rng.standard_normal(v.shape).astype(v.dtype) if labels[k] == optimizer.TRAINABLE else v
           for k, v in flat(params).items()}
    return traverse_util.unflatten_dict(out, sep="/")


def save_run(root, params, run_config, step: int = 3):
    """A root as the trainer writes it (train/checkpointing.py): params, the model config and the run config."""
    with checkpoint.manager(root) as mngr:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                config=ocp.args.JsonSave(SYSTEM.to_dict()),
                                                run_config=ocp.args.JsonSave(json.loads(run_config.to_json()))))
        mngr.wait_until_finished()
    return str(root)


def init_cfg(mmu_path, t2i_path):
    return ml_collections.ConfigDict(dict(kind="merge", mmu_path=mmu_path, t2i_path=t2i_path, weights="params"))


def test_each_run_contributes_what_it_trained(start, tmp_path):
    mmu, t2i = trained(start, MMU, 1), trained(start, T2I, 2)
    config, merged = merge.merged_initial_params(init_cfg(save_run(tmp_path / "mmu", mmu, MMU),
                                                          save_run(tmp_path / "t2i", t2i, T2I)))
    assert config == SYSTEM
    mmu_labels, t2i_labels = optimizer.labels(start, MMU.freeze), optimizer.labels(start, T2I.freeze)
    got, from_mmu, from_t2i, untouched = flat(merged), flat(mmu), flat(t2i), flat(start)
    assert got.keys() == untouched.keys()
    counts = {"mmu": 0, "t2i": 0, "neither": 0}
    for k, value in got.items():
        source = ("mmu" if mmu_labels[k] == optimizer.TRAINABLE else
                  "t2i" if t2i_labels[k] == optimizer.TRAINABLE else "neither")
        want = {"mmu": from_mmu, "t2i": from_t2i, "neither": untouched}[source][k]
        np.testing.assert_array_equal(value, want, err_msg=k)
        counts[source] += 1
    assert all(counts.values()), counts
    # Stage 2 trains everything either run trained.
    stage2 = optimizer.labels(merged, omnimamba_stage2.get_config("tiny").freeze)
    assert all(stage2[k] == optimizer.TRAINABLE for k in got
               if optimizer.TRAINABLE in (mmu_labels[k], t2i_labels[k]))


def test_trained_by_both_names_every_such_parameter(start):
    both = omnimamba_stage2.get_config("tiny").freeze  # trains the projector and the MMU adapter too
    with pytest.raises(merge.MergeError) as err:
        merge.merge_stage1(start, start, MMU.freeze, both)
    message = str(err.value)
    assert "trained by both stage-1 runs" in message and "\n" not in message
    expected = [k for k, label in optimizer.labels(start, MMU.freeze).items() if label == optimizer.TRAINABLE]
    assert all(k in message for k in expected) and "lora_t2i" not in message


def test_untrained_parameters_that_differ_are_named(start):
    t2i = flat(start)
    for k in ("lm/backbone/norm_f/scale", "lm/mmu_pos_embed", "vq/quantize/embedding"):
        assert k in t2i, sorted(t2i)[:5]
        t2i[k] = t2i[k] + 1
    with pytest.raises(merge.MergeError) as err:
        merge.merge_stage1(start, traverse_util.unflatten_dict(t2i, sep="/"), MMU.freeze, T2I.freeze)
    message = str(err.value)
    assert "3 parameters neither stage-1 run trained differ" in message
    for k in ("lm/backbone/norm_f/scale", "lm/mmu_pos_embed", "vq/quantize/embedding"):
        assert k in message


def test_missing_paths_and_run_configs_are_clear_errors(start, tmp_path):
    with pytest.raises(merge.MergeError, match="needs --config.init.mmu_path"):
        merge.merged_initial_params(init_cfg("", "x"))
    plain = tmp_path / "plain"
    checkpoint.save_params(plain, SYSTEM, start)  # no run config: what it trained is unknown
    with pytest.raises(merge.MergeError, match="holds no training run config"):
        merge.merged_initial_params(init_cfg(str(plain), str(plain)))
