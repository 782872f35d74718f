"""OmniMamba's prepared records and the image tokenizers that precompute their codes (docs/reference.md §9.1): what
the preparation job writes for the family and what the loader reads back into `data/omnimamba_batch.py`'s layout.

Records (one dict per example, `data/records.py`'s codec):
  t2i  prompt_ids int32 [K, P] `OmniMambaProcessor.t2i_prompt(caption)` of each of the image's K captions (72 ids in
                              the release); the loader draws one per load (`decode_t2i`)
       image_ids  int32 [N]   the image's codes from the dataset's image tokenizer, row-major (256 for VQ-16)
       captions   str         the K captions, a JSON list
  mmu  input_ids  int32 [T]   [<|mmu|>, <|soi|>, <|eoi|>, <|sot|>, then per turn "In: {question}\\nOut: " (later
                              ones after "\\n") and "{answer}<|endoftext|>", then <|eot|>] (stage 2, the release's
                              FinetuneDataset: every turn, cut at a turn boundary), or [.., <|sot|>,
                              "{caption}<|endoftext|>"] (stage 1's AlignDataset: the caption alone, cut at mmu_len,
                              no <|eot|>); T <= mmu_len, padded by `decode_mmu`
       loss_mask  int32 [T]   1 on every answer's (or the caption's) tokens and their <|endoftext|>
       image      uint8 [H, H, 3]   the image resized to the tower's side (resize-naive, bicubic)
       template   str         "caption", "caption_truncated", "turns_{n}" or "turns_{kept}_of_{n}" (counted in
                              metadata.json)

Image tokenizers (`IMAGE_TOKENIZERS`; a prepared dataset names its own and the file it reads):
  "vq16"          LlamaGen VQ-16 (`models.vq.VQModel`, an orbax root of the system or of the VQ alone): pixels in
                  [-1, 1] -> codes; decoding is the model's decoder.
  "patch_kmeans"  the download-free stand-in for the digits run: a codebook of k-means centroids fitted
                  (scikit-learn) on the training images' p x p patches; a patch's code is its nearest centroid, a
                  code decodes to the centroid's pixels. Saved as one .npz (centroids, patch) the dataset references.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Mapping, Sequence

import numpy as np
from etils import epath

from janusflow_jax.data.omnimamba_batch import MMU_PREFIX, OmniMambaGeometry
from janusflow_jax.data.omnimamba_processor import EOS_TOKEN, OmniMambaProcessor, conversation_pieces

IMAGE_TOKENIZERS = ("vq16", "patch_kmeans")


# ------------------------------------------------------------------------------------------------- image tokenizers
def _patches(images: np.ndarray, patch: int) -> np.ndarray:
    """uint8 [n, H, W, 3] -> float32 [n, (H/p)(W/p), p·p·3] in [0, 1], patches row-major."""
    n, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"images of {h} x {w} px do not split into {patch} px patches")
    x = images.astype(np.float32).reshape(n, h // patch, patch, w // patch, patch, c) / 255.0
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // patch) * (w // patch), patch * patch * c)


@dataclasses.dataclass(frozen=True)
class PatchKMeans:
    """A k-means codebook over p x p RGB patches: centroids float32 [K, p·p·3] in [0, 1]."""

    centroids: np.ndarray
    patch: int

    @property
    def codebook_size(self) -> int:
        return len(self.centroids)

    @classmethod
    def fit(cls, images: np.ndarray, codebook_size: int, patch: int, seed: int = 0) -> "PatchKMeans":
        """Fits the codebook on every patch of uint8 images [n, H, W, 3] (scikit-learn KMeans, k-means++,
        deterministic for a seed)."""
        from sklearn.cluster import KMeans

        data = _patches(np.asarray(images), patch).reshape(-1, patch * patch * 3)
        if len(np.unique(data, axis=0)) < codebook_size:
            raise ValueError(f"{len(np.unique(data, axis=0))} distinct patches cannot fill {codebook_size} codes")
        kmeans = KMeans(codebook_size, n_init=1, random_state=seed).fit(data)
        return cls(kmeans.cluster_centers_.astype(np.float32), patch)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [n, H, W, 3] -> int32 codes [n, (H/p)(W/p)], each patch's nearest centroid (squared L2)."""
        x = _patches(np.asarray(images), self.patch)
        distances = ((x ** 2).sum(-1, keepdims=True) - 2 * x @ self.centroids.T
                     + (self.centroids ** 2).sum(-1)[None, None])
        return np.argmin(distances, axis=-1).astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int32 codes [n, g·g] (a square grid) -> uint8 images [n, g·p, g·p, 3] of the centroids' pixels."""
        codes = np.asarray(codes)
        n, count = codes.shape
        grid, p = int(round(count ** 0.5)), self.patch
        if grid * grid != count:
            raise ValueError(f"{count} codes are not a square grid")
        x = self.centroids[codes].reshape(n, grid, grid, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
        return np.clip(np.round(x.reshape(n, grid * p, grid * p, 3) * 255.0), 0, 255).astype(np.uint8)

    def save(self, path) -> str:
        """Writes the codebook as one .npz (local or gs://); returns the path."""
        buffer = io.BytesIO()
        np.savez(buffer, centroids=self.centroids, patch=np.int32(self.patch))
        epath.Path(path).write_bytes(buffer.getvalue())
        return str(path)

    @classmethod
    def load(cls, path) -> "PatchKMeans":
        with np.load(io.BytesIO(epath.Path(path).read_bytes())) as data:
            return cls(np.asarray(data["centroids"], np.float32), int(data["patch"]))


class VQ16:
    """LlamaGen VQ-16 as an image tokenizer: uint8 images -> codes and back, jit-compiled."""

    def __init__(self, config, params):
        import jax

        from janusflow_jax.models.vq import VQModel

        model = VQModel(config)
        self.config, self.codebook_size = config, config.codebook_size
        self._encode = jax.jit(lambda x: model.apply({"params": params}, x, method=VQModel.encode))
        self._decode = jax.jit(lambda c: model.apply({"params": params}, c, method=VQModel.decode_codes))

    @classmethod
    def load(cls, path) -> "VQ16":
        """From an orbax root holding an OmniMamba system (its "vq" part)."""
        from janusflow_jax import checkpoint

        config, params = checkpoint.load_params(path, weights="params")
        if not hasattr(config, "vq"):
            raise ValueError(f"{path} holds no OmniMamba system with a VQ tokenizer")
        return cls(config.vq, params["vq"])

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [n, H, W, 3] -> int32 codes [n, (H/16)(W/16)] (pixels mapped to [-1, 1])."""
        x = np.asarray(images, np.float32) / 127.5 - 1.0
        codes = np.asarray(self._encode(x))
        return codes.reshape(len(codes), -1).astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, np.int32)
        grid = int(round(codes.shape[1] ** 0.5))
        x = np.asarray(self._decode(codes.reshape(len(codes), grid, grid)))
        return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def load_image_tokenizer(kind: str, path):
    """The image tokenizer a prepared dataset names: "vq16" (an orbax system root) or "patch_kmeans" (its .npz)."""
    if kind == "patch_kmeans":
        return PatchKMeans.load(path)
    if kind == "vq16":
        return VQ16.load(path)
    raise ValueError(f"unknown image tokenizer {kind!r}: one of {IMAGE_TOKENIZERS}")


# ---------------------------------------------------------------------------------------------------------- records
def t2i_record(processor: OmniMambaProcessor, captions: str | Sequence[str], image_ids: np.ndarray) -> dict:
    """A t2i record: every caption of the image in the t2i prompt layout (one row each), the image's codes, and the
    captions as a JSON list (for people)."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    if not captions:
        raise ValueError("no caption")
    return {"prompt_ids": np.stack([processor.t2i_prompt(c) for c in captions]).astype(np.int32),
            "image_ids": np.asarray(image_ids, np.int32).reshape(-1), "captions": json.dumps(captions)}


def _mmu_ids(processor: OmniMambaProcessor, text_ids: list[int], mask: list[int], image: np.ndarray,
             template: str) -> dict:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"the image must be uint8 [H, H, 3], got {image.dtype} {image.shape}")
    t = processor.token_ids
    prefix = [t["<|mmu|>"], t["<|soi|>"], t["<|eoi|>"], t["<|sot|>"]]
    assert len(prefix) == MMU_PREFIX
    return {"input_ids": np.asarray(prefix + text_ids, np.int32),
            "loss_mask": np.asarray([0] * MMU_PREFIX + mask, np.int32), "image": image, "template": template}


def caption_record(processor: OmniMambaProcessor, caption: str, image: np.ndarray, mmu_len: int) -> dict:
    """Stage 1's caption-only layout (the release's AlignDataset): [<|mmu|>, <|soi|>, <|eoi|>, <|sot|>] +
    "{caption}<|endoftext|>", its ids cut to the mmu_len - 4 that fit (449 in the release, the <|endoftext|> cut
    too when it does not fit, as the release pads and truncates to max_length), no <|eot|>; loss on every caption
    id. template "caption", or "caption_truncated" when cut."""
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("the caption is empty")
    ids = processor.tokenizer(f"{caption.strip()}{EOS_TOKEN}", add_special_tokens=False)["input_ids"]
    room = mmu_len - MMU_PREFIX
    template = "caption" if len(ids) <= room else "caption_truncated"
    ids = ids[:room]
    return _mmu_ids(processor, ids, [1] * len(ids), image, template)


def conversation_record(processor: OmniMambaProcessor, turns: Sequence[tuple[str, str]], image: np.ndarray,
                        mmu_len: int) -> dict:
    """Stage 2's layout (the release's FinetuneDataset with Cobra's MambaPromptBuilder): [<|mmu|>, <|soi|>, <|eoi|>,
    <|sot|>] + every (question, answer) turn ("In: {q}\nOut: ", "{a}<|endoftext|>", `conversation_pieces`) + <|eot|>;
    loss on every answer and its <|endoftext|>. Truncated at a turn boundary: whole turns are kept while they fit
    mmu_len with the closing <|eot|> (the release breaks at the first message that does not fit; a question left
    without its answer there carries no loss and precedes nothing, so the loss is the same). template "turns_{n}",
    or "turns_{kept}_of_{n}" when cut. ValueError when not even the first turn fits (or an answer is empty)."""
    if not turns:
        raise ValueError("no turns")
    for q, a in turns:
        if not isinstance(q, str) or not q.strip():
            raise ValueError("a question is empty")
        if not isinstance(a, str) or not a.strip():
            raise ValueError("the answer is empty")
    room = mmu_len - MMU_PREFIX - 1  # the closing <|eot|>
    ids, mask, kept = [], [], 0
    pieces = conversation_pieces(turns)
    for k in range(len(turns)):
        (question, _), (answer, _) = pieces[2 * k], pieces[2 * k + 1]
        q_ids, a_ids = (processor.tokenizer(text, add_special_tokens=False)["input_ids"] for text in (question, answer))
        if len(ids) + len(q_ids) + len(a_ids) > room:
            break
        ids += q_ids + a_ids
        mask += [0] * len(q_ids) + [1] * len(a_ids)
        kept += 1
    if not kept:
        first = len(processor.tokenizer(pieces[0][0] + pieces[1][0], add_special_tokens=False)["input_ids"])
        raise ValueError(f"the first turn's {MMU_PREFIX + first + 1} ids do not fit mmu_len={mmu_len}")
    template = f"turns_{kept}" if kept == len(turns) else f"turns_{kept}_of_{len(turns)}"
    return _mmu_ids(processor, ids + [processor.token_ids["<|eot|>"]], mask + [0], image, template)


def mmu_record(processor: OmniMambaProcessor, question: str | None, answer: str, image: np.ndarray,
               mmu_len: int) -> dict:
    """One question and its answer (`conversation_record`), or with `question` None stage 1's caption layout
    (`caption_record`). Raises ValueError for an empty answer or a turn longer than `mmu_len`."""
    if question is None:
        return caption_record(processor, answer, image, mmu_len)
    return conversation_record(processor, [(question, answer)], image, mmu_len)


def decode_t2i(record: Mapping, geometry: OmniMambaGeometry, rng: np.random.Generator | None = None
               ) -> dict[str, np.ndarray]:
    """A t2i record -> one example {"t2i/prompt_ids" [P], "t2i/image_ids" [N]} of the batch layout: one of its
    captions drawn by `rng` (the loader's per-load draw, as the release draws a caption of the image at every load;
    without `rng` the first)."""
    prompts = np.asarray(record["prompt_ids"], np.int32).reshape(-1, geometry.prompt_len)
    pick = int(rng.integers(len(prompts))) if rng is not None and len(prompts) > 1 else 0
    return {"t2i/prompt_ids": prompts[pick],
            "t2i/image_ids": np.asarray(record["image_ids"], np.int32).reshape(geometry.num_image_tokens)}


def decode_mmu(record: Mapping, geometry: OmniMambaGeometry) -> dict[str, np.ndarray]:
    """An mmu record -> one example {"mmu/input_ids", "mmu/loss_mask" [S] (right-padded with [PAD] / 0),
    "mmu/images" [H, H, 3] float32 in [0, 1]} of the batch layout."""
    ids, mask, image = record["input_ids"], record["loss_mask"], record["image"]
    if len(ids) > geometry.mmu_len or image.shape != (geometry.image_size, geometry.image_size, 3):
        raise ValueError(f"an mmu record of {len(ids)} ids and a {image.shape} image does not fit mmu_len="
                         f"{geometry.mmu_len} and {geometry.image_size} px")
    input_ids = np.full(geometry.mmu_len, geometry.pad_id, np.int32)
    loss_mask = np.zeros(geometry.mmu_len, np.int32)
    input_ids[:len(ids)], loss_mask[:len(mask)] = ids, mask
    return {"mmu/input_ids": input_ids, "mmu/loss_mask": loss_mask,
            "mmu/images": np.asarray(image, np.float32) / np.float32(255.0)}
