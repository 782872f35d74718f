"""A training run's checkpoints: the train state and the data iterator <-> the orbax items of `checkpoint.ITEMS`,
saved asynchronously under `<workdir>/checkpoints` (the last `keep_checkpoints` kept) and restored straight into the
plan's shardings."""

from __future__ import annotations

import json

import orbax.checkpoint as ocp
from etils import epath

from janusflow_jax import checkpoint as checkpoint_lib
from janusflow_jax.data import stream_state
from janusflow_jax.train import optimizer
from janusflow_jax.train.plan import Plan


def training_manager(workdir, config) -> ocp.CheckpointManager:
    """The run's asynchronous manager under `<workdir>/checkpoints` (local or gs://)."""
    return checkpoint_lib.manager(epath.Path(workdir) / "checkpoints", create=True, async_save=True,
                                  max_to_keep=config.keep_checkpoints)


def save_state(mngr: ocp.CheckpointManager, plan: Plan, state: dict, source, step: int):
    args = dict(params=ocp.args.StandardSave(optimizer.merge(state["trainable"], state["frozen"])),
                opt_state=ocp.args.StandardSave(state["opt_state"]),
                counters=ocp.args.StandardSave({"step": state["step"], "skips": state["skips"]}),
                data=stream_state.Save(source),
                config=ocp.args.JsonSave(plan.model_cfg.to_dict()),
                run_config=ocp.args.JsonSave(json.loads(plan.config.to_json())))
    if plan.use_ema:
        args["ema"] = ocp.args.StandardSave(state["ema"])
    mngr.save(step, args=ocp.args.Composite(**args), force=True)


def restore_state(mngr: ocp.CheckpointManager, plan: Plan, step: int, source) -> dict:
    """The train state of `step`, each array restored straight into its shard; `source` gets its saved position."""
    abstract = plan.abstract_state()  # ShapeDtypeStructs with the plan's shardings: the restore targets
    args = dict(params=ocp.args.StandardRestore(optimizer.merge(abstract["trainable"], abstract["frozen"])),
                opt_state=ocp.args.StandardRestore(abstract["opt_state"]),
                counters=ocp.args.StandardRestore({"step": abstract["step"], "skips": abstract["skips"]}),
                data=stream_state.Restore(source))
    if plan.use_ema:
        args["ema"] = ocp.args.StandardRestore(abstract["ema"])
    out = mngr.restore(step, args=ocp.args.Composite(**args))
    trainable, frozen = optimizer.split(out["params"], plan.labels)
    return {"step": out["counters"]["step"], "trainable": trainable, "frozen": frozen, "opt_state": out["opt_state"],
            "ema": out["ema"] if plan.use_ema else {}, "skips": out["counters"]["skips"]}
