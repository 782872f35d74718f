"""`launch.generate` and `launch.chat` end to end on a tiny random checkpoint (tokenizer from make_tokenizer, a tiny
random VAE), from an official directory and from an orbax checkpoint written by `launch.convert --to=jax`; bad input
gives one line on stderr and a non-zero exit. The CLIs' `main` runs in-process (absl flags reset around each call);
one subprocess checks the module entry point.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from janusflow_jax.convert import janusflow as convert
from janusflow_jax.inference import load as inference
from janusflow_jax.convert import vae as vae_convert
from janusflow_jax.models import vae as vae_lib
from janusflow_jax.models.janusflow import init_params
from janusflow_jax.data.processor import Processor, make_tokenizer
from launch import chat as chat_cli
from launch import convert as convert_cli
from launch import generate as generate_cli
from cli_helpers import one_error_line, run_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = "a the red blue cat dog on mat what is this photo color sky".split()


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    """Official layout + tokenizer/processor files + vae/ (what a user has after downloading release and VAE)."""
    from configs import tiny
    from janusflow_jax.models.config import JanusFlowConfig

    cfg = JanusFlowConfig.from_dict(tiny.get_config().model.to_dict())
    root = convert.to_pytorch(cfg, init_params(cfg, jax.random.key(0)), tmp_path_factory.mktemp("ckpt") / "tiny")
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("tokenizer"), WORDS)
    Processor.from_pretrained(tokenizer, num_image_tokens=cfg.und_encoder.num_patches,
                              image_size=cfg.und_encoder.image_size).save_pretrained(root)
    shutil.copy(tokenizer / "special_tokens_map.json", root)
    # 4 blocks: an 8x downsampling VAE, as the SDXL-VAE (8 x 8 latents -> 64 x 64 images), at 8 channels.
    vae_config = vae_lib.VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
    vae_convert.to_diffusers(vae_config, vae_lib.init_vae_params(vae_config, jax.random.key(1)), root / "vae")
    return root


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 36, 3), np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def orbax_ckpt(official, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("orbax") / "ckpt"
    assert run_cli(convert_cli, "--to=jax", f"--torch_dir={official}", f"--out={out}") == 0
    return out


GENERATE_ARGS = ("--prompt=a red cat", "--num_images=2", "--steps=2", "--batch_size=3")


def test_generate_from_official_dir(official, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\nthe blue sky\n\n", encoding="utf-8")
    out = tmp_path / "out"
    assert run_cli(generate_cli, f"--checkpoint={official}", f"--prompts_file={prompts}", f"--out={out}",
                   "--cfg=3", *GENERATE_ARGS) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["000_00.png", "000_01.png", "001_00.png", "001_01.png",
                                                     "grid.png"]
    with Image.open(out / "001_01.png") as im:
        assert im.size == (64, 64) and im.mode == "RGB"
        assert im.text["prompt"] == "the blue sky" and im.text["cfg"] == "3.0" and im.text["steps"] == "2"
        assert im.text["seed"] == "0" and im.text["image_index"] == "1"
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 64, 2 * 64) and grid.text["prompt"] == "a red cat\nthe blue sky"
        top_left = np.asarray(grid)[:64, :64]
    with Image.open(out / "000_00.png") as first:
        np.testing.assert_array_equal(top_left, np.asarray(first))


def test_convert_copies_inference_files_and_clis_run_from_orbax(orbax_ckpt, official, image, tmp_path, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
                 "preprocessor_config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        assert (orbax_ckpt / name).is_file(), name
    assert (orbax_ckpt / "tokenizer.json").read_bytes() == (official / "tokenizer.json").read_bytes()
    loaded = inference.load(orbax_ckpt)  # the orbax checkpoint still loads with the extra files beside it
    assert loaded.config == convert.from_pytorch(official)[0]

    assert run_cli(generate_cli, f"--checkpoint={orbax_ckpt}", f"--out={tmp_path / 'out'}", *GENERATE_ARGS) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    capsys.readouterr()
    assert run_cli(chat_cli, f"--checkpoint={orbax_ckpt}", f"--image={image}", "--question=what is this",
                   "--question=what color is the cat", "--max_new_tokens=4") == 0
    out = capsys.readouterr().out
    assert out.count("Q: ") == 2 and "Q: what color is the cat\nA: " in out


def test_relative_paths(orbax_ckpt, image, tmp_path, monkeypatch, capsys):
    """The orbax checkpoint, the image, the prompts file and the output as a user types them: relative to the current
    directory (orbax refuses relative paths; the CLIs resolve them where they enter)."""
    monkeypatch.chdir(tmp_path)
    ckpt, photo = os.path.relpath(orbax_ckpt, tmp_path), os.path.relpath(image, tmp_path)
    assert ckpt.startswith("..") and photo.startswith("..")
    Path("prompts.txt").write_text("a red cat\n", encoding="utf-8")
    assert run_cli(generate_cli, f"--checkpoint={ckpt}", "--prompts_file=prompts.txt", "--out=gen",
                   *GENERATE_ARGS[1:]) == 0
    assert "wrote 2 images" in capsys.readouterr().out and (tmp_path / "gen" / "grid.png").is_file()
    assert run_cli(chat_cli, f"--checkpoint={ckpt}", f"--image={photo}", "--question=what is this",
                   "--max_new_tokens=2", "--system_prompt=") == 0


def test_chat_interactive(official, image, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("what is this\n\nwhat color is the sky\nexit\nnot asked\n"))
    assert run_cli(chat_cli, f"--checkpoint={official}", f"--image={image}", "--max_new_tokens=3",
                   "--temperature=0.7") == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # two answers (the tiny model may answer with "")


@pytest.fixture(scope="module")
def damaged(official, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints with one thing wrong each."""
    root = tmp_path_factory.mktemp("damaged")
    no_tokenizer, no_vae, truncated = root / "no_tokenizer", root / "no_vae", root / "truncated"
    for d in (no_tokenizer, no_vae, truncated):
        shutil.copytree(official, d, ignore=shutil.ignore_patterns("vae"))
    (no_tokenizer / "tokenizer.json").unlink()
    weights = (official / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    bad_image = root / "broken.png"
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return dict(no_tokenizer=no_tokenizer, no_vae=no_vae, truncated=truncated, bad_image=bad_image)


@pytest.mark.parametrize("cli,args,message", [
    (chat_cli, ("--checkpoint={official}", "--image={bad_image}", "--question=hi"), "cannot read image"),
    (chat_cli, ("--checkpoint={no_tokenizer}", "--image={image}", "--question=hi"), "has no tokenizer"),
    (chat_cli, ("--checkpoint={truncated}", "--question=hi"), "truncated/model.safetensors is not a readable"),
    (chat_cli, ("--checkpoint={official}", "--question=" + "cat " * 2100), "the context holds 2048"),
    (generate_cli, ("--checkpoint={official}", "--prompt=" + "red " * 2100, "--out={out}"), "at most 2031 fit"),
    (generate_cli, ("--checkpoint={no_vae}", "--prompt=a cat", "--out={out}"), "no VAE: pass --vae"),
    (generate_cli, ("--checkpoint={official}", "--vae={out}", "--prompt=a cat", "--out={out}"), "no VAE directory"),
    (generate_cli, ("--checkpoint={truncated}", "--vae={official}/vae", "--prompt=a cat", "--out={out}"),
     "truncated/model.safetensors is not a readable"),
    (generate_cli, ("--checkpoint={out}", "--prompt=a cat", "--out={out}"), "no checkpoint directory"),
], ids=["bad_image", "no_tokenizer", "truncated_chat", "long_question", "long_prompt", "no_vae", "vae_path",
        "truncated_generate", "no_checkpoint"])
def test_bad_input_fails_cleanly(cli, args, message, official, damaged, image, tmp_path, capsys):
    paths = dict(damaged, official=official, image=image, out=tmp_path / "missing")
    assert run_cli(cli, *(a.format(**paths) for a in args)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert message in line, line
    assert not (tmp_path / "missing").exists()


def test_module_entry_point(damaged):
    proc = subprocess.run([sys.executable, "-m", "launch.chat", f"--checkpoint={damaged['truncated']}",
                           "--question=hi"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "is not a readable safetensors file" in one_error_line(proc.stderr)
