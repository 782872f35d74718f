"""OmniMamba's compiled inference (inference/omnimamba.py) on a tiny random model: the t2i loop against a Python
loop of full forwards (greedy, and guided), top-k = 1 = greedy, CFG w = 1 = the conditional branch, seeded sampling
independent of the batch; chat decoding against full forwards with per-row stopping, the position-table limit, the
processor wired in; and orbax checkpoints that carry the model family."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from janusflow_jax import checkpoint
from janusflow_jax.inference import omnimamba as infer
from janusflow_jax.models import omnimamba
from janusflow_jax.models.omnimamba import OmniMamba

CONFIG = omnimamba.tiny_config()
MODEL = OmniMamba(CONFIG)


@pytest.fixture(scope="module")
def params():
    """Random parameters with non-zero LoRA B's; the image table scaled up so sampled logits are peaked enough that
    the filters matter."""
    flat = traverse_util.flatten_dict(nn.unbox(omnimamba.init_params(CONFIG, jax.random.key(0))), sep="/")
    rng = np.random.default_rng(1)
    for path in sorted(flat):
        if "/lora_" in path and "/B_" in path:
            flat[path] = (0.3 * rng.normal(size=flat[path].shape)).astype(np.float32)
        if path in ("img_embeddings/embedding", "backbone/embeddings/embedding"):
            flat[path] = np.asarray(flat[path]) * 50.0
    return traverse_util.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, CONFIG.text_vocab_size, (2, CONFIG.t2i_prompt_length)).astype(np.int32)
    null = np.tile(np.r_[prompt[0, :2], np.full(CONFIG.caption_length, 7), prompt[0, -2:]], (2, 1)).astype(np.int32)
    return prompt, null


@pytest.fixture(scope="module")
def full_t2i(params):
    return jax.jit(lambda p, i: MODEL.apply({"params": params}, p, i, method=OmniMamba.t2i_logits))


def python_t2i(full_t2i, prompt, null=None, cfg=1.0):
    """Greedy generation by full forwards: token i from the logits of a sequence whose later tokens are still
    zeros (causality makes them irrelevant), one compile for every step."""
    tokens = np.zeros((prompt.shape[0], CONFIG.num_image_tokens), np.int32)
    for i in range(CONFIG.num_image_tokens):
        logits = np.asarray(full_t2i(prompt, tokens))[:, i]
        if null is not None:
            uncond = np.asarray(full_t2i(null, tokens))[:, i]
            logits = uncond + cfg * (logits - uncond)
        tokens[:, i] = logits.argmax(-1)
    return tokens.reshape(-1, CONFIG.image_grid, CONFIG.image_grid)


# ---------------------------------------------------------------------------------------------------- text to image
def test_compiled_t2i_loop_equals_python_loop(params, prompts, full_t2i):
    prompt, null = prompts
    greedy = infer.generate_image_tokens(MODEL, params, prompt)  # the release's top_k = 1
    assert greedy.shape == (2, 4, 4) and greedy.dtype == np.int32
    np.testing.assert_array_equal(greedy, python_t2i(full_t2i, prompt))
    assert len(np.unique(greedy)) > 3  # not a degenerate constant image
    guided = infer.generate_image_tokens(MODEL, params, prompt, null_prompt_ids=null, cfg=3.0, temperature=0.0)
    np.testing.assert_array_equal(guided, python_t2i(full_t2i, prompt, null, 3.0))
    assert not np.array_equal(guided, greedy)


def test_sampling_options(params, prompts):
    prompt, null = prompts
    greedy = infer.generate_image_tokens(MODEL, params, prompt, temperature=0.0)
    # top-k 1 at any temperature, and a vanishing nucleus, keep only the argmax
    np.testing.assert_array_equal(infer.generate_image_tokens(MODEL, params, prompt, temperature=2.0, top_k=1,
                                                              seed=5), greedy)
    np.testing.assert_array_equal(infer.generate_image_tokens(MODEL, params, prompt, temperature=1.0, top_k=0,
                                                              top_p=1e-6, seed=5), greedy)
    # CFG with w = 1, run through the two-row path, is the conditional branch
    np.testing.assert_array_equal(infer.generate_image_tokens(MODEL, params, prompt, null_prompt_ids=null, cfg=1.0,
                                                              guided=True), greedy)
    # seeded: reproducible, seed-dependent, and an image does not depend on its batch
    sample = lambda seed, ids, idx=None: infer.generate_image_tokens(  # noqa: E731
        MODEL, params, ids, temperature=1.0, top_k=0, top_p=0.9, seed=seed, indices=idx)
    a = sample(3, prompt)
    np.testing.assert_array_equal(a, sample(3, prompt))
    assert not np.array_equal(a, sample(4, prompt))
    assert not np.array_equal(a, greedy)
    np.testing.assert_array_equal(sample(3, prompt[1:], [1])[0], a[1])
    # top_p 0 is "off" as in the release (mamba_ssm's sample), the same draws as top_p 1; outside [0, 1] an error
    off = infer.generate_image_tokens(MODEL, params, prompt, temperature=1.0, top_k=0, top_p=0.0, seed=3)
    np.testing.assert_array_equal(off, infer.generate_image_tokens(MODEL, params, prompt, temperature=1.0, top_k=0,
                                                                   top_p=1.0, seed=3))
    assert not np.array_equal(off, greedy)
    with pytest.raises(ValueError, match=r"top_p must be in \[0, 1\] \(0 or 1 = off\), got 1.5"):
        infer.generate_image_tokens(MODEL, params, prompt, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="null_prompt_ids"):
        infer.generate_image_tokens(MODEL, params, prompt, cfg=2.0)
    with pytest.raises(ValueError, match="prompt_ids must be"):
        infer.generate_image_tokens(MODEL, params, prompt[:, 1:])


# ---------------------------------------------------------------------------------------------------- understanding
def test_compiled_chat_equals_python_loop_and_stops_per_row(params):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, CONFIG.text_vocab_size, (2, 10)).astype(np.int32)
    features = rng.normal(size=(2, CONFIG.num_image_features, CONFIG.d_model)).astype(np.float32)
    n = 8
    tokens, lengths = infer.generate_text(MODEL, params, ids, features, eos_id=-1, max_new_tokens=n)
    assert tokens.shape == (2, n) and list(lengths) == [n, n]
    full = jax.jit(lambda i, f: MODEL.apply({"params": params}, i, f, method=OmniMamba.mmu_logits))
    expected = np.zeros((2, n), np.int32)
    for t in range(n):  # greedy by full forwards over [ids, answer so far]
        seq = np.concatenate([ids, expected], axis=1)  # later (zero) tokens cannot affect earlier logits
        expected[:, t] = np.asarray(full(seq, features))[:, CONFIG.num_image_features + ids.shape[1] - 1 + t].argmax(-1)
    np.testing.assert_array_equal(tokens, expected)
    # Stop row 0 at its 4th token: row 0 ends there (padded with EOS), row 1 runs on unchanged until its own EOS
    eos = int(tokens[0, 3])
    first = [int(np.argmax(row == eos)) if (row == eos).any() else n for row in tokens]
    stopped, lengths = infer.generate_text(MODEL, params, ids, features, eos_id=eos, max_new_tokens=n)
    assert list(lengths) == first and first[0] <= 3
    for row, length in zip(range(2), first):
        np.testing.assert_array_equal(stopped[row, :length], tokens[row, :length])
        assert (stopped[row, length:] == eos).all()


def test_chat_refuses_to_pass_the_position_table(params):
    ids = np.zeros((1, 10), np.int32)
    room = infer.max_answer_tokens(CONFIG, 10)
    assert room == CONFIG.mmu_pos_embed_rows - 10 - CONFIG.num_image_features + 1 == 46
    tokens, _ = infer.generate_text(MODEL, params, ids, None, eos_id=-1, max_new_tokens=room)  # exactly fits
    assert tokens.shape == (1, room)
    with pytest.raises(ValueError, match="64-row mmu position table"):
        infer.generate_text(MODEL, params, ids, None, eos_id=-1, max_new_tokens=room + 1)
    with pytest.raises(ValueError, match="at most 0 tokens"):
        infer.generate_text(MODEL, params, np.zeros((1, 60), np.int32), None, eos_id=-1, max_new_tokens=1)


def test_chat_and_codes_through_the_processor(params, tmp_path):
    from janusflow_jax.data.omnimamba_processor import OmniMambaProcessor, make_tokenizer

    processor = OmniMambaProcessor.from_pretrained(make_tokenizer(tmp_path, ["a", "cat", "what", "is", "this"]),
                                                   caption_length=CONFIG.caption_length)
    features = np.random.default_rng(2).normal(size=(CONFIG.num_image_features, CONFIG.d_model)).astype(np.float32)
    questions = ["what is this?", "what is a cat?", "what?"]  # two lengths: two batches
    answers = infer.chat(MODEL, params, processor, questions, features, max_new_tokens=6)
    alone = [infer.chat(MODEL, params, processor, q, features, max_new_tokens=6)[0] for q in questions]
    assert answers == alone and all(isinstance(a, str) for a in answers)
    ids = processor.mmu_prompt(questions[0])
    tokens, lengths = infer.generate_text(MODEL, params, ids[None], features[None], eos_id=processor.eos_id,
                                          max_new_tokens=6)
    assert answers[0] == processor.decode(tokens[0, :lengths[0]])
    codes = infer.text_to_image_codes(MODEL, params, processor, ["a cat", "this"], images_per_prompt=2,
                                      batch_size=3)
    assert codes.shape == (4, 4, 4)
    np.testing.assert_array_equal(codes[0], codes[1])  # greedy: both images of a prompt agree
    np.testing.assert_array_equal(codes[2], infer.generate_image_tokens(MODEL, params,
                                                                        processor.t2i_prompt("this")[None])[0])


# ------------------------------------------------------------------------------------------------------ checkpoints
def test_orbax_checkpoints_carry_the_family(params, tmp_path, tiny_config):
    checkpoint.save_params(tmp_path / "omni", CONFIG, params)
    raw = json.loads((tmp_path / "omni" / "0" / "config" / "metadata").read_text())  # orbax's JSON item file
    assert raw["family"] == "omnimamba" and raw["backbone"]["lora_tasks"] == ["mmu", "t2i"]
    config, restored = checkpoint.load_params(tmp_path / "omni")
    assert isinstance(config, omnimamba.OmniMambaConfig) and config == CONFIG
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, restored))
    # A JanusFlow config writes no family and comes back as a JanusFlowConfig.
    from janusflow_jax.models.config import JanusFlowConfig

    assert "family" not in tiny_config.to_dict()
    checkpoint.save_params(tmp_path / "janusflow", tiny_config, {"w": np.arange(3, dtype=np.float32)})
    config, _ = checkpoint.load_params(tmp_path / "janusflow")
    assert isinstance(config, JanusFlowConfig) and config == tiny_config
    with pytest.raises(ValueError, match="unknown model family"):
        checkpoint.config_from_dict({**CONFIG.to_dict(), "family": "rwkv"})
    # inference.load picks the model class from the checkpoint
    from janusflow_jax.inference import load

    model, _ = load.load_model(tmp_path / "omni", dtype="bfloat16")
    assert isinstance(model, OmniMamba) and model.config.backbone.dtype == "bfloat16"
