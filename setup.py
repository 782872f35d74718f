"""janusflow_jax: JanusFlow (unified understanding + rectified-flow generation) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="janusflow_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of DeepSeek JanusFlow with exact PyTorch checkpoint conversion and training.",
    packages=find_packages(include=["janusflow_jax", "janusflow_jax.*", "configs", "launch"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "ml-collections>=1.0",
        "grain>=0.2.12",
        "safetensors>=0.4.3",
        "transformers>=4.46",
        "numpy>=1.26",
        "pillow>=10.0",
        "absl-py>=2.0",
    ],
    extras_require={
        # Reading `pytorch_model.bin` and the PyTorch parity tests. The TPU install needs none of it.
        "torch": ["torch>=2.4"],
        "test": [
            "pytest>=8.0",
            "torch>=2.4",
            "torchvision",
            "timm>=1.0.15",
            "diffusers>=0.32",
        ],
    },
)
