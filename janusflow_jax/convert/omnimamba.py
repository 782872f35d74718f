"""The OmniMamba release checkpoint (`OmniMamba-1.3b.pth`, a pickled state dict of fp16 tensors) <-> our
`models/omnimamba.py` parameters, both directions, bit-exact.

The table is the Mamba-2 one (`convert/mamba2.py`: the fused `in_proj` rows [z | x | B | C | dt] and `conv1d`
channels [x | B | C] cut into our separate projections and convs) under the release's prefix
`llm_backbone.mamba.backbone.` with mamba_ssm's `embedding.` name, plus
  * each mixer's LoRA pairs `in_proj.{mmu,t2i}_lora_A0.weight` [r, d] -> `mixer/lora_{task}/A` [d, r] and
    `_lora_B0.weight` [in_proj rows, r], cut along its rows exactly like in_proj -> `mixer/lora_{task}/B_{piece}`;
  * `img_embeddings.word_embeddings` (+ `project_in.projector.{0,2,4}`), `caption_embed.cap_proj.{fc1,fc2}`, and the
    position tables `pos_embed` / `mmu_pos_embed` ([1, rows, d] there, [rows, d] here);
  * the tied copies `llm_backbone.mamba.lm_head.weight` and `llm_backbone.mamba.img_head.weight` (torch.save
    writes a shared parameter under each name): accepted only when equal to their table, written back on export.

Not ours: the understanding towers (`vision_backbone.*`, absent from the released file), the projector
(`projector.*`) and the VQ tokenizer (`llm_backbone.vqvae.*`) belong to the towers' tables. Their keys are skipped
through an explicit predicate (`is_tower_key`); `tower_tensors` hands them over, and export writes back whatever
tower tensors it is given. Every other tensor is used: one `CheckpointMismatchError` names every missing,
unexpected and mis-shaped one. The release has no config.json: `config_from_release` derives the architecture from
the tensor shapes (what shapes cannot tell, e.g. the SSM chunk size or the image-token count, keeps the release's
values unless overridden).
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Mapping

import flax.linen as nn
import jax
import numpy as np
from etils import epath
from flax import traverse_util

from janusflow_jax import paths
from janusflow_jax.convert import mamba2 as mamba2_convert
from janusflow_jax.convert.tensors import CheckpointMismatchError, StateDict, numpy_dtype, shape_of
from janusflow_jax.models import omnimamba
from janusflow_jax.models.mamba2 import IN_PROJ_PIECES, Mamba2Config
from janusflow_jax.models.omnimamba import OmniMambaConfig

LM = "llm_backbone.mamba."
BACKBONE = LM + "backbone."
TIED = {LM + "lm_head.weight": BACKBONE + "embedding.weight",
        LM + "img_head.weight": BACKBONE + "img_embeddings.word_embeddings.weight"}
TOWER_PREFIXES = ("vision_backbone.", "projector.", "llm_backbone.vqvae.")

# A piece: (release key, release shape, ((our path, rows), ...), transform); a fused tensor is cut along its first
# axis into the listed parts, in order (as in convert/mamba2.py).
Piece = tuple[str, tuple[int, ...], tuple[tuple[str, int], ...], str]
_TO_OURS = {**mamba2_convert._TO_OURS, "table": lambda t: t[0]}  # [1, rows, d] -> [rows, d]
_TO_RELEASE = {**mamba2_convert._TO_HF, "table": lambda t: t[None]}


def is_tower_key(key: str) -> bool:
    """Keys of the towers engineer's tables (vision towers, projector, VQ tokenizer): skipped here, not errors."""
    return key.startswith(TOWER_PREFIXES)


def tower_tensors(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors `is_tower_key` skips, to hand to the towers' conversion (and back to `export_release`)."""
    return {k: np.asarray(state[k]) for k in state if is_tower_key(k)}


def release_pieces(cfg: OmniMambaConfig) -> list[Piece]:
    """Every tensor of the composite LM in the release and where it goes (per-layer layout)."""
    lm = cfg.backbone.replace(tie_embeddings=True, scan_layers=False)
    if not cfg.backbone.tie_embeddings:
        raise ValueError("the release ties lm_head to the text embedding (tie_embeddings=True)")
    pieces: list[Piece] = []
    for key, shape, parts, transform in mamba2_convert.hf_pieces(lm, layout="mamba_ssm"):
        key = BACKBONE + key.removeprefix("backbone.")
        pieces.append((key, shape, tuple((f"backbone/{path}", rows) for path, rows in parts), transform))
    d, inner, bc, heads, r = lm.d_model, lm.d_inner, lm.bc_width, lm.nheads, lm.lora_rank
    rows = {"z": inner, "x": inner, "B": bc, "C": bc, "dt": heads}
    for i in range(lm.n_layer):
        key, path = f"{BACKBONE}layers.{i}.mixer.in_proj", f"backbone/layers_{i}/mixer"
        for task in lm.lora_tasks:
            pieces += [
                (f"{key}.{task}_lora_A0.weight", (r, d), ((f"{path}/lora_{task}/A", r),), "linear"),
                (f"{key}.{task}_lora_B0.weight", (sum(rows.values()), r),
                 tuple((f"{path}/lora_{task}/B_{piece}", rows[piece]) for piece, _ in IN_PROJ_PIECES), "linear"),
            ]
    hidden = cfg.image_mlp_ratio * d
    image = BACKBONE + "img_embeddings."
    pieces.append((image + "word_embeddings.weight", (cfg.image_vocab_size, d),
                   (("img_embeddings/embedding", cfg.image_vocab_size),), "identity"))
    for index, (name, n_in, n_out) in enumerate((("fc0", d, hidden), ("fc1", hidden, d), ("fc2", d, d))):
        torch_name = f"{image}project_in.projector.{2 * index}"
        pieces += [(f"{torch_name}.weight", (n_out, n_in), ((f"img_project_in/{name}/kernel", n_out),), "linear"),
                   (f"{torch_name}.bias", (n_out,), ((f"img_project_in/{name}/bias", n_out),), "identity")]
    pieces += [(f"{BACKBONE}caption_embed.cap_proj.{fc}.weight", (d, d), ((f"caption_embed/{fc}/kernel", d),),
                "linear") for fc in ("fc1", "fc2")]
    pieces += [(f"{BACKBONE}pos_embed", (1, cfg.pos_embed_rows, d), (("pos_embed", 1),), "table"),
               (f"{BACKBONE}mmu_pos_embed", (1, cfg.mmu_pos_embed_rows, d), (("mmu_pos_embed", 1),), "table")]
    return pieces


# -------------------------------------------------------------------------------------------------------- config
def config_from_release(state: Mapping[str, np.ndarray], source: str = "<state dict>", **overrides) -> OmniMambaConfig:
    """The architecture of a release state dict, from its shapes. Not derivable, so the release's values unless
    overridden: ngroups (1), chunk_size (256), norm_eps, dt_limit, lora_alpha (4 x rank: the release's scale 4),
    lora_dropout, num_image_tokens (256; the caption length is what the pos_embed rows leave), num_image_features
    (729). `overrides` are OmniMambaConfig or Mamba2Config fields."""
    def shape(key):
        if key not in state:
            raise ValueError(f"cannot derive the OmniMamba architecture from {source}: no tensor {key} (pass an "
                             f"explicit config)")
        return shape_of(state, key)

    vocab, d = shape(BACKBONE + "embedding.weight")
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(BACKBONE) + r"layers\.(\d+)\.", k))}
    n_layer = max(layer_ids) + 1 if layer_ids else 0
    mixer = f"{BACKBONE}layers.0.mixer."
    heads, = shape(mixer + "A_log")
    inner, = shape(mixer + "norm.weight")
    conv_dim, _, d_conv = shape(mixer + "conv1d.weight")
    ngroups = overrides.pop("ngroups", 1)
    tasks = tuple(t for t in omnimamba.TASKS if mixer + f"in_proj.{t}_lora_A0.weight" in state)
    rank = shape(mixer + f"in_proj.{tasks[0]}_lora_A0.weight")[0] if tasks else 8
    backbone_fields = {f for f in Mamba2Config.__dataclass_fields__}
    lm_values = dict(d_model=d, n_layer=n_layer, d_state=(conv_dim - inner) // (2 * ngroups), d_conv=d_conv,
                     expand=inner // d, headdim=inner // heads, ngroups=ngroups, vocab_size=vocab,
                     conv_bias=mixer + "conv1d.bias" in state, lora_tasks=tasks, lora_rank=rank,
                     lora_alpha=4.0 * rank, lora_dropout=0.05)
    lm_values.update({k: overrides.pop(k) for k in list(overrides) if k in backbone_fields})
    image_vocab, _ = shape(BACKBONE + "img_embeddings.word_embeddings.weight")
    hidden, _ = shape(BACKBONE + "img_embeddings.project_in.projector.0.weight")
    num_image_tokens = overrides.pop("num_image_tokens", 256)
    values = dict(backbone=Mamba2Config(**lm_values), image_vocab_size=image_vocab, image_mlp_ratio=hidden // d,
                  num_image_tokens=num_image_tokens,
                  caption_length=shape(BACKBONE + "pos_embed")[1] - 5 - num_image_tokens,
                  mmu_pos_embed_rows=shape(BACKBONE + "mmu_pos_embed")[1])
    values.update(overrides)
    return OmniMambaConfig(**values)


# ------------------------------------------------------------------------------------------------ import / export
def import_release_state(state: Mapping[str, np.ndarray], cfg: OmniMambaConfig,
                         source: str = "<state dict>") -> dict:
    """A release state dict -> our parameters (numpy, the config's param dtype, its layer layout). Tower keys are
    skipped (`is_tower_key`); anything else unused, missing or mis-shaped is reported in one
    CheckpointMismatchError. A tied copy must equal its table."""
    dtype = numpy_dtype(cfg.backbone.param_dtype)
    missing, mis_shaped, used, flat = [], [], set(), {}
    for key, shape, parts, transform in release_pieces(cfg):
        if key not in state:
            missing.append((key, shape))
            continue
        used.add(key)
        if shape_of(state, key) != shape:
            mis_shaped.append((key, shape, shape_of(state, key)))
            continue
        tensor = np.asarray(state[key])
        offsets = np.cumsum([rows for _, rows in parts])[:-1]  # none for a single part
        for (path, _), part in zip(parts, np.split(tensor, offsets, axis=0)):
            flat[path] = np.ascontiguousarray(_TO_OURS[transform](part).astype(dtype))
    unexpected = []
    for copy, table in TIED.items():
        if copy in state and table in state:
            same = shape_of(state, copy) == shape_of(state, table) and np.array_equal(np.asarray(state[copy]),
                                                                                       np.asarray(state[table]))
            if same:
                used.add(copy)
            else:
                unexpected.append((f"{copy} (not equal to the tied {table})", shape_of(state, copy)))
                used.add(copy)
    unexpected += [(k, shape_of(state, k)) for k in state if k not in used and not is_tower_key(k)]
    if missing or unexpected or mis_shaped:
        raise CheckpointMismatchError(source, missing, unexpected, mis_shaped)
    want = omnimamba.param_shapes(cfg.replace(scan_layers=False))
    got = {k: v.shape for k, v in flat.items()}
    if want != got:  # a bug in release_pieces, not in the checkpoint
        raise AssertionError(f"release_pieces does not fill the model: {sorted(set(want.items()) ^ set(got.items()))}")
    params = traverse_util.unflatten_dict(flat, sep="/")
    if cfg.backbone.scan_layers:
        params["backbone"] = mamba2_convert._stack_layers(params["backbone"], cfg.backbone)
    return params


def export_release_state(cfg: OmniMambaConfig, params, dtype=None, tied_copies: bool = True,
                         towers: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Our parameters (either layer layout) -> {release key: array}, bit-exact in the parameters' dtype (or cast to
    `dtype`, e.g. "float16" as released). tied_copies: also write lm_head / img_head (as the released file has
    them). towers: tower tensors (`tower_tensors`) written back unchanged."""
    params = dict(jax.device_get(nn.unbox(params)))
    if cfg.backbone.scan_layers:
        params["backbone"] = mamba2_convert._unstack_layers(params["backbone"], cfg.backbone)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    pieces = release_pieces(cfg)
    known = {path for _, _, parts, _ in pieces for path, _ in parts}
    missing = [(p, ()) for p in sorted(known - set(flat))]
    extra = [(p, flat[p].shape) for p in sorted(set(flat) - known)]
    if missing or extra:
        raise CheckpointMismatchError("<jax params>", missing=missing, unexpected=extra)
    cast = (lambda a: a) if dtype is None else (lambda a: a.astype(numpy_dtype(dtype)))  # noqa: E731
    out = {key: np.ascontiguousarray(cast(np.concatenate([_TO_RELEASE[transform](flat[path]) for path, _ in parts],
                                                         axis=0)))
           for key, _, parts, transform in pieces}
    if tied_copies:
        out.update({copy: out[table] for copy, table in TIED.items()})
    for key, value in (towers or {}).items():
        if not is_tower_key(key):
            raise ValueError(f"{key} is not a tower tensor ({TOWER_PREFIXES})")
        out[key] = np.asarray(value)
    return out


@paths.reads_local  # torch.load and safetensors read local files
def from_release(path: str | os.PathLike, config: OmniMambaConfig | None = None, param_dtype: str = "float32",
                 **overrides) -> tuple[OmniMambaConfig, dict]:
    """`OmniMamba-1.3b.pth` (or a safetensors file / directory with the same keys) -> (config, params).

    config: the architecture (default: `config_from_release` with `overrides`); params come in its layout, stored
    in `param_dtype`."""
    state = StateDict(os.fspath(path))
    if config is None:
        config = config_from_release(state, str(path), param_dtype=param_dtype, **overrides)
    else:
        config = config.replace(param_dtype=param_dtype, **overrides)
    return config, import_release_state(state, config, source=str(path))


def to_release(config: OmniMambaConfig, params, path: str | os.PathLike, dtype: str | None = "float16",
               towers: Mapping[str, np.ndarray] | None = None) -> epath.Path:
    """Writes a release-layout `.pth` (torch.save of a state dict, fp16 by default as released), atomically."""
    import torch

    state = export_release_state(config, params, dtype=dtype, towers=towers)
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in state.items():
        if value.dtype == numpy_dtype("bfloat16"):
            tensors[key] = torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
        else:
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
    # Written whole beside the target and renamed into place; on an object store written locally, then uploaded.
    with tempfile.TemporaryDirectory(prefix="omnimamba-", dir=None if paths.is_remote(path) else path.parent) as tmp:
        local = os.path.join(tmp, path.name)
        torch.save(tensors, local)
        if paths.is_remote(path):
            paths.copy_file(local, path)
        else:
            os.replace(local, os.fspath(path))
    return path
