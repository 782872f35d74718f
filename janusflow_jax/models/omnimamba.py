"""OmniMamba (hustvl/OmniMamba, arXiv 2503.08686): one Mamba-2 LM for image understanding (text out) and
text-to-image generation (LlamaGen VQ codes out), with decoupled vocabularies and task LoRA (docs/reference.md §9.1).

The parts, as the release's `MixerModel` / `MambaLMHeadModel` hold them:
  * `backbone`: the Mamba-2 LM (`models/mamba2.py`): text embedding (tied to the text head `lm_head`), 48 blocks
    whose mixers carry one LoRA adapter per task ("mmu", "t2i") on the input projection, norm_f;
  * `img_embeddings`: the VQ-code table (16384 x d), tied to the image head `img_head`, followed by
    `img_project_in` (Linear d -> 4d, GELU, Linear 4d -> d, GELU, Linear d -> d, with biases, exact GELU);
  * `caption_embed`: fc1, fc2 (d x d, no bias) with a tanh-GELU between, applied to the text embeddings of the
    whole t2i prompt (task and marker tokens included, as the release's t2i_generate and training do);
  * `pos_embed` [num_image_tokens + caption_length + 5, d] (329) added at every t2i position, and `mmu_pos_embed`
    [1500, d] added at every understanding position (decoding included).

Sequences:
  t2i: [<|t2i|>, <|sot|>, caption (68, left-padded with [PAD]), <|eot|>, <|soi|>] (the 72-token prompt), then the
       256 image tokens; the logits at positions 71 .. 326 (img_head) predict image tokens 0 .. 255;
  mmu: [<|mmu|>, <|soi|>, 729 image features (after the projector), <|eoi|>, <|sot|>, text ...]; the ids are given
       without the feature slots ([<|mmu|>, <|soi|>, <|eoi|>, <|sot|>, text ...], the release's layout) and the
       features are spliced in after the first two; logits from lm_head. Without an image the 729 slots are zeros
       (the release's text-only rows).
No position is masked: Mamba has no attention mask, pad tokens are real inputs (as in the release).

`OmniMambaSystem` runs the LM with the tower and projector in front of it over the system's parameters (training).

Calls (`model.apply(variables, ..., method=...)`): `t2i_logits`, `t2i_prefill`, `t2i_decode_step`, `mmu_logits`,
`mmu_prefill`, `mmu_decode_step`. Prefill/decode carry the Mamba cache (`models.mamba2.init_cache`); a decode step
takes the position it writes (a scalar) to pick its position-table row. `fold_lora` merges one task's adapter for
inference (then run `config.without_lora()`).

`OmniMambaSystemConfig` describes everything inference needs, as one checkpoint holds it: parameters {"lm": this
composite, "vision": `models.dinosiglip.DinoSigLIP`, "projector": `FusedGeluMLP`, "vq": `models.vq.VQModel`}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from janusflow_jax.models import layers, mamba2
from janusflow_jax.models.config import build_dataclass
from janusflow_jax.models.dinosiglip import DinoSigLIP, DinoSigLIPConfig, FusedGeluMLP, ProjectorConfig
from janusflow_jax.models.mamba2 import Mamba2Config, Mamba2LM
from janusflow_jax.models.vq import VQConfig, abstract_vq_params

FAMILY = "omnimamba"  # the `family` field of a saved config (checkpoint.py tells the model families apart by it)
TASKS = ("mmu", "t2i")


def _release_backbone() -> Mamba2Config:
    """mamba2-1.3b with the text vocabulary padded to 50288 and the release's task LoRA (r 8, alpha 32, p 0.05)."""
    return Mamba2Config(vocab_size=50288, lora_tasks=TASKS, lora_rank=8, lora_alpha=32.0, lora_dropout=0.05)


@dataclasses.dataclass(frozen=True)
class OmniMambaConfig:
    """OmniMamba-1.3B as released (config_stage2.yaml + models/mamba_vlm.py). LoRA settings live in the backbone
    config (`lora_tasks`, `lora_rank`, `lora_alpha`, `lora_dropout`); `tasks` and `lora_scale` read them."""

    backbone: Mamba2Config = dataclasses.field(default_factory=_release_backbone)
    image_vocab_size: int = 16384  # LlamaGen VQ-16 codebook
    num_image_tokens: int = 256  # 16 x 16 codes for a 256 px image
    caption_length: int = 68  # caption tokens in the t2i prompt (left-padded with [PAD])
    image_mlp_ratio: int = 4  # img_project_in: d -> ratio·d -> d -> d
    mmu_pos_embed_rows: int = 1500
    num_image_features: int = 729  # understanding features per image (27 x 27 patches, after the projector)

    def __post_init__(self):
        if isinstance(self.backbone, Mapping):
            object.__setattr__(self, "backbone", build_dataclass(Mamba2Config, self.backbone))
        if math.isqrt(self.num_image_tokens) ** 2 != self.num_image_tokens:
            raise ValueError(f"num_image_tokens={self.num_image_tokens} is not a square grid")
        if self.num_image_features + 4 > self.mmu_pos_embed_rows:
            raise ValueError(f"{self.num_image_features} image features do not fit {self.mmu_pos_embed_rows} "
                             f"mmu positions")

    # ---------------------------------------------------------------------------------------------- derived
    @property
    def d_model(self) -> int:
        return self.backbone.d_model

    @property
    def text_vocab_size(self) -> int:
        return self.backbone.vocab_size

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.backbone.lora_tasks

    @property
    def lora_scale(self) -> float:
        return self.backbone.lora_scale

    @property
    def t2i_prompt_length(self) -> int:
        """[<|t2i|>, <|sot|>, caption, <|eot|>, <|soi|>]: 72."""
        return self.caption_length + 4

    @property
    def pos_embed_rows(self) -> int:
        """The t2i prompt, the image tokens and <|eoi|>: 72 + 256 + 1 = 329 (the release's num_tokens + 73)."""
        return self.t2i_prompt_length + self.num_image_tokens + 1

    @property
    def image_grid(self) -> int:
        return math.isqrt(self.num_image_tokens)

    @property
    def compute_dtype(self):
        return self.backbone.compute_dtype

    @property
    def storage_dtype(self):
        return self.backbone.storage_dtype

    # --------------------------------------------------------------------------------------------- variants
    def replace(self, **changes) -> "OmniMambaConfig":
        """dataclasses.replace; backbone fields (dtype, scan_layers, ...) may be given directly."""
        backbone_fields = {f.name for f in dataclasses.fields(Mamba2Config)}
        backbone = {k: changes.pop(k) for k in list(changes) if k in backbone_fields}
        if backbone:
            changes["backbone"] = changes.get("backbone", self.backbone).replace(**backbone)
        return dataclasses.replace(self, **changes)

    def without_lora(self) -> "OmniMambaConfig":
        """The config `fold_lora`'s parameters run under (no adapters)."""
        return self.replace(lora_tasks=())

    def to_dict(self) -> dict:
        return {"family": FAMILY, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "OmniMambaConfig":
        values = dict(values)
        family = values.pop("family", FAMILY)
        if family != FAMILY:
            raise ValueError(f"config family {family!r} is not {FAMILY!r}")
        if "backbone" in values and not isinstance(values["backbone"], Mamba2Config):
            values["backbone"] = build_dataclass(Mamba2Config, values["backbone"])
        return build_dataclass(cls, values)


def tiny_config(**changes) -> OmniMambaConfig:
    """A few-kilobyte OmniMamba for tests: d 32, 2 layers, 8 heads, 12 caption tokens, 4 x 4 image tokens."""
    backbone = Mamba2Config(d_model=32, n_layer=2, d_state=8, headdim=8, chunk_size=8, vocab_size=96,
                            lora_tasks=TASKS, lora_rank=4, lora_alpha=16.0, lora_dropout=0.05)
    values = dict(backbone=backbone, image_vocab_size=48, num_image_tokens=16, caption_length=12,
                  mmu_pos_embed_rows=64, num_image_features=9)
    values.update(changes)
    return OmniMambaConfig(**values)


@dataclasses.dataclass(frozen=True)
class OmniMambaSystemConfig:
    """The release's parts, as our one OmniMamba checkpoint holds them (params {"lm", "vision", "projector", "vq"}):
    the composite LM, the understanding tower (DINOv2 + SigLIP, read at 384 px), the projector from the tower's
    fused features to the LM width, and the VQ tokenizer that turns the LM's codes into pixels. Defaults: the
    release."""

    lm: OmniMambaConfig = dataclasses.field(default_factory=OmniMambaConfig)
    vision: DinoSigLIPConfig = dataclasses.field(default_factory=DinoSigLIPConfig)
    projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
    vq: VQConfig = dataclasses.field(default_factory=VQConfig)

    def __post_init__(self):
        checks = [(self.projector.vision_dim, self.vision.width, "projector.vision_dim", "the tower's channels"),
                  (self.projector.llm_dim, self.lm.d_model, "projector.llm_dim", "the LM width"),
                  (self.vision.num_patches, self.lm.num_image_features, "the tower's patches",
                   "lm.num_image_features"),
                  (self.vq.codebook_size, self.lm.image_vocab_size, "vq.codebook_size", "lm.image_vocab_size")]
        bad = [f"{a} = {x} != {b} = {y}" for x, y, a, b in checks if x != y]
        if bad:
            raise ValueError(f"the OmniMamba parts do not fit together: {'; '.join(bad)}")

    @property
    def image_size(self) -> int:
        """Side of a generated image: the code grid times the VQ's downsampling (16 x 16 = 256 px)."""
        return self.lm.image_grid * self.vq.downsample_factor

    def to_dict(self) -> dict:
        lm = self.lm.to_dict()
        lm.pop("family")
        return {"family": FAMILY, "lm": lm, "vision": self.vision.to_dict(),
                "projector": dataclasses.asdict(self.projector), "vq": self.vq.to_dict()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "OmniMambaSystemConfig":
        values = dict(values)
        family = values.pop("family", FAMILY)
        if family != FAMILY:
            raise ValueError(f"config family {family!r} is not {FAMILY!r}")
        parts = {"lm": OmniMambaConfig.from_dict, "vision": DinoSigLIPConfig.from_dict,
                 "projector": lambda v: build_dataclass(ProjectorConfig, v), "vq": VQConfig.from_dict}
        return build_dataclass(cls, {k: parts[k](v) if k in parts and isinstance(v, Mapping) else v
                                     for k, v in values.items()})


def is_system_config(raw: Mapping[str, Any]) -> bool:
    """True for a saved config dict of the whole system (`OmniMambaSystemConfig`), False for the LM alone."""
    return "lm" in raw


# ----------------------------------------------------------------------------------------------------- modules
_TABLE_INIT = nn.initializers.truncated_normal(0.02)  # the release's trunc_normal_(std=0.02) position tables


class ImageProjectIn(nn.Module):
    """The release's img_embeddings.project_in (a FusedMLPProjector d -> d): Linear d -> ratio·d, GELU,
    Linear -> d, GELU, Linear d -> d, with biases, exact GELU."""

    config: OmniMambaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        d, dtype, param_dtype = cfg.d_model, cfg.compute_dtype, cfg.storage_dtype
        dense = lambda n, axes, name: layers.dense(n, axes, use_bias=True, dtype=dtype,  # noqa: E731
                                                   param_dtype=param_dtype, name=name)
        x = nn.gelu(dense(cfg.image_mlp_ratio * d, ("embed", "mlp"), "fc0")(x), approximate=False)
        x = nn.gelu(dense(d, ("mlp", "embed"), "fc1")(x), approximate=False)
        return dense(d, ("embed", "mlp"), "fc2")(x)


class CaptionEmbed(nn.Module):
    """The release's caption_embed.cap_proj: fc1, tanh-GELU, fc2 (d x d, no bias)."""

    config: OmniMambaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda axes, name: layers.dense(cfg.d_model, axes, use_bias=False, dtype=cfg.compute_dtype,  # noqa
                                                param_dtype=cfg.storage_dtype, name=name)
        return dense(("mlp", "embed"), "fc2")(nn.gelu(dense(("embed", "mlp"), "fc1")(x), approximate=True))


class OmniMamba(nn.Module):
    """The composite; see the module docstring. Logits come out in the compute dtype."""

    config: OmniMambaConfig

    def setup(self):
        cfg = self.config
        self.backbone = Mamba2LM(cfg.backbone)
        self.img_embeddings = nn.Embed(cfg.image_vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                                       param_dtype=cfg.storage_dtype,
                                       embedding_init=layers.logical_init(layers.DEFAULT_KERNEL_INIT,
                                                                          ("vocab", "embed")))
        self.img_project_in = ImageProjectIn(cfg)
        self.caption_embed = CaptionEmbed(cfg)
        self.pos_embed = self.param("pos_embed", layers.logical_init(_TABLE_INIT, (None, "embed")),
                                    (cfg.pos_embed_rows, cfg.d_model), cfg.storage_dtype)
        self.mmu_pos_embed = self.param("mmu_pos_embed", layers.logical_init(_TABLE_INIT, (None, "embed")),
                                        (cfg.mmu_pos_embed_rows, cfg.d_model), cfg.storage_dtype)

    # ------------------------------------------------------------------------------------------ embeddings
    def _table_rows(self, table, start, length: int):
        """table[start : start + length] with a traced start, in the compute dtype."""
        return jax.lax.dynamic_slice_in_dim(table, start, length, axis=0).astype(self.config.compute_dtype)

    def embed_t2i_prompt(self, prompt_ids):
        """[batch, L] text ids -> caption_embed(text embedding) [batch, L, d] (no positions)."""
        return self.caption_embed(self.backbone.embeddings(prompt_ids))

    def embed_image_tokens(self, image_ids):
        """[batch, n] VQ codes -> img_project_in(img_embeddings) [batch, n, d] (no positions)."""
        return self.img_project_in(self.img_embeddings(image_ids))

    def mmu_embeddings(self, input_ids, image_features=None):
        """input_ids [batch, S] ([<|mmu|>, <|soi|>, <|eoi|>, <|sot|>, text ...]) and image_features [batch, F, d]
        (None: zeros) -> [batch, S + F, d] with mmu_pos_embed added."""
        cfg = self.config
        text = self.backbone.embeddings(input_ids)
        if image_features is None:
            image_features = jnp.zeros((text.shape[0], cfg.num_image_features, cfg.d_model), text.dtype)
        embeds = jnp.concatenate([text[:, :2], image_features.astype(text.dtype), text[:, 2:]], axis=1)
        return embeds + self._table_rows(self.mmu_pos_embed, 0, embeds.shape[1])

    # ---------------------------------------------------------------------------------------------- heads
    def image_logits(self, hidden):
        """img_head, tied to the VQ-code table: [..., d] -> [..., image_vocab]."""
        return self.img_embeddings.attend(hidden)

    def text_logits(self, hidden):
        """lm_head, tied to the text embedding: [..., d] -> [..., text_vocab]."""
        return self.backbone.logits(hidden)

    # ------------------------------------------------------------------------------------------ text-to-image
    def t2i_logits(self, prompt_ids, image_ids, deterministic: bool = True, dropout_keys=None):
        """Teacher-forced image-token logits. prompt_ids: [batch, P] (the 72-token t2i prompt, the release's
        `caption_ids`); image_ids: [batch, n] (n <= num_image_tokens). Returns [batch, n, image_vocab]: row i
        predicts image token i (from positions P - 1 .. P + n - 2). dropout_keys: per-row LoRA dropout keys
        (`models.mamba2`) or None."""
        embeds = jnp.concatenate([self.embed_t2i_prompt(prompt_ids), self.embed_image_tokens(image_ids)], axis=1)
        embeds = embeds + self._table_rows(self.pos_embed, 0, embeds.shape[1])
        hidden, _ = self.backbone.hidden_states(embeds, None, "t2i", deterministic, dropout_keys)
        p, n = prompt_ids.shape[1], image_ids.shape[1]
        return self.image_logits(hidden[:, p - 1:p - 1 + n])

    def t2i_prefill(self, prompt_ids, cache=None):
        """The t2i prompt into the recurrent state: (logits for image token 0 [batch, image_vocab], cache)."""
        embeds = self.embed_t2i_prompt(prompt_ids)
        embeds = embeds + self._table_rows(self.pos_embed, 0, embeds.shape[1])
        if cache is None:
            cache = mamba2.init_cache(self.config.backbone, prompt_ids.shape[0])
        hidden, cache = self.backbone.hidden_states(embeds, cache, "t2i")
        return self.image_logits(hidden[:, -1]), cache

    def t2i_decode_step(self, image_token, position, cache):
        """image_token: [batch] VQ codes written at sequence `position` (a scalar: prompt length + its index).
        Returns (logits for the next image token [batch, image_vocab], cache)."""
        embeds = self.embed_image_tokens(image_token[:, None]) + self._table_rows(self.pos_embed, position, 1)
        hidden, cache = self.backbone.hidden_states(embeds, cache, "t2i")
        return self.image_logits(hidden[:, 0]), cache

    # -------------------------------------------------------------------------------------- understanding
    def mmu_logits(self, input_ids, image_features=None, deterministic: bool = True, dropout_keys=None):
        """input_ids [batch, S], image_features [batch, F, d] or None -> text logits [batch, S + F, text_vocab]
        at every position of [<|mmu|>, <|soi|>, features, <|eoi|>, <|sot|>, text ...]. dropout_keys: per-row LoRA
        dropout keys (`models.mamba2`) or None."""
        hidden, _ = self.backbone.hidden_states(self.mmu_embeddings(input_ids, image_features), None, "mmu",
                                                deterministic, dropout_keys)
        return self.text_logits(hidden)

    def mmu_prefill(self, input_ids, image_features=None, cache=None):
        """The understanding prompt into the recurrent state: (logits for the first answer token
        [batch, text_vocab], cache)."""
        embeds = self.mmu_embeddings(input_ids, image_features)
        if cache is None:
            cache = mamba2.init_cache(self.config.backbone, input_ids.shape[0])
        hidden, cache = self.backbone.hidden_states(embeds, cache, "mmu")
        return self.text_logits(hidden[:, -1]), cache

    def mmu_decode_step(self, token, position, cache):
        """token: [batch] text ids written at sequence `position` (a scalar). Returns (next-token logits
        [batch, text_vocab], cache)."""
        embeds = self.backbone.embeddings(token[:, None]) + self._table_rows(self.mmu_pos_embed, position, 1)
        hidden, cache = self.backbone.hidden_states(embeds, cache, "mmu")
        return self.text_logits(hidden[:, 0]), cache

    def init_all(self):
        """Touches every parameter (for `init`)."""
        cfg = self.config
        ids = jnp.zeros((1, 4), jnp.int32)
        self.t2i_logits(jnp.zeros((1, cfg.t2i_prompt_length), jnp.int32), jnp.zeros((1, 1), jnp.int32))
        return self.mmu_logits(ids, jnp.zeros((1, cfg.num_image_features, cfg.d_model), cfg.compute_dtype))


class OmniMambaSystem(nn.Module):
    """What training runs over the system's parameters {"lm", "vision", "projector", "vq"} (the VQ is never read:
    training reads precomputed codes): the LM's teacher-forced logits, with understanding images going through the
    tower and the projector first. The tower and projector compute in the LM's compute dtype."""

    config: OmniMambaSystemConfig

    def setup(self):
        cfg = self.config
        self.lm = OmniMamba(cfg.lm)
        self.vision = DinoSigLIP(cfg.vision, dtype=cfg.lm.compute_dtype)
        self.projector = FusedGeluMLP(cfg.projector, dtype=cfg.lm.compute_dtype)

    def image_features(self, images):
        """[batch, H, H, 3] RGB in [0, 1] (resize-naive) -> projected features [batch, F, d]."""
        return self.projector(self.vision(images))

    def t2i_logits(self, prompt_ids, image_ids, deterministic: bool = True, dropout_keys=None):
        """`OmniMamba.t2i_logits`."""
        return self.lm.t2i_logits(prompt_ids, image_ids, deterministic, dropout_keys)

    def mmu_target_logits(self, input_ids, images, deterministic: bool = True, dropout_keys=None):
        """Teacher-forced text logits [batch, S - 2, text_vocab] for input_ids [batch, S] ([<|mmu|>, <|soi|>,
        <|eoi|>, <|sot|>, text ...]) with the features of `images` [batch, H, H, 3] spliced in: row j predicts
        input_ids[:, 2 + j] (<|eoi|> from the last feature, each later id from the one before it). lm_head runs
        only at these positions, not at the F feature positions."""
        lm, length = self.lm, input_ids.shape[1]
        embeds = lm.mmu_embeddings(input_ids, self.image_features(images))
        hidden, _ = lm.backbone.hidden_states(embeds, None, "mmu", deterministic, dropout_keys)
        features = embeds.shape[1] - length
        return lm.text_logits(hidden[:, features + 1:features + length - 1])


# ------------------------------------------------------------------------------------------------------ params
def init_params(config: OmniMambaConfig, rng) -> dict:
    """Fresh parameters (boxed with their logical axes; `nn.unbox` for plain arrays), initialised by one jitted
    program (eagerly, op by op, the tiny model's init took 3x longer)."""
    return jax.jit(lambda r: OmniMamba(config).init(r, method=OmniMamba.init_all))(rng)["params"]


def abstract_params(config: OmniMambaConfig):
    """The boxed parameter tree as ShapeDtypeStructs (for shardings), without allocating."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def abstract_system_params(config: OmniMambaSystemConfig) -> dict:
    """{"lm", "vision", "projector", "vq"}: each part's boxed parameter tree as ShapeDtypeStructs."""
    side, key = config.vision.image_size, jax.random.key(0)
    images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
    features = jax.ShapeDtypeStruct((1, config.projector.vision_dim), jnp.float32)
    return {"lm": abstract_params(config.lm),
            "vision": jax.eval_shape(lambda x: DinoSigLIP(config.vision).init(key, x), images)["params"],
            "projector": jax.eval_shape(lambda x: FusedGeluMLP(config.projector).init(key, x), features)["params"],
            "vq": abstract_vq_params(config.vq)}


def init_system_params(config: OmniMambaSystemConfig, rng) -> dict:
    """Fresh {"lm", "vision", "projector", "vq"} parameters (boxed with their logical axes), each part from its own
    fold of `rng`; the tree `abstract_system_params` describes."""
    from janusflow_jax.models.vq import init_vq_params

    side, keys = config.vision.image_size, [jax.random.fold_in(rng, i) for i in range(4)]
    vision = jax.jit(lambda r: DinoSigLIP(config.vision).init(r, jnp.zeros((1, side, side, 3))))
    projector = jax.jit(lambda r: FusedGeluMLP(config.projector).init(r, jnp.zeros((1, config.projector.vision_dim))))
    return {"lm": init_params(config.lm, keys[0]), "vision": vision(keys[1])["params"],
            "projector": projector(keys[2])["params"], "vq": init_vq_params(config.vq, keys[3])}


def param_shapes(config: OmniMambaConfig) -> dict[str, tuple]:
    """{"a/b/kernel": shape} of every parameter."""
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.unbox(abstract_params(config)),
                                                                     sep="/").items()}


def fold_lora(params, config: OmniMambaConfig, task: str) -> dict:
    """`task`'s adapter merged into the backbone's input projections, all adapters dropped: parameters for
    `OmniMamba(config.without_lora())`, which then computes that task's outputs (both heads stay; running the other
    task with them is meaningless)."""
    params = dict(nn.unbox(params))
    params["backbone"] = mamba2.fold_lora(params["backbone"], config.backbone, task)
    return params
