"""The digits run (configs/digits.py:test) end to end as the README's first command runs it, from a fresh directory
with a relative workdir (`python -m launch.train --config=digits:test --workdir=runs/digits`): real sklearn digits ->
PNGs + manifests -> prepare_data shards -> stages 1, 2, 3 (each from the previous EMA checkpoint) -> evaluation -> a
checkpoint that `inference.load` serves for generation and chat; then a rerun that skips everything already done."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import digits as digits_config
from examples.digits import pipeline as digits
from janusflow_jax.inference import load as inference
from janusflow_jax.train import recipe


from tests.cli_helpers import user_env  # noqa: E402

pytestmark = pytest.mark.slow  # the whole digits recipe, every stage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("fresh")
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--config=digits:test", "--workdir=runs/digits",
                           "--progress=false"], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=user_env())  # one CPU device, as on a laptop
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "error" not in proc.stderr, proc.stderr[-3000:]
    workdir = cwd / "runs" / "digits"
    config = digits_config.get_config("test")
    return config, workdir, proc.stdout


def test_every_stage_trained_from_the_previous_one(run):
    config, workdir, _ = run
    for n, name in enumerate(recipe.stage_names(config), start=1):
        stage = workdir / name
        assert recipe.finished(stage, config.recipe[name].steps)
        assert (stage / "loss_curve.png").stat().st_size > 0
        rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
        assert all(r["input_s"] >= 0 for r in rows)  # the loader's time per batch, for spotting input stalls
        saved = json.loads((stage / "checkpoints" / "2" / "run_config" / "metadata").read_text())
        assert saved["stage"] == n and saved["freeze"] == [list(r) for r in config.recipe[name].freeze]
        if n == 1:
            assert saved["init"]["kind"] == "random"
        else:
            assert saved["init"] == dict(saved["init"], kind="checkpoint", weights="ema",
                                         path=str(workdir / f"stage{n - 1}" / "checkpoints"))


def test_data_is_split_and_prepared_by_the_preparation_job(run):
    _, workdir, _ = run
    split = json.loads((workdir / "data" / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"]) and len(split["test"]) == 12
    meta = json.loads((workdir / "data" / "prepared" / "metadata.json").read_text())
    assert meta["latent"]["kind"] == "space_to_depth"
    trained_on = {json.loads(line)["image"] for line in (workdir / "data" / "gen.jsonl").read_text().splitlines()}
    assert not trained_on & {f"images/{i:04d}.png" for i in split["test"]}


def test_evaluation_is_written(run):
    config, workdir, stdout = run
    on_disk = json.loads((workdir / "eval.json").read_text())
    assert tuple(config.digits.eval_stages) == ("stage3",) and "stage1" not in on_disk
    for name in config.digits.eval_stages:
        r = on_disk[name]
        assert 0.0 <= r["understanding_accuracy"] <= 1.0 and r["understanding_examples"] == 8
        assert set(r["generation_accuracy"]) == {"2"}
        assert r["judge_accuracy_on_real_test_digits"] > 0.5  # the judge itself reads real digits
        assert (workdir / f"samples_{name}.png").stat().st_size > 0
    printed = f"stage3: held-out understanding accuracy {100 * on_disk['stage3']['understanding_accuracy']:.1f}%"
    assert printed in stdout  # the command's own report matches what it wrote


def test_final_checkpoint_serves_generation_and_chat(run):
    config, workdir, _ = run
    from janusflow_jax.inference import chat
    from janusflow_jax.data import latents
    from janusflow_jax.inference import sampler

    loaded = inference.load(workdir / "stage3" / "checkpoints", with_vae=True)
    assert isinstance(loaded.vae, latents.SpaceToDepth)
    images = sampler.generate_images(loaded.model, loaded.params, loaded.processor, loaded.vae, loaded.vae_params,
                                     ["a handwritten seven"], cfg=2.0, steps=2)
    size = config.model.und_encoder.image_size
    assert images.shape == (1, size, size, 3) and images.dtype == np.uint8
    answer = chat.chat(loaded.model, loaded.params, loaded.processor,
                       [str(workdir / "data" / "images" / sorted((workdir / "data" / "images").iterdir())[0].name)],
                       digits.QUESTION, max_new_tokens=3)
    assert isinstance(answer[0], str)


def test_rerun_skips_finished_work(run, capsys):
    config, workdir, _ = run
    before = json.loads((workdir / "eval.json").read_text())
    again = digits.run(config, workdir, progress=False)
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 3 and "(0 shards written" in out and "evaluating" not in out
    assert again["stage3"] == before["stage3"]


def test_launch_evaluate_reproduces_the_runs_own_evaluation(run, tmp_path, capsys):
    """The run's held-out set as benchmark files: `launch.evaluate und --suite=digits` + `score` on the final
    checkpoint give exactly the understanding accuracy in eval.json; `gen` writes GenEval's layout for the digit
    prompts, which the example's judge reads."""
    from absl import flags
    from sklearn.datasets import load_digits

    from launch import evaluate

    def run_cli(*args):
        flags.FLAGS.unparse_flags()
        try:
            return evaluate.main(flags.FLAGS(["evaluate", *args]))
        finally:
            flags.FLAGS.unparse_flags()

    config, workdir, stdout = run
    checkpoint, sets = workdir / "stage3" / "checkpoints", workdir / "data" / "eval"
    assert "launch.evaluate und --suite=digits" in stdout
    assert run_cli("und", "--suite=digits", f"--checkpoint={checkpoint}", f"--data={sets / 'digits_und.tsv'}",
                   f"--out={tmp_path / 'und'}") == 0
    assert run_cli("score", "--suite=digits", f"--data={sets / 'digits_und.tsv'}",
                   f"--predictions={tmp_path / 'und' / 'predictions.jsonl'}") == 0
    scores = json.loads((tmp_path / "und" / "predictions.scores.json").read_text())
    own = json.loads((workdir / "eval.json").read_text())["stage3"]
    assert scores["questions"] == own["understanding_examples"] == 8
    assert scores["score"] == pytest.approx(100 * own["understanding_accuracy"], abs=1e-9)
    predictions = [json.loads(line)["prediction"]
                   for line in (tmp_path / "und" / "predictions.jsonl").read_text().splitlines()]
    assert predictions[:10] == own["sample_answers"]

    assert run_cli("gen", "--suite=geneval", f"--checkpoint={checkpoint}", f"--data={sets / 'digits_gen.jsonl'}",
                   f"--out={tmp_path / 'gen'}", "--images_per_prompt=2", "--steps=2", "--batch_size=20") == 0
    images = tmp_path / "gen" / "images"
    assert sorted(p.name for p in images.iterdir()) == [f"{k:05d}" for k in range(10)]
    split, data = json.loads((workdir / "data" / "split.json").read_text()), load_digits()
    size = config.model.und_encoder.image_size
    judge = digits.fit_judge(np.stack([digits.render(data.images[i], size) for i in split["train"]]),
                             data.target[split["train"]])
    assert 0.0 <= digits.judge_generated(images, judge) <= 1.0
    capsys.readouterr()
