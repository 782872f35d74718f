"""The sample-grid evaluator: images for fixed prompts from fixed noise, one row per prompt, so that grids from
successive evaluations differ only because the weights did.

Prompts `eval.sample_prompts` (SFT template), `eval.images_per_prompt` columns, CFG `eval.cfg`, `eval.steps` Euler
steps; image k of prompt p starts from `sampler.initial_noise(config, eval.seed, [p * images_per_prompt + k])`, as
`launch.evaluate gen` seeds its images. The tokenizer is `eval.tokenizer`, else the one the held-out (or training)
data was prepared with; the latent decoder is that data's latent space (its metadata.json). The grid goes to
TensorBoard (`eval/samples`) and to <workdir>/eval/samples_<step>.png.

Every host runs the same program on replicated inputs (the parameters stay sharded) and gathers the latents, so the
grid is the same everywhere; process 0 writes it.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from janusflow_jax.train.plan import TrainingError


def _replicated(x: np.ndarray, mesh) -> jax.Array:
    """A host array every process holds identically, as one global array replicated over the mesh."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec()), lambda index: x[index])


class SampleGrid:
    """`eval.evaluators` name: "samples"."""

    name = "samples"

    def __init__(self, plan):
        from janusflow_jax.data import latents, loader
        from janusflow_jax.inference import sampler
        from janusflow_jax.inference.load import load_processor
        from janusflow_jax.models import janusflow as model_lib

        config, ev = plan.config, plan.config.eval
        self.plan = plan
        prompts = [p for p in ev.sample_prompts if p.strip()]
        self.columns = int(ev.images_per_prompt)
        if not prompts or self.columns < 1:
            raise TrainingError("the samples evaluator needs eval.sample_prompts and eval.images_per_prompt >= 1")
        data_dir = ev.data_dir or (config.data.dir if config.data.source == "prepared" else "")
        if not data_dir:
            raise TrainingError("the samples evaluator decodes in the latent space of a prepared dataset: set "
                                "eval.data_dir (or train on prepared data), or leave 'samples' out of "
                                "eval.evaluators")
        meta = loader.load_metadata(data_dir)
        tokenizer = ev.tokenizer or meta["tokenizer"]["path"]
        try:
            processor = load_processor(tokenizer, plan.model_cfg)
            self.decode = sampler.latent_decoder(latents.from_description(meta["latent"]))
            encoded = [np.asarray(processor.encode_generation_prompt(p), np.int32) for p in prompts]
        except (ValueError, OSError) as e:
            raise TrainingError(f"the samples evaluator: {e}") from None
        for ids, prompt in zip(encoded, prompts):
            sampler.check_generation_prompt(plan.model_cfg, ids, prompt)
        ids, mask = sampler.left_pad(encoded, processor.pad_id)
        rows = np.repeat(np.arange(len(prompts)), self.columns)
        self.prompts = prompts
        self.ids, self.mask = ids[rows], mask[rows]
        self.positions = np.asarray(model_lib.prompt_positions(self.mask))
        self.noise = np.asarray(sampler.initial_noise(plan.model_cfg, int(ev.seed), np.arange(len(rows))))
        self.cfg, self.steps = float(ev.cfg), int(ev.steps)

    def __call__(self, step: int, params) -> dict:
        from jax.experimental import multihost_utils

        from janusflow_jax.eval.generation import tile
        from janusflow_jax.inference import sampler

        mesh = self.plan.mesh
        ids, mask, positions, noise = (_replicated(x, mesh) for x in (self.ids, self.mask, self.positions, self.noise))
        latents = sampler.sample_latents(self.plan.model, params, ids, mask, noise, self.steps, self.cfg, positions)
        latents = np.asarray(multihost_utils.process_allgather(latents, tiled=True))
        images = sampler.to_uint8(self.decode(latents))
        return {"images": {"samples": tile(images, self.columns)}}
