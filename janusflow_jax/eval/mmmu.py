"""MMMU: the official response parsers and matchers, accuracy per subject and overall.

Follows MMMU's `mmmu/utils/eval_utils.py` (MMMU-Benchmark/MMMU at bb0b95a): `parse_multi_choice_response`,
`parse_open_response` (key sub-responses, number extraction, `normalize_str`), `eval_multi_choice` and `eval_open`.
When no option can be read, the official picks `random.choice` from Python's global generator, seeded 42 when
eval_utils is imported (`random.seed(42)`, eval_utils.py line 6); here the draw comes from a `random.Random(seed)`
passed in, default OFFICIAL_SEED = 42: with the questions in the same order the draws equal the official ones.
Overall accuracy is over all questions (micro), as the official `calculate_ins_level_acc`.
"""

from __future__ import annotations

import random
import re
from typing import Any, Iterable, Mapping, Sequence

OFFICIAL_SEED = 42  # mmmu/utils/eval_utils.py: random.seed(42) at import


def parse_multi_choice_response(response: str, all_choices: Sequence[str], index2ans: Mapping[str, str],
                                rng: random.Random) -> str:
    """The option letter of `response` (eval_utils.py's rule): "(A)", else " A ", else (responses over 5 words)
    the one option text found in it; several candidates -> the one written last; none -> rng.choice."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "  # spaces so " A " also matches at the ends

    index_ans = True
    ans_with_brack = False
    candidates = []
    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True
    if not candidates:
        for choice in all_choices:
            if f" {choice} " in response:
                candidates.append(choice)
    if not candidates and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False  # matched an option's text, not its letter
    if not candidates:
        return rng.choice(list(all_choices))
    if len(candidates) == 1:
        return candidates[0]
    if index_ans:
        pattern = "({})" if ans_with_brack else " {} "
        starts = [response.rfind(pattern.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))]  # np.argmax: first of the maxima


def check_is_number(string: str) -> bool:
    try:
        float(string.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(string: str) -> list:
    """A number -> [float rounded to 2 places]; a 1-character string -> [" x", "x "] (to avoid trivial matches);
    else [lower-cased string]."""
    string = string.strip()
    if check_is_number(string):
        return [round(float(string.replace(",", "")), 2)]
    string = string.lower()
    if len(string) == 1:
        return [" " + string, string + " "]
    return [string]


def extract_numbers(string: str) -> list[str]:
    """Numbers with thousands commas, in scientific notation, and plain ones (eval_utils.py's three patterns)."""
    pattern_commas = r"-?\b\d{1,3}(?:,\d{3})+\b"
    pattern_scientific = r"-?\d+(?:\.\d+)?[eE][+-]?\d+"
    pattern_simple = r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"
    return re.findall(pattern_commas, string) + re.findall(pattern_scientific, string) + \
        re.findall(pattern_simple, string)


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # The official splits on r"\.\s(?=[A-Z])" after lower-casing, so only newlines ever split. Kept.
    sub_responses = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    key_responses = []
    for index, resp in enumerate(sub_responses):
        if index == len(sub_responses) - 1:
            indicators.extend(["="])  # the last sentence may be an equation
        shortest = None
        for indicator in indicators:
            if indicator in resp:
                tail = resp.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
            key_responses.append(shortest)
    return key_responses or [response]


def parse_open_response(response: str) -> list:
    """The candidate answers of an open response (strings and floats), as eval_utils.py's parse_open_response."""
    key_responses = _key_subresponses(response)
    pred_list = list(key_responses)
    for resp in key_responses:
        pred_list.extend(extract_numbers(resp))
    normalized = []
    for pred in pred_list:
        normalized.extend(normalize_str(pred))
    out = []  # the official de-duplicates with set(); order does not change eval_open's result
    for pred in normalized:
        if pred not in out:
            out.append(pred)
    return out


def eval_multi_choice(gold: str | Sequence[str], pred: str) -> bool:
    return pred in gold if isinstance(gold, (list, tuple)) else gold == pred


def eval_open(gold: str | Sequence[str], preds: Sequence) -> bool:
    """Right if a float candidate equals a normalised gold number, or a normalised gold string occurs in a string
    candidate."""
    norm_answers = []
    for answer in (gold if isinstance(gold, (list, tuple)) else [gold]):
        norm_answers.extend(normalize_str(str(answer)))
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(a, str) and a in pred for a in norm_answers):
                return True
        elif pred in norm_answers:
            return True
    return False


def score_mmmu(items: Iterable[tuple[str, str, Any, Mapping[str, str], str]], seed: int = OFFICIAL_SEED) -> dict:
    """items: (subject, question type "multiple-choice"|"open", gold answer (letter, or str / list of str for open
    questions), {letter: option text}, response). Accuracy overall and per subject, as fractions."""
    rng = random.Random(seed)
    per_subject: dict[str, list[int]] = {}
    right = total = 0
    for subject, question_type, gold, options, response in items:
        if question_type == "multiple-choice":
            pred = parse_multi_choice_response(response, list(options), options, rng)
            hit = eval_multi_choice(gold, pred)
        else:
            hit = eval_open(gold, parse_open_response(response))
        counts = per_subject.setdefault(subject, [0, 0])
        counts[0] += hit
        counts[1] += 1
        right += hit
        total += 1
    return {"accuracy": right / total if total else 0.0, "questions": total,
            "subjects": {s: {"accuracy": c[0] / c[1], "questions": c[1]} for s, c in sorted(per_subject.items())}}
