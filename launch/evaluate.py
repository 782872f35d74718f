"""Evaluating a checkpoint on the JanusFlow paper's benchmarks (Tables 2-5), one subcommand per phase.

Phase A, running the JAX model (resumable: a rerun skips finished items; hosts split the items by process index):

  python -m launch.evaluate gen --suite=geneval|dpg|mjhq --checkpoint=CKPT --data=PROMPT_FILE --out=DIR \\
      [--cfg=2] [--steps=30] [--images_per_prompt=4] [--seed=0] [--batch_size=8] [--vae=VAE_DIR] [--dtype=bfloat16]
  python -m launch.evaluate und --suite=SUITE --checkpoint=CKPT --data=BENCHMARK_FILE --out=DIR \\
      [--batch_size=8] [--max_new_tokens=N] [--system_prompt=TEXT] [--image_root=DIR] [--dtype=bfloat16]
  both: [--limit=N] (the first N items only) [--process_index=I --process_count=N] (default: JAX's; on several
  hosts run the same command on each, OUT on a shared path such as gs://)

gen writes DIR/images/ in the layout the benchmark's official scorer reads, and DIR/manifest.json (every sampler
setting and the seed rule):
  geneval  --data=evaluation_metadata.jsonl -> images/NNNNN/metadata.jsonl, images/NNNNN/samples/0000.png .., grid.png
  dpg      --data=prompts/ (<item_id>.txt each) or dpg_bench.csv -> images/<item_id>.png (2 x 2 grid)
  mjhq     --data=meta_data.json -> images/<category>/<id>.png (one image per prompt)
  Defaults: CFG 2, 30 steps, 4 images per prompt (1 for mjhq), the SFT prompt template; image k of prompt p starts
  from noise index p * images_per_prompt + k of --seed.
und writes DIR/predictions.jsonl ({"index", "prediction"} a line, what `score` reads), DIR/manifest.json (the protocol,
an example prompt) and DIR/parts/ (the resume state). Benchmark files: VLMEvalKit's TSVs (index, question, the image
as base64 in `image`, several as "['..', ..]", or a short cell naming the row that holds it; or file paths in
`image_path`, relative to --image_root, default the file's folder; options A..Z, hint, split), or .jsonl/.json/.csv
rows with those columns. Suites and their protocol (DeepSeek's, as VLMEvalKit's Janus wrapper runs it; greedy,
empty system prompt):
  pope, mme            yes/no: "\\n{question}\\nAnswer the question using a single word or phrase."
  mmbench, seed, mmmu  "\\n[Hint: ..\\n]{question}\\nA. ..\\nB. ..\\n\\nAnswer with the option's letter from the given
                       choices directly." (MMBench: every row, its rotations too; MMMU: the validation split)
  gqa, vqav2, textvqa  "\\n{question}\\nAnswer the question using a single word or phrase." (LLaVA-1.5's)
  chartqa              "{question}\\nAnswer the question using a single word or phrase." (VLMEvalKit's VQA datasets)
  mmvet                "\\n{question}" with VLMEvalKit's MM-Vet system prompt (scored by MM-Vet's GPT-4 grader)
  digits               the digits run's held-out set ({workdir}/data/eval/digits_und.tsv), asked as that run asks
Then: python -m launch.evaluate score --suite=SUITE --data=BENCHMARK_FILE --predictions=DIR/predictions.jsonl

Phase B, offline scoring (no model, no network): score a predictions file against a benchmark file with the official
scorers' rules (janusflow_jax/eval), write the scores as JSON and print one summary line.

  python -m launch.evaluate score --suite=NAME --data=BENCHMARK_FILE --predictions=PRED.jsonl \\
      [--out=scores.json] [--[no]circular] [--matcher=pre-pr1175] [--seed=42] [--split=validation]
      [--rule=vlmevalkit-pre1204] [--only_predicted]
  python -m launch.evaluate dpg_answers --data=dpg_bench.csv --predictions=RES_detail.txt [--out=answers.jsonl]
  python -m launch.evaluate table --scores=A.scores.json,B.scores.json [--out=table.md]

score: --out defaults to PRED.scores.json beside the predictions; a phase-A manifest.json beside the predictions is
copied into the scores as "phase_a". Suites and their files:
  pope, mme, mmbench, seed, mmmu, textvqa,  VLMEvalKit's TSV (--data) + {"index", "prediction"} JSONL
  chartqa
  gqa, vqav2                                TSV/JSONL with index + answer (GQA) / answers (the 10 human answers)
  digits                                    the digits run's TSV, exact match as gqa
  geneval   --data=evaluation_metadata.jsonl + {"index": prompt line, "detections": [{box, label, score, color}]}
            per image; or only --predictions=results.jsonl written by GenEval's evaluate_images.py
  dpg       --data=dpg_bench.csv + {"item_id", "crop", "answers": {proposition_id: judge's answer}} per image, as
            `dpg_answers` writes them from compute_dpg_bench.py's RES_detail.txt
  fid       --data=reference stats + --predictions=generated stats (.npz with mu, sigma; or .npy features)
The defaults reproduce the official scorers and the paper's setting; a scores file records them in "protocol" and
lists the options set otherwise in protocol["non_default"], and `table` marks such numbers with *.
--circular: MMBench's circular evaluation (rows sharing index % 1e6 must all be right); default on for mmbench (as
  VLMEvalKit always scores MMBench), off for seed.
--matcher: VLMEvalKit's option matcher: pre-pr1175 (default: the version of JanusFlow's paper, 2024-11), pr1175
  (letter among the last 4 words, answer-length guard; 2025-08), pr1552 ("the answer is B"; 2026-06).
--seed: MMMU's random fallback for unreadable multiple-choice answers (default 42: MMMU's eval_utils.py).
--split: MMMU rows of this `split` value only (default validation, the paper's; empty for all rows); predictions of
  other rows (VLMEvalKit's MMMU_DEV_VAL covers dev too) are left out and counted.
--rule: ChartQA relaxed accuracy: vlmevalkit-pre1204 (default, the paper's: 5% relative to the prediction) or
  pix2struct (relative to the gold answer, as ChartQA defines it and VLMEvalKit does since 2025-09).
--only_predicted: score only rows that have a prediction (default: a missing prediction is a wrong answer).
table: the paper's numbers beside those of one or more scores files, as a markdown table, then the protocol of each.

External scorers (not run here): GenEval's Mask2Former detector + CLIP colour classifier (evaluation/
evaluate_images.py on DIR/images), DPG-Bench's mPLUG-large judge (dpg_bench/dist_eval.sh DIR/images RESOLUTION),
MJHQ-30K FID's Inception features (clean-fid on DIR/images against MJHQ-30K), MM-Vet's GPT-4 grader.
Bad input (a missing file or column, an unknown suite or index) prints one `error: ...` line and exits 1.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

from absl import app, flags

_SUITE = flags.DEFINE_string("suite", None, "Benchmark suite (gen: geneval, dpg, mjhq; und: pope, mme, mmbench, "
                             "seed, mmmu, gqa, vqav2, textvqa, chartqa, mmvet, digits; score: those and fid).")
_DATA = flags.DEFINE_string("data", None, "The benchmark's file: gen its prompt file (or DPG-Bench's prompts/ "
                            "folder); und/score its questions (VLMEvalKit TSV, CSV, JSON/JSONL; .npz for fid).")
_PREDICTIONS = flags.DEFINE_string("predictions", None, "score: predictions JSONL (or stats for fid); dpg_answers: "
                                   "compute_dpg_bench.py's <res>_detail.txt.")
# allow_override: launch.generate/chat/convert define --out, --seed, --checkpoint, --dtype, --vae, --cfg, --steps,
# --batch_size, --max_new_tokens and --system_prompt too, with the same types and defaults; one process (the test
# suite) may import several of them.
_OUT = flags.DEFINE_string("out", None, "gen/und: output directory; score: scores file (default PRED.scores.json); "
                           "table: markdown file (default stdout).", allow_override=True)
_CIRCULAR = flags.DEFINE_bool("circular", None, "score mmbench/seed: MMBench's circular evaluation (default: on for "
                              "mmbench, as VLMEvalKit; off for seed).")
_MATCHER = flags.DEFINE_string("matcher", None, "score mmbench/seed: VLMEvalKit's option matcher version: pre-pr1175 "
                               "(default, the paper's), pr1175, pr1552.")
_RULE = flags.DEFINE_string("rule", None, "score chartqa: vlmevalkit-pre1204 (default, the paper's) or pix2struct.")
_SEED = flags.DEFINE_integer("seed", 0, "gen: noise seed; score mmmu: seed of the random fallback for unreadable "
                             "answers (default there 42, MMMU's own).", allow_override=True)
_ONLY_PREDICTED = flags.DEFINE_bool("only_predicted", False, "score: leave out rows without a prediction.")
_SPLIT = flags.DEFINE_string("split", "validation", "score mmmu: rows of this split only (empty: all rows).")
_SCORES = flags.DEFINE_list("scores", [], "table: scores JSON files written by `score`.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "gen/und: official JanusFlow directory or orbax checkpoint root.",
                                  allow_override=True)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "gen/und: compute dtype (default: the "
                           "checkpoint's).", allow_override=True)
_VAE = flags.DEFINE_string("vae", None, "gen: diffusers AutoencoderKL directory (default: CHECKPOINT/vae or the "
                           "checkpoint's latent.json).", allow_override=True)
# Default None as launch.generate's (one process may import both; the later definition sets the shared default).
_CFG = flags.DEFINE_float("cfg", None, "gen: classifier-free guidance weight w >= 1 (default 2).", allow_override=True)
_STEPS = flags.DEFINE_integer("steps", 30, "gen: Euler steps of the rectified-flow ODE.", allow_override=True)
_IMAGES_PER_PROMPT = flags.DEFINE_integer("images_per_prompt", None, "gen: images per prompt (default 4; mjhq 1).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "gen: images per batch; und: questions per batch.",
                                   allow_override=True)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 512, "und: answer length limit in tokens (default: the "
                                       "suite's, 512; digits 4).", allow_override=True)
_SYSTEM_PROMPT = flags.DEFINE_string("system_prompt", None, "und: system prompt (default: the suite's protocol, empty "
                                     "except mmvet).", allow_override=True)
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "und: folder that image_path cells are relative to (default: "
                                  "the benchmark file's folder).")
_LIMIT = flags.DEFINE_integer("limit", 0, "gen/und: only the first N prompts/questions (0 = all).")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", None, "gen/und: this host's index (default: JAX's).")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", None, "gen/und: number of hosts sharing the work (default: "
                                      "JAX's).")


class CommandError(Exception):
    """A usage mistake, reported as one line."""


def _user_path(path: str) -> str:
    """Relative paths against the current directory; gs:// and other URLs as given."""
    from janusflow_jax import paths

    return paths.resolve(path)


def _options() -> dict:
    """The scoring flags given on the command line; the others keep the suite's defaults (which reproduce the official
    scorers; score_files refuses a flag the suite does not take, e.g. --circular for pope)."""
    return {name: flags.FLAGS[name].value for name in ("circular", "matcher", "rule", "seed", "only_predicted", "split")
            if flags.FLAGS[name].present}


def score_command() -> int:
    from etils import epath

    from janusflow_jax.eval import score

    if _SUITE.value is None:
        raise CommandError(f"--suite is required (one of: {', '.join(score.SUITES)})")
    if _PREDICTIONS.value is None:
        raise CommandError("--predictions is required")
    predictions = _user_path(_PREDICTIONS.value)
    data = None if _DATA.value is None else _user_path(_DATA.value)
    result = score.score_files(_SUITE.value, data, predictions, **_options())
    manifest = epath.Path(predictions).parent / "manifest.json"  # written by `und` beside its predictions
    if manifest.exists():
        try:
            result["phase_a"] = json.loads(manifest.read_text())
        except ValueError:
            pass
    out = epath.Path(_user_path(_OUT.value) if _OUT.value else os.path.splitext(predictions)[0] + ".scores.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    print(f"{score.summary_line(result)} -> {out}")
    return 0


def _protocol_line(result: dict) -> str:
    """One markdown bullet: a scores file's scoring protocol and, when `und` made the predictions, how it asked."""
    def flat(d: dict) -> str:
        return "; ".join(f"{k}: {v}" for k, v in d.items())

    protocol = dict(result.get("protocol", {}))
    changed = protocol.pop("non_default", None)
    line = f"- {result.get('suite')} ({result.get('predictions')}): scoring {flat(protocol)}"
    if changed:
        line += f"; *NON-DEFAULT: {flat(changed)}*"
    asked = result.get("phase_a", {}).get("protocol")
    if asked:
        line += f"; answers {flat(asked)}; checkpoint {result['phase_a'].get('checkpoint')}"
    return line + "\n"


def table_command() -> int:
    from etils import epath

    from janusflow_jax.eval import formats, paper

    if not _SCORES.value:
        raise CommandError("--scores is required (scores JSON files written by `score`)")
    merged, protocols, marked = {}, [], set()
    for name in _SCORES.value:
        path = formats.as_path(name)
        if not path.exists():
            raise formats.InputError(f"no such file: {path}")
        try:
            result = json.loads(path.read_text())
            merged.update(result["paper"])
            if result.get("protocol", {}).get("non_default"):
                marked.update(result["paper"])
            else:
                marked.difference_update(result["paper"])
            protocols.append(_protocol_line(result))
        except (ValueError, KeyError, TypeError):
            raise formats.InputError(f"{path} is not a scores file written by `score`") from None
    table = paper.render_table(merged, marked=marked) + "Protocol\n\n" + "".join(protocols)
    if _OUT.value:
        out = epath.Path(_user_path(_OUT.value))
        out.write_text(table)
        print(f"wrote {out}")
    else:
        print(table, end="")
    return 0


def dpg_answers_command() -> int:
    """compute_dpg_bench.py's <res>_detail.txt -> the answers JSONL that `score --suite=dpg` reads."""
    from etils import epath

    from janusflow_jax.eval import dpg, formats

    _require("data", "predictions")
    detail = _user_path(_PREDICTIONS.value)
    rows = formats.read_rows(_user_path(_DATA.value))
    formats.require_columns(rows, ["item_id", "proposition_id", "dependency", "tuple", "question_natural_language"],
                            "DPG-Bench csv")
    path = formats.as_path(detail)
    if not path.exists():
        raise formats.InputError(f"no such file: {path}")
    try:
        records = dpg.answers_from_detail(path.read_text().splitlines(), dpg.prepare_dpg_data(rows))
    except ValueError as e:
        raise formats.InputError(f"{path}: {e}") from None
    stem = os.fspath(detail)[:-len("_detail.txt")] if os.fspath(detail).endswith("_detail.txt") else \
        os.path.splitext(os.fspath(detail))[0]
    out = epath.Path(_user_path(_OUT.value) if _OUT.value else stem + "_answers.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"dpg: {len(records)} images of {len({r['item_id'] for r in records})} prompts -> {out}; next: python -m "
          f"launch.evaluate score --suite=dpg --data={_DATA.value} --predictions={out}")
    return 0


def _require(*names: str):
    for name in names:
        if flags.FLAGS[name].value is None:
            raise CommandError(f"--{name} is required")


def _hosts() -> tuple[int | None, int | None]:
    """This host's (index, count): the flags, else JAX's, with jax.distributed initialised first where the
    environment shows several hosts (a TPU pod slice), as launch.train does."""
    if _PROCESS_INDEX.value is not None or _PROCESS_COUNT.value is not None:
        if _PROCESS_INDEX.value is None or _PROCESS_COUNT.value is None:
            raise CommandError("give both --process_index and --process_count (or neither: JAX's)")
        return _PROCESS_INDEX.value, _PROCESS_COUNT.value
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or "JAX_COORDINATOR_ADDRESS" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        import jax

        jax.distributed.initialize()
    return None, None


def _quiet():
    from absl import logging

    if not flags.FLAGS["verbosity"].present:  # orbax logs every restore step at INFO
        logging.set_verbosity(logging.WARNING)


def gen_command() -> int:
    from janusflow_jax.eval import generation
    from janusflow_jax.inference import load as inference

    _require("suite", "checkpoint", "data", "out")
    if _SUITE.value not in generation.SUITES:
        raise CommandError(f"gen --suite must be one of {', '.join(generation.SUITES)}, got {_SUITE.value!r}")
    index, count = _hosts()
    _quiet()
    checkpoint, data, out = (_user_path(f.value) for f in (_CHECKPOINT, _DATA, _OUT))
    vae = None if _VAE.value is None else _user_path(_VAE.value)
    try:
        loaded = inference.load(checkpoint, dtype=_DTYPE.value, with_vae=True, vae=vae)
        summary = generation.run(loaded.model, loaded.params, loaded.processor, loaded.vae, loaded.vae_params,
                                 _SUITE.value, data, out, cfg=2.0 if _CFG.value is None else _CFG.value,
                                 steps=_STEPS.value, seed=_SEED.value,
                                 images_per_prompt=_IMAGES_PER_PROMPT.value, batch_size=_BATCH_SIZE.value,
                                 limit=_LIMIT.value, process_index=index, process_count=count, checkpoint=checkpoint,
                                 vae=vae or "")
    except inference.USER_ERRORS as e:
        raise CommandError(str(e)) from None
    host = f"host {summary['host']} of {summary['hosts']}: " if summary["hosts"] > 1 else ""
    print(f"{_SUITE.value}: {host}{summary['written']} prompts written, {summary['found_done']} found done; "
          f"{summary['prompts'] - summary['missing']} of {summary['prompts']} prompts complete in {summary['images']}")
    if not summary["missing"]:
        print(f"next: {GEN_SCORERS[_SUITE.value].format(images=summary['images'], out=out)}")
    return 0


# What reads gen's images (external models), printed when a run is complete.
GEN_SCORERS = {
    "geneval": "python evaluation/evaluate_images.py {images} --outfile {out}/results.jsonl "
               "--model-path MASK2FORMER_DIR (GenEval's repo), then python -m launch.evaluate score --suite=geneval "
               "--predictions={out}/results.jsonl",
    "dpg": "bash dpg_bench/dist_eval.sh {images} RESOLUTION (DPG-Bench's repo; its mPLUG-large judge)",
    "mjhq": "clean-fid: fid.compute_fid('{images}', MJHQ_30K_DIR) (Inception features), or save both feature sets "
            "and python -m launch.evaluate score --suite=fid --data=REF.npz --predictions=GEN.npz",
}


def und_command() -> int:
    from janusflow_jax.eval import answering, prompts
    from janusflow_jax.inference import load as inference

    _require("suite", "checkpoint", "data", "out")
    if _SUITE.value not in prompts.PROTOCOLS:
        raise CommandError(f"und --suite must be one of {', '.join(prompts.PROTOCOLS)}, got {_SUITE.value!r}")
    index, count = _hosts()
    _quiet()
    checkpoint, data, out = (_user_path(f.value) for f in (_CHECKPOINT, _DATA, _OUT))
    try:
        loaded = inference.load(checkpoint, dtype=_DTYPE.value)
        summary = answering.run(
            loaded.model, loaded.params, loaded.processor, _SUITE.value, data, out, batch_size=_BATCH_SIZE.value,
            max_new_tokens=_MAX_NEW_TOKENS.value if flags.FLAGS["max_new_tokens"].present else None,
            system_prompt=_SYSTEM_PROMPT.value,
            image_root=None if _IMAGE_ROOT.value is None else _user_path(_IMAGE_ROOT.value), limit=_LIMIT.value,
            process_index=index, process_count=count, checkpoint=checkpoint, dtype=_DTYPE.value)
    except inference.USER_ERRORS as e:
        raise CommandError(str(e)) from None
    host = f"host {summary['host']} of {summary['hosts']}: " if summary["hosts"] > 1 else ""
    print(f"{_SUITE.value}: {host}{summary['answered']} answered, {summary['found_done']} found done; "
          f"{summary['items'] - summary['missing']} of {summary['items']} answered in {out}")
    if summary["predictions"] is not None:
        if summary["scorer"]:
            print(f"next: python -m launch.evaluate score --suite={summary['scorer']} --data={data} "
                  f"--predictions={summary['predictions']}")
        else:
            print(f"{summary['predictions']} is for MM-Vet's GPT-4 grader (not run here)")
    return 0


COMMANDS: dict[str, Callable[[], int]] = {"gen": gen_command, "und": und_command, "score": score_command,
                                          "table": table_command, "dpg_answers": dpg_answers_command}


# The flags that name files or directories (gs:// ones are checked before any work: `paths.check_access`).
PATH_FLAGS = ("checkpoint", "data", "out", "predictions", "image_root", "vae")


def main(argv) -> int:
    from janusflow_jax import paths
    from janusflow_jax.eval.formats import InputError

    try:
        if len(argv) < 2:
            raise CommandError(f"give a command: {', '.join(COMMANDS)} (see --help)")
        if argv[1] not in COMMANDS:
            raise CommandError(f"unknown command {argv[1]!r} (known: {', '.join(COMMANDS)})")
        if len(argv) > 2:
            raise CommandError(f"unexpected arguments {argv[2:]}")
        # A missing bucket or missing credentials: one line now, not a traceback (or a bare URL) after the model ran.
        paths.check_access(*(flags.FLAGS[name].value for name in PATH_FLAGS), *_SCORES.value)
        return COMMANDS[argv[1]]()
    except (CommandError, InputError, OSError, paths.RemoteAccessError) as e:
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
