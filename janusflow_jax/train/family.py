"""What the one training loop needs from a model family: JanusFlow (Llama + rectified flow + REPA) and OmniMamba
(Mamba-2 + next-token prediction for both tasks). A run config's `family` field picks one (absent = JanusFlow).

The trainer (`plan.py`, `step.py`, `loop.py`, `init.py`), the checkpoints, the loader, the mixture schedule, the
metrics and AOT compilation are shared; a family brings its model config and module, its parameters (abstract,
random and sharded), its batch geometry and synthetic rows, its objective and its FLOP count:

  config_from_dict(dict) -> model config          model(cfg) -> the flax module the objective applies
  abstract_params(cfg) -> boxed ShapeDtypeStructs   random_params(cfg, mesh, rng) -> parameters in their shards
  geometry(cfg, data config) -> the batch geometry (its `types` are the mixture's data types, in ratio order)
  synthetic_batch(rng, sizes, geometry) -> a random batch in the layout
  objective: TERMS, TERM_TYPES (the data types each loss term averages over), loss_weights(loss_cfg),
             draw_noise(rng, batch, loss_cfg), counts(batch), loss_sums(model, params, batch, noise, loss_cfg),
             total_loss(sums, totals, weights, scales); count_metrics: metric name -> term whose count it logs
  step_counts(plan, sizes) -> {"flops", "tokens"} of one step
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable

import flax.linen as nn
import jax

FAMILIES = ("janusflow", "omnimamba")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_from_dict: Callable
    model: Callable
    abstract_params: Callable
    random_params: Callable
    geometry: Callable
    synthetic_batch: Callable
    objective: Any
    count_metrics: dict
    step_counts: Callable


def _janusflow() -> Family:
    from janusflow_jax.data.batch import BatchGeometry
    from janusflow_jax.data.synthetic import synthetic_batch
    from janusflow_jax.models import janusflow
    from janusflow_jax.models.config import JanusFlowConfig
    from janusflow_jax.perf import flops
    from janusflow_jax.sharding import create_sharded_params
    from janusflow_jax.train import objective

    adapted = types.SimpleNamespace(
        TERMS=objective.TERMS, TERM_TYPES=objective.TERM_TYPES, draw_noise=objective.draw_noise,
        counts=objective.counts, total_loss=objective.total_loss,
        loss_weights=lambda loss_cfg: {"ar": loss_cfg.ar_weight, "rf": loss_cfg.rf_weight,
                                       "repa": loss_cfg.repa_weight},
        loss_sums=lambda model, params, batch, noise, loss_cfg: objective.loss_sums(
            model, params, batch, noise, loss_cfg.repa_weight != 0))
    return Family("janusflow", JanusFlowConfig.from_dict, janusflow.JanusFlow, janusflow.abstract_params,
                  create_sharded_params, BatchGeometry.from_model, synthetic_batch, adapted,
                  {"ar_tokens": "ar", "gen_examples": "rf"}, flops.step_counts)


def _omnimamba_random_params(cfg, mesh, rng):
    from janusflow_jax.models import omnimamba
    from janusflow_jax.sharding import mesh_context, param_shardings

    init = jax.jit(lambda r: nn.unbox(omnimamba.init_system_params(cfg, r)), out_shardings=param_shardings(cfg, mesh))
    with mesh_context(mesh):
        return init(rng)


def _omnimamba() -> Family:
    from janusflow_jax.data.omnimamba_batch import OmniMambaGeometry, synthetic_batch
    from janusflow_jax.models import omnimamba
    from janusflow_jax.perf import flops
    from janusflow_jax.train import next_token

    def step_counts(plan, sizes: dict) -> dict:
        cfg, geometry = plan.model_cfg, plan.geometry
        mmu_seq = geometry.mmu_len + cfg.lm.num_image_features
        t2i_seq = cfg.lm.t2i_prompt_length + cfg.lm.num_image_tokens
        return {"flops": flops.omnimamba_train_step_flops(cfg, plan.labels, sizes, mmu_seq),
                "tokens": sizes.get("mmu", 0) * mmu_seq + sizes.get("t2i", 0) * t2i_seq}

    return Family("omnimamba", omnimamba.OmniMambaSystemConfig.from_dict, omnimamba.OmniMambaSystem,
                  omnimamba.abstract_system_params, _omnimamba_random_params, OmniMambaGeometry.from_model,
                  synthetic_batch, next_token, {"mmu_tokens": "mmu", "t2i_tokens": "t2i"}, step_counts)


def of_config(config) -> Family:
    """The family of a run config (its `family` field; absent = JanusFlow)."""
    name = config.get("family", "janusflow") if hasattr(config, "get") else "janusflow"
    if name == "janusflow":
        return _janusflow()
    if name == "omnimamba":
        return _omnimamba()
    raise ValueError(f"unknown model family {name!r} in the run config (known: {', '.join(FAMILIES)})")
