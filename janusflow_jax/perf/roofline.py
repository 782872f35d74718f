"""Roofline of a compiled program: the least time each kernel can take on a chip, read from the optimized HLO alone.

A GPU or TPU runs a compiled step as a sequence of kernels (fusions, GEMMs, cuDNN calls, copies). Each kernel moves
bytes through HBM and, if it multiplies matrices, does FLOPs; it cannot finish faster than

    max(flops / peak FLOP/s, bytes / HBM bandwidth)

`estimate(hlo_text, peak_flops, bandwidth)` walks the program's kernels (a while loop's body counted as many times as
it runs: XLA's known trip count, else the bound its condition compares with; a conditional by its heaviest branch)
and sums that bound by kind of work (the classes of `profile.py`: matmul, attention, convolution, reduction,
elementwise, data movement, ...), by model scope and per kernel, and says which kernels are compute-bound and which
memory-bound. A loop whose trip count cannot be read is counted once and reported (`unknown_trip_counts`). It
needs no device: the HLO can come from an ahead-of-time compile for a GPU or TPU target on a CPU host
(`train_compile`), so it says where a step's time must go before any hardware is lent.

What is counted:
- FLOPs: every dot (2 x output elements x contracted size), convolution (2 x output-side elements x filter elements
  per output feature; cuDNN's forward, backward-input and backward-filter calls alike), cuBLAS GEMM custom call, and
  cuDNN flash attention (4·b·h·q·k·d forward, 2.5x that backward for its five matmuls; halved when cuDNN's mask is
  causal) and the Splash kernel on TPUs (the same, over the blocks of a causal mask: `_splash_flops`). Elementwise
  arithmetic is left out: it never bounds a kernel on these chips.
- Bytes: each kernel reads its operands and writes its result once. A fusion operand that the fusion only slices
  (one layer of stacked scan weights) counts the slices, and an in-place dynamic-update-slice (a scan writing its
  layer's activations into the stacked buffer) counts the update, not the whole buffer. Buffers that XLA:TPU keeps
  in on-chip memory (layout memory space S(1), VMEM) are not HBM traffic: a prefetch into VMEM (copy-start) counts
  its HBM read once and the kernel that reads the prefetched copy nothing for it. Caches are ignored, so a
  kernel whose inputs stay in L2 is estimated slower than it is: it is a bound on the DRAM traffic model, not on time.
- Not counted: kernel launch gaps, collectives' latency, and the efficiency of each kernel against the peaks (GEMMs
  reach ~80% of the bf16 peak, memory-bound kernels ~70-90% of the bandwidth). A measured step time divided by this
  bound is the factor those lose.
"""

from __future__ import annotations

import collections
import math
import re

from janusflow_jax.perf import profile
from janusflow_jax.perf.profile import Instruction

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
                "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
# An array with its layout: XLA:TPU marks buffers outside HBM (VMEM, SMEM, ...) with a memory space S(n), n != 0.
_ARRAY_LAYOUT = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "opt-barrier",
         "partition-id", "replica-id", "add-dependency", "domain", "async-done", "async-update", "copy-done",
         "send-done", "recv-done", "iota"}
_SLICES = {"dynamic-slice", "slice", "gather"}


def _array_bytes(dtype: str, dims: str) -> float:
    return _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4) * math.prod(int(d) for d in dims.split(",") if d)


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape string (arrays of a tuple summed; layouts and comments ignored)."""
    return sum(_array_bytes(dtype, dims) for dtype, dims in _ARRAY.findall(shape))


def _in_hbm(layout: str) -> bool:
    space = _MEMORY_SPACE.search(layout or "")
    return space is None or space.group(1) == "0"


def hbm_bytes(shape: str) -> float:
    """`shape_bytes` of the arrays that live in HBM: a buffer that XLA:TPU placed in on-chip memory (layout
    memory space S(1), VMEM) moves no HBM bytes when a kernel reads or writes it."""
    return sum(_array_bytes(dtype, dims) for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape) if _in_hbm(layout))


def _hbm_parts(shape: str) -> list[bool]:
    """For each array of a (possibly tuple) shape, in order: whether it lives in HBM."""
    return [_in_hbm(layout) for _, _, layout in _ARRAY_LAYOUT.findall(shape)]


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _tuple_parts(shape: str) -> list[str]:
    """The array shapes of a (possibly tuple) shape string, in order."""
    return [f"{d}[{s}]" for d, s in _ARRAY.findall(shape)]


def _called(inst: Instruction, key: str) -> list[str]:
    m = re.search(rf"\b{key}=\{{?([^}},]+(?:,\s*%[\w.\-]+)*)\}}?", inst.line)
    return re.findall(r"%?([\w.\-]+)", m.group(1)) if m else []


# ------------------------------------------------------------------------------------------------------- FLOPs
def _dot_flops(inst: Instruction, by_name: dict[str, Instruction]) -> float:
    lhs = by_name.get(inst.operands[0]) if inst.operands else None
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.line)
    if lhs is None or m is None:
        return 0.0
    dims = _dims(lhs.shape)
    contracted = math.prod(dims[int(d)] for d in m.group(1).split(",") if d)
    return 2.0 * math.prod(_dims(inst.shape)) * contracted


def _conv_flops(inst: Instruction, by_name: dict[str, Instruction], target: str = "") -> float:
    """2 x (elements of the forward output) x (filter elements per output feature), for a convolution or a cuDNN
    convolution call of any direction (the call keeps the forward convolution's dim_labels)."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.line)
    ops = [by_name.get(o) for o in inst.operands]
    result = _tuple_parts(inst.shape)[0] if _tuple_parts(inst.shape) else inst.shape
    if labels is None or len(ops) < 2 or None in ops[:2]:
        return 0.0
    if "BackwardFilter" in target:
        filt, fwd_out = result, ops[1].shape
    elif "BackwardInput" in target:
        filt, fwd_out = ops[1].shape, ops[0].shape
    else:
        filt, fwd_out = ops[1].shape, result
    filt_dims = _dims(filt)
    o = labels.group(2).find("o")
    if not filt_dims or o < 0 or o >= len(filt_dims):
        return 0.0
    fwd_in = result if "BackwardInput" in target else ops[0].shape
    return (2.0 * math.prod(_dims(fwd_out)) * math.prod(filt_dims) / filt_dims[o]
            * _valid_tap_fraction(inst.line, labels, _dims(fwd_in), _dims(fwd_out)))


def _window_attr(line: str, key: str) -> list[str] | None:
    m = re.search(rf"window=\{{[^}}]*\b{key}=([\w\-]+)", line)
    return m.group(1).split("x") if m else None


def _valid_tap_fraction(line: str, labels, in_dims: list[int], out_dims: list[int]) -> float:
    """The share of (output position, filter tap) pairs that read the input rather than its padding, over all
    spatial dimensions; XLA's cost analysis counts only those. XLA:TPU writes some matmuls as convolutions whose
    window slides over a size-1 dimension padded to the window (`size=1x16 pad=0_0x15_15`): 1 tap in 16 is real."""
    sizes = _window_attr(line, "size")
    if not sizes:
        return 1.0
    pads = _window_attr(line, "pad") or ["0_0"] * len(sizes)
    strides = _window_attr(line, "stride") or ["1"] * len(sizes)
    rhs_dilation = _window_attr(line, "rhs_dilate") or ["1"] * len(sizes)
    lhs_dilation = _window_attr(line, "lhs_dilate") or ["1"] * len(sizes)
    lhs_labels, out_labels = labels.group(1), labels.group(3)
    fraction = 1.0
    for i, size in enumerate(sizes):
        d = str(i)
        if d not in lhs_labels or d not in out_labels or lhs_labels.find(d) >= len(in_dims) \
                or out_labels.find(d) >= len(out_dims):
            return 1.0
        n, out, k = in_dims[lhs_labels.find(d)], out_dims[out_labels.find(d)], int(size)
        low, stride = int(pads[i].split("_")[0]), int(strides[i])
        rd, ld = int(rhs_dilation[i]), int(lhs_dilation[i])
        if out * k == 0 or out * k > 1_000_000:
            continue
        valid = sum(1 for p in range(out) for t in range(k)
                    if 0 <= p * stride + t * rd - low <= (n - 1) * ld and (p * stride + t * rd - low) % ld == 0)
        fraction *= valid / (out * k)
    return fraction


def _attention_flops(inst: Instruction, by_name: dict[str, Instruction]) -> float:
    """cuDNN flash attention: the two matmuls of the forward (4·b·h·q·k·d), five in the backward."""
    m = re.search(r'"intermediate_tensor_shape":\s*\{[^{}]*?"dimensions":\s*\[([^\]]*)\]', inst.line)
    q = by_name.get(inst.operands[0]) if inst.operands else None
    if m is None or q is None:
        return 0.0
    b, h, sq, sk = (int(x.strip().strip('"')) for x in m.group(1).split(","))
    flops = 4.0 * b * h * sq * sk * _dims(q.shape)[-1]
    if "CAUSAL" in (re.search(r'"mask_type":\s*"(\w+)"', inst.line) or [None, ""])[1]:
        flops /= 2
    return flops * (2.5 if "Backward" in inst.line.split("custom_call_target=")[1][:60] else 1.0)


def _splash_flops(inst: Instruction) -> float:
    """The Pallas Splash kernel on TPUs (`layers.splash_attention`, a tpu_custom_call named splash_mha_*): the two
    matmuls of the forward, 4·h·q·k·d, over the key blocks it visits; 2.5x that for a backward kernel. The operand
    layout constraints give q and k ([heads, seq, head_dim]) and, where some blocks are empty, the block mask
    ([heads, q blocks, kv blocks], int8): its values are not in the text, so such a kernel is counted as causal (the
    diagonal's n (n + 1) / 2 of n² blocks), the only masked form the models give it."""
    start = inst.line.find("operand_layout_constraints=")
    if start < 0:
        return 0.0
    shapes = _ARRAY.findall(inst.line[start:profile._balanced(inst.line, inst.line.index("{", start))])
    arrays = [[int(d) for d in dims.split(",") if d] for dtype, dims in shapes if dtype in ("bf16", "f16", "f32")]
    arrays = [a for a in arrays if len(a) >= 3]  # [(batch,) heads, seq, head_dim]
    if len(arrays) < 2:
        return 0.0
    q, k = arrays[0], arrays[1]
    flops = 4.0 * math.prod(q[:-1]) * k[-2] * q[-1]
    masks = [[int(x) for x in dims.split(",") if x] for dtype, dims in shapes if dtype == "s8"]
    if masks and len(masks[0]) == 3 and masks[0][1] == masks[0][2]:
        n = masks[0][2]
        flops *= (n + 1) / (2 * n)
    return flops * (1.0 if "fwd" in inst.name else 2.5)


def _declared_cost(inst: Instruction) -> tuple[float, float]:
    """(FLOPs, HBM bytes) a Pallas TPU kernel declares (`pl.CostEstimate`, carried in the tpu_custom_call's backend
    config; e.g. `models/ssd_pallas.py`'s, computed from its matmuls and the blocks its specs move); (0, 0) if none."""
    m = re.search(r'cost_estimate\\?":\s*\{([^}]*)\}', inst.line)
    if m is None:
        return 0.0, 0.0
    value = lambda key: float((re.search(rf'{key}\\?":\s*\\?"?(\d+)', m.group(1)) or [0, 0])[1])  # noqa: E731
    return value("flops"), value("bytes_accessed")


def _gemm_flops(inst: Instruction, by_name: dict[str, Instruction]) -> float:
    """A cuBLAS GEMM custom call: its backend config carries the dot's dimension numbers."""
    m = re.search(r'"lhs_contracting_dimensions":\s*\[([^\]]*)\]', inst.line)
    lhs = by_name.get(inst.operands[0]) if inst.operands else None
    if m is None or lhs is None:
        return 0.0
    dims = _dims(lhs.shape)
    contracted = math.prod(dims[int(d.strip().strip('"'))] for d in m.group(1).split(",") if d.strip())
    out = _tuple_parts(inst.shape)[0] if inst.shape.startswith("(") else inst.shape
    return 2.0 * math.prod(_dims(out)) * contracted


def _flops(inst: Instruction, computations: dict, by_name: dict, seen: frozenset = frozenset()) -> tuple[float, bool]:
    """(FLOPs, whether any operand is fp32) of one instruction, looking inside fusions and calls."""
    op = inst.opcode
    if op in ("dot", "dot-general"):
        lhs = by_name.get(inst.operands[0]) if inst.operands else None
        return _dot_flops(inst, by_name), bool(lhs is not None and lhs.shape.startswith("f32"))
    if op == "convolution":
        return _conv_flops(inst, by_name), False
    if op == "custom-call":
        target = (re.search(r'custom_call_target="([^"]+)"', inst.line) or [None, ""])[1]
        if "fmha" in target:
            return _attention_flops(inst, by_name), False
        if target == "tpu_custom_call" and inst.name.startswith("splash_mha"):
            return _splash_flops(inst), False
        if target == "tpu_custom_call":
            return _declared_cost(inst)[0], False
        if "conv" in target:
            return _conv_flops(inst, by_name, target), False
        if "gemm" in target or "matmul" in target:
            return _gemm_flops(inst, by_name), False
        return 0.0, False
    total, fp32 = 0.0, False
    for name in _called(inst, "calls"):
        if name in computations and name not in seen:
            for inner in computations[name]:
                f, f32 = _flops(inner, computations, _names(computations[name]), seen | {name})
                total, fp32 = total + f, fp32 or (f32 and f > 0)
    return total, fp32


def _names(insts: list[Instruction]) -> dict[str, Instruction]:
    return {i.name: i for i in insts}


# ------------------------------------------------------------------------------------------------------- bytes
def _users(insts: list[Instruction]) -> dict[str, list[Instruction]]:
    users = collections.defaultdict(list)
    for i in insts:
        for o in dict.fromkeys(i.operands):
            users[o].append(i)
    return users


def _through_bitcasts(name: str, users: dict) -> list[tuple[Instruction, int]]:
    """The users of `name` seen through bitcasts, each with the operand position `name` (or its bitcast) takes."""
    out = []
    for u in users.get(name, ()):
        if u.opcode == "bitcast":
            out += _through_bitcasts(u.name, users)
        else:
            out += [(u, pos) for pos, o in enumerate(u.operands) if o == name]
    return out


def _fusion_bytes(inst: Instruction, computations: dict, by_name: dict) -> float:
    """HBM bytes of one fusion: its operands as read (only the slices of an operand it only slices; nothing of a
    buffer it updates in place) plus its results as written (only the update of an in-place dynamic-update-slice)."""
    body_name = next(iter(_called(inst, "calls")), None)
    body = computations.get(body_name or "", [])
    if not body:
        return hbm_bytes(inst.shape) + sum(hbm_bytes(by_name[o].shape) for o in dict.fromkeys(inst.operands)
                                           if o in by_name)
    users = _users(body)
    body_names = _names(body)
    params = {int(re.search(r"parameter\((\d+)\)", i.line).group(1)): i for i in body if i.opcode == "parameter"}
    root = next((i for i in body if i.root), body[-1])
    roots = [body_names[o] for o in root.operands if o in body_names] if root.opcode == "tuple" else [root]
    in_place, written = set(), 0.0
    out_hbm = _hbm_parts(inst.shape)  # where each result lives (the body's own shapes may not say)
    for index, r in enumerate(roots):
        if index < len(out_hbm) and not out_hbm[index]:
            continue  # written to on-chip memory
        while r.opcode == "bitcast" and r.operands and r.operands[0] in body_names:
            r = body_names[r.operands[0]]
        if r.opcode == "dynamic-update-slice" and len(r.operands) > 1:
            buffer = body_names.get(r.operands[0])
            while buffer is not None and buffer.opcode == "bitcast" and buffer.operands:
                buffer = body_names.get(buffer.operands[0])
            if buffer is not None:
                in_place.add(buffer.name)
            written += shape_bytes(body_names[r.operands[1]].shape) if r.operands[1] in body_names else 0.0
        else:
            written += shape_bytes(r.shape)
    read = 0.0
    for pos, operand in enumerate(inst.operands):
        param = params.get(pos)
        if operand in inst.operands[:pos]:
            continue
        if param is None:
            read += hbm_bytes(by_name[operand].shape) if operand in by_name else 0.0
            continue
        if param.name in in_place or not all(_hbm_parts(param.shape)):
            continue
        uses = _through_bitcasts(param.name, users)
        if uses and all(u.opcode in _SLICES and p == 0 for u, p in uses):
            read += sum(shape_bytes(u.shape) for u, _ in uses)
        else:
            read += shape_bytes(param.shape)
    return read + written


def _kernel_bytes(inst: Instruction, computations: dict, by_name: dict) -> float:
    if inst.opcode == "fusion":
        return _fusion_bytes(inst, computations, by_name)
    if inst.opcode == "dynamic-update-slice":
        update = by_name.get(inst.operands[1]) if len(inst.operands) > 1 else None
        return 2 * hbm_bytes(update.shape) if update else hbm_bytes(inst.shape)
    if inst.opcode in _SLICES:
        return 2 * hbm_bytes(inst.shape)
    if inst.opcode == "copy-start":  # (destination, source alias, context): the source is the operand
        parts = _ARRAY_LAYOUT.findall(inst.shape)
        dest = _array_bytes(*parts[0][:2]) if parts and _in_hbm(parts[0][2]) else 0.0
        return dest + sum(hbm_bytes(by_name[o].shape) for o in inst.operands[:1] if o in by_name)
    moved = hbm_bytes(inst.shape) + sum(hbm_bytes(by_name[o].shape) for o in dict.fromkeys(inst.operands)
                                        if o in by_name)
    if inst.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in inst.line:
        moved = max(moved, _declared_cost(inst)[1])  # a kernel may read a block more than once
    return moved


# ------------------------------------------------------------------------------------------------------ kernels
def kernels(hlo_text: str) -> list[dict]:
    """Every kernel the program launches, with how many times it runs per call: [{"name", "opcode", "computation",
    "runs", "flops", "fp32", "bytes"}] (FLOPs and bytes of one run)."""
    return _kernels(*profile.parse_module(hlo_text))[0]


def _kernels(computations: dict, entry: str | None) -> tuple[list[dict], int]:
    """(`kernels` of a parsed module, the number of while loops whose trip count could not be read)."""
    out: list[dict] = []
    unknown = [0]

    def walk(name: str, runs: float, seen: frozenset):
        insts = computations.get(name, [])
        by_name = _names(insts)
        for inst in insts:
            op = inst.opcode
            if op in _FREE:
                continue
            if op == "while":
                trip = _trip_count(inst, computations, by_name)
                unknown[0] += trip is None
                for body in _called(inst, "body"):
                    if body not in seen:
                        walk(body, runs * (trip or 1), seen | {body})
                continue
            if op == "conditional":  # one branch runs: count the heaviest (by HBM bytes)
                branches = [c for key in ("branch_computations", "true_computation", "false_computation")
                            for c in _called(inst, key) if c in computations and c not in seen]
                heaviest = None
                for callee in branches:
                    start = len(out)
                    walk(callee, runs, seen | {callee})
                    branch = out[start:]
                    del out[start:]
                    if heaviest is None or sum(k["bytes"] for k in branch) > sum(k["bytes"] for k in heaviest):
                        heaviest = branch
                out.extend(heaviest or [])
                continue
            if op in ("call", "async-start"):
                for key in ("to_apply", "calls"):
                    for callee in _called(inst, key):
                        if callee in computations and callee not in seen:
                            walk(callee, runs, seen | {callee})
                continue
            flops, fp32 = _flops(inst, computations, by_name)
            out.append({"name": inst.name, "opcode": op, "computation": name, "runs": runs, "flops": flops,
                        "fp32": fp32, "bytes": _kernel_bytes(inst, computations, by_name)})

    if entry is not None:
        walk(entry, 1.0, frozenset({entry}))
    return out, unknown[0]


def _trip_count(inst: Instruction, computations: dict, by_name: dict | None = None) -> int | None:
    """How many times a while loop runs: XLA's known_trip_count (XLA:GPU and XLA:CPU annotate it), else read from the
    loop (XLA:TPU): the one positive integer constant its condition compares the counter with (a scan's `i < n`),
    divided by the counter's step and less its start where the loop shows them. XLA:TPU's windowed einsums (the
    all-gather / reduce-scatter matmul loops of FSDP) are unrolled twice: `i < 4` with `i += 2` runs twice. Else None.
    `by_name`: the instructions of the computation that holds the loop (for the counter's start)."""
    trip = _TRIP.search(inst.line)
    if trip:
        return int(trip.group(1))
    constants: set[int] = set()
    pending = list(_called(inst, "condition"))
    done: set[str] = set()
    while pending:
        name = pending.pop()
        if name in done or name not in computations:
            continue
        done.add(name)
        for i in computations[name]:
            value = _constant_value(i) if re.match(r"[su]\d+\[\]", i.shape) else None
            if value is not None and value > 0:
                constants.add(value)
            pending += _called(i, "calls")
    if len(constants) != 1:
        return None
    bound = constants.pop()
    counter = _loop_counter(inst, computations)
    if counter is None:
        return bound
    step = _counter_step(inst, computations, counter)
    start = _constant_value(_tuple_element(inst.operands[0] if inst.operands else "", counter, by_name or {}))
    start = start if start is not None and 0 <= start < bound else 0
    return -(-(bound - start) // step)


def _constant_value(inst: Instruction | None) -> int | None:
    if inst is None or inst.opcode != "constant":
        return None
    value = re.search(r"constant\((-?\d+)\)", inst.line)
    return int(value.group(1)) if value else None


def _tuple_element(name: str, index: int, by_name: dict) -> Instruction | None:
    """Element `index` of the tuple instruction `name` (None where it is not a tuple built in sight)."""
    tup = by_name.get(name)
    if tup is None or tup.opcode != "tuple" or index >= len(tup.operands):
        return None
    return by_name.get(tup.operands[index])


def _gte_index(inst: Instruction | None, by_name: dict | None = None) -> int | None:
    """The tuple index a get-tuple-element reads, seen through copies, bitcasts and converts of it (XLA:TPU copies a
    windowed einsum's counter before adding its step) where `by_name` holds their operands."""
    while inst is not None and by_name and inst.opcode in ("copy", "bitcast", "convert") and len(inst.operands) == 1:
        inst = by_name.get(inst.operands[0])
    if inst is None or inst.opcode != "get-tuple-element":
        return None
    index = re.search(r"index=(\d+)", inst.line)
    return int(index.group(1)) if index else None


def _loop_counter(inst: Instruction, computations: dict) -> int | None:
    """The tuple index of the counter a loop's condition compares (ROOT compare(get-tuple-element(p, index=k), ...)
    in the condition itself), or None."""
    for name in _called(inst, "condition"):
        insts = computations.get(name, [])
        by_name = _names(insts)
        root = next((i for i in insts if i.root), None)
        if root is None or root.opcode != "compare" or not re.search(r"direction=LT", root.line):
            return None
        indices = [_gte_index(by_name.get(o), by_name) for o in root.operands]
        if indices and indices[0] is not None:
            return indices[0]
    return None


def _counter_step(inst: Instruction, computations: dict, counter: int) -> int:
    """What a loop's body adds to its counter each time: ROOT tuple(..., add(get-tuple-element(p, index=k), c), ...)
    gives c; 1 where the body shows nothing else."""
    for name in _called(inst, "body"):
        insts = computations.get(name, [])
        by_name = _names(insts)
        root = next((i for i in insts if i.root), None)
        if root is None or root.opcode != "tuple" or counter >= len(root.operands):
            return 1
        update = by_name.get(root.operands[counter])
        if update is None or update.opcode != "add":
            return 1
        parts = [by_name.get(o) for o in update.operands]
        if len(parts) == 2 and any(_gte_index(x, by_name) == counter for x in parts):
            step = next((_constant_value(x) for x in parts if _constant_value(x) is not None), None)
            if step and step > 0:
                return step
    return 1


def estimate(hlo_text: str, peak_flops: float, bandwidth: float, fp32_flops: float | None = None,
             top: int = 20) -> dict:
    """The roofline of one compiled program (see the module docstring).

    `peak_flops`: dense bf16 FLOP/s of the chip; `bandwidth`: HBM bytes/s; `fp32_flops`: FLOP/s of matmuls with fp32
    operands (default: half the bf16 peak, TF32 tensor cores). Returns {"seconds", "flops", "bytes", "kernels" (launches
    per call), "unknown_trip_counts" (loops counted once for want of a trip count: the totals then undercount),
    "compute_bound_seconds", "memory_bound_seconds", "kinds": {kind: {"seconds", "share", "flops", "bytes",
    "launches"}}, "scopes": [{"scope", "seconds", "share"}], "ops": the `top` kernels by time}.
    """
    fp32_flops = fp32_flops or peak_flops / 2
    computations, entry = profile.parse_module(hlo_text)
    info = profile.classify(computations)
    kinds = collections.defaultdict(lambda: {"seconds": 0.0, "flops": 0.0, "bytes": 0.0, "launches": 0.0})
    scopes = collections.Counter()
    rows = []
    totals = {"seconds": 0.0, "flops": 0.0, "bytes": 0.0, "kernels": 0.0, "compute_bound_seconds": 0.0,
              "memory_bound_seconds": 0.0}
    listed, totals["unknown_trip_counts"] = _kernels(computations, entry)
    for k in listed:
        meta = info.get(k["name"], {"kind": "other", "scope": ""})
        compute = k["flops"] / (fp32_flops if k["fp32"] else peak_flops)
        memory = k["bytes"] / bandwidth
        seconds = max(compute, memory) * k["runs"]
        totals["seconds"] += seconds
        totals["flops"] += k["flops"] * k["runs"]
        totals["bytes"] += k["bytes"] * k["runs"]
        totals["kernels"] += k["runs"]
        totals["compute_bound_seconds" if compute >= memory else "memory_bound_seconds"] += seconds
        acc = kinds[meta["kind"]]
        acc["seconds"] += seconds
        acc["flops"] += k["flops"] * k["runs"]
        acc["bytes"] += k["bytes"] * k["runs"]
        acc["launches"] += k["runs"]
        scopes["/".join(meta["scope"].split("/")[:3]) or "(no scope)"] += seconds
        rows.append({"op": k["name"], "kind": meta["kind"], "scope": meta["scope"], "runs": k["runs"],
                     "seconds": seconds, "bound": "compute" if compute >= memory else "memory",
                     "flops": k["flops"] * k["runs"], "bytes": k["bytes"] * k["runs"]})
    total = totals["seconds"] or float("nan")
    rows.sort(key=lambda r: -r["seconds"])
    for r in rows:
        r["share"] = r["seconds"] / total
    return {**totals, "peak_flops": peak_flops, "bandwidth": bandwidth,
            "kinds": {k: {**kinds[k], "share": kinds[k]["seconds"] / total} for k in profile.CATEGORIES
                      if k in kinds},
            "scopes": [{"scope": s, "seconds": t, "share": t / total} for s, t in scopes.most_common(top)],
            "ops": rows[:top]}


def format_estimate(est: dict, top: int | None = 10, measured_seconds: float | None = None) -> str:
    """The roofline as markdown: totals, by kind of work, by source scope and the top kernels."""
    head = (f"Roofline: {est['seconds'] * 1e3:.1f} ms per call at {est['peak_flops'] / 1e12:.0f} TFLOP/s and "
            f"{est['bandwidth'] / 1e12:.2f} TB/s ({est['flops'] / 1e12:.1f} TFLOP, {est['bytes'] / 1e9:.1f} GB of "
            f"HBM traffic, {est['kernels']:.0f} kernel launches); compute-bound kernels "
            f"{est['compute_bound_seconds'] * 1e3:.1f} ms, memory-bound {est['memory_bound_seconds'] * 1e3:.1f} ms")
    if measured_seconds:
        head += f"; measured {measured_seconds * 1e3:.1f} ms = {measured_seconds / est['seconds']:.2f}x the bound"
    lines = [head, ""] + profile.markdown_table(
        ("kind", "ms (bound)", "share", "TFLOP", "GB", "launches"),
        [(kind, f"{v['seconds'] * 1e3:.1f}", f"{v['share']:.1%}", f"{v['flops'] / 1e12:.1f}", f"{v['bytes'] / 1e9:.1f}",
          f"{v['launches']:.0f}") for kind, v in est["kinds"].items()])
    lines += [""] + profile.markdown_table(("source scope", "ms (bound)", "share"),
                                           [(s["scope"], f"{s['seconds'] * 1e3:.1f}", f"{s['share']:.1%}")
                                            for s in est["scopes"][:top]])
    lines += [""] + profile.markdown_table(("kernel", "kind", "bound", "scope", "runs", "ms (bound)", "share"),
                                           [(r["op"], r["kind"], r["bound"], r["scope"][-60:], f"{r['runs']:g}",
                                             f"{r['seconds'] * 1e3:.2f}", f"{r['share']:.1%}")
                                            for r in est["ops"][:top]])
    return "\n".join(lines)

