"""Multiple-choice scoring (MMBench, SEED-Bench): option-letter extraction, accuracy per category, circular eval.

Follows VLMEvalKit (`vlmeval/utils/matching_util.py` `can_infer`, `vlmeval/dataset/utils/multiple_choice.py`) under
its `exact_matching` policy, i.e. without the ChatGPT answer extractor:
  * `can_infer_option`: replace the characters `.()[],:;!*#{}` with spaces and split; if exactly one option letter
    is a word, that letter ("A", "A.", "(A)", "Answer: A", "The answer is B"); if none is but a word is "Z", "Z".
    A known refusal sentence is "Z". (VLMEvalKit's "A might be a quantifier" guard only runs with VERBOSE set, so
    "A dog" with options A/B reads as "A" there and here.)
  * else `can_infer_text`: if exactly one option's text occurs (lower case) in the answer, that option.
  * else no answer: VLMEvalKit records "Z" ("Failed in Prefetch"), which matches no option, so it is wrong.
Circular evaluation (MMBench's official protocol; off unless asked): VLMEvalKit's TSV holds each question and its
rotated copies at index + k * 1e6; a question counts as right only if every row of its group (same index % 1e6) is
right. Category / l2-category are taken from the group's main row (index < 1e6).
"""

from __future__ import annotations

import string
from typing import Any, Iterable, Mapping, Sequence

from janusflow_jax.eval.formats import present_options

REJECT_TO_ANSWER = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
NO_ANSWER = "Z"
CIRCULAR_STRIDE = 1_000_000  # VLMEvalKit: rotations of question i are rows i + k * 1e6


def can_infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """The option letter written in `answer`, "Z" for a refusal, or None (VLMEvalKit's can_infer_option)."""
    if "Failed to obtain answer via API" in answer:
        return None
    for refusal in REJECT_TO_ANSWER:
        if refusal in answer:
            return NO_ANSWER
    for c in ".()[],:;!*#{}":
        answer = answer.replace(c, " ")
    words = [w.strip() for w in answer.split()]
    found = [letter for letter in choices if letter in words]
    if len(found) == 1:
        return found[0]
    if not found and NO_ANSWER in words:
        return NO_ANSWER
    return None


def can_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """The one option whose text occurs in `answer` (case-insensitive), else None (VLMEvalKit's can_infer_text)."""
    answer = answer.lower()
    found = [letter for letter, text in choices.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


def extract_option(answer: str, choices: Mapping[str, str]) -> str:
    """The chosen letter, or "Z" when none can be read (VLMEvalKit's can_infer, then its exact-matching fallback)."""
    answer = str(answer)
    assert all(letter in string.ascii_uppercase for letter in choices)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices) or NO_ANSWER


def _accuracy_by(groups: Sequence[tuple[Mapping[str, Any], bool]], column: str) -> dict[str, float]:
    totals: dict[str, list[int]] = {}
    for row, hit in groups:
        value = row.get(column)
        if value is None or str(value).strip() == "":
            continue
        t = totals.setdefault(str(value), [0, 0])
        t[0] += hit
        t[1] += 1
    return {k: v[0] / v[1] for k, v in sorted(totals.items())}


def score_multiple_choice(items: Iterable[tuple[Mapping[str, Any], str, str]], circular: bool = False,
                          index_of=lambda row: int(float(row["index"]))) -> dict:
    """items: (row, prediction, answer letter), row with option columns A..H and optional category / l2-category.

    Returns accuracy overall and per category / l2-category (fractions), the number of questions (groups when
    circular) and of unreadable answers."""
    results = []  # (row, extracted, correct)
    for row, prediction, answer in items:
        choices = present_options(row)
        extracted = extract_option(prediction, choices)
        results.append((row, extracted, extracted == answer.strip().upper()))
    unreadable = sum(extracted == NO_ANSWER for _, extracted, _ in results)
    if circular:
        grouped: dict[int, list[tuple[Mapping[str, Any], bool]]] = {}
        for row, _, hit in results:
            grouped.setdefault(index_of(row) % CIRCULAR_STRIDE, []).append((row, hit))
        questions = []
        for members in grouped.values():
            main = min(members, key=lambda m: index_of(m[0]))[0]
            questions.append((main, all(hit for _, hit in members)))
    else:
        questions = [(row, hit) for row, _, hit in results]
    n = len(questions)
    return {
        "accuracy": sum(hit for _, hit in questions) / n if n else 0.0,
        "questions": n,
        "rows": len(results),
        "unreadable_answers": unreadable,
        "category": _accuracy_by(questions, "category"),
        "l2-category": _accuracy_by(questions, "l2-category"),
    }
