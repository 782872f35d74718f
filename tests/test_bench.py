"""launch.bench smoke: every mode runs on the tiny config and reports positive numbers (speed is never asserted)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from configs import stage2
from janusflow_jax.perf import bench, bench_report
from janusflow_jax.perf import chips
from janusflow_jax.perf import flops as flops_lib
from janusflow_jax.perf import report as report_lib

HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    # One run of every mode: 1 timed train step (then 3 profiled), 2-step sampling at batch 1, 1 alternating
    # JAX/torch repetition.
    kwargs = dict(label="stage2:tiny", command="pytest", steps=1, warmup=0, batch_sizes=(1,), sample_steps=(2,),
                  cfgs=(2.0,), reps=1, torch_threads=1, profile_dir=str(tmp_path_factory.mktemp("profile")))
    with pytest.MonkeyPatch.context() as patch:
        # A CPU has no HBM bandwidth in the table; a nominal one turns on the roofline of the compiled step.
        patch.setitem(chips.CHIPS, "cpu", chips.Chip(peak_bf16=0.0, hbm_bandwidth=20e9, hbm_bytes=0))
        if HAS_TORCH:
            return bench.run("all", stage2.get_config("tiny"), **kwargs)
        out = bench.run("train", stage2.get_config("tiny"), **kwargs)
        out["sample"] = bench.run("sample", stage2.get_config("tiny"), **{**kwargs, "profile_dir": None})["sample"]
        return out


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow  # the bench report: every mode measured once
def test_meta(report):
    m = report["meta"]
    for key in ("device", "date", "commit", "command", "config", "load_average_start", "load_average_end"):
        assert m[key] not in (None, "")
    assert len(m["load_average_start"]) == 3


@pytest.mark.slow  # the bench report: every mode measured once
def test_train_fields(report):
    t = report["train"]
    for key in ("compile_s", "step_s", "examples_per_s", "tokens_per_s", "flops_per_step", "tflops_per_device",
                "peak_flops_per_device", "mfu", "peak_memory_bytes"):
        assert _positive(float(t[key])), (key, t[key])
    assert t["examples_per_s"] == pytest.approx(t["batch_size"] / t["step_s"])
    assert t["mfu"] == pytest.approx(t["tflops_per_device"] * 1e12 / t["peak_flops_per_device"])
    assert "measured" in t["peak_source"]  # CPU: MFU against a measured matmul peak, labelled so
    assert "RSS" in t["peak_memory_source"]
    # The roofline of the compiled step: a lower bound, so the measured step is slower than it.
    r = t["roofline"]
    assert _positive(r["seconds"]) and r["flops"] > 0 and r["bytes"] > 0
    assert r["measured_over_bound"] == pytest.approx(t["step_s"] / r["seconds"]) and r["measured_over_bound"] > 1
    assert "x the bound" in bench_report.format_report(report)


@pytest.mark.slow  # the bench report: every mode measured once
def test_sample_rows(report):
    rows = report["sample"]
    assert {r["prompt_cache"] for r in rows} == {True, False}
    for r in rows:
        assert r["batch"] == 1 and r["steps"] == 2
        for key in ("compile_s", "latency_s", "images_per_s", "per_image_s", "flops", "tflops_per_device", "mfu"):
            assert _positive(r[key]), (key, r)
        assert r["mfu"] == pytest.approx(r["flops"] / r["latency_s"] / r["peak_flops"])
    cached, full = (next(r["flops"] for r in rows if r["prompt_cache"] is c) for c in (True, False))
    assert cached < full  # the cache skips the prompt at every step but the first
    assert "| MFU |" in bench_report.format_report(report)


def test_sampling_flops_match_the_compiled_sampler():
    """flops.sampling_flops against the matmul and convolution FLOPs of the compiled tiny sampler (roofline.py walks
    the Euler loop by its trip count). They differ only by what the count leaves out or halves: the generation
    towers' depthwise convs (multiply-adds on a CPU) and the masked half of causal attention."""
    import jax.numpy as jnp

    from janusflow_jax.perf import roofline
    from janusflow_jax.inference import sampler

    sb = bench.SampleBench(stage2.get_config("tiny"))
    ids, mask, z0 = (jnp.asarray(x) for x in sb.inputs(2))
    steps = 3
    for cache in (True, False):
        compiled = sampler._sample.lower(sb.model, sb.params, ids, mask, None, z0,
                                         jnp.asarray(sampler.step_times(steps)), 2.0, guided=True,
                                         use_prompt_cache=cache).compile()
        est = roofline.estimate(compiled.as_text(), 1e12, 1e11)
        assert est["unknown_trip_counts"] == 0
        counted = flops_lib.sampling_flops(sb.cfg, 2, steps, sb.prompt_len, guided=True, prompt_cache=cache)
        assert 0.9 < est["flops"] / counted < 1.1, (cache, est["flops"], counted)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
@pytest.mark.slow  # the bench report: every mode measured once
def test_torch_rows(report):
    rows = report["torch"]["rows"]
    assert [r["work"].split(",")[0] for r in rows] == ["velocity forward", "train step", "sampling 2 steps cfg 2",
                                                       "sampling 2 steps cfg 2"]
    for r in rows:
        assert len(r["jax_s_all"]) == len(r["torch_s_all"]) == 1
        assert _positive(r["jax_s"]) and _positive(r["torch_s"])
        assert r["speedup"] == pytest.approx(r["torch_s"] / r["jax_s"])
        assert r["speedup_ceiling"] == pytest.approx(r["torch_s"] * report["torch"]["peak_flops"] / r["jax_flops"])
        assert r["jax_flops"] <= r["torch_flops"] and _positive(r["jax_tflops"]) and _positive(r["torch_tflops"])
    assert rows[2]["jax_flops"] < rows[2]["torch_flops"]  # the prompt cache; the torch loop recomputes the prompt
    assert "speedup ceiling" in bench_report.format_report(report)


@pytest.mark.slow  # the bench report: every mode measured once
def test_outputs_keep_the_other_section(report, tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    other = "# Benchmarks\n\n## Ahead-of-time compile\n\nsomeone else's table\n"
    md.write_text(other)
    path = report_lib.save_json(report, tmp_path / "json")
    assert json.loads(path.read_text())["mode"] == report["mode"]
    bench_report.write_markdown(md, tmp_path / "json")
    first = md.read_text()
    assert first.startswith(other.rstrip("\n")) and first.count(bench_report.BEGIN) == 1
    assert "step ms" in first and "images/s" in first and "Running these on a GPU" in first
    md.write_text(first + "\n## Later section\n")
    bench_report.write_markdown(md, tmp_path / "json")  # rewrites in place, keeps what surrounds the markers
    again = md.read_text()
    assert again.count(bench_report.BEGIN) == 1 and again.endswith("## Later section\n") and "someone else's" in again


def test_bad_requests():
    with pytest.raises(bench.BenchError, match="unknown mode 'fast'"):
        bench.run("fast", stage2.get_config("tiny"), label="x")
    with pytest.raises(bench.BenchError, match="batch sizes >= 1"):
        bench.run("sample", stage2.get_config("tiny"), label="x", batch_sizes=(0,))
    with pytest.raises(bench.BenchError, match="profiles the train step"):
        bench.run("sample", stage2.get_config("tiny"), label="x", profile_dir="/tmp/unused")


def test_cli_bad_mode_is_one_line():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "launch.bench", "fast", "--config=stage2:tiny"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error: give exactly one mode")
    assert "Traceback" not in out.stderr


def test_vae_mode_reports_encode_and_decode_rows():
    from janusflow_jax.models.vae import VAEConfig

    small = VAEConfig(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1)  # the SDXL one compiles 10 s
    rows = bench.bench_vae(batch_sizes=(1,), image_size=16, dtypes=("float32",), reps=1, config=small)
    assert [(r["op"], r["dtype"], r["batch"], r["image_size"]) for r in rows] == [
        ("encode", "float32", 1, 16), ("decode", "float32", 1, 16)]
    assert all(_positive(r["images_per_s"]) and _positive(r["latency_s"]) for r in rows)
    text = bench_report.format_report({"mode": "vae", "meta": {"config": "x", "date": "d", "device": "cpu", "cpu_count": 2,
                                                       "commit": "c", "load_average_start": [0, 0, 0],
                                                       "jax": "j", "command": "c"}, "vae": rows})
    assert "| encode | float32 | 1 | 16² |" in text
    with pytest.raises(bench.BenchError):
        bench.bench_vae(batch_sizes=(0,))


def test_train_profile(report):
    """The profiled steps: op time is found, classed (the step's matmuls are matmuls) and traced back to modules."""
    from janusflow_jax.perf import profile

    p = report["train"]["profile"]
    assert Path(p["trace"]).exists() and p["source"].startswith("host")  # a CPU: no device timeline
    assert _positive(p["op_seconds"]) and _positive(p["kinds"]["matmul"]["seconds"])
    assert math.isclose(sum(k["seconds"] for k in p["kinds"].values()), p["op_seconds"], rel_tol=1e-9)
    assert {r["kind"] for r in p["ops"]} <= set(profile.CATEGORIES)
    assert any(r["scope"].startswith(("language_model", "gen_decoder", "gen_encoder")) for r in p["ops"])
    assert "| matmul |" in bench_report.format_report(report)


def test_hlo_ops_are_classed_by_what_they_compute():
    import jax
    import jax.numpy as jnp

    from janusflow_jax.perf import profile

    def f(a, w, x):
        y = jnp.dot(a, w)
        return y / jnp.sum(y, axis=1, keepdims=True), jnp.sin(a) * 2.0, jax.lax.conv_general_dilated(
            x, w[:3, :3, None, None].repeat(2, 2).repeat(2, 3)[..., :2, :2], (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    a = jnp.ones((32, 32))
    text = jax.jit(f).lower(a, a, jnp.ones((1, 8, 8, 2))).compile().as_text()
    info = profile.parse_hlo([text])
    kinds = {v["kind"] for v in info.values()}
    assert {"matmul", "convolution", "elementwise"} <= kinds, info
    assert all(v["kind"] == "matmul" for v in info.values() if v["opcode"] == "dot")
    # XLA:TPU writes matmuls as convolutions without a spatial window: those are matmuls; a 7x7 one is not.
    def conv(attributes):
        return profile._kind_of("convolution", "  %c = bf16[8,16]{1,0} convolution(%a, %b), " + attributes, {})

    assert conv("dim_labels=bf_io->bf") == "matmul"
    assert conv("window={size=1}, dim_labels=0bf_io0->0bf") == "matmul"
    assert conv("window={size=7x7 pad=3_3x3_3}, dim_labels=b01f_01io->b01f") == "convolution"
    # A weight gradient: the window covers the whole (size-3) input dimension, so the output's is 1.
    line = "  %c = bf16[8,16,1]{2,1,0} convolution(%a, %b), window={size=3}, dim_labels=0fb_0io->bf0"
    assert profile._kind_of("convolution", line, {}) == "matmul"
    # An einsum into heads as XLA:TPU writes it: the window slides over a size-1 input dimension padded to the window.
    line = ("  %c = bf16[26,705,16,128]{3,1,2,0} convolution(%a, %b), window={size=1x16 pad=0_0x15_15 rhs_reversal=0x1}, "
            "dim_labels=0bf1_i1o0->0b1f")
    assert profile._kind_of("convolution", line, {}, lhs_shape="bf16[26,705,2048,1]") == "matmul"
    assert profile._kind_of("convolution", line, {}, lhs_shape="bf16[26,705,2048,16]") == "convolution"


def test_device_timeline_counts_kernels_only(tmp_path):
    """With a device in the trace (as on a GPU/TPU) only its kernel rows count: not the host's op thunks, not the
    whole-module row; kernels without an hlo_op tag count under their own name."""
    import gzip

    from janusflow_jax.perf import profile

    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7"}},
            {"ph": "M", "pid": 2, "tid": 8, "name": "thread_name", "args": {"name": "XLA Modules"}}]
    spans = [{"ph": "X", "pid": 1, "tid": 3, "ts": 0, "dur": 500.0, "name": "thunk", "args": {"hlo_op": "fusion.1"}},
             {"ph": "X", "pid": 2, "tid": 8, "ts": 0, "dur": 900.0, "name": "jit_step", "args": {}},
             {"ph": "X", "pid": 2, "tid": 7, "ts": 0, "dur": 600.0, "name": "sm90_gemm", "args": {"hlo_op": "dot.2"}},
             {"ph": "X", "pid": 2, "tid": 7, "ts": 600, "dur": 200.0, "name": "loop_add_fusion",
              "args": {"hlo_op": "add_fusion"}},
             {"ph": "X", "pid": 2, "tid": 7, "ts": 800, "dur": 100.0, "name": "memcpy_kernel", "args": {}}]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + spans}, f)
    hlo = """HloModule m

%fused_add (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %add.1 = f32[4]{0} add(%p, %p), metadata={op_name="jit(step)/jvp(JanusFlow)/gen_decoder/add"}
}

ENTRY %main (a: f32[4,4], b: f32[4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[4]{0} parameter(1)
  %dot.2 = f32[4,4]{1,0} dot(%a, %a), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/language_model/layers_0/mlp/dot_general"}
  ROOT %add_fusion = f32[4]{0} fusion(%b), kind=kLoop, calls=%fused_add
}
"""
    s = profile.summarize(path, calls=2, hlo_texts=[hlo])
    assert s["source"] == "device timeline"
    assert s["op_seconds"] == pytest.approx(450e-6)  # (600 + 200 + 100) us over 2 calls
    assert s["kinds"]["matmul"]["seconds"] == pytest.approx(300e-6)
    assert s["kinds"]["elementwise"]["seconds"] == pytest.approx(100e-6)
    assert s["kinds"]["data movement"]["seconds"] == pytest.approx(50e-6)  # untagged: classed by its name
    ops = {r["op"]: r for r in s["ops"]}
    assert set(ops) == {"dot.2", "add_fusion", "memcpy_kernel"}
    assert ops["dot.2"]["scope"] == "language_model/layers_0/mlp/dot_general"


def test_loop_spans_are_not_counted_twice(tmp_path):
    """A scanned model's while loop shows as one span around its body's ops (on a CPU): only the ops count."""

    import jax
    import jax.numpy as jnp

    from janusflow_jax.perf import profile

    def f(x):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ c), None), x, None, length=4)[0]

    fn = jax.jit(f)
    x = jnp.ones((128, 128))
    compiled = fn.lower(x).compile()
    jax.block_until_ready(compiled(x))
    s = profile.summarize(profile.trace(lambda: compiled(x), 2, tmp_path), 2, [compiled.as_text()])
    info = profile.parse_hlo([compiled.as_text()])
    assert any(v["opcode"] == "while" for v in info.values())
    assert all(info.get(r["op"], {}).get("opcode") != "while" for r in s["ops"])
    assert s["kinds"]["matmul"]["seconds"] > 0


def test_data_mode_times_the_loader_alone():
    report = bench.run("data", stage2.get_config("tiny"), label="stage2:tiny", steps=3, warmup=1)
    d = report["data"]
    assert d["source"] == "synthetic" and d["batches"] == 3 and d["rows_per_batch"] == sum(d["sub_batches"].values())
    assert _positive(d["examples_per_s"]) and _positive(d["megabytes_per_s"]) and d["bytes_per_batch"] > 0
    assert "examples/s" in bench_report.format_report(report) and "train" not in report


def test_a_profiler_failure_keeps_the_timings(report, monkeypatch, tmp_path):
    import copy
    import types

    from janusflow_jax.perf import profile

    def broken(*args, **kwargs):
        raise RuntimeError("no CUPTI")

    monkeypatch.setattr(profile, "trace", broken)
    stand_in = types.SimpleNamespace(step=lambda: None, _compiled=None)  # the trace fails before either is used
    assert bench.profile_train(stand_in, 3, tmp_path) == {"error": "RuntimeError: no CUPTI"}
    failed = copy.deepcopy(report)
    failed["train"]["profile"] = {"error": "RuntimeError: no CUPTI"}
    text = bench_report.format_report(failed)
    assert "Profile failed: RuntimeError: no CUPTI" in text and "step ms (median)" in text
