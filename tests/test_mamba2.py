"""The Mamba-2 LM (janusflow_jax/models/mamba2.py) against transformers' Mamba2ForCausalLM (its PyTorch CPU path):
logits at lengths below / at / past the chunk, prefill + decode, ngroups > 1, checkpoint round trip and damage
reports, the chunked SSD scan against a plain recurrence, scanned vs per-layer layers."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from janusflow_jax.convert import mamba2 as mamba2_convert  # noqa: E402
from janusflow_jax.convert.tensors import CheckpointMismatchError  # noqa: E402
from janusflow_jax.models import mamba2  # noqa: E402

CHUNK = 8


def hf_config(**changes):
    values = dict(hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16, expand=2, n_groups=1,
                  conv_kernel=4, chunk_size=CHUNK, vocab_size=128, use_bias=False, use_conv_bias=True,
                  hidden_act="silu", rms_norm=True, layer_norm_epsilon=1e-5, residual_in_fp32=True,
                  time_step_limit=(0.0, float("inf")), tie_word_embeddings=True)
    return transformers.Mamba2Config(**{**values, **changes})


def randomize_(model, seed: int = 0):
    """Every tensor random, the SSM ones included (HF's init leaves D = 1, norms = 1, conv bias = 0)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda shape: torch.randn(shape, generator=gen)  # noqa: E731
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):  # A in -[0.5, 4]
                value = torch.log(0.5 + 3.5 * torch.rand(p.shape, generator=gen))
            elif name.endswith("dt_bias"):  # dt around softplus(-1.5) ~ 0.2, spread
                value = -1.5 + 0.7 * randn(p.shape)
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                value = 1.0 + 0.2 * randn(p.shape)
            elif name.endswith("embeddings.weight"):
                value = randn(p.shape)
            elif name.endswith("conv1d.weight"):
                value = 0.5 * randn(p.shape)
            elif p.ndim >= 2:
                value = randn(p.shape) / math.sqrt(p.shape[1])
            else:  # D, conv bias
                value = 0.3 * randn(p.shape)
            p.copy_(value)
    return model


def make_checkpoint(directory, seed: int = 0, **changes):
    model = randomize_(transformers.Mamba2ForCausalLM(hf_config(**changes)).eval(), seed)
    model.save_pretrained(directory)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():  # no attention_mask: HF would zero padded positions
        return model(torch.from_numpy(ids)).logits.numpy()


def rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def report(record_property, **errors):
    print("mamba2 parity (max|jax-torch| / max|torch|):", {k: f"{v:.2e}" for k, v in errors.items()})
    record_property("parity_errors", {f"mamba2 {k}": v for k, v in errors.items()})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mamba2_hf")
    model = make_checkpoint(directory)
    config, params = mamba2_convert.from_hf_mamba2(directory)
    return directory, model, config, params


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 128, size=(2, 19)).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------- parity
def test_logits_match_hf(checkpoint, tokens, record_property):
    _, model, config, params = checkpoint
    assert config == mamba2.Mamba2Config(d_model=64, n_layer=2, d_state=16, headdim=16, chunk_size=CHUNK,
                                         vocab_size=128)
    forward = jax.jit(mamba2.Mamba2LM(config).apply)
    errors = {}
    for length in (5, CHUNK, 19):  # below, at, and not a multiple of the chunk
        ids = tokens[:, :length]
        ref = hf_logits(model, ids)
        errors[f"logits len {length}"] = err = rel_err(forward({"params": params}, jnp.asarray(ids)), ref)
        assert err <= 1e-4, (length, err)
    report(record_property, **errors)


def test_prefill_then_decode_matches_full_forward(checkpoint, tokens, record_property):
    """Prefill 2 tokens (a conv state shorter than the kernel), continue with a prefill of 7 from that cache (the
    chunked scan from a non-zero state), then decode the remaining 10 tokens one at a time."""
    _, model, config, params = checkpoint
    lm = mamba2.Mamba2LM(config)
    variables = {"params": params}
    full_ref = hf_logits(model, tokens)
    full = np.asarray(lm.apply(variables, jnp.asarray(tokens)))
    prefill = jax.jit(lambda ids, cache: lm.apply(variables, ids, cache, method=mamba2.Mamba2LM.prefill))
    step = jax.jit(lambda token, cache: lm.apply(variables, token, cache, method=mamba2.Mamba2LM.decode_step))
    logits_a, cache = prefill(jnp.asarray(tokens[:, :2]), None)
    logits_b, cache = prefill(jnp.asarray(tokens[:, 2:9]), cache)
    decoded = [np.asarray(logits_a), np.asarray(logits_b)]
    for t in range(9, tokens.shape[1]):
        step_logits, cache = step(jnp.asarray(tokens[:, t]), cache)
        decoded.append(np.asarray(step_logits)[:, None])
    decoded = np.concatenate(decoded, axis=1)
    errors = {"prefill+decode vs HF": rel_err(decoded, full_ref),
              "prefill+decode vs own forward": rel_err(decoded, full)}
    report(record_property, **errors)
    assert max(errors.values()) <= 1e-4, errors
    assert jax.tree.map(jnp.shape, cache) == jax.tree.map(jnp.shape, mamba2.init_cache(config, tokens.shape[0]))


def test_ngroups_match_hf(tmp_path, tokens, record_property):
    """transformers 5's torch path normalises per group (MambaRMSNormGated, group_size = d_inner / n_groups), as we
    do, so HF itself is the reference for ngroups > 1."""
    model = make_checkpoint(tmp_path, seed=1, n_groups=2)
    config, params = mamba2_convert.from_hf_mamba2(tmp_path)
    assert config.ngroups == 2
    err = rel_err(jax.jit(mamba2.Mamba2LM(config).apply)({"params": params}, jnp.asarray(tokens)),
                  hf_logits(model, tokens))
    report(record_property, **{"logits ngroups=2 len 19": err})
    assert err <= 1e-4


# ------------------------------------------------------------------------------------------------------ checkpoints
def test_round_trip_is_bit_exact(checkpoint, tmp_path):
    directory, model, config, params = checkpoint
    with safetensors_numpy.safe_open(str(directory / "model.safetensors"), "np") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    for cfg, tree in ((config, params), *[mamba2_convert.from_hf_mamba2(directory, scan_layers=True)]):
        exported = mamba2_convert.to_hf_mamba2(cfg, tree)
        assert sorted(exported) == sorted(stored)
        for key, value in stored.items():
            assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    scanned = mamba2_convert.from_hf_mamba2(directory, scan_layers=True)[1]
    assert scanned["layers"]["mixer"]["z_proj"]["kernel"].shape == (2, 64, 128)
    model.save_pretrained(tmp_path, max_shard_size="40KB")  # a sharded checkpoint reads the same
    assert (tmp_path / "model.safetensors.index.json").exists()
    sharded = mamba2_convert.to_hf_mamba2(*mamba2_convert.from_hf_mamba2(tmp_path))
    assert all(np.array_equal(sharded[key], value) for key, value in stored.items())


def test_damaged_checkpoint_names_every_problem(checkpoint, tmp_path):
    directory, *_ = checkpoint
    with safetensors_numpy.safe_open(str(directory / "model.safetensors"), "np") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    del state["backbone.layers.1.mixer.D"]
    state["backbone.layers.0.mixer.extra"] = np.zeros(3, np.float32)
    state["backbone.layers.0.mixer.conv1d.weight"] = state["backbone.layers.0.mixer.conv1d.weight"][:, :, :3].copy()
    safetensors_numpy.save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(CheckpointMismatchError) as info:
        mamba2_convert.from_hf_mamba2(tmp_path)
    message = str(info.value)
    for name in ("backbone.layers.1.mixer.D", "backbone.layers.0.mixer.extra", "backbone.layers.0.mixer.conv1d.weight"):
        assert name in message
    assert len(info.value.missing) == len(info.value.unexpected) == len(info.value.mis_shaped) == 1


# ------------------------------------------------------------------------------------------------------- SSD maths
def recurrence(x, dt, A, B, C, state):
    """The plain sequential SSM recurrence in float64 numpy (heads grouped contiguously)."""
    per_group = x.shape[2] // B.shape[2]
    B, C = np.repeat(B, per_group, axis=2), np.repeat(C, per_group, axis=2)
    ys = []
    for t in range(x.shape[1]):
        decay = np.exp(dt[:, t] * A)[:, :, None, None]
        state = state * decay + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(np.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return np.stack(ys, axis=1), state


def test_ssd_chunked_and_step_match_recurrence():
    rng = np.random.default_rng(0)
    batch, length, heads, head_dim, groups, state_dim, chunk = 2, 13, 4, 3, 2, 5, 4
    x = rng.normal(size=(batch, length, heads, head_dim))
    dt = np.log1p(np.exp(rng.normal(size=(batch, length, heads)) - 1.0))
    A = -rng.uniform(0.5, 3.0, size=heads)
    B, C = (rng.normal(size=(batch, length, groups, state_dim)) for _ in range(2))
    start = rng.normal(size=(batch, heads, head_dim, state_dim))
    f32 = lambda *arrays: [jnp.asarray(a, jnp.float32) for a in arrays]  # noqa: E731
    y_ref, final_ref = recurrence(x, dt, A, B, C, start)
    y, final = mamba2.ssd_chunked(*f32(x, dt, A, B, C), chunk, jnp.asarray(start, jnp.float32))
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4 * np.abs(y_ref).max())
    np.testing.assert_allclose(final, final_ref, rtol=1e-4, atol=1e-4 * np.abs(final_ref).max())
    y0, final0 = mamba2.ssd_chunked(*f32(x, dt, A, B, C), chunk)  # zero initial state
    y0_ref, final0_ref = recurrence(x, dt, A, B, C, np.zeros_like(start))
    np.testing.assert_allclose(y0, y0_ref, rtol=1e-4, atol=1e-4 * np.abs(y0_ref).max())
    np.testing.assert_allclose(final0, final0_ref, rtol=1e-4, atol=1e-4 * np.abs(final0_ref).max())
    y1, state1 = mamba2.ssd_step(*f32(start, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0]))
    y1_ref, state1_ref = recurrence(x[:, :1], dt[:, :1], A, B[:, :1], C[:, :1], start)
    np.testing.assert_allclose(y1, y1_ref[:, 0], rtol=1e-5, atol=1e-5 * np.abs(y1_ref).max())
    np.testing.assert_allclose(state1, state1_ref, rtol=1e-5, atol=1e-5 * np.abs(state1_ref).max())


def test_scan_layers_and_remat_give_the_same_logits(checkpoint, tokens):
    directory, _, config, params = checkpoint
    scanned_config, scanned = mamba2_convert.from_hf_mamba2(directory, scan_layers=True, remat_policy="full")
    ids = jnp.asarray(tokens[:, :11])
    per_layer = jax.jit(mamba2.Mamba2LM(config).apply)({"params": params}, ids)
    stacked = jax.jit(mamba2.Mamba2LM(scanned_config).apply)({"params": scanned}, ids)
    np.testing.assert_allclose(stacked, per_layer, rtol=1e-6, atol=1e-6 * float(jnp.abs(per_layer).max()))


def test_gradients_are_finite_in_bfloat16(checkpoint, tokens):
    """A training step's gradient through the chunked scan (the -inf of the segsum must not leak NaNs), with bf16
    compute, fp32 weights, scanned and rematerialised layers, against the fp32 reference loss."""
    directory, *_ = checkpoint
    config, params = mamba2_convert.from_hf_mamba2(directory, scan_layers=True, remat_policy="full", dtype="bfloat16")
    lm = mamba2.Mamba2LM(config)
    ids = jnp.asarray(tokens[:, :13])

    def loss(params):
        logits = lm.apply({"params": params}, ids[:, :-1]).astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["layers"]["mixer"]["A_log"]).max()) > 0
    fp32 = mamba2.Mamba2LM(config.replace(dtype="float32"))
    reference = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(fp32.apply({"params": params}, ids[:, :-1])),
                                              ids[:, 1:, None], axis=-1))
    assert abs(float(value) - float(reference)) <= 0.05 * abs(float(reference))
