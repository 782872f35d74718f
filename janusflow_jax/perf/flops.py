"""Model FLOPs of a train step and of sampling, counted the way MaxText does (the chips' peaks: `perf/chips.py`).

Counting (stated so numbers can be compared):
- Every matmul counts 2·m·n·k; convolutions 2·(output pixels)·(kernel area · in channels / groups)·(out channels).
- Training = forward + backward. A tower whose weights train costs 3× its forward (backward = activation gradients
  + weight gradients, 1× each); a frozen tower that gradients still flow through (the frozen LLM of stage 1) costs 2×;
  a frozen tower with nothing trainable before it (SigLIP in stages 1–2, the REPA target encoder always) costs 1×.
- Attention scores and values: 4·q_len·kv_len·heads·head_dim per row and layer, HALVED for causal attention (the
  masked half is not useful work), over the full packed row length (segments are not subtracted).
- Elementwise work (norms, activations, softmax, optimizer) is not counted, as in MaxText.
MFU = counted FLOPs / step time / (devices · peak bf16 FLOP/s of one device).
"""

from __future__ import annotations

import re


from janusflow_jax.models.config import JanusFlowConfig

def llm_forward(cfg: JanusFlowConfig, rows: int, seq: int, logits: bool, past: int = 0) -> float:
    """`seq` new tokens per row, attending causally to themselves and to `past` cached keys before them."""
    c = cfg.llm
    attn_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_token = c.hidden_size * (2 * attn_dim + 2 * kv_dim) + 3 * c.hidden_size * c.intermediate_size
    flops = 2 * per_token * c.num_layers * rows * seq
    flops += 4 * rows * seq * (past + seq / 2) * attn_dim * c.num_layers  # causal: the new block's square halved
    if logits:
        flops += 2 * rows * seq * c.hidden_size * c.vocab_size
    return flops


def siglip_forward(cfg: JanusFlowConfig, images: int) -> float:
    v = cfg.und_encoder
    n = v.num_patches
    per_token = 2 * (4 * v.width * v.width + 2 * v.width * v.mlp_dim)
    flops = images * n * (v.depth * per_token + 2 * 3 * v.patch_size ** 2 * v.width)
    return flops + images * v.depth * 4 * n * n * v.width  # full (bidirectional) attention


def _convnext_forward(pixels: int, channels: int, ffn: int, cond: int) -> float:
    return pixels * 2 * (49 * channels + 2 * channels * ffn * channels) + 2 * cond * 2 * channels


def gen_towers_forward(cfg: JanusFlowConfig, examples: int) -> float:
    """Generation encoder + aligners + decoder (the LLM part of generation is counted by `llm_forward`)."""
    e, d, hidden = cfg.gen_encoder, cfg.gen_decoder, cfg.llm.hidden_size
    grid = cfg.latent_size // e.stride
    pixels = grid * grid
    f = 2 * e.channels * hidden + 2 * hidden * hidden  # time embedding
    f += pixels * 2 * e.kernel_size ** 2 * e.in_channels * e.channels  # in_conv
    f += e.num_blocks * _convnext_forward(pixels, e.channels, e.ffn_factor, hidden)
    f += pixels * 2 * e.channels * hidden  # gen_enc_aligner
    f += pixels * 2 * hidden * d.in_channels  # gen_dec_aligner
    c = d.in_channels + d.channels
    f += d.num_blocks * _convnext_forward(pixels, c, d.ffn_factor, hidden)
    f += pixels * 2 * c * d.out_channels * 4  # unpatchify 1x1 conv
    return examples * f


def repa_projector_forward(cfg: JanusFlowConfig, tokens: int) -> float:
    h = cfg.repa.hidden_dim
    return 2 * tokens * (cfg.llm.hidden_size * h + h * h + h * cfg.und_encoder.width)


def sampling_flops(cfg: JanusFlowConfig, batch: int, steps: int, prompt_len: int, guided: bool,
                   prompt_cache: bool) -> float:
    """Counted FLOPs of generating `batch` images with `steps` Euler steps (`sampler.sample_latents`, latents only).

    Every step runs the generation towers and the LLM on the rows of the batch, twice as many with classifier-free
    guidance (the [cond; uncond] rows). With the prompt cache the prompt's `prompt_len` tokens go through the LLM once
    and each step computes t_emb + the latent tokens against the cached keys; without it (the official demo's loop)
    each step recomputes the whole row."""
    rows = 2 * batch if guided else batch
    gen = 1 + cfg.num_gen_tokens
    if prompt_cache:
        llm = llm_forward(cfg, rows, prompt_len, logits=False)
        llm += steps * llm_forward(cfg, rows, gen, logits=False, past=prompt_len)
    else:
        llm = steps * llm_forward(cfg, rows, prompt_len + gen, logits=False)
    return llm + steps * gen_towers_forward(cfg, rows)


def _trains(labels: dict, prefix: str) -> bool:
    return any(label == "trainable" for path, label in labels.items() if re.match(prefix + "(/|$)", path))


def train_step_flops(cfg: JanusFlowConfig, labels: dict, sizes: dict, seq_len: int, prompt_len: int,
                     images_per_row: int, use_repa: bool) -> float:
    """Counted FLOPs of one optimizer step over a global batch with `sizes` rows per data type."""
    trains = {name: _trains(labels, name) for name in
              ("language_model", "und_encoder", "und_aligner", "gen_encoder", "gen_decoder", "repa_projector")}
    llm_mult = 3 if trains["language_model"] else 2
    total = 0.0
    n_und, n_gen, n_text = sizes.get("und", 0), sizes.get("gen", 0), sizes.get("text", 0)
    total += llm_mult * llm_forward(cfg, n_und + n_text, seq_len, logits=True)
    images = n_und * images_per_row
    total += (3 if trains["und_encoder"] else 1) * siglip_forward(cfg, images)
    total += 3 * images * cfg.und_encoder.num_patches * 2 * cfg.und_encoder.width * cfg.llm.hidden_size  # aligner
    gen_seq = prompt_len + 1 + cfg.num_gen_tokens
    total += llm_mult * llm_forward(cfg, n_gen, gen_seq, logits=False)
    total += (3 if trains["gen_encoder"] or trains["gen_decoder"] else 2) * gen_towers_forward(cfg, n_gen)
    if use_repa:
        total += 3 * repa_projector_forward(cfg, n_gen * cfg.num_gen_tokens)
        total += siglip_forward(cfg, n_gen)  # the stop-gradient target
    return total


def step_counts(plan, sizes: dict) -> dict:
    """{"flops": counted FLOPs per step, "tokens": LLM tokens per step} of a trainer `Plan`'s step over a global batch
    of `sizes` rows per data type (`plan.sizes_at(step)`)."""
    c = plan.config
    flops = train_step_flops(plan.model_cfg, plan.labels, sizes, c.data.seq_len, c.data.prompt_len,
                             c.data.images_per_row, c.loss.repa_weight != 0)
    gen_seq = c.data.prompt_len + 1 + plan.model_cfg.num_gen_tokens
    tokens = (sizes.get("und", 0) + sizes.get("text", 0)) * c.data.seq_len + sizes.get("gen", 0) * gen_seq
    return {"flops": flops, "tokens": tokens}
