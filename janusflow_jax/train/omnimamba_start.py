"""The start of OmniMamba's stage 1 (`config.init.kind = "start"`), built as the release builds it: a pretrained
Mamba-2 LM (state-spaces/mamba2-1.3b, mamba_ssm's layout; `convert.mamba2.from_directory`), the two timm towers
(`dinov2.safetensors`, `siglip.safetensors`), LlamaGen's VQ (`vq_ds16_t2i.pt`, or a .pth that holds it), and every
new part initialised as hustvl/OmniMamba's code does (models/stage2/mixer_seq_simple.py `_init_weights` applied by
MixerModel and MambaLMHeadModel, models/stage2/lora.py, models/omnimamba.py):

  * img_embeddings (an nn.Embedding):                normal(0, 0.02)
  * img_project_in fc0/fc1/fc2 (FusedMLPProjector):  PyTorch's default Linear weight, U(±1/√fan_in); biases zeroed
  * caption_embed fc1 (no bias):                     U(±1/√d)
  * caption_embed fc2 (no bias):                     U(±1/√d) / √n_layer (the GPT-2 rescale of "fc2.weight"; one
                                                     residual per layer, no MLP)
  * pos_embed, mmu_pos_embed:                        trunc_normal_(mean 0, std 0.02) with torch's default bounds
                                                     a=-2, b=2 (absolute: 100 std, so in effect a normal)
  * task LoRA (models/stage2/lora.py reset_parameters): A U(±1/√d) (kaiming_uniform_, a=√5), B zeros
  * projector (FusedMLPProjector outside the LM, built after torch.manual_seed(embed_dim)): PyTorch's default Linear
    init, weights and biases U(±1/√fan_in) (its layers are projector.0/2/4: no rescale, no zeroing).

The LM's tensors (embedding, blocks, norm_f) are the pretrained ones; the release's mixers' `out_proj` rescale is
overwritten by that load. The text vocabulary keeps the checkpoint's padded rows: mamba2-1.3b's 50277 tokens are
stored as 50288 rows, and the release's added tokens ([PAD] 50277, <|soi|> .. <|lvg|> 50278 .. 50286) take rows
already there (its `resize_token_embeddings(50287, pad_to_multiple_of=16)` keeps the table as it is), so their
embeddings are the checkpoint's padding rows, as in the release.

`stage1_start` returns (config, a host-side numpy parameter tree, float32, in the config's layer layout);
`train/init.py` places it on the mesh.
"""

from __future__ import annotations

import math
import os

import numpy as np
from etils import epath

from janusflow_jax import paths
from janusflow_jax.convert import dinosiglip as dinosiglip_convert
from janusflow_jax.convert import mamba2 as mamba2_convert
from janusflow_jax.convert import omnimamba_release as release
from janusflow_jax.convert.tensors import CheckpointMismatchError, flatten
from janusflow_jax.models import omnimamba
from janusflow_jax.models.omnimamba import OmniMambaSystemConfig

EMBEDDING_STD = 0.02  # _init_weights' initializer_range for every nn.Embedding
TABLE_STD, TABLE_BOUNDS = 0.02, (-2.0, 2.0)  # nn.init.trunc_normal_(t, 0., 0.02): torch's a=-2, b=2 (absolute)


class StartError(ValueError):
    """The stage-1 start's inputs do not fit the run's model (one line)."""


# ------------------------------------------------------------------------------------------- the release's inits
def torch_linear_weight(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    """nn.Linear's default weight (kaiming_uniform_, a=√5): U(±1/√fan_in), as our [in, out] kernel."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)


def torch_linear_bias(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    """nn.Linear's default bias: U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)


def trunc_normal(rng: np.random.Generator, shape, std: float, bounds: tuple[float, float]) -> np.ndarray:
    """nn.init.trunc_normal_(mean 0, std) with absolute bounds: normal draws, those outside redrawn."""
    out = rng.normal(0.0, std, shape)
    while (bad := (out < bounds[0]) | (out > bounds[1])).any():
        out[bad] = rng.normal(0.0, std, int(bad.sum()))
    return out.astype(np.float32)


def new_lm_parts(config: omnimamba.OmniMambaConfig, rng: np.random.Generator) -> dict:
    """The composite LM's parts mamba2-1.3b does not have, initialised as the release does (per-layer layout):
    {"img_embeddings", "img_project_in", "caption_embed", "pos_embed", "mmu_pos_embed", "lora": [per layer]}."""
    d, n_layer, hidden = config.d_model, config.backbone.n_layer, config.image_mlp_ratio * config.d_model
    project_in = {}
    for name, (n_in, n_out) in zip(("fc0", "fc1", "fc2"), ((d, hidden), (hidden, d), (d, d))):
        project_in[name] = {"kernel": torch_linear_weight(rng, n_in, n_out), "bias": np.zeros(n_out, np.float32)}
    parts = {
        "img_embeddings": {"embedding": rng.normal(0.0, EMBEDDING_STD, (config.image_vocab_size, d))
                           .astype(np.float32)},
        "img_project_in": project_in,
        "caption_embed": {"fc1": {"kernel": torch_linear_weight(rng, d, d)},
                          "fc2": {"kernel": torch_linear_weight(rng, d, d) / np.float32(math.sqrt(n_layer))}},
        "pos_embed": trunc_normal(rng, (config.pos_embed_rows, d), TABLE_STD, TABLE_BOUNDS),
        "mmu_pos_embed": trunc_normal(rng, (config.mmu_pos_embed_rows, d), TABLE_STD, TABLE_BOUNDS),
    }
    b = config.backbone
    widths = {"z": b.d_inner, "x": b.d_inner, "B": b.bc_width, "C": b.bc_width, "dt": b.nheads}
    parts["lora"] = [{f"lora_{task}": {"A": torch_linear_weight(rng, d, b.lora_rank),
                                       **{f"B_{piece}": np.zeros((b.lora_rank, width), np.float32)
                                          for piece, width in widths.items()}}
                      for task in b.lora_tasks} for _ in range(n_layer)]
    return parts


def projector_params(config: OmniMambaSystemConfig, rng: np.random.Generator) -> dict:
    """FusedMLPProjector with PyTorch's default Linear init (weights and biases)."""
    p = config.projector
    out = {}
    for name, (n_in, n_out) in zip(("fc1", "fc2", "fc3"), ((p.vision_dim, p.hidden_dim), (p.hidden_dim, p.llm_dim),
                                                            (p.llm_dim, p.llm_dim))):
        out[name] = {"kernel": torch_linear_weight(rng, n_in, n_out), "bias": torch_linear_bias(rng, n_in, n_out)}
    return out


# ------------------------------------------------------------------------------------------------------ the start
def _check_backbone(lm_cfg, wanted, lm_path) -> None:
    """The pretrained LM must be the run's backbone (shape fields); its padded vocabulary must be the run's."""
    fields = ("d_model", "n_layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "vocab_size", "conv_bias")
    bad = [f"{f} {getattr(lm_cfg, f)} (config.model: {getattr(wanted, f)})" for f in fields
           if getattr(lm_cfg, f) != getattr(wanted, f)]
    if bad:
        raise StartError(f"the language model at {lm_path} is not config.model's backbone: {', '.join(bad)}")
    if not lm_cfg.tie_embeddings:
        raise StartError(f"the language model at {lm_path} has an untied lm_head; OmniMamba ties it to the text "
                         f"embedding (tie_embeddings=True)")


def stage1_start(config: OmniMambaSystemConfig, lm_path, towers_path, seed: int = 0
                 ) -> tuple[OmniMambaSystemConfig, dict]:
    """(config, {"lm", "vision", "projector", "vq"} as float32 numpy arrays in config.lm's layer layout).

    lm_path: a Mamba-2 LM directory (mamba_ssm's layout, as state-spaces/mamba2-1.3b, or transformers'); towers_path:
    a directory holding dinov2.safetensors and siglip.safetensors (README, OmniMamba) and the VQ (vq_ds16_t2i.pt, or
    an OmniMamba-1.3b.pth that holds llm_backbone.vqvae.*). seed: the new parts' draws (numpy's PCG64)."""
    if paths.is_remote(towers_path):  # torch.load and safetensors read local files
        with paths.local_copy(towers_path) as local:
            return stage1_start(config, lm_path, local, seed)
    towers = epath.Path(towers_path)
    missing = [name for name in (release.DINO_FILE, release.SIGLIP_FILE) if not (towers / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{towers} lacks {', '.join(missing)}: {release.TOWERS_HINT}")
    lm_cfg, backbone = mamba2_convert.from_directory(lm_path)
    wanted = config.lm.backbone
    _check_backbone(lm_cfg, wanted, lm_path)
    rng = np.random.default_rng(seed)
    parts = new_lm_parts(config.lm, rng)
    for i, lora in enumerate(parts.pop("lora")):
        backbone[f"layers_{i}"]["mixer"].update(lora)
    lm = {"backbone": backbone, **parts}
    want = omnimamba.param_shapes(config.lm.replace(scan_layers=False))
    got = {k: np.shape(v) for k, v in flatten(lm).items()}
    if want != got:  # a bug here, not in the inputs
        raise AssertionError(f"the start does not fill the LM: {sorted(set(want.items()) ^ set(got.items()))}")
    if wanted.scan_layers:
        lm["backbone"] = mamba2_convert._stack_layers(lm["backbone"], wanted)
    params = {"lm": lm, "projector": projector_params(config, rng)}
    pth = towers / release.RELEASE_FILE
    read_vq = release.vq_reader(towers, release.open_weights(pth) if pth.is_file() else {})
    read = {"dino": lambda: dinosiglip_convert.vit_from_timm(release.open_weights(towers / release.DINO_FILE),
                                                             config.vision.dino, "float32"),
            "siglip": lambda: dinosiglip_convert.vit_from_timm(release.open_weights(towers / release.SIGLIP_FILE),
                                                               config.vision.siglip, "float32"),
            "vq": lambda: read_vq(config.vq, "float32")}
    files = {"dino": release.DINO_FILE, "siglip": release.SIGLIP_FILE, "vq": read_vq.file or release.RELEASE_FILE}
    errors = []
    for part, load in read.items():
        try:
            params[part] = load()
        except CheckpointMismatchError as e:
            errors.append((files[part], e))
    if errors:
        raise release.merge_errors(errors, os.fspath(towers))
    params["vision"] = {"dino": params.pop("dino"), "siglip": params.pop("siglip")}
    return config, params
