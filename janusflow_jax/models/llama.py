"""The Llama-architecture LLM (DeepSeek-LLM 1.3B), numerically equal to transformers' LlamaForCausalLM.

Parameter names mirror the Hugging Face ones (`embed_tokens`, `layers_{i}/self_attn/q_proj`, ...), so the conversion
table stays a list of renames. With `scan_layers` the blocks live under `layers` with a leading `layers` axis.

Attention takes a mask over *keys* plus explicit absolute positions, so a row can hide part of its prompt while keeping
the RoPE positions of everything else (the unconditional CFG branch of JanusFlow does exactly that). A KV cache makes
the same call serve prefill, token-by-token decoding and prefix reuse.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from janusflow_jax.models.config import LlamaConfig
from janusflow_jax.models.layers import (DEFAULT_KERNEL_INIT, HeadsDense, RMSNorm, dense, dot_product_attention, logical_init,
                                  maybe_remat)

Cache = dict[str, jax.Array]  # {"k": [layers, batch, max_len, kv_heads, head_dim], "v": same}


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def rotary_embedding(x, positions, theta: float):
    """RoPE in the rotate-half convention used by HF Llama checkpoints. x: [b, s, h, d], positions: [b, s]."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, d/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def causal_key_mask(key_mask, q_len: int, cache_index, segment_ids=None):
    """Causal mask over a key axis of length T where the queries occupy slots [cache_index, cache_index + q_len).

    key_mask: [batch, T] (1 = real key). segment_ids: optional [batch, T] (no cache: T = q_len) for packed rows; a
    query then sees only keys of its own segment. Returns boolean [batch, 1, q_len, T].
    """
    kv_len = key_mask.shape[1]
    q_slots = cache_index + jnp.arange(q_len)
    causal = jnp.arange(kv_len)[None, :] <= q_slots[:, None]  # [q, T]
    mask = causal[None] & key_mask.astype(bool)[:, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask[:, None]


class LlamaAttention(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # layers.dot_product_attention implementation

    @nn.compact
    def __call__(self, x, positions, mask, layer_cache, cache_index, segments=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = HeadsDense(cfg.num_heads, cfg.head_dim, ("embed", "heads"), name="q_proj", **kw)(x)
        k = HeadsDense(cfg.num_kv_heads, cfg.head_dim, ("embed", "kv_heads"), name="k_proj", **kw)(x)
        v = HeadsDense(cfg.num_kv_heads, cfg.head_dim, ("embed", "kv_heads"), name="v_proj", **kw)(x)
        q = rotary_embedding(q, positions, cfg.rope_theta)
        k = rotary_embedding(k, positions, cfg.rope_theta)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        if layer_cache is not None:
            k_new, v_new = k.astype(layer_cache["k"].dtype), v.astype(layer_cache["v"].dtype)
            index = 0 if cache_index is None else cache_index
            k_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k_new, index, axis=1)
            v_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v_new, index, axis=1)
            layer_cache = {"k": k_all, "v": v_all}
            if cache_index is None:  # a prefill into an empty cache: self-attention over the new tokens (see below)
                k, v = k_new.astype(self.dtype), v_new.astype(self.dtype)
            else:
                k, v = k_all.astype(self.dtype), v_all.astype(self.dtype)
        out = dot_product_attention(q, k, v, mask, implementation=self.attention, segments=segments, causal=True)
        out = HeadsDense(cfg.num_heads, cfg.head_dim, ("heads", "embed"), to_heads=False, features=cfg.hidden_size,
                         name="o_proj", **kw)(out)
        return out, layer_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = nn.silu(gate) * up
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(h)


class LlamaBlock(nn.Module):
    """Pre-norm decoder layer. The signature fits nn.scan: (carry, *per_layer_inputs, *broadcast_inputs)."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # Record the residual stream after this many blocks into carry[1] (REPA reads block 6); -1 = never.
    capture_after: int = -1
    attention: str = "auto"

    @nn.compact
    def __call__(self, carry, layer_index, layer_cache, positions, mask, segments, cache_index):
        x, captured = carry
        cfg = self.config
        norm = dict(eps=cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        h, layer_cache = LlamaAttention(cfg, self.dtype, self.param_dtype, self.attention, name="self_attn")(
            RMSNorm(**norm, name="input_layernorm")(x), positions, mask, layer_cache, cache_index, segments)
        x = x + h
        x = x + LlamaMLP(cfg, self.dtype, self.param_dtype, name="mlp")(RMSNorm(**norm, name="post_attention_layernorm")(x))
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        if captured is not None:
            captured = jnp.where(layer_index + 1 == self.capture_after, x, captured)
        return (x, captured), layer_cache


class LlamaModel(nn.Module):
    """Decoder stack + final norm + (untied) LM head.

    Call with `inputs_embeds` [batch, seq, hidden] (use `embed` for token ids). Returns a dict with
    `hidden` (after the final norm), `logits` (if `return_logits`), `cache` (if one was given) and
    `captured` (the residual stream after `capture_after` blocks, if requested).
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    # The block whose output `captured` returns (REPA); fixed per model so nn.scan sees a static value.
    capture_after: int = -1
    attention: str = "auto"  # "auto" | "xla" | "cudnn" | "splash" (layers.dot_product_attention)

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=logical_init(DEFAULT_KERNEL_INIT, ("vocab", "embed")))
        block_cls = maybe_remat(LlamaBlock, self.remat_policy)
        block_kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype, capture_after=self.capture_after,
                        attention=self.attention)
        if self.scan_layers:
            scanned = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.layers = scanned(**block_kw)
        else:
            self.layers = [block_cls(**block_kw) for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="lm_head")

    def embed(self, input_ids):
        """Token embeddings; negative ids (image placeholders in the official processor) read row 0."""
        return self.embed_tokens(jnp.maximum(input_ids, 0))

    def logits(self, hidden):
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def __call__(self, inputs_embeds, attention_mask=None, positions=None, cache: Cache | None = None,
                 cache_index=0, return_logits: bool = True, segment_ids=None):
        """inputs_embeds: [batch, seq, hidden].
        attention_mask: [batch, T] over keys (1 = attend), T = seq, or the cache length when a cache is given.
        positions: [batch, seq] absolute RoPE positions; default cache_index + arange(seq), like HF without
        position_ids (so left padding does not shift positions, exactly as the official pipeline runs).
        cache: from `init_cache`; the new keys/values are written at slots [cache_index, cache_index + seq). With
        cache_index a Python 0 (a prefill) attention runs over the new tokens alone, as without a cache.
        segment_ids: [batch, seq] for packed rows (0 = padding, k = the k-th packed example); attention stays inside
        a segment and padding keys are hidden. Pass per-segment `positions` with it. Not with a cache.
        """
        cfg = self.config
        if self.is_initializing():  # create the embedding table even when called on embeddings
            self.embed(jnp.zeros((1, 1), jnp.int32))
        b, s, _ = inputs_embeds.shape
        kv_len = s if cache is None else cache["k"].shape[2]
        # A prefill into an empty cache (cache_index a Python 0): its queries fill slots [0, s) and causal attention
        # never reads a later slot, so attention over the s new keys alone is the same computation, in the
        # self-attention form the fused kernels take (splash on TPUs, cuDNN's causal flash on GPUs; a mask over all
        # cache slots keeps them off splash and makes cuDNN read an O(s * cache) bias). The cache is written as ever.
        fresh = cache is not None and isinstance(cache_index, int) and cache_index == 0
        # No mask given: plain causal attention, which the kernels run without any mask or bias.
        causal_only = attention_mask is None and segment_ids is None and (cache is None or fresh)
        cache_index = jnp.asarray(cache_index, jnp.int32)
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
            if attention_mask is None:
                attention_mask = segment_ids != 0
        if attention_mask is None:
            attention_mask = jnp.ones((b, kv_len), jnp.int32)
        if attention_mask.shape != (b, kv_len):
            raise ValueError(f"attention_mask must be [batch, {kv_len}] over keys, got {attention_mask.shape}")
        if positions is None:
            positions = jnp.broadcast_to(cache_index + jnp.arange(s, dtype=jnp.int32), (b, s))
        # The same mask as segment ids, for kernels (self-attention only): hidden keys are segment 0.
        mask, segments = None, None
        if fresh and not causal_only:
            mask = causal_key_mask(attention_mask[:, :s], s, 0)
            segments = jnp.where(attention_mask[:, :s].astype(bool), 1, 0)
        elif not causal_only:
            mask = causal_key_mask(attention_mask, s, cache_index, segment_ids)
            if cache is None:
                segments = jnp.where(attention_mask.astype(bool), 1 if segment_ids is None else segment_ids, 0)
        block_index = None if fresh else cache_index  # None: the blocks attend over the new keys only
        x = inputs_embeds.astype(self.dtype)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        captured = x if self.capture_after >= 0 else None  # capture_after == 0 means the embeddings
        if self.scan_layers:
            (x, captured), cache = self.layers((x, captured), jnp.arange(cfg.num_layers), cache, positions, mask,
                                               segments, block_index)
        else:
            new_cache = []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
                # The layer index is known here, so REPA's capture is a Python choice, not a select in every block.
                (x, _), layer_cache = layer((x, None), jnp.asarray(i), layer_cache, positions, mask, segments,
                                            block_index)
                if i + 1 == self.capture_after:
                    captured = x
                new_cache.append(layer_cache)
            if cache is not None:
                cache = jax.tree.map(lambda *c: jnp.stack(c), *new_cache)
        hidden = self.norm(x)
        out = {"hidden": hidden}
        if return_logits:
            out["logits"] = self.logits(hidden)
        if cache is not None:
            out["cache"] = cache
        if self.capture_after >= 0:
            out["captured"] = captured
        return out
