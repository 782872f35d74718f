"""janusflow_jax: JanusFlow (unified understanding + rectified-flow generation) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="janusflow_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of DeepSeek JanusFlow with exact PyTorch checkpoint conversion and training.",
    packages=find_packages(include=["janusflow_jax", "janusflow_jax.*", "configs", "launch", "examples", "examples.*"]),
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
        "array-record>=0.8",  # prepared datasets (ArrayRecord shards read by grain; >= 0.8 reads gs:// natively)
        "msgpack>=1.0",  # record serialisation
        "tqdm>=4.60",  # progress bars (train, prepare_data, generate)
        "tensorboardX>=2.6",  # TensorBoard scalars without TensorFlow
        "matplotlib>=3.7",  # loss-curve PNG
        "scikit-learn>=1.3",  # the digits run: sklearn.datasets.load_digits and its generation judge
    ],
    extras_require={
        # Reading `pytorch_model.bin` and the PyTorch parity tests. The TPU install needs none of it.
        "torch": ["torch>=2.4"],
        # Cloud TPU runtime (libtpu); also what `launch.compile` needs to compile for a TPU topology on a CPU host.
        "tpu": ["jax[tpu]"],
        # gs:// paths: etils.epath's backend (gcsfs) and tensorboardX's GCS writer (google-cloud-storage); orbax and
        # ArrayRecord reach GCS through tensorstore / their own clients.
        "gcs": ["gcsfs>=2024.2", "google-cloud-storage>=2.14"],
        # `launch.bench torch`: the PyTorch eager baselines on the same device.
        "bench": ["torch>=2.4", "transformers>=4.46", "timm>=1.0.15", "diffusers>=0.32"],
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",  # test modules spread over the cores (-n auto --dist loadfile)
            # The pair the parity tests run with; PyPI's torchvision fails beside any other torch version.
            "torch==2.14.1",
            "torchvision==0.29.1",
            "timm>=1.0.15",
            "diffusers>=0.32",
            "tensorflow-datasets>=4.9",  # the TFDS source of prepare_data
            # tests/test_pod.py: gs:// against a GCS emulator in its own process (conftest.gcs), with the gcs extra
            "gcsfs>=2024.2",
            "google-cloud-storage>=2.14",
            "gcp-storage-emulator>=2026.7",  # the version whose handlers conftest patches (x-goog-generation)
        ],
    },
)
