"""LlamaGen's VQ-16 image tokenizer (`vq_ds16_t2i.pt`, OmniMamba's generation tokenizer; docs/reference.md §9.1) in
Flax Linen, channels-last.

Images [batch, 256, 256, 3] in [-1, 1] <-> codes [batch, 16, 16] in [0, 16384). Semantics of LlamaGen's
`tokenizer/tokenizer_image/vq_model.py` (the PyTorch twin is `reference/vq_torch.py`):
- Encoder: conv_in 3x3, then per level of `ch_mult` `num_res_blocks` ResnetBlocks (plus an AttnBlock after each at
  the last level) and a Downsample except at the last level; mid = resnet, attn, resnet; GroupNorm, swish, conv_out
  to `z_channels`. `quant_conv` (1x1) maps to the codebook dimension.
- Quantiser: z and the codebook rows are L2-normalised (F.normalize, eps 1e-12); code = argmin of
  |z|^2 + |e|^2 - 2 z.e; the quantised vector is the normalised codebook row.
- Decoder: `post_quant_conv` (1x1), conv_in, mid, then the levels in reverse with `num_res_blocks + 1` resnets each
  (attention at the lowest resolution) and an Upsample except at the last; GroupNorm, swish, conv_out.
- ResnetBlock: GN, swish, conv3x3, GN, swish, conv3x3, plus the input (1x1 `nin_shortcut` when channels change).
  AttnBlock: GN, 1x1 q/k/v convs, single-head softmax(q k^T / sqrt(C)) v, 1x1 `proj_out`, residual.
  Downsample: pad right/bottom by one, 3x3 stride-2 conv. Upsample: nearest x2, 3x3 conv.
  GroupNorm: 32 groups, eps 1e-6, statistics in fp32 (`models/vae.py`'s GroupNorm).
Module names mirror LlamaGen's keys (`encoder/conv_blocks_0/res_1/nin_shortcut`, `decoder/mid_1/proj_out`,
`quantize/embedding`), so `convert/vq.py` is a loop. Dropout is 0 in the release and omitted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from janusflow_jax.convert.tensors import flatten
from janusflow_jax.models.config import build_dataclass
from janusflow_jax.models.layers import dot_product_attention, logical_init
from janusflow_jax.models.vae import GroupNorm

# PyTorch's default conv init U(+-1/sqrt(fan_in)); converted checkpoints overwrite it.
_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_CONV_AXES = ("conv_height", "conv_width", "vae_in", "vae_out")  # replicated: absent from sharding.DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """LlamaGen `ModelArgs` for VQ-16; `ch`, `num_res_blocks`, `norm_groups` are LlamaGen's hard-coded 128, 2, 32."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    ch: int = 128
    num_res_blocks: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-6
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self):
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            object.__setattr__(self, name, tuple(int(m) for m in getattr(self, name)))
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError("encoder_ch_mult and decoder_ch_mult need the same number of levels (the same factor)")
        channels = {self.ch * m for m in self.encoder_ch_mult + self.decoder_ch_mult}
        bad = sorted(c for c in channels if c % self.norm_groups)
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_groups={self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        """Image side / code grid side (16 for VQ-16)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VQConfig":
        return build_dataclass(cls, values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "VQConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------------------- modules
def _conv(features: int, kernel: int, name: str, dtype, param_dtype, strides: int = 1,
          padding: int | None = None) -> nn.Conv:
    """A square conv; padding defaults to "same" for odd kernels (PyTorch's padding=kernel // 2)."""
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=[(pad, pad)] * 2, dtype=dtype,
                   param_dtype=param_dtype, kernel_init=logical_init(_KERNEL_INIT, _CONV_AXES),
                   bias_init=logical_init(nn.initializers.zeros_init(), ("vae_out",)), name=name)


def _codebook_init(key, shape, dtype=jnp.float32):
    """LlamaGen's U(-1/n, 1/n) (the forward normalises the rows)."""
    return jax.random.uniform(key, shape, dtype, -1.0 / shape[0], 1.0 / shape[0])


class _Layers(nn.Module):
    """Shared fields: the config and the compute / storage dtypes."""

    config: VQConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def conv(self, features: int, kernel: int, name: str, strides: int = 1, padding: int | None = None) -> nn.Conv:
        return _conv(features, kernel, name, self.dtype, self.param_dtype, strides, padding)

    def norm(self, name: str) -> GroupNorm:
        return GroupNorm(self.config.norm_groups, self.config.norm_eps, self.dtype, self.param_dtype, name=name)


class ResnetBlock(_Layers):
    out_channels: int = 0

    @nn.compact
    def __call__(self, x):
        h = self.conv(self.out_channels, 3, "conv1")(nn.silu(self.norm("norm1")(x)))
        h = self.conv(self.out_channels, 3, "conv2")(nn.silu(self.norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = self.conv(self.out_channels, 1, "nin_shortcut")(x)
        return x + h


class AttnBlock(_Layers):
    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        h = self.norm("norm")(x)
        q, k, v = (self.conv(c, 1, name)(h).reshape(b, height * width, 1, c) for name in ("q", "k", "v"))
        out = dot_product_attention(q, k, v)  # one head of width C: scale C^-0.5, softmax in fp32
        return x + self.conv(c, 1, "proj_out")(out.reshape(x.shape))


class Downsample(_Layers):
    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # LlamaGen's F.pad(x, (0, 1, 0, 1))
        return self.conv(x.shape[-1], 3, "conv", strides=2, padding=0)(x)


class Upsample(_Layers):
    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # F.interpolate(scale_factor=2, mode="nearest")
        return self.conv(x.shape[-1], 3, "conv")(x)


class ConvBlock(_Layers):
    """One level (`conv_blocks.{i}`): resnets `res_{j}`, each followed by `attn_{j}` when `attention`, then
    `downsample` or `upsample` when `resample` is set."""

    out_channels: int = 0
    num_res: int = 2
    attention: bool = False
    resample: str | None = None  # None | "downsample" | "upsample"

    @nn.compact
    def __call__(self, x):
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_res):
            x = ResnetBlock(out_channels=self.out_channels, name=f"res_{j}", **kw)(x)
            if self.attention:
                x = AttnBlock(name=f"attn_{j}", **kw)(x)
        if self.resample == "downsample":
            x = Downsample(name="downsample", **kw)(x)
        elif self.resample == "upsample":
            x = Upsample(name="upsample", **kw)(x)
        return x


class Encoder(_Layers):
    """[batch, H, W, in_channels] -> [batch, H/f, W/f, z_channels]."""

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
        mult, last = cfg.encoder_ch_mult, len(cfg.encoder_ch_mult) - 1
        x = self.conv(cfg.ch, 3, "conv_in")(x)
        for i, m in enumerate(mult):
            x = ConvBlock(out_channels=cfg.ch * m, num_res=cfg.num_res_blocks, attention=i == last,
                          resample=None if i == last else "downsample", name=f"conv_blocks_{i}", **kw)(x)
        x = _mid(x, kw)
        x = nn.silu(self.norm("norm_out")(x))
        return self.conv(cfg.z_channels, 3, "conv_out")(x)


class Decoder(_Layers):
    """[batch, h, w, z_channels] -> [batch, h*f, w*f, out_channels]."""

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
        mult = tuple(reversed(cfg.decoder_ch_mult))  # conv_blocks_0 is the lowest resolution
        x = self.conv(cfg.ch * mult[0], 3, "conv_in")(z)
        x = _mid(x, kw)
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            x = ConvBlock(out_channels=cfg.ch * m, num_res=cfg.num_res_blocks + 1, attention=i == 0,
                          resample=None if last else "upsample", name=f"conv_blocks_{i}", **kw)(x)
        x = nn.silu(self.norm("norm_out")(x))
        return self.conv(cfg.out_channels, 3, "conv_out")(x)


def _mid(x, kw):
    """The mid stack, called inside a compact parent so its modules are named mid_0, mid_1, mid_2."""
    x = ResnetBlock(out_channels=x.shape[-1], name="mid_0", **kw)(x)
    x = AttnBlock(name="mid_1", **kw)(x)
    return ResnetBlock(out_channels=x.shape[-1], name="mid_2", **kw)(x)


def l2_normalize(x, eps: float = 1e-12):
    """F.normalize(x, p=2, dim=-1): x / max(|x|, eps)."""
    return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), eps)


class VectorQuantizer(_Layers):
    """The codebook `embedding` [codebook_size, codebook_embed_dim] and its nearest-neighbour lookup."""

    def setup(self):
        cfg = self.config
        self.embedding = self.param("embedding", logical_init(_codebook_init, ("vq_codes", "vq_dim")),
                                    (cfg.codebook_size, cfg.codebook_embed_dim), self.param_dtype)

    def codebook(self):
        """The codebook as used: rows L2-normalised when `codebook_l2_norm`, fp32."""
        e = self.embedding.astype(jnp.float32)
        return l2_normalize(e) if self.config.codebook_l2_norm else e

    def __call__(self, z):
        """z [..., codebook_embed_dim] -> int32 codes [...] (argmin distance, LlamaGen's expansion of it)."""
        e = self.codebook()
        z = z.astype(jnp.float32)
        if self.config.codebook_l2_norm:
            z = l2_normalize(z)
        d = (jnp.sum(z * z, axis=-1, keepdims=True) + jnp.sum(e * e, axis=-1)
             - 2 * jnp.einsum("...d,nd->...n", z, e, precision=jax.lax.Precision.HIGHEST))
        return jnp.argmin(d, axis=-1).astype(jnp.int32)

    def lookup(self, codes):
        """int codes [...] -> quantised vectors [..., codebook_embed_dim] (fp32)."""
        return jnp.take(self.codebook(), codes, axis=0)


class VQModel(nn.Module):
    """`encode` images to codes, `decode_codes` codes to images; `encode_z` / `decode` expose the continuous side."""

    config: VQConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(**kw)
        self.decoder = Decoder(**kw)
        self.quantize = VectorQuantizer(**kw)
        self.quant_conv = _conv(cfg.codebook_embed_dim, 1, "quant_conv", self.dtype, self.param_dtype)
        self.post_quant_conv = _conv(cfg.z_channels, 1, "post_quant_conv", self.dtype, self.param_dtype)

    def encode_z(self, images):
        """images [batch, H, W, 3] in [-1, 1] -> z [batch, H/f, W/f, codebook_embed_dim] (fp32), before
        quantisation (after `quant_conv`, not normalised)."""
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != cfg.in_channels or images.shape[1] % cfg.downsample_factor \
                or images.shape[2] % cfg.downsample_factor:
            raise ValueError(f"encode expects [batch, H, W, {cfg.in_channels}] with H, W multiples of "
                             f"{cfg.downsample_factor}, got {images.shape}")
        return self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)

    def encode(self, images):
        """images [batch, H, W, 3] in [-1, 1] -> codes [batch, H/f, W/f] int32 (256 px -> 16 x 16)."""
        return self.quantize(self.encode_z(images))

    def decode(self, quant):
        """quantised vectors [batch, h, w, codebook_embed_dim] -> images [batch, h*f, w*f, 3] (fp32, roughly
        [-1, 1]; not clipped: OmniMamba clamps (x + 1) / 2 to [0, 1] afterwards)."""
        return self.decoder(self.post_quant_conv(quant.astype(self.dtype))).astype(jnp.float32)

    def decode_codes(self, codes):
        """codes [batch, h, w] -> images [batch, h*f, w*f, 3] (LlamaGen `decode_code`)."""
        if codes.ndim != 3:
            raise ValueError(f"decode_codes expects [batch, h, w] codes, got {codes.shape}")
        return self.decode(self.quantize.lookup(codes))

    def init_all(self):
        """Touches every parameter once, on the smallest valid input."""
        side = self.config.downsample_factor
        return self.decode_codes(self.encode(jnp.zeros((1, side, side, self.config.in_channels))))


def abstract_vq_params(config: VQConfig):
    model = VQModel(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), method=VQModel.init_all))["params"]


def vq_param_shapes(config: VQConfig) -> dict[str, tuple]:
    """{jax path: shape} of every parameter, without allocating."""
    return {k: tuple(v.shape) for k, v in flatten(nn.unbox(abstract_vq_params(config))).items()}


def init_vq_params(config: VQConfig, rng) -> dict:
    model = VQModel(config)
    return nn.unbox(jax.jit(lambda r: model.init(r, method=VQModel.init_all))(rng)["params"])
