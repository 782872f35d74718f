"""Self-checks of the PyTorch reference (janusflow_jax/reference/janusflow_torch.py): exact checkpoint names/shapes for the 1.3B
config, and a tiny end-to-end smoke run of both forward paths."""

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from janusflow_jax.reference import janusflow_torch as ref  # noqa: E402

_STATE_DICT_LIST = os.path.join(os.path.dirname(__file__), "data", "janusflow_1_3b_state_dict.txt")


def _read_reference_list():
    entries = []
    with open(_STATE_DICT_LIST) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            name, shape = line.split(" ", 1)
            dims = shape.strip("[]").strip()
            entries.append((name, tuple(int(d) for d in dims.split(",")) if dims else ()))
    return entries


def test_1_3b_state_dict_matches_official_names_and_shapes():
    expected = _read_reference_list()
    assert len(expected) == 587
    with torch.device("meta"):
        model = ref.build_reference(ref.config_1_3b())
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert dict(got) == dict(expected)
    assert [k for k, _ in got] == [k for k, _ in expected]  # same order as the official module, too
    assert sum(v.numel() for v in model.state_dict().values()) == 2_046_367_504


def _tiny_model():
    torch.manual_seed(0)
    model = ref.build_reference(ref.config_tiny())
    # GRN params and beg_of_und_embed are zero-initialised; randomise them so the smoke run exercises them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("channelwise_norm.weight", "channelwise_norm.bias")) or name == "beg_of_und_embed":
                p.normal_(0.0, 0.1)
    return model


def test_tiny_understanding_logits():
    model = _tiny_model()
    b, t, n_patch = 2, 24, 16  # 64x64 image, patch 16 -> 16 patches (+1 begin-of-image slot)
    ids = torch.randint(1, 128, (b, t))
    seq_mask = torch.zeros(b, t, dtype=torch.bool)
    seq_mask[:, 3 : 3 + 1 + n_patch] = True
    ids[seq_mask] = -1  # negative ids must be tolerated (mapped to 0 before the embedding)
    ids_before = ids.clone()
    emb_mask = torch.ones(b, 1, 1 + n_patch, dtype=torch.bool)
    attn = torch.ones(b, t, dtype=torch.long)
    attn[1, :2] = 0  # left padding on the second row
    pixels = torch.randn(b, 1, 3, 64, 64)
    with torch.no_grad():
        logits = ref.understand_logits(model, ids, pixels, seq_mask, emb_mask, attn)
    assert logits.shape == (b, t, 128)
    assert torch.isfinite(logits).all()
    assert torch.equal(ids, ids_before)  # caller's ids are not modified in place


def test_tiny_velocity():
    model = _tiny_model()
    b, length = 2, 7
    prompt = torch.randint(0, 128, (b, length))
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 1:] = 0  # unconditional CFG row: BOS only
    z = torch.randn(b, 4, 8, 8)
    t = torch.tensor([0.0, 0.7])
    with torch.no_grad():
        v, feats = ref.velocity(model, prompt, mask, z, t, return_repa_features=True, repa_layer=1)
        v2 = ref.velocity(model, prompt, mask, z, t)
    assert v.shape == z.shape
    assert feats.shape == (b, 16, 64)  # 8x8 latent -> 4x4 = 16 tokens, LLM width 64
    assert torch.isfinite(v).all() and torch.isfinite(feats).all()
    assert torch.equal(v, v2)
