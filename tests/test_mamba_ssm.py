"""mamba_ssm's MambaLMHeadModel layout (state-spaces/mamba2-1.3b's: config.json with d_model, n_layer, ssm_cfg,
pad_vocab_size_multiple; pytorch_model.bin with `backbone.embedding.weight`, the vocabulary padded) read by
`convert.mamba2.from_mamba_ssm`: logits against transformers' Mamba2ForCausalLM holding the same weights (tied head
in a pytorch_model.bin, untied in a model.safetensors), the padded rows kept, and every configuration it does not
implement refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from janusflow_jax.convert import mamba2 as mamba2_convert  # noqa: E402
from janusflow_jax.models import mamba2  # noqa: E402
from test_mamba2 import hf_config, hf_logits, randomize_, rel_err, report  # noqa: E402

VOCAB, MULTIPLE = 90, 16  # padded to 96 rows, as mamba2-1.3b's 50277 tokens are to 50288


def mamba_ssm_config(tie: bool, **ssm) -> dict:
    """config.json as mamba_ssm's save_pretrained writes it (json.dump(config.__dict__))."""
    return dict(d_model=64, d_intermediate=0, n_layer=2, vocab_size=VOCAB,
                ssm_cfg=dict(layer="Mamba2", d_state=16, headdim=16, chunk_size=8, **ssm), attn_layer_idx=[],
                attn_cfg={}, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                pad_vocab_size_multiple=MULTIPLE, tie_embeddings=tie)


def write_mamba_ssm(directory, tie: bool, seed: int):
    """The HF model's tensors under mamba_ssm's names: `embedding` for `embeddings`; tied, the head saved too (one
    tensor under both names, as torch.save writes a MambaLMHeadModel's state dict)."""
    model = randomize_(transformers.Mamba2ForCausalLM(hf_config(vocab_size=96, tie_word_embeddings=tie)).eval(), seed)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in model.state_dict().items()}
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(mamba_ssm_config(tie)))
    if tie:
        assert state["lm_head.weight"].data_ptr() == state["backbone.embedding.weight"].data_ptr()
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied_bin", "untied_safetensors"])
def test_logits_match_transformers(tie, tmp_path, record_property):
    model = write_mamba_ssm(tmp_path / "lm", tie, seed=int(tie))
    config, params = mamba2_convert.from_mamba_ssm(tmp_path / "lm")
    assert config == mamba2.Mamba2Config(d_model=64, n_layer=2, d_state=16, headdim=16, chunk_size=8, vocab_size=96,
                                         tie_embeddings=tie)
    embedding = model.backbone.embeddings.weight.detach().numpy()
    assert np.array_equal(params["embeddings"]["embedding"], embedding)  # the 6 padded rows kept as stored
    assert ("lm_head" in params) == (not tie)
    assert mamba2_convert.from_directory(tmp_path / "lm")[0] == config
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 19)).astype(np.int64)
    err = rel_err(jax.jit(mamba2.Mamba2LM(config).apply)({"params": params}, jnp.asarray(ids)), hf_logits(model, ids))
    report(record_property, **{f"mamba_ssm layout ({'tied' if tie else 'untied'}) logits len 19": err})
    assert err <= 1e-4


@pytest.mark.parametrize("change, message", [
    (dict(ssm_cfg=dict(d_state=16)), "ssm_cfg layer 'Mamba1': only Mamba-2 layers are implemented"),
    (dict(ssm_cfg=dict(layer="Mamba2", d_state=16, foo=1)), "unknown ssm_cfg keys ['foo']"),
    (dict(extra=1), "unknown mamba_ssm config keys ['extra']"),
    (dict(d_intermediate=128), "unsupported d_intermediate=128"),
    (dict(attn_layer_idx=[1]), "unsupported attn_layer_idx=[1]"),
    (dict(rms_norm=False), "unsupported rms_norm=False"),
    (dict(ssm_cfg=dict(layer="Mamba2", norm_before_gate=True)), "unsupported norm_before_gate=True"),
    (dict(ssm_cfg=dict(layer="Mamba2", d_state=16, headdim=48)), "not a Mamba-2 configuration we can build"),
    (dict(n_layer=None), "no 'n_layer'"),
], ids=["mamba1", "ssm_key", "top_key", "mlp", "attention", "layernorm", "norm_before_gate", "headdim", "missing"])
def test_configs_it_does_not_implement_are_one_line(change, message):
    raw = {**mamba_ssm_config(True), **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ValueError) as info:
        mamba2_convert.config_from_mamba_ssm(raw, "lm/config.json")
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_the_other_layouts_reader_says_which_to_use(tmp_path):
    write_mamba_ssm(tmp_path / "lm", True, seed=0)
    with pytest.raises(ValueError, match="is a mamba_ssm MambaLMHeadModel config .* from_mamba_ssm"):
        mamba2_convert.from_hf_mamba2(tmp_path / "lm")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config().to_dict()))
    with pytest.raises(ValueError, match="not a mamba_ssm MambaLMHeadModel config"):
        mamba2_convert.from_mamba_ssm(tmp_path / "hf")


def test_mamba2_1_3b_config_is_omnimambas_backbone():
    """state-spaces/mamba2-1.3b's config.json (as published) -> the backbone the OmniMamba configs train: 50277 tokens
    padded to 50288 rows, mamba_ssm 2.x's Mamba2 defaults for what ssm_cfg leaves out."""
    from janusflow_jax.models.omnimamba import OmniMambaConfig

    published = {"d_model": 2048, "d_intermediate": 0, "n_layer": 48, "vocab_size": 50277,
                 "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
                 "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
                 "tie_embeddings": True}
    config = mamba2_convert.config_from_mamba_ssm(published)
    release = OmniMambaConfig().backbone
    assert config == release.replace(lora_tasks=(), lora_rank=8, lora_alpha=32.0, lora_dropout=0.0)
    assert config.vocab_size == 50288
