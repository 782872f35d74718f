"""Evaluating a checkpoint on the JanusFlow paper's benchmarks (Tables 2-5), one subcommand per phase.

Phase B, offline scoring (no model, no network): score a predictions file against a benchmark file with the official
scorers' rules (janusflow_jax/eval), write the scores as JSON and print one summary line.

  python -m launch.evaluate score --suite=NAME --data=BENCHMARK_FILE --predictions=PRED.jsonl \\
      [--out=scores.json] [--circular] [--seed=0] [--only_predicted]
  python -m launch.evaluate table --scores=A.scores.json,B.scores.json [--out=table.md]

score: --out defaults to PRED.scores.json beside the predictions. Suites and their files:
  pope, mme, mmbench, seed, mmmu, textvqa   VLMEvalKit's TSV (--data) + {"index", "prediction"} JSONL
  gqa, vqav2                                TSV/JSONL with index + answer (GQA) / answers (the 10 human answers)
  geneval   --data=evaluation_metadata.jsonl + {"index": prompt line, "detections": [{box, label, score, color}]}
            per image; or only --predictions=results.jsonl written by GenEval's evaluate_images.py
  dpg       --data=dpg_bench.csv + {"item_id", "crop", "answers": {proposition_id: judge's answer}} per image
  fid       --data=reference stats + --predictions=generated stats (.npz with mu, sigma; or .npy features)
--circular: MMBench's circular evaluation (rows sharing index % 1e6 must all be right); off by default.
--seed: MMMU's random fallback for unreadable multiple-choice answers (42 replays the official script's draws).
--only_predicted: score only rows that have a prediction (default: a missing prediction is a wrong answer).
table: the paper's numbers beside those of one or more scores files, as a markdown table.

Bad input (a missing file or column, an unknown suite or index) prints one `error: ...` line and exits 1.
Phase A (running the model: `gen` for the generation benchmarks' images, `und` for the understanding answers) will
be further subcommands of this script, writing the predictions that `score` reads.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

from absl import app, flags

_SUITE = flags.DEFINE_string("suite", None, "score: benchmark suite (pope, mme, mmbench, seed, mmmu, gqa, vqav2, "
                             "textvqa, geneval, dpg, fid).")
_DATA = flags.DEFINE_string("data", None, "score: benchmark file (VLMEvalKit TSV, CSV, JSON/JSONL, .npz for fid).")
_PREDICTIONS = flags.DEFINE_string("predictions", None, "score: predictions JSONL (or stats for fid).")
# allow_override: launch.generate/chat/convert define --out and --seed too (same types and default for --seed); one
# process (the test suite) may import several of them.
_OUT = flags.DEFINE_string("out", None, "Output file (score: default PRED.scores.json; table: default stdout).",
                           allow_override=True)
_CIRCULAR = flags.DEFINE_bool("circular", False, "score mmbench/seed: MMBench's circular evaluation.")
_SEED = flags.DEFINE_integer("seed", 0, "score mmmu: seed of the random fallback for unreadable answers.",
                             allow_override=True)
_ONLY_PREDICTED = flags.DEFINE_bool("only_predicted", False, "score: leave out rows without a prediction.")
_SCORES = flags.DEFINE_list("scores", [], "table: scores JSON files written by `score`.")


class CommandError(Exception):
    """A usage mistake, reported as one line."""


def _user_path(path: str) -> str:
    """Relative paths against the current directory; gs:// and other URLs as given."""
    return path if "://" in path or os.path.isabs(path) else os.path.join(os.getcwd(), path)


def _options(suite: str) -> dict:
    """The flags the suite takes: set ones always (a flag the suite does not take is an error in score_files),
    defaults only where the suite takes them (so protocol records e.g. circular=False)."""
    from janusflow_jax.eval import score

    accepted = score.suite_options(suite) if suite in score.SUITES else []
    options = {}
    for name, holder in (("circular", _CIRCULAR), ("seed", _SEED), ("only_predicted", _ONLY_PREDICTED)):
        if flags.FLAGS[name].present or name in accepted:
            options[name] = holder.value
    return options


def score_command() -> int:
    from etils import epath

    from janusflow_jax.eval import score

    if _SUITE.value is None:
        raise CommandError(f"--suite is required (one of: {', '.join(score.SUITES)})")
    if _PREDICTIONS.value is None:
        raise CommandError("--predictions is required")
    predictions = _user_path(_PREDICTIONS.value)
    data = None if _DATA.value is None else _user_path(_DATA.value)
    result = score.score_files(_SUITE.value, data, predictions, **_options(_SUITE.value))
    out = epath.Path(_user_path(_OUT.value) if _OUT.value else os.path.splitext(predictions)[0] + ".scores.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    print(f"{score.summary_line(result)} -> {out}")
    return 0


def table_command() -> int:
    from etils import epath

    from janusflow_jax.eval import formats, paper

    if not _SCORES.value:
        raise CommandError("--scores is required (scores JSON files written by `score`)")
    merged = {}
    for name in _SCORES.value:
        path = formats.as_path(name)
        if not path.exists():
            raise formats.InputError(f"no such file: {path}")
        try:
            result = json.loads(path.read_text())
            merged.update(result["paper"])
        except (ValueError, KeyError, TypeError):
            raise formats.InputError(f"{path} is not a scores file written by `score`") from None
    table = paper.render_table(merged)
    if _OUT.value:
        out = epath.Path(_user_path(_OUT.value))
        out.write_text(table)
        print(f"wrote {out}")
    else:
        print(table, end="")
    return 0


COMMANDS: dict[str, Callable[[], int]] = {"score": score_command, "table": table_command}


def main(argv) -> int:
    from janusflow_jax.eval.formats import InputError

    try:
        if len(argv) < 2:
            raise CommandError(f"give a command: {', '.join(COMMANDS)} (see --help)")
        if argv[1] not in COMMANDS:
            raise CommandError(f"unknown command {argv[1]!r} (known: {', '.join(COMMANDS)})")
        if len(argv) > 2:
            raise CommandError(f"unexpected arguments {argv[2:]}")
        return COMMANDS[argv[1]]()
    except (CommandError, InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def parse_flags(argv):
    """A flag error as one line, not absl's two-line FATAL message."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
