"""janusflow_jax: JanusFlow (DeepSeek, CVPR 2025) in JAX/Flax.

`JanusFlow` is the composite Linen module (`understand`, `velocity`); `janusflow_jax.convert` moves checkpoints
between the official PyTorch layout and JAX; `janusflow_jax.sharding` creates parameters on a device mesh.
"""

from janusflow_jax.config import (GenDecoderConfig, GenEncoderConfig, JanusFlowConfig, LlamaConfig, RepaConfig,
                                  SigLIPConfig)
from janusflow_jax.model import JanusFlow, abstract_params, init_params

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
]
