"""What makes phase A resumable and splittable over hosts: each host takes every `process_count`-th item, every output
is written whole (a rename locally, one object write on gs://), finished items are recognised by their files, and a
manifest pins the settings an output directory was made with.

Nothing here waits for other hosts: each works through its share and skips what is already written, so a rerun
(same or different host count) finishes only what is missing, and the host that sees the whole set done last writes
the merged result.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Mapping, Sequence

from etils import epath

from janusflow_jax.eval.formats import InputError

MANIFEST = "manifest.json"


def hosts(process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
    """(index, count) of this host: the arguments when given (simulated hosts in tests), else JAX's."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise InputError(f"process_index {process_index} is outside [0, {process_count})")
    return int(process_index), int(process_count)


def host_share(num_items: int, process_index: int, process_count: int) -> list[int]:
    """The item positions this host handles: every process_count-th, starting at its index (hosts interleave, so
    each gets a like mix of a file's sections)."""
    return list(range(process_index, num_items, process_count))


def write_atomic(path: str | os.PathLike, data: bytes | str):
    """Writes a file whole: locally into a temporary name beside it, then renamed (a reader never sees a partial
    file; a killed run leaves at most a stray `.*.tmp`); on gs:// an object write is already all or nothing."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if "://" in os.fspath(path):
        path.write_bytes(payload)
        return
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def check_manifest(out: str | os.PathLike, manifest: Mapping[str, Any], pinned: Sequence[str]) -> None:
    """Writes OUT/manifest.json (the latest run's), after refusing to continue an output made with other settings
    (`pinned`: the keys whose values decide the outputs; the others, e.g. batch size or host count, may change)."""
    path = epath.Path(out) / MANIFEST
    if path.exists():
        try:
            earlier = json.loads(path.read_text())
        except ValueError:
            raise InputError(f"{path} is not a manifest written by launch.evaluate") from None
        changed = [k for k in pinned if earlier.get(k) != manifest.get(k)]
        if changed:
            raise InputError(f"{out} holds outputs made with other settings (" + "; ".join(
                f"{k}: {earlier.get(k)!r} then, {manifest.get(k)!r} now" for k in changed) + "); use another --out")
    write_atomic(path, json.dumps(dict(manifest), indent=1) + "\n")
