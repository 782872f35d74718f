"""The train step: one `jax.jit` over the (data, fsdp, tensor) mesh with explicit shardings and a donated state.

State (a plain dict, so orbax and jax treat it as an ordinary tree):
  step        int32 []   steps taken (skipped ones included: their batch was consumed)
  trainable   params the optimizer updates (fp32 master copies; compute runs in the model's dtype, bf16 at scale)
  frozen      params no rule trains: no gradient, no optimizer state, no EMA copy
  opt_state   optax state of `trainable` (AdamW moments sharded like the parameters)
  ema         EMA of `trainable` (exported instead of the raw weights; the frozen ones need no copy)
  skips       int32 []   consecutive non-finite steps (the trainer stops after `max_consecutive_skips`)

Randomness (JanusFlow: t, z0, CFG drops; OmniMamba: per-row dropout keys) is `fold_in(key(seed), step)`, drawn for
the whole batch before it is split into micro-batches: a resumed run and an accumulated run see the same numbers as
an uninterrupted, unsplit one. The loss is the run's family's objective (`family.py`).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from janusflow_jax.train import optimizer
from janusflow_jax.sharding import DEFAULT_RULES, param_shardings

BATCH_AXES = ("data", "fsdp")  # every sub-batch's rows are split over both data-parallel mesh axes


def loss_weights(loss_cfg) -> dict[str, float]:
    """JanusFlow's term weights (`family.of_config(config).objective.loss_weights` for any family)."""
    return {"ar": loss_cfg.ar_weight, "rf": loss_cfg.rf_weight, "repa": loss_cfg.repa_weight}


def init_state(params, path_labels: Mapping[str, str], tx: optax.GradientTransformation, use_ema: bool) -> dict:
    """A fresh train state around `params` (call under jit with `state_shardings` as out_shardings)."""
    trainable, frozen = optimizer.split(params, path_labels)
    return {
        "step": jnp.zeros((), jnp.int32),
        "trainable": trainable,
        "frozen": frozen,
        "opt_state": tx.init(trainable),
        "ema": jax.tree.map(lambda x: x.astype(jnp.float32), trainable) if use_ema else {},
        "skips": jnp.zeros((), jnp.int32),
    }


def state_shardings(config, mesh: Mesh, path_labels, tx, use_ema: bool, rules=DEFAULT_RULES, abstract=None):
    """Shardings of every state leaf: parameters by their logical axes, optimizer moments and EMA like their
    parameters, counters replicated. `abstract`: the boxed abstract parameters (default: JanusFlow's of `config`)."""
    if abstract is None:
        from janusflow_jax.models.janusflow import abstract_params

        abstract = abstract_params(config)
    shardings = param_shardings(config, mesh, rules)
    trainable, frozen = optimizer.split(shardings, path_labels)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_trainable, _ = optimizer.split(nn.unbox(abstract), path_labels)
    abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, trainable,
                                transform_non_params=lambda _: replicated,
                                is_leaf=lambda x: isinstance(x, NamedSharding))
    return {"step": replicated, "trainable": trainable, "frozen": frozen, "opt_state": opt,
            "ema": trainable if use_ema else {}, "skips": replicated}


def batch_shardings(batch_shapes: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """Rows of every batch array over (data, fsdp); the rest of each array replicated."""
    return {k: NamedSharding(mesh, PartitionSpec(BATCH_AXES)) for k in batch_shapes}


def _split_micro(x, micro: int):
    """[n, ...] -> [micro, n / micro, ...] taking every micro-th row, so each device keeps its own rows in every
    micro-batch (a contiguous split would move rows between devices)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // micro, micro, *x.shape[1:]), 0, 1)


def make_train_step(model, tx: optax.GradientTransformation, loss_cfg, opt_cfg, *, seed: int,
                    micro_batches: int = 1, scales: Mapping[str, float] | None = None, family=None):
    """The pure step function (state, batch) -> (state, metrics); jit it with `jit_train_step`. `scales`: the
    mixture's per-term loss factors for this batch composition (`Plan.term_scales`; default 1). `family`: the model
    family (`family.py`; default JanusFlow) whose objective `model` trains."""
    if family is None:
        from janusflow_jax.train.family import of_config

        family = of_config({})
    objective = family.objective
    weights = objective.loss_weights(loss_cfg)
    schedule = optimizer.schedule_from_config(opt_cfg)
    base_key = jax.random.key(seed)

    def step_fn(state, batch):
        noise = objective.draw_noise(jax.random.fold_in(base_key, state["step"]), batch, loss_cfg)
        totals = objective.counts(batch)

        def loss_fn(trainable, micro_batch, micro_noise):
            params = optimizer.merge(trainable, state["frozen"])
            sums = objective.loss_sums(model, params, micro_batch, micro_noise, loss_cfg)
            return objective.total_loss(sums, totals, weights, scales), sums

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if micro_batches == 1:
            (loss, sums), grads = grad_fn(state["trainable"], batch, noise)
        else:
            for key, x in {**batch, **noise}.items():
                if x.shape[0] % micro_batches:
                    raise ValueError(f"{key}: {x.shape[0]} rows do not split into {micro_batches} micro-batches")
            pieces = jax.tree.map(lambda x: _split_micro(x, micro_batches), (batch, noise))

            def accumulate(carry, piece):
                (l, s), g = grad_fn(state["trainable"], *piece)
                return jax.tree.map(jnp.add, carry, (l, s, g)), None

            zeros = (jnp.zeros((), jnp.float32), {k: jnp.zeros((), jnp.float32) for k in objective.TERMS},
                     jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["trainable"]))
            (loss, sums, grads), _ = jax.lax.scan(accumulate, zeros, pieces)

        grad_norm = optimizer.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        ema = optimizer.ema_update(state["ema"], trainable, opt_cfg.ema_decay) if state["ema"] else state["ema"]
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def keep(new, old):  # a non-finite step changes nothing but the counters
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        new_state = {
            "step": state["step"] + 1,
            "trainable": keep(trainable, state["trainable"]),
            "frozen": state["frozen"],
            "opt_state": keep(opt_state, state["opt_state"]),
            "ema": keep(ema, state["ema"]),
            "skips": jnp.where(ok, 0, state["skips"] + 1).astype(jnp.int32),
        }
        metrics = {
            "loss": loss,
            **{name: sums[name] / jnp.maximum(totals[name], 1.0) for name in objective.TERMS},
            **{name: totals[term] for name, term in family.count_metrics.items()},
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "finite": ok,
            "skips": new_state["skips"],
        }
        return new_state, metrics

    return step_fn


def parse_xla_flags(flags: str) -> dict:
    """"--name=value ..." (LIBTPU_INIT_ARGS' form) -> {name: value}; "true"/"false" become booleans, integers ints."""
    options = {}
    for token in flags.split():
        name, sep, value = token.lstrip("-").partition("=")
        if not sep or not name or not value:
            raise ValueError(f"xla_tpu_flags: {token!r} is not --name=value")
        value = {"true": True, "false": False}.get(value.lower(), value)
        options[name] = int(value) if isinstance(value, str) and value.lstrip("-").isdigit() else value
    return options


def compiler_options(xla_tpu_flags: str, mesh: Mesh) -> dict | None:
    """The run config's `xla_tpu_flags` as jax.jit compiler options where `mesh` is on TPUs (a topology compiled
    ahead of time included); None elsewhere (the CPU and GPU compilers refuse TPU options). Parsed everywhere, so a
    malformed flag is an error on any machine."""
    options = parse_xla_flags(xla_tpu_flags)
    return options if options and mesh.devices.flat[0].platform == "tpu" else None


def jit_train_step(step_fn, state_sh, batch_sh, mesh: Mesh, options: dict | None = None):
    """jax.jit with explicit in/out shardings and the state donated (updated in place on device); `options`: XLA
    compiler options for this program (`compiler_options`)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=(0,), compiler_options=options)
