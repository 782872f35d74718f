"""The offline benchmark scorers (janusflow_jax/eval) on hand-computed cases taken from the official scorers' rules,
and `launch.evaluate score` end to end. Pure Python: no model, no benchmark files (tiny ones are written in tmp)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from janusflow_jax.eval import dpg, fid, formats, geneval, mme, mmmu, multiple_choice, paper, pope, score, vqa

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- VQA (vqaEval.py, m4c_evaluator), GQA

@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matching, expected):
    # 10 annotators, `matching` of them wrote "2"; the others disagree among themselves.
    answers = ["2"] * matching + [f"other{i}" for i in range(10 - matching)]
    assert vqa.vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_accuracy_is_the_mean_of_ten_subsets():
    # 1 match: 9 subsets keep it (1/3 each), 1 drops it (0) -> 0.3, not min(1, 1/3).
    answers = ["2"] + ["x"] * 9
    by_hand = sum(min(1, sum(a == "2" for j, a in enumerate(answers) if j != i) / 3) for i in range(10)) / 10
    assert by_hand == pytest.approx(0.3)
    assert vqa.vqa_accuracy("2", answers) == pytest.approx(by_hand)


@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"), ("a dog", "dog"), ("The Dog", "dog"), ("dont", "don't"), ("1,000", "1000"), ("red,blue", "red blue"),
    ("dog.", "dog"), ("2.5", "2.5"), ("yes!", "yes"), ("black and white", "black and white"), ("none", "0"),
])
def test_vqa_normalisation(raw, normalised):
    assert vqa.normalize_answer(raw) == normalised


def test_vqa_normalises_only_when_annotators_disagree():
    # vqaEval.py's quirk: ten identical answers are compared raw.
    assert vqa.vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa.vqa_accuracy("two", ["2"] * 9 + ["3"]) == pytest.approx(1.0)
    assert vqa.vqa_accuracy(" A dog.", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    # ... so the VQAv2 suite first puts the answer through the EvalAI processor, as the submission converter does
    assert vqa.vqav2_accuracy("Yes", ["yes"] * 10) == pytest.approx(1.0)
    assert vqa.vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    # TextVQA's evaluator normalises always (and drops commas/question marks first).
    assert vqa.textvqa_accuracy("Two", ["2"] * 10) == pytest.approx(1.0)
    assert vqa.textvqa_accuracy("Coca-Cola?", ["coca cola"] * 2 + ["x"] * 8) == pytest.approx(0.6)


def test_gqa_exact_match():
    assert vqa.gqa_match("Yes.", "yes")
    assert vqa.gqa_match("no..", "no")
    assert vqa.gqa_match("  left ", "left")
    assert not vqa.gqa_match("yes", "no")
    assert not vqa.gqa_match("the left", "left")  # no article stripping in GQA


# ---------------------------------------------------------------- POPE

@pytest.mark.parametrize("text, parsed", [
    ("Yes, there is a dog.", "yes"), ("No, there is no dog.", "no"), ("There is not a dog in the image", "no"),
    ("Yes. No.", "yes"), ("I don't know", "yes"), ("Nope", "yes"), ("no", "no"), ("", "yes"),
])
def test_pope_parse(text, parsed):
    assert pope.parse_yes_no(text) == parsed


def test_pope_metrics_by_hand():
    preds = ["yes", "yes", "no", "yes", "no"]
    labels = ["yes", "no", "yes", "yes", "no"]  # TP 2, FP 1, FN 1, TN 1
    m = pope.binary_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["yes_ratio"] == pytest.approx(3 / 5)


def test_pope_mean_over_subsets_differs_from_pooled():
    items = [("random", "Yes", "yes"), ("random", "No", "no"),
             ("popular", "Yes", "yes"), ("popular", "Yes", "no"), ("popular", "No", "yes"), ("popular", "No", "no")]
    result = pope.score_pope(items)
    assert result["subsets"]["random"]["f1"] == pytest.approx(1.0)
    assert result["subsets"]["popular"]["f1"] == pytest.approx(0.5)
    assert result["f1_mean_over_subsets"] == pytest.approx(0.75)
    assert result["pooled"]["f1"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- MME

@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("No, it is not.", "no"), ("The answer is yes", "other"), ("not sure", "no"),
    ("yesterday", "yes"), ("", "other"),
])
def test_mme_parse(text, parsed):
    assert mme.parse_pred_ans(text) == parsed


def test_mme_acc_plus_and_sums():
    items = [
        ("existence", "img1", "Yes", "Yes"), ("existence", "img1", "No", "No"),     # both right
        ("existence", "img2", "Yes", "Yes"), ("existence", "img2", "yes", "No"),    # one right
        ("code_reasoning", "img3", "No", "Yes"), ("code_reasoning", "img3", "maybe", "No"),  # none right
    ]
    result = mme.score_mme(items)
    existence = result["subtasks"]["existence"]
    assert existence["acc"] == pytest.approx(75.0)
    assert existence["acc_plus"] == pytest.approx(50.0)
    assert existence["score"] == pytest.approx(125.0)
    assert result["perception"] == pytest.approx(125.0)
    assert result["cognition"] == pytest.approx(0.0)
    assert result["subtasks"]["code_reasoning"]["other_answers"] == 1


def test_mme_pairs_consecutive_rows_without_image_path():
    rows = [{"index": str(i), "category": "count", "answer": a} for i, a in enumerate(["Yes", "No", "Yes", "No"])]
    records = [{"index": i, "prediction": p} for i, p in enumerate(["Yes", "No", "No", "No"])]
    result = score.score_mme_suite(rows, records)
    assert result["subtasks"]["count"]["acc_plus"] == pytest.approx(50.0)  # pair (0,1) right, pair (2,3) not
    assert result["score"] == pytest.approx(75.0 + 50.0)


# ---------------------------------------------------------------- multiple choice (VLMEvalKit can_infer)

CHOICES = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("prediction, letter", [
    ("A", "A"), ("B.", "B"), ("(C)", "C"), ("Answer: D", "D"), ("The answer is B", "B"), ("dog", "B"),
    ("It is a dog", "B"), ("A or B", "Z"), ("cat and dog", "Z"), ("I'm sorry, but without the image provided", "Z"),
    ("Z", "Z"), ("", "Z"), ("**C**", "C"),
])
def test_option_extraction(prediction, letter):
    assert multiple_choice.extract_option(prediction, CHOICES) == letter


def _mc_row(index, answer, category="cat1"):
    return {"index": str(index), "question": "q", "A": "cat", "B": "dog", "C": "", "D": "", "answer": answer,
            "category": category, "l2-category": "l2"}


def test_empty_option_cells_are_not_options():
    # "C" is a word of the answer but C is empty in this row, so only A counts.
    assert multiple_choice.extract_option("C or A", formats.present_options(_mc_row(1, "A"))) == "A"


def test_circular_evaluation():
    rows = [_mc_row(1, "A", "x"), _mc_row(1_000_001, "B"), _mc_row(2, "A", "y"), _mc_row(1_000_002, "B")]
    preds = ["A", "B", "A", "A"]  # question 1 right in both rotations, question 2 wrong in its rotation
    items = [(r, p, r["answer"]) for r, p in zip(rows, preds)]
    plain = multiple_choice.score_multiple_choice(items)
    circular = multiple_choice.score_multiple_choice(items, circular=True)
    assert plain["accuracy"] == pytest.approx(3 / 4)
    assert circular["accuracy"] == pytest.approx(1 / 2)
    assert circular["questions"] == 2
    assert circular["category"] == {"x": 1.0, "y": 0.0}  # from each group's main row


# ---------------------------------------------------------------- MMMU (eval_utils.py)

OPTIONS = {"A": "blue whale", "B": "shark", "C": "tuna", "D": "octopus"}


@pytest.mark.parametrize("response, letter", [
    ("(B)", "B"), ("The answer is C.", "C"), ("(A) is wrong, (B) is right", "B"), ("B", "B"),
    ("I think the largest animal in this picture is the blue whale", "A"),
    ("A shark, not a tuna: the answer is D", "D"),
])
def test_mmmu_multi_choice_parser(response, letter):
    assert mmmu.parse_multi_choice_response(response, list(OPTIONS), OPTIONS, random.Random(0)) == letter


def test_mmmu_random_fallback_is_seeded():
    choices = list(OPTIONS)
    draws = [mmmu.parse_multi_choice_response("hmm", choices, OPTIONS, random.Random(seed)) for seed in range(20)]
    assert draws == [random.Random(seed).choice(choices) for seed in range(20)]
    assert len(set(draws)) > 1  # the draw really depends on the seed
    items = [("Art", "multiple-choice", "A", OPTIONS, "no idea")] * 30
    assert mmmu.score_mmmu(items, seed=3) == mmmu.score_mmmu(items, seed=3)


@pytest.mark.parametrize("gold, response, right", [
    ("1000", "The answer is 1,000.", True),
    ("3.14", "so x = 3.14159", True),
    ("Paris", "The capital is Paris", True),
    ("5", "the answer is 6", False),
    (["24", "twenty-four"], "Therefore the total is 24", True),
    ("0.5", "It is 1/2", False),
])
def test_mmmu_open_answers(gold, response, right):
    assert mmmu.eval_open(gold, mmmu.parse_open_response(response)) is right


def test_mmmu_number_extraction():
    # the official's three patterns overlap: the plain one also finds "234" (after the comma) and "3" (the exponent)
    assert mmmu.extract_numbers("1,234 and 5e3 and -2.5") == ["1,234", "5e3", "234", "3", "-2.5"]
    assert mmmu.normalize_str("1,234.567") == [1234.57]
    assert mmmu.normalize_str("B") == [" b", "b "]


# ---------------------------------------------------------------- GenEval (evaluate_images.py, summary_scores.py)

@pytest.mark.parametrize("box_a, box_b, relations", [
    ([0, 0, 10, 10], [100, 0, 110, 10], {"left of"}),
    ([100, 0, 110, 10], [0, 0, 10, 10], {"right of"}),
    ([0, 0, 100, 100], [5, 0, 105, 100], set()),  # offset 5 < margin 0.1 * (100 + 100)
    ([0, 0, 0, 0], [10, 10, 10, 10], {"left of", "above"}),  # dx = dy = -0.707
    ([0, 0, 0, 0], [10, 3, 10, 3], {"left of"}),  # dy = -0.29 is within +-0.5
    ([0, 50, 10, 60], [0, 0, 10, 10], {"below"}),  # y grows downwards
])
def test_geneval_relative_position(box_a, box_b, relations):
    assert geneval.relative_position(box_a, box_b) == relations


POSITION_PROMPT = {"tag": "position", "prompt": "a photo of a cat right of a dog",
                   "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["right of", 0]}]}


def test_geneval_position_clause():
    dog = {"label": "dog", "box": [0, 0, 10, 10], "score": 0.9}
    cat = {"label": "cat", "box": [100, 0, 110, 10], "score": 0.8}
    assert geneval.evaluate_image([dog, cat], POSITION_PROMPT)["correct"]
    swapped = [dict(dog, box=cat["box"]), dict(cat, box=dog["box"])]
    assert not geneval.evaluate_image(swapped, POSITION_PROMPT)["correct"]
    weak_cat = dict(cat, score=0.2)  # below the 0.3 threshold: no cat
    assert not geneval.evaluate_image([dog, weak_cat], POSITION_PROMPT)["correct"]


def test_geneval_counting_and_colours():
    counting = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}
    dogs = [{"label": "dog", "box": [i, 0, i + 5, 5], "score": s} for i, s in enumerate([0.95, 0.92, 0.5])]
    assert geneval.evaluate_image(dogs, counting)["correct"]  # the 0.5 dog is under the counting threshold 0.9
    assert not geneval.evaluate_image(dogs[:2] + [dict(dogs[2], score=0.91)], counting)["correct"]
    colour = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                               {"class": "bench", "count": 1, "color": "blue"}]}
    car = {"label": "car", "box": [0, 0, 5, 5], "score": 0.9, "color": "red"}
    bench = {"label": "bench", "box": [9, 0, 15, 5], "score": 0.9, "color": "blue"}
    assert geneval.evaluate_image([car, bench], colour)["correct"]
    assert not geneval.evaluate_image([car, dict(bench, color="red")], colour)["correct"]
    # colour is checked on the most confident car only
    assert not geneval.evaluate_image([dict(car, color="green", score=0.95), car, bench], colour)["correct"]


def test_geneval_overall_is_the_mean_of_tag_means():
    results = [{"tag": "single_object", "correct": True, "metadata": "p1"},
               {"tag": "single_object", "correct": True, "metadata": "p1"}] + \
              [{"tag": "counting", "correct": c, "metadata": "p2"} for c in (True, False, False, False)]
    summary = geneval.summary_scores(results)
    assert summary["tags"] == {"single_object": 1.0, "counting": 0.25}
    assert summary["overall"] == pytest.approx(0.625)
    assert summary["correct_images"] == pytest.approx(0.5)  # not what GenEval reports as the score
    assert summary["correct_prompts"] == pytest.approx(1.0)


def test_geneval_suite_from_detections_and_from_results():
    metadata = [POSITION_PROMPT, {"tag": "single_object", "include": [{"class": "bench", "count": 1}]},
                {"tag": "single_object", "include": [{"class": "cup", "count": 1}]}]  # no image for this one
    dog = {"label": "dog", "box": [0, 0, 10, 10], "score": 0.9}
    cat = {"label": "cat", "box": [100, 0, 110, 10], "score": 0.8}
    records = [{"index": 0, "detections": [dog, cat]}, {"index": 0, "detections": [dog]},
               {"index": 1, "detections": [{"label": "bench", "box": [0, 0, 9, 9], "score": 0.4}]}]
    result = score.score_geneval_suite(metadata, records)
    assert result["paper"]["geneval.position"] == pytest.approx(0.5)
    assert result["paper"]["geneval.single_object"] == pytest.approx(1.0)
    assert result["score"] == pytest.approx(0.75)
    assert result["missing_predictions"] == 1
    official = [{"tag": "position", "correct": True, "metadata": "m"}, {"tag": "colors", "correct": False,
                                                                          "metadata": "n"}]
    assert score.score_geneval_suite(None, official)["score"] == pytest.approx(0.5)
    with pytest.raises(formats.UnknownIndexError):
        score.score_geneval_suite(metadata, [{"index": 5, "detections": []}])


# ---------------------------------------------------------------- DPG-Bench (compute_dpg_bench.py)

def test_dpg_parent_zeroing_is_in_place():
    deps = {1: [0], 2: [1], 3: [2]}
    score_, raw, zeroed = dpg.score_image({1: "no", 2: "yes", 3: "yes"}, deps)
    assert raw == {1: 0.0, 2: 1.0, 3: 1.0}
    assert zeroed == {1: 0.0, 2: 0, 3: 0}  # 3 is zeroed through 2, itself zeroed a step earlier
    assert score_ == 0.0
    assert dpg.score_image({1: "yes", 2: "Yes", 3: "yes"}, deps)[0] == pytest.approx(1 / 3)  # "Yes" != "yes"


DPG_HEADER = ["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed",
              "tuple", "question_natural_language"]
DPG_ROWS = [
    ["p0", "t0", "", "1", "0", "entity", "whole", "entity - whole (cat)", "Is there a cat?"],
    ["p0", "t0", "", "2", "1", "attribute", "color", "attribute - color (cat, black)", "Is the cat black?"],
    ["p1", "t1", "", "1", "0", "entity", "whole", "entity - whole (dog)", "Is there a dog?"],
    ["p1", "t1", "", "2", "1", "attribute", "color", "attribute - color (dog, brown)", "Is the dog brown?"],
    ["p1", "t1", "", "3", "1", "relation", "spatial", "relation - spatial (dog, sofa, on)", "Is the dog on a sofa?"],
    ["p1", "t1", "", "4", "0", "global", "", "global - (photo)", "Is this a photo?"],
]


def test_dpg_prompt_and_category_scores():
    rows = [dict(zip(DPG_HEADER, r)) for r in DPG_ROWS]
    records = [
        {"item_id": "p1", "crop": 0, "answers": {"1": "no", "2": "yes", "3": "yes", "4": "yes"}},  # 2, 3 zeroed: 1/4
        {"item_id": "p1", "crop": 1, "answers": {"1": "yes", "2": "no", "3": "yes", "4": "Yes"}},  # 2/4
        {"item_id": "p0", "crop": 0, "answers": {"1": "yes", "2": "yes"}},
    ]
    result = score.score_dpg_suite(rows, records)
    assert result["overall"] == pytest.approx(100 * (0.25 + 0.5) / 2)
    # p0 lost its first question to the skipped first csv row; its question 2's parent is missing: dropped.
    assert list(result["failed_prompts"]) == ["p0"]
    assert result["prompts"] == 1
    # categories: the last crop's raw answers
    assert result["l1_categories"] == {"attribute": 0.0, "entity": 100.0, "global": 0.0, "relation": 100.0}
    assert result["paper"]["dpg.entity"] == pytest.approx(100.0)
    without_quirk = score.score_dpg_suite(rows, records, skip_first_row=False)
    assert without_quirk["failed_prompts"] == {}
    assert without_quirk["overall"] == pytest.approx(100 * (0.375 + 1.0) / 2)
    with pytest.raises(formats.InputError, match="'crop' must be a number"):
        score.score_dpg_suite(rows, [{"item_id": "p1", "crop": "first", "answers": {"1": "yes"}}])


# ---------------------------------------------------------------- Fréchet distance (pytorch-fid)

@pytest.mark.parametrize("use_scipy", [True, False])
def test_frechet_distance_closed_forms(use_scipy):
    if use_scipy:
        pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + np.eye(6)
    mu = rng.normal(size=6)
    assert fid.frechet_distance(mu, sigma, mu, sigma, use_scipy=use_scipy) == pytest.approx(0.0, abs=1e-6)
    # 1-D: (mu1 - mu2)^2 + s1 + s2 - 2 sqrt(s1 s2) = 4 + 4 + 9 - 12 = 5
    assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]], use_scipy=use_scipy) == pytest.approx(5.0)
    # diagonal: sum (mu diff)^2 + sum (sqrt s1 - sqrt s2)^2
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = 1.0 + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert fid.frechet_distance(np.zeros(3), np.diag(s1), np.array([1.0, 0, 0]), np.diag(s2),
                                use_scipy=use_scipy) == pytest.approx(expected)
    with pytest.raises(ValueError, match="Imaginary component"):  # not a covariance: sqrt(-1) on the diagonal
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]), use_scipy=use_scipy)
    # a defective (nilpotent) product has no square root: the eps-offset retry runs, then the imaginary check fails
    with pytest.warns(UserWarning, match="singular product"), pytest.raises(ValueError, match="Imaginary component 15"):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), [[0.0, 1.0], [1.0, 0.0]],
                             use_scipy=use_scipy)


def test_frechet_distance_numpy_matches_scipy_and_features():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) * 0.5
    stats = (*fid.gaussian_stats(x), *fid.gaussian_stats(y))
    assert fid.frechet_distance(*stats, use_scipy=False) == pytest.approx(fid.frechet_distance(*stats, use_scipy=True),
                                                                         rel=1e-8)
    # a shift by c with the covariance unchanged adds |c|^2 = 9
    assert fid.fid_from_features(x, x + np.array([1.0, 2.0, 2.0, 0, 0, 0, 0, 0])) == pytest.approx(9.0)


# ---------------------------------------------------------------- formats, registry, paper table

def test_tsv_with_a_huge_image_cell(tmp_path):
    path = tmp_path / "bench.tsv"
    path.write_text("index\tquestion\tanswer\timage\n7\tq?\tB\t" + "x" * 300_000 + "\n", encoding="utf-8")
    rows = formats.read_rows(path)
    assert rows[0]["index"] == "7" and len(rows[0]["image"]) == 300_000
    assert formats.index_key(7.0) == formats.index_key("7") == "7"


def test_bad_inputs_are_input_errors(tmp_path):
    bench = tmp_path / "pope.tsv"
    bench.write_text("index\tquestion\tcategory\n1\tIs there a dog?\trandom\n")
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"index": 1, "prediction": "yes"}\n')
    with pytest.raises(formats.MissingColumnError, match="'answer'"):
        score.score_files("pope", bench, preds)
    bench.write_text("index\tquestion\tanswer\tcategory\n1\tIs there a dog?\tyes\trandom\n")
    preds.write_text('{"index": 1, "prediction": "yes"}\n{"index": 2, "prediction": "no"}\n')
    with pytest.raises(formats.UnknownIndexError, match="index 2"):
        score.score_files("pope", bench, preds)
    with pytest.raises(formats.InputError, match="unknown suite"):
        score.score_files("imagenet", bench, preds)
    with pytest.raises(formats.InputError, match="circular"):
        score.score_files("pope", bench, preds, circular=True)
    preds.write_text('{"index": 1, "prediction": "yes"}\nnot json\n')
    with pytest.raises(formats.InputError, match=":2:"):
        score.score_files("pope", bench, preds)


def test_missing_predictions_count_as_wrong_unless_only_predicted():
    rows = [{"index": str(i), "answer": "yes", "category": "random"} for i in range(4)]
    records = [{"index": 0, "prediction": "Yes"}, {"index": 1, "prediction": "Yes"}]
    assert score.score_gqa_suite(rows, records)["score"] == pytest.approx(50.0)
    only = score.score_gqa_suite(rows, records, only_predicted=True)
    assert only["score"] == pytest.approx(100.0) and only["missing_predictions"] == 2


def test_registry_and_paper_table():
    assert set(score.SUITES) >= {"pope", "mme", "mmbench", "seed", "mmmu", "gqa", "vqav2", "textvqa", "geneval", "dpg"}
    assert all((key in paper.PAPER_BY_KEY) != (suite in score.NOT_IN_PAPER) for suite, key in score.HEADLINE.items())
    table = paper.render_table({"pope": 87.04, "geneval.overall": 0.6349})
    assert "| JanusFlow-1.3B (paper) | 88.0 | 1333.1 | 74.9 |" in table
    assert "| This checkpoint | 87.0 | — |" in table
    assert "| Δ | −1.0 |" in table
    assert "| This checkpoint | — | — | — | — | — | — | 0.63 |" in table  # GenEval overall, its last column
    assert "88.10" in table  # the paper's DPG "Other" as printed


# ---------------------------------------------------------------- the CLI, end to end

def _run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "launch.evaluate", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_score_end_to_end(tmp_path):
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\tl2-category\timage\n"
    lines = [f"1\tWhich animal?\t\tcat\tdog\t\t\tA\tanimals\tperception\t{'Zm9v' * 50000}",
             "1000001\tWhich animal?\t\tdog\tcat\t\t\tB\tanimals\tperception\t1",
             "2\tWhich colour?\t\tred\tblue\tgreen\t\tC\tcolours\tperception\t2",
             "1000002\tWhich colour?\t\tgreen\tred\tblue\t\tA\tcolours\tperception\t2"]
    (tmp_path / "bench.tsv").write_text(header + "\n".join(lines) + "\n")
    preds = ["The answer is A.", "(B)", "green", "C"]  # the last rotation is wrong
    (tmp_path / "preds.jsonl").write_text("".join(json.dumps({"index": i, "prediction": p}) + "\n"
                                                  for i, p in zip([1, 1000001, 2, 1000002], preds)))
    done = _run_cli(tmp_path, "score", "--suite=mmbench", "--data=bench.tsv", "--predictions=preds.jsonl",
                    "--circular")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1 and done.stdout.startswith("mmbench: mmbench = 50")
    result = json.loads((tmp_path / "preds.scores.json").read_text())
    assert result["score"] == pytest.approx(50.0)
    assert result["protocol"]["circular"] is True
    assert result["category"] == {"animals": 1.0, "colours": 0.0}

    bad = _run_cli(tmp_path, "score", "--suite=mmbench", "--data=missing.tsv", "--predictions=preds.jsonl")
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [f"error: no such file: {tmp_path / 'missing.tsv'}"]
