"""Chat about an image: one answer per --question, or an interactive conversation with history.

  python -m launch.chat --checkpoint=CKPT --image=photo.jpg --question="What is in the picture?"
  python -m launch.chat --checkpoint=CKPT --image=photo.jpg          # interactive: one question per line,
                                                                      # until end of input or "exit"
CKPT: an official JanusFlow directory (config.json + model.safetensors + tokenizer files) or an orbax checkpoint
written by `launch.convert --to=jax`. Several --question flags are answered in one batch; several --image flags put
all images before the (first) question. Greedy decoding unless --temperature > 0 (then top-p sampling).
--system_prompt replaces the checkpoint's system prompt (--system_prompt= for none, as the benchmarks run).

OmniMamba (CKPT an OmniMamba release directory or our checkpoint of it; the family is read from CKPT): the same
flags. At most one --image: resized to 384 x 384 without cropping (Cobra's "resize-naive"), read by DINOv2 + SigLIP
and projected into the LM; no --image asks about nothing (the release's text-only zeros). Answers follow the
training template ("In: ...\nOut: ") and stop at <|endoftext|>.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from launch import config_cli

# allow_override: launch.convert/generate/chat define some of the same flags (--checkpoint, --out, --seed,
# --dtype) with the same meaning; one process (the test suite) may import all of them.
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Official JanusFlow directory or orbax checkpoint root.",
                                  allow_override=True)
_IMAGE = flags.DEFINE_multi_string("image", [], "Image file (repeat the flag for several; none = text only).")
_QUESTION = flags.DEFINE_multi_string("question", [], "Question (repeat for several; none = interactive).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 512, "Answer length limit in tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.", allow_override=True)
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass (with --temperature > 0).", allow_override=True)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", allow_override=True)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the checkpoint's).",
                           allow_override=True)
# allow_override: launch.evaluate defines --system_prompt too (same type and default).
_SYSTEM_PROMPT = flags.DEFINE_string("system_prompt", None, "System prompt (default: the checkpoint's processor "
                                     "config, the official one for the release; --system_prompt= for none).",
                                     allow_override=True)

EXIT_WORDS = ("exit", "quit")


def interactive(loaded, images, options, stdin=None, stdout=None) -> int:
    """Reads one question per line until end of input or "exit"; each answer sees the whole conversation."""
    from janusflow_jax.inference import chat

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tty = stdin.isatty()
    history, shown, turn = [], 0, 0
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            break
        question = line.strip()
        if not question:
            continue
        if question.lower() in EXIT_WORDS:
            break
        (answer,) = chat.chat(loaded.model, loaded.params, loaded.processor, images, question, history=history,
                              **dict(options, seed=options["seed"] + turn))
        print(answer, file=stdout, flush=True)
        history = chat.add_turn(loaded.processor, history, question, answer, num_images=len(images) - shown)
        shown, turn = len(images), turn + 1
    return 0


def chat_omnimamba(checkpoint: str, images, options) -> int:
    """Answers --question (or an interactive conversation) with an OmniMamba checkpoint; prints like `main`."""
    from janusflow_jax.inference import load as inference
    from janusflow_jax.inference import omnimamba

    options = dict(options)
    if options.pop("system_prompt", None) is not None:
        raise ValueError("--system_prompt is a JanusFlow option: OmniMamba's training template has no system prompt")
    if len(images) > 1:
        raise ValueError(f"OmniMamba reads one image per conversation; got {len(images)} --image flags")
    loaded = inference.load_omnimamba(checkpoint, dtype=_DTYPE.value)
    features = omnimamba.image_features(loaded, images[0]) if images else None

    def answer(questions, history=(), turn=0):
        return omnimamba.chat(loaded.model, loaded.params, loaded.processor, questions, features, history=history,
                              **dict(options, seed=options["seed"] + turn))

    if not _QUESTION.value:
        return converse(answer)
    answers = answer(_QUESTION.value)
    for question, text in zip(_QUESTION.value, answers):
        print(text if len(answers) == 1 else f"Q: {question}\nA: {text}\n")
    return 0


def converse(answer, stdin=None, stdout=None) -> int:
    """OmniMamba's interactive loop (as `interactive`): answer(questions, history, turn) sees every earlier turn."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history = []
    while True:
        if stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            return 0
        question = line.strip()
        if not question:
            continue
        if question.lower() in EXIT_WORDS:
            return 0
        (text,) = answer(question, history, len(history))
        print(text, file=stdout, flush=True)
        history.append((question, text))


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CHECKPOINT.value is None:
        raise app.UsageError("--checkpoint is required")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every restore step at INFO
        logging.set_verbosity(logging.WARNING)
    from janusflow_jax import paths
    from janusflow_jax.inference import chat
    from janusflow_jax.inference import load as inference

    options = dict(max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                   seed=_SEED.value, system_prompt=_SYSTEM_PROMPT.value)
    try:
        from janusflow_jax.data.processor import load_image

        # An unreadable image or an unreachable bucket fails before the weights load.
        paths.check_access(_CHECKPOINT.value, *_IMAGE.value)
        images = [load_image(paths.resolve(path)) for path in _IMAGE.value]
        if inference.checkpoint_family(paths.resolve(_CHECKPOINT.value)) == "omnimamba":
            return chat_omnimamba(paths.resolve(_CHECKPOINT.value), images, options)
        loaded = inference.load(paths.resolve(_CHECKPOINT.value), dtype=_DTYPE.value)
        if not _QUESTION.value:
            return interactive(loaded, images, options)
        answers = chat.chat(loaded.model, loaded.params, loaded.processor, images, _QUESTION.value, **options)
    except inference.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for question, answer in zip(_QUESTION.value, answers):
        print(answer if len(answers) == 1 else f"Q: {question}\nA: {answer}\n")
    return 0


if __name__ == "__main__":
    config_cli.run(main)
