"""The long-sequence race's report (`race.run`'s dict) as text: where the race turns (`compare`), the plot of time
and memory against sequence length, the markdown tables, and BENCHMARKS.md's race section rendered from a directory
of race reports (the newest per part). Measuring is `race.py`; what all reports share is `report.py`."""

from __future__ import annotations

import math
from typing import Sequence

from janusflow_jax import paths
from janusflow_jax.perf import report as report_lib
from janusflow_jax.perf.race import DECODE_STEPS, FULL_LAYERS, GIB

NAMES = {"mamba": "OmniMamba (Mamba-2)", "llama": "JanusFlow (Llama)"}

# The paper's numbers (Fig. 1 c/d, one consumer GPU quoted as an RTX 4090; docs/reference.md §9.1).
PAPER_CLAIM = ("OmniMamba's Fig. 1 c/d (total inference time and memory against sequence length 4K-128K, one consumer "
               "GPU, quoted as an RTX 4090): ~10.2x faster than JanusFlow at 100K tokens; more memory than JanusFlow "
               "at 4K-16K; -40% memory against JanusFlow at 100K (the 119.2x and -63% headline numbers are against "
               "Show-o, at 16K and 23K).")


# ------------------------------------------------------------------------------------------------------- summary
def _ok(rows, model, phase, key="seconds"):
    return {r["length"]: r[key] for r in rows if r["model"] == model and r["phase"] == phase
            and r.get("status") == "ok" and r.get(key) is not None}


def compare(rows: list[dict], time_key: str = "seconds") -> dict:
    """Where the race turns: for each phase the ratio Llama / Mamba of time and memory at the longest length both
    reached, the shortest length from which Mamba is faster (time crossover) and from which it needs less memory
    (memory crossover); None where it never is within the lengths both reached."""
    out = {}
    for phase in ("prefill", "decode"):
        tm, tl = _ok(rows, "mamba", phase, time_key), _ok(rows, "llama", phase, time_key)
        mm = {r["length"]: r["memory_bytes"] for r in rows if r["model"] == "mamba" and r["phase"] == phase
              and "memory_bytes" in r}
        ml = {r["length"]: r["memory_bytes"] for r in rows if r["model"] == "llama" and r["phase"] == phase
              and "memory_bytes" in r}
        both_t, both_m = sorted(set(tm) & set(tl)), sorted(set(mm) & set(ml))

        def crossover(a, b, keys):  # first length from which a < b at every longer length
            return next((n for i, n in enumerate(keys) if all(a[k] < b[k] for k in keys[i:])), None)
        out[phase] = {
            "longest_timed": both_t[-1] if both_t else None,
            "time_ratio": tl[both_t[-1]] / tm[both_t[-1]] if both_t else None,
            "time_crossover": crossover(tm, tl, both_t),
            "longest_planned": both_m[-1] if both_m else None,
            "memory_ratio": mm[both_m[-1]] / ml[both_m[-1]] if both_m else None,
            "memory_crossover": crossover(mm, ml, both_m)}
    return out


def plot(reports: Sequence[dict], path) -> None:
    """Time and memory against sequence length, log-log, both models (matplotlib, imported here only): one panel
    per (phase, quantity) for the CPU sweep and each AOT target found in `reports`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for report in reports:
        if report.get("sweep"):
            where = f"CPU, {report['race']['mamba_layers']}/{report['race']['llama_layers']} layers"
            panels.append((f"time ({where})", report["sweep"], "time"))
            panels.append((f"memory plan ({where})", report["sweep"], "memory"))
        for target, rows in (report.get("aot") or {}).items():
            panels.append((f"roofline time ({target}, full depth)", rows, "time"))
            panels.append((f"memory plan ({target}, full depth)", rows, "memory"))
    if not panels:
        return
    cols = 2
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(11, 3.6 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    styles = {("mamba", "prefill"): ("tab:green", "-"), ("mamba", "decode"): ("tab:green", "--"),
              ("llama", "prefill"): ("tab:red", "-"), ("llama", "decode"): ("tab:red", "--")}
    for ax, (title, rows, quantity) in zip(axes.flat, panels):
        for (model, phase), (color, line) in styles.items():
            if quantity == "time":
                roofline = any("roofline_s" in r for r in rows)
                key = {(False, "prefill"): "seconds", (False, "decode"): "per_token_s",
                       (True, "prefill"): "roofline_s", (True, "decode"): "roofline_per_token_s"}[roofline, phase]
                pts = _ok(rows, model, phase, key)
            else:
                pts = {r["length"]: r["memory_bytes"] / GIB for r in rows if r["model"] == model
                       and r["phase"] == phase and "memory_bytes" in r}
            if pts:
                xs = sorted(pts)
                label = f"{NAMES[model]} {phase}" + (" (per token)" if quantity == "time" and phase == "decode" else "")
                ax.plot(xs, [pts[x] for x in xs], line, color=color, marker="o", ms=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("seconds" if quantity == "time" else "GiB")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Mamba-2 (OmniMamba) vs Llama (JanusFlow) at d_model 2048. Paper (RTX 4090): ~10.2x faster at 100K; "
                 "more memory below 16K; -40% memory at 100K", fontsize=9)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=110)
    plt.close(fig)

# -------------------------------------------------------------------------------------------------------- report
RACE_BEGIN, RACE_END = "<!-- race:begin -->", "<!-- race:end -->"
PLOT_NAME = "race.png"


def _cell(rows, model, phase, length, key, scale=1.0, digits=3) -> str:
    row = next((r for r in rows if r["model"] == model and r["phase"] == phase and r["length"] == length), None)
    if row is None:
        return ""
    if row.get("status") == "ok" and row.get(key) is not None:
        return f"{row[key] * scale:.{digits}g}"
    status = row.get("status", "")
    return ("OOM" if status.startswith("out of memory") else "mem budget" if "memory budget" in status
            else "time budget" if "time budget" in status else "n/a")


def _ratio(rows, phase, length, key) -> str:
    a, b = (next((r.get(key) for r in rows if r["model"] == m and r["phase"] == phase and r["length"] == length
                  and r.get("status") == "ok"), None) for m in ("llama", "mamba"))
    return f"{a / b:.2f}x" if a and b else ""


def _mem(rows, model, phase, length) -> str:
    row = next((r for r in rows if r["model"] == model and r["phase"] == phase and r["length"] == length), None)
    return f"{row['memory_bytes'] / GIB:.3g}" if row and "memory_bytes" in row else "n/a"


def _batch(rows, model, length) -> str:
    fits = [r.get("largest_batch") for r in rows if r["model"] == model and r["length"] == length]
    return str(min(fits)) if fits and None not in fits else "n/a"


def _summary(c: dict, what: str) -> str:
    parts = []
    for phase, s in c.items():
        t = (f"{phase}: Llama/Mamba time {s['time_ratio']:.2f}x at {s['longest_timed']} tokens, Mamba faster from "
             f"{s['time_crossover'] or 'no length reached'}" if s["time_ratio"] else f"{phase}: no common timed length")
        m = (f"; Mamba/Llama memory {s['memory_ratio']:.2f} at {s['longest_planned']}, Mamba smaller from "
             f"{s['memory_crossover'] or 'no length reached'}" if s["memory_ratio"] else "")
        parts.append(t + m)
    return f"{what}: " + "; ".join(parts) + "."


def format_sweep(report: dict) -> list[str]:
    r, rows = report["race"], report["sweep"]
    lengths = sorted({x["length"] for x in rows})
    lines = [f"**CPU sweep** at reduced depth: Mamba-2 {r['mamba_layers']} of 48 layers, Llama {r['llama_layers']} of "
             f"24 (the same block parameters when Mamba has twice Llama's layers), d_model {r.get('width', 2048)}, "
             f"{r['dtype']}, "
             f"batch {r['batch']}, attention {r['attention']} (XLA on a CPU). Time: median of timed calls after the "
             f"compiling one; decode = {DECODE_STEPS} greedy steps in one compiled loop, per token. Memory: XLA's "
             f"plan of each program (GiB; parameters included); largest batch: computed from the plans at batch 1 "
             f"and 2 against this host's {r['capacity_bytes'] / GIB:.0f} GiB of RAM (never allocated). Points whose "
             f"plan passed {r['memory_budget'] / GIB:.0f} GiB ('mem budget') or whose predicted time passed "
             f"{r['time_budget']:g} s ('time budget') were not run.", "",
             "| tokens | prefill s Mamba | prefill s Llama | Llama/Mamba | decode ms/token Mamba | decode ms/token "
             "Llama | Llama/Mamba | memory GiB prefill M / L | memory GiB decode M / L | largest batch M / L |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in lengths:
        lines.append(f"| {n:,} | {_cell(rows, 'mamba', 'prefill', n, 'seconds')} | "
                     f"{_cell(rows, 'llama', 'prefill', n, 'seconds')} | {_ratio(rows, 'prefill', n, 'seconds')} | "
                     f"{_cell(rows, 'mamba', 'decode', n, 'per_token_s', 1e3)} | "
                     f"{_cell(rows, 'llama', 'decode', n, 'per_token_s', 1e3)} | "
                     f"{_ratio(rows, 'decode', n, 'per_token_s')} | {_mem(rows, 'mamba', 'prefill', n)} / "
                     f"{_mem(rows, 'llama', 'prefill', n)} | {_mem(rows, 'mamba', 'decode', n)} / "
                     f"{_mem(rows, 'llama', 'decode', n)} | {_batch(rows, 'mamba', n)} / {_batch(rows, 'llama', n)} |")
    lines += ["", _summary(compare(rows), "Measured on this CPU"), ""]
    return lines


def format_aot(target: str, rows: list[dict]) -> list[str]:
    kind = rows[0]["device_kind"] if rows else target
    hbm = rows[0]["hbm_bytes"] if rows else 0
    lengths = sorted({x["length"] for x in rows})
    lines = [f"**{target}** ({kind}, {hbm / GIB:.0f} GiB), full depth (48 / 24 layers), bf16 parameters and compute, "
             "compiled ahead of time with no device: XLA's memory plan (GiB) and the roofline time estimate "
             "(`roofline.py`: every kernel at max(FLOPs / peak, bytes / HBM bandwidth), a lower bound).", "",
             "| tokens | prefill ms Mamba | prefill ms Llama | Llama/Mamba | decode ms/token Mamba | decode ms/token "
             "Llama | Llama/Mamba | memory GiB prefill M / L | memory GiB decode M / L | largest batch M / L | "
             "fused attention calls (prefill L) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in lengths:
        fused = next((str(r.get("fused_attention_calls", "")) for r in rows if r["model"] == "llama"
                      and r["phase"] == "prefill" and r["length"] == n), "")
        lines.append(f"| {n:,} | {_cell(rows, 'mamba', 'prefill', n, 'roofline_s', 1e3)} | "
                     f"{_cell(rows, 'llama', 'prefill', n, 'roofline_s', 1e3)} | "
                     f"{_ratio(rows, 'prefill', n, 'roofline_s')} | "
                     f"{_cell(rows, 'mamba', 'decode', n, 'roofline_per_token_s', 1e3)} | "
                     f"{_cell(rows, 'llama', 'decode', n, 'roofline_per_token_s', 1e3)} | "
                     f"{_ratio(rows, 'decode', n, 'roofline_per_token_s')} | {_mem(rows, 'mamba', 'prefill', n)} / "
                     f"{_mem(rows, 'llama', 'prefill', n)} | {_mem(rows, 'mamba', 'decode', n)} / "
                     f"{_mem(rows, 'llama', 'decode', n)} | {_batch(rows, 'mamba', n)} / {_batch(rows, 'llama', n)} | "
                     f"{fused} |")
    lines += ["", _summary(compare(rows, "roofline_s"), f"Compiled for {target} (roofline estimate, prefill; decode "
                                                         "per call)"), ""]
    return lines


def format_image(report: dict) -> list[str]:
    lines = ["**Per image** at each model's shipped settings, batch 1, random weights; the LLMs at the sweep's "
             "reduced depth, towers and image decoders at full size:", "",
             "| model | work | LLM layers | LLM s | decoder s | total s | image | counted LLM GFLOP (this depth / full "
             "depth) |", "|---|---|---|---|---|---|---|---|"]
    for r in report["image"]:
        lines.append(f"| {NAMES[r['model']]} | {r['work']} | {r['layers']} | {r['lm_s']:.3g} | {r['decoder_s']:.3g} | "
                     f"{r['total_s']:.3g} | {r['image_px']}² | {r['counted_lm_flops'] / 1e9:,.0f} / "
                     f"{r['full_depth_lm_flops'] / 1e9:,.0f} |")
    return lines + [""]


def format_report(report: dict) -> str:
    """Markdown of one race report (what the CLI prints and BENCHMARKS.md's race section holds)."""
    m = report["meta"]
    lines = report_lib.header(report, f"### {m['config']} — {m['date']}", shared_host=True)
    if report.get("sweep"):
        lines += format_sweep(report)
    for target, rows in (report.get("aot") or {}).items():
        lines += format_aot(target, rows)
    if report.get("image"):
        lines += format_image(report)
    return "\n".join(lines)


def render_section(json_dir, plot_path=None) -> str:
    """The race section: the newest race report holding each part (sweep, image, each AOT target), newest first,
    and the plot of them (written to `plot_path` when given)."""
    import json

    from etils import epath

    reports = []
    # Oldest first by the time stamp that ends each name (labels differ in length, so whole names do not sort so).
    for path in sorted(epath.Path(json_dir).glob("race_*.json"), key=lambda p: (p.stem.rsplit("_", 1)[-1], p.name)):
        try:
            report = json.loads(path.read_text())
        except ValueError:
            continue
        if report.get("mode") == "race":
            reports.append(report)
    newest, newest_rows = {}, {}
    for report in reports:  # the last one wins
        for part in ["sweep", "image"] + [f"aot:{t}" for t in report.get("aot") or {}]:
            if part.startswith("aot:") or report.get(part):
                newest[part] = report
        for target, rows in (report.get("aot") or {}).items():
            for model in {r["model"] for r in rows}:
                newest_rows[target, model] = (report, [r for r in rows if r["model"] == model])
    # A target's newest report may hold one model only (`--race_models`): the other's rows come from the newest
    # report that has them, and the table says from which commit.
    for part, report in list(newest.items()):
        if not part.startswith("aot:"):
            continue
        target = part[4:]
        merged, borrowed = [], []
        for model in ("mamba", "llama"):
            source, rows = newest_rows.get((target, model), (None, []))
            merged += rows
            if source is not None and source is not report:
                borrowed.append(f"{NAMES[model]} rows from {source['meta']['config']} at commit "
                                f"{source['meta']['commit']} ({source['meta']['date']})")
        if borrowed:
            meta = {**report["meta"], "note": "; ".join(filter(None, [report["meta"].get("note"), *borrowed]))}
            newest[part] = {**report, "meta": meta, "aot": {**report["aot"], target: merged}}
    chosen = list({id(r): r for r in newest.values()}.values())
    chosen.sort(key=lambda r: r["meta"]["date"], reverse=True)
    parts = ["## The long-sequence race: Mamba-2 (OmniMamba) vs Llama (JanusFlow) (`python -m launch.bench race`)", "",
             PAPER_CLAIM + " Not reproduced here: no RTX 4090, and these are the backbones in JAX, not the release's "
             "PyTorch/Triton code. Written by `launch.bench race --update_benchmarks` from `benchmarks/race_*.json` "
             "(the newest per part; older runs stay in those files).",
             ""]
    if plot_path is not None and chosen:
        plot(chosen, plot_path)
        parts += [f"![time and memory against sequence length](benchmarks/{PLOT_NAME})", ""]
    parts += [format_report(r) for r in chosen]
    return "\n".join(parts)


def write_markdown(md_path, json_dir, plot_path=None) -> None:
    """Replaces only the text between RACE_BEGIN and RACE_END in `md_path` (appends the section if absent)."""
    report_lib.replace_section(md_path, RACE_BEGIN, RACE_END, render_section(json_dir, plot_path))
