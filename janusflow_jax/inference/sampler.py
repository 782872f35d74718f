"""Text-to-image sampling: Euler integration of the rectified-flow ODE with classifier-free guidance (paper §3.2).

The official procedure (demo/app_janusflow.py; docs/reference.md §5): the prompt is BOS + "User: {p}\\n\\nAssistant:" with
the generation tag dropped (t_emb takes its slot). Rows [0, B) are conditional, rows [B, 2B) unconditional: BOS kept,
every other prompt token masked, RoPE positions unchanged. At each of `steps` Euler steps, t = step / steps (0 = noise)
and

    v = w * v_cond - (w - 1) * v_uncond,        z <- z + v / steps.

Differences from the reference, all deliberate:
  * the prompt's keys/values (both branches) are computed once and reused at every step, so only t_emb and the latent
    tokens run through the LLM per step. Attention is causal, so this is the same function; the official code meant to
    do this but, through an empty-list bug, recomputes the whole sequence every step (docs/reference.md §5, §10.13);
  * t is fed in fp32 unless `reference_t_rounding` (the reference rounds 1000 t to bfloat16: 966.67 -> 968);
  * z and dt stay fp32 (the reference keeps them in bfloat16 on CUDA);
  * w = 1 runs no unconditional branch (the reference runs it and multiplies it by 0).

The latents returned are in the model's units (VAE latent x scaling_factor); `generate_images` divides by the scaling
factor and decodes them with a pluggable latent decoder (see `latent_decoder`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from janusflow_jax.models import janusflow as model_lib
from janusflow_jax.train.rectified_flow import null_prompt_mask
from janusflow_jax.models.janusflow import JanusFlow


class PromptTooLongError(ValueError):
    """A prompt that does not fit the LLM's context together with what must follow it."""


# ------------------------------------------------------------------------------------------------------ time grid
def step_times(steps: int, reference_t_rounding: bool = False) -> np.ndarray:
    """t of each Euler step, float32 [steps]: step / steps for step = 0 .. steps - 1 (0 = noise; never 1).

    Computed on the host in IEEE arithmetic (inside XLA a division by a constant may become a multiplication by
    its reciprocal, one ulp off). reference_t_rounding: round 1000 t to bfloat16 as the reference does (it builds the
    timestep tensor in the dtype of its bf16 `dt`): for 30 steps 1000 t = 0, 33.25, 66.5, 100, 133, ..., 968 instead
    of ..., 966.67. The value returned is then the float32 t for which `velocity`'s 1000 * t is that bf16 value
    exactly.
    """
    t = (np.arange(steps, dtype=np.float64) / steps).astype(np.float32)
    if not reference_t_rounding:
        return t
    # float64 step / steps * 1000 -> float32 tensor -> bfloat16, as torch.tensor([...]).to(torch.bfloat16).
    scaled = (np.arange(steps, dtype=np.float64) / steps * 1000.0).astype(np.float32)
    scaled = scaled.astype(ml_dtypes.bfloat16).astype(np.float32)
    t = scaled / np.float32(1000.0)
    for candidate in (np.nextafter(t, np.float32(0)), np.nextafter(t, np.float32(1))):
        t = np.where(np.float32(1000.0) * t == scaled, t, candidate)
    if np.any(np.float32(1000.0) * t != scaled):  # cannot happen for these magnitudes; a guard, not a fallback
        raise AssertionError("no float32 t maps onto the bf16 time grid")
    return t.astype(np.float32)


# -------------------------------------------------------------------------------------------------- ODE sampling
@functools.partial(jax.jit, static_argnames=("model", "guided", "use_prompt_cache"))
def _sample(model, params, prompt_ids, prompt_mask, prompt_positions, z0, times, cfg, *, guided: bool,
            use_prompt_cache: bool):
    # The step count is static through the shape of `times` (the time grid, computed exactly on the host, see
    # `step_times`): a new step count compiles once more. `cfg` is traced, so a guidance sweep or UI slider reuses
    # one compilation. Whether an unconditional branch exists and whether the prompt is cached change the program's
    # structure, so they are static too.
    b = z0.shape[0]
    steps = times.shape[0]
    ids, mask, positions = prompt_ids, prompt_mask, prompt_positions
    if guided:  # rows [cond; uncond] as the official sampler (not interleaved as in the VQ Janus)
        ids = jnp.concatenate([prompt_ids, prompt_ids], axis=0)
        mask = jnp.concatenate([prompt_mask, null_prompt_mask(prompt_mask)], axis=0)
        positions = None if positions is None else jnp.concatenate([positions, positions], axis=0)
    variables = {"params": params}
    cache = None
    if use_prompt_cache:
        cache = model.apply(variables, ids, mask, positions, method=JanusFlow.prompt_cache)
    dt = np.float32(1.0 / steps)
    cfg = jnp.asarray(cfg, jnp.float32)

    def euler_step(step, z):
        t = jnp.broadcast_to(times[step], (ids.shape[0],))
        z_in = jnp.concatenate([z, z], axis=0) if guided else z
        v = model.apply(variables, ids, mask, z_in.astype(model.config.compute_dtype), t, prompt_cache=cache,
                        prompt_positions=positions, method=JanusFlow.velocity).astype(jnp.float32)
        if guided:
            v = cfg * v[:b] - (cfg - 1.0) * v[b:]
        return z + dt * v

    return jax.lax.fori_loop(0, steps, euler_step, z0.astype(jnp.float32))


def sample_latents(model: JanusFlow, params, prompt_ids, prompt_mask, z0, steps: int, cfg: float,
                   prompt_positions=None, *, use_prompt_cache: bool = True, reference_t_rounding: bool = False):
    """Integrates the rectified-flow ODE from noise z0 (t = 0) to latents (t = 1) with CFG weight `cfg`.

    prompt_ids/prompt_mask: [batch, L] int, BOS + prompt with the generation tag dropped; 1 = real token. Left padding
    is allowed: pass `prompt_positions` ([batch, L], `janusflow_jax.models.janusflow.prompt_positions(prompt_mask)`) so that every
    row sees the positions of its unpadded prompt. Default positions: arange(L), as the official sampler.
    z0: [batch, G, G, 4] initial noise (G = config.latent_size). steps: Euler steps (>= 1). cfg: guidance weight w;
    w = 1 runs the conditional branch only.
    use_prompt_cache: compute the prompt's keys/values once (False recomputes the whole sequence each step, as the
    reference does in effect; same numbers, for benchmarks).
    reference_t_rounding: feed t rounded to bfloat16 as the reference (see `step_times`).
    Returns latents [batch, G, G, 4] float32 in the model's (scaled) units.
    """
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if float(cfg) < 1.0:
        raise ValueError(f"cfg (guidance weight) must be >= 1, got {cfg}")
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
    cfg_model = model.config
    want = (cfg_model.latent_size, cfg_model.latent_size, cfg_model.gen_encoder.in_channels)
    if z0.ndim != 4 or tuple(z0.shape[1:]) != want or z0.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"z0 must be [{prompt_ids.shape[0]}, {', '.join(map(str, want))}], got {tuple(z0.shape)}")
    if prompt_positions is not None:
        prompt_positions = jnp.asarray(prompt_positions, jnp.int32)
    return _sample(model, params, prompt_ids, prompt_mask, prompt_positions, jnp.asarray(z0),
                   step_times(int(steps), reference_t_rounding), jnp.asarray(cfg, jnp.float32),
                   guided=float(cfg) != 1.0, use_prompt_cache=use_prompt_cache)


# ------------------------------------------------------------------------------------------------ latent decoders
def latent_decoder(decoder, decoder_params=None, scaling_factor: float | None = None) -> Callable[[Any], Any]:
    """Normalises the ways of turning the model's latents into images into one function z -> images.

    z: [batch, G, G, C] in the model's (scaled) units; images: [batch, H, W, 3] roughly in [-1, 1]. `decoder` is
      * a Flax module with a `decode` method (the `vae.AutoencoderKL`): applied with `decoder_params` under jit;
        scaling factor from its `config.scaling_factor`;
      * any other object with `decode(latents_unscaled)` (e.g. an invertible pixel map); scaling factor from its
        `scaling_factor` or `config.scaling_factor` attribute, else 1;
      * a plain callable latents_unscaled -> images; scaling factor 1.
    `scaling_factor` overrides the factor in every case. The latents are divided by it before decoding, as the
    reference does with vae.decode(z / 0.13025); a `config.shift_factor` (None for the SDXL-VAE) is added back.
    """
    config = getattr(decoder, "config", None)
    if scaling_factor is None:
        scaling_factor = getattr(decoder, "scaling_factor", getattr(config, "scaling_factor", 1.0))
    scale = float(scaling_factor)
    shift = float(getattr(config, "shift_factor", None) or 0.0)  # None for the SDXL-VAE

    def unscale(z):  # z_model = (z_vae - shift_factor) * scaling_factor
        return z / scale + shift

    if isinstance(decoder, nn.Module):
        if decoder_params is None:
            raise ValueError("a Flax latent decoder needs its parameters (decoder_params)")
        run = jax.jit(lambda p, z: decoder.apply({"params": p}, unscale(z), method="decode"))
        return lambda z: run(decoder_params, z)
    if hasattr(decoder, "decode"):
        return lambda z: decoder.decode(unscale(z))
    if callable(decoder):
        return lambda z: decoder(unscale(z))
    raise TypeError(f"latent decoder must be a Flax module, an object with decode() or a callable, got {decoder!r}")


def to_uint8(images) -> np.ndarray:
    """[-1, 1] images -> uint8 [batch, H, W, 3]: clip, then (x + 1) / 2 * 255 rounded (the README's save_image)."""
    x = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
    return np.round((x + 1.0) * 127.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- prompts -> images
def check_generation_prompt(config, ids, prompt: str):
    """Raises PromptTooLongError unless the prompt + t_emb + latent tokens fit the LLM's positions."""
    limit = config.llm.max_position_embeddings - 1 - config.num_gen_tokens
    if len(ids) > limit:
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        raise PromptTooLongError(f"prompt {shown!r} is {len(ids)} tokens; at most {limit} fit the context "
                                 f"({config.llm.max_position_embeddings} positions, {1 + config.num_gen_tokens} "
                                 f"taken by t_emb and the latent tokens)")


def left_pad(rows: Sequence[np.ndarray], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads int sequences to `length` (default the longest): (ids [n, length], mask [n, length], 1 = real)."""
    length = max(len(r) for r in rows) if length is None else length
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, length - len(row):] = row
            mask[i, length - len(row):] = 1
    return ids, mask


def initial_noise(config, seed: int, indices) -> jax.Array:
    """z0 for the given image indices: image i always draws from fold_in(key(seed), i), so it does not depend on
    the batch size or on which batch it falls in. [len(indices), G, G, C] float32."""
    shape = (config.latent_size, config.latent_size, config.gen_encoder.in_channels)
    key = jax.random.key(seed)
    draw = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))
    return draw(jnp.asarray(indices, jnp.uint32))


def generate_images(model: JanusFlow, params, processor, vae, vae_params, prompts: str | Sequence[str], *,
                    cfg: float = 2.0, steps: int = 30, seed: int = 0, images_per_prompt: int = 1,
                    batch_size: int = 8, dtype=None, template: str = "sft", progress: bool = False,
                    scaling_factor: float | None = None, reference_t_rounding: bool = False,
                    use_prompt_cache: bool = True) -> np.ndarray:
    """Text to images: uint8 [len(prompts) * images_per_prompt, H, W, 3] (384 x 384 for the release).

    Images come prompt-major (all images of prompt 0, then prompt 1, ...). `processor` supplies the prompt template
    (`encode_generation_prompt`, template "sft" or whatever it offers) and the pad id. `vae`/`vae_params`: the latent
    decoder, anything `latent_decoder` accepts. Every batch has the same shape (prompts left-padded to the longest of
    all, the last batch filled up with repeats of its last row and cropped), so the sampler compiles once.
    batch_size counts images; CFG doubles the rows the LLM sees. dtype: compute dtype override for the model
    (e.g. "bfloat16"); parameters keep their storage dtype.
    """
    from tqdm.auto import tqdm

    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"images_per_prompt ({images_per_prompt}) and batch_size ({batch_size}) must be >= 1")
    if dtype is not None:
        model = JanusFlow(model.config.replace(dtype=jnp.dtype(dtype).name))
    config = model.config
    encoded = []
    for prompt in prompts:
        ids = np.asarray(processor.encode_generation_prompt(prompt, template=template), np.int32)
        check_generation_prompt(config, ids, prompt)
        encoded.append(ids)
    all_ids, all_mask = left_pad(encoded, processor.pad_id)
    rows = np.repeat(np.arange(len(prompts)), images_per_prompt)
    decode = latent_decoder(vae, vae_params, scaling_factor)
    batch_size = min(batch_size, len(rows))
    n_batches = math.ceil(len(rows) / batch_size)
    images = []
    for k in tqdm(range(n_batches), desc="batches", unit="batch", disable=not progress):
        index = np.arange(k * batch_size, (k + 1) * batch_size)
        real = index < len(rows)
        index = np.minimum(index, len(rows) - 1)  # fill the last batch with copies of its last image
        ids, mask = all_ids[rows[index]], all_mask[rows[index]]
        latents = sample_latents(model, params, ids, mask, initial_noise(config, seed, index), steps, cfg,
                                 model_lib.prompt_positions(mask), use_prompt_cache=use_prompt_cache,
                                 reference_t_rounding=reference_t_rounding)
        images.append(to_uint8(decode(latents))[real])
    return np.concatenate(images, axis=0)
