"""How each understanding benchmark is asked (phase A of `launch.evaluate und`): the text of the user turn, the system
prompt, the answer budget, the scorer, and which rows count.

DeepSeek's protocol is VLMEvalKit's Janus wrapper (open-compass/VLMEvalKit `vlmeval/vlm/janus.py`, `build_prompt` and
`generate_inner`), which the JanusFlow numbers of Table 5 come from:
  * decoding is greedy (`do_sample=False`), one answer per question;
  * the system prompt is empty, except for MM-Vet ("You are a helpful assistant. Please answer truthfully and write
    out your thinking step by step to be sure you get the right answer.");
  * the user turn is the row's images, one "<image_placeholder>" each with nothing between them, then the text
    (`prepare_itlist`); the chat template strips it, so the single-image prompt is "<image_placeholder>\\n{text}";
  * yes/no benchmarks (POPE, MME): "\\n{question}\\nAnswer the question using a single word or phrase.", POPE's
    question losing its " Please answer yes or no." (MME keeps it);
  * multiple choice (MMBench, SEED-Bench, MMMU): "\\n[Hint: {hint}\\n]{question}\\nA. {A}\\nB. {B}\\n...\\n\\nAnswer
    with the option's letter from the given choices directly." over the option columns A-Z that hold text, in order; a
    row without options (MMMU's open questions) ends "{question}\\nAnswer the question directly. ";
  * MM-Vet: "\\n{question}" with the system prompt above (scored by MM-Vet's GPT-4 grader, not here).
Short-answer VQA (GQA, VQAv2, TextVQA) has no custom prompt in the Janus wrapper; as the issue asks, these use
LLaVA-1.5's (`llava_gqa_testdev_balanced.jsonl`, `llava_vqav2_mscoco_test-dev2015.jsonl`): "\\n{question}\\nAnswer the
question using a single word or phrase.", without LLaVA's TextVQA OCR-token hint. MMBench asks every row of its TSV,
rotated copies included (scoring groups them, circular by default); MMMU keeps the rows of its validation split.
`digits` is the digits run's own question, asked as that run asks it (no system prompt, 4 new tokens).

Answer budget: 512 new tokens (the VLMEvalKit wrapper's default was 512, now 2048; these answers are a word, a letter
or a paragraph, and greedy decoding stops at EOS).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Callable, Mapping, Sequence

from janusflow_jax.eval.formats import PANDAS_NA, InputError, present_options

MMVET_SYSTEM_PROMPT = ("You are a helpful assistant. Please answer truthfully and write out your thinking step by step "
                       "to be sure you get the right answer.")
SHORT_ANSWER = "Answer the question using a single word or phrase."
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question directly. "
POPE_SUFFIX = " Please answer yes or no."
ANSWER_TOKENS = 512


def _cell(row: Mapping[str, Any], column: str) -> str | None:
    """A cell's text, None when absent or NaN as VLMEvalKit's pandas reads it (empty, "nan", "None", "NA", ...)."""
    value = row.get(column)
    if value is None:
        return None
    text = str(value)
    return None if text in PANDAS_NA or text.strip() == "" else text


def yes_no_text(row: Mapping[str, Any], drop: str = "") -> str:
    question = str(row["question"])
    if drop:
        question = question.replace(drop, "")
    return "\n" + question + "\n" + SHORT_ANSWER


def multiple_choice_text(row: Mapping[str, Any]) -> str:
    """VLMEvalKit Janus.build_prompt for MCQ datasets, character for character."""
    options = present_options(row, string.ascii_uppercase, na=PANDAS_NA)
    hint = _cell(row, "hint")
    text = f"\nHint: {hint}\n" if hint is not None else "\n"
    text += f"{row['question']}\n"
    if options:
        text += "".join(f"{letter}. {option}\n" for letter, option in options.items()) + "\n" + MC_INSTRUCTION
    else:
        text += OPEN_INSTRUCTION
    return text


def short_answer_text(row: Mapping[str, Any]) -> str:
    return f"\n{row['question']}\n{SHORT_ANSWER}"


def plain_text(row: Mapping[str, Any]) -> str:
    return "\n" + str(row["question"])


def vqa_dataset_text(row: Mapping[str, Any]) -> str:
    """VLMEvalKit ImageVQADataset.build_prompt (ChartQA ...; no Janus custom prompt): the question right after the
    images, then the short-answer instruction."""
    return f"{row['question']}\n{SHORT_ANSWER}"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How one benchmark is asked. `text(row)` is the user turn after the images; `scorer` the `score.SUITES` entry
    that reads the predictions ("" when an external grader does)."""

    name: str
    text: Callable[[Mapping[str, Any]], str]
    rule: str  # the user turn in words, for the manifest
    scorer: str
    system_prompt: str = ""
    max_new_tokens: int = ANSWER_TOKENS
    split: str = ""  # keep only rows whose `split` column holds this value (when the column exists)

    def content(self, row: Mapping[str, Any], num_images: int, image_tag: str) -> str:
        """The user turn as VLMEvalKit lays it out: the image placeholders, then the text."""
        return image_tag * num_images + self.text(row)

    def select(self, rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        if not self.split or not rows or "split" not in rows[0]:
            return list(rows)
        kept = [r for r in rows if str(r["split"]).strip() == self.split]
        if not kept:
            raise InputError(f"no row of the {self.name} file is in its {self.split!r} split")
        return kept

    def describe(self) -> dict:
        return {"suite": self.name, "user_turn": self.rule, "system_prompt": self.system_prompt,
                "max_new_tokens": self.max_new_tokens, "decoding": "greedy", "scorer": self.scorer or "external",
                **({"split": self.split} if self.split else {})}


_YES_NO = "images, then '\\n{question}\\n" + SHORT_ANSWER + "' (VLMEvalKit Janus, Y/N)"
_MC = ("images, then '\\n[Hint: {hint}\\n]{question}\\nA. ..\\nB. ..\\n\\n" + MC_INSTRUCTION + "' (VLMEvalKit Janus, "
       "MCQ)")
_SHORT = "images, then '\\n{question}\\n" + SHORT_ANSWER + "' (LLaVA-1.5's short-answer prompt)"

PROTOCOLS: dict[str, Protocol] = {
    "pope": Protocol("pope", lambda row: yes_no_text(row, POPE_SUFFIX), _YES_NO + f", {POPE_SUFFIX.strip()!r} "
                     "removed from the question", "pope"),
    "mme": Protocol("mme", yes_no_text, _YES_NO, "mme"),
    "mmbench": Protocol("mmbench", multiple_choice_text, _MC, "mmbench"),
    "seed": Protocol("seed", multiple_choice_text, _MC, "seed"),
    "mmmu": Protocol("mmmu", multiple_choice_text, _MC + "; open questions end 'Answer the question directly. '",
                     "mmmu", split="validation"),
    "gqa": Protocol("gqa", short_answer_text, _SHORT, "gqa"),
    "vqav2": Protocol("vqav2", short_answer_text, _SHORT, "vqav2"),
    "textvqa": Protocol("textvqa", short_answer_text, _SHORT + ", no OCR-token hint", "textvqa"),
    "chartqa": Protocol("chartqa", vqa_dataset_text, "images, then '{question}\\n" + SHORT_ANSWER + "' (VLMEvalKit "
                        "ImageVQADataset)", "chartqa"),
    "mmvet": Protocol("mmvet", plain_text, "images, then '\\n{question}' (VLMEvalKit Janus, MM-Vet)", "",
                      system_prompt=MMVET_SYSTEM_PROMPT),
    "digits": Protocol("digits", plain_text, "images, then '\\n{question}' (the digits run's own evaluation)", "digits",
                       max_new_tokens=4),
}
