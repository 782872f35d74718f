"""The training loop: initialise or resume, feed batches, step, log, checkpoint, survive preemption.

Checkpoints (orbax `CheckpointManager` under `<workdir>/checkpoints`, asynchronous, last `keep_checkpoints` kept):
  params      the full parameter tree (trainable + frozen), so `checkpoint.load_params` and `launch.convert` read a
              training checkpoint like any other
  ema         the EMA of the trainable parameters (`load_params(..., weights="ema")` overlays it; the default)
  opt_state   AdamW state of the trainable parameters
  counters    step and consecutive-skip count
  data        the data iterator's state (grain's checkpoint handler: one file per process)
  config      the model config (JSON); run_config: the whole run config (JSON)
A step's directory appears only when complete (orbax commits by rename), so a run killed at any moment — SIGKILL
included — resumes from the newest complete step and, all randomness being a function of (seed, step) and the data
state, continues bit for bit as if it had never stopped. SIGTERM (preemption) saves the current step before exiting.

The host runs one step ahead: it fetches, transfers and dispatches step n+1 before it reads step n's metrics, so the
device is not idle while the host prepares a batch (on the tiny config on 2 CPU cores this took the loop from ~23 to
~15 ms per step). Steps that a callback, a checkpoint or a mixture switch needs are reported before the next one is
dispatched. Each logged row carries `input_s`, the host's time to get the batch: when it nears the step time, the
input pipeline is the bottleneck (more `data.num_workers`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from janusflow_jax import batch as batch_lib
from janusflow_jax import checkpoint as checkpoint_lib
from janusflow_jax import flops as flops_lib
from janusflow_jax import optimizer, train_step
from janusflow_jax.config import JanusFlowConfig
from janusflow_jax.model import JanusFlow, abstract_params
from janusflow_jax.sharding import DEFAULT_RULES, make_mesh, param_shardings


class TrainingError(RuntimeError):
    """A run that cannot go on (divergence, a bad config, missing data); the message says why."""


# ------------------------------------------------------------------------------------------------------------ data
class SyntheticSource:
    """Random batches in the `batch.py` layout, a pure function of (seed, phase, process, index): for tests,
    benchmarks and a first run without data. Checkpointable like a grain iterator (bytes state)."""

    def __init__(self, sizes, seed: int, phase: int, model_cfg: JanusFlowConfig, data_cfg):
        self.sizes, self.seed, self.phase, self.index = dict(sizes), seed, phase, 0
        self.kwargs = dict(seq_len=data_cfg.seq_len, prompt_len=data_cfg.prompt_len,
                           image_size=model_cfg.und_encoder.image_size, latent_size=model_cfg.latent_size,
                           latent_channels=model_cfg.gen_encoder.in_channels, vocab_size=model_cfg.llm.vocab_size,
                           num_image_tokens=model_cfg.und_encoder.num_patches,
                           images_per_row=data_cfg.images_per_row)

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.phase, jax.process_index(), self.index])
        self.index += 1
        return batch_lib.synthetic_batch(rng, self.sizes, **self.kwargs)

    def get_state(self) -> bytes:
        return json.dumps({"index": self.index}).encode()

    def set_state(self, state: bytes):
        self.index = json.loads(state)["index"]

    def start_prefetch(self):  # grain's checkpoint handler calls it after a restore
        pass


def make_source(config, model_cfg: JanusFlowConfig, sizes: dict, phase: int):
    """The iterator of host-local batches for one mixture phase."""
    if config.data.source == "synthetic":
        return SyntheticSource(sizes, config.seed, phase, model_cfg, config.data)
    if config.data.source == "prepared":
        from janusflow_jax import data as data_lib

        return data_lib.make_train_iterator(
            config.data, sizes, seq_len=config.data.seq_len, prompt_len=config.data.prompt_len,
            image_size=model_cfg.und_encoder.image_size, latent_size=model_cfg.latent_size,
            latent_channels=model_cfg.gen_encoder.in_channels, num_image_tokens=model_cfg.und_encoder.num_patches,
            images_per_row=config.data.images_per_row, seed=config.seed + 1000 * phase)
    raise TrainingError(f"unknown data.source {config.data.source!r}: use 'synthetic' or 'prepared'")


# ---------------------------------------------------------------------------------------------------- the schedule
def phase_at(mixture, step: int) -> int:
    """Index of the mixture phase in force at `step` (the last phase also covers steps past its end)."""
    for i, (until, _) in enumerate(mixture):
        if step < until:
            return i
    return len(mixture) - 1


@dataclasses.dataclass
class Plan:
    """Everything fixed for a run: model, mesh, freeze labels, optimizer, shardings, per-phase batch sizes."""

    config: ml_collections.ConfigDict
    model_cfg: JanusFlowConfig
    model: JanusFlow
    mesh: jax.sharding.Mesh
    labels: dict
    tx: object
    state_sh: dict
    global_sizes: list  # per mixture phase: rows per data type of the global batch

    @property
    def use_ema(self) -> bool:
        return self.config.optimizer.ema_decay > 0

    def host_sizes(self, phase: int) -> dict:
        return {k: v // jax.process_count() for k, v in self.global_sizes[phase].items()}

    def batch_shapes(self, phase: int) -> dict:
        d = self.config.data
        return batch_lib.batch_shapes(self.global_sizes[phase], seq_len=d.seq_len, prompt_len=d.prompt_len,
                                      image_size=self.model_cfg.und_encoder.image_size,
                                      latent_size=self.model_cfg.latent_size,
                                      latent_channels=self.model_cfg.gen_encoder.in_channels,
                                      images_per_row=d.images_per_row)


def make_plan(config, devices=None) -> Plan:
    model_cfg = JanusFlowConfig.from_dict(config.model.to_dict())
    mesh = make_mesh(**config.mesh.to_dict(), devices=devices)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    unit = math.lcm(dp, jax.process_count()) * config.micro_batches
    try:
        sizes = [batch_lib.sub_batch_sizes(config.batch_size, ratio, unit) for _, ratio in config.mixture]
    except ValueError as e:
        raise TrainingError(f"batch_size {config.batch_size} with {dp} data-parallel devices and "
                            f"{config.micro_batches} micro-batches: {e}") from None
    labels = optimizer.labels(nn.unbox(abstract_params(model_cfg)), config.freeze)
    tx = optimizer.make_optimizer(config.optimizer)
    state_sh = train_step.state_shardings(model_cfg, mesh, labels, tx, config.optimizer.ema_decay > 0)
    return Plan(config, model_cfg, JanusFlow(model_cfg), mesh, labels, tx, state_sh, sizes)


def initial_params(plan: Plan):
    """Parameters placed on the mesh, from the source `config.init` names."""
    init, cfg = plan.config.init, plan.model_cfg
    shardings = param_shardings(cfg, plan.mesh)
    if init.kind == "random":
        from janusflow_jax.sharding import create_sharded_params

        return create_sharded_params(cfg, plan.mesh, jax.random.key(plan.config.seed))
    if init.kind == "checkpoint":
        if not init.path:
            raise TrainingError("config.init.kind='checkpoint' needs --config.init.path (an orbax checkpoint root: "
                                "the previous stage's <workdir>/checkpoints or a `launch.convert --to=jax` output)")
        saved_cfg, params = checkpoint_lib.load_params(init.path, weights=init.weights)
        _check_same_model(saved_cfg, cfg, init.path)
        return _place(params, cfg, saved_cfg, shardings, plan.config.seed)
    if init.kind == "official":
        from janusflow_jax import convert

        saved_cfg, params = convert.from_pytorch(init.path, rng=jax.random.key(plan.config.seed),
                                                 scan_layers=cfg.scan_layers, repa=cfg.repa)
        _check_same_model(saved_cfg, cfg, init.path)
        return _place(params, cfg, saved_cfg, shardings, plan.config.seed)
    if init.kind == "parts":
        from janusflow_jax import convert

        params = convert.init_from_parts(cfg, jax.random.key(plan.config.seed), llm_path=init.llm_path or None,
                                         siglip_path=init.siglip_path or None)
        return jax.device_put(params, shardings)
    raise TrainingError(f"unknown config.init.kind {init.kind!r}: random, checkpoint, official or parts")


def _check_same_model(saved: JanusFlowConfig, wanted: JanusFlowConfig, path):
    def shape_fields(c: JanusFlowConfig):  # what decides parameter shapes (not dtypes, scan or remat)
        return (c.llm, c.und_encoder, c.gen_encoder, c.gen_decoder, c.repa.hidden_dim, c.latent_size)

    if shape_fields(saved) != shape_fields(wanted):
        raise TrainingError(f"the checkpoint at {path} holds a different model than config.model")


def _place(params, cfg: JanusFlowConfig, saved_cfg: JanusFlowConfig, shardings, seed: int):
    from janusflow_jax import convert

    if saved_cfg.scan_layers != cfg.scan_layers:
        params = (convert.scan_params if cfg.scan_layers else convert.unscan_params)(params, cfg)
    dtype = cfg.storage_dtype
    return jax.device_put(jax.tree.map(lambda x: np.asarray(x).astype(dtype), params), shardings)


# ---------------------------------------------------------------------------------------------------- checkpoints
def checkpoint_manager(workdir, config) -> ocp.CheckpointManager:
    import grain.checkpoint as grain_ckpt

    handlers = dict(params=ocp.StandardCheckpointHandler(), ema=ocp.StandardCheckpointHandler(),
                    opt_state=ocp.StandardCheckpointHandler(), counters=ocp.StandardCheckpointHandler(),
                    data=grain_ckpt.CheckpointHandler(), config=ocp.JsonCheckpointHandler(),
                    run_config=ocp.JsonCheckpointHandler())
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True,
                                           create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), item_handlers=handlers,
                                 options=options)


def save(mngr: ocp.CheckpointManager, plan: Plan, state: dict, source, step: int):
    import grain.checkpoint as grain_ckpt

    args = dict(params=ocp.args.StandardSave(optimizer.merge(state["trainable"], state["frozen"])),
                opt_state=ocp.args.StandardSave(state["opt_state"]),
                counters=ocp.args.StandardSave({"step": state["step"], "skips": state["skips"]}),
                data=grain_ckpt.CheckpointSave(source),
                config=ocp.args.JsonSave(plan.model_cfg.to_dict()),
                run_config=ocp.args.JsonSave(json.loads(plan.config.to_json())))
    if plan.use_ema:
        args["ema"] = ocp.args.StandardSave(state["ema"])
    mngr.save(step, args=ocp.args.Composite(**args), force=True)


def restore(mngr: ocp.CheckpointManager, plan: Plan, step: int, source) -> dict:
    import grain.checkpoint as grain_ckpt

    sh = plan.state_sh
    abstract = jax.eval_shape(lambda p: train_step.init_state(p, plan.labels, plan.tx, plan.use_ema),
                              nn.unbox(abstract_params(plan.model_cfg)))

    def target(tree, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    params_sh = optimizer.merge(sh["trainable"], sh["frozen"])
    abstract_params_tree = optimizer.merge(abstract["trainable"], abstract["frozen"])
    args = dict(params=ocp.args.StandardRestore(target(abstract_params_tree, params_sh)),
                opt_state=ocp.args.StandardRestore(target(abstract["opt_state"], sh["opt_state"])),
                counters=ocp.args.StandardRestore(target({"step": abstract["step"], "skips": abstract["skips"]},
                                                         {"step": sh["step"], "skips": sh["skips"]})),
                data=grain_ckpt.CheckpointRestore(source))
    if plan.use_ema:
        args["ema"] = ocp.args.StandardRestore(target(abstract["ema"], sh["ema"]))
    out = mngr.restore(step, args=ocp.args.Composite(**args))
    trainable, frozen = optimizer.split(out["params"], plan.labels)
    return {"step": out["counters"]["step"], "trainable": trainable, "frozen": frozen, "opt_state": out["opt_state"],
            "ema": out["ema"] if plan.use_ema else {}, "skips": out["counters"]["skips"]}


# ------------------------------------------------------------------------------------------------------- logging
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


# ---------------------------------------------------------------------------------------------------------- train
Callback = Callable[[int, dict, dict], None]  # (step just finished, state, host metrics)


def global_batch(local: dict, shardings: dict) -> dict:
    """Host-local rows -> global arrays over the mesh (each process contributes its rows)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


def train(config, workdir, callbacks: Iterable[Callback] = (), progress: bool = True, devices=None) -> dict:
    """Runs (or resumes) the configured stage in `workdir`. Returns the final host metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(config, devices)
    mesh, rules = plan.mesh, DEFAULT_RULES
    mngr = checkpoint_manager(workdir, config)
    preempted = {"flag": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.__setitem__("flag", True))
    try:
        latest = mngr.latest_step()
        phase = phase_at(config.mixture, latest or 0)
        source = make_source(config, plan.model_cfg, plan.host_sizes(phase), phase)
        if latest is not None:
            state = restore(mngr, plan, latest, source)
            print(f"resuming from step {latest} in {mngr.directory}")
        else:
            params = initial_params(plan)
            init = jax.jit(lambda p: train_step.init_state(p, plan.labels, plan.tx, plan.use_ema),
                           out_shardings=plan.state_sh)
            state = init(params)
            del params
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # the model's activation constraints need both
            return _loop(plan, mngr, state, source, phase, int(jax.device_get(state["step"])), workdir,
                         list(callbacks), progress, preempted)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        mngr.wait_until_finished()
        mngr.close()


def _loop(plan: Plan, mngr, state, source, phase: int, start: int, workdir: Path, callbacks, progress, preempted):
    config, mesh = plan.config, plan.mesh
    step_fns = {}

    def compiled(phase):
        if phase not in step_fns:
            shapes = plan.batch_shapes(phase)
            b_sh = train_step.batch_shardings(shapes, mesh)
            fn = train_step.make_train_step(plan.model, plan.tx, config.loss, config.optimizer, seed=config.seed,
                                            micro_batches=config.micro_batches)
            step_fns[phase] = (train_step.jit_train_step(fn, plan.state_sh, b_sh, mesh), b_sh)
        return step_fns[phase]

    counts = flops_lib.step_counts(plan, phase)
    reporter = Reporter(workdir, counts["flops"], flops_lib.peak_flops_per_device(), counts["tokens"],
                        config.batch_size, progress)
    reporter.start_bar(start, config.steps)
    metrics_host, last_time = {}, time.perf_counter()
    pending = None  # (step, metrics, input seconds) of a step dispatched but not yet reported

    def report(done: int, metrics, input_s: float) -> dict:
        """Reads one step's metrics (waits for it), logs them and enforces the limit on consecutive skips."""
        nonlocal last_time
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        reporter.step(done, {**host, "input_s": input_s}, now - last_time,
                      log=done % config.log_every == 0 or done == config.steps or not host["finite"])
        last_time = now
        skips = int(host["skips"])  # the state's count of consecutive non-finite steps, after this one
        if skips >= config.max_consecutive_skips:
            raise TrainingError(
                f"{skips} consecutive steps had a non-finite loss or gradient norm (last at step {done}); "
                f"stopping. The last good checkpoint is step {mngr.latest_step()} in {mngr.directory}")
        return host

    try:
        for step in range(start, config.steps):
            fn, b_sh = compiled(phase)
            fetch_start = time.perf_counter()
            batch = global_batch(next(source), b_sh)
            input_s = time.perf_counter() - fetch_start  # host time to get the batch (hidden behind the last step)
            state, metrics = fn(state, batch)  # dispatched asynchronously
            if pending is not None:  # the previous step: read its metrics while this one is queued behind it
                metrics_host = report(*pending)
                pending = None
            done = step + 1
            boundary = phase_at(config.mixture, done) != phase
            saving = (done % config.checkpoint_every == 0 or done == config.steps or preempted["flag"]
                      or mngr.reached_preemption(done))
            if not (callbacks or boundary or saving):
                # Nothing needs this step's state before the next step is dispatched: keep the device fed and
                # report the step after dispatching the next one (a per-step device_get would leave the device
                # idle while the host fetches, transfers and dispatches the next batch).
                pending = (done, metrics, input_s)
                continue
            metrics_host = report(done, metrics, input_s)
            for callback in callbacks:
                callback(done, state, metrics_host)
            if boundary:
                # A new mixture from the next step on: new sub-batch shapes, source and compiled step. Switched
                # before saving, so a checkpoint at the boundary holds the new source's (fresh) state.
                phase = phase_at(config.mixture, done)
                source = make_source(config, plan.model_cfg, plan.host_sizes(phase), phase)
                counts = flops_lib.step_counts(plan, phase)
                reporter.flops_per_step, reporter.tokens = counts["flops"], counts["tokens"]
            if saving or preempted["flag"]:  # a callback may have raised the flag (SIGTERM)
                save(mngr, plan, state, source, done)
            if preempted["flag"]:
                mngr.wait_until_finished()
                print(f"preempted: saved step {done} in {mngr.directory}; rerun the same command to resume")
                break
    finally:
        reporter.close()
    return metrics_host
