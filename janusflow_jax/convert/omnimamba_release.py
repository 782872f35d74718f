"""The OmniMamba release as one directory <-> our one checkpoint (params {"lm", "vision", "projector", "vq"},
`models.omnimamba.OmniMambaSystemConfig`), both directions, bit-exact.

A release directory holds
  * `OmniMamba-1.3b.pth` (hustvl/OmniMamba; read with `torch.load(weights_only=True)` only): the composite LM
    (`convert/omnimamba.py`), the projector `projector.projector.*` (`convert/dinosiglip.py`) and possibly LlamaGen's
    VQ `llm_backbone.vqvae.*` (`convert/vq.py`);
  * `vq_ds16_t2i.pt` (peizesun/llamagen_t2i), read when the .pth holds no VQ: the release builds its VQ-16 from this
    file (`models/mamba_vlm.py` `init_1st_stage_model`) and loads the .pth with `strict=False`, and the released
    .pth's size (LM + projector in float16) says it carries none;
  * `dinov2.safetensors` and `siglip.safetensors`: the timm state dicts of the two vision backbones
    (`vit_large_patch14_reg4_dinov2.lvd142m` built at img_size=384, `vit_so400m_patch14_siglip_384`); the release
    has no vision tower (Prismatic builds it from timm), so a user saves them once with docs/omnimamba.md's one-liner;
  * the tokenizer (EleutherAI/gpt-neox-20b's tokenizer.json, tokenizer_config.json, special_tokens_map.json; plus
    `omnimamba_processor.json` when we wrote the directory) — not read here, copied by `launch.convert`;
  * optionally `omnimamba_config.json` (our `OmniMambaSystemConfig.to_dict()`, written by every export): the
    architecture. Without it the release's is assumed: the towers and the VQ as released, the LM derived from the
    .pth's shapes (`convert.omnimamba.config_from_release`).

Every tensor of the three weight files is used or deliberately skipped: the backbones' blocks after the one read,
their final norm and heads (SigLIP's MAP head), and the VQ's `codebook_used` training statistic. Anything else —
missing, unexpected (any .pth key outside the LM, projector and VQ tables, `vision_backbone.*` included: the towers
come from the safetensors files) or mis-shaped — is listed in one `CheckpointMismatchError`, each tower tensor named
with its file. Export writes the same files: the .pth in float16 as released (the tied lm_head / img_head copies
included, `codebook_used` as zeros), the towers' kept tensors in the parameters' dtype (timm's float32) and
omnimamba_config.json. So release -> ours -> release gives back every used tensor bit for bit (float32 parameters
hold float16 exactly), and a second conversion the same parameters.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Mapping

import numpy as np
from etils import epath

from janusflow_jax import paths
from janusflow_jax.convert import dinosiglip as dinosiglip_convert
from janusflow_jax.convert import omnimamba as lm_convert
from janusflow_jax.convert import vq as vq_convert
from janusflow_jax.convert.tensors import CheckpointMismatchError, StateDict, atomic_write_dir, shape_of
from janusflow_jax.data import omnimamba_processor
from janusflow_jax.models.dinosiglip import DinoSigLIPConfig, ProjectorConfig
from janusflow_jax.models.omnimamba import OmniMambaSystemConfig
from janusflow_jax.models.vq import VQConfig

RELEASE_FILE = "OmniMamba-1.3b.pth"  # hustvl/OmniMamba's weights file
DINO_FILE = "dinov2.safetensors"  # timm vit_large_patch14_reg4_dinov2.lvd142m at img_size=384, state_dict()
SIGLIP_FILE = "siglip.safetensors"  # timm vit_so400m_patch14_siglip_384, state_dict()
VQ_FILE = "vq_ds16_t2i.pt"  # LlamaGen's VQ-16 (peizesun/llamagen_t2i), beside a .pth that holds no VQ
CONFIG_FILE = "omnimamba_config.json"
WEIGHT_FILES = (RELEASE_FILE, DINO_FILE, SIGLIP_FILE)
# gpt-neox-20b's tokenizer files and our processor settings: what launch.generate / launch.chat need besides weights.
TOKENIZER_FILES = omnimamba_processor.TOKENIZER_FILES
RELEASE_DTYPE = "float16"  # the .pth's dtype as released

TOWERS_HINT = "save the timm towers there (docs/omnimamba.md: one python command)"
VQ_HINT = f"hf download peizesun/llamagen_t2i {VQ_FILE} --local-dir <the release directory>"


def is_release_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding the release's weights file (the OmniMamba family)."""
    return (epath.Path(path) / RELEASE_FILE).is_file()


def open_weights(path: epath.Path) -> StateDict:
    """StateDict over one weights file; a damaged or cut-short file is a ValueError naming it."""
    try:
        return StateDict(os.fspath(path))
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or damaged download?): "
                         f"{first}") from None


def release_config(directory: str | os.PathLike, state: Mapping | None = None) -> OmniMambaSystemConfig:
    """The architecture of a release directory: omnimamba_config.json if present, else the release's (the LM's
    shapes read from the .pth `state`)."""
    path = epath.Path(directory) / CONFIG_FILE
    if path.is_file():
        try:
            return OmniMambaSystemConfig.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} does not describe an OmniMamba system: {e}") from None
    state = open_weights(epath.Path(directory) / RELEASE_FILE) if state is None else state
    try:
        lm = lm_convert.config_from_release(state, os.fspath(epath.Path(directory) / RELEASE_FILE))
        return OmniMambaSystemConfig(lm=lm, vision=DinoSigLIPConfig(), vq=VQConfig(),
                                     projector=ProjectorConfig(vision_dim=DinoSigLIPConfig().width,
                                                               llm_dim=lm.d_model))
    except ValueError as e:
        raise ValueError(f"{directory} has no {CONFIG_FILE}, so the release's architecture was assumed, and its "
                         f"weights do not fit it: {e}") from None


def merge_errors(errors: list[tuple[str, CheckpointMismatchError]], source: str) -> CheckpointMismatchError:
    """One error from several parts' errors; tensors of a tower file are named "file: key"."""
    def name(prefix, key):
        return f"{prefix}: {key}" if prefix else key

    return CheckpointMismatchError(
        source, [(name(p, k), s) for p, e in errors for k, s in e.missing],
        [(name(p, k), s) for p, e in errors for k, s in e.unexpected],
        [(name(p, k), want, got) for p, e in errors for k, want, got in e.mis_shaped])


@paths.reads_local  # torch.load and safetensors read local files: a temporary local copy
def from_release_dir(directory: str | os.PathLike, param_dtype: str = "float32",
                     scan_layers: bool = False) -> tuple[OmniMambaSystemConfig, dict]:
    """A release directory -> (OmniMambaSystemConfig, {"lm", "vision", "projector", "vq"}), numpy arrays stored in
    `param_dtype`. scan_layers: the LM's blocks stacked (the towers stay per layer). The VQ comes from the .pth when
    it holds `llm_backbone.vqvae.*`, else from `vq_ds16_t2i.pt` beside it (as the release builds it)."""
    directory = epath.Path(directory)
    missing = [name for name in WEIGHT_FILES if not (directory / name).is_file()]
    if missing:
        hint = f": {TOWERS_HINT}" if set(missing) & {DINO_FILE, SIGLIP_FILE} else ""
        raise FileNotFoundError(f"{directory} lacks {', '.join(missing)}{hint}")
    state, dino, siglip = (open_weights(directory / name) for name in WEIGHT_FILES)
    read_vq = vq_reader(directory, state)
    config = release_config(directory, state)
    lm = config.lm.replace(param_dtype=param_dtype, scan_layers=scan_layers)
    config = OmniMambaSystemConfig(lm=lm, vision=config.vision, projector=config.projector, vq=config.vq)
    params, errors = {}, []
    parts = {
        "lm": ("", lambda: lm_convert.import_release_state(state, lm, source=str(directory / RELEASE_FILE))),
        "projector": ("", lambda: dinosiglip_convert.projector_from_release(state, config.projector, param_dtype)),
        "vq": (read_vq.file, lambda: read_vq(config.vq, param_dtype)),
        "dino": (DINO_FILE, lambda: dinosiglip_convert.vit_from_timm(dino, config.vision.dino, param_dtype)),
        "siglip": (SIGLIP_FILE, lambda: dinosiglip_convert.vit_from_timm(siglip, config.vision.siglip, param_dtype)),
    }
    for part, (file, read) in parts.items():
        try:
            params[part] = read()
        except CheckpointMismatchError as e:
            errors.append((file, e))
    # The LM table skips every tower prefix; the projector and VQ tables read only their own: the rest is unclaimed.
    claimed = (dinosiglip_convert.RELEASE_PROJECTOR_PREFIX, vq_convert.RELEASE_VQ_PREFIX)
    unclaimed = [(k, shape_of(state, k)) for k in state if lm_convert.is_tower_key(k) and not k.startswith(claimed)]
    if unclaimed:
        errors.append(("", CheckpointMismatchError("", unexpected=unclaimed)))
    if errors:
        raise merge_errors(errors, str(directory))
    params["vision"] = {"dino": params.pop("dino"), "siglip": params.pop("siglip")}
    return config, params


class _VQReader:
    """Where a release directory's VQ lives: `file` "" (inside the .pth, under `llm_backbone.vqvae.`) or VQ_FILE."""

    def __init__(self, file: str, state: Mapping, prefix: str, source: str):
        self.file, self.state, self.prefix, self.source = file, state, prefix, source

    def __call__(self, cfg, param_dtype: str) -> dict:
        return vq_convert.vq_from_llamagen(self.state, cfg, param_dtype, self.prefix, source=self.source)


def vq_reader(directory: epath.Path, state: Mapping) -> _VQReader:
    """The VQ of a release directory: in the .pth if any `llm_backbone.vqvae.*` key is there, else VQ_FILE beside it
    (LlamaGen's checkpoint, read with weights_only); neither is a FileNotFoundError naming the file to download."""
    if any(key.startswith(vq_convert.RELEASE_VQ_PREFIX) for key in state):
        return _VQReader("", state, vq_convert.RELEASE_VQ_PREFIX, os.fspath(directory / RELEASE_FILE))
    path = directory / VQ_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no VQ ({RELEASE_FILE} holds no {vq_convert.RELEASE_VQ_PREFIX}*, as "
                                f"released, and there is no {VQ_FILE} beside it): {VQ_HINT}")
    try:
        vq_state = vq_convert.load_llamagen_checkpoint(path)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable LlamaGen VQ checkpoint (truncated or damaged download?): "
                         f"{first}") from None
    return _VQReader(VQ_FILE, vq_state, "", os.fspath(path))


def release_states(config: OmniMambaSystemConfig, params, dtype: str | None = None) -> dict[str, dict]:
    """Our parameters -> {file name: {key: array}} of the release layout. dtype: of every tensor; default the .pth
    in float16 (as released) and the towers in the parameters' own dtype."""
    pth_dtype = dtype or RELEASE_DTYPE
    towers = {**dinosiglip_convert.projector_to_release(params["projector"], pth_dtype),
              **vq_convert.vq_to_llamagen(config.vq, params["vq"], pth_dtype, prefix=vq_convert.RELEASE_VQ_PREFIX)}
    dino, siglip = dinosiglip_convert.dinosiglip_to_timm(config.vision, params["vision"], dtype)
    return {RELEASE_FILE: lm_convert.export_release_state(config.lm, params["lm"], pth_dtype, towers=towers),
            DINO_FILE: dino, SIGLIP_FILE: siglip}


def write_release_dir(config: OmniMambaSystemConfig, params, out_dir: str | os.PathLike, dtype: str | None = None,
                      overwrite: bool = False, copy_from: str | os.PathLike | None = None) -> dict[str, dict]:
    """Writes the release directory (the three weight files + omnimamba_config.json, and the TOKENIZER_FILES found
    in `copy_from`) atomically. Returns what `release_states` wrote."""
    import torch
    from safetensors.numpy import save_file

    states = release_states(config, params, dtype)

    def write(tmp):
        tmp = epath.Path(tmp)
        tensors, shared = {}, {}
        for key, value in states[RELEASE_FILE].items():  # torch.save of a plain state dict, as released
            same = id(value)  # a tied copy is the same array: one tensor under both names, as released
            if same not in shared:
                value = np.ascontiguousarray(value)
                if str(value.dtype) == "bfloat16":
                    shared[same] = torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
                else:
                    shared[same] = torch.from_numpy(value.copy())
            tensors[key] = shared[same]
        with (tmp / RELEASE_FILE).open("wb") as f:
            torch.save(tensors, f)
        for name in (DINO_FILE, SIGLIP_FILE):
            save_file({k: np.ascontiguousarray(v) for k, v in states[name].items()}, str(tmp / name),
                      metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        for name in TOKENIZER_FILES if copy_from is not None else ():
            if (epath.Path(copy_from) / name).is_file():
                (epath.Path(copy_from) / name).copy(tmp / name, overwrite=True)

    atomic_write_dir(out_dir, write, overwrite)
    return states
