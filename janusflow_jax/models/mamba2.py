"""The Mamba-2 language model (Dao & Gu 2024, "Transformers are SSMs"), numerically equal to transformers'
`Mamba2ForCausalLM` (its pure-PyTorch path); the backbone of OmniMamba (docs/reference.md §9, §9.1).

Layout. The fused PyTorch `in_proj` ([z | x | B | C | dt] rows) is five projections here (`z_proj`, `x_proj`,
`B_proj`, `C_proj`, `dt_proj`) and the depthwise `conv1d` over the [x | B | C] channels is three (`conv_x`, `conv_B`,
`conv_C`: the conv is per channel, so splitting it changes nothing). Each piece then carries its own logical axes and
a projection never has to be sliced across a sharded dimension. `convert/mamba2.py` splits and merges the fused
tensors exactly (a round trip is bit-exact).

Logical axes: "embed", "vocab", "norm" and "layers" as in the Llama; new here are "ssm_inner" (d_inner = heads x
head_dim, the Mamba analogue of "mlp"), "ssm_heads" (one value per head: dt, A_log, D, dt_bias), "ssm_state" (the
B / C width, ngroups x d_state) and "conv_width" (the conv taps), mapped to the mesh in `sharding.DEFAULT_RULES`
("ssm_inner" and "ssm_heads" like "mlp").

Calls (all on `Mamba2LM`, via `model.apply(params, ..., method=...)`):
  `__call__(input_ids) -> logits`                       the whole sequence, chunked SSD scan (training);
  `prefill(input_ids, cache=None) -> (logits, cache)`   the same, continuing from `cache` (default: empty) and
                                                        returning the conv and SSM states after the last token;
  `decode_step(token, cache) -> (logits, cache)`        one token per row through the recurrence;
  `hidden_states(inputs_embeds, cache=None)`            the blocks and norm_f over given input embeddings
                                                        (composites such as OmniMamba build their own inputs and
                                                        heads), returning (hidden [batch, seq, d_model], cache).
Each takes `task` (the active LoRA adapter, static) and `deterministic` (False: LoRA dropout on, needs a "dropout"
rng) as keywords; `__call__` and `hidden_states` also take `dropout_keys` (below).

Task LoRA (OmniMamba, docs/reference.md §9.1). With `lora_tasks` set, every mixer carries one adapter per task on
its input projection: A [d_model, r] and B [r, in_proj rows], output W·u + (alpha / r)·B(A(dropout(u))). Our input
projection is five projections, so B is stored as five pieces (`B_z`, `B_x`, `B_B`, `B_C`, `B_dt`), the rows of the
fused B in the order of the fused in_proj: exactly LoRA on the fused in_proj. `fold_lora` merges one task's adapter
into the kernels for inference (a model without `lora_tasks` then runs it).

Per-row LoRA dropout. With `dropout_keys` (uint32 [batch, *key shape], `jax.random.key_data` of one key per row) the
dropout mask of row r in layer i is drawn from fold_in(key_r, i) alone, never from the "dropout" rng: a row's mask
does not depend on the other rows of its batch, so a batch split into micro-batches drops exactly what it drops whole
(the trainer's gradient accumulation relies on it).

The gated norm is group-wise, RMS over d_inner / ngroups channels (mamba_ssm's RMSNormGated with group_size =
d_inner / ngroups; transformers 5's MambaRMSNormGated does the same). With ngroups = 1 it spans all of d_inner.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from janusflow_jax.models import layers
from janusflow_jax.models.config import Dtypes

Cache = dict[str, jax.Array]  # see `init_cache`
SSD_IMPLEMENTATIONS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class Mamba2Config(Dtypes):
    """A Mamba-2 LM; defaults are mamba2-1.3b as OmniMamba uses it (docs/reference.md §9.1)."""

    d_model: int = 2048
    n_layer: int = 48
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    vocab_size: int = 50288
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    conv_bias: bool = True
    dt_limit: tuple[float, float] = (0.0, math.inf)  # dt is clipped to this range after the softplus
    # Compute dtype and storage dtype of every parameter (the SSM maths always runs in fp32).
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"  # layers.REMAT_POLICIES
    # Task LoRA on the input projection (empty: none). alpha / rank scales the update; dropout acts on its input.
    lora_tasks: tuple[str, ...] = ()
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    # The chunked SSD scan's implementation (`ssd`): "xla" (`ssd_chunked`, the reference, every backend), "pallas"
    # (`ssd_pallas`: fused Mosaic kernels, forward and backward, for TPUs; elsewhere they run in Pallas' slow TPU
    # interpreter) or "auto" (pallas when the target is a TPU, xla elsewhere: CPU runs are exactly the "xla" ones).
    ssd: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "lora_tasks", tuple(self.lora_tasks))  # a JSON list comes back as a list
        object.__setattr__(self, "dt_limit", tuple(float(v) for v in self.dt_limit))
        if len(set(self.lora_tasks)) != len(self.lora_tasks) or self.lora_tasks and self.lora_rank < 1:
            raise ValueError(f"lora_tasks {self.lora_tasks} must be distinct names and lora_rank >= 1")
        if self.d_inner % self.headdim:
            raise ValueError(f"d_inner={self.d_inner} (expand x d_model) is not a multiple of headdim={self.headdim}")
        if self.nheads % self.ngroups:
            raise ValueError(f"nheads={self.nheads} is not a multiple of ngroups={self.ngroups}")
        if self.remat_policy not in layers.REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {sorted(layers.REMAT_POLICIES)}")
        if self.ssd not in SSD_IMPLEMENTATIONS:
            raise ValueError(f"ssd {self.ssd!r} not in {SSD_IMPLEMENTATIONS}")
        jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def bc_width(self) -> int:
        """Width of B (and of C): ngroups x d_state."""
        return self.ngroups * self.d_state

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank


    def replace(self, **changes) -> "Mamba2Config":
        return dataclasses.replace(self, **changes)


def init_cache(config: Mamba2Config, batch: int) -> Cache:
    """An empty decoding state, one entry per layer on a leading axis (both layer layouts use it):
    conv_x / conv_B / conv_C: [layers, batch, d_conv, channels], the last d_conv pre-activation conv inputs, zero
    (= the conv's left padding) before the first token, in the compute dtype; ssm: [layers, batch, nheads, headdim,
    d_state] in fp32."""
    cfg = config
    conv = lambda width: jnp.zeros((cfg.n_layer, batch, cfg.d_conv, width), cfg.compute_dtype)  # noqa: E731
    return {"conv_x": conv(cfg.d_inner), "conv_B": conv(cfg.bc_width), "conv_C": conv(cfg.bc_width),
            "ssm": jnp.zeros((cfg.n_layer, batch, cfg.nheads, cfg.headdim, cfg.d_state), jnp.float32)}


# ------------------------------------------------------------------------------------------------------- SSD maths
def segsum(a):
    """Stable segment sums: out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, -inf above the diagonal.
    A masked cumsum (never a difference of two cumsums), as ssd_minimal's `segsum`. a: [..., T] -> [..., T, T]."""
    t = a.shape[-1]
    rows = jnp.broadcast_to(a[..., :, None], a.shape + (t,))  # rows[..., k, j] = a[..., k]
    rows = jnp.where(jnp.tril(jnp.ones((t, t), bool), -1), rows, 0.0)  # keep k > j
    sums = jnp.cumsum(rows, axis=-2)
    return jnp.where(jnp.tril(jnp.ones((t, t), bool)), sums, -jnp.inf)


def ssd_chunked(x, dt, A, B, C, chunk_size: int, initial_state=None):
    """The chunked SSD scan (ssd_minimal_discrete on x·dt and A·dt), any length.

    Per head: S_t = exp(dt_t A) S_{t-1} + dt_t x_t ⊗ B_t,  y_t = S_t C_t  (no D term).
    x: [batch, seq, nheads, headdim]; dt: [batch, seq, nheads] (after softplus); A: [nheads] (negative);
    B, C: [batch, seq, ngroups, d_state], head h reading group h // (nheads / ngroups); initial_state:
    [batch, nheads, headdim, d_state] or None (zeros). All fp32. The sequence is padded to a multiple of
    `chunk_size` with dt = 0 (decay 1, no input), so the final state is that after the last real token.
    Returns y [batch, seq, nheads, headdim] and the final state [batch, nheads, headdim, d_state].
    """
    batch, length, heads, head_dim = x.shape
    groups, state = B.shape[2], B.shape[3]
    per_group = heads // groups
    pad = -length % chunk_size
    if pad:
        x, dt, B, C = (jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)) for t in (x, dt, B, C))
    chunks, q = (length + pad) // chunk_size, chunk_size
    xdt = (x * dt[..., None]).reshape(batch, chunks, q, groups, per_group, head_dim)
    a = jnp.moveaxis((dt * A).reshape(batch, chunks, q, groups, per_group), 2, -1)  # [b, c, g, r, q]
    B = B.reshape(batch, chunks, q, groups, state)
    C = C.reshape(batch, chunks, q, groups, state)
    a_cum = jnp.cumsum(a, axis=-1)

    # 1. Within each chunk: a causal, decay-weighted "attention" C_l·B_s.
    decay = jnp.exp(segsum(a))  # [b, c, g, r, l, s]
    scores = jnp.einsum("bclgn,bcsgn->bcgls", C, B)[:, :, :, None] * decay
    y_diag = jnp.einsum("bcgrls,bcsgrp->bclgrp", scores, xdt)
    # 2. The state each chunk leaves behind, from its own inputs only.
    decay_to_end = jnp.exp(a_cum[..., -1:] - a_cum)  # <= 1: the cumsum only decreases
    chunk_states = jnp.einsum("bcsgn,bcgrs,bcsgrp->bcgrpn", B, decay_to_end, xdt)
    # 3. Chunk-to-chunk recurrence (a segsum over chunk totals), starting from the initial state.
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, head_dim, state), jnp.float32)
    start = initial_state.astype(jnp.float32).reshape(batch, 1, groups, per_group, head_dim, state)
    states = jnp.concatenate([start, chunk_states], axis=1)  # [b, c + 1, g, r, p, n]
    totals = jnp.pad(jnp.moveaxis(a_cum[..., -1], 1, -1), [(0, 0)] * 3 + [(1, 0)])  # [b, g, r, c + 1]
    states = jnp.einsum("bgrzc,bcgrpn->bzgrpn", jnp.exp(segsum(totals)), states)
    states, final = states[:, :-1], states[:, -1]  # the state entering each chunk; after the last one
    # 4. What the entering state contributes inside each chunk.
    y_off = jnp.einsum("bclgn,bcgrpn,bcgrl->bclgrp", C, states, jnp.exp(a_cum))
    y = (y_diag + y_off).reshape(batch, chunks * q, heads, head_dim)[:, :length]
    return y, final.reshape(batch, heads, head_dim, state)


def ssd(x, dt, A, B, C, chunk_size: int, initial_state=None, *, implementation: str = "xla"):
    """The chunked scan by `implementation` (`Mamba2Config.ssd`): "xla" is `ssd_chunked`, "pallas" the fused TPU
    kernels (`ssd_pallas.ssd_pallas`, x, B and C in their own dtype), "auto" pallas when the target is a TPU.
    Arguments and results as `ssd_chunked` (x, B, C in any float dtype; the reference upcasts them to fp32)."""
    if implementation == "auto":
        implementation = "pallas" if layers.target_platform() == "tpu" else "xla"
    if implementation == "pallas":
        from janusflow_jax.models import ssd_pallas  # local import: Pallas loads only where the kernel runs

        return ssd_pallas.ssd_pallas(x, dt, A, B, C, chunk_size, initial_state)
    if implementation != "xla":
        raise ValueError(f"unknown ssd implementation {implementation!r}: use one of {SSD_IMPLEMENTATIONS}")
    f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
    return ssd_chunked(f32(x), dt, A, f32(B), f32(C), chunk_size, initial_state)


def ssd_step(ssm_state, x, dt, A, B, C):
    """One recurrence step. ssm_state: [batch, nheads, headdim, d_state]; x: [batch, nheads, headdim];
    dt: [batch, nheads]; A: [nheads]; B, C: [batch, ngroups, d_state]. Returns (y [batch, nheads, headdim],
    new state). All fp32."""
    per_group = x.shape[1] // B.shape[1]
    B, C = jnp.repeat(B, per_group, axis=1), jnp.repeat(C, per_group, axis=1)
    ssm_state = (ssm_state * jnp.exp(dt * A)[..., None, None]
                 + (dt[..., None] * x)[..., None] * B[:, :, None, :])
    return jnp.einsum("bhpn,bhn->bhp", ssm_state, C), ssm_state


# ------------------------------------------------------------------------------------------------------- modules
def _conv_init(key, shape, dtype=jnp.float32):
    """PyTorch Conv1d's default for a depthwise conv (kaiming-uniform, a=√5): U(±1/√taps)."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _a_log_init(key, shape, dtype=jnp.float32):
    """mamba_ssm's A_init_range (1, 16): A = -U(1, 16)."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def _dt_bias_init(key, shape, dtype=jnp.float32):
    """softplus⁻¹ of dt ~ log-uniform on [1e-3, 1e-1] (floored at 1e-4), mamba_ssm's initialisation."""
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(1e-3), math.log(1e-1)))
    dt = jnp.maximum(dt, 1e-4)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class CausalConv1d(nn.Module):
    """Depthwise causal conv over [batch, seq, channels]: out_t = bias + sum_j kernel[j] · in_{t - taps + 1 + j}.
    kernel: [taps, channels] (PyTorch's conv1d weight [channels, 1, taps] transposed). Without a state the input is
    left-padded with taps - 1 zeros; with one ([batch, taps, channels], the last inputs seen) its last taps - 1 rows
    are the left context, and the new state (the last `taps` inputs) is returned as well."""

    taps: int
    axis: str  # the channels' logical axis
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, u, state=None):
        channels = u.shape[-1]
        kernel = self.param("kernel", layers.logical_init(_conv_init, ("conv_width", self.axis)),
                            (self.taps, channels), self.param_dtype)
        u = u.astype(self.dtype)
        if state is None:
            context = jnp.zeros(u.shape[:1] + (self.taps - 1, channels), self.dtype)
        else:
            context = state[:, 1:].astype(self.dtype)
        padded = jnp.concatenate([context, u], axis=1)
        length = u.shape[1]
        kernel = kernel.astype(self.dtype)
        out = sum(padded[:, j:j + length] * kernel[j] for j in range(self.taps))
        if self.use_bias:
            bias = self.param("bias", layers.logical_init(nn.initializers.zeros_init(), (self.axis,)), (channels,),
                              self.param_dtype)
            out = out + bias.astype(self.dtype)
        new_state = None
        if state is not None:
            new_state = jnp.concatenate([state.astype(self.dtype), u], axis=1)[:, -self.taps:].astype(state.dtype)
        return out, new_state


class GatedRMSNorm(nn.Module):
    """norm(y · silu(z)) · scale with the RMS taken per group of channels (norm_before_gate=False), in fp32."""

    eps: float
    groups: int = 1
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y, z):
        width = y.shape[-1]
        scale = self.param("scale", layers.logical_init(nn.initializers.ones_init(), ("ssm_inner",)), (width,),
                           self.param_dtype)
        h = y.astype(jnp.float32) * nn.silu(z.astype(jnp.float32))
        grouped = h.reshape(h.shape[:-1] + (self.groups, width // self.groups))
        grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + self.eps)
        return grouped.reshape(h.shape) * scale.astype(jnp.float32)


def layer_dropout_keys(dropout_keys, n_layer: int):
    """Per-row key data [batch, *key shape] -> [n_layer, batch, *key shape]: layer i's keys are fold_in(key_r, i)."""
    keys = jax.random.wrap_key_data(dropout_keys)
    return jnp.stack([jax.random.key_data(jax.vmap(lambda k: jax.random.fold_in(k, i))(keys))
                      for i in range(n_layer)])


def row_dropout(u, rate: float, dropout_keys):
    """Inverted dropout of u [batch, ...] with row r's mask drawn from its own key (key data [batch, *key shape])."""
    keep = jax.vmap(lambda k: jax.random.bernoulli(jax.random.wrap_key_data(k), 1.0 - rate, u.shape[1:]))(
        dropout_keys)
    return jnp.where(keep, u / (1.0 - rate), 0.0).astype(u.dtype)


# The input projection's pieces in the order of the fused in_proj rows: (name, logical axis of its output).
IN_PROJ_PIECES = (("z", "ssm_inner"), ("x", "ssm_inner"), ("B", "ssm_state"), ("C", "ssm_state"), ("dt", "ssm_heads"))


def _lora_a_init(key, shape, dtype=jnp.float32):
    """PyTorch Linear's default on A's [rank, d_model] weight (kaiming-uniform, a=√5): U(±1/√d_model)."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class TaskLoRA(nn.Module):
    """One task's adapter parameters: A [d_model, rank] and B_{z,x,B,C,dt} [rank, piece width] (B zero-initialised,
    as LoRA). Returns them as a dict; the mixer applies them."""

    config: Mamba2Config

    @nn.compact
    def __call__(self):
        cfg = self.config
        widths = {"z": cfg.d_inner, "x": cfg.d_inner, "B": cfg.bc_width, "C": cfg.bc_width, "dt": cfg.nheads}
        out = {"A": self.param("A", layers.logical_init(_lora_a_init, ("embed", None)), (cfg.d_model, cfg.lora_rank),
                               cfg.storage_dtype)}
        for piece, axis in IN_PROJ_PIECES:
            out[piece] = self.param(f"B_{piece}", layers.logical_init(nn.initializers.zeros_init(), (None, axis)),
                                    (cfg.lora_rank, widths[piece]), cfg.storage_dtype)
        return out


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer. u: [batch, seq, d_model] -> ([batch, seq, d_model], new layer cache or None).

    With a layer cache (`init_cache` sliced to one layer) the sequence continues from it; a single token then runs
    the recurrence (`ssd_step`) instead of the chunked scan. `task` picks the LoRA adapter (one of
    `config.lora_tasks`; None runs the plain projections); `deterministic=False` applies the LoRA dropout, drawn per
    row from `dropout_keys` (this layer's key data, [batch, *key shape]) when given, else from the "dropout" rng."""

    config: Mamba2Config

    @nn.compact
    def __call__(self, u, cache=None, task: str | None = None, deterministic: bool = True, dropout_keys=None):
        cfg = self.config
        dtype, param_dtype = cfg.compute_dtype, cfg.storage_dtype
        batch, length, _ = u.shape

        # Every task's adapter exists (so `init` creates them all); only the active one is applied.
        adapters = {t: TaskLoRA(cfg, name=f"lora_{t}")() for t in cfg.lora_tasks}
        if task is not None and cfg.lora_tasks and task not in adapters:
            raise ValueError(f"unknown LoRA task {task!r}; this model has {cfg.lora_tasks}")
        lora_hidden = None
        if task in adapters:
            if dropout_keys is None or deterministic or cfg.lora_dropout == 0:
                lora_in = nn.Dropout(cfg.lora_dropout)(u, deterministic=deterministic)
            else:
                lora_in = row_dropout(u, cfg.lora_dropout, dropout_keys)
            lora_hidden = jnp.dot(lora_in.astype(dtype), adapters[task]["A"].astype(dtype))  # [b, s, rank]

        def project(features, axis, name):
            out = layers.dense(features, ("embed", axis), use_bias=False, dtype=dtype, param_dtype=param_dtype,
                               name=name)(u)
            if lora_hidden is not None:
                b = adapters[task][name.removesuffix("_proj")].astype(dtype)
                out = out + (cfg.lora_scale * jnp.dot(lora_hidden, b)).astype(out.dtype)
            return out

        def conv(v, axis, name):
            return CausalConv1d(cfg.d_conv, axis, cfg.conv_bias, dtype, param_dtype, name=name)(
                v, None if cache is None else cache[name])

        z = project(cfg.d_inner, "ssm_inner", "z_proj")
        x = project(cfg.d_inner, "ssm_inner", "x_proj")
        b = project(cfg.bc_width, "ssm_state", "B_proj")
        c = project(cfg.bc_width, "ssm_state", "C_proj")
        dt = project(cfg.nheads, "ssm_heads", "dt_proj")
        (x, conv_x), (b, conv_b), (c, conv_c) = (conv(x, "ssm_inner", "conv_x"), conv(b, "ssm_state", "conv_B"),
                                                 conv(c, "ssm_state", "conv_C"))
        # x, B, C stay in the compute dtype into the scan (the reference upcasts them, the kernel's matmuls take
        # them as they are); the skip term D·x and the recurrence use fp32.
        x = nn.silu(x)  # [b, s, d_inner]: heads x headdim, head-major
        b = nn.silu(b).reshape(batch, length, cfg.ngroups, cfg.d_state)
        c = nn.silu(c).reshape(batch, length, cfg.ngroups, cfg.d_state)

        head_param = lambda name, init: self.param(name, layers.logical_init(init, ("ssm_heads",)),  # noqa: E731
                                                   (cfg.nheads,), param_dtype).astype(jnp.float32)
        dt_bias = head_param("dt_bias", _dt_bias_init)
        A = -jnp.exp(head_param("A_log", _a_log_init))
        D = head_param("D", nn.initializers.ones_init())
        dt = jnp.clip(jax.nn.softplus(dt.astype(jnp.float32) + dt_bias), *cfg.dt_limit)

        heads = x.reshape(batch, length, cfg.nheads, cfg.headdim)
        if cache is not None and length == 1:
            f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
            y, ssm = ssd_step(cache["ssm"], f32(heads[:, 0]), dt[:, 0], A, f32(b[:, 0]), f32(c[:, 0]))
            y = y[:, None]
        else:
            y, ssm = ssd(heads, dt, A, b, c, cfg.chunk_size, None if cache is None else cache["ssm"],
                         implementation=cfg.ssd)
        # The skip term in [b, s, d_inner] (D per head, repeated over its channels): on a TPU a [.., heads, 64]
        # array was laid out sequence-minor (64 lanes of 128), with a transpose on each side of the SSD kernels.
        y = y.reshape(batch, length, cfg.d_inner) + jnp.repeat(D, cfg.headdim) * x.astype(jnp.float32)
        y = GatedRMSNorm(cfg.norm_eps, cfg.ngroups, param_dtype, name="norm")(y, z)
        y = nn.with_logical_constraint(y.astype(dtype), ("activation_batch", "activation_length", "activation_mlp"))
        out = layers.dense(cfg.d_model, ("ssm_inner", "embed"), use_bias=False, dtype=dtype, param_dtype=param_dtype,
                           name="out_proj")(y)
        new_cache = None
        if cache is not None:
            new_cache = {"conv_x": conv_x, "conv_B": conv_b, "conv_C": conv_c, "ssm": ssm}
        return out, new_cache


class Mamba2Block(nn.Module):
    """RMSNorm -> mixer, plus the residual (carried in fp32 with residual_in_fp32). Signature fits nn.scan (task and
    deterministic are broadcast, and static under remat; the layer's dropout keys are scanned like its cache)."""

    config: Mamba2Config

    @nn.compact
    def __call__(self, residual, layer_cache, task=None, deterministic=True, dropout_keys=None):
        cfg = self.config
        h = layers.RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.storage_dtype, name="norm")(residual)
        h, layer_cache = Mamba2Mixer(cfg, name="mixer")(h, layer_cache, task, deterministic, dropout_keys)
        residual = (residual + h).astype(residual.dtype)
        residual = nn.with_logical_constraint(residual, ("activation_batch", "activation_length", "activation_embed"))
        return residual, layer_cache


class Mamba2LM(nn.Module):
    """Embedding, `n_layer` blocks (`layers_{i}`, or `layers` with a leading layer axis under scan_layers), norm_f,
    logits through the tied embedding (or `lm_head`). Logits come out in the compute dtype."""

    config: Mamba2Config

    def setup(self):
        cfg = self.config
        self.embeddings = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                                   embedding_init=layers.logical_init(layers.DEFAULT_KERNEL_INIT, ("vocab", "embed")))
        # task and deterministic are Python values: static under remat (self is argument 0), broadcast under scan.
        block_cls = layers.maybe_remat(Mamba2Block, cfg.remat_policy, static_argnums=(3, 4))
        if cfg.scan_layers:
            self.layers = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                                  in_axes=(0, nn.broadcast, nn.broadcast, 0), length=cfg.n_layer,
                                  metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            self.layers = [block_cls(cfg) for _ in range(cfg.n_layer)]
        self.norm_f = layers.RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.storage_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=cfg.compute_dtype,
                                        param_dtype=cfg.storage_dtype, name="lm_head")

    def hidden_states(self, inputs_embeds, cache: Cache | None = None, task: str | None = None,
                      deterministic: bool = True, dropout_keys=None):
        """inputs_embeds: [batch, seq, d_model] -> (the final-normed hidden states [batch, seq, d_model] in the
        compute dtype, the cache after the last position, or None without a cache). dropout_keys: per-row LoRA
        dropout keys (see the module docstring) or None."""
        cfg = self.config
        x = inputs_embeds.astype(jnp.float32 if cfg.residual_in_fp32 else cfg.compute_dtype)
        layer_keys = None if dropout_keys is None else layer_dropout_keys(dropout_keys, cfg.n_layer)
        if cfg.scan_layers:
            x, cache = self.layers(x, cache, task, deterministic, layer_keys)
        else:
            new_cache = []
            for i, layer in enumerate(self.layers):
                x, layer_cache = layer(x, None if cache is None else jax.tree.map(lambda t: t[i], cache), task,
                                       deterministic, None if layer_keys is None else layer_keys[i])
                new_cache.append(layer_cache)
            if cache is not None:
                cache = jax.tree.map(lambda *t: jnp.stack(t), *new_cache)
        return self.norm_f(x), cache

    def logits(self, hidden):
        """hidden [..., d_model] -> text logits [..., vocab] (tied embedding or lm_head)."""
        return self.embeddings.attend(hidden) if self.config.tie_embeddings else self.lm_head(hidden)

    def _forward(self, input_ids, cache, task=None, deterministic=True, dropout_keys=None):
        hidden, cache = self.hidden_states(self.embeddings(input_ids), cache, task, deterministic, dropout_keys)
        return self.logits(hidden), cache

    def __call__(self, input_ids, task: str | None = None, deterministic: bool = True, dropout_keys=None):
        """input_ids: [batch, seq] -> logits [batch, seq, vocab]."""
        return self._forward(input_ids, None, task, deterministic, dropout_keys)[0]

    def prefill(self, input_ids, cache: Cache | None = None, task: str | None = None):
        """input_ids: [batch, seq]; cache: the state to continue from (default: `init_cache`, an empty history).
        Returns (logits [batch, seq, vocab], the cache after the last token)."""
        if cache is None:
            cache = init_cache(self.config, input_ids.shape[0])
        return self._forward(input_ids, cache, task)

    def decode_step(self, token, cache: Cache, task: str | None = None):
        """token: [batch] ids; returns (logits [batch, vocab], the cache after it)."""
        logits, cache = self._forward(token[:, None], cache, task)
        return logits[:, 0], cache


def init_params(config: Mamba2Config, rng) -> dict:
    """Fresh parameters (boxed with their logical axes; `nn.unbox` for plain arrays), from one jitted program."""
    return jax.jit(lambda r: Mamba2LM(config).init(r, jnp.zeros((1, 1), jnp.int32)))(rng)["params"]


def param_shapes(config: Mamba2Config) -> dict[str, tuple]:
    """{"a/b/kernel": shape} of every parameter, without allocating any."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.unbox(abstract), sep="/").items()}


def fold_lora(params, config: Mamba2Config, task: str) -> dict:
    """Merges `task`'s adapter into the input projections (kernel += scale · A @ B, computed in fp32, stored in the
    kernel's dtype) and drops every adapter: the result runs under `config.replace(lora_tasks=())` and gives that
    task's outputs (to fp32 rounding) without the adapter's two extra matmuls. Either layer layout; host or device
    arrays."""
    if task not in config.lora_tasks:
        raise ValueError(f"unknown LoRA task {task!r}; this model has {config.lora_tasks}")
    flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
    out = {}
    for path, value in flat.items():
        parts = path.split("/")
        if len(parts) >= 2 and parts[-2].startswith("lora_") and parts[-3:-2] == ["mixer"]:
            continue  # every task's adapter goes
        if parts[-1] == "kernel" and len(parts) >= 3 and parts[-3] == "mixer" and parts[-2].endswith("_proj") \
                and parts[-2] != "out_proj":
            mixer = "/".join(parts[:-2])
            a = flat[f"{mixer}/lora_{task}/A"].astype(jnp.float32)
            b = flat[f"{mixer}/lora_{task}/B_{parts[-2].removesuffix('_proj')}"].astype(jnp.float32)
            delta = jnp.einsum("...dr,...ro->...do", a, b) * config.lora_scale
            value = (jnp.asarray(value, jnp.float32) + delta).astype(value.dtype)
        out[path] = value
    return traverse_util.unflatten_dict(out, sep="/")
