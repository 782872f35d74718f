"""Ahead-of-time compile of the full train step for a TPU topology or NVIDIA GPUs, on any host: pod readiness
without a pod.

As MaxText's train_compile does: the devices come from a topology description that libtpu builds without the
hardware (`jax.experimental.topologies.get_topology_desc`), the train state and batch are abstract
(`jax.ShapeDtypeStruct`s carrying their shardings, so nothing is allocated), and `jit(...).lower(...).compile()` runs
the real XLA TPU compiler. What comes back is XLA's own memory plan for one chip (arguments, outputs, temporaries,
generated code) and its cost model (FLOPs, and a time estimate), set against our counted model FLOPs (`flops.py`).

Reading the compiler's numbers:
- Everything is per chip: after SPMD partitioning XLA compiles one program that every chip runs. The step's compiled
  FLOPs are that program's FLOPs × chips.
- XLA's cost analysis counts the body of a while loop ONCE, whatever its trip count. A step with scanned layers
  (`scan_layers=True`) or gradient accumulation (`micro_batches > 1`) has loops, so its compiled FLOPs undercount and
  its time estimate ("optimal_seconds") covers one iteration, or is negative; `flops_undercounted` says so, and
  then the whole-step FLOPs and time come from the roofline of the compiled program (`roofline.py`), which walks
  loops by their trip counts. (A depth extrapolation from extra compiles at 1 and 2 blocks served here before the
  roofline; it needed XLA's TPU cost model and three more compiles, and was removed.)
- The time estimate is XLA's roofline (FLOPs and HBM bytes of every op at the chip's peak); it ignores collectives'
  latency and overlap, so it is a lower bound on the step time and the MFU derived from it an upper bound.

Topologies: "v5p-128" (TensorCores: 64 chips, 4x4x4), "v5e-256" (chips, 16x16), "v6e-256", "v4-128", an explicit
libtpu string "v5p:4x4x12", or "cpu:8" (the first 8 local CPU devices, for a quick check anywhere). NVIDIA GPUs:
"h100", "h200", "a100", "h100:8" (8 in one host), "h100:4x8" (4 hosts of 8): XLA's deviceless GPU compiler through
JAX's CUDA plugin, against `chips.GPU_TARGETS`' description of the chip. XLA:GPU has no cost model; there the roofline of
the compiled program (`roofline.py`, loops walked by trip count) gives the FLOPs and the time estimate. Without a
device it cannot autotune, so GEMM configurations are XLA's defaults; the memory plan matched the H200's measured
peak to 0.1% (BENCHMARKS.md).
"""

from __future__ import annotations

import re
import time

import jax

from janusflow_jax.perf import chips
from janusflow_jax.perf.chips import GIB
from janusflow_jax.perf import roofline
from janusflow_jax.sharding import mesh_context
from janusflow_jax.train import loop as trainer

# Pod-slice name prefix -> (libtpu generation, TensorCores per chip counted in the name, torus dimensions).
# v4 and v5p slices are named by TensorCores (2 per chip, one megacore device), v5e and v6e by chips.
GENERATIONS = {
    "v4": ("v4", 2, 3),
    "v5p": ("v5p", 2, 3),
    "v5e": ("v5e", 1, 2),
    "v6e": ("v6e", 1, 2),
}
CHIPS_PER_HOST = (2, 2, 1)  # every TPU VM host of these generations holds 2x2 chips


class TopologyError(ValueError):
    """A topology name that cannot be turned into devices; the message says why."""


class CompileError(RuntimeError):
    """XLA refused to compile the step (most often: it does not fit the chip's HBM); the message is XLA's."""


# --------------------------------------------------------------------------------------------------- topologies
def _torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU uses for a power-of-two chip count: 2-D (v5e, v6e) as square as possible with the
    longer side last (8 -> 2x4, 256 -> 16x16); 3-D (v4, v5p) from 2x2x1 doubling z, y, x in turn (64 -> 4x4x4)."""
    k = chips.bit_length() - 1
    if chips < 1 or chips != 2 ** k:
        raise TopologyError(f"{chips} chips is not a power of two; give the shape explicitly, e.g. 'v5p:4x4x12'")
    if dims == 2:
        if chips == 2:
            raise TopologyError("there is no 2-chip slice; use 1, 4, 8, ... chips")
        return (2 ** (k // 2), 2 ** (k - k // 2))
    if chips < 4:
        raise TopologyError(f"the smallest 3-D slice has 4 chips (2x2x1), not {chips}")
    shape = [2, 2, 1] if chips == 4 else [2, 2, 2]
    for i in range(max(k - 3, 0)):
        shape[2 - i % 3] *= 2
    return tuple(shape)


def topology_name(topology: str) -> str:
    """"v5p-128" -> "v5p:4x4x4", "v5e-256" -> "v5e:16x16"; an explicit "gen:AxB[xC]" string passes through."""
    if ":" in topology:
        gen, _, shape = topology.partition(":")
        if gen not in {g for g, _, _ in GENERATIONS.values()} | {"v5"} or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
            raise TopologyError(f"bad topology {topology!r}: expected e.g. 'v5p:4x4x4' or 'v5e:16x16'")
        return topology
    match = re.fullmatch(r"(v\d+[a-z]?)-(\d+)", topology)
    if not match or match.group(1) not in GENERATIONS:
        raise TopologyError(f"unknown topology {topology!r}: use e.g. v5p-128, v5e-256, v6e-256, v4-128, "
                            f"'v5p:4x4x12' or cpu:8")
    gen, cores_per_chip, dims = GENERATIONS[match.group(1)]
    cores = int(match.group(2))
    if cores % cores_per_chip:
        raise TopologyError(f"{topology}: {match.group(1)} slices count {cores_per_chip} cores per chip")
    return f"{gen}:" + "x".join(map(str, _torus_shape(cores // cores_per_chip, dims)))


def gpu_target_config(target: str) -> str:
    """The GpuTargetConfigProto text (XLA's description of a GPU to compile for) of a chips.GPU_TARGETS entry."""
    spec = chips.GPU_TARGETS[target]
    major, minor = spec["capability"]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {spec["smem_block_optin"]}
  shared_memory_per_core: {spec["smem_core"]}
  threads_per_core_limit: 2048
  core_count: {spec["cores"]}
  fpus_per_core: {128 if major >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chips.CHIPS[target].hbm_bandwidth)}
  l2_cache_size: {spec["l2"]}
  clock_rate_ghz: {spec["clock_ghz"]}
  device_memory_size: {chips.CHIPS[target].hbm_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{spec["name"]}"
"""


def gpu_devices(topology: str) -> list:
    """Abstract devices of NVIDIA GPUs: "h100" (one), "h100:8" (8 in one host), "h100:4x8" (4 hosts of 8)."""
    target, sep, shape = topology.partition(":")
    if target not in chips.GPU_TARGETS or (sep and not re.fullmatch(r"(\d+x)?\d+", shape)):
        raise TopologyError(f"bad GPU topology {topology!r}: expected one of {sorted(chips.GPU_TARGETS)}, optionally with "
                            f":GPUS or :HOSTSxGPUS (e.g. h100:8, h100:4x8)")
    hosts, _, per_host = shape.rpartition("x") if shape else ("1", "", "1")
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts or 1}x{per_host}",
                                            target_config=gpu_target_config(target))
    except Exception as e:  # no CUDA plugin
        raise TopologyError(f"cannot describe {topology!r} ({type(e).__name__}: {str(e).strip()[:300]}); compiling "
                            f"for NVIDIA GPUs without one needs JAX's CUDA plugin: pip install "
                            f"'jax[cuda13]=={jax.__version__}' (no GPU or driver needed)") from None
    return list(desc.devices)


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """The devices of a TPU topology or an NVIDIA GPU target (abstract: they can compile, not run) or, for "cpu:N",
    N local CPU devices. `num_slices` > 1: that many copies of a TPU topology joined over the data-center network
    (a multi-slice pod; each device carries its `slice_index`, which `sharding.make_mesh(dcn_data=...)` uses)."""
    if num_slices < 1 or (num_slices > 1 and (topology.startswith("cpu:")
                                              or topology.split(":")[0] in chips.GPU_TARGETS)):
        raise TopologyError(f"--num_slices {num_slices}: several slices are a TPU topology's (e.g. v5p-128), not "
                            f"{topology!r}'s")
    if topology.split(":")[0] in chips.GPU_TARGETS:
        return gpu_devices(topology)
    if topology.startswith("cpu:"):
        count = topology[4:]
        if not count.isdigit() or int(count) < 1:
            raise TopologyError(f"bad topology {topology!r}: expected cpu:N with N >= 1")
        local = jax.devices("cpu")
        if len(local) < int(count):
            raise TopologyError(f"{topology}: only {len(local)} CPU devices; set "
                                f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts")
        return local[:int(count)]
    name = topology_name(topology)
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                            chips_per_host_bounds=CHIPS_PER_HOST, num_slices=num_slices)
    except Exception as e:  # no libtpu, or libtpu rejects the shape
        raise TopologyError(f"cannot describe TPU topology {name!r} ({type(e).__name__}: {str(e).strip()[:300]}); "
                            f"AOT compilation for TPUs needs libtpu: pip install 'jax[tpu]'") from None
    return list(desc.devices)


def longest_phase(mixture) -> int:
    """The mixture phase that covers the most steps (stage 2: the 14:80:6 one, steps 10k-390k)."""
    bounds = [0] + [until for until, _ in mixture]
    return max(range(len(mixture)), key=lambda i: bounds[i + 1] - bounds[i])


# ---------------------------------------------------------------------------------------------------- compiling
def _compile(plan, phase: int, sizes: dict):
    """(compiled executable, lowering seconds, compile seconds) of the plan's step for one batch composition."""
    state, batch = plan.abstract_state(), plan.abstract_batch(sizes)
    jitted = plan.jitted_step(phase, sizes)
    start = time.perf_counter()
    with mesh_context(plan.mesh):  # the model's activation constraints
        lowered = jitted.lower(state, batch)
    lowered_at = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # e.g. RESOURCE_EXHAUSTED: ran out of memory in memory space hbm
        raise CompileError(" ".join(str(e).split())[:2000]) from None
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


def _flops_and_seconds(compiled) -> tuple[float, float | None]:
    """XLA's FLOPs and roofline time ("optimal_seconds"; None when it has none) of one chip's program."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    seconds = (cost or {}).get("optimal_seconds")
    return float((cost or {}).get("flops", 0.0)), float(seconds) if seconds is not None and seconds > 0 else None


def phase_compositions(config, devices, phase: int | None = None):
    """(plan, phase, [sizes of every distinct batch composition of the phase, in order of first use]) for `devices`
    (data/mixture.py: the few step shapes the schedule deals; phase default: the longest)."""
    plan = trainer.make_plan(config, devices=devices)
    phase = longest_phase(config.mixture) if phase is None else phase
    if not 0 <= phase < len(config.mixture):
        raise ValueError(f"phase {phase} outside the config's {len(config.mixture)} mixture phases")
    schedule = plan.mixture.schedule(phase)
    return plan, phase, [dict(zip(schedule.types, c)) for c in schedule.compositions()]


def compile_compositions(config, devices, phase: int | None = None, first_only: bool = False) -> list[dict]:
    """`compile_train_step` for every batch composition of the mixture phase (or its first alone): the run compiles
    each of them once; the largest memory among them is what must fit."""
    plan, phase, compositions = phase_compositions(config, devices, phase)
    return [compile_train_step(config, devices, phase, sizes, plan=plan, compositions=len(compositions))
            for sizes in compositions[:1 if first_only else None]]


def compile_train_step(config, devices, phase: int | None = None, sizes: dict | None = None, *, plan=None,
                       compositions: int | None = None) -> dict:
    """Lowers and compiles the configured train step for `devices` (e.g. `topology_devices("v5p-128")`).

    `phase` is the mixture phase (default: the longest) and `sizes` the batch composition (rows per data type)
    compiled (default: the phase's first). A step whose loops hide its
    cost from XLA's own analysis (scanned layers, micro-batches) gets its whole-step FLOPs and time estimate from the
    roofline of the compiled program, which walks loops by their trip counts. Returns a flat report: what was compiled (devices, mesh, remat, micro-batches, sub-batch
    rows), memory per chip in bytes (argument, output, alias, temp, generated_code, total; hbm and fits where the
    chip is known), compiled FLOPs per chip and per step (flops_undercounted when loops hide part of them), the
    compiler's time estimate, our counted FLOPs, the estimated step time and MFU with their source, and the wall
    times. Raises CompileError when XLA refuses (e.g. out of HBM).
    """
    devices = list(devices)
    if plan is None:
        plan, phase, all_sizes = phase_compositions(config, devices, phase)
        sizes, compositions = sizes or all_sizes[0], len(all_sizes)
    compiled, lower_seconds, compile_seconds = _compile(plan, phase, sizes)
    n_chips = len(devices)
    kind = devices[0].device_kind
    mem = compiled.memory_analysis()
    memory = {
        "argument": mem.argument_size_in_bytes,
        "output": mem.output_size_in_bytes,
        "alias": mem.alias_size_in_bytes,  # outputs written into donated arguments: counted once
        "temp": mem.temp_size_in_bytes,
        "generated_code": mem.generated_code_size_in_bytes,
    }
    memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                       + memory["generated_code"])
    hbm = chips.hbm_bytes(devices[0]) or None
    flops, compiler_seconds = _flops_and_seconds(compiled)
    peak = chips.peak_flops_per_device(devices[0])
    bandwidth = chips.hbm_bandwidth(devices[0])
    text = compiled.as_text() or ""
    # The roofline of the compiled program (roofline.py): it walks loops by their trip counts, so it covers the whole
    # step even where XLA's own estimate sees one iteration, and it needs no cost model from the backend.
    bound = roofline.estimate(text, peak, bandwidth, top=10) if text and peak and bandwidth else None
    # XLA counts a loop body once: scanned layers and micro-batch accumulation are loops, and then neither the FLOPs
    # nor the time estimate covers the step. XLA:GPU has no cost model at all (0 FLOPs): there the roofline's count,
    # which does cover the loops, stands in.
    # JanusFlow's config holds the layer settings; OmniMamba's system config holds them in its backbone's.
    layers = plan.model_cfg.lm.backbone if plan.family.name == "omnimamba" else plan.model_cfg
    undercounted = bool(flops) and (layers.scan_layers or config.micro_batches > 1)
    whole = bound is not None and not bound["unknown_trip_counts"]  # else a loop was counted once
    if not flops and whole:
        flops = bound["flops"]
    estimate, source, whole_flops = None, None, None
    if not undercounted:
        estimate, source, whole_flops = compiler_seconds, "compiler" if compiler_seconds else None, flops
    elif whole:
        whole_flops = bound["flops"]
    if estimate is None and whole:
        estimate, source = bound["seconds"], "roofline"
    counts = plan.family.step_counts(plan, sizes)
    schedule = plan.mixture.schedule(phase)
    return {
        "device_kind": kind,
        "chips": n_chips,
        "mesh": dict(plan.mesh.shape),
        "remat_policy": layers.remat_policy,
        "attention": getattr(layers, "attention", "none (Mamba-2)"),
        # Fused attention kernels in the program (Pallas Splash on a TPU, cuDNN on a GPU): 0 means XLA attention.
        "kernel_calls": text.count('custom_call_target="tpu_custom_call"') + text.count("__cudnn$fmha"),
        "scan_layers": layers.scan_layers,
        "micro_batches": config.micro_batches,
        "phase": phase,
        "ratio": tuple(config.mixture[phase][1]),
        "sub_batch": dict(sizes),
        "compositions": compositions,  # distinct batch compositions of the phase (each compiled once by a run)
        "unit_rows": plan.unit_rows,
        "steps_per_period": schedule.steps_per_period,
        "share_of_steps": _share_of_steps(schedule, sizes),
        "batch_size": config.batch_size,
        "memory_bytes": memory,
        "hbm_bytes": hbm,
        "fits": None if hbm is None else memory["total"] <= hbm,
        "compiled_flops_per_chip": flops,
        "compiled_flops": flops * n_chips,
        "flops_undercounted": undercounted,
        "compiler_seconds": compiler_seconds,  # XLA's own number for this program (one loop iteration if looped)
        "whole_step_flops": None if whole_flops is None else whole_flops * n_chips,
        "counted_flops": counts["flops"],
        "tokens": counts["tokens"],
        "peak_flops_per_chip": peak,
        "estimated_step_seconds": estimate,
        "estimate_source": source,
        "mfu": counts["flops"] / estimate / (n_chips * peak) if estimate and peak else None,
        "roofline": bound,
        "lower_seconds": lower_seconds,
        "compile_seconds": compile_seconds,
    }


def _share_of_steps(schedule, sizes: dict) -> float:
    """The fraction of the phase's steps that have this composition."""
    want = tuple(sizes.get(t, 0) for t in schedule.types)
    period = schedule.steps_per_period
    return sum(schedule.composition(i) == want for i in range(period)) / period


def format_compositions(reports: list[dict]) -> str:
    """One line per compiled composition (rows, share of steps, memory per chip) and the largest memory."""
    def gib(b):
        return f"{b / GIB:.2f} GiB"

    first = reports[0]
    lines = [f"phase {first['phase']} ratio {':'.join(map(str, first['ratio']))}: {first['compositions']} batch "
             f"compositions in units of {first['unit_rows']} rows (the deal repeats every {first['steps_per_period']} "
             "steps)" + ("" if len(reports) == first["compositions"] else f"; {len(reports)} compiled")]
    for r in reports:
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in r["sub_batch"].items()) + f": {r['share_of_steps']:.0%} "
                     f"of steps, memory per chip {gib(r['memory_bytes']['total'])}"
                     + (f" ({'fits' if r['fits'] else 'DOES NOT FIT'})" if r["hbm_bytes"] else "")
                     + f", compile {r['compile_seconds']:.1f} s")
    peak = max(r["memory_bytes"]["total"] for r in reports)
    lines.append(f"  largest: {gib(peak)} per chip" + (f" of {gib(first['hbm_bytes'])} HBM" if first["hbm_bytes"]
                                                       else ""))
    return "\n".join(lines)


def format_report(report: dict, topology: str = "") -> str:
    """The report as the lines `launch.compile` prints."""
    def gib(b):
        return f"{b / GIB:.2f} GiB" if b >= GIB // 100 else f"{b / 2 ** 20:.2f} MiB"

    def tflop(f):
        return f"{f / 1e12:.2f} TFLOP" if f >= 1e10 else f"{f / 1e9:.3f} GFLOP"

    m = report["memory_bytes"]
    mesh = report["mesh"]
    lines = [
        f"compiled {topology or report['device_kind']}: {report['chips']} x {report['device_kind']}, mesh data="
        f"{mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}, remat {report['remat_policy']}, scan_layers "
        f"{report['scan_layers']}, micro-batches {report['micro_batches']}, attention {report['attention']} ("
        + (f"{report['kernel_calls']} fused-kernel calls in the program)" if report["kernel_calls"] else "XLA)"),
        f"batch {report['batch_size']}, phase {report['phase']} ratio {':'.join(map(str, report['ratio']))} -> rows "
        + ", ".join(f"{k} {v}" for k, v in report["sub_batch"].items()),
        f"memory per chip: arguments {gib(m['argument'])}, outputs {gib(m['output'])} (aliased {gib(m['alias'])}), "
        f"temporaries {gib(m['temp'])}, generated code {gib(m['generated_code'])}; total {gib(m['total'])}"
        + (f" of {gib(report['hbm_bytes'])} HBM ({100 * m['total'] / report['hbm_bytes']:.0f}%): "
           + ("fits" if report["fits"] else "DOES NOT FIT") if report["hbm_bytes"] else ""),
        f"compiled FLOPs: {tflop(report['compiled_flops_per_chip'])} per chip, {tflop(report['compiled_flops'])} "
        "per step" + (" (an undercount: XLA counts the body of the layer scan / micro-batch loop once)"
                      if report["flops_undercounted"] else ""),
        f"counted FLOPs: {tflop(report['counted_flops'])} per step, {report['tokens']} LLM tokens",
    ]
    if report["whole_step_flops"] and report["flops_undercounted"]:
        lines.append(f"whole-step compiled FLOPs (roofline, loops walked by trip count): "
                     f"{tflop(report['whole_step_flops'])} per step")
    if report["estimated_step_seconds"]:
        lines.append(f"step time estimate ({report['estimate_source']}): "
                     f"{report['estimated_step_seconds'] * 1e3:.4g} ms"
                     + (f" -> MFU {100 * report['mfu']:.1f}% (counted FLOPs / estimate / {report['chips']} chips x "
                        f"{report['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s peak; a roofline leaves out "
                        "collectives, launch gaps and kernels' shortfall from the peaks, so this is an upper bound)"
                        if report["mfu"] else ""))
    elif report["flops_undercounted"]:
        lines.append("step time estimate: none (XLA sees one iteration of each loop"
                     + (f": {report['compiler_seconds'] * 1e3:.1f} ms" if report["compiler_seconds"] else "")
                     + ", and the chip's peaks for a roofline are unknown)")
    else:
        lines.append("step time estimate: none (XLA gave no positive time estimate for the loop-free program)")
    if report.get("roofline"):
        bound = report["roofline"]
        lines.append(f"roofline per chip: {bound['seconds'] * 1e3:.4g} ms (compute-bound kernels "
                     f"{bound['compute_bound_seconds'] * 1e3:.4g} ms, memory-bound "
                     f"{bound['memory_bound_seconds'] * 1e3:.4g} ms, {bound['bytes'] / 1e9:.4g} GB of HBM traffic); "
                     "by kind: " + ", ".join(f"{k} {v['share']:.0%}" for k, v in bound["kinds"].items()
                                             if v["share"] >= 0.005)
                     + (f" (an undercount: {bound['unknown_trip_counts']} loops of unknown trip count counted once)"
                        if bound["unknown_trip_counts"] else ""))
    lines.append(f"lowering {report['lower_seconds']:.1f} s, compile {report['compile_seconds']:.1f} s")
    return "\n".join(lines)
