"""The mixture schedule (data/mixture.py): every data type trains at its share on any mesh, within one unit at every
step; the schedule needs no devices. Then a short run whose batches follow it, and a config it refuses."""

import math
import random

import numpy as np
import pytest

from janusflow_jax.data.mixture import Mixture, PhaseSchedule, integer_ratio, term_scales

TYPES = ("und", "gen", "text")
# (stage, global batch, ratio) of Table 1, the 30:50:20 warm-up of stage 2 included
TABLE_1 = [("stage 1", 512, (50, 50, 0)), ("stage 2 warm-up", 512, (30, 50, 20)), ("stage 2", 512, (14, 80, 6)),
           ("stage 3", 256, (21, 70, 9))]


def _check_quota(schedule: PhaseSchedule, steps: int):
    """Every step boundary: each type within one unit of its share; after whole periods: exactly its share."""
    shares = np.asarray(schedule.shares) / schedule.period
    for n in range(steps + 1):
        units = schedule.units_after(n)
        assert np.all(np.abs(units - n * schedule.units_per_step * shares) < 1), (schedule, n, units)
        assert units.sum() == n * schedule.units_per_step
    period = schedule.steps_per_period
    assert np.array_equal(schedule.units_after(3 * period),
                          3 * period * schedule.units_per_step * np.asarray(schedule.shares) // schedule.period)


@pytest.mark.parametrize("shards", [8, 64, 256])
@pytest.mark.parametrize("stage,batch,ratio", TABLE_1)
def test_table_1_ratios_train_at_their_share_on_any_mesh(stage, batch, ratio, shards):
    schedule = PhaseSchedule.from_ratio(TYPES, ratio, batch, shards)
    _check_quota(schedule, 2 * schedule.steps_per_period + 3)
    compositions = schedule.compositions()
    assert 1 <= len(compositions) <= 3 and all(sum(c) == batch for c in compositions)
    assert all(n % shards == 0 for c in compositions for n in c)  # every sub-batch splits over the shards
    # Over a long run the realised share is the paper's (the table: 0:100:0 at 256 shards before)
    rows = schedule.rows_after(10_000)
    realised = [rows[t] / (10_000 * batch) for t in TYPES]
    np.testing.assert_allclose(realised, np.asarray(ratio) / sum(ratio), atol=shards / (10_000 * batch))
    for k, share in enumerate(ratio):  # a positive share trains within its first steps; a zero share never
        first = schedule.first_step(k)
        assert (first is None) == (share == 0)
        if share:
            assert first <= math.ceil(sum(ratio) / (share * schedule.units_per_step))


def test_exact_shares_keep_the_fixed_sub_batches():
    schedule = PhaseSchedule.from_ratio(TYPES, (14, 80, 6), 500, 1)  # 70 / 400 / 30 rows: whole units
    assert schedule.compositions() == [(70, 400, 30)]
    assert PhaseSchedule.from_ratio(TYPES, (50, 50, 0), 512, 256).compositions() == [(256, 256, 0)]


def test_quota_over_many_random_ratios():
    rng = random.Random(0)
    for _ in range(300):
        k = rng.choice([2, 3, 4])
        ratio = [rng.randint(0, 40) for _ in range(k)]
        if not sum(ratio):
            continue
        units = rng.randint(1, 70)
        schedule = PhaseSchedule.from_ratio(tuple(f"t{i}" for i in range(k)), ratio, units * 4, 4)
        _check_quota(schedule, schedule.steps_per_period + 2)


def test_integer_ratio_and_bad_ratios():
    assert integer_ratio((14, 80, 6)) == (7, 40, 3)
    assert integer_ratio((0.3, 0.5, 0.2)) == (3, 5, 2)
    for bad in [(0, 0, 0), (-1, 2, 3)]:
        with pytest.raises(ValueError, match="non-negative"):
            integer_ratio(bad)
    with pytest.raises(ValueError, match="multiple of 8"):
        PhaseSchedule.from_ratio(TYPES, (1, 1, 1), 100, 8)


def test_phases_and_cumulative_counts():
    mixture = Mixture.from_config(TYPES, ((10, (30, 50, 20)), (100, (14, 80, 6))), 512, 256)
    assert mixture.phase_at(9) == 0 and mixture.phase_at(10) == 1 and mixture.phase_at(500) == 1
    rows = dict.fromkeys(TYPES, 0)
    for step in range(150):
        for t, n in mixture.sizes(step).items():
            rows[t] += n
        assert mixture.rows_after(step + 1) == rows
        target = mixture.target_rows(step + 1)
        # the phase boundary restarts the deal: at most one unit behind per phase boundary crossed
        assert all(abs(rows[t] - target[t]) < 2 * 256 for t in TYPES)
    assert len(mixture.compositions(150)) == 2 + 3  # each compiled once


def test_a_type_that_would_never_train_is_named():
    mixture = Mixture.from_config(TYPES, ((2, (30, 50, 20)), (6, (14, 80, 6))), 16, 8)  # 2 units per step
    assert mixture.unschedulable(6) == []
    short = Mixture.from_config(TYPES, ((1, (30, 50, 20)), (6, (14, 80, 6))), 16, 8)
    (problem,) = short.unschedulable(6)
    assert problem.startswith("text (share 2/10) in phase 0 (steps 0-0)")


def test_term_scales_make_the_expected_update_the_fixed_share_one():
    schedule = PhaseSchedule.from_ratio(TYPES, (14, 80, 6), 512, 256)
    expected = schedule.expected_rows()
    term_types = {"ar": ("und", "text"), "rf": ("gen",)}
    mean = dict.fromkeys(term_types, 0.0)
    period = schedule.steps_per_period
    for step in range(period):
        sizes = dict(zip(TYPES, schedule.composition(step)))
        for term, scale in term_scales(term_types, sizes, expected).items():
            mean[term] += scale / period
    assert mean == pytest.approx({"ar": 1.0, "rf": 1.0})
    assert term_scales(term_types, {"und": 70, "gen": 400, "text": 30},
                       PhaseSchedule.from_ratio(TYPES, (14, 80, 6), 500, 1).expected_rows()) == {"ar": 1.0, "rf": 1.0}


# ------------------------------------------------------------------------------------------------------ a real run
@pytest.mark.slow  # a short run: a step program per composition
def test_a_short_run_trains_the_scheduled_rows(tmp_path, monkeypatch):
    """Two data shards, 2 units a step at 30:50:20: the batches the trainer feeds, the generation examples the step
    counts and the logged realised mix all follow the schedule."""
    import json

    import jax

    from configs import stage2
    from janusflow_jax.data.synthetic import SyntheticSource
    from janusflow_jax.train import loop as trainer

    config = stage2.get_config("tiny")
    config.batch_size, config.mixture, config.steps = 4, ((7, (30, 50, 20)),), 7
    config.checkpoint_every, config.optimizer.ema_decay = 100, 0.0
    config.model.llm.num_layers, config.model.und_encoder.depth, config.model.repa.layer = 1, 1, 1  # quick compiles
    config.model.gen_encoder.num_blocks = config.model.gen_decoder.num_blocks = 1
    taken = []
    take = SyntheticSource.take
    monkeypatch.setattr(SyntheticSource, "take", lambda self, sizes: taken.append(dict(sizes)) or take(self, sizes))
    gen_examples = []
    trainer.train(config, tmp_path, devices=jax.devices()[:2], progress=False,
                  callbacks=[lambda step, state, metrics: gen_examples.append(metrics["gen_examples"])])
    plan = trainer.make_plan(config, jax.devices()[:2])
    assert taken == [plan.sizes_at(step) for step in range(7)]
    assert {tuple(sorted(s.items())) for s in taken} == {(("gen", 2), ("und", 2)), (("gen", 2), ("text", 2))}
    assert gen_examples == [2.0] * 7
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        counts = dict.fromkeys(("und", "gen", "text"), 0)
        for sizes in taken[:row["step"]]:
            for t, n in sizes.items():
                counts[t] += n
        assert [row[f"mix_{t}"] for t in counts] == pytest.approx([100 * n / (4 * row["step"]) for n in
                                                                   counts.values()])
    assert [rows[-1][f"mix_{t}"] for t in ("und", "gen", "text")] == pytest.approx([200 / 7, 50, 150 / 7])


def test_launch_train_refuses_a_type_that_would_never_train(tmp_path):
    """One device x 16 micro-batches: stage 2's 16 tiny rows are one unit a step, and the 2-step 30:50:20 phase
    deals it to generation, then understanding: text-only would never train there."""
    import subprocess
    import sys

    from tests.cli_helpers import one_error_line, user_env

    result = subprocess.run([sys.executable, "-m", "launch.train", "--config=stage2:tiny",
                             "--config.micro_batches=16", "--workdir=run", "--progress=false"],
                            cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    line = one_error_line(result.stderr)
    assert "would never train: text (share 2/10) in phase 0 (steps 0-1)" in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()
