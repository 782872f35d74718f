"""The long-sequence race of OmniMamba's efficiency claim (arXiv 2503.08686 Fig. 1 c/d; docs/reference.md §9.1):
OmniMamba's Mamba-2 backbone against JanusFlow's Llama at the same width (d_model 2048), both compiled in JAX.

The contenders. `Mamba2LM` at the release's backbone config (`OmniMambaConfig().backbone`, task LoRA folded away:
inference can run `fold_lora`'s merged kernels) and `LlamaModel` at DeepSeek-LLM 1.3B (`LlamaConfig()`, the
JanusFlow release's LLM; attention "auto": cuDNN flash on NVIDIA GPUs in bf16, Splash on TPUs where the mask allows,
XLA elsewhere), each with its own text head. Full depth is 48 Mamba-2 layers against 24 Llama layers, the same
parameters in the blocks (25.8M and 51.4M per layer); a reduced depth keeps that ratio (e.g. 4 against 2).

What is raced at each sequence length L, on `batch` rows of L random token ids:
  prefill  the L-token prompt into the decoding state (Mamba: conv and SSM states from the chunked SSD scan; Llama: a
           KV cache preallocated to L slots), logits at the last position only (what decoding reads);
  decode   DECODE_STEPS greedy tokens in one `lax.fori_loop` after a context of L tokens, reported per token (Mamba:
           the fixed-size state; Llama: a cache preallocated to L + DECODE_STEPS slots, each step attending over all
           of them, as a preallocated cache does). The state decoded from is zeros: a step's work does not depend on
           the values in the state, so no L-token prefill has to run first.
Each program is jit-compiled once per (model, phase, L, batch). Memory is XLA's plan of the program
(`memory_analysis()`: arguments + outputs - aliased + temporaries; the parameters included). Largest batch: both
programs grow linearly with the batch, so the plans at batch 1 and 2 give fixed and per-row bytes and
(capacity - fixed) // per-row is the largest batch of the phase; computed from the compiled plans, never by
allocating until failure. Capacity: the chip's HBM (`chips.py`), on a CPU this host's RAM.

Guards (each recorded as the point's `status`, the sweep goes on): "out of memory" when XLA refuses to compile or
run for lack of memory; "over memory budget" when a plan exceeds `memory_budget` (on a shared CPU host a run that
would take the machine's memory is not started); "over time budget" when the counted FLOPs (`flops.py`) scaled from
the previous length's measured time predict more than `time_budget` seconds. Every point is compiled, so a point
left unrun still has its memory plan and largest batch.

Per image at each model's shipped settings (`per_image`): OmniMamba = the 72-token t2i prompt prefilled and 256 greedy
codes (`inference.omnimamba.generate_image_tokens`) + the LlamaGen VQ-16 decoder (256 px); JanusFlow = 30 Euler
steps with CFG 2 over [cond; uncond] rows and the prompt cache (`inference.sampler.sample_latents`) + the SDXL-VAE
decoder (384 px). Random weights; reduced LLM depth on a CPU, the towers and decoders at full size.

`aot_memory` compiles the same programs at full depth, bf16, for a target with no device present (an NVIDIA GPU
through the CUDA plugin, a TPU chip through libtpu's topology description; `perf/aot.py`) and records XLA's memory
plan and the roofline time estimate (`roofline.py`) per length.

`run` puts the parts asked for into one report; `race_report.py` turns reports into tables, a plot and BENCHMARKS.md's
race section.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from janusflow_jax.models import llama, mamba2
from janusflow_jax.models.config import JanusFlowConfig, LlamaConfig
from janusflow_jax.models.mamba2 import Mamba2LM
from janusflow_jax.models.omnimamba import OmniMambaConfig
from janusflow_jax.perf import chips
from janusflow_jax.perf import flops as flops_lib
from janusflow_jax.perf import report as report_lib

DECODE_STEPS = 8  # greedy tokens per timed decode call (one compiled loop), reported per token
FULL_LAYERS = {"mamba": 48, "llama": 24}
GIB = 2 ** 30


class RaceError(ValueError):
    """A race that cannot run as asked; the message says why."""


# ---------------------------------------------------------------------------------------------------- the models
RELEASE_WIDTH = 2048


def mamba_config(layers: int, dtype: str = "float32", scan_layers: bool = False,
                 width: int = RELEASE_WIDTH) -> mamba2.Mamba2Config:
    """OmniMamba's backbone (mamba2-1.3b, vocab 50288) at `layers` layers, LoRA folded away. Another `width` (tests):
    d_model `width`, head_dim 16, d_state 16, chunks of 32, vocab 4·width."""
    cfg = OmniMambaConfig().backbone.replace(n_layer=layers, lora_tasks=(), dtype=dtype, param_dtype=dtype,
                                             scan_layers=scan_layers)
    if width != RELEASE_WIDTH:
        cfg = cfg.replace(d_model=width, headdim=16, d_state=16, chunk_size=32, vocab_size=4 * width)
    return cfg


def llama_config(layers: int, width: int = RELEASE_WIDTH) -> LlamaConfig:
    """JanusFlow's LLM (DeepSeek-LLM 1.3B, `LlamaConfig()`) at `layers` layers. Another `width` (tests): hidden
    `width`, MLP 11/4 of it, heads of 16 channels, vocab 4·width."""
    cfg = dataclasses.replace(LlamaConfig(), num_layers=layers)
    if width != RELEASE_WIDTH:
        cfg = dataclasses.replace(cfg, hidden_size=width, intermediate_size=11 * width // 4, num_heads=width // 16,
                                  num_kv_heads=width // 16, head_dim=16, vocab_size=4 * width)
    return cfg


@dataclasses.dataclass(frozen=True)
class Contender:
    """One backbone: `kind` "mamba" or "llama", its module and config."""

    kind: str
    module: nn.Module
    config: object

    @property
    def layers(self) -> int:
        return self.config.n_layer if self.kind == "mamba" else self.config.num_layers

    def abstract_params(self):
        if self.kind == "mamba":
            init = lambda: self.module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))  # noqa: E731
        else:
            init = lambda: self.module.init(jax.random.key(0), jnp.zeros((1, 1, self.config.hidden_size)))  # noqa
        return nn.unbox(jax.eval_shape(init)["params"])

    def init_params(self, seed: int = 0):
        """Random parameters, created on the default device by one compiled program."""
        shapes = self.abstract_params()
        leaves, tree = jax.tree.flatten(shapes)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        make = jax.jit(lambda ks: [0.02 * jax.random.normal(k, s.shape, jnp.float32).astype(s.dtype)
                                   for k, s in zip(ks, leaves)])
        return jax.tree.unflatten(tree, make(keys))

    def decode_cache(self, batch: int, context: int, abstract: bool = False):
        """The state a decode call starts from after `context` tokens (zeros; see the module docstring)."""
        if self.kind == "mamba":
            make = lambda: mamba2.init_cache(self.config, batch)  # noqa: E731
        else:
            make = lambda: llama.init_cache(self.config, batch, context + DECODE_STEPS, self.module.dtype)  # noqa
        return jax.eval_shape(make) if abstract else jax.jit(make)()

    def counted_flops(self, phase: str, batch: int, length: int) -> float:
        """`flops.py`'s count of one call: prefill of `length` tokens, or DECODE_STEPS decode steps after them."""
        if self.kind == "mamba":
            if phase == "prefill":
                return flops_lib.mamba2_forward(self.config, batch, length, logit_tokens=1)
            return DECODE_STEPS * flops_lib.mamba2_forward(self.config, batch, 1, logit_tokens=1)
        cfg = JanusFlowConfig(llm=self.config, repa=dataclasses.replace(JanusFlowConfig().repa, layer=0))
        head = 2 * batch * self.config.hidden_size * self.config.vocab_size
        if phase == "prefill":
            return flops_lib.llm_forward(cfg, batch, length, logits=False) + head
        # A preallocated cache: every step's scores and values run over all length + DECODE_STEPS slots (llm_forward
        # counts past + 1/2 keys for one new token).
        slots = length + DECODE_STEPS
        return DECODE_STEPS * (flops_lib.llm_forward(cfg, batch, 1, logits=False, past=slots - 0.5) + head)


def contenders(mamba_layers: int, llama_layers: int, dtype: str = "float32", scan_layers: bool = False,
               attention: str = "auto", width: int = RELEASE_WIDTH) -> dict[str, Contender]:
    """{"mamba": ..., "llama": ...} at the given depths, computing (and storing) in `dtype`."""
    mcfg = mamba_config(mamba_layers, dtype, scan_layers, width)
    lcfg = llama_config(llama_layers, width)
    return {"mamba": Contender("mamba", Mamba2LM(mcfg), mcfg),
            "llama": Contender("llama", llama.LlamaModel(lcfg, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype),
                                                         scan_layers=scan_layers, attention=attention), lcfg)}


# --------------------------------------------------------------------------------------------------- the programs
def _mamba_prefill(module, params, ids):
    def run(m, ids):
        hidden, cache = m.hidden_states(m.embeddings(ids), mamba2.init_cache(m.config, ids.shape[0]))
        return m.logits(hidden[:, -1]), cache
    return module.apply({"params": params}, ids, method=run)


def _llama_prefill(module, params, ids):
    def run(m, ids):
        out = m(m.embed(ids), cache=llama.init_cache(m.config, ids.shape[0], ids.shape[1], m.dtype),
                return_logits=False)
        return m.logits(out["hidden"][:, -1]), out["cache"]
    return module.apply({"params": params}, ids, method=run)


def _mamba_decode(module, params, cache, token, start):
    del start  # a recurrence has no position

    def step(_, carry):
        token, cache = carry
        logits, cache = module.apply({"params": params}, token, cache, method=Mamba2LM.decode_step)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache
    return jax.lax.fori_loop(0, DECODE_STEPS, step, (token, cache))


def _llama_decode(module, params, cache, token, start):
    def run(m, token, cache, index):
        out = m(m.embed(token[:, None]), cache=cache, cache_index=index, return_logits=False)
        return m.logits(out["hidden"][:, 0]), out["cache"]

    def step(i, carry):
        token, cache = carry
        logits, cache = module.apply({"params": params}, token, cache, start + i, method=run)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache
    return jax.lax.fori_loop(0, DECODE_STEPS, step, (token, cache))


PREFILL = {"mamba": jax.jit(_mamba_prefill, static_argnums=0), "llama": jax.jit(_llama_prefill, static_argnums=0)}
DECODE = {"mamba": jax.jit(_mamba_decode, static_argnums=0, donate_argnums=2),
          "llama": jax.jit(_llama_decode, static_argnums=0, donate_argnums=2)}


def program_args(c: Contender, phase: str, batch: int, length: int, params, abstract: bool, sharding=None):
    """The arguments of one program call (ShapeDtypeStructs with `sharding` when `abstract`)."""
    if abstract:
        put = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
        params = jax.tree.map(put, params)
    if phase == "prefill":
        ids = (jax.ShapeDtypeStruct((batch, length), jnp.int32) if abstract else
               jnp.asarray(np.random.default_rng(length).integers(3, 1000, (batch, length)), jnp.int32))
        return (c.module, params, put(ids) if abstract else ids)
    cache = c.decode_cache(batch, length, abstract)
    token = jax.ShapeDtypeStruct((batch,), jnp.int32) if abstract else jnp.ones((batch,), jnp.int32)
    start = jax.ShapeDtypeStruct((), jnp.int32) if abstract else jnp.int32(length)
    if abstract:
        cache, token, start = jax.tree.map(put, (cache, token, start))
    return (c.module, params, cache, token, start)


def compile_program(c: Contender, phase: str, args):
    """(compiled executable, compile seconds) of one phase."""
    fn = PREFILL[c.kind] if phase == "prefill" else DECODE[c.kind]
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - start


def planned_bytes(compiled) -> int:
    """XLA's memory plan of a compiled program: arguments + outputs - aliased + temporaries."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def largest_batch(bytes_1: int, bytes_2: int, capacity: int) -> int:
    """Rows that fit `capacity` for a program linear in the batch whose plans are bytes_1 (batch 1), bytes_2 (2)."""
    per_row = max(bytes_2 - bytes_1, 1)
    fixed = bytes_1 - per_row
    return max((capacity - fixed) // per_row, 0)


def _oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "Out of memory" in text


def host_memory() -> int:
    """This host's RAM in bytes (the CPU's "capacity")."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ------------------------------------------------------------------------------------------------------ the sweep
def _timed(compiled, args, phase: str, reps: int) -> list[float]:
    """Seconds of `reps` calls after one untimed call; decode calls feed their cache to the next (it is donated)."""
    args = list(args[1:])  # the module is static: compiled executables take the rest
    times = []
    for i in range(reps + 1):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        if i:
            times.append(time.perf_counter() - start)
        if phase == "decode":
            args[1] = out[1]
    return times


def sweep(race: dict[str, Contender], lengths: Sequence[int], batch: int = 1, reps: int = 2,
          memory_budget: float = 8 * GIB, time_budget: float = 90.0,
          progress: Callable[[str], None] = lambda s: None, seed: int = 0) -> list[dict]:
    """One row per (model, phase, length): status ("ok" or why not run), compile_s, seconds (median call),
    per_token_s (decode: seconds / DECODE_STEPS), memory_bytes (plan at `batch`), largest_batch (plans at 1 and 2,
    against this host's RAM), counted_flops. Runs on the default device."""
    capacity = host_memory()
    rows = []
    for kind, c in race.items():
        params = c.init_params(seed)
        for phase in ("prefill", "decode"):
            last = None  # (length, seconds) of the previous timed point: the time guard's base
            for length in lengths:
                row = {"model": kind, "phase": phase, "length": length, "batch": batch, "layers": c.layers,
                       "counted_flops": c.counted_flops(phase, batch, length)}
                rows.append(row)
                # A point predicted to run too long is still compiled: its memory plan costs no run.
                over_time = bool(last) and last[1] * row["counted_flops"] / c.counted_flops(phase, batch,
                                                                                              last[0]) > time_budget
                try:
                    args = program_args(c, phase, batch, length, params, abstract=False)
                    compiled, row["compile_s"] = compile_program(c, phase, args)
                    row["memory_bytes"] = planned_bytes(compiled)
                    two, _ = compile_program(c, phase, program_args(c, phase, 2, length, params, abstract=True))
                    row["memory_bytes_batch2"] = planned_bytes(two)
                    row["largest_batch"] = largest_batch(row["memory_bytes"], row["memory_bytes_batch2"], capacity)
                    del two
                    if row["memory_bytes"] > memory_budget:
                        row["status"] = (f"over memory budget (plan {row['memory_bytes'] / GIB:.1f} GiB > "
                                         f"{memory_budget / GIB:.1f} GiB)")
                    elif over_time:
                        row["status"] = f"over time budget (> {time_budget:g} s predicted from {last[0]} tokens)"
                    else:
                        times = _timed(compiled, args, phase, reps if length <= 8192 else 1)
                        row.update(status="ok", seconds=statistics.median(times), seconds_all=times)
                        if phase == "decode":
                            row["per_token_s"] = row["seconds"] / DECODE_STEPS
                        last = (length, row["seconds"])
                    del compiled, args
                except Exception as e:  # noqa: BLE001 - an out-of-memory point is recorded, anything else raised
                    if not _oom(e):
                        raise
                    row["status"] = "out of memory: " + " ".join(str(e).split())[:200]
                progress(f"race: {kind} {phase} {length}: " + ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                    if k in ("status", "seconds", "memory_bytes", "largest_batch")))
        del params
    return rows


# ----------------------------------------------------------------------------------------- ahead of time, full size
def aot_memory(devices: Sequence, lengths: Sequence[int], dtype: str = "bfloat16", batch: int = 1,
               progress: Callable[[str], None] = lambda s: None, models: Sequence[str] = ("mamba", "llama"),
               layers: tuple[int, int] = (FULL_LAYERS["mamba"], FULL_LAYERS["llama"]),
               width: int = RELEASE_WIDTH) -> list:
    """Full-depth (48 / 24 layers; `layers` and `width` other sizes, for tests) prefill and decode programs of both
    models compiled for `devices[0]` (a device of `aot.topology_devices`), parameters and compute in `dtype`, layers
    scanned: per (model, phase, length) the memory plan at `batch` and at 2 (largest batch against the chip's HBM),
    whether it fits, the fused attention kernel calls in the program (Splash's tpu_custom_call, cuDNN's fmha) and
    the roofline time estimate (`roofline.py`, loops walked by their trip counts; decode per token)."""
    from janusflow_jax.perf import roofline
    from janusflow_jax.sharding import mesh_context

    device = devices[0]
    mesh = jax.sharding.Mesh(np.array([device]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    race = contenders(*layers, dtype, scan_layers=True, width=width)
    hbm, peak, bandwidth = chips.hbm_bytes(device), chips.peak_flops_per_device(device), chips.hbm_bandwidth(device)
    rows = []
    for kind in models:
        c = race[kind]
        params = c.abstract_params()
        for phase in ("prefill", "decode"):
            for length in lengths:
                row = {"model": kind, "phase": phase, "length": length, "batch": batch, "layers": c.layers,
                       "device_kind": device.device_kind, "hbm_bytes": hbm,
                       "counted_flops": c.counted_flops(phase, batch, length)}
                rows.append(row)
                try:
                    with mesh_context(mesh):
                        compiled, row["compile_s"] = compile_program(
                            c, phase, program_args(c, phase, batch, length, params, True, sharding))
                        two, _ = compile_program(c, phase, program_args(c, phase, 2, length, params, True, sharding))
                    row["memory_bytes"], row["memory_bytes_batch2"] = planned_bytes(compiled), planned_bytes(two)
                    row["largest_batch"] = largest_batch(row["memory_bytes"], row["memory_bytes_batch2"], hbm)
                    row["fits"] = row["memory_bytes"] <= hbm
                    text = compiled.as_text() or ""
                    row["fused_attention_calls"] = (text.count('custom_call_target="tpu_custom_call"')
                                                    + text.count("__cudnn$fmha"))
                    if peak and bandwidth and text:
                        est = roofline.estimate(text, peak, bandwidth, top=3)
                        row["roofline_s"] = est["seconds"]
                        row["roofline_flops"] = est["flops"]
                        if phase == "decode":
                            row["roofline_per_token_s"] = est["seconds"] / DECODE_STEPS
                    row["status"] = "ok"
                except Exception as e:  # noqa: BLE001 - XLA's refusal (out of HBM) is the point's result
                    if not _oom(e):
                        raise
                    row["status"] = "out of memory: " + " ".join(str(e).split())[:200]
                progress(f"race aot {device.device_kind}: {kind} {phase} {length}: {row['status']} "
                         f"{row.get('memory_bytes', 0) / GIB:.2f} GiB, roofline {row.get('roofline_s', 0):.4g} s")
    return rows


# ------------------------------------------------------------------------------------------- per image, shipped
def _median_call(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(first call's seconds = compile + run, median of `reps` more)."""
    def once():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start
    first = once()
    return first, statistics.median(once() for _ in range(reps))


def per_image(mamba_layers: int, llama_layers: int, reps: int = 1, seed: int = 0, prompt_len: int = 72,
              progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Seconds per image (batch 1) of each model's text-to-image path at its shipped settings, split into the LLM
    part and the image decoder; random weights, the LLMs at the given depths, everything else at full size.
    JanusFlow's prompt is `prompt_len` tokens (OmniMamba's is 72 by construction)."""
    from janusflow_jax.inference import omnimamba as om_inference
    from janusflow_jax.inference.sampler import sample_latents
    from janusflow_jax.models import omnimamba as om_model
    from janusflow_jax.models import vae as vae_lib
    from janusflow_jax.models import vq as vq_lib
    from janusflow_jax.models.janusflow import JanusFlow, init_params as janus_init

    rng = np.random.default_rng(seed)
    rows = []
    # OmniMamba: 72-token prompt prefill + 256 greedy codes (the release: top_k 1, no CFG), then VQ-16 decode.
    ocfg = OmniMambaConfig().replace(n_layer=mamba_layers)
    omodel = om_model.OmniMamba(ocfg)
    oparams = jax.jit(lambda r: nn.unbox(omodel.init(r, method=om_model.OmniMamba.init_all))["params"])(
        jax.random.key(seed))
    ids = rng.integers(3, 50000, (1, ocfg.t2i_prompt_length)).astype(np.int32)
    codes_fn = lambda: om_inference.generate_image_tokens(omodel, oparams, ids)  # noqa: E731
    first, lm_s = _median_call(codes_fn, reps)
    codes = jnp.asarray(codes_fn())
    vq = vq_lib.VQModel(vq_lib.VQConfig())
    vq_params = jax.jit(lambda r: nn.unbox(vq.init(r, method=vq_lib.VQModel.init_all))["params"])(jax.random.key(1))
    vq_first, vq_s = _median_call(lambda: om_inference._decode(vq, vq_params, codes), reps)
    rows.append({"model": "mamba", "layers": mamba_layers, "lm_s": lm_s, "decoder_s": vq_s, "total_s": lm_s + vq_s,
                 "first_call_s": first + vq_first, "image_px": ocfg.image_grid * vq_lib.VQConfig().downsample_factor,
                 "work": f"{ocfg.t2i_prompt_length}-token prompt + {ocfg.num_image_tokens} greedy codes; VQ-16 decode",
                 "counted_lm_flops": flops_lib.omnimamba_t2i_sampling_flops(ocfg, 1),
                 "full_depth_lm_flops": flops_lib.omnimamba_t2i_sampling_flops(OmniMambaConfig(), 1)})
    progress(f"race image: {rows[-1]}")
    # JanusFlow: 30 Euler steps, CFG 2, prompt cache, then SDXL-VAE decode of the 48 x 48 latents (384 px).
    jcfg = JanusFlowConfig(llm=llama_config(llama_layers), repa=dataclasses.replace(JanusFlowConfig().repa, layer=0))
    jmodel = JanusFlow(jcfg)
    jparams = janus_init(jcfg, jax.random.key(seed))
    jids = rng.integers(3, 100000, (1, prompt_len)).astype(np.int32)
    jids[:, 0] = 1
    mask = np.ones_like(jids)
    z0 = rng.standard_normal((1, jcfg.latent_size, jcfg.latent_size, jcfg.gen_encoder.in_channels)).astype(np.float32)
    steps, cfg_w = 30, 2.0
    sample_fn = lambda: sample_latents(jmodel, jparams, jids, mask, z0, steps, cfg_w)  # noqa: E731
    first, lm_s = _median_call(sample_fn, reps)
    latents = jnp.asarray(sample_fn())
    vae_cfg = vae_lib.VAEConfig()
    vae = vae_lib.AutoencoderKL(vae_cfg)
    vae_params = vae_lib.init_vae_params(vae_cfg, jax.random.key(2))
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae_lib.AutoencoderKL.decode))
    vae_first, vae_s = _median_call(lambda: decode(vae_params, latents), reps)
    full = JanusFlowConfig()
    rows.append({"model": "llama", "layers": llama_layers, "lm_s": lm_s, "decoder_s": vae_s, "total_s": lm_s + vae_s,
                 "first_call_s": first + vae_first, "image_px": jcfg.latent_size * vae_cfg.downsample_factor,
                 "work": f"{steps} Euler steps, CFG {cfg_w:g}, {prompt_len}-token prompt (cached); SDXL-VAE decode",
                 "counted_lm_flops": flops_lib.sampling_flops(jcfg, 1, steps, prompt_len, True, True),
                 "full_depth_lm_flops": flops_lib.sampling_flops(full, 1, steps, prompt_len, True, True)})
    progress(f"race image: {rows[-1]}")
    return rows


# ------------------------------------------------------------------------------------------------------ the report
PARTS = ("sweep", "image", "aot")


def run(*, label: str, command: str = "", lengths: Sequence[int], mamba_layers: int, llama_layers: int,
        parts: Sequence[str] = ("sweep",), targets: Sequence[str] = (), batch: int = 1, reps: int = 2,
        memory_budget_gib: float = 8.0, time_budget: float = 90.0, dtype: str = "float32",
        note: str = "", width: int = RELEASE_WIDTH, models: Sequence[str] = ("mamba", "llama"),
        progress: Callable[[str], None] = report_lib.progress) -> dict:
    """The race report: "sweep" (this host, reduced depth), "image" (per-image latency at the shipped settings, same
    depths), "aot" (full depth compiled for each of `targets`, e.g. "h200", "v5p:2x2x1": `aot.topology_devices`; a
    single chip is the first device of the topology). `width`: d_model of the sweep's backbones (2048, the release;
    smaller ones for tests: `mamba_config`). `models`: the backbones "aot" compiles (the section takes a model
    missing from a target's newest report from an older one)."""
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise RaceError(f"race parts are {', '.join(PARTS)}; got {list(parts)}")
    if not lengths or min(lengths) < 1 or mamba_layers < 1 or llama_layers < 1 or batch < 1 or reps < 1:
        raise RaceError(f"race needs lengths, layers, batch and reps >= 1; got lengths={list(lengths)} layers="
                        f"{mamba_layers}/{llama_layers} batch={batch} reps={reps}")
    if not models or set(models) - {"mamba", "llama"}:
        raise RaceError(f"race models are mamba and llama; got {list(models)}")
    if "aot" in parts and not targets:
        raise RaceError("race part aot needs --race_targets (e.g. h200,v5p:2x2x1)")
    report = {"mode": "race", "meta": report_lib.meta(label, command, note),
              "race": {"mamba_layers": mamba_layers, "llama_layers": llama_layers, "batch": batch, "dtype": dtype,
                       "lengths": list(lengths), "capacity_bytes": host_memory(), "attention": "auto",
                       "memory_budget": memory_budget_gib * GIB, "time_budget": time_budget,
                       "decode_steps": DECODE_STEPS, "width": width}}
    if "sweep" in parts:
        report["sweep"] = sweep(contenders(mamba_layers, llama_layers, dtype, width=width), lengths, batch, reps,
                                memory_budget_gib * GIB, time_budget, progress)
    if "image" in parts:
        report["image"] = per_image(mamba_layers, llama_layers, reps=1, progress=progress)
    if "aot" in parts:
        from janusflow_jax.perf import aot

        report["aot"] = {}
        for target in targets:
            try:
                devices = aot.topology_devices(target)
            except aot.TopologyError as e:
                raise RaceError(str(e)) from None
            report["aot"][target] = aot_memory(devices, lengths, progress=progress, models=models)
    return report_lib.finish(report)
