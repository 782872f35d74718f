"""The processor against the official VLChatProcessor / VLMImageProcessor semantics (no download, no JAX).

Image references are written the official way: torchvision's functional resize (BICUBIC, antialias) on the PIL image,
the official expand2square (PIL new + paste), transformers' rescale/normalize on the channels-first array.
"""

import json
import string

import numpy as np
import pytest
from PIL import Image

from janusflow_jax.data.processor import (DEFAULT_SYSTEM_PROMPT, EOS_TOKEN, IMAGE_END_TAG, IMAGE_GEN_TAG, IMAGE_START_TAG,
                                     IMAGE_TAG, ImageError, Processor, load_image, make_tokenizer)

WORDS = ("a an the red blue green yellow black white cat dog bird fish car tree house man woman child ball on in "
         "under with and is are what this that there image photo picture of two three four five one big small "
         "sitting running top left right sky water grass road dogs mat these").split()
assert len(set(WORDS)) >= 50
N = 4  # image tokens of the tiny processor
S = 64  # its image size


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"), WORDS)


@pytest.fixture(scope="module")
def proc(tok_dir):
    return Processor.from_pretrained(tok_dir, num_image_tokens=N, image_size=S)


@pytest.fixture(scope="module")
def vocab(tok_dir):
    return json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]


def official_vlchat_tokenizer(path):
    """What VLChatProcessor.__init__ does to the loaded tokenizer (add_special_tokens per missing tag, this order)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    for tag in (IMAGE_TAG, IMAGE_GEN_TAG, IMAGE_START_TAG, IMAGE_END_TAG):
        if tokenizer.vocab.get(tag) is None:
            tokenizer.add_special_tokens({"additional_special_tokens": [tag]})
    return tokenizer


def official_prompt_ids(tokenizer, text, num_image_tokens):
    """process_one: tokenizer.encode (BOS added by the tokenizer) + add_image_token (each tag replaced)."""
    get = tokenizer.vocab.get
    out = []
    for token in tokenizer.encode(text):
        if token == get(IMAGE_TAG):
            out += [get(IMAGE_START_TAG)] + [get(IMAGE_TAG)] * num_image_tokens + [get(IMAGE_END_TAG)]
        else:
            out.append(token)
    return out


# ------------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_layout_and_official_tag_order(tmp_path, tok_dir, proc, vocab):
    files = {p.name for p in tok_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= files
    special_map = json.loads((tok_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special_map["bos_token"]["content"] == "<｜begin▁of▁sentence｜>"
    assert special_map["eos_token"]["content"] == "<｜end▁of▁sentence｜>"
    assert special_map["additional_special_tokens"] == ["<｜begin▁of▁generation｜>"]
    base = len(vocab)
    # DeepSeek layout: BOS, EOS, pad, generation tag after the vocabulary; then the processor's image tags.
    assert (proc.bos_id, proc.eos_id, proc.pad_id, proc.gen_tag_id) == (base, base + 1, base + 2, base + 3)
    assert (proc.image_id, proc.image_start_id, proc.image_end_id) == (base + 4, base + 5, base + 6)
    assert proc.vocab_size == len(proc.tokenizer) == base + 7 < 128
    official = official_vlchat_tokenizer(tok_dir)
    assert [official.vocab[t] for t in (IMAGE_TAG, IMAGE_START_TAG, IMAGE_END_TAG)] == [
        proc.image_id, proc.image_start_id, proc.image_end_id]

    # Without the generation tag in the tokenizer the official order is image, generation, begin, end.
    no_gen = make_tokenizer(tmp_path / "no_gen", WORDS, with_generation_tag=False)
    p = Processor.from_pretrained(no_gen)
    base = len(p.tokenizer) - 4
    assert (p.image_id, p.gen_tag_id, p.image_start_id, p.image_end_id) == (base, base + 1, base + 2, base + 3)
    official = official_vlchat_tokenizer(no_gen)
    assert [official.vocab[t] for t in (IMAGE_TAG, IMAGE_GEN_TAG, IMAGE_START_TAG, IMAGE_END_TAG)] == [
        p.image_id, p.gen_tag_id, p.image_start_id, p.image_end_id]


def test_round_trip_and_unknown_words(proc):
    for text in ["User: a red cat\n\nAssistant:", "User: what is this?\n\nAssistant: two dogs, on the grass.",
                 "the sky\tis blue\n" + string.punctuation]:
        ids = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert proc.tokenizer.decode(ids) == text
    ids = proc.tokenizer("a zebra", add_special_tokens=False)["input_ids"]
    assert proc.tokenizer.convert_ids_to_tokens(ids) == ["a", " ", "<unk>"]


# ------------------------------------------------------------------------------------------------------ templates
def test_generation_prompt_ids_by_hand(proc, vocab):
    v = vocab
    expected = [proc.bos_id, v["User"], v[":"], v[" "], v["a"], v[" "], v["red"], v[" "], v["cat"], v["\n"], v["\n"],
                v["Assistant"], v[":"]]
    ids = proc.encode_generation_prompt("  a red cat ")
    assert ids.dtype == np.int32 and ids.tolist() == expected
    assert proc.gen_tag_id not in ids.tolist()
    assert proc.encode_generation_prompt("a red cat", template="pretrain").tolist() == [
        proc.bos_id, v["a"], v[" "], v["red"], v[" "], v["cat"]]
    for bad in ("", "  \n "):
        with pytest.raises(ValueError, match="empty"):
            proc.encode_generation_prompt(bad)
    with pytest.raises(ValueError, match="template"):
        proc.encode_generation_prompt("a cat", template="chat")


def test_chat_prompt_equals_official(tok_dir, proc):
    expected = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
                "the user provides, and assist the user with a variety of tasks using natural language.\n\n"
                "User: <image_placeholder>\nwhat is this\n\nAssistant:")
    conversation = [{"role": "User", "content": "<image_placeholder>\nwhat is this"},
                    {"role": "Assistant", "content": ""}]
    assert proc.format_conversation(conversation, with_response=False) == expected
    prompt = proc.chat_prompt("what is this")
    official = official_prompt_ids(official_vlchat_tokenizer(tok_dir), expected, N)
    assert prompt["input_ids"].dtype == np.int32 and prompt["input_ids"].tolist() == official
    assert prompt["num_images"] == 1 and not prompt["loss_mask"].any()
    # The official images_seq_mask: <begin_of_image> and the placeholder slots.
    ids = prompt["input_ids"]
    assert prompt["image_token_mask"].tolist() == ((ids == proc.image_id) | (ids == proc.image_start_id)).tolist()
    assert proc.encode_understanding(conversation, with_response=False)["input_ids"].tolist() == official


def test_loss_mask_covers_exactly_the_responses(proc):
    conversation = [
        {"role": "User", "content": "<image_placeholder>\nwhat is this?"},
        {"role": "Assistant", "content": " a red cat on the mat. "},
        {"role": "User", "content": "and this <image_placeholder> <image_placeholder>"},
        {"role": "Assistant", "content": "two dogs"},
    ]
    out = proc.encode_understanding(conversation, system_prompt="")
    ids, loss, image = out["input_ids"], out["loss_mask"], out["image_token_mask"]
    assert ids[0] == proc.bos_id and loss[0] == 0
    assert {a.dtype for a in (ids, loss, image)} == {np.dtype(np.int32)} and len(ids) == len(loss) == len(image)
    assert out["num_images"] == 3 and image.sum() == 3 * (1 + N)
    # Each image: <begin_of_image> + N placeholders (in the mask), then <end_of_image> (not in it).
    starts = np.flatnonzero(ids == proc.image_start_id)
    assert len(starts) == 3
    for s in starts:
        assert image[s:s + N + 1].all() and image[s + N + 1] == 0 and ids[s + N + 1] == proc.image_end_id
        assert (ids[s + 1:s + N + 1] == proc.image_id).all()
    # The targets are exactly each answer (with the space after "Assistant:", its own token here) and its EOS.
    runs = np.split(np.flatnonzero(loss), np.flatnonzero(np.diff(np.flatnonzero(loss)) > 1) + 1)
    texts = [proc.tokenizer.decode(ids[r], skip_special_tokens=False) for r in runs]
    assert texts == [" a red cat on the mat." + EOS_TOKEN, " two dogs" + EOS_TOKEN]
    assert (ids[loss == 1] == proc.eos_id).sum() == 2 and (ids == proc.eos_id).sum() == 2
    # The prompt of the last turn is the prefix up to "Assistant:".
    prompt = proc.encode_understanding(conversation, system_prompt="", with_response=False)
    text = proc.format_conversation(conversation, system_prompt="")
    assert text.endswith("\n\nAssistant: two dogs" + EOS_TOKEN)
    n = len(prompt["input_ids"])
    assert prompt["input_ids"].tolist() == ids[:n].tolist() and prompt["loss_mask"].tolist() == loss[:n].tolist()
    assert proc.tokenizer.decode(prompt["input_ids"][-2:]) == "Assistant:"


def test_loss_mask_with_byte_level_bpe():
    """The released tokenizer is byte-level BPE, whose tokens carry the leading space and may merge "?\\n\\n"."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["User: what is this?\n\nAssistant: a red cat on the mat.", "User: and this?\n\nAssistant: two dogs"]
    bpe.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=400,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<｜begin▁of▁sentence｜>", EOS_TOKEN, "<｜▁pad▁｜>")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<｜begin▁of▁sentence｜>", eos_token=EOS_TOKEN)
    proc = Processor(tokenizer, num_image_tokens=N, image_size=S)
    conversation = [{"role": "User", "content": "<image_placeholder>\nwhat is this?"},
                    {"role": "Assistant", "content": "a red cat on the mat."},
                    {"role": "User", "content": "and this?"}, {"role": "Assistant", "content": "two dogs"}]
    out = proc.encode_understanding(conversation)
    ids, loss = out["input_ids"], out["loss_mask"]
    expected = [proc.bos_id] + tokenizer(proc.format_conversation(conversation), add_special_tokens=False)["input_ids"]
    i = expected.index(proc.image_id)
    expected[i:i + 1] = [proc.image_start_id] + [proc.image_id] * N + [proc.image_end_id]
    assert ids.tolist() == expected
    runs = np.split(np.flatnonzero(loss), np.flatnonzero(np.diff(np.flatnonzero(loss)) > 1) + 1)
    texts = [tokenizer.decode(ids[r], skip_special_tokens=False) for r in runs]
    assert texts == [" a red cat on the mat." + EOS_TOKEN, " two dogs" + EOS_TOKEN]


def test_conversation_errors(proc):
    with pytest.raises(ValueError, match="alternate"):
        proc.encode_understanding([{"role": "Assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="alternate"):
        proc.encode_understanding([{"role": "user", "content": "a cat"}, {"role": "Assistant", "content": "a"}])
    with pytest.raises(ValueError, match="end with an assistant"):
        proc.encode_understanding([{"role": "User", "content": "a cat"}])
    with pytest.raises(ValueError, match="empty"):
        proc.encode_understanding([{"role": "User", "content": "a cat"}, {"role": "Assistant", "content": " "}])
    with pytest.raises(ValueError, match="begin_of_image"):
        proc.chat_prompt("<begin_of_image> a cat")
    with pytest.raises(ValueError, match="assistant turn"):
        proc.encode_understanding([{"role": "User", "content": "a"},
                                   {"role": "Assistant", "content": "<image_placeholder>"}])
    with pytest.raises(ValueError, match="question"):
        proc.chat_prompt(" ")


def test_chat_prompt_with_history_and_two_images(proc):
    history = [{"role": "User", "content": "<image_placeholder>\nwhat is this"},
               {"role": "Assistant", "content": "a cat"}]
    out = proc.chat_prompt("and these", num_images=2, history=history, system_prompt="")
    assert out["num_images"] == 3 and out["image_token_mask"].sum() == 3 * (1 + N)
    assert proc.tokenizer.decode(out["input_ids"], skip_special_tokens=False).endswith(
        "a cat" + EOS_TOKEN + "User: " + (IMAGE_START_TAG + IMAGE_TAG * N + IMAGE_END_TAG + "\n") * 2
        + "and these\n\nAssistant:")
    # History answers stay targets: " ", "a", " ", "cat" and the EOS (the space after "Assistant:" included).
    assert out["loss_mask"].sum() == 5


def test_encode_text_and_decode(proc):
    out = proc.encode_text("the sky is blue")
    ids = out["input_ids"]
    assert ids[0] == proc.bos_id and ids[-1] == proc.eos_id and ids.dtype == np.int32
    assert out["loss_mask"].tolist() == [0] + [1] * (len(ids) - 1)
    assert proc.decode(ids) == "the sky is blue"
    assert proc.decode(np.concatenate([ids, ids])) == "the sky is blue"  # stops at the first EOS
    assert proc.decode(ids, skip_special_tokens=False) == "<｜begin▁of▁sentence｜>the sky is blue"
    with pytest.raises(ValueError, match="empty"):
        proc.encode_text("")


# ---------------------------------------------------------------------------------------------------------- images
def official_expand2square(pil_img, background_color):
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def official_understanding(image, size, mean, std, min_size=14):
    import torchvision.transforms.functional as TF
    from transformers.image_transforms import normalize, rescale

    image = image.convert("RGB")
    width, height = image.size
    longest = max(width, height)
    new = [max(int(height / longest * size), min_size), max(int(width / longest * size), min_size)]
    image = TF.resize(image, new, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    image = official_expand2square(image, tuple(int(x * 255) for x in mean))
    x = np.transpose(np.asarray(image), (2, 0, 1))
    x = rescale(x, 1.0 / 255.0, input_data_format="channels_first")
    x = normalize(x, mean, std, input_data_format="channels_first")
    return np.transpose(x, (1, 2, 0))


def _images():
    rng = np.random.default_rng(0)

    def rgb(w, h):
        smooth = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
        return Image.fromarray(np.clip(smooth + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8))

    return {
        "odd_wide": rgb(101, 37), "odd_tall": rgb(23, 79), "square": rgb(64, 64), "small": rgb(9, 13),
        "extreme_wide": rgb(300, 7), "grey": rgb(45, 31).convert("L"), "rgba": rgb(50, 77).convert("RGBA"),
        "palette": rgb(77, 50).convert("P", palette=Image.Palette.ADAPTIVE, colors=32),
        "cmyk": rgb(33, 40).convert("CMYK"),
    }


@pytest.mark.parametrize("name", list(_images()))
def test_understanding_pixels_equal_official(proc, name):
    image = _images()[name]
    got = proc.preprocess_understanding([image])
    assert got.shape == (1, S, S, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], official_understanding(image, S, proc.image_mean, proc.image_std))


def test_understanding_official_config_files(tmp_path, tok_dir):
    """A Janus-style preprocessor_config.json at 384 px; a file without mean/std gets the class (CLIP) defaults."""
    for f in tok_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "background_color": [1, 2, 3], "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "VLMImageProcessor", "image_size": 384, "image_std": [0.5, 0.5, 0.5],
        "min_size": 14, "processor_class": "VLChatProcessor", "rescale_factor": 0.00392156862745098}))
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "add_special_token": False, "ignore_id": -100, "image_tag": "<image_placeholder>", "mask_prompt": True,
        "num_image_tokens": 576, "processor_class": "VLChatProcessor", "sft_format": "deepseek_old"}))
    proc = Processor.from_pretrained(tmp_path)
    assert (proc.image_size, proc.num_image_tokens, proc.min_size) == (384, 576, 14)
    assert proc.background_color == (127, 127, 127)  # recomputed from the mean, not the json value
    assert proc.system_prompt == DEFAULT_SYSTEM_PROMPT
    images = _images()
    got = proc.preprocess_understanding([images["odd_wide"], images["grey"]])
    assert got.shape == (2, 384, 384, 3)
    for g, name in zip(got, ("odd_wide", "grey")):
        np.testing.assert_array_equal(g, official_understanding(images[name], 384, (0.5,) * 3, (0.5,) * 3))

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_size": 48}))
    clip = Processor.from_pretrained(tmp_path)
    assert clip.background_color == (122, 116, 104)
    np.testing.assert_array_equal(clip.preprocess_understanding(images["odd_tall"])[0], official_understanding(
        images["odd_tall"], 48, clip.image_mean, clip.image_std))


def test_generation_crop(proc):
    import torchvision.transforms.functional as TF

    # 23 x 79 -> 64 x 219 after the short-side resize: an odd margin, so the centre crop's rounding matters.
    image = _images()["odd_tall"]
    resized = TF.resize(image, S, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    assert resized.size == (S, 219)
    scale = lambda im: (np.asarray(im).astype(np.float64) / 255.0).astype(np.float32) * 2.0 - 1.0  # noqa: E731
    centre = proc.preprocess_generation(image)
    assert centre.shape == (S, S, 3) and centre.dtype == np.float32
    assert centre.min() >= -1.0 and centre.max() <= 1.0
    np.testing.assert_allclose(centre, scale(TF.center_crop(resized, S)), atol=1e-6, rtol=0)
    full = scale(resized)
    tops = set()
    for seed in range(4):
        crop = proc.preprocess_generation(image, rng=np.random.default_rng(seed))
        matches = [y for y in range(full.shape[0] - S + 1) if np.abs(full[y:y + S] - crop).max() <= 1e-6]
        assert len(matches) == 1
        tops.add(matches[0])
    assert len(tops) > 1  # the crop is random


def test_load_image_modes(tmp_path):
    sixteen = Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16))
    assert sixteen.mode == "I;16"
    sixteen.save(tmp_path / "grey16.png")
    images = {**_images(), "grey16": Image.open(tmp_path / "grey16.png")}
    for name, image in images.items():
        path = tmp_path / (f"{name}.jpg" if name == "cmyk" else f"{name}.png")  # PNG cannot hold CMYK
        if name != "grey16":
            image.save(path)
        for source in (path, str(path), path.read_bytes()):
            out = load_image(source)
            assert out.mode == "RGB" and out.size == image.size
            np.testing.assert_array_equal(np.asarray(out), np.asarray(Image.open(path).convert("RGB")))
    grey = np.asarray(images["grey"])
    np.testing.assert_array_equal(np.asarray(load_image(grey)), np.repeat(grey[..., None], 3, axis=-1))
    with pytest.raises(ImageError, match="uint8"):
        load_image(grey.astype(np.float32))


def test_corrupt_images_raise(tmp_path, proc):
    image = _images()["odd_wide"]
    for fmt in ("JPEG", "PNG"):
        path = tmp_path / f"broken.{fmt.lower()}"
        image.save(path, fmt)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
        with pytest.raises(ImageError, match=f"broken.{fmt.lower()}"):
            load_image(path)
        with pytest.raises(ImageError, match=f"broken.{fmt.lower()}"):
            proc.preprocess_understanding([path])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="garbage.png"):
        load_image(garbage)
    with pytest.raises(ImageError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="bytes"):
        load_image(b"\x89PNG\r\n\x1a\n broken")
    assert issubclass(ImageError, ValueError)


# ------------------------------------------------------------------------------------------------ save and load
def test_save_load_round_trip(tmp_path, tok_dir, proc):
    custom = Processor.from_pretrained(tok_dir, num_image_tokens=N, image_size=S)
    custom.system_prompt = "answer briefly."
    for p, name in ((proc, "default"), (custom, "custom")):
        out = p.save_pretrained(tmp_path / name)
        config = json.loads((out / "processor_config.json").read_text(encoding="utf-8"))
        assert ("system_prompt" in config) == (name == "custom")  # the default stays loadable by the official code
        q = Processor.from_pretrained(out)
        for attr in ("bos_id", "eos_id", "pad_id", "image_id", "image_start_id", "image_end_id", "gen_tag_id",
                     "vocab_size", "num_image_tokens", "image_size", "min_size", "image_mean", "image_std",
                     "rescale_factor", "do_normalize", "background_color", "system_prompt", "sft_format"):
            assert getattr(q, attr) == getattr(p, attr), attr
        assert q.tokenizer.get_vocab() == p.tokenizer.get_vocab()
        conversation = [{"role": "User", "content": "<image_placeholder>\nwhat is this"},
                        {"role": "Assistant", "content": "a cat"}]
        for key, value in p.encode_understanding(conversation).items():
            np.testing.assert_array_equal(q.encode_understanding(conversation)[key], value)
        image = _images()["odd_tall"]
        np.testing.assert_array_equal(q.preprocess_understanding([image]), p.preprocess_understanding([image]))
        assert q.save_pretrained(tmp_path / f"{name}_again")
        for f in ("processor_config.json", "preprocessor_config.json"):
            assert (tmp_path / f"{name}_again" / f).read_text() == (out / f).read_text()
