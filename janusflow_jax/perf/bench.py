"""Benchmarks: training throughput (step time, tokens/s, TFLOP/s, MFU, memory), sampling speed (images/s and latency
of the CFG Euler sampler) and the same work in PyTorch eager, timed alternately so machine load hits both alike.

A report is a plain dict (JSON-ready):
  meta    device, device kind and count, date (UTC), commit, command, config label, load average before/after,
          library versions
  train   compile_s, step_s (median over timed steps), examples_per_s, tokens_per_s, flops_per_step (counted as
          `flops.py` does: causal attention halved), tflops_per_device, peak_flops_per_device and its source
          ("bf16 table" on accelerators; on CPU a measured fp32 matmul, `cpu_peak_flops`), mfu, peak_memory_bytes
          and its source (`device.memory_stats()`, else the process's peak RSS on CPU); profile (with a profile
          directory: `profile.summarize` of a few traced steps, else None); roofline (where the chip's HBM
          bandwidth is known: `roofline.py`'s bound for the compiled step and measured_over_bound, else None)
  sample  one row per (batch, steps, cfg, prompt cache): compile_s, latency_s (one call = one batch of images,
          median), images_per_s, per_image_s, flops (`flops.sampling_flops`), tflops_per_device, mfu
  torch   rows for the velocity forward, the train step and the 30-step CFG sampling loop: jax_s, torch_s (medians
          of alternating repetitions), speedup = torch_s / jax_s, both sides' counted FLOPs and TFLOP/s, and
          speedup_ceiling (torch_s / the JAX FLOPs at peak); torch runs on the GPU when it sees one
  vae     (mode "vae" only) SDXL-VAE encode/decode rows at 384^2: compile_s, latency_s, images_per_s
  data    (mode "data" only) this host's loader alone (`bench_data`): batches, rows_per_batch, bytes_per_batch,
          batch_s_median / batch_s_max, examples_per_s and megabytes_per_s, source, num_workers, prefetch
Medians, not means: a shared machine's other jobs produce long-tail outliers.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from janusflow_jax.data.synthetic import SyntheticSource
from janusflow_jax.inference.sampler import sample_latents
from janusflow_jax.models.janusflow import JanusFlow, init_params
from janusflow_jax.perf import chips
from janusflow_jax.perf import flops as flops_lib
from janusflow_jax.perf import profile as profile_lib
from janusflow_jax.perf import report as report_lib
from janusflow_jax.perf import roofline
from janusflow_jax.sharding import mesh_context
from janusflow_jax.train import loop as trainer
from janusflow_jax.train import optimizer
from janusflow_jax.train import step as train_step

MODES = ("train", "sample", "torch", "vae", "data", "all")  # "all" = train + sample + torch


class BenchError(ValueError):
    """A benchmark that cannot run as asked (bad mode or sizes, torch missing); the message says why."""


progress = report_lib.progress


# ------------------------------------------------------------------------------------------------------ timing
def _ready(x):
    return jax.block_until_ready(x)


def time_call(fn: Callable[[], object]) -> float:
    """Seconds of one call, waiting for every device result."""
    start = time.perf_counter()
    _ready(fn())
    return time.perf_counter() - start


def cpu_peak_flops(n: int = 1024, reps: int = 5) -> float:
    """Measured fp32 FLOP/s of an [n, n] @ [n, n] matmul in JAX on the default device (best of `reps`): the CPU's
    stand-in for a peak, as CPUs have no bf16 table entry."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    _ready(matmul(a))
    return 2.0 * n ** 3 / min(time_call(lambda: matmul(a)) for _ in range(reps))


def peak_memory() -> tuple[float, str]:
    """(bytes, source): the device's peak from `memory_stats()` where it exists, else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "device.memory_stats peak_bytes_in_use"
    # ru_maxrss is KiB on Linux: the whole process (JAX, XLA, and torch when loaded), not one device.
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS (CPU: no device stats)"


# ------------------------------------------------------------------------------------------------------ training
class TrainBench:
    """A compiled train step of `config` (the first step of its last mixture phase: the run's steady state) on a fixed
    synthetic batch, parameters randomly initialised in place. The batch is on the devices before timing: step times
    exclude input."""

    def __init__(self, config):
        self.plan = plan = trainer.make_plan(config)
        self.phase = len(config.mixture) - 1
        model = plan.model

        def init(rng):  # parameters and optimizer state created in place, in their shards, by one program
            params = nn.unbox(model.init(rng, method=JanusFlow.init_all)["params"])
            return train_step.init_state(params, plan.labels, plan.tx, plan.use_ema)

        with self._context():
            self.state = jax.jit(init, out_shardings=plan.state_sh)(jax.random.key(config.seed))
        self.sizes = plan.sizes_at(plan.mixture.phases[self.phase][0])
        source = SyntheticSource(plan.host_sizes(self.sizes), config.seed, self.phase, plan.geometry)
        self.host_batch = next(source)
        self.batch = trainer.global_batch(self.host_batch, plan.batch_shardings(self.sizes))
        self._jitted = plan.jitted_step(self.phase, self.sizes)
        self._compiled = None
        self.compile_s = float("nan")

    def host_params(self) -> dict:
        """The current parameters as host arrays (the sampler takes them without the training mesh)."""
        return jax.device_get(optimizer.merge(self.state["trainable"], self.state["frozen"]))

    def _context(self):
        return mesh_context(self.plan.mesh)

    def compile(self):
        with self._context():
            start = time.perf_counter()
            self._compiled = self._jitted.lower(self.state, self.batch).compile()
            self.compile_s = time.perf_counter() - start

    def step(self):
        if self._compiled is None:
            self.compile()
        with self._context():
            self.state, metrics = self._compiled(self.state, self.batch)
        return metrics


def device_peak(cpu_peak: float | None = None, devices: int = 1) -> tuple[float, str]:
    """(peak FLOP/s of one of `devices` devices, where it comes from): the bf16 table on accelerators; on a CPU a
    measured fp32 matmul (`cpu_peak`, else measured now), shared by the `devices` fake devices of a CPU mesh."""
    peak = chips.peak_flops_per_device()
    if not peak and jax.devices()[0].platform == "cpu":
        return (cpu_peak or cpu_peak_flops()) / devices, "measured fp32 JAX matmul on this CPU (no bf16 table entry)"
    return peak, "bf16 table (chips.CHIPS)"


def bench_train(config, steps: int = 10, warmup: int = 2, cpu_peak: float | None = None,
                bench: TrainBench | None = None, profile_dir: str | None = None, profile_steps: int = 3) -> dict:
    """Compile time, median step time and derived throughput of the train step of `config` (`bench`: reuse an
    already built `TrainBench` of it). With `profile_dir`, `profile_steps` more steps run under the profiler after
    the timed ones; "profile" then holds `profile.summarize` of them (where the step's time goes)."""
    if steps < 1 or warmup < 0:
        raise BenchError(f"train needs steps >= 1 and warmup >= 0, got steps={steps} warmup={warmup}")
    bench = bench or TrainBench(config)
    if bench._compiled is None:
        bench.compile()
    progress(f"train: compiled in {bench.compile_s:.1f} s")
    for _ in range(warmup):
        _ready(bench.step())
    times = [time_call(bench.step) for _ in range(steps)]
    step_s = statistics.median(times)
    progress(f"train: step times {[round(t, 4) for t in times]} s")
    counts = bench.plan.family.step_counts(bench.plan, bench.sizes)
    n_dev = jax.device_count()
    tflops = counts["flops"] / step_s / n_dev / 1e12
    peak, peak_source = device_peak(cpu_peak, n_dev)
    memory, memory_source = peak_memory()
    summary = profile_train(bench, profile_steps, profile_dir) if profile_dir else None
    bandwidth = chips.hbm_bandwidth()
    bound = None
    if peak and bandwidth:  # the least time of the compiled program's kernels at this chip's peaks (roofline.py)
        est = roofline.estimate(bench._compiled.as_text(), peak, bandwidth, top=10)
        bound = {"seconds": est["seconds"], "measured_over_bound": step_s / est["seconds"],
                 "compute_bound_seconds": est["compute_bound_seconds"],
                 "memory_bound_seconds": est["memory_bound_seconds"], "flops": est["flops"], "bytes": est["bytes"],
                 "bandwidth": bandwidth, "kinds": {k: v["share"] for k, v in est["kinds"].items()}}
    return {"compile_s": bench.compile_s, "step_s": step_s, "step_s_all": times, "profile": summary,
            "roofline": bound,
            "examples_per_s": bench.plan.config.batch_size / step_s, "tokens_per_s": counts["tokens"] / step_s,
            "flops_per_step": counts["flops"], "tflops_per_device": tflops, "peak_flops_per_device": peak,
            "peak_source": peak_source, "mfu": tflops * 1e12 / peak if peak else float("nan"),
            "peak_memory_bytes": memory, "peak_memory_source": memory_source,
            "batch_size": bench.plan.config.batch_size, "sub_batches": bench.sizes,
            "seq_len": bench.plan.config.data.seq_len, "devices": n_dev,
            "flops_note": "counted as flops.py (MaxText style): causal attention FLOPs halved"}


def profile_train(bench: TrainBench, steps: int, profile_dir) -> dict:
    """`profile.summarize` of `steps` more traced steps (plus "trace", the Perfetto file), or {"error": ...} when the
    profiler fails (no CUPTI, ...): a failed profile must not lose the timings measured before it."""
    try:
        trace_file = profile_lib.trace(bench.step, steps, profile_dir)
        summary = {**profile_lib.summarize(trace_file, steps, [bench._compiled.as_text()]), "trace": str(trace_file)}
    except Exception as e:  # noqa: BLE001 - reported in the result instead
        summary = {"error": f"{type(e).__name__}: {str(e).strip()[:500]}"}
        progress(f"train: profiling failed ({summary['error']}); the timings stand")
        return summary
    progress(f"train: profile of {steps} steps written to {trace_file}")
    return summary


# ------------------------------------------------------------------------------------------------------ sampling
class SampleBench:
    """`sample_latents` of a randomly initialised model on random prompts of `config.data.prompt_len` tokens."""

    def __init__(self, config, seed: int = 0, params=None):
        from janusflow_jax.models.config import JanusFlowConfig

        self.cfg = JanusFlowConfig.from_dict(config.model.to_dict())
        self.model = JanusFlow(self.cfg)
        # params: reuse another bench's (host arrays) rather than compile an initialiser once more
        self.params = jax.device_put(params) if params is not None else init_params(self.cfg, jax.random.key(seed))
        self.prompt_len = config.data.prompt_len
        self.rng = np.random.default_rng(seed)

    def inputs(self, batch: int):
        ids = self.rng.integers(3, self.cfg.llm.vocab_size, (batch, self.prompt_len)).astype(np.int32)
        ids[:, 0] = 1  # BOS stand-in (the null prompt keeps the first real token)
        mask = np.ones_like(ids)
        g, c = self.cfg.latent_size, self.cfg.gen_encoder.in_channels
        z0 = self.rng.standard_normal((batch, g, g, c)).astype(np.float32)
        return ids, mask, z0

    def runner(self, batch: int, steps: int, cfg: float, use_prompt_cache: bool):
        ids, mask, z0 = self.inputs(batch)
        ids, mask, z0 = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(z0)
        return lambda: sample_latents(self.model, self.params, ids, mask, z0, steps, cfg,
                                      use_prompt_cache=use_prompt_cache)


def bench_sample(config, batch_sizes: Sequence[int] = (1, 8), steps: Sequence[int] = (30,),
                 cfgs: Sequence[float] = (2.0,), reps: int = 3, bench: SampleBench | None = None,
                 cpu_peak: float | None = None) -> list[dict]:
    """images/s, latency, TFLOP/s and MFU (FLOPs: `flops.sampling_flops`; one device) for every (batch, steps, cfg,
    prompt cache on/off); `bench`: reuse a `SampleBench`; `cpu_peak`: as `device_peak`."""
    if reps < 1 or any(b < 1 for b in batch_sizes) or any(s < 1 for s in steps) or any(w < 1 for w in cfgs):
        raise BenchError(f"sample needs reps >= 1, batch sizes >= 1, steps >= 1 and cfg >= 1; got reps={reps} "
                         f"batch_sizes={list(batch_sizes)} steps={list(steps)} cfg={list(cfgs)}")
    bench = bench or SampleBench(config)
    peak, _ = device_peak(cpu_peak)
    rows = []
    for b in batch_sizes:
        for s in steps:
            for w in cfgs:
                for cache in (True, False):
                    run = bench.runner(b, s, w, cache)
                    compile_s = time_call(run)  # first call: trace + compile + one run
                    latency = statistics.median(time_call(run) for _ in range(reps))
                    flops = flops_lib.sampling_flops(bench.cfg, b, s, bench.prompt_len, w != 1.0, cache)
                    rows.append({"batch": b, "steps": s, "cfg": w, "prompt_cache": cache, "compile_s": compile_s,
                                 "latency_s": latency, "images_per_s": b / latency, "per_image_s": latency / b,
                                 "flops": flops, "tflops_per_device": flops / latency / 1e12,
                                 "mfu": flops / latency / peak if peak else float("nan"), "peak_flops": peak})
                    progress(f"sample: {rows[-1]}")
    return rows


# ------------------------------------------------------------------------------------------------ vs PyTorch eager
def bench_torch(config, reps: int = 5, sample_batch: int = 4, sample_steps: int = 30, cfg: float = 2.0,
                torch_threads: int = 0, train: TrainBench | None = None, sample: SampleBench | None = None,
                cpu_peak: float | None = None) -> dict:
    """The same work in JAX and PyTorch eager, one JAX repetition then one torch repetition, `reps` times.

    (a) velocity forward of [cond; uncond] rows (2 x sample_batch), whole sequence, no cache, in both;
    (b) a train step of `config`'s batch (objective, backward, clipping, AdamW);
    (c) the CFG sampling loop: torch as the official demo (whole sequence recomputed each step); JAX both with its
        prompt cache (the library default) and without (the demo's algorithm).
    torch_threads: torch.set_num_threads (0 keeps torch's default: one per core). train/sample: reuse built benches
    (their compilations are then shared with the train and sample modes).

    Each row also has both sides' counted FLOPs (`flops.py`; they differ where the algorithms do: the prompt cache)
    and TFLOP/s, and `speedup_ceiling`: torch_s over the time JAX's FLOPs would take at the device's peak
    (`device_peak`), the most any JAX implementation of that algorithm could gain on this device."""
    try:
        import torch
    except ImportError:
        raise BenchError("torch mode needs PyTorch and the libraries the official model is built from: "
                         "pip install torch transformers timm diffusers") from None
    from janusflow_jax.perf import torch_baseline as tb

    if reps < 1 or sample_batch < 1 or sample_steps < 1 or cfg < 1:
        raise BenchError(f"torch needs reps, sample_batch, sample_steps >= 1 and cfg >= 1; got {reps}, "
                         f"{sample_batch}, {sample_steps}, {cfg}")
    if torch_threads:
        torch.set_num_threads(torch_threads)
    train = train or TrainBench(config)
    if train._compiled is None:
        train.compile()
    model_cfg = train.plan.model_cfg
    dtype = torch.bfloat16 if model_cfg.dtype == "bfloat16" else torch.float32
    device = tb.default_device()
    t_model = tb.build_model(model_cfg, seed=config.seed, device=device)
    t_step = tb.make_train_step(t_model, lr=config.optimizer.lr, clip_norm=config.optimizer.clip_norm)
    t_batch = tb.to_torch_batch(train.host_batch, dtype, device)

    sample = sample or SampleBench(config)
    ids, mask, z0 = sample.inputs(sample_batch)
    j_ids, j_mask, j_z0 = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(z0)
    t_ids, t_mask = torch.from_numpy(ids).long().to(device), torch.from_numpy(mask).long().to(device)
    t_z0 = torch.from_numpy(z0).permute(0, 3, 1, 2).contiguous().to(device, dtype)

    # (a) velocity: the CFG rows of one Euler step.
    v_ids, v_mask = jnp.concatenate([j_ids, j_ids]), jnp.concatenate([j_mask, j_mask])
    v_z, v_t = jnp.concatenate([j_z0, j_z0]), jnp.full((2 * sample_batch,), 0.5, jnp.float32)
    velocity = jax.jit(lambda p, i, m, z, t: sample.model.apply({"params": p}, i, m, z, t,
                                                               method=JanusFlow.velocity))
    tv_ids, tv_mask = torch.cat([t_ids, t_ids]), torch.cat([t_mask, t_mask])
    tv_z, tv_t = torch.cat([t_z0, t_z0]), torch.full((2 * sample_batch,), 0.5, dtype=dtype, device=device)
    t_model.eval()

    def torch_velocity():
        with torch.no_grad():
            return t_model.velocity(tv_ids, tv_mask, tv_z, tv_t)

    def torch_train():
        t_model.train()
        return t_step(t_batch)

    def torch_sample(steps=sample_steps):
        return tb.sample_official(t_model.eval(), t_ids, t_mask, t_z0, steps, cfg)

    # Counted FLOPs of each piece of work (`flops.py`); the sampling loops differ by the prompt cache.
    rows_2b, gen_seq = 2 * sample_batch, sample.prompt_len + 1 + model_cfg.num_gen_tokens
    velocity_flops = (flops_lib.llm_forward(model_cfg, rows_2b, gen_seq, logits=False)
                      + flops_lib.gen_towers_forward(model_cfg, rows_2b))
    train_flops = flops_lib.step_counts(train.plan, train.sizes)["flops"]
    sampled = {cache: flops_lib.sampling_flops(model_cfg, sample_batch, sample_steps, sample.prompt_len, cfg != 1.0,
                                               cache) for cache in (True, False)}

    sampling = f"sampling {sample_steps} steps cfg {cfg:g}"
    # JAX work -> (function, the torch work it is compared with, its FLOPs). Both JAX sampling variants are compared
    # with the same torch loop (timed once per repetition: it is the slowest item).
    work = {
        "velocity forward": (lambda: velocity(sample.params, v_ids, v_mask, v_z, v_t), "velocity", velocity_flops),
        "train step": (train.step, "train", train_flops),
        f"{sampling}, JAX prompt cache": (
            lambda: sample_latents(sample.model, sample.params, j_ids, j_mask, j_z0, sample_steps, cfg), "sample",
            sampled[True]),
        f"{sampling}, JAX full recompute": (
            lambda: sample_latents(sample.model, sample.params, j_ids, j_mask, j_z0, sample_steps, cfg,
                                   use_prompt_cache=False), "sample", sampled[False]),
    }
    torch_work = {"velocity": torch_velocity, "train": torch_train, "sample": torch_sample}
    torch_flops = {"velocity": velocity_flops, "train": train_flops, "sample": sampled[False]}  # the demo recomputes

    def time_torch(fn):
        start = time.perf_counter()
        fn()
        tb.synchronize(device)
        return time.perf_counter() - start

    for name, (j, _, _) in work.items():  # warm-up: compiles JAX, lets torch allocate (the loop with 2 steps: same kernels)
        progress(f"torch: JAX warm-up of {name}: {time_call(j):.1f} s")
    for key, t in torch_work.items():
        time_torch((lambda: torch_sample(min(2, sample_steps))) if key == "sample" else t)
    j_times = {name: [] for name in work}
    t_times = {key: [] for key in torch_work}
    for _ in range(reps):
        for name, (j, key, _) in work.items():  # alternate: JAX, torch, JAX, torch, ...
            j_times[name].append(time_call(j))
            if len(t_times[key]) < len(j_times[name]):
                t_times[key].append(time_torch(torch_work[key]))
            progress(f"torch: {name}: JAX {j_times[name][-1]:.4g} s, torch {t_times[key][-1]:.4g} s")
    peak, _ = device_peak(cpu_peak)
    rows = []
    for name, (_, key, j_f) in work.items():
        j_s, t_s, t_f = statistics.median(j_times[name]), statistics.median(t_times[key]), torch_flops[key]
        rows.append({"work": name, "jax_s": j_s, "torch_s": t_s, "speedup": t_s / j_s, "jax_s_all": j_times[name],
                     "torch_s_all": t_times[key], "jax_flops": j_f, "torch_flops": t_f, "jax_tflops": j_f / j_s / 1e12,
                     "torch_tflops": t_f / t_s / 1e12,
                     "speedup_ceiling": t_s * peak / j_f if peak else float("nan")})
    return {"rows": rows, "reps": reps, "sample_batch": sample_batch, "torch": torch.__version__, "peak_flops": peak,
            "torch_threads": torch.get_num_threads(), "train_batch_size": train.plan.config.batch_size,
            "torch_device": str(device)}


# ------------------------------------------------------------------------------------------------------ VAE
def bench_vae(batch_sizes: Sequence[int] = (1, 4), image_size: int = 384, dtypes: Sequence[str] = ("bfloat16",),
              reps: int = 3, seed: int = 0, config=None) -> list[dict]:
    """SDXL-VAE (`vae.AutoencoderKL` at the SDXL config, or `config`, a `VAEConfig`; random weights) encode and
    decode throughput at `image_size`^2: what the latent-precompute job (encode, the posterior moments) and the
    sampler's last stage (decode) cost per image. One row per (op, dtype, batch): compile_s, latency_s (median),
    images_per_s."""
    from janusflow_jax.models import vae as vae_lib

    if reps < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise BenchError(f"vae needs reps >= 1 and batch sizes >= 1; got reps={reps} batch_sizes={list(batch_sizes)}")
    rows = []
    rng = np.random.default_rng(seed)
    for dtype in dtypes:
        cfg = (config or vae_lib.VAEConfig()).replace(dtype=dtype)
        model = vae_lib.AutoencoderKL(cfg)
        params = vae_lib.init_vae_params(cfg, jax.random.key(seed))
        encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode))
        decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=vae_lib.AutoencoderKL.decode))
        side = image_size // cfg.downsample_factor
        for b in batch_sizes:
            images = jnp.asarray(rng.uniform(-1, 1, (b, image_size, image_size, 3)).astype(np.float32))
            latents = jnp.asarray(rng.standard_normal((b, side, side, cfg.latent_channels)).astype(np.float32))
            for op, fn, x in (("encode", encode, images), ("decode", decode, latents)):
                compile_s = time_call(lambda: fn(params, x))
                latency = statistics.median(time_call(lambda: fn(params, x)) for _ in range(reps))
                rows.append({"op": op, "dtype": dtype, "batch": b, "image_size": image_size, "compile_s": compile_s,
                             "latency_s": latency, "images_per_s": b / latency})
                progress(f"vae: {rows[-1]}")
    return rows


# ------------------------------------------------------------------------------------------------------ input
def bench_data(config, batches: int = 20, warmup: int = 3) -> dict:
    """How fast this host's input pipeline yields the batches of the config's last mixture phase, with no model step:
    `config.data` as a run uses it (the synthetic source, or a prepared dataset through the grain loader with its
    worker processes and prefetch). If examples_per_s is not well above the train step's, the host stalls the
    device (a run logs the same per step as `input_s`)."""
    if batches < 1 or warmup < 0:
        raise BenchError(f"data needs batches >= 1 and warmup >= 0, got {batches} and {warmup}")
    plan = trainer.make_plan(config)
    phase = len(config.mixture) - 1
    first = plan.mixture.phases[phase][0]
    source = plan.source(phase)
    for step in range(first, first + warmup):  # worker start-up and the first buffer fill are not the steady state
        source.take(plan.host_sizes(plan.sizes_at(step)))
    times, sizes, size = [], plan.host_sizes(plan.sizes_at(first + warmup)), 0
    for step in range(first + warmup, first + warmup + batches):
        start = time.perf_counter()
        batch = source.take(plan.host_sizes(plan.sizes_at(step)))
        times.append(time.perf_counter() - start)
        size += sum(np.asarray(v).nbytes for v in batch.values())
    rows = plan.config.batch_size // jax.process_count()
    progress(f"data: batch times {[round(t, 4) for t in times]} s")
    return {"batches": batches, "rows_per_batch": rows, "sub_batches": dict(sizes), "bytes_per_batch": size / batches,
            "batch_s_median": statistics.median(times), "batch_s_max": max(times),
            "examples_per_s": rows * batches / sum(times), "megabytes_per_s": size / sum(times) / 1e6,
            "source": config.data.source, "dir": config.data.get("dir", ""),
            "num_workers": int(config.data.get("num_workers", 0)), "prefetch": int(config.data.get("prefetch", 0)),
            "seq_len": config.data.seq_len}


# ------------------------------------------------------------------------------------------------------ driver
def run(mode: str, config, *, label: str, command: str = "", steps: int = 10, warmup: int = 2,
        batch_sizes: Sequence[int] = (1, 8), sample_steps: Sequence[int] = (30,), cfgs: Sequence[float] = (2.0,),
        reps: int = 3, torch_threads: int = 0, note: str = "", vae_dtypes: Sequence[str] = ("bfloat16",),
        profile_dir: str | None = None) -> dict:
    """One benchmark report (see the module docstring) for `mode` in MODES; `note` is printed with its tables;
    `profile_dir`: also profile the train step (train and all modes; `bench_train`)."""
    if mode not in MODES:
        raise BenchError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if steps < 1 or warmup < 0 or reps < 1:
        raise BenchError(f"need steps >= 1, warmup >= 0 and reps >= 1; got {steps}, {warmup}, {reps}")
    if not batch_sizes or not sample_steps or not cfgs or min(batch_sizes) < 1 or min(sample_steps) < 1 \
            or min(cfgs) < 1:
        raise BenchError(f"need batch sizes >= 1, sample steps >= 1 and cfg >= 1; got {list(batch_sizes)}, "
                         f"{list(sample_steps)}, {list(cfgs)}")
    if profile_dir and mode not in ("train", "all"):
        raise BenchError(f"--profile_dir profiles the train step: use it with mode train or all, not {mode!r}")
    report = {"mode": mode, "meta": report_lib.meta(label, command, note)}
    cpu_peak = None
    if mode in ("train", "sample", "torch", "all") and jax.devices()[0].platform == "cpu":  # for MFU on a CPU
        cpu_peak = cpu_peak_flops()
        report["meta"]["cpu_peak_flops"] = cpu_peak
    train = TrainBench(config) if mode in ("train", "torch", "all") else None
    sample = None
    if mode in ("sample", "torch", "all"):
        sample = SampleBench(config, config.seed, train.host_params() if train is not None else None)
    if mode in ("train", "all"):
        report["train"] = bench_train(config, steps, warmup, cpu_peak, bench=train, profile_dir=profile_dir)
    if mode in ("sample", "all"):
        report["sample"] = bench_sample(config, batch_sizes, sample_steps, cfgs, reps, bench=sample, cpu_peak=cpu_peak)
    if mode == "vae":
        report["vae"] = bench_vae(batch_sizes, dtypes=vae_dtypes, reps=reps, seed=config.seed)
    if mode == "data":
        report["data"] = bench_data(config, batches=steps, warmup=warmup)
    if mode in ("torch", "all"):
        report["torch"] = bench_torch(config, reps, max(batch_sizes), sample_steps[0], cfgs[0], torch_threads,
                                      train=train, sample=sample, cpu_peak=cpu_peak)
    return report_lib.finish(report)
