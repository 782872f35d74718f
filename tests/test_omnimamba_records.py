"""OmniMamba records and image tokenizers (data/omnimamba_records.py): a k-means patch codebook fitted on sklearn's
digits (encode/decode, save/load), VQ-16 codes through the same interface, t2i and mmu records in the release's
layouts, and decoding to examples that stack into a batch the geometry accepts."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from configs import _omnimamba_base as base
from janusflow_jax.data import omnimamba_records as records
from janusflow_jax.data.omnimamba_batch import OmniMambaGeometry
from janusflow_jax.data.omnimamba_processor import OmniMambaProcessor, make_tokenizer
from janusflow_jax.data.records import decode_record, encode_record
from janusflow_jax.models.omnimamba import OmniMambaSystemConfig

SYSTEM = OmniMambaSystemConfig.from_dict(base.tiny_model().to_dict())


def digits(n: int) -> np.ndarray:
    """sklearn's 8 x 8 digits as uint8 RGB [n, 16, 16, 3] (each pixel doubled)."""
    from sklearn.datasets import load_digits

    x = (load_digits().images[:n] * (255 / 16)).round().astype(np.uint8)
    return np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)[..., None].repeat(3, axis=-1)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    import transformers

    path = make_tokenizer(tmp_path_factory.mktemp("tok"), "a the red cat dog digit what is this zero one".split())
    proc = OmniMambaProcessor(transformers.PreTrainedTokenizerFast.from_pretrained(str(path)),
                              caption_length=SYSTEM.lm.caption_length)
    assert proc.pad_id + 9 < SYSTEM.lm.text_vocab_size
    return proc


def test_patch_kmeans_on_digits(tmp_path):
    images = digits(200)
    tokenizer = records.PatchKMeans.fit(images, codebook_size=48, patch=4, seed=0)
    codes = tokenizer.encode(images)
    assert codes.shape == (200, 16) and codes.dtype == np.int32 and codes.max() < 48
    assert len(np.unique(codes)) > 24  # the codebook is used, not collapsed
    decoded = tokenizer.decode(codes)
    assert decoded.shape == images.shape and decoded.dtype == np.uint8
    error = np.abs(decoded.astype(float) - images).mean()
    assert error < 0.35 * np.abs(images.astype(float) - images.mean()).mean(), error  # much better than the mean
    np.testing.assert_array_equal(tokenizer.encode(decoded), codes)  # a centroid encodes to itself
    path = tokenizer.save(tmp_path / "codebook.npz")
    again = records.load_image_tokenizer("patch_kmeans", path)
    np.testing.assert_array_equal(again.centroids, tokenizer.centroids)
    assert again.patch == 4
    with pytest.raises(ValueError, match="do not split into 4 px patches"):
        tokenizer.encode(np.zeros((1, 6, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown image tokenizer 'jpeg'"):
        records.load_image_tokenizer("jpeg", path)


def test_vq16_codes_through_the_same_interface():
    import jax

    from janusflow_jax.models.vq import init_vq_params

    vq = records.VQ16(SYSTEM.vq, init_vq_params(SYSTEM.vq, jax.random.key(0)))
    codes = vq.encode(digits(3))
    assert codes.shape == (3, 16) and codes.max() < SYSTEM.vq.codebook_size
    assert vq.decode(codes).shape == (3, 16, 16, 3)


def test_records_decode_into_the_batch_layout(processor):
    data = ml_collections.ConfigDict(dict(mmu_len=24, pad_id=processor.pad_id, eos_id=processor.eos_id))
    geometry = OmniMambaGeometry.from_model(SYSTEM, data)
    t = processor.token_ids
    image = digits(1)[0][:14, :14]  # the tiny tower's 14 px
    qa = records.mmu_record(processor, "what is this", "a red digit", image, geometry.mmu_len)
    ids, mask = qa["input_ids"], qa["loss_mask"]
    assert list(ids[:4]) == [t["<|mmu|>"], t["<|soi|>"], t["<|eoi|>"], t["<|sot|>"]] and ids[-1] == t["<|eot|>"]
    assert processor.tokenizer.decode(ids[4:][mask[4:] == 0][:-1]) == "In: what is this\nOut: "
    assert processor.tokenizer.decode(ids[mask == 1]) == "a red digit<|endoftext|>"
    caption = records.mmu_record(processor, None, "a red cat", image, geometry.mmu_len)  # stage 1's layout
    assert processor.tokenizer.decode(caption["input_ids"][4:]) == "a red cat<|endoftext|>"
    assert caption["loss_mask"][4:].all() and not caption["loss_mask"][:4].any()
    with pytest.raises(ValueError, match="do not fit mmu_len=24"):
        records.mmu_record(processor, "what is this " * 5, "a", image, geometry.mmu_len)
    with pytest.raises(ValueError, match="the answer is empty"):
        records.mmu_record(processor, "what", " ", image, geometry.mmu_len)
    gen = records.t2i_record(processor, "a red cat", np.arange(16))
    np.testing.assert_array_equal(gen["prompt_ids"], processor.t2i_prompt("a red cat")[None])
    several = records.t2i_record(processor, ["a red cat", "a cat"], np.arange(16))  # one prompt row per caption
    np.testing.assert_array_equal(several["prompt_ids"][1], processor.t2i_prompt("a cat"))
    drawn = {records.decode_t2i(several, geometry, np.random.default_rng(seed))["t2i/prompt_ids"].tobytes()
             for seed in range(8)}
    assert drawn == {row.tobytes() for row in several["prompt_ids"]}

    # Through the codec, as the loader reads them, then stacked into a batch.
    mmu_examples = [records.decode_mmu(decode_record(encode_record(r)), geometry) for r in (qa, caption)]
    t2i_examples = [records.decode_t2i(decode_record(encode_record(gen)), geometry)] * 2
    batch = {k: np.stack([e[k] for e in mmu_examples]) for k in mmu_examples[0]}
    batch.update({k: np.stack([e[k] for e in t2i_examples]) for k in t2i_examples[0]})
    geometry.check(batch, {"mmu": 2, "t2i": 2}, "decoded records")
    assert (batch["mmu/input_ids"][0, len(ids):] == processor.pad_id).all()
    np.testing.assert_allclose(batch["mmu/images"][0], image / 255.0, rtol=1e-7)
