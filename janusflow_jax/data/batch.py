"""The training batch: one plain dict of arrays, a fixed sub-batch per data type, so every shape is static.

This is the one place the layout is defined (`BatchGeometry` holds its sizes); the loader (`data/loader.py`), the
synthetic source (`data/synthetic.py`), the train step and the benchmarks all follow it. Keys are `<type>/<field>`; a
type with no rows in a batch is absent. Shapes use n_und / n_gen / n_text rows (a training step's and a held-out
evaluation batch's come from the mixture schedule, `data/mixture.py`), S = sequence length of the understanding/text
rows, L = generation prompt length, H = W = image size (384), K = images per understanding row, G = latent grid side
(48), C = latent channels (4).

Understanding (next-token cross-entropy on response tokens; SigLIP features scattered into the image slots):
  und/input_ids         int32 [n_und, S]        token ids; image slots hold the tokenizer's image ids (never read)
  und/loss_mask         int32 [n_und, S]        1 where token i is a target (predicted from position i - 1):
                                                the assistant's response tokens and their closing EOS
  und/segment_ids       int32 [n_und, S]        1, 2, ... per packed example; 0 = padding (hidden key, no loss)
  und/positions         int32 [n_und, S]        RoPE position inside the example (0 at its BOS)
  und/image_token_mask  int32 [n_und, S]        1 at each image's 1 + num_patches slots (<begin_of_image> + patches)
  und/images            float32 [n_und, K, H, W, 3]   official VLMImageProcessor output (long side to H, padded
                                                with the mean colour, (x - 0.5) / 0.5); the k-th image fills the
                                                k-th group of image slots of its row; unused images are zeros
Generation (rectified flow + REPA):
  gen/prompt_ids        int32 [n_gen, L]        BOS + prompt in the pre-training or SFT template, generation tag
                                                dropped (t_emb takes its slot), LEFT-padded
  gen/prompt_mask       int32 [n_gen, L]        1 at real prompt tokens (before the CFG drop, which the train step
                                                applies: BOS kept, the rest hidden, positions unchanged)
  gen/latents           float32 [n_gen, G, G, C]  x = SDXL-VAE latent x scaling_factor (0.13025), the t = 1 end
  gen/images            float32 [n_gen, H, H, 3]  the same 384x384 training crop, normalised as for understanding:
                                                SigLIP's input for the REPA target features
Text-only (next-token cross-entropy):
  text/input_ids, text/loss_mask, text/segment_ids, text/positions   as for understanding, without images

Packing: understanding and text rows may hold several examples (segment ids + per-segment positions; attention never
crosses segments). A padded row is the special case of one segment. A row's loss mask is 0 at the first token of
every segment, so the next-token shift never trains across a segment boundary.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

DATA_TYPES = ("und", "gen", "text")


@dataclasses.dataclass(frozen=True)
class BatchGeometry:
    """The shapes every producer of batches (the prepared loader and its packer, the synthetic source) and every
    consumer (the train step, AOT compile, benchmarks) agree on; derived once from the run config (`from_config`)."""

    types = DATA_TYPES  # the data types of a batch, in order (a class attribute: the family's, not a field)

    seq_len: int  # S: tokens per understanding / text row
    prompt_len: int  # L: tokens per (left-padded) generation prompt
    image_size: int  # H = W: understanding images and generation crops
    latent_size: int  # G: latent grid side
    latent_channels: int = 4  # C
    images_per_row: int = 1  # K: images an understanding row holds
    num_image_tokens: int = 0  # image slots per image (the understanding encoder's patches)
    vocab_size: int = 0  # token ids of synthetic batches are drawn below it

    @classmethod
    def from_config(cls, config) -> "BatchGeometry":
        """From a run config: its `model` (the JanusFlowConfig fields) and its `data` (seq_len, prompt_len,
        images_per_row)."""
        from janusflow_jax.models.config import JanusFlowConfig

        return cls.from_model(JanusFlowConfig.from_dict(config.model.to_dict()), config.data)

    @classmethod
    def from_model(cls, model, data) -> "BatchGeometry":
        """From a `JanusFlowConfig` and a run config's `data` fields."""
        return cls(seq_len=data.seq_len, prompt_len=data.prompt_len, image_size=model.und_encoder.image_size,
                   latent_size=model.latent_size, latent_channels=model.gen_encoder.in_channels,
                   images_per_row=data.images_per_row, num_image_tokens=model.und_encoder.num_patches,
                   vocab_size=model.llm.vocab_size)

    def shapes(self, sizes: Mapping[str, int]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """`batch_shapes(sizes, self)`."""
        return batch_shapes(sizes, self)

    def check(self, batch: Mapping[str, np.ndarray], sizes: Mapping[str, int], source: str = "the data source"):
        """Raises ValueError naming every key whose shape or dtype differs from the layout (or is missing/extra)."""
        check_layout(batch, self.shapes(sizes), f"{source} produced a batch outside the layout")


def check_layout(batch: Mapping[str, np.ndarray], want: Mapping[str, tuple], message: str):
    """Raises ValueError(`message`: every key whose (shape, dtype) differs from `want`, missing or extra) — the check
    of every family's geometry."""
    got = {k: (tuple(np.shape(v)), np.dtype(getattr(v, "dtype", None))) for k, v in batch.items()}
    if got != want:
        diff = sorted(f"{k}: expected {want.get(k)}, got {got.get(k)}" for k in set(want) | set(got)
                      if want.get(k) != got.get(k))
        raise ValueError(f"{message}: " + "; ".join(diff))


def batch_shapes(sizes: Mapping[str, int], geometry: BatchGeometry) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every key of a batch with these sub-batch sizes (types with 0 rows are left out)."""
    g = geometry
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    for kind in ("und", "text"):
        n = sizes.get(kind, 0)
        if n:
            for field in ("input_ids", "loss_mask", "segment_ids", "positions"):
                out[f"{kind}/{field}"] = ((n, g.seq_len), i32)
    if sizes.get("und", 0):
        n = sizes["und"]
        out["und/image_token_mask"] = ((n, g.seq_len), i32)
        out["und/images"] = ((n, g.images_per_row, g.image_size, g.image_size, 3), f32)
    if sizes.get("gen", 0):
        n = sizes["gen"]
        out["gen/prompt_ids"] = ((n, g.prompt_len), i32)
        out["gen/prompt_mask"] = ((n, g.prompt_len), i32)
        out["gen/latents"] = ((n, g.latent_size, g.latent_size, g.latent_channels), f32)
        out["gen/images"] = ((n, g.image_size, g.image_size, 3), f32)
    return out
