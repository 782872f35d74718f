"""What every `launch/*.py` shares: bare config names (`--config=stage2:tiny`), `--config=help` (the configs, one line
each), and one `error: ...` line instead of a traceback or the whole help for a user's mistake: an unknown config
field (naming its path and the closest real field), a bad variant, a missing or contradictory flag."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Callable

from absl import app, flags

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def config_summary(name: str, width: int = 94) -> str:
    """The first sentence of configs/<name>.py's docstring, cut to `width` characters (read, not imported)."""
    doc = ast.get_docstring(ast.parse((CONFIG_DIR / f"{name}.py").read_text())) or ""
    first = re.split(r"(?<=\.)\s", " ".join(doc.split()), maxsplit=1)[0].rstrip(":.")
    return first if len(first) <= width else first[:width - 3].rsplit(" ", 1)[0].rstrip(",;:(") + " ..."


def config_list() -> str:
    """One line per config: what `--config=help` prints and `--help` shows under --config."""
    names = config_names()
    pad = max(map(len, names))
    return "\n".join(f"  {n:<{pad}}  {config_summary(n)}" for n in names)


CONFIG_HELP = "Run config: a name from configs/ or a path, then :VARIANT (stage2:tiny); --config=help lists them."


def with_config_list(doc: str) -> str:
    """A launcher's docstring (what --help prints first) followed by the configs, one line each."""
    return f"{doc.rstrip()}\n\nConfigs (--config=NAME[:VARIANT]; --config=help prints this list):\n{config_list()}\n"


def resolve_config_arg(argv: list[str]) -> list[str]:
    """--config=stage2[:arg] -> --config=<repo>/configs/stage2.py[:arg] (a name without '/' or '.py');
    --config=help prints the configs and exits."""
    out = []
    for a in argv:
        if a.startswith("--config="):
            name, _, arg = a[len("--config="):].partition(":")
            if name in ("help", "list"):
                print("configs (python -m launch.train --config=NAME[:VARIANT] --workdir=DIR):\n" + config_list())
                raise SystemExit(0)
            if "/" not in name and not name.endswith(".py"):
                path = CONFIG_DIR / f"{name}.py"
                if not path.exists():
                    close = difflib.get_close_matches(name, config_names(), n=1)
                    raise SystemExit(f"error: no config {name!r} (configs/{name}.py)"
                                     + (f"; did you mean {close[0]!r}?" if close else "")
                                     + f" known: {', '.join(config_names())} (--config=help describes them)")
                a = f"--config={path}" + (f":{arg}" if arg else "")
        out.append(a)
    return out


def _load_config(argv: list[str]):
    """The config that `--config=PATH[:ARG]` in `argv` names, built as config_flags builds it; None if it cannot be."""
    spec = next((a[len("--config="):] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return None
    path, _, arg = spec.partition(":")
    try:
        module_spec = importlib.util.spec_from_file_location("_user_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception:  # noqa: BLE001 - the caller falls back to the parser's own message
        return None


def unknown_field(argv: list[str]) -> str | None:
    """The first `--config.a.b=v` in `argv` whose path the config lacks, as one line naming the path and the closest
    real field; None when every override's path exists (the error is about something else)."""
    config = _load_config(argv)
    if config is None:
        return None
    for a in argv:
        if not a.startswith("--config."):
            continue
        dotted = a[len("--config."):].partition("=")[0]
        node, walked = config, "config"
        for name in dotted.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if name not in keys:
                what = f"{walked} has no field {name!r}" if keys else f"{walked} is a value, not a group"
                initials = "".join(word[0] for word in name.split("_") if word)  # learning_rate -> lr
                close = [k for k in keys if len(initials) > 1 and k == initials] or difflib.get_close_matches(
                    name, keys, n=1, cutoff=0.6)
                hint = f"; did you mean {walked}.{close[0]}?" if close else ""
                fields = f" (its fields: {', '.join(sorted(keys))})" if keys else ""
                return f"error: --config.{dotted}: {what}{hint}{fields}"
            node, walked = node[name], f"{walked}.{name}"
    return None


def parse_flags(argv):
    """config_flags applies --config.FIELD overrides while parsing: a typo or a bad variant is one line here, not a
    traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        text = str(e)
        if "Error whilst parsing config file" in text:  # get_config(arg) raised: its own last line says why
            lines = [line for line in text.splitlines() if line.strip()]
            spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
            reason = re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
            raise SystemExit(f"error: --config={Path(spec.partition(':')[0]).stem}:{spec.partition(':')[2]}: "
                             f"{reason}") from None
        message = unknown_field(argv)
        if message is None:
            message = "error: bad flag or config override: " + " ".join(text.split())
        raise SystemExit(message) from None


def out_of_memory(e: BaseException) -> str | None:
    """One line for a device out-of-memory error (jax's RESOURCE_EXHAUSTED), else None: the size is the user's to
    change, so it is a message, not a traceback."""
    text = str(e)
    if type(e).__name__ != "JaxRuntimeError" or "RESOURCE_EXHAUSTED" not in text:
        return None
    first = next((line for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line), text)[:300]
    return (f"error: out of device memory ({first.strip()}); lower --config.batch_size, raise "
            f"--config.micro_batches, set --config.model.remat_policy=full, or (NVIDIA GPUs, bf16) "
            f"--config.model.attention=cudnn")


def _oom_as_message(main: Callable) -> Callable:
    """main, with a device out-of-memory error turned into `out_of_memory`'s line and exit status 1."""

    def wrapped(argv):
        try:
            return main(argv)
        except Exception as e:  # noqa: BLE001 - only device out-of-memory becomes a message
            message = out_of_memory(e)
            if message is None:
                raise
            print(message, file=sys.stderr)
            return 1

    return wrapped


def _usage_as_line(main: Callable) -> Callable:
    """main, with app.UsageError (a missing or contradictory flag) as one `error:` line and exit status 2, not the
    whole help above it."""

    def wrapped(argv):
        try:
            return main(argv)
        except app.UsageError as e:
            print(f"error: {e} (--help lists the flags)", file=sys.stderr)
            return 2

    return wrapped


def run(main: Callable, argv: list[str] | None = None):
    """absl's app.run with bare config names resolved, and override errors, usage errors and device out-of-memory
    reported in one line."""
    app.run(_usage_as_line(_oom_as_message(main)), argv=resolve_config_arg(sys.argv if argv is None else argv),
            flags_parser=parse_flags)
