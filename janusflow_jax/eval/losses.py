"""The held-out losses evaluator: the training objective's three terms on fixed held-out batches with fixed noise, so
that two evaluations differ only because the weights did.

  batches  `eval.batches` batches of `eval.batch_size` rows (0: the run's batch size), read afresh each time from
           the same start: the prepared split `eval.data_dir` (posterior means, not draws), or for a synthetic run
           synthetic batches of another seed. Batch b has the composition of step b of the training deal
           (`data/mixture.py`) at the last mixture phase's ratio (types the held-out set lacks dropped), in units of
           the mesh's data shards: on any mesh the held-out rows follow the ratio as training's do, and a type too
           rare to get a unit within `eval.batches` batches is refused, not silently left out
  AR       next-token cross-entropy per target token of the understanding and text rows
  RF, REPA every generation row at every t of the grid t_k = (k + 1/2) / K, k < `eval.t_grid`, from the same noise
           z0 (batch b: N(0, I) from fold_in(key(eval.seed), b)), no prompt dropped; reported per t and as their mean
  loss     the training weights applied to those (loss.ar_weight * ar + ...)
Sums and counts are computed inside one jitted step over the global batch (rows sharded over the mesh like a train
batch, results replicated), so every host reports the same numbers, and accumulated over batches on the host.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from janusflow_jax.data import batch as batch_lib
from janusflow_jax.data import mixture
from janusflow_jax.sharding import global_batch
from janusflow_jax.train import objective
from janusflow_jax.train import step as train_step
from janusflow_jax.train.plan import TrainingError

NOISE_SALT = 7919  # synthetic held-out batches: the run's seed + this, so they are not the training batches


def time_grid(k: int) -> np.ndarray:
    """t_k = (k + 1/2) / K: the midpoints of K equal bins of [0, 1] (float32 [K])."""
    return ((np.arange(k, dtype=np.float64) + 0.5) / k).astype(np.float32)


def make_eval_step(model, times: np.ndarray, noise_seed: int, use_repa: bool):
    """(params, global batch, batch number) -> {ar_sum, ar_count, rf_sum [K], repa_sum [K], gen_count}."""
    base_key = jax.random.key(noise_seed)
    times = jnp.asarray(times)

    def eval_step(params, batch, batch_number):
        out = {}
        sequences = {k: v for k, v in batch.items() if not k.startswith("gen/")}
        if sequences:
            out["ar_sum"] = objective.loss_sums(model, params, sequences, {}, use_repa=False)["ar"]
            out["ar_count"] = objective.counts(sequences)["ar"]
        if "gen/latents" in batch:
            gen = {k: v for k, v in batch.items() if k.startswith("gen/")}
            latents = gen["gen/latents"]
            n = latents.shape[0]
            z0 = jax.random.normal(jax.random.fold_in(base_key, batch_number), latents.shape, jnp.float32)

            def at(t):
                noise = {"t": jnp.full((n,), t, jnp.float32), "z0": z0, "drop": jnp.zeros((n,), bool)}
                sums = objective.loss_sums(model, params, gen, noise, use_repa)
                return sums["rf"], sums["repa"]

            out["rf_sum"], out["repa_sum"] = jax.lax.map(at, times)
            out["gen_count"] = jnp.asarray(n, jnp.float32)
        return out

    return eval_step


class HeldOutLosses:
    """`eval.evaluators` name: "losses"."""

    name = "losses"

    def __init__(self, plan):
        from janusflow_jax.data import loader

        config, ev = plan.config, plan.config.eval
        self.plan = plan
        self.batches = int(ev.batches)
        self.times = time_grid(int(ev.t_grid))
        if self.batches < 1 or len(self.times) < 1:
            raise TrainingError(f"eval.batches ({ev.batches}) and eval.t_grid ({ev.t_grid}) must be >= 1")
        ratio = list(config.mixture[-1][1])
        if ev.data_dir:
            counts = loader.load_metadata(ev.data_dir)["counts"]
            ratio = [r if counts.get(kind, 0) else 0 for r, kind in zip(ratio, batch_lib.DATA_TYPES)]
        elif config.data.source != "synthetic":
            raise TrainingError("the losses evaluator needs a held-out prepared split: set eval.data_dir (a "
                                "launch.prepare_data output of data the run does not train on)")
        if not any(ratio):
            raise TrainingError(f"the held-out set {ev.data_dir} has none of the data types this run trains on")
        mesh = plan.mesh
        self.unit = math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count(),
                             int(config.data.get("streams", 0) or 1))
        try:
            schedule = mixture.PhaseSchedule.from_ratio(batch_lib.DATA_TYPES, ratio, ev.batch_size or config.batch_size,
                                                        self.unit)
        except ValueError as e:
            raise TrainingError(f"eval.batch_size: {e}") from None
        for i, kind in enumerate(schedule.types):
            first = schedule.first_step(i)
            if first is not None and first >= self.batches:
                raise TrainingError(
                    f"eval.batches {self.batches} is too few for the held-out {kind} rows: at the ratio "
                    f"{tuple(ratio)} in units of {self.unit} rows, batch {first + 1} is the first with {kind}; set "
                    f"eval.batches >= {first + 1} or a larger eval.batch_size")
        self.types = schedule.trained_types
        self.sizes = [mixture.sizes_dict(schedule.types, schedule.composition(b)) for b in range(self.batches)]
        self.weights = train_step.loss_weights(config.loss)
        self.use_repa = config.loss.repa_weight != 0
        step = make_eval_step(plan.model, self.times, int(ev.seed), self.use_repa)
        self.step = jax.jit(step, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def source(self):
        """A fresh source of the held-out batches, from their start (the same batches every evaluation):
        `source.take(host rows per type)`."""
        config, ev = self.plan.config, self.plan.config.eval
        host_unit = self.unit // jax.process_count()
        kinds = dict.fromkeys(self.types, host_unit)
        if ev.data_dir:
            from janusflow_jax.data import loader

            data = ml_collections.ConfigDict(config.data.to_dict())
            data.update(dict(dir=ev.data_dir, posterior="mean", num_workers=0, prefetch=0))
            return loader.make_train_iterator(data, kinds, self.plan.geometry, seed=int(ev.seed), unit_rows=host_unit)
        from janusflow_jax.data.synthetic import SyntheticSource

        return SyntheticSource(kinds, config.seed + NOISE_SALT + int(ev.seed), 0, self.plan.geometry)

    def __call__(self, step: int, params) -> dict:
        totals: dict[str, np.ndarray] = {}
        source = self.source()
        try:
            for b, sizes in enumerate(self.sizes):
                host_sizes = self.plan.host_sizes(sizes)
                host_batch = source.take(host_sizes)
                self.plan.geometry.check(host_batch, host_sizes, "the held-out data")
                shardings = self.plan.batch_shardings(sizes)
                batch = global_batch(host_batch, shardings)  # the one-host batch on any host count
                sums = self.step(params, batch, jnp.int32(b))
                for key, value in jax.device_get(sums).items():
                    totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
        finally:
            if hasattr(source, "close"):
                source.close()
        scalars = {}
        if "ar_sum" in totals:
            scalars["ar"] = float(totals["ar_sum"] / max(float(totals["ar_count"]), 1.0))
        if "gen_count" in totals:
            rf = totals["rf_sum"] / totals["gen_count"]
            repa = totals["repa_sum"] / totals["gen_count"]
            scalars["rf"] = float(rf.mean())
            scalars.update({f"rf_t{t:.3f}": float(v) for t, v in zip(self.times, rf)})
            if self.use_repa:
                scalars["repa"] = float(repa.mean())
                scalars.update({f"repa_t{t:.3f}": float(v) for t, v in zip(self.times, repa)})
        scalars["loss"] = sum(self.weights[k] * scalars[k] for k in objective.TERMS if k in scalars)
        return {"scalars": scalars}
