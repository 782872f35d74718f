"""The scoring protocols against the official code, case by case and on random answers.

Hand-built cases pin the official verdicts (each from the official rule as transcribed here): an MMBench rotation
pair, an option pandas reads as missing, an empty answer, the matcher versions, an unparsable MMMU answer under seed
42, an MMMU_DEV_VAL predictions file, tied GenEval boxes, ChartQA's relaxed accuracy, DPG-Bench's detail file. The
property tests run random answers through our scorers and through transcriptions of the official rules:
  * VLMEvalKit `vlmeval/utils/matching_util.py` can_infer_option / can_infer_text / can_infer at 23d51c96 (the
    version before PR #1175), c3371551 (PR #1175) and a67ace50 (PR #1552; unchanged at e8e78f05);
  * VQA API `PythonEvaluationTools/vqaEvaluation/vqaEval.py` at a013f00 (evaluate, processPunctuation,
    processDigitArticle; its tables are vqa.py's, checked equal to that file's).
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import string
import subprocess
import sys

import pytest
from absl import flags

from janusflow_jax.eval import (chartqa, dpg, formats, geneval, legacy_argsort, mmmu, multiple_choice, prompts, score,
                               vqa)


# ------------------------------------------------------------ VLMEvalKit's can_infer, transcribed per version
def official_can_infer_option(answer, choices, version):
    if "Failed to obtain answer via API" in answer:
        return False
    reject_to_answer = ["Sorry, I can't help with images of people yet.", "I can't process this file.",
                        "I'm sorry, but without the image provided", "Cannot determine the answer"]
    for err in reject_to_answer:
        if err in answer:
            return "Z"

    def count_choice(splits, choices, prefix="", suffix=""):
        cnt = 0
        for c in choices:
            if prefix + c + suffix in splits:
                cnt += 1
        return cnt

    answer_mod = copy.copy(answer)
    for c in ".()[],:;!*#{}":
        answer_mod = answer_mod.replace(c, " ")
    splits = [x.strip() for x in answer_mod.split()]
    count = count_choice(splits, choices)
    if count == 1:
        for ch in choices:
            # (the VERBOSE-only "A might be a quantifier" guard is off: VERBOSE unset)
            if version == "pre-pr1175":
                if ch in splits:
                    return ch
            elif ch in splits and splits.index(ch) > (len(splits) - 5):
                return ch
    elif count == 0 and count_choice(splits, {"Z", ""}) == 1:
        return "Z"
    if version == "pr1552":
        match = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**").search(answer or "")
        if match and match.group(1).upper() in choices:
            return match.group(1).upper()
    return False


def official_can_infer_text(answer, choices, version):
    answer = answer.lower()
    if version != "pre-pr1175" and len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    for k in choices:
        assert k in string.ascii_uppercase
        choices[k] = str(choices[k]).lower()
    cands = []
    for k in choices:
        if choices[k] in answer:
            cands.append(k)
    if len(cands) == 1:
        return cands[0]
    return False


def official_extract(answer, choices, version):
    """can_infer, then extract_answer_from_item's exact-matching fallback "Z"."""
    answer = str(answer)
    choices = dict(choices)
    copt = official_can_infer_option(answer, choices, version)
    return (copt if copt else official_can_infer_text(answer, choices, version)) or "Z"


OPTION_TEXTS = ["cat", "dog", "a cat", "cat food", "an", "A", "B", "red", "Red car", "two", "2", "the dog"]
PIECES = (list("ABCDEFGHZ") + ["a", "b", "z", "answer", "The", "answer is", "Answer:", "correct answer is", "option",
          "is", "the", "not", "or", "and", "**", "nan", "none", "I think", "because", "dog", "cat", "food", "red",
          "2", "two"] + list(".()[],:;!*#{}\n") + ["Cannot determine the answer", "Failed to obtain answer via API"])


def _random_case(rng):
    letters = "ABCDEFGH"[:rng.randint(2, 5)]
    choices = {letter: rng.choice(OPTION_TEXTS) for letter in letters}
    pieces = [rng.choice(PIECES + OPTION_TEXTS) for _ in range(rng.randint(0, 12))]
    answer = ""
    for piece in pieces:
        answer += rng.choice(["", " ", " ", "  ", "\n"]) + piece
    return answer, choices


@pytest.mark.parametrize("version", multiple_choice.MATCHERS)
def test_option_extraction_equals_vlmevalkit_on_random_answers(version):
    rng = random.Random(f"can_infer {version}")
    verdicts = set()
    for _ in range(4000):
        answer, choices = _random_case(rng)
        ours = multiple_choice.extract_option(answer, choices, version)
        assert ours == official_extract(answer, choices, version), (answer, choices)
        verdicts.add(ours)
    assert verdicts >= {"A", "B", "C", "Z"}  # the random answers reach every kind of verdict


@pytest.mark.parametrize("answer, choices, verdicts", [
    # PR #1175's last-4-words guard: the letter is word 3 of 10 (PR #1552 reads "answer is A" again)
    ("The answer is A because a cat sits on the mat", {"A": "cat", "B": "dog"}, ("A", "Z", "A")),
    ("A, since a cat sits on the mat", {"A": "cat", "B": "dog"}, ("A", "Z", "Z")),
    # PR #1175's length guard: a long answer naming one option's text
    ("I am fairly sure that the picture shows a dog", {"A": "cat", "B": "dog"}, ("B", "Z", "Z")),
    # PR #1552: "the answer is B" with several letters written
    ("the answer is B, not C", {"A": "x", "B": "y", "C": "z"}, ("Z", "Z", "B")),
    ("(C)", {"A": "cat", "B": "dog", "C": "bird"}, ("C", "C", "C")),
])
def test_matcher_versions(answer, choices, verdicts):
    for version, verdict in zip(multiple_choice.MATCHERS, verdicts):
        assert multiple_choice.extract_option(answer, choices, version) == verdict
        assert official_extract(answer, choices, version) == verdict


# ------------------------------------------------------------ MMBench / SEED rows as VLMEvalKit reads them
def _mc_rows(*specs):
    return [{"index": str(i), "question": "q", "A": a, "B": b, "C": "", "D": "", "answer": gt, "category": "c",
             "l2-category": "l2"} for i, a, b, gt in specs]


def _preds(pairs):
    return [{"index": i, "prediction": p} for i, p in pairs]


def test_mmbench_is_circular_by_default():
    rows = _mc_rows((1, "cat", "dog", "A"), (1_000_001, "dog", "cat", "B"), (2, "red", "blue", "A"),
                    (1_000_002, "blue", "red", "B"))
    records = _preds([(1, "A"), (1_000_001, "B"), (2, "A"), (1_000_002, "A")])  # question 2 fails its rotation
    result = score.score_mmbench_suite(rows, records)
    assert result["score"] == pytest.approx(50.0) and result["questions"] == 2  # official: 1 of 2 questions
    assert result["protocol"]["circular"] is True and result["protocol"]["matcher"] == "pre-pr1175"
    plain = score.score_mmbench_suite(rows, records, circular=False)
    assert plain["score"] == pytest.approx(75.0) and plain["questions"] == 4  # every row its own question
    assert score.score_seed_suite(rows, records)["score"] == pytest.approx(75.0)  # SEED: not circular
    # a rotation whose main row has no prediction is left out, as mcq_circular_eval keys groups by main rows
    only = score.score_mmbench_suite(rows, records[1:], only_predicted=True)
    assert only["questions"] == 1 and only["rotations_without_main_row"] == 1 and only["score"] == 0.0


def test_options_pandas_reads_as_missing_and_empty_answers():
    # Option A is "None": pandas reads it as NaN, so only B is an option and "A" reads as nothing: wrong.
    rows = _mc_rows((1, "None", "two", "A"), (2, "NA", "two", "B"), (3, "cat", "dog", "A"), (4, "an", "cat", "A"),
                    (5, "cat", "dog", "A"))
    records = _preds([(1, "A"), (2, "B"), (3, ""), (4, ""), (5, "None")])
    result = score.score_seed_suite(rows, records)
    # 1: wrong (A is no option); 2: right; 3: "" -> "nan" -> nothing: wrong; 4: "nan" contains option A's text
    # "an": right; 5: the prediction "None" -> "nan": wrong.
    assert result["score"] == pytest.approx(40.0)
    assert result["unreadable_answers"] == 3
    assert formats.present_options(rows[0], na=formats.PANDAS_NA) == {"B": "two"}
    assert formats.present_options(rows[0]) == {"A": "None", "B": "two"}  # MMMU keeps its option texts
    assert multiple_choice.as_vlmevalkit_prediction("") == multiple_choice.as_vlmevalkit_prediction(None) == "nan"
    assert multiple_choice.as_vlmevalkit_prediction(" A") == " A"


# ------------------------------------------------------------ MMMU (eval_utils.py: random.seed(42))
def test_mmmu_unparsable_answer_uses_seed_42():
    options = {"A": "blue whale", "B": "shark", "C": "tuna", "D": "octopus"}
    random.seed(42)  # the official's draw: eval_utils.py seeds the global generator at import
    official = random.choice(list(options))
    assert official == "A"
    items = [("Biology", "multiple-choice", "A", options, "I cannot tell")]
    assert mmmu.score_mmmu(items)["accuracy"] == 1.0  # the default seed is 42: right, as officially
    assert mmmu.score_mmmu(items, seed=0)["accuracy"] == 0.0  # seed 0 draws D
    rows = [{"index": "1", "question": "q", "A": "blue whale", "B": "shark", "C": "tuna", "D": "octopus",
             "answer": "A", "category": "Biology"}]
    assert score.score_mmmu_suite(rows, _preds([(1, "I cannot tell")]))["score"] == 100.0


def test_mmmu_dev_val_predictions_leave_the_dev_rows_out():
    rows = [{"index": str(i), "question": "q", "A": "x", "B": "y", "answer": "A", "split": split,
             "category": "Art"} for i, split in [(1, "dev"), (2, "dev"), (3, "validation"), (4, "validation")]]
    records = _preds([(1, "A"), (2, "A"), (3, "A"), (4, "B")])  # as VLMEvalKit writes MMMU_DEV_VAL
    result = score.score_mmmu_suite(rows, records)
    assert result["score"] == 50.0 and result["questions"] == 2
    assert result["predictions_outside_split"] == 2
    with pytest.raises(formats.UnknownIndexError):  # a prediction of no row at all is still an error
        score.score_mmmu_suite(rows, records + _preds([(9, "A")]))


# ------------------------------------------------------------ GenEval's tie order (numpy 1.23.1's argsort)
def test_geneval_tied_boxes_in_numpy_1_23_order():
    # 17 dogs of one score: numpy 1.23's argsort(...)[::-1] takes dogs 16 and 7 first (a stable sort: 16 and 15).
    dogs = [{"label": "dog", "box": [400, 0, 410, 10] if i == 15 else [0, 0, 10, 10], "score": 0.5}
            for i in range(17)]
    cat = {"label": "cat", "box": [200, 0, 210, 10], "score": 0.9}
    metadata = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                               {"class": "dog", "count": 2, "position": ["left of", 0]}]}
    kept = geneval.select_objects(dogs + [cat], "position")
    assert [next(i for i, dog in enumerate(dogs) if dog is d) for d in kept["dog"][:2]] == [16, 7]
    assert geneval.evaluate_image(dogs + [cat], metadata)["correct"] is True  # official verdict with numpy 1.23
    assert legacy_argsort.argsort([0.5, 0.9, 0.5]) == [0, 2, 1]  # up to 16: insertion sort, ties in input order


def test_legacy_argsort_equals_numpys_generic_sort():
    """numpy's own introsort (its SIMD sorts switched off: 1.23's code path) on random tied scores."""
    values = [[round(random.Random(f"{n} {t}").choice([0.3, 0.5, 0.7, 0.9]), 1) for _ in range(n)]
              for n in (3, 16, 17, 18, 33, 64, 100, 257) for t in range(6)]
    values.append([float("nan"), 0.5, 0.5] * 10)
    code = ("import json, sys, numpy as np; print(json.dumps([np.argsort(np.asarray(v, np.float32)).tolist() "
            "for v in json.loads(sys.stdin.read())]))")
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4 AVX512_ICL AVX512_SPR AVX2 AVX512F AVX512_SKX")
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(values), env=env, capture_output=True,
                          text=True, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"numpy refused the feature mask here: {done.stderr.strip().splitlines()[-1]}")
    expected = json.loads(done.stdout)
    assert [legacy_argsort.argsort(v) for v in values] == expected


# ------------------------------------------------------------ ChartQA relaxed accuracy
@pytest.mark.parametrize("prediction, gold, vlmevalkit, pix2struct", [
    ("10.4", "10", 1.0, 1.0),
    ("10.52", "10", 1.0, 0.0),  # 4.9% of the prediction, 5.2% of the gold answer
    ("9.5", "10", 0.0, 1.0),  # 5.3% of the prediction, 5% of the gold answer
    ("0", "0", 1.0, 1.0),  # zero: exact match
    ("0.0", "0", 0.0, 0.0),
    ("0.5", "50%", 1.0, 1.0),
    ("Yes", "yes", 1.0, 1.0),
    (" yes", "yes", 1.0, 0.0),  # VLMEvalKit strips the prediction; pix2struct compares it as written
    (" 12 ", "12", 1.0, 1.0),  # float() itself ignores the spaces
    ("", "nan", 0.0, 0.0),  # "" is "nan" in VLMEvalKit's sheet, float("nan") compares false with everything
])
def test_chartqa_relaxed_accuracy(prediction, gold, vlmevalkit, pix2struct):
    assert chartqa.relaxed_accuracy(prediction, [gold], "vlmevalkit-pre1204") == vlmevalkit
    assert chartqa.relaxed_accuracy(prediction, [gold], "pix2struct") == pix2struct


def test_chartqa_suite():
    # asked as VLMEvalKit's ImageVQADataset asks (no Janus custom prompt): the question right after the image
    assert prompts.PROTOCOLS["chartqa"].content({"question": "How many?"}, 1, "<i>") == (
        "<i>How many?\nAnswer the question using a single word or phrase.")
    rows = [{"index": "1", "question": "q", "answer": "10", "category": "human"},
            {"index": "2", "question": "q", "answer": "['Yes', 'yes']", "category": "augmented"},
            {"index": "3", "question": "q", "answer": "5", "category": "augmented"}]
    result = score.score_chartqa_suite(rows, _preds([(1, "10.2"), (2, "yes"), (3, "7")]))
    assert result["score"] == pytest.approx(200 / 3) and result["category"] == {"augmented": 0.5, "human": 1.0}
    assert result["protocol"]["rule"] == "vlmevalkit-pre1204"
    assert "chartqa" in result["paper"]


# ------------------------------------------------------------ DPG-Bench <res>_detail.txt
def test_dpg_detail_file_to_answers(gcs, tmp_path, monkeypatch, capsys):
    header = ["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed",
              "tuple", "question_natural_language"]
    rows = [dict(zip(header, r)) for r in [
        ["skipped", "t", "k", "1", "0", "entity", "whole", "entity - whole (x)", "Is there an x?"],
        ["cats", "t", "k", "1", "0", "entity", "whole", "entity - whole (cat)", "Is there a cat?"],
        ["cats", "t", "k", "2", "1", "attribute", "color", "attribute - color (cat, red)", "Is the cat red, or not?"],
        ["cats", "t", "k", "3", "1", "entity", "whole", "entity - whole (cat)", "Is there a cat?"],
    ]]
    questions = dpg.prepare_dpg_data(rows)
    lines = []
    answers = {0: ["yes", "no", "yes"], 1: ["no", "yes", "yes"], 2: ["yes", "yes", "yes"], 3: ["yes", "yes", "no"]}
    crops = [(0, 0, 512, 512), (512, 0, 1024, 512), (0, 512, 512, 1024), (512, 512, 1024, 1024)]
    for crop, (x0, y0, x1, y1) in enumerate(crops):  # as compute_dpg_one_sample writes them
        for (qid, question), answer in zip(questions["cats"]["qid2question"].items(), answers[crop]):
            lines.append(f"/imgs/cats.png, ({x0}, {y0}, {x1}, {y1}), {question}, {answer}")
    records = dpg.answers_from_detail(lines, questions)
    assert records == [{"item_id": "cats", "crop": c, "answers": {"1": a[0], "2": a[1], "3": a[2]}}
                       for c, a in answers.items()]
    direct = [{"item_id": "cats", "crop": c, "answers": {1: a[0], 2: a[1], 3: a[2]}} for c, a in answers.items()]
    assert score.score_dpg_suite(rows, records)["score"] == score.score_dpg_suite(rows, direct)["score"]
    with pytest.raises(ValueError, match="line 1"):
        dpg.answers_from_detail(["/imgs/cats.png, (0, 0, 512, 512), Is there a dog?, yes"], questions)
    with pytest.raises(ValueError, match="line 4"):
        dpg.answers_from_detail(lines[:3] + lines[:1], questions)

    # the CLI: dpg_bench.csv and the detail file in, the answers file beside it out; all on gs://, nothing local
    from etils import epath

    monkeypatch.chdir(tmp_path)
    csv = epath.Path(gcs, "dpg_answers", "dpg_bench.csv")
    csv.write_text(",".join(header) + "\n" + "".join(",".join(f'"{v}"' for v in r.values()) + "\n" for r in rows))
    detail = epath.Path(gcs, "dpg_answers", "dpg-bench_x_results_detail.txt")
    detail.write_text("\n".join(lines) + "\n")
    assert _run_cli("dpg_answers", f"--data={csv}", f"--predictions={detail}") == 0
    written = epath.Path(gcs, "dpg_answers", "dpg-bench_x_results_answers.jsonl")
    assert [json.loads(line) for line in written.read_text().splitlines()] == records
    assert f"dpg: 4 images of 1 prompts -> {written}" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    detail.write_text("not a detail line\n")
    assert _run_cli("dpg_answers", f"--data={csv}", f"--predictions={detail}") == 1
    assert capsys.readouterr().err.strip() == (f"error: {detail}: line 1: not 'image_path, (x0, y0, x1, y1), "
                                               f"question, answer'")


# ------------------------------------------------------------ VQA normalisation: vqaEval.py transcribed
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _process_punctuation(in_text):
    out_text = in_text
    for p in _PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(re.compile(r"(\d)(\,)(\d)"), in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return re.compile(r"(?!<=\d)(\.)(?!\d)").sub("", out_text, re.UNICODE)


def _process_digit_article(in_text):
    manual_map = dict(vqa.MANUAL_MAP)
    out_text = []
    for word in in_text.lower().split():
        word = manual_map.setdefault(word, word)
        if word not in ["a", "an", "the"]:
            out_text.append(word)
    for word_id, word in enumerate(out_text):
        if word in vqa.CONTRACTIONS:
            out_text[word_id] = vqa.CONTRACTIONS[word]
    return " ".join(out_text)


def official_vqa_accuracy(res_ans, answers):
    """vqaEval.py's evaluate for one question (answer dicts distinct by answer_id, as the annotations' are)."""
    gts = [{"answer": a, "answer_id": i} for i, a in enumerate(answers)]
    for ans_dic in gts:
        ans_dic["answer"] = ans_dic["answer"].replace("\n", " ").replace("\t", " ").strip()
    res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
    gt_acc = []
    if len(set(a["answer"] for a in gts)) > 1:
        for ans_dic in gts:
            ans_dic["answer"] = _process_digit_article(_process_punctuation(ans_dic["answer"]))
        res_ans = _process_digit_article(_process_punctuation(res_ans))
    for gt_ans_datum in gts:
        other = [item for item in gts if item != gt_ans_datum]
        matching = [item for item in other if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching)) / 3))
    return float(sum(gt_acc)) / len(gt_acc)


VQA_PIECES = (["yes", "Yes", "no", "two", "2", "Two", "a", "the", "an", "dog", "dogs", "red", "dont", "don't",
               "isnt", "1,000", "1000", "2.5", "3.", "none", "zero", "0", "ten", "10", "somebody'd", "oclock"]
              + list(";/[]\"{}()=+\\_-><@`,?!.:'") + [" ", "  ", "\n", "\t"])


def test_vqa_accuracy_equals_vqaeval_on_random_answers():
    rng = random.Random("vqaEval")
    values = set()
    for _ in range(3000):
        def text():
            return "".join(rng.choice(VQA_PIECES) + rng.choice(["", " "]) for _ in range(rng.randint(0, 4)))

        pool = [text() for _ in range(rng.randint(1, 3))]
        answers = [rng.choice(pool) for _ in range(10)]
        prediction = rng.choice(pool + [text()])
        ours = vqa.vqa_accuracy(prediction, answers)
        assert ours == pytest.approx(official_vqa_accuracy(prediction, answers), abs=1e-12), (prediction, answers)
        values.add(round(ours, 2))
    assert len(values) >= 5  # partial credit of several sizes was reached


def test_vqa_tables_are_vqaevals():
    assert vqa.CONTRACTIONS["somebody'd"] == "somebodyd" and vqa.CONTRACTIONS["dont"] == "don't"
    assert len(vqa.CONTRACTIONS) == 120 and vqa.MANUAL_MAP["none"] == "0"


# ------------------------------------------------------------ the protocol in scores files and the table
def _run_cli(*args) -> int:
    from launch import evaluate as evaluate_cli

    flags.FLAGS.unparse_flags()
    try:
        return evaluate_cli.main(flags.FLAGS(["evaluate", *args]))
    finally:
        flags.FLAGS.unparse_flags()


def test_scores_record_the_protocol_and_table_marks_non_defaults(tmp_path, capsys):
    bench = tmp_path / "mmbench.tsv"
    bench.write_text("index\tquestion\tA\tB\tanswer\tcategory\n1\tq\tcat\tdog\tA\tc\n1000001\tq\tdog\tcat\tB\tc\n")
    (tmp_path / "p.jsonl").write_text('{"index": 1, "prediction": "A"}\n{"index": 1000001, "prediction": "A"}\n')
    assert _run_cli("score", "--suite=mmbench", f"--data={bench}", f"--predictions={tmp_path / 'p.jsonl'}",
                    f"--out={tmp_path / 'default.json'}") == 0
    assert _run_cli("score", "--suite=mmbench", f"--data={bench}", f"--predictions={tmp_path / 'p.jsonl'}",
                    "--nocircular", "--matcher=pr1175", f"--out={tmp_path / 'other.json'}") == 0
    default = json.loads((tmp_path / "default.json").read_text())
    other = json.loads((tmp_path / "other.json").read_text())
    assert default["score"] == 0.0 and default["protocol"]["non_default"] == {}
    assert other["score"] == 50.0 and other["protocol"]["non_default"] == {"circular": False, "matcher": "pr1175"}
    capsys.readouterr()
    assert _run_cli("table", f"--scores={tmp_path / 'default.json'}") == 0
    assert "*" not in capsys.readouterr().out.split("Protocol")[0]
    assert _run_cli("table", f"--scores={tmp_path / 'other.json'}") == 0
    table = capsys.readouterr().out
    assert "| 50.0* |" in table and "non-default protocol option" in table
    assert "NON-DEFAULT: circular: False; matcher: pr1175" in table
    assert _run_cli("score", "--suite=mmbench", f"--data={bench}", f"--predictions={tmp_path / 'p.jsonl'}",
                    "--matcher=newest") == 1
    assert "error: unknown matcher 'newest'" in capsys.readouterr().err
