"""OmniMamba through the command lines, end to end, on a tiny random release directory built with the PyTorch
references (reference/omnimamba_torch.py for the LM and projector, reference/vq_torch.py for the VQ, timm for the
DINOv2 and SigLIP towers) and a tiny tokenizer: `launch.convert` both ways bit-exact, `launch.generate` and
`launch.chat` from the release directory and from the converted orbax checkpoint with relative paths typed from
inside a temporary directory, flags of the other family refused, and bad input (a damaged .pth, a missing tower
file, a missing tokenizer) as one `error:` line and exit 1. The CLIs' `main` runs in-process (absl flags reset
around each call), so each jitted function compiles once for the module.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from flax import traverse_util  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from janusflow_jax import checkpoint  # noqa: E402
from janusflow_jax.convert import omnimamba_release as release  # noqa: E402
from janusflow_jax.data.omnimamba_processor import make_tokenizer  # noqa: E402
from janusflow_jax.inference import load as inference  # noqa: E402
from janusflow_jax.models import dinosiglip, omnimamba, vit, vq  # noqa: E402
from janusflow_jax.reference import omnimamba_torch, vq_torch  # noqa: E402
from launch import chat as chat_cli  # noqa: E402
from launch import convert as convert_cli  # noqa: E402
from launch import generate as generate_cli  # noqa: E402
from cli_helpers import one_error_line, run_cli  # noqa: E402

WORDS = "a the red blue cat dog on mat what is this photo color sky".split()
LM = omnimamba.tiny_config()  # 9 image features, 4 x 4 codes from a 48-code book
SIDE = 14  # 14 px with 4 px patches: 3 x 3 = 9 patches, 2 dropped pixels per side (384 px / 14 px patches: 27, 6)
DINO = vit.DINOV2_L_REG4_384.replace(image_size=SIDE, patch_size=4, width=32, depth=3, num_heads=2, mlp_dim=128)
SIGLIP = vit.SIGLIP_SO400M_384.replace(image_size=SIDE, patch_size=4, width=48, depth=3, num_heads=4,
                                       mlp_dim=int(48 * 3.7362))
VQ = vq.VQConfig(codebook_size=LM.image_vocab_size, encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2),
                 z_channels=16, ch=16, norm_groups=8)  # 4 x downsampling: 4 x 4 codes -> 16 x 16 images
TOWER = dinosiglip.DinoSigLIPConfig(dino=DINO, siglip=SIGLIP)
SYSTEM = omnimamba.OmniMambaSystemConfig(lm=LM, vision=TOWER, vq=VQ,
                                         projector=dinosiglip.ProjectorConfig(TOWER.width, LM.d_model))
GENERATE = ("--prompt=a red cat", "--num_images=2", "--batch_size=2")


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norms, biases, LayerScale, tokens, codebook included), O(1) activations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2 and not name.endswith(("token", "pos_embed", "embedding.weight")):
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
            elif name.endswith(("weight", "gamma")) and p.ndim == 1:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)
    return model.eval()


def timm_state(cfg: vit.ViTConfig, name: str, seed: int) -> dict:
    """The registered timm model at the tiny sizes, as the README's one-liner saves the real one (num_classes=0)."""
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=cfg.image_size,
                              patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads)
    return {k: v.contiguous() for k, v in randomize_(model, seed).state_dict().items()}


def tensors_equal(a: dict, b: dict, keys) -> None:
    for key in keys:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(torch.uint8) if a[key].dtype.is_floating_point else a[key],
                           b[key].view(torch.uint8) if b[key].dtype.is_floating_point else b[key]), key


def trees_equal(x, y) -> None:
    fx, fy = traverse_util.flatten_dict(x, sep="/"), traverse_util.flatten_dict(y, sep="/")
    assert sorted(fx) == sorted(fy)
    for key in fx:
        u, v = np.asarray(fx[key]), np.asarray(fy[key])
        assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes(), key


# ------------------------------------------------------------------------------------------------------- fixtures
def reference_lm(seed: int = 0):
    """The PyTorch reference of the release's LM + projector at the tiny system's shapes, random weights."""
    lm = LM.backbone
    reference = omnimamba_torch.reference_config(
        d_model=lm.d_model, n_layer=lm.n_layer, d_state=lm.d_state, headdim=lm.headdim, expand=lm.expand,
        ngroups=lm.ngroups, d_conv=lm.d_conv, chunk_size=lm.chunk_size, vocab_size=lm.vocab_size,
        image_vocab_size=LM.image_vocab_size, pos_embed_rows=LM.pos_embed_rows,
        mmu_pos_embed_rows=LM.mmu_pos_embed_rows, lora_tasks=lm.lora_tasks, lora_rank=lm.lora_rank,
        lora_alpha=lm.lora_alpha, lora_dropout=lm.lora_dropout, image_mlp_ratio=LM.image_mlp_ratio,
        vision_dim=TOWER.width)
    return omnimamba_torch.randomize_(omnimamba_torch.build_reference(reference), seed=seed)


def reference_vq(seed: int = 1):
    """LlamaGen's VQ (the PyTorch reference) at the tiny system's shapes, random weights."""
    return randomize_(vq_torch.VQModel(codebook_size=VQ.codebook_size, codebook_embed_dim=VQ.codebook_embed_dim,
                                       encoder_ch_mult=VQ.encoder_ch_mult, decoder_ch_mult=VQ.decoder_ch_mult,
                                       z_channels=VQ.z_channels, ch=VQ.ch, norm_groups=VQ.norm_groups), seed=seed)


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory) -> Path:
    """What a user has after the README's downloads: the .pth (fp16: LM + projector + VQ under the release's keys,
    codebook_used a non-zero training statistic), the two timm tower files (fp32, every block, norm and head) and
    the tokenizer; plus omnimamba_config.json, which states the tiny architecture (the real release needs none)."""
    root = tmp_path_factory.mktemp("release") / "OmniMamba"
    make_tokenizer(root, WORDS)
    model = reference_lm()
    # The LM's image table scaled up: peaked image logits, so greedy images vary with the prompt.
    model.llm_backbone.mamba.backbone.img_embeddings.word_embeddings.weight.data *= 20.0
    vq_model = reference_vq()
    vq_model.quantize.codebook_used.copy_(torch.arange(65536) % VQ.codebook_size)
    state = {**model.state_dict(), **{f"llm_backbone.vqvae.{k}": v for k, v in vq_model.state_dict().items()}}
    torch.save({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()},
               root / release.RELEASE_FILE)
    save_file(timm_state(DINO, "vit_large_patch14_reg4_dinov2", seed=2), str(root / release.DINO_FILE))
    save_file(timm_state(SIGLIP, "vit_so400m_patch14_siglip_384", seed=3), str(root / release.SIGLIP_FILE))
    (root / release.CONFIG_FILE).write_text(json.dumps(SYSTEM.to_dict()))
    return root


@pytest.fixture(scope="module")
def orbax_ckpt(release_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("orbax") / "omnimamba"
    assert run_cli(convert_cli, "--to=jax", f"--torch_dir={release_dir}", f"--out={out}") == 0
    return out


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------------------------------- conversion
def test_convert_round_trip_is_bit_exact(release_dir, orbax_ckpt, tmp_path, capsys):
    assert release.RELEASE_FILE == inference.OMNIMAMBA_RELEASE_FILE
    config, params = checkpoint.load_params(orbax_ckpt)
    assert config == SYSTEM and sorted(params) == ["lm", "projector", "vision", "vq"]
    assert {p.name for p in orbax_ckpt.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    back = tmp_path / "back"
    assert run_cli(convert_cli, "--to=torch", f"--ckpt={orbax_ckpt}", f"--out={back}") == 0
    assert f"to {back}" in capsys.readouterr().out
    assert sorted(p.name for p in back.iterdir()) == sorted([*release.WEIGHT_FILES, release.CONFIG_FILE,
                                                             "tokenizer.json", "tokenizer_config.json"])
    original = torch.load(release_dir / release.RELEASE_FILE, weights_only=True)
    exported = torch.load(back / release.RELEASE_FILE, weights_only=True)
    assert sorted(exported) == sorted(original)
    used = [k for k in original if k != "llm_backbone.vqvae.quantize.codebook_used"]
    tensors_equal(original, exported, used)
    assert not exported["llm_backbone.vqvae.quantize.codebook_used"].any()  # a statistic, skipped: written as zeros
    # The tied copies are one tensor again, as torch.save writes a shared parameter.
    assert exported["llm_backbone.mamba.lm_head.weight"].data_ptr() == \
        exported["llm_backbone.mamba.backbone.embedding.weight"].data_ptr()
    for name, skipped in ((release.DINO_FILE, ("blocks.2.", "norm.")),
                          (release.SIGLIP_FILE, ("blocks.2.", "norm.", "attn_pool."))):
        a, b = load_file(str(release_dir / name)), load_file(str(back / name))
        assert sorted(b) == sorted(k for k in a if not k.startswith(skipped)), name  # the kept tensors
        tensors_equal(a, b, b)
    # And back again: the same parameters, bit for bit (the LM's blocks stacked on the way, then unstacked).
    again = tmp_path / "again"
    assert run_cli(convert_cli, "--to=jax", f"--torch_dir={back}", f"--out={again}", "--scan_layers") == 0
    config_again, params_again = checkpoint.load_params(again)
    assert config_again.lm.backbone.scan_layers and "layers" in params_again["lm"]["backbone"]
    twice = tmp_path / "twice"
    assert run_cli(convert_cli, "--to=torch", f"--ckpt={again}", f"--out={twice}") == 0
    tensors_equal(exported, torch.load(twice / release.RELEASE_FILE, weights_only=True), exported)


def test_the_checkpoint_loads_sharded(orbax_ckpt):
    from janusflow_jax.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    _, params = checkpoint.load_params(orbax_ckpt, mesh=mesh)
    assert params["vq"]["quantize"]["embedding"].sharding.mesh == mesh


# --------------------------------------------------------------------------------------------- generate and chat
def test_generate_from_release_dir_and_checkpoint(release_dir, orbax_ckpt, tmp_path, monkeypatch, capsys):
    """Relative paths as a user types them; the same greedy images from both; each PNG is the PyTorch VQ's decoding
    of the codes the LM wrote, with the prompt and settings in its text."""
    monkeypatch.chdir(tmp_path)
    rel = {name: os.path.relpath(path, tmp_path) for name, path in (("release", release_dir), ("ckpt", orbax_ckpt))}
    assert all(p.startswith("..") for p in rel.values())
    Path("prompts.txt").write_text("the blue sky\n", encoding="utf-8")
    for name, ckpt in rel.items():
        assert run_cli(generate_cli, f"--checkpoint={ckpt}", "--prompts_file=prompts.txt", f"--out=gen_{name}",
                       *GENERATE) == 0
        assert f"wrote 4 images and grid.png to gen_{name}" in capsys.readouterr().out
    names = ["000_00.png", "000_01.png", "001_00.png", "001_01.png", "grid.png"]
    for name in names:
        with Image.open(tmp_path / "gen_release" / name) as a, Image.open(tmp_path / "gen_ckpt" / name) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with Image.open(tmp_path / "gen_release" / "001_01.png") as im:
        assert im.size == (16, 16) and im.mode == "RGB"
        assert im.text["prompt"] == "the blue sky" and im.text["cfg"] == "1.0" and im.text["temperature"] == "0.0"
        assert im.text["seed"] == "0" and im.text["checkpoint"] == str(release_dir)

    from janusflow_jax.inference import omnimamba as infer
    from janusflow_jax.inference.sampler import to_uint8

    loaded = inference.load_omnimamba(orbax_ckpt)
    codes = infer.text_to_image_codes(loaded.model, loaded.params, loaded.processor, ["a red cat", "the blue sky"])
    assert not np.array_equal(codes[0], codes[1])
    vq_ref = vq_torch.VQModel(codebook_size=VQ.codebook_size, codebook_embed_dim=VQ.codebook_embed_dim,
                              encoder_ch_mult=VQ.encoder_ch_mult, decoder_ch_mult=VQ.decoder_ch_mult,
                              z_channels=VQ.z_channels, ch=VQ.ch, norm_groups=VQ.norm_groups).eval()
    weights = torch.load(release_dir / release.RELEASE_FILE, weights_only=True)
    vq_ref.load_state_dict({k.removeprefix("llm_backbone.vqvae."): v.float() for k, v in weights.items()
                            if k.startswith("llm_backbone.vqvae.")})
    with torch.no_grad():
        want = to_uint8(vq_ref.decode_code(torch.from_numpy(codes).long()).permute(0, 2, 3, 1).numpy())
    for p, name in enumerate(["000_00.png", "001_00.png"]):
        with Image.open(tmp_path / "gen_ckpt" / name) as im:
            assert np.abs(np.asarray(im).astype(int) - want[p]).max() <= 1


def test_resize_naive_is_torchvision(photo):
    torchvision = pytest.importorskip("torchvision")
    from janusflow_jax.inference.omnimamba import resize_naive

    transform = torchvision.transforms.Compose([
        torchvision.transforms.Resize((SIDE, SIDE), interpolation=torchvision.transforms.InterpolationMode.BICUBIC),
        torchvision.transforms.ToTensor()])
    with Image.open(photo) as im:
        np.testing.assert_array_equal(resize_naive(im, SIDE), transform(im.convert("RGB")).permute(1, 2, 0).numpy())


def test_chat_from_release_dir_and_checkpoint(release_dir, orbax_ckpt, photo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    image = os.path.relpath(photo, tmp_path)
    answers = []
    for ckpt in (release_dir, orbax_ckpt):
        assert run_cli(chat_cli, f"--checkpoint={os.path.relpath(ckpt, tmp_path)}", f"--image={image}",
                       "--question=what is this", "--max_new_tokens=4") == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].endswith("\n")
    assert run_cli(chat_cli, f"--checkpoint={os.path.relpath(orbax_ckpt, tmp_path)}", "--question=what is this",
                   "--question=what is mat", "--max_new_tokens=4") == 0  # no image: the text-only zeros
    out = capsys.readouterr().out
    assert out.count("Q: ") == 2 and "Q: what is mat\nA: " in out


def test_chat_interactive(orbax_ckpt, photo, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("what is this\n\nwhat color is the sky\nexit\nnot asked\n"))
    assert run_cli(chat_cli, f"--checkpoint={orbax_ckpt}", f"--image={photo}", "--max_new_tokens=4") == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # two answers (the tiny model may answer with "")


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def damaged(release_dir, tmp_path_factory) -> dict[str, Path]:
    """Release directories with one thing wrong each, a fake JanusFlow directory and a LM-only checkpoint."""
    root = tmp_path_factory.mktemp("damaged")
    out = {name: root / name for name in ("truncated", "no_siglip", "no_tokenizer", "mismatched", "no_config")}
    for path in out.values():
        shutil.copytree(release_dir, path)
    weights = (release_dir / release.RELEASE_FILE).read_bytes()
    (out["truncated"] / release.RELEASE_FILE).write_bytes(weights[: len(weights) // 2])
    (out["no_siglip"] / release.SIGLIP_FILE).unlink()
    (out["no_tokenizer"] / "tokenizer.json").unlink()
    (out["no_config"] / release.CONFIG_FILE).unlink()  # then the release's architecture: full-size towers
    # SigLIP's file in DINOv2's place, a stray vision_backbone tensor and a projector bias gone from the .pth
    shutil.copy(release_dir / release.SIGLIP_FILE, out["mismatched"] / release.DINO_FILE)
    state = torch.load(release_dir / release.RELEASE_FILE, weights_only=True)
    state["vision_backbone.featurizer.pos_embed"] = torch.zeros(1, 9, 32)
    del state["projector.projector.0.bias"]
    torch.save(state, out["mismatched"] / release.RELEASE_FILE)
    out["janusflow"] = root / "janusflow"
    out["janusflow"].mkdir()
    (out["janusflow"] / "config.json").write_text(json.dumps({"language_config": {}}))
    return out


@pytest.mark.parametrize("cli,args,message", [
    (convert_cli, ("--to=jax", "--torch_dir={truncated}", "--out={out}"),
     "truncated/OmniMamba-1.3b.pth is not a readable PyTorch checkpoint"),
    (generate_cli, ("--checkpoint={truncated}", "--prompt=a cat", "--out={out}"), "is not a readable PyTorch"),
    (chat_cli, ("--checkpoint={truncated}", "--question=hi"), "is not a readable PyTorch checkpoint"),
    (convert_cli, ("--to=jax", "--torch_dir={no_siglip}", "--out={out}"), "lacks siglip.safetensors: save the timm"),
    (chat_cli, ("--checkpoint={no_siglip}", "--image={photo}", "--question=hi"), "lacks siglip.safetensors"),
    (generate_cli, ("--checkpoint={no_tokenizer}", "--prompt=a cat", "--out={out}"),
     "has no tokenizer (tokenizer.json): put EleutherAI/gpt-neox-20b's"),
    (chat_cli, ("--checkpoint={no_tokenizer}", "--question=hi"), "has no tokenizer"),
    (convert_cli, ("--to=jax", "--torch_dir={mismatched}", "--out={out}"), "mismatched does not match the model"),
    (chat_cli, ("--checkpoint={no_config}", "--question=hi"),
     "no_config has no omnimamba_config.json, so the release's architecture was assumed, and its weights do not fit "
     "it: 729 image features do not fit 64 mmu positions"),
    (generate_cli, ("--checkpoint={release}", "--prompt=a cat", "--out={out}", "--steps=3", "--vae={release}"),
     "--steps, --vae do not apply to OmniMamba checkpoints"),
    (generate_cli, ("--checkpoint={janusflow}", "--prompt=a cat", "--out={out}", "--top_k=5"),
     "--top_k does not apply to JanusFlow checkpoints"),
    (chat_cli, ("--checkpoint={release}", "--image={photo}", "--image={photo}", "--question=hi"),
     "OmniMamba reads one image per conversation; got 2"),
    (convert_cli, ("--to=jax", "--torch_dir={release}", "--out={out}", "--seed=1"), "--seed is JanusFlow's"),
    (convert_cli, ("--to=torch", "--ckpt={ckpt}", "--out={out}", "--include_repa"), "--include_repa is JanusFlow's"),
], ids=["convert_truncated", "generate_truncated", "chat_truncated", "convert_no_tower", "chat_no_tower",
        "generate_no_tokenizer", "chat_no_tokenizer", "convert_mismatched", "chat_no_config", "janusflow_flags",
        "omnimamba_flags", "two_images", "convert_seed", "convert_repa"])
def test_bad_input_fails_cleanly(cli, args, message, damaged, release_dir, orbax_ckpt, photo, tmp_path, capsys):
    paths = dict(damaged, release=release_dir, ckpt=orbax_ckpt, photo=photo, out=tmp_path / "missing")
    assert run_cli(cli, *(a.format(**paths) for a in args)) == 1
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert message in line, line
    assert not (tmp_path / "missing").exists()
    if "mismatched" in args[1]:  # one error names every bad tensor, tower tensors with their file
        for name in ("missing tensors", "dinov2.safetensors: reg_token", "projector.projector.0.bias",
                     "vision_backbone.featurizer.pos_embed", "mis-shaped tensors",
                     "dinov2.safetensors: patch_embed.proj.weight: expected [32, 3, 4, 4], got [48, 3, 4, 4]"):
            assert name in err, name


def test_a_language_model_checkpoint_is_refused(orbax_ckpt, tmp_path, capsys):
    config, params = checkpoint.load_params(orbax_ckpt)
    checkpoint.save_params(tmp_path / "lm", config.lm, params["lm"])
    shutil.copy(orbax_ckpt / "tokenizer.json", tmp_path / "lm")
    assert run_cli(chat_cli, f"--checkpoint={tmp_path / 'lm'}", "--question=hi") == 1
    assert "holds the OmniMamba language model only" in one_error_line(capsys.readouterr().err)
