"""What the CLI tests share: a `launch/*` main run in-process with fresh flags, and the one-error-line check."""

from __future__ import annotations

from absl import flags


def run_cli(cli, *args) -> int:
    """`cli.main` with `args` parsed into fresh flags (flags of an earlier call never leak into this one)."""
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS([cli.__name__, *args])
        return cli.main([cli.__name__])
    finally:
        flags.FLAGS.unparse_flags()


def one_error_line(err: str) -> str:
    """The single `error: ...` line of a CLI's stderr; no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]
