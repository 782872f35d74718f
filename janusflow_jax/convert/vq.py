"""LlamaGen VQ state dicts <-> `models/vq.py` parameters, both directions, bit-exact (`convert/tensors.py`).

Sources: LlamaGen's `vq_ds16_t2i.pt` (a torch pickle whose "model" entry is the VQModel state dict: read it with
`load_llamagen_checkpoint`) or the OmniMamba release, which keeps the same keys under `llm_backbone.vqvae.`
(pass `prefix=RELEASE_VQ_PREFIX`; keys outside the prefix are left to the other tables). The key layout is
LlamaGen's (`reference/vq_torch.py` lists it). `quantize.codebook_used`, a training statistic that encoding and
decoding never read, is deliberately skipped; `vq_to_llamagen` writes it back as zeros (`codebook_used=True`) so an
export loads strictly into LlamaGen's VQModel. Every other tensor must be used and every parameter filled, else one
`CheckpointMismatchError` names every bad tensor.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from janusflow_jax.convert.state_dicts import export_params, import_params
from janusflow_jax.convert.tensors import Rule, conv_rules, layer_norm_rules
from janusflow_jax.models.vq import VQConfig, vq_param_shapes

RELEASE_VQ_PREFIX = "llm_backbone.vqvae."
CODEBOOK_USED = "quantize.codebook_used"
CODEBOOK_USED_SIZE = 65536  # LlamaGen's buffer length, whatever the codebook size


def _resnet_rules(j: str, t: str, shortcut: bool) -> list[Rule]:
    rules = layer_norm_rules(f"{j}/norm1", f"{t}.norm1") + conv_rules(f"{j}/conv1", f"{t}.conv1")
    rules += layer_norm_rules(f"{j}/norm2", f"{t}.norm2") + conv_rules(f"{j}/conv2", f"{t}.conv2")
    return rules + (conv_rules(f"{j}/nin_shortcut", f"{t}.nin_shortcut") if shortcut else [])


def _attn_rules(j: str, t: str) -> list[Rule]:
    rules = layer_norm_rules(f"{j}/norm", f"{t}.norm")  # GroupNorm: the same (scale, bias) <-> (weight, bias)
    for name in ("q", "k", "v", "proj_out"):
        rules += conv_rules(f"{j}/{name}", f"{t}.{name}")
    return rules


def _tower_rules(cfg: VQConfig, side: str) -> list[Rule]:
    """One side's tensors in LlamaGen's registration order (decoder: conv_in, mid, conv_blocks; encoder: conv_in,
    conv_blocks, mid), then norm_out, conv_out."""
    encoder = side == "encoder"
    mult = cfg.encoder_ch_mult if encoder else tuple(reversed(cfg.decoder_ch_mult))
    widths = [cfg.ch * m for m in mult]
    num_res = cfg.num_res_blocks + (0 if encoder else 1)
    attn_level = len(mult) - 1 if encoder else 0
    mid = []
    for k in range(3):
        j, t = f"{side}/mid_{k}", f"{side}.mid.{k}"
        mid += _attn_rules(j, t) if k == 1 else _resnet_rules(j, t, shortcut=False)
    levels = []
    previous = cfg.ch if encoder else widths[0]
    for i, width in enumerate(widths):
        j, t = f"{side}/conv_blocks_{i}", f"{side}.conv_blocks.{i}"
        for r in range(num_res):
            levels += _resnet_rules(f"{j}/res_{r}", f"{t}.res.{r}", shortcut=(previous if r == 0 else width) != width)
        if i == attn_level:
            for r in range(num_res):
                levels += _attn_rules(f"{j}/attn_{r}", f"{t}.attn.{r}")
        if i < len(widths) - 1:
            name = "downsample" if encoder else "upsample"
            levels += conv_rules(f"{j}/{name}/conv", f"{t}.{name}.conv")
        previous = width
    rules = conv_rules(f"{side}/conv_in", f"{side}.conv_in") + (levels + mid if encoder else mid + levels)
    return rules + layer_norm_rules(f"{side}/norm_out", f"{side}.norm_out") + conv_rules(f"{side}/conv_out",
                                                                                        f"{side}.conv_out")


def vq_rules(cfg: VQConfig, torch: str = "") -> list[Rule]:
    """Every tensor of a LlamaGen VQModel state dict except `quantize.codebook_used`, in its state-dict order."""
    rules = _tower_rules(cfg, "encoder") + _tower_rules(cfg, "decoder")
    rules += [("quantize/embedding", "quantize.embedding.weight", "identity")]
    rules += conv_rules("quant_conv", "quant_conv") + conv_rules("post_quant_conv", "post_quant_conv")
    return [(j, torch + t, f) for j, t, f in rules]


def load_llamagen_checkpoint(path: str | os.PathLike) -> Mapping:
    """A LlamaGen `.pt` ({"model": state dict, ...}) or a plain state-dict `.pt`/`.pth` -> the state dict (torch
    tensors). Loaded with `weights_only`, so pickled code is refused; LlamaGen's training script also pickles its
    argparse `args`, a plain attribute container, which is allowed."""
    import argparse

    import torch

    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return checkpoint["model"] if "model" in checkpoint and isinstance(checkpoint["model"], Mapping) else checkpoint


def vq_from_llamagen(state: Mapping, cfg: VQConfig = VQConfig(), param_dtype: str = "float32", prefix: str = "",
                     source: str = "<LlamaGen VQ state dict>") -> dict:
    """A LlamaGen VQModel state dict (numpy or torch tensors; keys under `prefix`) -> `VQModel(cfg)` parameters."""
    return import_params(state, vq_rules(cfg), vq_param_shapes(cfg), param_dtype, source, prefix,
                         lambda key: key == prefix + CODEBOOK_USED)


def vq_to_llamagen(cfg: VQConfig, params, dtype: str | None = None, prefix: str = "",
                   codebook_used: bool = True) -> dict[str, np.ndarray]:
    """`VQModel` parameters -> LlamaGen keys {prefix + key: array}; with `codebook_used`, the buffer as zeros."""
    state = {prefix + k: v for k, v in export_params(params, vq_rules(cfg), dtype).items()}
    if codebook_used:
        embedding = state[prefix + "quantize.embedding.weight"]
        state[prefix + CODEBOOK_USED] = np.zeros(CODEBOOK_USED_SIZE, embedding.dtype)
    return state
