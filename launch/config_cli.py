"""What every `launch/*.py` that takes `--config` shares: bare config names and one-line errors for bad overrides."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from absl import app, flags

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def resolve_config_arg(argv: list[str]) -> list[str]:
    """--config=stage2[:arg] -> --config=<repo>/configs/stage2.py[:arg] (a name without '/' or '.py')."""
    out = []
    for a in argv:
        if a.startswith("--config="):
            name, _, arg = a[len("--config="):].partition(":")
            if "/" not in name and not name.endswith(".py"):
                path = CONFIG_DIR / f"{name}.py"
                if not path.exists():
                    known = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
                    raise SystemExit(f"error: no config {name!r} (configs/{name}.py); known: {', '.join(known)}")
                a = f"--config={path}" + (f":{arg}" if arg else "")
        out.append(a)
    return out


def parse_flags(argv):
    """config_flags applies --config.FIELD overrides while parsing: a typo is one line here, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"error: bad flag or config override: {e}") from None


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


def run(main: Callable, argv: list[str] | None = None):
    """absl's app.run with bare config names resolved, and override errors and device out-of-memory reported in one
    line."""
    app.run(_oom_as_message(main), argv=resolve_config_arg(sys.argv if argv is None else argv),
            flags_parser=parse_flags)
