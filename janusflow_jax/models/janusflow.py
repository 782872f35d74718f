"""JanusFlow: one LLM that reads images (SigLIP tokens) and generates them (rectified-flow velocity on latents).

Parameter tree (each sub-tree's names mirror its PyTorch counterpart; see `convert.py` for the mapping):
  language_model      LlamaModel            (official `language_model.`)
  und_encoder         SigLIPViT             (`vision_und_enc_model.vision_tower.`)
  und_aligner         Dense width -> hidden (`vision_und_enc_aligner`)
  beg_of_und_embed    [1, hidden]           (`beg_of_und_embed`)
  gen_encoder         ShallowUViTEncoder    (`vision_gen_enc_model.`)
  gen_enc_aligner     Dense C -> hidden     (`vision_gen_enc_aligner`)
  gen_decoder         ShallowUViTDecoder    (`vision_gen_dec_model.`)
  gen_dec_aligner_norm, gen_dec_aligner     (`vision_gen_dec_aligner_norm`, `vision_gen_dec_aligner`)
  repa_projector      3-layer SiLU MLP      (training only; not in the released checkpoint)
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from janusflow_jax.models import llama
from janusflow_jax.models.config import JanusFlowConfig
from janusflow_jax.models.layers import RMSNorm, dense, logical_init
from janusflow_jax.models.siglip import SigLIPViT
from janusflow_jax.models.uvit import ShallowUViTDecoder, ShallowUViTEncoder


class RepaProjector(nn.Module):
    """h_phi of REPA: Linear -> SiLU -> Linear -> SiLU -> Linear, applied per token."""

    hidden_dim: int
    out_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.silu(dense(self.hidden_dim, ("embed", "mlp"), name="linear_1", **kw)(x))
        x = nn.silu(dense(self.hidden_dim, ("mlp", "embed"), name="linear_2", **kw)(x))
        return dense(self.out_dim, ("embed", "vit_embed"), name="linear_3", **kw)(x)


class JanusFlow(nn.Module):
    config: JanusFlowConfig

    def setup(self):
        cfg = self.config
        dt, pdt = cfg.compute_dtype, cfg.storage_dtype
        hidden = cfg.llm.hidden_size
        self.language_model = llama.LlamaModel(cfg.llm, dt, pdt, cfg.scan_layers, cfg.remat_policy,
                                               capture_after=cfg.repa.layer, attention=cfg.attention)
        self.und_encoder = SigLIPViT(cfg.und_encoder, dt, pdt, cfg.scan_layers, cfg.remat_policy,
                                     attention=cfg.attention)
        self.und_aligner = dense(hidden, ("vit_embed", "embed"), use_bias=True, dtype=dt, param_dtype=pdt,
                                 name="und_aligner")
        # Zero-initialised in the released code; it fills the <begin_of_image> slot.
        self.beg_of_und_embed = self.param("beg_of_und_embed",
                                           logical_init(nn.initializers.zeros_init(), (None, "embed")), (1, hidden), pdt)
        self.gen_encoder = ShallowUViTEncoder(cfg.gen_encoder, hidden, dt, pdt)
        self.gen_enc_aligner = dense(hidden, ("gen_channels", "embed"), use_bias=True, dtype=dt, param_dtype=pdt,
                                     name="gen_enc_aligner")
        self.gen_decoder = ShallowUViTDecoder(cfg.gen_decoder, dt, pdt)
        self.gen_dec_aligner_norm = RMSNorm(cfg.llm.rms_norm_eps, dt, pdt)
        self.gen_dec_aligner = dense(cfg.gen_decoder.in_channels, ("embed", "gen_channels"), use_bias=True, dtype=dt,
                                     param_dtype=pdt, name="gen_dec_aligner")
        self.repa_projector = RepaProjector(cfg.repa.hidden_dim, cfg.und_encoder.width, dt, pdt)

    # ----------------------------------------------------------------------------------------------- understanding
    def embed_understanding(self, input_ids, pixel_values=None, image_token_mask=None):
        """Token embeddings with image features scattered into the image slots.

        input_ids: [batch, seq]; pixel_values: [batch, size, size, 3] or [batch, n_images, size, size, 3], normalised
        as the official processor does; image_token_mask: [batch, seq], True at the 1 + num_patches slots of each
        image (the official `images_seq_mask`). The k-th marked slot of a row receives the k-th image token of that
        row: `beg_of_und_embed`, then the SigLIP patch tokens of image 0, then image 1, ...
        """
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None:
            return embeds
        if image_token_mask is None:
            raise ValueError("image_token_mask is required with pixel_values")
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]
        b, n = pixel_values.shape[:2]
        features = self.und_encoder(pixel_values.reshape(b * n, *pixel_values.shape[2:]))
        image_tokens = self.und_aligner(features)
        beg = jnp.broadcast_to(self.beg_of_und_embed.astype(image_tokens.dtype)[None], (b * n, 1, image_tokens.shape[-1]))
        image_tokens = jnp.concatenate([beg, image_tokens], axis=1).reshape(b, -1, image_tokens.shape[-1])
        mask = image_token_mask.astype(bool)
        slot = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, image_tokens.shape[1] - 1)
        gathered = jnp.take_along_axis(image_tokens, slot[..., None], axis=1)
        return jnp.where(mask[..., None], gathered.astype(embeds.dtype), embeds)

    def understand(self, input_ids, pixel_values=None, image_token_mask=None, attention_mask=None, positions=None,
                   cache=None, cache_index=0, segment_ids=None):
        """Next-token logits [batch, seq, vocab] for a (possibly image-bearing) sequence.

        attention_mask: [batch, seq] (1 = real token; left padding as the official batchify), or over the cache
        length when `cache` is given, in which case `(logits, cache)` is returned.
        segment_ids/positions: packed rows (several examples per row, attention kept inside each; see `batch.py`).
        """
        embeds = self.embed_understanding(input_ids, pixel_values, image_token_mask)
        out = self.language_model(embeds, attention_mask, positions, cache=cache, cache_index=cache_index,
                                  segment_ids=segment_ids)
        return out["logits"] if cache is None else (out["logits"], out["cache"])

    # -------------------------------------------------------------------------------------------------- generation
    def prompt_cache(self, prompt_ids, prompt_mask, prompt_positions=None):
        """KV cache of the prompt, sized for [prompt, t_emb, latent tokens]; reuse it across ODE steps."""
        b, length = prompt_ids.shape
        cache = llama.init_cache(self.config.llm, b, length + 1 + self.config.num_gen_tokens, self.config.compute_dtype)
        mask = jnp.concatenate([prompt_mask, jnp.ones((b, cache["k"].shape[2] - length), prompt_mask.dtype)], axis=1)
        out = self.language_model(self.language_model.embed(prompt_ids), mask, prompt_positions, cache=cache,
                                  return_logits=False)
        return out["cache"]

    def velocity(self, prompt_ids, prompt_mask, z_t, t, return_repa_features=False, prompt_cache=None,
                 prompt_positions=None):
        """Rectified-flow velocity v(z_t, t | prompt).

        prompt_ids/prompt_mask: [batch, L], BOS + prompt with the generation tag dropped (its slot goes to t_emb);
        mask 0 hides a prompt token while every position keeps its absolute RoPE index (the CFG null prompt).
        z_t: [batch, latent, latent, 4] scaled VAE latents; t: [batch] in [0, 1] (0 = noise, 1 = data).
        prompt_cache: optional result of `prompt_cache(prompt_ids, prompt_mask)`; then only t_emb and the latent
        tokens run through the LLM (same numbers, as attention is causal).
        prompt_positions: [batch, L] RoPE positions of the prompt (default arange, as the official sampler). For
        left-padded prompts of different lengths pass `prompt_positions(real_mask)` so BOS sits at 0 in every row;
        t_emb and the latent tokens continue after the last prompt position.
        Returns v [batch, latent, latent, 4], and with `return_repa_features` also h_phi of the LLM residual stream
        after block `config.repa.layer` at the latent positions, [batch, num_gen_tokens, und width].
        """
        cfg = self.config
        b = z_t.shape[0]
        n = cfg.num_gen_tokens
        z_features, t_emb = self.gen_encoder(z_t, 1000.0 * t.astype(jnp.float32))
        latent_tokens = self.gen_enc_aligner(z_features.reshape(b, n, z_features.shape[-1]))
        gen_embeds = jnp.concatenate([t_emb[:, None].astype(latent_tokens.dtype), latent_tokens], axis=1)
        mask = jnp.concatenate([prompt_mask, jnp.ones((b, 1 + n), prompt_mask.dtype)], axis=1)
        length = prompt_mask.shape[1]
        gen_positions = None
        if prompt_positions is not None:
            gen_positions = prompt_positions[:, -1:] + 1 + jnp.arange(1 + n, dtype=prompt_positions.dtype)[None]
        if prompt_cache is None:
            embeds = jnp.concatenate([self.language_model.embed(prompt_ids).astype(gen_embeds.dtype), gen_embeds], 1)
            positions = None if prompt_positions is None else jnp.concatenate([prompt_positions, gen_positions], 1)
            out = self.language_model(embeds, mask, positions, return_logits=False)
        else:
            out = self.language_model(gen_embeds, mask, gen_positions, cache=prompt_cache, cache_index=length,
                                      return_logits=False)
        # Read-out at the latent input positions (no shift): final LLM norm, then the aligner's own RMSNorm.
        h = self.gen_dec_aligner(self.gen_dec_aligner_norm(out["hidden"][:, -n:]))
        grid = cfg.latent_size // cfg.gen_encoder.stride
        v = self.gen_decoder(h.reshape(b, grid, grid, h.shape[-1]), z_features, t_emb)
        if not return_repa_features:
            return v
        return v, self.repa_projector(out["captured"][:, -n:])

    def init_all(self):
        """Touches every parameter once (used by `init_params`)."""
        cfg = self.config
        size = cfg.und_encoder.image_size
        n_img = 1 + cfg.und_encoder.num_patches
        ids = jnp.zeros((1, n_img + 1), jnp.int32)
        mask = jnp.arange(n_img + 1)[None] < n_img
        self.understand(ids, jnp.zeros((1, size, size, 3)), mask, jnp.ones_like(ids))
        z = jnp.zeros((1, cfg.latent_size, cfg.latent_size, cfg.gen_encoder.in_channels))
        return self.velocity(ids[:, :2], jnp.ones((1, 2), jnp.int32), z, jnp.zeros((1,)), return_repa_features=True)


def prompt_positions(real_mask):
    """RoPE positions for left-padded prompts: each row's first real token (BOS) at 0, padding clamped to 0.

    real_mask: [batch, L], 1 at the prompt's real tokens. Use the mask *before* hiding tokens for the CFG null prompt,
    so the null row keeps the positions of its conditional twin (as the official sampler does).
    """
    return jnp.maximum(jnp.cumsum(real_mask.astype(jnp.int32), axis=1) - 1, 0)


@functools.lru_cache(maxsize=8)
def abstract_params(config: JanusFlowConfig):
    """Shapes, dtypes and logical axis metadata of every parameter, without allocating (jax.eval_shape).

    Cached per (frozen, hashable) config: a training run asks for it for freeze labels, state shardings, parameter
    shardings and restore targets, and tracing the 1.3B init takes seconds. Treat the result as read-only."""
    model = JanusFlow(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), method=JanusFlow.init_all))["params"]


def init_params(config: JanusFlowConfig, rng) -> dict:
    """Freshly initialised parameters (plain arrays). For sharded creation use `sharding.create_sharded_params`."""
    model = JanusFlow(config)
    return nn.unbox(jax.jit(lambda r: model.init(r, method=JanusFlow.init_all))(rng)["params"])
