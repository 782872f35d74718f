"""OmniMamba's side of the preparation job (`--config.prepare.family=omnimamba`; `data/prepare.py` runs it with the
same sources, shards, resume, hosts and skip counting as JanusFlow's). Records: `data/omnimamba_records.py`.

Inputs (JSON-lines like JanusFlow's; image paths relative to the manifest's folder unless `image_root` is set):
  t2i  {"image": path, "caption": str | [str, ...]} lines (`t2i_jsonl`) and/or a local TFDS caption dataset
       (`tfds`): every caption's first caption_length tokens in the t2i prompt layout (all kept: the loader draws
       one per load, `omnimamba_records.decode_t2i`); the image's short side resized
       to the tokenizer's side and square-cropped (`gen_crop`: "random" with the record's RNG, or "center"), then
       coded by the image tokenizer in batches of encode_batch_per_device x local devices (on this host's first
       device: no cross-host program)
  mmu  {"image": path, "question": q, "answer": a} (stage 2's "In: … Out:" layout), {"image": path, "caption": c}
       (stage 1's caption-only layout), {"image": path, "conversations": [{"from": "human" | "gpt", "value"}, ...]}
       (LLaVA / ShareGPT4V, the release's stage-2 data) or {"image": path, "conversation": [{"role", "content"},
       ...]} (JanusFlow's understanding manifests; "<image_placeholder>" dropped) (`mmu_jsonl`): the ids and loss mask
       of `omnimamba_records.conversation_record` (every turn, loss on every answer, cut at a turn boundary to fit
       mmu_len) or `caption_record` (cut at mmu_len - 4 ids: 449 in the release), the image resized to the tower's
       side (resize-naive, bicubic) as uint8 — exactly the pixels `inference.omnimamba.resize_naive` gives, before
       its / 255
Skipped and counted by reason (beside the shared image and line reasons): empty_caption, empty_question,
empty_answer, bad_conversation, too_many_images, too_long (not even the first turn fits `mmu_len`). Kept records by
layout in metadata.json's "understanding": records per template, truncated ones by reason (caption, conversation)
and the turns kept and dropped.

Image tokenizer (`image_tokenizer`): kind "vq16" with path = an orbax root holding an OmniMamba system (the VQ of a
`launch.convert`ed release), or "patch_kmeans" with path = its .npz. fit=True fits the patch_kmeans codebook first
(`fit_patch_kmeans`: the first `fit_images` t2i images that open, centre-cropped, k-means seeded by `seed`;
codebook_size = the model's image vocabulary, patch = image_tokenizer.patch or the model VQ's downsampling factor)
and writes it to path (default <out>/patch_kmeans.npz) on host 0; a codebook already there is used as it is (a
resumed job keeps its codebook: delete the file to refit). The codebook's size must equal the model's image
vocabulary, and its code grid the model's image tokens.

metadata.json (what `data/loader.py` checks against the run's `OmniMambaGeometry`): family "omnimamba", counts /
skipped / shards / sources per kind (mmu, t2i), tokenizer {path, vocab_size, pad_id, eos_id, token_ids},
image {size: the tower's side}, image_tokenizer {kind, path, sha256 (patch_kmeans), codebook_size, num_image_tokens,
grid, image_size: the t2i pixels, downsample}, lengths {mmu_len, prompt_len, max_mmu_length}, templates, config.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import threading
from typing import Mapping, Sequence

import numpy as np
from etils import epath

from janusflow_jax import paths
from janusflow_jax.data import prepare, prepare_families
from janusflow_jax.data.omnimamba_records import (IMAGE_TOKENIZERS, PatchKMeans, VQ16, caption_record,
                                                  conversation_record, t2i_record)
from janusflow_jax.data.prepare import Skip, open_image

log = logging.getLogger(__name__)

KINDS = prepare_families.FAMILIES["omnimamba"].kinds
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CODEBOOK = "patch_kmeans.npz"  # a fitted codebook's default name, beside the shards
TEMPLATES = {
    "t2i": "[<|t2i|>, <|sot|>, caption (its first caption_length tokens, left-padded with [PAD]), <|eot|>, <|soi|>]",
    "mmu": "[<|mmu|>, <|soi|>, <|eoi|>, <|sot|>] + 'In: {question}\\nOut: ' + '{answer}<|endoftext|>' + <|eot|>",
    "mmu_caption": "[<|mmu|>, <|soi|>, <|eoi|>, <|sot|>] + '{caption}<|endoftext|>'",
}


def resize_naive(image, size: int) -> np.ndarray:
    """An RGB PIL image resized to size x size (bicubic, no crop), uint8 [size, size, 3]."""
    from PIL import Image

    return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), np.uint8)


def _center_crop(value, side: int) -> np.ndarray | None:
    from janusflow_jax.data.processor import resize_short_side_and_crop

    try:
        return np.asarray(resize_short_side_and_crop(open_image(value), side), np.uint8)
    except Skip:
        return None


def fit_patch_kmeans(sources: Sequence, *, side: int, patch: int, codebook_size: int, seed: int,
                     max_images: int, num_threads: int = 8) -> tuple[PatchKMeans, int]:
    """A patch_kmeans codebook fitted on the first `max_images` images of these t2i sources that open (in source
    order), each short side to `side` and centre-cropped; returns (codebook, images used). Deterministic for a
    seed and the same inputs."""
    crops: list[np.ndarray] = []
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        for source in sources:
            items = iter(source.items(0, len(source)))
            while len(crops) < max_images:
                chunk = [item for _, item in zip(range(4 * num_threads), items)]
                if not chunk:
                    break
                values = []
                for item in chunk:
                    try:
                        values.append(source.load(item).get("image"))
                    except Skip:
                        continue
                crops += [c for c in pool.map(lambda v: _center_crop(v, side), values) if c is not None]
    crops = crops[:max_images]
    if not crops:
        raise ValueError("no t2i image could be opened to fit the patch_kmeans codebook")
    return PatchKMeans.fit(np.stack(crops), codebook_size, patch, seed), len(crops)


def captions_of(raw: Mapping) -> list[str]:
    """Every non-empty caption of an image-caption input, stripped, in order (all kept: the loader draws one per
    load, as the release's COCO dataset does); raises `Skip` as `prepare.caption_of` does (none, or no image)."""
    value = raw.get("caption")
    captions = []
    for v in list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]:
        try:
            captions.append(prepare.caption_of({"caption": v, "image": None}, None))
        except Skip as e:
            if e.reason != "empty_caption":
                raise
    if not captions:
        raise Skip("empty_caption")
    if "image" not in raw:
        raise Skip("bad_record", "no 'image'")
    return captions


def understanding_counts(templates: Mapping[str, int]) -> dict:
    """metadata.json's "understanding": mmu records per template (`omnimamba_records`), those truncated by reason,
    and the conversations' turns kept and dropped (dropped: cut off at a turn boundary to fit mmu_len)."""
    truncated, turns = {"caption": 0, "conversation": 0}, {"kept": 0, "dropped": 0}
    for template, count in templates.items():
        if template == "caption_truncated":
            truncated["caption"] += count
        elif template.startswith("turns_"):
            kept, _, total = template.removeprefix("turns_").partition("_of_")
            turns["kept"] += int(kept) * count
            if total:
                truncated["conversation"] += count
                turns["dropped"] += (int(total) - int(kept)) * count
    return {"records": dict(sorted(templates.items())), "truncated": truncated, "turns": turns}


def _sync_hosts(name: str):
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class OmniMambaConverter:
    """One loaded OmniMamba input -> records: `t2i` and `mmu` run in worker threads (tokenization under a lock);
    `add_codes` gives a group of t2i records their image codes."""

    kinds = KINDS

    def __init__(self, processor, job, tokenizer, *, tower_size: int, t2i_size: int, num_image_tokens: int,
                 host_batch: int = 1):
        self.processor, self.job, self.tokenizer = processor, job, tokenizer
        self.tower_size, self.t2i_size, self.num_image_tokens = tower_size, t2i_size, num_image_tokens
        self.host_batch = host_batch
        self._lock = threading.Lock()

    def t2i(self, raw: dict, rng: np.random.Generator) -> list[dict]:
        from janusflow_jax.data.processor import resize_short_side_and_crop

        captions = captions_of(raw)
        with self._lock:
            record = t2i_record(self.processor, captions, np.zeros(self.num_image_tokens, np.int32))
        crop = resize_short_side_and_crop(open_image(raw["image"]), self.t2i_size,
                                          rng if self.job.gen_crop == "random" else None)
        record["_pixels"] = np.asarray(crop, np.uint8)  # coded by `add_codes`, then dropped
        return [record]

    def add_codes(self, records: list[dict]) -> list[dict]:
        """The records' image_ids from their crops, one tokenizer call on a batch of `host_batch` (padded with
        zeros: one compiled shape)."""
        if not records:
            return records
        pixels = np.zeros((max(self.host_batch, len(records)), self.t2i_size, self.t2i_size, 3), np.uint8)
        for i, record in enumerate(records):
            pixels[i] = record.pop("_pixels")
        codes = self.tokenizer.encode(pixels)
        for i, record in enumerate(records):
            record["image_ids"] = np.asarray(codes[i], np.int32)
        return records

    @staticmethod
    def _turns(raw: Mapping) -> tuple[str | None, list[tuple[str, str]]]:
        """(caption, []) for the caption-only layout, else (None, [(question, answer), ...])."""
        if "conversations" in raw or "conversation" in raw:
            turns = raw.get("conversations", raw.get("conversation"))
            if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
                raise Skip("bad_conversation", "a conversation must be a list of {from, value} or {role, content}")
            # LLaVA / ShareGPT4V ({"from": "human" | "gpt", "value"}, the release's data) or JanusFlow's manifests
            # ({"role": "user" | "assistant", "content"}, "<image_placeholder>" dropped).
            roles = [_ROLES.get(str(t.get("from", t.get("role", ""))).lower()) for t in turns]
            texts = [t.get("value", t.get("content")) for t in turns]
            if len(turns) % 2:  # a last question without its answer carries no loss (the release's too)
                roles, texts = roles[:-1], texts[:-1]
            if not roles or roles != ["user", "assistant"] * (len(roles) // 2):
                raise Skip("bad_conversation", f"roles {roles}, expected user and assistant turns in turn")
            texts = [t.replace("<image_placeholder>", "") if isinstance(t, str) else t for t in texts]
            pairs = list(zip(texts[::2], texts[1::2]))
        elif "question" in raw or "answer" in raw:
            pairs = [(raw.get("question"), raw.get("answer"))]
        elif "caption" in raw:
            caption = raw["caption"]
            if not isinstance(caption, str) or not caption.strip():
                raise Skip("empty_caption")
            return caption, []
        else:
            raise Skip("bad_record", "needs 'question' + 'answer', 'caption' or 'conversations'")
        for question, answer in pairs:
            if not isinstance(question, str) or not question.strip():
                raise Skip("empty_question")
            if not isinstance(answer, str) or not answer.strip():
                raise Skip("empty_answer")
        return None, pairs

    def mmu(self, raw: dict, rng: np.random.Generator) -> list[dict]:
        del rng  # understanding records are deterministic
        caption, turns = self._turns(raw)
        image = raw.get("image", raw.get("images"))
        if isinstance(image, list):
            if len(image) != 1:
                raise Skip("too_many_images" if image else "bad_record", f"{len(image)} images; one per record")
            image = image[0]
        if image is None:
            raise Skip("bad_record", "no 'image'")
        pixels = resize_naive(open_image(image), self.tower_size)
        with self._lock:
            try:
                if caption is not None:
                    return [caption_record(self.processor, caption, pixels, self.job.mmu_len)]
                return [conversation_record(self.processor, turns, pixels, self.job.mmu_len)]
            except ValueError as e:  # the first turn alone does not fit mmu_len
                raise Skip("too_long", str(e)) from None


class OmniMambaJob:
    """OmniMamba's side of `prepare.run`: the processor, the image tokenizer (fitted first when asked), the converter
    and metadata.json's fields."""

    kinds = KINDS

    def __init__(self, config, sources: Mapping[str, Sequence], out: epath.Path):
        from janusflow_jax.data.omnimamba_processor import OmniMambaProcessor
        from janusflow_jax.models.omnimamba import OmniMambaSystemConfig

        job, self.out = config.prepare, out
        system = OmniMambaSystemConfig.from_dict(config.model.to_dict())
        lm = system.lm
        self.processor = OmniMambaProcessor.from_pretrained(job.tokenizer, caption_length=lm.caption_length)
        if self.processor.vocab_size > lm.text_vocab_size:
            raise ValueError(f"the tokenizer has {self.processor.vocab_size} ids (with [PAD] and the OmniMamba "
                             f"tokens) but the model has {lm.text_vocab_size} text ids")
        self.grid = math.isqrt(lm.num_image_tokens)
        if self.grid ** 2 != lm.num_image_tokens:
            raise ValueError(f"the model's {lm.num_image_tokens} image tokens are not a square grid")
        self.tower_size, self.prompt_len, self.num_image_tokens = (system.vision.image_size, lm.t2i_prompt_length,
                                                                   lm.num_image_tokens)
        self.image_size = self.tower_size  # (JanusFlow's dummy encoder batches use it; OmniMamba has no rounds)
        spec = job.image_tokenizer
        if spec.kind not in IMAGE_TOKENIZERS:
            raise ValueError(f"unknown image tokenizer {spec.kind!r}: set --config.prepare.image_tokenizer.kind to "
                             f"one of {IMAGE_TOKENIZERS}")
        if spec.fit and spec.kind != "patch_kmeans":
            raise ValueError("image_tokenizer.fit fits a patch_kmeans codebook; vq16 is a trained model")
        self.path = spec.path or (str(out / CODEBOOK) if spec.fit else "")
        if not self.path:
            raise ValueError(f"no image tokenizer: set --config.prepare.image_tokenizer.path ({spec.kind}: "
                             + ("an orbax root holding an OmniMamba system)" if spec.kind == "vq16" else
                                "a .npz codebook), or image_tokenizer.fit=True to fit one"))
        if spec.kind == "patch_kmeans":
            if spec.fit:
                self._fit(job, sources.get("t2i", ()), patch=spec.patch or system.vq.downsample_factor,
                          codebook_size=lm.image_vocab_size)
            if not epath.Path(self.path).is_file():
                raise FileNotFoundError(f"patch_kmeans codebook {self.path} does not exist (image_tokenizer.fit=True "
                                        "fits one)")
            self.tokenizer = PatchKMeans.load(self.path)
            self.downsample = self.tokenizer.patch
        else:
            self.tokenizer = VQ16.load(self.path)
            self.downsample = self.tokenizer.config.downsample_factor
        if self.tokenizer.codebook_size != lm.image_vocab_size:
            raise ValueError(f"the {spec.kind} tokenizer {self.path} has {self.tokenizer.codebook_size} codes, the "
                             f"model's image vocabulary {lm.image_vocab_size}")
        self.t2i_size = self.grid * self.downsample
        self.converter = OmniMambaConverter(self.processor, job, self.tokenizer, tower_size=self.tower_size,
                                            t2i_size=self.t2i_size, num_image_tokens=lm.num_image_tokens)

    def _fit(self, job, sources, *, patch: int, codebook_size: int):
        import jax

        if not epath.Path(self.path).is_file() and jax.process_index() == 0:
            if not sources:
                raise ValueError("image_tokenizer.fit needs t2i inputs to fit on (t2i_jsonl or tfds.name)")
            codebook, used = fit_patch_kmeans(
                sources, side=self.grid * patch, patch=patch, codebook_size=codebook_size, seed=job.seed,
                max_images=job.image_tokenizer.fit_images, num_threads=job.num_threads)
            # Whole or absent: a killed fit must leave no codebook that a restart would take as done. Locally it is
            # written under a temporary name and renamed; a gs:// object appears whole when its upload completes
            # (and an object store has no rename: gcsfs would copy and delete).
            if paths.is_remote(self.path):
                codebook.save(self.path)
            else:
                tmp = epath.Path(self.path).parent / f".{epath.Path(self.path).name}.tmp"
                codebook.save(tmp)
                tmp.rename(self.path)
            log.info("fitted a %d-code patch_kmeans codebook on %d t2i images: %s", codebook_size, used, self.path)
        _sync_hosts("janusflow_jax.omnimamba_prepare: codebook fitted")

    def grouped(self, host_batch: int) -> dict:
        self.converter.host_batch = host_batch
        return {"t2i": self.converter.add_codes}

    def summarize(self, config, shards: Sequence) -> dict:
        job, p = config.prepare, self.processor
        totals = prepare.shard_totals(self.out, shards, KINDS)
        lengths, templates = totals.pop("_lengths"), totals.pop("_templates")
        del totals["_images"]
        spec = job.image_tokenizer
        image_tokenizer = {"kind": spec.kind, "path": self.path, "codebook_size": self.tokenizer.codebook_size,
                           "num_image_tokens": self.num_image_tokens, "grid": self.grid, "image_size": self.t2i_size,
                           "downsample": self.downsample}
        if spec.kind == "patch_kmeans":
            image_tokenizer["sha256"] = hashlib.sha256(epath.Path(self.path).read_bytes()).hexdigest()
        return {
            "family": "omnimamba",
            **totals,
            "templates": TEMPLATES,
            "understanding": understanding_counts(templates),
            "tokenizer": {"path": str(job.tokenizer), "vocab_size": p.vocab_size, "pad_id": p.pad_id,
                          "eos_id": p.eos_id, "token_ids": p.token_ids},
            "image": {"size": self.tower_size, "stored": "uint8, resize-naive (bicubic); the loader scales to [0, 1]"},
            "image_tokenizer": image_tokenizer,
            "lengths": {"mmu_len": job.mmu_len, "prompt_len": self.prompt_len, "max_mmu_length": lengths["mmu"]},
            "config": json.loads(config.to_json_best_effort()),
        }
