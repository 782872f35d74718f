"""Multiple-choice scoring (MMBench, SEED-Bench): option-letter extraction, accuracy per category, circular eval.

Follows VLMEvalKit (open-compass/VLMEvalKit) under its `exact_matching` policy, i.e. without the ChatGPT answer
extractor: `vlmeval/utils/matching_util.py` `can_infer`, `vlmeval/dataset/utils/multiple_choice.py`
(`build_choices`, `extract_answer_from_item`, `mcq_vanilla_eval`, `mcq_circular_eval`, `prefetch_circular_group`)
and `vlmeval/dataset/image_mcq.py` `ImageMCQDataset.evaluate`.

The option matcher changed twice; `MATCHERS` names each version (`matcher=`):
  * "pre-pr1175" (default): `matching_util.py` as of 23d51c96 (2024-11-12, the day JanusFlow's paper, arXiv
    2411.07975, came out) and until PR #1175 (c3371551, 2025-08-04), so the version the paper's numbers were made with.
    `can_infer_option`: replace `.()[],:;!*#{}` with spaces and split; if exactly one option letter is a word, that
    letter; if none is but a word is "Z", "Z"; a known refusal sentence is "Z". (Its "A might be a quantifier"
    guard only runs with VERBOSE set, so "A dog" with options A/B reads as "A" there and here.) Else
    `can_infer_text`: if exactly one option's text occurs (lower case) in the answer, that option.
  * "pr1175": PR #1175 (c3371551) adds two guards: the one letter must be among the last four words, and
    `can_infer_text` gives up on an answer longer than twice the options' total text length.
  * "pr1552": PR #1552 (a67ace50, 2026-06-17, still VLMEvalKit's at e8e78f05): when the letter rule reads nothing,
    "answer is B" / "correct answer is **B**" (A-D, any case) gives that letter.
Nothing read -> "Z" ("Failed in Prefetch"), which matches no option, so it is wrong.

Input as VLMEvalKit reads it: the benchmark TSV through `pd.read_csv(sep='\\t')` (`vlmeval/smp/file.py` `load`), so
an option cell holding one of pandas' default NA strings ("", "None", "NA", "N/A", "null", "nan", ...: `PANDAS_NA`)
is no option (`build_choices` skips NaN); predictions through its .xlsx, so an empty (or NA-string) prediction is
NaN, which `str()` makes the text "nan" (`as_vlmevalkit_prediction`) -- scored like any answer ("nan" contains an
option text "a" or "an").

Circular evaluation (MMBench's protocol; VLMEvalKit always uses it for MMBench): the TSV holds each question and
its rotated copies at index + k * 1e6; a question (a main row, index < 1e6) counts as right only if every row of its
group (same index % 1e6) reads its own answer. Category / l2-category are the main row's.
"""

from __future__ import annotations

import re
import string
from typing import Any, Iterable, Mapping, Sequence

from janusflow_jax.eval.formats import PANDAS_NA, present_options

REJECT_TO_ANSWER = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
NO_ANSWER = "Z"
CIRCULAR_STRIDE = 1_000_000  # VLMEvalKit: rotations of question i are rows i + k * 1e6
MATCHERS = ("pre-pr1175", "pr1175", "pr1552")
DEFAULT_MATCHER = "pre-pr1175"  # the paper (2024-11-12) predates PR #1175 (2025-08-04)
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")  # PR #1552


def _check_matcher(matcher: str):
    if matcher not in MATCHERS:
        raise ValueError(f"unknown option matcher {matcher!r} (known: {', '.join(MATCHERS)})")


def as_vlmevalkit_prediction(prediction: Any) -> str:
    """The prediction text as VLMEvalKit scores it: read back from its .xlsx by pandas, where an empty cell or an NA
    string is NaN, then `str()`: "nan"."""
    text = "" if prediction is None else str(prediction)
    return "nan" if text in PANDAS_NA else text


def can_infer_option(answer: str, choices: Mapping[str, str], matcher: str = DEFAULT_MATCHER) -> str | None:
    """The option letter written in `answer`, "Z" for a refusal, or None (VLMEvalKit's can_infer_option)."""
    if "Failed to obtain answer via API" in answer:
        return None
    for refusal in REJECT_TO_ANSWER:
        if refusal in answer:
            return NO_ANSWER
    spaced = answer
    for c in ".()[],:;!*#{}":
        spaced = spaced.replace(c, " ")
    words = [w.strip() for w in spaced.split()]
    found = [letter for letter in choices if letter in words]
    if len(found) == 1:
        letter = found[0]
        if matcher == "pre-pr1175" or words.index(letter) > len(words) - 5:  # PR #1175: among the last 4 words
            return letter
    elif not found and NO_ANSWER in words:
        return NO_ANSWER
    if matcher == "pr1552":
        match = _VERBOSE_ANSWER.search(answer)
        if match and match.group(1).upper() in choices:
            return match.group(1).upper()
    return None


def can_infer_text(answer: str, choices: Mapping[str, str], matcher: str = DEFAULT_MATCHER) -> str | None:
    """The one option whose text occurs in `answer` (case-insensitive), else None (VLMEvalKit's can_infer_text)."""
    answer = answer.lower()
    if matcher != "pre-pr1175" and len(answer) > 2 * sum(len(str(v)) for v in choices.values()):  # PR #1175
        return None
    found = [letter for letter, text in choices.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


def extract_option(answer: str, choices: Mapping[str, str], matcher: str = DEFAULT_MATCHER) -> str:
    """The chosen letter, or "Z" when none can be read (VLMEvalKit's can_infer, then its exact-matching fallback).
    `choices` in letter order, as `build_choices` makes them."""
    _check_matcher(matcher)
    answer = str(answer)
    assert all(letter in string.ascii_uppercase for letter in choices)
    return (can_infer_option(answer, choices, matcher) or can_infer_text(answer, choices, matcher)
            or NO_ANSWER)


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
                          index_of=lambda row: int(float(row["index"])), matcher: str = DEFAULT_MATCHER) -> dict:
    """items: (row, prediction, answer letter), row with option columns A..H and optional category / l2-category;
    the prediction as VLMEvalKit reads it (`as_vlmevalkit_prediction`).

    Returns accuracy overall and per category / l2-category (fractions), the number of questions (groups when
    circular; a group whose main row is absent is left out, as `mcq_circular_eval` keys groups by main rows) and of
    unreadable answers."""
    _check_matcher(matcher)
    results = []  # (row, extracted, correct)
    for row, prediction, answer in items:
        choices = present_options(row, na=PANDAS_NA)
        extracted = extract_option(prediction, choices, matcher)
        results.append((row, extracted, extracted == answer.strip().upper()))
    unreadable = sum(extracted == NO_ANSWER for _, extracted, _ in results)
    orphans = 0
    if circular:
        grouped: dict[int, list[tuple[int, Mapping[str, Any], bool]]] = {}
        for row, _, hit in results:
            index = index_of(row)
            grouped.setdefault(index % CIRCULAR_STRIDE, []).append((index, row, hit))
        questions = []
        for members in grouped.values():
            main = [row for index, row, _ in members if index < CIRCULAR_STRIDE]
            if not main:
                orphans += len(members)
                continue
            questions.append((main[0], all(hit for _, _, hit in members)))
    else:
        questions = [(row, hit) for row, _, hit in results]
    n = len(questions)
    return {
        "accuracy": sum(hit for _, hit in questions) / n if n else 0.0,
        "questions": n,
        "rows": len(results),
        "rotations_without_main_row": orphans,
        "unreadable_answers": unreadable,
        "category": _accuracy_by(questions, "category"),
        "l2-category": _accuracy_by(questions, "l2-category"),
    }
