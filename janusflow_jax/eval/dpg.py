"""DPG-Bench: per-prompt scores from the judge's yes/no answers, with parent zeroing, and category scores.

Follows DPG-Bench's `compute_dpg_bench.py` (TencentQQGYLab/ELLA at 025f650, dpg_bench/), after its mPLUG-large VQA
judge:
  * `prepare_dpg_data` reads `dpg_bench.csv` (item_id, text, keywords, proposition_id, dependency, category_broad,
    category_detailed, tuple, question_natural_language; a prompt's questions are consecutive rows). Quirk: its
    `for i, line in data.iterrows(): if i == 0: continue` skips the file's first data row, i.e. the first question
    of the first prompt. Kept (`skip_first_row=True`), which has a second effect: that prompt's questions whose
    parent is the skipped question raise KeyError in the official, whose `except` then drops the whole prompt
    ("Failed filename"). Kept too: such a prompt is left out and listed in `failed_prompts`.
  * per image (each of the `pic_num` crops of the 2x2 grid the model generated for a prompt; the paper's setting is
    4): a question scores 1 if the judge's answer is exactly "yes"; then, in question order and in place, a question
    with a parent (dependency ids, 0 = none) scored 0 is set to 0 — in place, so a zeroed parent zeroes its
    children further down the list too. The image's score is the mean over the prompt's questions; the prompt's
    score the mean over its images; DPG-Bench overall = mean over prompts x 100.
  * category scores (quirk kept): from the judge's answers for the prompt's LAST image only and BEFORE parent
    zeroing (`qid2scores_orig`), pooled over all questions of a category: category = the tuple's text before "("
    (e.g. "entity - whole"), L1 category = its text before "-" (global, entity, attribute, relation, other).
Answers are matched as the official does (`answer == 'yes'`): the judge's raw text, no normalisation.
`answers_from_detail` turns the official's `<res>_detail.txt` (every judge answer) into the answers file read here.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping, Sequence

L1_CATEGORIES = ("global", "entity", "attribute", "relation", "other")


def prepare_dpg_data(rows: Sequence[Mapping[str, Any]], skip_first_row: bool = True) -> dict[str, dict]:
    """{item_id: {qid2tuple, qid2dependency, qid2question}} from dpg_bench.csv rows (prepare_dpg_data)."""
    questions: dict[str, dict] = {}
    previous_id = None
    for i, line in enumerate(rows):
        if skip_first_row and i == 0:
            continue
        current_id = str(line["item_id"])
        qid = int(line["proposition_id"])
        dependency = [int(d.strip()) for d in str(line["dependency"]).split(",")]
        if current_id != previous_id:
            questions[current_id] = {"qid2tuple": {}, "qid2dependency": {}, "qid2question": {}}
        questions[current_id]["qid2tuple"][qid] = line["tuple"]
        questions[current_id]["qid2dependency"][qid] = dependency
        questions[current_id]["qid2question"][qid] = line["question_natural_language"]
        previous_id = current_id
    return questions


def score_image(answers: Mapping[int, str], qid2dependency: Mapping[int, Sequence[int]]) -> tuple[float, dict, dict]:
    """(image score, raw {qid: 0/1}, zeroed {qid: 0/1}) for one image's answers {qid: judge's text}.

    Raises KeyError for a parent id without an answer, as the official does."""
    scores = {qid: float(answer == "yes") for qid, answer in answers.items()}
    raw = dict(scores)
    for qid, parents in qid2dependency.items():
        if any(parent != 0 and scores[parent] == 0 for parent in parents):
            scores[qid] = 0
    return sum(scores.values()) / len(scores), raw, scores


def score_prompt(images: Sequence[Mapping[int, str]], entry: Mapping[str, Any]) -> tuple[float, dict]:
    """(prompt score = mean of its images' scores, the last image's raw {qid: 0/1})."""
    scores, raw = [], {}
    for answers in images:
        missing = [q for q in entry["qid2question"] if q not in answers]
        if missing:
            raise ValueError(f"no judge answer for question(s) {missing}")
        score, raw, _ = score_image({q: answers[q] for q in entry["qid2question"]}, entry["qid2dependency"])
        scores.append(score)
    return sum(scores) / len(scores), raw


def category_of(tuple_text: str) -> str:
    return str(tuple_text).split("(")[0].strip()


def score_dpg(questions: Mapping[str, Mapping[str, Any]], answers: Mapping[str, Sequence[Mapping[int, str]]]) -> dict:
    """questions: prepare_dpg_data's output; answers: {item_id: [per image, in crop order: {qid: judge's text}]}.

    Overall and category scores on the paper's 0-100 scale."""
    prompt_scores: dict[str, float] = {}
    failed: dict[str, str] = {}
    category_scores: dict[str, list[float]] = {}
    for item_id, images in answers.items():
        entry = questions[item_id]
        try:
            score, raw = score_prompt(images, entry)
        except KeyError as e:  # a parent question that does not exist (the skipped first row)
            failed[item_id] = f"parent question {e} missing"
            continue
        prompt_scores[item_id] = score
        for qid, tuple_text in entry["qid2tuple"].items():
            category_scores.setdefault(category_of(tuple_text), []).append(raw[qid])
    if not prompt_scores:
        raise ValueError("no DPG-Bench prompt could be scored")
    l1: dict[str, list[float]] = {}
    for category, values in category_scores.items():
        l1.setdefault(category.split("-")[0].strip(), []).extend(values)
    return {
        "overall": 100 * sum(prompt_scores.values()) / len(prompt_scores),
        "l1_categories": {c: 100 * sum(v) / len(v) for c, v in sorted(l1.items())},
        "l2_categories": {c: 100 * sum(v) / len(v) for c, v in sorted(category_scores.items())},
        "prompts": len(prompt_scores),
        "failed_prompts": failed,
    }


_DETAIL_LINE = re.compile(r"^(?P<path>.*?), \((?P<x0>\d+), (?P<y0>\d+), (?P<x1>\d+), (?P<y1>\d+)\), (?P<rest>.*)$")


def answers_from_detail(lines: Iterable[str], questions: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """The judge's answers of compute_dpg_bench.py's `<res>_detail.txt` as the records `score --suite=dpg` reads:
    [{"item_id", "crop", "answers": {proposition_id: answer}}], one per image crop, in the file's order.

    A detail line is `image_path, (x0, y0, x1, y1), question, answer` (compute_dpg_one_sample); the item is the
    image's file name up to its first ".", the crop its place in the 2 x 2 grid (crop_tuples_list), and a crop's
    lines follow its item's questions in order (qid2question), which is how each line is given its proposition_id
    (question texts may repeat within a prompt); the question text is checked. ValueError names a bad line."""
    records: dict[tuple[str, int], dict] = {}
    for line_no, line in enumerate(lines, start=1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        m = _DETAIL_LINE.match(line)
        if m is None:
            raise ValueError(f"line {line_no}: not 'image_path, (x0, y0, x1, y1), question, answer'")
        item_id = os.path.basename(m["path"]).split(".")[0]
        if item_id not in questions:
            raise ValueError(f"line {line_no}: item {item_id} is not in the DPG-Bench csv")
        x0, y0, x1 = int(m["x0"]), int(m["y0"]), int(m["x1"])
        size = x1 - x0
        if size <= 0:
            raise ValueError(f"line {line_no}: empty crop")
        crop = x0 // size + 2 * (y0 // size)
        record = records.setdefault((item_id, crop), {"item_id": item_id, "crop": crop, "answers": {}})
        qids = list(questions[item_id]["qid2question"])
        position = len(record["answers"])
        if position >= len(qids):
            raise ValueError(f"line {line_no}: item {item_id} crop {crop} has more answers than its {len(qids)} "
                             f"questions (the file holds it twice?)")
        qid = qids[position]
        question = str(questions[item_id]["qid2question"][qid])
        if not m["rest"].startswith(question + ", "):
            raise ValueError(f"line {line_no}: expected question {qid} of item {item_id} ({question!r})")
        record["answers"][str(qid)] = m["rest"][len(question) + 2:]
    return list(records.values())
