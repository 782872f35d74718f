"""Chat decoding: the cached, compiled decode loop equals decoding by full recomputation; sampling options; the
processor-level `chat` (official template, left-padded batch, history)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from janusflow_jax.inference import chat
from janusflow_jax.models.janusflow import JanusFlow, init_params, prompt_positions
from janusflow_jax.data.processor import Processor, make_tokenizer
from janusflow_jax.inference.sampler import PromptTooLongError

try:  # tests/ may or may not be a package
    from .test_sampler import randomize
except ImportError:
    from test_sampler import randomize

MAX_NEW = 8
WORDS = "a the red blue cat dog on mat what is this photo color sky".split()


@pytest.fixture(scope="module")
def tiny():
    from configs import tiny as tiny_config
    from janusflow_jax.models.config import JanusFlowConfig

    cfg = JanusFlowConfig.from_dict(tiny_config.get_config().model.to_dict())
    return JanusFlow(cfg), randomize(init_params(cfg, jax.random.key(0)), seed=1)


@pytest.fixture(scope="module")
def batch(tiny):
    """Two rows with one image each at different offsets, the second left-padded by 4."""
    model, _ = tiny
    cfg = model.config
    rng = np.random.default_rng(0)
    n_img, length = 1 + cfg.und_encoder.num_patches, 26
    ids = rng.integers(4, cfg.llm.vocab_size, (2, length)).astype(np.int32)
    mask = np.ones((2, length), np.int32)
    mask[1, :4], ids[1, :4] = 0, 0
    image_mask = np.zeros((2, length), bool)
    image_mask[0, 2:2 + n_img] = image_mask[1, 6:6 + n_img] = True
    size = cfg.und_encoder.image_size
    pixels = rng.standard_normal((2, 1, size, size, 3)).astype(np.float32)
    return ids, mask, pixels, image_mask


def full_recompute_greedy(model, params, ids, mask, pixels, image_mask, max_new, eos_id):
    """Greedy decoding without a cache: every token recomputes the whole sequence (one fixed-size buffer whose
    not-yet-generated slots are masked keys, so one compilation; attention is causal, so they change nothing)."""
    b, s = ids.shape
    seq = np.concatenate([ids, np.zeros((b, max_new), np.int32)], axis=1)
    image_mask = np.concatenate([image_mask, np.zeros((b, max_new), bool)], axis=1)
    logits_fn = jax.jit(lambda p, i, m, pos: model.apply({"params": p}, i, pixels, image_mask, m, pos,
                                                         method=JanusFlow.understand))
    out = np.full((b, max_new), eos_id, np.int32)
    done = np.zeros(b, bool)
    for k in range(max_new):
        m = np.concatenate([mask, (np.arange(max_new) < k)[None].repeat(b, 0).astype(np.int32)], axis=1)
        logits = np.asarray(logits_fn(params, seq, m, prompt_positions(m)))[:, s + k - 1]
        token = np.where(done, eos_id, logits.argmax(-1)).astype(np.int32)
        out[:, k], seq[:, s + k] = token, token
        done |= token == eos_id
    return out


def test_greedy_cached_equals_full_recompute(tiny, batch):
    model, params = tiny
    eos = model.config.llm.vocab_size - 1
    tokens, lengths = chat.generate_tokens(model, params, *batch, eos_id=eos, max_new_tokens=MAX_NEW)
    want = full_recompute_greedy(model, params, *batch, MAX_NEW, eos)
    np.testing.assert_array_equal(tokens, want)
    assert len(set(tokens.ravel().tolist())) > 3  # a non-degenerate continuation
    np.testing.assert_array_equal(lengths, [MAX_NEW, MAX_NEW])

    # The left-padded row decodes exactly as it does alone (positions count from its first real token).
    ids, mask, pixels, image_mask = batch
    alone, _ = chat.generate_tokens(model, params, ids[1:, 4:], mask[1:, 4:], pixels[1:], image_mask[1:, 4:],
                                    eos_id=eos, max_new_tokens=MAX_NEW)
    np.testing.assert_array_equal(alone[0], tokens[1])

    # Stopping: make row 0's third greedy token the EOS id; row 1 stops wherever that id first appears in it.
    stop = int(tokens[0, 2])
    stopped, lengths = chat.generate_tokens(model, params, *batch, eos_id=stop, max_new_tokens=MAX_NEW)
    for row in range(2):
        hits = np.flatnonzero(tokens[row] == stop)
        n = int(hits[0]) if len(hits) else MAX_NEW
        assert lengths[row] == n
        np.testing.assert_array_equal(stopped[row, :n], tokens[row, :n])
        assert (stopped[row, n:] == stop).all()


def test_top_p_filter():
    logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]]))
    kept = np.isfinite(np.asarray(chat.top_p_filter(logits, 0.7)))
    np.testing.assert_array_equal(kept, [[True, False, True, False], [True, True, True, False]])
    kept = np.isfinite(np.asarray(chat.top_p_filter(logits, 1e-6)))  # always at least the most likely token
    np.testing.assert_array_equal(kept.sum(-1), [1, 1])
    assert np.isfinite(np.asarray(chat.top_p_filter(logits, 1.0))).all()


def test_sampling_options(tiny, batch):
    model, params = tiny
    vocab = model.config.llm.vocab_size
    eos = vocab - 1
    kw = dict(eos_id=eos, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.9)
    a, _ = chat.generate_tokens(model, params, *batch, seed=1, **kw)
    b, _ = chat.generate_tokens(model, params, *batch, seed=1, **kw)
    c, _ = chat.generate_tokens(model, params, *batch, seed=2, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and ((a >= 0) & (a < vocab)).all()
    # A vanishing nucleus leaves only the most likely token: sampling reproduces greedy decoding.
    greedy, _ = chat.generate_tokens(model, params, *batch, eos_id=eos, max_new_tokens=MAX_NEW)
    narrow, _ = chat.generate_tokens(model, params, *batch, seed=3, **dict(kw, top_p=1e-6))
    np.testing.assert_array_equal(narrow, greedy)
    with pytest.raises(ValueError, match="top_p"):
        chat.generate_tokens(model, params, *batch, eos_id=eos, top_p=0.0)


@pytest.fixture(scope="module")
def processor(tiny, tmp_path_factory):
    model, _ = tiny
    cfg = model.config
    path = make_tokenizer(tmp_path_factory.mktemp("tokenizer"), WORDS)
    proc = Processor.from_pretrained(path, num_image_tokens=cfg.und_encoder.num_patches,
                                     image_size=cfg.und_encoder.image_size)
    assert proc.vocab_size <= cfg.llm.vocab_size
    return proc


def test_chat_with_processor(tiny, processor, tmp_path):
    model, params = tiny
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8)).save(image)
    questions = ["what is this", "what color is the cat on the mat"]
    answers = chat.chat(model, params, processor, image, questions, max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    import janusflow_jax  # the package-level entry point the docs name: same function, same answers

    assert janusflow_jax.chat(model, params, processor, image, questions, max_new_tokens=6) == answers

    # The batched, bucket-padded answer equals the answer computed from the processor's prompt directly.
    prompt = processor.chat_prompt(questions[1], num_images=1)
    pixels = processor.preprocess_understanding([image])[None]
    ids = prompt["input_ids"][None]
    tokens, lengths = chat.generate_tokens(model, params, ids, np.ones_like(ids), pixels,
                                           prompt["image_token_mask"][None], eos_id=processor.eos_id,
                                           max_new_tokens=6)
    assert answers[1] == processor.decode(tokens[0, :lengths[0]])

    # A second turn: the image stays in the first user turn of the history, not repeated.
    history = chat.add_turn(processor, [], questions[0], answers[0], num_images=1)
    assert chat.images_in(processor, history) == 1
    (follow_up,) = chat.chat(model, params, processor, [image], "is this a dog", history=history, max_new_tokens=4)
    assert isinstance(follow_up, str)
    with pytest.raises(ValueError, match="history shows 1 images"):
        chat.chat(model, params, processor, [], "is this a dog", history=history)
    with pytest.raises(PromptTooLongError, match="context holds"):
        chat.chat(model, params, processor, [image], "cat " * model.config.llm.max_position_embeddings)


def test_chat_rows_with_their_own_images_and_a_system_prompt(tiny, processor, tmp_path):
    """Benchmark batches: every row its own image(s), an empty system prompt, one fixed padded length."""
    model, params = tiny
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (30 + 10 * i, 40, 3), np.uint8)).save(paths[-1])
    questions = ["what is this", "what color is the cat", "is this a dog"]
    kw = dict(max_new_tokens=5, system_prompt="")
    batched = chat.chat(model, params, processor, None, questions, row_images=[[p] for p in paths], pad_to=128, **kw)
    alone = [chat.chat(model, params, processor, [p], q, **kw)[0] for p, q in zip(paths, questions)]
    assert batched == alone
    # the system prompt reaches the prompt: "" and the processor's own give different token ids
    assert processor.system_prompt
    assert (len(processor.chat_prompt("hi", system_prompt="")["input_ids"])
            < len(processor.chat_prompt("hi")["input_ids"]))
    # a row without an image beside rows with two; placeholders written in the question place the images themselves
    tag = processor.image_tag
    mixed = chat.chat(model, params, processor, None, ["what is this", f"{tag}{tag}\nwhat is this"],
                      row_images=[[], paths[:2]], **kw)
    assert mixed[0] == chat.chat(model, params, processor, [], "what is this", **kw)[0]
    with pytest.raises(ValueError, match="1 image placeholders for its 2 images"):
        chat.chat(model, params, processor, None, [f"{tag}\nwhat"], row_images=[paths[:2]])
    with pytest.raises(ValueError, match="no shared images"):
        chat.chat(model, params, processor, paths[0], ["what"], row_images=[[paths[1]]])
    with pytest.raises(ValueError, match="pad_to 4 is shorter"):
        chat.chat(model, params, processor, None, ["what"], row_images=[[paths[1]]], pad_to=4)
