"""The preparation job: captions, conversations and text -> ArrayRecord shards of ready-to-train records.

One job for every model family (`prepare.family`): the sources, shards, resume, hosts and skip counting below are
shared; each family, registered in data/prepare_families.py, has its record kinds (`FAMILY_KINDS`), its converter
and its metadata fields. "janusflow" (the default) is described here; "omnimamba" (mmu and t2i records, image codes
precomputed) in data/omnimamba_prepare.py.

Inputs (any mix; each JSON-lines file one object per line, image paths relative to the file's folder unless
`image_root` is set):
  generation     {"image": path, "caption": str} lines, and/or a local TFDS dataset read with
                 `tfds.data_source(name, data_dir=..., split=...)` (image / caption feature keys configurable,
                 "a/b" for nested features; a list of captions picks one per record)
  understanding  {"image": path | [paths], "conversation": [{"role": "User"|"Assistant", "content": str}, ...]} or
                 {"image": ..., "question": q, "answer": a}; each "<image_placeholder>" is one image (prepended to the
                 first user turn when the text has none)
  text-only      {"text": str}

Records (one msgpack map per ArrayRecord record; arrays as {"dtype": numpy dtype.str, "shape": [...], "data":
C-order bytes}, strings and ints as themselves; `encode_record` / `decode_record`). S = image size, G = latent side:
  gen   image uint8 [S, S, 3]      the training crop (short side to S, random crop: docs/reference.md §6), kept for REPA's
                                   SigLIP target; the latent below encodes exactly these pixels
        latent_mean float32 [G, G, C], latent_logvar float32 [G, G, C]   the VAE posterior in the model's scaled
                                   units; logvar only for a stochastic space (sdxl_vae)
        prompt_ids int32 [l]       BOS + prompt in the "sft" or "pretrain" template (mixed at `sft_fraction`)
        template str, caption str
  und   images uint8 [n, S, S, 3]  the official understanding pixels BEFORE rescale/normalise (long side to S, padded
                                   with the mean colour); `normalize_pixels` with metadata["image"] gives back exactly
                                   `Processor.preprocess_understanding` (bit-identical, tested)
        input_ids, loss_mask, image_token_mask int32 [T]   as `Processor.encode_understanding`
  text  input_ids, loss_mask int32 [T]   BOS + text + EOS; a text longer than seq_len is split into seq_len pieces
                                   (`text_overflow="split"`; a continuation piece has no loss on its first token)

Why moments and not a latent: the rectified-flow target x should be a fresh posterior draw each time an image is
seen, as the SD3 and REPA training codes draw it per step; one stored draw would freeze that noise for the whole run,
and the mean alone drops it. Moments cost twice a latent, but the uint8 crop dominates a record (442 KB at 384 px vs
2 x 37 KB for 48 x 48 x 4 fp32), and the loader draws mean + exp(logvar / 2) eps with a seeded per-example RNG.

Output: <out>/{gen,und,text}/<kind>-<i>-of-<n>.array_record, each followed by <kind>-<i>-of-<n>.json (the shard's
done-marker: record and skip counts), and <out>/metadata.json (counts, skips by reason, templates, tokenizer, latent
space, image statistics, lengths, the config). `<out>` must be one directory every host sees (checked on several
hosts): a shared file system or gs://. Inputs (manifests, images, the tokenizer) may be on gs:// too.

Running: the latent encoder is jit-compiled once and runs on batches sharded over a 1-D mesh of all devices of all
hosts; shards are dealt to hosts round-robin (jax.process_index()), and the generation shards go in rounds so that
every host runs the same number of encoder calls (one SPMD program). Resumable: every shard is written to a temporary
file and renamed (on gs://, which has neither renames nor ArrayRecord's writer: written locally, then uploaded as one
object that appears whole), then its marker; a restart skips shards with a marker and, because every random choice
comes from a per-record RNG seeded by (seed, type, record index), rewrites a lost shard byte-identically (same
device count). A corrupt, truncated, missing or unreadable image, an empty caption or text, a malformed line or
conversation and an over-long example are skipped and counted by reason, never fatal.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from etils import epath

from janusflow_jax import hosts as hosts_lib
from janusflow_jax import paths
from janusflow_jax.data import prepare_families

from janusflow_jax.data.records import METADATA, RECORD_FORMAT, encode_record, normalize_pixels

# The model family a job prepares for (`prepare.family`) -> its record kinds, each read from `<kind>_jsonl`, and the
# kind a TFDS caption dataset feeds: registered in data/prepare_families.py (this job names no family).
KINDS = prepare_families.FAMILIES["janusflow"].kinds  # JanusFlow's record kinds
FAMILY_KINDS = {name: f.kinds for name, f in prepare_families.FAMILIES.items()}
CAPTION_KIND = {name: f.caption_kind for name, f in prepare_families.FAMILIES.items()}
FORMAT_VERSION = 1
TEMPLATES = {"sft": "User: {prompt}\n\nAssistant:", "pretrain": "{prompt}"}
# Config fields that do not change any output byte (so a resume may change them), and per family the fields its job
# never reads (also left out of its fingerprint: adding OmniMamba's fields kept JanusFlow datasets resumable).
_NON_OUTPUT_FIELDS = ("out", "num_threads")
_UNREAD_FIELDS = {name: f.unread_fields for name, f in prepare_families.FAMILIES.items()}

log = logging.getLogger(__name__)


class Skip(Exception):
    """An input that is not turned into a record; `reason` is its counter's name in metadata.json."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _to_uint8(x: np.ndarray, mean, std, rescale_factor: float, do_normalize: bool) -> np.ndarray:
    """Inverse of `normalize_pixels` on its image (exact: the forward error is far below half a grey level)."""
    unit = x * np.asarray(std, np.float64) + np.asarray(mean, np.float64) if do_normalize else x.astype(np.float64)
    return np.clip(np.round(unit / rescale_factor), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------- sources
class JsonLinesSource:
    """A JSON-lines file; blank lines are not items. One scan finds the byte offset of every `chunk`-th item, so a
    shard of `chunk` items is read with one seek."""

    def __init__(self, path: str, kind: str, chunk: int, image_root: str = ""):
        self.path, self.kind, self.chunk = os.fspath(path), kind, chunk
        if not epath.Path(self.path).is_file():
            raise FileNotFoundError(f"{kind} manifest {self.path} does not exist")
        self.image_root = image_root or os.path.dirname(paths.resolve(self.path))
        self.name = self.path
        self._offsets, n, position = [], 0, 0
        with epath.Path(self.path).open("rb") as f:  # local or gs://
            for line in f:
                if line.strip():
                    if n % chunk == 0:
                        self._offsets.append(position)
                    n += 1
                position += len(line)
        self._length = n

    def __len__(self) -> int:
        return self._length

    def items(self, start: int, stop: int) -> Iterator[bytes]:
        """The raw lines of items [start, stop); start is a multiple of `chunk`."""
        with epath.Path(self.path).open("rb") as f:
            f.seek(self._offsets[start // self.chunk])
            count = 0
            for line in f:
                if count == stop - start:
                    return
                if line.strip():
                    count += 1
                    yield line

    def load(self, item: bytes) -> dict:
        try:
            raw = json.loads(item)
        except ValueError as e:
            raise Skip("bad_json", str(e)) from None
        if not isinstance(raw, dict):
            raise Skip("bad_record", f"a line must hold a JSON object, got {type(raw).__name__}")
        for key in ("image", "images"):
            if key in raw:
                raw[key] = self._resolve(raw[key])
        return raw

    def _resolve(self, value):
        if isinstance(value, list):
            return [self._resolve(v) for v in value]
        if not isinstance(value, str) or not value:
            raise Skip("bad_record", f"an image must be a non-empty path, got {value!r}")
        return value if os.path.isabs(value) or paths.is_remote(value) else os.path.join(self.image_root, value)


class TfdsSource:
    """A local TFDS dataset read through `tfds.data_source` (random access; prepared in array_record format)."""

    def __init__(self, name: str, data_dir: str, split: str, image_key: str, caption_key: str, kind: str = "gen"):
        import tensorflow_datasets as tfds

        self.kind, self.name = kind, f"tfds:{name}/{split}"
        self.image_key, self.caption_key = image_key, caption_key
        try:
            self._source = tfds.data_source(name, data_dir=data_dir or None, split=split)
        except Exception as e:  # TFDS raises many types (DatasetNotFoundError, ValueError, AssertionError, ...)
            raise ValueError(f"cannot open TFDS dataset {name!r} split {split!r} in {data_dir or 'the default dir'}: "
                             f"{type(e).__name__}: {e}") from e

    def __len__(self) -> int:
        return len(self._source)

    def items(self, start: int, stop: int) -> Iterator[int]:
        return iter(range(start, stop))

    def load(self, item: int) -> dict:
        example = self._source[item]
        return {"image": _feature(example, self.image_key), "caption": _feature(example, self.caption_key)}


def _feature(example: Mapping, key: str):
    value = example
    for part in key.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            raise Skip("bad_record", f"the TFDS example has no feature {key!r}")
        value = value[part]
    return value


@dataclasses.dataclass(frozen=True)
class Shard:
    kind: str
    index: int  # within its kind
    count: int  # shards of its kind
    source: Any
    start: int  # items [start, stop) of `source`
    stop: int
    first_item: int  # index of its first item among all items of its kind (seeds the per-record RNGs)

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.index:05d}-of-{self.count:05d}"

    def __len__(self) -> int:
        return self.stop - self.start


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def open_sources(job, kinds: Sequence[str] = KINDS, caption_kind: str = "gen") -> dict[str, list]:
    """The sources the job config names for these record kinds (`<kind>_jsonl`; TFDS feeds `caption_kind`), per kind
    (in config order)."""
    sources: dict[str, list] = {kind: [] for kind in kinds}
    for kind in kinds:
        for path in _split(getattr(job, f"{kind}_jsonl")):
            sources[kind].append(JsonLinesSource(path, kind, job.records_per_shard, job.image_root))
    if job.tfds.name:
        sources[caption_kind].append(TfdsSource(job.tfds.name, job.tfds.data_dir, job.tfds.split, job.tfds.image_key,
                                                job.tfds.caption_key, caption_kind))
    return sources


def plan_shards(sources: Mapping[str, Sequence], records_per_shard: int, kinds: Sequence[str] = KINDS) -> list[Shard]:
    """All shards of all kinds, in a fixed order (`kinds`' order; sources in order); a shard never spans sources."""
    shards = []
    for kind in kinds:
        ranges, first = [], 0
        for source in sources.get(kind, ()):
            for start in range(0, len(source), records_per_shard):
                stop = min(start + records_per_shard, len(source))
                ranges.append((source, start, stop, first + start))
            first += len(source)
        shards += [Shard(kind, i, len(ranges), *r) for i, r in enumerate(ranges)]
    return shards


# ----------------------------------------------------------------------------------------------- conversion
def open_image(value):
    """A manifest's image (a path, local or gs://, or a decoded TFDS uint8 array) as an RGB PIL image; raises `Skip`
    ("missing_image", "unreadable_image", "corrupt_image", "bad_image", "bad_record") for one that cannot be."""
    from PIL import Image

    from janusflow_jax.data.processor import ImageError, load_image

    if isinstance(value, np.ndarray):  # a decoded TFDS image
        if value.dtype != np.uint8 or value.ndim not in (2, 3):
            raise Skip("bad_image", f"image array of dtype {value.dtype} and shape {value.shape}")
        value = Image.fromarray(value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value)
    try:
        return load_image(value)
    except FileNotFoundError as e:
        raise Skip("missing_image", str(e)) from None
    except ImageError as e:
        # load_image wraps every failure; an absent or unreadable file surfaces as its OSError cause.
        cause = e.__cause__
        if isinstance(cause, FileNotFoundError):
            raise Skip("missing_image", str(e)) from None
        if isinstance(cause, (PermissionError, IsADirectoryError)):
            raise Skip("unreadable_image", str(e)) from None
        raise Skip("corrupt_image", str(e)) from None
    except OSError as e:
        raise Skip("unreadable_image", str(e)) from None
    except TypeError as e:  # not a path, bytes or image (e.g. a number in the manifest)
        raise Skip("bad_record", str(e)) from None


def caption_of(raw: Mapping, rng: np.random.Generator) -> str:
    """The stripped caption of an image-caption input (several captions: one per record, chosen by its RNG; TFDS
    bytes decoded); raises `Skip` ("bad_record", "empty_caption") for none, or for an input without an image."""
    caption = raw.get("caption")
    if isinstance(caption, (list, tuple, np.ndarray)):
        caption = caption[int(rng.integers(len(caption)))] if len(caption) else ""
    if isinstance(caption, (bytes, np.bytes_)):
        caption = bytes(caption).decode("utf-8", errors="replace")
    if not isinstance(caption, str):
        raise Skip("bad_record", f"caption must be a string, got {type(caption).__name__}")
    caption = caption.strip()
    if not caption:
        raise Skip("empty_caption")
    if "image" not in raw:
        raise Skip("bad_record", "no 'image'")
    return caption


class _Converter:
    """Turns one loaded JanusFlow input into records: a method per kind (runs in worker threads; tokenization is
    serialised by a lock because a Hugging Face fast tokenizer must not be entered from two threads at once)."""

    kinds = KINDS

    def __init__(self, processor, job, image_size: int):
        self.processor, self.job, self.size = processor, job, image_size
        self._lock = threading.Lock()

    def gen(self, raw: dict, rng: np.random.Generator) -> list[dict]:
        from janusflow_jax.data.processor import resize_short_side_and_crop

        caption = caption_of(raw, rng)
        template = "sft" if rng.random() < self.job.sft_fraction else "pretrain"
        with self._lock:
            prompt_ids = self.processor.encode_generation_prompt(caption, template)
        if len(prompt_ids) > self.job.prompt_len:
            raise Skip("prompt_too_long", f"{len(prompt_ids)} > prompt_len {self.job.prompt_len}")
        image = open_image(raw["image"])
        crop = resize_short_side_and_crop(image, self.size, rng if self.job.gen_crop == "random" else None)
        pixels = np.asarray(crop, np.uint8)
        # "_vae_input" (the crop in [-1, 1], as preprocess_generation computes it) is made here, in the worker
        # threads, and taken out again before the record is written.
        return [dict(image=pixels, prompt_ids=np.asarray(prompt_ids, np.int32), template=template, caption=caption,
                     _vae_input=normalize_pixels(pixels, (0.5,) * 3, (0.5,) * 3))]

    def _conversation(self, raw: dict, num_images: int) -> list[dict]:
        from janusflow_jax.data.processor import ASSISTANT, IMAGE_TAG, USER

        if "conversation" in raw:
            conversation = raw["conversation"]
            if not isinstance(conversation, list) or not all(isinstance(m, dict) for m in conversation):
                raise Skip("bad_conversation", "'conversation' must be a list of {role, content} objects")
            roles = {"user": USER, "assistant": ASSISTANT}
            conversation = [{"role": roles.get(str(m.get("role", "")).lower(), m.get("role")),
                             "content": m.get("content")} for m in conversation]
        elif "question" in raw and "answer" in raw:
            conversation = [{"role": USER, "content": raw["question"]}, {"role": ASSISTANT, "content": raw["answer"]}]
        else:
            raise Skip("bad_record", "needs 'conversation' or 'question' + 'answer'")
        if not any(isinstance(m["content"], str) and IMAGE_TAG in m["content"] for m in conversation):
            if conversation and isinstance(conversation[0]["content"], str) and num_images:
                conversation[0] = {**conversation[0],
                                   "content": f"{IMAGE_TAG}\n" * num_images + conversation[0]["content"]}
        return conversation

    def und(self, raw: dict, rng: np.random.Generator) -> list[dict]:
        del rng  # understanding preprocessing is deterministic
        paths = raw.get("image", raw.get("images", []))
        paths = paths if isinstance(paths, list) else [paths]
        conversation = self._conversation(raw, len(paths))
        try:
            with self._lock:
                encoded = self.processor.encode_understanding(conversation, system_prompt=self.job.system_prompt)
        except ValueError as e:
            raise Skip("bad_conversation", str(e)) from None
        if encoded["num_images"] != len(paths):
            raise Skip("image_count_mismatch", f"{encoded['num_images']} placeholders for {len(paths)} images")
        if len(paths) > self.job.max_images_per_record:
            raise Skip("too_many_images", f"{len(paths)} > max_images_per_record {self.job.max_images_per_record}")
        if len(encoded["input_ids"]) > self.job.seq_len:
            raise Skip("too_long", f"{len(encoded['input_ids'])} tokens > seq_len {self.job.seq_len}")
        p = self.processor
        images = np.zeros((len(paths), self.size, self.size, 3), np.uint8)
        if paths:
            pixels = p.preprocess_understanding([open_image(path) for path in paths])
            images = _to_uint8(pixels, p.image_mean, p.image_std, p.rescale_factor, p.do_normalize)
        return [dict(images=images, input_ids=encoded["input_ids"], loss_mask=encoded["loss_mask"],
                     image_token_mask=encoded["image_token_mask"])]

    def text(self, raw: dict, rng: np.random.Generator) -> list[dict]:
        del rng
        text = raw.get("text")
        if not isinstance(text, str):
            raise Skip("bad_record", "needs a string 'text'")
        if not text.strip():
            raise Skip("empty_text")
        with self._lock:
            encoded = self.processor.encode_text(text)
        ids, loss = encoded["input_ids"], encoded["loss_mask"]
        n = self.job.seq_len
        if len(ids) <= n:
            return [dict(input_ids=ids, loss_mask=loss)]
        if self.job.text_overflow == "skip":
            raise Skip("too_long", f"{len(ids)} tokens > seq_len {n}")
        pieces = []
        for start in range(0, len(ids), n):
            piece_loss = loss[start:start + n].copy()
            piece_loss[0] = 0  # the piece's first token has no in-row predecessor
            if len(piece_loss) > 1:
                pieces.append(dict(input_ids=ids[start:start + n].copy(), loss_mask=piece_loss))
        return pieces


def _convert_one(converter: _Converter, shard: Shard, seed: int, offset: int, item) -> tuple[list[dict], str | None]:
    """(records, None) or ([], skip reason) for item number `offset` of `shard`. Never raises for bad input."""
    rng = np.random.default_rng([seed, converter.kinds.index(shard.kind), shard.first_item + offset])
    try:
        raw = shard.source.load(item)
        return getattr(converter, shard.kind)(raw, rng), None
    except Skip as e:
        log.debug("skipped %s item %d: %s", shard.name, offset, e)
        return [], e.reason
    except Exception as e:  # an input that breaks a library in an unforeseen way is still only one bad input
        log.warning("skipped %s item %d: %s: %s", shard.name, offset, type(e).__name__, e)
        return [], f"error_{type(e).__name__}"


# ------------------------------------------------------------------------------------------------ shard writing
class _ShardStats:
    def __init__(self):
        self.records, self.items = 0, 0
        self.skipped: collections.Counter = collections.Counter()
        self.max_length = 0  # longest token sequence (und/text) or prompt (gen)
        self.max_images = 0
        self.templates: collections.Counter = collections.Counter()

    def add(self, record: dict):
        self.records += 1
        ids = record.get("input_ids", record.get("prompt_ids"))
        self.max_length = max(self.max_length, len(ids))
        if "images" in record:
            self.max_images = max(self.max_images, len(record["images"]))
        if "template" in record:
            self.templates[record["template"]] += 1

    def to_json(self, fingerprint: str) -> dict:
        return dict(items=self.items, records=self.records, skipped=dict(sorted(self.skipped.items())),
                    max_length=self.max_length, max_images=self.max_images,
                    templates=dict(sorted(self.templates.items())), fingerprint=fingerprint)


def _sync(path: Path):
    # Flushed to disk before the rename: after a crash a name is either absent or complete.
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_write_text(path: epath.Path, text: str):
    if paths.is_remote(path):  # an object appears whole when its upload completes
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _sync(tmp)
    os.replace(tmp, path)


class _Writer:
    """An ArrayRecord file written under a temporary name and renamed into place on `commit`; for a gs:// `path`
    (ArrayRecord writes local files only) the temporary file is local (in `scratch`) and `commit` uploads it."""

    def __init__(self, path: epath.Path, options: str, scratch: str | None = None):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = path
        self.tmp = Path(scratch, path.name) if paths.is_remote(path) else path.with_name(f".{path.name}.tmp")
        self._writer = ArrayRecordWriter(str(self.tmp), options)

    def write(self, record: dict):
        self._writer.write(encode_record(record))

    def commit(self):
        self._writer.close()
        if paths.is_remote(self.path):
            paths.copy_file(self.tmp, self.path)
            os.unlink(self.tmp)
            return
        _sync(self.tmp)
        os.replace(self.tmp, self.path)


@dataclasses.dataclass
class _Context:
    job: Any
    out: epath.Path
    converter: _Converter
    pool: concurrent.futures.ThreadPoolExecutor
    fingerprint: str
    progress: Any
    encode: Callable | None = None  # host batch [b, S, S, 3] in [-1, 1] -> (mean, logvar | None)
    host_batch: int = 0
    image_size: int = 0
    scratch: str | None = None  # a local directory for shards bound for gs://
    # Kinds other than "gen" whose records get a device pass per group of `host_batch` items (OmniMamba's t2i codes):
    # kind -> records -> records. Those passes run on this host's devices alone (no SPMD rounds).
    grouped: Mapping[str, Callable] = dataclasses.field(default_factory=dict)


def _futures(ctx: _Context, shard: Shard, size: int) -> Iterator[list[concurrent.futures.Future]]:
    """Conversion futures in groups of `size` items, submitted one group ahead so loading overlaps the consumer."""
    items = enumerate(shard.source.items(shard.start, shard.stop))
    seed = ctx.job.seed

    def submit_group():
        group = []
        for offset, item in items:
            group.append(ctx.pool.submit(_convert_one, ctx.converter, shard, seed, offset, item))
            if len(group) == size:
                break
        return group

    ahead = submit_group()
    while ahead:
        current, ahead = ahead, submit_group()
        yield current


def _write_shard(ctx: _Context, shard: Shard, encoder_calls: int = 0):
    """Writes one shard (records in item order) and then its marker. Generation shards make exactly
    `encoder_calls` encoder calls (padding with dummy batches) so all hosts stay in step."""
    directory = ctx.out / shard.kind
    writer = _Writer(directory / f"{shard.name}.array_record", ctx.job.array_record_options, ctx.scratch)
    stats = _ShardStats()
    batched = shard.kind == "gen" or shard.kind in ctx.grouped
    group_size = ctx.host_batch if batched else max(1, 4 * ctx.job.num_threads)
    calls = 0
    for group in _futures(ctx, shard, group_size):
        results = [f.result() for f in group]
        stats.items += len(results)
        for _, reason in results:
            if reason is not None:
                stats.skipped[reason] += 1
        records = [r for recs, _ in results for r in recs]
        if shard.kind == "gen":
            records = _add_latents(ctx, records)
            calls += 1
        elif shard.kind in ctx.grouped:
            records = ctx.grouped[shard.kind](records)
        for record in records:
            writer.write(record)
            stats.add(record)
        ctx.progress.update(len(results))
    for _ in range(encoder_calls - calls):
        ctx.encode(np.zeros((ctx.host_batch, ctx.image_size, ctx.image_size, 3), np.float32))
    writer.commit()
    _atomic_write_text(directory / f"{shard.name}.json", json.dumps(stats.to_json(ctx.fingerprint), indent=1))


def _add_latents(ctx: _Context, records: list[dict]) -> list[dict]:
    batch = np.zeros((ctx.host_batch, ctx.image_size, ctx.image_size, 3), np.float32)
    for i, record in enumerate(records):
        batch[i] = record.pop("_vae_input")
    mean, logvar = ctx.encode(batch)
    for i, record in enumerate(records):
        record["latent_mean"] = np.asarray(mean[i], np.float32)
        if logvar is not None:
            record["latent_logvar"] = np.asarray(logvar[i], np.float32)
    return records


# ------------------------------------------------------------------------------------------------------- driver
def _sizes(config) -> tuple[int, int, int, Any]:
    from janusflow_jax.models.config import JanusFlowConfig

    model = JanusFlowConfig.from_dict(config.model.to_dict())
    return model.und_encoder.image_size, model.latent_size, model.und_encoder.num_patches, model


class JanusFlowJob:
    """JanusFlow's side of the job: the processor, the latent space, the converter and metadata.json's fields.
    (Every family's side has `kinds`, `converter`, `image_size`, `grouped(host_batch)` and `summarize`; `encoder`
    only where the family has "gen" shards, the ones `host_plan` runs in SPMD rounds.)"""

    kinds = KINDS

    def __init__(self, config):
        from janusflow_jax.data import latents
        from janusflow_jax.data.processor import Processor

        job = config.prepare
        self.image_size, latent_size, self.num_image_tokens, model = _sizes(config)
        self.processor = Processor.from_pretrained(job.tokenizer, num_image_tokens=self.num_image_tokens,
                                                   image_size=self.image_size)
        if self.processor.vocab_size > model.llm.vocab_size:
            raise ValueError(f"the tokenizer has {self.processor.vocab_size} ids but the model's vocab_size is "
                             f"{model.llm.vocab_size}")
        self.space = latents.make_latent_space(job.latent.kind, image_size=self.image_size, latent_size=latent_size,
                                               vae_path=job.latent.vae_path or None,
                                               scaling_factor=job.latent.scaling_factor, dtype=job.latent.dtype)
        channels = (model.gen_encoder.in_channels, model.gen_decoder.out_channels)
        if channels != (self.space.latent_channels,) * 2:
            raise ValueError(f"latent space {self.space.kind} has {self.space.latent_channels} channels, but the "
                             f"model's gen_encoder.in_channels / gen_decoder.out_channels are {channels}")
        self.converter = _Converter(self.processor, job, self.image_size)

    def encoder(self, mesh) -> Callable:
        """The latent encoder, jit-compiled over `mesh` (all devices of all hosts)."""
        from janusflow_jax.data import latents

        return latents.batch_sharded(self.space.place(mesh).moments, mesh)

    def grouped(self, host_batch: int) -> dict:
        del host_batch  # generation latents go through the SPMD rounds instead
        return {}

    def summarize(self, config, shards: Sequence[Shard]) -> dict:
        return _summarize(config, shards, self.processor, self.space, self.image_size, self.num_image_tokens)


def _family_job(config, sources: Mapping[str, Sequence], out: epath.Path):
    return prepare_families.of(config.prepare.family).job(config, sources, out)


def _check_job(config):
    job = config.prepare
    family = prepare_families.of(job.family)
    if not job.out:
        raise ValueError("no output directory: set --config.prepare.out")
    if not job.tokenizer:
        raise ValueError("no tokenizer: set --config.prepare.tokenizer to a directory with tokenizer.json "
                         + family.tokenizer_hint)
    others = [f"{kind}_jsonl" for family, kinds in FAMILY_KINDS.items() if family != job.family for kind in kinds
              if kind not in FAMILY_KINDS[job.family] and getattr(job, f"{kind}_jsonl")]
    if others:
        raise ValueError(f"{', '.join(others)} are not read by a job of family {job.family!r} (it reads "
                         f"{', '.join(f'{k}_jsonl' for k in FAMILY_KINDS[job.family])}); set "
                         "--config.prepare.family, or use the family's variant of configs/prepare_data.py")
    model_key = family.model_key
    if model_key not in config.model:
        raise ValueError(f"config.model is not a {job.family} model (no '{model_key}'): use the family's variant of "
                         "configs/prepare_data.py")
    if not 0.0 <= job.sft_fraction <= 1.0:
        raise ValueError(f"sft_fraction must lie in [0, 1], got {job.sft_fraction}")
    if job.gen_crop not in ("random", "center"):
        raise ValueError(f"gen_crop must be 'random' or 'center', got {job.gen_crop!r}")
    if job.text_overflow not in ("split", "skip"):
        raise ValueError(f"text_overflow must be 'split' or 'skip', got {job.text_overflow!r}")
    for field in ("records_per_shard", "encode_batch_per_device", "num_threads", "seq_len", "prompt_len", "mmu_len"):
        if getattr(job, field) < 1:
            raise ValueError(f"{field} must be >= 1, got {getattr(job, field)}")


def _fingerprint(job) -> str:
    ignored = _NON_OUTPUT_FIELDS + _UNREAD_FIELDS[job.family]
    values = {k: v for k, v in json.loads(job.to_json_best_effort()).items() if k not in ignored}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _is_done(out: epath.Path, shard: Shard, fingerprint: str) -> bool:
    marker = out / shard.kind / f"{shard.name}.json"
    if not marker.is_file() or not (out / shard.kind / f"{shard.name}.array_record").is_file():
        return False
    found = json.loads(marker.read_text()).get("fingerprint")
    if found != fingerprint:
        raise ValueError(f"{out} holds shards prepared with a different config (fingerprint {found}, now "
                         f"{fingerprint}); use another --config.prepare.out or delete {out}")
    return True


def _agree(flags: np.ndarray) -> np.ndarray:
    """Host 0's view, on every host: all hosts then plan the same rounds."""
    import jax

    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(flags))


def host_plan(shards: Sequence[Shard], done: Sequence[bool], host: int, hosts: int,
              host_batch: int) -> tuple[list[tuple[int | None, int]], list[int]]:
    """What `host` of `hosts` does: (generation rounds [(shard index or None, encoder calls)], other shard indices).

    Generation shard gen[r * hosts + h] goes to host h in round r, and every host makes that round's largest number of
    encoder calls (batches of `host_batch` images; a host without work in the round feeds dummy batches), so all hosts
    run the same SPMD program the same number of times. Rounds whose shards are all done are dropped by every host
    alike. Understanding and text shards need no device and are dealt round-robin.
    """
    gen = [i for i, s in enumerate(shards) if s.kind == "gen"]
    rest = [i for i, s in enumerate(shards) if s.kind != "gen"]
    rounds = []
    for r in range(0, len(gen), hosts):
        members = gen[r:r + hosts]
        calls = max([math.ceil(len(shards[i]) / host_batch) for i in members if not done[i]], default=0)
        if calls:
            rounds.append((members[host] if host < len(members) else None, calls))
    return rounds, [i for k, i in enumerate(rest) if k % hosts == host]


def run(config, progress: bool = True) -> dict:
    """Runs the job `config.prepare` for the model `config.model` (of the family `config.prepare.family`); returns
    the summary `summary_line` prints.

    JanusFlow: image size, latent grid and image tokens come from the model config; its gen_encoder.in_channels and
    gen_decoder.out_channels must equal the latent space's channels. OmniMamba: data/omnimamba_prepare.py.
    """
    import jax
    from jax.sharding import Mesh
    from tqdm.auto import tqdm

    start_time = time.perf_counter()
    job = config.prepare
    _check_job(config)
    paths.check_access(*paths.config_paths(config))
    hosts_lib.check_same_config(config.to_json_best_effort(), "preparation config")
    hosts_lib.check_shared_directory(job.out, "output directory")
    kinds = FAMILY_KINDS[job.family]
    sources = open_sources(job, kinds, CAPTION_KIND[job.family])
    if not any(sources.values()):
        raise ValueError("no inputs: set " + ", ".join(f"--config.prepare.{kind}_jsonl" for kind in kinds)
                         + " or tfds.name")
    shards = plan_shards(sources, job.records_per_shard, kinds)
    out = paths.user_path(job.out)
    for kind in kinds:
        (out / kind).mkdir(parents=True, exist_ok=True)
    family = _family_job(config, sources, out)
    fingerprint = _fingerprint(job)
    done = _agree(np.array([_is_done(out, s, fingerprint) for s in shards], np.int32)).astype(bool)
    host, hosts = jax.process_index(), jax.process_count()

    host_batch = job.encode_batch_per_device * jax.local_device_count()
    rounds, mine_rest = host_plan(shards, done, host, hosts, host_batch)
    gen = [i for i, s in enumerate(shards) if s.kind == "gen"]
    mine = [i for k, i in enumerate(gen) if k % hosts == host] + mine_rest  # for the progress bar
    total = sum(len(shards[i]) for i in mine)
    finished = sum(len(shards[i]) for i in mine if done[i])

    encode = None
    if rounds:
        encode = family.encoder(Mesh(np.array(jax.devices()), ("data",)))
    image_size = family.image_size
    tty = sys.stderr.isatty()
    with concurrent.futures.ThreadPoolExecutor(job.num_threads) as pool, \
            tqdm(total=total, initial=finished, unit="item", desc=f"prepare (host {host})", disable=not progress,
                 mininterval=1.0 if tty else 30.0, dynamic_ncols=True) as bar, \
            tempfile.TemporaryDirectory(prefix="janusflow-shards-") as scratch:
        ctx = _Context(job, out, family.converter, pool, fingerprint, bar, encode, host_batch, image_size,
                       scratch if paths.is_remote(out) else None, family.grouped(host_batch))
        written = 0
        for index, calls in rounds:
            if index is not None and not done[index]:
                _write_shard(ctx, shards[index], calls)
                written += 1
            else:  # this host has nothing (left) in this round but its peers do: stay in step
                for _ in range(calls):
                    encode(np.zeros((host_batch, image_size, image_size, 3), np.float32))
        for index in mine_rest:
            if not done[index]:
                _write_shard(ctx, shards[index])
                written += 1
    if hosts > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("janusflow_jax.prepare: all shards written")
    summary = family.summarize(config, shards)
    if host == 0:
        for kind in kinds if not paths.is_remote(out) else ():  # temporary files of a killed run (gs://: none)
            for stale in (out / kind).glob(".*.tmp"):
                stale.unlink()
        _atomic_write_text(out / METADATA, json.dumps(summary, indent=1, sort_keys=False) + "\n")
    return dict(summary, shards_written=written, shards_reused=int(sum(done[i] for i in mine)),
                seconds=time.perf_counter() - start_time)


def shard_totals(out: epath.Path, shards: Sequence[Shard], kinds: Sequence[str]) -> dict:
    """What every family's metadata.json holds, from the shards' markers: format, counts, skips by reason, shard
    files, sources per kind; and `_lengths` (longest ids per kind), `_images`, `_templates` for the family's own
    fields (popped by the caller)."""
    counts, skipped, files, lengths = ({kind: 0 for kind in kinds}, {kind: collections.Counter() for kind in kinds},
                                       {kind: [] for kind in kinds}, {kind: 0 for kind in kinds})
    max_images, templates = 0, collections.Counter()
    for shard in shards:
        marker = json.loads((out / shard.kind / f"{shard.name}.json").read_text())
        counts[shard.kind] += marker["records"]
        skipped[shard.kind].update(marker["skipped"])
        files[shard.kind].append(f"{shard.kind}/{shard.name}.array_record")
        lengths[shard.kind] = max(lengths[shard.kind], marker["max_length"])
        max_images = max(max_images, marker["max_images"])
        templates.update(marker["templates"])
    return {"format_version": FORMAT_VERSION, "record_format": RECORD_FORMAT, "counts": counts,
            "skipped": {kind: dict(sorted(c.items())) for kind, c in skipped.items()}, "shards": files,
            "sources": {kind: [s.name for s in dict.fromkeys(sh.source for sh in shards if sh.kind == kind)]
                        for kind in kinds},
            "_lengths": lengths, "_images": max_images, "_templates": templates}


def _summarize(config, shards: Sequence[Shard], processor, space, image_size: int, num_image_tokens: int) -> dict:
    job = config.prepare
    totals = shard_totals(paths.user_path(job.out), shards, KINDS)
    max_length, max_images, templates = totals.pop("_lengths"), totals.pop("_images"), totals.pop("_templates")
    p = processor
    return {
        "family": "janusflow",
        **totals,
        "templates": {"generation": TEMPLATES, "sft_fraction": job.sft_fraction,
                      "generation_counts": dict(sorted(templates.items())),
                      "understanding": "{system}\n\nUser: {question}\n\nAssistant: {answer}<｜end▁of▁sentence｜>",
                      "system_prompt": p.system_prompt if job.system_prompt is None else job.system_prompt},
        "tokenizer": {"path": str(job.tokenizer), "vocab_size": p.vocab_size, "bos_id": p.bos_id, "eos_id": p.eos_id,
                      "pad_id": p.pad_id, "image_id": p.image_id, "image_start_id": p.image_start_id,
                      "image_end_id": p.image_end_id},
        "image": {"size": image_size, "num_image_tokens": num_image_tokens, "mean": p.image_mean, "std": p.image_std,
                  "rescale_factor": p.rescale_factor, "do_normalize": p.do_normalize},
        "latent": {**space.describe(), "latent_size": image_size // space.downsample,
                   "stored": ("latent_mean, latent_logvar (posterior moments, scaled)" if space.stochastic
                              else "latent_mean (exact map, scaled)")},
        "lengths": {"seq_len": job.seq_len, "prompt_len": job.prompt_len, "max_und_length": max_length["und"],
                    "max_text_length": max_length["text"], "max_prompt_length": max_length["gen"],
                    "max_images_per_record": max_images},
        "config": json.loads(config.to_json_best_effort()),
    }


def summary_line(summary: Mapping[str, Any]) -> str:
    """One line for the end of a run: records per type, skips by reason, shards written/reused, time."""
    kinds = list(summary["counts"])
    counts = " / ".join(f"{summary['counts'][k]} {k}" for k in kinds)
    skips = "; ".join(f"{k}: " + ", ".join(f"{r}={n}" for r, n in summary["skipped"][k].items())
                      for k in kinds if summary["skipped"][k]) or "none"
    return (f"prepared {counts} records in {summary['config']['prepare']['out']} "
            f"({summary['shards_written']} shards written, {summary['shards_reused']} reused) in "
            f"{summary['seconds']:.1f} s; skipped: {skips}")
