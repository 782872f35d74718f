"""Prepares training data: images, captions, conversations and text -> ArrayRecord shards + metadata.json.

  python -m launch.prepare_data --config=configs/prepare_data.py:tiny --config.prepare.out=/data/tiny \
      --config.prepare.tokenizer=/data/tokenizer --config.prepare.gen_jsonl=/data/captions.jsonl \
      [--config.prepare.und_jsonl=...] [--config.prepare.text_jsonl=...] [--config.prepare.tfds.name=...]

Run it again with the same config to resume: completed shards are kept. Inputs and --config.prepare.out may be on
gs://. On several hosts, start the same command on every host (jax.distributed from --coordinator_address,
--num_processes, --process_id or what jax detects; launch/hosts.py): they split the shards, and the output directory
must be one they all see (gs://, or a shared file system; checked). Prints one summary line; a bad config or input
path prints one error line and exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from launch import config_cli
from launch import hosts as host_flags

_DEFAULT = f"{Path(__file__).resolve().parents[1] / 'configs' / 'prepare_data.py'}:tiny"
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Preparation config file[:variant] (tiny or 1.3b).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar with ETA on stderr.")


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    host_flags.initialize()
    import jax

    from janusflow_jax import paths
    from janusflow_jax.data import prepare

    try:
        summary = prepare.run(paths.resolve_config_paths(_CONFIG.value), progress=_PROGRESS.value)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(prepare.summary_line(summary))
    return 0


if __name__ == "__main__":
    config_cli.run(main)
