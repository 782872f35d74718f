"""ChartQA: relaxed accuracy, the benchmark's metric (Masry et al. 2022, end of section 5.1, after Methani et al.
2020): a numeric answer is right within 5% of the gold answer, any other answer only by exact match.

`relaxed_correctness` follows google-research/pix2struct `pix2struct/metrics.py` (5b086ef) line for line: a text
ending in "%" is a number divided by 100; when both parse as floats and the gold one is not 0, right iff
|prediction - gold| / |gold| <= 0.05; else right iff the lower-cased texts are equal. A question's score is the
maximum over its gold answers (pix2struct's `aggregate_metrics`; VLMEvalKit's `hit_calculate` for ChartQA).

`RULES` (`rule=`):
  * "vlmevalkit-pre1204" (default): VLMEvalKit's `vqa_eval.py` `process_line(method='relaxed_accuracy')` as of
    23d51c96 (2024-11-12, JanusFlow's paper date, whose Table 5 ChartQA number it made) and until PR #1204
    (677e30a5, 2025-09-01): the prediction (read back as pandas does, "" -> "nan") stripped and passed as the
    TARGET, i.e. the 5% is relative to the prediction and a prediction of 0 needs an exact match.
  * "pix2struct": the metric as defined, relative to the gold answer, the prediction as written; VLMEvalKit's
    order too since PR #1204 (e8e78f05).
"""

from __future__ import annotations

from typing import Iterable, Sequence

MAX_RELATIVE_CHANGE = 0.05
RULES = ("vlmevalkit-pre1204", "pix2struct")
DEFAULT_RULE = "vlmevalkit-pre1204"  # the paper (2024-11-12) predates VLMEvalKit's PR #1204 (2025-09-01)


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = MAX_RELATIVE_CHANGE) -> bool:
    """pix2struct's relaxed_correctness(target, prediction)."""
    prediction_float = _to_float(prediction)
    target_float = _to_float(target)
    if prediction_float is not None and target_float:
        return abs(prediction_float - target_float) / abs(target_float) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str], rule: str = DEFAULT_RULE) -> float:
    """1.0 if `prediction` is relaxed-correct for one of the gold `answers`, else 0.0."""
    if rule not in RULES:
        raise ValueError(f"unknown ChartQA rule {rule!r} (known: {', '.join(RULES)})")
    if rule == "pix2struct":
        return float(max(relaxed_correctness(str(a), prediction) for a in answers))
    from janusflow_jax.eval.multiple_choice import as_vlmevalkit_prediction

    prediction = as_vlmevalkit_prediction(prediction).strip()
    return float(max(relaxed_correctness(prediction, str(a)) for a in answers))


def score_chartqa(items: Iterable[tuple[str, str, Sequence[str]]], rule: str = DEFAULT_RULE) -> dict:
    """items: (category, e.g. the human / augmented split, prediction, gold answers). Accuracy overall and per
    category, as fractions."""
    per_category: dict[str, list[float]] = {}
    hits = []
    for category, prediction, answers in items:
        hit = relaxed_accuracy(prediction, answers, rule)
        hits.append(hit)
        per_category.setdefault(category, []).append(hit)
    return {"accuracy": sum(hits) / len(hits) if hits else 0.0, "questions": len(hits),
            "category": {c: sum(v) / len(v) for c, v in sorted(per_category.items())}}
