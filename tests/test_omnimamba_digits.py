"""The OmniMamba digits run (configs/omnimamba_digits.py:test) end to end as a user types it, from a fresh directory
with a relative workdir (`python -m launch.train --config=omnimamba_digits:test --workdir=runs/omd`): real sklearn
digits -> PNGs + manifests -> the preparation job (OmniMamba records, a patch_kmeans codebook fitted on the training
images) -> stage1_mmu and stage1_t2i from one random start -> stage2 from their merge -> evaluation (understanding
answers, generated codes decoded by the codebook and read by the judge) -> eval.json and a sample grid. The
accuracies are not checked here (2 steps per stage); the full run's are in the README."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import omnimamba_digits
from janusflow_jax.train import recipe

from tests.cli_helpers import user_env  # noqa: E402

pytestmark = pytest.mark.slow  # the whole OmniMamba digits recipe, every stage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("fresh")
    # One CPU device, as on a laptop (conftest's 8 would split each 8-row batch into one row per data shard).
    env = user_env()
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--config=omnimamba_digits:test",
                           "--workdir=runs/omd", "--progress=false"], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return omnimamba_digits.get_config("test"), cwd / "runs" / "omd", proc.stdout


def test_stages_train_in_the_release_order_with_their_own_starts(run):
    config, workdir, stdout = run
    assert recipe.stage_names(config) == ["stage1_mmu", "stage1_t2i", "stage2"]
    for name in recipe.stage_names(config):
        stage = workdir / name
        assert recipe.finished(stage, config.recipe[name].steps)
        rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
        saved = json.loads((stage / "checkpoints" / "2" / "run_config" / "metadata").read_text())
        assert saved["family"] == "omnimamba" and saved["stage"] == name[len("stage"):]
        assert saved["freeze"] == [list(r) for r in config.recipe[name].freeze]
        assert saved["mixture"] == [[2, list(config.recipe[name].mixture[0][1])]]
        assert saved["optimizer"]["total_steps"] == 2  # the cosine ends at the stage's own last step
        if name == "stage2":
            assert saved["init"]["kind"] == "merge"
            assert saved["init"]["mmu_path"] == str(workdir / "stage1_mmu" / "checkpoints")
            assert saved["init"]["t2i_path"] == str(workdir / "stage1_t2i" / "checkpoints")
        else:
            assert saved["init"]["kind"] == "random"
    assert "init merge" in stdout


def test_data_is_prepared_by_the_job_with_a_fitted_codebook(run):
    config, workdir, _ = run
    split = json.loads((workdir / "data" / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"]) and len(split["test"]) == 12
    meta = json.loads((workdir / "data" / "prepared" / "metadata.json").read_text())
    assert meta["family"] == "omnimamba" and meta["counts"] == {"mmu": 48, "t2i": 48}
    assert meta["tokenizer"]["pad_id"] == config.data.pad_id
    codes = meta["image_tokenizer"]
    assert codes["kind"] == "patch_kmeans" and codes["codebook_size"] == config.model.lm.image_vocab_size
    assert codes["grid"] == 4 and codes["image_size"] == 16
    for name in recipe.stage_names(config):  # each checkpoint carries what decodes its codes
        assert (workdir / name / "checkpoints" / "patch_kmeans.npz").read_bytes() == \
            Path(codes["path"]).read_bytes()


def test_evaluation_is_written(run):
    config, workdir, stdout = run
    on_disk = json.loads((workdir / "eval.json").read_text())
    assert tuple(config.digits.eval_stages) == ("stage2",) and "stage1_mmu" not in on_disk
    r = on_disk["stage2"]
    assert 0.0 <= r["understanding_accuracy"] <= 1.0 and r["understanding_examples"] == 8
    assert len(r["sample_answers"]) == 8 and all(isinstance(a, str) for a in r["sample_answers"])
    labels = [s[0] for s in config.digits.eval_sampling]
    assert list(r["generation_accuracy"]) == labels
    assert all(0.0 <= a <= 1.0 for a in r["generation_accuracy"].values())
    assert r["judge_accuracy_on_real_test_digits"] > 0.5  # the judge itself reads real digits
    assert 0.0 <= r["judge_accuracy_on_codebook_round_trip"] <= 1.0
    assert (workdir / "samples_stage2.png").stat().st_size > 0
    assert set(on_disk["stage_seconds_this_invocation"]) == {"stage1_mmu", "stage1_t2i", "stage2"}
    assert f"stage2: held-out understanding accuracy {100 * r['understanding_accuracy']:.1f}%" in stdout
