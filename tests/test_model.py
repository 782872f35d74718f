"""Model behaviour that needs no PyTorch: layouts, remat, caching and masking are all the same function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from janusflow_jax.convert import janusflow as convert
from janusflow_jax.models.janusflow import JanusFlow, init_params


def _inputs(cfg, batch=2, prompt_len=5):
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.llm.vocab_size, (batch, prompt_len))
    mask = np.ones((batch, prompt_len), np.int32)
    mask[1, 1:] = 0  # CFG null prompt: BOS kept, the rest hidden
    z = rng.standard_normal((batch, cfg.latent_size, cfg.latent_size, 4)).astype(np.float32)
    t = np.array([0.25, 0.8], np.float32)[:batch]
    return jnp.asarray(prompt), jnp.asarray(mask), jnp.asarray(z), jnp.asarray(t)


def _velocity(cfg, params, *args, **kw):
    model = JanusFlow(cfg)
    return model.apply({"params": params}, *args, method=JanusFlow.velocity, **kw)


@pytest.fixture(scope="module")
def tiny():
    from configs import tiny
    from janusflow_jax.models.config import JanusFlowConfig

    cfg = JanusFlowConfig.from_dict(tiny.get_config().model.to_dict())
    return cfg, init_params(cfg, jax.random.key(0))


def test_scan_remat_and_prompt_cache_agree(tiny):
    cfg, params = tiny
    args = _inputs(cfg)
    v_ref, feats_ref = _velocity(cfg, params, *args, return_repa_features=True)
    assert v_ref.shape == args[2].shape and feats_ref.shape == (2, cfg.num_gen_tokens, cfg.und_encoder.width)

    scanned_cfg = cfg.replace(scan_layers=True, remat_policy="full")
    v_scan, feats_scan = _velocity(scanned_cfg, convert.scan_params(params, cfg), *args, return_repa_features=True)
    np.testing.assert_allclose(v_scan, v_ref, rtol=0, atol=1e-5 * float(jnp.abs(v_ref).max()))
    np.testing.assert_allclose(feats_scan, feats_ref, rtol=0, atol=1e-5 * float(jnp.abs(feats_ref).max()))

    model = JanusFlow(cfg)
    cache = model.apply({"params": params}, args[0], args[1], method=JanusFlow.prompt_cache)
    v_cached = _velocity(cfg, params, None, args[1], args[2], args[3], prompt_cache=cache)
    np.testing.assert_allclose(v_cached, v_ref, rtol=0, atol=1e-5 * float(jnp.abs(v_ref).max()))


def test_masked_prompt_tokens_do_not_matter(tiny):
    """The null-prompt row must not depend on the hidden tokens (only on BOS and the absolute positions)."""
    cfg, params = tiny
    prompt, mask, z, t = _inputs(cfg)
    other = prompt.at[1, 1:].set((prompt[1, 1:] + 7) % cfg.llm.vocab_size)
    v1 = _velocity(cfg, params, prompt, mask, z, t)
    v2 = _velocity(cfg, params, other, mask, z, t)
    np.testing.assert_array_equal(v1[1], v2[1])
    # ... while the conditional row does read its prompt.
    changed = prompt.at[0, 1:].set((prompt[0, 1:] + 7) % cfg.llm.vocab_size)
    assert np.abs(np.asarray(_velocity(cfg, params, changed, mask, z, t)[0] - v1[0])).max() > 1e-6


def test_unscan_inverts_scan(tiny):
    cfg, params = tiny
    back = convert.unscan_params(convert.scan_params(params, cfg), cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_fused_attention_padding_and_masks_match_xla():
    """The cuDNN path pads odd lengths to CUDNN_PAD and passes the boolean mask as a bias; with jax's XLA backend in
    its place (no GPU here) it must equal our attention for a generation-like row (left-padded prompt, odd length)
    and a GQA shape. Fully masked rows (padding queries, never read) stay finite; their uniform average then also
    spans the padded keys, so they are compared only for finiteness."""
    from janusflow_jax.models.layers import cudnn_attention, dot_product_attention
    from janusflow_jax.models.llama import causal_key_mask

    rng = np.random.default_rng(1)
    b, s, h, kv, d = 2, 37, 4, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, n, d)), jnp.float32) for n in (h, kv, kv))
    key_mask = np.ones((b, s), np.int32)
    key_mask[1, :5] = 0  # left padding: rows 0-4 of example 1 see no key at all
    mask = causal_key_mask(jnp.asarray(key_mask), s, 0)
    want = dot_product_attention(q, k, v, mask)
    got = np.asarray(cudnn_attention(q, k, v, mask, backend="xla"))
    assert np.isfinite(got).all()
    seen = np.asarray(mask[:, 0].any(-1))  # [b, q]: the query sees at least one key
    assert (~seen).sum() == 5
    np.testing.assert_allclose(got[seen], np.asarray(want)[seen], rtol=1e-5, atol=1e-5)
    # The causal mask type on top of the (already causal) mask: the padded tail stays out of every real row's view.
    causal = np.asarray(cudnn_attention(q, k, v, mask, causal=True, backend="xla"))
    np.testing.assert_allclose(causal[seen], np.asarray(want)[seen], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cudnn_attention(q, k, v, None, backend="xla")),
                               np.asarray(dot_product_attention(q, k, v, None)), rtol=1e-5, atol=1e-5)
    # No mask with `causal`: the causal mask alone (what the LLM passes when it is given no mask); cuDNN then gets no
    # bias at all, the padded keys lying past every real query.
    tril = causal_key_mask(jnp.ones((b, s), jnp.int32), s, 0)
    want = np.asarray(dot_product_attention(q, k, v, tril))
    np.testing.assert_array_equal(np.asarray(dot_product_attention(q, k, v, None, causal=True)), want)
    np.testing.assert_allclose(np.asarray(cudnn_attention(q, k, v, None, causal=True, backend="xla")), want,
                               rtol=1e-5, atol=1e-5)


def test_attention_option_is_validated():
    from janusflow_jax.models.config import JanusFlowConfig

    with pytest.raises(ValueError, match="attention 'flash'"):
        JanusFlowConfig(attention="flash")
    assert JanusFlowConfig().attention == "auto" and JanusFlowConfig(dtype="float32").attention == "auto"
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        JanusFlowConfig(attention="cudnn", dtype="float32")
    assert JanusFlowConfig(attention="cudnn", dtype="bfloat16").attention == "cudnn"
    # "auto" is XLA here (a CPU), so every parity test runs the exact path.
    from janusflow_jax.models.layers import _cudnn_applies

    assert not _cudnn_applies(jnp.zeros((1, 128, 2, 64), jnp.bfloat16))


def test_depthwise_conv_forms_agree():
    """The gen towers' depthwise conv: the loop over taps ("auto" on a CPU, so the parity tests check it), the same
    taps written out and the grouped convolution ("auto" on GPUs/TPUs) give the same outputs and gradients; the two
    tap forms add in the same order, so they agree to the bit."""
    from janusflow_jax.models.uvit import DepthwiseConv

    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 5, 8)), jnp.float32)
    looped, shifted, grouped = (DepthwiseConv(8, 7, 3, form=form) for form in ("looped", "shifted", "grouped"))
    params = looped.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too

    def loss(module, params, x):
        return jnp.sum(jnp.sin(module.apply(params, x)))

    assert looped.apply(params, x).shape == x.shape
    np.testing.assert_array_equal(looped.apply(params, x), shifted.apply(params, x))
    np.testing.assert_allclose(grouped.apply(params, x), looped.apply(params, x), rtol=0, atol=1e-5)
    grads = {form: jax.tree.leaves(jax.grad(loss, argnums=(1, 2))(module, params, x))
             for form, module in (("looped", looped), ("shifted", shifted), ("grouped", grouped))}
    for other in ("shifted", "grouped"):
        for g, s in zip(grads[other], grads["looped"]):
            np.testing.assert_allclose(g, s, rtol=0, atol=1e-4 * float(jnp.abs(s).max()))
    with pytest.raises(ValueError, match="depthwise form"):
        DepthwiseConv(8, 7, 3, form="fft").init(jax.random.key(1), x)
