"""What the CLI tests share: a `launch/*` main run in-process with fresh flags, and the one-error-line check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from absl import flags

ROOT = Path(__file__).resolve().parents[1]


def run_cli(cli, *args) -> int:
    """`cli.main` with `args` parsed into fresh flags (flags of an earlier call never leak into this one), and as
    sys.argv for the call: ml_collections' config flags read their --config.FIELD overrides from sys.argv and define
    one flag per override while parsing (removed afterwards: the next call defines its own)."""
    flags.FLAGS.unparse_flags()
    argv, defined = sys.argv, set(flags.FLAGS)
    sys.argv = [cli.__name__, *args]
    try:
        flags.FLAGS(sys.argv)
        return cli.main([cli.__name__])
    finally:
        sys.argv = argv
        for name in set(flags.FLAGS) - defined:
            delattr(flags.FLAGS, name)
        flags.FLAGS.unparse_flags()


def one_error_line(err: str) -> str:
    """The single `error: ...` line of a CLI's stderr; no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def user_env() -> dict:
    """The environment of a CLI subprocess as a user's: the repository importable and one CPU device (conftest's 8
    fake devices left out), with the test run's persistent compilation cache (conftest), every program cached."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def repository_files() -> tuple:
    """What a command run by a test must not change in the repository: the files git does not track (ignored ones
    included, caches left out; without git, everything under runs/) and the bytes of BENCHMARKS.md and benchmarks/."""
    git = subprocess.run(["git", "ls-files", "--others"], cwd=ROOT, capture_output=True, text=True)
    others = git.stdout.splitlines() if git.returncode == 0 else [str(p) for p in ROOT.glob("runs/**/*")]
    others = sorted(p for p in others if "__pycache__" not in p and not p.startswith((".pytest_cache", ".venv")))
    written = [ROOT / "BENCHMARKS.md", *sorted((ROOT / "benchmarks").rglob("*"))]
    return others, [p.read_bytes() for p in written if p.is_file()]
