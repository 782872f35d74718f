"""The training batch: one plain dict of arrays, a fixed sub-batch per data type, so every shape is static.

This is the one place the layout is defined; the loaders (`janusflow_jax/data.py`), the synthetic source below, the
train step and the benchmarks all follow it. Keys are `<type>/<field>`; a type whose sub-batch is 0 in the current
mixture is absent. Shapes use n_und / n_gen / n_text rows (see `sub_batch_sizes`), S = sequence length of the
understanding/text rows, L = generation prompt length, H = W = image size (384), K = images per understanding row,
G = latent grid side (48), C = latent channels (4).

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

import math
from typing import Mapping, Sequence

import numpy as np

DATA_TYPES = ("und", "gen", "text")


def sub_batch_sizes(batch_size: int, ratio: Sequence[float], multiple_of: int = 1) -> dict[str, int]:
    """Rows per data type for a global batch split at `ratio` (understanding : generation : text-only).

    Each size is a multiple of `multiple_of` (the data-parallel shard count x micro-batches, so every sub-batch splits
    evenly over devices and micro-batches). Rounding is by largest remainder over units of `multiple_of`: floor every
    share, then hand the leftover units to the largest fractional parts (ties to the earlier type). 512 at 14:80:6 gives
    72/409/31 with multiple_of=1 and 72/408/32 with multiple_of=8. The sizes always sum to `batch_size`.
    """
    if len(ratio) != len(DATA_TYPES) or any(r < 0 for r in ratio) or sum(ratio) <= 0:
        raise ValueError(f"ratio must be 3 non-negative numbers (und, gen, text) with a positive sum, got {ratio}")
    if batch_size % multiple_of:
        raise ValueError(f"batch size {batch_size} is not a multiple of {multiple_of} (data shards x micro-batches)")
    units = batch_size // multiple_of
    shares = [units * r / sum(ratio) for r in ratio]
    counts = [math.floor(s) for s in shares]
    for i in sorted(range(len(shares)), key=lambda i: (counts[i] - shares[i], i))[:units - sum(counts)]:
        counts[i] += 1
    return {name: c * multiple_of for name, c in zip(DATA_TYPES, counts)}


def batch_shapes(sizes: Mapping[str, int], *, seq_len: int, prompt_len: int, image_size: int, latent_size: int,
                 latent_channels: int = 4, images_per_row: int = 1) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every key of a batch with these sub-batch sizes (types with 0 rows are left out)."""
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    for kind in ("und", "text"):
        n = sizes.get(kind, 0)
        if n:
            for field in ("input_ids", "loss_mask", "segment_ids", "positions"):
                out[f"{kind}/{field}"] = ((n, seq_len), i32)
    if sizes.get("und", 0):
        n = sizes["und"]
        out["und/image_token_mask"] = ((n, seq_len), i32)
        out["und/images"] = ((n, images_per_row, image_size, image_size, 3), f32)
    if sizes.get("gen", 0):
        n = sizes["gen"]
        out["gen/prompt_ids"] = ((n, prompt_len), i32)
        out["gen/prompt_mask"] = ((n, prompt_len), i32)
        out["gen/latents"] = ((n, latent_size, latent_size, latent_channels), f32)
        out["gen/images"] = ((n, image_size, image_size, 3), f32)
    return out


def synthetic_batch(rng: np.random.Generator, sizes: Mapping[str, int], *, seq_len: int, prompt_len: int,
                    image_size: int, latent_size: int, vocab_size: int, num_image_tokens: int,
                    latent_channels: int = 4, images_per_row: int = 1, examples_per_row: int = 2) -> dict[str, np.ndarray]:
    """A random batch in the layout above (tests and benchmarks): packed rows of `examples_per_row` examples with
    realistic structure (BOS at each segment start, an image's slots after it, response-only loss on the second half
    of each example, trailing padding), left-padded prompts, Gaussian latents and images in [-1, 1]."""
    shapes = batch_shapes(sizes, seq_len=seq_len, prompt_len=prompt_len, image_size=image_size,
                          latent_size=latent_size, latent_channels=latent_channels, images_per_row=images_per_row)
    batch = {}
    for kind in ("und", "text"):
        n = sizes.get(kind, 0)
        if not n:
            continue
        ids = rng.integers(3, vocab_size, (n, seq_len)).astype(np.int32)
        loss = np.zeros((n, seq_len), np.int32)
        seg = np.zeros((n, seq_len), np.int32)
        pos = np.zeros((n, seq_len), np.int32)
        img = np.zeros((n, seq_len), np.int32)
        image_span = 1 + num_image_tokens
        for row in range(n):
            used = int(seq_len * rng.uniform(0.75, 1.0))
            bounds = np.linspace(0, used, examples_per_row + 1).astype(int)
            images_left = images_per_row if kind == "und" else 0
            for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                seg[row, a:b] = k + 1
                pos[row, a:b] = np.arange(b - a)
                ids[row, a] = 1  # BOS stand-in
                start = a + 1
                if images_left and b - start > image_span + 2:
                    img[row, start:start + image_span] = 1
                    start += image_span
                    images_left -= 1
                loss[row, max(start + 1, (start + b) // 2):b] = 1
        batch.update({f"{kind}/input_ids": ids, f"{kind}/loss_mask": loss, f"{kind}/segment_ids": seg,
                      f"{kind}/positions": pos})
        if kind == "und":
            batch["und/image_token_mask"] = img
            batch["und/images"] = rng.uniform(-1, 1, shapes["und/images"][0]).astype(np.float32)
    n = sizes.get("gen", 0)
    if n:
        lengths = rng.integers(max(2, prompt_len // 2), prompt_len + 1, n)
        mask = (np.arange(prompt_len)[None] >= (prompt_len - lengths)[:, None]).astype(np.int32)
        ids = rng.integers(3, vocab_size, (n, prompt_len)).astype(np.int32) * mask
        ids[np.arange(n), prompt_len - lengths] = 1  # BOS first
        batch["gen/prompt_ids"] = ids
        batch["gen/prompt_mask"] = mask
        batch["gen/latents"] = rng.standard_normal(shapes["gen/latents"][0]).astype(np.float32)
        batch["gen/images"] = rng.uniform(-1, 1, shapes["gen/images"][0]).astype(np.float32)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == shapes
    return batch
