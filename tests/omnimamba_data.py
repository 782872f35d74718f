"""Tiny OmniMamba inputs the preparation and loader tests share: sklearn's 8 x 8 digits as PNGs, t2i and mmu
manifests (with bad inputs: a corrupt and a missing image, an empty caption and answer, a malformed line, an
over-long question; kept: multi-turn conversations, one cut at a turn boundary, an over-long caption cut), and a
word-level tokenizer (`omnimamba_processor.make_tokenizer`) that fits the tiny system's 96 text ids with [PAD] and
the nine OmniMamba tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from configs import prepare_data as prepare_configs
from janusflow_jax.data.omnimamba_processor import make_tokenizer

NAMES = "zero one two three four five six seven eight nine".split()
WORDS = ["a", "photo", "of", "the", "digit", "what", "is", "this", "it", "handwritten", *NAMES]
GOOD_T2I, GOOD_MMU = 20, 15  # mmu: 12 + the two-turn and the truncated conversations + the truncated caption


def write_inputs(root: Path) -> dict[str, Path]:
    """Images, manifests and the tokenizer under `root`; returns their paths."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    (root / "images").mkdir(parents=True)
    for i in range(GOOD_T2I):
        pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, "L").save(root / "images" / f"{i}.png")
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing else")
    name = lambda i: NAMES[digits.target[i]]  # noqa: E731
    # Every third image has three captions (as COCO's five): all kept, one drawn per load.
    t2i = [json.dumps({"image": f"images/{i}.png", "caption": f"a handwritten {name(i)}" if i % 3 else
                       [f"a handwritten {name(i)}", f"the digit {name(i)}", f"a photo of a {name(i)}"]})
           for i in range(GOOD_T2I)]
    t2i[3:3] = ["{not json", json.dumps({"image": "images/corrupt.png", "caption": "a digit"})]
    t2i[9:9] = [json.dumps({"image": "images/absent.png", "caption": "a digit"}),
                json.dumps({"image": "images/1.png", "caption": "  "})]
    (root / "t2i.jsonl").write_text("\n".join(t2i) + "\n")

    mmu = []
    for i in range(12):
        if i % 3 == 0:
            mmu.append({"image": f"images/{i}.png", "question": "what is this", "answer": f"the digit {name(i)}"})
        elif i % 3 == 1:
            mmu.append({"image": f"images/{i}.png", "caption": f"a photo of a handwritten {name(i)}"})
        else:
            mmu.append({"image": f"images/{i}.png", "conversation": [
                {"role": "User", "content": "<image_placeholder>\nwhat is this"},
                {"role": "Assistant", "content": f"it is {name(i)}"}]})
    mmu[2:2] = [{"image": "images/corrupt.png", "question": "what is this", "answer": "a digit"},
                {"image": "images/0.png", "question": "what is this", "answer": " "},
                {"image": "images/0.png", "question": "what is this " * 20, "answer": "a digit"},
                # Kept: a two-turn conversation, a LLaVA one cut after its turns that fit mmu_len (64 ids), a caption
                # cut at mmu_len.
                {"image": "images/0.png", "conversation": [{"role": "user", "content": "what is this"},
                                                           {"role": "assistant", "content": "a digit"}] * 2},
                {"image": "images/1.png", "conversations": [
                    {"from": "human", "value": "<image>\nwhat is this"}, {"from": "gpt", "value": "a digit"},
                    *[{"from": "human", "value": "what is this digit"}, {"from": "gpt", "value": "it is a one"}] * 5]},
                {"image": "images/2.png", "caption": " ".join(["a photo of a handwritten two"] * 14)}]
    (root / "mmu.jsonl").write_text("\n".join(json.dumps(m) for m in mmu) + "\n")
    return {"root": root, "t2i": root / "t2i.jsonl", "mmu": root / "mmu.jsonl",
            "tokenizer": make_tokenizer(root / "tokenizer", WORDS)}


EXPECTED_SKIPS = {"mmu": {"corrupt_image": 1, "empty_answer": 1, "too_long": 1},
                  "t2i": {"bad_json": 1, "corrupt_image": 1, "empty_caption": 1, "missing_image": 1}}


def job_config(inputs: dict, out, image_tokenizer: dict | None = None, **job):
    """configs/prepare_data.py:omnimamba_tiny on these inputs, the codebook fitted by the job (unless
    `image_tokenizer` changes it)."""
    config = prepare_configs.get_config("omnimamba_tiny")
    with config.unlocked():
        config.prepare.update(dict(out=str(out), tokenizer=str(inputs["tokenizer"]), t2i_jsonl=str(inputs["t2i"]),
                                   mmu_jsonl=str(inputs["mmu"]), records_per_shard=5, encode_batch_per_device=4,
                                   num_threads=2))
        config.prepare.image_tokenizer.fit = True
        config.prepare.image_tokenizer.update(image_tokenizer or {})
        config.prepare.update(job)
    return config
