"""SigLIP-L/16-384, the understanding encoder, as JanusFlow runs it (docs/reference.md §3).

timm VisionTransformer layout (names mirror timm: `patch_embed/proj`, `blocks_{i}/attn/qkv`, `norm`, `attn_pool`):
no class token, learned position embedding, pre-norm blocks with exact (erf) GELU, LayerNorm eps 1e-6, and the final
LayerNorm applied. The MAP pooling head `attn_pool` exists in the released weights but JanusFlow never calls it; it is
available here as `pool` for image-level features and kept so exports load strictly in PyTorch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from janusflow_jax.models.config import SigLIPConfig
from janusflow_jax.models.layers import DEFAULT_KERNEL_INIT, LayerNorm, dense, dot_product_attention, logical_init, maybe_remat


class Mlp(nn.Module):
    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.hidden, ("vit_embed", "vit_mlp"), name="fc1", **kw)(x)
        h = nn.gelu(h, approximate=False)
        return dense(x.shape[-1], ("vit_mlp", "vit_embed"), name="fc2", **kw)(h)


class Attention(nn.Module):
    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # layers.dot_product_attention implementation

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        # qkv rows are [q; k; v], each head-major (timm reshape (B, N, 3, heads, head_dim)). The fused output axis
        # is not split by tensor parallelism: a contiguous split would not fall on head boundaries.
        qkv = dense(3 * d, ("vit_embed", "vit_qkv"), name="qkv", **kw)(x).reshape(b, n, 3, self.num_heads, -1)
        out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=self.attention)
        return dense(d, ("vit_heads", "vit_embed"), name="proj", **kw)(out.reshape(b, n, d))


class Block(nn.Module):
    config: SigLIPConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, _=None):
        cfg = self.config
        ln = dict(eps=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, axis_name="vit_norm")
        attn = Attention(cfg.num_heads, self.dtype, self.param_dtype, self.attention, name="attn")
        x = x + attn(LayerNorm(**ln, name="norm1")(x))
        x = x + Mlp(cfg.mlp_dim, self.dtype, self.param_dtype, name="mlp")(LayerNorm(**ln, name="norm2")(x))
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, None


class MAPHead(nn.Module):
    """timm AttentionPoolLatent (one latent query, multi-head cross-attention, residual MLP); pool='token'."""

    config: SigLIPConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        b, n, d = x.shape
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        latent = self.param("latent", logical_init(DEFAULT_KERNEL_INIT, (None, None, "vit_embed")), (1, 1, d),
                            self.param_dtype)
        q = dense(d, ("vit_embed", "vit_heads"), name="q", **kw)(jnp.broadcast_to(latent, (b, 1, d)).astype(self.dtype))
        kv = dense(2 * d, ("vit_embed", "vit_qkv"), name="kv", **kw)(x).reshape(b, n, 2, cfg.num_heads, -1)
        out = dot_product_attention(q.reshape(b, 1, cfg.num_heads, -1), kv[:, :, 0], kv[:, :, 1])
        out = dense(d, ("vit_heads", "vit_embed"), name="proj", **kw)(out.reshape(b, 1, d))
        norm = LayerNorm(cfg.layer_norm_eps, self.dtype, self.param_dtype, axis_name="vit_norm", name="norm")
        out = out + Mlp(cfg.mlp_dim, self.dtype, self.param_dtype, name="mlp")(norm(out))
        return out[:, 0]


class SigLIPViT(nn.Module):
    """[batch, image, image, 3] normalised pixels -> [batch, num_patches, width] (final LayerNorm applied)."""

    config: SigLIPConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "auto"  # "auto" | "xla" | "cudnn" | "splash" (layers.dot_product_attention)

    def setup(self):
        cfg = self.config
        self.patch_embed = PatchEmbed(cfg, self.dtype, self.param_dtype)
        self.pos_embed = self.param("pos_embed", logical_init(DEFAULT_KERNEL_INIT, (None, None, "vit_embed")),
                                    (1, cfg.num_patches, cfg.width), self.param_dtype)
        block_cls = maybe_remat(Block, self.remat_policy)
        if self.scan_layers:
            self.blocks = nn.scan(
                block_cls, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.dtype, self.param_dtype, self.attention)
        else:
            self.blocks = [block_cls(cfg, self.dtype, self.param_dtype, self.attention) for _ in range(cfg.depth)]
        self.norm = LayerNorm(cfg.layer_norm_eps, self.dtype, self.param_dtype, axis_name="vit_norm")
        if cfg.attn_pool:
            self.attn_pool = MAPHead(cfg, self.dtype, self.param_dtype)

    def __call__(self, pixels):
        cfg = self.config
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"SigLIP expects [batch, {cfg.image_size}, {cfg.image_size}, 3], got {pixels.shape}")
        x = self.patch_embed(pixels) + self.pos_embed.astype(self.dtype)
        if self.scan_layers:
            x, _ = self.blocks(x, None)
        else:
            for block in self.blocks:
                x, _ = block(x)
        x = self.norm(x)
        if cfg.attn_pool and self.is_initializing():
            self.attn_pool(x)  # create the (unused by JanusFlow) pooling head's parameters
        return x

    def pool(self, features):
        """MAP-pooled image embedding [batch, width] from `__call__`'s output (not used by JanusFlow)."""
        return self.attn_pool(features)


class PatchEmbed(nn.Module):
    config: SigLIPConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        p = cfg.patch_size
        proj = nn.Conv(
            cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=logical_init(DEFAULT_KERNEL_INIT, ("conv_height", "conv_width", "conv_in", "vit_embed")),
            bias_init=logical_init(nn.initializers.zeros_init(), ("vit_embed",)), name="proj")
        x = proj(pixels.astype(self.dtype))
        return x.reshape(x.shape[0], -1, cfg.width)  # row-major (h, w), as timm's flatten(2)
