"""Goodput: where a launch's wall time went, in the buckets of the ML Goodput Measurement library (MaxText's goodput
recorder): productive time (the launch's time outside the buckets below: the steps), and badput

    tpu_initialization                    the launch to a ready plan (mesh, model, optimizer, checkpoint manager)
    training_prep                         the first parameters: initialised, or restored from the run's checkpoint
    program_startup                       compiling the step programs (from the persistent cache where it has them)
    data_loading_sync                     the host waiting for batches (every step's `input_s`)
    unproductive_checkpoint_save_time     the loop blocked on saving checkpoints
    wasted_progress_from_disruption       steps the previous launch trained past the checkpoint this one resumed
                                          from: done again, so lost (their logged step times)
    other                                 the evaluators' runs (the log calls it "evaluation")

The first step's row in metrics.jsonl carries the time to it (`time_to_first_step_s`, split into `init_s`,
`restore_s` or `init_params_s`, `compile_s`, `first_batch_s`, and the programs the cache served: `compile_cached`,
`compile_compiled`); a row after a save carries `checkpoint_save_s`. At exit the launch's totals go to
`goodput.jsonl` (a row per launch), to TensorBoard (`goodput/<bucket>_s`, `goodput/goodput_percent`) and to the log
in one line.
"""

from __future__ import annotations

import json
import time

from etils import epath

from janusflow_jax.train.compilation_cache import Counter

BUCKETS = ("tpu_initialization", "training_prep", "program_startup", "data_loading_sync",
           "unproductive_checkpoint_save_time", "wasted_progress_from_disruption", "other")


class Goodput:
    """One launch's time accounting (every host keeps it; process 0 reports it)."""

    def __init__(self):
        self.begin = time.perf_counter()
        self.seconds = dict.fromkeys(BUCKETS, 0.0)
        self.first_step: dict | None = None  # the first step's row fields, until it is logged
        self.resumed = False
        self.lost_steps = 0
        self.cache = Counter().start()
        self._mark = self.begin
        self._saved = 0.0  # checkpoint time not yet put in a row

    def lap(self, bucket: str) -> float:
        """Puts the time since the last lap into `bucket`; returns it."""
        now = time.perf_counter()
        seconds, self._mark = now - self._mark, now
        self.seconds[bucket] += seconds
        return seconds

    def add(self, bucket: str, seconds: float):
        self.seconds[bucket] += seconds
        self._mark = time.perf_counter()

    def saved(self, seconds: float):
        self.add("unproductive_checkpoint_save_time", seconds)
        self._saved += seconds

    def redone(self, dropped_rows: list[dict]):
        """The rows the previous launch logged past the step this one resumes from: their steps are trained again."""
        times = [r["step_time"] for r in dropped_rows if "step_time" in r]
        steps = {r["step"] for r in dropped_rows if "step" in r}
        self.lost_steps = len(steps)
        if times:
            self.seconds["wasted_progress_from_disruption"] += len(steps) * sum(times) / len(times)

    def first_step_done(self, first_batch_s: float) -> str:
        """At the launch's first reported step: its time-to-first-step fields (kept for the next logged row);
        returns the log line."""
        s = self.seconds
        prep = "restore" if self.resumed else "init params"
        self.first_step = dict(time_to_first_step_s=time.perf_counter() - self.begin, init_s=s["tpu_initialization"],
                               compile_s=s["program_startup"], first_batch_s=first_batch_s,
                               compile_cached=self.cache.hits, compile_compiled=self.cache.misses)
        self.first_step["restore_s" if self.resumed else "init_params_s"] = s["training_prep"]
        f = self.first_step
        return (f"first step after {f['time_to_first_step_s']:.1f} s: init {f['init_s']:.1f} s, {prep} "
                f"{s['training_prep']:.1f} s, compile {f['compile_s']:.1f} s ({self.cache.hits} programs from the "
                f"persistent cache, {self.cache.misses} compiled), first batch {first_batch_s:.1f} s")

    def row_fields(self) -> dict:
        """Fields for the next logged metrics row: the time to the first step (once), the checkpoint time since
        the last logged row."""
        out, self.first_step = self.first_step or {}, None
        if self._saved:
            out["checkpoint_save_s"], self._saved = self._saved, 0.0
        return out

    def summary(self, steps_done: int) -> dict:
        """The launch's totals: {bucket}_s, productive_s, total_s, goodput_percent, steps, steps_redone."""
        total = time.perf_counter() - self.begin
        lost_here = sum(v for k, v in self.seconds.items() if k != "wasted_progress_from_disruption")
        productive = max(0.0, total - lost_here)  # the steps themselves (and the logging between them)
        out = {f"{k}_s": v for k, v in self.seconds.items()}
        out.update(productive_s=productive, total_s=total, steps=steps_done, steps_redone=self.lost_steps,
                   goodput_percent=100.0 * productive / max(total + self.seconds["wasted_progress_from_disruption"],
                                                            1e-9))
        return out

    def report(self, workdir, writer, step: int, steps_done: int) -> str:
        """Writes the summary (goodput.jsonl row, TensorBoard scalars at `step`) and returns its one log line."""
        self.cache.stop()
        s = self.summary(steps_done)
        path = epath.Path(workdir) / "goodput.jsonl"
        previous = path.read_text() if path.exists() else ""
        path.write_text(previous + json.dumps(dict(step=step, **s)) + "\n")  # also on an object store (no appends)
        if writer is not None:
            for key, value in s.items():
                writer.add_scalar(f"goodput/{key}", value, step)
        names = dict(tpu_initialization="init", training_prep="restore" if self.resumed else "init params",
                     program_startup="compile", data_loading_sync="data wait",
                     unproductive_checkpoint_save_time="checkpoint save", other="evaluation")
        lost = ", ".join(f"{names[k]} {s[f'{k}_s']:.1f} s" for k in names)
        redone = (f"; {s['steps_redone']} steps redone after the restart ({s['wasted_progress_from_disruption_s']:.1f} "
                  f"s of the previous launch)" if s["steps_redone"] else "")
        return (f"goodput: {s['productive_s']:.1f} s productive of {s['total_s']:.1f} s ({s['goodput_percent']:.1f}%, "
                f"{steps_done} steps); lost: {lost}{redone}")
