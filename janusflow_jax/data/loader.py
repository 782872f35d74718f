"""The training loader: prepared ArrayRecord shards -> batches in the fixed layout of `batch.py`, with grain.

One grain pipeline per data type and reading stream (`streams`: hosts own whole streams), each
    ArrayRecord source (local or gs://) -> the stream's records [stream::streams] -> global shuffle (a new order
    every epoch, seeded) -> repeat forever -> decode (generation: draw the latent from the stored posterior, a fresh
    draw per epoch) -> understanding/text: first-fit packing into rows of seq_len (at most `images_per_row` images per
    understanding row), or one example per row when `pack` is False -> fixed sub-batch,
OmniMamba's types (`OmniMambaGeometry`, a dataset prepared with family "omnimamba") have one example per row:
    mmu: ids and loss mask right-padded to mmu_len, the uint8 tower-size image scaled to [0, 1]
    (`omnimamba_records.decode_mmu`); t2i: the fixed-length prompt and codes (`decode_t2i`);
each data type's streams zipped into one grain iterator of *units* (`unit_rows` rows of that type on this host, the
streams' shares side by side). A step takes as many units of each type as the mixture schedule gives it
(`MixtureIterator.take`, data/mixture.py), rows laid out stream by stream so that the global batch is the same on any
number of hosts (`sharding.global_batch` makes host p's rows the p-th block of it, whatever the mesh's device
order). Packing writes segment ids (1, 2, ... per example, 0 = padding) and positions restarting at 0 in every
example; prepared records have no loss on their first token, so no target crosses a segment boundary. Images stay
uint8 until the sub-batch is formed and are then normalised exactly as the official processor does
(metadata["image"]); unused image slots of a row are zeros.

Checkpointing: the iterator's state is the states of its per-type grain iterators (read positions, packing progress)
as JSON bytes, saved beside the train state in the same orbax step:

    mngr = ocp.CheckpointManager(dir, item_handlers=dict(state=..., data=grain.checkpoint.CheckpointHandler()))
    mngr.save(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(iterator)))
    mngr.restore(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointRestore(iterator)))

(or `it.get_state()` / `it.set_state(state)` directly). The batches after a restore equal those of an uninterrupted
run. Restore with the same data config (num_workers and streams included), data types and unit: the state indexes
this exact pipeline. A training checkpoint saves it per reading stream (`stream_state.py`, one file per stream), so
any host count dividing `data.streams` resumes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
from typing import Mapping

import ml_collections
import numpy as np
from etils import epath

from janusflow_jax.data import stream_state
from janusflow_jax.data.batch import DATA_TYPES, BatchGeometry
from janusflow_jax.data.omnimamba_batch import OmniMambaGeometry
from janusflow_jax.data.omnimamba_records import decode_mmu, decode_t2i
from janusflow_jax.data.records import METADATA, decode_record, normalize_pixels


def default_config() -> ml_collections.ConfigDict:
    """The loader fields (a stage config embeds them in `config.data`; fields it leaves out take these values)."""
    return ml_collections.ConfigDict(dict(
        dir="",  # a directory written by launch.prepare_data (holds metadata.json)
        pack=True,  # pack understanding / text examples into rows of seq_len; False: one example per row, padded
        packing_bins=64,  # rows filled at once by first-fit packing (more bins: less padding, more memory)
        posterior="sample",  # generation latents: "sample" a fresh posterior draw, or the posterior "mean"
        seed=0,  # folded with make_train_iterator's `seed`: order, posterior draws
        num_workers=0,  # grain worker processes (each builds whole batches from its slice); 0 = in this process
        prefetch=2,  # batches buffered ahead (per worker with workers, in a background thread without)
        read_threads=4,  # threads reading + decoding records, per process
        read_buffer=64,  # records read ahead per data type, per process
        # Reading streams the records are dealt to (records [s::streams]), each with its own shuffle and packing; a
        # host reads streams/hosts of them and its rows are their sub-batches side by side. The global batch is then
        # the same on any number of hosts that divides `streams` (a 1-host run equals a 2-host run bit for bit).
        # 0: one stream per host.
        streams=0,
    ))


def _loader_fields(data_config) -> ml_collections.ConfigDict:
    """`default_config()` updated with the loader fields `data_config` sets; its other fields (a stage config's
    `data` also holds seq_len, source, ...) are ignored."""
    fields = default_config()
    given = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
    fields.update({key: value for key, value in given.items() if key in fields})
    return fields


def load_metadata(directory) -> dict:
    """metadata.json of a prepared dataset (with a clear error when it is not one)."""
    path = epath.Path(directory) / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a prepared dataset (no {METADATA}; run launch.prepare_data)")
    return json.loads(path.read_text())


def _family(geometry) -> str:
    return "omnimamba" if isinstance(geometry, OmniMambaGeometry) else "janusflow"


def _check_family(meta: Mapping, geometry):
    found = meta.get("family", "janusflow")  # datasets prepared before families were named are JanusFlow's
    if found != _family(geometry):
        raise ValueError(f"the prepared dataset {meta['config']['prepare']['out']} holds {found} records "
                         f"({', '.join(meta['counts'])}), this run trains {_family(geometry)} "
                         f"({', '.join(geometry.types)}): prepare it with --config.prepare.family={_family(geometry)}")


def _too_few(meta: Mapping, sizes: Mapping[str, int], streams: int, hosts: int) -> list[str]:
    return [f"{meta['counts'][kind]} {kind} records cannot feed {streams} "
            + ("host shard(s)" if streams == hosts else "reading streams (data.streams)")
            for kind, rows in sizes.items() if rows and meta["counts"][kind] < streams]


def _check(meta: Mapping, sizes: Mapping[str, int], geometry: BatchGeometry, streams: int, hosts: int):
    """Refuses a dataset that does not fit the batch the model expects, naming the mismatch."""
    _check_family(meta, geometry)
    g = geometry
    seq_len, prompt_len, image_size, images_per_row = g.seq_len, g.prompt_len, g.image_size, g.images_per_row
    latent_size, latent_channels, num_image_tokens = g.latent_size, g.latent_channels, g.num_image_tokens
    problems = _too_few(meta, sizes, streams, hosts)
    lengths = meta["lengths"]
    if sizes.get("und", 0):
        if meta["image"]["size"] != image_size:
            problems.append(f"images were prepared at {meta['image']['size']} px, the model wants {image_size}")
        if meta["image"]["num_image_tokens"] != num_image_tokens:
            problems.append(f"understanding records have {meta['image']['num_image_tokens']} image tokens per image, "
                            f"the model wants {num_image_tokens}")
        if lengths["max_und_length"] > seq_len:
            problems.append(f"an understanding record has {lengths['max_und_length']} tokens > seq_len {seq_len}")
        if lengths["max_images_per_record"] > images_per_row:
            problems.append(f"a record has {lengths['max_images_per_record']} images > images_per_row "
                            f"{images_per_row}")
    if sizes.get("text", 0) and lengths["max_text_length"] > seq_len:
        problems.append(f"a text record has {lengths['max_text_length']} tokens > seq_len {seq_len}")
    if sizes.get("gen", 0):
        latent = meta["latent"]
        if (latent["latent_size"], latent["latent_channels"]) != (latent_size, latent_channels):
            problems.append(f"latents are {latent['latent_size']}^2 x {latent['latent_channels']} ({latent['kind']}), "
                            f"the model wants {latent_size}^2 x {latent_channels}")
        if meta["image"]["size"] != image_size:
            problems.append(f"generation crops are {meta['image']['size']} px, the model wants {image_size}")
        if lengths["max_prompt_length"] > prompt_len:
            problems.append(f"a prompt has {lengths['max_prompt_length']} tokens > prompt_len {prompt_len}")
    if problems:
        raise ValueError(f"the prepared dataset {meta['config']['prepare']['out']} does not fit this run: "
                         + "; ".join(problems))


def _check_omnimamba(meta: Mapping, sizes: Mapping[str, int], geometry: OmniMambaGeometry, streams: int,
                     hosts: int):
    """Refuses an OmniMamba dataset that does not fit the run's geometry (`config.data` and the model), naming every
    mismatch in one error."""
    _check_family(meta, geometry)
    g, tokenizer, codes, lengths = geometry, meta["tokenizer"], meta["image_tokenizer"], meta["lengths"]
    problems = _too_few(meta, sizes, streams, hosts)
    if (tokenizer["pad_id"], tokenizer["eos_id"]) != (g.pad_id, g.eos_id):
        problems.append(f"the tokenizer's [PAD] / <|endoftext|> are {tokenizer['pad_id']} / {tokenizer['eos_id']}, "
                        f"data.pad_id / data.eos_id are {g.pad_id} / {g.eos_id}")
    elif tokenizer["token_ids"] != g.token_ids:
        problems.append(f"the OmniMamba tokens are {tokenizer['token_ids']}, the run expects {g.token_ids}")
    if g.text_vocab_size and tokenizer["vocab_size"] > g.text_vocab_size:
        problems.append(f"the tokenizer has {tokenizer['vocab_size']} ids > the model's {g.text_vocab_size}")
    if sizes.get("mmu", 0):
        if meta["image"]["size"] != g.image_size:
            problems.append(f"mmu images were prepared at {meta['image']['size']} px, the tower wants {g.image_size}")
        if lengths["max_mmu_length"] > g.mmu_len:
            problems.append(f"an mmu record has {lengths['max_mmu_length']} ids > data.mmu_len {g.mmu_len}")
    if sizes.get("t2i", 0):
        if lengths["prompt_len"] != g.prompt_len:
            problems.append(f"t2i prompts are {lengths['prompt_len']} ids, the model wants {g.prompt_len}")
        if codes["num_image_tokens"] != g.num_image_tokens:
            problems.append(f"t2i images are {codes['num_image_tokens']} codes ({codes['grid']}^2), the model wants "
                            f"{g.num_image_tokens}")
        if g.image_vocab_size and codes["codebook_size"] != g.image_vocab_size:
            problems.append(f"the {codes['kind']} codebook has {codes['codebook_size']} codes, the model's image "
                            f"vocabulary {g.image_vocab_size}")
    if problems:
        raise ValueError(f"the prepared dataset {meta['config']['prepare']['out']} does not fit this run: "
                         + "; ".join(problems))


def _seeds(data_config, seed: int, kind: str, types: tuple[str, ...] = DATA_TYPES) -> tuple[int, int]:
    """(shuffle seed, per-example RNG seed) of one data type (its index in the family's `types`), both in
    [0, 2^32)."""
    state = np.random.SeedSequence([data_config.seed, seed, types.index(kind)]).generate_state(2)
    return int(state[0]), int(state[1])


class _Images:
    """Normalisation of uint8 pixels as the prepared dataset's processor does it."""

    def __init__(self, image_meta: Mapping):
        self.mean, self.std = image_meta["mean"], image_meta["std"]
        self.rescale, self.normalize = image_meta["rescale_factor"], image_meta["do_normalize"]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return normalize_pixels(pixels, self.mean, self.std, self.rescale, self.normalize)


def _records(grain, meta: Mapping, directory: epath.Path, kind: str, shard_index: int, shard_count: int,
             shuffle_seed: int):
    """One stream's records of one type, shuffled anew every epoch, repeated forever (a grain MapDataset of bytes).
    ArrayRecord reads gs:// natively (array_record >= 0.8)."""
    paths = [str(directory / f) for f in meta["shards"][kind]]
    source = grain.sources.ArrayRecordDataSource(paths)
    return grain.MapDataset.source(source)[shard_index::shard_count].shuffle(seed=shuffle_seed).repeat()


def _sequence_pipeline(grain, data_config, meta, directory, kind, rows, *, seq_len, images_per_row, shard_index,
                       shard_count, seed):
    """Understanding or text rows: decode -> first-fit packing (or one example per row) -> sub-batch of `rows`."""
    shuffle_seed, _ = _seeds(data_config, seed, kind)
    fields = ("input_ids", "loss_mask") + (("image_token_mask", "images") if kind == "und" else ())

    def decode(data: bytes) -> dict:
        record = decode_record(data)
        return {field: record[field] for field in fields}

    ds = _records(grain, meta, directory, kind, shard_index, shard_count, shuffle_seed).map(decode)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_config.read_threads,
                                              prefetch_buffer_size=data_config.read_buffer))
    lengths = {field: seq_len for field in fields}
    if kind == "und":
        lengths["images"] = images_per_row  # images pack along their first axis, at most K per row
    pad_id = meta["tokenizer"]["pad_id"]
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=lengths, num_packing_bins=max(rows, data_config.packing_bins), shuffle_bins=False,
        padding_struct={field: (pad_id if field == "input_ids" else 0) for field in fields},
        max_sequences_per_bin=None if data_config.pack else 1)
    ds = ds.batch(rows, drop_remainder=True)
    normalize = _Images(meta["image"]) if kind == "und" else None

    def finish(packed: dict) -> dict:
        out = {f"{kind}/{field}": packed[field].astype(np.int32)
               for field in ("input_ids", "loss_mask") + (("image_token_mask",) if kind == "und" else ())}
        out[f"{kind}/segment_ids"] = packed["input_ids_segment_ids"].astype(np.int32)
        out[f"{kind}/positions"] = packed["input_ids_positions"].astype(np.int32)
        if kind == "und":
            pixels = packed["images"]  # uint8 [rows, K, S, S, 3]
            images = np.zeros(pixels.shape, np.float32)
            used = packed["images_segment_ids"] > 0
            images[used] = normalize(pixels[used])
            out["und/images"] = images
        return out

    return ds.map(finish)


def _gen_pipeline(grain, data_config, meta, directory, rows, *, prompt_len, shard_index, shard_count, seed):
    """Generation rows: left-padded prompt, latent (a posterior draw or the mean), normalised crop."""
    shuffle_seed, example_seed = _seeds(data_config, seed, "gen")
    pad_id = meta["tokenizer"]["pad_id"]
    draw = data_config.posterior == "sample"

    def decode(data: bytes, rng: np.random.Generator) -> dict:
        record = decode_record(data)
        ids = record["prompt_ids"]
        prompt_ids = np.full(prompt_len, pad_id, np.int32)
        prompt_ids[prompt_len - len(ids):] = ids
        mask = np.zeros(prompt_len, np.int32)
        mask[prompt_len - len(ids):] = 1
        latents = np.array(record["latent_mean"], np.float32)
        if draw and "latent_logvar" in record:
            eps = rng.standard_normal(latents.shape, dtype=np.float32)
            latents += np.exp(0.5 * record["latent_logvar"]) * eps
        return {"prompt_ids": prompt_ids, "prompt_mask": mask, "latents": latents, "pixels": record["image"]}

    ds = _records(grain, meta, directory, "gen", shard_index, shard_count, shuffle_seed)
    ds = ds.random_map(decode, seed=example_seed)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_config.read_threads,
                                              prefetch_buffer_size=data_config.read_buffer))
    ds = ds.batch(rows, drop_remainder=True)
    normalize = _Images(meta["image"])

    def finish(batch: dict) -> dict:
        return {"gen/prompt_ids": batch["prompt_ids"], "gen/prompt_mask": batch["prompt_mask"],
                "gen/latents": batch["latents"], "gen/images": normalize(batch["pixels"])}

    return ds.map(finish)


def _example_pipeline(grain, data_config, meta, directory, kind, rows, *, geometry: OmniMambaGeometry,
                      shard_index, shard_count, seed):
    """OmniMamba rows, one example each: decode into the batch layout (`decode_mmu` pads the ids to mmu_len and
    scales the image to [0, 1]; `decode_t2i` draws one of the image's captions) -> sub-batch of `rows`."""
    shuffle_seed, example_seed = _seeds(data_config, seed, kind, geometry.types)
    ds = _records(grain, meta, directory, kind, shard_index, shard_count, shuffle_seed)
    if kind == "t2i":  # a caption of the image drawn at every load: per (seed, epoch, record), so resumes are exact
        ds = ds.random_map(lambda data, rng: decode_t2i(decode_record(data), geometry, rng), seed=example_seed)
    else:
        ds = ds.map(lambda data: decode_mmu(decode_record(data), geometry))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_config.read_threads,
                                              prefetch_buffer_size=data_config.read_buffer))
    return ds.batch(rows, drop_remainder=True)


def pad_fraction(lengths, num_images, *, seq_len: int, images_per_row: int = 1, pack: bool = True,
                 packing_bins: int = 64) -> float:
    """Share of pad tokens in the rows the loader builds from examples of these token lengths and image counts (in
    this order), with the same packer: first-fit into rows of seq_len, or one example per row when not `pack`."""
    import grain

    examples = [{"tokens": np.zeros(n, np.int32), "images": np.zeros((k, 1), np.uint8)}
                for n, k in zip(lengths, num_images)]
    ds = grain.MapDataset.source(examples).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"tokens": seq_len, "images": images_per_row}, num_packing_bins=packing_bins,
        shuffle_bins=False, max_sequences_per_bin=None if pack else 1)
    rows = used = 0
    for row in ds:
        rows += 1
        used += int((row["tokens_segment_ids"] > 0).sum())
    return 1.0 - used / (rows * seq_len)


def _merge_streams(parts: tuple) -> tuple:
    """One unit of one data type: the host's streams' sub-batches, in stream order."""
    return tuple(parts)


class MixtureIterator:
    """This host's batches with any rows per data type, from one grain iterator of units per type.

    `take(sizes)` pulls sizes[type] / unit_rows units of each type and lays them out stream by stream (stream s's
    rows of every unit, then stream s + 1's), so a global batch is the same rows in the same order on any number of
    hosts that divides the streams. `next()` takes `default_sizes`. The state (`get_state` / `set_state`, JSON bytes)
    is every type's grain iterator state; grain's orbax checkpoint handler saves it like any iterator's."""

    def __init__(self, iterators: Mapping[str, object], unit_rows: int, default_sizes: Mapping[str, int],
                 streams: range = range(1), stream_count: int = 1):
        self.iterators, self.unit_rows, self.default_sizes = dict(iterators), unit_rows, dict(default_sizes)
        self.streams, self.stream_count = streams, stream_count  # the reading streams of this host, of all

    def __iter__(self):
        return self

    def take(self, sizes: Mapping[str, int]) -> dict:
        out = {}
        for kind, rows in sizes.items():
            if not rows:
                continue
            if kind not in self.iterators or rows % self.unit_rows:
                raise ValueError(f"{rows} {kind} rows are not whole units of {self.unit_rows} rows of a type this "
                                 f"iterator reads ({', '.join(self.iterators)})")
            with _stop_signals_held():  # grain starts its threads and worker processes on a first `next`
                units = [next(self.iterators[kind]) for _ in range(rows // self.unit_rows)]
            for key in units[0][0]:
                out[key] = np.concatenate([unit[s][key] for s in range(len(units[0])) for unit in units])
        return out

    def __next__(self) -> dict:
        return self.take(self.default_sizes)

    def get_state(self) -> bytes:
        return json.dumps({kind: it.get_state() for kind, it in self.iterators.items()}).encode()

    def set_state(self, state: bytes):
        states = json.loads(state)
        if set(states) != set(self.iterators):
            raise ValueError(f"a data state for types {sorted(states)} cannot restore an iterator of "
                             f"{sorted(self.iterators)}: restore with the config the state was saved with")
        for kind, it in self.iterators.items():
            it.set_state(states[kind])

    def stream_states(self) -> dict[int, dict]:
        """{stream: its state}, for each of this host's streams (`stream_state.py`: any host count reading the same
        streams resumes from them)."""
        states = {kind: it.get_state() for kind, it in self.iterators.items()}
        return {stream: {kind: stream_state.split(state, i) for kind, state in states.items()}
                for i, stream in enumerate(self.streams)}

    def set_stream_states(self, states: Mapping[int, dict]):
        """Restores this host's streams from `stream_states` of any host count (each of `self.streams` given)."""
        self.set_state(json.dumps({kind: stream_state.merge([states[s][kind] for s in self.streams])
                                   for kind in states[self.streams[0]]}).encode())

    def start_prefetch(self):  # grain's checkpoint handler calls it after a restore
        with _stop_signals_held():
            for it in self.iterators.values():
                if hasattr(it, "start_prefetch"):
                    it.start_prefetch()

    def close(self):
        """Stops the per-type iterators' worker processes and threads."""
        for it in self.iterators.values():
            if hasattr(it, "close"):
                it.close()


def make_train_iterator(data_config, sizes: Mapping[str, int], geometry: BatchGeometry | OmniMambaGeometry, *,
                        seed: int = 0, shard_index: int | None = None, shard_count: int | None = None,
                        unit_rows: int | None = None) -> MixtureIterator:
    """An endless iterator of numpy batches in the family's layout (`batch.py`, `omnimamba_batch.py`), for THIS
    host's rows.

    sizes: rows per data type of `geometry.types` on this host ({"und": .., "gen": .., "text": ..} or {"mmu": ..,
    "t2i": ..}) of the batches `next()` returns; a type with 0 rows is never read. unit_rows: this host's rows per
    unit (default: the gcd of the sizes); `take(sizes)` returns a batch of any whole units of the types read.
    geometry: the batch's shapes (`BatchGeometry.from_config` / `OmniMambaGeometry.from_config`), checked against
    the prepared dataset's metadata.json (its family too).
    seed: the run's seed, folded with data_config.seed. shard_index / shard_count: this host and the number of hosts
    (default jax.process_index() / jax.process_count()). The records are dealt to `data_config.streams` reading
    streams (default: one per host); this host reads only its streams [shard_index * k, (shard_index + 1) * k),
    k = streams / shard_count, so hosts see disjoint records, and its rows of each type are the k streams' equal
    shares side by side.

    Returns a `MixtureIterator`: `next(it)` / `it.take(sizes)` -> dict, `it.get_state()` / `it.set_state(state)`, and
    orbax checkpointing through grain.checkpoint.CheckpointSave / CheckpointRestore (module docstring). Deterministic
    for a given seed, config, types, unit and shard, also with worker processes.
    """
    import grain

    data_config = _loader_fields(data_config)
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} outside [0, {shard_count})")
    types = tuple(geometry.types)
    unknown = sorted(set(sizes) - set(types))
    if unknown or any(n < 0 for n in sizes.values()) or not any(sizes.values()):
        raise ValueError(f"sizes must give rows >= 0 for {types} (at least one > 0), got {dict(sizes)}")
    if data_config.posterior not in ("sample", "mean"):
        raise ValueError(f"data.posterior must be 'sample' or 'mean', got {data_config.posterior!r}")
    omnimamba = isinstance(geometry, OmniMambaGeometry)
    if not omnimamba and geometry.images_per_row < 1:
        raise ValueError(f"images_per_row must be >= 1, got {geometry.images_per_row}")
    if not data_config.dir:
        raise ValueError("no prepared dataset: set config.data.dir (written by launch.prepare_data)")
    streams = data_config.streams or shard_count
    if streams % shard_count:
        raise ValueError(f"data.streams {streams} cannot be read by {shard_count} hosts: run on a host count that "
                         f"divides it ({', '.join(map(str, stream_state.divisors(streams)))})")
    per_host = streams // shard_count
    if unit_rows is None:
        unit_rows = math.gcd(*(n for n in sizes.values() if n))
    if unit_rows % per_host or any(n % unit_rows for n in sizes.values()):
        raise ValueError(f"rows per host {dict(sizes)} in units of {unit_rows} do not split over this host's "
                         f"{per_host} reading streams (data.streams {streams} / {shard_count} hosts)")
    directory = epath.Path(data_config.dir)
    meta = load_metadata(directory)
    (_check_omnimamba if omnimamba else _check)(meta, sizes, geometry, streams, shard_count)

    iterators = {}
    for kind in [kind for kind in types if sizes.get(kind, 0)]:  # fixed order
        parts = []
        rows = unit_rows // per_host
        for stream in range(shard_index * per_host, (shard_index + 1) * per_host):
            common = dict(shard_index=stream, shard_count=streams, seed=seed)
            if omnimamba:
                parts.append(_example_pipeline(grain, data_config, meta, directory, kind, rows, geometry=geometry,
                                               **common))
            elif kind == "gen":
                parts.append(_gen_pipeline(grain, data_config, meta, directory, rows,
                                           prompt_len=geometry.prompt_len, **common))
            else:
                parts.append(_sequence_pipeline(grain, data_config, meta, directory, kind, rows,
                                                seq_len=geometry.seq_len, images_per_row=geometry.images_per_row,
                                                **common))
        ds = grain.experimental.ZipIterDataset(parts).map(_merge_streams)
        iterators[kind] = iter(_prefetch(grain, data_config, ds))
    return MixtureIterator(iterators, unit_rows, sizes, range(shard_index * per_host, (shard_index + 1) * per_host),
                           streams)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _stop_signals_held():
    """SIGTERM and SIGINT held back from the calling thread while grain starts threads and worker processes from it:
    a new thread and a spawned process inherit the mask, so a worker is immune from its first instruction, before
    `_worker_ignores_stop_signals` runs (a notice while the workers start, e.g. right after a restore, would
    otherwise kill a worker mid-start and leave the host waiting forever on its first batch). A signal that arrives
    meanwhile waits, and is delivered when the mask is restored."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _worker_ignores_stop_signals(index: int, count: int):
    """In each grain worker process: SIGTERM and SIGINT are the trainer's to act on. A preemption notice or a Ctrl-C
    reaches every process of the group; a worker that died of it would take the batches the agreed preemption step
    still needs (the hosts save a step after the notice). The trainer stops its workers itself when it exits (grain:
    a stop event, then SIGKILL after a timeout). The worker started with both held back (`_stop_signals_held`);
    ignored now, they are released."""
    del index, count
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _prefetch(grain, data_config, ds):
    """`num_workers` worker processes (per data type) or, without workers, a thread `prefetch` units ahead."""
    if data_config.num_workers > 0:
        from absl import flags

        # grain's worker processes read its absl flags; outside an absl app (a notebook, pytest) they were never
        # parsed, so take their defaults instead of failing.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers,
                                                           per_worker_buffer_size=data_config.prefetch),
                              worker_init_fn=_worker_ignores_stop_signals)
    if data_config.prefetch > 0:
        return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data_config.prefetch)
    return ds
