"""Synthetic batches in the real layout: random but structured rows (packed segments, image slots, response-only loss,
left-padded prompts), a pure function of (seed, phase, process, index). For tests, benchmarks and a first run
without data; checkpointable like a grain iterator."""

from __future__ import annotations

import json
from typing import Mapping

import jax
import numpy as np

from janusflow_jax.data.batch import BatchGeometry


def synthetic_batch(rng: np.random.Generator, sizes: Mapping[str, int], geometry: BatchGeometry,
                    examples_per_row: int = 2) -> dict[str, np.ndarray]:
    """A random batch in the layout above (tests and benchmarks): packed rows of `examples_per_row` examples with
    realistic structure (BOS at each segment start, an image's slots after it, response-only loss on the second half
    of each example, trailing padding), left-padded prompts, Gaussian latents and images in [-1, 1]."""
    shapes = geometry.shapes(sizes)
    seq_len, prompt_len, vocab_size = geometry.seq_len, geometry.prompt_len, geometry.vocab_size
    num_image_tokens, images_per_row = geometry.num_image_tokens, geometry.images_per_row
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
    geometry.check(batch, sizes, "the synthetic source")
    return batch


class SyntheticSource:
    """Random batches in the `data/batch.py` layout, a pure function of (seed, phase, process, index, rows per type):
    for tests, benchmarks and a first run without data. `take(sizes)` gives the next batch with those rows per type
    (the trainer's per-step composition), `next()` one with `sizes`. Checkpointable like a grain iterator (bytes
    state)."""

    def __init__(self, sizes, seed: int, phase: int, geometry: BatchGeometry, make_batch=None):
        self.sizes, self.seed, self.phase, self.index = dict(sizes), seed, phase, 0
        self.geometry = geometry
        self.make_batch = make_batch or synthetic_batch  # the family's (OmniMamba: data/omnimamba_batch.py)

    def __iter__(self):
        return self

    def take(self, sizes) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.phase, jax.process_index(), self.index])
        self.index += 1
        return self.make_batch(rng, sizes, self.geometry)

    def __next__(self):
        return self.take(self.sizes)

    def get_state(self) -> bytes:
        return json.dumps({"index": self.index}).encode()

    def set_state(self, state: bytes):
        self.index = json.loads(state)["index"]

    def start_prefetch(self):  # grain's checkpoint handler calls it after a restore
        pass
