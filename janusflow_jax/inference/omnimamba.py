"""OmniMamba inference: text-to-image VQ codes and understanding chat, each one compiled loop over Mamba's
recurrent state (docs/reference.md §9.1; the release's models/stage2/generation.py `decode`).

Text to image. The 72-token prompt is prefilled (chunked scan) into the conv and SSM states; one `lax.fori_loop`
then writes the 256 image tokens, each decode step feeding the previous token at its position (pos_embed row
72 + i - 1) and sampling from img_head's logits. Returns codes [batch, 16, 16] for the VQ decoder (the towers' job).
Sampling: greedy (temperature 0), else logits / temperature, restricted to the top-k (k > 0) and to the top-p
nucleus (p < 1), drawn with one key per image (`fold_in(key(seed), index)`, then the step), so an image does not
depend on its batch. The release samples with top_k = 1, i.e. greedily, without guidance (the default here).

Classifier-free guidance (optional, `cfg != 1`): rows [conditional; unconditional] where the unconditional prompt
has a caption of [PAD]s (`OmniMambaProcessor.t2i_null_prompt`); logits = u + cfg · (c - u), both rows then fed the
same token. The released weights were never trained with dropped captions (the release's drop-condition path is
broken), so this is an experiment, not the paper's setting.

Understanding. [<|mmu|>, <|soi|>, 729 features, <|eoi|>, <|sot|>, text] is prefilled; a `lax.while_loop` decodes
(mmu_pos_embed row = the position written) until every row has produced <|endoftext|> or `max_new_tokens`. The
position table has 1500 rows and every fed position needs one, so a request whose prompt + answer would pass it is
refused with one ValueError (the release lets decoding run to 2048, past the table). Mamba has no attention mask:
a padded row would compute a different state, so only prompts of equal length share a batch (`chat` groups them).

The whole system (an `inference.load.OmniMambaInference`, what `launch.generate` / `launch.chat` use):
`generate_images` (codes, then the VQ's `decode_codes` to uint8 images) and `image_features` (resize-naive to 384 px,
DINOv2 + SigLIP, the projector) for `chat`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from janusflow_jax.inference.chat import top_p_filter
from janusflow_jax.models.omnimamba import OmniMamba


# -------------------------------------------------------------------------------------------------------- sampling
def sample_tokens(logits, keys, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    """One token per row. logits: [batch, vocab]; keys: [batch] PRNG keys. greedy: argmax. Else logits / temperature,
    top-k (k > 0: ties at the k-th value kept), top-p nucleus (transformers' TopPLogitsWarper), categorical."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        logits = top_p_filter(logits, top_p)
    return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, logits).astype(jnp.int32)


def _check_sampling(temperature: float, top_k: int, top_p: float):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (0 or 1 = off), got {top_p}")


def _static_sampling(temperature, top_k, top_p) -> dict:
    """top_p 0 is "off" as in the release (mamba_ssm's sample: `if top_p > 0.0`), and so is 1."""
    return dict(greedy=float(temperature) == 0.0, top_k=int(top_k), use_top_p=0.0 < float(top_p) < 1.0)


def row_keys(seed: int, indices) -> jax.Array:
    """One key per output (image or answer) index: fold_in(key(seed), index)."""
    key = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))


# --------------------------------------------------------------------------------------------------- text to image
@functools.partial(jax.jit, static_argnames=("model", "guided", "greedy", "top_k", "use_top_p"))
def _t2i_loop(model, params, prompt_ids, null_ids, keys, temperature, top_p, cfg, *, guided: bool, greedy: bool,
              top_k: int, use_top_p: bool):
    b, prompt_length = prompt_ids.shape
    n = model.config.num_image_tokens
    variables = {"params": params}
    rows = jnp.concatenate([prompt_ids, null_ids], axis=0) if guided else prompt_ids
    logits, cache = model.apply(variables, rows, method=OmniMamba.t2i_prefill)

    def pick(step, logits):
        logits = logits.astype(jnp.float32)
        if guided:  # u + cfg (c - u)
            logits = logits[b:] + cfg * (logits[:b] - logits[b:])
        step_keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(keys)
        return sample_tokens(logits, step_keys, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)

    first = pick(0, logits)
    tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(first)

    def step(i, carry):  # feed image token i - 1 at position prompt_length + i - 1; sample token i
        tokens, cache, previous = carry
        feed = jnp.concatenate([previous, previous]) if guided else previous
        logits, cache = model.apply(variables, feed, prompt_length + i - 1, cache, method=OmniMamba.t2i_decode_step)
        token = pick(i, logits)
        return tokens.at[:, i].set(token), cache, token

    tokens, _, _ = jax.lax.fori_loop(1, n, step, (tokens, cache, first))
    return tokens


def generate_image_tokens(model: OmniMamba, params, prompt_ids, *, null_prompt_ids=None, cfg: float = 1.0,
                          temperature: float = 1.0, top_k: int = 1, top_p: float = 1.0, seed: int = 0,
                          indices=None, guided: bool | None = None) -> np.ndarray:
    """Text-to-image codes: int32 [batch, grid, grid] (16 x 16 for the release).

    prompt_ids: [batch, 72] t2i prompts (`OmniMambaProcessor.t2i_prompt`). Defaults are the release's: top_k 1
    (greedy), no guidance. temperature 0 is greedy too; top_k 0 and top_p 0 or 1 switch those filters off.
    cfg: guidance weight; with it, `null_prompt_ids` [batch, 72] (`t2i_null_prompt`) are the unconditional rows.
    guided: run the unconditional branch (default: cfg != 1; True with cfg = 1 computes the conditional result the
    long way). indices: each row's image index for its key (default arange(batch)).
    """
    _check_sampling(temperature, top_k, top_p)
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    config = model.config
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] != config.t2i_prompt_length:
        raise ValueError(f"prompt_ids must be [batch, {config.t2i_prompt_length}], got {tuple(prompt_ids.shape)}")
    guided = float(cfg) != 1.0 if guided is None else bool(guided)
    if guided:
        if null_prompt_ids is None:
            raise ValueError("classifier-free guidance needs null_prompt_ids (OmniMambaProcessor.t2i_null_prompt)")
        null_prompt_ids = jnp.broadcast_to(jnp.asarray(null_prompt_ids, jnp.int32), prompt_ids.shape)
    indices = np.arange(prompt_ids.shape[0]) if indices is None else np.asarray(indices)
    tokens = _t2i_loop(model, params, prompt_ids, null_prompt_ids if guided else None, row_keys(seed, indices),
                       jnp.float32(temperature if temperature > 0 else 1.0), jnp.float32(top_p), jnp.float32(cfg),
                       guided=guided, **_static_sampling(temperature, top_k, top_p))
    return np.asarray(tokens).reshape(-1, config.image_grid, config.image_grid)


def text_to_image_codes(model: OmniMamba, params, processor, prompts: str | Sequence[str], *, images_per_prompt: int = 1,
                        batch_size: int = 8, seed: int = 0, **sampling) -> np.ndarray:
    """Prompts -> codes int32 [len(prompts) * images_per_prompt, grid, grid], prompt-major. Every batch has the same
    shape (the last one filled with repeats and cropped), so the loop compiles once. `sampling`: the keywords of
    `generate_image_tokens` (cfg, temperature, top_k, top_p)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or images_per_prompt < 1 or batch_size < 1:
        raise ValueError("need prompts, images_per_prompt >= 1 and batch_size >= 1")
    if processor.caption_length != model.config.caption_length:
        raise ValueError(f"the processor pads captions to {processor.caption_length} tokens, the model expects "
                         f"{model.config.caption_length}")
    encoded = np.stack([processor.t2i_prompt(p) for p in prompts])
    rows = np.repeat(np.arange(len(prompts)), images_per_prompt)
    batch_size = min(batch_size, len(rows))
    out = []
    for start in range(0, len(rows), batch_size):
        index = np.arange(start, start + batch_size)
        real = index < len(rows)
        index = np.minimum(index, len(rows) - 1)
        null = np.broadcast_to(processor.t2i_null_prompt(), (batch_size, encoded.shape[1]))
        codes = generate_image_tokens(model, params, encoded[rows[index]], null_prompt_ids=null, seed=seed,
                                      indices=index, **sampling)
        out.append(codes[real])
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------------- understanding
@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "greedy", "top_k", "use_top_p"))
def _mmu_loop(model, params, input_ids, image_features, keys, temperature, top_p, *, max_new_tokens: int,
              eos_id: int, greedy: bool, top_k: int, use_top_p: bool):
    b = input_ids.shape[0]
    prompt_length = input_ids.shape[1] + model.config.num_image_features
    variables = {"params": params}
    logits, cache = model.apply(variables, input_ids, image_features, method=OmniMamba.mmu_prefill)

    def pick(step, logits):
        step_keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(keys)
        return sample_tokens(logits, step_keys, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)

    first = pick(0, logits)
    tokens = jnp.full((b, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)

    def not_finished(carry):
        step, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def step_fn(carry):  # feed token step - 1 at position prompt_length + step - 1
        step, token, cache, done, tokens = carry
        logits, cache = model.apply(variables, token, prompt_length + step - 1, cache,
                                    method=OmniMamba.mmu_decode_step)
        new = jnp.where(done, eos_id, pick(step, logits))  # a finished row only pads
        return step + 1, new, cache, done | (new == eos_id), tokens.at[:, step].set(new)

    *_, tokens = jax.lax.while_loop(not_finished, step_fn, (jnp.int32(1), first, cache, first == eos_id, tokens))
    lengths = jnp.where(jnp.any(tokens == eos_id, axis=1), jnp.argmax(tokens == eos_id, axis=1), max_new_tokens)
    return tokens, lengths


def max_answer_tokens(config, prompt_ids_length: int) -> int:
    """How many tokens an answer may have after `prompt_ids_length` mmu ids: every position fed (the prompt with
    its image features, then all answer tokens but the last) needs a row of mmu_pos_embed."""
    return config.mmu_pos_embed_rows - (prompt_ids_length + config.num_image_features) + 1


def generate_text(model: OmniMamba, params, input_ids, image_features=None, *, eos_id: int, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  indices=None) -> tuple[np.ndarray, np.ndarray]:
    """Understanding: prefill + compiled decoding of up to `max_new_tokens` tokens per row.

    input_ids: [batch, S] mmu ids (`OmniMambaProcessor.mmu_prompt`, rows of one length); image_features:
    [batch, F, d] after the projector, or None (the release's text-only zeros). Greedy at temperature 0 (the
    release's setting), else temperature / top-k / top-p sampling, one key per row (`indices`). Raises ValueError
    when prompt + answer would pass the mmu position table. Returns (tokens int32 [batch, max_new_tokens], lengths
    [batch]): row i's answer is tokens[i, :lengths[i]], <|endoftext|> excluded and repeated after it.
    """
    _check_sampling(temperature, top_k, top_p)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    config = model.config
    room = max_answer_tokens(config, input_ids.shape[1])
    if int(max_new_tokens) < 1 or int(max_new_tokens) > room:
        raise ValueError(f"an answer of {max_new_tokens} tokens after a prompt of {input_ids.shape[1]} ids + "
                         f"{config.num_image_features} image features does not fit the {config.mmu_pos_embed_rows}-row "
                         f"mmu position table (at most {max(room, 0)} tokens fit; at least 1 is needed)")
    if image_features is not None:
        image_features = jnp.asarray(image_features, config.compute_dtype)
        want = (input_ids.shape[0], config.num_image_features, config.d_model)
        if tuple(image_features.shape) != want:
            raise ValueError(f"image_features must be {list(want)}, got {list(image_features.shape)}")
    indices = np.arange(input_ids.shape[0]) if indices is None else np.asarray(indices)
    tokens, lengths = _mmu_loop(model, params, input_ids, image_features, row_keys(seed, indices),
                                jnp.float32(temperature if temperature > 0 else 1.0), jnp.float32(top_p),
                                max_new_tokens=int(max_new_tokens), eos_id=int(eos_id),
                                **_static_sampling(temperature, top_k, top_p))
    return np.asarray(tokens), np.asarray(lengths)


def chat(model: OmniMamba, params, processor, questions: str | Sequence[str], image_features=None, *,
         history=(), max_new_tokens: int | None = None, template: str | None = None, temperature: float = 0.0,
         top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Answers each question about one image (or none). image_features: [F, d] (after the projector) or None.
    history: earlier (question, answer) turns, shared by every question. max_new_tokens: None = as many as the
    position table leaves; a larger number is refused. Questions whose prompts have the same length share a batch
    (Mamba has no padding mask). Greedy by default."""
    questions = [questions] if isinstance(questions, str) else list(questions)
    if not questions:
        raise ValueError("no questions given")
    prompts = [processor.mmu_prompt(q, history, template) for q in questions]
    if processor.vocab_size > model.config.text_vocab_size:
        raise ValueError(f"the tokenizer has {processor.vocab_size} ids but the model's text embedding only "
                         f"{model.config.text_vocab_size}: tokenizer and weights do not belong together")
    answers: list[str | None] = [None] * len(questions)
    for length in sorted({len(p) for p in prompts}):
        group = [i for i, p in enumerate(prompts) if len(p) == length]
        features = None if image_features is None else np.broadcast_to(
            np.asarray(image_features), (len(group), *np.shape(image_features)))
        budget = max_answer_tokens(model.config, length) if max_new_tokens is None else max_new_tokens
        tokens, lengths = generate_text(model, params, np.stack([prompts[i] for i in group]), features,
                                        eos_id=processor.eos_id, max_new_tokens=budget, temperature=temperature,
                                        top_k=top_k, top_p=top_p, seed=seed, indices=group)
        for i, row, n in zip(group, tokens, lengths):
            answers[i] = processor.decode(row[:n])
    return answers


# ---------------------------------------------------------------------------------------- the whole system (CLIs)
# `loaded` below is an `inference.load.OmniMambaInference`: the LM, processor, tower, projector and VQ of one
# checkpoint.
def resize_naive(image, size: int) -> np.ndarray:
    """Prismatic's "resize-naive" (OmniMamba's image transform): an RGB PIL image resized to size x size, bicubic
    (the timm data configs' interpolation; no crop, no padding), as float32 [size, size, 3] in [0, 1] (ToTensor).
    The backbones' normalisations are `DinoSigLIP`'s."""
    from PIL import Image

    resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(resized, np.float32) / 255.0


@functools.partial(jax.jit, static_argnames=("vision", "projector"))
def _features(vision, projector, vision_params, projector_params, pixels):
    return projector.apply({"params": projector_params}, vision.apply({"params": vision_params}, pixels))


def image_features(loaded, image) -> np.ndarray:
    """One PIL image -> its understanding features [F, d] (729 x 2048 for the release): resize-naive to the tower's
    side, DINOv2 + SigLIP (second-to-last blocks, concatenated), the projector."""
    pixels = resize_naive(image, loaded.config.vision.image_size)[None]
    return np.asarray(_features(loaded.vision, loaded.projector, loaded.vision_params, loaded.projector_params,
                                jnp.asarray(pixels)))[0]


@functools.partial(jax.jit, static_argnames=("vq",))
def _decode(vq, vq_params, codes):
    from janusflow_jax.models.vq import VQModel

    return vq.apply({"params": vq_params}, codes, method=VQModel.decode_codes)


def decode_images(loaded, codes, batch_size: int = 8) -> np.ndarray:
    """VQ codes [n, grid, grid] -> uint8 images [n, side, side, 3] (256 x 256 for the release): `decode_codes`, then
    clipped to [-1, 1] and mapped to [0, 255] (the release's make_grid(normalize=True, value_range=(-1, 1))). Batches
    of one shape (the last filled with repeats), so the decoder compiles once."""
    from janusflow_jax.inference.sampler import to_uint8

    codes = np.asarray(codes, np.int32)
    batch_size = max(1, min(batch_size, len(codes)))
    out = []
    for start in range(0, len(codes), batch_size):
        index = np.minimum(np.arange(start, start + batch_size), len(codes) - 1)
        images = to_uint8(_decode(loaded.vq, loaded.vq_params, jnp.asarray(codes[index])))
        out.append(images[:min(batch_size, len(codes) - start)])
    return np.concatenate(out)


def generate_images(loaded, prompts: Sequence[str], *, images_per_prompt: int = 1, batch_size: int = 8,
                    seed: int = 0, **sampling) -> np.ndarray:
    """Prompts -> uint8 images [len(prompts) * images_per_prompt, side, side, 3], prompt-major: the LM writes the VQ
    codes (`text_to_image_codes`; `sampling`: cfg, temperature, top_k, top_p), the VQ decodes them."""
    codes = text_to_image_codes(loaded.model, loaded.params, loaded.processor, prompts,
                                images_per_prompt=images_per_prompt, batch_size=batch_size, seed=seed, **sampling)
    return decode_images(loaded, codes, batch_size)
