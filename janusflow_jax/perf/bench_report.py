"""A benchmark report (`bench.run`'s dict) as markdown tables, and BENCHMARKS.md's bench section rendered from a
directory of reports (the newest per mode and config). Measuring is `bench.py`; what all reports share is
`report.py`."""

from __future__ import annotations

import json
import math

from etils import epath

from janusflow_jax.perf import profile as profile_lib
from janusflow_jax.perf import report as report_lib

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
num = report_lib.num


def format_report(report: dict) -> str:
    """Markdown tables of one report (also what the CLI prints)."""
    m = report["meta"]
    lines = report_lib.header(report, f"### `{m['config']}` — {report['mode']} — {m['date']}")
    if "train" in report:
        t = report["train"]
        peak_note = t["peak_source"]
        if "measured" in peak_note:
            peak_note += f": {num(m.get('cpu_peak_flops', float('nan')) / 1e9)} GFLOP/s for the whole CPU"
        lines += ["| batch | sub-batches | seq | compile s | step ms (median) | examples/s | tokens/s | "
                  "TFLOP/s/device | MFU | peak memory |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  f"| {t['batch_size']} | {t['sub_batches']} | {t['seq_len']} | {num(t['compile_s'])} | "
                  f"{num(1e3 * t['step_s'])} | {num(t['examples_per_s'])} | {num(t['tokens_per_s'])} | "
                  f"{num(t['tflops_per_device'])} | {num(100 * t['mfu'])}% | "
                  f"{t['peak_memory_bytes'] / 2 ** 20:.0f} MiB |", "",
                  f"FLOPs {t['flops_note']}; MFU against {peak_note}. Memory: {t['peak_memory_source']}.", ""]
        if t.get("roofline"):
            r = t["roofline"]
            lines += [f"Roofline of the compiled step (`roofline.py`: every kernel's FLOPs and HBM bytes at "
                      f"{num(t['peak_flops_per_device'] / 1e12)} TFLOP/s and {num(r['bandwidth'] / 1e12)} TB/s): "
                      f"{num(1e3 * r['seconds'])} ms (compute-bound kernels {num(1e3 * r['compute_bound_seconds'])} "
                      f"ms, memory-bound {num(1e3 * r['memory_bound_seconds'])} ms); measured step = "
                      f"{r['measured_over_bound']:.2f}x the bound. By kind: "
                      + ", ".join(f"{k} {v:.0%}" for k, v in r["kinds"].items() if v >= 0.005), ""]
        if t.get("profile"):
            lines += [f"Profile failed: {t['profile']['error']}" if "error" in t["profile"]
                      else profile_lib.format_summary(t["profile"], top=12), ""]
    if "sample" in report:
        counted = all("flops" in r for r in report["sample"])  # older reports keep their table (no sampling FLOPs)
        lines += ["| batch | steps | cfg | prompt cache | compile s | latency s | images/s | s/image |"
                  + (" TFLOP/s | MFU |" if counted else ""), "|---|---|---|---|---|---|---|---|" + "---|---|" * counted]
        for r in report["sample"]:
            lines.append(f"| {r['batch']} | {r['steps']} | {r['cfg']:g} | {'on' if r['prompt_cache'] else 'off'} | "
                         f"{num(r['compile_s'])} | {num(r['latency_s'])} | {num(r['images_per_s'])} | "
                         f"{num(r['per_image_s'])} |"
                         + (f" {num(r['tflops_per_device'])} | {num(100 * r['mfu'])}% |" if counted else ""))
        lines += ["", "Latents only: the config carries no VAE, so decoding is not timed."
                  + (" FLOPs: `flops.sampling_flops` (every step's LLM and generation towers on the [cond; uncond] "
                     "rows; the cached prompt once); MFU against the device's bf16 peak (on a CPU: a measured fp32 "
                     "matmul)." if counted else ""), ""]
    if "data" in report:
        d = report["data"]
        lines += ["| source | workers | prefetch | rows per batch | MB per batch | batch ms (median / max) | examples/s "
                  "| MB/s |", "|---|---|---|---|---|---|---|---|",
                  f"| {d['source']} | {d['num_workers']} | {d['prefetch']} | {d['rows_per_batch']} {d['sub_batches']} | "
                  f"{num(d['bytes_per_batch'] / 1e6)} | {num(1e3 * d['batch_s_median'])} / "
                  f"{num(1e3 * d['batch_s_max'])} | {num(d['examples_per_s'])} | {num(d['megabytes_per_s'])} |",
                  "", f"This host's loader alone, {d['batches']} batches after warm-up (rows of {d['seq_len']} "
                  "tokens); compare examples/s with the train step's.", ""]
    if "vae" in report:
        lines += ["| SDXL-VAE | dtype | batch | size | compile s | latency s | images/s |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["vae"]:
            lines.append(f"| {r['op']} | {r['dtype']} | {r['batch']} | {r['image_size']}² | {num(r['compile_s'])} | "
                         f"{num(r['latency_s'])} | {num(r['images_per_s'])} |")
        lines += ["", "Random weights at the SDXL config; encode = the posterior moments (the latent-precompute job's "
                  "work), decode = latents to pixels (the sampler's last stage).", ""]
    if "torch" in report:
        t = report["torch"]
        counted = all("jax_flops" in r for r in t["rows"])
        lines += [f"JAX vs PyTorch {t['torch']} eager on {t.get('torch_device', 'cpu')} ({t['torch_threads']} torch "
                  f"threads; bf16 weights and AdamW state when the config computes in bf16), {t['reps']} alternating "
                  f"repetitions, sampling batch {t['sample_batch']}, train batch {t['train_batch_size']}:", "",
                  "| work | JAX s (median) | PyTorch s (median) | JAX speedup |"
                  + (" JAX TFLOP/s | PyTorch TFLOP/s | speedup ceiling |" if counted else ""),
                  "|---|---|---|---|" + "---|---|---|" * counted]
        for r in t["rows"]:
            lines.append(f"| {r['work']} | {num(r['jax_s'])} | {num(r['torch_s'])} | {r['speedup']:.2f}x |"
                         + (f" {num(r['jax_tflops'])} | {num(r['torch_tflops'])} | "
                            f"{num(r['speedup_ceiling'])}{'x' * math.isfinite(r['speedup_ceiling'])} |"
                            if counted else ""))
        lines.append("")
        if counted:
            lines += ["TFLOP/s: each side's counted FLOPs (`flops.py`) over its time; the JAX prompt cache does less "
                      "work than the torch loop. Speedup ceiling: the PyTorch time over the time the JAX FLOPs would "
                      "take at the device's peak, the most any implementation of the JAX side's algorithm could gain "
                      "here.", ""]
    return "\n".join(lines)


GPU_NOTE = """### Running these on a GPU

`bash benchmarks/gpu_session.sh` runs the 1.3B set on one NVIDIA GPU step by step (the profiled train step, the
same step with the layers unrolled, sample, torch, vae), each in its own process with its own time limit; the summary of
the H200 run is in "One H200" above this section.
"""


def render_section(json_dir) -> str:
    """The text between the markers: the newest report per (mode, config) found in `json_dir`, newest first."""
    latest = {}
    for path in sorted(epath.Path(json_dir).glob("*.json")):
        try:
            report = json.loads(path.read_text())
            key = (report["mode"], report["meta"]["config"])
        except (ValueError, KeyError):
            continue
        if key[0] == "race":  # the race has its own section (`race_report.write_markdown`)
            continue
        latest[key] = report  # names sort by time stamp: the last one wins
    parts = ["## Throughput and sampling speed (`python -m launch.bench`)", "",
             "Written by `launch.bench --update_benchmarks` from the JSON files in `benchmarks/` (the newest per mode "
             "and config, with its date, device and commit; older runs stay in those files). "
             "Speedups are torch time / JAX time from alternating repetitions in one process, so the machine's "
             "load hits both alike; record the load average with every table.", ""]
    # Newest first, what-if runs (a note starting "WHAT-IF": not the repository's code) after the real ones.
    by_date = sorted(latest.values(), key=lambda r: r["meta"]["date"], reverse=True)
    for report in sorted(by_date, key=lambda r: r["meta"].get("note", "").startswith("WHAT-IF")):
        parts.append(format_report(report))
    parts.append(GPU_NOTE)
    return "\n".join(parts)


def write_markdown(md_path, json_dir) -> None:
    """The bench section of `md_path` (between BEGIN and END) rendered from the reports in `json_dir`."""
    report_lib.replace_section(md_path, BEGIN, END, render_section(json_dir))
