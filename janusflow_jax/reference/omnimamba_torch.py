"""The PyTorch reference of OmniMamba's composite language model (hustvl/OmniMamba: models/omnimamba.py,
models/mamba_vlm.py, models/stage2/{mixer_seq_simple,block,lora}.py; docs/reference.md §9.1): what the OmniMamba
parity and conversion tests compare against.

Written fresh from the release's semantics, not copied. The Mamba-2 mixer is transformers' `Mamba2Mixer` (its
pure-PyTorch CPU path, numerically the release's mamba_ssm Mamba2 for ngroups = 1: the same key names), with its
`in_proj` replaced by a LoRA linear carrying the release's two adapters. Module names reproduce the release's
state-dict keys exactly:

    llm_backbone.mamba.backbone.embedding.weight                         [vocab, d]   (lm_head tied to it)
    llm_backbone.mamba.backbone.layers.N.norm.weight
    llm_backbone.mamba.backbone.layers.N.mixer.in_proj.weight            [2 d_inner + 2 ng d_state + heads, d]
    llm_backbone.mamba.backbone.layers.N.mixer.in_proj.{mmu,t2i}_lora_A0.weight   [r, d]
    llm_backbone.mamba.backbone.layers.N.mixer.in_proj.{mmu,t2i}_lora_B0.weight   [in_proj rows, r]
    llm_backbone.mamba.backbone.layers.N.mixer.{conv1d.weight, conv1d.bias, dt_bias, A_log, D, norm.weight,
                                                out_proj.weight}
    llm_backbone.mamba.backbone.norm_f.weight
    llm_backbone.mamba.backbone.img_embeddings.word_embeddings.weight    [16384, d]   (img_head tied to it)
    llm_backbone.mamba.backbone.img_embeddings.project_in.projector.{0,2,4}.{weight,bias}
    llm_backbone.mamba.backbone.pos_embed                                [1, 329, d]
    llm_backbone.mamba.backbone.mmu_pos_embed                            [1, 1500, d]
    llm_backbone.mamba.backbone.caption_embed.cap_proj.{fc1,fc2}.weight  [d, d]
    llm_backbone.mamba.img_head.weight, llm_backbone.mamba.lm_head.weight (the tied copies; torch.save keeps both)
    projector.projector.{0,2,4}.{weight,bias}                            2176 -> 8704 -> d -> d

The vision towers (`vision_backbone.*`, timm, not in the released file) and the VQ tokenizer
(`llm_backbone.vqvae.*`) are not built here: they belong to the towers' references.

Forward semantics, as the release computes them:
  t2i: the prompt ids through the text embedding, then caption_embed; the image ids through img_embeddings
       (table, then project_in); concatenated, plus pos_embed[:L]; t2i LoRA; img_head.
  mmu: ids through the text embedding, the projected image features spliced in after the first two; plus
       mmu_pos_embed[:L]; mmu LoRA; lm_head.
Block: residual (fp32) + mixer(RMSNorm(residual)), as mamba_ssm's Block with fused add+norm; final norm_f.

Public API: `reference_config(**overrides)`, `config_1_3b()`, `build_reference(config)`, `randomize_(model, seed)`,
`t2i_logits(model, prompt_ids, image_ids)`, `mmu_logits(model, input_ids, image_features)`,
`project(model, vision_features)`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Mamba2Config as HFMamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer, Mamba2RMSNorm

_CONFIG_1_3B: dict[str, Any] = dict(
    d_model=2048, n_layer=48, d_state=128, headdim=64, expand=2, ngroups=1, d_conv=4, chunk_size=256,
    vocab_size=50288, image_vocab_size=16384, pos_embed_rows=329, mmu_pos_embed_rows=1500, norm_eps=1e-5,
    lora_tasks=("mmu", "t2i"), lora_rank=8, lora_alpha=32.0, lora_dropout=0.05, image_mlp_ratio=4,
    vision_dim=2176,  # DINOv2-L (1024) + SigLIP-SO400M (1152) channels, the projector's input
)


def reference_config(**overrides) -> dict[str, Any]:
    unknown = set(overrides) - set(_CONFIG_1_3B)
    if unknown:
        raise ValueError(f"unknown OmniMamba reference config keys {sorted(unknown)}")
    return {**_CONFIG_1_3B, **overrides}


def config_1_3b() -> dict[str, Any]:
    return dict(_CONFIG_1_3B)


# ---------------------------------------------------------------------------------------------------------- modules
class LoRALinear(nn.Linear):
    """The release's LoRA `Linear` (lora.py) with lora_nums = 1: W·x + scaling · B(A(dropout(x))) with the active
    task's pair; `task` is set by `set_task` (the release's set_lora_mode)."""

    def __init__(self, in_features: int, out_features: int, tasks, rank: int, alpha: float, dropout: float):
        super().__init__(in_features, out_features, bias=False)
        self.tasks, self.scaling, self.task = tuple(tasks), alpha / rank, tasks[0]
        self.lora_dropout = nn.Dropout(dropout)
        for task in self.tasks:
            setattr(self, f"{task}_lora_A0", nn.Linear(in_features, rank, bias=False))
            setattr(self, f"{task}_lora_B0", nn.Linear(rank, out_features, bias=False))
            nn.init.kaiming_uniform_(getattr(self, f"{task}_lora_A0").weight, a=math.sqrt(5))
            nn.init.zeros_(getattr(self, f"{task}_lora_B0").weight)

    def forward(self, x):
        a, b = getattr(self, f"{self.task}_lora_A0"), getattr(self, f"{self.task}_lora_B0")
        return F.linear(x, self.weight) + b(a(self.lora_dropout(x))) * self.scaling


def _hf_mamba2_config(cfg: dict) -> HFMamba2Config:
    d_inner = cfg["expand"] * cfg["d_model"]
    return HFMamba2Config(hidden_size=cfg["d_model"], num_hidden_layers=cfg["n_layer"],
                          num_heads=d_inner // cfg["headdim"], head_dim=cfg["headdim"], state_size=cfg["d_state"],
                          expand=cfg["expand"], n_groups=cfg["ngroups"], conv_kernel=cfg["d_conv"],
                          chunk_size=cfg["chunk_size"], vocab_size=cfg["vocab_size"], use_bias=False,
                          use_conv_bias=True, hidden_act="silu", rms_norm=True, layer_norm_epsilon=cfg["norm_eps"],
                          residual_in_fp32=True, time_step_limit=(0.0, float("inf")), tie_word_embeddings=True)


class Block(nn.Module):
    def __init__(self, cfg: dict, hf_config: HFMamba2Config, index: int):
        super().__init__()
        self.norm = Mamba2RMSNorm(cfg["d_model"], eps=cfg["norm_eps"])
        self.mixer = Mamba2Mixer(hf_config, layer_idx=index)
        old = self.mixer.in_proj
        self.mixer.in_proj = LoRALinear(old.in_features, old.out_features, cfg["lora_tasks"], cfg["lora_rank"],
                                        cfg["lora_alpha"], cfg["lora_dropout"])

    def forward(self, residual):
        return residual.float() + self.mixer(self.norm(residual))


class FusedMLPProjector(nn.Module):
    """Cobra's "fused-gelu-mlp": Linear in -> ratio·in, GELU, Linear -> out, GELU, Linear out -> out (biases, exact
    GELU). The understanding projector (in = 2176) and the image tokens' project_in (in = d) are both this."""

    def __init__(self, in_dim: int, out_dim: int, ratio: int = 4):
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(in_dim, ratio * in_dim), nn.GELU(), nn.Linear(ratio * in_dim, out_dim),
                                       nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x):
        return self.projector(x)


class ImageEmbeddings(nn.Module):
    """GPT2Embeddings(word_embed_proj_dim=d, no positions): the VQ-code table, then project_in."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg["image_vocab_size"], cfg["d_model"])
        self.project_in = FusedMLPProjector(cfg["d_model"], cfg["d_model"], cfg["image_mlp_ratio"])

    def forward(self, ids):
        return self.project_in(self.word_embeddings(ids))


class _CapProj(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1 = nn.Linear(d, d, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.cap_proj = _CapProj(d)

    def forward(self, x):
        return self.cap_proj(x)


class MixerModel(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["d_model"]
        hf_config = _hf_mamba2_config(cfg)
        self.img_embeddings = ImageEmbeddings(cfg)
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, cfg["pos_embed_rows"], d), 0.0, 0.02))
        self.caption_embed = CaptionEmbedder(d)
        self.mmu_pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, cfg["mmu_pos_embed_rows"], d),
                                                                0.0, 0.02))
        self.embedding = nn.Embedding(cfg["vocab_size"], d)
        self.layers = nn.ModuleList([Block(cfg, hf_config, i) for i in range(cfg["n_layer"])])
        self.norm_f = Mamba2RMSNorm(d, eps=cfg["norm_eps"])

    def set_task(self, task: str):
        for layer in self.layers:
            layer.mixer.in_proj.task = task

    def forward(self, embeddings, task: str):
        self.set_task(task)
        h = embeddings
        for layer in self.layers:
            h = layer(h)
        return self.norm_f(h)


class MambaLMHeadModel(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.backbone = MixerModel(cfg)
        self.img_head = nn.Linear(cfg["d_model"], cfg["image_vocab_size"], bias=False)
        self.lm_head = nn.Linear(cfg["d_model"], cfg["vocab_size"], bias=False)
        self.img_head.weight = self.backbone.img_embeddings.word_embeddings.weight  # tied (the release's tie_weights)
        self.lm_head.weight = self.backbone.embedding.weight


class LLMBackbone(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.mamba = MambaLMHeadModel(cfg)


class OmniMambaReference(nn.Module):
    """llm_backbone + projector, the release's OmniMamba without its vision towers and VQ model."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.config = dict(cfg)
        self.llm_backbone = LLMBackbone(cfg)
        self.projector = FusedMLPProjector(cfg["vision_dim"], cfg["d_model"])


def build_reference(config: dict, dtype=torch.float32) -> OmniMambaReference:
    return OmniMambaReference(config).to(dtype).eval()


def randomize_(model: OmniMambaReference, seed: int = 0) -> OmniMambaReference:
    """Every tensor random and O(1)-scaled, the LoRA B's and SSM parameters included (their inits are zeros/ones).
    Tied tables are set once."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda shape: torch.randn(shape, generator=gen)  # noqa: E731
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if name.endswith("A_log"):  # A in -[0.5, 4]
                value = torch.log(0.5 + 3.5 * torch.rand(p.shape, generator=gen))
            elif name.endswith("dt_bias"):
                value = -1.5 + 0.7 * randn(p.shape)
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                value = 1.0 + 0.2 * randn(p.shape)
            elif name.endswith("embedding.weight") or name.endswith("word_embeddings.weight"):
                value = randn(p.shape)
            elif name.endswith("pos_embed"):
                value = 0.5 * randn(p.shape)
            elif name.endswith("conv1d.weight"):
                value = 0.5 * randn(p.shape)
            elif "_lora_" in name:
                value = 0.5 * randn(p.shape) / math.sqrt(p.shape[1])
            elif p.ndim >= 2:
                value = randn(p.shape) / math.sqrt(p.shape[1])
            else:  # D, conv bias, linear biases
                value = 0.3 * randn(p.shape)
            p.copy_(value)
    return model


# ---------------------------------------------------------------------------------------------------------- forwards
def t2i_logits(model: OmniMambaReference, prompt_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """prompt_ids [b, P] (the t2i prompt, the release's caption_ids), image_ids [b, n] -> image logits [b, n, V_img]
    predicting image tokens 0 .. n-1."""
    lm = model.llm_backbone.mamba
    backbone = lm.backbone
    prompt = backbone.caption_embed(backbone.embedding(prompt_ids))
    embeds = torch.cat([prompt, backbone.img_embeddings(image_ids)], dim=1)
    embeds = embeds + backbone.pos_embed[:, :embeds.shape[1]]
    hidden = backbone(embeds, "t2i")
    p, n = prompt_ids.shape[1], image_ids.shape[1]
    return lm.img_head(hidden[:, p - 1:p - 1 + n])


def mmu_logits(model: OmniMambaReference, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
    """input_ids [b, S] = [<|mmu|>, <|soi|>, <|eoi|>, <|sot|>, text ...], image_features [b, F, d] (after the
    projector) -> text logits [b, S + F, V] at every position."""
    lm = model.llm_backbone.mamba
    backbone = lm.backbone
    text = backbone.embedding(input_ids)
    embeds = torch.cat([text[:, :2], image_features, text[:, 2:]], dim=1)
    embeds = embeds + backbone.mmu_pos_embed[:, :embeds.shape[1]]
    return lm.lm_head(backbone(embeds, "mmu"))


def project(model: OmniMambaReference, vision_features: torch.Tensor) -> torch.Tensor:
    """[b, F, vision_dim] fused DINOv2 + SigLIP patch features -> [b, F, d] (the projector)."""
    return model.projector(vision_features)
