"""OmniMamba's training objective (docs/reference.md §9.1): next-token cross-entropy for both tasks, each through its
own head and its own LoRA adapter, L = w_mmu·CE_mmu + w_t2i·CE_t2i (the release: CE(t2i) + CE(mmu), weights 1).

  CE_mmu  understanding: the answer tokens and their closing <|endoftext|> (mmu/loss_mask), text logits from lm_head,
          the MMU adapter; averaged per target token over the whole batch;
  CE_t2i  text-to-image: the N image tokens of every t2i row, image logits from img_head, the T2I adapter;
          averaged per image token over the whole batch.
Both are returned as sums with the counts they average over (`counts`), so gradient accumulation divides by the
global counts and gives the update of one big batch. (The release averages per GPU, then DDP averages the GPUs: the
same where every GPU holds the same number of targets.)

Randomness of a step (`draw_noise`), one entry per row, rows on axis 0, so the trainer can split it with the batch:
  mmu/dropout_keys, t2i/dropout_keys   uint32 [n, *key shape]  a key per row for the LoRA dropout (rate: the model
                                       config's lora_dropout, 0.05 in the release); a row's masks come from its key
                                       alone (`models.mamba2.row_dropout`), so a micro-batch drops what the whole
                                       batch drops.
  t2i/drop_prompt                      bool [n_t2i]  classifier-free-guidance prompt dropout at rate loss.cfg_drop
                                       (default 0: the release trains none): the caption becomes all [PAD]s
                                       (loss.pad_id), i.e. `OmniMambaProcessor.t2i_null_prompt`.
Noise without dropout keys (an evaluator's) runs the model deterministically.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from janusflow_jax.models.omnimamba import OmniMambaSystem

TERMS = ("mmu", "t2i")
TERM_TYPES = {"mmu": ("mmu",), "t2i": ("t2i",)}  # the data types whose rows each term averages over


def _field(cfg, name: str, default):
    """cfg.name, or `default` where a config (ConfigDict or mapping) leaves it out."""
    return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)


def loss_weights(loss_cfg) -> dict[str, float]:
    """{"mmu": loss.mmu_weight, "t2i": loss.t2i_weight} (1.0 each unless set)."""
    return {"mmu": float(_field(loss_cfg, "mmu_weight", 1.0)), "t2i": float(_field(loss_cfg, "t2i_weight", 1.0))}


def draw_noise(rng, batch: Mapping[str, jax.Array], loss_cfg) -> dict[str, jax.Array]:
    """The per-row randomness of one step (see the module docstring) for the types present in `batch`."""
    mmu_rng, t2i_rng, drop_rng = jax.random.split(rng, 3)
    noise = {}
    if "mmu/input_ids" in batch:
        n = batch["mmu/input_ids"].shape[0]
        noise["mmu/dropout_keys"] = jax.random.key_data(jax.random.split(mmu_rng, n))
    if "t2i/prompt_ids" in batch:
        n = batch["t2i/prompt_ids"].shape[0]
        noise["t2i/dropout_keys"] = jax.random.key_data(jax.random.split(t2i_rng, n))
        noise["t2i/drop_prompt"] = jax.random.bernoulli(drop_rng, float(_field(loss_cfg, "cfg_drop", 0.0)), (n,))
    return noise


def counts(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """What each term averages over: mmu target tokens (loss_mask) and t2i image tokens."""
    mmu = jnp.zeros((), jnp.float32)
    if "mmu/loss_mask" in batch:
        mmu = jnp.sum(batch["mmu/loss_mask"]).astype(jnp.float32)
    t2i = jnp.zeros((), jnp.float32)
    if "t2i/image_ids" in batch:
        t2i = jnp.asarray(batch["t2i/image_ids"].size, jnp.float32)
    return {"mmu": mmu, "t2i": t2i}


def null_captions(prompt_ids, drop, pad_id: int):
    """prompt_ids [n, P] ([<|t2i|>, <|sot|>, caption, <|eot|>, <|soi|>]) with the caption of every row where
    drop [n] is set replaced by [PAD]s: the t2i null prompt."""
    positions = jnp.arange(prompt_ids.shape[1])
    caption = (positions >= 2) & (positions < prompt_ids.shape[1] - 2)
    return jnp.where(drop[:, None] & caption[None], jnp.asarray(pad_id, prompt_ids.dtype), prompt_ids)


def loss_sums(model: OmniMambaSystem, params, batch: Mapping[str, jax.Array], noise: Mapping[str, jax.Array],
              loss_cfg) -> dict[str, jax.Array]:
    """Summed cross-entropies of one (micro-)batch: {"mmu", "t2i"} (0 for an absent type). params: the system's
    {"lm", "vision", "projector", ...}; logits are cast to fp32 before the softmax."""
    variables = {"params": params}
    sums = {name: jnp.zeros((), jnp.float32) for name in TERMS}
    if "mmu/input_ids" in batch:
        ids, keys = batch["mmu/input_ids"], noise.get("mmu/dropout_keys")
        logits = model.apply(variables, ids, batch["mmu/images"], keys is None, keys,
                             method=OmniMambaSystem.mmu_target_logits)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), ids[:, 2:])
        sums["mmu"] = jnp.sum(ce * batch["mmu/loss_mask"][:, 2:].astype(jnp.float32))
    if "t2i/prompt_ids" in batch:
        prompt, image_ids, keys = batch["t2i/prompt_ids"], batch["t2i/image_ids"], noise.get("t2i/dropout_keys")
        if "t2i/drop_prompt" in noise and float(_field(loss_cfg, "cfg_drop", 0.0)) > 0:
            pad_id = _field(loss_cfg, "pad_id", None)
            if pad_id is None:
                raise ValueError("loss.cfg_drop > 0 needs loss.pad_id (the [PAD] id a dropped caption is filled with)")
            prompt = null_captions(prompt, noise["t2i/drop_prompt"], pad_id)
        logits = model.apply(variables, prompt, image_ids, keys is None, keys, method=OmniMambaSystem.t2i_logits)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), image_ids)
        sums["t2i"] = jnp.sum(ce)
    return sums


def total_loss(sums: Mapping[str, jax.Array], totals: Mapping[str, jax.Array], weights: Mapping[str, float],
               scales: Mapping[str, float] | None = None):
    """Σ_term w_term · scale_term · sum_term / count_term (a term with count 0 contributes 0); `scales` as in
    `objective.total_loss` (the mixture's rows this step over expected rows; default 1)."""
    scales = scales or {}
    return sum(weights[name] * scales.get(name, 1.0) * sums[name] / jnp.maximum(totals[name], 1.0) for name in TERMS)
