"""Checkpoint conversion (janusflow_jax/convert/janusflow.py): exact round trips, the released 1.3B layout, config.json
variants, damaged/sharded/.bin checkpoints, atomic export, and the stage-1 parts (HF Llama, timm SigLIP)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import jax  # noqa: E402
import flax.linen as nn  # noqa: E402
from flax import traverse_util  # noqa: E402

from janusflow_jax.convert import janusflow as convert
from janusflow_jax.convert import tensors
from janusflow_jax.models import llama  # noqa: E402
from janusflow_jax.models.config import JanusFlowConfig  # noqa: E402
from janusflow_jax.models.siglip import SigLIPViT  # noqa: E402

from janusflow_jax.reference import janusflow_torch as ref  # noqa: E402

_STATE_DICT_LIST = os.path.join(os.path.dirname(__file__), "data", "janusflow_1_3b_state_dict.txt")


# ------------------------------------------------------------------------------------------------------- helpers
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor random (the official init leaves GRN and beg_of_und_embed at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2 and not name.endswith(("embed_tokens.weight", "pos_embed", "latent", "beg_of_und_embed")):
                noise = noise / math.sqrt(math.prod(p.shape[1:]))
            elif p.ndim == 1 and name.endswith(".weight"):
                noise = 1.0 + 0.2 * noise
            else:
                noise = 0.3 * noise
            p.copy_(noise.to(p.dtype))
    return model


def flat(params) -> dict:
    return traverse_util.flatten_dict(jax.device_get(params), sep="/")


def assert_trees_identical(a, b):
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        x, y = np.asarray(fa[key]), np.asarray(fb[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), key


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, name: str):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), name


def write_checkpoint(directory, raw_config: dict, state: dict):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw_config))
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
                                metadata={"format": "pt"})
    return directory


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A random tiny official checkpoint in bfloat16: (directory, raw config, state dict)."""
    raw = ref.config_tiny()
    torch.manual_seed(0)
    model = randomize_(ref.build_reference(raw)).to(torch.bfloat16)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    directory = write_checkpoint(tmp_path_factory.mktemp("bf16") / "ckpt", raw, state)
    return directory, raw, state


@pytest.fixture(scope="module")
def imported(bf16_checkpoint):
    return convert.from_pytorch(bf16_checkpoint[0], param_dtype="float32")


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("param_dtype,scan_layers", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_round_trip_is_bit_exact_and_strict_loadable(bf16_checkpoint, tmp_path, param_dtype, scan_layers):
    src, raw, state = bf16_checkpoint
    cfg, params = convert.from_pytorch(src, param_dtype=param_dtype, scan_layers=scan_layers)
    assert cfg.scan_layers == scan_layers
    leaves = flat(params)
    assert {str(np.asarray(v).dtype) for v in leaves.values()} == {param_dtype}
    if scan_layers:
        assert "layers" in params["language_model"] and "blocks" in params["und_encoder"]
        assert leaves["language_model/layers/self_attn/q_proj/kernel"].shape[0] == cfg.llm.num_layers

    out = convert.to_pytorch(cfg, params, tmp_path / "export", torch_dtype="bfloat16")
    exported = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert set(exported) == set(state)
    for key, tensor in state.items():
        assert_same_bits(exported[key], tensor, key)

    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == "bfloat16"
    # The written config.json rebuilds the same model here ...
    assert convert.config_from_official(written, param_dtype=param_dtype, scan_layers=scan_layers) == cfg
    # ... and a same-shaped PyTorch reference, into which the export loads with strict key/shape matching.
    fresh = ref.build_reference(written)
    result = fresh.load_state_dict(exported, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_round_trip_can_include_repa_projector(imported, tmp_path):
    cfg, params = imported
    out = convert.to_pytorch(cfg, params, tmp_path / "with_repa", include_repa=True)
    cfg2, params2 = convert.from_pytorch(out, rng=jax.random.key(123))  # the rng must not be used
    assert cfg2 == cfg
    assert_trees_identical(params2, params)


# -------------------------------------------------------------------------------------------- 1.3B / config.json
def _reference_list():
    entries = {}
    with open(_STATE_DICT_LIST) as f:
        for line in f:
            if line.strip():
                name, shape = line.strip().split(" ", 1)
                dims = shape.strip("[]").strip()
                entries[name] = tuple(int(d) for d in dims.split(",")) if dims else ()
    return entries


def test_released_1_3b_layout_without_allocation():
    cfg = JanusFlowConfig()
    rules = convert.janusflow_rules(cfg)
    expected = convert.expected_shapes(cfg)  # jax.eval_shape: nothing is allocated
    released = _reference_list()
    assert len(released) == 587
    torch_keys = [t for _, t, _ in rules]
    jax_paths = [j for j, _, _ in rules]
    assert len(set(torch_keys)) == len(torch_keys) == 587 and len(set(jax_paths)) == 587
    got = {t: tensors.torch_shape(tr, expected[j]) for j, t, tr in rules}
    assert got == released
    # Every JAX parameter is covered, except our REPA projector (not part of the release).
    assert set(expected) - set(jax_paths) == {j for j in expected if j.startswith("repa_projector/")}
    assert sum(math.prod(s) for s in released.values()) == 2_046_367_504


def test_config_from_official_1_3b_is_the_default():
    cfg = convert.config_from_official(ref.config_1_3b())
    assert cfg == JanusFlowConfig()
    assert cfg.repa.layer == 6 and cfg.latent_size == 48


def _transformers5_language_config(raw: dict, **extra) -> dict:
    lc = dict(raw["language_config"])
    lc["dtype"] = lc.pop("torch_dtype")
    lc["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    lc.update(extra)
    return lc


def test_transformers5_style_config_gives_the_same_config():
    raw = ref.config_1_3b()
    v5 = dict(raw, language_config=_transformers5_language_config(raw))
    assert convert.config_from_official(v5) == JanusFlowConfig()
    # A full transformers-5 LlamaConfig.to_dict() (every default written out) reads the same.
    lc = raw["language_config"]
    hf = transformers.LlamaConfig(
        vocab_size=lc["vocab_size"], hidden_size=lc["hidden_size"], intermediate_size=lc["intermediate_size"],
        num_hidden_layers=lc["num_hidden_layers"], num_attention_heads=lc["num_attention_heads"],
        num_key_value_heads=lc["num_key_value_heads"], max_position_embeddings=lc["max_position_embeddings"],
        rms_norm_eps=1e-6, dtype="bfloat16").to_dict()
    assert "rope_parameters" in hf
    assert convert.config_from_official(dict(raw, language_config=hf)) == JanusFlowConfig()


@pytest.mark.parametrize("extra,match", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE type 'linear'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}}, "RoPE type 'llama3'"),
])
def test_non_default_rope_is_rejected(extra, match):
    raw = ref.config_1_3b()
    bad = dict(raw, language_config=_transformers5_language_config(raw, **extra))
    with pytest.raises(ValueError, match=match):
        convert.config_from_official(bad)


# ------------------------------------------------------------------------------------------ damaged / other formats
def test_damaged_checkpoint_reports_everything_at_once(bf16_checkpoint, tmp_path):
    _, raw, state = bf16_checkpoint
    state = dict(state)
    removed = "language_model.model.layers.1.mlp.up_proj.weight"
    reshaped = "vision_und_enc_aligner.weight"
    unknown = "vision_gen_enc_model.extra_head.weight"
    removed_shape = list(state.pop(removed).shape)
    original_shape = list(state[reshaped].shape)
    state[reshaped] = state[reshaped].reshape(original_shape[1], original_shape[0])
    state[unknown] = torch.zeros(3, 5, dtype=torch.bfloat16)
    directory = write_checkpoint(tmp_path / "damaged", raw, state)
    with pytest.raises(convert.CheckpointMismatchError) as info:
        convert.from_pytorch(directory)
    err = info.value
    message = str(err)
    assert f"{removed} (expected shape {removed_shape})" in message
    assert f"{unknown} (shape [3, 5])" in message
    assert f"{reshaped}: expected {original_shape}, got {original_shape[::-1]}" in message
    assert [m[0] for m in err.missing] == [removed]
    assert [u[0] for u in err.unexpected] == [unknown]
    assert [s[0] for s in err.mis_shaped] == [reshaped]


def test_sharded_safetensors_and_pytorch_bin_import_identically(bf16_checkpoint, imported, tmp_path):
    _, raw, state = bf16_checkpoint
    _, want = imported

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(raw))
    keys = list(state)
    shards = [keys[i::3] for i in range(3)]
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        safetensors_torch.save_file({k: state[k].contiguous() for k in shard}, str(sharded / name),
                                    metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    assert not (sharded / "model.safetensors").exists()
    cfg_s, params_s = convert.from_pytorch(sharded)
    assert cfg_s == imported[0]
    assert_trees_identical(params_s, want)

    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text(json.dumps(raw))
    torch.save(state, str(binary / "pytorch_model.bin"))
    cfg_b, params_b = convert.from_pytorch(binary)
    assert cfg_b == imported[0]
    assert_trees_identical(params_b, want)


def test_to_pytorch_is_atomic_and_refuses_to_overwrite(imported, tmp_path, monkeypatch):
    import safetensors.numpy

    cfg, params = imported
    real_save = safetensors.numpy.save_file

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # a half-written file, then the disk "fills up"
            f.write(b"\0" * 1024)
        raise OSError("simulated write failure")

    parent = tmp_path / "exports"
    parent.mkdir()
    out = parent / "model"
    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        convert.to_pytorch(cfg, params, out)
    assert list(parent.iterdir()) == []  # neither the target nor a temporary directory is left behind

    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    with pytest.raises(OSError, match="simulated"):
        convert.to_pytorch(cfg, params, out, overwrite=True)
    assert sorted(p.name for p in parent.iterdir()) == ["model"]  # old content untouched by a failed overwrite
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    monkeypatch.setattr(safetensors.numpy, "save_file", real_save)
    with pytest.raises(FileExistsError, match="overwrite"):
        convert.to_pytorch(cfg, params, out)
    assert (out / "keep.txt").exists()
    convert.to_pytorch(cfg, params, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in parent.iterdir()) == ["model"]
    empty = parent / "empty"
    empty.mkdir()
    convert.to_pytorch(cfg, params, empty)  # an existing empty directory is fine without overwrite
    assert (empty / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- stage-1 parts
@pytest.fixture(scope="module")
def tiny_cfg():
    return convert.config_from_official(ref.config_tiny())


@pytest.fixture(scope="module")
def hf_llama_dir(tiny_cfg, tmp_path_factory):
    c = tiny_cfg.llm
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False,
        attn_implementation="eager")
    torch.manual_seed(0)
    model = randomize_(transformers.LlamaForCausalLM(hf_cfg), seed=1).eval()
    directory = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(str(directory))
    return directory, model


def _timm_vit(cfg, num_classes=0):
    tower = ref.SigLIPTower({"image_size": cfg.image_size, "width": cfg.width, "layers": cfg.depth,
                             "heads": cfg.num_heads, "patch_size": cfg.patch_size, "select_layer": -1,
                             "mlp_ratio": cfg.mlp_dim / cfg.width})
    vit = tower.vision_tower
    if num_classes:  # a classifier head, as timm checkpoints carry (not part of JanusFlow's tower)
        vit.reset_classifier(num_classes)
    return randomize_(vit, seed=2).eval()


@pytest.fixture(scope="module")
def timm_dirs(tiny_cfg, tmp_path_factory):
    vit = _timm_vit(tiny_cfg.und_encoder, num_classes=10)
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    assert "head.weight" in state and "attn_pool.latent" in state
    plain = tmp_path_factory.mktemp("timm_plain")
    safetensors_torch.save_file(state, str(plain / "model.safetensors"))
    open_clip = {f"visual.trunk.{k}": v for k, v in state.items()}
    open_clip.update({"text.token_embedding.weight": torch.randn(10, 8), "text.positional_embedding": torch.randn(4, 8),
                      "logit_scale": torch.ones(())})
    prefixed = tmp_path_factory.mktemp("timm_open_clip")
    safetensors_torch.save_file(open_clip, str(prefixed / "model.safetensors"))
    return plain, prefixed, vit


def test_load_llm_from_hf_matches_transformers(tiny_cfg, hf_llama_dir):
    directory, model = hf_llama_dir
    saved = json.loads((directory / "config.json").read_text())
    assert "rope_parameters" in saved  # written by transformers 5
    params = convert.load_llm_from_hf(directory, tiny_cfg.llm)
    ids = np.random.default_rng(0).integers(0, tiny_cfg.llm.vocab_size, (2, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    module = llama.LlamaModel(tiny_cfg.llm)
    got = jax.jit(lambda p, i, a: module.apply({"params": p}, i, a, method=lambda m, i, a: m(m.embed(i), a)["logits"]))(
        params, ids, mask)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits
    real = mask.astype(bool)
    got, want = np.asarray(got)[real], want.numpy()[real]
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    with pytest.raises(ValueError, match="does not match"):
        convert.load_llm_from_hf(directory, dataclasses.replace(tiny_cfg.llm, num_layers=3))


def test_load_siglip_from_timm_plain_and_open_clip(tiny_cfg, timm_dirs):
    plain, prefixed, vit = timm_dirs
    cfg = tiny_cfg.und_encoder
    params = convert.load_siglip_from_timm(plain, cfg)
    assert "attn_pool" in params
    # Spot checks of the layout against the source tensors.
    sd = vit.state_dict()
    np.testing.assert_array_equal(params["pos_embed"], sd["pos_embed"].numpy())
    np.testing.assert_array_equal(params["blocks_1"]["attn"]["qkv"]["kernel"], sd["blocks.1.attn.qkv.weight"].numpy().T)
    np.testing.assert_array_equal(params["patch_embed"]["proj"]["kernel"],
                                  sd["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0))
    # And the function: the loaded tower reproduces timm's features and MAP pooling.
    pixels = np.random.default_rng(0).standard_normal((1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    module = SigLIPViT(cfg)
    feats, pooled = jax.jit(lambda p, x: module.apply({"params": p}, x, method=lambda m, y: (lambda f: (f, m.pool(f)))(
        m(y))))(params, pixels)
    with torch.no_grad():
        want = vit.forward_features(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        want_pooled = vit.forward_head(want, pre_logits=True)
    for got, ref_out in ((feats, want), (pooled, want_pooled)):
        got, ref_out = np.asarray(got), ref_out.numpy()
        assert np.max(np.abs(got - ref_out)) <= 1e-4 * np.max(np.abs(ref_out))

    # open_clip layout (`visual.trunk.` prefix, unrelated `text.*` keys): identical parameters.
    assert_trees_identical(convert.load_siglip_from_timm(prefixed, cfg), params)


def test_siglip_without_map_head_keeps_fresh_pool(tiny_cfg, timm_dirs, tmp_path):
    plain, _, vit = timm_dirs
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("attn_pool.")}
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    params = convert.load_siglip_from_timm(tmp_path, tiny_cfg.und_encoder)
    assert "attn_pool" not in params and "blocks_0" in params


@pytest.mark.parametrize("scan_layers", [False, True])
def test_init_from_parts(tiny_cfg, hf_llama_dir, timm_dirs, monkeypatch, scan_layers):
    """The parts replace their sub-trees; everything else comes from `init_params`.

    `init_params` itself (a ~15 s threefry-heavy XLA compile on a 2-core CPU) is replaced by a stand-in with the
    same tree, filled with a sentinel, so this test checks only what `init_from_parts` adds."""
    from janusflow_jax.models import janusflow as model_lib

    def fake_init_params(config, rng):
        assert not config.scan_layers  # parts are loaded in the per-layer layout, then scanned
        return jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), nn.unbox(model_lib.abstract_params(config)))

    monkeypatch.setattr(convert.model_lib, "init_params", fake_init_params)
    cfg = tiny_cfg.replace(scan_layers=scan_layers)
    llm_dir, _ = hf_llama_dir
    _, prefixed, _ = timm_dirs
    params = convert.init_from_parts(cfg, jax.random.key(0), llm_path=llm_dir, siglip_path=prefixed)
    if scan_layers:
        assert "layers" in params["language_model"] and "blocks" in params["und_encoder"]
        params = convert.unscan_params(params, cfg)
    assert_trees_identical(params["language_model"], convert.load_llm_from_hf(llm_dir, cfg.llm))
    assert_trees_identical(params["und_encoder"], convert.load_siglip_from_timm(prefixed, cfg.und_encoder))
    # Everything else keeps its initial value, and the tree is the model's full parameter set.
    assert set(flat(params)) == set(convert.expected_shapes(cfg))
    rest = {k: v for k, v in flat(params).items() if not k.startswith(("language_model/", "und_encoder/"))}
    assert rest and all(np.all(np.asarray(v) == 7.0) for v in rest.values())


def test_training_initialises_from_an_official_dir_and_from_parts(tiny_cfg, hf_llama_dir, timm_dirs, monkeypatch,
                                                                  tmp_path):
    """`config.init.kind` "official" (a PyTorch release directory) and "parts" (stage 1: HF Llama + timm SigLIP) reach
    the trainer's parameters unchanged, placed on the training mesh."""
    import ml_collections

    from configs import stage1
    from janusflow_jax.models import janusflow as model_lib
    from janusflow_jax.train import loop as trainer
    from janusflow_jax.train.init import initial_params

    def fake_init_params(config, rng):  # as in test_init_from_parts: skip the threefry-heavy init compile
        return jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), nn.unbox(model_lib.abstract_params(config)))

    monkeypatch.setattr(convert.model_lib, "init_params", fake_init_params)
    official = convert.to_pytorch(tiny_cfg, fake_init_params(tiny_cfg, None), tmp_path / "official")
    _, prefixed, _ = timm_dirs
    for kind, path in (("official", str(official)), ("parts", "")):
        config = stage1.get_config("tiny")
        with config.unlocked():
            config.model = ml_collections.ConfigDict(tiny_cfg.to_dict())
            config.init.kind, config.init.path = kind, path
            config.init.llm_path, config.init.siglip_path = str(hf_llama_dir[0]), str(prefixed)
        plan = trainer.make_plan(config)
        params = initial_params(plan)
        gate = params["language_model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
        assert gate.sharding.mesh.shape == plan.mesh.shape
        if kind == "official":
            assert_trees_identical(params, convert.from_pytorch(official, rng=jax.random.key(config.seed))[1])
        else:
            assert_trees_identical(params["language_model"], convert.load_llm_from_hf(hf_llama_dir[0], tiny_cfg.llm))
            assert_trees_identical(params["und_encoder"],
                                   convert.load_siglip_from_timm(prefixed, tiny_cfg.und_encoder))
