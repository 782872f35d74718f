"""The SDXL-VAE's checkpoint table: diffusers `AutoencoderKL` (config.json + diffusion_pytorch_model.safetensors)
<-> the Flax `models/vae.py` parameters, both directions, bit-exact (the machinery is `convert/tensors.py`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from janusflow_jax import paths
from janusflow_jax.convert.tensors import (CheckpointMismatchError, Rule, StateDict, atomic_write_dir, conv_rules,
                                           export_tensors, flatten, import_tensors, layer_norm_rules, numpy_dtype)
from janusflow_jax.models.vae import VAEConfig, vae_param_shapes

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# Parameter names of the mid-block attention in diffusers' current layout and in the deprecated `AttentionBlock`
# layout that diffusers still renames on load (both are Linear [C, C]; group_norm keeps its name).
ATTENTION_NAMES: dict[str, dict[str, str]] = {
    "current": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out_0": "to_out.0"},
    "deprecated": {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"},
}
_DEPRECATED_KEY = re.compile(r"\.attentions\.\d+\.(query|key|value|proj_attn)\.(weight|bias)$")


def _resnet_rules(jax_path: str, torch_key: str, has_shortcut: bool) -> list[Rule]:
    rules = layer_norm_rules(f"{jax_path}/norm1", f"{torch_key}.norm1") + conv_rules(f"{jax_path}/conv1", f"{torch_key}.conv1")
    rules += layer_norm_rules(f"{jax_path}/norm2", f"{torch_key}.norm2") + conv_rules(f"{jax_path}/conv2", f"{torch_key}.conv2")
    return rules + (conv_rules(f"{jax_path}/conv_shortcut", f"{torch_key}.conv_shortcut") if has_shortcut else [])


def _mid_block_rules(cfg: VAEConfig, side: str, naming: str) -> list[Rule]:
    j, t = f"{side}/mid_block", f"{side}.mid_block"
    rules = []
    if cfg.mid_block_add_attention:  # diffusers registers `attentions` before `resnets`
        rules += layer_norm_rules(f"{j}/attentions_0/group_norm", f"{t}.attentions.0.group_norm")
        for ours, theirs in ATTENTION_NAMES[naming].items():
            rules += [(f"{j}/attentions_0/{ours}/kernel", f"{t}.attentions.0.{theirs}.weight", "linear"),
                      (f"{j}/attentions_0/{ours}/bias", f"{t}.attentions.0.{theirs}.bias", "identity")]
    for k in range(2):
        rules += _resnet_rules(f"{j}/resnets_{k}", f"{t}.resnets.{k}", has_shortcut=False)
    return rules


def vae_rules(config: VAEConfig, attention_naming: str = "current") -> list[Rule]:
    """Every tensor of a diffusers AutoencoderKL state dict, in its state-dict order.

    attention_naming: "current" (`to_q`, `to_k`, `to_v`, `to_out.0`) or "deprecated" (`query`, `key`, `value`,
    `proj_attn`) for the mid-block attention.
    """
    if attention_naming not in ATTENTION_NAMES:
        raise ValueError(f"attention_naming {attention_naming!r} not in {sorted(ATTENTION_NAMES)}")
    channels = config.block_out_channels
    # Both towers list conv_in, their blocks, mid_block, conv_norm_out, conv_out (diffusers registers the decoder's
    # up_blocks before its mid_block, although the forward runs the mid block first).
    towers = (("encoder", channels, config.layers_per_block, "down_blocks", "downsamplers"),
              ("decoder", tuple(reversed(channels)), config.layers_per_block + 1, "up_blocks", "upsamplers"))
    rules = []
    for side, widths, resnets, blocks, resample in towers:
        rules += conv_rules(f"{side}/conv_in", f"{side}.conv_in")
        previous = widths[0]
        for i, ch in enumerate(widths):
            j, t = f"{side}/{blocks}_{i}", f"{side}.{blocks}.{i}"
            for k in range(resnets):
                rules += _resnet_rules(f"{j}/resnets_{k}", f"{t}.resnets.{k}", has_shortcut=k == 0 and previous != ch)
            if i < len(widths) - 1:
                rules += conv_rules(f"{j}/{resample}_0/conv", f"{t}.{resample}.0.conv")
            previous = ch
        rules += _mid_block_rules(config, side, attention_naming)
        rules += layer_norm_rules(f"{side}/conv_norm_out", f"{side}.conv_norm_out") + conv_rules(f"{side}/conv_out",
                                                                                          f"{side}.conv_out")
    if config.use_quant_conv:
        rules += conv_rules("quant_conv", "quant_conv")
    if config.use_post_quant_conv:
        rules += conv_rules("post_quant_conv", "post_quant_conv")
    return rules


@paths.reads_local
def from_diffusers(path: str | os.PathLike, param_dtype: str = "float32",
                   dtype: str = "float32") -> tuple[VAEConfig, dict]:
    """Reads a diffusers VAE directory (config.json + diffusion_pytorch_model.safetensors).

    Accepts the current and the deprecated attention names. Returns (config, params) with numpy parameters of
    `param_dtype`. A file with missing, unexpected or mis-shaped tensors raises one CheckpointMismatchError that
    names all of them.
    """
    path = Path(path)
    config_file, weights = path / "config.json", path / WEIGHTS_NAME
    for f in (config_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found (a diffusers VAE directory needs config.json and {WEIGHTS_NAME})")
    config = VAEConfig.from_diffusers_config(json.loads(config_file.read_text()), dtype=dtype,
                                             param_dtype=param_dtype)
    state = StateDict(weights)
    naming = "deprecated" if any(_DEPRECATED_KEY.search(k) for k in state) else "current"
    flat = import_tensors(state, vae_rules(config, naming), vae_param_shapes(config), numpy_dtype(param_dtype),
                          source=str(weights))
    return config, traverse_util.unflatten_dict(flat, sep="/")


def to_diffusers(config: VAEConfig, params, out_dir: str | os.PathLike, torch_dtype: str | None = None,
                 overwrite: bool = False) -> Path:
    """Writes config.json + diffusion_pytorch_model.safetensors (current attention names), atomically.

    torch_dtype: dtype of the written tensors (default: the parameters' own, so a round trip is bit-exact).
    """
    from safetensors.numpy import save_file

    flat = {k: np.asarray(v) for k, v in flatten(jax.device_get(nn.unbox(params))).items()}
    rules = vae_rules(config)
    known = {r[0] for r in rules}
    extra = [k for k in flat if k not in known]
    if extra:
        raise CheckpointMismatchError("<jax params>", unexpected=[(k, flat[k].shape) for k in extra])
    state = export_tensors(flat, rules, None if torch_dtype is None else numpy_dtype(torch_dtype))

    def write(tmp: Path):
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config.to_diffusers_config(), indent=2) + "\n")

    atomic_write_dir(out_dir, write, overwrite)
    return paths.user_path(out_dir) if paths.is_remote(out_dir) else Path(out_dir)
