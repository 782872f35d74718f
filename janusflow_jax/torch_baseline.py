"""PyTorch eager baselines of the same work `bench.py` times in JAX: the velocity forward, a training step, and the
official demo's CFG sampling loop (REFERENCE.md §5). For speed comparisons only; weights are random.

The model is JanusFlow's architecture at the sizes of a `JanusFlowConfig`, built from the libraries the official
code builds it from: transformers `LlamaForCausalLM` (LLM, the default SDPA attention), timm `VisionTransformer`
(SigLIP), diffusers `Timesteps`/`TimestepEmbedding` (the generation encoder's time embedding); the ShallowUViT
ConvNeXt towers and the REPA projector are written here. Tensors follow torch's layouts: images and latents NCHW.

torch is an optional extra: this module imports it at import time, so import the module lazily
(`bench.py` does, only in its `torch` mode).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from janusflow_jax.config import JanusFlowConfig


# --------------------------------------------------------------------------------------------- generation towers
class _GRN(nn.Module):
    """ConvNeXt-V2 global response norm over an NHWC tensor."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        g = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        return self.bias + (self.weight * (g / (g.mean(dim=-1, keepdim=True) + 1e-6)) + 1) * x


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class _ConvNeXt(nn.Module):
    """Depthwise 7x7 -> RMSNorm -> Linear -> GELU -> GRN -> Linear, residual, then FiLM from the time embedding
    (FiLM after the residual add, as in the released ShallowUViT)."""

    def __init__(self, channels: int, cond: int, eps: float, ffn: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = _RMSNorm(channels, eps)
        self.linear_1 = nn.Linear(channels, ffn * channels)
        self.grn = _GRN(ffn * channels)
        self.linear_2 = nn.Linear(ffn * channels, channels)
        self.cond_mapper = nn.Linear(cond, 2 * channels)

    def forward(self, x, cond):
        h = self.norm(self.depthwise(x).permute(0, 2, 3, 1))
        h = self.linear_2(self.grn(F.gelu(self.linear_1(h)))).permute(0, 3, 1, 2)
        scale, shift = self.cond_mapper(F.silu(cond)).chunk(2, dim=1)
        return (h + x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class GenEncoder(nn.Module):
    """latents [batch, C, G, G] + 1000 t [batch] -> (features [batch, channels, G/s, G/s], t_emb [batch, hidden])."""

    def __init__(self, cfg: JanusFlowConfig):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        e, hidden = cfg.gen_encoder, cfg.llm.hidden_size
        self.time_proj = Timesteps(e.channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(e.channels, hidden)
        self.in_conv = nn.Conv2d(e.in_channels, e.channels, e.kernel_size, stride=e.stride, padding=e.padding)
        self.blocks = nn.ModuleList(_ConvNeXt(e.channels, hidden, e.norm_eps, e.ffn_factor)
                                    for _ in range(e.num_blocks))

    def forward(self, z, timesteps):
        t_emb = self.time_embed(self.time_proj(timesteps).to(z.dtype))
        x = self.in_conv(z)
        for block in self.blocks:
            x = block(x, t_emb)
        return x, t_emb


class GenDecoder(nn.Module):
    """LLM read-out [batch, in_channels, g, g] ++ encoder skip -> ConvNeXt -> unpatchify -> velocity NCHW."""

    def __init__(self, cfg: JanusFlowConfig):
        super().__init__()
        d, hidden = cfg.gen_decoder, cfg.llm.hidden_size
        c = d.in_channels + d.channels
        self.input_norm = _RMSNorm(d.in_channels, d.norm_eps)
        self.blocks = nn.ModuleList(_ConvNeXt(c, hidden, d.norm_eps, d.ffn_factor) for _ in range(d.num_blocks))
        ups = []
        for rank in range(d.upsamples):
            c_in = c if rank == 0 else d.channels
            c_out = d.out_channels if rank == d.upsamples - 1 else d.channels
            ups.append(nn.ModuleDict(dict(norm=_RMSNorm(c_in, d.norm_eps), conv=nn.Conv2d(c_in, 4 * c_out, 1))))
        self.ups = nn.ModuleList(ups)

    def forward(self, x, skip, t_emb):
        x = torch.cat([self.input_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), skip], dim=1)
        for block in self.blocks:
            x = block(x, t_emb)
        for up in self.ups:
            x = F.pixel_shuffle(up["conv"](up["norm"](x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)), 2)
        return x


# ----------------------------------------------------------------------------------------------------- the model
class JanusFlowTorch(nn.Module):
    """LLM + SigLIP + aligners + generation towers + REPA projector, at the sizes of `cfg`."""

    def __init__(self, cfg: JanusFlowConfig):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer
        from transformers import LlamaConfig, LlamaForCausalLM

        self.cfg = cfg
        c, v = cfg.llm, cfg.und_encoder
        self.language_model = LlamaForCausalLM(LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
            head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=c.tie_word_embeddings, rope_parameters={"rope_type": "default",
                                                                        "rope_theta": c.rope_theta}))
        self.und_encoder = VisionTransformer(
            img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth, num_heads=v.num_heads,
            mlp_ratio=v.mlp_dim / v.width, qkv_bias=True, class_token=False, global_pool="map", num_classes=0,
            norm_layer=partial(nn.LayerNorm, eps=v.layer_norm_eps), act_layer=nn.GELU, dynamic_img_size=False)
        self.und_aligner = nn.Linear(v.width, c.hidden_size)
        self.beg_of_und_embed = nn.Parameter(torch.zeros(1, c.hidden_size))
        self.gen_encoder = GenEncoder(cfg)
        self.gen_enc_aligner = nn.Linear(cfg.gen_encoder.channels, c.hidden_size)
        self.gen_dec_aligner_norm = _RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gen_dec_aligner = nn.Linear(c.hidden_size, cfg.gen_decoder.in_channels)
        self.gen_decoder = GenDecoder(cfg)
        h = cfg.repa.hidden_dim
        self.repa_projector = nn.Sequential(nn.Linear(c.hidden_size, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(),
                                            nn.Linear(h, v.width))

    def understand_logits(self, input_ids, images, image_token_mask, attention_mask):
        """input_ids [batch, seq]; images [batch, 3, H, W] or None -> logits [batch, seq, vocab]."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if images is not None:
            feats = self.und_aligner(self.und_encoder.forward_features(images))
            beg = self.beg_of_und_embed.expand(feats.shape[0], 1, -1)
            feats = torch.cat([beg, feats], dim=1).reshape(-1, feats.shape[-1])
            # As the official prepare_inputs_embeds: the image slots take the image tokens in order.
            embeds = embeds.masked_scatter(image_token_mask.bool()[..., None], feats.to(embeds.dtype))
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask).logits

    def velocity(self, prompt_ids, prompt_mask, z_t, t, return_repa_features=False):
        """v(z_t, t | prompt), recomputing the whole [prompt, t_emb, latent tokens] sequence (the official demo).

        prompt_ids/prompt_mask [batch, L]; z_t [batch, C, G, G]; t [batch] in [0, 1]. Returns v [batch, C, G, G]
        (and the REPA projection of the residual stream after block `repa.layer` at the latent tokens)."""
        z, t_emb = self.gen_encoder(z_t, 1000.0 * t)
        b, _, g, _ = z.shape
        n = g * g
        tokens = self.gen_enc_aligner(z.flatten(2).transpose(1, 2))
        text = self.language_model.get_input_embeddings()(prompt_ids)
        embeds = torch.cat([text, t_emb[:, None].to(text.dtype), tokens.to(text.dtype)], dim=1)
        mask = torch.cat([prompt_mask.long(), prompt_mask.new_ones(b, 1 + n, dtype=torch.long)], dim=1)
        out = self.language_model.model(inputs_embeds=embeds, attention_mask=mask,
                                        output_hidden_states=return_repa_features)
        h = self.gen_dec_aligner(self.gen_dec_aligner_norm(out.last_hidden_state[:, -n:]))
        v = self.gen_decoder(h.reshape(b, g, g, -1).permute(0, 3, 1, 2), z, t_emb)
        if not return_repa_features:
            return v
        return v, self.repa_projector(out.hidden_states[self.cfg.repa.layer][:, -n:])


def default_device() -> torch.device:
    """The GPU when torch sees one, else the CPU (the baselines run where the JAX side runs)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device | str | None = None):
    """Waits for the device's queued work (CUDA runs asynchronously; timings must include it)."""
    if torch.device(device or default_device()).type == "cuda":
        torch.cuda.synchronize()


def build_model(cfg: JanusFlowConfig, freeze_und_encoder: bool = True, seed: int = 0,
                device: torch.device | str | None = None) -> JanusFlowTorch:
    """Random-initialised model in the config's compute dtype on `device` (default: `default_device()`), created
    there directly (a 1.3B model initialised on the host takes long); SigLIP frozen as in stages 1-2 (no grads)."""
    torch.manual_seed(seed)
    with torch.device(device or default_device()):
        model = JanusFlowTorch(cfg)
    model = model.to(torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)
    if freeze_und_encoder:
        model.und_encoder.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------- the work
def to_torch_batch(batch: dict, dtype=torch.float32, device: torch.device | str | None = None) -> dict:
    """A `batch.py` batch (numpy, NHWC) -> torch tensors on `device` (NCHW images and latents)."""
    out = {}
    for k, x in batch.items():
        t = torch.from_numpy(x).to(device or default_device())
        if k in ("und/images", "gen/images", "gen/latents"):
            if k == "und/images":
                t = t[:, 0]  # first image of each row (images_per_row = 1 in the configs benchmarked)
            t = t.permute(0, 3, 1, 2).contiguous().to(dtype)
        out[k] = t
    return out


def _next_token_loss_sum(logits, ids, loss_mask):
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return (ce * loss_mask[:, 1:].flatten().float()).sum()


def loss(model: JanusFlowTorch, batch: dict, generator: torch.Generator):
    """The JanusFlow objective (AR + rectified flow + REPA, each averaged as `objective.total_loss`) on a batch.

    Attention masks only hide padding (packed rows are not split into segments: same matmul work)."""
    total, ar, ar_count = 0.0, 0.0, 0.0
    for kind in ("und", "text"):
        if f"{kind}/input_ids" in batch:
            ids = batch[f"{kind}/input_ids"].long()
            mask = (batch[f"{kind}/segment_ids"] > 0).long()
            images = batch.get("und/images") if kind == "und" else None
            logits = model.understand_logits(ids, images, batch.get("und/image_token_mask"), mask)
            ar = ar + _next_token_loss_sum(logits, ids, batch[f"{kind}/loss_mask"])
            ar_count = ar_count + batch[f"{kind}/loss_mask"][:, 1:].sum().float()  # a tensor: no host sync
    total = ar / torch.clamp(torch.as_tensor(ar_count), min=1.0)
    if "gen/latents" in batch:
        x = batch["gen/latents"]
        n = x.shape[0]
        # Host generator (reproducible on any device), moved to the batch's device.
        t = torch.sigmoid(torch.randn(n, generator=generator)).to(x.device, x.dtype)  # logit-normal t
        z0 = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        keep = (torch.rand(n, generator=generator) >= 0.1).long()[:, None].to(x.device)  # CFG drop: BOS kept
        prompt_mask = batch["gen/prompt_mask"].long()
        first = (prompt_mask.cumsum(1) == 1) & (prompt_mask != 0)
        prompt_mask = torch.where(keep.bool(), prompt_mask, first.long())
        z_t = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * z0
        v, projected = model.velocity(batch["gen/prompt_ids"].long(), prompt_mask, z_t, t, return_repa_features=True)
        total = total + ((v.float() - (x - z0).float()) ** 2).mean()
        with torch.no_grad():
            target = model.und_encoder.forward_features(batch["gen/images"])
        cosine = F.cosine_similarity(projected.float(), target.float(), dim=-1)
        total = total - cosine.mean()
    return total


def make_train_step(model: JanusFlowTorch, lr: float = 1e-4, clip_norm: float = 1.0):
    """step(batch) -> loss: forward, backward, global-norm clipping, AdamW (b2 0.95) — the JAX step's work."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    model.train()

    def step(batch):
        opt.zero_grad(set_to_none=True)
        value = loss(model, batch, generator)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        return float(value.detach())

    return step


@torch.no_grad()
def sample_official(model: JanusFlowTorch, prompt_ids, prompt_mask, z0, steps: int, cfg: float):
    """The demo's ODE loop (demo/app_janusflow.py): rows [cond; uncond] (uncond = BOS only), the WHOLE sequence
    recomputed at every Euler step, v = w v_cond - (w - 1) v_uncond, z += v dt. z0 [batch, C, G, G] -> latents."""
    b = z0.shape[0]
    first = (prompt_mask.cumsum(1) == 1) & (prompt_mask != 0)
    ids = torch.cat([prompt_ids, prompt_ids]).long()
    mask = torch.cat([prompt_mask.long(), first.long()])
    z, dt = z0.clone(), 1.0 / steps
    for step in range(steps):
        t = torch.full((2 * b,), step / steps, dtype=z.dtype, device=z.device)
        v = model.velocity(ids, mask, torch.cat([z, z]), t)
        z = z + dt * (cfg * v[:b] - (cfg - 1.0) * v[b:])
    return z
