"""The SDXL-VAE (diffusers `AutoencoderKL`, docs/reference.md §8) in Flax Linen, channels-last.

JanusFlow's generation path works on this VAE's latents: images [batch, 384, 384, 3] in [-1, 1] become latents
[batch, 48, 48, 4]. Module and parameter names mirror diffusers (`encoder/down_blocks_0/resnets_1/conv2`,
`decoder/mid_block/attentions_0/to_out_0`, ...), so its conversion table (`convert/vae.py`) is a short loop. `encode` and `decode`
work in the VAE's own UNSCALED latent space; callers multiply by `scaling_factor` (0.13025) after encoding and divide
before decoding, as the JanusFlow demo does.

Exact diffusers semantics kept: GroupNorm(eps 1e-6) statistics in fp32 with the biased variance; downsampling pads
(0, 1, 0, 1) then applies a 3x3 stride-2 convolution without padding; upsampling is nearest x2 then a 3x3 convolution;
the mid block runs resnet -> single-head self-attention (GroupNorm, q/k/v Linear, softmax(q k^T / sqrt(C)) v, to_out,
+ residual) -> resnet; a 1x1 `conv_shortcut` appears wherever a resnet changes the channel count; logvar is clamped to
[-30, 20]. Float16 is refused: this VAE overflows in fp16 (hence "sdxl-vae-fp16-fix"); bf16 and fp32 are fine.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from janusflow_jax.convert.tensors import flatten
from janusflow_jax.models.config import Dtypes, build_dataclass
from janusflow_jax.models.layers import dot_product_attention, logical_init

# diffusers `get_activation` (exact GELU, as torch.nn.GELU()).
ACTIVATIONS: dict[str, Callable] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}



# ----------------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class VAEConfig(Dtypes):
    """AutoencoderKL hyper-parameters; the defaults are stabilityai/sdxl-vae's config.json (docs/reference.md §8)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6  # hard-coded in diffusers' Encoder/Decoder, not part of its config.json
    act_fn: str = "silu"
    # Latent normalisation for callers: z_model = (z_vae - shift_factor) * scaling_factor. Not applied here.
    scaling_factor: float = 0.13025
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # Carried through for export only (diffusers uses them for tiling and in pipelines); the forward ignores them.
    sample_size: int | tuple[int, ...] = 1024
    force_upcast: bool = True
    # Compute dtype and storage dtype: "float32" or "bfloat16".
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        for field in ("dtype", "param_dtype"):
            name = jnp.dtype(getattr(self, field)).name
            if name == "float16":
                raise ValueError(f"VAEConfig.{field}=float16 is not supported: the SDXL-VAE overflows in fp16 "
                                 f"(use bfloat16 or float32)")
            if name not in ("float32", "bfloat16"):
                raise ValueError(f"VAEConfig.{field}={getattr(self, field)!r}: only float32 or bfloat16")
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels is empty")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn {self.act_fn!r} not in {sorted(ACTIVATIONS)}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block} must be >= 1")

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (8 for SDXL)."""
        return 2 ** (len(self.block_out_channels) - 1)


    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VAEConfig":
        return build_dataclass(cls, values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "VAEConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_diffusers_config(cls, raw: Mapping[str, Any], **overrides) -> "VAEConfig":
        """A diffusers AutoencoderKL config.json dict -> VAEConfig (missing keys take diffusers' own defaults).

        `overrides` sets fields diffusers does not store (dtype, param_dtype, norm_eps).
        """
        raw = dict(raw)
        if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"not an AutoencoderKL config: _class_name={raw['_class_name']!r}")
        values = {k: v for k, v in raw.items() if not k.startswith("_")}
        unknown = sorted(set(values) - set(_DIFFUSERS_DEFAULTS))
        if unknown:
            raise ValueError(f"unsupported AutoencoderKL config keys {unknown}")
        values = {**_DIFFUSERS_DEFAULTS, **values}
        channels = tuple(values.pop("block_out_channels"))
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(values.pop(key))
            if types != [block] * len(channels):
                raise ValueError(f"{key}={types}: only {len(channels)} x {block!r} (one per block_out_channels entry) "
                                 f"is supported")
        for key in ("latents_mean", "latents_std"):
            if values.pop(key) is not None:
                raise ValueError(f"{key} is not supported (only scaling_factor / shift_factor normalisation)")
        return cls(block_out_channels=channels, **values, **overrides)

    def to_diffusers_config(self) -> dict:
        """VAEConfig -> a diffusers AutoencoderKL config.json dict (`AutoencoderKL.from_pretrained` reads it)."""
        if self.norm_eps != 1e-6:
            raise ValueError(f"norm_eps={self.norm_eps} cannot be expressed in a diffusers config (fixed at 1e-6)")
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.42.1",  # the layout this file was checked against
            "act_fn": self.act_fn,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "force_upcast": self.force_upcast,
            "in_channels": self.in_channels,
            "latent_channels": self.latent_channels,
            "latents_mean": None,
            "latents_std": None,
            "layers_per_block": self.layers_per_block,
            "mid_block_add_attention": self.mid_block_add_attention,
            "norm_num_groups": self.norm_num_groups,
            "out_channels": self.out_channels,
            "sample_size": list(self.sample_size) if isinstance(self.sample_size, tuple) else self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "use_post_quant_conv": self.use_post_quant_conv,
            "use_quant_conv": self.use_quant_conv,
        }


# diffusers 0.42 AutoencoderKL.__init__ defaults (a config.json may omit any of them).
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=32, scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
    force_upcast=True, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)


# ---------------------------------------------------------------------------------------------------------- modules
# PyTorch's default Conv2d/Linear weight init (kaiming_uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in))); only used
# for fresh random weights, converted checkpoints overwrite it.
_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_CONV_AXES = ("conv_height", "conv_width", "vae_in", "vae_out")  # all replicated by sharding.DEFAULT_RULES


def _conv2d(features: int, kernel: int, padding: int, cfg: VAEConfig, name: str, strides: int = 1) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=[(padding, padding)] * 2,
                   dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                   kernel_init=logical_init(_KERNEL_INIT, _CONV_AXES),
                   bias_init=logical_init(nn.initializers.zeros_init(), ("vae_out",)), name=name)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the channel axis of [batch, height, width, channels]; statistics in fp32."""

    num_groups: int
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param("scale", logical_init(nn.initializers.ones_init(), ("norm",)), (channels,),
                           self.param_dtype)
        bias = self.param("bias", logical_init(nn.initializers.zeros_init(), ("norm",)), (channels,),
                          self.param_dtype)
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, channels // self.num_groups)
        axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)  # spatial dims + channels within a group
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        centred = grouped - mean
        var = jnp.mean(centred * centred, axis=axes, keepdims=True)  # two-pass, biased, as PyTorch
        y = (centred * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def _group_norm(cfg: VAEConfig, name: str) -> GroupNorm:
    return GroupNorm(cfg.norm_num_groups, cfg.norm_eps, cfg.compute_dtype, cfg.storage_dtype, name=name)


class ResnetBlock2D(nn.Module):
    """GN -> act -> conv3x3 -> GN -> act -> conv3x3, plus the input (through a 1x1 conv when channels change)."""

    config: VAEConfig
    out_channels: int

    @nn.compact
    def __call__(self, x):
        cfg, act = self.config, ACTIVATIONS[self.config.act_fn]
        h = _conv2d(self.out_channels, 3, 1, cfg, "conv1")(act(_group_norm(cfg, "norm1")(x)))
        h = _conv2d(self.out_channels, 3, 1, cfg, "conv2")(act(_group_norm(cfg, "norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv2d(self.out_channels, 1, 0, cfg, "conv_shortcut")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions, with GroupNorm in front and the residual added back."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        batch, height, width, channels = x.shape
        h = _group_norm(cfg, "group_norm")(x).reshape(batch, height * width, 1, channels)

        def linear(name):
            return nn.Dense(channels, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                            kernel_init=logical_init(_KERNEL_INIT, ("vae_in", "vae_out")),
                            bias_init=logical_init(nn.initializers.zeros_init(), ("vae_out",)), name=name)

        # One head of width C (diffusers: heads = C // attention_head_dim = 1), so the scale is 1/sqrt(C).
        out = dot_product_attention(linear("to_q")(h), linear("to_k")(h), linear("to_v")(h))
        out = linear("to_out_0")(out.reshape(batch, height * width, channels))
        return out.reshape(x.shape) + x


class MidBlock(nn.Module):
    """UNetMidBlock2D: resnet -> attention -> resnet at the lowest resolution."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        channels = cfg.block_out_channels[-1]
        x = ResnetBlock2D(cfg, channels, name="resnets_0")(x)
        if cfg.mid_block_add_attention:
            x = AttentionBlock(cfg, name="attentions_0")(x)
        return ResnetBlock2D(cfg, channels, name="resnets_1")(x)


class Downsample2D(nn.Module):
    """Pad right/bottom by one, then a 3x3 stride-2 convolution (diffusers' asymmetric padding for even sizes)."""

    config: VAEConfig
    channels: int

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv2d(self.channels, 3, 0, self.config, "conv", strides=2)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    config: VAEConfig
    channels: int

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv2d(self.channels, 3, 1, self.config, "conv")(x)


class DownEncoderBlock2D(nn.Module):
    """`layers_per_block` resnets (the first may change channels), then a stride-2 downsample unless last."""

    config: VAEConfig
    out_channels: int
    add_downsample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.config.layers_per_block):
            x = ResnetBlock2D(self.config, self.out_channels, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.config, self.out_channels, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`layers_per_block + 1` resnets (the first may change channels), then a x2 upsample unless last."""

    config: VAEConfig
    out_channels: int
    add_upsample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.config.layers_per_block + 1):
            x = ResnetBlock2D(self.config, self.out_channels, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.config, self.out_channels, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """[batch, H, W, in_channels] -> [batch, H/f, W/f, 2 * latent_channels] (f = config.downsample_factor)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        channels = cfg.block_out_channels
        x = _conv2d(channels[0], 3, 1, cfg, "conv_in")(x)
        for i, ch in enumerate(channels):
            x = DownEncoderBlock2D(cfg, ch, add_downsample=i < len(channels) - 1, name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg, name="mid_block")(x)
        x = ACTIVATIONS[cfg.act_fn](_group_norm(cfg, "conv_norm_out")(x))
        return _conv2d(2 * cfg.latent_channels, 3, 1, cfg, "conv_out")(x)


class Decoder(nn.Module):
    """[batch, h, w, latent_channels] -> [batch, h*f, w*f, out_channels]."""

    config: VAEConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        channels = tuple(reversed(cfg.block_out_channels))
        x = _conv2d(channels[0], 3, 1, cfg, "conv_in")(z)
        x = MidBlock(cfg, name="mid_block")(x)
        for i, ch in enumerate(channels):
            x = UpDecoderBlock2D(cfg, ch, add_upsample=i < len(channels) - 1, name=f"up_blocks_{i}")(x)
        x = ACTIVATIONS[cfg.act_fn](_group_norm(cfg, "conv_norm_out")(x))
        return _conv2d(cfg.out_channels, 3, 1, cfg, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """The KL autoencoder: `encode` images to the posterior (mean, logvar), `decode` latents to images."""

    config: VAEConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = _conv2d(2 * cfg.latent_channels, 1, 0, cfg, "quant_conv")
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv2d(cfg.latent_channels, 1, 0, cfg, "post_quant_conv")

    def encode(self, images):
        """images [batch, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [batch, H/8, W/8, latent_channels].

        Unscaled latents, returned in fp32; logvar is clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution.
        """
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
            raise ValueError(f"encode expects [batch, height, width, {cfg.in_channels}], got {images.shape}")
        moments = self.encoder(images.astype(cfg.compute_dtype))
        if cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """latents [batch, h, w, latent_channels] (unscaled) -> images [batch, 8h, 8w, out_channels] in fp32."""
        cfg = self.config
        if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
            raise ValueError(f"decode expects [batch, height, width, {cfg.latent_channels}], got {latents.shape}")
        z = latents.astype(cfg.compute_dtype)
        if cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def init_all(self):
        """Touches every parameter once, on the smallest valid input."""
        side = self.config.downsample_factor
        mean, _ = self.encode(jnp.zeros((1, side, side, self.config.in_channels)))
        return self.decode(mean)


def sample_posterior(rng, mean, logvar):
    """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * eps (diffusers `latent_dist.sample`)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def abstract_vae_params(config: VAEConfig):
    """Shapes, dtypes and logical axes of every parameter (boxed), without allocating."""
    model = AutoencoderKL(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), method=AutoencoderKL.init_all))["params"]


def vae_param_shapes(config: VAEConfig) -> dict[str, tuple]:
    """{jax path: shape} of every parameter."""
    return {k: tuple(v.shape) for k, v in flatten(nn.unbox(abstract_vae_params(config))).items()}


def init_vae_params(config: VAEConfig, rng) -> dict:
    """Freshly initialised parameters (plain arrays of `config.param_dtype`)."""
    model = AutoencoderKL(config)
    return nn.unbox(jax.jit(lambda r: model.init(r, method=AutoencoderKL.init_all))(rng)["params"])
