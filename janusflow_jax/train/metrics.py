"""What a run reports: progress lines, TensorBoard scalars and metrics.jsonl (process 0 only), and the loss-curve PNG
at the end. MFU is counted as in `perf/flops.py`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax


class Reporter:
    """Progress lines, TensorBoard scalars and metrics.jsonl (process 0 only); the loss-curve PNG at the end."""

    def __init__(self, workdir: Path, flops_per_step: float, peak_flops: float, tokens_per_step: int,
                 examples_per_step: int, progress: bool):
        self.active = jax.process_index() == 0
        self.workdir = workdir
        self.flops_per_step, self.peak = flops_per_step, peak_flops
        self.tokens, self.examples = tokens_per_step, examples_per_step
        self.writer = self.bar = None
        if self.active:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tensorboard"))
            self.jsonl = open(workdir / "metrics.jsonl", "a")
        self.progress = progress and self.active

    def start_bar(self, start: int, total: int):
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def step(self, step: int, metrics: dict, step_time: float, log: bool):
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if not log:
            return
        n = jax.device_count()
        tflops = self.flops_per_step / step_time / n / 1e12
        row = dict(step=step, **{k: float(v) for k, v in metrics.items()}, step_time=step_time,
                   examples_per_s=self.examples / step_time, tokens_per_s=self.tokens / step_time,
                   tflops_per_device=tflops, mfu=tflops * 1e12 / self.peak if self.peak else float("nan"))
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for k, v in row.items():
            if k != "step" and math.isfinite(v):  # MFU is NaN where the device's peak is unknown (CPU)
                self.writer.add_scalar(f"train/{k}", v, step)
        line = (f"step {step}: loss {row['loss']:.4f} (ar {row['ar']:.4f} rf {row['rf']:.4f} repa {row['repa']:.4f}) "
                f"lr {row['lr']:.2e} grad_norm {row['grad_norm']:.3f} | {step_time * 1e3:.1f} ms/step "
                + (f"(input {row['input_s'] * 1e3:.1f} ms) " if "input_s" in row else "") +
                f"{row['examples_per_s']:.1f} ex/s {row['tokens_per_s']:.0f} tok/s "
                f"{tflops:.3f} TFLOP/s/device MFU " + (f"{100 * row['mfu']:.2f}%" if self.peak else "n/a"))
        if not row["finite"]:
            line += "  [non-finite: update skipped]"
        (self.bar.write if self.bar is not None else print)(line)

    def close(self):
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self.jsonl.close()
        plot_losses(self.workdir / "metrics.jsonl", self.workdir / "loss_curve.png")


def plot_losses(jsonl: Path, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, key in zip(axes, ("loss", "ar", "rf", "repa")):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
