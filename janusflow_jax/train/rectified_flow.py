"""Rectified flow (paper §3.2, §3.4): the straight path from noise to data, its time distribution and its loss.

Convention (the official sampler's): t = 0 is noise z0 ~ N(0, I), t = 1 is data x; z_t = t·x + (1 − t)·z0; the
velocity target is x − z0; Euler sampling integrates from t = 0 to 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_t(rng, batch: int, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0):
    """Training times [batch] in (0, 1).

    logit_normal: t = sigmoid(u), u ~ N(mean, std) — SD3's rf/lognorm, which the paper follows (mean 0, std 1 by
    default; JanusFlow does not state them). uniform: t ~ U[0, 1).
    """
    if kind == "logit_normal":
        return jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,), jnp.float32))
    if kind == "uniform":
        return jax.random.uniform(rng, (batch,), jnp.float32)
    raise ValueError(f"unknown time sampling {kind!r}: use 'logit_normal' or 'uniform'")


def interpolate(x, z0, t):
    """z_t = t·x + (1 − t)·z0 for latents [batch, height, width, channels] and t [batch]."""
    t = t.astype(x.dtype)[:, None, None, None]
    return t * x + (1.0 - t) * z0


def velocity_target(x, z0):
    return x - z0


def loss_per_example(v, x, z0):
    """Mean squared error between predicted velocity v and x − z0, averaged over a latent's elements: [batch]."""
    err = v.astype(jnp.float32) - velocity_target(x, z0).astype(jnp.float32)
    return jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))


def null_prompt_mask(prompt_mask):
    """The CFG unconditional prompt (docs/reference.md §5): each row's first real token (BOS) kept, every other token hidden.

    prompt_mask: [batch, L], 1 at real prompt tokens. With left padding BOS is not at column 0, so it is located as the
    first real token. Positions are not touched: callers derive them from the real mask, so they stay those of the
    conditional prompt. The sampler's unconditional branch and the training-time prompt drop both use this function.
    """
    prompt_mask = jnp.asarray(prompt_mask)
    first = (jnp.cumsum(prompt_mask.astype(jnp.int32), axis=1) == 1) & (prompt_mask != 0)
    return first.astype(prompt_mask.dtype)


def drop_prompts(prompt_mask, drop):
    """Training-time CFG dropout: rows where `drop` [batch] is True get `null_prompt_mask`, the rest stay as they are."""
    return jnp.where(drop[:, None], null_prompt_mask(prompt_mask), prompt_mask).astype(prompt_mask.dtype)
