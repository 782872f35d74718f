"""OmniMamba through the one trainer, from the command line: the two stage-1 runs (:tiny), stage 2 started from
their merge, and a stage-2 run killed with SIGKILL that resumes bitwise equal to the uninterrupted one.

The processes share a persistent compilation cache, so each step composition compiles once."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).parents[1]

KILLER = """
import os, signal, sys
from configs import omnimamba_stage2
from janusflow_jax.train import loop as trainer

config = omnimamba_stage2.get_config("tiny")
config.unlock()
config.init.update(kind="merge", mmu_path=os.path.abspath(sys.argv[2]), t2i_path=os.path.abspath(sys.argv[3]))

def kill_after_step_5(step, state, metrics):
    if step == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final save: as a crashed host

trainer.train(config, sys.argv[1], callbacks=[kill_after_step_5], progress=False)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tests.cli_helpers import user_env

    return user_env()


def _train(env, cwd, *args):
    result = subprocess.run([sys.executable, "-m", "launch.train", *args, "--progress=false"], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _params(root):
    from janusflow_jax import checkpoint

    return checkpoint.load_params(root / "checkpoints", weights="params")[1]


def _flat(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.slow  # training processes, stage by stage
def test_the_recipe_trains_from_the_command_line_and_resumes_exactly(env, tmp_path):
    # Stage 1: each run trains its own parts (relative workdirs, as a user types them).
    mmu = _train(env, tmp_path, "--config=omnimamba_stage1_mmu:tiny", "--workdir=runs/mmu")
    lines = [line for line in mmu.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 6 and "(mmu " in lines[0] and "mix mmu 100.0% t2i 0.0%" in lines[-1]
    _train(env, tmp_path, "--config=omnimamba_stage1_t2i:tiny", "--workdir=runs/t2i")
    mmu_end, t2i_end = _flat(_params(tmp_path / "runs/mmu")), _flat(_params(tmp_path / "runs/t2i"))
    differ = {k for k in mmu_end if not np.array_equal(mmu_end[k], t2i_end[k])}  # same random start (seed 0)
    assert any(k.startswith("projector/") for k in differ) and any("/lora_mmu/" in k for k in differ)
    assert any(k.startswith("lm/img_embeddings/") for k in differ) and any("/lora_t2i/" in k for k in differ)
    assert not any(k.startswith(("vision/", "vq/")) or "/mixer/in_proj/" in k for k in differ)  # frozen in both

    # Stage 2 from the merge: uninterrupted, and killed after step 5 then resumed.
    merge = ("--config.init.kind=merge", "--config.init.mmu_path=runs/mmu/checkpoints",
             "--config.init.t2i_path=runs/t2i/checkpoints")
    full = _train(env, tmp_path, "--config=omnimamba_stage2:tiny", "--workdir=runs/stage2", *merge)
    assert "done: final loss" in full.stdout
    crash = subprocess.run([sys.executable, "-c", KILLER, "runs/killed", "runs/mmu/checkpoints",
                            "runs/t2i/checkpoints"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
    assert crash.returncode == -9, crash.stderr[-3000:]
    resumed = _train(env, tmp_path, "--config=omnimamba_stage2:tiny", "--workdir=runs/killed", *merge)
    assert "resuming from step " in resumed.stdout  # 4, or 2 where the kill caught step 4's asynchronous save
    a, b = _params(tmp_path / "runs/stage2"), _params(tmp_path / "runs/killed")
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # Stage 2 trained on from the merge: the projector moved on from the MMU run's, the frozen towers did not.
    stage2 = _flat(a)
    assert all(np.array_equal(stage2[k], mmu_end[k]) for k in mmu_end if k.startswith(("vision/", "vq/")))
    assert all(not np.array_equal(stage2[k], mmu_end[k]) for k in mmu_end if k.startswith("projector/"))
