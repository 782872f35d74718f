"""Stage 1's start (`init.kind = "start"`, train/omnimamba_start.py) from the files the release starts from: a Mamba-2
LM in mamba_ssm's layout (its vocabulary padded, the tied head saved), the two timm towers and LlamaGen's VQ
checkpoint, all built here at tiny sizes. The start's LM gives the pretrained LM's logits (its LoRA B zero: with
either task adapter on), every new part is drawn as the release draws it (bounds, zeroed biases, the 1/√n_layer
rescale), and the trainer's `initial_params` places exactly that tree."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import traverse_util  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from configs import omnimamba_stage1_mmu  # noqa: E402
from janusflow_jax.convert import mamba2 as mamba2_convert  # noqa: E402
from janusflow_jax.convert import omnimamba_release as release  # noqa: E402
from janusflow_jax.convert import vq as vq_convert  # noqa: E402
from janusflow_jax.models import mamba2  # noqa: E402
from janusflow_jax.reference import vq_torch  # noqa: E402
from janusflow_jax.train import omnimamba_start  # noqa: E402
from test_cli_omnimamba import DINO, LM, SIGLIP, SYSTEM, VQ, randomize_ as randomize_tower_  # noqa: E402
from test_mamba2 import hf_config, hf_logits, randomize_, rel_err, report  # noqa: E402

TEXT_VOCAB = 81  # padded to 96 rows (as 50277 to 50288): the tiny tokenizer's [PAD] and OmniMamba tokens fit in them


def write_lm(directory, **changes):
    """A mamba_ssm MambaLMHeadModel directory: config.json as mamba_ssm writes it, pytorch_model.bin with the tied
    head under both names; the tensors those of a transformers Mamba2 (returned, the reference)."""
    b = LM.backbone
    values = dict(hidden_size=b.d_model, num_hidden_layers=b.n_layer, num_heads=b.nheads, head_dim=b.headdim,
                  state_size=b.d_state, chunk_size=b.chunk_size, vocab_size=b.vocab_size)
    model = randomize_(transformers.Mamba2ForCausalLM(hf_config(**{**values, **changes})).eval(), seed=5)
    directory.mkdir()
    hidden = changes.get("hidden_size", b.d_model)
    config = dict(d_model=hidden, d_intermediate=0, n_layer=b.n_layer, vocab_size=TEXT_VOCAB,
                  ssm_cfg=dict(layer="Mamba2", d_state=b.d_state, headdim=b.headdim, chunk_size=b.chunk_size),
                  attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                  pad_vocab_size_multiple=16, tie_embeddings=True)
    (directory / "config.json").write_text(json.dumps(config))
    torch.save({k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in model.state_dict().items()},
               directory / "pytorch_model.bin")
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    model = write_lm(root / "mamba2")
    towers = root / "towers"
    towers.mkdir()
    for cfg, name, file, seed in ((DINO, "vit_large_patch14_reg4_dinov2", release.DINO_FILE, 2),
                                  (SIGLIP, "vit_so400m_patch14_siglip_384", release.SIGLIP_FILE, 3)):
        timm_model = timm.create_model(name, pretrained=False, num_classes=0, img_size=cfg.image_size,
                                       patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
                                       num_heads=cfg.num_heads)
        save_file({k: v.contiguous() for k, v in randomize_tower_(timm_model, seed).state_dict().items()},
                  str(towers / file))
    vq_model = randomize_tower_(vq_torch.VQModel(
        codebook_size=VQ.codebook_size, codebook_embed_dim=VQ.codebook_embed_dim, encoder_ch_mult=VQ.encoder_ch_mult,
        decoder_ch_mult=VQ.decoder_ch_mult, z_channels=VQ.z_channels, ch=VQ.ch, norm_groups=VQ.norm_groups), seed=1)
    torch.save({"model": vq_model.state_dict(), "args": argparse.Namespace(vq_model="VQ-16")},
               towers / release.VQ_FILE)
    config, params = omnimamba_start.stage1_start(SYSTEM, root / "mamba2", towers, seed=0)
    return dict(root=root, model=model, towers=towers, config=config, params=params)


def test_the_start_lm_gives_the_pretrained_lms_logits(files, record_property):
    lm_cfg, lm_params = mamba2_convert.from_mamba_ssm(files["root"] / "mamba2")
    assert lm_cfg.vocab_size == 96  # 81 tokens padded to a multiple of 16: the added tokens' rows are there
    start = files["params"]["lm"]["backbone"]
    assert np.array_equal(start["embeddings"]["embedding"], lm_params["embeddings"]["embedding"])
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 90, size=(2, 19)))
    pretrained = np.asarray(jax.jit(mamba2.Mamba2LM(lm_cfg).apply)({"params": lm_params}, ids))
    reference = hf_logits(files["model"], np.asarray(ids))
    errors = {}
    for task in LM.tasks:
        logits = jax.jit(lambda p, x: mamba2.Mamba2LM(LM.backbone).apply({"params": p}, x, task=task))(start, ids)
        errors[f"start LM ({task} LoRA) vs mamba_ssm-layout LM"] = rel_err(logits, pretrained)
        errors[f"start LM ({task} LoRA) vs transformers"] = rel_err(logits, reference)
    report(record_property, **errors)
    assert max(errors.values()) <= 1e-6, errors


def test_new_parts_are_drawn_as_the_release_draws_them(files):
    lm, d, n_layer = files["params"]["lm"], LM.d_model, LM.backbone.n_layer
    bound = 1 / math.sqrt(d)
    for name in ("fc0", "fc1", "fc2"):  # biases zeroed by _init_weights; weights torch's default
        layer = lm["img_project_in"][name]
        assert not layer["bias"].any()
        fan_in = layer["kernel"].shape[0]
        assert 0.9 / math.sqrt(fan_in) < np.abs(layer["kernel"]).max() <= 1 / math.sqrt(fan_in)
    assert 0.9 * bound < np.abs(lm["caption_embed"]["fc1"]["kernel"]).max() <= bound
    fc2 = np.abs(lm["caption_embed"]["fc2"]["kernel"]).max()  # the GPT-2 rescale of "fc2.weight"
    assert 0.9 * bound / math.sqrt(n_layer) < fc2 <= bound / math.sqrt(n_layer)
    for table in (lm["img_embeddings"]["embedding"], lm["pos_embed"], lm["mmu_pos_embed"]):
        assert abs(table.std() - 0.02) < 0.003 and abs(table.mean()) < 0.003
    for i in range(n_layer):
        mixer = lm["backbone"][f"layers_{i}"]["mixer"]
        for task in LM.tasks:
            lora = mixer[f"lora_{task}"]
            assert 0.9 * bound < np.abs(lora["A"]).max() <= bound
            assert all(not lora[k].any() for k in lora if k.startswith("B_"))
    for name, layer in files["params"]["projector"].items():  # outside the LM: torch's default, biases too
        b = 1 / math.sqrt(layer["kernel"].shape[0])
        assert 0.5 * b < np.abs(layer["bias"]).max() <= b and np.abs(layer["kernel"]).max() <= b, name
    vq_state = vq_convert.load_llamagen_checkpoint(files["towers"] / release.VQ_FILE)
    expected = traverse_util.flatten_dict(vq_convert.vq_from_llamagen(vq_state, VQ), sep="/")
    got = traverse_util.flatten_dict(files["params"]["vq"], sep="/")
    assert all(np.array_equal(got[k], expected[k]) for k in expected) and sorted(got) == sorted(expected)
    _, again = omnimamba_start.stage1_start(SYSTEM, files["root"] / "mamba2", files["towers"], seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(files["params"])))
    scanned_cfg = SYSTEM.__class__(lm=LM.replace(scan_layers=True), vision=SYSTEM.vision, projector=SYSTEM.projector,
                                   vq=SYSTEM.vq)
    _, scanned = omnimamba_start.stage1_start(scanned_cfg, files["root"] / "mamba2", files["towers"], seed=0)
    stacked = scanned["lm"]["backbone"]["layers"]["mixer"]["lora_t2i"]["A"]
    assert np.array_equal(stacked[1], files["params"]["lm"]["backbone"]["layers_1"]["mixer"]["lora_t2i"]["A"])


def test_the_trainer_places_the_start(files):
    from janusflow_jax.train.init import initial_params
    from janusflow_jax.train.plan import TrainingError, make_plan

    config = omnimamba_stage1_mmu.get_config("tiny")
    with config.unlocked():
        config.model = ml_collections.ConfigDict(SYSTEM.to_dict())
        config.data.mmu_len = 20
    config.init.kind = "start"
    config.init.llm_path = str(files["root"] / "mamba2")
    config.init.path = str(files["towers"])
    plan = make_plan(config)
    placed = initial_params(plan)
    flat_placed = traverse_util.flatten_dict(jax.device_get(placed), sep="/")
    flat_start = traverse_util.flatten_dict(files["params"], sep="/")
    assert sorted(flat_placed) == sorted(flat_start)
    assert all(np.array_equal(np.asarray(flat_placed[k]), flat_start[k]) for k in flat_start)
    plan.config.init.llm_path = ""
    with pytest.raises(TrainingError, match="init.kind='start' needs --config.init.llm_path"):
        initial_params(plan)


def test_an_lm_that_is_not_the_backbone_is_one_line(files, tmp_path):
    write_lm(tmp_path / "wide", hidden_size=64, num_heads=16)
    with pytest.raises(omnimamba_start.StartError, match=r"is not config.model's backbone: d_model 64 \(config"):
        omnimamba_start.stage1_start(SYSTEM, tmp_path / "wide", files["towers"])
    with pytest.raises(FileNotFoundError, match="lacks dinov2.safetensors, siglip.safetensors: save the timm"):
        omnimamba_start.stage1_start(SYSTEM, files["root"] / "mamba2", tmp_path)
