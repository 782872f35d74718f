"""User paths: what a person types on the command line, resolved once where it enters the program.

Local paths are made absolute against the current directory (orbax, the recipe's stage hand-off and every file
written into a run directory then agree on one location whatever the library's own working assumptions); remote
paths (`gs://bucket/...`, any `scheme://`) pass through unchanged. Everything below `launch/` receives resolved
paths, so no library call needs to know where the user stood when they typed a command.
"""

from __future__ import annotations

import os
from typing import Any

from etils import epath

# The config fields that hold user paths (dotted, as --config.FIELD=VALUE spells them). Empty means "not given".
CONFIG_PATH_FIELDS = (
    "init.path", "init.llm_path", "init.siglip_path", "data.dir",
    "prepare.out", "prepare.tokenizer", "prepare.gen_jsonl", "prepare.und_jsonl", "prepare.text_jsonl",
    "prepare.image_root", "prepare.tfds.data_dir", "prepare.latent.vae_path",
    "eval.data_dir", "eval.tokenizer", "eval.und_data",
)


def is_remote(path: str | os.PathLike) -> bool:
    """True for an object-store or other URL-style path (`gs://...`)."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
    """A user's path as an absolute local path string (`~` expanded) or the remote path unchanged."""
    text = os.fspath(path)
    if not text or is_remote(text):
        return text
    return os.path.abspath(os.path.expanduser(text))


def user_path(path: str | os.PathLike) -> epath.Path:
    """`resolve`, as an `etils.epath.Path` (local, or `gs://` through epath's file-system backends)."""
    return epath.Path(resolve(path))


def resolve_optional(path: str | os.PathLike | None) -> str | None:
    return None if path is None else resolve(path)


def resolve_config_paths(config: Any, fields: tuple[str, ...] = CONFIG_PATH_FIELDS) -> Any:
    """Resolves, in place, every non-empty path field of `config` (an ml_collections ConfigDict) that it has.
    Returns `config`."""

    def visit(node, dotted: str):
        *parents, leaf = dotted.split(".")
        for name in parents:
            if name not in node:
                return
            node = node[name]
        if leaf in node and isinstance(node[leaf], str) and node[leaf]:
            node[leaf] = resolve(node[leaf])

    for field in fields:
        visit(config, field)
    return config
