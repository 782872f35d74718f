"""OmniMamba's training batch: one plain dict of arrays, a fixed sub-batch per task, every shape static
(docs/reference.md §9.1; the release's util/llava_instruct_data.py, util/coco_dataset.py, models/omnimamba.py).

`OmniMambaGeometry` holds the sizes and has `BatchGeometry`'s interface (`types`, `from_config`, `shapes`, `check`),
so one trainer, loader and synthetic source serve both families. Keys are `<type>/<field>`; a type with 0 rows in
the current mixture is absent. n_mmu / n_t2i rows, S = understanding ids per row (453 in the release: the 4 task
ids + 449 text tokens), H = the tower's image side (384), P = the t2i prompt (72), N = image tokens (256).

Understanding ("mmu": next-token cross-entropy on the answer through lm_head, the MMU LoRA):
  mmu/input_ids  int32 [n_mmu, S]   [<|mmu|>, <|soi|>, <|eoi|>, <|sot|>, "In: {question}\\nOut: ",
                                    "{answer}<|endoftext|>", <|eot|>], right-padded with [PAD] (the release's
                                    FinetuneDataset tokenizes the two pieces on their own and appends <|eot|>;
                                    models/omnimamba.py prepends the four task ids). The model splices the image's
                                    F projected features in after the first two ids (`OmniMamba.mmu_embeddings`),
                                    so the model sees S + F positions.
  mmu/loss_mask  int32 [n_mmu, S]   1 where ids[i] is a target (predicted from the position before it): the answer
                                    tokens and their closing <|endoftext|>; 0 for the task ids, the question, <|eot|>
                                    and padding (the release's labels: IGNORE everywhere else).
  mmu/images     float32 [n_mmu, H, H, 3]   RGB in [0, 1], resized to H x H ("resize-naive", bicubic); the tower
                                    (`models.dinosiglip.DinoSigLIP`) normalises it for each backbone itself.
Text-to-image ("t2i": next-token cross-entropy on the N image tokens through img_head, the T2I LoRA):
  t2i/prompt_ids int32 [n_t2i, P]   [<|t2i|>, <|sot|>, caption (P - 4 tokens, left-padded with [PAD]), <|eot|>,
                                    <|soi|>] (`OmniMambaProcessor.t2i_prompt`; the release's caption_ids without the
                                    trailing <|eoi|>, whose input changes no image-token logit and whose label is
                                    ignored)
  t2i/image_ids  int32 [n_t2i, N]   the image's VQ codes, row-major over the code grid (precomputed, as the
                                    release's pre-tokenised COCO)
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from janusflow_jax.data.omnimamba_processor import SPECIAL_TOKENS

DATA_TYPES = ("mmu", "t2i")
MMU_PREFIX = 4  # [<|mmu|>, <|soi|>, <|eoi|>, <|sot|>]


@dataclasses.dataclass(frozen=True)
class OmniMambaGeometry:
    """The shapes every producer of OmniMamba batches and every consumer agree on; from the run config once."""

    mmu_len: int  # S: understanding ids per row (task ids included)
    prompt_len: int  # P: the t2i prompt
    num_image_tokens: int  # N: VQ codes per image
    image_size: int  # H: the understanding tower's side
    num_image_features: int = 0  # F: the tower's patches (positions the model adds to each mmu row)
    text_vocab_size: int = 0  # synthetic text ids are drawn below pad_id
    image_vocab_size: int = 0  # synthetic codes are drawn below it
    pad_id: int = 50277  # [PAD]; the task / marker tokens follow it in SPECIAL_TOKENS order (the processor's)
    eos_id: int = 0  # <|endoftext|>

    types = DATA_TYPES

    def __post_init__(self):
        if self.mmu_len < MMU_PREFIX + 4:
            raise ValueError(f"data.mmu_len={self.mmu_len} leaves no room for text after the {MMU_PREFIX} task ids")
        if self.text_vocab_size and self.pad_id + len(SPECIAL_TOKENS) >= self.text_vocab_size:
            raise ValueError(f"data.pad_id={self.pad_id}: [PAD] and the {len(SPECIAL_TOKENS)} OmniMamba tokens after "
                             f"it must fit the text vocabulary ({self.text_vocab_size})")

    @classmethod
    def from_config(cls, config) -> "OmniMambaGeometry":
        """From a run config: its `model` (the OmniMambaSystemConfig fields) and its `data` (mmu_len, pad_id,
        eos_id)."""
        from janusflow_jax.models.omnimamba import OmniMambaSystemConfig

        return cls.from_model(OmniMambaSystemConfig.from_dict(config.model.to_dict()), config.data)

    @classmethod
    def from_model(cls, system, data) -> "OmniMambaGeometry":
        """From an `OmniMambaSystemConfig` and a run config's `data` fields."""
        lm = system.lm
        return cls(mmu_len=data.mmu_len, prompt_len=lm.t2i_prompt_length, num_image_tokens=lm.num_image_tokens,
                   image_size=system.vision.image_size, num_image_features=lm.num_image_features,
                   text_vocab_size=lm.text_vocab_size, image_vocab_size=lm.image_vocab_size,
                   pad_id=data.pad_id, eos_id=data.eos_id)

    @property
    def token_ids(self) -> dict[str, int]:
        """{"<|soi|>": pad_id + 1, ...}: the OmniMamba tokens as `OmniMambaProcessor` adds them after [PAD] to a
        tokenizer without them (gpt-neox-20b, `make_tokenizer`'s)."""
        return {token: self.pad_id + 1 + i for i, token in enumerate(SPECIAL_TOKENS)}

    def shapes(self, sizes: Mapping[str, int]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """(shape, dtype) of every key of a batch with these rows per type (types with 0 rows are left out)."""
        i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
        out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        unknown = sorted(set(sizes) - set(DATA_TYPES))
        if unknown:
            raise ValueError(f"unknown OmniMamba data types {unknown}; the types are {DATA_TYPES}")
        n = sizes.get("mmu", 0)
        if n:
            out["mmu/input_ids"] = ((n, self.mmu_len), i32)
            out["mmu/loss_mask"] = ((n, self.mmu_len), i32)
            out["mmu/images"] = ((n, self.image_size, self.image_size, 3), f32)
        n = sizes.get("t2i", 0)
        if n:
            out["t2i/prompt_ids"] = ((n, self.prompt_len), i32)
            out["t2i/image_ids"] = ((n, self.num_image_tokens), i32)
        return out

    def check(self, batch: Mapping[str, np.ndarray], sizes: Mapping[str, int], source: str = "the data source"):
        """Raises ValueError naming every key whose shape or dtype differs from the layout (or is missing/extra)."""
        from janusflow_jax.data.batch import check_layout

        check_layout(batch, self.shapes(sizes), f"{source} produced a batch outside the OmniMamba layout")


def synthetic_batch(rng: np.random.Generator, sizes: Mapping[str, int],
                    geometry: OmniMambaGeometry) -> dict[str, np.ndarray]:
    """A random batch in the layout above, with its structure: mmu rows of the four task ids, a question, an answer
    closed by <|endoftext|> (the loss mask), <|eot|> and [PAD]s to the end; t2i prompts with a left-padded caption
    of random length; uniform VQ codes; images uniform in [0, 1]. Text ids are drawn from [1, pad_id)."""
    g, ids = geometry, geometry.token_ids
    words = lambda *shape: rng.integers(1, g.pad_id, shape).astype(np.int32)  # noqa: E731
    batch: dict[str, np.ndarray] = {}
    n = sizes.get("mmu", 0)
    if n:
        input_ids = np.full((n, g.mmu_len), g.pad_id, np.int32)
        loss_mask = np.zeros((n, g.mmu_len), np.int32)
        room = g.mmu_len - MMU_PREFIX - 2  # question + answer tokens; <|endoftext|> and <|eot|> follow
        for row in range(n):
            question = int(rng.integers(1, room // 2 + 1))
            answer = int(rng.integers(1, room - question + 1))
            text = [*words(question), *words(answer), g.eos_id, ids["<|eot|>"]]
            input_ids[row, :MMU_PREFIX] = [ids["<|mmu|>"], ids["<|soi|>"], ids["<|eoi|>"], ids["<|sot|>"]]
            input_ids[row, MMU_PREFIX:MMU_PREFIX + len(text)] = text
            start = MMU_PREFIX + question
            loss_mask[row, start:start + answer + 1] = 1
        batch["mmu/input_ids"], batch["mmu/loss_mask"] = input_ids, loss_mask
        batch["mmu/images"] = rng.uniform(0, 1, (n, g.image_size, g.image_size, 3)).astype(np.float32)
    n = sizes.get("t2i", 0)
    if n:
        caption = g.prompt_len - 4
        prompt = np.full((n, g.prompt_len), g.pad_id, np.int32)
        prompt[:, 0], prompt[:, 1] = ids["<|t2i|>"], ids["<|sot|>"]
        prompt[:, -2], prompt[:, -1] = ids["<|eot|>"], ids["<|soi|>"]
        for row, length in enumerate(rng.integers(1, caption + 1, n)):
            prompt[row, 2 + caption - length:2 + caption] = words(length)
        batch["t2i/prompt_ids"] = prompt
        batch["t2i/image_ids"] = rng.integers(0, g.image_vocab_size, (n, g.num_image_tokens)).astype(np.int32)
    geometry.check(batch, sizes, "the synthetic source")
    return batch
