"""OmniMamba's batch layout (data/omnimamba_batch.py) and objective (train/next_token.py): the geometry's shapes and
its one error naming every bad key, the synthetic rows' structure, the cross-entropies against the PyTorch reference
of the release (reference/omnimamba_torch.py, random weights), micro-batch invariance with LoRA and prompt dropout
on, and which adapter each task trains."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from configs import _omnimamba_base as base
from janusflow_jax.data.omnimamba_batch import OmniMambaGeometry, synthetic_batch
from janusflow_jax.models import omnimamba
from janusflow_jax.models.dinosiglip import DinoSigLIP
from janusflow_jax.models.omnimamba import OmniMambaSystem, OmniMambaSystemConfig
from janusflow_jax.train import next_token

SYSTEM = OmniMambaSystemConfig.from_dict(base.tiny_model().to_dict())
DATA = ml_collections.ConfigDict(dict(mmu_len=20, pad_id=base.TINY_PAD_ID, eos_id=0))
GEOMETRY = OmniMambaGeometry.from_model(SYSTEM, DATA)
SIZES = {"mmu": 4, "t2i": 4}
LOSS = ml_collections.ConfigDict(dict(mmu_weight=1.0, t2i_weight=1.0, cfg_drop=0.5, pad_id=base.TINY_PAD_ID))


@pytest.fixture(scope="module")
def params():
    """Random system parameters with every LoRA B non-zero (B starts at zero, which would hide the adapters)."""
    flat = traverse_util.flatten_dict(nn.unbox(omnimamba.init_system_params(SYSTEM, jax.random.key(0))), sep="/")
    rng = np.random.default_rng(1)
    for k in flat:
        if "/lora_" in k and "/B_" in k:
            flat[k] = (0.3 * rng.standard_normal(flat[k].shape)).astype(np.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def batch():
    return {k: jnp.asarray(v) for k, v in synthetic_batch(np.random.default_rng(0), SIZES, GEOMETRY).items()}


def sums_fn(params, batch, noise):
    return jax.jit(lambda p, b, n: next_token.loss_sums(OmniMambaSystem(SYSTEM), p, b, n, LOSS))(params, batch, noise)


# --------------------------------------------------------------------------------------------------------- geometry
def test_geometry_shapes_and_one_error_naming_every_bad_key():
    g = GEOMETRY
    assert g.types == ("mmu", "t2i")
    assert g.shapes({"mmu": 3, "t2i": 0}) == {
        "mmu/input_ids": ((3, 20), np.dtype(np.int32)), "mmu/loss_mask": ((3, 20), np.dtype(np.int32)),
        "mmu/images": ((3, 14, 14, 3), np.dtype(np.float32))}
    assert g.shapes({"t2i": 2}) == {"t2i/prompt_ids": ((2, 16), np.dtype(np.int32)),
                                    "t2i/image_ids": ((2, 16), np.dtype(np.int32))}
    good = synthetic_batch(np.random.default_rng(0), SIZES, g)
    bad = dict(good, **{"mmu/images": good["mmu/images"].astype(np.float64), "extra": np.zeros(1)})
    del bad["t2i/image_ids"]
    with pytest.raises(ValueError) as err:
        g.check(bad, SIZES, "the test")
    message = str(err.value)
    assert "the test" in message and "\n" not in message
    for key in ("mmu/images", "extra", "t2i/image_ids"):
        assert key in message
    assert "mmu/input_ids" not in message


def test_release_geometry_from_a_run_config():
    config = ml_collections.ConfigDict(dict(model=base.release_model(), data=dict(mmu_len=453, pad_id=50277,
                                                                                  eos_id=0)))
    g = OmniMambaGeometry.from_config(config)
    assert (g.mmu_len, g.prompt_len, g.num_image_tokens, g.image_size, g.num_image_features) == (453, 72, 256, 384,
                                                                                                729)
    assert g.token_ids["<|soi|>"] == 50278 and g.token_ids["<|mmu|>"] == 50283


def test_synthetic_rows_have_the_release_structure():
    b = synthetic_batch(np.random.default_rng(3), {"mmu": 6, "t2i": 6}, GEOMETRY)
    ids, mask, t = b["mmu/input_ids"], b["mmu/loss_mask"], GEOMETRY.token_ids
    assert (ids[:, :4] == [t["<|mmu|>"], t["<|soi|>"], t["<|eoi|>"], t["<|sot|>"]]).all()
    for row in range(6):
        targets = np.flatnonzero(mask[row])
        assert len(targets) >= 2 and (np.diff(targets) == 1).all() and targets[0] > 4  # a question comes first
        assert ids[row, targets[-1]] == GEOMETRY.eos_id and ids[row, targets[-1] + 1] == t["<|eot|>"]
        assert (ids[row, targets[-1] + 2:] == GEOMETRY.pad_id).all()
    prompt = b["t2i/prompt_ids"]
    assert (prompt[:, [0, 1, -2, -1]] == [t["<|t2i|>"], t["<|sot|>"], t["<|eot|>"], t["<|soi|>"]]).all()
    caption = prompt[:, 2:-2]
    assert all((row[:np.argmax(row != GEOMETRY.pad_id)] == GEOMETRY.pad_id).all() for row in caption)  # left-padded
    assert b["t2i/image_ids"].max() < SYSTEM.lm.image_vocab_size
    assert 0 <= b["mmu/images"].min() and b["mmu/images"].max() <= 1


# -------------------------------------------------------------------------------------------------------- objective
def test_counts_and_total_loss(batch):
    totals = next_token.counts(batch)
    assert float(totals["mmu"]) == float(np.sum(batch["mmu/loss_mask"]))
    assert float(totals["t2i"]) == SIZES["t2i"] * SYSTEM.lm.num_image_tokens
    sums = {"mmu": jnp.float32(6.0), "t2i": jnp.float32(32.0)}
    weights = next_token.loss_weights(LOSS)
    assert weights == {"mmu": 1.0, "t2i": 1.0}
    want = 6.0 / float(totals["mmu"]) + 32.0 / float(totals["t2i"])
    assert float(next_token.total_loss(sums, totals, weights)) == pytest.approx(want, rel=1e-6)
    assert float(next_token.total_loss({"mmu": 0.0, "t2i": 1.0}, {"mmu": 0.0, "t2i": 2.0}, weights)) == 0.5


def test_noise_is_per_row_and_prompt_dropout_uses_the_null_caption(batch):
    noise = next_token.draw_noise(jax.random.key(0), batch, LOSS)
    assert set(noise) == {"mmu/dropout_keys", "t2i/dropout_keys", "t2i/drop_prompt"}
    assert all(v.shape[0] == 4 for v in noise.values())
    assert next_token.draw_noise(jax.random.key(0), {"t2i/prompt_ids": batch["t2i/prompt_ids"]},
                                 ml_collections.ConfigDict())["t2i/drop_prompt"].sum() == 0  # cfg_drop defaults to 0
    prompt = batch["t2i/prompt_ids"]
    dropped = next_token.null_captions(prompt, jnp.asarray([True, False, True, False]), base.TINY_PAD_ID)
    np.testing.assert_array_equal(dropped[1], prompt[1])
    assert (dropped[0, 2:-2] == base.TINY_PAD_ID).all()
    np.testing.assert_array_equal(dropped[0, [0, 1, -2, -1]], prompt[0, [0, 1, -2, -1]])


def test_micro_batches_give_the_same_sums(params, batch):
    """Rows split in two (every other row, as the trainer's `_split_micro`), each half with its rows' noise: the
    sums add up to the whole batch's, LoRA dropout (rate 0.05) and prompt dropout (rate 0.5) on."""
    assert SYSTEM.lm.backbone.lora_dropout == 0.05
    noise = next_token.draw_noise(jax.random.key(7), batch, LOSS)
    assert 0 < int(noise["t2i/drop_prompt"].sum()) < 4
    whole = sums_fn(params, batch, noise)
    halves = [sums_fn(params, *jax.tree.map(lambda x: x[i::2], (batch, noise))) for i in range(2)]
    for term in next_token.TERMS:
        assert float(whole[term]) > 0
        np.testing.assert_allclose(float(halves[0][term] + halves[1][term]), float(whole[term]), rtol=2e-6)
    other = sums_fn(params, batch, next_token.draw_noise(jax.random.key(8), batch, LOSS))
    assert all(float(other[t]) != float(whole[t]) for t in next_token.TERMS)  # the dropout is real
    deterministic = sums_fn(params, batch, {})
    assert all(float(deterministic[t]) != float(whole[t]) for t in next_token.TERMS)


def test_each_task_trains_its_own_adapter_and_the_projector(params, batch):
    noise = next_token.draw_noise(jax.random.key(1), batch, LOSS)

    def grads(kind):
        part = {k: v for k, v in batch.items() if k.startswith(kind)}
        return jax.jit(jax.grad(lambda p: next_token.loss_sums(OmniMambaSystem(SYSTEM), p, part, noise, LOSS)[kind]))(
            params)

    for kind, other in (("mmu", "t2i"), ("t2i", "mmu")):
        flat = traverse_util.flatten_dict(grads(kind), sep="/")
        norm = lambda pattern: sum(float(jnp.abs(v).sum()) for k, v in flat.items() if pattern in k)  # noqa: E731
        assert norm(f"lora_{kind}/") > 0 and norm(f"lora_{other}/") == 0
        assert (norm("projector/") > 0) == (kind == "mmu")
        assert (norm("lm/img_project_in/") > 0) == (kind == "t2i")


# ---------------------------------------------------------------------------------------------- parity with torch
def test_cross_entropies_match_the_pytorch_reference(batch, record_property):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from janusflow_jax.convert import omnimamba as convert
    from janusflow_jax.convert.dinosiglip import projector_from_release
    from janusflow_jax.reference import omnimamba_torch as ref

    lm = SYSTEM.lm
    b = lm.backbone
    model = ref.randomize_(ref.build_reference(ref.reference_config(
        d_model=b.d_model, n_layer=b.n_layer, d_state=b.d_state, headdim=b.headdim, expand=b.expand, ngroups=b.ngroups,
        d_conv=b.d_conv, chunk_size=b.chunk_size, vocab_size=b.vocab_size, image_vocab_size=lm.image_vocab_size,
        pos_embed_rows=lm.pos_embed_rows, mmu_pos_embed_rows=lm.mmu_pos_embed_rows, lora_tasks=b.lora_tasks,
        lora_rank=b.lora_rank, lora_alpha=b.lora_alpha, lora_dropout=b.lora_dropout,
        image_mlp_ratio=lm.image_mlp_ratio, vision_dim=SYSTEM.projector.vision_dim)), seed=3)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    images = batch["mmu/images"]
    tower = DinoSigLIP(SYSTEM.vision)
    vision = tower.init(jax.random.key(5), images[:1])["params"]
    params = {"lm": convert.import_release_state(state, lm), "vision": vision,
              "projector": projector_from_release(state, SYSTEM.projector)}
    ours = sums_fn(params, batch, {})  # no dropout keys: deterministic, as the reference in eval mode

    features = torch.from_numpy(np.array(tower.apply({"params": vision}, images)))
    ids = torch.from_numpy(np.array(batch["mmu/input_ids"])).long()
    mask = torch.from_numpy(np.array(batch["mmu/loss_mask"])).bool()
    with torch.no_grad():
        logits = ref.mmu_logits(model, ids, ref.project(model, features))
        # The release's labels: IGNORE for the four task ids and the features, the answer ids elsewhere; shifted.
        labels = torch.full(logits.shape[:2], -100, dtype=torch.long)
        labels[:, 2 + features.shape[1]:] = torch.where(mask[:, 2:], ids[:, 2:], -100)
        mmu = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                reduction="sum")
        prompt = torch.from_numpy(np.array(batch["t2i/prompt_ids"])).long()
        image = torch.from_numpy(np.array(batch["t2i/image_ids"])).long()
        t2i = torch.nn.functional.cross_entropy(ref.t2i_logits(model, prompt, image).flatten(0, 1), image.flatten(),
                                                reduction="sum")
    errors = {"mmu": abs(float(ours["mmu"]) - float(mmu)) / float(mmu),
              "t2i": abs(float(ours["t2i"]) - float(t2i)) / float(t2i)}
    print("omnimamba CE sums (ours, torch):", {k: float(v) for k, v in ours.items()}, float(mmu), float(t2i),
          "relative errors:", errors)
    record_property("parity_errors", {f"omnimamba CE {k}": v for k, v in errors.items()})
    assert max(errors.values()) <= 1e-4, errors
