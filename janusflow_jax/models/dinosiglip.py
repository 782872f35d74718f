"""OmniMamba's understanding tower (docs/reference.md §9.1): Cobra/Prismatic "dinosiglip-vit-so-384px" and the
"fused-gelu-mlp" projector into the language model.

Input. Prismatic's "resize-naive" transform resizes the RGB image to 384 x 384 (bicubic, no crop; the data
pipeline's job), converts it to [0, 1] (ToTensor) and then normalises it twice, once per backbone with that
backbone's own timm mean/std: DINOv2 with ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), SigLIP with
0.5 / 0.5. `DinoSigLIP` takes the [0, 1] image, channels-last, and applies both normalisations itself, so one array
feeds both backbones.

Output. Each backbone gives the patch tokens of its second-to-last block (27 x 27 = 729, row-major, no prefix tokens,
no final norm, `models/vit.py`); they are concatenated on channels, DINOv2 first: [batch, 729, 1024 + 1152 = 2176].
`FusedGeluMLP` maps them to the LLM width: Linear 2176 -> 8704, GELU, Linear 8704 -> 2048, GELU, Linear 2048 -> 2048
(exact GELU, all with bias; Prismatic's FusedMLPProjector, the release's `projector.projector.{0,2,4}`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from janusflow_jax.convert.tensors import flatten
from janusflow_jax.models.config import build_dataclass
from janusflow_jax.models.layers import dense
from janusflow_jax.models.vit import DINOV2_L_REG4_384, SIGLIP_SO400M_384, ViTConfig, VisionTransformer


@dataclasses.dataclass(frozen=True)
class DinoSigLIPConfig:
    dino: ViTConfig = DINOV2_L_REG4_384
    siglip: ViTConfig = SIGLIP_SO400M_384

    def __post_init__(self):
        if self.dino.image_size != self.siglip.image_size:
            raise ValueError(f"both backbones read the same image: image_size {self.dino.image_size} != "
                             f"{self.siglip.image_size}")
        if self.dino.num_patches != self.siglip.num_patches:
            raise ValueError(f"patch counts differ ({self.dino.num_patches} vs {self.siglip.num_patches}): the "
                             f"tokens cannot be concatenated on channels")

    @property
    def image_size(self) -> int:
        return self.dino.image_size

    @property
    def num_patches(self) -> int:
        return self.dino.num_patches

    @property
    def width(self) -> int:
        """Channels of the fused tokens: 1024 + 1152 = 2176."""
        return self.dino.width + self.siglip.width

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DinoSigLIPConfig":
        values = dict(values)
        for key in ("dino", "siglip"):
            if key in values and not isinstance(values[key], ViTConfig):
                values[key] = ViTConfig.from_dict(values[key])
        return build_dataclass(cls, values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Prismatic "fused-gelu-mlp": vision_dim -> 4 * vision_dim -> llm_dim -> llm_dim."""

    vision_dim: int = 2176
    llm_dim: int = 2048

    @property
    def hidden_dim(self) -> int:
        return 4 * self.vision_dim


def normalize(images, mean, std, dtype):
    """(images - mean) / std per RGB channel, in fp32 (torchvision's Normalize on a float image)."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


class DinoSigLIP(nn.Module):
    """[batch, 384, 384, 3] RGB in [0, 1] (resized, not normalised) -> [batch, 729, 2176] fused patch tokens."""

    config: DinoSigLIPConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "auto"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, scan_layers=self.scan_layers,
                  remat_policy=self.remat_policy, attention=self.attention)
        self.dino = VisionTransformer(self.config.dino, **kw)
        self.siglip = VisionTransformer(self.config.siglip, **kw)

    def __call__(self, images):
        cfg = self.config
        dino = self.dino(normalize(images, cfg.dino.mean, cfg.dino.std, self.dtype))
        siglip = self.siglip(normalize(images, cfg.siglip.mean, cfg.siglip.std, self.dtype))
        return jnp.concatenate([dino, siglip], axis=-1)


class FusedGeluMLP(nn.Module):
    """[..., vision_dim] -> [..., llm_dim]: fc1, GELU, fc2, GELU, fc3 (torch indices 0, 2, 4)."""

    config: ProjectorConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        if x.shape[-1] != cfg.vision_dim:
            raise ValueError(f"projector expects [..., {cfg.vision_dim}], got {x.shape}")
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.gelu(dense(cfg.hidden_dim, ("vit_embed", "mlp"), name="fc1", **kw)(x), approximate=False)
        x = nn.gelu(dense(cfg.llm_dim, ("mlp", "embed"), name="fc2", **kw)(x), approximate=False)
        # in and out are both the LLM width: the input axis gets "mlp" so one kernel never names fsdp twice
        return dense(cfg.llm_dim, ("mlp", "embed"), name="fc3", **kw)(x)


def dinosiglip_param_shapes(config: DinoSigLIPConfig) -> dict[str, tuple]:
    """{jax path: shape} of every DinoSigLIP parameter (per-layer layout), without allocating."""
    side = config.image_size
    example = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: DinoSigLIP(config).init(jax.random.key(0), x), example)["params"]
    return {k: tuple(v.shape) for k, v in flatten(nn.unbox(abstract)).items()}


def projector_param_shapes(config: ProjectorConfig) -> dict[str, tuple]:
    example = jax.ShapeDtypeStruct((1, config.vision_dim), jnp.float32)
    abstract = jax.eval_shape(lambda x: FusedGeluMLP(config).init(jax.random.key(0), x), example)["params"]
    return {k: tuple(v.shape) for k, v in flatten(nn.unbox(abstract)).items()}
