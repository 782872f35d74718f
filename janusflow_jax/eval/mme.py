"""MME: yes/no extraction, acc and acc+ per subtask, perception and cognition sums.

Follows MME's official `eval_tool/calculation.py`: answers are lower-cased; `parse_pred_ans` takes "yes"/"no" if the
answer is exactly that, else looks for "yes" then "no" in its first 4 characters, else "other" (always wrong). Each
image has two questions; a subtask's score is acc*100 + acc+*100, where acc is over questions and acc+ is the share
of images with both questions right (so each subtask scores 0..200). Perception (MME-P, the paper's 1333.1) is the
sum over the 10 perception subtasks (max 2000), cognition the sum over the 4 cognition ones (max 800).

Images: rows sharing `image_path` within a category are one image (VLMEvalKit's `MME_rating`); without that column,
consecutive rows of a category are paired, as calculation.py reads its per-task files two lines at a time.
"""

from __future__ import annotations

from typing import Iterable, Mapping

# calculation.py's eval_type_dict, in its order; names as in VLMEvalKit's MME.tsv `category` column.
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_pred_ans(answer: str) -> str:
    """calculation.py's parse_pred_ans on the lower-cased answer: "yes", "no" or "other"."""
    answer = answer.lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def subtask_scores(images: Mapping[str, list[tuple[str, str]]]) -> dict[str, float]:
    """One subtask from {image: [(prediction, label), ...]}: acc, acc_plus (x100), score = their sum."""
    correct_questions = questions = correct_images = 0
    other = 0
    for pairs in images.values():
        right = 0
        for prediction, label in pairs:
            parsed = parse_pred_ans(prediction)
            other += parsed == "other"
            right += parsed == label.strip().lower()
        correct_questions += right
        questions += len(pairs)
        correct_images += right == len(pairs)
    acc = 100 * correct_questions / questions
    acc_plus = 100 * correct_images / len(images)
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": questions,
            "images": len(images), "other_answers": other}


def score_mme(items: Iterable[tuple[str, str, str, str]]) -> dict:
    """items: (category, image key, prediction, label yes/no), in file order."""
    grouped: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for category, image, prediction, label in items:
        grouped.setdefault(category, {}).setdefault(image, []).append((prediction, label))
    per_subtask = {c: subtask_scores(images) for c, images in grouped.items()}
    out = {"subtasks": per_subtask}
    for name, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
        present = [c for c in members if c in per_subtask]
        out[name] = sum(per_subtask[c]["score"] for c in present)
        out[f"{name}_subtasks_present"] = len(present)
        out[f"{name}_subtasks_missing"] = [c for c in members if c not in per_subtask]
    out["unknown_subtasks"] = sorted(c for c in per_subtask if c not in PERCEPTION + COGNITION)
    return out


def pair_consecutive(items: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str, str]]:
    """(category, prediction, label) in file order -> with an image key pairing consecutive rows of a category."""
    seen: dict[str, int] = {}
    out = []
    for category, prediction, label in items:
        n = seen.get(category, 0)
        seen[category] = n + 1
        out.append((category, f"pair{n // 2}", prediction, label))
    return out
