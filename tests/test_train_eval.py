"""Evaluators inside training (janusflow_jax/eval/evaluators.py) on a tiny digits run: held-out losses on fixed batches
with fixed noise (identical for identical weights; the same on an 8-device mesh as on one device), a sample grid as
PNG and in TensorBoard, a scored understanding set, called by the training loop every `eval_every` steps."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from configs import digits as digits_config
from examples.digits import pipeline as digits
from janusflow_jax.data import prepare
from janusflow_jax.eval import evaluators, losses
from janusflow_jax.models.config import JanusFlowConfig
from janusflow_jax.sharding import mesh_context
from janusflow_jax.train import loop, recipe
from janusflow_jax.train.init import initial_params
from janusflow_jax.train.plan import TrainingError, make_plan


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    """Stage 2 of the digits test recipe on 40 prepared digits, evaluated every step on the data's held-out files."""
    root = tmp_path_factory.mktemp("digits")
    config = digits_config.get_config("test")
    with config.unlocked():
        config.digits.max_examples = 40
    model_cfg = JanusFlowConfig.from_dict(config.model.to_dict())
    split = digits.write_dataset(root, model_cfg.und_encoder.image_size, config.digits)
    tokenizer = digits.write_tokenizer(root / "tokenizer", model_cfg)
    sets = digits.write_eval_sets(root, split, model_cfg.und_encoder.image_size, config.digits)
    prepare.run(digits.prepare_config(config, root, tokenizer), progress=False)
    stage = recipe.stage_config(config, "stage2", None, str(root / "prepared"))
    with stage.unlocked():
        stage.eval_every = 1
        stage.checkpoint_every = 100
        stage.eval.update(dict(data_dir=str(root / "prepared"), batches=2, t_grid=3, batch_size=16,
                               evaluators=("losses", "samples", "understanding"), und_data=str(sets["und"]),
                               und_suite="digits", und_limit=4, und_batch_size=4,
                               sample_prompts=("a handwritten seven", "a handwritten two"), images_per_prompt=3,
                               steps=2))
    return stage


def test_heldout_losses_are_fixed_and_reduced_over_the_global_batch(run_config):
    config = run_config.copy_and_resolve_references()
    with config.unlocked():
        config.mixture = ((2, (1, 1, 0)),)  # 8 + 8 rows whether split over 8 devices or 1
    plan = make_plan(config)
    state = plan.init_state(initial_params(plan))
    held_out = losses.HeldOutLosses(plan)
    assert held_out.sizes == [{"und": 8, "gen": 8}] * 2
    with mesh_context(plan.mesh):
        first = held_out(1, evaluators.eval_params(state))["scalars"]
        again = held_out(2, evaluators.eval_params(state))["scalars"]
    assert first == again
    assert set(first) >= {"ar", "rf", "repa", "loss", "rf_t0.167", "rf_t0.500", "rf_t0.833"}
    assert first["rf"] == pytest.approx(np.mean([first[f"rf_t{t:.3f}"] for t in losses.time_grid(3)]))
    assert all(np.isfinite(v) for v in first.values())

    # The same numbers from one device: the sums are over the global batch, whatever the mesh.
    single = make_plan(config, devices=jax.devices()[:1])
    assert single.mesh.size == 1 and plan.mesh.size == 8
    one = single.init_state(jax.device_get(evaluators.eval_params(state)))
    with mesh_context(single.mesh):
        alone = losses.HeldOutLosses(single)(1, evaluators.eval_params(one))["scalars"]
    for key, value in first.items():
        assert alone[key] == pytest.approx(value, rel=2e-5), key


def test_heldout_batches_follow_the_ratio_in_shard_units(run_config):
    """At 14:80:6, 16 held-out rows on 8 data shards are 2 units a batch: the batches take the training deal's
    compositions (understanding in batch 2, text in batch 4), and too few batches for a type is one line."""
    config = run_config.copy_and_resolve_references()
    with config.unlocked():
        config.steps = 4
        config.mixture = ((4, (14, 80, 6)),)
        config.eval.batches = 4
    held_out = losses.HeldOutLosses(make_plan(config))
    assert held_out.unit == 8
    assert held_out.sizes == [{"gen": 16}, {"und": 8, "gen": 8}, {"gen": 16}, {"gen": 8, "text": 8}]
    with config.unlocked():
        config.eval.batches = 3
    with pytest.raises(TrainingError, match=r"^eval.batches 3 is too few for the held-out text rows: .* batch 4 is the "
                                            r"first with text; set eval.batches >= 4 or a larger eval.batch_size$"):
        losses.HeldOutLosses(make_plan(config))


@pytest.mark.slow  # the loop with every evaluator compiled
def test_training_loop_runs_the_evaluators(run_config, tmp_path):
    workdir = tmp_path / "stage2"
    loop.train(run_config, workdir, progress=False)
    rows = [json.loads(line) for line in (workdir / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert {"losses/ar", "losses/rf", "losses/repa", "losses/loss", "understanding/und_digits"} <= set(row)
        assert 0.0 <= row["understanding/und_digits"] <= 100.0
    assert rows[0]["losses/rf"] != rows[1]["losses/rf"]  # the weights moved between the two evaluations
    from PIL import Image

    size = run_config.model.und_encoder.image_size
    for step in (1, 2):
        with Image.open(workdir / "eval" / f"samples_{step:07d}.png") as grid:
            assert grid.size == (3 * size, 2 * size)  # 3 images per prompt, one row per prompt
    events = b"".join(p.read_bytes() for p in (workdir / "tensorboard").iterdir())
    for tag in (b"eval/losses/rf_t0.500", b"eval/understanding/und_digits", b"eval/samples"):
        assert tag in events, tag


def test_evaluator_config_errors(run_config):
    with run_config.unlocked():
        bad = run_config.copy_and_resolve_references()
        bad.eval.evaluators = ("losses", "fid")
    with pytest.raises(TrainingError, match="unknown evaluator"):
        evaluators.Evaluators(make_plan(bad), "/tmp/unused")
    with bad.unlocked():
        bad.eval.evaluators = ("losses",)
        bad.eval.data_dir = ""
    with pytest.raises(TrainingError, match="set eval.data_dir"):
        evaluators.Evaluators(make_plan(bad), "/tmp/unused")
