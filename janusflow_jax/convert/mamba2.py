"""Mamba-2 language-model checkpoints <-> `models/mamba2.py` parameters, bit-exact: the fused `in_proj` rows
[z | x | B | C | dt] and the `conv1d` channels [x | B | C] are cut into our separate projections and convs, and
concatenated back. Two layouts, the same tensors under two names for the embedding:
  * transformers' Mamba2ForCausalLM (`from_hf_mamba2`, both directions): config.json with hidden_size, state_size,
    ...; `backbone.embeddings.weight`;
  * mamba_ssm's MambaLMHeadModel (`from_mamba_ssm`), the layout state-spaces/mamba2-1.3b (OmniMamba's starting
    point) is published in: config.json with d_model, n_layer, vocab_size, ssm_cfg, pad_vocab_size_multiple,
    tie_embeddings (mamba_ssm 2.x `MambaConfig`); pytorch_model.bin with `backbone.embedding.weight`, the vocabulary
    padded to a multiple of pad_vocab_size_multiple (kept as the checkpoint has it).
`from_directory` reads either, telling them apart by config.json."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import flax.linen as nn
import jax
import numpy as np
from etils import epath
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


# The text embedding's key in each layout; every other key is the same.
EMBEDDING_KEY = {"hf": "backbone.embeddings.weight", "mamba_ssm": "backbone.embedding.weight"}


def hf_pieces(cfg: Mamba2Config, layout: str = "hf") -> list[Piece]:
    """Every tensor of a transformers Mamba2ForCausalLM state dict (layout "hf") or a mamba_ssm MambaLMHeadModel one
    ("mamba_ssm") and where it goes (per-layer layout)."""
    d, inner, bc, heads = cfg.d_model, cfg.d_inner, cfg.bc_width, cfg.nheads
    conv_dim = inner + 2 * bc
    pieces: list[Piece] = [(EMBEDDING_KEY[layout], (cfg.vocab_size, d),
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


def import_hf_state(state: Mapping[str, np.ndarray], cfg: Mamba2Config, source: str = "<state dict>",
                    layout: str = "hf") -> dict:
    """A transformers Mamba2ForCausalLM state dict (or, `layout="mamba_ssm"`, a MambaLMHeadModel one) -> our
    parameters (numpy, `cfg.param_dtype`, in the layout of `cfg.scan_layers`). Every tensor must be used: one
    CheckpointMismatchError names every missing, unexpected and mis-shaped one. With tied embeddings a stored
    `lm_head.weight` (mamba_ssm saves the tied copy) is accepted only if it equals the embedding."""
    shape_of = (lambda k: state.shape(k)) if isinstance(state, StateDict) else (lambda k: tuple(np.shape(state[k])))
    dtype = np.dtype(cfg.storage_dtype)  # bfloat16 is ml_dtypes' numpy dtype
    missing, mis_shaped, used, flat = [], [], set(), {}
    embedding = EMBEDDING_KEY[layout]
    for key, shape, parts, transform in hf_pieces(cfg, layout):
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
    if cfg.tie_embeddings and "lm_head.weight" in state and embedding in state:
        if shape_of("lm_head.weight") == shape_of(embedding) and np.array_equal(
                np.asarray(state["lm_head.weight"]), np.asarray(state[embedding])):
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


# mamba_ssm 2.x: `models/config_mamba.py` MambaConfig (the top level) and `modules/mamba2.py` Mamba2's keyword
# defaults (ssm_cfg). Keys we read into Mamba2Config, keys that must hold a value we implement, and keys that only
# change the initialisation or the kernels (accepted, unused). Anything else in config.json is an error.
_SSM_TOP_DEFAULTS = dict(d_model=2560, d_intermediate=0, n_layer=64, vocab_size=50277, ssm_cfg={}, attn_layer_idx=[],
                         attn_cfg={}, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                         pad_vocab_size_multiple=8, tie_embeddings=True)
_SSM_MIXER_DEFAULTS = dict(d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64, d_ssm=None, ngroups=1,
                           A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False, dt_min=0.001,
                           dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, math.inf), bias=False, conv_bias=True,
                           chunk_size=256, use_mem_eff_path=True)
_SSM_REQUIRED = {"d_intermediate": 0, "attn_layer_idx": [], "rms_norm": True}  # top level: what we implement
_SSM_MIXER_REQUIRED = {"d_ssm": None, "D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False,
                       "bias": False}
_SSM_NORM_EPS = 1e-5  # mamba_ssm's MixerModel norm_epsilon and Mamba2's gated-norm eps (not in its config)
_SSM_IGNORED = {"fused_add_norm", "attn_cfg"}  # kernels; attention settings with no attention layer
_SSM_MIXER_IGNORED = {"conv_init", "A_init_range", "dt_min", "dt_max", "dt_init_floor", "use_mem_eff_path"}  # init


def is_mamba_ssm_config(raw: Mapping) -> bool:
    """A mamba_ssm MambaConfig dict (d_model, n_layer, ssm_cfg) rather than a transformers one (hidden_size, ...)."""
    return "d_model" in raw and "hidden_size" not in raw


def config_from_mamba_ssm(raw: Mapping, source: str = "config.json", **overrides) -> Mamba2Config:
    """A mamba_ssm 2.x MambaConfig dict -> Mamba2Config, as MambaLMHeadModel builds it: the vocabulary padded up to
    a multiple of pad_vocab_size_multiple, ssm_cfg's missing keys at Mamba2's defaults. Not a Mamba-2 LM we
    implement (Mamba-1 layers, attention layers, an MLP, LayerNorm, unknown keys) is one ValueError line."""
    def fail(what):
        raise ValueError(f"{source}: {what}")

    unknown = sorted(set(raw) - set(_SSM_TOP_DEFAULTS))
    if unknown:
        fail(f"unknown mamba_ssm config keys {unknown} (expected those of mamba_ssm 2.x MambaConfig: "
             f"{sorted(_SSM_TOP_DEFAULTS)})")
    for key in ("d_model", "n_layer", "vocab_size", "ssm_cfg"):  # what no default can stand for
        if key not in raw:
            fail(f"no {key!r}: not a mamba_ssm MambaLMHeadModel config")
    top = {**_SSM_TOP_DEFAULTS, **raw}
    ssm = dict(top["ssm_cfg"] or {})
    layer = ssm.pop("layer", "Mamba1")  # mamba_ssm's create_block default
    if layer != "Mamba2":
        fail(f"ssm_cfg layer {layer!r}: only Mamba-2 layers are implemented (ssm_cfg.layer = 'Mamba2')")
    unknown = sorted(set(ssm) - set(_SSM_MIXER_DEFAULTS))
    if unknown:
        fail(f"unknown ssm_cfg keys {unknown} (expected mamba_ssm 2.x Mamba2 arguments: "
             f"{sorted(_SSM_MIXER_DEFAULTS)})")
    ssm = {**_SSM_MIXER_DEFAULTS, **ssm}
    for table, values in ((_SSM_REQUIRED, top), (_SSM_MIXER_REQUIRED, ssm)):
        for key, allowed in table.items():
            if values[key] != allowed and not (key == "attn_layer_idx" and not values[key]):
                fail(f"unsupported {key}={values[key]!r} (implemented: {allowed!r})")
    vocab, multiple = int(top["vocab_size"]), int(top["pad_vocab_size_multiple"])
    padded = vocab + (-vocab) % multiple if multiple > 0 else vocab
    low, high = (_json_float(v) for v in ssm["dt_limit"])
    try:
        values = dict(d_model=int(top["d_model"]), n_layer=int(top["n_layer"]), d_state=int(ssm["d_state"]),
                      d_conv=int(ssm["d_conv"]), expand=int(ssm["expand"]), headdim=int(ssm["headdim"]),
                      ngroups=int(ssm["ngroups"]), chunk_size=int(ssm["chunk_size"]), vocab_size=padded,
                      norm_eps=_SSM_NORM_EPS, residual_in_fp32=bool(top["residual_in_fp32"]),
                      tie_embeddings=bool(top["tie_embeddings"]), conv_bias=bool(ssm["conv_bias"]),
                      dt_limit=(low, high))
        values.update(overrides)
        return Mamba2Config(**values)
    except (TypeError, ValueError) as e:
        fail(f"not a Mamba-2 configuration we can build: {e}")


def _config_json(directory: epath.Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json (a Mamba-2 LM directory: config.json + weights)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a JSON object")
    return raw


def _state(directory: epath.Path) -> StateDict:
    return StateDict(os.fspath(directory))


@paths.reads_local
def from_hf_mamba2(directory: str | os.PathLike, param_dtype: str = "float32",
                   **config_overrides) -> tuple[Mamba2Config, dict]:
    """A transformers Mamba2ForCausalLM directory (config.json + model.safetensors, a sharded index, or
    pytorch_model.bin) -> (config, params as numpy arrays of `param_dtype`). Pass `scan_layers=True` (or any other
    Mamba2Config field) to override the config; params come in the layout of the returned config."""
    directory = epath.Path(directory)
    raw = _config_json(directory)
    if is_mamba_ssm_config(raw):
        raise ValueError(f"{directory / 'config.json'} is a mamba_ssm MambaLMHeadModel config (d_model, ssm_cfg), "
                         f"not transformers' Mamba2Config: read it with from_mamba_ssm")
    cfg = config_from_hf(raw, param_dtype=param_dtype, **config_overrides)
    return cfg, import_hf_state(_state(directory), cfg, source=os.fspath(directory))


@paths.reads_local
def from_mamba_ssm(directory: str | os.PathLike, param_dtype: str = "float32",
                   **config_overrides) -> tuple[Mamba2Config, dict]:
    """A mamba_ssm MambaLMHeadModel directory (config.json + pytorch_model.bin, read with weights_only, or
    model.safetensors), e.g. state-spaces/mamba2-1.3b -> (config, params as numpy arrays of `param_dtype`). The
    vocabulary keeps the checkpoint's padded rows (50288 for mamba2-1.3b's 50277 tokens); a tied head is the
    embedding (a stored `lm_head.weight` must equal it), an untied one is read. `config_overrides` as in
    `from_hf_mamba2`."""
    directory = epath.Path(directory)
    raw = _config_json(directory)
    if not is_mamba_ssm_config(raw):
        raise ValueError(f"{directory / 'config.json'} is not a mamba_ssm MambaLMHeadModel config (no d_model); "
                         f"a transformers Mamba2 directory reads with from_hf_mamba2")
    cfg = config_from_mamba_ssm(raw, os.fspath(directory / "config.json"), param_dtype=param_dtype,
                                **config_overrides)
    return cfg, import_hf_state(_state(directory), cfg, source=os.fspath(directory), layout="mamba_ssm")


def from_directory(directory: str | os.PathLike, param_dtype: str = "float32",
                   **config_overrides) -> tuple[Mamba2Config, dict]:
    """A Mamba-2 LM directory in either layout (told apart by config.json) -> (config, params)."""
    with paths.local_copy(directory) as local:
        raw = _config_json(epath.Path(local))
        read = from_mamba_ssm if is_mamba_ssm_config(raw) else from_hf_mamba2
        return read(local, param_dtype, **config_overrides)


def to_hf_mamba2(config: Mamba2Config, params) -> dict[str, np.ndarray]:
    """(config, params) -> {HF key: array} in transformers Mamba2ForCausalLM naming (see `export_hf_state`)."""
    return export_hf_state(config, params)
