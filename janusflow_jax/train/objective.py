"""The training objective (paper §3.4): L = w_ar·L_AR + w_rf·L_RF + w_repa·L_REPA over one batch (`batch.py` layout).

Every term is returned as a *sum* with the count it averages over, so that gradient accumulation over micro-batches
divides by the global counts and gives the same update as one big batch:
  L_AR   next-token cross-entropy, summed over the target tokens of understanding and text-only rows (loss_mask),
         averaged per token over the whole batch;
  L_RF   rectified-flow MSE (mean over a latent's elements), averaged over generation examples;
  L_REPA negative cosine similarity (mean over latent tokens), averaged over generation examples.
The noise of a step (t, z0, CFG drops) is drawn once for the whole batch (`draw_noise`) and split with it.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from janusflow_jax.train import rectified_flow
from janusflow_jax.train import repa
from janusflow_jax.models.janusflow import JanusFlow, prompt_positions

TERMS = ("ar", "rf", "repa")
TERM_TYPES = {"ar": ("und", "text"), "rf": ("gen",), "repa": ("gen",)}  # the data types whose rows each term averages


def draw_noise(rng, batch: Mapping[str, jax.Array], loss_cfg) -> dict[str, jax.Array]:
    """t [n_gen], z0 [n_gen, G, G, C] and the CFG drop flags [n_gen] for the generation rows of `batch`."""
    if "gen/latents" not in batch:
        return {}
    latents = batch["gen/latents"]
    n = latents.shape[0]
    t_rng, z_rng, drop_rng = jax.random.split(rng, 3)
    return {
        "t": rectified_flow.sample_t(t_rng, n, loss_cfg.t_sampling, loss_cfg.t_mean, loss_cfg.t_std),
        "z0": jax.random.normal(z_rng, latents.shape, jnp.float32),
        "drop": jax.random.bernoulli(drop_rng, loss_cfg.cfg_drop, (n,)),
    }


def counts(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """What each term averages over: AR target tokens (und + text) and generation examples."""
    ar = jnp.zeros((), jnp.float32)
    for kind in ("und", "text"):
        if f"{kind}/loss_mask" in batch:
            ar = ar + jnp.sum(batch[f"{kind}/loss_mask"][:, 1:]).astype(jnp.float32)
    gen = jnp.asarray(batch["gen/latents"].shape[0] if "gen/latents" in batch else 0, jnp.float32)
    return {"ar": ar, "rf": gen, "repa": gen}


def next_token_loss_sum(logits, input_ids, loss_mask):
    """Σ cross-entropy of token i+1 given tokens ≤ i over target positions (loss_mask[i+1] = 1), in fp32."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), input_ids[:, 1:])
    return jnp.sum(ce * loss_mask[:, 1:].astype(jnp.float32))


def loss_sums(model: JanusFlow, params, batch: Mapping[str, jax.Array], noise: Mapping[str, jax.Array],
              use_repa: bool = True) -> dict[str, jax.Array]:
    """Summed loss terms of one (micro-)batch: {"ar", "rf", "repa"} (zeros for absent data types)."""
    variables = {"params": params}
    sums = {name: jnp.zeros((), jnp.float32) for name in TERMS}
    if "und/input_ids" in batch:
        logits = model.apply(variables, batch["und/input_ids"], batch["und/images"], batch["und/image_token_mask"],
                             positions=batch["und/positions"], segment_ids=batch["und/segment_ids"],
                             method=JanusFlow.understand)
        sums["ar"] += next_token_loss_sum(logits, batch["und/input_ids"], batch["und/loss_mask"])
    if "text/input_ids" in batch:
        logits = model.apply(variables, batch["text/input_ids"], positions=batch["text/positions"],
                             segment_ids=batch["text/segment_ids"], method=JanusFlow.understand)
        sums["ar"] += next_token_loss_sum(logits, batch["text/input_ids"], batch["text/loss_mask"])
    if "gen/latents" in batch:
        x, z0, t = batch["gen/latents"], noise["z0"], noise["t"]
        real = batch["gen/prompt_mask"]
        out = model.apply(variables, batch["gen/prompt_ids"], rectified_flow.drop_prompts(real, noise["drop"]),
                          rectified_flow.interpolate(x, z0, t), t, return_repa_features=use_repa,
                          prompt_positions=prompt_positions(real), method=JanusFlow.velocity)
        v, projected = out if use_repa else (out, None)
        sums["rf"] += jnp.sum(rectified_flow.loss_per_example(v, x, z0))
        if use_repa:
            target = model.apply(variables, batch["gen/images"], method=lambda m, img: m.und_encoder(img))
            sums["repa"] += jnp.sum(repa.negative_cosine_per_example(projected, target))
    return sums


def total_loss(sums: Mapping[str, jax.Array], totals: Mapping[str, jax.Array], weights: Mapping[str, float],
               scales: Mapping[str, float] | None = None):
    """Σ_term w_term · scale_term · sum_term / count_term (a term with count 0 contributes 0). `scales`: the mixture's
    per-term factor, (the term's rows this step) / (its expected rows per step) (data/mixture.py; default 1)."""
    scales = scales or {}
    return sum(weights[name] * scales.get(name, 1.0) * sums[name] / jnp.maximum(totals[name], 1.0) for name in TERMS)
