"""transformers' Mamba2ForCausalLM checkpoints (config.json + safetensors) <-> `models/mamba2.py` parameters, both
directions, bit-exact: the fused `in_proj` rows [z | x | B | C | dt] and the `conv1d` channels [x | B | C] are cut
into our separate projections and convs, and concatenated back. Any Mamba-2 language model on the hub in that format
loads (state-spaces/mamba2-1.3b is OmniMamba's starting point)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from janusflow_jax import paths
from janusflow_jax.convert.tensors import CheckpointMismatchError, StateDict
from janusflow_jax.models.mamba2 import Mamba2Config, param_shapes

# A piece: (HF key, HF shape, ((our path, rows), ...), transform). A fused HF tensor is cut along its first axis into
# the listed parts, in order; each part then goes through the transform. Transforms are exact layout changes.
Piece = tuple[str, tuple[int, ...], tuple[tuple[str, int], ...], str]
# conv: PyTorch's depthwise [channels, 1, taps] <-> our [taps, channels].
_TO_OURS = {"identity": lambda t: t, "linear": lambda t: t.T, "conv": lambda t: t[:, 0, :].T}
_TO_HF = {"identity": lambda t: t, "linear": lambda t: t.T, "conv": lambda t: t.T[:, None, :]}

# transformers Mamba2Config defaults, for keys a config.json leaves out.
_HF_DEFAULTS = dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096, state_size=128,
                    num_hidden_layers=64, layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, n_groups=8, use_bias=False,
                    use_conv_bias=True, hidden_act="silu", residual_in_fp32=True, chunk_size=256,
                    time_step_limit=(0.0, math.inf), tie_word_embeddings=False)


def hf_pieces(cfg: Mamba2Config) -> list[Piece]:
    """Every tensor of a transformers Mamba2ForCausalLM state dict and where it goes (per-layer layout)."""
    d, inner, bc, heads = cfg.d_model, cfg.d_inner, cfg.bc_width, cfg.nheads
    conv_dim = inner + 2 * bc
    pieces: list[Piece] = [("backbone.embeddings.weight", (cfg.vocab_size, d),
                            (("embeddings/embedding", cfg.vocab_size),), "identity")]
    for i in range(cfg.n_layer):
        hf, ours = f"backbone.layers.{i}", f"layers_{i}"
        m = f"{ours}/mixer"
        pieces += [
            (f"{hf}.norm.weight", (d,), ((f"{ours}/norm/scale", d),), "identity"),
            (f"{hf}.mixer.in_proj.weight", (inner + conv_dim + heads, d),
             ((f"{m}/z_proj/kernel", inner), (f"{m}/x_proj/kernel", inner), (f"{m}/B_proj/kernel", bc),
              (f"{m}/C_proj/kernel", bc), (f"{m}/dt_proj/kernel", heads)), "linear"),
            (f"{hf}.mixer.conv1d.weight", (conv_dim, 1, cfg.d_conv),
             ((f"{m}/conv_x/kernel", inner), (f"{m}/conv_B/kernel", bc), (f"{m}/conv_C/kernel", bc)), "conv"),
        ]
        if cfg.conv_bias:
            pieces.append((f"{hf}.mixer.conv1d.bias", (conv_dim,),
                           ((f"{m}/conv_x/bias", inner), (f"{m}/conv_B/bias", bc), (f"{m}/conv_C/bias", bc)),
                           "identity"))
        pieces += [(f"{hf}.mixer.{name}", (heads,), ((f"{m}/{name}", heads),), "identity")
                   for name in ("dt_bias", "A_log", "D")]
        pieces += [(f"{hf}.mixer.norm.weight", (inner,), ((f"{m}/norm/scale", inner),), "identity"),
                   (f"{hf}.mixer.out_proj.weight", (d, inner), ((f"{m}/out_proj/kernel", d),), "linear")]
    pieces.append(("backbone.norm_f.weight", (d,), (("norm_f/scale", d),), "identity"))
    if not cfg.tie_embeddings:
        pieces.append(("lm_head.weight", (cfg.vocab_size, d), (("lm_head/kernel", cfg.vocab_size),), "linear"))
    return pieces


def _json_float(value) -> float:
    """A float from config.json: a number, `Infinity`, or transformers 5's {"__float__": "Infinity"}."""
    return float(value["__float__"] if isinstance(value, Mapping) else value)


def config_from_hf(raw: Mapping, **overrides) -> Mamba2Config:
    """A transformers Mamba2Config dict (config.json) -> Mamba2Config; unsupported settings are errors."""
    get = lambda key: raw.get(key, _HF_DEFAULTS[key])  # noqa: E731
    for key, allowed in (("use_bias", False), ("hidden_act", "silu")):
        if get(key) != allowed:
            raise ValueError(f"unsupported Mamba2 config {key}={get(key)!r} (expected {allowed!r})")
    if not raw.get("rms_norm", True):
        raise ValueError("unsupported Mamba2 config rms_norm=False")
    d_model, expand, headdim = get("hidden_size"), get("expand"), get("head_dim")
    if d_model * expand != get("num_heads") * headdim:
        raise ValueError(f"Mamba2 config: hidden_size x expand = {d_model * expand} != num_heads x head_dim = "
                         f"{get('num_heads')} x {headdim}")
    low, high = (_json_float(v) for v in get("time_step_limit"))
    values = dict(d_model=d_model, n_layer=get("num_hidden_layers"), d_state=get("state_size"),
                  d_conv=get("conv_kernel"), expand=expand, headdim=headdim, ngroups=get("n_groups"),
                  chunk_size=get("chunk_size"), vocab_size=get("vocab_size"), norm_eps=float(get("layer_norm_epsilon")),
                  residual_in_fp32=bool(get("residual_in_fp32")), tie_embeddings=bool(get("tie_word_embeddings")),
                  conv_bias=bool(get("use_conv_bias")), dt_limit=(low, high))
    values.update(overrides)
    return Mamba2Config(**values)


def _stack_layers(params: dict, cfg: Mamba2Config) -> dict:
    """Per-layer (`layers_{i}`) -> scanned (`layers`, leading layer axis)."""
    params = dict(params)
    per_layer = [params.pop(f"layers_{i}") for i in range(cfg.n_layer)]
    params["layers"] = jax.tree.map(lambda *t: np.stack(t), *per_layer)
    return params


def _unstack_layers(params: Mapping, cfg: Mamba2Config) -> dict:
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(cfg.n_layer):
        params[f"layers_{i}"] = jax.tree.map(lambda t: np.asarray(t)[i], stacked)
    return params


def import_hf_state(state: Mapping[str, np.ndarray], cfg: Mamba2Config, source: str = "<state dict>") -> dict:
    """A transformers Mamba2ForCausalLM state dict -> our parameters (numpy, `cfg.param_dtype`, in the layout of
    `cfg.scan_layers`). Every tensor must be used: one CheckpointMismatchError names every missing, unexpected and
    mis-shaped one. With tied embeddings a stored `lm_head.weight` is accepted only if it equals the embedding."""
    shape_of = (lambda k: state.shape(k)) if isinstance(state, StateDict) else (lambda k: tuple(np.shape(state[k])))
    dtype = np.dtype(cfg.storage_dtype)  # bfloat16 is ml_dtypes' numpy dtype
    missing, mis_shaped, used, flat = [], [], set(), {}
    for key, shape, parts, transform in hf_pieces(cfg):
        if key not in state:
            missing.append((key, shape))
            continue
        used.add(key)
        if shape_of(key) != shape:
            mis_shaped.append((key, shape, shape_of(key)))
            continue
        tensor = np.asarray(state[key])
        offsets = np.cumsum([rows for _, rows in parts])[:-1]
        for (path, _), part in zip(parts, np.split(tensor, offsets, axis=0)):
            flat[path] = np.ascontiguousarray(_TO_OURS[transform](part).astype(dtype))
    if cfg.tie_embeddings and "lm_head.weight" in state and "backbone.embeddings.weight" in state:
        if shape_of("lm_head.weight") == shape_of("backbone.embeddings.weight") and np.array_equal(
                np.asarray(state["lm_head.weight"]), np.asarray(state["backbone.embeddings.weight"])):
            used.add("lm_head.weight")  # the tied copy
    unexpected = [(k, shape_of(k)) for k in state if k not in used]
    if missing or unexpected or mis_shaped:
        raise CheckpointMismatchError(source, missing, unexpected, mis_shaped)
    want = param_shapes(cfg.replace(scan_layers=False))
    got = {k: v.shape for k, v in flat.items()}
    if want != got:  # a bug in hf_pieces, not in the checkpoint
        raise AssertionError(f"hf_pieces does not fill the model: {sorted(set(want.items()) ^ set(got.items()))}")
    params = traverse_util.unflatten_dict(flat, sep="/")
    return _stack_layers(params, cfg) if cfg.scan_layers else params


def export_hf_state(cfg: Mamba2Config, params) -> dict[str, np.ndarray]:
    """Our parameters (either layout) -> a transformers Mamba2ForCausalLM state dict, bit-exact (the parameters'
    dtype). Tied embeddings are written once, as `backbone.embeddings.weight` (what save_pretrained writes)."""
    params = jax.device_get(nn.unbox(params))
    if cfg.scan_layers:
        params = _unstack_layers(params, cfg)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    pieces = hf_pieces(cfg)
    known = {path for _, _, parts, _ in pieces for path, _ in parts}
    missing = [(p, ()) for p in sorted(known - set(flat))]
    extra = [(p, flat[p].shape) for p in sorted(set(flat) - known)]
    if missing or extra:
        raise CheckpointMismatchError("<jax params>", missing=missing, unexpected=extra)
    return {key: np.ascontiguousarray(np.concatenate([_TO_HF[transform](flat[path]) for path, _ in parts], axis=0))
            for key, _, parts, transform in pieces}


@paths.reads_local
def from_hf_mamba2(directory: str | os.PathLike, param_dtype: str = "float32",
                   **config_overrides) -> tuple[Mamba2Config, dict]:
    """A transformers Mamba2ForCausalLM directory (config.json + model.safetensors, a sharded index, or
    pytorch_model.bin) -> (config, params as numpy arrays of `param_dtype`). Pass `scan_layers=True` (or any other
    Mamba2Config field) to override the config; params come in the layout of the returned config."""
    directory = Path(directory)
    cfg = config_from_hf(json.loads((directory / "config.json").read_text()), param_dtype=param_dtype,
                         **config_overrides)
    return cfg, import_hf_state(StateDict(directory), cfg, source=str(directory))


def to_hf_mamba2(config: Mamba2Config, params) -> dict[str, np.ndarray]:
    """(config, params) -> {HF key: array} in transformers Mamba2ForCausalLM naming (see `export_hf_state`)."""
    return export_hf_state(config, params)
