"""The grain loader (janusflow_jax/data/loader.py) reading OmniMamba records: a tiny digits dataset written by the
preparation job (tests/omnimamba_data.py), read for configs/omnimamba_stage2.py:tiny's geometry (14 px tower,
4 x 4 codes of 48, 16-id prompts, mmu rows of 72 ids: the 64 prepared and padding)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from configs import omnimamba_stage2
from janusflow_jax.data import loader as data
from janusflow_jax.data import prepare
from janusflow_jax.data import records as codec
from janusflow_jax.data.batch import BatchGeometry
from janusflow_jax.data.omnimamba_batch import OmniMambaGeometry
from janusflow_jax.data.omnimamba_records import decode_mmu
from tests.omnimamba_data import GOOD_MMU, GOOD_T2I, job_config, write_inputs

SIZES = {"mmu": 2, "t2i": 4}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("omnimamba_loader")
    config = job_config(write_inputs(root / "in"), root / "out")
    summary = prepare.run(config, progress=False)
    assert summary["counts"] == {"mmu": GOOD_MMU, "t2i": GOOD_T2I}
    return root / "out"


@pytest.fixture(scope="module")
def geometry(dataset):
    config = omnimamba_stage2.get_config("tiny")
    with config.unlocked():
        config.data.update(dict(mmu_len=72, pad_id=data.load_metadata(dataset)["tokenizer"]["pad_id"]))
    return OmniMambaGeometry.from_config(config)


def _config(directory, **changes):
    config = data.default_config()
    config.update(dict(dir=str(directory), read_threads=0, prefetch=0))
    config.update(changes)
    return config


def _records(directory, kind) -> list[dict]:
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for name in data.load_metadata(directory)["shards"][kind]:
        reader = ArrayRecordReader(str(directory / name))
        out += [codec.decode_record(b) for b in reader.read_all()]
        reader.close()
    return out


def _rows(batch, kind) -> list[bytes]:
    """Each row of one type as bytes (its identity)."""
    keys = sorted(k for k in batch if k.startswith(f"{kind}/"))
    return [b"".join(batch[k][i].tobytes() for k in keys) for i in range(len(batch[keys[0]]))]


def _example(decoded: dict) -> bytes:
    return b"".join(v.tobytes() for _, v in sorted(decoded.items()))


def _caption_variants(record, geometry) -> list[dict]:
    """The t2i examples a record can load as: one per caption."""
    return [{"t2i/prompt_ids": row, "t2i/image_ids": record["image_ids"]}
            for row in np.asarray(record["prompt_ids"]).reshape(-1, geometry.prompt_len)]


def test_a_fresh_caption_per_load(dataset, geometry):
    """Every caption of a several-caption image is drawn over epochs, a draw per (seed, epoch, record): the same
    for the same seed, another for another seed."""
    several = [r for r in _records(dataset, "t2i") if len(json.loads(r["captions"])) > 1]
    assert several and all(len(r["prompt_ids"]) == 3 for r in several)
    codes = {r["image_ids"].tobytes(): r for r in several}

    def draws(seed, epochs=16):
        it = data.make_train_iterator(_config(dataset), {"t2i": 4}, geometry, seed=seed, shard_index=0,
                                      shard_count=1)
        batches = [it.take({"t2i": 4}) for _ in range(epochs * GOOD_T2I // 4)]
        it.close()
        return [(p.tobytes(), c.tobytes()) for b in batches for p, c in zip(b["t2i/prompt_ids"], b["t2i/image_ids"])
                if c.tobytes() in codes]

    first, again, other = draws(0), draws(0), draws(1)
    assert first == again and first != other
    for key, record in codes.items():
        drawn = {p for p, c in first if c == key}
        assert drawn == {row.tobytes() for row in record["prompt_ids"]}  # all three captions over 16 epochs


def test_batches_are_the_records_in_the_layout(dataset, geometry):
    examples = {"mmu": {_example(decode_mmu(r, geometry)): r for r in _records(dataset, "mmu")},
                "t2i": {_example(v): r for r in _records(dataset, "t2i") for v in _caption_variants(r, geometry)}}
    iterator = data.make_train_iterator(_config(dataset), SIZES, geometry, shard_index=0, shard_count=1)
    seen = {kind: set() for kind in SIZES}
    for _ in range(8):  # 16 mmu rows (an epoch of 15, then one more), 32 t2i rows (an epoch of 20, then more)
        batch = next(iterator)
        geometry.check(batch, SIZES, "the loader")
        for kind in SIZES:
            rows = _rows(batch, kind)
            assert all(row in examples[kind] for row in rows), kind  # each row is one whole prepared example
            seen[kind] |= set(rows)
    assert seen["mmu"] == set(examples["mmu"])
    assert len({examples["t2i"][row]["image_ids"].tobytes() for row in seen["t2i"]}) == GOOD_T2I  # an epoch, then more
    mmu = batch["mmu/input_ids"]
    assert (mmu[:, -1] == geometry.pad_id).all() and batch["mmu/images"].max() <= 1.0


def test_steps_of_any_composition_and_any_host_count(dataset, geometry):
    """The trainer's per-step compositions (data/mixture.py): `take` whole units of either type; with 2 streams one
    host's rows are those of two hosts side by side, whatever each step takes."""
    steps = [{"mmu": 2, "t2i": 4}, {"t2i": 2}, {"mmu": 4}, {"mmu": 2, "t2i": 2}]

    def run(host, hosts):
        it = data.make_train_iterator(_config(dataset, streams=2), {"mmu": 2, "t2i": 2}, geometry,
                                      shard_index=host, shard_count=hosts, unit_rows=2 // hosts)
        return [it.take({k: n // hosts for k, n in sizes.items()}) for sizes in steps]

    one, first, second = run(0, 1), run(0, 2), run(1, 2)
    for sizes, whole, a, b in zip(steps, one, first, second):
        geometry.check(whole, sizes, "the loader")
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([a[key], b[key]]), err_msg=key)
    with pytest.raises(ValueError, match="3 t2i rows are not whole units of 2 rows"):
        data.make_train_iterator(_config(dataset), SIZES, geometry, shard_index=0, shard_count=1).take({"t2i": 3})


def test_resume_from_a_saved_state_is_exact(dataset, geometry):
    config = _config(dataset, prefetch=2)
    iterator = data.make_train_iterator(config, SIZES, geometry, shard_index=0, shard_count=1)
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    assert set(json.loads(state)) == set(SIZES)
    reference = [iterator.take(sizes) for sizes in ({"mmu": 2}, SIZES, {"t2i": 8}, SIZES)]
    restored = data.make_train_iterator(config, SIZES, geometry, shard_index=0, shard_count=1)
    restored.set_state(state)
    again = [restored.take(sizes) for sizes in ({"mmu": 2}, SIZES, {"t2i": 8}, SIZES)]
    for x, y in zip(reference, again):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    for it in (iterator, restored):
        it.close()


def test_a_dataset_that_does_not_fit_is_refused_in_one_line(dataset, geometry, tmp_path):
    config = _config(dataset)
    wrong = dataclasses.replace(geometry, mmu_len=16, pad_id=geometry.pad_id + 1, image_size=384,
                                num_image_tokens=256, image_vocab_size=16384, prompt_len=72)
    with pytest.raises(ValueError) as error:
        data.make_train_iterator(config, SIZES, wrong, shard_index=0, shard_count=21)
    message = str(error.value)
    assert "\n" not in message
    for part in ("15 mmu records cannot feed 21 host shard(s)", "data.pad_id / data.eos_id are 60 / 0",
                 "an mmu record has 64 ids > data.mmu_len 16", "prepared at 14 px, the tower wants 384",
                 "t2i prompts are 16 ids, the model wants 72", "t2i images are 16 codes (4^2), the model wants 256",
                 "the patch_kmeans codebook has 48 codes, the model's image vocabulary 16384"):
        assert part in message, part
    # Only the types read are checked: mmu rows alone do not look at the codes.
    data.make_train_iterator(config, {"mmu": 2}, dataclasses.replace(geometry, num_image_tokens=256),
                             shard_index=0, shard_count=1).close()

    # The other family, either way round.
    janusflow = BatchGeometry(seq_len=64, prompt_len=16, image_size=14, latent_size=2)
    with pytest.raises(ValueError, match=r"holds omnimamba records \(mmu, t2i\), this run trains janusflow"):
        data.make_train_iterator(config, {"und": 2}, janusflow, shard_index=0, shard_count=1)
    older = tmp_path / "janusflow"  # a JanusFlow dataset's metadata names no family
    older.mkdir()
    meta = json.loads((dataset / codec.METADATA).read_text())
    del meta["family"]
    (older / codec.METADATA).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="holds janusflow records .* --config.prepare.family=omnimamba"):
        data.make_train_iterator(_config(older), SIZES, geometry, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match=r"sizes must give rows >= 0 for \('mmu', 't2i'\)"):
        data.make_train_iterator(config, {"gen": 2}, geometry, shard_index=0, shard_count=1)
    shutil.rmtree(older)


def test_worker_processes(dataset, geometry):
    """The stage configs read with worker processes (data.num_workers): same batches as in this process."""
    iterator = data.make_train_iterator(_config(dataset, num_workers=1, prefetch=1), SIZES, geometry, shard_index=0,
                                        shard_count=1)
    local = data.make_train_iterator(_config(dataset), SIZES, geometry, shard_index=0, shard_count=1)
    for _ in range(2):
        a, b = next(iterator), next(local)
        for key in b:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    iterator.close()
