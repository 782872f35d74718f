"""Learning-rate schedules (train/optimizer.py): JanusFlow's warm-up + constant, OmniMamba's warm-up + cosine to 1% of
the peak, matched step by step against transformers' "cosine_with_min_lr" (what the release's Trainer runs)."""

from __future__ import annotations

import math

import ml_collections
import numpy as np
import pytest

import jax.numpy as jnp

from janusflow_jax.train import optimizer


def values(schedule, steps):
    return np.asarray([float(schedule(jnp.asarray(s))) for s in steps])


def test_constant_after_warmup():
    s = optimizer.learning_rate_schedule(1e-3, 4)
    np.testing.assert_allclose(values(s, [0, 2, 4, 100]), [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    assert float(optimizer.learning_rate_schedule(1e-3, 0)(7)) == pytest.approx(1e-3)


def test_cosine_to_one_percent():
    lr, warmup, total = 1e-3, 10, 110
    s = optimizer.learning_rate_schedule(lr, warmup, "cosine", total_steps=total, final_fraction=0.01)
    got = values(s, [0, 5, 10, 35, 60, 110, 500])
    want = [0.0, 0.5 * lr, lr, lr * (0.01 + 0.99 * (1 + math.cos(math.pi / 4)) / 2), lr * 0.505, 0.01 * lr, 0.01 * lr]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    no_warmup = optimizer.learning_rate_schedule(1e-4, 0, "cosine", total_steps=100)
    np.testing.assert_allclose(values(no_warmup, [0, 50, 100]), [1e-4, 0.505e-4, 1e-6], rtol=1e-5)


def test_matches_transformers_cosine_with_min_lr():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    lr, warmup, total = 8e-4, 20, 200
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    hf = transformers.get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=warmup, num_training_steps=total,
                                    scheduler_specific_kwargs={"min_lr_rate": 0.01})
    theirs = []  # up to the last step (past it transformers' cosine rises again; ours stays at the floor)
    for _ in range(total + 1):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        hf.step()
    ours = values(optimizer.learning_rate_schedule(lr, warmup, "cosine", total_steps=total), range(total + 1))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-12)


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ValueError, match="'linear' is not one of"):
        optimizer.learning_rate_schedule(1e-3, 0, "linear")
    with pytest.raises(ValueError, match=r"total_steps \(10\) > warmup_steps \(10\)"):
        optimizer.learning_rate_schedule(1e-3, 10, "cosine", total_steps=10)


def test_optimizer_configs_with_and_without_the_new_fields():
    fields = dict(lr=1.0, warmup_steps=0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=0.0)
    janusflow = ml_collections.ConfigDict(fields)  # written before the cosine existed: constant
    assert float(optimizer.schedule_from_config(janusflow)(1000)) == 1.0
    cosine = ml_collections.ConfigDict(dict(fields, decay="cosine", total_steps=4, final_fraction=0.25))
    np.testing.assert_allclose(values(optimizer.schedule_from_config(cosine), [0, 2, 4]), [1.0, 0.625, 0.25])
    # The schedule reaches AdamW: the first update of a unit gradient is -lr (bias-corrected Adam, no decay).
    params = {"w": jnp.zeros(2)}
    for cfg, step_lr in ((janusflow, 1.0), (cosine, 1.0)):
        tx = optimizer.make_optimizer(cfg)
        updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
        np.testing.assert_allclose(np.asarray(updates["w"]), -step_lr, rtol=1e-6)
