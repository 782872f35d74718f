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


# ------------------------------------------------------------------------------------------------ OmniMamba (Mamba-2)
def mamba2_projection_flops(cfg, lora: bool = False) -> float:
    """Per token and layer: in_proj 2·d·(2·d_inner + 2·G·N + H) (the five pieces of the fused [z | x | B | C | dt]
    projection), the depthwise causal conv 2·d_conv·(d_inner + 2·G·N) (a multiply-add per tap and channel), out_proj
    2·d_inner·d, and with `lora` the active task's adapter 2·r·(d + in_proj rows). `cfg`: a `Mamba2Config`."""
    rows = 2 * cfg.d_inner + 2 * cfg.bc_width + cfg.nheads
    flops = 2 * cfg.d_model * rows + 2 * cfg.d_conv * (cfg.d_inner + 2 * cfg.bc_width) + 2 * cfg.d_inner * cfg.d_model
    if lora:
        flops += 2 * cfg.lora_rank * (cfg.d_model + rows)
    return flops


def ssd_chunked_flops(cfg, rows: int, seq: int) -> float:
    """The chunked SSD scan (`mamba2.ssd_chunked`) of `rows` rows of `seq` tokens, one layer. With chunk length Q,
    the row padded to L = c·Q (c chunks), H heads of P channels, G groups of state size N:
      intra-chunk scores C·Bᵀ                 2·L·Q·N·G    (a full Q x Q block per chunk and group)
      masked scores times X (x·dt)             2·L·Q·H·P    (the masked half is computed, as the einsum does)
      chunk states Bᵀ·X                        2·L·N·H·P
      inter-chunk state passing                2·(c+1)²·H·P·N (the (c+1) x (c+1) decay matrix times the states,
                                                              quadratic in the chunk count as ssd_minimal does it)
      C·state outputs                          2·L·N·H·P
    Exponentials, decays and the D skip are elementwise and not counted."""
    q = cfg.chunk_size
    chunks = -(-seq // q)
    length = chunks * q
    h, p, n, g = cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups
    per_row = (2 * length * q * n * g + 2 * length * q * h * p + 2 * length * n * h * p
               + 2 * (chunks + 1) ** 2 * h * p * n + 2 * length * n * h * p)
    return rows * per_row


def ssd_step_flops(cfg, rows: int) -> float:
    """One recurrence step (`mamba2.ssd_step`), one layer: the state update's outer product dt·x ⊗ B (2·H·P·N, a rank-1
    matmul) and the read-out S·C (2·H·P·N)."""
    return rows * 4 * cfg.nheads * cfg.headdim * cfg.d_state


def mamba2_forward(cfg, rows: int, seq: int, logit_tokens: int = 0, lora: bool = False) -> float:
    """Counted FLOPs of the Mamba-2 LM (`Mamba2Config` `cfg`) on `rows` rows of `seq` new tokens: per layer the
    projections, conv and LoRA (`mamba2_projection_flops`) of every token plus the SSD — the chunked scan
    (`ssd_chunked_flops`) for seq > 1, the recurrence (`ssd_step_flops`) for one token (a decode step); then the
    head 2·d·vocab on `logit_tokens` positions per row. A forward costs the same with or without a cache to continue
    from: the state enters the scan through the inter-chunk pass."""
    ssd = ssd_step_flops(cfg, rows) if seq == 1 else ssd_chunked_flops(cfg, rows, seq)
    flops = cfg.n_layer * (rows * seq * mamba2_projection_flops(cfg, lora) + ssd)
    return flops + 2 * rows * logit_tokens * cfg.d_model * cfg.vocab_size


def vit_forward(v, images: int) -> float:
    """A timm ViT (`vit.ViTConfig` `v`) read at its feature layer: the patch embedding 2·patches·(3·p²)·w and
    `blocks_run` blocks over patches + prefix tokens (qkv, proj, MLP: 2·(4·w² + 2·w·mlp) per token; full attention
    4·n²·w)."""
    n = v.num_patches + v.num_prefix_tokens
    per_block = n * 2 * (4 * v.width * v.width + 2 * v.width * v.mlp_dim) + 4 * n * n * v.width
    return images * (v.num_patches * 2 * 3 * v.patch_size ** 2 * v.width + v.blocks_run * per_block)


def dinosiglip_forward(vision, projector, images: int) -> float:
    """The understanding tower (DINOv2 + SigLIP, `DinoSigLIPConfig` `vision`) and the fused-GELU projector
    (`ProjectorConfig` `projector`: vision_dim -> 4·vision_dim -> llm_dim -> llm_dim) on `images` images."""
    v, h, d = projector.vision_dim, projector.hidden_dim, projector.llm_dim
    mlp = 2 * vision.num_patches * (v * h + h * d + d * d)
    return vit_forward(vision.dino, images) + vit_forward(vision.siglip, images) + images * mlp


def omnimamba_t2i_forward(cfg, rows: int, image_tokens: int | None = None, logits: bool = True) -> float:
    """A teacher-forced t2i row (`OmniMambaConfig` `cfg`, `OmniMamba.t2i_logits`): caption_embed (fc1, fc2: 2·2·d²
    per prompt token) on the 72 prompt tokens, img_project_in (d -> ratio·d -> d -> d: 2·(2·ratio + 1)·d² per token) on
    the image tokens, the backbone with the t2i LoRA over prompt + image tokens, img_head (2·d·image_vocab) at the image
    tokens."""
    n = cfg.num_image_tokens if image_tokens is None else image_tokens
    d, r = cfg.d_model, cfg.image_mlp_ratio
    p = cfg.t2i_prompt_length
    flops = rows * p * 2 * 2 * d * d + rows * n * 2 * (d * r * d + r * d * d + d * d)
    flops += mamba2_forward(cfg.backbone, rows, p + n, lora=bool(cfg.tasks))
    return flops + (2 * rows * n * d * cfg.image_vocab_size if logits else 0)


def omnimamba_mmu_forward(cfg, rows: int, seq: int) -> float:
    """An understanding row of `seq` positions (the 729 projected image features included), `OmniMamba.mmu_logits`:
    the backbone with the mmu LoRA and lm_head at every position (the tower and projector: `dinosiglip_forward`)."""
    return mamba2_forward(cfg.backbone, rows, seq, logit_tokens=seq, lora=bool(cfg.tasks))


def omnimamba_t2i_sampling_flops(cfg, batch: int) -> float:
    """Counted FLOPs of `inference.omnimamba.generate_image_tokens` without guidance: the 72-token prompt prefilled
    (caption_embed, backbone, img_head at its last position) and 255 decode steps (img_project_in, one recurrence
    step, img_head), greedy; the VQ decoder is not counted."""
    d, r = cfg.d_model, cfg.image_mlp_ratio
    p, n = cfg.t2i_prompt_length, cfg.num_image_tokens
    lora = bool(cfg.tasks)
    prefill = batch * p * 2 * 2 * d * d + mamba2_forward(cfg.backbone, batch, p, lora=lora)
    step = batch * 2 * (d * r * d + r * d * d + d * d) + mamba2_forward(cfg.backbone, batch, 1, lora=lora)
    return prefill + (n - 1) * step + n * 2 * batch * d * cfg.image_vocab_size


def _trains_where(labels: dict, pattern: str, exclude: str | None = None) -> bool:
    return any(label == "trainable" and re.search(pattern, path) and not (exclude and re.search(exclude, path))
               for path, label in labels.items())


def omnimamba_train_step_flops(system, labels: dict, sizes: dict, mmu_seq: int) -> float:
    """Counted FLOPs of one OmniMamba optimizer step (`OmniMambaSystemConfig` `system`) over `sizes` rows per task:
    "mmu" rows of `mmu_seq` positions (729 image features included) with one image each, "t2i" rows of 72 + 256.

    As `train_step_flops`: a part whose weights train costs 3× its forward; a frozen part that gradients flow through
    (something trainable before or inside it: the backbone when only LoRA, embeddings or the projector train) 2×; a
    frozen part with nothing trainable before it (the DINOv2 + SigLIP towers; the VQ never runs, its codes are
    precomputed) 1×. `labels` maps parameter paths ("lm/backbone/...", "projector/...", or without the "lm/" prefix)
    to "trainable" / "frozen"."""
    cfg = system.lm
    backbone = _trains_where(labels, r"(^|/)backbone/", exclude=r"/lora_")
    lora = _trains_where(labels, r"/lora_")
    projector = _trains_where(labels, r"^projector(/|$)")
    t2i_inputs = _trains_where(labels, r"(^|/)(img_embeddings|img_project_in|caption_embed|pos_embed)(/|$)")
    text_embedding = _trains_where(labels, r"(^|/)backbone/embeddings(/|$)")
    mmu_inputs = projector or _trains_where(labels, r"(^|/)mmu_pos_embed(/|$)")
    n_mmu, n_t2i = sizes.get("mmu", 0), sizes.get("t2i", 0)

    def through(trains: bool, upstream: bool) -> int:
        return 3 if trains else 2 if upstream else 1

    total = through(backbone, lora or mmu_inputs or text_embedding) * omnimamba_mmu_forward(cfg, n_mmu, mmu_seq)
    total += 1 * dinosiglip_forward(system.vision, system.projector, n_mmu)  # frozen towers, forward only
    p = system.projector
    total += (through(projector, False) - 1) * n_mmu * cfg.num_image_features * 2 * (
        p.vision_dim * p.hidden_dim + p.hidden_dim * p.llm_dim + p.llm_dim * p.llm_dim)  # its backward, if any
    t2i_backbone = mamba2_forward(cfg.backbone, n_t2i, cfg.t2i_prompt_length + cfg.num_image_tokens,
                                  lora=bool(cfg.tasks))
    t2i_embed = omnimamba_t2i_forward(cfg, n_t2i, logits=False) - t2i_backbone
    t2i_head = 2 * n_t2i * cfg.num_image_tokens * cfg.d_model * cfg.image_vocab_size
    total += through(backbone, lora or t2i_inputs or text_embedding) * t2i_backbone
    total += through(t2i_inputs or text_embedding, False) * t2i_embed
    total += through(t2i_inputs, backbone or lora or t2i_inputs or text_embedding) * t2i_head
    return total
