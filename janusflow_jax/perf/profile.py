"""Profiling: a `jax.profiler` trace of a few calls, and where the device time went, by XLA op and by kind of work.

`trace(fn, calls, log_dir)` runs `fn` under `jax.profiler.trace` (TensorBoard/XProf files plus a Perfetto JSON) and
returns the Perfetto file. `summarize(trace_file, calls, hlo_texts)` reads it back with the standard library: every
event that XLA tagged with an `hlo_op` (device kernels on a GPU/TPU; the runtime's op thunks on a CPU) is summed per
op, and each op is classed from the optimized HLO of the compiled program (`compiled.as_text()`):

  matmul        a dot, a fusion around one (cuBLAS/Triton GEMMs, TPU matmul fusions) or a GEMM custom call; also a
                convolution that is a matmul in XLA:TPU's writing (`_is_matmul_convolution`: windows of ones, windows
                covering their whole input, windows over size-1 inputs padded to the window)
  attention     a fused attention kernel (cuDNN flash attention; on a TPU, the Pallas Splash kernel)
  convolution   a convolution with a spatial window, or a fusion around one
  reduction     a fusion whose work is a reduce (norms, softmax statistics, losses, gradient sums)
  elementwise   any other fusion (casts, activations, RoPE, optimizer updates)
  collective    all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all
  data movement copy, transpose, (dynamic-)slice, pad, concatenate, dynamic-update-slice
  other         the rest (while/conditional bookkeeping, custom calls not listed above)

On a GPU or TPU only the device's own timeline is counted (its op or kernel rows, not the whole-module and step
rows; an event without an `hlo_op` tag counts under its own name, classed by that name: "gemm", "nvjet", "fmha",
"memcpy", ...), so the time is kernel time. On a CPU the op thunks
of the runtime's threads are counted, and parallel threads can add up to more than the wall time. Each op also carries
its source scope (the op_name metadata: jit/transform wrappers dropped), which names the flax module it came from.

`parse_module` reads an optimized HLO module's text into computations of `Instruction`s (name, shape, opcode,
operands); `classify` classes their instructions as above. `roofline.py` reads the same parse.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jax

CATEGORIES = ("matmul", "attention", "convolution", "reduction", "elementwise", "collective", "data movement",
              "other")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
                "collective-broadcast", "send", "recv")
_MOVEMENT = ("copy", "transpose", "slice", "dynamic-slice", "dynamic-update-slice", "pad", "concatenate", "gather",
             "scatter", "bitcast", "reshape", "broadcast")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_START = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s+=\s+")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_WINDOW = re.compile(r"window=\{size=([\dx]+)")
_CONTAINERS = ("while", "conditional", "call", "async-start", "async-done")
_SUMMARY_ROWS = re.compile(r"XLA Modules|Steps|TraceMe|Framework|TensorFlow Ops|Source|Launch Stats", re.I)


def trace(fn: Callable[[], object], calls: int, log_dir):
    """Runs `fn` `calls` times (waiting for each) under the profiler; returns the trace's Perfetto JSON file. The
    directory also holds the XProf files (`tensorboard --logdir` with the profile plugin, or xprof, opens them).

    jax.profiler writes local files only: a gs:// `log_dir` gets the trace written into a local temporary directory
    and then copied there (the returned file is then the gs:// copy)."""
    from janusflow_jax import paths

    if paths.is_remote(log_dir):
        import tempfile

        from etils import epath

        with tempfile.TemporaryDirectory(prefix="janusflow-profile-") as tmp:
            local = trace(fn, calls, tmp)
            paths.upload_tree(tmp, log_dir)
        return epath.Path(log_dir) / local.relative_to(tmp).as_posix()
    log_dir = Path(log_dir)
    before = set(glob.glob(str(log_dir / "**" / "*perfetto_trace.json.gz"), recursive=True))
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
        for _ in range(calls):
            jax.block_until_ready(fn())
    new = sorted(set(glob.glob(str(log_dir / "**" / "*perfetto_trace.json.gz"), recursive=True)) - before,
                 key=os.path.getmtime)
    if not new:
        raise RuntimeError(f"the profiler wrote no Perfetto trace under {log_dir}")
    return Path(new[-1])


# ------------------------------------------------------------------------------------------------- HLO text
@dataclasses.dataclass(slots=True)
class Instruction:
    """One HLO instruction: its name, result shape (text), opcode, operand names, the whole line, and whether it is
    its computation's ROOT."""

    name: str
    shape: str
    opcode: str
    operands: list[str]
    line: str
    root: bool


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group that opens at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "({[":
            depth += 1
        elif text[i] in ")}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _parse_instruction(line: str) -> Instruction | None:
    m = _START.match(line)
    if not m:
        return None
    i = m.end()
    if line.startswith("(", i):  # tuple shape
        j = _balanced(line, i)
    else:
        j = line.find(" ", i)
        if j < 0:
            return None
    shape = line[i:j]
    k = line.find("(", j)
    if k < 0:
        return None
    opcode = line[j:k].strip()
    if not re.fullmatch(r"[a-z][a-z0-9\-]*", opcode):
        return None
    end = _balanced(line, k)
    operands = re.findall(r"%([\w.\-]+)", line[k:end])
    return Instruction(m.group(2), shape, opcode, operands, line, bool(m.group(1)))


def parse_module(hlo_text: str) -> tuple[dict[str, list[Instruction]], str | None]:
    """({computation: [instructions]}, entry computation name) of one optimized HLO module's text."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(1), [])
            if line.startswith("ENTRY"):
                entry = header.group(1)
            continue
        if current is not None:
            inst = _parse_instruction(line)
            if inst is not None:
                current.append(inst)
    return computations, entry


def _kind_of(opcode: str, line: str, computations: dict, seen: frozenset = frozenset(),
             lhs_shape: str | None = None) -> str:
    if opcode in ("dot", "dot-general"):
        return "matmul"
    if opcode == "convolution":
        return "matmul" if _is_matmul_convolution(line, lhs_shape) else "convolution"
    if opcode == "custom-call":
        target = (_TARGET.search(line) or [None, ""])[1].lower()
        if any(s in target for s in ("fmha", "flash", "attention", "splash", "tpu_custom_call", "mosaic")):
            return "attention"
        if any(s in target for s in ("gemm", "matmul", "cublas")):
            return "matmul"
        if "conv" in target:
            return "convolution"
        return "other"
    base = opcode.removesuffix("-start").removesuffix("-done")
    if base in _COLLECTIVES:
        return "collective"
    if opcode == "fusion":
        inner = [kind for name in _CALLS.findall(line) if name in computations and name not in seen
                 for kind in _computation_kinds(name, computations, seen | {name})]
        for kind in ("matmul", "attention", "convolution", "collective"):
            if kind in inner:
                return kind
        body = [i.opcode for name in _CALLS.findall(line) for i in computations.get(name, ())]
        if "reduce" in body or "reduce-window" in body:
            return "reduction"
        if body and all(op in _MOVEMENT or op in ("parameter", "constant", "tuple", "get-tuple-element")
                        for op in body):
            return "data movement"
        return "elementwise"
    if opcode in _MOVEMENT:
        return "data movement"
    if opcode in ("reduce", "reduce-window"):
        return "reduction"
    return "other"


def _is_matmul_convolution(line: str, lhs_shape: str | None = None) -> bool:
    """XLA:TPU writes matmuls (and their gradients) as convolutions. It is one when every spatial dimension whose
    window is longer than 1 is either covered whole by the window (its output has size 1: a contraction) or slides
    over an input of size 1 padded to the window (one real tap per output position: the output gains a dimension, as
    in an einsum into heads; `lhs_shape`, the input's shape, shows it). Windows of 1 carry a batch-like dimension."""
    window = _WINDOW.search(line)
    if window is None:
        return True
    labels = re.search(r"dim_labels=(\w+)_\w+->(\w+)", line)
    shape = re.search(r"=\s+[a-z]+\d*\[([\d,]*)\]", line)
    sizes = [int(k) for k in window.group(1).split("x")]
    if all(k == 1 for k in sizes):
        return True
    if labels is None or shape is None:
        return False
    out_dims = [int(d) for d in shape.group(1).split(",") if d]
    lhs = re.search(r"\[([\d,]*)\]", lhs_shape or "")
    lhs_dims = [int(d) for d in lhs.group(1).split(",") if d] if lhs else []
    for i, k in enumerate(sizes):
        if k == 1:
            continue
        out_pos, lhs_pos = labels.group(2).find(str(i)), labels.group(1).find(str(i))
        if 0 <= out_pos < len(out_dims) and out_dims[out_pos] == 1:
            continue
        if 0 <= lhs_pos < len(lhs_dims) and lhs_dims[lhs_pos] == 1:
            continue
        return False
    return True


_KERNEL_NAMES = (  # for device events the HLO does not name (kernel names): first match wins
    ("attention", ("fmha", "flash", "attention", "splash")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "dot")),
    ("convolution", ("conv",)),
    ("collective", ("nccl", "all_reduce", "all-reduce", "allreduce", "all_gather", "reduce_scatter")),
    ("data movement", ("memcpy", "memset", "copy", "transpose")),
    ("reduction", ("reduce",)),
    ("elementwise", ("fusion", "elementwise", "loop")),
)


def _kind_from_name(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in _KERNEL_NAMES if any(k in low for k in keys)), "other")


def _computation_kinds(name: str, computations: dict, seen: frozenset) -> list[str]:
    instructions = computations.get(name, ())
    shapes = {i.name: i.shape for i in instructions}
    return [_kind_of(i.opcode, i.line, computations, seen, _lhs_shape(i, shapes)) for i in instructions]


def _lhs_shape(inst: Instruction, shapes: dict[str, str]) -> str | None:
    return shapes.get(inst.operands[0]) if inst.opcode == "convolution" and inst.operands else None


def parse_hlo(hlo_texts: Iterable[str]) -> dict[str, dict]:
    """{instruction name: {"kind", "opcode", "scope"}} for every instruction of the given optimized HLO modules."""
    computations: dict[str, list[Instruction]] = {}
    for text in hlo_texts:
        for name, instructions in parse_module(text)[0].items():
            computations.setdefault(name, []).extend(instructions)
    return classify(computations)


def classify(computations: dict[str, list[Instruction]]) -> dict[str, dict]:
    """{instruction name: {"kind", "opcode", "scope"}} for every instruction of parsed computations."""
    out = {}
    for instructions in computations.values():
        shapes = {i.name: i.shape for i in instructions}
        for i in instructions:
            op_name = (_OP_NAME.search(i.line) or [None, ""])[1]
            out[i.name] = {"kind": _kind_of(i.opcode, i.line, computations, lhs_shape=_lhs_shape(i, shapes)),
                           "opcode": i.opcode, "scope": _scope(op_name)}
    return out


def _scope(op_name: str) -> str:
    """'jit(step)/jvp(JanusFlow)/transpose(...)/language_model/layers_3/mlp/dot_general' -> the module path with the
    transformation wrappers dropped (and layer indices kept: the scan body says 'layers')."""
    parts = [p for p in op_name.split("/") if p and not re.match(r"^(jit|jvp|vjp|transpose|pjit|remat|checkpoint|"
                                                                    r"rematted_computation|while|body|cond|"
                                                                    r"closed_call|shard_map|vmap)\b", p)]
    return "/".join(parts)


def _load(trace_file) -> list[dict]:
    from etils import epath

    with epath.Path(trace_file).open("rb") as raw:  # local or gs://
        data = json.load(gzip.open(raw, "rt") if str(trace_file).endswith(".gz") else raw)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize(trace_file, calls: int, hlo_texts: Iterable[str] = (), top: int = 25) -> dict:
    """Where the time of `calls` profiled calls went (per call): {"source", "op_seconds", "kinds": {kind: {"seconds",
    "share"}}, "ops": the `top` ops [{"op", "kind", "scope", "seconds", "share", "count"}], "scopes": time by the
    first three levels of the source scope}."""
    events = _load(trace_file)
    names = {(e.get("pid"), e.get("tid") if e.get("name") == "thread_name" else None): e.get("args", {}).get("name", "")
             for e in events if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
    devices = {pid for (pid, tid), name in names.items() if tid is None and name.startswith("/device:")}
    spans = [e for e in events if e.get("ph") == "X"]
    # A device timeline: its op/kernel rows only (TPU traces add whole-module and step rows over the same time).
    on_device = [e for e in spans if e.get("pid") in devices
                 and not _SUMMARY_ROWS.search(names.get((e.get("pid"), e.get("tid")), ""))]
    used = on_device or [e for e in spans if "hlo_op" in e.get("args", {})]
    info = parse_hlo(hlo_texts)
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in used:
        op = e.get("args", {}).get("hlo_op") or e.get("name", "?")
        if info.get(op, {}).get("opcode") in _CONTAINERS:  # its span covers its body's ops, counted on their own
            continue
        acc = per_op[op]
        acc[0] += float(e.get("dur", 0.0)) * 1e-6 / calls
        acc[1] += 1
    total = sum(s for s, _ in per_op.values()) or float("nan")
    kinds = collections.Counter()
    scopes = collections.Counter()
    rows = []
    for op, (seconds, count) in per_op.items():
        meta = info.get(op) or {"kind": _kind_from_name(op), "scope": ""}
        kinds[meta["kind"]] += seconds
        scopes["/".join(meta["scope"].split("/")[:3]) or "(no scope)"] += seconds
        rows.append({"op": op, "kind": meta["kind"], "scope": meta["scope"], "seconds": seconds,
                     "share": seconds / total, "count": count / calls})
    rows.sort(key=lambda r: -r["seconds"])
    return {"source": "device timeline" if on_device else "host op thunks (no device timeline)",
            "op_seconds": total, "calls": calls,
            "kinds": {k: {"seconds": kinds.get(k, 0.0), "share": kinds.get(k, 0.0) / total} for k in CATEGORIES},
            "ops": rows[:top],
            "scopes": [{"scope": s, "seconds": t, "share": t / total} for s, t in scopes.most_common(top)]}


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """A markdown table's lines: the header, its rule and one line per row (cells as given, str()-ed)."""
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + \
        ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def format_summary(summary: dict, top: int | None = None) -> str:
    """The summary as three markdown tables: by kind of work, by source scope, and the top ops (`top` rows of the
    last two; default: all that the summary kept)."""
    lines = [f"Profile: {summary['op_seconds'] * 1e3:.1f} ms of op time per call ({summary['source']}, "
             f"{summary['calls']} calls)", ""]
    lines += markdown_table(("kind", "ms per call", "share"),
                            [(kind, f"{v['seconds'] * 1e3:.2f}", f"{v['share']:.1%}")
                             for kind, v in summary["kinds"].items() if v["seconds"]])
    lines += [""] + markdown_table(("source scope", "ms per call", "share"),
                                   [(s["scope"], f"{s['seconds'] * 1e3:.2f}", f"{s['share']:.1%}")
                                    for s in summary["scopes"][:top]])
    lines += [""] + markdown_table(("op", "kind", "scope", "ms per call", "share", "runs per call"),
                                   [(r["op"], r["kind"], r["scope"][-60:], f"{r['seconds'] * 1e3:.2f}",
                                     f"{r['share']:.1%}", f"{r['count']:g}") for r in summary["ops"][:top]])
    return "\n".join(lines)
