"""The grain training loader (janusflow_jax/data/loader.py) on a small dataset written by the preparation job.

12 records per type (tiny model shapes: 64 px images, 16 image tokens, 8 x 8 x 192 space_to_depth latents), rows of
160 tokens, at most 2 images per understanding row, 2 / 3 / 2 rows of und / gen / text per batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import prepare_data as prepare_configs
from janusflow_jax.data import loader as data
from janusflow_jax.data import prepare
from janusflow_jax.data import records as codec
from janusflow_jax.data.batch import BatchGeometry
from janusflow_jax.data.processor import make_tokenizer

WORDS = "a the red blue cat dog bird photo of what is this on in big small sky grass tree two".split()
N = 12  # records per type
SIZES = {"und": 2, "gen": 3, "text": 2}
GEOMETRY = BatchGeometry(seq_len=160, prompt_len=32, image_size=64, latent_size=8, latent_channels=192,
                         images_per_row=2, num_image_tokens=16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    gen, und, text = [], [], []
    for i in range(N):
        Image.fromarray(rng.integers(0, 256, (64 + 16 * (i % 2), 64, 3), np.uint8)).save(root / f"{i}.png")
        gen.append({"image": f"{i}.png", "caption": f"a photo of {i} {WORDS[i]}"})
        answer = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 * i + 1))  # 1 .. 34 words
        und.append({"image": f"{i}.png", "question": f"what is {i}", "answer": answer})
        text.append({"text": " ".join([str(i)] + WORDS[: 2 + 5 * i])})
    for name, rows in (("gen", gen), ("und", und), ("text", text)):
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = prepare_configs.get_config("tiny")
    with config.unlocked():
        config.prepare.update(dict(
            out=str(root / "out"), tokenizer=str(make_tokenizer(root / "tok", WORDS + [str(i) for i in range(N)])),
            gen_jsonl=str(root / "gen.jsonl"), und_jsonl=str(root / "und.jsonl"), text_jsonl=str(root / "text.jsonl"),
            records_per_shard=5, encode_batch_per_device=1, num_threads=2, seq_len=160, system_prompt=""))
    summary = prepare.run(config, progress=False)
    assert summary["counts"] == {"gen": N, "und": N, "text": N}, summary["skipped"]
    return root / "out"


def _config(directory, **changes):
    config = data.default_config()
    config.dir = str(directory)
    config.read_threads = 0  # tests: no reader threads (the background prefetch thread stays on)
    config.packing_bins = 8
    config.update(changes)
    return config


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _records(directory, kind) -> list[dict]:
    from array_record.python.array_record_module import ArrayRecordReader

    meta = data.load_metadata(directory)
    out = []
    for name in meta["shards"][kind]:
        reader = ArrayRecordReader(str(Path(directory) / name))
        out += [codec.decode_record(b) for b in reader.read_all()]
        reader.close()
    return out


def _segments(batch, kind):
    """(row, first, last + 1) of every packed example."""
    out = []
    for row, seg in enumerate(batch[f"{kind}/segment_ids"]):
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            out.append((row, where[0], where[-1] + 1))
    return out


def _identities(batch) -> dict[str, list]:
    """Which records a batch holds: token tuples for und/text segments, a pixel hash for gen rows."""
    ids = {kind: [tuple(batch[f"{kind}/input_ids"][r, a:b]) for r, a, b in _segments(batch, kind)]
           for kind in ("und", "text") if f"{kind}/input_ids" in batch}
    if "gen/images" in batch:
        ids["gen"] = [hashlib.sha1(x.tobytes()).hexdigest() for x in batch["gen/images"]]
    return ids


def _all_identities(directory) -> dict[str, set]:
    meta = data.load_metadata(directory)["image"]
    ids = {kind: {tuple(r["input_ids"]) for r in _records(directory, kind)} for kind in ("und", "text")}
    ids["gen"] = {hashlib.sha1(codec.normalize_pixels(r["image"], meta["mean"], meta["std"]).tobytes()).hexdigest()
                  for r in _records(directory, "gen")}
    return ids


# -------------------------------------------------------------------------------------------------------- layout
def test_batches_follow_the_batch_layout(dataset):
    iterator = data.make_train_iterator(_config(dataset), SIZES, GEOMETRY, shard_index=0, shard_count=1)
    for batch in _take(iterator, 3):
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == GEOMETRY.shapes(SIZES)
    iterator.close()
    # A stage config's `data` (other fields too, some loader fields left out) works as is; no und rows: no und keys.
    stage_data = ml_collections.ConfigDict(dict(source="prepared", dir=str(dataset), seq_len=160, prompt_len=32,
                                                images_per_row=2, pack=True, num_workers=0, prefetch=0))
    sizes = {"gen": 2, "text": 1}
    batch = next(data.make_train_iterator(stage_data, sizes, GEOMETRY, shard_index=0, shard_count=1))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == GEOMETRY.shapes(sizes)


def test_packing_keeps_examples_intact(dataset):
    by_ids = {kind: {tuple(r["input_ids"]): r for r in _records(dataset, kind)} for kind in ("und", "text")}
    meta = data.load_metadata(dataset)["image"]
    iterator = data.make_train_iterator(_config(dataset, prefetch=0), SIZES, GEOMETRY, shard_index=0, shard_count=1)
    per_row = []
    for batch in _take(iterator, 8):
        for kind in ("und", "text"):
            seg, pos, loss = (batch[f"{kind}/{f}"] for f in ("segment_ids", "positions", "loss_mask"))
            assert not loss[seg == 0].any() and not pos[seg == 0].any()
            for row in seg:  # 1, 2, ..., k then padding
                used = int((row > 0).sum())
                assert row[:used].all() and not row[used:].any()
                assert list(dict.fromkeys(row[:used].tolist())) == list(range(1, row.max() + 1))
            images_in_row = np.zeros(len(seg), int)
            for r, a, b in _segments(batch, kind):
                np.testing.assert_array_equal(pos[r, a:b], np.arange(b - a))  # positions restart per example
                record = by_ids[kind][tuple(batch[f"{kind}/input_ids"][r, a:b])]  # a whole prepared example
                np.testing.assert_array_equal(loss[r, a:b], record["loss_mask"])
                assert loss[r, a] == 0  # no target across a segment boundary
                if kind == "und":
                    np.testing.assert_array_equal(batch["und/image_token_mask"][r, a:b], record["image_token_mask"])
                    # Its image fills the next image group of the row, normalised like the processor's pixels.
                    k = images_in_row[r]
                    np.testing.assert_array_equal(batch["und/images"][r, k],
                                                  codec.normalize_pixels(record["images"][0], meta["mean"],
                                                                           meta["std"]))
                    images_in_row[r] += 1
            if kind == "und":
                assert (batch["und/image_token_mask"].sum(1) == images_in_row * 17).all()
                for r, n in enumerate(images_in_row):
                    assert not batch["und/images"][r, n:].any()  # unused image slots are zeros
                per_row += list(images_in_row)
    assert max(per_row) == 2 and min(per_row) >= 1  # rows do hold 2 examples, never more than images_per_row

    padded = data.make_train_iterator(_config(dataset, pack=False, prefetch=0), SIZES, GEOMETRY, shard_index=0,
                                      shard_count=1)
    batch = next(padded)
    assert (batch["und/segment_ids"].max(1) == 1).all() and (batch["text/segment_ids"].max(1) == 1).all()


def test_pad_fraction():
    assert data.pad_fraction([3, 3, 3], [0, 0, 0], seq_len=4) == pytest.approx(0.25)
    assert data.pad_fraction([2, 2, 2, 2], [0] * 4, seq_len=4) == 0.0
    assert data.pad_fraction([2, 2, 2, 2], [1] * 4, seq_len=4, images_per_row=1) == pytest.approx(0.5)
    assert data.pad_fraction([2, 2, 2, 2], [1] * 4, seq_len=4, images_per_row=2) == 0.0
    assert data.pad_fraction([2, 2, 2, 2], [0] * 4, seq_len=4, pack=False) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------- order and mixture
def test_every_record_is_drawn_and_epochs_reshuffle(dataset):
    everything = _all_identities(dataset)
    iterator = data.make_train_iterator(_config(dataset), SIZES, GEOMETRY, shard_index=0, shard_count=1)
    seen = {kind: [] for kind in SIZES}
    for batch in _take(iterator, 12):
        for kind in SIZES:  # the mixture is fixed by construction: exactly these rows of each type
            assert len(batch[f"{kind}/segment_ids" if kind != "gen" else "gen/latents"]) == SIZES[kind]
        for kind, ids in _identities(batch).items():
            seen[kind] += ids
    for kind in SIZES:
        assert set(seen[kind]) == everything[kind], kind
    epoch_1, epoch_2, epoch_3 = seen["gen"][:N], seen["gen"][N:2 * N], seen["gen"][2 * N:3 * N]
    assert set(epoch_1) == set(epoch_2) == set(epoch_3) == everything["gen"]  # every epoch is a permutation
    assert epoch_1 != epoch_2 and epoch_2 != epoch_3  # ... a new one each time


def test_same_seed_same_batches_other_seed_other_order(dataset):
    def first(run_seed, **changes):
        iterator = data.make_train_iterator(_config(dataset, prefetch=0, **changes), SIZES, GEOMETRY, seed=run_seed,
                                            shard_index=0, shard_count=1)
        return _take(iterator, 2)

    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert not np.array_equal(a[0]["gen/latents"], c[0]["gen/latents"])
    d = first(0, seed=5)  # data_config.seed is folded in too
    assert not np.array_equal(a[0]["gen/latents"], d[0]["gen/latents"])


def test_hosts_see_disjoint_records(dataset):
    everything = _all_identities(dataset)
    seen = []
    for host in range(2):
        iterator = data.make_train_iterator(_config(dataset, prefetch=0), SIZES, GEOMETRY, shard_index=host,
                                            shard_count=2)
        ids = {kind: set() for kind in SIZES}
        for batch in _take(iterator, 6):
            for kind, found in _identities(batch).items():
                ids[kind] |= set(found)
        seen.append(ids)
    for kind in SIZES:
        assert not seen[0][kind] & seen[1][kind], kind
        assert seen[0][kind] | seen[1][kind] == everything[kind], kind


def test_streams_make_the_global_batch_independent_of_the_host_count(dataset):
    """data.streams=2: one host reads both streams, or two hosts one each; the second's rows side by side are the
    first's, record for record, and each of the two hosts reads only its own stream's records."""
    sizes = {"und": 2, "gen": 4, "text": 2}  # per host of 1; the 2 hosts get half each

    def batches(host, hosts):
        per_host = {kind: n // hosts for kind, n in sizes.items()}
        return _take(data.make_train_iterator(_config(dataset, prefetch=0, streams=2), per_host, GEOMETRY,
                                              shard_index=host, shard_count=hosts), 4)

    one, (first, second) = batches(0, 1), (batches(0, 2), batches(1, 2))
    for whole, a, b in zip(one, first, second):
        assert whole.keys() == a.keys() == b.keys()
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([a[key], b[key]]), err_msg=key)
    seen = [{kind: set() for kind in sizes} for _ in range(2)]
    for host, run in enumerate((first, second)):
        for batch in run:
            for kind, found in _identities(batch).items():
                seen[host][kind] |= set(found)
    assert all(not seen[0][kind] & seen[1][kind] for kind in sizes)
    with pytest.raises(ValueError, match=r"data.streams 2 cannot be read by 3 hosts: run on a host count that divides "
                                         r"it \(1, 2\)"):
        data.make_train_iterator(_config(dataset, streams=2), SIZES, GEOMETRY, shard_index=0, shard_count=3)
    with pytest.raises(ValueError, match=r"in units of 1 do not split over this host's 2 reading"):
        data.make_train_iterator(_config(dataset, streams=2), SIZES, GEOMETRY, shard_index=0, shard_count=1)


def test_steps_of_any_composition_are_whole_units_and_host_count_independent(dataset):
    """The trainer's per-step compositions (data/mixture.py): `take` any whole units of the types read. With 2
    streams a unit is one row per stream; a step's rows are laid out stream by stream, so one host reading both
    streams sees the rows of two hosts side by side, step after step, whatever each step's composition."""
    steps = [{"und": 2, "gen": 4}, {"gen": 2, "text": 2}, {"und": 4, "gen": 2, "text": 2}]
    types = {"und": 2, "gen": 2, "text": 2}

    def run(host, hosts):
        it = data.make_train_iterator(_config(dataset, prefetch=0, streams=2), types, GEOMETRY, shard_index=host,
                                      shard_count=hosts, unit_rows=2 // hosts)
        return [it.take({k: n // hosts for k, n in sizes.items()}) for sizes in steps]

    one, first, second = run(0, 1), run(0, 2), run(1, 2)
    for sizes, whole, a, b in zip(steps, one, first, second):
        assert {k: (v.shape, v.dtype) for k, v in whole.items()} == GEOMETRY.shapes(sizes)
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([a[key], b[key]]), err_msg=key)
    it = data.make_train_iterator(_config(dataset, prefetch=0), types, GEOMETRY, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="3 gen rows are not whole units of 2 rows"):
        it.take({"gen": 3})


# ------------------------------------------------------------------------------------------------ checkpointing
def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for x, y in zip(batches_a, batches_b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_resume_from_a_saved_state_is_exact(dataset, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    config = _config(dataset)  # background prefetch on: the state is that of the last batch handed out
    iterator = data.make_train_iterator(config, SIZES, GEOMETRY, shard_index=0, shard_count=1)
    _take(iterator, 3)
    state = iterator.get_state()
    assert set(json.loads(state)) == set(SIZES)  # plain JSON, a state per data type: one small file per host
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=dict(data=grain.checkpoint.CheckpointHandler()),
                               options=options) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    reference = _take(iterator, 5)  # the uninterrupted run

    restored = data.make_train_iterator(config, SIZES, GEOMETRY, shard_index=0, shard_count=1)
    restored.set_state(state)
    _assert_same(_take(restored, 5), reference)

    fresh = data.make_train_iterator(config, SIZES, GEOMETRY, shard_index=0, shard_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=dict(data=grain.checkpoint.CheckpointHandler()),
                               options=options) as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same(_take(fresh, 5), reference)
    for it in (iterator, restored, fresh):
        it.close()


def test_a_state_saved_on_two_hosts_resumes_on_one_or_four(dataset, tmp_path):
    """Saved per reading stream (`stream_state.Handler`, orbax's layout): 2 hosts' states, read back by 1 host (both
    streams) or by 4 (one each), continue the uninterrupted batches of 1 host exactly; a state saved per process
    (grain's own handler) resumes on its own host count only, and any other is refused in one line."""
    from janusflow_jax.data import stream_state

    config, sizes = _config(dataset, streams=4, prefetch=0), {"und": 4, "gen": 4, "text": 4}  # rows of 1 host

    def host(index, count):
        return data.make_train_iterator(config, {k: n // count for k, n in sizes.items()}, GEOMETRY,
                                        shard_index=index, shard_count=count)

    def step(iterators):
        parts = [next(it) for it in iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    reference = [step([it]) for it in [host(0, 1)] for _ in range(3)]
    saved = tmp_path / "data"
    saved.mkdir()
    two = [host(i, 2) for i in range(2)]
    _assert_same([step(two)], reference[:1])
    for it in two:
        stream_state.Handler().save(saved, item=it)
    assert sorted(p.name for p in saved.iterdir()) == [f"stream_{s}-of-4.json" for s in range(4)]
    for count in (1, 4):
        hosts = [host(i, count) for i in range(count)]
        for it in hosts:
            stream_state.Handler().restore(saved, item=it)
        _assert_same([step(hosts) for _ in range(2)], reference[1:])
    other = host(0, 1)
    with pytest.raises(ValueError, match=r"saved from 4 reading streams, this run reads 2: set "
                                         r"--config.data.streams=4 and run on a host count that divides it \(1, 2, 4\)"):
        stream_state.Handler().restore(saved, item=data.make_train_iterator(
            _config(dataset, streams=2, prefetch=0), {"und": 2, "gen": 2, "text": 2}, GEOMETRY, shard_index=0,
            shard_count=1))
    old = tmp_path / "old"  # a checkpoint from before the states were per stream: process_0-of-2.json, ...
    old.mkdir()
    (old / "process_0-of-2.json").write_text(other.get_state().decode())
    with pytest.raises(ValueError, match=r"saved per process by 2 hosts .* this run has 1: resume on 2 hosts"):
        stream_state.Handler().restore(old, item=other)
    for it in two + hosts + [other]:
        it.close()


def test_worker_processes_resume_exactly_and_outlive_a_stop_signal(dataset):
    # One iterator (starting worker processes is the slow part): rewinding it to a saved state replays the batches.
    iterator = data.make_train_iterator(_config(dataset, num_workers=2, prefetch=1), SIZES, GEOMETRY, shard_index=0,
                                        shard_count=1)
    head = _take(iterator, 2)
    state = iterator.get_state()
    tail = _take(iterator, 3)
    iterator.set_state(state)
    _assert_same(_take(iterator, 3), tail)
    # A preemption notice (SIGTERM) or a Ctrl-C reaches the workers too (a VM shutdown, a terminal): they leave it
    # to the trainer, which still reads the batches up to the hosts' agreed step.
    import multiprocessing
    import os
    import signal
    import time

    def notice(workers):
        for worker in workers:
            os.kill(worker.pid, signal.SIGTERM)
            os.kill(worker.pid, signal.SIGINT)
        time.sleep(1.0)
        assert all(worker.is_alive() for worker in workers), [worker.exitcode for worker in workers]

    workers = multiprocessing.active_children()
    assert len(workers) >= 2 * len(SIZES)  # per data type
    notice(workers)
    assert len(_take(iterator, 6)) == 6
    iterator.close()
    assert {k: (v.shape, v.dtype) for k, v in head[0].items()} == GEOMETRY.shapes(SIZES)
    # Also while they start (grain's checkpoint handler starts them right after a restore): they are born immune.
    one_type = dict([next(iter(SIZES.items()))])
    iterator = data.make_train_iterator(_config(dataset, num_workers=2, prefetch=1), one_type, GEOMETRY,
                                        shard_index=0, shard_count=1)
    iterator.set_state(iterator.get_state())
    iterator.start_prefetch()
    deadline, starting = time.monotonic() + 60, []
    while len(starting) < 2 and time.monotonic() < deadline:  # grain's threads spawn them
        time.sleep(0.01)  # (a worker takes seconds to start: spawned, it imports grain and the pipeline)
        starting = [w for w in multiprocessing.active_children() if w not in workers]
    notice(starting)
    assert len(_take(iterator, 2)) == 2
    iterator.close()


# ------------------------------------------------------------------------------------------ latents and checks
def test_latents_are_posterior_draws_or_means(dataset, tmp_path):
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    # A copy of the dataset whose generation records carry a posterior log-variance, as sdxl_vae ones do.
    copy = tmp_path / "with_logvar"
    shutil.copytree(dataset, copy)
    logvar = float(np.log(0.1 ** 2))
    for name in data.load_metadata(copy)["shards"]["gen"]:
        reader = ArrayRecordReader(str(copy / name))
        records = [codec.decode_record(b) for b in reader.read_all()]
        reader.close()
        writer = ArrayRecordWriter(str(copy / name), "group_size:1")
        for record in records:
            record["latent_logvar"] = np.full_like(record["latent_mean"], logvar)
            writer.write(codec.encode_record(record))
        writer.close()
    means = {}
    meta = data.load_metadata(copy)["image"]
    for record in _records(copy, "gen"):
        key = hashlib.sha1(codec.normalize_pixels(record["image"], meta["mean"], meta["std"]).tobytes()).hexdigest()
        means[key] = record["latent_mean"]

    def draws(posterior):
        iterator = data.make_train_iterator(_config(copy, posterior=posterior, prefetch=0), {"gen": 3}, GEOMETRY,
                                            shard_index=0, shard_count=1)
        out = []
        for batch in _take(iterator, 8):  # two epochs of 12
            out += zip(_identities(batch)["gen"], batch["gen/latents"])
        return out

    noise = {}
    for key, latent in draws("sample"):
        noise.setdefault(key, []).append(latent - means[key])
    eps = np.concatenate([np.stack(v) for v in noise.values()]) / 0.1
    assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1) < 0.02  # mean + 0.1 * N(0, 1)
    assert all(len(v) == 2 and not np.array_equal(v[0], v[1]) for v in noise.values())  # fresh draw per epoch
    for key, latent in draws("mean"):
        np.testing.assert_array_equal(latent, means[key])


def test_mismatched_dataset_is_refused(dataset):
    config = _config(dataset)
    for change, message in ((dict(latent_channels=4), r"latents are 8\^2 x 192"),
                            (dict(seq_len=64), "tokens > seq_len 64"),
                            (dict(num_image_tokens=576), "576"),
                            (dict(image_size=384), "384")):
        with pytest.raises(ValueError, match=message):
            data.make_train_iterator(config, SIZES, dataclasses.replace(GEOMETRY, **change), shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="cannot feed 13 host shard"):
        data.make_train_iterator(config, SIZES, GEOMETRY, shard_index=0, shard_count=13)
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        data.make_train_iterator(_config(Path(dataset).parent), SIZES, GEOMETRY, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="sizes"):
        data.make_train_iterator(config, {"vqa": 2}, GEOMETRY, shard_index=0, shard_count=1)
