"""The preparation job (janusflow_jax/data/prepare.py, launch/prepare_data.py) and the latent spaces (latents.py).

Inputs are generated here: PNG/JPEG images of several sizes and modes plus a corrupt file, a truncated PNG, a truncated
JPEG, a missing file, an empty caption and a malformed line; understanding records (question/answer, multi-turn,
over-long, too many images, placeholder mismatch); a text corpus (empty and over-long texts); a local TFDS caption
dataset. Latents are space_to_depth (exact, fast) except one run through a tiny random SDXL-style VAE.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from configs import prepare_data as prepare_configs
from janusflow_jax.data import latents
from janusflow_jax.data import prepare
from janusflow_jax.data import records as codec
from janusflow_jax.data.processor import Processor, make_tokenizer

WORDS = "a an the red blue green cat dog bird photo of what is this in on two big small sky grass".split()
SIZE, TOKENS, LATENT = 64, 16, 8  # configs/prepare_data.py:tiny (configs/tiny.py's model): 64 px, 16 patches
ROOT = Path(__file__).resolve().parents[1]


def _image(rng, height, width, mode="RGB") -> Image.Image:
    pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare_inputs")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    gen = []
    for i in range(9):
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        _image(rng, 48 + 8 * i, 96 - 4 * i, ("RGB", "L", "RGBA")[i % 3] if i % 2 else "RGB").save(images / name)
        gen.append({"image": f"images/{name}", "caption": f"a {WORDS[3 + i % 3]} cat on the grass {i}"})
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing else")
    for ext in ("png", "jpg"):
        data = (images / f"img{1 if ext == 'png' else 0}.{ext}").read_bytes()
        (images / f"truncated.{ext}").write_bytes(data[: len(data) // 2])
    gen += [{"image": "images/corrupt.png", "caption": "a dog"},
            {"image": "images/truncated.png", "caption": "a dog"},
            {"image": "images/truncated.jpg", "caption": "a dog"},
            {"image": "images/absent.png", "caption": "a dog"},
            {"image": "images/img0.jpg", "caption": "   "}]
    lines = [json.dumps(g) for g in gen]
    lines.insert(4, "{not json")
    lines.insert(6, "")  # blank lines are not items
    (root / "gen.jsonl").write_text("\n".join(lines) + "\n")

    und = [{"image": "images/img0.jpg", "question": "what is this", "answer": "a red cat"},
           {"image": "images/img1.png", "conversation": [
               {"role": "user", "content": "<image_placeholder>\nwhat is this"},
               {"role": "assistant", "content": "a dog"},
               {"role": "user", "content": "what is in the sky"}, {"role": "assistant", "content": "a bird"}]},
           {"image": "images/img2.jpg", "question": "what " * 300, "answer": "a cat"},  # > seq_len
           {"image": ["images/img0.jpg", "images/img3.png"], "question": "two photos", "answer": "two cats"},
           {"image": "images/img4.jpg", "conversation": [
               {"role": "User", "content": "<image_placeholder><image_placeholder> what"},
               {"role": "Assistant", "content": "a cat"}]},  # 2 placeholders, 1 image
           {"image": "images/corrupt.png", "question": "what is this", "answer": "a cat"},
           {"image": "images/img5.png", "question": "is this a big dog", "answer": "a small dog on the grass"}]
    (root / "und.jsonl").write_text("\n".join(json.dumps(u) for u in und) + "\n")
    texts = ["the red cat is on the grass", "", "a big dog " * 250, "two birds in the blue sky"]
    (root / "text.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    tokenizer = make_tokenizer(root / "tokenizer", WORDS + [str(i) for i in range(10)])
    return root, tokenizer


def _config(inputs, out, **job):
    root, tokenizer = inputs
    config = prepare_configs.get_config("tiny")
    with config.unlocked():
        config.prepare.update(dict(out=str(out), tokenizer=str(tokenizer), gen_jsonl=str(root / "gen.jsonl"),
                                   und_jsonl=str(root / "und.jsonl"), text_jsonl=str(root / "text.jsonl"),
                                   records_per_shard=4, encode_batch_per_device=1, num_threads=2, seq_len=128,
                                   sft_fraction=0.5))
        config.prepare.update(job)
    return config


def _records(path: Path) -> list[dict]:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        return [codec.decode_record(b) for b in reader.read_all()]
    finally:
        reader.close()


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "out"
    config = _config(inputs, out)
    summary = prepare.run(config, progress=False)
    return config, out, summary


@pytest.fixture(scope="module")
def processor(inputs):
    return Processor.from_pretrained(inputs[1], num_image_tokens=TOKENS, image_size=SIZE)


# ------------------------------------------------------------------------------------------------ latent spaces
def test_space_to_depth_is_exact_and_shards_over_all_devices():
    space = latents.make_latent_space("space_to_depth", image_size=SIZE, latent_size=LATENT)
    assert (space.latent_channels, space.downsample, space.stochastic) == (192, 8, False)
    images = np.random.default_rng(1).uniform(-1, 1, (16, SIZE, SIZE, 3)).astype(np.float32)
    z = np.asarray(space.encode(images))
    assert z.shape == (16, LATENT, LATENT, 192)
    # Channel c of latent pixel (i, j) is pixel (8i + c // 24, 8j + (c // 3) % 8), colour c % 3.
    assert z[3, 2, 5, 7 * 3 + 1] == images[3, 2 * 8 + 0, 5 * 8 + 7, 1]
    assert z[3, 2, 5, 24 + 2] == images[3, 2 * 8 + 1, 5 * 8 + 0, 2]
    np.testing.assert_array_equal(np.asarray(space.decode(z)), images)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    mean, logvar = latents.batch_sharded(space.place(mesh).moments, mesh)(images)
    assert logvar is None and isinstance(mean, np.ndarray)
    np.testing.assert_array_equal(mean, z)
    scaled = latents.from_description({**space.describe(), "scaling_factor": 2.0})
    np.testing.assert_array_equal(np.asarray(scaled.encode(images)), 2 * z)
    np.testing.assert_allclose(np.asarray(scaled.decode(2 * z)), images, rtol=0, atol=1e-7)
    # The sampler's decoder helper must not rescale what `decode` already unscales.
    assert not hasattr(space, "scaling_factor") and not hasattr(space, "config")


def test_latent_space_errors():
    with pytest.raises(ValueError, match="unknown latent space"):
        latents.make_latent_space("vq", image_size=64, latent_size=8)
    with pytest.raises(ValueError, match="not a multiple of latent_size"):
        latents.make_latent_space("space_to_depth", image_size=64, latent_size=7)
    with pytest.raises(ValueError, match="needs vae_path"):
        latents.make_latent_space("sdxl_vae", image_size=64, latent_size=8)
    with pytest.raises(ValueError, match=r"\[batch, height, width, 3\]"):
        latents.SpaceToDepth(8).encode(np.zeros((2, 64, 64, 4), np.float32))


# ---------------------------------------------------------------------------------------------------- the job
EXPECTED_SKIPS = {
    "gen": {"bad_json": 1, "corrupt_image": 3, "empty_caption": 1, "missing_image": 1},
    "und": {"corrupt_image": 1, "image_count_mismatch": 1, "too_long": 1, "too_many_images": 1},
    "text": {"empty_text": 1},
}


def test_bad_inputs_are_skipped_and_counted(prepared):
    config, out, summary = prepared
    meta = json.loads((out / codec.METADATA).read_text())
    assert meta["skipped"] == EXPECTED_SKIPS == summary["skipped"]
    # 9 good images; 3 good understanding records; texts: 2 short + the long one split into 128-token pieces.
    long_tokens = 1 + 250 * 6 + 1  # BOS, "a", " ", "big", " ", "dog", " " x 250, EOS
    assert meta["counts"] == {"gen": 9, "und": 3, "text": 2 + -(-long_tokens // 128)} == summary["counts"]
    assert (summary["shards_written"], summary["shards_reused"]) == (4 + 2 + 1, 0)
    line = prepare.summary_line(summary)
    assert "9 gen / 3 und" in line and "corrupt_image=3" in line and "image_count_mismatch=1" in line
    assert meta["latent"]["kind"] == "space_to_depth" and meta["latent"]["latent_channels"] == 192
    assert meta["image"]["size"] == SIZE and meta["image"]["num_image_tokens"] == TOKENS
    assert sum(meta["templates"]["generation_counts"].values()) == 9
    assert meta["config"]["prepare"]["sft_fraction"] == 0.5
    assert meta["lengths"]["max_text_length"] == 128 and meta["lengths"]["max_images_per_record"] == 1
    assert not list(out.rglob(".*.tmp")), "temporary files left behind"


def test_generation_records(prepared, processor):
    config, out, _ = prepared
    records = [r for f in sorted((out / "gen").glob("*.array_record")) for r in _records(f)]
    assert len(records) == 9
    space = latents.SpaceToDepth(8)
    templates = set()
    for i, record in enumerate(records):
        assert record["image"].dtype == np.uint8 and record["image"].shape == (SIZE, SIZE, 3)
        assert record["caption"] == f"a {WORDS[3 + i % 3]} cat on the grass {i}"
        templates.add(record["template"])
        np.testing.assert_array_equal(record["prompt_ids"],
                                      processor.encode_generation_prompt(record["caption"], record["template"]))
        pixels = codec.normalize_pixels(record["image"], (0.5,) * 3, (0.5,) * 3)
        assert "latent_logvar" not in record
        np.testing.assert_array_equal(record["latent_mean"], np.asarray(space.encode(pixels[None]))[0])
    assert templates == {"sft", "pretrain"}  # sft_fraction 0.5 over 9 prompts
    # The crop is random but reproducible: the first image (a 48 x 96 JPEG) re-cropped with its record's RNG.
    from janusflow_jax.data.processor import load_image, resize_short_side_and_crop

    rng = np.random.default_rng([config.prepare.seed, 0, 0])
    rng.random()  # the template draw comes first
    crop = resize_short_side_and_crop(load_image(Path(config.prepare.gen_jsonl).parent / "images/img0.jpg"),
                                      SIZE, rng)
    np.testing.assert_array_equal(records[0]["image"], np.asarray(crop))


def test_understanding_and_text_records(prepared, processor):
    config, out, _ = prepared
    root = Path(config.prepare.und_jsonl).parent
    records = _records(out / "und" / "und-00000-of-00002.array_record")
    records += _records(out / "und" / "und-00001-of-00002.array_record")
    assert len(records) == 3
    first = records[0]
    want = processor.encode_understanding([{"role": "User", "content": "<image_placeholder>\nwhat is this"},
                                           {"role": "Assistant", "content": "a red cat"}])
    for key in ("input_ids", "loss_mask", "image_token_mask"):
        np.testing.assert_array_equal(first[key], want[key])
    assert first["image_token_mask"].sum() == 1 + TOKENS
    # uint8 pixels normalised as the loader does == the processor's float input, bit for bit.
    meta = json.loads((out / codec.METADATA).read_text())["image"]
    for record, name in ((first, "img0.jpg"), (records[2], "img5.png")):
        again = codec.normalize_pixels(record["images"], meta["mean"], meta["std"], meta["rescale_factor"])
        np.testing.assert_array_equal(again, processor.preprocess_understanding([root / "images" / name]))
    # " a dog" and " a bird" (the space after "Assistant:" + 3 pieces each) + their EOS
    assert records[1]["loss_mask"].sum() == 2 * (1 + 3 + 1)

    texts = _records(out / "text" / "text-00000-of-00001.array_record")
    for record, text in ((texts[0], "the red cat is on the grass"), (texts[-1], "two birds in the blue sky")):
        want = processor.encode_text(text)
        np.testing.assert_array_equal(record["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(record["loss_mask"], want["loss_mask"])
    pieces = texts[1:-1]
    assert all(len(p["input_ids"]) == 128 for p in pieces[:-1]) and all(p["loss_mask"][0] == 0 for p in pieces)
    whole = processor.encode_text("a big dog " * 250)
    np.testing.assert_array_equal(np.concatenate([p["input_ids"] for p in pieces]), whole["input_ids"])


def test_killed_run_resumes_to_identical_bytes(inputs, prepared, tmp_path, monkeypatch):
    config, reference_out, _ = prepared
    out = tmp_path / "out"
    config = _config(inputs, out)
    reference = _snapshot(reference_out)
    # The metadata names the output directory; everything else must match the uninterrupted run byte for byte.
    reference["metadata.json"] = reference["metadata.json"].replace(str(reference_out).encode(), str(out).encode())

    real_write, written = prepare._write_shard, []

    def dies_after_two_shards(ctx, shard, *args):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        real_write(ctx, shard, *args)
        written.append(shard.name)

    monkeypatch.setattr(prepare, "_write_shard", dies_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        prepare.run(config, progress=False)
    monkeypatch.undo()
    assert not (out / codec.METADATA).exists()
    kept = {name: (out / name.split("-")[0] / f"{name}.array_record").stat().st_mtime_ns for name in written}
    (out / "gen" / ".gen-00002-of-00004.array_record.tmp").write_bytes(b"half a shard")  # killed mid-write

    summary = prepare.run(config, progress=False)
    assert (summary["shards_written"], summary["shards_reused"]) == (5, 2)
    assert {n: (out / n.split("-")[0] / f"{n}.array_record").stat().st_mtime_ns for n in written} == kept
    assert _snapshot(out) == reference

    # A lost shard (and its marker) is redone alone, identically.
    (out / "und" / "und-00001-of-00002.array_record").unlink()
    (out / "und" / "und-00001-of-00002.json").unlink()
    summary = prepare.run(config, progress=False)
    assert (summary["shards_written"], summary["shards_reused"]) == (1, 6)
    assert _snapshot(out) == reference


def test_resume_with_a_different_config_is_refused(inputs, prepared):
    config, out, _ = prepared
    changed = _config(inputs, out, seed=1)
    with pytest.raises(ValueError, match="different config"):
        prepare.run(changed, progress=False)


def test_config_errors(inputs, tmp_path):
    with pytest.raises(ValueError, match="no output directory"):
        prepare.run(_config(inputs, ""), progress=False)
    with pytest.raises(ValueError, match="no inputs"):
        prepare.run(_config(inputs, tmp_path / "o", gen_jsonl="", und_jsonl="", text_jsonl=""), progress=False)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        prepare.run(_config(inputs, tmp_path / "o", gen_jsonl=str(tmp_path / "nope.jsonl")), progress=False)
    config = _config(inputs, tmp_path / "o")
    with config.unlocked():
        config.model.gen_encoder.in_channels = 4
    with pytest.raises(ValueError, match="192 channels"):
        prepare.run(config, progress=False)


def test_cli_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launch.prepare_data", "--config=configs/prepare_data.py:tiny",
                             f"--config.prepare.out={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: no tokenizer")


# ------------------------------------------------------------------------------------------- TFDS + SDXL-style VAE
def _tfds_dataset(data_dir: Path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        """Fixed-shape uint8 images: a TFDS Image feature would need TensorFlow to encode."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(40, 72, 3), dtype=np.uint8),
                "meta": {"caption": tfds.features.Text()}}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(3)
            for i in range(5):
                caption = "" if i == 2 else f"a photo of {i} red birds"
                yield i, {"image": rng.integers(0, 256, (40, 72, 3), np.uint8), "meta": {"caption": caption}}

    TinyCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "tiny_captions"


def test_tfds_captions_through_a_tiny_vae(inputs, tmp_path):
    from janusflow_jax.convert import vae as vae_convert
    from janusflow_jax.models import vae

    name = _tfds_dataset(tmp_path / "tfds")
    vae_config = vae.VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    params = vae.init_vae_params(vae_config, jax.random.key(0))
    vae_convert.to_diffusers(vae_config, params, tmp_path / "vae")
    config = _config(inputs, tmp_path / "out", gen_jsonl="", und_jsonl="", text_jsonl="", records_per_shard=8)
    with config.unlocked():
        config.model.gen_encoder.in_channels = config.model.gen_decoder.out_channels = 4
        config.prepare.tfds.update(dict(name=name, data_dir=str(tmp_path / "tfds"), caption_key="meta/caption"))
        config.prepare.latent.update(dict(kind="sdxl_vae", vae_path=str(tmp_path / "vae")))
    summary = prepare.run(config, progress=False)
    assert summary["counts"]["gen"] == 4 and summary["skipped"]["gen"] == {"empty_caption": 1}
    meta = json.loads((tmp_path / "out" / codec.METADATA).read_text())
    assert meta["latent"]["kind"] == "sdxl_vae" and meta["latent"]["scaling_factor"] == 0.13025
    assert meta["sources"]["gen"] == [f"tfds:{name}/train"]
    records = _records(tmp_path / "out" / "gen" / "gen-00000-of-00001.array_record")
    assert records[2]["caption"] == "a photo of 3 red birds"
    pixels = np.stack([codec.normalize_pixels(r["image"], (0.5,) * 3, (0.5,) * 3) for r in records])
    mean, logvar = vae.AutoencoderKL(vae_config).apply({"params": params}, pixels, method="encode")
    got_mean = np.stack([r["latent_mean"] for r in records])
    got_logvar = np.stack([r["latent_logvar"] for r in records])
    assert got_mean.shape == (4, LATENT, LATENT, 4)
    np.testing.assert_allclose(got_mean, 0.13025 * np.asarray(mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_logvar, np.asarray(logvar) + 2 * np.log(0.13025), rtol=1e-5, atol=1e-5)
    # The sampler decodes the model's scaled latents through the same space.
    space = latents.from_description(meta["latent"])
    want = vae.AutoencoderKL(vae_config).apply({"params": params}, np.asarray(mean), method="decode")
    decoded, want = np.asarray(space.decode(got_mean)), np.asarray(want)
    assert np.abs(decoded - want).max() <= 1e-4 * np.abs(want).max()
    shutil.rmtree(tmp_path / "tfds")


def test_hosts_split_the_shards_and_stay_in_step():
    sizes = {"gen": [4, 4, 4, 4, 3], "und": [4, 4, 1], "text": [2]}
    shards = [prepare.Shard(kind, i, len(n), None, 0, m, 0) for kind, n in sizes.items() for i, m in enumerate(n)]
    done = [False] * len(shards)
    done[1] = done[4] = True  # gen-00001 and the last gen shard were written before a restart
    plans = [prepare.host_plan(shards, done, host, 2, host_batch=3) for host in range(2)]
    # Every host makes the same encoder calls, round by round: [gen 0 | gen 1 (done)], [gen 2 | gen 3], [gen 4 (done)]
    assert [[calls for _, calls in rounds] for rounds, _ in plans] == [[2, 2], [2, 2]]
    assert [index for index, _ in plans[0][0]] == [0, 2] and [index for index, _ in plans[1][0]] == [1, 3]
    rest = sorted(plans[0][1] + plans[1][1])
    assert rest == [i for i, s in enumerate(shards) if s.kind != "gen"] and not set(plans[0][1]) & set(plans[1][1])
