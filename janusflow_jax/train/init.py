"""Where a run's parameters start (`config.init.kind`): random, a previous stage's checkpoint (EMA or raw weights),
the official PyTorch release, or stage 1's parts (an HF Llama and a timm SigLIP, the rest random); for OmniMamba
random, a checkpoint of the whole system, or the merge of the two stage-1 runs (`merge.py`). Placed on the mesh in
the config's layout (scanned or per-layer) and storage dtype."""

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
        saved_cfg, params = checkpoint_lib.load_params(init.path, weights=init.weights)
        _check_same_model(saved_cfg, cfg, init.path)
        return _place(params, cfg, saved_cfg, shardings, plan.config.seed)
    if init.kind == "official":
        from janusflow_jax.convert import janusflow as convert

        saved_cfg, params = convert.from_pytorch(init.path, rng=jax.random.key(plan.config.seed),
                                                 scan_layers=cfg.scan_layers, repa=cfg.repa)
        _check_same_model(saved_cfg, cfg, init.path)
        return _place(params, cfg, saved_cfg, shardings, plan.config.seed)
    if init.kind == "parts":
        from janusflow_jax.convert import janusflow as convert

        params = convert.init_from_parts(cfg, jax.random.key(plan.config.seed), llm_path=init.llm_path or None,
                                         siglip_path=init.siglip_path or None)
        return jax.device_put(params, shardings)
    raise TrainingError(f"unknown config.init.kind {init.kind!r}: random, checkpoint, official or parts")


def _check_same_model(saved: JanusFlowConfig, wanted: JanusFlowConfig, path):
    def shape_fields(c: JanusFlowConfig):  # what decides parameter shapes (not dtypes, scan or remat)
        return (c.llm, c.und_encoder, c.gen_encoder, c.gen_decoder, c.repa.hidden_dim, c.latent_size)

    if shape_fields(saved) != shape_fields(wanted):
        raise TrainingError(f"the checkpoint at {path} holds a different model than config.model")


def _place(params, cfg: JanusFlowConfig, saved_cfg: JanusFlowConfig, shardings, seed: int):
    from janusflow_jax.convert import janusflow as convert

    if saved_cfg.scan_layers != cfg.scan_layers:
        params = (convert.scan_params if cfg.scan_layers else convert.unscan_params)(params, cfg)
    dtype = cfg.storage_dtype
    return jax.device_put(jax.tree.map(lambda x: np.asarray(x).astype(dtype), params), shardings)


def _omnimamba_params(plan: Plan):
    import flax.linen as nn

    init, cfg = plan.config.init, plan.model_cfg
    if init.kind == "random":
        return plan.family.random_params(cfg, plan.mesh, jax.random.key(plan.config.seed))
    if init.kind == "checkpoint":
        if not init.path:
            raise TrainingError("config.init.kind='checkpoint' needs --config.init.path (an orbax root holding the "
                                "whole OmniMamba system: a `launch.convert`ed release or a previous stage's "
                                "<workdir>/checkpoints)")
        _, params = checkpoint_lib.load_params(init.path, weights=init.weights)
        source = init.path
    elif init.kind == "merge":
        from janusflow_jax.train import merge

        if not (init.mmu_path and init.t2i_path):
            raise TrainingError("config.init.kind='merge' needs --config.init.mmu_path and --config.init.t2i_path "
                                "(the stage-1 runs' <workdir>/checkpoints)")
        try:
            _, params = merge.merged_initial_params(init)
        except merge.MergeError as e:
            raise TrainingError(str(e)) from None
        source = f"{init.mmu_path} + {init.t2i_path}"
    elif init.kind == "start":  # stage 1 from mamba2-1.3b, the towers and the VQ (train/omnimamba_start.py)
        from janusflow_jax.train import omnimamba_start

        if not (init.get("llm_path") and init.path):
            raise TrainingError("config.init.kind='start' needs --config.init.llm_path (the Mamba-2 LM directory: "
                                "state-spaces/mamba2-1.3b) and --config.init.path (the directory holding "
                                "dinov2.safetensors, siglip.safetensors and vq_ds16_t2i.pt)")
        _, params = omnimamba_start.stage1_start(cfg, init.llm_path, init.path, plan.config.seed)
        source = f"{init.llm_path} + {init.path}"
    else:
        raise TrainingError(f"unknown config.init.kind {init.kind!r} for OmniMamba: random, checkpoint, merge or "
                            f"start")
    want = jax.tree.map(lambda a: a.shape, nn.unbox(plan.family.abstract_params(cfg)))
    got = jax.tree.map(np.shape, params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        from flax import traverse_util

        w, g = traverse_util.flatten_dict(want, sep="/"), traverse_util.flatten_dict(got, sep="/")
        bad = sorted(k for k in set(w) | set(g) if w.get(k) != g.get(k))
        raise TrainingError(f"the parameters at {source} do not fit config.model ({len(bad)} differ: "
                            + ", ".join(f"{k} {g.get(k)} vs {w.get(k)}" for k in bad[:8])
                            + (" ..." if len(bad) > 8 else "") + ")")
    dtype = cfg.lm.storage_dtype
    return jax.device_put(jax.tree.map(lambda x: np.asarray(x).astype(dtype), params),
                          param_shardings(cfg, plan.mesh))
