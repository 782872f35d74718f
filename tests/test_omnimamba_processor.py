"""OmniMamba's processor (data/omnimamba_processor.py) with a tiny gpt-neox-like tokenizer: the added ids in the
release's order, the 72-token t2i layout (left padding, truncation, the null prompt), the mmu layout and both chat
templates, and a save/load round trip that keeps the ids."""

import numpy as np
import pytest

pytest.importorskip("transformers")

from janusflow_jax.data.omnimamba_processor import (EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, OmniMambaProcessor,  # noqa
                                                    make_tokenizer)

WORDS = ["a", "red", "cat", "on", "the", "mat", "what", "is", "this", "it", "dog", "and", "blue", "sky"]


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return OmniMambaProcessor.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok"), WORDS))


def ids(processor, text):
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_added_tokens_follow_the_release_order(processor):
    """[PAD] first, then the nine tokens in order, right after the base vocabulary (as 50277, 50278 .. 50286)."""
    base = processor.vocab_size - 10
    assert processor.pad_id == base and processor.tokenizer.pad_token == PAD_TOKEN
    assert [processor.token_ids[t] for t in SPECIAL_TOKENS] == list(range(base + 1, base + 10))
    assert processor.eos_id == 0 and processor.tokenizer.convert_ids_to_tokens(0) == EOS_TOKEN
    assert ids(processor, "a red cat") == [processor.tokenizer.get_vocab()[w] for w in ("a", " ", "red", " ", "cat")]


def test_t2i_prompt_layout(processor):
    t = processor.token_ids
    prompt = processor.t2i_prompt("a red cat")
    assert prompt.dtype == np.int32 and prompt.shape == (72,)
    caption = ids(processor, "a red cat")
    assert prompt.tolist() == ([t["<|t2i|>"], t["<|sot|>"]] + [processor.pad_id] * (68 - len(caption)) + caption
                               + [t["<|eot|>"], t["<|soi|>"]])
    long = " ".join(["dog"] * 40)  # 79 tokens: the first 68 are kept, no padding
    assert processor.t2i_prompt(long)[2:70].tolist() == ids(processor, long)[:68]
    null = processor.t2i_null_prompt()
    assert null.tolist() == [t["<|t2i|>"], t["<|sot|>"]] + [processor.pad_id] * 68 + [t["<|eot|>"], t["<|soi|>"]]
    short = OmniMambaProcessor(processor.tokenizer, caption_length=8)
    assert short.t2i_prompt("a red cat").shape == (12,)
    with pytest.raises(ValueError, match="empty"):
        processor.t2i_prompt("  ")


def test_chat_templates(processor):
    t = processor.token_ids
    head = [t["<|mmu|>"], t["<|soi|>"], t["<|eoi|>"], t["<|sot|>"]]
    # training: each turn tokenized alone, answers closed by <|endoftext|>, later questions after "\n"
    assert processor.format_chat("what is this?") == ["In: what is this?\nOut: "]
    history = [("what is this?", " a cat <image>")]
    pieces = processor.format_chat("and the sky?", history)
    assert pieces == ["In: what is this?\nOut: ", f"a cat{EOS_TOKEN}", "\nIn: and the sky?\nOut: "]
    prompt = processor.mmu_prompt("and the sky?", history)
    assert prompt.tolist() == head + [i for p in pieces for i in ids(processor, p)]
    assert ids(processor, f"a cat{EOS_TOKEN}")[-1] == processor.eos_id
    # release: USER/ASSISTANT, one string, stripped; the system prompt in front when given
    assert processor.format_chat("what is this?", template="release") == ["USER: what is this? ASSISTANT:"]
    assert processor.format_chat("and the sky?", [("what is this?", "a cat")], template="release") == [
        f"USER: what is this? ASSISTANT: a cat{EOS_TOKEN}USER: and the sky? ASSISTANT:"]
    system = OmniMambaProcessor(processor.tokenizer, template="release", system_prompt="the sky is blue.")
    assert system.mmu_prompt("what is this?").tolist() == head + ids(processor,
                                                                      "the sky is blue. USER: what is this? ASSISTANT:")
    with pytest.raises(ValueError, match="template"):
        processor.format_chat("what?", template="chatml")


def test_decode_stops_at_endoftext(processor):
    answer = ids(processor, "a blue sky") + [processor.eos_id] + ids(processor, "dog")
    assert processor.decode(answer) == "a blue sky"


def test_save_and_load_keep_the_ids(processor, tmp_path):
    processor_copy = OmniMambaProcessor(processor.tokenizer, caption_length=20, template="release")
    processor_copy.save_pretrained(tmp_path)
    loaded = OmniMambaProcessor.from_pretrained(tmp_path)
    assert (loaded.caption_length, loaded.template) == (20, "release")
    assert loaded.token_ids == processor.token_ids and loaded.pad_id == processor.pad_id
    assert loaded.vocab_size == processor.vocab_size
    assert loaded.t2i_prompt("a red cat").tolist() == processor_copy.t2i_prompt("a red cat").tolist()
