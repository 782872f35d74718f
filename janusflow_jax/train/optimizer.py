"""Freezing by parameter-path regexes, AdamW with a warm-up then a constant (JanusFlow, Table 1) or cosine (OmniMamba's
release: to 1% of the peak) learning rate, global-norm clipping, and the EMA.

Freezing (big_vision's rule: every parameter must be matched): `freeze` is an ordered list of (regex, "trainable" |
"frozen"); a parameter's '/'-joined path takes the first rule whose regex matches it from the start (`re.match`). An
unmatched parameter is an error naming it. Trainable and frozen parameters live in two separate trees, so the optimizer
state, the gradients and the EMA exist only for the trainable ones (a frozen tower costs its weights and nothing else).
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

TRAINABLE, FROZEN = "trainable", "frozen"


def _flat(tree) -> dict[str, object]:
    return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


def labels(params, rules: Sequence[tuple[str, str]]) -> dict[str, str]:
    """{path: "trainable" | "frozen"} for every parameter; raises listing every path no rule matches."""
    compiled = []
    for pattern, label in rules:
        if label not in (TRAINABLE, FROZEN):
            raise ValueError(f"freeze rule ({pattern!r}, {label!r}): the label must be {TRAINABLE!r} or {FROZEN!r}")
        compiled.append((re.compile(pattern), label))
    out, unmatched = {}, []
    for path in _flat(params):
        label = next((lab for regex, lab in compiled if regex.match(path)), None)
        if label is None:
            unmatched.append(path)
        else:
            out[path] = label
    if unmatched:
        raise ValueError(f"{len(unmatched)} parameters match no freeze rule (every parameter must): "
                         + ", ".join(unmatched[:20]) + (" ..." if len(unmatched) > 20 else ""))
    return out


def split(params, path_labels: dict[str, str]) -> tuple[dict, dict]:
    """(trainable tree, frozen tree) of `params` by `labels(...)`."""
    flat = _flat(params)
    trainable = {k: v for k, v in flat.items() if path_labels[k] == TRAINABLE}
    frozen = {k: v for k, v in flat.items() if path_labels[k] == FROZEN}
    return _unflat(trainable), _unflat(frozen)


def merge(trainable, frozen) -> dict:
    """Inverse of `split`: one parameter tree."""
    return _unflat({**_flat(frozen), **_flat(trainable)})


DECAYS = ("constant", "cosine")


def learning_rate_schedule(lr: float, warmup_steps: int, decay: str = "constant", total_steps: int = 0,
                           final_fraction: float = 0.01):
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then
      "constant": `lr` (JanusFlow, Table 1);
      "cosine":   final + (lr - final)·(1 + cos(π·p))/2 with final = final_fraction·lr and p = (step - warmup) /
                  (total_steps - warmup) (transformers' "cosine_with_min_lr", min_lr_rate 0.01: OmniMamba's release),
                  reaching `final` at `total_steps` and staying there.
    """
    if decay not in DECAYS:
        raise ValueError(f"optimizer.decay {decay!r} is not one of {DECAYS}")
    warmup_steps = max(int(warmup_steps), 0)
    if decay == "constant":
        after = optax.constant_schedule(lr)
    else:
        if total_steps <= warmup_steps:
            raise ValueError(f"a cosine decay needs total_steps ({total_steps}) > warmup_steps ({warmup_steps})")
        if not 0 <= final_fraction <= 1:
            raise ValueError(f"optimizer.final_fraction must be in [0, 1], got {final_fraction}")
        after = optax.cosine_decay_schedule(lr, total_steps - warmup_steps, alpha=final_fraction)
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


def schedule_from_config(opt_cfg):
    """`learning_rate_schedule` from an optimizer config; `decay`, `total_steps` and `final_fraction` may be absent
    (JanusFlow's configs: constant)."""
    get = opt_cfg.get if hasattr(opt_cfg, "get") else lambda name, default: getattr(opt_cfg, name, default)
    return learning_rate_schedule(opt_cfg.lr, opt_cfg.warmup_steps, get("decay", "constant"), get("total_steps", 0),
                                  get("final_fraction", 0.01))


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
    """Global-norm clip, then AdamW (β 0.9/0.95) on `schedule_from_config`; weight decay only on matrices (kernels, embeddings), not on norms,
    biases or the single `beg_of_und_embed` row — it is 0 in Table 1 anyway."""
    def decay_mask(tree):
        return jax.tree.map(lambda x: x.ndim >= 2 and x.shape[0] > 1, tree)

    return optax.chain(
        optax.clip_by_global_norm(opt_cfg.clip_norm) if opt_cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule_from_config(opt_cfg), b1=opt_cfg.b1, b2=opt_cfg.b2,
                    eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay, mask=decay_mask),
    )


def ema_update(ema, params, decay: float):
    """ema ← decay·ema + (1 − decay)·params, in the EMA's dtype (fp32)."""
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema, params)


def global_norm(tree) -> jax.Array:
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
