"""Our own JAX checkpoints (orbax): `<directory>/<step>/params` (array tree) + `<directory>/<step>/config` (JSON).

The layout is an orbax `CheckpointManager` root (a local directory or gs://), so training checkpoints (more items,
more steps) share it. Orbax writes each local step into a temporary directory and renames it on commit, and on gs://
(no renames) writes a commit marker last: a crashed save leaves no step that a reader takes for complete.
Arrays are stored in their own dtype (bf16 stays bit-exact). With a mesh, arrays are restored straight into their
shards (each device reads only its slice); without one they come back as host numpy arrays.

Model families: the config item is the config's `to_dict()`. An OmniMamba config writes `"family": "omnimamba"`;
a config without the field is JanusFlow's (every checkpoint written before OmniMamba existed). `load_params` builds
the matching config class (`config_from_dict`); an OmniMamba checkpoint from `launch.convert` holds the whole system
(params {"lm", "vision", "projector", "vq"}, `OmniMambaSystemConfig`). `load_config` reads the config alone,
`load_run_config` a training run's whole run config.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from janusflow_jax.models.config import JanusFlowConfig

FAMILIES = ("janusflow", "omnimamba")  # the values of a saved config's "family" field (absent = "janusflow")

# The items of a checkpoint step, each with its orbax handler. Training writes all of them
# (`train/checkpointing.py`); `save_params` writes params + config; every reader opens a manager with all of them
# named up front (without the handlers a fresh manager cannot read an item's metadata: it returns None).
ITEMS = {
    "params": "the full parameter tree (trainable + frozen)",
    "ema": "the EMA of the trainable parameters (training checkpoints; `load_params(weights='ema')` overlays it)",
    "opt_state": "the optimizer state of the trainable parameters",
    "counters": "step and consecutive-skip count",
    "data": "the data iterator's state (one file per reading stream, `data/stream_state.py`)",
    "config": "the model config (JSON)",
    "run_config": "the whole run config (JSON)",
}


# Orbax's replica-parallel saving splits a replicated array's write over its replicas: one jitted slice per device
# and shape, compiled at a process's first save (the tiny run on 8 CPU devices: ~400 slice programs, 13 s; a pod
# host pays it per local device for every small array replicated over the data axis). A slice under this many bytes
# is not worth it: such an array is written whole by its first replica. Larger ones stay replica-parallel.
MIN_REPLICA_SLICE_BYTES = 4 << 20


@functools.cache
def _array_saving():
    try:  # the store orbax's default jax.Array handler is built with (not exported; orbax releases may move it)
        from orbax.checkpoint._src.metadata import array_metadata_store
    except ImportError:
        return  # orbax's defaults: correct, only slower at the first save
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                                  min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
        override=True)


def item_handlers() -> dict:
    """{item: orbax handler} for every entry of ITEMS (jax.Array's saving configured as above)."""
    from janusflow_jax.data import stream_state

    _array_saving()

    array_tree, json_ = ocp.StandardCheckpointHandler, ocp.JsonCheckpointHandler
    handlers = dict(params=array_tree(), ema=array_tree(), opt_state=array_tree(), counters=array_tree(),
                    data=stream_state.Handler(), config=json_(), run_config=json_())
    assert handlers.keys() == ITEMS.keys()
    return handlers


def manager(directory, *, create: bool = True, async_save: bool = False,
            max_to_keep: int | None = None) -> ocp.CheckpointManager:
    """An orbax CheckpointManager over the root `directory` (local or gs://) that knows every item of ITEMS."""
    options = ocp.CheckpointManagerOptions(create=create, enable_async_checkpointing=async_save,
                                           max_to_keep=max_to_keep)
    return ocp.CheckpointManager(epath.Path(directory), item_handlers=item_handlers(), options=options)


def config_family(raw: dict) -> str:
    """The model family of a saved config dict; one without a "family" field is JanusFlow's."""
    family = raw.get("family", "janusflow")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r} in the checkpoint config (known: {FAMILIES})")
    return family


def config_from_dict(raw: dict):
    """A saved config dict -> JanusFlowConfig, or for OmniMamba its OmniMambaSystemConfig (the whole system, as
    `launch.convert` writes it) or OmniMambaConfig (the language model alone), by its family."""
    if config_family(raw) == "omnimamba":
        from janusflow_jax.models import omnimamba

        if omnimamba.is_system_config(raw):
            return omnimamba.OmniMambaSystemConfig.from_dict(raw)
        return omnimamba.OmniMambaConfig.from_dict(raw)
    return JanusFlowConfig.from_dict({k: v for k, v in raw.items() if k != "family"})


def save_params(directory, config, params, step: int = 0, overwrite: bool = False):
    """Saves `params` (numpy or jax arrays, sharded or not) and `config` (any config with `to_dict()`: JanusFlow's,
    OmniMamba's) as step `step` of the root `directory`."""
    with manager(directory) as mngr:
        if step in mngr.all_steps():
            if not overwrite:
                raise FileExistsError(f"{directory} already holds step {step} (pass overwrite=True)")
            mngr.delete(step)
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                config=ocp.args.JsonSave(config.to_dict())))
        mngr.wait_until_finished()


def load_params(directory, mesh=None, shardings=None, step: int | None = None, weights: str = "ema",
                dtype=None) -> tuple:
    """Restores (config, params) from `step` (default: the latest) of the root `directory`; the config is a
    JanusFlowConfig or an OmniMambaConfig by the saved family (`config_from_dict`).

    mesh: restore each array directly into `sharding.param_shardings(config, mesh)`. shardings: an explicit tree of
    shardings instead. Neither: host numpy arrays.
    weights: for a training checkpoint, "ema" (default: the EMA of the trained parameters over the raw frozen ones,
    what a release exports) or "params" (the raw current weights). Checkpoints without an EMA ignore it.
    """
    if weights not in ("ema", "params"):
        raise ValueError(f"weights must be 'ema' or 'params', got {weights!r}")
    with _open(directory) as mngr:
        step, config = _step_and_config(mngr, directory, step)
        if shardings is None and mesh is not None:
            from janusflow_jax.sharding import param_shardings

            shardings = param_shardings(config, mesh)
        meta = mngr.item_metadata(step)["params"]
        meta = getattr(meta, "tree", meta)  # orbax >= 0.11 wraps the tree in a TreeMetadata
        def target(meta, shardings):
            if shardings is None:  # numpy targets restore to host memory (np.empty does not touch the pages)
                return jax.tree.map(lambda m: np.empty(m.shape, m.dtype), meta)
            return jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype, sharding=s), meta,
                                shardings)

        params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target(meta, shardings))))
        params = params["params"]
        ema_meta = mngr.item_metadata(step).get("ema") if weights == "ema" else None
        if ema_meta is not None:  # overlay the EMA copies onto the trained leaves, in the parameters' dtype
            ema_meta = getattr(ema_meta, "tree", ema_meta)
            flat = traverse_util.flatten_dict(params, sep="/")
            ema_flat_meta = traverse_util.flatten_dict(ema_meta, sep="/")
            ema_sh = None if shardings is None else traverse_util.unflatten_dict(
                {k: traverse_util.flatten_dict(shardings, sep="/")[k] for k in ema_flat_meta}, sep="/")
            ema = mngr.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(target(ema_meta, ema_sh))))
            for path, value in traverse_util.flatten_dict(ema["ema"], sep="/").items():
                flat[path] = value.astype(flat[path].dtype)
            params = traverse_util.unflatten_dict(flat, sep="/")
    return config, params


def param_shapes(directory, step: int | None = None) -> dict:
    """The saved parameter tree of `step` (default: the latest) as shapes (tuples), without reading any array."""
    with _open(directory) as mngr:
        step, _ = _step_and_config(mngr, directory, step)
        meta = mngr.item_metadata(step)["params"]
        meta = getattr(meta, "tree", meta)
        flat = traverse_util.flatten_dict(meta, sep="/")
        return traverse_util.unflatten_dict({k: tuple(m.shape) for k, m in flat.items()}, sep="/")


def load_config(directory, step: int | None = None):
    """The config of `step` (default: the latest) of the root `directory`, without reading any array."""
    with _open(directory) as mngr:
        return _step_and_config(mngr, directory, step)[1]


def load_run_config(directory, step: int | None = None) -> dict | None:
    """The whole run config (JSON dict) a training run saved with `step` (default: the latest) of the root
    `directory`, or None where the step has none (`save_params` writes no run config)."""
    with _open(directory) as mngr:
        step, _ = _step_and_config(mngr, directory, step)
        if not (epath.Path(directory) / str(step) / "run_config").exists():  # JSON items report no metadata
            return None
        return mngr.restore(step, args=ocp.args.Composite(run_config=ocp.args.JsonRestore()))["run_config"]


def _open(directory) -> ocp.CheckpointManager:
    """A reading manager over an existing checkpoint root (one clear error where there is none)."""
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    return manager(directory, create=False)


def _step_and_config(mngr: ocp.CheckpointManager, directory, step: int | None):
    """(`step`, or the latest one, and its model config)."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint steps in {directory}")
    raw = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    return step, config_from_dict(raw)
