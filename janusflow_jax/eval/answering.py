"""Phase A for the understanding benchmarks (`launch.evaluate und`): the model's answers to a benchmark file, written as
the `{"index": ..., "prediction": ...}` JSONL that `launch.evaluate score` reads.

Benchmark files (read by formats.read_rows): VLMEvalKit's TSVs, and .jsonl / .json / .csv rows with the same columns:
  index, question     required
  image               base64 of the image; "['<b64>', ...]" for several; a cell of at most 64 characters names the
                      row whose image this row shares (MMBench's TSV does this, VLMEvalKit resolves it the same way)
  image_path          instead of `image`: file path(s) ("['a.jpg', ...]" for several), relative to `image_root`
                      (default: the benchmark file's directory)
  hint, A..Z, split   read by the suite's protocol (prompts.py); a row without any image is asked as text only
The protocol (prompts.PROTOCOLS) gives each row's user turn, the system prompt and the answer budget; answers are
greedy, one batch row per question, each row with its own images (`chat.chat(row_images=...)`).

Outputs in OUT: parts/<position>.jsonl (one per finished batch: the resume state), predictions.jsonl (every item's
answer in the file's order; on JAX's processes of one job, written by process 0 once every host has written its
parts (a barrier before and after), so one complete file whatever the timing; on hosts given by flags, independent
jobs, by whichever host finds the set complete: the last one to write its parts does) and manifest.json (suite, file,
checkpoint, protocol, an example prompt, decoding settings, hosts). Shapes are fixed for a whole file (prompts
left-padded to its longest, rounded up to 64 tokens; the last batch filled with copies of its last row), so the file
compiles once and an item's answer does not depend on which host or batch it fell in.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

from etils import epath

from janusflow_jax import paths  # noqa: F401 (gs:// listings never cached: parts written by other hosts are seen)
from janusflow_jax.eval import formats, prompts, resume
from janusflow_jax.eval.formats import InputError

PARTS = "parts"
PREDICTIONS = "predictions.jsonl"
LENGTH_BUCKET = 64  # prompt lengths are rounded up to this (as chat's own bucketing)
BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class Item:
    """One question: its position in the file, its index, the user turn (image placeholders included) and where its
    images are (("base64", text) or ("path", path) each; decoded only when its batch runs)."""

    position: int
    index: str
    content: str
    images: tuple[tuple[str, str], ...]


def _cell(row: Mapping[str, Any], column: str) -> str | None:
    value = row.get(column)
    if value is None or str(value).strip() in ("", "nan"):
        return None
    return str(value)


def _listed(cell: str) -> list[str]:
    return formats.parse_list(cell) if cell.lstrip().startswith("[") else [cell]


def image_sources(row: Mapping[str, Any], by_index: Mapping[str, Mapping[str, Any]], image_root: str
                  ) -> tuple[tuple[str, str], ...]:
    """Where a row's images are: base64 cells (following a short cell to the row it names) or file paths."""
    cell = _cell(row, "image")
    if cell is not None:
        if len(cell) <= 64:  # VLMEvalKit: a short `image` cell is the index of the row holding the image
            target = by_index.get(formats.index_key(cell))
            shared = None if target is None else _cell(target, "image")
            if shared is None or len(shared) <= 64:
                raise InputError(f"row {row.get('index')}: its image cell {cell!r} is neither base64 nor the index "
                                 f"of a row with an image (file paths go in an image_path column)")
            cell = shared
        return tuple(("base64", value) for value in _listed(cell))
    cell = _cell(row, "image_path")
    if cell is not None:
        return tuple(("path", value if "://" in value or os.path.isabs(value) else os.path.join(image_root, value))
                     for value in _listed(cell))
    return ()


def load_images(item: Item) -> list:
    """The item's images as encoded bytes or paths (chat's load_image decodes both)."""
    out = []
    for kind, value in item.images:
        if kind == "path":
            out.append(epath.Path(value).read_bytes() if "://" in value else value)
            continue
        try:
            out.append(base64.b64decode(value, validate=False))
        except (binascii.Error, ValueError) as e:
            raise InputError(f"row {item.index}: the image cell is not base64 ({e})") from None
    return out


def read_items(protocol: prompts.Protocol, data: str | os.PathLike, image_tag: str, *, image_root: str | None = None,
               limit: int = 0) -> list[Item]:
    """The questions of a benchmark file as the protocol asks them (its split only; the first `limit` if > 0)."""
    rows = formats.read_rows(data)
    formats.require_columns(rows, ["index", "question"])
    by_index: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        key = formats.index_key(row["index"])
        if key in by_index:
            raise InputError(f"index {key} appears twice in {data}")
        by_index[key] = row
    rows = protocol.select(rows)
    if limit:
        rows = rows[:limit]
    root = image_root or os.path.dirname(os.fspath(data))
    items = []
    for position, row in enumerate(rows):
        sources = image_sources(row, by_index, root)
        items.append(Item(position, formats.index_key(row["index"]),
                          protocol.content(row, len(sources), image_tag), sources))
    return items


def prompt_length(processor, items: Sequence[Item], system_prompt: str) -> int:
    """The padded prompt length of a file: its longest prompt, rounded up to LENGTH_BUCKET tokens."""
    longest = max(len(processor.chat_prompt(it.content, num_images=0, system_prompt=system_prompt)["input_ids"])
                  for it in items)
    return -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET


def answer_items(model, params, processor, items: Sequence[Item], *, system_prompt: str, max_new_tokens: int,
                 batch_size: int = BATCH_SIZE, pad_to: int | None = None,
                 on_batch: Callable[[Sequence[Item], list[str]], None] | None = None, progress: bool = False
                 ) -> list[str]:
    """Greedy answers to `items`, `batch_size` rows at a time, each row with its own images. `pad_to`: the prompt
    length every batch is padded to (default `prompt_length(items)`); pass the whole file's so that a share of it
    runs with the same shapes. `on_batch(items, answers)` runs after every batch (resume files)."""
    from tqdm.auto import tqdm

    from janusflow_jax.inference import chat

    items = list(items)
    if not items:
        return []
    if pad_to is None:
        pad_to = prompt_length(processor, items, system_prompt)
    context = model.config.llm.max_position_embeddings
    pad_to = min(pad_to, context - 1)  # a prompt longer than that fails in chat with its own message
    answers = []
    for start in tqdm(range(0, len(items), batch_size), desc="batches", unit="batch", disable=not progress):
        batch = items[start:start + batch_size]
        filled = batch + [batch[-1]] * (batch_size - len(batch))  # one shape for every batch
        out = chat.chat(model, params, processor, None, [it.content for it in filled],
                        row_images=[load_images(it) for it in filled], max_new_tokens=max_new_tokens,
                        system_prompt=system_prompt, pad_to=pad_to)[:len(batch)]
        if on_batch is not None:
            on_batch(batch, out)
        answers += out
    return answers


def _barrier(what: str):
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"janusflow_jax.eval.answering: {what}")


def _index_value(key: str):
    return int(key) if key.lstrip("-").isdigit() else key


def _done(out: epath.Path) -> dict[str, str]:
    """{index: prediction} of every part written so far (by any host)."""
    answered = {}
    parts = out / PARTS
    if parts.exists():
        for path in sorted(parts.glob("*.jsonl")):
            for record in formats.read_records(path):
                answered[formats.index_key(record["index"])] = record["prediction"]
    return answered


def run(model, params, processor, suite: str, data: str | os.PathLike, out: str | os.PathLike, *,
        batch_size: int = BATCH_SIZE, max_new_tokens: int | None = None, system_prompt: str | None = None,
        image_root: str | None = None, limit: int = 0, process_index: int | None = None,
        process_count: int | None = None, checkpoint: str = "", dtype: str | None = None, progress: bool = True
        ) -> dict:
    """Answers this host's share of a benchmark file into OUT (resumable; see the module docstring).

    system_prompt / max_new_tokens: None = the protocol's. process_index / process_count: this host's share (default
    JAX's). Returns a summary: items, this host's share, answered now, found done, and `predictions` (the merged
    file's path once every item is answered, else None)."""
    if suite not in prompts.PROTOCOLS:
        raise InputError(f"unknown understanding suite {suite!r} (known: {', '.join(prompts.PROTOCOLS)})")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    protocol = prompts.PROTOCOLS[suite]
    system = protocol.system_prompt if system_prompt is None else system_prompt
    budget = protocol.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    index, count = resume.hosts(process_index, process_count)
    items = read_items(protocol, data, processor.image_tag, image_root=image_root, limit=limit)
    pad_to = prompt_length(processor, items, system)
    out = epath.Path(out)
    example = processor.format_conversation([{"role": "User", "content": items[0].content}], system_prompt=system,
                                            with_response=False)
    manifest = {
        "phase": "und", "suite": suite, "data": os.fspath(data), "checkpoint": os.fspath(checkpoint),
        "items": len(items), "limit": limit, "dtype": dtype or "the checkpoint's",
        "protocol": dict(protocol.describe(), system_prompt=system, max_new_tokens=budget,
                         source="VLMEvalKit vlmeval/vlm/janus.py build_prompt / generate_inner (prompts.py)"),
        "prompt_length": pad_to, "example_prompt": example, "batch_size": batch_size, "hosts": count,
        "predictions": PREDICTIONS,
    }
    resume.check_manifest(out, manifest, ["phase", "suite", "data", "checkpoint", "items", "limit", "dtype",
                                          "protocol", "prompt_length"])
    answered = _done(out)
    share = [items[p] for p in resume.host_share(len(items), index, count)]
    todo = [it for it in share if it.index not in answered]

    def save(batch: Sequence[Item], answers: list[str]):
        lines = "".join(json.dumps({"index": _index_value(it.index), "prediction": a}) + "\n"
                        for it, a in zip(batch, answers))
        resume.write_atomic(out / PARTS / f"{batch[0].position:08d}.jsonl", lines)

    answer_items(model, params, processor, todo, system_prompt=system, max_new_tokens=budget, batch_size=batch_size,
                 pad_to=pad_to, on_batch=save, progress=progress)
    collective = process_index is None and process_count is None and count > 1  # JAX's processes: one job
    if collective:
        _barrier("every host's answers written")
    answered = _done(out)
    merged = None
    if all(it.index in answered for it in items):
        merged = out / PREDICTIONS
        if not collective or index == 0:
            resume.write_atomic(merged, "".join(json.dumps({"index": _index_value(it.index),
                                                             "prediction": answered[it.index]}) + "\n"
                                                 for it in items))
    if collective:
        _barrier("the predictions merged")
    return {"suite": suite, "items": len(items), "share": len(share), "answered": len(todo),
            "found_done": len(share) - len(todo), "host": index, "hosts": count,
            "predictions": None if merged is None else os.fspath(merged), "scorer": protocol.scorer,
            "missing": sum(it.index not in answered for it in items)}

