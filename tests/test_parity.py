"""fp32 parity of the Flax JanusFlow against the PyTorch reference (janusflow_jax/reference/janusflow_torch.py), with random weights.

One tiny reference with EVERY tensor randomised (the official init leaves GRN and `beg_of_und_embed` at zero, which
would hide bugs in those paths) is written as an official checkpoint directory and imported with
`convert.from_pytorch`; each component is then compared against the real transformers / timm / diffusers modules.

Criterion everywhere: max |jax - torch| <= 1e-4 * max |torch| (relative to the output's scale). The measured errors
are collected and printed in the terminal summary ("JanusFlow fp32 parity") without needing `-s`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from janusflow_jax.convert import janusflow as convert
from janusflow_jax.models import llama  # noqa: E402
from janusflow_jax.models.config import RepaConfig  # noqa: E402
from janusflow_jax.models.janusflow import JanusFlow, RepaProjector  # noqa: E402
from janusflow_jax.models.siglip import SigLIPViT  # noqa: E402
from janusflow_jax.models.uvit import ShallowUViTDecoder, ShallowUViTEncoder  # noqa: E402

from janusflow_jax.reference import janusflow_torch as ref  # noqa: E402

RTOL = 1e-4
# The tiny reference has 2 LLM layers; REPA reads after block 1 so the captured stream is a true intermediate
# (HF's hidden_states[num_layers] is the *normed* output, a different quantity from the residual stream).
REPA_LAYER = 1
ERRORS: dict[str, float] = {}


# ------------------------------------------------------------------------------------------------------- helpers
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor random, scaled so activations stay O(1) and attention does not saturate."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "channelwise_norm" in name:  # GRN weight / bias, zero in the official init
                value = 0.3 * noise
            elif name.endswith(("embed_tokens.weight", "beg_of_und_embed", "attn_pool.latent")):
                value = noise
            elif name.endswith("pos_embed"):
                value = 0.5 * noise
            elif p.ndim >= 2:  # linear [out, in] / conv [out, in/groups, kh, kw]
                value = noise / math.sqrt(math.prod(p.shape[1:]))
            elif name.endswith(".weight"):  # norm scales
                value = 1.0 + 0.2 * noise
            else:  # biases
                value = 0.2 * noise
            p.copy_(value.to(p.dtype))
    return model


def check(name: str, got, want, rtol: float = RTOL) -> float:
    got = np.asarray(got, np.float64)
    want = want.detach().double().numpy() if isinstance(want, torch.Tensor) else np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    scale = float(np.max(np.abs(want)))
    assert scale > 0, f"{name}: reference output is all zeros"
    err = float(np.max(np.abs(got - want))) / scale
    ERRORS[name] = max(err, ERRORS.get(name, 0.0))
    print(f"{name}: max|jax - torch| / max|torch| = {err:.2e}")
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e}"
    return err


@pytest.fixture(autouse=True)
def _report(request):
    """Each test's measured errors travel on its report (also from pytest-xdist workers); conftest.py prints them."""
    before = dict(ERRORS)
    yield
    measured = {name: err for name, err in ERRORS.items() if before.get(name) != err}
    if measured:
        request.node.user_properties.append(("parity_errors", measured))


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(torch reference, jax config, jax params): the reference written as an official checkpoint and imported."""
    raw = ref.config_tiny()
    torch.manual_seed(0)
    model = randomize_(ref.build_reference(raw))
    ckpt = tmp_path_factory.mktemp("official_tiny")
    (ckpt / "config.json").write_text(json.dumps(raw))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    cfg, params = convert.from_pytorch(ckpt, repa=RepaConfig(hidden_dim=raw["language_config"]["hidden_size"],
                                                             layer=REPA_LAYER))
    assert cfg.llm.num_kv_heads < cfg.llm.num_heads  # GQA is exercised
    return model, cfg, params


@pytest.fixture(scope="module")
def llm_inputs(setup):
    _, cfg, _ = setup
    rng = np.random.default_rng(1)
    b, t = 2, 12
    ids = rng.integers(1, cfg.llm.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, :3] = 0  # left padding
    ids[1, :3] = 0
    with torch.no_grad():
        want = setup[0].language_model(input_ids=torch.from_numpy(ids).long(),
                                       attention_mask=torch.from_numpy(mask).long()).logits
    return ids, mask, want


def _llm_logits_fn(llm_cfg, scan_layers=False):
    module = llama.LlamaModel(llm_cfg, scan_layers=scan_layers)

    @jax.jit
    def fn(params, ids, mask):
        return module.apply({"params": params}, ids, mask,
                            method=lambda m, i, a: m(m.embed(i), a)["logits"])
    return fn


# --------------------------------------------------------------------------------------------------------- LLM
def test_llm_logits_left_padding(setup, llm_inputs):
    _, cfg, params = setup
    ids, mask, want = llm_inputs
    got = np.asarray(_llm_logits_fn(cfg.llm)(params["language_model"], ids, mask))
    real = mask.astype(bool)
    check("LLM logits (left padding, GQA)", got[real], want.numpy()[real])


def test_llm_kv_cache_decoding(setup, llm_inputs):
    """Prefill the first tokens into a cache, then decode one token at a time: logits equal the full forward."""
    _, cfg, params = setup
    ids, mask, want = llm_inputs
    b, t = ids.shape
    prefill = 5
    module = llama.LlamaModel(cfg.llm)

    @jax.jit
    def step(params, tokens, cache, index):
        out = module.apply({"params": params}, tokens, mask, cache, index,
                           method=lambda m, i, a, c, k: m(m.embed(i), a, cache=c, cache_index=k))
        return out["logits"], out["cache"]

    cache = llama.init_cache(cfg.llm, b, t)
    logits, cache = step(params["language_model"], ids[:, :prefill], cache, 0)
    pieces = [np.asarray(logits)]
    for i in range(prefill, t):
        logits, cache = step(params["language_model"], ids[:, i:i + 1], cache, i)
        pieces.append(np.asarray(logits))
    got = np.concatenate(pieces, axis=1)
    real = mask.astype(bool)
    check("LLM KV-cache prefill + decode", got[real], want.numpy()[real])


def test_llm_scanned_layout(setup, llm_inputs):
    _, cfg, params = setup
    ids, mask, want = llm_inputs
    scanned = convert.scan_params(params, cfg)["language_model"]
    assert "layers" in scanned and "layers_0" not in scanned
    got = np.asarray(_llm_logits_fn(cfg.llm, scan_layers=True)(scanned, ids, mask))
    real = mask.astype(bool)
    check("LLM logits (scan_layers=True)", got[real], want.numpy()[real])


# ------------------------------------------------------------------------------------------------------ SigLIP
def test_siglip_features_and_map_head(setup):
    model, cfg, params = setup
    size = cfg.und_encoder.image_size
    pixels = np.random.default_rng(2).standard_normal((2, size, size, 3)).astype(np.float32)
    vit = SigLIPViT(cfg.und_encoder)
    feats, pooled = jax.jit(lambda p, x: vit.apply({"params": p}, x, method=lambda m, y: (lambda f: (f, m.pool(f)))(m(y))))(
        params["und_encoder"], pixels)
    timm_vit = model.vision_und_enc_model.vision_tower
    with torch.no_grad():
        want = timm_vit.forward_features(nchw(pixels))
        want_pooled = timm_vit.forward_head(want)
    assert want_pooled.shape == (2, cfg.und_encoder.width)
    check("SigLIP forward_features", feats, want)
    check("SigLIP MAP head (pool vs forward_head)", pooled, want_pooled)


# -------------------------------------------------------------------------------------------- generation towers
def test_gen_encoder_and_decoder(setup):
    model, cfg, params = setup
    rng = np.random.default_rng(3)
    b, size = 2, cfg.latent_size
    z = rng.standard_normal((b, size, size, cfg.gen_encoder.in_channels)).astype(np.float32)
    t = np.array([0.3, 0.85], np.float32)
    enc = ShallowUViTEncoder(cfg.gen_encoder, cfg.llm.hidden_size)
    feats, t_emb = jax.jit(lambda p, z, t: enc.apply({"params": p}, z, 1000.0 * t))(params["gen_encoder"], z, t)
    with torch.no_grad():
        want_feats, want_t, skips = model.vision_gen_enc_model(nchw(z), torch.from_numpy(t) * 1000.0)
    check("gen encoder features", feats, nhwc(want_feats))
    check("gen encoder t_emb", t_emb, want_t)

    grid = size // cfg.gen_encoder.stride
    x = rng.standard_normal((b, grid, grid, cfg.gen_decoder.in_channels)).astype(np.float32)
    skip = rng.standard_normal((b, grid, grid, cfg.gen_encoder.channels)).astype(np.float32)
    cond = rng.standard_normal((b, cfg.llm.hidden_size)).astype(np.float32)
    dec = ShallowUViTDecoder(cfg.gen_decoder)
    v = jax.jit(lambda p, x, s, c: dec.apply({"params": p}, x, s, c))(params["gen_decoder"], x, skip, cond)
    with torch.no_grad():
        want_v = model.vision_gen_dec_model(nchw(x), [nchw(skip)], torch.from_numpy(cond))
    check("gen decoder", v, nhwc(want_v))


# ------------------------------------------------------------------------------------------------ understanding
@pytest.fixture(scope="module")
def understand_case(setup):
    """Two rows, one image each at different offsets (2 and 6), the second row left-padded by 3."""
    model, cfg, _ = setup
    rng = np.random.default_rng(4)
    b, t = 2, 28
    n_img = 1 + cfg.und_encoder.num_patches  # 17
    ids = rng.integers(1, cfg.llm.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    image_mask = np.zeros((b, t), bool)
    image_mask[0, 2:2 + n_img] = True
    ids[0, 2:2 + n_img] = 100  # an image placeholder id
    mask[1, :3] = 0
    ids[1, :3] = 0
    image_mask[1, 6:6 + n_img] = True
    ids[1, 6:6 + n_img] = -1  # negative placeholders are tolerated too
    size = cfg.und_encoder.image_size
    pixels = rng.standard_normal((b, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref.understand_logits(model, torch.from_numpy(ids).long(), nchw(pixels)[:, None],
                                     torch.from_numpy(image_mask), torch.ones(b, 1, n_img, dtype=torch.bool),
                                     torch.from_numpy(mask).long())
    return ids, pixels, image_mask, mask, want.numpy()


def test_understand_matches_reference(setup, understand_case):
    _, cfg, params = setup
    ids, pixels, image_mask, mask, want = understand_case
    jf = JanusFlow(cfg)
    got = jax.jit(lambda p, *a: jf.apply({"params": p}, *a, method=JanusFlow.understand))(
        params, ids, pixels, image_mask, mask)
    real = mask.astype(bool)
    check("understand logits (image, left padding)", np.asarray(got)[real], want[real])


def test_understand_with_kv_cache(setup, understand_case):
    """Prefill the image-bearing prefix through `understand(..., cache=...)`, then decode the text token by token."""
    _, cfg, params = setup
    ids, pixels, image_mask, mask, want = understand_case
    b, t = ids.shape
    prefill = int(np.max(np.nonzero(image_mask)[1])) + 1  # both images inside the prefill
    jf = JanusFlow(cfg)
    cache = llama.init_cache(cfg.llm, b, t)

    @jax.jit
    def run_prefill(p, cache):
        return jf.apply({"params": p}, ids[:, :prefill], pixels, image_mask[:, :prefill], mask, cache=cache,
                        cache_index=0, method=JanusFlow.understand)

    @jax.jit
    def run_step(p, token, cache, index):
        return jf.apply({"params": p}, token, attention_mask=mask, cache=cache, cache_index=index,
                        method=JanusFlow.understand)

    logits, cache = run_prefill(params, cache)
    pieces = [np.asarray(logits)]
    for i in range(prefill, t):
        logits, cache = run_step(params, ids[:, i:i + 1], cache, i)
        pieces.append(np.asarray(logits))
    got = np.concatenate(pieces, axis=1)
    real = mask.astype(bool)
    check("understand with KV cache (image prefill + decode)", got[real], want[real])


# --------------------------------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def velocity_case(setup):
    model, cfg, _ = setup
    rng = np.random.default_rng(5)
    b, length = 2, 6
    prompt = rng.integers(1, cfg.llm.vocab_size, (b, length)).astype(np.int32)
    prompt[:, 0] = 1  # BOS
    prompt_mask = np.ones((b, length), np.int32)
    prompt_mask[1, 1:] = 0  # CFG unconditional row: BOS only, positions unchanged
    size = cfg.latent_size
    z = rng.standard_normal((b, size, size, cfg.gen_encoder.in_channels)).astype(np.float32)
    t = np.array([0.3, 0.85], np.float32)
    with torch.no_grad():
        want_v, want_feats = ref.velocity(model, torch.from_numpy(prompt).long(), torch.from_numpy(prompt_mask),
                                          nchw(z), torch.from_numpy(t), return_repa_features=True,
                                          repa_layer=REPA_LAYER)
    return prompt, prompt_mask, z, t, nhwc(want_v), want_feats.numpy()


@pytest.fixture(scope="module")
def jax_velocity(setup, velocity_case):
    """JAX velocity with REPA features, plus the raw residual stream captured inside the same call."""
    _, cfg, params = setup
    prompt, prompt_mask, z, t, _, _ = velocity_case
    jf = JanusFlow(cfg)
    n = cfg.num_gen_tokens

    @jax.jit
    def run(p, *args):
        (v, repa), state = jf.apply({"params": p}, *args, True, method=JanusFlow.velocity,
                                    capture_intermediates=lambda m, name: isinstance(m, llama.LlamaModel)
                                    and name == "__call__")
        (llm_out,) = state["intermediates"]["language_model"]["__call__"]
        return v, repa, llm_out["captured"][:, -n:]

    return jax.device_get(run(params, prompt, prompt_mask, z, t))


def test_velocity_and_repa_features(setup, velocity_case, jax_velocity):
    _, cfg, params = setup
    _, _, z, _, want_v, want_feats = velocity_case
    v, repa, raw = jax_velocity
    check("velocity (cond + CFG-null row)", v, want_v)
    # Raw residual stream after block REPA_LAYER at the latent positions, read inside the same velocity call.
    check(f"REPA raw hidden after block {REPA_LAYER}", raw, want_feats)
    # What velocity returns is h_phi(raw): the same projector applied to the torch stream must agree.
    proj = RepaProjector(cfg.repa.hidden_dim, cfg.und_encoder.width)
    want_repa = proj.apply({"params": params["repa_projector"]}, want_feats)
    assert repa.shape == (z.shape[0], cfg.num_gen_tokens, cfg.und_encoder.width)
    check("REPA projected features", repa, want_repa)


def test_velocity_with_prompt_cache(setup, velocity_case, jax_velocity):
    _, cfg, params = setup
    prompt, prompt_mask, z, t, want_v, _ = velocity_case
    jf = JanusFlow(cfg)

    @jax.jit
    def run(p, ids, mask, z, t):
        cache = jf.apply({"params": p}, ids, mask, method=JanusFlow.prompt_cache)
        return jf.apply({"params": p}, ids, mask, z, t, prompt_cache=cache, method=JanusFlow.velocity)

    cached = np.asarray(run(params, prompt, prompt_mask, z, t))
    check("velocity with prompt_cache", cached, want_v)
    plain = np.asarray(jax_velocity[0])
    assert np.max(np.abs(cached - plain)) <= 1e-5 * np.max(np.abs(plain))


def test_bf16_smoke(setup, understand_case, velocity_case):
    """bfloat16 compute and storage stays close to the fp32 reference (loose bound; a smoke check, not parity)."""
    _, cfg, params = setup
    ids, pixels, image_mask, mask, want_logits = understand_case
    prompt, prompt_mask, z, t, want_v, _ = velocity_case
    cfg16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    jf = JanusFlow(cfg16)

    @jax.jit
    def run(p):
        logits = jf.apply({"params": p}, ids, pixels, image_mask, mask, method=JanusFlow.understand)
        v = jf.apply({"params": p}, prompt, prompt_mask, z, t, method=JanusFlow.velocity)
        return logits.astype(jnp.float32), v.astype(jnp.float32)

    logits, v = run(params16)
    real = mask.astype(bool)
    check("bf16 smoke: understand logits (tol 5e-2)", np.asarray(logits)[real], want_logits[real], rtol=5e-2)
    check("bf16 smoke: velocity (tol 5e-2)", v, want_v, rtol=5e-2)
