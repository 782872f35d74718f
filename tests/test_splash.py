"""The TPU attention kernel (Pallas Splash), run here through Pallas' interpreter: it must equal the XLA attention
on every query that reads anything, forward and backward, alone and sharded over a mesh, and inside the model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from janusflow_jax.models.layers import dot_product_attention, splash_attention
from janusflow_jax.models.llama import causal_key_mask


def _qkv(b, s, h, kv, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, s, n, d)), jnp.float32) for n in (h, kv, kv))


def _generation_like_masks(b, s):
    """Row 0: left padding then a prompt; row 1: a CFG null prompt (BOS kept, prompt hidden, image tokens after);
    as key masks, plus packed segment ids (row 2 holds two examples and trailing padding) when b == 3."""
    key_mask = np.ones((b, s), np.int32)
    key_mask[0, :7] = 0
    key_mask[1, 1:20] = 0
    segment_ids = None
    if b == 3:
        segment_ids = np.ones((b, s), np.int32)
        segment_ids[2, 60:] = 2
        segment_ids[2, s - 9:] = 0
        key_mask = np.where(segment_ids != 0, key_mask, 0)
    return key_mask, segment_ids


@pytest.mark.parametrize("causal", [True, False])
def test_splash_equals_xla_forward_and_backward(causal):
    """Causal rows with left padding, hidden prompt tokens and packed segments (the LLM's masks); a full mask over an
    odd length (SigLIP). GQA shapes; 150 tokens run as 256 (padding to the kernel's 128-token blocks)."""
    b, s, h, kv, d = 3, 150, 4, 2, 32
    q, k, v = _qkv(b, s, h, kv, d)
    if causal:
        key_mask, segment_ids = _generation_like_masks(b, s)
        mask = causal_key_mask(jnp.asarray(key_mask), s, 0, None if segment_ids is None else jnp.asarray(segment_ids))
        segments = jnp.asarray(np.where(key_mask != 0, 1 if segment_ids is None else segment_ids, 0))
        visible = jnp.asarray(key_mask != 0)  # queries that are themselves visible: the rows anyone reads
    else:
        mask, segments, visible = None, None, jnp.ones((b, s), bool)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal((b, s, h, d)), jnp.float32)

    def loss(attend, q, k, v):
        return jnp.sum(jnp.where(visible[..., None, None], attend(q, k, v) * cotangent, 0.0))

    xla = lambda q, k, v: dot_product_attention(q, k, v, mask)
    splash = lambda q, k, v: splash_attention(q, k, v, segments, causal=causal)
    want, got = xla(q, k, v), jax.jit(splash)(q, k, v)
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got)[visible], np.asarray(want)[visible], rtol=0, atol=1e-5 * scale)
    assert np.isfinite(np.asarray(got)).all()
    grads_want = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(q, k, v)
    grads_got = jax.jit(jax.grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(grads_got, grads_want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(jnp.abs(w).max()))
    # dot_product_attention dispatches to it (and keeps a cached call, which has no segments, on xla).
    routed = dot_product_attention(q, k, v, mask, implementation="splash", segments=segments, causal=causal)
    np.testing.assert_array_equal(np.asarray(routed)[visible], np.asarray(got)[visible])
    if causal:
        short = q[:, -1:]
        np.testing.assert_array_equal(dot_product_attention(short, k, v, mask[:, :, -1:], implementation="splash"),
                                      dot_product_attention(short, k, v, mask[:, :, -1:]))


def test_splash_under_a_mesh_runs_per_shard():
    """Under jax.set_mesh and the logical rules the kernel runs through shard_map, batch over (data, fsdp) and heads
    over tensor; the result equals the unsharded kernel."""
    from janusflow_jax.sharding import DEFAULT_RULES, make_mesh

    b, s, h, d = 4, 128, 4, 32
    q, k, v = _qkv(b, s, h, h, d, seed=2)
    segments = jnp.asarray(np.where(np.arange(s)[None] < np.array([[0], [5], [0], [30]]), 0, 1))
    want = splash_attention(q, k, v, segments, causal=True)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        sharded = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor", None))
        fn = jax.jit(lambda q, k, v, seg: splash_attention(q, k, v, seg, causal=True))
        lowered = fn.lower(*(jax.device_put(x, sharded) for x in (q, k, v)), segments)
        text = lowered.as_text()
        assert "manual_computation" in text or "shmap" in text, "the kernel did not run per shard"
        got = fn(*(jax.device_put(x, sharded) for x in (q, k, v)), segments)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("masked", [False, True])
def test_cached_prefill_runs_the_kernel_and_equals_the_forward(masked):
    """A prefill into an empty cache (cache_index a Python 0) attends over its own tokens as self-attention, so it
    takes the kernel (the cache's empty slots would keep it on XLA), gives the uncached forward's logits and writes
    the same keys and values into the cache as a prefill at a traced index (the general cached path) at every
    visible token. The cache is longer than the prompt, as in the sampler; `masked`: left padding and a hidden
    prompt, else no mask at all."""
    from janusflow_jax.models import llama
    from janusflow_jax.perf import race

    b, s, slots = 2, 150, 200
    cfg = race.llama_config(2, width=64)
    ids = jnp.asarray(np.random.default_rng(3).integers(3, cfg.vocab_size, (b, s)), jnp.int32)
    key_mask = None
    if masked:
        key_mask = np.ones((b, slots), np.int32)
        key_mask[0, :7] = 0
        key_mask[1, 1:20] = 0
    visible = np.ones((b, s), bool) if key_mask is None else key_mask[:, :s].astype(bool)
    xla = llama.LlamaModel(cfg, attention="xla")
    params = race.Contender("llama", xla, cfg).init_params(0)
    embeds = xla.apply({"params": params}, ids, method=llama.LlamaModel.embed)

    def prefill(attention, index):
        model = llama.LlamaModel(cfg, attention=attention)
        out = model.apply({"params": params}, embeds, None if key_mask is None else jnp.asarray(key_mask),
                          cache=llama.init_cache(cfg, b, slots), cache_index=index)
        return out["logits"], out["cache"]

    want = xla.apply({"params": params}, embeds, None if key_mask is None else jnp.asarray(key_mask[:, :s]))["logits"]
    general_logits, general_cache = jax.jit(prefill, static_argnums=0)("xla", 0)  # traced index: all slots
    scale = float(jnp.abs(want).max())
    for attention in ("xla", "splash"):
        jaxpr = str(jax.make_jaxpr(lambda: prefill(attention, 0))())
        assert ("pallas_call" in jaxpr) == (attention == "splash"), attention
        logits, cache = jax.jit(lambda: prefill(attention, 0))()
        np.testing.assert_allclose(np.asarray(logits)[visible], np.asarray(want)[visible], rtol=0,
                                   atol=1e-5 * scale, err_msg=attention)
        np.testing.assert_allclose(np.asarray(general_logits)[visible], np.asarray(want)[visible], rtol=0,
                                   atol=1e-5 * scale)
        for name in ("k", "v"):  # the slots of visible tokens (a hidden query's output differs: never read)
            got, ref = (np.asarray(c[name])[:, :, :s][:, visible] for c in (cache, general_cache))
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
