"""OmniMamba's understanding tower: timm ViT state dicts <-> `models/vit.py` / `models/dinosiglip.py` parameters, and
the projector from the release (`projector.projector.{0,2,4}`); both directions, bit-exact (`convert/tensors.py`).

The release carries no vision tower (Prismatic builds it from timm, pretrained), so the two backbones come from timm
state dicts: `timm.create_model("vit_large_patch14_reg4_dinov2.lvd142m", pretrained=True, num_classes=0,
img_size=384).state_dict()` and the same for `vit_so400m_patch14_siglip_384`. Build the DINOv2 one at img_size=384:
its hub weights are for 518 px (37 x 37 positions) and timm resamples `pos_embed` to 27 x 27 while loading (bicubic,
antialiased), which is what OmniMamba ran; a 518 px `pos_embed` is reported as mis-shaped here.

Deliberately skipped (the tower reads the second-to-last block, `models/vit.py`): every tensor of the blocks after
`feature_layer` (DINOv2 `blocks.23.*`, SigLIP `blocks.26.*`), the final `norm.*`, SigLIP's MAP head `attn_pool.*`,
and any `fc_norm.*` / `head.*`. Everything else must be used, and every parameter filled, else one
`CheckpointMismatchError` names every bad tensor. Exports therefore hold the kept tensors only (load them into timm
with strict=False; the missing keys are exactly the skipped ones).
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import jax
import numpy as np

from janusflow_jax.convert.state_dicts import export_params, import_params
from janusflow_jax.convert.tensors import CheckpointMismatchError, Rule, conv_rules, layer_norm_rules, linear_rules
from janusflow_jax.models.dinosiglip import DinoSigLIPConfig, ProjectorConfig, projector_param_shapes
from janusflow_jax.models.vit import ViTConfig, vit_param_shapes

RELEASE_PROJECTOR_PREFIX = "projector.projector."


# ---------------------------------------------------------------------------------------------------------- rules
def vit_rules(cfg: ViTConfig, jax: str = "", torch: str = "") -> list[Rule]:
    """Every kept tensor of a timm VisionTransformer, in timm's state-dict order. `jax` is a path prefix ending
    in "/" (or empty), `torch` a key prefix ending in "." (or empty)."""
    rules = [(f"{jax}cls_token", f"{torch}cls_token", "identity")] if cfg.class_token else []
    rules += [(f"{jax}reg_token", f"{torch}reg_token", "identity")] if cfg.reg_tokens else []
    rules += [(f"{jax}pos_embed", f"{torch}pos_embed", "identity")]
    rules += conv_rules(f"{jax}patch_embed/proj", f"{torch}patch_embed.proj")
    for i in range(cfg.blocks_run):
        j, t = f"{jax}blocks_{i}", f"{torch}blocks.{i}"
        rules += layer_norm_rules(f"{j}/norm1", f"{t}.norm1")
        rules += linear_rules(f"{j}/attn/qkv", f"{t}.attn.qkv") + linear_rules(f"{j}/attn/proj", f"{t}.attn.proj")
        rules += [(f"{j}/ls1/gamma", f"{t}.ls1.gamma", "identity")] if cfg.layer_scale else []
        rules += layer_norm_rules(f"{j}/norm2", f"{t}.norm2")
        rules += linear_rules(f"{j}/mlp/fc1", f"{t}.mlp.fc1") + linear_rules(f"{j}/mlp/fc2", f"{t}.mlp.fc2")
        rules += [(f"{j}/ls2/gamma", f"{t}.ls2.gamma", "identity")] if cfg.layer_scale else []
    return rules


def vit_skipped(cfg: ViTConfig, torch: str = "") -> Callable[[str], bool]:
    """The timm keys this tower deliberately leaves out: later blocks, final norm, pooling and classifier heads."""
    pattern = re.compile(re.escape(torch) + r"(?:blocks\.(\d+)\.|norm\.|fc_norm\.|head\.|attn_pool\.)")

    def skipped(key: str) -> bool:
        m = pattern.match(key)
        return bool(m) and (m.group(1) is None or int(m.group(1)) >= cfg.blocks_run)

    return skipped


def projector_rules(jax: str = "", torch: str = RELEASE_PROJECTOR_PREFIX) -> list[Rule]:
    """Prismatic's FusedMLPProjector: nn.Sequential indices 0, 2, 4 (GELUs at 1, 3) -> fc1, fc2, fc3."""
    return [rule for ours, theirs in (("fc1", 0), ("fc2", 2), ("fc3", 4))
            for rule in linear_rules(f"{jax}{ours}", f"{torch}{theirs}")]


# ------------------------------------------------------------------------------------------------- scanned layout
def stack_blocks(params: Mapping, num_blocks: int) -> dict:
    """Per-layer (`blocks_{i}`) -> scanned (`blocks` with a leading layer axis), for `scan_layers=True` modules."""
    params = dict(params)
    layers = [params.pop(f"blocks_{i}") for i in range(num_blocks)]
    params["blocks"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
    return params


def unstack_blocks(params: Mapping, num_blocks: int) -> dict:
    """Scanned -> per-layer layout."""
    params = dict(params)
    stacked = params.pop("blocks")
    for i in range(num_blocks):
        params[f"blocks_{i}"] = jax.tree.map(lambda x: np.asarray(x)[i], stacked)
    return params


# ------------------------------------------------------------------------------------------------------- the ViTs
def vit_from_timm(state: Mapping, cfg: ViTConfig, param_dtype: str = "float32", prefix: str = "",
                  scan_layers: bool = False, source: str = "<timm state dict>") -> dict:
    """A timm VisionTransformer state dict (numpy or torch tensors; keys under `prefix`, e.g.
    "vision_backbone.dino_featurizer.") -> `VisionTransformer(cfg)` parameters. Keys outside `prefix` are ignored."""
    params = import_params(state, vit_rules(cfg), vit_param_shapes(cfg), param_dtype, source, prefix,
                           vit_skipped(cfg, prefix))
    return stack_blocks(params, cfg.blocks_run) if scan_layers else params


def vit_to_timm(cfg: ViTConfig, params, dtype: str | None = None, prefix: str = "") -> dict[str, np.ndarray]:
    """`VisionTransformer` parameters (either layout) -> the kept timm tensors {prefix + key: array}."""
    if "blocks" in params:
        params = unstack_blocks(params, cfg.blocks_run)
    return {prefix + k: v for k, v in export_params(params, vit_rules(cfg), dtype).items()}


def dinosiglip_from_timm(dino_state: Mapping, siglip_state: Mapping, cfg: DinoSigLIPConfig,
                         param_dtype: str = "float32", dino_prefix: str = "", siglip_prefix: str = "",
                         scan_layers: bool = False) -> dict:
    """The two timm backbones -> `DinoSigLIP(cfg)` parameters {"dino": ..., "siglip": ...}. Mismatches in both are
    reported together in one CheckpointMismatchError."""
    out, errors = {}, {}
    for name, state, sub, prefix in (("dino", dino_state, cfg.dino, dino_prefix),
                                     ("siglip", siglip_state, cfg.siglip, siglip_prefix)):
        try:
            out[name] = vit_from_timm(state, sub, param_dtype, prefix, scan_layers, source=f"<{name} state dict>")
        except CheckpointMismatchError as e:
            errors[name] = e
    if errors:
        bad = errors.values()
        raise CheckpointMismatchError(" and ".join(f"<{name} state dict>" for name in errors),
                                      [m for e in bad for m in e.missing], [u for e in bad for u in e.unexpected],
                                      [s for e in bad for s in e.mis_shaped])
    return out


def dinosiglip_to_timm(cfg: DinoSigLIPConfig, params, dtype: str | None = None) -> tuple[dict, dict]:
    """`DinoSigLIP` parameters -> (DINOv2 timm tensors, SigLIP timm tensors)."""
    return vit_to_timm(cfg.dino, params["dino"], dtype), vit_to_timm(cfg.siglip, params["siglip"], dtype)


# -------------------------------------------------------------------------------------------------- the projector
def projector_from_release(state: Mapping, cfg: ProjectorConfig, param_dtype: str = "float32",
                           prefix: str = RELEASE_PROJECTOR_PREFIX, source: str = "<OmniMamba state dict>") -> dict:
    """The release state dict (or any holding `{prefix}{0,2,4}.{weight,bias}`) -> `FusedGeluMLP(cfg)` parameters.
    Only keys under `prefix` are read; the rest of the release is left to the other tables."""
    return import_params(state, projector_rules(torch=""), projector_param_shapes(cfg), param_dtype, source, prefix)


def projector_to_release(params, dtype: str | None = None,
                         prefix: str = RELEASE_PROJECTOR_PREFIX) -> dict[str, np.ndarray]:
    return export_params(params, projector_rules(torch=prefix), dtype)
