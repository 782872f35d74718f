"""Exact conversion between the official JanusFlow PyTorch checkpoint and JAX parameters, both directions.

The JanusFlow tables: each tower has a function that lists `(jax_path, torch_key, transform)` rules for a config
(`convert/tensors.py` runs them forwards to import and backwards to export, and reports every mismatch at once), the
official config.json <-> `JanusFlowConfig`, the scanned <-> per-layer layouts, and stage 1's starting point from the
parts (an HF Llama directory and a timm SigLIP checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from janusflow_jax import paths
from janusflow_jax.convert.tensors import (CheckpointMismatchError, Rule, StateDict, atomic_write_dir, conv_rules,
                                           export_tensors, flatten, import_tensors, layer_norm_rules, linear_rules,
                                           numpy_dtype, rms_norm_rules)
from janusflow_jax.models import janusflow as model_lib
from janusflow_jax.models.config import (GenDecoderConfig, GenEncoderConfig, JanusFlowConfig, LlamaConfig, RepaConfig,
                                         SigLIPConfig)

__all__ = ["CheckpointMismatchError", "from_pytorch", "to_pytorch", "init_from_parts", "scan_params",
           "unscan_params", "janusflow_rules", "config_from_official", "config_to_official"]


# ---------------------------------------------------------------------------------------------------------- rules
def llama_rules(cfg: LlamaConfig, jax: str = "language_model", torch: str = "language_model.") -> list[Rule]:
    """HF LlamaForCausalLM (`model.layers.{i}...`, `lm_head`). Weights keep HF's rotate-half q/k layout."""
    rules = [(f"{jax}/embed_tokens/embedding", f"{torch}model.embed_tokens.weight", "identity")]
    for i in range(cfg.num_layers):
        j, t = f"{jax}/layers_{i}", f"{torch}model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            rules += linear_rules(f"{j}/self_attn/{name}", f"{t}.self_attn.{name}", bias=False)
        for name in ("gate_proj", "up_proj", "down_proj"):
            rules += linear_rules(f"{j}/mlp/{name}", f"{t}.mlp.{name}", bias=False)
        rules += rms_norm_rules(f"{j}/input_layernorm", f"{t}.input_layernorm")
        rules += rms_norm_rules(f"{j}/post_attention_layernorm", f"{t}.post_attention_layernorm")
    rules += rms_norm_rules(f"{jax}/norm", f"{torch}model.norm")
    if not cfg.tie_word_embeddings:
        rules += linear_rules(f"{jax}/lm_head", f"{torch}lm_head", bias=False)
    return rules


def siglip_rules(cfg: SigLIPConfig, jax: str = "und_encoder",
                 torch: str = "vision_und_enc_model.vision_tower.") -> list[Rule]:
    """timm VisionTransformer (no class token, MAP head)."""
    rules = [(f"{jax}/pos_embed", f"{torch}pos_embed", "identity")]
    rules += conv_rules(f"{jax}/patch_embed/proj", f"{torch}patch_embed.proj")
    for i in range(cfg.depth):
        j, t = f"{jax}/blocks_{i}", f"{torch}blocks.{i}"
        rules += layer_norm_rules(f"{j}/norm1", f"{t}.norm1") + layer_norm_rules(f"{j}/norm2", f"{t}.norm2")
        rules += linear_rules(f"{j}/attn/qkv", f"{t}.attn.qkv") + linear_rules(f"{j}/attn/proj", f"{t}.attn.proj")
        rules += linear_rules(f"{j}/mlp/fc1", f"{t}.mlp.fc1") + linear_rules(f"{j}/mlp/fc2", f"{t}.mlp.fc2")
    rules += layer_norm_rules(f"{jax}/norm", f"{torch}norm")
    if cfg.attn_pool:
        j, t = f"{jax}/attn_pool", f"{torch}attn_pool"
        rules += [(f"{j}/latent", f"{t}.latent", "identity")]
        rules += linear_rules(f"{j}/q", f"{t}.q") + linear_rules(f"{j}/kv", f"{t}.kv") + linear_rules(f"{j}/proj", f"{t}.proj")
        rules += layer_norm_rules(f"{j}/norm", f"{t}.norm")
        rules += linear_rules(f"{j}/mlp/fc1", f"{t}.mlp.fc1") + linear_rules(f"{j}/mlp/fc2", f"{t}.mlp.fc2")
    return rules


def _mid_block_rules(num_blocks: int, use_bias: bool, jax: str, torch: str) -> list[Rule]:
    rules = []
    for k in range(num_blocks):
        j, t = f"{jax}/mid_block/res_blocks_{k}", f"{torch}mid_block.res_blocks.{k}"
        rules += conv_rules(f"{j}/depthwise", f"{t}.depthwise", use_bias)
        rules += rms_norm_rules(f"{j}/norm", f"{t}.norm")
        rules += linear_rules(f"{j}/channelwise_linear_1", f"{t}.channelwise_linear_1", use_bias)
        rules += [(f"{j}/channelwise_norm/weight", f"{t}.channelwise_norm.weight", "grn"),
                  (f"{j}/channelwise_norm/bias", f"{t}.channelwise_norm.bias", "grn")]
        rules += linear_rules(f"{j}/channelwise_linear_2", f"{t}.channelwise_linear_2", use_bias)
        rules += linear_rules(f"{j}/cond_embeds_mapper", f"{t}.cond_embeds_mapper", use_bias)
    return rules


def gen_encoder_rules(cfg: GenEncoderConfig, jax: str = "gen_encoder", torch: str = "vision_gen_enc_model.") -> list[Rule]:
    rules = linear_rules(f"{jax}/time_embed/linear_1", f"{torch}time_embed.linear_1", cfg.use_bias)
    rules += linear_rules(f"{jax}/time_embed/linear_2", f"{torch}time_embed.linear_2", cfg.use_bias)
    rules += conv_rules(f"{jax}/in_conv", f"{torch}in_conv")
    return rules + _mid_block_rules(cfg.num_blocks, cfg.use_bias, jax, torch)


def gen_decoder_rules(cfg: GenDecoderConfig, jax: str = "gen_decoder", torch: str = "vision_gen_dec_model.") -> list[Rule]:
    rules = _mid_block_rules(cfg.num_blocks, cfg.use_bias, jax, torch)
    rules += rms_norm_rules(f"{jax}/out_convs_0/norm", f"{torch}out_convs.0.norm")
    rules += conv_rules(f"{jax}/out_convs_0/unpatch_conv", f"{torch}out_convs.0.unpatch_conv", cfg.use_bias)
    return rules + rms_norm_rules(f"{jax}/input_norm", f"{torch}input_norm")


def repa_rules(cfg: JanusFlowConfig) -> list[Rule]:
    """Our REPA projector, written only on request (the official module has no such tensors)."""
    return [r for k in (1, 2, 3) for r in linear_rules(f"repa_projector/linear_{k}", f"repa_projector.linear_{k}")]


def janusflow_rules(cfg: JanusFlowConfig) -> list[Rule]:
    """All tensors of the official MultiModalityCausalLM state dict (the REPA projector is ours, not listed)."""
    return (
        [("beg_of_und_embed", "beg_of_und_embed", "identity")]
        + siglip_rules(cfg.und_encoder)
        + linear_rules("und_aligner", "vision_und_enc_aligner")
        + gen_encoder_rules(cfg.gen_encoder)
        + linear_rules("gen_enc_aligner", "vision_gen_enc_aligner")
        + gen_decoder_rules(cfg.gen_decoder)
        + llama_rules(cfg.llm)
        + rms_norm_rules("gen_dec_aligner_norm", "vision_gen_dec_aligner_norm")
        + linear_rules("gen_dec_aligner", "vision_gen_dec_aligner")
    )


# ------------------------------------------------------------------------------------------- scanned <-> per-layer
_STACKED = (("language_model", "layers"), ("und_encoder", "blocks"))


def _layer_counts(cfg: JanusFlowConfig) -> dict[str, int]:
    return {"language_model": cfg.llm.num_layers, "und_encoder": cfg.und_encoder.depth}


def _stack_layers_(params: dict, cfg: JanusFlowConfig) -> dict:
    """Per-layer -> scanned layout, in place: each per-layer array is dropped as soon as it is stacked, so the
    extra memory is one stacked tensor, not a second copy of the towers (matters for 1.3B on a host)."""
    for tower, name in _STACKED:
        sub = params[tower]
        layers = [flatten(sub.pop(f"{name}_{i}")) for i in range(_layer_counts(cfg)[tower])]
        stacked = {}
        for key in list(layers[0]):
            arrays = [layer.pop(key) for layer in layers]
            stacked[key] = (jnp.stack(arrays) if isinstance(arrays[0], jax.core.Tracer)  # on the mesh, jitted
                            else np.stack([np.asarray(a) for a in arrays]))
        sub[name] = traverse_util.unflatten_dict(stacked, sep="/")
    return params


def scan_params(params, cfg: JanusFlowConfig):
    """Per-layer layout (`layers_{i}`) -> scanned layout (`layers` with a leading layer axis). The input is kept."""
    return _stack_layers_(jax.tree.map(lambda x: x, dict(params)), cfg)


def unscan_params(params, cfg: JanusFlowConfig):
    """Scanned layout -> per-layer layout."""
    params = dict(params)
    for tower, name in _STACKED:
        sub = dict(params[tower])
        stacked = sub.pop(name)
        for i in range(_layer_counts(cfg)[tower]):
            sub[f"{name}_{i}"] = jax.tree.map(lambda x: x[i] if isinstance(x, jax.core.Tracer) else np.asarray(x)[i],
                                              stacked)
        params[tower] = sub
    return params


def expected_shapes(cfg: JanusFlowConfig) -> dict[str, tuple]:
    """{jax path: shape} of every parameter in the per-layer layout (no allocation)."""
    abstract = nn.unbox(model_lib.abstract_params(cfg.replace(scan_layers=False)))
    return {k: tuple(v.shape) for k, v in flatten(abstract).items()}


# ----------------------------------------------------------------------------------------------- config.json
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                       tie_word_embeddings=False)  # transformers LlamaConfig defaults

# The official SigLIP table (janus/janusflow/models/siglip_vit.py).
SIGLIP_MODELS = {
    "siglip_so400m_patch14_384": dict(patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_so400m_patch14_224": dict(patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_large_patch16_384": dict(patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4),
    "siglip_large_patch16_256": dict(patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4),
}


def llama_config_from_hf(lc: Mapping) -> LlamaConfig:
    """A transformers LlamaConfig dict (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`) -> LlamaConfig."""
    get = lambda k: lc.get(k, _LLAMA_DEFAULTS.get(k))  # noqa: E731
    for key, allowed in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if lc.get(key, allowed) != allowed:
            raise ValueError(f"unsupported language_config.{key}={lc[key]!r} (expected {allowed!r})")
    if lc.get("pretraining_tp", 1) != 1:
        raise ValueError("unsupported language_config.pretraining_tp != 1")
    rope_theta = get("rope_theta")
    rope = lc.get("rope_parameters") or {}
    if rope:
        rope_theta = rope.get("rope_theta", rope_theta)
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported RoPE type {rope.get('rope_type')!r}")
    if lc.get("rope_scaling"):
        raise ValueError(f"unsupported rope_scaling {lc['rope_scaling']!r}")
    heads = get("num_attention_heads")
    return LlamaConfig(
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
        num_layers=get("num_hidden_layers"), num_heads=heads,
        num_kv_heads=lc.get("num_key_value_heads") or heads,
        head_dim=lc.get("head_dim") or get("hidden_size") // heads,
        rms_norm_eps=float(get("rms_norm_eps")), rope_theta=float(rope_theta),
        max_position_embeddings=get("max_position_embeddings"),
        tie_word_embeddings=bool(get("tie_word_embeddings")))


def config_from_official(raw: Mapping, **overrides) -> JanusFlowConfig:
    """The official config.json (as released, or re-saved by transformers 5) -> JanusFlowConfig."""
    llm = llama_config_from_hf(raw["language_config"])
    und = raw["vision_und_enc_config"]
    if "CLIPVisionTower" not in und.get("cls", "") :
        raise ValueError(f"unsupported understanding encoder {und.get('cls')!r}")
    up = dict(und.get("params", {}))
    name = up.get("model_name", "siglip_large_patch16_384")
    if name not in SIGLIP_MODELS and not {"width", "layers", "heads", "patch_size", "mlp_ratio"} <= set(up):
        raise ValueError(f"unknown SigLIP model {name!r}; known: {sorted(SIGLIP_MODELS)}")
    table = {**SIGLIP_MODELS.get(name, {}), **{k: up[k] for k in ("width", "layers", "heads", "patch_size",
                                                                     "mlp_ratio") if k in up}}
    select_layer = up.get("select_layer", -2)  # CLIPVisionTower default
    layers = table["layers"]
    depth = min(layers, layers + select_layer + 1) if select_layer <= 0 else min(layers, select_layer)
    und_cfg = SigLIPConfig(image_size=up.get("image_size", 336), patch_size=table["patch_size"], width=table["width"],
                           depth=depth, num_heads=table["heads"], mlp_dim=int(table["width"] * table["mlp_ratio"]),
                           model_name=name)
    if up.get("pixel_mean") is not None:
        raise ValueError("pixel_mean/pixel_std inside the vision tower are not supported (normalise in the processor)")

    ep = dict(raw["vision_gen_enc_config"].get("params", {}))
    kernel, stride = ep.get("kernel_size", 7), ep.get("stride", 4)
    padding = ep.get("padding")
    enc = GenEncoderConfig(
        in_channels=ep.get("input_channels", 3), channels=list(ep.get("block_out_channels", [768]))[-1],
        kernel_size=kernel, stride=stride, padding=math.ceil(kernel - stride) if padding is None else padding,
        num_blocks=ep.get("layers_in_middle", 2), norm_eps=ep.get("norm_eps", 1e-6), use_bias=ep.get("use_bias", True))
    dp = dict(raw["vision_gen_dec_config"].get("params", {}))
    dec = GenDecoderConfig(
        in_channels=dp.get("in_channels", 768), channels=list(dp.get("block_out_channels", [768]))[-1],
        out_channels=dp.get("out_channels", 3), num_blocks=dp.get("layers_in_middle", 2),
        upsamples=dp.get("upsamples", 2), norm_eps=dp.get("norm_eps", 1e-6), use_bias=dp.get("use_bias", True))
    for side, params in (("vision_gen_enc_config", ep), ("vision_gen_dec_config", dp)):
        if not params.get("use_mid_block", True):
            raise ValueError(f"{side}: use_mid_block=false is not supported")
        if params.get("hidden_size", 2048) != llm.hidden_size:
            raise ValueError(f"{side}.hidden_size={params.get('hidden_size', 2048)} != LLM hidden {llm.hidden_size}")
    values = dict(llm=llm, und_encoder=und_cfg, gen_encoder=enc, gen_decoder=dec,
                  repa=RepaConfig(hidden_dim=llm.hidden_size, layer=min(6, llm.num_layers)),
                  latent_size=und_cfg.image_size // 8)
    values.update(overrides)
    return JanusFlowConfig(**values)


def config_to_official(cfg: JanusFlowConfig, torch_dtype: str = "bfloat16") -> dict:
    """JanusFlowConfig -> the official config.json layout (loadable by MultiModalityCausalLM.from_pretrained)."""
    llm, und, enc, dec = cfg.llm, cfg.und_encoder, cfg.gen_encoder, cfg.gen_decoder
    language = dict(hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                    max_position_embeddings=llm.max_position_embeddings, model_type="llama",
                    num_attention_heads=llm.num_heads, num_hidden_layers=llm.num_layers,
                    num_key_value_heads=llm.num_kv_heads, torch_dtype=torch_dtype, vocab_size=llm.vocab_size)
    if llm.rms_norm_eps != 1e-6:
        language["rms_norm_eps"] = llm.rms_norm_eps
    if llm.rope_theta != 10000.0:
        language["rope_theta"] = llm.rope_theta
    if llm.head_dim != llm.hidden_size // llm.num_heads:
        language["head_dim"] = llm.head_dim
    if llm.tie_word_embeddings:
        language["tie_word_embeddings"] = True
    table = SIGLIP_MODELS.get(und.model_name)
    und_params = dict(image_size=und.image_size, model_name=und.model_name, select_feature="same", select_layer=-1)
    mine = dict(patch_size=und.patch_size, width=und.width, heads=und.num_heads, mlp_ratio=und.mlp_dim / und.width)
    if table is None or any(table[k] != v for k, v in mine.items() if k != "mlp_ratio") or \
            int(table["width"] * table["mlp_ratio"]) != und.mlp_dim:
        # Extra keys reach create_siglip_vit(**kwargs), which ignores them; our importer reads them back.
        und_params.update(mine, layers=und.depth)
    elif und.depth != table["layers"]:
        und_params["select_layer"] = und.depth - table["layers"] - 1
    return {
        "architectures": ["MultiModalityCausalLM"],
        "model_type": "multi_modality",
        "torch_dtype": torch_dtype,
        "transformers_version": "4.38.1",
        "language_config": language,
        "vision_und_enc_config": {"cls": "CLIPVisionTower", "model_type": "vision_und_enc", "params": und_params},
        "vision_gen_enc_config": {"cls": "ShallowUViTEncoder", "model_type": "vision_gen_enc", "params": dict(
            block_out_channels=[enc.channels], hidden_size=llm.hidden_size, input_channels=enc.in_channels,
            kernel_size=enc.kernel_size, layers_in_middle=enc.num_blocks, norm_eps=enc.norm_eps, padding=enc.padding,
            stride=enc.stride, use_bias=enc.use_bias, use_mid_block=True)},
        "vision_gen_dec_config": {"cls": "ShallowUViTDecoder", "model_type": "vision_gen_dec", "params": dict(
            block_out_channels=[dec.channels], elementwise_affine=True, hidden_size=llm.hidden_size,
            in_channels=dec.in_channels, layers_in_middle=dec.num_blocks, norm_eps=dec.norm_eps,
            out_channels=dec.out_channels, upsamples=dec.upsamples, use_bias=dec.use_bias, use_mid_block=True)},
    }


# ------------------------------------------------------------------------------------------------- public API
@paths.reads_local
def from_pytorch(path: str | os.PathLike, param_dtype: str = "float32", rng=None,
                 **config_overrides) -> tuple[JanusFlowConfig, dict]:
    """Reads an official JanusFlow directory (config.json + safetensors / sharded / pytorch_model.bin).

    Returns (config, params) with params as numpy arrays of `param_dtype`, in the layout of `config.scan_layers`
    (pass `scan_layers=True` to get the scanned layout). The REPA projector, absent from the release, is freshly
    initialised from `rng` (default PRNGKey(0)) unless the checkpoint carries `repa_projector.*` tensors.
    """
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    cfg = config_from_official(raw, param_dtype=param_dtype, **config_overrides)
    state = StateDict(path)
    dtype = numpy_dtype(param_dtype)
    expected = expected_shapes(cfg)
    rules = janusflow_rules(cfg)
    has_repa = any(key.startswith("repa_projector.") for key in state)
    flat = import_tensors(state, rules + (repa_rules(cfg) if has_repa else []), expected, dtype, source=str(path))
    if not has_repa:
        fresh = model_lib.RepaProjector(cfg.repa.hidden_dim, cfg.und_encoder.width, param_dtype=dtype)
        rng = jax.random.key(0) if rng is None else rng
        repa_params = nn.unbox(fresh.init(rng, np.zeros((1, 1, cfg.llm.hidden_size), dtype)))["params"]
        flat.update({f"repa_projector/{k}": np.asarray(v) for k, v in flatten(repa_params).items()})
    params = traverse_util.unflatten_dict(flat, sep="/")
    del flat  # the tree holds the only references, so stacking can free per-layer arrays as it goes
    return cfg, (_stack_layers_(params, cfg) if cfg.scan_layers else params)


def to_pytorch(config: JanusFlowConfig, params, out_dir: str | os.PathLike, torch_dtype: str | None = None,
               include_repa: bool = False, overwrite: bool = False) -> Path:
    """Writes `config.json` + `model.safetensors` in the official layout (strict-loadable by the official code).

    torch_dtype: dtype of the written tensors (default: the parameters' own dtype). The REPA projector is training
    state, not part of the official module, and is left out unless `include_repa`.
    """
    from safetensors.numpy import save_file

    params = jax.device_get(nn.unbox(params))
    if config.scan_layers:
        params = unscan_params(params, config)
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    rules = janusflow_rules(config)
    known = {r[0] for r in rules}
    extra = [k for k in flat if k not in known and not k.startswith("repa_projector/")]
    if extra:
        raise CheckpointMismatchError("<jax params>", unexpected=[(k, flat[k].shape) for k in extra])
    dtype = None if torch_dtype is None else numpy_dtype(torch_dtype)
    state = export_tensors(flat, rules + (repa_rules(config) if include_repa else []), dtype)
    written_dtype = torch_dtype or next(iter(state.values())).dtype.name  # ml_dtypes names bf16 "bfloat16"

    def write(tmp: Path):
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_to_official(config, written_dtype), indent=2) + "\n")

    atomic_write_dir(out_dir, write, overwrite)
    return paths.user_path(out_dir) if paths.is_remote(out_dir) else Path(out_dir)


# ------------------------------------------------------------------------------------- stage-1 parts (LLM, SigLIP)
def _tower_shapes(module: nn.Module, *example) -> dict[str, tuple]:
    # The examples are ShapeDtypeStructs: pass them through eval_shape (a closure would hand them to init as is).
    abstract = jax.eval_shape(lambda *xs: module.init(jax.random.key(0), *xs), *example)["params"]
    return {k: tuple(v.shape) for k, v in flatten(nn.unbox(abstract)).items()}


@paths.reads_local
def load_llm_from_hf(path: str | os.PathLike, cfg: LlamaConfig, param_dtype: str = "float32") -> dict:
    """An HF LlamaForCausalLM directory (e.g. DeepSeek-LLM-1.3B-base) -> the `language_model` sub-tree."""
    from janusflow_jax.models.llama import LlamaModel

    path = Path(path)
    hf_cfg = llama_config_from_hf(json.loads((path / "config.json").read_text()))
    if hf_cfg != cfg:
        raise ValueError(f"LLM checkpoint config {hf_cfg} does not match the model's {cfg}")
    expected = _tower_shapes(LlamaModel(cfg), jax.ShapeDtypeStruct((1, 1, cfg.hidden_size), np.float32))
    rules = [(j.lstrip("/"), t, f) for j, t, f in llama_rules(cfg, jax="", torch="")]
    flat = import_tensors(StateDict(path), rules, expected, numpy_dtype(param_dtype), source=str(path),
                          ignore=lambda k: k.endswith("rotary_emb.inv_freq"))
    return traverse_util.unflatten_dict(flat, sep="/")


@paths.reads_local
def load_siglip_from_timm(path: str | os.PathLike, cfg: SigLIPConfig, param_dtype: str = "float32") -> dict:
    """A timm `vit_large_patch16_siglip_384` checkpoint (timm keys, or open_clip `visual.trunk.*`) -> `und_encoder`.

    Without a MAP head in the checkpoint, `attn_pool` is left out of the result (keep freshly initialised ones).
    """
    from janusflow_jax.models.siglip import SigLIPViT

    state = StateDict(path)
    strip = "visual.trunk." if any(k.startswith("visual.trunk.") for k in state) else ""
    has_pool = any(k.startswith(strip + "attn_pool.") for k in state)
    rules = [(j.lstrip("/"), t, f) for j, t, f in
             siglip_rules(dataclasses.replace(cfg, attn_pool=cfg.attn_pool and has_pool), jax="", torch="")]
    size = cfg.image_size
    expected = _tower_shapes(SigLIPViT(cfg), jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
    # timm's classifier head / fc_norm are not part of the tower JanusFlow uses.
    flat = import_tensors(state, rules, expected, numpy_dtype(param_dtype), source=str(path), strip=strip,
                          ignore=lambda k: k[len(strip):].startswith(("head.", "fc_norm.")))
    return traverse_util.unflatten_dict(flat, sep="/")


def init_from_parts(config: JanusFlowConfig, rng, llm_path=None, siglip_path=None) -> dict:
    """Stage-1 initialisation: fresh parameters, with the LLM and/or SigLIP replaced by pretrained checkpoints."""
    params = dict(jax.device_get(model_lib.init_params(config.replace(scan_layers=False), rng)))
    if llm_path is not None:
        params["language_model"] = load_llm_from_hf(llm_path, config.llm, config.param_dtype)
    if siglip_path is not None:
        loaded = load_siglip_from_timm(siglip_path, config.und_encoder, config.param_dtype)
        params["und_encoder"] = {**params["und_encoder"], **loaded}
    return _stack_layers_(params, config) if config.scan_layers else params
