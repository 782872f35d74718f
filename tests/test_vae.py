"""The Flax SDXL-VAE (janusflow_jax/models/vae.py) against diffusers' AutoencoderKL with random weights.

A tiny AutoencoderKL (2 blocks of 32/64 channels, 8 groups, so conv_shortcut, downsample, upsample and the mid-block
attention all appear) with EVERY tensor randomised (norm scales and biases too) is saved in the current and in the
deprecated attention naming; both must import and match diffusers in fp32 within max|jax - torch| <= 1e-4 * max|torch|.
The SDXL layout itself is checked against the 248 tensors of tests/data/sdxl_vae_state_dict.txt without allocation.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from janusflow_jax import sharding
from janusflow_jax.convert import janusflow as convert
from janusflow_jax.convert import tensors
from janusflow_jax.convert import vae as vae_convert
from janusflow_jax.models import vae

RTOL = 1e-4
_SDXL_LIST = os.path.join(os.path.dirname(__file__), "data", "sdxl_vae_state_dict.txt")
TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, norm_num_groups=8, latent_channels=4,
            sample_size=32)
IMAGE_SIDE = 32


# ------------------------------------------------------------------------------------------------------- fixtures
def _randomize_(model, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:  # conv [out, in, kh, kw] / linear [out, in]
                value = noise / math.sqrt(math.prod(p.shape[1:]))
            elif name.endswith(".weight"):  # GroupNorm scales
                value = 1.0 + 0.2 * noise
            else:
                value = 0.2 * noise
            p.copy_(value)
    return model


def _rename_to_deprecated(key: str) -> str:
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    return re.sub(r"\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.",
                  lambda m: f".attentions.0.{names[m.group(1)]}.", key)


def _write_dir(path, config: dict, state: dict):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / vae_convert.WEIGHTS_NAME), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch model, its state dict, {naming: directory}, torch outputs for a fixed image and latent)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    model = _randomize_(diffusers.AutoencoderKL(**TINY)).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = dict(model.config)
    root = tmp_path_factory.mktemp("vae")
    deprecated = {_rename_to_deprecated(k): v for k, v in state.items()}
    assert sum(".attentions.0.query." in k or ".attentions.0.proj_attn." in k for k in deprecated) == 8
    dirs = {"current": _write_dir(root / "current", config, state),
            "deprecated": _write_dir(root / "deprecated", config, deprecated)}
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, IMAGE_SIDE, IMAGE_SIDE, 3)).astype(np.float32)
    latents = rng.standard_normal((2, IMAGE_SIDE // 2, IMAGE_SIDE // 2, 4)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
        decoded = model.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample
    nhwc = lambda t: t.permute(0, 2, 3, 1).double().numpy()  # noqa: E731
    outputs = dict(images=images, latents=latents, mean=nhwc(dist.mean), logvar=nhwc(dist.logvar),
                   decoded=nhwc(decoded))
    return model, state, dirs, outputs


# One jit per method; the cache is shared by both namings (same shapes and dtypes).
_encode = jax.jit(lambda cfg, p, x: vae.AutoencoderKL(cfg).apply({"params": p}, x, method=vae.AutoencoderKL.encode),
                  static_argnums=0)
_decode = jax.jit(lambda cfg, p, z: vae.AutoencoderKL(cfg).apply({"params": p}, z, method=vae.AutoencoderKL.decode),
                  static_argnums=0)


def _rel_err(got, want) -> float:
    scale = float(np.max(np.abs(want)))
    assert scale > 0
    return float(np.max(np.abs(np.asarray(got, np.float64) - want))) / scale


def _read_sdxl_list():
    entries = []
    with open(_SDXL_LIST) as f:
        for line in f:
            name, shape = line.strip().split(" ", 1)
            entries.append((name, tuple(int(d) for d in shape.strip("[]").split(","))))
    return entries


# ------------------------------------------------------------------------------------------------------- layout
def test_sdxl_layout_matches_the_reference_list_without_allocation():
    cfg = vae.VAEConfig()
    shapes = vae.vae_param_shapes(cfg)
    rules = vae_convert.vae_rules(cfg)
    got = [(key, tensors.torch_shape(transform, shapes[path])) for path, key, transform in rules]
    want = _read_sdxl_list()
    assert len(want) == 248
    assert got == want  # same names, shapes and state-dict order
    assert sorted(shapes) == sorted(path for path, _, _ in rules)  # every parameter has exactly one rule
    assert sum(math.prod(s) for _, s in got) == 83_653_863


def test_every_parameter_is_replicated_on_a_mesh():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = sharding.logical_to_shardings(vae.abstract_vae_params(vae.VAEConfig()), mesh)
    leaves = jax.tree.leaves(shardings)
    assert len(leaves) == 248
    assert all(axis is None for s in leaves for axis in s.spec), {str(s.spec) for s in leaves}


# ------------------------------------------------------------------------------------------------------- config
def test_config_from_and_to_diffusers():
    sdxl = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.18.0.dev0", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
            "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4}
    cfg = vae.VAEConfig.from_diffusers_config(sdxl)
    assert cfg == vae.VAEConfig()
    assert vae.VAEConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg
    assert vae.VAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown config keys"):
        vae.VAEConfig.from_dict({"latent_channel": 4})
    with pytest.raises(ValueError, match="overflows in fp16"):
        vae.VAEConfig(dtype="float16")
    with pytest.raises(ValueError, match="overflows in fp16"):
        vae.VAEConfig(param_dtype="float16")
    with pytest.raises(ValueError, match="down_block_types"):
        vae.VAEConfig.from_diffusers_config({**sdxl, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="latents_mean"):
        vae.VAEConfig.from_diffusers_config({**sdxl, "latents_mean": [0.0] * 4})


# ------------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("naming", ["current", "deprecated"])
def test_fp32_parity_with_diffusers(reference, naming):
    _, _, dirs, out = reference
    cfg, params = vae_convert.from_diffusers(dirs[naming])
    assert cfg.block_out_channels == (32, 64) and cfg.norm_num_groups == 8
    mean, logvar = _encode(cfg, params, out["images"])
    decoded = _decode(cfg, params, out["latents"])
    errors = {"mean": _rel_err(mean, out["mean"]), "logvar": _rel_err(logvar, out["logvar"]),
              "decoded": _rel_err(decoded, out["decoded"])}
    print(f"VAE fp32 {naming}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert mean.shape == (2, IMAGE_SIDE // 2, IMAGE_SIDE // 2, 4) and decoded.shape == out["images"].shape
    assert all(err <= RTOL for err in errors.values()), errors


def test_bf16_smoke(reference):
    _, _, dirs, out = reference
    cfg, params = vae_convert.from_diffusers(dirs["current"], param_dtype="bfloat16", dtype="bfloat16")
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    mean, logvar = _encode(cfg, params, out["images"])
    decoded = _decode(cfg, params, out["latents"])
    errors = {"mean": _rel_err(mean, out["mean"]), "logvar": _rel_err(logvar, out["logvar"]),
              "decoded": _rel_err(decoded, out["decoded"])}
    print("VAE bf16 vs fp32 torch: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(err <= 5e-2 for err in errors.values()), errors  # bf16 has 8 mantissa bits
    assert all(err > 1e-6 for err in errors.values()), "bf16 run looks like fp32: dtype not applied"


# ------------------------------------------------------------------------------------------------ files / errors
def test_damaged_file_reports_every_bad_tensor_at_once(reference, tmp_path):
    import torch

    model, state, _, _ = reference
    state = dict(state)
    removed = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    reshaped = "encoder.mid_block.attentions.0.to_k.weight"
    unknown = "encoder.mid_block.attentions.1.to_q.weight"
    removed_shape = list(state.pop(removed).shape)
    state[reshaped] = state[reshaped][:, :32]
    state[unknown] = torch.zeros(3, 5)
    directory = _write_dir(tmp_path / "damaged", dict(model.config), state)
    with pytest.raises(convert.CheckpointMismatchError) as info:
        vae_convert.from_diffusers(directory)
    message = str(info.value)
    assert f"{removed} (expected shape {removed_shape})" in message
    assert f"{unknown} (shape [3, 5])" in message
    assert f"{reshaped}: expected [64, 64], got [64, 32]" in message
    assert [m[0] for m in info.value.missing] == [removed]
    assert [u[0] for u in info.value.unexpected] == [unknown]
    assert [s[0] for s in info.value.mis_shaped] == [reshaped]
    with pytest.raises(FileNotFoundError, match=vae_convert.WEIGHTS_NAME):
        vae_convert.from_diffusers(tmp_path)


def test_round_trip_is_bit_exact_and_loads_in_diffusers(reference, tmp_path):
    import diffusers
    from safetensors.numpy import load_file

    _, state, dirs, _ = reference
    cfg, params = vae_convert.from_diffusers(dirs["deprecated"])
    out = vae_convert.to_diffusers(cfg, params, tmp_path / "export")
    written = load_file(str(out / vae_convert.WEIGHTS_NAME))
    assert sorted(written) == sorted(state)  # current naming, nothing more or less
    for key, value in state.items():
        assert written[key].dtype == np.float32 and np.array_equal(written[key], value.numpy()), key
    with pytest.raises(FileExistsError):
        vae_convert.to_diffusers(cfg, params, out)
    reloaded = diffusers.AutoencoderKL.from_pretrained(str(out))
    assert all(np.array_equal(v.numpy(), state[k].numpy()) for k, v in reloaded.state_dict().items())
    assert vae.VAEConfig.from_diffusers_config(dict(reloaded.config)) == cfg


def test_fresh_params_export_and_bad_input(tmp_path):
    cfg = vae.VAEConfig(block_out_channels=(16, 32), norm_num_groups=4, layers_per_block=1,
                        mid_block_add_attention=False, use_quant_conv=False)
    params = vae.init_vae_params(cfg, jax.random.key(0))
    assert {k: v.shape for k, v in tensors.flatten(params).items()} == vae.vae_param_shapes(cfg)
    assert "quant_conv" not in params and "post_quant_conv" in params
    assert not any("attentions" in k for k in tensors.flatten(params))
    out = vae_convert.to_diffusers(cfg, params, tmp_path / "fresh")
    cfg2, params2 = vae_convert.from_diffusers(out)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, params2)
    model = vae.AutoencoderKL(cfg)
    with pytest.raises(ValueError, match="encode expects"):
        model.apply({"params": params}, jnp.zeros((1, 8, 8, 4)), method=vae.AutoencoderKL.encode)
