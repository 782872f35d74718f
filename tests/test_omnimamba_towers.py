"""OmniMamba's vision towers against PyTorch, fp32, random weights: the DINOv2-reg4 and SigLIP-so400m ViTs
(`models/vit.py`) against timm read as Prismatic reads them (`get_intermediate_layers(n={len(blocks) - 2})`), their
channel concatenation (`models/dinosiglip.py`), the fused-gelu-mlp projector, and LlamaGen's VQ-16 (`models/vq.py`)
against `reference/vq_torch.py`; plus the conversion tables (`convert/dinosiglip.py`, `convert/vq.py`).

Tiny models built from the real recipes (timm's registered names with small overrides; the VQ with LlamaGen's
structure at small widths), EVERY tensor randomised (norms, biases, LayerScale, class/register tokens, codebook).
Criterion: max |jax - torch| <= 1e-4 * max |torch|; the measured errors are printed in the terminal summary.
The full-size layouts (DINOv2-L/14-reg4 and so400m at 384 px, VQ-16) are checked against timm and the reference
on the meta device, without allocating.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from janusflow_jax.convert import dinosiglip as convert  # noqa: E402
from janusflow_jax.convert import vq as vq_convert  # noqa: E402
from janusflow_jax.convert.tensors import CheckpointMismatchError  # noqa: E402
from janusflow_jax.models import dinosiglip, vit, vq  # noqa: E402
from janusflow_jax.reference import vq_torch  # noqa: E402

RTOL = 1e-4
ERRORS: dict[str, float] = {}
SIDE = 18  # 18 px with 4 px patches: 4 x 4 patches and 2 dropped pixels per side, as 384 px with 14 px patches
DINO = vit.DINOV2_L_REG4_384.replace(image_size=SIDE, patch_size=4, width=32, depth=3, num_heads=2, mlp_dim=128)
SIGLIP = vit.SIGLIP_SO400M_384.replace(image_size=SIDE, patch_size=4, width=48, depth=3, num_heads=4,
                                       mlp_dim=int(48 * 3.7362))
TOWER = dinosiglip.DinoSigLIPConfig(dino=DINO, siglip=SIGLIP)
PROJECTOR = dinosiglip.ProjectorConfig(vision_dim=TOWER.width, llm_dim=40)
VQ = vq.VQConfig(codebook_size=64, encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2), z_channels=16, ch=32,
                 norm_groups=8)
VQ_SIDE = 32


# ------------------------------------------------------------------------------------------------------- helpers
def randomize_(model, seed: int):
    """Every parameter random at O(1) activations: weights / sqrt(fan_in), scales 1 + noise, the rest noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("cls_token", "reg_token", "pos_embed", "embedding.weight", "latent")):
                value = noise
            elif p.ndim >= 2:
                value = noise / math.sqrt(math.prod(p.shape[1:]))
            elif name.endswith("gamma"):  # LayerScale (timm init 1e-5 would hide the residual branches)
                value = 0.5 + 0.3 * noise
            elif name.endswith(".weight"):
                value = 1.0 + 0.2 * noise
            else:
                value = 0.2 * noise
            p.copy_(value)
    return model.eval()


def timm_tower(cfg: vit.ViTConfig, name: str, seed: int):
    """The registered timm model with the tiny sizes (the recipe's other settings kept), num_classes=0 as Prismatic."""
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=cfg.image_size,
                              patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads)
    assert model.blocks[0].mlp.fc1.out_features == cfg.mlp_dim
    return randomize_(model, seed)


def penultimate(model, pixels):
    """Prismatic's featurizer forward."""
    return model.get_intermediate_layers(pixels, n={len(model.blocks) - 2})[0]


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


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
    before = dict(ERRORS)
    yield
    measured = {name: err for name, err in ERRORS.items() if before.get(name) != err}
    if measured:
        request.node.user_properties.append(("parity_errors", measured))


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).numpy()


def torch_normalize(images: torch.Tensor, cfg: vit.ViTConfig) -> torch.Tensor:
    """torchvision Normalize on a [0, 1] NCHW image."""
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (cfg.mean, cfg.std))
    return (images - mean) / std


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def towers():
    """(timm DINOv2, timm SigLIP, images in [0, 1] NHWC, torch fused features)."""
    dino = timm_tower(DINO, "vit_large_patch14_reg4_dinov2", seed=0)
    siglip = timm_tower(SIGLIP, "vit_so400m_patch14_siglip_384", seed=1)
    assert dino.num_prefix_tokens == 5 and siglip.num_prefix_tokens == 0 and hasattr(siglip, "attn_pool")
    images = np.random.default_rng(0).uniform(0, 1, (2, SIDE, SIDE, 3)).astype(np.float32)
    with torch.no_grad():
        x = nchw(images)
        fused = torch.cat([penultimate(dino, torch_normalize(x, DINO)),
                           penultimate(siglip, torch_normalize(x, SIGLIP))], dim=2)
    return dino, siglip, images, fused


@pytest.fixture(scope="module")
def vq_reference():
    model = randomize_(vq_torch.VQModel(codebook_size=VQ.codebook_size, codebook_embed_dim=VQ.codebook_embed_dim,
                                        encoder_ch_mult=VQ.encoder_ch_mult, decoder_ch_mult=VQ.decoder_ch_mult,
                                        z_channels=VQ.z_channels, ch=VQ.ch, num_res_blocks=VQ.num_res_blocks,
                                        norm_groups=VQ.norm_groups), seed=2)
    with torch.no_grad():
        model.quantize.codebook_used.copy_(torch.arange(65536) % VQ.codebook_size)  # a "trained" statistic
    return model


_vit = jax.jit(lambda cfg, scan, p, x: vit.VisionTransformer(cfg, scan_layers=scan).apply({"params": p}, x),
               static_argnums=(0, 1))
_tower = jax.jit(lambda cfg, scan, dtype, p, x: dinosiglip.DinoSigLIP(cfg, dtype, scan_layers=scan).apply(
    {"params": p}, x), static_argnums=(0, 1, 2))


def _vq(method):
    return jax.jit(lambda cfg, dtype, p, x: vq.VQModel(cfg, dtype).apply({"params": p}, x, method=method),
                   static_argnums=(0, 1))


_encode_z, _encode, _decode_codes = _vq(vq.VQModel.encode_z), _vq(vq.VQModel.encode), _vq(vq.VQModel.decode_codes)


def check_bf16(name: str, got, want):
    """bf16 compute (dtype reached every module): off from fp32 torch by bf16 rounding, not more and not less."""
    want = want.detach().double().numpy() if isinstance(want, torch.Tensor) else np.asarray(want, np.float64)
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))
    print(f"{name} bf16 vs fp32 torch: {err:.2e}")
    assert 1e-5 < err < 5e-2, f"{name}: bf16 error {err:.2e} (fp32 numbers, or broken)"


# --------------------------------------------------------------------------------------------- full-size layouts
def _meta_state(build):
    with torch.device("meta"):
        return [(k, tuple(v.shape)) for k, v in build().state_dict().items()]


@pytest.mark.parametrize("cfg", [vit.DINOV2_L_REG4_384, vit.SIGLIP_SO400M_384], ids=["dino", "siglip"])
def test_full_size_vit_layout_matches_timm(cfg):
    timm_name = cfg.model_name.split(".")[0]
    state = _meta_state(lambda: timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=384))
    shapes = vit.vit_param_shapes(cfg)
    rules = convert.vit_rules(cfg)
    kept = [(t, convert_shape(f, shapes[j])) for j, t, f in rules]
    skipped = convert.vit_skipped(cfg)
    assert kept == [(k, s) for k, s in state if not skipped(k)]  # names, shapes and order
    assert sorted(shapes) == sorted(j for j, _, _ in rules)
    last = f"blocks.{cfg.depth - 1}."
    assert {k.split(".")[0] if not k.startswith(last) else last for k, _ in state if skipped(k)} == \
        ({last, "norm"} | ({"attn_pool"} if not cfg.class_token else set()))
    assert cfg.num_patches == 729 and dict(kept)["pos_embed"] == (1, 729, cfg.width)


def convert_shape(transform, shape):
    from janusflow_jax.convert.tensors import torch_shape

    return torch_shape(transform, tuple(shape))


def test_full_size_tower_projector_and_vq_layout():
    tower = dinosiglip.DinoSigLIPConfig()
    assert tower.width == 2176 and tower.num_patches == 729
    shapes = dinosiglip.projector_param_shapes(dinosiglip.ProjectorConfig())
    assert shapes == {"fc1/kernel": (2176, 8704), "fc1/bias": (8704,), "fc2/kernel": (8704, 2048),
                      "fc2/bias": (2048,), "fc3/kernel": (2048, 2048), "fc3/bias": (2048,)}
    cfg = vq.VQConfig()
    state = _meta_state(vq_torch.VQModel)
    shapes = vq.vq_param_shapes(cfg)
    rules = vq_convert.vq_rules(cfg)
    ours = [(t, convert_shape(f, shapes[j])) for j, t, f in rules]
    # PyTorch lists a module's own buffers before its children: codebook_used precedes quantize.embedding.weight.
    at = [k for k, _ in ours].index("quantize.embedding.weight")
    assert ours[:at] + [(vq_convert.CODEBOOK_USED, (65536,))] + ours[at:] == state
    assert sorted(shapes) == sorted(j for j, _, _ in rules)
    assert sum(math.prod(s) for s in shapes.values()) == 71_883_403
    assert cfg.downsample_factor == 16


def test_every_parameter_has_logical_axes():
    trees = [jax.eval_shape(lambda: dinosiglip.DinoSigLIP(TOWER, scan_layers=True).init(
                 jax.random.key(0), jnp.zeros((1, SIDE, SIDE, 3))))["params"],
             jax.eval_shape(lambda: dinosiglip.FusedGeluMLP(PROJECTOR).init(
                 jax.random.key(0), jnp.zeros((1, PROJECTOR.vision_dim))))["params"],
             vq.abstract_vq_params(VQ)]
    for tree in trees:
        leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)


# ------------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("which", ["dino", "siglip"])
def test_vit_penultimate_patches_match_timm(towers, which):
    dino, siglip, images, _ = towers
    model, cfg = (dino, DINO) if which == "dino" else (siglip, SIGLIP)
    params = convert.vit_from_timm(model.state_dict(), cfg)
    assert f"blocks_{cfg.depth - 1}" not in params and f"blocks_{cfg.depth - 2}" in params
    pixels = torch_normalize(nchw(images), cfg)
    with torch.no_grad():
        want = penultimate(model, pixels)
    got = _vit(cfg, False, params, np.moveaxis(pixels.numpy(), 1, -1))
    assert got.shape == (2, cfg.num_patches, cfg.width)
    check(f"{which} penultimate patches", got, want)


def test_dual_tower_concatenation_and_scan(towers):
    dino, siglip, images, fused = towers
    params = convert.dinosiglip_from_timm(dino.state_dict(), siglip.state_dict(), TOWER)
    got = _tower(TOWER, False, jnp.float32, params, images)
    assert got.shape == (2, TOWER.num_patches, DINO.width + SIGLIP.width)
    check("dinosiglip fused patches", got, fused)
    check_bf16("dinosiglip fused patches", _tower(TOWER, False, jnp.bfloat16, params, images), fused)
    scanned = convert.dinosiglip_from_timm(dino.state_dict(), siglip.state_dict(), TOWER, scan_layers=True)
    assert scanned["dino"]["blocks"]["attn"]["qkv"]["kernel"].shape == (DINO.blocks_run, DINO.width, 3 * DINO.width)
    np.testing.assert_allclose(_tower(TOWER, True, jnp.float32, scanned, images), got, rtol=0, atol=1e-5)
    dino_back, siglip_back = convert.dinosiglip_to_timm(TOWER, scanned)
    assert all(np.array_equal(v, dino.state_dict()[k].numpy()) for k, v in dino_back.items())
    assert all(np.array_equal(v, siglip.state_dict()[k].numpy()) for k, v in siglip_back.items())
    with pytest.raises(ValueError, match="expects"):
        _tower(TOWER, False, jnp.float32, params, images[:, :-1])


def test_projector_matches_torch():
    gen = torch.Generator().manual_seed(3)
    proj = torch.nn.Sequential(torch.nn.Linear(PROJECTOR.vision_dim, PROJECTOR.hidden_dim), torch.nn.GELU(),
                               torch.nn.Linear(PROJECTOR.hidden_dim, PROJECTOR.llm_dim), torch.nn.GELU(),
                               torch.nn.Linear(PROJECTOR.llm_dim, PROJECTOR.llm_dim))
    randomize_(proj, seed=3)
    release = {f"projector.projector.{k}": v for k, v in proj.state_dict().items()}
    params = convert.projector_from_release(release, PROJECTOR)
    x = torch.randn(2, 5, PROJECTOR.vision_dim, generator=gen)
    with torch.no_grad():
        want = proj(x)
    got = dinosiglip.FusedGeluMLP(PROJECTOR).apply({"params": params}, x.numpy())
    check("projector", got, want)


def test_vq_encode_and_decode_match_the_reference(vq_reference):
    model = vq_reference
    params = vq_convert.vq_from_llamagen(model.state_dict(), VQ)
    images = np.random.default_rng(4).uniform(-1, 1, (2, VQ_SIDE, VQ_SIDE, 3)).astype(np.float32)
    with torch.no_grad():
        z = model.encode_z(nchw(images))
        _, codes = model.encode(nchw(images))
        decoded = model.decode_code(codes)
        # The distance gap between the best and second-best code: codes can only differ at near-ties.
        e = model.quantize.codebook()
        flat = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, VQ.codebook_embed_dim), dim=-1)
        gap = torch.topk(torch.cdist(flat, e), 2, largest=False).values.diff(dim=1).min().item()
    check("vq encode z (before quantisation)", _encode_z(VQ, jnp.float32, params, images), nhwc(z))
    got_codes = np.asarray(_encode(VQ, jnp.float32, params, images))
    side = VQ_SIDE // VQ.downsample_factor
    assert got_codes.shape == (2, side, side) and got_codes.dtype == np.int32
    print(f"vq codes: {got_codes.size} positions, {len(np.unique(got_codes))} distinct, min top-2 gap {gap:.1e}")
    np.testing.assert_array_equal(got_codes, codes.numpy())
    # The quantiser alone on spread-out z (the random encoder's outputs cluster on a few codes).
    z_random = np.random.default_rng(5).standard_normal((2, 8, 8, VQ.codebook_embed_dim)).astype(np.float32)
    with torch.no_grad():
        _, want_codes = model.quantize(nchw(z_random))
    got_random = vq.VQModel(VQ).apply({"params": params}, z_random, method=lambda m, z: m.quantize(z))
    assert len(np.unique(want_codes.numpy())) > VQ.codebook_size // 2
    np.testing.assert_array_equal(got_random, want_codes.numpy())
    check("vq decode_codes", _decode_codes(VQ, jnp.float32, params, codes.numpy()), nhwc(decoded))
    check_bf16("vq decode_codes", _decode_codes(VQ, jnp.bfloat16, params, codes.numpy()), nhwc(decoded))
    with pytest.raises(ValueError, match="multiples of"):
        _encode(VQ, jnp.float32, params, images[:, :-2])


# ------------------------------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("which", ["dino", "siglip"])
def test_timm_round_trip_is_bit_exact_and_loads_in_timm(towers, which):
    dino, siglip, _, _ = towers
    model, cfg, name = (dino, DINO, "vit_large_patch14_reg4_dinov2") if which == "dino" else \
        (siglip, SIGLIP, "vit_so400m_patch14_siglip_384")
    state = numpy_state(model)
    params = convert.vit_from_timm(model.state_dict(), cfg)  # torch tensors in
    for layout in (params, convert.stack_blocks(params, cfg.blocks_run)):
        back = convert.vit_to_timm(cfg, layout)
        skipped = {k for k in state if convert.vit_skipped(cfg)(k)}
        assert list(back) == [k for k in state if k not in skipped]  # timm's order, nothing else
        assert all(back[k].dtype == np.float32 and np.array_equal(back[k], state[k]) for k in back)
    fresh = timm.create_model(name, pretrained=False, num_classes=0, img_size=SIDE, patch_size=cfg.patch_size,
                              embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads)
    result = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=False)
    assert sorted(result.missing_keys) == sorted(skipped) and not result.unexpected_keys
    assert any(k.startswith(f"blocks.{cfg.depth - 1}.") for k in skipped) and "norm.weight" in skipped
    half = convert.vit_to_timm(cfg, convert.vit_from_timm(state, cfg, param_dtype="bfloat16"))
    assert half["pos_embed"].dtype == jnp.bfloat16


def test_projector_and_vq_round_trips_through_a_release_dict(vq_reference, tmp_path):
    """One release-like dict (fp16, as OmniMamba-1.3b.pth) holds the projector, the VQ under llm_backbone.vqvae. and
    unrelated LLM keys; each table reads only its own prefix, and exports back bit-exactly."""
    proj = torch.nn.Sequential(torch.nn.Linear(PROJECTOR.vision_dim, PROJECTOR.hidden_dim), torch.nn.GELU(),
                               torch.nn.Linear(PROJECTOR.hidden_dim, PROJECTOR.llm_dim), torch.nn.GELU(),
                               torch.nn.Linear(PROJECTOR.llm_dim, PROJECTOR.llm_dim))
    release = {f"projector.projector.{k}": v.half() for k, v in randomize_(proj, 5).state_dict().items()}
    release |= {vq_convert.RELEASE_VQ_PREFIX + k: v.half() for k, v in vq_reference.state_dict().items()}
    release["llm_backbone.mamba.backbone.norm_f.weight"] = torch.ones(8, dtype=torch.float16)
    projector = convert.projector_from_release(release, PROJECTOR)
    params = vq_convert.vq_from_llamagen(release, VQ, prefix=vq_convert.RELEASE_VQ_PREFIX)
    assert jax.tree.leaves(params)[0].dtype == np.float32
    back = convert.projector_to_release(projector, dtype="float16")
    back |= vq_convert.vq_to_llamagen(VQ, params, dtype="float16", prefix=vq_convert.RELEASE_VQ_PREFIX)
    used = vq_convert.RELEASE_VQ_PREFIX + vq_convert.CODEBOOK_USED
    assert sorted(back) == sorted(k for k in release if not k.startswith("llm_backbone.mamba."))
    assert not back[used].any()  # the skipped training statistic comes back as zeros
    for key, value in release.items():
        if key in back and key != used:
            assert back[key].dtype == np.float16 and np.array_equal(back[key], value.numpy()), key
    import argparse

    torch.save({"model": vq_reference.state_dict(), "steps": 7, "args": argparse.Namespace(vq_model="VQ-16")},
               tmp_path / "vq_ds16_t2i.pt")  # LlamaGen's checkpoint layout
    loaded = vq_convert.load_llamagen_checkpoint(tmp_path / "vq_ds16_t2i.pt")
    fp32 = vq_convert.vq_to_llamagen(VQ, vq_convert.vq_from_llamagen(loaded, VQ))
    fresh = vq_torch.VQModel(codebook_size=VQ.codebook_size, encoder_ch_mult=VQ.encoder_ch_mult,
                             decoder_ch_mult=VQ.decoder_ch_mult, z_channels=VQ.z_channels, ch=VQ.ch,
                             norm_groups=VQ.norm_groups)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in fp32.items()}, strict=True)
    for key, value in vq_reference.state_dict().items():
        assert key == vq_convert.CODEBOOK_USED or np.array_equal(fp32[key], value.numpy()), key


def test_damaged_state_dicts_name_every_bad_tensor(towers, vq_reference):
    dino, siglip, _, _ = towers
    d, s = numpy_state(dino), numpy_state(siglip)
    d.pop("blocks.0.ls1.gamma")
    d["reg_token"] = d["reg_token"][:, :3]
    d["blocks.1.attn.extra.weight"] = np.zeros((3, 5), np.float32)
    s["pos_embed"] = np.zeros((1, 25, SIGLIP.width), np.float32)  # e.g. the wrong image size
    with pytest.raises(CheckpointMismatchError) as info:
        convert.dinosiglip_from_timm(d, s, TOWER)
    message = str(info.value)
    assert "blocks.0.ls1.gamma (expected shape [32])" in message
    assert "blocks.1.attn.extra.weight (shape [3, 5])" in message
    assert "<dino state dict> and <siglip state dict>" in message
    assert "reg_token: expected [1, 4, 32], got [1, 3, 32]" in message
    assert f"pos_embed: expected [1, 16, {SIGLIP.width}], got [1, 25, {SIGLIP.width}]" in message
    assert len(info.value.missing) == 1 and len(info.value.unexpected) == 1 and len(info.value.mis_shaped) == 2

    prefix = vq_convert.RELEASE_VQ_PREFIX
    state = {prefix + k: v for k, v in numpy_state(vq_reference).items()}
    removed = prefix + "decoder.conv_blocks.1.res.0.nin_shortcut.weight"
    reshaped = prefix + "encoder.mid.1.q.weight"
    unknown = prefix + "encoder.mid.3.norm.weight"
    removed_shape = list(state.pop(removed).shape)
    state[reshaped] = state[reshaped][:, :8]
    state[unknown] = np.ones(4, np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        vq_convert.vq_from_llamagen(state, VQ, prefix=prefix)
    message = str(info.value)
    assert f"{removed} (expected shape {removed_shape})" in message
    assert f"{unknown} (shape [4])" in message
    assert f"{reshaped}: expected [64, 64, 1, 1], got [64, 8, 1, 1]" in message
    assert [m[0] for m in info.value.missing] == [removed]
    assert [u[0] for u in info.value.unexpected] == [unknown]
