"""The OmniMamba composite (models/omnimamba.py) against the PyTorch reference of the release
(reference/omnimamba_torch.py), and the release checkpoint conversion (convert/omnimamba.py): t2i and mmu logits,
which adapter each task uses, LoRA folding, prefill + decode against the full forward, scanned layers and dropout,
a .pth round trip (fp16, as released) and damage reports; opt-in, the full-size key list."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402

from janusflow_jax.convert import omnimamba as convert  # noqa: E402
from janusflow_jax.convert.tensors import CheckpointMismatchError  # noqa: E402
from janusflow_jax.models import omnimamba  # noqa: E402
from janusflow_jax.models.omnimamba import OmniMamba  # noqa: E402
from janusflow_jax.reference import omnimamba_torch as ref  # noqa: E402

TINY = omnimamba.tiny_config()
# Shapes cannot tell these; the tiny release states them as a config would.
TINY_OVERRIDES = dict(chunk_size=8, num_image_tokens=16, num_image_features=9)
TOWERS = {"llm_backbone.vqvae.quantize.embedding.weight": np.arange(12, dtype=np.float16).reshape(3, 4),
          "vision_backbone.featurizer.pos_embed": np.ones((1, 2, 4), np.float16)}


def reference_config(cfg=TINY):
    lm = cfg.backbone
    return ref.reference_config(d_model=lm.d_model, n_layer=lm.n_layer, d_state=lm.d_state, headdim=lm.headdim,
                                expand=lm.expand, ngroups=lm.ngroups, d_conv=lm.d_conv, chunk_size=lm.chunk_size,
                                vocab_size=lm.vocab_size, image_vocab_size=cfg.image_vocab_size,
                                pos_embed_rows=cfg.pos_embed_rows, mmu_pos_embed_rows=cfg.mmu_pos_embed_rows,
                                lora_tasks=lm.lora_tasks, lora_rank=lm.lora_rank, lora_alpha=lm.lora_alpha,
                                lora_dropout=lm.lora_dropout, image_mlp_ratio=cfg.image_mlp_ratio, vision_dim=24)


def rel_err(ours, theirs) -> float:
    theirs = np.asarray(theirs, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)))


def report(record_property, **errors):
    print("omnimamba parity (max|jax-torch| / max|torch|):", {k: f"{v:.2e}" for k, v in errors.items()})
    record_property("parity_errors", {f"omnimamba {k}": v for k, v in errors.items()})


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny random release: the reference's state dict in fp16 plus two tower tensors, as OmniMamba-1.3b.pth."""
    model = ref.randomize_(ref.build_reference(reference_config()), seed=0)
    state = {k: v.detach().to(torch.float16).clone() for k, v in model.state_dict().items()}
    state.update({k: torch.from_numpy(v) for k, v in TOWERS.items()})
    path = tmp_path_factory.mktemp("omnimamba_release") / "OmniMamba-1.3b.pth"
    torch.save(state, path)
    # The fp32 reference runs on exactly the fp16 values the file holds.
    model.load_state_dict({k: v.float() for k, v in state.items() if k in model.state_dict()})
    config, params = convert.from_release(path, **TINY_OVERRIDES)
    return path, model, config, params


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return dict(prompt=rng.integers(0, TINY.text_vocab_size, (2, TINY.t2i_prompt_length)),
                image=rng.integers(0, TINY.image_vocab_size, (2, TINY.num_image_tokens)),
                mmu_ids=rng.integers(0, TINY.text_vocab_size, (2, 11)),
                features=rng.normal(size=(2, TINY.num_image_features, TINY.d_model)).astype(np.float32))


def torch_t2i(model, inputs, n=None):
    with torch.no_grad():
        return ref.t2i_logits(model, torch.from_numpy(inputs["prompt"]),
                              torch.from_numpy(inputs["image"][:, :n])).numpy()


def torch_mmu(model, inputs):
    with torch.no_grad():
        return ref.mmu_logits(model, torch.from_numpy(inputs["mmu_ids"]), torch.from_numpy(inputs["features"])).numpy()


def jax_t2i(config, params, prompt, image):
    return jax.jit(lambda p, a, b: OmniMamba(config).apply({"params": p}, a, b, method=OmniMamba.t2i_logits))(
        params, jnp.asarray(prompt), jnp.asarray(image))


def jax_mmu(config, params, ids, features):
    return jax.jit(lambda p, a, b: OmniMamba(config).apply({"params": p}, a, b, method=OmniMamba.mmu_logits))(
        params, jnp.asarray(ids), None if features is None else jnp.asarray(features))


# ---------------------------------------------------------------------------------------------------------- parity
def test_config_is_derived_from_the_release(release):
    _, _, config, _ = release
    assert config == TINY
    assert config.pos_embed_rows == 33 and config.t2i_prompt_length == 16 and config.lora_scale == 4.0
    release_1_3b = omnimamba.OmniMambaConfig()
    assert (release_1_3b.pos_embed_rows, release_1_3b.t2i_prompt_length, release_1_3b.lora_scale) == (329, 72, 4.0)
    assert omnimamba.OmniMambaConfig.from_dict(release_1_3b.to_dict()) == release_1_3b


def test_logits_match_reference(release, inputs, record_property):
    _, model, config, params = release
    errors = {}
    for n in (16, 7):  # sequences of 32 (a multiple of the chunk) and 23
        t2i = jax_t2i(config, params, inputs["prompt"], inputs["image"][:, :n])
        assert t2i.shape == (2, n, TINY.image_vocab_size)
        errors[f"t2i logits ({16 + n} positions)"] = rel_err(t2i, torch_t2i(model, inputs, n))
    mmu = jax_mmu(config, params, inputs["mmu_ids"], inputs["features"])
    assert mmu.shape == (2, 11 + TINY.num_image_features, TINY.text_vocab_size)
    errors["mmu logits (20 positions)"] = rel_err(mmu, torch_mmu(model, inputs))
    report(record_property, **errors)
    assert max(errors.values()) <= 1e-4, errors


def test_each_task_runs_its_own_adapter(release, inputs):
    """Zeroing the mmu adapter leaves t2i logits bit-identical and zeroing the t2i one changes them (and vice
    versa): each path reads exactly its own LoRA pair."""
    _, _, config, params = release

    def without(task):
        flat = traverse_util.flatten_dict(params, sep="/")
        flat = {k: (np.zeros_like(v) if f"/lora_{task}/B_" in k else v) for k, v in flat.items()}
        return traverse_util.unflatten_dict(flat, sep="/")

    base_t2i = np.asarray(jax_t2i(config, params, inputs["prompt"], inputs["image"]))
    base_mmu = np.asarray(jax_mmu(config, params, inputs["mmu_ids"], inputs["features"]))
    no_mmu, no_t2i = without("mmu"), without("t2i")
    assert np.array_equal(jax_t2i(config, no_mmu, inputs["prompt"], inputs["image"]), base_t2i)
    assert np.array_equal(jax_mmu(config, no_t2i, inputs["mmu_ids"], inputs["features"]), base_mmu)
    assert rel_err(jax_t2i(config, no_t2i, inputs["prompt"], inputs["image"]), base_t2i) > 1e-2
    assert rel_err(jax_mmu(config, no_mmu, inputs["mmu_ids"], inputs["features"]), base_mmu) > 1e-2


def test_folded_lora_matches_unfolded(release, inputs, record_property):
    _, _, config, params = release
    plain = config.without_lora()
    t2i_params, mmu_params = (omnimamba.fold_lora(params, config, task) for task in ("t2i", "mmu"))
    assert not any("lora" in k for k in traverse_util.flatten_dict(t2i_params, sep="/"))
    assert jax.tree.map(jnp.shape, t2i_params) == jax.tree.map(jnp.shape, nn.unbox(omnimamba.init_params(
        plain, jax.random.key(0))))
    errors = {"t2i folded vs unfolded": rel_err(jax_t2i(plain, t2i_params, inputs["prompt"], inputs["image"]),
                                                jax_t2i(config, params, inputs["prompt"], inputs["image"])),
              "mmu folded vs unfolded": rel_err(jax_mmu(plain, mmu_params, inputs["mmu_ids"], inputs["features"]),
                                                jax_mmu(config, params, inputs["mmu_ids"], inputs["features"]))}
    report(record_property, **errors)
    assert max(errors.values()) <= 1e-5, errors
    with pytest.raises(ValueError, match="unknown LoRA task"):
        omnimamba.fold_lora(params, config, "lvg")


def test_prefill_then_decode_matches_full_forward(release, inputs, record_property):
    """t2i: prefill the prompt, then decode the image tokens one at a time (positions 16 .. 30). mmu: prefill the
    image and 2 text tokens (a length off the chunk grid), then decode the remaining 7 text tokens."""
    _, _, config, params = release
    model = OmniMamba(config)
    apply = lambda method: jax.jit(lambda *a: model.apply({"params": params}, *a, method=method))  # noqa: E731
    prefill, step = apply(OmniMamba.t2i_prefill), apply(OmniMamba.t2i_decode_step)
    p, image = config.t2i_prompt_length, jnp.asarray(inputs["image"])
    logits, cache = prefill(jnp.asarray(inputs["prompt"]))
    decoded = [logits]
    for i in range(config.num_image_tokens - 1):
        logits, cache = step(image[:, i], jnp.int32(p + i), cache)
        decoded.append(logits)
    full = jax_t2i(config, params, inputs["prompt"], inputs["image"])
    errors = {"t2i prefill+decode vs full": rel_err(jnp.stack(decoded, 1), full)}

    ids = jnp.asarray(inputs["mmu_ids"])
    prefill, step = apply(OmniMamba.mmu_prefill), apply(OmniMamba.mmu_decode_step)
    logits, cache = prefill(ids[:, :6], jnp.asarray(inputs["features"]))
    decoded = [logits]
    start = 6 + config.num_image_features
    for i in range(6, ids.shape[1]):
        logits, cache = step(ids[:, i], jnp.int32(start + i - 6), cache)
        decoded.append(logits)
    full = jax_mmu(config, params, inputs["mmu_ids"], inputs["features"])[:, start - 1:]
    errors["mmu prefill+decode vs full"] = rel_err(jnp.stack(decoded, 1), full)
    report(record_property, **errors)
    assert max(errors.values()) <= 1e-5, errors


def test_text_only_rows_use_zero_features(release, inputs):
    _, _, config, params = release
    zeros = np.zeros_like(inputs["features"])
    np.testing.assert_array_equal(jax_mmu(config, params, inputs["mmu_ids"], None),
                                  jax_mmu(config, params, inputs["mmu_ids"], zeros))


def test_scanned_layers_and_lora_dropout(release, inputs):
    """The scanned + rematerialised layout gives the per-layer logits; in training mode the LoRA dropout draws from
    the "dropout" rng (different keys, different logits; gradients finite), and is off when deterministic."""
    path, _, config, params = release
    scanned_config, scanned = convert.from_release(path, scan_layers=True, remat_policy="full", **TINY_OVERRIDES)
    assert scanned["backbone"]["layers"]["mixer"]["lora_t2i"]["B_z"].shape == (2, 4, 64)
    np.testing.assert_allclose(jax_t2i(scanned_config, scanned, inputs["prompt"], inputs["image"]),
                               jax_t2i(config, params, inputs["prompt"], inputs["image"]), rtol=1e-6, atol=1e-6)
    model = OmniMamba(scanned_config)
    image = jnp.asarray(inputs["image"])

    def loss(p, key):
        logits = model.apply({"params": p}, jnp.asarray(inputs["prompt"]), image, False,
                             method=OmniMamba.t2i_logits, rngs={"dropout": key})
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), image[..., None], axis=-1))

    grad = jax.jit(jax.value_and_grad(loss))
    (a, grads), (b, _) = grad(scanned, jax.random.key(1)), grad(scanned, jax.random.key(2))
    assert float(a) != float(b)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["backbone"]["layers"]["mixer"]["lora_t2i"]["B_z"]).max()) > 0
    assert float(jnp.abs(grads["backbone"]["layers"]["mixer"]["lora_mmu"]["B_z"]).max()) == 0


# ------------------------------------------------------------------------------------------------------ checkpoints
def test_release_round_trip_is_bit_exact(release, tmp_path):
    """fp16 .pth -> fp32 params -> fp16 .pth: every tensor bit-identical, tied copies and tower tensors included;
    the scanned layout exports the same."""
    path, _, config, params = release
    stored = torch.load(path, weights_only=True)
    state = convert.tower_tensors({k: v.numpy() for k, v in stored.items()})
    assert set(state) == set(TOWERS) | {k for k in stored if k.startswith("projector.")}
    out = convert.to_release(config, params, tmp_path / "export.pth", towers=state)
    exported = torch.load(out, weights_only=True)
    assert sorted(exported) == sorted(stored)
    for key, value in stored.items():
        assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
    scanned_config, scanned = convert.from_release(path, scan_layers=True, **TINY_OVERRIDES)
    again = convert.export_release_state(scanned_config, scanned, dtype="float16", tied_copies=False)
    assert convert.TIED.keys().isdisjoint(again)
    assert all(np.array_equal(v, stored[k].numpy()) for k, v in again.items())


def test_damaged_release_names_every_problem(release, tmp_path):
    path, _, config, _ = release
    state = torch.load(path, weights_only=True)
    lora_b = "llm_backbone.mamba.backbone.layers.1.mixer.in_proj.t2i_lora_B0.weight"
    del state[lora_b]
    state["llm_backbone.mamba.backbone.extra_table"] = torch.zeros(3)
    state["llm_backbone.mamba.backbone.pos_embed"] = state["llm_backbone.mamba.backbone.pos_embed"][:, :-1].clone()
    state["llm_backbone.mamba.lm_head.weight"] = state["llm_backbone.mamba.lm_head.weight"] + 1  # untied
    torch.save(state, tmp_path / "damaged.pth")
    with pytest.raises(CheckpointMismatchError) as info:
        convert.from_release(tmp_path / "damaged.pth", config=config)
    message = str(info.value)
    for name in (lora_b, "extra_table", "backbone.pos_embed", "lm_head.weight (not equal to the tied"):
        assert name in message, name
    assert len(info.value.missing) == len(info.value.mis_shaped) == 1 and len(info.value.unexpected) == 2
    assert "vqvae" not in message and "vision_backbone" not in message and "projector." not in message


@pytest.mark.skipif(not os.environ.get("JANUSFLOW_FULL_SCALE"), reason="set JANUSFLOW_FULL_SCALE=1")
def test_full_size_key_list_matches_the_table():
    """The reference built at 1.3B on the meta device: its keys and shapes are exactly our table's plus the tied
    copies plus the projector (a tower), the derived config is the release's, and the table fills our model."""
    with torch.device("meta"):
        model = ref.build_reference(ref.config_1_3b())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    config = omnimamba.OmniMambaConfig()
    table = {key: shape for key, shape, _, _ in convert.release_pieces(config)}
    assert {k: s for k, s in shapes.items() if not convert.is_tower_key(k) and k not in convert.TIED} == table
    assert {k for k in shapes if convert.is_tower_key(k)} == {f"projector.projector.{i}.{w}" for i in (0, 2, 4)
                                                              for w in ("weight", "bias")}
    assert shapes["llm_backbone.mamba.backbone.layers.47.mixer.in_proj.t2i_lora_B0.weight"] == (8512, 8)
    zero_strided = {k: np.broadcast_to(np.float16(0), s) for k, s in shapes.items()}  # shapes without memory
    assert convert.config_from_release(zero_strided) == config
    ours = {path: rows for _, _, parts, _ in convert.release_pieces(config) for path, rows in parts}
    assert set(ours) == set(omnimamba.param_shapes(config))
