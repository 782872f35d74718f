"""The step watchdog: a host on which no step completes in time ends itself, so a hung host does not hang the slice.

jax.distributed's heartbeats come from the coordination agent's own thread: a host stuck in a GCS read, a grain
worker, a checkpoint write or a collective keeps heartbeating while every other host waits for it forever. The
training loop tells the watchdog what it is waiting on (`waiting("data" | "step" | "checkpoint", step)`) and when a
step completes (`completed`); a thread checks the clock. When no step has completed within the bound, the host prints
one line naming itself, the step and what it was waiting on, and exits with `EXIT_CODE`; the coordinator then stops
the other hosts (or their own watchdogs do), and the scheduler's restart (the same command on every host) resumes
from the newest complete checkpoint.

The bound (`config.watchdog`): `seconds` > 0 is fixed; 0 derives it, `step_multiple` times the median of the steps
measured so far, never under `floor_seconds` (the floor alone until a step is measured); < 0 turns the watchdog off.
Compiling and in-training evaluation are not timed (`paused`): their length is not a step's; the first step after
them (and the run's first) is allowed at least the floor and twice the pause, since another host may still be
compiling (or evaluating) and the data readers start then. A host waiting on the step itself (its results: the
collectives that need every host) allows half a bound more, so that a host stuck in its own input or save is the
first to give up and the one that names the cause.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import sys
import threading
import time
from typing import Callable, Iterator

EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure; rerunning the same command resumes
_STEP_GRACE = 1.5  # the bound's multiple for a host waiting on the step (on its peers)


class Watchdog:
    """Watches one host's training loop (see the module docstring). Use as a context manager (starts the thread)."""

    def __init__(self, seconds: float = 0.0, floor_seconds: float = 300.0, step_multiple: float = 20.0,
                 host: str = "", poll_seconds: float = 0.5, exit: Callable[[int], None] = os._exit):
        self.seconds, self.floor, self.multiple = float(seconds), float(floor_seconds), float(step_multiple)
        self.host, self.poll, self._exit = host, poll_seconds, exit
        self._lock = threading.Lock()
        self._last = time.monotonic()  # the last completed step (or the end of the last pause)
        self._measure = False  # whether the next completion measures a step (not the first after a pause)
        self._pause_seconds = 0.0  # how long the last pause lasted
        self._steps: list[float] = []
        self._what, self._step = "the host loop", 0
        self._paused = 0
        self._stop = threading.Event()
        self._thread = None
        self.fired = None  # the line printed, once fired

    @classmethod
    def from_config(cls, config, host: str) -> "Watchdog":
        settings = dict(config.get("watchdog", {}) or {})
        return cls(**{k: settings[k] for k in ("seconds", "floor_seconds", "step_multiple") if k in settings},
                   host=host)

    @property
    def enabled(self) -> bool:
        return self.seconds >= 0

    def bound(self) -> float:
        if self.seconds > 0:
            return self.seconds
        if not self._steps:
            return self.floor
        return max(self.floor, self.multiple * statistics.median(self._steps[-50:]))

    # ---------------------------------------------------------------------------------------- the loop's side
    @contextlib.contextmanager
    def waiting(self, what: str, step: int) -> Iterator[None]:
        """The loop waits on `what` ("data", "step", "checkpoint") for step `step`."""
        with self._lock:
            previous = self._what, self._step
            self._what, self._step = what, step
        try:
            yield
        finally:
            with self._lock:
                self._what, self._step = previous

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Work that is not a step (compiling, evaluating): not timed; the clock restarts after it."""
        with self._lock:
            self._paused += 1
        began = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                self._last, self._measure = time.monotonic(), False
                self._pause_seconds = self._last - began

    def completed(self, step: int):
        """Step `step`'s results are on the host."""
        with self._lock:
            now = time.monotonic()
            if self._measure:
                self._steps.append(now - self._last)
            self._last, self._measure, self._step = now, True, step

    # ----------------------------------------------------------------------------------------- the thread
    def start(self) -> "Watchdog":
        if self.enabled and self._thread is None:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="janusflow-step-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def check(self, now: float | None = None) -> str | None:
        """The line to print if the host has stalled at `now` (default: the clock), else None."""
        with self._lock:
            if self._paused:
                return None
            bound = self.bound() * (_STEP_GRACE if self._what == "step" else 1.0)
            if not self._measure:  # the first step after a compile: other hosts may still compile, readers start
                bound = max(bound, self.floor, 2 * self._pause_seconds)
            waited = (time.monotonic() if now is None else now) - self._last
            if waited <= bound:
                return None
            return (f"error: {self.host}: no step completed in {_seconds(waited)} s (bound {_seconds(bound)} s): step "
                    f"{self._step} waiting on {self._what}; exiting (code {EXIT_CODE}) so that every host stops and "
                    f"the job restarts (rerun the same command on every host to resume)")

    def _watch(self):
        while not self._stop.wait(self.poll):
            line = self.check()
            if line is not None:
                self.fired = line
                print(line, file=sys.stderr, flush=True)
                self._exit(EXIT_CODE)  # os._exit: the loop's thread is stuck; nothing else would end the process
                return


def _seconds(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def host_name() -> str:
    """This host as the watchdog's line names it: its process index and machine name."""
    import jax

    return f"host {jax.process_index()} of {jax.process_count()} ({socket.gethostname()})"
