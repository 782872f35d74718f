"""POPE (object hallucination): yes/no parsing and F1/accuracy/precision/recall/yes-ratio per subset.

Follows POPE's own `evaluate.py` (RUCAIBox/POPE), which LLaVA's `eval_pope.py` copies: keep the first sentence (text
before the first "."), drop commas, split on spaces; the answer is "no" if a word is exactly "No", "no" or "not",
else "yes" (so an empty or off-topic answer counts as "yes"). "yes" is the positive class.

POPE is three question sets on the same COCO images (adversarial, popular, random negatives). LLaVA-1.5 reports the
mean of the three subsets' F1 (its 85.9), and JanusFlow's Table 5 sets its 88.0 beside that number, so the headline
here is that mean (`f1_mean_over_subsets`); each subset's metrics and those of all questions pooled come with it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

SUBSET_ORDER = ("adversarial", "popular", "random")


def parse_yes_no(text: str) -> str:
    """POPE evaluate.py's rule: "no" if the first sentence has the word No/no/not, else "yes"."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """accuracy, precision, recall, F1 (positive = "yes") and yes-ratio of parsed answers vs "yes"/"no" labels.

    POPE's script divides by zero when nothing is predicted "yes"; here such a precision (and F1) is 0."""
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    n = len(predictions)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p == "yes" for p in predictions) / n if n else 0.0, "tp": tp, "tn": tn, "fp": fp,
            "fn": fn, "n": n}


def label_of(answer: str) -> str:
    label = answer.strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"a POPE label must be yes or no, got {answer!r}")
    return label


def score_pope(items: Iterable[tuple[str, str, str]]) -> dict:
    """items: (subset, prediction text, label yes/no). Metrics as fractions in [0, 1]."""
    by_subset: dict[str, tuple[list[str], list[str]]] = {}
    for subset, prediction, label in items:
        preds, labels = by_subset.setdefault(subset, ([], []))
        preds.append(parse_yes_no(prediction))
        labels.append(label_of(label))
    subsets = sorted(by_subset, key=lambda s: (SUBSET_ORDER.index(s) if s in SUBSET_ORDER else len(SUBSET_ORDER), s))
    per_subset = {s: binary_metrics(*by_subset[s]) for s in subsets}
    pooled = binary_metrics([p for s in subsets for p in by_subset[s][0]],
                            [t for s in subsets for t in by_subset[s][1]])
    mean = {k: sum(per_subset[s][k] for s in subsets) / len(subsets)
            for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    return {"subsets": per_subset, "mean_over_subsets": mean, "pooled": pooled,
            "f1_mean_over_subsets": mean["f1"]}
