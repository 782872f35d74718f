"""What the one preparation job (`data/prepare.py`) needs from a model family, registered here so the job never
names one (as `train/family.py` does for the trainer): its record kinds (each read from `<kind>_jsonl`), the kind a
TFDS caption dataset feeds, the config fields its job never reads (left out of the resume fingerprint), the key of
its model config, where its tokenizer comes from, and its job (`job(config, sources, out)`: converter, grouped
encoders, metadata fields), imported only when a job of that family runs.

  janusflow  gen / und / text records (data/prepare.py's JanusFlowJob)
  omnimamba  mmu / t2i records, image codes precomputed (data/omnimamba_prepare.py's OmniMambaJob)
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class PrepareFamily:
    name: str
    kinds: tuple[str, ...]
    caption_kind: str
    unread_fields: tuple[str, ...]
    model_key: str  # config.model holds this key for the family's models
    tokenizer_hint: str  # what --config.prepare.tokenizer should point at
    job: Callable  # (config, sources, out) -> the family's job


def _janusflow_job(config, sources, out):
    from janusflow_jax.data.prepare import JanusFlowJob

    return JanusFlowJob(config)


def _omnimamba_job(config, sources, out):
    from janusflow_jax.data.omnimamba_prepare import OmniMambaJob

    return OmniMambaJob(config, sources, out)


FAMILIES = {
    "janusflow": PrepareFamily(
        "janusflow", ("gen", "und", "text"), "gen",
        ("family", "mmu_jsonl", "t2i_jsonl", "mmu_len", "image_tokenizer"), "llm",
        "(e.g. the JanusFlow checkpoint, or one written by processor.make_tokenizer)", _janusflow_job),
    "omnimamba": PrepareFamily(
        "omnimamba", ("mmu", "t2i"), "t2i",
        ("gen_jsonl", "und_jsonl", "text_jsonl", "latent", "sft_fraction", "system_prompt", "max_images_per_record",
         "text_overflow", "seq_len", "prompt_len"), "lm",
        "(gpt-neox-20b's, or one written by omnimamba_processor.make_tokenizer)", _omnimamba_job),
}


def of(name: str) -> PrepareFamily:
    """The registered family `name`; an unknown one is a ValueError naming the known."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}: set --config.prepare.family to one of {tuple(FAMILIES)}")
    return FAMILIES[name]
