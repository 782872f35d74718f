"""The processor: chat templates, token ids and image preprocessing exactly as the official `VLChatProcessor`.

Text follows the DeepSeek template of `janus/utils/conversation.py` with the roles "User"/"Assistant" (REFERENCE §5,
§6): `"{system}\\n\\nUser: {question}\\n\\nAssistant: {answer}<｜end▁of▁sentence｜>"`, stripped, tokenized with BOS first.
Every "<image_placeholder>" token in the text becomes `<begin_of_image>`, `num_image_tokens` x `<image_placeholder>`,
`<end_of_image>`; the first `1 + num_image_tokens` of these slots are the image slots (the official `images_seq_mask`).

Images for understanding follow `VLMImageProcessor`: long side to `image_size` (PIL bicubic, as torchvision does on a
PIL image), padded to a square with the mean colour, rescaled by 1/255, normalised. Images for generation training
follow the paper: short side to `image_size`, square crop, scaled to [-1, 1]. Arrays are channels-last
[height, width, channels]. Nothing here needs PyTorch or JAX.
"""

from __future__ import annotations

import io
import json
import os
import re
import string
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
from PIL import Image

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TAG = "<image_placeholder>"
IMAGE_START_TAG = "<begin_of_image>"
IMAGE_END_TAG = "<end_of_image>"
IMAGE_GEN_TAG = "<｜begin▁of▁generation｜>"
USER, ASSISTANT = "User", "Assistant"

# VLChatProcessor.system_prompt, used for understanding (not for generation: REFERENCE §10.10).
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
# VLMImageProcessor's class defaults (CLIP statistics): they apply to keys missing from a preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Without any preprocessor_config.json we use what SigLIP was trained with and what Janus/Janus-Pro ship (REFERENCE
# §6): 384 px, min side 14, mean = std = 0.5. The released JanusFlow file's values could not be read here.
SIGLIP_IMAGE_DEFAULTS = {"image_size": 384, "min_size": 14, "image_mean": [0.5, 0.5, 0.5],
                         "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1.0 / 255.0, "do_normalize": True}
# Template names of janus/utils/conversation.py that use the DeepSeek separator style. Both give the same strings,
# because the DeepSeek style writes each message's own role string, never the template's roles.
DEEPSEEK_FORMATS = ("deepseek", "deepseek_old")

PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# What `Processor.from_pretrained` may read from a directory (all of it small; copied locally from gs://).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   PROCESSOR_CONFIG, PREPROCESSOR_CONFIG)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]
Message = Mapping[str, str]


class ImageError(ValueError):
    """An image that cannot be opened or fully decoded (corrupt, truncated, not an image); names the file."""


# ------------------------------------------------------------------------------------------------------ tokenizer
# Every word, every single whitespace character and every other character is one piece, so a word-level vocabulary
# decodes back to the exact text by plain concatenation.
_PIECES = r"\w+|\s|[^\w\s]"


def make_tokenizer(out_dir: str | os.PathLike, words: Sequence[str], with_generation_tag: bool = True) -> Path:
    """Writes a small word-level tokenizer in the official special-token layout as a HF checkpoint directory has it.

    Base vocabulary: "<unk>" (id 0, for anything unknown), space, newline, tab, the ASCII punctuation, the roles
    "User" and "Assistant", then the pieces of `words` in order. Then, as added special tokens like DeepSeek's:
    BOS, EOS, "<｜▁pad▁｜>" and (as in JanusFlow's special_tokens_map.json) the generation tag. The image tags are
    not included: `Processor` adds them, as the official processor does. A tokenizer.encode adds BOS like DeepSeek's.
    A 50-word list gives 92 ids, 95 once the processor has added the image tags. Returns `out_dir`.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    base = ["<unk>", " ", "\n", "\t", *string.punctuation, USER, ASSISTANT]
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"words must be strings, got {word!r}")
        base += [p for p in re.findall(_PIECES, word) if not p.isspace()]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(base))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECES), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    specials = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN] + ([IMAGE_GEN_TAG] if with_generation_tag else [])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))

    def token_entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(tokenizer.token_to_id(t)): {**token_entry(t), "special": True} for t in specials},
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": None,
        # Not DeepSeek's "LlamaTokenizerFast": transformers 5 would rebuild a Llama (Metaspace BPE) pipeline around a
        # word-level vocabulary; the generic class loads tokenizer.json verbatim in transformers 4 and 5.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    special_tokens_map = {"bos_token": token_entry(BOS_TOKEN), "eos_token": token_entry(EOS_TOKEN)}
    if with_generation_tag:
        special_tokens_map["additional_special_tokens"] = [IMAGE_GEN_TAG]
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", special_tokens_map)
    return out


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------------------- images
def load_image(source: ImageSource) -> Image.Image:
    """Opens and fully decodes an image (path, encoded bytes, PIL image or uint8 array [height, width(, channels)])
    and converts it to RGB.

    Any mode (grey, RGBA, palette, CMYK, 16-bit ...) goes through PIL's `convert("RGB")`, as the official
    `load_pil_images` does (alpha is dropped, not composited; EXIF orientation is not applied). Decoding happens here,
    so a corrupt or truncated file raises `ImageError` naming it now rather than later in a data loader (unless some
    other code has set PIL's global `ImageFile.LOAD_TRUNCATED_IMAGES`, which makes PIL pad truncated data silently).
    """
    if isinstance(source, np.ndarray):  # e.g. a gradio image, as the demo gets it
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise ImageError(f"an image array must be uint8 [height, width(, channels)], got {source.dtype} "
                             f"{source.shape}")
        source = Image.fromarray(source)
    if isinstance(source, Image.Image):
        name, opener = getattr(source, "filename", "") or "<PIL image>", None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name, opener = "<image bytes>", lambda: Image.open(io.BytesIO(bytes(source)))
    elif isinstance(source, (str, os.PathLike)) and "://" in os.fspath(source):  # gs://...: PIL opens local files
        from etils import epath

        name, opener = os.fspath(source), lambda: Image.open(io.BytesIO(epath.Path(source).read_bytes()))
    elif isinstance(source, (str, os.PathLike)):
        name, opener = os.fspath(source), lambda: Image.open(source)
    else:
        raise TypeError(f"an image must be a path, bytes, a PIL image or a uint8 array, got {type(source).__name__}")
    try:
        if opener is None:
            source.load()
            return source if source.mode == "RGB" else source.convert("RGB")
        with opener() as image:
            image.load()  # decodes every byte: a truncated file fails here
            return image.convert("RGB")  # a detached copy even when already RGB, so the file can close
    except Exception as e:  # PIL reports corrupt data with many exception types (OSError, SyntaxError, ...)
        raise ImageError(f"cannot read image {name}: {type(e).__name__}: {e}") from e


def _to_unit_float(pixels: np.ndarray, rescale_factor: float) -> np.ndarray:
    # transformers' rescale: multiply in float64, then round to float32 (bit-identical to the official processor).
    return (pixels.astype(np.float64) * rescale_factor).astype(np.float32)


def _normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    # transformers' normalize: float32 statistics, (x - mean) / std in float32.
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def resize_short_side_and_crop(image: Image.Image, size: int,
                               rng: np.random.Generator | None = None) -> Image.Image:
    """Short side to `size` (bicubic, long side truncated as torchvision's Resize(size)), then a square crop: random
    with `rng`, centred (torchvision CenterCrop's rounding) without. Returns a [size, size] PIL image."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    width, height = new_size
    if rng is None:
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    else:
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    return image.crop((left, top, left + size, top + size))


# ------------------------------------------------------------------------------------------------------ processor
class Processor:
    """Tokenizer + templates + image preprocessing of JanusFlow, numerically the official `VLChatProcessor`.

    Attributes: `tokenizer` (transformers fast tokenizer), `bos_id`, `eos_id`, `pad_id` ("<｜▁pad▁｜>", else EOS as
    the official `pad_id`), `image_id` (<image_placeholder>), `image_start_id`, `image_end_id`, `gen_tag_id`,
    `vocab_size` (len(tokenizer), image tags included), `num_image_tokens`, `image_size`, `min_size`, `image_mean`,
    `image_std`, `rescale_factor`, `do_normalize`, `background_color`, `system_prompt`.
    """

    def __init__(self, tokenizer, *, image_size: int = 384, min_size: int = 14,
                 image_mean: Sequence[float] | None = (0.5, 0.5, 0.5), image_std: Sequence[float] = (0.5, 0.5, 0.5),
                 rescale_factor: float = 1.0 / 255.0, do_normalize: bool = True, num_image_tokens: int = 576,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT, image_tag: str = IMAGE_TAG,
                 image_start_tag: str = IMAGE_START_TAG, image_end_tag: str = IMAGE_END_TAG,
                 image_gen_tag: str = IMAGE_GEN_TAG, sft_format: str = "deepseek", add_special_token: bool = False,
                 extra_processor_config: Mapping[str, Any] | None = None,
                 extra_preprocessor_config: Mapping[str, Any] | None = None):
        if sft_format not in DEEPSEEK_FORMATS:
            raise ValueError(f"sft_format {sft_format!r} is not supported; JanusFlow uses one of {DEEPSEEK_FORMATS}")
        if add_special_token:
            raise ValueError("add_special_token=True (keep the image tag before <begin_of_image>) is not supported: "
                             "it breaks the 1 + num_image_tokens image slots the model expects")
        if int(num_image_tokens) < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        if int(min_size) < 1 or int(image_size) < int(min_size):
            raise ValueError(f"need 1 <= min_size <= image_size, got min_size={min_size}, image_size={image_size}")
        if do_normalize and (image_mean is None or image_std is None):
            raise ValueError("do_normalize needs image_mean and image_std")
        for name, stat in (("image_mean", image_mean), ("image_std", image_std)):
            if stat is not None and len(stat) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {stat!r}")
        self.tokenizer = tokenizer
        self.image_tag, self.image_start_tag, self.image_end_tag = image_tag, image_start_tag, image_end_tag
        self.image_gen_tag = image_gen_tag
        # Same tags, same order, same test as VLChatProcessor.__init__ (image, generation, begin, end; each only when
        # absent), so the new ids are the rows of the released embedding table.
        for tag in (image_tag, image_gen_tag, image_start_tag, image_end_tag):
            if self._token_id(tag) is None:
                self._add_special_token(tag)
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError("the tokenizer defines no bos_token/eos_token (tokenizer_config.json)")
        pad_id = self._token_id(PAD_TOKEN)
        if pad_id is not None:  # VLChatProcessor sets the tokenizer's pad token the same way
            tokenizer.pad_token = PAD_TOKEN
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.image_id = self._token_id(image_tag)
        self.image_start_id = self._token_id(image_start_tag)
        self.image_end_id = self._token_id(image_end_tag)
        self.gen_tag_id = self._token_id(image_gen_tag)
        self.vocab_size = len(tokenizer)

        self.num_image_tokens = int(num_image_tokens)
        self.system_prompt = system_prompt
        self.sft_format = sft_format
        self.image_size, self.min_size = int(image_size), int(min_size)
        self.image_mean = None if image_mean is None else tuple(float(m) for m in image_mean)
        self.image_std = None if image_std is None else tuple(float(s) for s in image_std)
        self.rescale_factor, self.do_normalize = float(rescale_factor), bool(do_normalize)
        # Recomputed from the mean, as VLMImageProcessor.__init__ does (a json "background_color" is ignored).
        self.background_color = ((127, 127, 127) if self.image_mean is None
                                 else tuple(int(m * 255) for m in self.image_mean))
        self._extra_processor_config = dict(extra_processor_config or {})
        self._extra_preprocessor_config = dict(extra_preprocessor_config or {})

    def _token_id(self, token: str) -> int | None:
        return self.tokenizer.get_vocab().get(token)

    def _add_special_token(self, token: str) -> None:
        # add_tokens(special) behaves alike in transformers 4 and 5 (add_special_tokens' list handling differs); the
        # token gets the next id, len(tokenizer), like the official add_special_tokens call.
        from tokenizers import AddedToken

        self.tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)

    # ----------------------------------------------------------------------------------------- checkpoint files
    @classmethod
    def _from_remote(cls, path, num_image_tokens, image_size) -> "Processor":
        import tempfile

        from janusflow_jax import paths

        remote = paths.user_path(path)
        if not (remote / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json (a fast-tokenizer checkpoint directory is needed)")
        with tempfile.TemporaryDirectory(prefix="janusflow-tokenizer-") as tmp:
            for name in TOKENIZER_FILES:
                if (remote / name).is_file():
                    paths.copy_file(remote / name, Path(tmp) / name)
            return cls.from_pretrained(tmp, num_image_tokens, image_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, num_image_tokens: int | None = None,
                        image_size: int | None = None) -> "Processor":
        """Loads tokenizer.json (+ tokenizer_config.json) and processor_config.json / preprocessor_config.json.

        Keys missing from a present preprocessor_config.json take VLMImageProcessor's class defaults (CLIP mean/std,
        min_size 14); without that file the SigLIP values `SIGLIP_IMAGE_DEFAULTS` apply (384 px, mean = std = 0.5).
        Keys missing from processor_config.json take VLChatProcessor's defaults (576 image tokens, the official
        system prompt). `num_image_tokens` / `image_size` override the files (tiny models, e.g. 64 px, 16 patches).
        """
        from transformers import PreTrainedTokenizerFast

        if "://" in os.fspath(path):  # gs://...: Hugging Face reads local files; copy the few small ones it needs
            return cls._from_remote(path, num_image_tokens, image_size)
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json (a fast-tokenizer checkpoint directory is needed)")
        # The generic fast class loads tokenizer.json verbatim in transformers 4 and 5 (DeepSeek's config names
        # LlamaTokenizerFast, which transformers 5 may rebuild as a Metaspace BPE).
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))

        kwargs: dict[str, Any] = {}
        processor_config = _read_json(path / PROCESSOR_CONFIG) if (path / PROCESSOR_CONFIG).is_file() else {}
        for key in ("image_tag", "image_start_tag", "image_end_tag", "image_gen_tag", "num_image_tokens",
                    "system_prompt", "sft_format", "add_special_token"):
            if key in processor_config:
                kwargs[key] = processor_config.pop(key)
        if (path / PREPROCESSOR_CONFIG).is_file():
            image_config = _read_json(path / PREPROCESSOR_CONFIG)
            image_config.setdefault("min_size", 14)
            image_config.setdefault("image_mean", CLIP_MEAN)
            image_config.setdefault("image_std", CLIP_STD)
            if "image_size" not in image_config:
                raise ValueError(f"{path / PREPROCESSOR_CONFIG} has no image_size")
        else:
            image_config = dict(SIGLIP_IMAGE_DEFAULTS)
        for key in ("image_size", "min_size", "image_mean", "image_std", "rescale_factor", "do_normalize"):
            if key in image_config:
                kwargs[key] = image_config.pop(key)
        if num_image_tokens is not None:
            kwargs["num_image_tokens"] = num_image_tokens
        if image_size is not None:
            kwargs["image_size"] = image_size
        return cls(tokenizer, extra_processor_config=processor_config, extra_preprocessor_config=image_config,
                   **kwargs)

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Writes the tokenizer (image tags included) + processor_config.json + preprocessor_config.json.

        The files keep the official keys, so VLChatProcessor / VLMImageProcessor can read them too; the system prompt
        is written only when it differs from the official one (the official loader rejects unknown keys).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(out))
        tokenizer_config = _read_json(out / "tokenizer_config.json")
        if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
            # transformers 5's name for the generic fast tokenizer; transformers 4 knows it by its old name.
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
            _write_json(out / "tokenizer_config.json", tokenizer_config)
        processor_config = {
            "add_special_token": False,
            "ignore_id": -100,
            "image_end_tag": self.image_end_tag,
            "image_gen_tag": self.image_gen_tag,
            "image_start_tag": self.image_start_tag,
            "image_tag": self.image_tag,
            "mask_prompt": True,
            "num_image_tokens": self.num_image_tokens,
            "processor_class": "VLChatProcessor",
            "sft_format": self.sft_format,
            **self._extra_processor_config,
        }
        if self.system_prompt != DEFAULT_SYSTEM_PROMPT:
            processor_config["system_prompt"] = self.system_prompt
        image_config = {
            **self._extra_preprocessor_config,
            "background_color": list(self.background_color),
            "do_normalize": self.do_normalize,
            "image_mean": None if self.image_mean is None else list(self.image_mean),
            "image_processor_type": "VLMImageProcessor",
            "image_size": self.image_size,
            "image_std": None if self.image_std is None else list(self.image_std),
            "min_size": self.min_size,
            "processor_class": "VLChatProcessor",
            "rescale_factor": self.rescale_factor,
        }
        _write_json(out / PROCESSOR_CONFIG, dict(sorted(processor_config.items())))
        _write_json(out / PREPROCESSOR_CONFIG, dict(sorted(image_config.items())))
        return out

    # ---------------------------------------------------------------------------------------------- templates
    def format_conversation(self, conversation: Sequence[Message], system_prompt: str | None = None,
                            with_response: bool = True) -> str:
        """The SFT text of a conversation, exactly `apply_sft_template_for_multi_turn_prompts` (DeepSeek style)."""
        return self._format(conversation, system_prompt, with_response)[0]

    def _format(self, conversation: Sequence[Message], system_prompt: str | None,
                with_response: bool) -> tuple[str, list[tuple[int, int]]]:
        """Returns the text and the character spans [start, end) of each assistant response incl. its closing EOS."""
        messages = self._check_conversation(conversation, with_response)
        system = self.system_prompt if system_prompt is None else system_prompt
        seps = ("\n\n", EOS_TOKEN)  # after a user turn, after an assistant turn
        text = "" if not system else system + seps[0]
        spans = []
        for i, (role, content) in enumerate(messages):
            if content:
                text += role + ": "
                # The response span starts at the space after "Assistant:": DeepSeek's BPE folds it into the first
                # response token (" seven") anyway, and a tokenizer that keeps it apart must learn to emit it too.
                start = len(text) - (1 if role == ASSISTANT else 0)
                text += content + seps[i % 2]
                if role == ASSISTANT:
                    spans.append((start, len(text)))
            else:
                text += role + ":"
        shift = len(text) - len(text.lstrip())  # the official result is .strip()-ed
        text = text.strip()
        return text, [(a - shift, b - shift) for a, b in spans]

    def _check_conversation(self, conversation: Sequence[Message], with_response: bool) -> list[tuple[str, str]]:
        if isinstance(conversation, (str, bytes)) or not conversation:
            raise ValueError("a conversation is a non-empty list of {'role': 'User'|'Assistant', 'content': str}")
        messages = []
        for i, message in enumerate(conversation):
            if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
                raise ValueError(f"message {i} must be a dict with a string 'content', got {message!r}")
            role = message.get("role")
            expected = (USER, ASSISTANT)[i % 2]
            if role != expected:
                raise ValueError(f"message {i} has role {role!r}; roles must alternate 'User', 'Assistant', "
                                 f"starting with 'User'")
            content = message["content"].strip()  # as the official template does
            if role == ASSISTANT and self.image_tag in content:
                raise ValueError(f"message {i}: {self.image_tag} in an assistant turn (images go in user turns)")
            messages.append((role, content))
        if with_response:
            if messages[-1][0] != ASSISTANT:
                raise ValueError("with_response=True needs the conversation to end with an assistant turn")
            empty = [i for i, (role, content) in enumerate(messages) if role == ASSISTANT and not content]
            if empty:
                raise ValueError(f"assistant message(s) {empty} are empty; pass with_response=False for a prompt")
        else:
            if messages[-1][0] == ASSISTANT:
                messages = messages[:-1]
            messages.append((ASSISTANT, ""))
        return messages

    def encode_understanding(self, conversation: Sequence[Message], system_prompt: str | None = None,
                             with_response: bool = True) -> dict[str, Any]:
        """Token ids, loss mask and image slots of a (multi-turn) conversation with images.

        `conversation`: [{"role": "User"|"Assistant", "content": str}, ...], alternating, User first; each
        "<image_placeholder>" in a user turn is one image. `system_prompt` None = the processor's (official) one,
        "" = none. With `with_response=False` the last assistant turn is left empty and the ids end at "Assistant:",
        the official chat prompt. Returns int32 arrays of length S:
          input_ids         BOS first; each image is <begin_of_image>, num_image_tokens x <image_placeholder>,
                            <end_of_image>
          loss_mask         1 where token i is a training target: assistant response tokens and the EOS closing each
                            assistant turn (0 at BOS, prompts, images, templates)
          image_token_mask  1 at each image's <begin_of_image> and placeholder slots (official images_seq_mask)
        and `num_images` (int).
        """
        text, spans = self._format(conversation, system_prompt, with_response)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        for tag, tag_id in ((self.image_start_tag, self.image_start_id), (self.image_end_tag, self.image_end_id)):
            if tag_id in ids:
                raise ValueError(f"the conversation contains {tag}; write images only as {self.image_tag}")
        # A token is a target when its characters overlap a response span (a zero-width token when it lies inside).
        targets = [any(a < end and start < b if start < end else a <= start < b for a, b in spans)
                   for start, end in offsets]

        n = self.num_image_tokens
        input_ids, loss_mask, image_mask = [self.bos_id], [0], [0]
        num_images = 0
        for token, target in zip(ids, targets):
            if token == self.image_id:  # the official add_image_token: the tag is replaced, not kept
                num_images += 1
                input_ids += [self.image_start_id] + [self.image_id] * n + [self.image_end_id]
                loss_mask += [0] * (n + 2)
                image_mask += [1] * (n + 1) + [0]
            else:
                input_ids.append(token)
                loss_mask.append(int(target))
                image_mask.append(0)
        return {"input_ids": np.asarray(input_ids, np.int32), "loss_mask": np.asarray(loss_mask, np.int32),
                "image_token_mask": np.asarray(image_mask, np.int32), "num_images": num_images}

    def chat_prompt(self, question: str, num_images: int = 1, history: Sequence[Message] = (),
                    system_prompt: str | None = None) -> dict[str, Any]:
        """The inference prompt for `question` about `num_images` new images (encode_understanding's dict).

        The images come first in the user turn, one "<image_placeholder>\\n" each, as in the demo
        ("<image_placeholder>\\n{question}"). `history`: earlier completed turns as message dicts (User first, ending
        with an Assistant answer); their images count in `num_images` of the result.
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        history = list(history)
        if history and history[-1].get("role") != ASSISTANT:
            raise ValueError("history must end with an assistant turn")
        turn = {"role": USER, "content": f"{self.image_tag}\n" * num_images + question}
        return self.encode_understanding(history + [turn], system_prompt=system_prompt, with_response=False)

    def encode_generation_prompt(self, prompt: str, template: str = "sft") -> np.ndarray:
        """int32 [L] ids of a text-to-image prompt: BOS + "User: {prompt}\\n\\nAssistant:" ("sft") or BOS + prompt
        ("pretrain", the paper's `<prompt><image>`). No system prompt, and no generation tag: its slot is t_emb's."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the generation prompt is empty")
        if template == "sft":
            text = self.format_conversation([{"role": USER, "content": prompt}], system_prompt="",
                                            with_response=False)
        elif template == "pretrain":
            text = prompt.strip()
        else:
            raise ValueError(f"unknown generation template {template!r}; use 'sft' or 'pretrain'")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray([self.bos_id] + ids, np.int32)

    def encode_text(self, text: str) -> dict[str, np.ndarray]:
        """Text-only data: int32 `input_ids` BOS + text + EOS and `loss_mask` 1 on every token but the first."""
        if not isinstance(text, str) or not text:
            raise ValueError("the text is empty")
        ids = [self.bos_id] + self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]
        loss_mask = np.ones(len(ids), np.int32)
        loss_mask[0] = 0
        return {"input_ids": np.asarray(ids, np.int32), "loss_mask": loss_mask}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of generated ids [S], up to (not including) the first EOS."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode takes one sequence [S], got shape {ids.shape}")
        ids = ids.astype(np.int64).tolist()
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------------- images
    def _understanding_pixels(self, image: Image.Image) -> np.ndarray:
        """VLMImageProcessor.resize: long side to image_size (int() truncation, min_size), bicubic, centred pad."""
        width, height = image.size
        longest = max(width, height)
        new_height = max(int(height / longest * self.image_size), self.min_size)
        new_width = max(int(width / longest * self.image_size), self.min_size)
        if (new_width, new_height) != image.size:  # torchvision returns the image unchanged at equal size
            image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
        pixels = np.asarray(image)
        side = max(new_width, new_height)
        square = np.empty((side, side, 3), np.uint8)
        square[...] = self.background_color
        # expand2square pastes at offset diff // 2 on the short axis.
        top, left = (side - new_height) // 2, (side - new_width) // 2
        square[top:top + new_height, left:left + new_width] = pixels
        return square

    def preprocess_understanding(self, images: Sequence[ImageSource]) -> np.ndarray:
        """float32 [n, image_size, image_size, 3]: the official understanding input (SigLIP's pixels), channels last."""
        single = isinstance(images, np.ndarray) and images.ndim < 4  # one [height, width(, channels)] array
        if single or isinstance(images, (str, os.PathLike, bytes, Image.Image)):
            images = [images]
        out = np.empty((len(images), self.image_size, self.image_size, 3), np.float32)
        for i, image in enumerate(images):
            x = _to_unit_float(self._understanding_pixels(load_image(image)), self.rescale_factor)
            out[i] = _normalize(x, self.image_mean, self.image_std) if self.do_normalize else x
        return out

    def preprocess_generation(self, image: ImageSource, rng: np.random.Generator | None = None) -> np.ndarray:
        """float32 [image_size, image_size, 3] in [-1, 1]: the paper's generation-training crop (short side to
        image_size, random square crop with `rng`, centre crop without). (x / 255 - 0.5) / 0.5 computed as the
        understanding path does, so with mean = std = 0.5 it is also SigLIP's input for the REPA target."""
        crop = resize_short_side_and_crop(load_image(image), self.image_size, rng)
        return _normalize(_to_unit_float(np.asarray(crop), 1.0 / 255.0), (0.5,) * 3, (0.5,) * 3)
