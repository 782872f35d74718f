"""Model configuration: frozen dataclasses (hashable, so Flax modules can hold them).

The ml-collections configs in `configs/` describe a whole run; their `model` field is turned into a
`JanusFlowConfig` with `JanusFlowConfig.from_dict`. Unknown keys are errors, never silently dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp


def build_dataclass(cls, values: Mapping[str, Any] | None):
    """cls(**values) for a config dataclass; an unknown key is an error naming it and the known ones."""
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; known keys are {sorted(names)}")
    return cls(**values)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


class Dtypes:
    """`compute_dtype` / `storage_dtype` of a config whose `dtype` and `param_dtype` fields name them."""

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self):
        return jnp.dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The Llama-architecture LLM (DeepSeek-LLM 1.3B defaults; docs/reference.md §2)."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 16384
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")


@dataclasses.dataclass(frozen=True)
class SigLIPConfig:
    """SigLIP ViT as JanusFlow builds it (timm layout, no class token, exact GELU; docs/reference.md §3)."""

    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    layer_norm_eps: float = 1e-6
    # The released module carries a MAP pooling head (`attn_pool`) that its forward never uses. We create its
    # parameters so a checkpoint exported back to PyTorch loads with strict key matching.
    attn_pool: bool = True
    # Name in the official SigLIP table, written back into config.json on export.
    model_name: str = "siglip_large_patch16_384"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class GenEncoderConfig:
    """ShallowUViTEncoder (docs/reference.md §4b): 2x2 stride-2 patch conv then ConvNeXt blocks."""

    in_channels: int = 4
    channels: int = 768
    kernel_size: int = 2
    stride: int = 2
    padding: int = 0
    num_blocks: int = 2
    norm_eps: float = 1e-6
    use_bias: bool = True
    ffn_factor: int = 4


@dataclasses.dataclass(frozen=True)
class GenDecoderConfig:
    """ShallowUViTDecoder (docs/reference.md §4d). `in_channels` is the width of the LLM read-out after the aligner."""

    in_channels: int = 768
    channels: int = 768  # block_out_channels[-1]; must equal the encoder's channels (the long skip)
    out_channels: int = 4
    num_blocks: int = 2
    upsamples: int = 1
    norm_eps: float = 1e-6
    use_bias: bool = True
    ffn_factor: int = 4


@dataclasses.dataclass(frozen=True)
class RepaConfig:
    """REPA projector h_phi: Linear -> SiLU -> Linear -> SiLU -> Linear (docs/reference.md §7)."""

    hidden_dim: int = 2048
    # Read the LLM residual stream after this many blocks (HF hidden_states[6]). Always the raw residual stream:
    # at layer == num_layers this is before the final norm (HF's last hidden_states entry is after it).
    layer: int = 6


@dataclasses.dataclass(frozen=True)
class JanusFlowConfig(Dtypes):
    llm: LlamaConfig = LlamaConfig()
    und_encoder: SigLIPConfig = SigLIPConfig()
    gen_encoder: GenEncoderConfig = GenEncoderConfig()
    gen_decoder: GenDecoderConfig = GenDecoderConfig()
    repa: RepaConfig = RepaConfig()
    # Side of the (square) VAE latent grid the generation path works on: 384 px / 8.
    latent_size: int = 48
    # Compute dtype and storage dtype of every parameter.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Stack the transformer blocks (LLM and SigLIP) and run them with nn.scan.
    scan_layers: bool = False
    # Rematerialisation of each transformer block: see `layers.REMAT_POLICIES`.
    remat_policy: str = "none"
    # Attention kernel of the LLM and SigLIP: "xla" (einsum + fp32 softmax; exact, every backend), "cudnn" (cuDNN
    # flash attention through jax.nn.dot_product_attention; NVIDIA GPUs, bf16/fp16 compute only), "splash" (the
    # Pallas Splash flash kernel for TPUs, on whole sequences; elsewhere it runs in Pallas' slow interpreter) or
    # "auto" (cudnn on an NVIDIA GPU in bf16/fp16 with at least layers.CUDNN_PAD queries, splash on a TPU for whole
    # sequences of at least layers.SPLASH_PAD tokens, xla elsewhere: CPU runs are exactly the "xla" ones). On one
    # H200 "cudnn" let the 1.3B train step fit 48 examples (XLA: 16) and made sampling 1.5x faster (BENCHMARKS.md).
    attention: str = "auto"

    def __post_init__(self):
        if self.gen_decoder.channels != self.gen_encoder.channels:
            raise ValueError("gen_decoder.channels must equal gen_encoder.channels (the long skip is concatenated)")
        if self.latent_size % self.gen_encoder.stride:
            raise ValueError("latent_size must be divisible by gen_encoder.stride")
        if self.gen_decoder.upsamples != 1:
            raise ValueError("only upsamples=1 (as released) is supported")
        if not 0 <= self.repa.layer <= self.llm.num_layers:
            raise ValueError(f"repa.layer={self.repa.layer} outside [0, {self.llm.num_layers}]")
        from janusflow_jax.models.layers import REMAT_POLICIES  # local import: layers imports nothing from here

        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {sorted(REMAT_POLICIES)}")
        jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention {self.attention!r} not in {ATTENTION_IMPLEMENTATIONS}")
        if self.attention == "cudnn" and jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attention 'cudnn' needs bfloat16 or float16 compute, not dtype {self.dtype!r}")

    @property
    def num_gen_tokens(self) -> int:
        """Latent tokens in the LLM sequence: (48 / 2)^2 = 576."""
        return (self.latent_size // self.gen_encoder.stride) ** 2


    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "JanusFlowConfig":
        values = dict(values)
        sub = {
            "llm": LlamaConfig,
            "und_encoder": SigLIPConfig,
            "gen_encoder": GenEncoderConfig,
            "gen_decoder": GenDecoderConfig,
            "repa": RepaConfig,
        }
        for key, sub_cls in sub.items():
            if key in values and not isinstance(values[key], sub_cls):
                values[key] = build_dataclass(sub_cls, values[key])
        return build_dataclass(cls, values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "JanusFlowConfig":
        return dataclasses.replace(self, **changes)
