"""Scoring a benchmark's predictions offline: one function per suite, and `score_files` for the CLI.

`SUITES[name](data_rows, prediction_records, **options) -> dict` with, in every result:
  "score": the headline number on the paper's scale, "paper": {paper.py key: value} for the paper table,
  "protocol": the choices behind the number (parser, circular or not, subsets, seed ...), the suite's details, and
  "missing_predictions" (benchmark rows without a prediction, scored as an empty answer unless only_predicted).
Understanding suites read predictions as `{"index": ..., "prediction": "..."}` records (formats.py). Suite inputs:

  pope      VLMEvalKit POPE.tsv (index, answer yes/no, category|split = adversarial/popular/random)
  mme       VLMEvalKit MME.tsv (index, answer yes/no, category = subtask, image_path)
  mmbench   VLMEvalKit MMBench_DEV_EN.tsv (index, answer letter, A..H, category, l2-category); --circular
  seed      VLMEvalKit SEEDBench_IMG.tsv (index, answer letter, A..D, category)
  mmmu      VLMEvalKit MMMU_DEV_VAL.tsv or JSONL (index, answer, A..I or options, question_type, subject|category|id);
            rows of the `split` column's "validation" only, when it exists (--split to change)
  gqa       TSV/JSONL (index, answer)
  digits    the digits run's TSV (index, answer = the digit's name), exact match as gqa; not in the paper
  vqav2     TSV/JSONL (index, answers: the 10 human answers, a list or "['..', ..]" text; or answer holding that list)
  textvqa   VLMEvalKit TextVQA_VAL.tsv (index, answer = "['..', ..]", 10 answers) or JSONL with answers
  chartqa   VLMEvalKit ChartQA_TEST.tsv (index, answer: one or "['..', ..]", category|split); relaxed accuracy
  geneval   evaluation_metadata.jsonl + detections {"index": prompt line (0-based), "detections": [...]} per image;
            or (data optional) GenEval's own results.jsonl ({"tag", "correct", "metadata", ...} per image)
  dpg       dpg_bench.csv + judge answers {"item_id", "crop": 0..3, "answers": {"proposition_id": "yes"|...}} per image
  fid       reference statistics + generated statistics: .npz with mu, sigma (pytorch-fid's format) or .npy
            features [num_images, dims]
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Mapping, Sequence

from janusflow_jax.eval import chartqa, dpg, fid, formats, geneval, mme, mmmu, multiple_choice, paper, pope, vqa
from janusflow_jax.eval.formats import InputError, MissingColumnError, UnknownIndexError

Rows = Sequence[Mapping[str, Any]]
Records = Sequence[Mapping[str, Any]]


def _first_column(rows: Rows, candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in rows[0]), None)


def _joined(rows: Rows, records: Records, columns: Sequence[str], only_predicted: bool):
    formats.require_columns(rows, ["index", *columns])
    return formats.join_predictions(rows, formats.predictions_by_index(records), only_predicted)


def _result(score: float, paper_values: Mapping[str, float], protocol: Mapping[str, Any], missing: int,
            **details) -> dict:
    return {"score": score, "paper": dict(paper_values), "protocol": dict(protocol), "missing_predictions": missing,
            **details}


def score_pope_suite(rows: Rows, records: Records, *, only_predicted: bool = False) -> dict:
    pairs, missing = _joined(rows, records, ["answer"], only_predicted)
    subset_column = _first_column(rows, ["category", "split"])
    try:
        result = pope.score_pope((str(row[subset_column]).strip().lower() if subset_column else "all", prediction,
                                  str(row["answer"])) for row, prediction in pairs)
    except ValueError as e:
        raise InputError(str(e)) from None
    headline = 100 * result["f1_mean_over_subsets"]
    protocol = {"parser": "POPE evaluate.py: first sentence; No/no/not -> no, else yes", "positive": "yes",
                "subset_column": subset_column, "subsets": list(result["subsets"]),
                "headline": "F1 x100, mean over subsets (as LLaVA-1.5 / JanusFlow report)",
                "only_predicted": only_predicted}
    return _result(headline, {"pope": headline}, protocol, missing, questions=len(pairs), **result)


def score_mme_suite(rows: Rows, records: Records, *, only_predicted: bool = False) -> dict:
    pairs, missing = _joined(rows, records, ["answer", "category"], only_predicted)
    if "image_path" in rows[0]:
        items = [(str(r["category"]), str(r["image_path"]), p, str(r["answer"])) for r, p in pairs]
        pairing = "rows sharing image_path (VLMEvalKit MME_rating)"
    else:
        items = mme.pair_consecutive((str(r["category"]), p, str(r["answer"])) for r, p in pairs)
        pairing = "consecutive rows of a category (calculation.py's two-line chunks)"
    bad = [a for _, _, _, a in items if a.strip().lower() not in ("yes", "no")]
    if bad:
        raise InputError(f"an MME answer must be Yes or No, got {bad[0]!r}")
    result = mme.score_mme(items)
    protocol = {"parser": "MME calculation.py parse_pred_ans (exact yes/no, else yes/no in the first 4 chars)",
                "image_pairing": pairing, "headline": "perception = sum of 10 subtasks' acc + acc+ (x100)",
                "only_predicted": only_predicted}
    return _result(result["perception"], {"mme.perception": result["perception"], "mme.cognition":
                                          result["cognition"]}, protocol, missing, questions=len(pairs), **result)


def _multiple_choice_suite(key: str, rows: Rows, records: Records, circular: bool, matcher: str,
                           only_predicted: bool) -> dict:
    pairs, missing = _joined(rows, records, ["answer", "A", "B"], only_predicted)
    if matcher not in multiple_choice.MATCHERS:
        raise InputError(f"unknown matcher {matcher!r} (known: {', '.join(multiple_choice.MATCHERS)})")
    items = ((r, multiple_choice.as_vlmevalkit_prediction(p), str(r["answer"])) for r, p in pairs)
    try:
        result = multiple_choice.score_multiple_choice(items, circular=circular, matcher=matcher)
    except ValueError as e:  # a non-numeric index in circular mode
        raise InputError(f"circular evaluation needs numeric indices: {e}") from None
    headline = 100 * result["accuracy"]
    protocol = {"extractor": "VLMEvalKit can_infer (option letter, else option text), exact matching, no LLM judge",
                "matcher": matcher, "options_missing": "pandas' default NA strings (None, NA, N/A, null, ...)",
                "empty_prediction": "the text 'nan' (pandas NaN through str())", "no_answer": "Z (wrong)",
                "circular": circular, "circular_groups": "index % 1e6, keyed by main rows" if circular else None,
                "only_predicted": only_predicted}
    return _result(headline, {key: headline}, protocol, missing, **result)


def score_mmbench_suite(rows: Rows, records: Records, *, circular: bool = True,
                        matcher: str = multiple_choice.DEFAULT_MATCHER, only_predicted: bool = False) -> dict:
    """Circular by default: VLMEvalKit scores every MMBench file circularly (image_mcq.py ImageMCQDataset.evaluate)."""
    return _multiple_choice_suite("mmbench", rows, records, circular, matcher, only_predicted)


def score_seed_suite(rows: Rows, records: Records, *, circular: bool = False,
                     matcher: str = multiple_choice.DEFAULT_MATCHER, only_predicted: bool = False) -> dict:
    return _multiple_choice_suite("seed", rows, records, circular, matcher, only_predicted)


MMMU_LETTERS = "ABCDEFGHI"


def _mmmu_item(row: Mapping[str, Any], prediction: str):
    if "options" in row and str(row["options"]).strip() not in ("", "[]"):
        texts = formats.parse_list(row["options"])
        options = {MMMU_LETTERS[i]: t for i, t in enumerate(texts[:len(MMMU_LETTERS)])}
    else:
        options = formats.present_options(row, MMMU_LETTERS)
    question_type = str(row.get("question_type") or "").strip()
    if question_type not in ("multiple-choice", "open"):
        question_type = "multiple-choice" if options else "open"
    if "subject" in row and str(row["subject"]).strip():
        subject = str(row["subject"])
    elif "category" in row and str(row["category"]).strip():
        subject = str(row["category"])
    elif "id" in row:  # "validation_Art_Theory_12" -> "Art_Theory"
        subject = "_".join(str(row["id"]).split("_")[1:-1]) or "all"
    else:
        subject = "all"
    answer = str(row["answer"]).strip()
    gold = formats.parse_list(answer) if question_type == "open" and answer.startswith("[") else answer
    return subject, question_type, gold, options, prediction


def score_mmmu_suite(rows: Rows, records: Records, *, seed: int = mmmu.OFFICIAL_SEED, only_predicted: bool = False,
                     split: str = "validation") -> dict:
    """seed: the random fallback's (42: eval_utils.py's `random.seed(42)`). split: VLMEvalKit's MMMU_DEV_VAL holds the
    dev and validation rows and its predictions cover both; predictions of rows outside `split` are left out and
    counted (`predictions_outside_split`)."""
    outside = 0
    if split and rows and "split" in rows[0]:  # the paper's MMMU is the validation split
        formats.require_columns(rows, ["index"])
        others = {formats.index_key(r["index"]) for r in rows if str(r["split"]).strip() != split}
        rows = [r for r in rows if str(r["split"]).strip() == split]
        if not rows:
            raise InputError(f"no MMMU row is in the {split!r} split")
        kept = [r for r in records if "index" not in r or formats.index_key(r["index"]) not in others]
        outside, records = len(records) - len(kept), kept
    pairs, missing = _joined(rows, records, ["answer"], only_predicted)
    result = mmmu.score_mmmu((_mmmu_item(r, p) for r, p in pairs), seed=seed)
    headline = 100 * result["accuracy"]
    protocol = {"parser": "MMMU eval_utils.py parse_multi_choice_response / parse_open_response + eval_open",
                "random_fallback": f"random.Random({seed}) in question order", "seed": seed,
                "split": split or "all rows", "only_predicted": only_predicted}
    return _result(headline, {"mmmu": headline}, protocol, missing, predictions_outside_split=outside, **result)


def score_gqa_suite(rows: Rows, records: Records, *, only_predicted: bool = False) -> dict:
    pairs, missing = _joined(rows, records, ["answer"], only_predicted)
    hits = [vqa.gqa_match(p, str(r["answer"])) for r, p in pairs]
    headline = 100 * sum(hits) / len(hits)
    protocol = {"match": "exact after strip, trailing periods dropped, lower case", "only_predicted": only_predicted}
    return _result(headline, {"gqa": headline}, protocol, missing, accuracy=headline / 100, questions=len(hits))


def score_digits_suite(rows: Rows, records: Records, *, only_predicted: bool = False) -> dict:
    """The digits run's held-out understanding set (examples/digits): exact match as GQA's, which is the digits run's
    own rule (strip, lower case, trailing periods dropped)."""
    result = score_gqa_suite(rows, records, only_predicted=only_predicted)
    result["paper"] = {"digits": result.pop("paper")["gqa"]}
    return result


def _answers(row: Mapping[str, Any]) -> list[str]:
    value = row["answers"] if "answers" in row else row["answer"]
    answers = formats.parse_list(value)
    if len(answers) < 2:
        raise InputError(f"row {row.get('index')}: expected the list of human answers (10), got {value!r}")
    return answers


def _vqa_suite(key: str, accuracy: Callable[[str, Sequence[str]], float], rule: str, rows: Rows, records: Records,
               only_predicted: bool) -> dict:
    formats.require_columns(rows, ["index"])
    answer_column = _first_column(rows, ["answers", "answer"])
    if answer_column is None:
        raise MissingColumnError("the benchmark file has no column 'answers' (or 'answer' holding the list)")
    pairs, missing = _joined(rows, records, [answer_column], only_predicted)
    scores = [accuracy(p, _answers(r)) for r, p in pairs]
    headline = 100 * sum(scores) / len(scores)
    protocol = {"rule": rule, "accuracy": "mean over the 10 leave-one-out annotator subsets of min(1, matches/3)",
                "only_predicted": only_predicted}
    return _result(headline, {key: headline}, protocol, missing, accuracy=headline / 100, questions=len(scores))


def score_vqav2_suite(rows: Rows, records: Records, *, only_predicted: bool = False) -> dict:
    return _vqa_suite("vqav2", vqa.vqav2_accuracy, "prediction through EvalAIAnswerProcessor (as prepared for the "
                      "EvalAI upload), then VQA API vqaEval.py (normalised only when humans disagree)", rows, records,
                      only_predicted)


def score_textvqa_suite(rows: Rows, records: Records, *, only_predicted: bool = False) -> dict:
    return _vqa_suite("textvqa", vqa.textvqa_accuracy, "TextVQA m4c_evaluator (EvalAIAnswerProcessor, always)", rows,
                      records, only_predicted)


def score_chartqa_suite(rows: Rows, records: Records, *, rule: str = chartqa.DEFAULT_RULE,
                        only_predicted: bool = False) -> dict:
    if rule not in chartqa.RULES:
        raise InputError(f"unknown ChartQA rule {rule!r} (known: {', '.join(chartqa.RULES)})")
    pairs, missing = _joined(rows, records, ["answer"], only_predicted)
    subset_column = _first_column(rows, ["category", "split"])
    result = chartqa.score_chartqa(((str(r[subset_column]) if subset_column else "all", p,
                                     formats.parse_list(r["answer"])) for r, p in pairs), rule=rule)
    headline = 100 * result["accuracy"]
    protocol = {"metric": "relaxed accuracy: numbers within 5% of the gold answer, else exact match (lower case)",
                "rule": rule, "answers": "best over the gold answers", "only_predicted": only_predicted}
    return _result(headline, {"chartqa": headline}, protocol, missing, **result)


def score_geneval_suite(rows: Rows | None, records: Records) -> dict:
    if not records:
        raise InputError("the predictions file is empty")
    if all("correct" in r and "tag" in r for r in records):
        results, source, missing = records, "GenEval results.jsonl (evaluate_images.py output)", 0
    else:
        if rows is None:
            raise InputError("geneval detections need --data=evaluation_metadata.jsonl")
        formats.require_columns(rows, ["tag", "include"], "GenEval metadata")
        results, prompts_seen = [], set()
        for n, record in enumerate(records, start=1):
            if "index" not in record or "detections" not in record:
                raise MissingColumnError(f"prediction line {n} needs 'index' (the prompt's 0-based line in the "
                                         f"metadata) and 'detections' (or 'tag' and 'correct' for results.jsonl)")
            index = int(formats.index_key(record["index"])) if formats.index_key(record["index"]).isdigit() else -1
            if not 0 <= index < len(rows):
                raise UnknownIndexError(f"prediction line {n}: prompt index {record['index']} is not in the "
                                        f"metadata ({len(rows)} prompts)")
            prompts_seen.add(index)
            try:
                results.append(geneval.evaluate_image(record["detections"], rows[index]))
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"prediction line {n}: bad detections ({e!r})") from None
        source = "detections, evaluate_images.py clause logic (thresholds 0.3 / counting 0.9, 16 objects, no NMS)"
        missing = len(rows) - len(prompts_seen)  # prompts without any image
    try:
        summary = geneval.summary_scores(results)
    except (KeyError, ValueError) as e:
        raise InputError(f"bad GenEval results: {e!r}") from None
    paper_values = {f"geneval.{tag}": v for tag, v in summary["tags"].items()}
    paper_values["geneval.overall"] = summary["overall"]
    protocol = {"source": source, "overall": "mean of the per-tag means (summary_scores.py)"}
    return _result(summary["overall"], paper_values, protocol, missing, **summary)


def score_dpg_suite(rows: Rows, records: Records, *, skip_first_row: bool = True) -> dict:
    formats.require_columns(rows, ["item_id", "proposition_id", "dependency", "tuple", "question_natural_language"],
                            "DPG-Bench csv")
    try:
        questions = dpg.prepare_dpg_data(rows, skip_first_row=skip_first_row)
    except ValueError as e:
        raise InputError(f"bad DPG-Bench csv: {e}") from None
    crops: dict[str, dict[int, dict[int, str]]] = {}
    for n, record in enumerate(records, start=1):
        if "item_id" not in record or not isinstance(record.get("answers"), dict):
            raise MissingColumnError(f"prediction line {n} needs 'item_id' and 'answers' ({{proposition_id: answer}})")
        item_id = str(record["item_id"])
        if item_id not in questions:
            raise UnknownIndexError(f"prediction line {n}: item_id {item_id} is not in the DPG-Bench csv")
        per_item = crops.setdefault(item_id, {})
        try:
            crop = int(record.get("crop", len(per_item)))
            answers = {int(q): str(a) for q, a in record["answers"].items()}
        except (TypeError, ValueError):
            raise InputError(f"prediction line {n}: 'crop' must be a number and 'answers' keyed by proposition_id "
                             f"numbers") from None
        if crop in per_item:
            raise InputError(f"prediction line {n}: item_id {item_id} crop {crop} appears twice")
        per_item[crop] = answers
    if not crops:
        raise InputError("the predictions file is empty")
    by_item = {item: [images[c] for c in sorted(images)] for item, images in crops.items()}
    try:
        result = dpg.score_dpg(questions, by_item)
    except ValueError as e:
        raise InputError(str(e)) from None
    paper_values = {f"dpg.{c}": result["l1_categories"][c] for c in dpg.L1_CATEGORIES if c in result["l1_categories"]}
    paper_values["dpg.overall"] = result["overall"]
    images_per_prompt = sorted({len(v) for v in by_item.values()})
    protocol = {"judge_answer": "exactly 'yes' scores 1", "parent_zeroing": "in place, in question order",
                "skip_first_row": skip_first_row, "images_per_prompt": images_per_prompt,
                "categories": "last image's answers before parent zeroing (compute_dpg_bench.py)"}
    return _result(result["overall"], paper_values, protocol, len(questions) - len(by_item), **result)


def _load_stats(path) -> tuple[Any, Any]:
    import io

    import numpy as np

    data = formats.as_path(path)
    if not data.exists():
        raise InputError(f"no such file: {data}")
    try:
        loaded = np.load(io.BytesIO(data.read_bytes()), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"{data} is not a .npz/.npy file: {e}") from None
    if isinstance(loaded, np.ndarray):
        return fid.gaussian_stats(loaded)
    if "mu" in loaded and "sigma" in loaded:
        return loaded["mu"], loaded["sigma"]
    raise InputError(f"{data} has no arrays 'mu' and 'sigma' (it has: {', '.join(loaded.files)})")


def score_fid_suite(reference, generated) -> dict:
    """Both arguments are file paths (this suite reads arrays, not rows)."""
    try:
        value = fid.frechet_distance(*_load_stats(reference), *_load_stats(generated))
    except ValueError as e:
        raise InputError(str(e)) from None
    protocol = {"formula": "pytorch-fid calculate_frechet_distance (sqrtm of the product, eps 1e-6 retry)"}
    return _result(value, {"mjhq.fid": value}, protocol, 0, fid=value)


SUITES: dict[str, Callable[..., dict]] = {
    "pope": score_pope_suite,
    "mme": score_mme_suite,
    "mmbench": score_mmbench_suite,
    "seed": score_seed_suite,
    "mmmu": score_mmmu_suite,
    "gqa": score_gqa_suite,
    "digits": score_digits_suite,
    "vqav2": score_vqav2_suite,
    "textvqa": score_textvqa_suite,
    "chartqa": score_chartqa_suite,
    "geneval": score_geneval_suite,
    "dpg": score_dpg_suite,
    "fid": score_fid_suite,
}
DATA_OPTIONAL = {"geneval"}  # GenEval's results.jsonl is complete in itself


def suite_options(suite: str) -> list[str]:
    return list(protocol_defaults(suite))


def protocol_defaults(suite: str) -> dict[str, Any]:
    """{option: default} of a suite: the defaults reproduce the official scorers' (and the paper's) setting."""
    return {p.name: p.default for p in inspect.signature(SUITES[suite]).parameters.values()
            if p.kind == p.KEYWORD_ONLY}


def non_default(suite: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options set away from the suite's defaults (recorded as protocol["non_default"]; `table` marks them)."""
    defaults = protocol_defaults(suite)
    return {k: v for k, v in options.items() if k in defaults and v != defaults[k]}


def score_files(suite: str, data_path: str | os.PathLike | None, predictions_path: str | os.PathLike,
                **options) -> dict:
    """Reads the benchmark file and the predictions, scores them with SUITES[suite]; InputError on bad input.
    Options a suite does not take are an error (e.g. circular for pope)."""
    if suite not in SUITES:
        raise InputError(f"unknown suite {suite!r} (known: {', '.join(SUITES)})")
    accepted = suite_options(suite)
    for name in options:
        if name not in accepted:
            raise InputError(f"option {name!r} does not apply to suite {suite} (it takes: "
                             f"{', '.join(accepted) or 'none'})")
    if data_path is None and suite not in DATA_OPTIONAL:
        raise InputError(f"suite {suite} needs a benchmark file (--data)")
    if suite == "fid":
        result = score_fid_suite(data_path, predictions_path)
    else:
        rows = formats.read_rows(data_path) if data_path is not None else None
        records = formats.read_records(predictions_path)
        result = SUITES[suite](rows, records, **options)
    result["protocol"]["non_default"] = non_default(suite, options)
    return {"suite": suite, "data": None if data_path is None else os.fspath(data_path),
            "predictions": os.fspath(predictions_path), **result}


HEADLINE = {"pope": "pope", "mme": "mme.perception", "mmbench": "mmbench", "seed": "seed", "mmmu": "mmmu",
            "gqa": "gqa", "digits": "digits", "vqav2": "vqav2", "textvqa": "textvqa", "chartqa": "chartqa",
            "geneval": "geneval.overall", "dpg": "dpg.overall", "fid": "mjhq.fid"}
NOT_IN_PAPER = {"digits"}  # suites whose headline the paper does not report (paper.render_table lists them apart)


def summary_line(result: Mapping[str, Any]) -> str:
    """One line: the suite's headline beside the paper's, and how much was scored."""
    key = HEADLINE[result["suite"]]
    line = f"{result['suite']}: {key} = {result['paper'][key]:.4g}"
    if key in paper.PAPER_BY_KEY:
        line += f" (paper {paper.PAPER_BY_KEY[key].value:g})"
    for count in ("questions", "images", "prompts"):
        if count in result:
            line += f" on {result[count]} {count}"
            break
    if result.get("missing_predictions"):
        line += f"; {result['missing_predictions']} without prediction"
    return line
