"""The plan of a run: everything fixed before the first step (model, mesh, freeze labels, optimizer, shardings, the
batch geometry and the rows per data type of every mixture phase), and the one place the jitted train step, its
abstract inputs and each phase's batch source are built — for the training loop, AOT compilation and benchmarks alike.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import ml_collections

from janusflow_jax.data import batch as batch_lib
from janusflow_jax.data.batch import BatchGeometry
from janusflow_jax.models.config import JanusFlowConfig
from janusflow_jax.models.janusflow import JanusFlow, abstract_params
from janusflow_jax.sharding import make_mesh
from janusflow_jax.train import optimizer
from janusflow_jax.train import step as train_step


class TrainingError(RuntimeError):
    """A run that cannot go on (divergence, a bad config, missing data); the message says why."""


def phase_at(mixture, step: int) -> int:
    """Index of the mixture phase in force at `step` (the last phase also covers steps past its end)."""
    for i, (until, _) in enumerate(mixture):
        if step < until:
            return i
    return len(mixture) - 1


@dataclasses.dataclass
class Plan:
    """Everything fixed for a run: model, mesh, freeze labels, optimizer, shardings, per-phase batch sizes."""

    config: ml_collections.ConfigDict
    model_cfg: JanusFlowConfig
    model: JanusFlow
    mesh: jax.sharding.Mesh
    labels: dict
    tx: object
    state_sh: dict
    global_sizes: list  # per mixture phase: rows per data type of the global batch
    geometry: BatchGeometry

    @property
    def use_ema(self) -> bool:
        return self.config.optimizer.ema_decay > 0

    def host_sizes(self, phase: int) -> dict:
        return {k: v // jax.process_count() for k, v in self.global_sizes[phase].items()}

    def batch_shapes(self, phase: int) -> dict:
        return self.geometry.shapes(self.global_sizes[phase])

    def batch_shardings(self, phase: int) -> dict:
        return train_step.batch_shardings(self.batch_shapes(phase), self.mesh)

    def source(self, phase: int):
        """The iterator of this host's batches for mixture `phase` (`config.data.source`)."""
        config, sizes = self.config, self.host_sizes(phase)
        if config.data.source == "synthetic":
            from janusflow_jax.data.synthetic import SyntheticSource

            return SyntheticSource(sizes, config.seed, phase, self.geometry)
        if config.data.source == "prepared":
            from janusflow_jax.data import loader

            return loader.make_train_iterator(config.data, sizes, self.geometry, seed=config.seed + 1000 * phase)
        raise TrainingError(f"unknown data.source {config.data.source!r}: use 'synthetic' or 'prepared'")

    def jitted_step(self, phase: int):
        """The train step for mixture `phase`: one `jax.jit` with the state's and the batch's shardings, the state
        donated. Call, lower or compile it inside `sharding.mesh_context(plan.mesh)`."""
        config = self.config
        fn = train_step.make_train_step(self.model, self.tx, config.loss, config.optimizer, seed=config.seed,
                                        micro_batches=config.micro_batches)
        return train_step.jit_train_step(fn, self.state_sh, self.batch_shardings(phase), self.mesh)

    def init_state(self, params):
        """The train state (trainable/frozen split, optimizer state, EMA) built from `params` on the mesh."""
        init = jax.jit(lambda p: train_step.init_state(p, self.labels, self.tx, self.use_ema),
                       out_shardings=self.state_sh)
        return init(params)

    def abstract_state(self) -> dict:
        """The train state as ShapeDtypeStructs carrying the plan's shardings (no memory is allocated)."""
        shapes = jax.eval_shape(lambda p: train_step.init_state(p, self.labels, self.tx, self.use_ema),
                                nn.unbox(abstract_params(self.model_cfg)))
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, self.state_sh)

    def abstract_batch(self, phase: int) -> dict:
        """The global batch of mixture `phase` as ShapeDtypeStructs, rows split over (data, fsdp)."""
        shardings = self.batch_shardings(phase)
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
                for k, (shape, dtype) in self.batch_shapes(phase).items()}


def make_plan(config, devices=None) -> Plan:
    model_cfg = JanusFlowConfig.from_dict(config.model.to_dict())
    mesh = make_mesh(**config.mesh.to_dict(), devices=devices)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    streams = config.data.get("streams", 0) if config.data.get("source") == "prepared" else 0
    unit = math.lcm(dp, jax.process_count(), streams or 1) * config.micro_batches  # every host, stream, micro-batch
    try:
        sizes = [batch_lib.sub_batch_sizes(config.batch_size, ratio, unit) for _, ratio in config.mixture]
    except ValueError as e:
        raise TrainingError(f"batch_size {config.batch_size} with {dp} data-parallel devices and "
                            f"{config.micro_batches} micro-batches: {e}") from None
    labels = optimizer.labels(nn.unbox(abstract_params(model_cfg)), config.freeze)
    tx = optimizer.make_optimizer(config.optimizer)
    state_sh = train_step.state_shardings(model_cfg, mesh, labels, tx, config.optimizer.ema_decay > 0)
    geometry = BatchGeometry.from_model(model_cfg, config.data)
    return Plan(config, model_cfg, JanusFlow(model_cfg), mesh, labels, tx, state_sh, sizes, geometry)
