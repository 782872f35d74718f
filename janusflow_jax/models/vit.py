"""A timm-layout ViT read at an intermediate block: the two backbones of OmniMamba's understanding tower
(docs/reference.md §9.1, Cobra/Prismatic "dinosiglip-vit-so-384px").

timm builds both as `VisionTransformer`: a patch conv, a learned position embedding over the patches only
(`no_embed_class`: class and register tokens are prepended after it is added), pre-norm blocks (LayerNorm eps 1e-6,
exact GELU, fused qkv with bias) with optional LayerScale (`ls1`/`ls2`, DINOv2). Prismatic replaces their forward by
`get_intermediate_layers(n={len(blocks) - 2})`: the output of the SECOND-TO-LAST block, prefix tokens dropped, no
final norm. So this module builds only the blocks that run (`config.blocks_run`); the last block, the final `norm`,
SigLIP's MAP head `attn_pool` and any classifier are never created (`convert/dinosiglip.py` skips their tensors).

Parameter names mirror timm (`patch_embed/proj`, `cls_token`, `reg_token`, `pos_embed`, `blocks_{i}/attn/qkv`,
`blocks_{i}/ls1/gamma`), so the conversion table is a short loop. Attention, MLP and patch embedding are those of
`models/siglip.py` (JanusFlow's SigLIP): `ViTConfig` keeps SigLIPConfig's field names so they serve both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from janusflow_jax.convert.tensors import flatten
from janusflow_jax.models.config import build_dataclass
from janusflow_jax.models.layers import DEFAULT_KERNEL_INIT, LayerNorm, logical_init, maybe_remat
from janusflow_jax.models.siglip import Attention, Mlp, PatchEmbed

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm IMAGENET_DEFAULT_MEAN / _STD: DINOv2's data config
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)  # timm IMAGENET_INCEPTION_MEAN / _STD: SigLIP's data config
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """One timm VisionTransformer as Prismatic reads it. Defaults: `vit_large_patch14_reg4_dinov2.lvd142m` at 384 px;
    `SIGLIP_SO400M_384` below is the other backbone."""

    image_size: int = 384
    patch_size: int = 14
    width: int = 1024
    depth: int = 24  # the checkpoint's block count (timm's); only `blocks_run` of them are built
    num_heads: int = 16
    mlp_dim: int = 4096  # timm: int(width * mlp_ratio)
    layer_norm_eps: float = 1e-6
    class_token: bool = True
    reg_tokens: int = 4
    layer_scale: bool = True  # DINOv2's LayerScale (timm init_values 1e-5) after attention and MLP
    # The block whose output is returned, indexed like timm's `blocks` (negative from the end): -2 is Prismatic's
    # get_intermediate_layers(n={len(blocks) - 2}).
    feature_layer: int = -2
    # The backbone's own pixel normalisation (timm data config), applied by `DinoSigLIP` to [0, 1] images.
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    model_name: str = "vit_large_patch14_reg4_dinov2.lvd142m"  # timm name, for messages only

    def __post_init__(self):
        for name in ("mean", "std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not a multiple of num_heads={self.num_heads}")
        if not -self.depth <= self.feature_layer < self.depth:
            raise ValueError(f"feature_layer={self.feature_layer} outside [-{self.depth}, {self.depth})")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size={self.image_size} is smaller than patch_size={self.patch_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per RGB channel")

    @property
    def grid_size(self) -> int:
        """Patches per side; a remainder of pixels is dropped by the stride-p convolution (384 px / 14 -> 27)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def blocks_run(self) -> int:
        """Blocks built and run: up to and including `feature_layer`."""
        return self.feature_layer % self.depth + 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ViTConfig":
        return build_dataclass(cls, values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)


DINOV2_L_REG4_384 = ViTConfig()
# timm `vit_so400m_patch14_siglip_384` (exact GELU; mlp int(1152 * 3.7362) = 4304; no class token; MAP head unused).
SIGLIP_SO400M_384 = ViTConfig(width=1152, depth=27, num_heads=16, mlp_dim=4304, class_token=False, reg_tokens=0,
                              layer_scale=False, mean=INCEPTION_MEAN, std=INCEPTION_STD,
                              model_name="vit_so400m_patch14_siglip_384")


class LayerScale(nn.Module):
    """timm LayerScale: x * gamma, one learned scale per channel."""

    init_value: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", logical_init(nn.initializers.constant(self.init_value), ("vit_norm",)),
                           (x.shape[-1],), self.param_dtype)
        return x * gamma.astype(self.dtype)


class Block(nn.Module):
    """timm `Block`: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))) (LayerScale only when configured)."""

    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, _=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = dict(eps=cfg.layer_norm_eps, axis_name="vit_norm", **kw)
        h = Attention(cfg.num_heads, attention=self.attention, name="attn", **kw)(LayerNorm(**ln, name="norm1")(x))
        x = x + (LayerScale(name="ls1", **kw)(h) if cfg.layer_scale else h)
        h = Mlp(cfg.mlp_dim, name="mlp", **kw)(LayerNorm(**ln, name="norm2")(x))
        x = x + (LayerScale(name="ls2", **kw)(h) if cfg.layer_scale else h)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, None


class VisionTransformer(nn.Module):
    """Normalised pixels [batch, image, image, 3] -> patch tokens of block `feature_layer`
    [batch, num_patches, width] (row-major patches; prefix tokens dropped; no final norm)."""

    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "auto"  # layers.dot_product_attention implementation

    def setup(self):
        cfg = self.config
        init = logical_init(DEFAULT_KERNEL_INIT, (None, None, "vit_embed"))
        self.patch_embed = PatchEmbed(cfg, self.dtype, self.param_dtype)
        self.pos_embed = self.param("pos_embed", init, (1, cfg.num_patches, cfg.width), self.param_dtype)
        if cfg.class_token:
            self.cls_token = self.param("cls_token", init, (1, 1, cfg.width), self.param_dtype)
        if cfg.reg_tokens:
            self.reg_token = self.param("reg_token", init, (1, cfg.reg_tokens, cfg.width), self.param_dtype)
        block_cls = maybe_remat(Block, self.remat_policy)
        if self.scan_layers:
            self.blocks = nn.scan(
                block_cls, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.blocks_run,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.dtype, self.param_dtype, self.attention)
        else:
            self.blocks = [block_cls(cfg, self.dtype, self.param_dtype, self.attention) for _ in range(cfg.blocks_run)]

    def __call__(self, pixels):
        cfg = self.config
        if pixels.ndim != 4 or pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"{cfg.model_name} expects [batch, {cfg.image_size}, {cfg.image_size}, 3], "
                             f"got {pixels.shape}")
        x = self.patch_embed(pixels) + self.pos_embed.astype(self.dtype)
        prefix = ([self.cls_token] if cfg.class_token else []) + ([self.reg_token] if cfg.reg_tokens else [])
        if prefix:  # [cls, registers, patches], as timm's _pos_embed with no_embed_class
            prefix = jnp.concatenate(prefix, axis=1).astype(self.dtype)
            x = jnp.concatenate([jnp.broadcast_to(prefix, (x.shape[0], *prefix.shape[1:])), x], axis=1)
        if self.scan_layers:
            x, _ = self.blocks(x, None)
        else:
            for block in self.blocks:
                x, _ = block(x)
        return x[:, cfg.num_prefix_tokens:]


def abstract_vit_params(config: ViTConfig, scan_layers: bool = False):
    """Boxed shapes, dtypes and logical axes of every parameter, without allocating."""
    model = VisionTransformer(config, scan_layers=scan_layers)
    example = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), example)["params"]


def vit_param_shapes(config: ViTConfig) -> dict[str, tuple]:
    """{jax path: shape} of every parameter in the per-layer layout."""
    return {k: tuple(v.shape) for k, v in flatten(nn.unbox(abstract_vit_params(config))).items()}
