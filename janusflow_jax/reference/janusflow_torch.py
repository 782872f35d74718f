"""The PyTorch reference of JanusFlow's ``MultiModalityCausalLM`` (official deepseek-ai/Janus,
``janus/janusflow/models/``): what the parity and checkpoint-export tests compare against and what `launch.bench torch`
times (`perf/torch_baseline.py` adds the training objective and the demo's sampling loop around it).

Written fresh from the official semantics, not copied. Real library modules are used wherever the official
model uses them: ``transformers.LlamaForCausalLM`` (LLM), ``timm``'s ``VisionTransformer`` (SigLIP), diffusers'
``Timesteps``/``TimestepEmbedding`` and transformers' ``LlamaRMSNorm``. Only the ShallowUViT pieces (ConvNeXt block,
GRN, mid block, Unpatchify, encoder, decoder) are re-implemented here, following ``uvit.py``.

Differences from the official class, all deliberate:
  * the widths that ``modeling_vlm.py`` hard-codes (1024 / 2048 / 768 between towers) are derived from the config,
    so tiny configs work; for the 1.3B config they coincide with the hard-coded values;
  * the SigLIP params may carry ``width``/``layers``/``heads``/``patch_size``/``mlp_ratio`` overrides (the official
    ``create_siglip_vit`` silently swallows such keys);
  * no ``PreTrainedModel`` wrapper: ``state_dict()`` keys are nevertheless exactly the official checkpoint names.

Public API:
  official_config(**overrides) / config_1_3b() / config_tiny()  -- config dicts in config.json format
  build_reference(config, dtype=torch.float32) -> nn.Module
  understand_logits(model, input_ids, pixel_values, images_seq_mask, images_emb_mask, attention_mask) -> logits
  velocity(model, prompt_ids, prompt_mask, z_t, t, return_repa_features=False, repa_layer=6) -> v [, feats]
"""

from __future__ import annotations

import copy
import math
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from timm.models.vision_transformer import VisionTransformer
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------

_CONFIG_1_3B: dict[str, Any] = {
    "architectures": ["MultiModalityCausalLM"],
    "model_type": "multi_modality",
    "torch_dtype": "bfloat16",
    "language_config": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "max_position_embeddings": 16384,
        "model_type": "llama",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "num_key_value_heads": 16,
        "torch_dtype": "bfloat16",
        "vocab_size": 102400,
    },
    "vision_und_enc_config": {
        "cls": "CLIPVisionTower",
        "model_type": "vision_und_enc",
        "params": {
            "image_size": 384,
            "model_name": "siglip_large_patch16_384",
            "select_feature": "same",
            "select_layer": -1,
        },
    },
    "vision_gen_enc_config": {
        "cls": "ShallowUViTEncoder",
        "model_type": "vision_gen_enc",
        "params": {
            "block_out_channels": [768],
            "elementwize_affine": True,  # sic (typo in the release config); swallowed by **kwargs
            "hidden_size": 2048,
            "input_channels": 4,
            "kernel_size": 2,
            "layers_in_middle": 2,
            "norm_eps": 1e-6,
            "num_extra_tensors": 5,  # ignored by the official code
            "padding": 0,
            "stride": 2,
            "use_bias": True,
            "use_mid_block": True,
        },
    },
    "vision_gen_dec_config": {
        "cls": "ShallowUViTDecoder",
        "model_type": "vision_gen_dec",
        "params": {
            "block_out_channels": [768],
            "elementwise_affine": True,
            "hidden_size": 2048,
            "in_channels": 768,
            "layers_in_middle": 2,
            "norm_eps": 1e-6,
            "out_channels": 4,
            "upsamples": 1,
            "use_bias": True,
            "use_mid_block": True,
        },
    },
}

_TINY_OVERRIDES: dict[str, Any] = {
    "language_config": {
        "hidden_size": 64,
        "intermediate_size": 96,
        "max_position_embeddings": 512,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "vocab_size": 128,
    },
    "vision_und_enc_config": {
        "params": {"image_size": 64, "width": 32, "layers": 2, "heads": 2, "patch_size": 16},
    },
    # hidden_size of the gen towers is the FiLM condition width = t_emb width = LLM hidden size.
    "vision_gen_enc_config": {"params": {"block_out_channels": [24], "hidden_size": 64}},
    "vision_gen_dec_config": {"params": {"block_out_channels": [24], "in_channels": 24, "hidden_size": 64}},
}


def _deep_merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def official_config(**overrides: Any) -> dict:
    """The JanusFlow-1.3B config.json dict, with ``overrides`` deep-merged into it (nested dicts merge key by key,
    e.g. ``official_config(language_config={"num_hidden_layers": 2})``)."""
    return _deep_merge(_CONFIG_1_3B, overrides)


def config_1_3b() -> dict:
    return official_config()


def config_tiny() -> dict:
    """Tiny config for fast tests: LLM 64 wide / 2 layers / 4 heads / 2 KV heads / vocab 128; SigLIP 32 wide,
    2 layers, 2 heads, patch 16 at 64x64 (16 patches); gen towers with 24 channels."""
    return official_config(**_TINY_OVERRIDES)


# ----------------------------------------------------------------------------------------------------------------
# Understanding tower: SigLIP ViT (siglip_vit.py + clip_encoder.py)
# ----------------------------------------------------------------------------------------------------------------

# Model-name table of siglip_vit.py (its "image_size" entries are never used: the image_size argument wins).
_SIGLIP_TABLE = {
    "siglip_so400m_patch14_384": dict(patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_so400m_patch14_224": dict(patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_large_patch16_384": dict(patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4),
    "siglip_large_patch16_256": dict(patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4),
}


def _siglip_dims(params: dict) -> dict:
    """Resolve the SigLIP geometry: table entry, then optional overrides, then create_siglip_vit's depth rule."""
    name = params.get("model_name", "siglip_large_patch16_384")
    if not name.startswith("siglip"):
        raise NotImplementedError(f"only SigLIP understanding towers are supported, got {name!r}")
    dims = dict(_SIGLIP_TABLE.get(name, {}))  # a name outside the table (a tiny test tower) gives every size
    for key in ("width", "layers", "heads", "patch_size", "mlp_ratio"):
        if key in params:
            dims[key] = params[key]
    missing = [k for k in ("width", "layers", "heads", "patch_size", "mlp_ratio") if k not in dims]
    if missing:
        raise ValueError(f"SigLIP {name!r} is not in the official table and its config lacks {missing}")
    # CLIPVisionTower defaults (clip_encoder.py): image_size 336, select_layer -2 when absent from the config.
    dims["image_size"] = params.get("image_size", 336)
    select_layer = params.get("select_layer", -2)
    full = dims["layers"]
    dims["depth"] = min(full, full + select_layer + 1) if select_layer <= 0 else min(full, select_layer)
    return dims


class SigLIPTower(nn.Module):
    """CLIPVisionTower holding a timm VisionTransformer at ``.vision_tower`` (keys ``vision_tower.*``)."""

    def __init__(self, params: dict):
        super().__init__()
        d = _siglip_dims(params)
        self.width = d["width"]
        # siglip_vit.py hard-codes LayerNorm(eps=1e-6) and exact nn.GELU; global_pool "map" builds the (unused)
        # attention-pool head, whose tensors are part of the checkpoint. timm 1.0.31 names them exactly as the
        # official copy does (latent, q, kv, proj, norm, mlp.fc1/fc2; no pos_embed / q_norm params by default).
        self.vision_tower = VisionTransformer(
            img_size=d["image_size"],
            patch_size=d["patch_size"],
            embed_dim=d["width"],
            depth=d["depth"],
            num_heads=d["heads"],
            mlp_ratio=d["mlp_ratio"],
            qkv_bias=True,
            class_token=False,
            global_pool="map",
            num_classes=0,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            act_layer=nn.GELU,
            dynamic_img_size=False,
        )
        mean, std = params.get("pixel_mean"), params.get("pixel_std")
        # clip_encoder.py normalises inside the tower only when both are configured (not the case for the release).
        self.image_norm = torchvision.transforms.Normalize(mean, std) if mean is not None and std is not None else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_norm is not None:
            images = self.image_norm(images)
        # ignore_head=True in the official ViT: forward == forward_features (final LayerNorm applied, attn_pool not);
        # select_feature is forced to "same" for SigLIP names, so the tokens are returned as is.
        return self.vision_tower.forward_features(images)


# ----------------------------------------------------------------------------------------------------------------
# Generation towers: ShallowUViT encoder / decoder (uvit.py)
# ----------------------------------------------------------------------------------------------------------------


def _rms_nchw(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a channel RMSNorm to an NCHW tensor (uvit.py permutes to NHWC around every norm)."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on NHWC input; params kept as (1, 1, 1, C) like the checkpoint; zero-initialised."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)  # L2 over H, W per channel
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)  # divided by the channel mean
        # bias + (weight * n + 1) * x; addcmul (a fused multiply-add on CPU) as in uvit.py keeps fp32 bit-exact.
        return torch.addcmul(self.bias, self.weight * n + 1, x)


class ConvNextBlock(nn.Module):
    def __init__(self, channels: int, cond_dim: int, norm_eps: float, use_bias: bool, ffn_factor: int = 4):
        super().__init__()
        inner = int(channels * ffn_factor)
        # Attribute names (and their creation order) reproduce the official state-dict keys.
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels, bias=use_bias)
        self.norm = LlamaRMSNorm(channels, eps=norm_eps)
        self.channelwise_linear_1 = nn.Linear(channels, inner, bias=use_bias)
        self.channelwise_norm = GlobalResponseNorm(inner)
        self.channelwise_linear_2 = nn.Linear(inner, channels, bias=use_bias)
        self.cond_embeds_mapper = nn.Linear(cond_dim, 2 * channels, bias=use_bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)  # per-pixel ops run in NHWC
        h = self.norm(h)
        h = F.gelu(self.channelwise_linear_1(h))  # exact (erf) GELU, nn.GELU() in uvit.py
        h = self.channelwise_norm(h)
        h = self.channelwise_linear_2(h).permute(0, 3, 1, 2)
        # branch + residual, in this order: the result then inherits the branch's channels-last strides as in
        # uvit.py, and the next depthwise conv picks the same kernel, which keeps fp32 outputs bit-identical.
        x = h + x
        # FiLM AFTER the residual add; the mapper sees SiLU(cond); first half = scale, second half = shift.
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)
        # shift + x * (1 + scale), fused like uvit.py (bit-exact fp32 parity with the official block).
        return torch.addcmul(shift[:, :, None, None], x, (1 + scale)[:, :, None, None])


class UViTMidBlock(nn.Module):
    """UVitBlock with downsample=upsample=False (the only configuration JanusFlow builds): a stack of ConvNeXt."""

    def __init__(self, channels: int, num_blocks: int, cond_dim: int, norm_eps: float, use_bias: bool):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ConvNextBlock(channels, cond_dim, norm_eps, use_bias) for _ in range(num_blocks)
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x, cond)
        return x


class Unpatchify(nn.Module):
    """RMSNorm over channels -> 1x1 conv to out*p*p channels -> PixelShuffle(p) (patch size 2 in uvit.py)."""

    def __init__(self, in_channels: int, out_channels: int, patch_size: int, use_bias: bool, eps: float):
        super().__init__()
        self.norm = LlamaRMSNorm(in_channels, eps=eps)
        self.unpatch_conv = nn.Conv2d(in_channels, out_channels * patch_size**2, kernel_size=1, bias=use_bias)
        self.pixel_shuffle = nn.PixelShuffle(patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixel_shuffle(self.unpatch_conv(_rms_nchw(self.norm, x)))


class ShallowUViTEncoder(nn.Module):
    """latent z [B, C_in, H, W] + timesteps (0..1000 scale) -> (z_emb [B, C, H/s, W/s], t_emb [B, D], [z_emb])."""

    def __init__(self, input_channels=3, stride=4, kernel_size=7, padding=None, block_out_channels=(768,),
                 layers_in_middle=2, hidden_size=2048, use_bias=True, norm_eps=1e-6, use_mid_block=True, **_unused):
        super().__init__()
        channels = block_out_channels[0]
        self.time_proj = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(channels, hidden_size, sample_proj_bias=use_bias)
        if padding is None:  # uvit.py's default rule (the release config passes padding 0 explicitly)
            padding = math.ceil(kernel_size - stride)
        # in_conv keeps nn.Conv2d's default bias=True whatever use_bias says (as in uvit.py).
        self.in_conv = nn.Conv2d(input_channels, channels, kernel_size=kernel_size, stride=stride, padding=padding)
        self.mid_block = (
            UViTMidBlock(block_out_channels[-1], layers_in_middle, hidden_size, norm_eps, use_bias)
            if use_mid_block else None
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor):
        # The sinusoid is computed in fp32 by diffusers, then cast to the activation dtype before the MLP.
        t_emb = self.time_embed(self.time_proj(timesteps.flatten()).view(x.shape[0], -1).to(x.dtype))
        z = self.in_conv(x)
        if self.mid_block is not None:
            z = self.mid_block(z, t_emb)
        return z, t_emb, [z]  # the skip list holds the post-mid-block features


class ShallowUViTDecoder(nn.Module):
    """LLM features [B, in_channels, h, w] + encoder skip + t_emb -> velocity [B, out_channels, 2^u h, 2^u w]."""

    def __init__(self, in_channels=768, out_channels=3, block_out_channels=(768,), upsamples=2, layers_in_middle=2,
                 hidden_size=2048, norm_eps=1e-6, use_bias=True, use_mid_block=True, **_unused):
        super().__init__()
        skip = block_out_channels[-1]
        self.mid_block = (
            UViTMidBlock(in_channels + skip, layers_in_middle, hidden_size, norm_eps, use_bias)
            if use_mid_block else None
        )
        convs = []
        for rank in range(upsamples):
            c_in = in_channels + skip if rank == 0 else skip
            c_out = out_channels if rank == upsamples - 1 else skip
            convs.append(Unpatchify(c_in, c_out, patch_size=2, use_bias=use_bias, eps=norm_eps))
        self.out_convs = nn.ModuleList(convs)
        self.input_norm = LlamaRMSNorm(in_channels, eps=norm_eps)

    def forward(self, x: torch.Tensor, hs: list, t_emb: torch.Tensor) -> torch.Tensor:
        hs = list(hs)  # uvit.py pops from the caller's list; work on a copy
        x = torch.cat([_rms_nchw(self.input_norm, x), hs.pop()], dim=1)  # [LLM path, encoder skip]
        assert not hs
        if self.mid_block is not None:
            x = self.mid_block(x, t_emb)
        for conv in self.out_convs:
            x = conv(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Full model (modeling_vlm.py)
# ----------------------------------------------------------------------------------------------------------------

_LLAMA_DROP_KEYS = ("torch_dtype", "dtype", "architectures", "transformers_version")


def _llama_config(language_config: dict) -> LlamaConfig:
    cfg = {k: v for k, v in language_config.items() if k not in _LLAMA_DROP_KEYS}
    # transformers 5.23 LlamaConfig defaults already give rms_norm_eps 1e-6, rope_parameters
    # {"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings False, no biases; a legacy top-level
    # "rope_theta" key is folded into rope_parameters. Pin the values the release relies on when absent.
    cfg.setdefault("rms_norm_eps", 1e-6)
    cfg.setdefault("tie_word_embeddings", False)
    if "rope_theta" not in cfg and "rope_parameters" not in cfg and "rope_scaling" not in cfg:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    return LlamaConfig(**cfg, attn_implementation="eager")


class JanusFlowReference(nn.Module):
    """Same submodule names / creation order as MultiModalityCausalLM, so state_dict() keys match the checkpoint."""

    def __init__(self, config: dict):
        super().__init__()
        llama_cfg = _llama_config(config["language_config"])
        d_llm = llama_cfg.hidden_size
        und_params = dict(config["vision_und_enc_config"].get("params", {}))
        gen_enc_params = dict(config["vision_gen_enc_config"].get("params", {}))
        gen_dec_params = dict(config["vision_gen_dec_config"].get("params", {}))

        self.vision_und_enc_model = SigLIPTower(und_params)
        self.vision_und_enc_aligner = nn.Linear(self.vision_und_enc_model.width, d_llm, bias=True)  # 1024->2048
        self.beg_of_und_embed = nn.Parameter(torch.zeros(1, d_llm))
        self.vision_gen_enc_model = ShallowUViTEncoder(**gen_enc_params)
        enc_channels = gen_enc_params.get("block_out_channels", (768,))[-1]
        self.vision_gen_enc_aligner = nn.Linear(enc_channels, d_llm, bias=True)  # 768->2048
        self.vision_gen_dec_model = ShallowUViTDecoder(**gen_dec_params)
        self.language_model = LlamaForCausalLM(llama_cfg)
        self.vision_gen_dec_aligner_norm = LlamaRMSNorm(d_llm, eps=llama_cfg.rms_norm_eps)
        self.vision_gen_dec_aligner = nn.Linear(d_llm, gen_dec_params.get("in_channels", 768), bias=True)  # 2048->768

    def prepare_inputs_embeds(self, input_ids, pixel_values, images_seq_mask, images_emb_mask) -> torch.Tensor:
        b, n = pixel_values.shape[:2]
        feats = self.vision_und_enc_aligner(self.vision_und_enc_model(pixel_values.flatten(0, 1)))
        # Each image contributes [beg_of_und_embed, patch_1, ..., patch_P]; the <begin_of_image> slot of the
        # sequence receives beg_of_und_embed (not its token embedding). modeling_vlm.py detaches it here.
        boi = self.beg_of_und_embed[0].detach().to(feats.dtype).expand(feats.shape[0], 1, -1)
        feats = torch.cat([boi, feats], dim=1).reshape(b, -1, feats.shape[-1])  # [b, n * (1 + P), D]
        ids = input_ids.clone()
        ids[ids < 0] = 0  # the official code writes this into the caller's tensor; we do not
        embeds = self.language_model.get_input_embeddings()(ids)
        embeds[images_seq_mask.bool()] = feats[images_emb_mask.reshape(b, -1).bool()]
        return embeds


def build_reference(config: dict, dtype: torch.dtype = torch.float32) -> JanusFlowReference:
    """Build the reference model from a config.json-style dict (random init; load weights with load_state_dict).

    Works under ``with torch.device("meta"):``. ``dtype`` casts every floating tensor like the demo's
    ``vl_gpt.to(torch.bfloat16)``, including the LLM's non-persistent rotary ``inv_freq`` buffer."""
    model = JanusFlowReference(config)
    return model.to(dtype).eval()


def understand_logits(model, input_ids, pixel_values, images_seq_mask, images_emb_mask, attention_mask):
    """Understanding forward: prepare_inputs_embeds then LlamaForCausalLM logits [B, T, V] (no position_ids, so
    positions are arange(T) for every row, including left-padded ones). Autograd is left on."""
    embeds = model.prepare_inputs_embeds(input_ids, pixel_values, images_seq_mask, images_emb_mask)
    return model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).logits


def velocity(model, prompt_ids, prompt_mask, z_t, t, return_repa_features=False, repa_layer=6):
    """One rectified-flow velocity evaluation as in demo/app_janusflow.py's ODE loop (without CFG mixing).

    prompt_ids [B, L] are the text tokens (BOS + prompt, the trailing image tag already dropped); the sequence fed
    to the LLM is [prompt embeddings, t_emb, N latent tokens]. t in [0, 1]; the model sees 1000*t (fp32 here; the
    demo rounds it to bf16). Returns v [B, C, H, W], and with ``return_repa_features`` also the residual stream
    after ``repa_layer`` blocks at the N latent positions, [B, N, D] (hidden_states[k] is pre-final-norm for
    k < num_layers; hidden_states[num_layers] is the normed output). Autograd is left on: wrap the call in
    torch.no_grad() for inference."""
    t_in = t.to(torch.float32) * 1000.0
    z_emb, t_emb, hs = model.vision_gen_enc_model(z_t, t_in)
    b, _, gh, gw = z_emb.shape
    n = gh * gw
    z_tok = model.vision_gen_enc_aligner(z_emb.flatten(2).transpose(1, 2))  # token k = row k // gw, col k % gw
    text = model.language_model.get_input_embeddings()(prompt_ids)
    embeds = torch.cat([text, t_emb[:, None].to(text.dtype), z_tok.to(text.dtype)], dim=1)
    mask = torch.cat([prompt_mask.long(), prompt_mask.new_ones(b, 1 + n, dtype=torch.long)], dim=1)
    out = model.language_model.model(
        inputs_embeds=embeds, attention_mask=mask, output_hidden_states=return_repa_features
    )
    # Read-out at the SAME positions as the latent inputs (no shift). last_hidden_state already went through the
    # LLM's final norm; vision_gen_dec_aligner_norm is a second RMSNorm on top (as in the demo).
    h = model.vision_gen_dec_aligner(model.vision_gen_dec_aligner_norm(out.last_hidden_state[:, -n:]))
    h = h.reshape(b, gh, gw, -1).permute(0, 3, 1, 2)
    v = model.vision_gen_dec_model(h, hs, t_emb)
    if return_repa_features:
        return v, out.hidden_states[repa_layer][:, -n:]
    return v
