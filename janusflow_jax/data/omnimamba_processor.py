"""OmniMamba's text side: the gpt-neox-20b tokenizer plus the release's added tokens, the t2i prompt and the
understanding (mmu) id layouts and both prompt templates (docs/reference.md §9.1; models/cobra/prompting_utils.py,
util/llava_instruct_data.py, scripts/inference_{t2i,mmu}.py of hustvl/OmniMamba).

Token ids. The release loads EleutherAI/gpt-neox-20b (50277 ids; "<|endoftext|>" = 0 is BOS, EOS and UNK, and no
BOS is prepended) and then, in this order, sets the pad token "[PAD]" (a new special token: id 50277) and adds
"<|soi|>", "<|eoi|>", "<|sot|>", "<|eot|>", "<|t2i|>", "<|mmu|>", "<|soc|>", "<|eoc|>", "<|lvg|>" as plain added
tokens (50278 .. 50286): all inside the 50288 rows of the text embedding (50277 padded to a multiple of 16).
`OmniMambaProcessor` adds them the same way, only where the tokenizer lacks them, so a saved processor keeps its ids.

Text-to-image prompt (72 ids): [<|t2i|>, <|sot|>, caption, <|eot|>, <|soi|>], the caption's first 68 tokens,
left-padded with [PAD] (scripts/inference_t2i.py). The classifier-free-guidance branch uses the same layout with a
caption of 68 [PAD]s (`t2i_null_prompt`); the release never trained that branch (§9.1: its drop-condition code path
is broken), so guided sampling with the released weights is an experiment, not the paper's setting.

Understanding ids: [<|mmu|>, <|soi|>, <|eoi|>, <|sot|>, text ...]; the model splices the 729 image features in after
the first two ids. Two templates for the text:
  * "training" (the default, used by `chat`): Cobra's MambaPromptBuilder as the stage-2 data code applies it. Each
    turn is tokenized on its own and the pieces concatenated: "In: {question}\\nOut: " (later questions start with
    "\\n"), each earlier answer "{answer}<|endoftext|>". The weights were trained on exactly these ids, and answers end
    with <|endoftext|>, where decoding stops.
  * "release": the release's inference script, LLaVA's SeparatorStyle.TWO with roles USER/ASSISTANT:
    "{system} USER: {q1} ASSISTANT: {a1}<|endoftext|>USER: {q2} ASSISTANT:", stripped, tokenized whole. It differs
    from training (a mismatch in the release), and its system prompt comes from util/conversation.py, a file the
    release does not ship: `system_prompt` defaults to none.
Nothing here needs JAX or PyTorch.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Sequence

import numpy as np
from etils import epath

from janusflow_jax import paths

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "[PAD]"
SPECIAL_TOKENS = ("<|soi|>", "<|eoi|>", "<|sot|>", "<|eot|>", "<|t2i|>", "<|mmu|>", "<|soc|>", "<|eoc|>", "<|lvg|>")
TEMPLATES = ("training", "release")
PROCESSOR_CONFIG = "omnimamba_processor.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", PROCESSOR_CONFIG)

Turn = tuple[str, str]  # (question, answer) of an earlier turn


def make_tokenizer(out_dir: str | os.PathLike, words: Sequence[str]) -> epath.Path:
    """Writes a tiny word-level tokenizer laid out like gpt-neox-20b's: "<|endoftext|>" is id 0 and the BOS, EOS and
    UNK token; no BOS is prepended; every word, single whitespace character and other character is one piece (so
    decoding is concatenation). Base vocabulary: "<|endoftext|>", space, newline, the ASCII punctuation, "In", "Out",
    "USER", "ASSISTANT", then the pieces of `words`. No [PAD] and no OmniMamba tokens: the processor adds them.
    Returns `out_dir`."""
    import string

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    pieces = r"\w+|\s|[^\w\s]"
    base = [EOS_TOKEN, " ", "\n", *string.punctuation, "In", "Out", "USER", "ASSISTANT"]
    for word in words:
        base += [p for p in re.findall(pieces, word) if not p.isspace()]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(base))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pieces), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tokenizer.to_str())
    config = {"add_bos_token": False, "add_eos_token": False, "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN,
              "unk_token": EOS_TOKEN, "clean_up_tokenization_spaces": False, "model_max_length": 2048,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def conversation_pieces(turns: Sequence[tuple[str, str | None]]) -> list[tuple[str, bool]]:
    """Cobra's MambaPromptBuilder (the release's training template): (text, is_answer) per message, each tokenized
    on its own: "In: {question}\nOut: " (later questions start with "\n"), "{answer}<|endoftext|>" (an empty answer
    a space); "<image>" removed and whitespace stripped as it does. A None answer ends the pieces after its question."""
    pieces = []
    for i, (q, a) in enumerate(turns):
        pieces.append((("\n" if i else "") + f"In: {q.replace('<image>', '').strip()}\nOut: ", False))
        if a is None:
            break
        a = a.replace("<image>", "").strip()
        pieces.append((f"{a if a else ' '}{EOS_TOKEN}", True))
    return pieces


class OmniMambaProcessor:
    """Tokenizer + OmniMamba's id layouts. Attributes: `tokenizer`, `eos_id`, `pad_id`, `token_ids` (each of
    SPECIAL_TOKENS -> id), `vocab_size` (len(tokenizer)), `caption_length`, `template`, `system_prompt`."""

    def __init__(self, tokenizer, *, caption_length: int = 68, template: str = "training", system_prompt: str = ""):
        if template not in TEMPLATES:
            raise ValueError(f"template {template!r} not in {TEMPLATES}")
        if caption_length < 1:
            raise ValueError(f"caption_length must be >= 1, got {caption_length}")
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        # The release's order: the pad token first, then the nine task / marker tokens (UniversalPrompting).
        if PAD_TOKEN not in vocab:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        tokenizer.pad_token = PAD_TOKEN
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            tokenizer.add_tokens(missing)
        vocab = tokenizer.get_vocab()
        if EOS_TOKEN not in vocab:
            raise ValueError(f"the tokenizer has no {EOS_TOKEN} (OmniMamba uses gpt-neox-20b's)")
        self.eos_id, self.pad_id = vocab[EOS_TOKEN], vocab[PAD_TOKEN]
        self.token_ids = {t: vocab[t] for t in SPECIAL_TOKENS}
        self.vocab_size = len(tokenizer)
        self.caption_length, self.template, self.system_prompt = int(caption_length), template, system_prompt

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "OmniMambaProcessor":
        """tokenizer.json (+ tokenizer_config.json) from a local directory, e.g. a copy of gpt-neox-20b's; settings
        from omnimamba_processor.json when present, then `overrides`."""
        from transformers import PreTrainedTokenizerFast

        path = epath.Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json (gpt-neox-20b's tokenizer files are needed)")
        settings = json.loads((path / PROCESSOR_CONFIG).read_text()) if (path / PROCESSOR_CONFIG).is_file() else {}
        settings.update(overrides)
        with tempfile.TemporaryDirectory(prefix="omnimamba-tokenizer-") as tmp:
            local = path
            if paths.is_remote(path):  # transformers reads local files: the tokenizer files only (not the weights)
                local = epath.Path(tmp)
                for name in TOKENIZER_FILES:
                    if (path / name).is_file():
                        paths.copy_file(path / name, local / name)
            return cls(PreTrainedTokenizerFast.from_pretrained(os.fspath(local)), **settings)

    def save_pretrained(self, out_dir: str | os.PathLike) -> epath.Path:
        out = epath.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="omnimamba-tokenizer-") as tmp:  # transformers writes local files
            self.tokenizer.save_pretrained(tmp)
            settings = {"caption_length": self.caption_length, "template": self.template,
                        "system_prompt": self.system_prompt}
            (epath.Path(tmp) / PROCESSOR_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
            paths.upload_tree(tmp, out)
        return out

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------------------------------- text-to-image
    def encode_caption(self, prompt: str) -> np.ndarray:
        """int32 [caption_length]: the prompt's first caption_length tokens, left-padded with [PAD]."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        ids = self._ids(prompt)[:self.caption_length]
        out = np.full(self.caption_length, self.pad_id, np.int32)
        out[self.caption_length - len(ids):] = ids
        return out

    def _t2i_layout(self, caption: np.ndarray) -> np.ndarray:
        t = self.token_ids
        return np.concatenate([[t["<|t2i|>"], t["<|sot|>"]], caption, [t["<|eot|>"], t["<|soi|>"]]]).astype(np.int32)

    def t2i_prompt(self, prompt: str) -> np.ndarray:
        """int32 [caption_length + 4]: [<|t2i|>, <|sot|>, caption, <|eot|>, <|soi|>]."""
        return self._t2i_layout(self.encode_caption(prompt))

    def t2i_null_prompt(self) -> np.ndarray:
        """The unconditional prompt for classifier-free guidance: the t2i layout around a caption of [PAD]s."""
        return self._t2i_layout(np.full(self.caption_length, self.pad_id, np.int32))

    # ------------------------------------------------------------------------------------------- understanding
    def format_chat(self, question: str, history: Sequence[Turn] = (), template: str | None = None) -> list[str]:
        """The text pieces of a chat prompt, each tokenized on its own ("training": one per turn, as the training
        data; "release": one string)."""
        template = template or self.template
        turns = [*((q, a) for q, a in history), (question, None)]
        for q, a in turns:
            if not isinstance(q, str) or not q.strip():
                raise ValueError("a question is empty")
            if a is not None and not isinstance(a, str):
                raise ValueError(f"an answer must be a string, got {a!r}")
        if template == "training":
            return [text for text, _ in conversation_pieces(turns)]
        if template == "release":
            text = self.system_prompt + " "
            for q, a in turns:
                text += f"USER: {q.strip()} ASSISTANT:" + ("" if a is None else f" {a.strip()}{EOS_TOKEN}")
            return [text.strip()]
        raise ValueError(f"template {template!r} not in {TEMPLATES}")

    def mmu_prompt(self, question: str, history: Sequence[Turn] = (), template: str | None = None) -> np.ndarray:
        """int32 [4 + T]: [<|mmu|>, <|soi|>, <|eoi|>, <|sot|>] + the chat prompt's ids; the image features go after
        the first two. history: earlier (question, answer) turns about the same image."""
        t = self.token_ids
        text = [i for piece in self.format_chat(question, history, template) for i in self._ids(piece)]
        return np.asarray([t["<|mmu|>"], t["<|soi|>"], t["<|eoi|>"], t["<|sot|>"], *text], np.int32)

    def decode(self, ids) -> str:
        """Text of generated ids [S], up to (not including) the first <|endoftext|>."""
        ids = np.asarray(ids).astype(np.int64).tolist()
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)
