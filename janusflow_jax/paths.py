"""User paths: what a person types on the command line, resolved once where it enters the program.

Local paths are made absolute against the current directory (orbax, the recipe's stage hand-off and every file
written into a run directory then agree on one location whatever the library's own working assumptions); remote
paths (`gs://bucket/...`, any `scheme://`) pass through unchanged. Everything below `launch/` receives resolved
paths, so no library call needs to know where the user stood when they typed a command.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator

from etils import epath

try:  # gs:// through etils.epath is gcsfs, which by default caches directory listings forever: objects that another
    # host or process writes (checkpoints, shards, markers) would stay invisible here. Listings are always fresh.
    import fsspec

    for _protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)
except ImportError:  # no fsspec: no gs:// through epath either
    pass

# The config fields that hold user paths (dotted, as --config.FIELD=VALUE spells them). Empty means "not given".
CONFIG_PATH_FIELDS = (
    "init.path", "init.llm_path", "init.siglip_path", "init.mmu_path", "init.t2i_path", "data.dir",
    "prepare.out", "prepare.tokenizer", "prepare.gen_jsonl", "prepare.und_jsonl", "prepare.text_jsonl",
    "prepare.mmu_jsonl", "prepare.t2i_jsonl", "prepare.image_tokenizer.path",
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


def config_paths(config: Any, fields: tuple[str, ...] = CONFIG_PATH_FIELDS) -> list[str]:
    """The non-empty path fields of `config` that it has (for `check_access`)."""
    found = []
    for dotted in fields:
        node = config
        for name in dotted.split("."):
            node = node[name] if hasattr(node, "keys") and name in node else None
            if node is None:
                break
        if isinstance(node, str) and node:
            found.append(node)
    return found


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


# ------------------------------------------------------------------------------------------------ object stores
# What differs on an object store (gs://): no appends and no renames (each object appears whole when its upload
# completes), and some libraries read or write local files only (Hugging Face tokenizers, safetensors, PIL by name,
# jax.profiler, ArrayRecord's writer). Those get a local copy (`local_copy`) or write into a local temporary
# directory that is then uploaded (`upload_tree`).


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A local view of a user path for libraries that read local files only: a local path as it is; a remote file or
    directory (recursively) downloaded into a temporary directory, removed afterwards."""
    if not is_remote(path):
        yield pathlib.Path(path)
        return
    source = epath.Path(path)
    with tempfile.TemporaryDirectory(prefix="janusflow-") as tmp:
        local = pathlib.Path(tmp) / source.name
        if source.is_dir():
            copy_tree(source, local)
        elif source.exists():
            copy_file(source, local)
        yield local  # absent remotely: absent here too, so the caller's own "not found" message applies


def reads_local(fn):
    """For a reader whose first argument is a path that its library opens locally only (safetensors, a Hugging Face
    directory): a remote path is downloaded into a temporary directory for the call (`local_copy`)."""

    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        with local_copy(path) as local:
            return fn(local, *args, **kwargs)

    return wrapper


def copy_file(source: str | os.PathLike, destination: str | os.PathLike):
    """Copies one file, local or remote on either side, streaming (a remote object appears whole when closed)."""
    if not is_remote(source) and not is_remote(destination):
        shutil.copyfile(source, destination)
        return
    with epath.Path(source).open("rb") as f, epath.Path(destination).open("wb") as out:
        shutil.copyfileobj(f, out, 64 << 20)


def copy_tree(source: str | os.PathLike, destination: str | os.PathLike):
    """Copies every file under the directory `source` into `destination` (either local or remote)."""
    source, destination = epath.Path(source), epath.Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
        if child.is_dir():
            copy_tree(child, destination / child.name)
        else:
            copy_file(child, destination / child.name)


def upload_tree(local: str | os.PathLike, destination: str | os.PathLike, last: tuple[str, ...] = ()) -> list[str]:
    """Copies every file under the local directory `local` to `destination` (local or remote), object by object; the
    relative paths in `last` go after all others (the file a reader looks for, e.g. config.json, appears only when the
    rest is there). Returns the relative paths written, in order."""
    local, destination = pathlib.Path(local), epath.Path(destination)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    files = [f for f in files if f not in last] + [f for f in last if f in files]
    for name in files:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_file(local / name, target)
    return files


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs):
    """A matplotlib figure as a PNG at a local or remote path (matplotlib writes local files only: rendered in memory,
    then written in one piece)."""
    import io

    png = io.BytesIO()
    fig.savefig(png, format="png", **savefig_kwargs)
    epath.Path(path).write_bytes(png.getvalue())


class RemoteAccessError(ValueError):
    """A remote path this process cannot use (no credentials, no such bucket); the message is one line."""


def check_access(*paths: str | os.PathLike | None):
    """Fails early, in one line, for gs:// paths this process cannot use: no Google Cloud credentials, or a bucket
    that does not exist (or that these credentials cannot list). Local and empty paths pass."""
    buckets = sorted({os.fspath(p)[len("gs://"):].split("/", 1)[0] for p in paths
                      if p and os.fspath(p).startswith("gs://")})
    if not buckets:
        return
    if not os.environ.get("STORAGE_EMULATOR_HOST"):  # an emulator (tests) takes no credentials
        import google.auth
        from google.auth import exceptions as auth_errors

        try:
            google.auth.default()
        except auth_errors.DefaultCredentialsError as e:
            raise RemoteAccessError(
                f"no Google Cloud credentials for gs://{buckets[0]} ({' '.join(str(e).split())}): on a TPU VM the "
                f"VM's service account is used; elsewhere run `gcloud auth application-default login` or set "
                f"GOOGLE_APPLICATION_CREDENTIALS") from None
    for bucket in buckets:
        try:
            found = epath.Path(f"gs://{bucket}").exists()
        except Exception as e:  # noqa: BLE001 - permission, network: one line naming the bucket
            raise RemoteAccessError(f"cannot reach gs://{bucket}: {type(e).__name__}: "
                                    f"{' '.join(str(e).split())[:300]}") from None
        if not found:
            raise RemoteAccessError(f"gs://{bucket} does not exist (or these credentials cannot list it): create "
                                    f"it (gcloud storage buckets create gs://{bucket}) or fix the path")
