"""The chunked SSD scan of Mamba-2 as fused Pallas (Mosaic TPU) kernels, forward and backward.

Same maths and signature as `mamba2.ssd_chunked` (the XLA reference): per head S_t = exp(dt_t A) S_{t-1} +
dt_t x_t ⊗ B_t, y_t = S_t C_t, the sequence cut into chunks of Q tokens. One grid step is one (batch row, block
of heads of one group, chunk); the chunk axis runs in order and carries the block's states [heads, headdim,
d_state] in fp32 VMEM scratch, so no [Q, Q] decay matrix, cumulative sum or exponential ever goes to HBM (the XLA
program writes them per chunk and `full` remat recomputes them). The block's heads share the group's B and C
(fetched once) and C Bᵀ (computed once; ngroups = 1 in OmniMamba, so every head reads the same B and C).
Within a chunk (l, s index tokens, a = dt·A, a_cum its chunk-local cumulative sum):

    y      = ((C Bᵀ) ∘ L) (x·dt) + exp(a_cum) ∘ (C S₀ᵀ),   L[l, s] = exp(a_cum_l − a_cum_s) for l ≥ s, else 0
    S₁     = exp(a_cum_Q) S₀ + ((x·dt) ∘ w)ᵀ B,           w_s = exp(a_cum_Q − a_cum_s)

(mamba_ssm's `ssd_combined` splits this into five Triton kernels; here one kernel does all of it per chunk). The
cumulative sums a_cum ([batch, heads, seq], 1/headdim of x's size) are computed in XLA before the kernel, so their
gradient (a reverse cumulative sum) is XLA's too; the kernels take and return per-token vectors.

Backward (`jax.custom_vjp`): the forward kernel also writes the state entering each chunk (fp32, [headdim, d_state]
per chunk: what the backward needs to avoid a second forward scan), and one backward kernel walks the chunks in
reverse, carrying dS (the gradient of the state leaving the chunk) in VMEM scratch:

    dxdt = Mᵀ dy + w ∘ (B dSᵀ),                 M = (C Bᵀ) ∘ L
    dC   = (dM ∘ L) B + exp(a_cum) ∘ (dy S₀),    dM = dy (x·dt)ᵀ
    dB   = (dM ∘ L)ᵀ C + ((x·dt) ∘ w) dS
    dS₀  = exp(a_cum_Q) dS + (exp(a_cum) ∘ dy)ᵀ C
    da_cum = rowsum(dM ∘ M) − colsum(dM ∘ M) + rowsum(dy ∘ y_off) − u + [last] (Σu + exp(a_cum_Q) ⟨dS, S₀⟩),
             u_s = Σ_p (x·dt)[s, p] (w ∘ B dSᵀ)[s, p]

The column sums come out as a row, the rest as a column; the kernel turns the column into a row and writes their sum.
dB and dC are summed over a block's heads in the kernel and over a group's blocks in XLA.

Layout: the kernels take the model's own layouts, x as [batch, seq, heads·headdim] and B, C as [batch, seq,
groups·d_state] (free reshapes, no transposes, no padding: the last chunk's blocks overhang the arrays, the kernels
zero the overhang they read and Pallas drops what they write there), a block of 8 heads making x's block [Q, 8·64]
lane-dense; the per-token vectors dt and a_cum go in as rows [batch, chunks, heads, Q] (a [seq, 1] column would be
padded 128x in a TPU's HBM) and become columns in VMEM by a select and a lane sum. Matmul operands are in x's dtype
(bf16 in training: the MXU's rate) with fp32 accumulation; decays, states and their gradients stay fp32.

Off TPU the kernels run in Pallas' TPU interpreter (`interpret=pltpu.InterpretParams()`: TPU semantics on a CPU),
which is how tests/test_ssd_pallas.py checks them against `mamba2.ssd_chunked`. Under a mesh (`jax.set_mesh`) they
run per shard through `jax.shard_map`, batch split as "activation_batch" and heads as "ssm_heads" map under the
active rules (as `layers.splash_attention` does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from janusflow_jax.models import layers

_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a, b, trans_a=False, trans_b=False):
    """a @ b (optionally a or b transposed) with fp32 accumulation; operands keep their dtype."""
    dims = (((0,) if trans_a else (1,)), ((1,) if trans_b else (0,)))
    precision = _HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _decay(acum_col, acum_row):
    """L[l, s] = exp(a_cum_l - a_cum_s) for l >= s, else 0 ([Q, 1], [1, Q] -> [Q, Q])."""
    q = acum_col.shape[0]
    causal = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0) >= jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    return jnp.exp(jnp.where(causal, acum_col - acum_row, -jnp.inf))


def _eye(q):
    return jax.lax.broadcasted_iota(jnp.int32, (q, q), 0) == jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)


def _column(row):
    """[1, Q] -> [Q, 1], exactly (a select and a lane sum: no vector transpose needed)."""
    return jnp.sum(jnp.where(_eye(row.shape[1]), row, 0.0), axis=1, keepdims=True)


def _row(column):
    """[Q, 1] -> [1, Q], exactly."""
    return jnp.sum(jnp.where(_eye(column.shape[0]), column, 0.0), axis=0, keepdims=True)


def _real_rows(length, q, chunk):
    """Masks the rows of a token block past the sequence's end ([Q, 1] bool, or None when chunks tile it). The
    last chunk's blocks of x, B, C and dy overhang the unpadded arrays; Mosaic fills the overhang with whatever
    VMEM held (the interpreter, as tests run it, with NaN) and drops the overhang of an output block."""
    if length % q == 0:
        return None
    return jax.lax.broadcasted_iota(jnp.int32, (q, 1), 0) < length - chunk * q


def _load(ref, real):
    """A token block, its overhang zeroed (a select: NaN * 0 would stay NaN)."""
    return ref[...] if real is None else jnp.where(real, ref[...], jnp.zeros((), ref.dtype))


# ------------------------------------------------------------------------------------------------------- forward
def _forward_kernel(x_ref, dt_ref, acum_ref, b_ref, c_ref, s0_ref, y_ref, final_ref, states_ref, state, *,
                    length):
    """One (row, block of hb heads of one group, chunk). x_ref, y_ref [Q, hb·P] (head i in lanes i·P ..);
    dt_ref, acum_ref [hb, Q] (zero dt past the end); b_ref, c_ref [Q, N]; states [hb, P, N]."""
    chunk = pl.program_id(2)

    @pl.when(chunk == 0)
    def _():
        state[...] = s0_ref[...].astype(jnp.float32)

    dtype = x_ref.dtype
    hb, p = state.shape[0], state.shape[1]
    real = _real_rows(length, x_ref.shape[0], chunk)
    x_block, b, c = _load(x_ref, real), _load(b_ref, real), _load(c_ref, real)
    cb = _dot(c, b, trans_b=True)  # C Bᵀ [Q, Q], once for all the block's heads
    for i in range(hb):
        lanes = slice(i * p, (i + 1) * p)
        acum_row = acum_ref[i:i + 1, :]  # [1, Q]
        acum_col = _column(acum_row)
        total = acum_row[:, -1:]  # [1, 1]
        xdt = x_block[:, lanes].astype(jnp.float32) * _column(dt_ref[i:i + 1, :])  # [Q, P]
        s0 = state[i]  # [P, N]
        states_ref[i] = s0
        y = _dot((cb * _decay(acum_col, acum_row)).astype(dtype), xdt.astype(dtype))
        y = y + jnp.exp(acum_col) * _dot(c, s0.astype(dtype), trans_b=True)
        y_ref[:, lanes] = y.astype(y_ref.dtype)
        weighted = (xdt * jnp.exp(total - acum_col)).astype(dtype)  # [Q, P]
        state[i] = jnp.exp(total) * s0 + _dot(weighted, b, trans_a=True)

    @pl.when(chunk == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = state[...]


# ------------------------------------------------------------------------------------------------------ backward
def _backward_kernel(x_ref, dt_ref, acum_ref, b_ref, c_ref, states_ref, dy_ref, dfinal_ref,
                     dx_ref, ddt_ref, dacum_ref, db_ref, dc_ref, ds0_ref, dstate, *, length):
    """One (row, block of heads, chunk), the chunks in reverse; layouts as the forward's; dB and dC [Q, N] summed
    over the block's heads."""
    step = pl.program_id(2)  # chunk = chunks - 1 - step

    @pl.when(step == 0)
    def _():
        dstate[...] = dfinal_ref[...]

    dtype = x_ref.dtype
    hb, p = dstate.shape[0], dstate.shape[1]
    q = acum_ref.shape[1]
    real = _real_rows(length, q, pl.num_programs(2) - 1 - step)
    x_block, dy_block, b, c = (_load(r, real) for r in (x_ref, dy_ref, b_ref, c_ref))
    cb = _dot(c, b, trans_b=True)  # C Bᵀ [Q, Q]
    last = jax.lax.broadcasted_iota(jnp.int32, (q, 1), 0) == q - 1
    db_sum = dc_sum = jnp.zeros(b.shape, jnp.float32)
    for i in range(hb):
        lanes = slice(i * p, (i + 1) * p)
        acum_row = acum_ref[i:i + 1, :]
        acum_col = _column(acum_row)
        total = acum_row[:, -1:]
        x = x_block[:, lanes].astype(jnp.float32)
        dt = _column(dt_ref[i:i + 1, :])
        xdt = x * dt
        s0, ds = states_ref[i], dstate[i]  # [P, N] fp32
        dy = dy_block[:, lanes].astype(jnp.float32)  # [Q, P]
        decay = _decay(acum_col, acum_row)
        m = cb * decay
        dm = _dot(dy.astype(dtype), xdt.astype(dtype), trans_b=True)  # dy (x·dt)ᵀ [Q, Q]
        dg = dm * decay
        w = jnp.exp(total - acum_col)  # [Q, 1]
        b_ds = _dot(b, ds.astype(dtype), trans_b=True)  # B dSᵀ [Q, P]
        dxdt = _dot(m.astype(dtype), dy.astype(dtype), trans_a=True) + w * b_ds
        dx_ref[:, lanes] = (dxdt * dt).astype(dx_ref.dtype)
        ddt_ref[i:i + 1, :] = _row(jnp.sum(dxdt * x, axis=1, keepdims=True))
        exp_col = jnp.exp(acum_col)
        dc_sum = dc_sum + _dot(dg.astype(dtype), b) + exp_col * _dot(dy.astype(dtype), s0.astype(dtype))
        db_sum = db_sum + _dot(dg.astype(dtype), c, trans_a=True) + _dot((xdt * w).astype(dtype), ds.astype(dtype))
        y_off = exp_col * _dot(c, s0.astype(dtype), trans_b=True)
        t = dm * m
        u = jnp.sum(xdt * w * b_ds, axis=1, keepdims=True)  # [Q, 1]
        tail = jnp.sum(u, axis=0, keepdims=True) + jnp.exp(total) * jnp.sum(ds * s0, keepdims=True).reshape(1, 1)
        dacum_col = (jnp.sum(t, axis=1, keepdims=True) + jnp.sum(dy * y_off, axis=1, keepdims=True) - u
                     + jnp.where(last, tail, 0.0))
        dacum_ref[i:i + 1, :] = _row(dacum_col) - jnp.sum(t, axis=0, keepdims=True)
        dstate[i] = jnp.exp(total) * ds + _dot((exp_col * dy).astype(dtype), c, trans_a=True)
    db_ref[...] = db_sum
    dc_ref[...] = dc_sum

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = dstate[...]


# ------------------------------------------------------------------------------------------------- pallas calls
def heads_per_step(heads: int, groups: int, limit: int = 8) -> int:
    """Heads one grid step takes: the largest divisor of a group's heads up to `limit`. They share B, C and C Bᵀ
    (fetched and computed once). At OmniMamba's sizes 8 heads make x's block [256, 8 x 64] lane-dense and the
    per-token vectors' [8, 256] sublane-dense (Mosaic's (8, 128) tiles), and keep every buffer within a few MiB of
    VMEM. (Other sizes may give blocks a TPU would refuse; the interpreter takes any.)"""
    per_group = heads // groups
    return max(d for d in range(1, min(per_group, limit) + 1) if per_group % d == 0)


def _specs(heads, groups, hb, q, p, n, nc, reverse=False):
    """BlockSpecs over the grid (batch, head blocks, chunks) of the kernels' arrays: x-like [b, T, h·P], per-token
    vectors [b, chunks, h, Q], B-like [b, T, g·N], per-chunk states [b, chunks, h, P, N], states [b, h, P, N];
    the chunks in reverse for the backward."""
    blocks_per_group = heads // groups // hb
    at = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
    return dict(
        tok=pl.BlockSpec((None, q, hb * p), lambda i, h, c: (i, at(c), h)),
        vec=pl.BlockSpec((None, None, hb, q), lambda i, h, c: (i, at(c), h, 0)),
        grp=pl.BlockSpec((None, q, n), lambda i, h, c: (i, at(c), h // blocks_per_group)),
        per_block=pl.BlockSpec((None, q, n), lambda i, h, c: (i, at(c), h)),
        chunk_state=pl.BlockSpec((None, None, hb, p, n), lambda i, h, c: (i, at(c), h, 0, 0)),
        state=pl.BlockSpec((None, hb, p, n), lambda i, h, c: (i, h, 0, 0)),
    )


def _cost(batch, heads, hb, chunks, q, p, n, itemsize, backward: bool) -> pl.CostEstimate:
    """FLOPs, exponentials and HBM bytes of a kernel, from its matmuls and the blocks its specs move.

    Per (row, chunk) and head, forward: scores·(x·dt) 2Q²P, C S₀ᵀ 2QNP, the state update 2QPN; the decay matrix Q²
    exponentials (+ 2Q); per block of hb heads C Bᵀ 2Q²N once. Blocks moved per (row, chunk, head): x [Q, P] in,
    y [Q, P] out, dt and a_cum 2Q fp32 in, the entering state P·N fp32 out; per block B and C [Q, N] in; per
    (row, head) the initial and final states P·N fp32.
    Backward per head: dy (x·dt)ᵀ and Mᵀ dy 2 × 2Q²P, dG B and dGᵀ C 2 × 2Q²N; B dSᵀ, dy S₀, (x·dt∘w) dS,
    (e^a∘dy)ᵀ C, C S₀ᵀ 5 × 2QPN; Q² + 3Q exponentials; per block C Bᵀ 2Q²N. Moved per head: x, dy in and dx out
    [Q, P], dt, a_cum in and ddt, da_cum out 4Q fp32, the stored state P·N fp32 in; per block B, C in and dB, dC
    [Q, N] fp32 out; per (row, head) dfinal in and dS₀ out.
    """
    steps = batch * chunks * heads  # (row, chunk, head) triples
    blocks = batch * chunks * (heads // hb)
    if not backward:
        flops = steps * (2 * q * q * p + 4 * q * p * n) + blocks * 2 * q * q * n
        exps = steps * (q * q + 2 * q)
        moved = steps * (2 * q * p * itemsize + 2 * q * 4 + p * n * 4) + blocks * 2 * q * n * itemsize
    else:
        flops = steps * (4 * q * q * p + 4 * q * q * n + 10 * q * p * n) + blocks * 2 * q * q * n
        exps = steps * (q * q + 3 * q)
        moved = steps * (3 * q * p * itemsize + 4 * q * 4 + p * n * 4) + blocks * 2 * q * n * (itemsize + 4)
    return pl.CostEstimate(flops=flops, transcendentals=exps, bytes_accessed=moved + batch * heads * 2 * p * n * 4)


def _interpret(interpret):
    """True: TPU semantics on the CPU, a block's overhang past an array's end read as NaN (unmasked, it shows)."""
    if interpret is None:
        interpret = layers.target_platform() != "tpu"
    return pltpu.InterpretParams(out_of_bounds_reads="uninitialized") if interpret is True else interpret


_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _forward_call(x, dt, acum, B, C, s0, q, interpret):
    """x [b, T, h·P], dt and acum [b, chunks, h, Q] (fp32, chunks · Q >= T), B and C [b, T, g·N], s0 [b, h, P, N]
    -> y [b, T, h·P] (x's dtype), the final state [b, h, P, N] and the state entering each chunk
    [b, chunks, h, P, N] (fp32)."""
    batch, length, _ = x.shape
    nc, heads, _ = dt.shape[1:]
    p, n = s0.shape[2:]
    groups = B.shape[2] // n
    hb = heads_per_step(heads, groups)
    spec = _specs(heads, groups, hb, q, p, n, nc)
    return pl.pallas_call(
        functools.partial(_forward_kernel, length=length),
        grid=(batch, heads // hb, nc),
        in_specs=[spec["tok"], spec["vec"], spec["vec"], spec["grp"], spec["grp"], spec["state"]],
        out_specs=[spec["tok"], spec["state"], spec["chunk_state"]],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct((batch, heads, p, n), jnp.float32),
                   jax.ShapeDtypeStruct((batch, nc, heads, p, n), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((hb, p, n), jnp.float32)],
        compiler_params=_PARAMS,
        cost_estimate=_cost(batch, heads, hb, nc, q, p, n, x.dtype.itemsize, backward=False),
        interpret=interpret,
        name="ssd_forward",
    )(x, dt, acum, B, C, s0)


def _backward_call(x, dt, acum, B, C, states, dy, dfinal, q, interpret):
    """Returns dx [b, T, h·P], ddt and da_cum [b, chunks, h, Q], dB and dC per block of heads [b, T, h / hb · N]
    (fp32) and dS₀ [b, h, P, N]."""
    batch, length, _ = x.shape
    nc, heads, _ = dt.shape[1:]
    p, n = dfinal.shape[2:]
    groups = B.shape[2] // n
    hb = heads_per_step(heads, groups)
    spec = _specs(heads, groups, hb, q, p, n, nc, reverse=True)
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_backward_kernel, length=length),
        grid=(batch, heads // hb, nc),
        in_specs=[spec["tok"], spec["vec"], spec["vec"], spec["grp"], spec["grp"], spec["chunk_state"], spec["tok"],
                  spec["state"]],
        out_specs=[spec["tok"], spec["vec"], spec["vec"], spec["per_block"], spec["per_block"], spec["state"]],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), f32(dt.shape), f32(dt.shape),
                   f32((batch, length, heads // hb * n)), f32((batch, length, heads // hb * n)), f32(dfinal.shape)],
        scratch_shapes=[pltpu.VMEM((hb, p, n), jnp.float32)],
        compiler_params=_PARAMS,
        cost_estimate=_cost(batch, heads, hb, nc, q, p, n, x.dtype.itemsize, backward=True),
        interpret=interpret,
        name="ssd_backward",
    )(x, dt, acum, B, C, states, dy, dfinal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _ssd_kernel(x, dt, acum, B, C, s0, q, interpret):
    y, final, _ = _forward_call(x, dt, acum, B, C, s0, q, interpret)
    return y, final


def _ssd_kernel_fwd(x, dt, acum, B, C, s0, q, interpret):
    y, final, states = _forward_call(x, dt, acum, B, C, s0, q, interpret)
    return (y, final), (x, dt, acum, B, C, states)


def _ssd_kernel_bwd(q, interpret, residuals, cotangents):
    x, dt, acum, B, C, states = residuals
    dy, dfinal = cotangents
    dx, ddt, dacum, db, dc, ds0 = _backward_call(x, dt, acum, B, C, states, dy.astype(x.dtype),
                                                 dfinal.astype(jnp.float32), q, interpret)
    batch, length, width = B.shape
    # Per block of heads -> per group: [b, T, groups, blocks per group, N] summed over the blocks.
    n = dfinal.shape[-1]
    group_sum = lambda g: g.reshape(batch, length, width // n, -1, n).sum(3).reshape(B.shape)  # noqa: E731
    return dx, ddt, dacum, group_sum(db).astype(B.dtype), group_sum(dc).astype(C.dtype), ds0


_ssd_kernel.defvjp(_ssd_kernel_fwd, _ssd_kernel_bwd)


# ----------------------------------------------------------------------------------------------------- public
def ssd_pallas(x, dt, A, B, C, chunk_size: int, initial_state=None, *, interpret=None):
    """`mamba2.ssd_chunked` through the fused kernels: same arguments and results (y in fp32).

    x, B, C may be bf16 (the matmuls then run in bf16 with fp32 accumulation; decays and states are fp32); dt and A
    are used in fp32. Any length: the last chunk runs as if padded with dt = 0 (decay 1, no input), as the
    reference pads it. `interpret`: run in Pallas' TPU interpreter (default: unless the target is a
    TPU), or pltpu.InterpretParams to configure it.
    """
    batch, length, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    q = chunk_size
    nc = -(-length // q)
    # Per-token vectors as rows [b, chunks, heads, Q], dt padded with zeros to whole chunks (decay 1, no input);
    # a_cum the chunk-local cumulative sum of dt·A (XLA's, and so its gradient). They are 1/headdim of x's size.
    dt = jnp.pad(dt.astype(jnp.float32), [(0, 0), (0, nc * q - length), (0, 0)])
    dt = jnp.moveaxis(dt.reshape(batch, nc, q, heads), 2, 3)
    acum = jnp.cumsum(dt * A.astype(jnp.float32)[:, None], axis=-1)
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, head_dim, n), jnp.float32)
    initial_state = initial_state.astype(jnp.float32)
    # x [b, T, h·P] and B, C [b, T, g·N]: the model's own layouts (free reshapes), not padded: the kernels mask the
    # last chunk's overhang. (Padding them cost a copy of each in HBM, and on a TPU XLA laid the padded
    # [b, T, h, P] out sequence-minor, adding a transpose before the kernels and one after.)
    x = x.reshape(batch, length, heads * head_dim)
    B, C = (t.astype(x.dtype).reshape(batch, length, groups * n) for t in (B, C))
    interpret = _interpret(interpret)
    run = lambda *a: _ssd_kernel(*a, q, interpret)  # noqa: E731

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        batch_axes = layers._mesh_axes("activation_batch", batch, mesh)
        # Heads split only where each head has its own group (ngroups = 1 shares B and C across every head).
        heads_axes = layers._mesh_axes("ssm_heads", heads, mesh) if groups == heads else None
        tok = jax.P(batch_axes, None, heads_axes)
        vec = jax.P(batch_axes, None, heads_axes, None)
        state = jax.P(batch_axes, heads_axes, None, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(tok, vec, vec, tok, tok, state), out_specs=(tok, state),
                            check_vma=False)
    y, final = run(x, dt, acum, B, C, initial_state)
    return y.reshape(batch, length, heads, head_dim).astype(jnp.float32), final
