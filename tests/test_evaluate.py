"""Phase A of `launch.evaluate` end to end on a tiny random checkpoint: `und` (VLMEvalKit-style TSVs with base64 images,
DeepSeek's prompts, predictions that `score` reads) and `gen` (GenEval / DPG-Bench / MJHQ-30K layouts, manifests);
both resumable, and two simulated hosts writing exactly what one host writes. The benchmark files are tiny ones
written here."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from janusflow_jax.convert import janusflow as convert
from janusflow_jax.convert import vae as vae_convert
from janusflow_jax.data.processor import Processor, make_tokenizer
from janusflow_jax.eval import answering, prompts, score
from janusflow_jax.inference import chat
from janusflow_jax.inference import load as inference
from janusflow_jax.models import vae as vae_lib
from janusflow_jax.models.janusflow import init_params
from launch import evaluate as evaluate_cli
from tests.cli_helpers import one_error_line, repository_files

REPO = Path(__file__).resolve().parents[1]
WORDS = "a the red blue cat dog on mat what is this photo color sky there in image yes no answer".split()


def run_cli(*args) -> int:
    flags.FLAGS.unparse_flags()
    try:
        return evaluate_cli.main(flags.FLAGS(["evaluate", *args]))
    finally:
        flags.FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny official-layout checkpoint with tokenizer files and a tiny random VAE (64 px images)."""
    from configs import tiny
    from janusflow_jax.models.config import JanusFlowConfig

    cfg = JanusFlowConfig.from_dict(tiny.get_config().model.to_dict())
    root = convert.to_pytorch(cfg, init_params(cfg, jax.random.key(0)), tmp_path_factory.mktemp("ckpt") / "tiny")
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("tokenizer"), WORDS)
    Processor.from_pretrained(tokenizer, num_image_tokens=cfg.und_encoder.num_patches,
                              image_size=cfg.und_encoder.image_size).save_pretrained(root)
    shutil.copy(tokenizer / "special_tokens_map.json", root)
    vae_config = vae_lib.VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
    vae_convert.to_diffusers(vae_config, vae_lib.init_vae_params(vae_config, jax.random.key(1)), root / "vae")
    return root


def b64_png(seed: int, shape=(40, 48)) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*shape, 3), np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pope_tsv(tmp_path_factory) -> Path:
    """POPE's columns; row 6 shares row 1's image by naming its index (as MMBench's TSV does)."""
    rows = [[i, f"is there a {w} in the image? Please answer yes or no.", a, c, b64_png(i)]
            for i, (w, a, c) in enumerate([("cat", "yes", "random"), ("dog", "no", "random"),
                                            ("mat", "yes", "popular"), ("sky", "no", "popular"),
                                            ("cat", "no", "adversarial")], start=1)]
    rows.append([6, "is there a dog in the image? Please answer yes or no.", "yes", "adversarial", "1"])
    return write_tsv(tmp_path_factory.mktemp("pope") / "POPE.tsv",
                     ["index", "question", "answer", "category", "image"], rows)


def _predictions(out) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- the protocol
def test_prompts_follow_vlmevalkit_janus():
    row = {"index": "3", "question": "What is shown?", "hint": "A photo.", "A": "cat", "B": "dog", "C": "bird",
           "D": "nan", "E": ""}
    assert prompts.multiple_choice_text(row) == ("\nHint: A photo.\nWhat is shown?\nA. cat\nB. dog\nC. bird\n\n"
                                                 "Answer with the option's letter from the given choices directly.")
    no_hint = dict(row, hint="")
    assert prompts.multiple_choice_text(no_hint).startswith("\nWhat is shown?\nA. cat")
    assert prompts.multiple_choice_text({"question": "How many?"}) == "\nHow many?\nAnswer the question directly. "
    pope = prompts.PROTOCOLS["pope"]
    question = {"question": "Is there a cat in the image? Please answer yes or no."}
    assert pope.content(question, 1, "<image_placeholder>") == ("<image_placeholder>\nIs there a cat in the image?"
                                                                "\nAnswer the question using a single word or phrase.")
    assert prompts.PROTOCOLS["mme"].text(question).count("Please answer yes or no.") == 1  # MME keeps it
    # several images: the placeholders side by side, as VLMEvalKit's prepare_itlist
    assert prompts.PROTOCOLS["mmmu"].content({"question": "q", "A": "x"}, 2, "<i>").startswith("<i><i>\nq\nA. x\n")
    assert prompts.PROTOCOLS["mmvet"].system_prompt.startswith("You are a helpful assistant.")
    assert all(p.system_prompt == "" for name, p in prompts.PROTOCOLS.items() if name != "mmvet")
    assert prompts.PROTOCOLS["gqa"].text({"question": "what color?"}) == (
        "\nwhat color?\nAnswer the question using a single word or phrase.")
    rows = [{"index": "1", "split": "dev"}, {"index": "2", "split": "validation"}]
    assert prompts.PROTOCOLS["mmmu"].select(rows) == rows[1:]
    assert {p.scorer for p in prompts.PROTOCOLS.values()} - {""} <= set(score.SUITES)


# ------------------------------------------------------------------------------------------------------- und
def test_und_answers_resumes_and_splits_over_hosts(checkpoint, pope_tsv, tmp_path, capsys):
    one = tmp_path / "one"
    common = ["und", "--suite=pope", f"--checkpoint={checkpoint}", f"--data={pope_tsv}", "--max_new_tokens=3"]
    assert run_cli(*common, f"--out={one}", "--batch_size=4") == 0
    assert "6 answered, 0 found done; 6 of 6 answered" in capsys.readouterr().out
    predictions = _predictions(one)
    assert [p["index"] for p in predictions] == [1, 2, 3, 4, 5, 6]
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["protocol"]["system_prompt"] == "" and manifest["protocol"]["max_new_tokens"] == 3
    assert manifest["example_prompt"] == ("User: <image_placeholder>\nis there a cat in the image?\nAnswer the "
                                          "question using a single word or phrase.\n\nAssistant:")
    assert manifest["items"] == 6 and manifest["prompt_length"] % 64 == 0

    # Each row answered about its own image: row 2 alone, through plain chat, gives the same answer.
    loaded = inference.load(checkpoint)
    image = base64.b64decode(b64_png(2))
    alone = chat.chat(loaded.model, loaded.params, loaded.processor, [image], "is there a dog in the image?\nAnswer "
                      "the question using a single word or phrase.", max_new_tokens=3, system_prompt="")
    assert alone[0] == predictions[1]["prediction"]

    # A rerun does nothing; a lost batch is answered again, identically.
    parts = sorted((one / "parts").iterdir())
    assert len(parts) == 2
    assert run_cli(*common, f"--out={one}", "--batch_size=4") == 0
    assert "0 answered, 6 found done" in capsys.readouterr().out
    parts[1].unlink()
    (one / "predictions.jsonl").unlink()
    assert run_cli(*common, f"--out={one}", "--batch_size=4") == 0
    assert "2 answered, 4 found done" in capsys.readouterr().out
    assert _predictions(one) == predictions

    # Two hosts (another batch size too): the same predictions; the first host alone leaves the set incomplete.
    two = tmp_path / "two"
    assert run_cli(*common, f"--out={two}", "--batch_size=2", "--process_index=1", "--process_count=2") == 0
    assert "host 1 of 2: 3 answered" in capsys.readouterr().out
    assert not (two / "predictions.jsonl").exists()
    assert run_cli(*common, f"--out={two}", "--batch_size=2", "--process_index=0", "--process_count=2") == 0
    assert "6 of 6 answered" in capsys.readouterr().out
    assert _predictions(two) == predictions

    # Phase B reads them; the scores carry the phase-A manifest.
    assert run_cli("score", "--suite=pope", f"--data={pope_tsv}", f"--predictions={two / 'predictions.jsonl'}") == 0
    scores = json.loads((two / "predictions.scores.json").read_text())
    assert scores["questions"] == 6 and scores["missing_predictions"] == 0
    assert scores["phase_a"]["protocol"]["suite"] == "pope"
    direct = score.score_files("pope", pope_tsv, one / "predictions.jsonl")
    assert scores["score"] == direct["score"] and scores["pooled"] == direct["pooled"]
    capsys.readouterr()
    assert run_cli("table", f"--scores={two / 'predictions.scores.json'}") == 0
    table = capsys.readouterr().out
    assert "| JanusFlow-1.3B (paper) | 88.0 |" in table  # POPE's column of Table 5
    assert "- pope (" in table and "answers suite: pope; user_turn: images, then" in table

    # Other settings into the same directory are refused, in one line.
    assert run_cli(*common[:-1], "--max_new_tokens=5", f"--out={one}") == 1
    assert "holds outputs made with other settings" in capsys.readouterr().err


def test_und_multiple_choice_and_several_images(checkpoint, gcs, tmp_path, monkeypatch, capsys):
    """MMMU-style rows: options A..D, two images in one row (a list cell), an open question, a dev row left out. The
    benchmark file and every output (predictions, manifest, parts, scores) on gs://, run from an empty directory:
    nothing is written under it or into the repository. (A checkpoint on gs:// is read as launch.generate reads it:
    tests/test_pod.py.)"""
    from etils import epath

    from janusflow_jax import paths
    from tests.pod_helpers import _objects

    header = ["index", "question", "A", "B", "C", "D", "answer", "split", "image"]
    two_images = str([b64_png(7), b64_png(8, (20, 30))])
    rows = [[1, "what color is the sky?", "red", "blue", "", "", "B", "validation", two_images],
            [2, "what is this?", "cat", "dog", "mat", "sky", "A", "validation", b64_png(9)],
            [3, "how many?", "", "", "", "", "2", "validation", b64_png(10)],
            [4, "what is this?", "cat", "dog", "", "", "A", "dev", b64_png(11)]]
    data = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", header, rows)
    remote = f"{gcs}/evaluate_und"
    paths.copy_file(data, f"{remote}/MMMU_DEV_VAL.tsv")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = repository_files()
    out = f"{remote}/o"
    assert run_cli("und", "--suite=mmmu", f"--checkpoint={checkpoint}", f"--data={remote}/MMMU_DEV_VAL.tsv",
                   f"--out={out}", "--max_new_tokens=2", "--batch_size=3") == 0
    assert "3 of 3 answered" in capsys.readouterr().out
    assert [p["index"] for p in _predictions(epath.Path(out))] == [1, 2, 3]
    items = answering.read_items(prompts.PROTOCOLS["mmmu"], data, "<image_placeholder>")
    assert [len(it.images) for it in items] == [2, 1, 1]
    assert items[0].content.startswith("<image_placeholder><image_placeholder>\nwhat color is the sky?\nA. red\nB. "
                                       "blue\n\nAnswer with")
    assert run_cli("score", "--suite=mmmu", f"--data={remote}/MMMU_DEV_VAL.tsv",
                   f"--predictions={out}/predictions.jsonl") == 0
    assert json.loads(epath.Path(out, "predictions.scores.json").read_text())["questions"] == 3  # validation only
    assert run_cli("table", f"--scores={out}/predictions.scores.json", f"--out={remote}/table.md") == 0
    assert "| JanusFlow-1.3B (paper) |" in epath.Path(remote, "table.md").read_text()
    capsys.readouterr()
    assert run_cli("und", "--suite=mmmu", f"--checkpoint={checkpoint}", f"--data={remote}/MMMU_DEV_VAL.tsv",
                   "--out=gs://no-such-bucket/o") == 1  # before the model is loaded
    assert one_error_line(capsys.readouterr().err).startswith("error: gs://no-such-bucket does not exist")
    assert {"manifest.json", "predictions.jsonl", "predictions.scores.json"} < set(_objects(out))
    assert all(name.startswith("parts/") for name in set(_objects(out)) - {"manifest.json", "predictions.jsonl",
                                                                         "predictions.scores.json"})
    assert list(cwd.iterdir()) == [] and repository_files() == before


# ------------------------------------------------------------------------------------------------------- gen
GENEVAL = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
           {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}],
            "prompt": "a photo of a red dog"},
           {"tag": "single_object", "include": [{"class": "mat", "count": 1}], "prompt": "a photo of a mat"}]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_gen_geneval_layout_resume_and_hosts(checkpoint, tmp_path, capsys):
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text("".join(json.dumps(m) + "\n" for m in GENEVAL))
    one = tmp_path / "one"
    common = ["gen", "--suite=geneval", f"--checkpoint={checkpoint}", f"--data={metadata}", "--steps=2",
              "--images_per_prompt=2"]
    assert run_cli(*common, f"--out={one}", "--batch_size=3") == 0  # prompt 1's images straddle two batches
    assert "3 prompts written, 0 found done; 3 of 3 prompts complete" in capsys.readouterr().out
    files = _tree(one / "images")
    assert sorted(files) == [f"{i:05d}/{name}" for i in range(3)
                             for name in ("grid.png", "metadata.jsonl", "samples/0000.png", "samples/0001.png")]
    assert json.loads(files["00001/metadata.jsonl"]) == GENEVAL[1]
    with Image.open(one / "images" / "00001" / "samples" / "0001.png") as im:
        assert im.size == (64, 64) and im.text["prompt"] == "a photo of a red dog"
        assert im.text["noise_index"] == "3" and im.text["cfg"] == "2.0"
    manifest = json.loads((one / "manifest.json").read_text())
    assert (manifest["cfg"], manifest["steps"], manifest["seed"], manifest["images_per_prompt"]) == (2.0, 2, 0, 2)
    assert "p * images_per_prompt + k" in manifest["noise"] and manifest["template"] == "sft"

    # Resume: a missing sample makes its prompt run again, to the same bytes; a complete set runs nothing.
    (one / "images" / "00002" / "samples" / "0001.png").unlink()
    assert run_cli(*common, f"--out={one}", "--batch_size=3") == 0
    assert "1 prompts written, 2 found done" in capsys.readouterr().out
    assert _tree(one / "images") == files

    # Two simulated hosts: the same files (other batch mates, same shapes).
    two = tmp_path / "two"
    for index in (0, 1):
        assert run_cli(*common, f"--out={two}", "--batch_size=3", f"--process_index={index}",
                       "--process_count=2") == 0
    assert _tree(two / "images") == files

    assert run_cli(*common, f"--out={one}", "--cfg=3") == 1
    assert "cfg: 2.0 then, 3.0 now" in capsys.readouterr().err


def test_gen_dpg_and_mjhq_layouts(checkpoint, gcs, tmp_path, monkeypatch, capsys):
    """DPG-Bench's 2 x 2 grids and MJHQ-30K's category folders, with the prompt files and the outputs on gs://, run
    from an empty directory: nothing is written under it or into the repository."""
    from etils import epath

    from janusflow_jax import paths
    from tests.pod_helpers import _objects

    remote = f"{gcs}/evaluate_gen"
    prompts_dir = tmp_path / "inputs" / "prompts"
    prompts_dir.mkdir(parents=True)
    (prompts_dir / "item7.txt").write_text("a red cat on a mat\n")
    (prompts_dir / "item3.txt").write_text("a blue sky\n")
    meta = {"a1": {"prompt": "a dog", "category": "animals"}, "p2": {"prompt": "the sky", "category": "landscape"}}
    (tmp_path / "inputs" / "meta_data.json").write_text(json.dumps(meta))
    paths.upload_tree(tmp_path / "inputs", f"{remote}/inputs")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = repository_files()
    assert run_cli("gen", "--suite=dpg", f"--checkpoint={checkpoint}", f"--data={remote}/inputs/prompts",
                   f"--out={remote}/dpg", "--steps=2", "--batch_size=3") == 0
    assert _objects(f"{remote}/dpg") == ["images/item3.png", "images/item7.png", "manifest.json"]
    with Image.open(io.BytesIO(epath.Path(remote, "dpg", "images", "item7.png").read_bytes())) as grid:
        assert grid.size == (128, 128) and grid.text["prompt"] == "a red cat on a mat"  # 2 x 2 tiles of 64 px
    assert run_cli("gen", "--suite=mjhq", f"--checkpoint={checkpoint}", f"--data={remote}/inputs/meta_data.json",
                   f"--out={remote}/mjhq", "--steps=2", "--batch_size=3") == 0
    assert _objects(f"{remote}/mjhq") == ["images/animals/a1.png", "images/landscape/p2.png", "manifest.json"]
    assert "next: clean-fid" in capsys.readouterr().out
    assert run_cli("gen", "--suite=mjhq", f"--checkpoint={checkpoint}", f"--data={remote}/inputs/meta_data.json",
                   f"--out={remote}/mjhq2", "--images_per_prompt=2") == 1
    assert "one image per prompt" in capsys.readouterr().err
    assert list(cwd.iterdir()) == [] and repository_files() == before


def test_help_documents_both_phases():
    proc = subprocess.run([sys.executable, "-m", "launch.evaluate", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    for text in ("evaluate gen --suite=geneval|dpg|mjhq", "evaluate und --suite=SUITE", "evaluate score --suite",
                 "Answer with the option's letter", "--process_index", "--images_per_prompt"):
        assert text in proc.stdout, text
