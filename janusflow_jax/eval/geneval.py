"""GenEval: the clause logic of `evaluate_image` given detections, and `summary_scores`' aggregation.

Follows GenEval's `evaluation/evaluate_images.py` (djghosh13/geneval at af4902f) after its detector and colour
classifier:
  * detections of a class are sorted by score (`np.argsort(...)[::-1]` as numpy 1.23.1, GenEval's pinned version,
    orders ties: legacy_argsort.py), kept if score > 0.3 (0.9 for the `counting` tag), at most 16 per
    class, with its IoU suppression off (max_overlap 1.0, the default); `select_objects`.
  * `evaluate`: each `include` clause {class, count[, color][, position]} needs `count` objects of the class
    (the most confident ones); a colour clause needs `count` of them classified as that colour; a position clause
    [relation, group] needs every one of them to stand in `relation` to every object of the earlier clause `group`
    (`relative_position`, with its 0.1 margin); each `exclude` clause {class, count} fails if at least `count` are
    found (counting: exactly N = include N + exclude N+1).
  * `summary_scores.py`: per tag, the mean over images; overall = the mean of the tag means.
The caller supplies what the models produced: per image, detections `{"box": [x1, y1, x2, y2], "label": class,
"score": confidence, "color": colour}` (colour: the CLIP label GenEval's `color_classification` gives the crop; only
needed for `color`/`color_attr` prompts). Boxes are in pixels, y down (as mmdetection's).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from janusflow_jax.eval import legacy_argsort

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0  # "max_overlap": 1.0 turns suppression off
POSITION_THRESHOLD = 0.1


def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """evaluate_images.py's IoU (inclusive pixel boxes: +1 on each side)."""
    def area(b):
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]),
                  min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = POSITION_THRESHOLD) -> set[str]:
    """Where A is relative to B: the centre offset, shrunk on each axis by margin * (sum of the two boxes' extents)
    and clipped at 0, then normalised by the raw offset's length; an axis component beyond +-0.5 names a relation.
    An offset that the margin absorbs entirely (< 1e-3) gives no relation."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - margin * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def select_objects(detections: Iterable[Mapping[str, Any]], tag: str, threshold: float = THRESHOLD,
                   counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
                   max_overlap: float = NMS_THRESHOLD) -> dict[str, list[Mapping[str, Any]]]:
    """{class: detections kept, most confident first}, as evaluate_image's box selection. A detection without a
    score counts as already selected by the caller (score 1)."""
    cutoff = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for d in detections:
        by_class.setdefault(str(d["label"]), []).append(d)
    out = {}
    for classname, found in by_class.items():
        # np.argsort(bbox[:, 4])[::-1] on mmdetection's float32 scores, with the numpy of GenEval's environment.yml
        # (1.23.1): its introsort decides the order of tied scores (legacy_argsort.py); the threshold compares in
        # float32 too, as numpy compares a float32 array with a Python float.
        scores = np.asarray([float(d.get("score", 1.0)) for d in found], dtype=np.float32)
        order = legacy_argsort.argsort(scores.tolist())[::-1]
        order = [i for i in order if scores[i] > np.float32(cutoff)][:max_objects]
        kept = []
        while order:
            best = order.pop(0)
            kept.append(found[best])
            order = [i for i in order
                     if max_overlap == 1 or compute_iou(found[best]["box"], found[i]["box"]) < max_overlap]
        if kept:
            out[classname] = kept
    return out


def evaluate(objects: Mapping[str, Sequence[Mapping[str, Any]]], metadata: Mapping[str, Any]) -> tuple[bool, str]:
    """evaluate_images.py's `evaluate`: (correct, reason) for one image's selected objects and its prompt's
    metadata."""
    correct = True
    reason = []
    matched_groups: list[Sequence[Mapping[str, Any]] | None] = []
    for req in metadata.get("include", []):
        classname = req["class"]
        matched = True
        found = list(objects.get(classname, []))[:req["count"]]
        if len(found) < req["count"]:
            correct = matched = False
            reason.append(f"expected {classname}>={req['count']}, found {len(found)}")
        else:
            if "color" in req:
                colors = [o.get("color") for o in found]
                if any(c is None for c in colors):
                    raise ValueError(f"a {classname} detection has no 'color', which a colour prompt needs")
                if colors.count(req["color"]) < req["count"]:
                    correct = matched = False
                    reason.append(f"expected {req['color']} {classname}>={req['count']}, found "
                                  f"{colors.count(req['color'])} {req['color']}; and "
                                  + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                if matched_groups[target_group] is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found:
                        for target in matched_groups[target_group]:
                            true_rels = relative_position(obj["box"], target["box"])
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(f"expected {classname} {expected_rel} target, found "
                                              f"{' and '.join(sorted(true_rels))} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        classname = req["class"]
        if len(objects.get(classname, [])) >= req["count"]:
            correct = False
            reason.append(f"expected {classname}<{req['count']}, found {len(objects[classname])}")
    return correct, "\n".join(reason)


def evaluate_image(detections: Iterable[Mapping[str, Any]], metadata: Mapping[str, Any], **selection) -> dict:
    """One image's result record, shaped like a line of evaluate_images.py's results.jsonl."""
    objects = select_objects(detections, metadata["tag"], **selection)
    correct, reason = evaluate(objects, metadata)
    return {"tag": metadata["tag"], "prompt": metadata.get("prompt", ""), "correct": correct, "reason": reason,
            "metadata": json.dumps(metadata)}


def summary_scores(results: Iterable[Mapping[str, Any]]) -> dict:
    """summary_scores.py over result records (tag, correct, metadata): per-tag accuracy, overall = mean of the tag
    means (tags in order of first appearance, as groupby(sort=False)), plus image- and prompt-level shares."""
    results = list(results)
    if not results:
        raise ValueError("no GenEval results to summarise")
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, list[bool]] = {}
    for r in results:
        by_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
        by_prompt.setdefault(r.get("metadata", r.get("prompt", "")), []).append(bool(r["correct"]))
    tags = {t: sum(v) / len(v) for t, v in by_tag.items()}
    return {
        "overall": sum(tags.values()) / len(tags),
        "tags": tags,
        "tag_counts": {t: len(v) for t, v in by_tag.items()},
        "images": len(results),
        "prompts": len(by_prompt),
        "correct_images": sum(bool(r["correct"]) for r in results) / len(results),
        "correct_prompts": sum(any(v) for v in by_prompt.values()) / len(by_prompt),
        "missing_tags": [t for t in TAGS if t not in tags],
    }
