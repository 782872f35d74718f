"""The preparation job writing OmniMamba records (`--config.prepare.family=omnimamba`: janusflow_jax/data/prepare.py
with data/omnimamba_prepare.py's converter) on sklearn digits: a patch_kmeans codebook fitted by the job, t2i and mmu
records in the layouts of data/omnimamba_records.py, bad inputs skipped and counted, a killed run resumed to the
same bytes, and the command line with a relative output directory and with its inputs and output on gs://."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from janusflow_jax.data import omnimamba_prepare, prepare
from janusflow_jax.data import records as codec
from janusflow_jax.data.omnimamba_processor import OmniMambaProcessor
from janusflow_jax.data.omnimamba_records import PatchKMeans, caption_record, conversation_record
from janusflow_jax.data.processor import resize_short_side_and_crop
from tests.cli_helpers import one_error_line, repository_files, run_cli
from tests.omnimamba_data import EXPECTED_SKIPS, GOOD_MMU, GOOD_T2I, job_config, write_inputs

TOWER, T2I_SIDE, CODES, CAPTION = 14, 16, 16, 12  # configs/_omnimamba_base.tiny_model()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("omnimamba_inputs"))


@pytest.fixture(scope="module")
def prepared(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("omnimamba_prepared") / "out"
    config = job_config(inputs, out)
    return config, out, prepare.run(config, progress=False)


@pytest.fixture(scope="module")
def processor(inputs):
    return OmniMambaProcessor.from_pretrained(inputs["tokenizer"], caption_length=CAPTION)


def _records(out: Path, kind: str) -> list[dict]:
    from array_record.python.array_record_module import ArrayRecordReader

    found = []
    for name in json.loads((out / codec.METADATA).read_text())["shards"][kind]:
        reader = ArrayRecordReader(str(out / name))
        found += [codec.decode_record(b) for b in reader.read_all()]
        reader.close()
    return found


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _lines(path: Path) -> list[dict | None]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append(None)
    return out


def test_metadata_counts_skips_and_what_the_loader_checks(prepared, processor):
    config, out, summary = prepared
    meta = json.loads((out / codec.METADATA).read_text())
    assert meta["family"] == "omnimamba"
    assert meta["counts"] == {"mmu": GOOD_MMU, "t2i": GOOD_T2I} == summary["counts"]
    assert meta["skipped"] == EXPECTED_SKIPS == summary["skipped"]
    assert (summary["shards_written"], summary["shards_reused"]) == (4 + 5, 0)
    assert "15 mmu / 20 t2i" in prepare.summary_line(summary) and "too_long=1" in prepare.summary_line(summary)
    # Every turn kept: 4 single-turn question records, 4 JanusFlow-style ones, one of two turns, one of 6 cut to 2.
    assert meta["understanding"] == {
        "records": {"caption": 4, "caption_truncated": 1, "turns_1": 8, "turns_2": 1, "turns_2_of_6": 1},
        "truncated": {"caption": 1, "conversation": 1}, "turns": {"kept": 8 + 2 + 2, "dropped": 4}}
    assert meta["tokenizer"]["pad_id"] == processor.pad_id and meta["tokenizer"]["eos_id"] == 0
    assert meta["tokenizer"]["token_ids"] == processor.token_ids
    assert meta["image"]["size"] == TOWER
    codebook = out / omnimamba_prepare.CODEBOOK
    assert meta["image_tokenizer"] == {"kind": "patch_kmeans", "path": str(codebook), "codebook_size": 48,
                                       "num_image_tokens": CODES, "grid": 4, "image_size": T2I_SIDE, "downsample": 4,
                                       "sha256": meta["image_tokenizer"]["sha256"]}
    assert meta["lengths"]["mmu_len"] == 64 and meta["lengths"]["prompt_len"] == CAPTION + 4
    assert meta["lengths"]["max_mmu_length"] == max(len(r["input_ids"]) for r in _records(out, "mmu"))
    assert not list(out.rglob(".*.tmp"))


def test_the_codebook_is_fitted_on_the_t2i_images_with_the_seed(prepared, inputs):
    config, out, _ = prepared
    # Every image of the manifest that opens (the empty caption's too), in order, centre-cropped.
    names = [line["image"] for line in _lines(inputs["t2i"])
             if line and Path(line["image"]).name not in ("corrupt.png", "absent.png")]
    assert len(names) == GOOD_T2I + 1
    crops = [np.asarray(resize_short_side_and_crop(Image.open(inputs["root"] / name).convert("RGB"), T2I_SIDE))
             for name in names]
    want = PatchKMeans.fit(np.stack(crops), 48, 4, seed=config.prepare.seed)
    got = PatchKMeans.load(out / omnimamba_prepare.CODEBOOK)
    np.testing.assert_array_equal(got.centroids, want.centroids)
    other = PatchKMeans.fit(np.stack(crops), 48, 4, seed=config.prepare.seed + 1)
    assert not np.array_equal(other.centroids, want.centroids)


def test_t2i_records(prepared, processor, inputs):
    config, out, _ = prepared
    records = _records(out, "t2i")
    codebook = PatchKMeans.load(out / omnimamba_prepare.CODEBOOK)
    lines = _lines(inputs["t2i"])
    kept = [(n, line) for n, line in enumerate(lines) if line and str(line["caption"]).strip()
            and Path(line["image"]).name not in ("corrupt.png", "absent.png")]
    assert len(kept) == len(records) == GOOD_T2I
    for (item, line), record in zip(kept, records):
        assert list(record) == ["prompt_ids", "image_ids", "captions"]
        captions = line["caption"] if isinstance(line["caption"], list) else [line["caption"]]
        assert json.loads(record["captions"]) == captions  # every caption kept, one prompt row each
        np.testing.assert_array_equal(record["prompt_ids"], np.stack([processor.t2i_prompt(c) for c in captions]))
        # The random crop from the record's RNG (seed, kind, item), then the codebook's codes.
        rng = np.random.default_rng([config.prepare.seed, 1, item])
        image = Image.open(inputs["root"] / line["image"]).convert("RGB")
        crop = np.asarray(resize_short_side_and_crop(image, T2I_SIDE, rng))[None]
        assert record["image_ids"].dtype == np.int32 and record["image_ids"].shape == (CODES,)
        np.testing.assert_array_equal(record["image_ids"], codebook.encode(crop)[0])


def test_mmu_records(prepared, processor, inputs):
    from janusflow_jax.inference.omnimamba import resize_naive

    _, out, _ = prepared
    records = _records(out, "mmu")
    good = [line for line in _lines(inputs["mmu"])[:2] + _lines(inputs["mmu"])[5:]]
    assert len(good) == len(records) == GOOD_MMU
    no_image = np.zeros((1, 1, 3), np.uint8)
    for line, record in zip(good, records):
        image = Image.open(inputs["root"] / line["image"])
        if "caption" in line:
            want = caption_record(processor, line["caption"], no_image, 64)
        else:
            if "question" in line:
                turns = [{"role": "user", "content": line["question"]},
                         {"role": "assistant", "content": line["answer"]}]
            else:
                turns = [{"role": t.get("role", t.get("from")), "content": t.get("content", t.get("value"))}
                         for t in line.get("conversation", line.get("conversations"))]
            pairs = [(q["content"].replace("<image_placeholder>", ""), a["content"])
                     for q, a in zip(turns[::2], turns[1::2])]
            want = conversation_record(processor, pairs, no_image, 64)
        np.testing.assert_array_equal(record["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(record["loss_mask"], want["loss_mask"])
        assert record["template"] == want["template"]
        # The tower's pixels: exactly inference's resize-naive, stored as uint8.
        assert record["image"].dtype == np.uint8 and record["image"].shape == (TOWER, TOWER, 3)
        np.testing.assert_array_equal(record["image"].astype(np.float32) / 255.0, resize_naive(image, TOWER))
    caption_only = records[1]
    assert processor.token_ids["<|eot|>"] not in caption_only["input_ids"]  # stage 1's layout: no <|eot|>
    assert caption_only["loss_mask"].sum() == len(caption_only["input_ids"]) - 4  # the caption and its EOS
    cut_caption, cut_conversation = records[4], records[3]
    assert cut_caption["template"] == "caption_truncated" and len(cut_caption["input_ids"]) == 64
    assert cut_caption["loss_mask"][4:].all() and cut_caption["input_ids"][-1] != processor.eos_id  # cut as released
    assert cut_conversation["template"] == "turns_2_of_6" and len(cut_conversation["input_ids"]) <= 64
    assert cut_conversation["input_ids"][-1] == processor.token_ids["<|eot|>"]
    eos = np.flatnonzero(cut_conversation["input_ids"] == processor.eos_id)  # each answer ends with <|endoftext|>
    assert len(eos) == 2 and all(cut_conversation["loss_mask"][eos])


def test_killed_run_resumes_to_identical_bytes(inputs, prepared, tmp_path, monkeypatch):
    _, reference_out, _ = prepared
    out = tmp_path / "out"
    config = job_config(inputs, out)
    reference = {k: v.replace(str(reference_out).encode(), str(out).encode()) if k == codec.METADATA else v
                 for k, v in _snapshot(reference_out).items()}
    real_write, written = prepare._write_shard, []

    def dies_after_three_shards(ctx, shard, *args):
        if len(written) == 3:
            raise KeyboardInterrupt("simulated kill")
        real_write(ctx, shard, *args)
        written.append(shard.name)

    monkeypatch.setattr(prepare, "_write_shard", dies_after_three_shards)
    with pytest.raises(KeyboardInterrupt):
        prepare.run(config, progress=False)
    monkeypatch.undo()
    assert not (out / codec.METADATA).exists() and (out / omnimamba_prepare.CODEBOOK).is_file()
    (out / "t2i" / ".t2i-00001-of-00005.array_record.tmp").write_bytes(b"half a shard")  # killed mid-write
    summary = prepare.run(config, progress=False)  # the codebook is kept, not refitted
    assert (summary["shards_written"], summary["shards_reused"]) == (6, 3)
    assert _snapshot(out) == reference

    (out / "mmu" / "mmu-00002-of-00004.array_record").unlink()  # a lost shard is redone alone, identically
    assert prepare.run(config, progress=False)["shards_written"] == 1
    assert _snapshot(out) == reference


def test_config_mistakes_are_one_clear_error(inputs, tmp_path):
    for job, message in ((dict(gen_jsonl=str(inputs["t2i"])), "gen_jsonl are not read by a job of family 'omnimamba'"),
                         (dict(family="vlm"), "unknown family 'vlm'"),
                         (dict(t2i_jsonl="", mmu_jsonl=""), "no inputs: set --config.prepare.mmu_jsonl"),
                         (dict(image_tokenizer=dict(fit=False)), "no image tokenizer"),
                         (dict(image_tokenizer=dict(fit=False, path=str(tmp_path / "x.npz"))), "x.npz does not exist"),
                         (dict(image_tokenizer=dict(kind="vq16", path="x")), "fits a patch_kmeans codebook")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            prepare.run(job_config(inputs, tmp_path / "out", **job), progress=False)
    PatchKMeans(np.zeros((8, 48), np.float32), 4).save(tmp_path / "small.npz")
    with pytest.raises(ValueError, match="has 8 codes, the model's image vocabulary 48"):
        prepare.run(job_config(inputs, tmp_path / "out", dict(fit=False, path=str(tmp_path / "small.npz"))),
                    progress=False)


def _prepare_data(monkeypatch, *args) -> int:
    """`launch.prepare_data` in this process, as a user types it: one host (this process's JAX backend already runs,
    so jax.distributed is left out)."""
    from launch import prepare_data as cli

    monkeypatch.setattr(cli.host_flags, "initialize", lambda: False)
    config = Path(__file__).resolve().parents[1] / "configs" / "prepare_data.py"
    return run_cli(cli, "--progress=false", f"--config={config}:omnimamba_tiny", *args)


def test_command_line_with_a_relative_output(inputs, tmp_path, monkeypatch, capsys):
    """As a user types it, from another directory: the output relative to it; then a mistake: one error line."""
    monkeypatch.chdir(tmp_path)
    given = (f"--config.prepare.tokenizer={inputs['tokenizer']}", f"--config.prepare.t2i_jsonl={inputs['t2i']}")
    fit = ("--config.prepare.image_tokenizer.fit=true", f"--config.prepare.mmu_jsonl={inputs['mmu']}")
    assert _prepare_data(monkeypatch, *given, *fit, "--config.prepare.out=data/digits") == 0
    assert capsys.readouterr().out.startswith(f"prepared {GOOD_MMU} mmu / {GOOD_T2I} t2i records in "
                                              + str(tmp_path / "data" / "digits"))
    meta = json.loads((tmp_path / "data" / "digits" / codec.METADATA).read_text())
    assert meta["image_tokenizer"]["path"] == str(tmp_path / "data" / "digits" / omnimamba_prepare.CODEBOOK)
    assert meta["counts"] == {"mmu": GOOD_MMU, "t2i": GOOD_T2I}
    assert _prepare_data(monkeypatch, *given, "--config.prepare.out=data/other") == 1
    assert one_error_line(capsys.readouterr().err).startswith("error: no image tokenizer")


def test_command_line_on_gcs(inputs, prepared, gcs, tmp_path, monkeypatch, capsys):
    """`launch.prepare_data` with the tokenizer, the manifests, their images and the output on gs://, run from an
    empty directory: the codebook and the shards are the local run's bytes, and nothing is written under the working
    directory or into the repository (the shards go through a local temporary directory, the fitted codebook straight
    to its object)."""
    from etils import epath

    from janusflow_jax import paths
    from tests.pod_helpers import _objects

    _, local_out, _ = prepared
    remote = f"{gcs}/omnimamba_prepare"
    paths.upload_tree(inputs["root"], f"{remote}/inputs")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = repository_files()
    out = f"{remote}/out"
    job = dict(out=out, tokenizer=f"{remote}/inputs/tokenizer", t2i_jsonl=f"{remote}/inputs/t2i.jsonl",
               mmu_jsonl=f"{remote}/inputs/mmu.jsonl", records_per_shard=5, encode_batch_per_device=4, num_threads=2)
    assert _prepare_data(monkeypatch, "--config.prepare.image_tokenizer.fit=true",
                         *(f"--config.prepare.{k}={v}" for k, v in job.items())) == 0
    assert capsys.readouterr().out.startswith(f"prepared {GOOD_MMU} mmu / {GOOD_T2I} t2i records in {out}")
    local = _snapshot(local_out)
    assert _objects(out) == sorted(local)  # shards, their markers, the codebook, metadata.json: no temporary objects
    for name in local:
        if name.endswith((".array_record", ".npz")):
            assert epath.Path(out, name).read_bytes() == local[name], name
    meta = json.loads(epath.Path(out, codec.METADATA).read_text())
    assert meta["image_tokenizer"]["path"] == f"{out}/{omnimamba_prepare.CODEBOOK}"
    assert meta["counts"] == {"mmu": GOOD_MMU, "t2i": GOOD_T2I} and meta["skipped"] == EXPECTED_SKIPS
    assert list(cwd.iterdir()) == [] and repository_files() == before


def test_janusflow_fingerprints_are_those_of_before_the_omnimamba_fields():
    """A JanusFlow dataset prepared before the family fields existed still resumes: its job's fingerprint is the
    old formula over the old fields; an OmniMamba job's covers its own fields."""
    import hashlib

    from configs import prepare_data as prepare_configs

    job = prepare_configs.get_config("tiny").prepare
    old_fields = {k: v for k, v in json.loads(job.to_json_best_effort()).items()
                  if k not in ("out", "num_threads", "family", "mmu_jsonl", "t2i_jsonl", "mmu_len", "image_tokenizer")}
    assert prepare._fingerprint(job) == hashlib.sha256(json.dumps(old_fields, sort_keys=True).encode()).hexdigest()[:16]
    omnimamba = prepare_configs.get_config("omnimamba_tiny").prepare
    with omnimamba.unlocked():
        before = prepare._fingerprint(omnimamba)
        omnimamba.seq_len = 7  # a JanusFlow-only field
        assert prepare._fingerprint(omnimamba) == before
        omnimamba.image_tokenizer.patch = 2
        assert prepare._fingerprint(omnimamba) != before


def test_vq16_codes_from_a_system_checkpoint(inputs, tmp_path):
    """The release's path: t2i codes from the VQ of an OmniMamba system checkpoint (a random tiny one here), in
    batches of encode_batch_per_device; the records hold exactly the VQ's codes of the crops."""
    import jax

    from janusflow_jax import checkpoint
    from janusflow_jax.data.omnimamba_records import VQ16
    from janusflow_jax.models.omnimamba import OmniMambaSystemConfig
    from janusflow_jax.models.vq import init_vq_params

    config = job_config(inputs, tmp_path / "out", dict(kind="vq16", path=str(tmp_path / "system"), fit=False),
                        mmu_jsonl="", gen_crop="center", encode_batch_per_device=3)
    system = OmniMambaSystemConfig.from_dict(config.model.to_dict())
    # The system's config with only its VQ's parameters (all the job reads; the towers' random init takes a minute).
    checkpoint.save_params(tmp_path / "system", system, {"vq": init_vq_params(system.vq, jax.random.key(0))})
    summary = prepare.run(config, progress=False)
    assert summary["counts"] == {"mmu": 0, "t2i": GOOD_T2I}
    meta = json.loads((tmp_path / "out" / codec.METADATA).read_text())
    assert meta["image_tokenizer"] == {"kind": "vq16", "path": str(tmp_path / "system"), "codebook_size": 48,
                                       "num_image_tokens": CODES, "grid": 4, "image_size": T2I_SIDE, "downsample": 4}
    records = _records(tmp_path / "out", "t2i")
    vq = VQ16.load(tmp_path / "system")
    kept = [line for line in _lines(inputs["t2i"]) if line and str(line["caption"]).strip()
            and Path(line["image"]).name not in ("corrupt.png", "absent.png")]
    crops = np.stack([np.asarray(resize_short_side_and_crop(Image.open(inputs["root"] / line["image"]).convert("RGB"),
                                                            T2I_SIDE)) for line in kept])
    np.testing.assert_array_equal(np.stack([r["image_ids"] for r in records]), vq.encode(crops))
