"""Train a JanusFlow stage.

  python -m launch.train --config=stage2 --workdir=runs/stage2 [--config.optimizer.lr=3e-5 ...]
  python -m launch.train --config=configs/stage2.py:tiny --workdir=/tmp/tiny
  python -m launch.train --config=digits --workdir=runs/digits    # data, preparation, stages 1-3, evaluation
  python -m launch.train --config=omnimamba_digits --workdir=runs/omnimamba_digits   # the same for OmniMamba

`--config=NAME[:ARG]` with a bare NAME reads configs/NAME.py; a path works as well. Any config field can be overridden
with --config.FIELD=VALUE (an unknown field is an error). Rerunning the same command resumes from the newest
checkpoint in the workdir. Every path may be local or gs://. On several hosts (a TPU pod slice) run the same command
on every host: jax.distributed starts from --coordinator_address/--num_processes/--process_id or from what jax
detects (launch/hosts.py); docs/pods.md.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from launch import config_cli
from launch import hosts as host_flags

__doc__ = config_cli.with_config_list(__doc__)

_CONFIG = config_flags.DEFINE_config_file("config", None, config_cli.CONFIG_HELP,
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and plots (resumes if it has them).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax

    host_flags.initialize()
    from janusflow_jax.train import loop as trainer

    from janusflow_jax import paths

    config = paths.resolve_config_paths(_CONFIG.value)  # user paths, relative to where the command was typed
    workdir = paths.resolve(_WORKDIR.value)
    if paths.user_path(workdir).is_file():
        print(f"error: --workdir={_WORKDIR.value} is a file; give a directory (new, or a run's to resume it)",
              file=sys.stderr)
        return 1
    try:
        if "recipe" in config:  # a multi-stage recipe (configs/digits.py): its own pipeline prints where things are
            if "digits" in config and config.get("family", "janusflow") == "omnimamba":
                from examples.digits import omnimamba as omnimamba_digits

                omnimamba_digits.run(config, workdir, progress=_PROGRESS.value)
            elif "digits" in config:
                from examples.digits import pipeline as digits

                digits.run(config, workdir, progress=_PROGRESS.value)
            else:
                from janusflow_jax.train import recipe

                recipe.run_stages(config, workdir, progress=_PROGRESS.value)
            return 0
        metrics = trainer.train(config, workdir, progress=_PROGRESS.value)
    except (trainer.TrainingError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0 and "loss" in metrics:  # (none when the run had already finished)
        workdir = _WORKDIR.value.rstrip("/")  # as the user typed it (gs:// included)
        print(f"done: final loss {metrics['loss']:.4f}; checkpoints in {workdir}/checkpoints, "
              f"loss curve {workdir}/loss_curve.png, TensorBoard logs in {workdir}/tensorboard")
    return 0


def run():
    config_cli.run(main)


if __name__ == "__main__":
    run()
