"""Phase A for the generation benchmarks (`launch.evaluate gen`): images for a benchmark's own prompt file, in the
layout its official scorer reads, and a manifest of every sampler setting and seed.

  suite    prompt file (--data)                                  OUT/images/ (the folder to give the official scorer)
  geneval  GenEval's evaluation_metadata.jsonl (a JSON object a   NNNNN/metadata.jsonl (that line; NNNNN = its
           line, with "prompt")                                  0-based position), NNNNN/samples/0000.png, 0001.png,
                                                                 ..., NNNNN/grid.png (GenEval's README layout; its
                                                                 evaluate_images.py reads every samples/<digits>.png)
  dpg      DPG-Bench's prompts/ folder (<item_id>.txt each) or   <item_id>.png: the prompt's images as a 2 x 2 grid
           dpg_bench.csv (first `text` of each item_id)          (compute_dpg_bench.py crops --pic-num tiles of
                                                                 --resolution px, row-major)
  mjhq     MJHQ-30K's meta_data.json ({id: {"prompt",            <category>/<id>.png (clean-fid reads the folder
           "category"}})                                         recursively; one image per prompt)
Defaults (the paper's sampler): CFG w = 2, 30 Euler steps, the SFT prompt template ("User: {prompt}\\n\\nAssistant:"),
4 images per prompt (GenEval's n_samples, DPG-Bench's 2 x 2 grid) and 1 for MJHQ-30K (FID over 30k prompts).
Noise: image k of prompt p (p = the prompt's 0-based position in the file) starts from
`sampler.initial_noise(config, seed, [p * images_per_prompt + k])`, so an image does not depend on the batch, the
host or the run that made it. Prompts are left-padded to the file's longest and every batch has `batch_size` images
(the last filled with copies), so a file compiles once.

Resumable and split over hosts as the understanding phase (resume.py): host i takes prompts i, i + n, ...; a prompt is
done when its files are (each written whole, GenEval's metadata.jsonl last); OUT/manifest.json pins the settings.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Mapping

import numpy as np
from etils import epath

from janusflow_jax.eval import formats, resume
from janusflow_jax.eval.formats import InputError

IMAGES = "images"
DEFAULT_IMAGES_PER_PROMPT = {"geneval": 4, "dpg": 4, "mjhq": 1}
SUITES = tuple(DEFAULT_IMAGES_PER_PROMPT)
BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class Prompt:
    position: int  # 0-based place in the prompt file: names GenEval's folder and seeds the noise
    key: str  # GenEval: NNNNN; DPG-Bench: item_id; MJHQ-30K: id
    text: str
    metadata: Mapping[str, Any] | None = None  # GenEval: the file's line, copied to metadata.jsonl
    category: str = ""  # MJHQ-30K


def _geneval_prompts(data) -> list[Prompt]:
    records = formats.read_records(data)
    for n, record in enumerate(records, start=1):
        if not str(record.get("prompt", "")).strip():
            raise InputError(f"{data}:{n}: a GenEval metadata line needs a 'prompt'")
    return [Prompt(i, f"{i:05d}", str(r["prompt"]), metadata=r) for i, r in enumerate(records)]


def _dpg_prompts(data) -> list[Prompt]:
    path = epath.Path(data)
    if path.is_dir():
        files = sorted(path.glob("*.txt"), key=lambda p: p.stem)
        if not files:
            raise InputError(f"{path} holds no <item_id>.txt prompt files (DPG-Bench's prompts/ folder)")
        texts = [(f.stem, f.read_text(encoding="utf-8").strip()) for f in files]
    else:
        rows = formats.read_rows(data)
        formats.require_columns(rows, ["item_id", "text"], "DPG-Bench csv")
        seen: dict[str, str] = {}
        for row in rows:
            seen.setdefault(str(row["item_id"]), str(row["text"]).strip())
        texts = list(seen.items())
    empty = [key for key, text in texts if not text]
    if empty:
        raise InputError(f"DPG-Bench prompt {empty[0]} is empty")
    return [Prompt(i, key, text) for i, (key, text) in enumerate(texts)]


def _mjhq_prompts(data) -> list[Prompt]:
    path = formats.as_path(data)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not all(isinstance(v, dict) and "prompt" in v and "category" in v
                                             for v in meta.values()):
        raise InputError(f"{path} must map each image id to {{'prompt': ..., 'category': ...}} (MJHQ-30K's "
                         f"meta_data.json)")
    return [Prompt(i, str(key), str(v["prompt"]), category=str(v["category"]))
            for i, (key, v) in enumerate(meta.items())]


READERS = {"geneval": _geneval_prompts, "dpg": _dpg_prompts, "mjhq": _mjhq_prompts}


def read_prompts(suite: str, data: str | os.PathLike, limit: int = 0) -> list[Prompt]:
    if suite not in READERS:
        raise InputError(f"unknown generation suite {suite!r} (known: {', '.join(READERS)})")
    prompts = READERS[suite](data)
    return prompts[:limit] if limit else prompts


# -------------------------------------------------------------------------------------------------------- layouts
def png_bytes(image: np.ndarray, text: Mapping[str, Any]) -> bytes:
    """A uint8 [H, W, 3] image as PNG bytes, `text` in iTXt chunks (prompt and sampler settings travel with it)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in {**text, "software": "janusflow_jax"}.items():
        info.add_itxt(key, str(value))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def tile(images: np.ndarray, columns: int) -> np.ndarray:
    """uint8 [n, H, W, 3] -> one [rows * H, columns * W, 3] image, row-major; empty slots black."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * columns, h, w, c), np.uint8)
    grid[:n] = images
    return grid.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def outputs(suite: str, root: epath.Path, prompt: Prompt, n: int) -> list[epath.Path]:
    """The files that make a prompt done (GenEval's metadata.jsonl, written last, is the last one)."""
    if suite == "geneval":
        folder = root / prompt.key
        return [folder / "samples" / f"{k:04d}.png" for k in range(n)] + [folder / "metadata.jsonl"]
    if suite == "dpg":
        return [root / f"{prompt.key}.png"]
    return [root / prompt.category / f"{prompt.key}.png"]


def write_prompt(suite: str, root: epath.Path, prompt: Prompt, images: np.ndarray, settings: Mapping[str, Any]):
    """Writes one prompt's images in the suite's layout (uint8 [n, H, W, 3], in sample order)."""
    n = len(images)
    text = dict(prompt=prompt.text, key=prompt.key, **settings)
    if suite == "geneval":
        folder = root / prompt.key
        for k, image in enumerate(images):
            resume.write_atomic(folder / "samples" / f"{k:04d}.png",
                                png_bytes(image, dict(text, sample=k, noise_index=prompt.position * n + k)))
        resume.write_atomic(folder / "grid.png", png_bytes(tile(images, n), text))
        resume.write_atomic(folder / "metadata.jsonl", json.dumps(prompt.metadata))  # as GenEval's json.dump
    elif suite == "dpg":
        grid = images[0] if n == 1 else tile(images, 2)
        resume.write_atomic(root / f"{prompt.key}.png", png_bytes(grid, dict(text, samples=n)))
    else:
        resume.write_atomic(root / prompt.category / f"{prompt.key}.png",
                            png_bytes(images[0], dict(text, noise_index=prompt.position)))


def _present(root: epath.Path) -> set[str]:
    """Every file under root, listed once (a listing per folder instead of a request per file on gs://)."""
    if not root.exists():
        return set()
    if "://" not in os.fspath(root):
        return {os.path.join(folder, name) for folder, _, names in os.walk(os.fspath(root)) for name in names}
    found, folders = set(), [root]
    while folders:
        for entry in folders.pop().iterdir():
            (folders.append(entry) if entry.is_dir() else found.add(os.fspath(entry)))
    return found


def _done(suite: str, root: epath.Path, prompt: Prompt, n: int, present: set[str]) -> bool:
    return all(os.fspath(f) in present for f in outputs(suite, root, prompt, n))


# ------------------------------------------------------------------------------------------------------- the run
def run(model, params, processor, decoder, decoder_params, suite: str, data: str | os.PathLike,
        out: str | os.PathLike, *, cfg: float = 2.0, steps: int = 30, seed: int = 0,
        images_per_prompt: int | None = None, batch_size: int = BATCH_SIZE, limit: int = 0, template: str = "sft",
        process_index: int | None = None, process_count: int | None = None, checkpoint: str = "", vae: str = "",
        progress: bool = True) -> dict:
    """This host's share of a generation benchmark's images into OUT/images (resumable; module docstring).
    `decoder`, `decoder_params`: the latent decoder (`sampler.latent_decoder` takes it). Returns a summary."""
    from tqdm.auto import tqdm

    from janusflow_jax.inference import sampler
    from janusflow_jax.models import janusflow as model_lib

    prompts = read_prompts(suite, data, limit)
    n = DEFAULT_IMAGES_PER_PROMPT[suite] if images_per_prompt is None else int(images_per_prompt)
    if n < 1 or batch_size < 1:
        raise InputError(f"images_per_prompt ({n}) and batch_size ({batch_size}) must be >= 1")
    if suite == "dpg" and n > 4:
        raise InputError(f"DPG-Bench scores at most the 4 tiles of a 2 x 2 grid; got images_per_prompt {n}")
    if suite == "mjhq" and n != 1:
        raise InputError(f"MJHQ-30K's layout holds one image per prompt (category/id.png); got images_per_prompt {n}")
    index, count = resume.hosts(process_index, process_count)
    config = model.config
    encoded = []
    for prompt in prompts:
        try:
            ids = np.asarray(processor.encode_generation_prompt(prompt.text, template=template), np.int32)
        except ValueError as e:
            raise InputError(f"prompt {prompt.key}: {e}") from None
        sampler.check_generation_prompt(config, ids, prompt.text)
        encoded.append(ids)
    all_ids, all_mask = sampler.left_pad(encoded, processor.pad_id)
    out = epath.Path(out)
    root = out / IMAGES
    settings = dict(cfg=float(cfg), steps=int(steps), seed=int(seed), images_per_prompt=n, template=template)
    manifest = {
        "phase": "gen", "suite": suite, "data": os.fspath(data), "checkpoint": os.fspath(checkpoint),
        "vae": os.fspath(vae) or "the checkpoint's (vae/ or latent.json)", "prompts": len(prompts), "limit": limit,
        **settings, "dtype": config.dtype, "prompt_length": int(all_ids.shape[1]),
        "noise": "image k of prompt p (0-based position in the file) starts from sampler.initial_noise(config, seed, "
                 "[p * images_per_prompt + k]) = N(0, I) from fold_in(key(seed), p * images_per_prompt + k)",
        "sampler": "Euler on t = step / steps (0 = noise), v = w v_cond - (w - 1) v_uncond, null prompt = BOS only; "
                   "prompt keys/values cached (inference/sampler.py)",
        "reference_t_rounding": False, "images": IMAGES, "batch_size": batch_size, "hosts": count,
    }
    pinned = [k for k in manifest if k not in ("batch_size", "hosts")]
    resume.check_manifest(out, manifest, pinned)

    share = [prompts[p] for p in resume.host_share(len(prompts), index, count)]
    present = _present(root)
    todo = [p for p in share if not _done(suite, root, p, n, present)]
    pairs = [(p, k) for p in todo for k in range(n)]
    decode = sampler.latent_decoder(decoder, decoder_params)
    pending: dict[str, dict[int, np.ndarray]] = {}
    written, size = 0, None
    for start in tqdm(range(0, len(pairs), batch_size), desc="batches", unit="batch", disable=not progress):
        batch = pairs[start:start + batch_size]
        filled = batch + [batch[-1]] * (batch_size - len(batch))
        rows = np.asarray([p.position for p, _ in filled])
        ids, mask = all_ids[rows], all_mask[rows]
        noise = sampler.initial_noise(config, seed, [p.position * n + k for p, k in filled])
        latents = sampler.sample_latents(model, params, ids, mask, noise, steps, cfg,
                                         model_lib.prompt_positions(mask))
        images = sampler.to_uint8(decode(latents))[:len(batch)]
        size = int(images.shape[1])
        for (prompt, k), image in zip(batch, images):
            done = pending.setdefault(prompt.key, {})
            done[k] = image
            if len(done) == n:
                write_prompt(suite, root, prompt, np.stack([done[j] for j in range(n)]), settings)
                del pending[prompt.key]
                written += 1
    present = _present(root)
    missing = sum(not _done(suite, root, p, n, present) for p in prompts)
    return {"suite": suite, "prompts": len(prompts), "share": len(share), "written": written,
            "found_done": len(share) - len(todo), "missing": missing, "host": index, "hosts": count,
            "images": os.fspath(root), "resolution": size, "images_per_prompt": n}
