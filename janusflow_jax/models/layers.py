"""Building blocks shared by the towers: norms, projections with logical axis names, attention, remat policies."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp

Dtype = Any
Axes = Sequence[str | None]

# Default initialisers (only used for freshly created parameters; converted checkpoints overwrite them).
DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)

# Named rematerialisation policies, selected by `config.remat_policy`.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls, not attention
}


def maybe_remat(module_cls, policy_name: str, static_argnums: tuple[int, ...] = ()):
    """Wraps a block class with nn.remat according to a named policy ("none" returns it unchanged)."""
    if policy_name == "none":
        return module_cls
    return nn.remat(module_cls, policy=REMAT_POLICIES[policy_name], prevent_cse=True, static_argnums=static_argnums)


def logical_init(init: Callable, axes: Axes) -> Callable:
    return nn.with_logical_partitioning(init, tuple(axes))


def dense(
    features: int,
    axes: Axes,
    *,
    use_bias: bool,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    kernel_init: Callable = DEFAULT_KERNEL_INIT,
) -> nn.Dense:
    """nn.Dense whose kernel carries logical axes `axes` = (in_axis, out_axis) and bias (out_axis,)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical_init(kernel_init, axes),
        bias_init=logical_init(nn.initializers.zeros_init(), (axes[-1],)),
        name=name,
    )


class HeadsDense(nn.Module):
    """A bias-free projection into or out of attention heads: nn.Dense's parameter (one [in, out] kernel, same name,
    shape, logical axes and initialiser, so checkpoints and conversion do not change) applied with the kernel
    reshaped to heads, so the activations are never reshaped. `to_heads`: [..., in] -> [..., heads, head_dim];
    else [..., heads, head_dim] -> [..., features]. Reshaping [batch, seq, heads * head_dim] activations into heads
    changes their tiled layout on a TPU, a copy per projection and per gradient; the kernel is small."""

    heads: int
    head_dim: int
    axes: Axes  # the kernel's logical axes (in, out), as for `dense`
    to_heads: bool = True
    features: int = 0  # the output width when not to_heads
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = self.heads * self.head_dim
        shape = (x.shape[-1], width) if self.to_heads else (width, self.features)
        kernel = self.param("kernel", logical_init(DEFAULT_KERNEL_INIT, self.axes), shape, self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if self.to_heads:
            return jnp.einsum("...e,ehd->...hd", x, kernel.reshape(shape[0], self.heads, self.head_dim))
        return jnp.einsum("...hd,hdf->...f", x, kernel.reshape(self.heads, self.head_dim, self.features))


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in fp32, cast back to the input dtype, then scale (HF LlamaRMSNorm order)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", logical_init(nn.initializers.ones_init(), (self.axis_name,)), (x.shape[-1],),
                           self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype).astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with affine scale and bias, statistics in fp32 with the two-pass variance (as PyTorch)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", logical_init(nn.initializers.ones_init(), (self.axis_name,)), (features,),
                           self.param_dtype)
        bias = self.param("bias", logical_init(nn.initializers.zeros_init(), (self.axis_name,)), (features,),
                          self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def dot_product_attention(q, k, v, mask=None, *, scale: float | None = None, implementation: str = "xla",
                          segments=None, causal: bool = False):
    """Softmax attention with grouped-query support.

    q: [batch, q_len, num_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim];
    mask: boolean, broadcastable to [batch, 1, q_len, kv_len] (True = attend), or None.
    segments, causal: the same mask in the form a block-sparse kernel takes, for self-attention over a whole sequence
    (q_len == kv_len, no cache): query i sees key j iff segments[:, i] == segments[:, j] (and j <= i when causal);
    hidden keys carry a segment no visible query has (0). Only "splash" reads them; with `mask` None and `segments`
    None every key is visible, or with `causal` every key up to the query's own position (query i sees keys j <= i,
    the kernels' causal mask, with no mask array at all).
    implementation: "xla" (below: exact, every backend), "cudnn" (`cudnn_attention`: fused flash attention on
    NVIDIA GPUs, bf16/fp16 only), "splash" (`splash_attention`: the Pallas block-sparse flash kernel for TPUs, used
    where `segments` describe the mask; cached decoding stays on xla) or "auto" (cudnn where `_cudnn_applies`,
    splash where `_splash_applies`, else xla).
    Scores and softmax are computed in fp32. A fully masked row gets a uniform distribution instead of NaN
    (the additive-minimum convention of the PyTorch references); such rows are padding and never read. Rows of
    hidden queries are never read either, and the kernels may fill them differently.
    Returns [batch, q_len, num_heads, head_dim] in q's dtype.
    """
    splash_ok = q.shape[1] == k.shape[1] and (segments is not None or mask is None)
    if implementation == "auto":
        implementation = ("cudnn" if _cudnn_applies(q) else
                          "splash" if splash_ok and _splash_applies(q) else "xla")
    if implementation == "cudnn":
        return cudnn_attention(q, k, v, mask, scale=scale,
                               causal=causal and (mask is None or q.shape[1] == k.shape[1]))
    if implementation == "splash" and splash_ok:
        return splash_attention(q, k, v, segments, causal=causal, scale=scale)
    if implementation not in ("xla", "splash"):
        raise ValueError(f"unknown attention implementation {implementation!r}: use 'auto', 'xla', 'cudnn' or 'splash'")
    batch, q_len, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    groups = num_heads // num_kv
    scale = head_dim**-0.5 if scale is None else scale
    q = q.reshape(batch, q_len, num_kv, groups, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is None and causal:
        mask = jnp.tril(jnp.ones((q_len, k.shape[1]), bool))[None, None]
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, 1, q_len, k.shape[1]))[:, :, None]  # [b, 1, 1, q, k]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    return out.reshape(batch, q_len, num_heads, head_dim)


CUDNN_PAD = 64  # cuDNN's fused kernel with a bias wants even lengths in training; tiles are 64/128 long anyway


def _cudnn_applies(q) -> bool:
    """Whether "auto" picks cuDNN: the target (`target_platform`) is an NVIDIA GPU, q is bf16/fp16 and there are at
    least CUDNN_PAD queries (token-by-token decoding stays on XLA: padding one query to 64 would waste the kernel)."""
    if q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[1] < CUDNN_PAD or target_platform() != "gpu":
        return False
    try:  # "cuda ..." on NVIDIA, "rocm ..." on AMD (no cuDNN there)
        version = jax.extend.backend.get_backend().platform_version.lower()
    except (AttributeError, RuntimeError):
        version = ""
    return "rocm" not in version


def cudnn_attention(q, k, v, mask=None, *, scale: float | None = None, causal: bool = False,
                    backend: str = "cudnn"):
    """`dot_product_attention` through cuDNN's fused flash attention (`jax.nn.dot_product_attention`,
    implementation="cudnn"), the boolean mask passed as cuDNN's additive bias.

    `causal` (self-attention, q_len == kv_len, `mask` already causal or None) also sets cuDNN's causal mask type, so the
    kernel skips the key blocks above the diagonal instead of computing and then masking them: half the attention
    FLOPs, forward and backward (the bias alone made it compute the whole square: `roofline.py` on the H200 program).

    Query and key lengths are padded up to a multiple of CUDNN_PAD (padded keys masked, padded queries dropped), so
    any length works: JanusFlow's generation rows are prompt + 1 + 576 tokens, often odd, and cuDNN refuses odd
    lengths with a bias in training. A fully masked row comes out uniform, as in the XLA path (the bias is a large
    finite negative number). `backend` is jax.nn.dot_product_attention's `implementation` ("xla" lets the CPU
    tests check the padding and masking here)."""
    batch, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    q_pad, kv_pad = -q_len % CUDNN_PAD, -kv_len % CUDNN_PAD
    # No mask and causal (or nothing padded): no bias at all. The padded keys come after every real query's
    # position, so the causal mask type alone hides them; a bias would cost O(q_len * kv_len) memory and reads.
    if mask is not None or (kv_pad and not (causal and q_len <= kv_len)):
        if mask is None:
            mask = jnp.ones((1, 1, q_len, kv_len), bool)
        mask = jnp.broadcast_to(mask, (mask.shape[0], 1, q_len, kv_len))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, q_pad), (0, kv_pad)))  # padded keys: False
    if q_pad or kv_pad:
        pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
        q, k, v = pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=head_dim**-0.5 if scale is None else scale,
                                       is_causal=causal, implementation=backend)
    return out[:, :q_len]


SPLASH_PAD = 128  # the kernel's blocks are multiples of 128 tokens (the TPU's lane width)


def target_platform() -> str:
    """The platform the code is traced for: the active mesh's devices (so a TPU topology compiled ahead of time on a
    CPU host counts as a TPU), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _splash_applies(q) -> bool:
    """Whether "auto" picks splash: the target is a TPU and there are at least SPLASH_PAD queries."""
    return q.shape[1] >= SPLASH_PAD and target_platform() == "tpu"


def _splash_block(length: int) -> int:
    return next(b for b in (512, 256, 128) if length % b == 0)


def splash_attention(q, k, v, segments=None, *, causal: bool, scale: float | None = None,
                     interpret: bool | None = None):
    """Self-attention through the Pallas Splash (block-sparse flash) attention kernel of jax.experimental.pallas.

    Shapes as `dot_product_attention` with q_len == kv_len; segments: [batch, seq] integers or None (all visible).
    The sequence is padded to a multiple of SPLASH_PAD (padded tokens get segment -1: no real query sees them; a
    generation row of 705 tokens runs as 768); grouped kv heads are repeated; q is scaled before the kernel, which
    does not scale. Blocks that the causal mask empties are skipped, so causal attention costs about half of full.
    Under a mesh (`jax.set_mesh`) the kernel runs per shard through `jax.shard_map`, batch and heads split as the
    logical axes "activation_batch" and "activation_heads" map under the active rules (a dimension that the mesh
    axes do not divide stays whole). Off TPU it runs in Pallas' interpreter (`interpret`, default: unless the target
    is a TPU): slow, for tests.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    batch, length, num_heads, head_dim = q.shape
    if k.shape[1] != length:
        raise ValueError(f"splash attention is self-attention: {length} queries but {k.shape[1]} keys")
    if k.shape[2] != num_heads:  # grouped-query attention: one copy of each kv head per query head of its group
        k, v = (jnp.repeat(x, num_heads // k.shape[2], axis=2) for x in (k, v))
    if interpret is None:
        interpret = target_platform() != "tpu"
    scale = head_dim**-0.5 if scale is None else scale
    segments = jnp.ones((batch, length), jnp.int32) if segments is None else segments.astype(jnp.int32)
    pad = -length % SPLASH_PAD
    # [batch, heads, seq, head_dim], the kernel's layout (vmapped over the batch).
    q = q * jnp.asarray(scale, q.dtype)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
        segments = jnp.pad(segments, ((0, 0), (0, pad)), constant_values=-1)
    padded = length + pad

    def kernel(q, k, v, segments):
        one = (mask_lib.CausalMask if causal else mask_lib.FullMask)((padded, padded))
        block = _splash_block(padded)
        sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
        fn = splash.make_splash_mha(mask_lib.MultiHeadMask([one] * q.shape[1]), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
        return jax.vmap(lambda q, k, v, s: fn(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(q, k, v, segments)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = kernel(q, k, v, segments)
    else:
        batch_axes, heads_axes = (_mesh_axes(name, size, mesh) for name, size in
                                  (("activation_batch", batch), ("activation_heads", num_heads)))
        qkv_spec = jax.P(batch_axes, heads_axes, None, None)
        out = jax.shard_map(kernel, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, jax.P(batch_axes, None)),
                            out_specs=qkv_spec, check_vma=False)(q, k, v, segments)
    return out[:, :, :length].transpose(0, 2, 1, 3)


def _mesh_axes(logical: str, size: int, mesh):
    """The mesh axes a logical activation axis maps to under the active flax rules, or None where they do not
    divide `size` (or no rules are active)."""
    spec = nn.logical_to_mesh_axes((logical,))
    axes = None if spec is None else spec[0]
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(a for a in names if a in mesh.axis_names)
    if not names or size % math.prod(mesh.shape[a] for a in names):
        return None
    return names
