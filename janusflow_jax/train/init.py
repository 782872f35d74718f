"""Where a run's parameters start (`config.init.kind`): random, a previous stage's checkpoint (EMA or raw weights),
the official PyTorch release, or stage 1's parts (an HF Llama and a timm SigLIP, the rest random); for OmniMamba
random, a checkpoint of the whole system, or the merge of the two stage-1 runs (`merge.py`). Placed on the mesh in
the config's layout (scanned or per-layer) and storage dtype.

No start copies the whole model to every device: a checkpoint is restored by orbax straight into the target
shardings and storage dtype (each host reads only the slices its devices hold; a scanned <-> per-layer layout change
runs as one jitted program on the mesh, from shards to shards), and a tree a host builds itself (the PyTorch release,
stage 1's parts, the OmniMamba merge: read once per host) is placed by `place`, each device's slice cut from the
host's copy. (`jax.device_put` of a host array onto shardings that span hosts checks the hosts agree by gathering
the whole array onto every device: measured on 2 processes x 4 CPU devices, a 256 MB array raised each process's
peak memory by 3.1 GB.)"""

from __future__ import annotations

import jax
import numpy as np

from janusflow_jax import checkpoint as checkpoint_lib
from janusflow_jax.models.config import JanusFlowConfig
from janusflow_jax.sharding import param_shardings
from janusflow_jax.train.plan import Plan, TrainingError


def initial_params(plan: Plan):
    """Parameters placed on the mesh, from the source `config.init` names."""
    if plan.family.name == "omnimamba":
        return _omnimamba_params(plan)
    init, cfg = plan.config.init, plan.model_cfg
    shardings = param_shardings(cfg, plan.mesh)
    if init.kind == "random":
        from janusflow_jax.sharding import create_sharded_params

        return create_sharded_params(cfg, plan.mesh, jax.random.key(plan.config.seed))
    if init.kind == "checkpoint":
        if not init.path:
            raise TrainingError("config.init.kind='checkpoint' needs --config.init.path (an orbax checkpoint root: "
                                "the previous stage's <workdir>/checkpoints or a `launch.convert --to=jax` output)")
        saved_cfg = checkpoint_lib.load_config(init.path)
        _check_same_model(saved_cfg, cfg, init.path)
        return _restore(init, cfg, saved_cfg, plan.mesh, shardings)
    if init.kind == "official":
        from janusflow_jax.convert import janusflow as convert

        saved_cfg, params = convert.from_pytorch(init.path, rng=jax.random.key(plan.config.seed),
                                                 scan_layers=cfg.scan_layers, repa=cfg.repa)
        _check_same_model(saved_cfg, cfg, init.path)
        if saved_cfg.scan_layers != cfg.scan_layers:  # on the host: the host's own copy
            params = (convert.scan_params if cfg.scan_layers else convert.unscan_params)(params, cfg)
        return place(params, shardings, cfg.storage_dtype)
    if init.kind == "parts":
        from janusflow_jax.convert import janusflow as convert

        params = convert.init_from_parts(cfg, jax.random.key(plan.config.seed), llm_path=init.llm_path or None,
                                         siglip_path=init.siglip_path or None)
        return place(params, shardings, cfg.storage_dtype)
    raise TrainingError(f"unknown config.init.kind {init.kind!r}: random, checkpoint, official or parts")


def _check_same_model(saved: JanusFlowConfig, wanted: JanusFlowConfig, path):
    def shape_fields(c: JanusFlowConfig):  # what decides parameter shapes (not dtypes, scan or remat)
        return (c.llm, c.und_encoder, c.gen_encoder, c.gen_decoder, c.repa.hidden_dim, c.latent_size)

    if shape_fields(saved) != shape_fields(wanted):
        raise TrainingError(f"the checkpoint at {path} holds a different model than config.model")


def place(params, shardings, dtype=None):
    """A host tree (numpy arrays, the same on every host) -> jax Arrays in `shardings` (a matching tree), each
    device's slice cut from the host's copy and cast to `dtype` (default: each array's own), so a device holds its
    slice only and no collective runs. Every start from a tree built on the host goes through here."""
    def one(x, sharding):
        x = np.asarray(x)
        target = x.dtype if dtype is None else np.dtype(dtype)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: np.asarray(x[index], dtype=target))

    return jax.tree.map(one, params, shardings)


def _restore(init, cfg: JanusFlowConfig, saved_cfg: JanusFlowConfig, mesh, shardings):
    """A JanusFlow checkpoint restored into `shardings` in the storage dtype; a checkpoint in the other layer layout
    (scanned vs per-layer) is restored into that layout's shardings and converted on the mesh (one jitted program:
    no host ever holds the tree)."""
    dtype = cfg.storage_dtype
    if saved_cfg.scan_layers == cfg.scan_layers:
        return checkpoint_lib.load_params(init.path, shardings=shardings, weights=init.weights, dtype=dtype)[1]
    from janusflow_jax.convert import janusflow as convert

    saved_sh = param_shardings(cfg.replace(scan_layers=saved_cfg.scan_layers), mesh)
    params = checkpoint_lib.load_params(init.path, shardings=saved_sh, weights=init.weights, dtype=dtype)[1]
    relayout = convert.scan_params if cfg.scan_layers else convert.unscan_params
    return jax.jit(lambda p: relayout(p, cfg), out_shardings=shardings)(params)


def _omnimamba_params(plan: Plan):
    init, cfg = plan.config.init, plan.model_cfg
    if init.kind == "random":
        return plan.family.random_params(cfg, plan.mesh, jax.random.key(plan.config.seed))
    if init.kind == "checkpoint":
        if not init.path:
            raise TrainingError("config.init.kind='checkpoint' needs --config.init.path (an orbax root holding the "
                                "whole OmniMamba system: a `launch.convert`ed release or a previous stage's "
                                "<workdir>/checkpoints)")
        _check_fits(plan, checkpoint_lib.param_shapes(init.path), init.path)
        return checkpoint_lib.load_params(init.path, shardings=param_shardings(cfg, plan.mesh), weights=init.weights,
                                          dtype=cfg.lm.storage_dtype)[1]
    if init.kind == "merge":
        from janusflow_jax.train import merge

        if not (init.mmu_path and init.t2i_path):
            raise TrainingError("config.init.kind='merge' needs --config.init.mmu_path and --config.init.t2i_path "
                                "(the stage-1 runs' <workdir>/checkpoints)")
        try:
            _, params = merge.merged_initial_params(init)
        except merge.MergeError as e:
            raise TrainingError(str(e)) from None
        _check_fits(plan, jax.tree.map(np.shape, params), f"{init.mmu_path} + {init.t2i_path}")
        return place(params, param_shardings(cfg, plan.mesh), cfg.lm.storage_dtype)
    if init.kind == "start":  # stage 1 from mamba2-1.3b, the towers and the VQ (train/omnimamba_start.py)
        from janusflow_jax.train import omnimamba_start

        if not (init.get("llm_path") and init.path):
            raise TrainingError("config.init.kind='start' needs --config.init.llm_path (the Mamba-2 LM directory: "
                                "state-spaces/mamba2-1.3b) and --config.init.path (the directory holding "
                                "dinov2.safetensors, siglip.safetensors and vq_ds16_t2i.pt)")
        _, params = omnimamba_start.stage1_start(cfg, init.llm_path, init.path, plan.config.seed)
        _check_fits(plan, jax.tree.map(np.shape, params), f"{init.llm_path} + {init.path}")
        return place(params, param_shardings(cfg, plan.mesh), cfg.lm.storage_dtype)
    raise TrainingError(f"unknown config.init.kind {init.kind!r} for OmniMamba: random, checkpoint, merge or start")


def _check_fits(plan: Plan, got, source):
    """Refuses parameters (a tree of shapes) that do not fit the OmniMamba config.model, naming the differences."""
    import flax.linen as nn

    want = jax.tree.map(lambda a: a.shape, nn.unbox(plan.family.abstract_params(plan.model_cfg)))
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        from flax import traverse_util

        w, g = traverse_util.flatten_dict(want, sep="/"), traverse_util.flatten_dict(got, sep="/")
        bad = sorted(k for k in set(w) | set(g) if w.get(k) != g.get(k))
        raise TrainingError(f"the parameters at {source} do not fit config.model ({len(bad)} differ: "
                            + ", ".join(f"{k} {g.get(k)} vs {w.get(k)}" for k in bad[:8])
                            + (" ..." if len(bad) > 8 else "") + ")")
