"""The plan of a run: everything fixed before the first step (model, mesh, freeze labels, optimizer, shardings, the
batch geometry and the mixture schedule: the rows per data type of every step, `data/mixture.py`), and the one place
the jitted train step of each step composition, its abstract inputs and each phase's batch source are built — for the
training loop, AOT compilation and benchmarks alike.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import ml_collections

from janusflow_jax.data.mixture import Mixture, term_scales
from janusflow_jax.sharding import make_mesh
from janusflow_jax.train import family as family_lib
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
    """Everything fixed for a run: its model family (`family.py`), model, mesh, freeze labels, optimizer, shardings,
    the mixture schedule.

    A step's batch is given by its `sizes`, {data type: global rows} (`mixture.sizes(step)`; types with no rows this
    step left out); its step function also depends on the mixture phase (the loss weighs each term by its rows this
    step over the phase's expected rows, `data/mixture.py`)."""

    config: ml_collections.ConfigDict
    family: family_lib.Family
    model_cfg: object  # the family's model config (JanusFlowConfig, OmniMambaSystemConfig)
    model: nn.Module
    mesh: jax.sharding.Mesh
    labels: dict
    tx: object
    state_sh: dict
    mixture: Mixture  # rows per data type at every step
    geometry: object  # the family's batch geometry (data/batch.py BatchGeometry, data/omnimamba_batch.py)
    compiler_options: dict | None = None  # the train step's XLA options (`config.xla_tpu_flags` on TPU meshes)

    @property
    def use_ema(self) -> bool:
        return self.config.optimizer.ema_decay > 0

    @property
    def unit_rows(self) -> int:
        """Global rows of one unit of the mixture deal (data shards x hosts x reading streams x micro-batches)."""
        return self.mixture.phases[0][2].unit_rows

    def phase_at(self, step: int) -> int:
        return self.mixture.phase_at(step)

    def sizes_at(self, step: int) -> dict:
        """{data type: global rows} of the batch of run step `step`."""
        return self.mixture.sizes(step)

    def host_sizes(self, sizes: dict) -> dict:
        return {k: v // jax.process_count() for k, v in sizes.items()}

    def batch_shapes(self, sizes: dict) -> dict:
        return self.geometry.shapes(sizes)

    def batch_shardings(self, sizes: dict) -> dict:
        return train_step.batch_shardings(self.batch_shapes(sizes), self.mesh)

    def source(self, phase: int):
        """This host's batch source for mixture `phase` (`config.data.source`): `source.take(host_sizes)` returns
        the next batch with those rows per data type; checkpointable (`get_state` / `set_state`)."""
        config = self.config
        schedule = self.mixture.schedule(phase)
        host_unit = self.unit_rows // jax.process_count()
        kinds = dict.fromkeys(schedule.trained_types, host_unit)
        if config.data.source == "synthetic":
            from janusflow_jax.data.synthetic import SyntheticSource

            return SyntheticSource(kinds, config.seed, phase, self.geometry, self.family.synthetic_batch)
        if config.data.source == "prepared":
            from janusflow_jax.data import loader

            return loader.make_train_iterator(config.data, kinds, self.geometry, seed=config.seed + 1000 * phase,
                                              unit_rows=host_unit)
        raise TrainingError(f"unknown data.source {config.data.source!r}: use 'synthetic' or 'prepared'")

    def term_scales(self, phase: int, sizes: dict) -> dict:
        """Per loss term: its rows in `sizes` over its expected rows per step in `phase` (1 for an exact share)."""
        return term_scales(self.family.objective.TERM_TYPES, sizes, self.mixture.schedule(phase).expected_rows())

    def jitted_step(self, phase: int, sizes: dict):
        """The train step for a batch of `sizes` rows in mixture `phase`: one `jax.jit` with the state's and the
        batch's shardings, the state donated. Call, lower or compile it inside `sharding.mesh_context(plan.mesh)`."""
        config = self.config
        fn = train_step.make_train_step(self.model, self.tx, config.loss, config.optimizer, seed=config.seed,
                                        micro_batches=config.micro_batches, scales=self.term_scales(phase, sizes),
                                        family=self.family)
        return train_step.jit_train_step(fn, self.state_sh, self.batch_shardings(sizes), self.mesh,
                                         self.compiler_options)

    def init_state(self, params):
        """The train state (trainable/frozen split, optimizer state, EMA) built from `params` on the mesh."""
        init = jax.jit(lambda p: train_step.init_state(p, self.labels, self.tx, self.use_ema),
                       out_shardings=self.state_sh)
        return init(params)

    def abstract_state(self) -> dict:
        """The train state as ShapeDtypeStructs carrying the plan's shardings (no memory is allocated)."""
        shapes = jax.eval_shape(lambda p: train_step.init_state(p, self.labels, self.tx, self.use_ema),
                                nn.unbox(self.family.abstract_params(self.model_cfg)))
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, self.state_sh)

    def abstract_batch(self, sizes: dict) -> dict:
        """The global batch of `sizes` rows as ShapeDtypeStructs, rows split over (data, fsdp)."""
        shardings = self.batch_shardings(sizes)
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
                for k, (shape, dtype) in self.batch_shapes(sizes).items()}


def make_plan(config, devices=None) -> Plan:
    try:
        family = family_lib.of_config(config)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    model_cfg = family.config_from_dict(config.model.to_dict())
    mesh = make_mesh(**config.mesh.to_dict(), devices=devices)
    try:
        options = train_step.compiler_options(config.xla_tpu_flags, mesh)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    streams = config.data.get("streams", 0) if config.data.get("source") == "prepared" else 0
    unit = math.lcm(dp, jax.process_count(), streams or 1) * config.micro_batches  # every host, stream, micro-batch
    geometry = family.geometry(model_cfg, config.data)
    try:
        mixture = Mixture.from_config(geometry.types, config.mixture, config.batch_size, unit)
    except ValueError as e:
        raise TrainingError(f"batch_size {config.batch_size} with {dp} data-parallel devices and "
                            f"{config.micro_batches} micro-batches: {e}") from None
    never = mixture.unschedulable(config.steps)
    if never:
        raise TrainingError(
            f"with {config.batch_size} rows in units of {unit} ({dp} data shards x {config.micro_batches} micro-batches"
            f"{f' x {streams} streams' if streams else ''}), these data types would never train: {'; '.join(never)}. "
            "Use a larger batch, fewer data shards or a longer phase")
    abstract = family.abstract_params(model_cfg)
    labels = optimizer.labels(nn.unbox(abstract), config.freeze)
    tx = optimizer.make_optimizer(config.optimizer)
    state_sh = train_step.state_shardings(model_cfg, mesh, labels, tx, config.optimizer.ema_decay > 0,
                                          abstract=abstract)
    return Plan(config, family, model_cfg, family.model(model_cfg), mesh, labels, tx, state_sh, mixture, geometry,
                options)
