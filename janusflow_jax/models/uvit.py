"""ShallowUViT generation encoder/decoder (docs/reference.md §4), channels-last.

Names mirror the released `uvit.py` (`time_embed/linear_1`, `in_conv`, `mid_block/res_blocks_{j}/depthwise`, ...).
Quirks kept on purpose: the time sinusoid is cos-first with frequency divisor C/2 (diffusers Timesteps with
flip_sin_to_cos=True, shift 0) on t in the 0..1000 scale; FiLM modulates the block *output* after the residual add
(scale first, shift second, SiLU on t_emb before the mapper); GRN uses eps 1e-6 outside the channel mean.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from janusflow_jax.models.config import GenDecoderConfig, GenEncoderConfig
from janusflow_jax.models.layers import DEFAULT_KERNEL_INIT, RMSNorm, dense, logical_init, target_platform


def timestep_sinusoid(timesteps, dim: int, max_period: float = 10000.0):
    """[batch] -> [batch, dim]: concat[cos(t f_k), sin(t f_k)], f_k = exp(-ln(max_period) k / (dim/2)), in fp32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoid (diffusers TimestepEmbedding)."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sinusoid):
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.features, ("gen_channels", "embed"), name="linear_1", **kw)(sinusoid)
        return dense(self.features, ("embed", "embed_out"), name="linear_2", **kw)(nn.silu(h))


def _conv(features, kernel, *, strides=1, padding=0, use_bias=True, dtype, param_dtype, name):
    return nn.Conv(
        features, (kernel, kernel), strides=(strides, strides), padding=[(padding, padding)] * 2,
        use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=logical_init(DEFAULT_KERNEL_INIT, ("conv_height", "conv_width", "gen_channels_in", "gen_channels")),
        bias_init=logical_init(nn.initializers.zeros_init(), ("gen_channels",)), name=name)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN: x + weight * (x * N(x)) + bias, N = ||x||_2 over (H, W) / (channel mean + 1e-6)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        # Zero-initialised as in the released module (the block starts as a plain ConvNeXt block).
        weight = self.param("weight", logical_init(nn.initializers.zeros_init(), ("gen_mlp",)), (c,), self.param_dtype)
        bias = self.param("bias", logical_init(nn.initializers.zeros_init(), ("gen_mlp",)), (c,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        gx = jnp.sqrt(jnp.sum(x32 * x32, axis=(1, 2), keepdims=True))
        nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + 1e-6)
        out = bias.astype(jnp.float32) + (weight.astype(jnp.float32) * nx + 1.0) * x32
        return out.astype(self.dtype)


def _batch_sharded(x, channel_axis=None):
    """Activations [batch, h, w, c] split by rows over the data axes (channels only by `channel_axis`): without it the
    fsdp-sharded conv kernels pull the partitioner into sharding by channels and resharding at every block."""
    return nn.with_logical_constraint(x, ("activation_batch", None, None, channel_axis))


@functools.partial(jax.jit, static_argnames="padding")  # one program per shape, also where the model runs eagerly
def _depthwise_taps_looped(x, w, padding: int):
    """The depthwise conv as a loop over the k·k taps of `w` [k, k, 1, C]: out += shifted window · tap."""
    k, p = w.shape[0], padding
    h, wd = x.shape[1] + 2 * p - k + 1, x.shape[2] + 2 * p - k + 1
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))

    def add_tap(tap, out):
        i, j = tap // k, tap % k
        return out + jax.lax.dynamic_slice(padded, (0, i, j, 0), out.shape) * w[i, j, 0]

    return jax.lax.fori_loop(0, k * k, add_tap, jnp.zeros((x.shape[0], h, wd, x.shape[3]), x.dtype))


class DepthwiseConv(nn.Module):
    """Per-channel k x k convolution (`groups = channels`) with nn.Conv's parameters (kernel [k, k, 1, C], bias [C]).

    `form`: "looped" (a loop over the k·k taps, each a shifted multiply-add), "shifted" (the same k·k multiply-adds
    written out), "grouped" (one convolution with feature_group_count = C) or "auto" (looped on a CPU, grouped on
    accelerators). The two tap forms add the taps in the same order (equal outputs to the bit). On a CPU, XLA runs the
    grouped convolution 20-30x slower than the shifted form (measured: [16, 4, 4, 48] 4.1 ms vs 0.13 ms), and the
    written-out form costs XLA:CPU a kernel per tap and direction to compile: the tiny stage-2 train step compiles in
    ~8.5 s looped against ~14.5 s shifted (backend optimisation level 0, as the tests compile), 19 s against 25 s at the
    default level, and steps in 23 against 18 ms (the digits step: 73 against 81 ms, within noise). On a TPU the shifted
    form's backward pass reads the activations once per tap for the kernel gradient: for a decoder block of the 1.3B
    model at 38 rows ([38, 24, 24, 1536], bf16) XLA:TPU's cost model gives forward + backward 10.1 GB and 4.28 ms
    shifted against 0.56 GB and 0.24 ms grouped (v5p, BENCHMARKS.md)."""

    features: int
    kernel: int
    padding: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    form: str = "auto"

    @nn.compact
    def __call__(self, x):
        c, k, p = self.features, self.kernel, self.padding
        # The kernel stays replicated: sharding its channels would make the partitioner split the activations by
        # channel instead of by batch.
        w = self.param("kernel", logical_init(DEFAULT_KERNEL_INIT, ("conv_height", "conv_width", "conv_group",
                                                                    "gen_depthwise")), (k, k, 1, c), self.param_dtype)
        w = w.astype(self.dtype)
        x = x.astype(self.dtype)
        form = self.form if self.form != "auto" else "looped" if target_platform() == "cpu" else "grouped"
        if form == "grouped":
            out = jax.lax.conv_general_dilated(x, w, (1, 1), [(p, p)] * 2, feature_group_count=c,
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
        elif form == "shifted":
            h, wd = x.shape[1] + 2 * p - k + 1, x.shape[2] + 2 * p - k + 1
            padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
            out = sum(padded[:, i:i + h, j:j + wd] * w[i, j, 0] for i in range(k) for j in range(k))
        elif form == "looped":
            out = _depthwise_taps_looped(x, w, p)
        else:
            raise ValueError(f"unknown depthwise form {self.form!r}: use 'auto', 'looped', 'shifted' or 'grouped'")
        if self.use_bias:
            out = out + self.param("bias", logical_init(nn.initializers.zeros_init(), ("gen_depthwise",)), (c,),
                                   self.param_dtype).astype(self.dtype)
        return out


class ConvNeXtBlock(nn.Module):
    channels: int
    norm_eps: float = 1e-6
    use_bias: bool = True
    ffn_factor: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t_emb):
        c = self.channels
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        x = _batch_sharded(x)
        h = _batch_sharded(DepthwiseConv(c, 7, 3, name="depthwise", **kw)(x))
        h = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, axis_name="gen_channels", name="norm")(h)
        h = dense(c * self.ffn_factor, ("gen_channels", "gen_mlp"), name="channelwise_linear_1", **kw)(h)
        h = _batch_sharded(nn.gelu(h, approximate=False), "activation_mlp")
        h = GlobalResponseNorm(self.dtype, self.param_dtype, name="channelwise_norm")(h)
        h = dense(c, ("gen_mlp", "gen_channels"), name="channelwise_linear_2", **kw)(h)
        x = h + x
        # FiLM after the residual add, as in the released ShallowUViT.
        scale, shift = jnp.split(dense(2 * c, ("embed", "gen_channels"), name="cond_embeds_mapper", **kw)(nn.silu(t_emb)),
                                 2, axis=-1)
        return _batch_sharded(shift[:, None, None, :] + x * (1.0 + scale[:, None, None, :]))


class MidBlock(nn.Module):
    channels: int
    num_blocks: int
    norm_eps: float = 1e-6
    use_bias: bool = True
    ffn_factor: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t_emb):
        for j in range(self.num_blocks):
            x = ConvNeXtBlock(self.channels, self.norm_eps, self.use_bias, self.ffn_factor, self.dtype,
                              self.param_dtype, name=f"res_blocks_{j}")(x, t_emb)
        return x


class ShallowUViTEncoder(nn.Module):
    """(z_t [batch, h, w, 4], t [batch] in 0..1000) -> (features [batch, h/2, w/2, C], t_emb [batch, cond_dim]).

    The features are both the LLM's latent tokens (after the aligner) and the decoder's long skip.
    """

    config: GenEncoderConfig
    cond_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z, timesteps):
        cfg = self.config
        sinusoid = timestep_sinusoid(timesteps, cfg.channels).astype(self.dtype)
        t_emb = TimestepEmbedding(self.cond_dim, cfg.use_bias, self.dtype, self.param_dtype, name="time_embed")(sinusoid)
        x = _conv(cfg.channels, cfg.kernel_size, strides=cfg.stride, padding=cfg.padding, use_bias=True,
                  dtype=self.dtype, param_dtype=self.param_dtype, name="in_conv")(z.astype(self.dtype))
        x = MidBlock(cfg.channels, cfg.num_blocks, cfg.norm_eps, cfg.use_bias, cfg.ffn_factor, self.dtype,
                     self.param_dtype, name="mid_block")(x, t_emb)
        return x, t_emb


def pixel_shuffle(x, r: int):
    """NHWC PixelShuffle: out[b, h*r+i, w*r+j, c] = in[b, h, w, c*r*r + i*r + j] (torch channel order)."""
    b, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c)


class Unpatchify(nn.Module):
    """RMSNorm -> 1x1 conv to out*4 channels -> PixelShuffle(2)."""

    out_channels: int
    norm_eps: float = 1e-6
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, axis_name="gen_channels", name="norm")(x)
        x = _conv(self.out_channels * 4, 1, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="unpatch_conv")(x)
        return _batch_sharded(pixel_shuffle(x, 2))


class ShallowUViTDecoder(nn.Module):
    """(LLM features [batch, h, w, in_channels], skip [batch, h, w, C], t_emb) -> velocity [batch, 2h, 2w, out]."""

    config: GenDecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, skip, t_emb):
        cfg = self.config
        x = RMSNorm(cfg.norm_eps, self.dtype, self.param_dtype, axis_name="gen_channels", name="input_norm")(x)
        x = _batch_sharded(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1))  # [LLM path, encoder skip]
        channels = cfg.in_channels + cfg.channels
        x = MidBlock(channels, cfg.num_blocks, cfg.norm_eps, cfg.use_bias, cfg.ffn_factor, self.dtype,
                     self.param_dtype, name="mid_block")(x, t_emb)
        return Unpatchify(cfg.out_channels, cfg.norm_eps, cfg.use_bias, self.dtype, self.param_dtype,
                          name="out_convs_0")(x)
