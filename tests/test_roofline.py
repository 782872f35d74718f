"""The roofline of a compiled program (janusflow_jax/perf/roofline.py): FLOPs and HBM bytes of every kernel, read from
XLA's optimized HLO, with while loops counted by their trip counts. Checked on small CPU-compiled programs whose
counts are known by hand, plus hand-written HLO for what only GPU programs contain (cuDNN calls)."""

import jax
import jax.numpy as jnp
import pytest

from janusflow_jax.perf import roofline

PEAK, BANDWIDTH = 100e12, 1e12


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def test_a_matmul_is_counted_by_its_flops_and_bytes():
    a, b = jnp.ones((256, 512), jnp.float32), jnp.ones((512, 128), jnp.float32)
    est = roofline.estimate(_hlo(lambda x, y: x @ y, a, b), PEAK, BANDWIDTH)
    assert est["flops"] == 2 * 256 * 512 * 128
    assert est["kinds"]["matmul"]["flops"] == est["flops"]
    # Reads both operands and writes the product, once.
    assert est["kinds"]["matmul"]["bytes"] == pytest.approx(4 * (256 * 512 + 512 * 128 + 256 * 128))
    # fp32 operands run at the TF32 rate (half the bf16 peak) by default; this matmul is memory-bound at 1 TB/s.
    bound = max(est["flops"] / (PEAK / 2), est["kinds"]["matmul"]["bytes"] / BANDWIDTH)
    assert est["kinds"]["matmul"]["seconds"] == pytest.approx(bound)


def test_a_scanned_body_counts_once_per_iteration_and_stacked_writes_count_their_slice():
    layers, rows, width = 6, 64, 128
    w = jnp.ones((layers, width, width), jnp.float32)
    x = jnp.ones((rows, width), jnp.float32)

    def f(x, w):
        def body(h, wl):
            h = jnp.tanh(h @ wl)
            return h, h  # the stacked output: [layers, rows, width], written one layer per iteration

        return jax.lax.scan(body, x, w)

    est = roofline.estimate(_hlo(f, x, w), PEAK, BANDWIDTH)
    assert est["flops"] == layers * 2 * rows * width * width
    matmuls = [k for k in roofline.kernels(_hlo(f, x, w)) if k["flops"]]
    assert matmuls and all(k["runs"] == layers for k in matmuls)
    # Every iteration reads its layer's weights (a slice of the stacked weights) and writes its slice of the stacked
    # output in place: no kernel in the loop is charged a whole stacked buffer (the smaller one, the stacked output,
    # has 4 * layers * rows * width bytes).
    in_loop = [k for k in roofline.kernels(_hlo(f, x, w)) if k["runs"] == layers]
    assert in_loop and max(k["bytes"] for k in in_loop) < 4 * layers * rows * width


def test_hand_written_cudnn_calls():
    # cuDNN flash attention (forward, causal) and a depthwise convolution's backward-filter call, as XLA:GPU prints
    # them (shapes and the attributes the roofline reads).
    hlo = """HloModule m, entry_computation_layout={()->f32[]}

ENTRY %main (q: bf16[2,256,4,64], k: bf16[2,256,4,64], v: bf16[2,256,4,64], x: bf16[2,16,16,32], dy: bf16[2,16,16,32]) -> f32[] {
  %q = bf16[2,256,4,64]{3,2,1,0} parameter(0)
  %k = bf16[2,256,4,64]{3,2,1,0} parameter(1)
  %v = bf16[2,256,4,64]{3,2,1,0} parameter(2)
  %x = bf16[2,16,16,32]{3,2,1,0} parameter(3)
  %dy = bf16[2,16,16,32]{3,2,1,0} parameter(4)
  %fmha = (bf16[2,4,256,64]{3,1,2,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config": {"intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["2", "4", "256", "256"]}, "mask_type": "CAUSAL"}}
  %dw = (bf16[32,3,3,1]{3,2,1,0}, u8[0]{0}) custom-call(%x, %dy), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, feature_group_count=32, custom_call_target="__cudnn$convBackwardFilter"
  ROOT %c = f32[] constant(0)
}
"""
    kernels = {k["name"]: k for k in roofline.kernels(hlo)}
    assert kernels["fmha"]["flops"] == 4 * 2 * 4 * 256 * 256 * 64 / 2  # causal: half the square
    # 9 taps per output element, less those on the zero padding (as XLA counts): 46 of 16 x 3 per dimension.
    assert kernels["dw"]["flops"] == pytest.approx(2 * (2 * 16 * 16 * 32) * 9 * (46 / 48) ** 2)
    assert kernels["fmha"]["bytes"] == 4 * 2 * 256 * 4 * 64 * 2  # q, k, v in, the output out
    est = roofline.estimate(hlo, PEAK, BANDWIDTH)
    assert set(est["kinds"]) == {"attention", "convolution"}
    text = roofline.format_estimate(est, measured_seconds=2 * est["seconds"])
    assert "| attention |" in text and "2.00x the bound" in text


def test_tpu_on_chip_buffers_move_no_hbm_bytes():
    # XLA:TPU prefetches an operand into VMEM (memory space S(1)) with copy-start/copy-done; the fusion then reads it
    # from there. HBM sees the copy's read once, the fusion's other operand and its result; not the VMEM side.
    t = "{1,0:T(8,128)(2,1)}"
    v = "{1,0:T(8,128)(2,1)S(1)}"
    hlo = f"""HloModule m, entry_computation_layout={{()->f32[]}}

%fused (p0: bf16[1024,1024], p1: bf16[1024,1024]) -> bf16[1024,1024] {{
  %p0 = bf16[1024,1024]{v} parameter(0)
  %p1 = bf16[1024,1024]{t} parameter(1)
  ROOT %add = bf16[1024,1024]{t} add(%p0, %p1)
}}

ENTRY %main (a: bf16[1024,1024], b: bf16[1024,1024]) -> bf16[1024,1024] {{
  %a = bf16[1024,1024]{t} parameter(0)
  %b = bf16[1024,1024]{t} parameter(1)
  %cs = (bf16[1024,1024]{v}, bf16[1024,1024]{t}, u32[]{{:S(2)}}) copy-start(%a)
  %cd = bf16[1024,1024]{v} copy-done(%cs)
  %f = bf16[1024,1024]{t} fusion(%cd, %b), kind=kLoop, calls=%fused
  ROOT %again = (bf16[1024,1024]{v}, bf16[1024,1024]{t}, u32[]{{:S(2)}}) copy-start(%f)
}}
"""
    mb = 2 * 1024 * 1024
    kernels = {k["name"]: k["bytes"] for k in roofline.kernels(hlo)}
    assert kernels == {"cs": mb, "f": 2 * mb, "again": mb}
    assert roofline.hbm_bytes(f"(bf16[1024,1024]{v}, bf16[1024,1024]{t})") == mb


def test_a_tpu_einsum_into_heads_is_a_matmul_of_its_real_taps():
    # XLA:TPU writes x @ W with W reshaped to heads as a convolution whose window slides over a size-1 input
    # dimension padded to the window: of the 16 taps per output position only one reads the input.
    hlo = """HloModule m, entry_computation_layout={()->f32[]}

ENTRY %main (x: bf16[26,705,2048,1], w: bf16[2048,16,128,1]) -> bf16[26,705,16,128] {
  %x = bf16[26,705,2048,1]{2,1,3,0} parameter(0)
  %w = bf16[2048,16,128,1]{2,0,1,3} parameter(1)
  ROOT %q = bf16[26,705,16,128]{3,1,2,0} convolution(%x, %w), window={size=1x16 pad=0_0x15_15 rhs_reversal=0x1}, dim_labels=0bf1_i1o0->0b1f
}
"""
    est = roofline.estimate(hlo, PEAK, BANDWIDTH)
    assert est["flops"] == pytest.approx(2 * 26 * 705 * 2048 * 16 * 128)
    assert set(est["kinds"]) == {"matmul"}


def test_a_conditional_counts_its_heaviest_branch_once():
    n = 128
    x = jnp.ones((n, n), jnp.float32)
    hlo = _hlo(lambda p, x: jax.lax.cond(p, lambda x: jnp.tanh(x @ x) @ x, lambda x: x * 2.0, x), True, x)
    assert "conditional(" in hlo
    est = roofline.estimate(hlo, PEAK, BANDWIDTH)
    assert est["flops"] == 2 * (2 * n ** 3)  # the two matmuls of the heavy branch, once


def test_a_loop_without_a_known_trip_count_reads_its_condition():
    # XLA:TPU does not annotate known_trip_count: the bound the condition compares the counter with stands in,
    # divided by the counter's step (XLA:TPU's windowed einsums, the FSDP matmul loops, run `i < 4` with `i += 2`:
    # counted 4 times, they doubled the roofline's matmul FLOPs; some copy the counter before adding the step) and
    # less its start; a loop with neither is counted once and reported.
    def module(condition, step=1, start=0, copied=False):
        return f"""HloModule m, entry_computation_layout={{()->f32[]}}

%body (p: (s32[], f32[64,64])) -> (s32[], f32[64,64]) {{
  %p = (s32[], f32[64,64]{{1,0}}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[64,64]{{1,0}} get-tuple-element(%p), index=1
  %d = f32[64,64]{{1,0}} dot(%x, %x), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
  %step = s32[] constant({step})
  %ic = s32[] copy(%i)
  %next = s32[] add(%{"ic" if copied else "i"}, %step)
  ROOT %t = (s32[], f32[64,64]{{1,0}}) tuple(%next, %d)
}}

%cond (p: (s32[], f32[64,64])) -> pred[] {{
  %p = (s32[], f32[64,64]{{1,0}}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  {condition}
}}

ENTRY %main (x: f32[64,64]) -> f32[] {{
  %x = f32[64,64]{{1,0}} parameter(0)
  %zero = s32[] constant({start})
  %init = (s32[], f32[64,64]{{1,0}}) tuple(%zero, %x)
  %w = (s32[], f32[64,64]{{1,0}}) while(%init), condition=%cond, body=%body
  ROOT %c = f32[] constant(0)
}}
"""
    less_than_5 = "%n = s32[] constant(5)\n  ROOT %lt = pred[] compare(%i, %n), direction=LT"
    bounded = roofline.estimate(module(less_than_5), PEAK, BANDWIDTH)
    assert bounded["flops"] == 5 * 2 * 64 ** 3 and bounded["unknown_trip_counts"] == 0
    for step, start, trips in ((2, 0, 3), (2, 1, 2), (1, 3, 2), (5, 0, 1)):  # i = 0, 2, 4 / 1, 3 / 3, 4 / 0
        est = roofline.estimate(module(less_than_5, step, start), PEAK, BANDWIDTH)
        assert est["flops"] == trips * 2 * 64 ** 3, (step, start)
    copied = roofline.estimate(module(less_than_5, 2, 0, copied=True), PEAK, BANDWIDTH)
    assert copied["flops"] == 3 * 2 * 64 ** 3
    unbounded = roofline.estimate(module("ROOT %lt = pred[] compare(%i, %i), direction=LT"), PEAK, BANDWIDTH)
    assert unbounded["flops"] == 2 * 64 ** 3 and unbounded["unknown_trip_counts"] == 1
