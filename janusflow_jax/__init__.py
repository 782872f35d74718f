"""janusflow_jax: JanusFlow (DeepSeek, CVPR 2025) in JAX/Flax.

`JanusFlow` is the composite Linen module (`understand`, `velocity`); `janusflow_jax.convert.janusflow` moves
checkpoints between the official PyTorch layout and JAX (`from_pytorch`, `to_pytorch`, `init_from_parts`; OmniMamba's:
`janusflow_jax.convert.omnimamba`); `janusflow_jax.sharding` creates parameters on a device mesh;
`sample_latents` / `generate_images` (text-to-image) and `chat` (image chat) are the inference entry points.
"""

from janusflow_jax.models.config import (GenDecoderConfig, GenEncoderConfig, JanusFlowConfig, LlamaConfig,
                                         RepaConfig, SigLIPConfig)
from janusflow_jax.models.janusflow import JanusFlow, abstract_params, init_params

__all__ = [
    "JanusFlow",
    "JanusFlowConfig",
    "LlamaConfig",
    "SigLIPConfig",
    "GenEncoderConfig",
    "GenDecoderConfig",
    "RepaConfig",
    "abstract_params",
    "init_params",
    "sample_latents",
    "generate_images",
    "chat",
]

# Inference entry points, imported on first use (they pull in the tokenizer stack).
_LAZY = {"sample_latents": "janusflow_jax.inference.sampler", "generate_images": "janusflow_jax.inference.sampler",
         "chat": "janusflow_jax.inference.chat"}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'janusflow_jax' has no attribute {name!r}")
