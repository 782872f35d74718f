"""What a run reports: progress lines, TensorBoard scalars and metrics.jsonl (process 0 only), and the loss-curve PNG
at the end. MFU is counted as in `perf/flops.py`.

The workdir may be local or gs://. An object store has no appends, so there metrics.jsonl is held in memory and
rewritten whole (at most every `UPLOAD_SECONDS`, at every checkpoint and at the end: after a crash it is at least
as new as the newest checkpoint); tensorboardX writes gs:// itself (google-cloud-storage) and the PNG is uploaded as
bytes. A resumed run first drops the rows after the step it resumes from (a killed run logs steps it then loses),
so the file holds each step once.
"""

from __future__ import annotations

import json
import math
import time

import jax
from etils import epath

from janusflow_jax import paths

UPLOAD_SECONDS = 60.0


class JsonLines:
    """metrics.jsonl: appended and flushed row by row on a local disk; on an object store kept in memory and
    rewritten whole by `flush` (at most every `UPLOAD_SECONDS` from `write`). Rows with a step after `start` are
    dropped on opening."""

    def __init__(self, path: epath.Path, start: int):
        self.path, self.remote = path, paths.is_remote(path)
        self.rows: list[dict] = []
        self.dropped: list[dict] = []  # the rows after `start`: steps a resumed run trains again
        if path.exists():
            rows = list(map(json.loads, filter(str.strip, path.read_text().splitlines())))
            self.rows = [row for row in rows if row.get("step", 0) <= start]
            self.dropped = [row for row in rows if row.get("step", 0) > start]
        self._text = "".join(json.dumps(row) + "\n" for row in self.rows)
        self._dirty, self._uploaded = False, time.monotonic()
        if self.remote:
            self._file = None
            self._dirty = True
            self.flush()
        else:
            path.write_text(self._text)  # the kept rows, then appends
            self._file = path.open("a")

    def write(self, row: dict):
        self.rows.append(row)
        line = json.dumps(row) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
            return
        self._text += line
        self._dirty = True
        if time.monotonic() - self._uploaded >= UPLOAD_SECONDS:
            self.flush()

    def flush(self):
        if self._file is not None:
            self._file.flush()
        elif self._dirty:
            self.path.write_text(self._text)
            self._dirty, self._uploaded = False, time.monotonic()

    def close(self):
        self.flush()
        if self._file is not None:
            self._file.close()


class Reporter:
    """Progress lines, TensorBoard scalars and metrics.jsonl (process 0 only); the loss-curve PNG at the end."""

    def __init__(self, workdir, peak_flops: float, examples_per_step: int, progress: bool, start: int = 0,
                 types: tuple[str, ...] = (), terms: tuple[str, ...] = ("ar", "rf", "repa")):
        self.active = jax.process_index() == 0
        self.workdir = workdir = epath.Path(workdir)
        self.peak, self.examples, self.types, self.terms = peak_flops, examples_per_step, types, terms
        self.writer = self.bar = None
        if self.active:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tensorboard"))  # a gs:// URL as itself
            self.jsonl = JsonLines(workdir / "metrics.jsonl", start)
        self.progress = progress and self.active

    def start_bar(self, start: int, total: int):
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def say(self, line: str):
        """One line for the user (process 0), above the progress bar when there is one."""
        if self.active:
            self.bar.write(line) if self.bar is not None else print(line, flush=True)

    def step(self, step: int, metrics: dict, step_time: float, counts: dict, rows: dict, log: bool):
        """One finished step: its metrics, wall time, counted work (`flops.step_counts`: "flops", "tokens") and the
        rows of each data type trained so far (`Mixture.rows_after`), logged as the realised mix `mix_<type>` (% of
        all rows)."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if not log:
            return
        n = jax.device_count()
        tflops = counts["flops"] / step_time / n / 1e12
        all_rows = max(sum(rows.values()), 1)
        mix = {f"mix_{t}": 100.0 * rows.get(t, 0) / all_rows for t in self.types}
        row = dict(step=step, **{k: float(v) for k, v in metrics.items()}, step_time=step_time,
                   examples_per_s=self.examples / step_time, tokens_per_s=counts["tokens"] / step_time,
                   tflops_per_device=tflops, mfu=tflops * 1e12 / self.peak if self.peak else float("nan"), **mix)
        self.jsonl.write(row)
        for k, v in row.items():
            if k != "step" and math.isfinite(v):  # MFU is NaN where the device's peak is unknown (CPU)
                self.writer.add_scalar(f"train/{k}", v, step)
        terms = " ".join(f"{t} {row[t]:.4f}" for t in self.terms if t in row)
        line = (f"step {step}: loss {row['loss']:.4f}, the reweighted total of ({terms}) "
                f"lr {row['lr']:.2e} grad_norm {row['grad_norm']:.3f} | {step_time * 1e3:.1f} ms/step "
                + (f"(input {row['input_s'] * 1e3:.1f} ms) " if "input_s" in row else "") +
                f"{row['examples_per_s']:.1f} ex/s {row['tokens_per_s']:.0f} tok/s "
                f"{tflops:.3f} TFLOP/s/device MFU " + (f"{100 * row['mfu']:.2f}%" if self.peak else "n/a")
                + (" | mix " + " ".join(f"{t} {mix[f'mix_{t}']:.1f}%" for t in self.types) if mix else ""))
        if not row["finite"]:
            line += "  [non-finite: update skipped]"
        (self.bar.write if self.bar is not None else print)(line)

    @property
    def dropped_rows(self) -> list[dict]:
        """The rows of steps after the resumed step that an earlier launch logged (process 0; [] elsewhere)."""
        return self.jsonl.dropped if self.active else []

    def flush(self):
        """Brings metrics.jsonl and the TensorBoard events up to date (an object store otherwise sees them late)."""
        if self.active:
            self.jsonl.flush()
            self.writer.flush()

    def close(self):
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self.jsonl.close()
        plot_losses(self.jsonl.rows, self.workdir / "loss_curve.png", self.terms)


# `loss` is what the step differentiates: each term weighed by its rows this step over its expected rows, summed
# (train/step.py), so it is not the sum of the logged per-row term means.
LOSS_TITLE = "loss (reweighted total of the terms)"


def plot_losses(rows: list[dict], out, terms=("ar", "rf", "repa")):
    """The loss curves (total and each term) of metrics rows as a PNG at `out` (local or gs://)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    keys = ("loss", *terms)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    for ax, key in zip(axes, keys):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows])
        ax.set_title(LOSS_TITLE if key == "loss" else f"{key} (mean per row)")
        ax.set_xlabel("step")
    fig.tight_layout()
    paths.save_figure(fig, out, dpi=100)
    plt.close(fig)
