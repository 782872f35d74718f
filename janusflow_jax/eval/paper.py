"""The JanusFlow paper's benchmark numbers (arXiv 2411.07975, JanusFlow-1.3B) and a table beside a checkpoint's.

One row per reported number, on the paper's scale: GenEval as a fraction, DPG-Bench and the understanding benchmarks
in percent, MME-Perception as MME's 0-2000 sum, FID as is. `key` is the name a suite's scores give the number
(`score.py`: each suite returns {"paper": {key: value}}).
"""

from __future__ import annotations

import dataclasses
from typing import Collection, Mapping


@dataclasses.dataclass(frozen=True)
class PaperNumber:
    key: str
    table: str
    benchmark: str
    metric: str
    text: str  # as printed in the paper (its decimals are kept when a checkpoint's number is shown beside it)
    lower_is_better: bool = False

    @property
    def value(self) -> float:
        return float(self.text)

    def format(self, value: float) -> str:
        decimals = len(self.text.split(".")[1]) if "." in self.text else 0
        return f"{value:.{decimals}f}"


PAPER = (
    PaperNumber("geneval.single_object", "Table 2", "GenEval", "Single Obj.", "0.97"),
    PaperNumber("geneval.two_object", "Table 2", "GenEval", "Two Obj.", "0.59"),
    PaperNumber("geneval.counting", "Table 2", "GenEval", "Counting", "0.45"),
    PaperNumber("geneval.colors", "Table 2", "GenEval", "Colors", "0.83"),
    PaperNumber("geneval.position", "Table 2", "GenEval", "Position", "0.53"),
    PaperNumber("geneval.color_attr", "Table 2", "GenEval", "Color Attri.", "0.42"),
    PaperNumber("geneval.overall", "Table 2", "GenEval", "Overall", "0.63"),
    PaperNumber("dpg.global", "Table 3", "DPG-Bench", "Global", "87.03"),
    PaperNumber("dpg.entity", "Table 3", "DPG-Bench", "Entity", "87.31"),
    PaperNumber("dpg.attribute", "Table 3", "DPG-Bench", "Attribute", "87.39"),
    PaperNumber("dpg.relation", "Table 3", "DPG-Bench", "Relation", "89.79"),
    PaperNumber("dpg.other", "Table 3", "DPG-Bench", "Other", "88.10"),
    PaperNumber("dpg.overall", "Table 3", "DPG-Bench", "Overall", "80.09"),
    PaperNumber("mjhq.fid", "Table 4", "MJHQ-30K", "FID", "9.51", lower_is_better=True),
    PaperNumber("pope", "Table 5", "POPE", "F1, mean of 3 subsets", "88.0"),
    PaperNumber("mme.perception", "Table 5", "MME-P", "perception sum", "1333.1"),
    PaperNumber("mmbench", "Table 5", "MMB (dev)", "accuracy", "74.9"),
    PaperNumber("seed", "Table 5", "SEED", "accuracy", "70.5"),
    PaperNumber("vqav2", "Table 5", "VQAv2 (test-dev)", "VQA accuracy", "79.8"),
    PaperNumber("gqa", "Table 5", "GQA", "accuracy", "60.3"),
    PaperNumber("mmmu", "Table 5", "MMMU", "accuracy", "29.3"),
    PaperNumber("mmvet", "Table 5", "MM-Vet", "GPT-4 score", "30.9"),
    PaperNumber("chartqa", "Table 5", "ChartQA", "relaxed accuracy", "64.6"),
    PaperNumber("textvqa", "Table 5", "TextVQA", "VQA accuracy", "55.5"),
)
PAPER_BY_KEY = {p.key: p for p in PAPER}


TABLE_TITLES = {"Table 2": "GenEval", "Table 3": "DPG-Bench", "Table 4": "MJHQ-30K FID",
                "Table 5": "multimodal understanding"}


def render_table(scores: Mapping[str, float], title: str = "This checkpoint", marked: Collection[str] = ()) -> str:
    """Markdown in the paper's shape: one table per paper table, its benchmarks/metrics as columns in its order, and
    rows for the paper's JanusFlow-1.3B, `scores` (key -> value on the paper's scale; "—" where not measured) and
    their difference. Keys not in the paper are listed at the end. Keys in `marked` (numbers scored under a
    non-default protocol option) get a "*" and a note."""
    def shown(key: str, text: str) -> str:
        return text + "*" if key in marked else text

    out = []
    for table, title_text in TABLE_TITLES.items():
        numbers = [p for p in PAPER if p.table == table]
        headers = [(p.metric if p.benchmark in title_text else p.benchmark) + (" ↓" if p.lower_is_better else "")
                   for p in numbers]
        ours = [float(scores[p.key]) if scores.get(p.key) is not None else None for p in numbers]
        out.append(f"{table} ({title_text})")
        out.append("")
        out.append("| | " + " | ".join(headers) + " |")
        out.append("|---|" + "---:|" * len(numbers))
        out.append("| JanusFlow-1.3B (paper) | " + " | ".join(p.text for p in numbers) + " |")
        out.append(f"| {title} | " + " | ".join("—" if v is None else shown(p.key, p.format(v))
                                                for p, v in zip(numbers, ours))
                   + " |")
        deltas = ["" if v is None else ("+" if v >= p.value else "−") + p.format(abs(v - p.value))
                  for p, v in zip(numbers, ours)]
        out.append("| Δ | " + " | ".join(deltas) + " |")
        out.append("")
    extra = sorted(k for k in scores if k not in PAPER_BY_KEY)
    if extra:
        out.append("Not in the paper: " + ", ".join(f"{k} = {shown(k, format(scores[k], '.4g'))}" for k in extra))
        out.append("")
    if any(k in marked for k in scores):
        out.append("\\* scored under a non-default protocol option (see the protocol below); not comparable with the "
                   "paper's number.")
        out.append("")
    return "\n".join(out)
