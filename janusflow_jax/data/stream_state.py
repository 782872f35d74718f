"""The data iterator's checkpoint, one file per reading stream: a run saved on N hosts resumes on any M hosts that
divide `data.streams`.

A host's iterator (`loader.MixtureIterator`) zips its reading streams per data type; its grain state holds, at
every zip, one state per stream (`{"parents": [...]}`), and around them the state the streams share (prefetch and
worker positions: each stream has given the same number of units, so these agree). `split` cuts a host's state into
one state per stream, `merge` joins any streams' states into the state of a host reading them. The orbax handler
below writes `stream_<s>-of-<S>.json` for each of this host's streams; a restore reads the streams the host reads
now. A source without streams (the synthetic one) and checkpoints written before states were per stream keep one
file per process (`process_<i>-of-<n>.json`, grain's format): they resume on the same host count only, and any
other is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import orbax.checkpoint as ocp
from etils import epath
from grain._src.python.checkpoint import handler as grain_handler


def _is_zip(node) -> bool:
    return isinstance(node, dict) and set(node) == {"parents"} and isinstance(node["parents"], list)


def split(state, index: int):
    """Stream `index` (of this host's) of one data type's grain state (a JSON tree)."""
    if _is_zip(state):
        return {"parents": [state["parents"][index]]}
    if isinstance(state, dict):
        return {key: split(value, index) for key, value in state.items()}
    if isinstance(state, list):
        return [split(value, index) for value in state]
    return state


def merge(states: list):
    """The grain state of a host reading these streams' states (`split`'s trees), in order; ValueError where the
    state they share disagrees (states from different steps or pipelines)."""
    first = states[0]
    if _is_zip(first):
        if not all(_is_zip(s) and len(s["parents"]) == 1 for s in states):
            raise ValueError("the saved stream states have different layouts")
        return {"parents": [s["parents"][0] for s in states]}
    if isinstance(first, dict):
        if any(not isinstance(s, dict) or s.keys() != first.keys() for s in states):
            raise ValueError("the saved stream states have different layouts")
        return {key: merge([s[key] for s in states]) for key in first}
    if isinstance(first, list):
        if any(not isinstance(s, list) or len(s) != len(first) for s in states):
            raise ValueError("the saved stream states have different layouts")
        return [merge([s[i] for s in states]) for i in range(len(first))]
    if any(s != first for s in states):
        raise ValueError(f"the saved stream states disagree on their shared position ({states})")
    return first


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Handler(grain_handler.CheckpointHandler):
    """grain's orbax handler, per stream where the iterator has streams (`stream_states` / `set_stream_states`,
    `streams`, `stream_count`). Its args: `Save(iterator)`, `Restore(iterator)`."""

    def save(self, directory: epath.Path, item=None, args=None):
        item = item or args.item
        if not hasattr(item, "stream_states"):
            return super().save(directory, item=item)
        for stream, state in item.stream_states().items():
            (directory / f"stream_{stream}-of-{item.stream_count}.json").write_text(json.dumps(state))

    def restore(self, directory: epath.Path, item=None, args=None):
        import jax

        item = item or args.item
        directory = epath.Path(directory)
        names = sorted(p.name for p in directory.iterdir())
        saved = {int(n.split("-of-")[1][:-5]) for n in names if n.startswith("stream_")}
        if saved and hasattr(item, "stream_states"):
            (count,) = saved
            if count != item.stream_count:
                raise ValueError(f"the data state at {directory} was saved from {count} reading streams, this run "
                                 f"reads {item.stream_count}: set --config.data.streams={count} and run on a host "
                                 f"count that divides it ({', '.join(map(str, divisors(count)))})")
            item.set_stream_states({s: json.loads((directory / f"stream_{s}-of-{count}.json").read_text())
                                    for s in item.streams})
            item.start_prefetch()
            return item
        if saved:
            raise ValueError(f"the data state at {directory} was saved per reading stream and this run's data source "
                             f"has none: resume with the data.source it was saved with")
        processes = {int(n.split("-of-")[1][:-5]) for n in names if n.startswith("process_")}
        if processes and processes != {jax.process_count()}:
            (count,) = processes
            raise ValueError(f"the data state at {directory} was saved per process by {count} hosts (a synthetic "
                             f"source, or a checkpoint from before states were saved per reading stream), this run "
                             f"has {jax.process_count()}: resume on {count} hosts")
        return super().restore(directory, item=item)


@ocp.args.register_with_handler(Handler, for_save=True)
@dataclasses.dataclass
class Save(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(Handler, for_restore=True)
@dataclasses.dataclass
class Restore(ocp.args.CheckpointArgs):
    item: Any
