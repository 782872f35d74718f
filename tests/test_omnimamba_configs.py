"""The OmniMamba recipe as configs (configs/omnimamba_stage{1_mmu,1_t2i,2}.py): the release's numbers, freeze rules
that cover every parameter of the system (1.3B scanned, tiny per-layer), the trainable sets and their sizes as the
release trains them, stage 1's two sets disjoint (so stage 2's merge is defined), the geometry and the linked pad id."""

from __future__ import annotations

import importlib

import flax.linen as nn
import pytest
from flax import traverse_util

from janusflow_jax.data.omnimamba_batch import OmniMambaGeometry
from janusflow_jax.models import omnimamba
from janusflow_jax.train import optimizer

STAGES = ("omnimamba_stage1_mmu", "omnimamba_stage1_t2i", "omnimamba_stage2")
# name: (lr, warm-up, steps, global batch, (mmu, t2i)), the release's YAMLs x 8 GPUs
RECIPE = {"omnimamba_stage1_mmu": (1e-3, 100, 5_000, 256, (1, 0)),
          "omnimamba_stage1_t2i": (8e-4, 1_000, 100_000, 720, (0, 1)),
          "omnimamba_stage2": (1e-4, 0, 150_000, 408, (3, 48))}
TOTAL = 2_237_033_899
LORA = 48 * (2048 * 8 + 8 * 8512)
PROJECTOR = 40_972_800
# Trainable parameters per part (what the release's freeze_backbones unfreezes that a loss reaches).
TRAINABLE = {
    "omnimamba_stage1_mmu": {"projector": PROJECTOR, "lora_mmu": LORA},
    "omnimamba_stage1_t2i": {"lora_t2i": LORA, "lm/backbone/embeddings": 50288 * 2048, "lm/img_embeddings": 16384 * 2048,
                             "lm/img_project_in": 2048 * 8192 + 8192 + 8192 * 2048 + 2048 + 2048 * 2048 + 2048,
                             "lm/caption_embed": 2 * 2048 * 2048, "lm/pos_embed": 329 * 2048},
    "omnimamba_stage2": {"lm": 1_435_317_248, "projector": PROJECTOR},
}


def config(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def trainable(c) -> dict[str, int]:
    system = omnimamba.OmniMambaSystemConfig.from_dict(c.model.to_dict())
    params = nn.unbox(omnimamba.abstract_system_params(system))
    labels = optimizer.labels(params, c.freeze)  # raises naming any parameter no rule matches
    return {k: v.size for k, v in traverse_util.flatten_dict(params, sep="/").items()
            if labels[k] == optimizer.TRAINABLE}


def part_sizes(paths: dict[str, int], parts) -> dict[str, int]:
    out = {}
    for part in parts:
        out[part] = sum(n for k, n in paths.items() if (f"/{part}/" in k if part.startswith("lora_") else
                                                         k.startswith(part)))
    return out


@pytest.mark.parametrize("name", STAGES)
def test_release_recipe(name):
    c = config(name)
    lr, warmup, steps, batch, ratio = RECIPE[name]
    assert c.family == "omnimamba" and c.is_locked
    assert (c.optimizer.lr, c.optimizer.warmup_steps, c.steps, c.batch_size) == (lr, warmup, steps, batch)
    assert c.mixture == ((steps, ratio),)
    assert (c.optimizer.decay, c.optimizer.final_fraction, c.optimizer.total_steps) == ("cosine", 0.01, steps)
    assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay) == (0.9, 0.95, 0.0)
    assert (c.loss.mmu_weight, c.loss.t2i_weight, c.loss.cfg_drop) == (1.0, 1.0, 0.0)
    geometry = OmniMambaGeometry.from_config(c)
    assert (geometry.mmu_len, geometry.prompt_len, geometry.num_image_tokens) == (453, 72, 256)
    assert optimizer.schedule_from_config(c.optimizer)(steps) == pytest.approx(0.01 * lr)


@pytest.mark.parametrize("name", STAGES)
def test_trainable_sets_are_the_release_s(name):
    paths = trainable(config(name))
    want = TRAINABLE[name]
    assert part_sizes(paths, want) == want
    assert sum(paths.values()) == sum(want.values())
    assert not any(k.startswith(("vision/", "vq/")) for k in paths)  # towers and VQ always frozen


def test_stage1_sets_are_disjoint_and_stage2_trains_both():
    mmu, t2i, both = (set(trainable(config(name))) for name in STAGES)
    assert not mmu & t2i
    assert mmu | t2i <= both
    print("trainable parameters at 1.3B:", {name: sum(trainable(config(name)).values()) for name in STAGES},
          "of", TOTAL)


@pytest.mark.parametrize("name", STAGES)
def test_tiny_variant(name):
    c = config(name, "tiny")
    assert c.init.kind == "random" and c.steps == 6 and c.optimizer.total_steps == 6
    assert c.mixture[-1][0] == c.steps and all(r in (0, 1) for r in c.mixture[-1][1])
    paths = trainable(c)  # the tiny system's per-layer paths are covered too
    assert paths and not any(k.startswith(("vision/", "vq/")) for k in paths)
    g = OmniMambaGeometry.from_config(c)
    assert g.pad_id + 9 < g.text_vocab_size


def test_pad_id_is_one_setting_and_variants_are_checked():
    c = config("omnimamba_stage2", "tiny")
    c.data.pad_id = 70
    assert c.loss.pad_id == 70  # the loss's null caption follows the data's [PAD]
    with pytest.raises(ValueError, match="unknown config variant 'huge'"):
        config("omnimamba_stage2", "huge")
