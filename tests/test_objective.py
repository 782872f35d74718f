"""Each loss term against a value computed by hand; sub-batch rounding; freezing rules. No model compile."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from janusflow_jax.train import objective
from janusflow_jax.train import optimizer
from janusflow_jax.train import rectified_flow
from janusflow_jax.train import repa


def test_next_token_loss_counts_only_response_tokens():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    ids = np.array([[1, 3, 4, 5, 6], [1, 2, 2, 0, 0]], np.int32)
    mask = np.array([[0, 0, 1, 1, 0], [0, 0, 0, 1, 0]], np.int32)  # targets: (0,2), (0,3), (1,3)
    want = 0.0
    for b, i in [(0, 2), (0, 3), (1, 3)]:
        row = logits[b, i - 1].astype(np.float64)
        want += math.log(np.exp(row).sum()) - row[ids[b, i]]
    got = objective.next_token_loss_sum(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    counts = objective.counts({"und/loss_mask": jnp.asarray(mask), "text/loss_mask": jnp.asarray(mask[:1])})
    assert float(counts["ar"]) == 3 + 2


def test_rectified_flow_terms():
    x = jnp.full((2, 2, 2, 1), 3.0)
    z0 = jnp.ones((2, 2, 2, 1))
    t = jnp.array([0.25, 1.0])
    z_t = rectified_flow.interpolate(x, z0, t)
    np.testing.assert_allclose(z_t[0], 0.25 * 3 + 0.75 * 1)  # t=0 is noise, t=1 is data
    np.testing.assert_allclose(z_t[1], 3.0)
    v = jnp.zeros_like(x).at[1].set(2.0)
    np.testing.assert_allclose(rectified_flow.loss_per_example(v, x, z0), [4.0, 0.0])  # target x - z0 = 2


def test_logit_normal_and_uniform_t():
    t = np.asarray(rectified_flow.sample_t(jax.random.key(0), 20000, "logit_normal", 0.5, 2.0), np.float64)
    u = np.log(t / (1 - t))
    assert abs(u.mean() - 0.5) < 0.05 and abs(u.std() - 2.0) < 0.05
    t = np.asarray(rectified_flow.sample_t(jax.random.key(1), 20000, "uniform"))
    assert 0 <= t.min() and t.max() < 1 and abs(t.mean() - 0.5) < 0.01
    with pytest.raises(ValueError, match="unknown time sampling"):
        rectified_flow.sample_t(jax.random.key(0), 3, "cosine")


def test_cfg_drop_keeps_bos_only_and_left_padding():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    dropped = rectified_flow.drop_prompts(mask, jnp.array([True, False, True]))
    np.testing.assert_array_equal(dropped, [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    from janusflow_jax.models.janusflow import prompt_positions  # positions come from the undropped mask: unchanged

    np.testing.assert_array_equal(prompt_positions(mask)[0], [0, 0, 0, 1, 2])


def test_repa_negative_cosine_with_stop_gradient():
    projected = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])
    target = jnp.array([[[1.0, 1.0], [0.0, -5.0]]])
    want = -np.mean([1 / math.sqrt(2), -1.0])
    np.testing.assert_allclose(repa.negative_cosine_per_example(projected, target), [want], rtol=1e-6)
    grad_target = jax.grad(lambda tg: repa.negative_cosine_per_example(projected, tg).sum())(target)
    grad_projected = jax.grad(lambda p: repa.negative_cosine_per_example(p, target).sum())(projected)
    assert not np.any(np.asarray(grad_target)) and np.any(np.asarray(grad_projected))
    with pytest.raises(ValueError, match="patch grid"):
        repa.negative_cosine_per_example(projected, target[:, :1])


def test_total_loss_divides_by_global_counts():
    sums = {"ar": jnp.array(6.0), "rf": jnp.array(3.0), "repa": jnp.array(-1.0)}
    totals = {"ar": jnp.array(3.0), "rf": jnp.array(2.0), "repa": jnp.array(2.0)}
    got = objective.total_loss(sums, totals, {"ar": 1.0, "rf": 2.0, "repa": 0.5})
    np.testing.assert_allclose(float(got), 2.0 + 3.0 - 0.25)
    empty = objective.total_loss(sums, {k: jnp.array(0.0) for k in totals}, {"ar": 1, "rf": 1, "repa": 1})
    assert np.isfinite(float(empty))


def test_freeze_rules_cover_every_parameter(tiny_config):
    from configs import stage1, stage2, stage3
    from janusflow_jax.models.janusflow import abstract_params
    import flax.linen as nn

    params = nn.unbox(abstract_params(tiny_config))
    towers = {}
    for module in (stage1, stage2, stage3):
        labels = optimizer.labels(params, module.get_config("tiny").freeze)
        towers[module.__name__] = {p.split("/")[0] for p, lab in labels.items() if lab == "trainable"}
    new_parts = {"und_aligner", "beg_of_und_embed", "gen_encoder", "gen_enc_aligner", "gen_decoder",
                 "gen_dec_aligner_norm", "gen_dec_aligner", "repa_projector"}
    assert towers["configs.stage1"] == new_parts
    assert towers["configs.stage2"] == new_parts | {"language_model"}
    assert towers["configs.stage3"] == new_parts | {"language_model", "und_encoder"}
    with pytest.raises(ValueError, match="match no freeze rule.*und_encoder"):
        optimizer.labels(params, [("language_model/", "frozen"), ("(gen|und_aligner|beg|repa)", "trainable")])
    trainable, frozen = optimizer.split(params, optimizer.labels(params, stage1.get_config("tiny").freeze))
    assert set(frozen) == {"language_model", "und_encoder"}
    assert jax.tree.structure(optimizer.merge(trainable, frozen)) == jax.tree.structure(params)
