"""Image understanding as chat: autoregressive answers from the LLM over SigLIP image tokens (paper §3.1).

The official flow (demo/app_janusflow.py; docs/reference.md §6): the processor builds
"{system}\\n\\nUser: <image>\\n{question}\\n\\nAssistant:" with each image expanded to <begin_of_image>, 576 slots,
<end_of_image>; several conversations are left-padded into one batch; `language_model.generate` then decodes greedily
(temperature 0) or samples with temperature and top-p, stopping at EOS or after `max_new_tokens`.

Here the prompt is prefilled once into a KV cache and the decode loop is one `lax.while_loop` inside one jit (no
Python round trip per token). Positions follow transformers' generate: each row counts from its first real token
(cumsum of the attention mask - 1), so a left-padded row decodes exactly as it would alone.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from janusflow_jax.models import llama
from janusflow_jax.models import janusflow as model_lib
from janusflow_jax.models.janusflow import JanusFlow
from janusflow_jax.data.processor import load_image
from janusflow_jax.inference.sampler import PromptTooLongError, left_pad

# Prompts are left-padded up to a multiple of this, so an interactive session recompiles only every few turns.
LENGTH_BUCKET = 64


def top_p_filter(logits, top_p):
    """Nucleus filtering: keeps the smallest set of most likely tokens whose probability reaches `top_p` (always at
    least the most likely one), as transformers' TopPLogitsWarper; the others get -inf. logits: [batch, vocab]."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    order = jnp.argsort(-probs, axis=-1)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    # A token is kept when the mass of the strictly more likely tokens is still below top_p.
    keep_sorted = (jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
    keep_sorted = keep_sorted.at[:, 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def next_token(logits, rng, temperature, top_p, sample: bool):
    """Greedy (sample=False) or temperature + top-p sampling of one token per row. logits: [batch, vocab]."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    return jax.random.categorical(rng, top_p_filter(scaled, top_p), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sample", "eos_id"))
def _generate(model, params, input_ids, attention_mask, pixel_values, image_token_mask, rng, temperature, top_p, *,
              max_new_tokens: int, sample: bool, eos_id: int):
    # max_new_tokens is static: it sizes the KV cache and the output buffer. temperature/top_p are traced (no
    # recompilation when a user moves a slider); whether to sample at all is static (greedy skips the vocab sort).
    b, s = input_ids.shape
    variables = {"params": params}
    cache = llama.init_cache(model.config.llm, b, s + max_new_tokens, model.config.compute_dtype)
    # Cache slots past the one being written are hidden by the causal mask, so the generated part is all ones.
    mask = jnp.concatenate([attention_mask, jnp.ones((b, max_new_tokens), attention_mask.dtype)], axis=1)
    positions = model_lib.prompt_positions(attention_mask)
    logits, cache = model.apply(variables, input_ids, pixel_values, image_token_mask, mask, positions, cache, 0,
                                method=JanusFlow.understand)
    first = next_token(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_p, sample)
    tokens = jnp.full((b, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)
    next_position = positions[:, -1] + 1

    def not_finished(carry):
        step, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_step(carry):
        step, token, cache, done, tokens = carry
        # Feed token `step - 1` at cache slot s + step - 1; its logits give token `step`.
        logits, cache = model.apply(variables, token[:, None], None, None, mask,
                                    (next_position + step - 1)[:, None], cache, s + step - 1,
                                    method=JanusFlow.understand)
        new = next_token(logits[:, -1], jax.random.fold_in(rng, step), temperature, top_p, sample)
        new = jnp.where(done, eos_id, new)  # a finished row only pads with EOS
        tokens = tokens.at[:, step].set(new)
        return step + 1, new, cache, done | (new == eos_id), tokens

    carry = (jnp.int32(1), first, cache, first == eos_id, tokens)
    *_, tokens = jax.lax.while_loop(not_finished, decode_step, carry)
    lengths = jnp.where(jnp.any(tokens == eos_id, axis=1), jnp.argmax(tokens == eos_id, axis=1), max_new_tokens)
    return tokens, lengths


def generate_tokens(model: JanusFlow, params, input_ids, attention_mask, pixel_values=None, image_token_mask=None, *,
                    eos_id: int, max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 0.95,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prefill + compiled decoding of up to `max_new_tokens` tokens per row.

    input_ids/attention_mask: [batch, S] (left padding allowed; 1 = real token); pixel_values: [batch, n_images,
    size, size, 3] or [batch, size, size, 3] (official preprocessing), or None for text only; image_token_mask:
    [batch, S], True at each image's 1 + num_patches slots. temperature 0 = greedy; otherwise tokens are drawn from
    softmax(logits / temperature) restricted to the top-p nucleus. Rows stop at `eos_id`.
    Returns (tokens int32 [batch, max_new_tokens], lengths int32 [batch]): row i's answer is tokens[i, :lengths[i]]
    (EOS excluded); everything after it is `eos_id`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if pixel_values is not None:
        pixel_values = jnp.asarray(pixel_values, model.config.compute_dtype)
        image_token_mask = jnp.asarray(image_token_mask, bool)
    sample = temperature > 0
    tokens, lengths = _generate(model, params, input_ids, attention_mask, pixel_values, image_token_mask,
                                jax.random.key(seed), jnp.float32(temperature if sample else 1.0),
                                jnp.float32(top_p), max_new_tokens=int(max_new_tokens), sample=sample,
                                eos_id=int(eos_id))
    return np.asarray(tokens), np.asarray(lengths)


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def add_turn(processor, history, question: str, answer: str, num_images: int = 0) -> list[dict]:
    """history + one completed turn, in the message form `processor.chat_prompt` takes: the user message carries
    `num_images` image placeholders before the question, as `chat_prompt` lays out a new turn."""
    user = {"role": "User", "content": f"{processor.image_tag}\n" * num_images + question}
    return [*(history or ()), user, {"role": "Assistant", "content": answer}]


def images_in(processor, history) -> int:
    """Number of images already placed in a history (image placeholders in its user turns)."""
    return sum(m["content"].count(processor.image_tag) for m in history or () if m.get("role") == "User")


def chat(model: JanusFlow, params, processor, images, questions: str | Sequence[str], *, max_new_tokens: int = 512,
         temperature: float = 0.0, top_p: float = 0.95, seed: int = 0, history=None, system_prompt: str | None = None,
         row_images: Sequence[Sequence] | None = None, pad_to: int | None = None) -> list[str]:
    """Answers each question about the same image(s), or each about its own (`row_images`); one batch row per
    question, one answer each.

    images: every image of the conversation (paths, encoded bytes, PIL images or uint8 arrays), in order; [] for text
    only. Those not yet placed in `history` go before the new question ("<image_placeholder>\n" each, as the demo).
    Official preprocessing: long side resized, padded to square, normalised.
    questions: a string or a list of strings, left-padded into one batch.
    history: earlier turns as message dicts [{"role": "User", "content": ...}, {"role": "Assistant", ...}, ...],
    shared by every row (`add_turn` appends one); None for a fresh conversation.
    system_prompt: None = the processor's (the official one for the release); "" = none (benchmark protocols).
    row_images: one image list per question, for batches whose rows carry different images (benchmarks); `images`
    and `history` must then be empty. A row's images go before its question, one "<image_placeholder>\n" each, unless
    the question already holds a placeholder per image (an interleaved layout such as VLMEvalKit's
    "<image_placeholder><image_placeholder>\n..."); rows with fewer images than others get zero images that fill
    no slot.
    pad_to: left-pad every row to this many tokens (at least the longest prompt), so that batches of different
    prompts share one compilation and a row's numbers do not depend on its batch mates' lengths.
    The answer budget is `max_new_tokens`, capped so that prompt + answer fit the context. Greedy at temperature 0,
    else temperature + top-p sampling from `seed`. Raises PromptTooLongError when a prompt alone fills the context,
    ImageError for an unreadable image.
    """
    questions = _as_list(questions)
    if not questions:
        raise ValueError("no questions given")
    history = list(history or ())
    if row_images is not None:
        if _as_list(images) or history:
            raise ValueError("row_images gives each question its own images: pass no shared images and no history")
        if len(row_images) != len(questions):
            raise ValueError(f"row_images has {len(row_images)} entries for {len(questions)} questions")
        per_row = [[load_image(im) for im in _as_list(row)] for row in row_images]
        prompts = []
        for question, row in zip(questions, per_row):
            placed = question.count(processor.image_tag)
            if placed not in (0, len(row)):
                raise ValueError(f"a question holds {placed} image placeholders for its {len(row)} images")
            prompts.append(processor.chat_prompt(question, num_images=len(row) - placed, system_prompt=system_prompt))
    else:
        images = [load_image(im) for im in _as_list(images)]
        new_images = len(images) - images_in(processor, history)
        if new_images < 0:
            raise ValueError(f"the history shows {images_in(processor, history)} images but only {len(images)} were "
                             f"given")
        prompts = [processor.chat_prompt(q, num_images=new_images, history=history, system_prompt=system_prompt)
                   for q in questions]
    config = model.config
    context = config.llm.max_position_embeddings
    longest = max(len(p["input_ids"]) for p in prompts)
    if pad_to is not None and pad_to < longest:
        raise ValueError(f"pad_to {pad_to} is shorter than the longest prompt ({longest} tokens)")
    if max(longest, pad_to or 0) >= context:
        raise PromptTooLongError(f"the conversation is {max(longest, pad_to or 0)} tokens; the context holds "
                                 f"{context} (at least one position must be left for the answer)")
    if pad_to is not None:
        length = int(pad_to)
        max_new_tokens = min(int(max_new_tokens), context - length)
    else:
        max_new_tokens = min(int(max_new_tokens), context - longest)
        # Bucketed length: a longer left padding changes nothing (positions count from each row's BOS) and saves
        # recompiling for every prompt length.
        length = min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, context - max_new_tokens)
    ids, mask = left_pad([np.asarray(p["input_ids"], np.int32) for p in prompts], processor.pad_id, length)
    pixel_values = image_token_mask = None
    if row_images is not None:
        most = max(len(row) for row in per_row)
        if most:
            size = processor.image_size
            pixel_values = np.zeros((len(prompts), most, size, size, 3), np.float32)
            for i, row in enumerate(per_row):
                if row:
                    pixel_values[i, :len(row)] = processor.preprocess_understanding(row)
    elif images:
        pixels = np.asarray(processor.preprocess_understanding(images), np.float32)  # [n_images, S, S, 3]
        pixel_values = np.broadcast_to(pixels[None], (len(prompts), *pixels.shape))
    if pixel_values is not None:
        image_token_mask, _ = left_pad([np.asarray(p["image_token_mask"], np.int32) for p in prompts], 0, length)
    tokens, lengths = generate_tokens(model, params, ids, mask, pixel_values, image_token_mask,
                                      eos_id=processor.eos_id, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, seed=seed)
    return [processor.decode(row[:n], skip_special_tokens=True) for row, n in zip(tokens, lengths)]
