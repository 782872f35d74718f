"""The training loop: initialise or resume, feed batches, step, log, checkpoint, survive preemption.

Checkpoints (orbax `CheckpointManager` under `<workdir>/checkpoints`, asynchronous, last `keep_checkpoints` kept):
  params      the full parameter tree (trainable + frozen), so `checkpoint.load_params` and `launch.convert` read a
              training checkpoint like any other
  ema         the EMA of the trainable parameters (`load_params(..., weights="ema")` overlays it; the default)
  opt_state   AdamW state of the trainable parameters
  counters    step and consecutive-skip count
  data        the data iterator's state (one file per reading stream: any host count dividing data.streams resumes)
  config      the model config (JSON); run_config: the whole run config (JSON)
A step counts only when complete (orbax commits a local step by rename, a gs:// step by a commit marker written
last), so a run killed at any moment — SIGKILL included, also during an asynchronous save — resumes from the newest
complete step and, all randomness being a function of (seed, step) and the data state, continues bit for bit as if it
had never stopped. SIGTERM (preemption) saves a step before exiting: in a single process the step it arrived in; with
jax.distributed (several hosts) jax catches SIGTERM on any host and the hosts agree on one step at which every host
saves and stops (`CheckpointManager.reached_preemption`, asked at every step on every host).

The workdir may be local or gs:// (`etils.epath` throughout). On several hosts, every host must run the same config
and workdir (`hosts.check_same_config`), be able to write there (`hosts.check_writable`) and see the same workdir
(`hosts.check_shared_directory`); process 0 alone logs.

The host runs one step ahead: it fetches, transfers and dispatches step n+1 before it reads step n's metrics, so the
device is not idle while the host prepares a batch (on the tiny config on 2 CPU cores this took the loop from ~23 to
~15 ms per step). Steps that a callback, a checkpoint or a mixture switch needs are reported before the next one is
dispatched. Each logged row carries `input_s`, the host's time to get the batch: when it nears the step time, the
input pipeline is the bottleneck (more `data.num_workers`). The step of every batch composition a mixture phase
deals (data/mixture.py) is compiled before the phase's first step. Every `eval_every` steps (and at the last) the
evaluators `config.eval.evaluators` run on the EMA weights (janusflow_jax/eval/evaluators.py). A host on which no
step completes within `config.watchdog`'s bound (stuck on its data, a step or a checkpoint) exits (train/watchdog.py).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Iterable

import jax
from etils import epath

from janusflow_jax import hosts, paths
from janusflow_jax.data.mixture import sizes_dict
from janusflow_jax.eval import evaluators as eval_lib
from janusflow_jax.inference import starter_files
from janusflow_jax.perf import chips
from janusflow_jax.sharding import global_batch, mesh_context
from janusflow_jax.train import checkpointing, compilation_cache, goodput, watchdog
from janusflow_jax.train.init import initial_params
from janusflow_jax.train.metrics import Reporter
from janusflow_jax.train.plan import Plan, TrainingError, make_plan, phase_at

__all__ = ["TrainingError", "Callback", "train", "make_plan", "phase_at"]


# ---------------------------------------------------------------------------------------------------------- train
Callback = Callable[[int, dict, dict], None]  # (step just finished, state, host metrics)


def train(config, workdir, callbacks: Iterable[Callback] = (), progress: bool = True, devices=None) -> dict:
    """Runs (or resumes) the configured stage in `workdir`. Returns the final host metrics."""
    workdir = paths.user_path(workdir)
    clock = goodput.Goodput()
    paths.check_access(workdir, *paths.config_paths(config))  # before anything is written (or a bucket made)
    compilation_cache.enable(config, workdir)  # before the first compile
    hosts.check_same_config(config.to_json_best_effort())
    hosts.check_same_config(os.fspath(workdir), "workdir", show=True)
    hosts.check_writable(workdir, "workdir")  # creates it
    hosts.check_shared_directory(workdir, "workdir")
    plan = make_plan(config, devices)
    mngr = checkpointing.training_manager(workdir, config)
    if config.data.source == "synthetic" and jax.process_count() == 1:  # a first run: generate / chat accept it
        starter_files.write(config, mngr.directory)  # (not on several hosts: no host waits on the others' files)
    preempted = {"flag": False}
    # With jax.distributed, jax's preemption sync manager owns SIGTERM (a Python handler would replace its own).
    previous_handler = None if hosts.runtime_initialized() else signal.signal(
        signal.SIGTERM, lambda *_: preempted.__setitem__("flag", True))
    try:
        latest = mngr.latest_step()
        # Where this host stands for jax's preemption sync (every host, before the restore and compile): a notice
        # that arrives before the first step then agrees on a step this launch reaches (`_preempted_before`).
        mngr.reached_preemption(latest or 0)
        clock.lap("tpu_initialization")
        phase = phase_at(config.mixture, latest or 0)
        source = plan.source(phase)
        if latest is not None and latest >= config.steps:
            if jax.process_index() == 0:
                print(f"already finished at step {latest} in {mngr.directory} (config.steps = {config.steps}); "
                      f"raise --config.steps to train on, or give a new --workdir", flush=True)
            return {}
        if latest is not None:
            state = checkpointing.restore_state(mngr, plan, latest, source)
            if jax.process_index() == 0:
                print(f"resuming from step {latest} in {mngr.directory}", flush=True)
        else:
            state = plan.init_state(initial_params(plan))
        clock.resumed = latest is not None
        jax.block_until_ready(state)
        clock.lap("training_prep")
        with mesh_context(plan.mesh):  # the model's activation constraints need the mesh and the axis rules
            return _loop(plan, mngr, state, source, phase, int(jax.device_get(state["step"])), workdir,
                         list(callbacks), progress, preempted, clock)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        mngr.wait_until_finished()
        mngr.close()


def _preempted_before(mngr, plan: Plan, state, source, start: int, preempted) -> bool:
    """Whether a preemption notice came during the restore or the compile (before step `start` + 1 runs): then the
    launch keeps step `start` (saving it where it is not saved: a fresh start) and stops on every host. On several
    hosts jax's sync agrees on `start` + 1 when no host has asked past `start` (`train`), on a later step otherwise
    (then the loop stops there)."""
    if not (mngr.reached_preemption(start + 1) or preempted["flag"]):
        return False
    if mngr.latest_step() != start:
        checkpointing.save_state(mngr, plan, state, source, start)
    mngr.wait_until_finished()
    if jax.process_index() == 0:
        print(f"preempted: saved step {start} in {mngr.directory} (before the first step of this launch); rerun the "
              f"same command {'on every host ' if jax.process_count() > 1 else ''}to resume", flush=True)
    return True


def _loop(plan: Plan, mngr, state, source, phase: int, start: int, workdir: epath.Path, callbacks, progress,
          preempted, clock: goodput.Goodput):
    config = plan.config
    step_fns = {}

    def compile_phase(phase, state):
        """Compiles the step of every batch composition the run will meet in `phase`, ahead of its first step: no
        step waits on a compile later on (on several hosts, one host compiling while the others wait in a collective
        can outlast the collectives' set-up timeout)."""
        state_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        todo = {}
        for p, composition in plan.mixture.compositions(config.steps):
            sizes = sizes_dict(plan.mixture.types, composition)
            key = (phase, tuple(sorted(sizes.items())))
            if p == phase and key not in step_fns:
                todo[key] = sizes
        start_compile = time.perf_counter()
        for i, (key, sizes) in enumerate(todo.items()):
            say(f"compiling the train step for mixture phase {phase}, batch composition {i + 1} of {len(todo)} "
                f"({', '.join(f'{t} {n}' for t, n in sizes.items())} rows) ...")
            executable = plan.jitted_step(phase, sizes).lower(state_shapes, plan.abstract_batch(sizes)).compile()
            step_fns[key] = (executable, plan.batch_shardings(sizes), plan.family.step_counts(plan, sizes))
        if todo:
            seconds = time.perf_counter() - start_compile
            say(f"compiled {len(todo)} step program{'s' * (len(todo) > 1)} in {seconds:.1f} s")

    def compiled(phase, sizes, state):
        """The compiled step, batch shardings and counted work of one step composition."""
        key = (phase, tuple(sorted(sizes.items())))
        if key not in step_fns:
            began = time.perf_counter()
            with dog.paused():  # a compile is not a step
                compile_phase(phase, state)
                hosts.barrier(f"janusflow_jax: phase {phase} compiled ({len(step_fns)} programs)")  # all hosts at once
            clock.add("program_startup", time.perf_counter() - began)
        return step_fns[key]

    reporter = Reporter(workdir, chips.peak_flops_per_device(), config.batch_size, progress, start=start,
                        types=plan.mixture.types, terms=plan.family.objective.TERMS)
    say = reporter.say  # a line above the progress bar (process 0)
    reporter.start_bar(start, config.steps)
    evaluators = eval_lib.from_config(plan, workdir, reporter.writer)  # None unless config.eval_every > 0
    clock.redone(reporter.dropped_rows)
    metrics_host, last_time = {}, time.perf_counter()
    pending = None  # (step, metrics, input seconds, counted work) of a step dispatched but not yet reported
    dog = watchdog.Watchdog.from_config(config, watchdog.host_name()).start()  # a stalled host exits (watchdog.py)

    def report(done: int, metrics, input_s: float, counts: dict) -> dict:
        """Reads one step's metrics (waits for it), logs them and enforces the limit on consecutive skips."""
        nonlocal last_time
        with dog.waiting("step", done):
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dog.completed(done)
        now = time.perf_counter()
        if done == start + 1 and jax.process_index() == 0:
            print(clock.first_step_done(input_s), flush=True)
        log = done % config.log_every == 0 or done == config.steps or not host["finite"]
        reporter.step(done, {**host, "input_s": input_s, **(clock.row_fields() if log else {})}, now - last_time,
                      counts, plan.mixture.rows_after(done), log=log)
        last_time = now
        skips = int(host["skips"])  # the state's count of consecutive non-finite steps, after this one
        if skips >= config.max_consecutive_skips:
            raise TrainingError(
                f"{skips} consecutive steps had a non-finite loss or gradient norm (last at step {done}); "
                f"stopping. The last good checkpoint is step {mngr.latest_step()} in {mngr.directory}")
        return host

    try:
        for step in range(start, config.steps):
            sizes = plan.sizes_at(step)  # this step's rows per data type (the mixture schedule)
            fn, b_sh, counts = compiled(phase, sizes, state)
            if step == start and _preempted_before(mngr, plan, state, source, start, preempted):
                break
            fetch_start = time.perf_counter()
            with dog.waiting("data", step + 1):
                host_batch = source.take(plan.host_sizes(sizes))
                plan.geometry.check(host_batch, plan.host_sizes(sizes))  # every source keeps to the one layout
                batch = global_batch(host_batch, b_sh)
            input_s = time.perf_counter() - fetch_start  # host time to get the batch (hidden behind the last step)
            clock.add("data_loading_sync", input_s)
            state, metrics = fn(state, batch)  # dispatched asynchronously
            if pending is not None:  # the previous step: read its metrics while this one is queued behind it
                metrics_host = report(*pending)
                pending = None
            done = step + 1
            boundary = phase_at(config.mixture, done) != phase
            # Every step, on every host: jax's preemption sync protocol counts these calls to agree on a step.
            synced = mngr.reached_preemption(done)
            saving = done % config.checkpoint_every == 0 or done == config.steps or synced or preempted["flag"]
            evaluating = evaluators is not None and evaluators.due(done)
            if not (callbacks or boundary or saving or evaluating):
                # Nothing needs this step's state before the next step is dispatched: keep the device fed and
                # report the step after dispatching the next one (a per-step device_get would leave the device
                # idle while the host fetches, transfers and dispatches the next batch).
                pending = (done, metrics, input_s, counts)
                continue
            metrics_host = report(done, metrics, input_s, counts)
            for callback in callbacks:
                callback(done, state, metrics_host)
            if evaluating:  # before the next step donates this state
                began = time.perf_counter()
                with dog.paused():
                    evaluators.run(done, state)
                clock.add("other", time.perf_counter() - began)
            if boundary:
                # A new mixture from the next step on: new compositions, source and compiled steps. Switched before
                # saving, so a checkpoint at the boundary holds the new source's (fresh) state.
                phase = phase_at(config.mixture, done)
                with dog.waiting("data", done):
                    source = plan.source(phase)
            stop = synced or preempted["flag"]  # a callback may have raised the flag (SIGTERM)
            if saving or stop:
                began = time.perf_counter()
                with dog.waiting("checkpoint", done):
                    checkpointing.save_state(mngr, plan, state, source, done)
                    clock.saved(time.perf_counter() - began)
                    reporter.flush()  # metrics.jsonl on an object store: as new as the newest checkpoint
            if stop:
                with dog.waiting("checkpoint", done):
                    mngr.wait_until_finished()
                if jax.process_index() == 0:
                    print(f"preempted: saved step {done} in {mngr.directory}; rerun the same command "
                          f"{'on every host ' if jax.process_count() > 1 else ''}to resume", flush=True)
                break
        began = time.perf_counter()
        with dog.waiting("checkpoint", config.steps):
            mngr.wait_until_finished()
        clock.saved(time.perf_counter() - began)
        _report_goodput(clock, reporter, workdir, mngr, start)
    finally:
        dog.stop()
        clock.cache.stop()
        reporter.close()
    return metrics_host


def _report_goodput(clock: goodput.Goodput, reporter, workdir, mngr, start: int):
    """The launch's goodput summary: goodput.jsonl, TensorBoard and one log line (process 0)."""
    done = mngr.latest_step() or 0
    if jax.process_index() == 0:
        print(clock.report(workdir, reporter.writer, done, done - start), flush=True)
