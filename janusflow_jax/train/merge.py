"""OmniMamba's stage-1 merge: the start of stage 2 from the two stage-1 runs (docs/reference.md §9.1; the release
trains the two alignments separately and never shows how their checkpoints become one).

Each stage-1 run contributes exactly the parameters its freeze rules trained: the understanding run its projector
and MMU adapter, the text-to-image run its embeddings, position table, caption embedder and T2I adapter. A parameter
both runs trained has no single right value and is an error; a parameter neither trained must be equal in both (the
two runs started from the same system), else the runs did not share their start and that is an error too. Every
such error names all the parameters concerned, in one message.

`merged_initial_params(init_cfg)` is the stage-2 config's `init.kind = "merge"`: it reads the two roots
`init.mmu_path` and `init.t2i_path` (orbax roots written by the trainer, `checkpoint.load_params` with
`init.weights`) and each run's freeze rules from the run config saved with its checkpoint.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from flax import traverse_util

from janusflow_jax.train import optimizer


class MergeError(ValueError):
    """The two stage-1 runs cannot be merged (one message naming every parameter concerned)."""


def _names(paths: Sequence[str], limit: int = 30) -> str:
    paths = sorted(paths)
    return ", ".join(paths[:limit]) + (f" ... ({len(paths)} in all)" if len(paths) > limit else "")


def merge_stage1(mmu_params, t2i_params, mmu_freeze, t2i_freeze) -> dict:
    """One parameter tree from the stage-1 understanding run (`mmu_params`, trained under the rules `mmu_freeze`)
    and the text-to-image run (`t2i_params`, `t2i_freeze`): each parameter from the run that trained it, the
    untrained ones (equal in both) from either. Raises MergeError naming every parameter the trees disagree on
    (missing or mis-shaped), both runs trained, or neither trained but differ."""
    mmu = traverse_util.flatten_dict(mmu_params, sep="/")
    t2i = traverse_util.flatten_dict(t2i_params, sep="/")
    layout = [f"{k} (only in the MMU run)" for k in mmu.keys() - t2i.keys()]
    layout += [f"{k} (only in the T2I run)" for k in t2i.keys() - mmu.keys()]
    layout += [f"{k} ({tuple(np.shape(mmu[k]))} vs {tuple(np.shape(t2i[k]))})" for k in mmu.keys() & t2i.keys()
               if np.shape(mmu[k]) != np.shape(t2i[k])]
    if layout:
        raise MergeError(f"the stage-1 runs hold different parameter trees: {_names(layout)}")
    mmu_labels = optimizer.labels(mmu_params, mmu_freeze)
    t2i_labels = optimizer.labels(t2i_params, t2i_freeze)
    trained = {k: (mmu_labels[k] == optimizer.TRAINABLE, t2i_labels[k] == optimizer.TRAINABLE) for k in mmu}
    both = [k for k, (a, b) in trained.items() if a and b]
    if both:
        raise MergeError(f"{len(both)} parameters were trained by both stage-1 runs (each may come from one run "
                         f"only): {_names(both)}")
    differ = [k for k, (a, b) in trained.items() if not a and not b and not np.array_equal(np.asarray(mmu[k]),
                                                                                          np.asarray(t2i[k]))]
    if differ:
        raise MergeError(f"{len(differ)} parameters neither stage-1 run trained differ between them (the runs must "
                         f"start from the same system): {_names(differ)}")
    merged = {k: (t2i[k] if trained[k][1] else mmu[k]) for k in mmu}
    return traverse_util.unflatten_dict(merged, sep="/")


def _stage1_run(path, weights: str, role: str):
    """(system config, params, freeze rules) of one stage-1 root."""
    from janusflow_jax import checkpoint

    if not path:
        raise MergeError(f"config.init.kind='merge' needs --config.init.{role}_path (the stage-1 {role.upper()} run's "
                         f"<workdir>/checkpoints)")
    config, params = checkpoint.load_params(path, weights=weights)
    run_config = checkpoint.load_run_config(path)
    if run_config is None or "freeze" not in run_config:
        raise MergeError(f"{path} holds no training run config: which parameters its run trained is unknown")
    return config, params, [tuple(rule) for rule in run_config["freeze"]]


def merged_initial_params(init_cfg) -> tuple:
    """`init.kind = "merge"`: (the OmniMambaSystemConfig both stage-1 runs hold, the merged parameters as host
    arrays) from `init_cfg.mmu_path`, `init_cfg.t2i_path` and `init_cfg.weights` ("ema" or "params")."""
    from janusflow_jax.models.omnimamba import OmniMambaSystemConfig

    weights = init_cfg.get("weights", "params") if hasattr(init_cfg, "get") else init_cfg.weights
    mmu_cfg, mmu_params, mmu_freeze = _stage1_run(init_cfg.mmu_path, weights, "mmu")
    t2i_cfg, t2i_params, t2i_freeze = _stage1_run(init_cfg.t2i_path, weights, "t2i")
    for path, cfg in ((init_cfg.mmu_path, mmu_cfg), (init_cfg.t2i_path, t2i_cfg)):
        if not isinstance(cfg, OmniMambaSystemConfig):
            raise MergeError(f"{path} does not hold a whole OmniMamba system (params lm, vision, projector, vq)")
    if mmu_cfg != t2i_cfg:
        a, b = mmu_cfg.to_dict(), t2i_cfg.to_dict()
        raise MergeError(f"the stage-1 runs hold different systems (parts {sorted(k for k in a if a[k] != b[k])} "
                         f"differ): {init_cfg.mmu_path} vs {init_cfg.t2i_path}")
    return mmu_cfg, merge_stage1(mmu_params, t2i_params, mmu_freeze, t2i_freeze)
