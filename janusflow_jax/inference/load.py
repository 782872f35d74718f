"""Loading a checkpoint for inference: weights, tokenizer/processor and (for generation) the VAE, from one directory.

A checkpoint directory is either
  * the official PyTorch layout (config.json + model.safetensors / sharded safetensors / pytorch_model.bin), as
    downloaded from deepseek-ai/JanusFlow-1.3B, converted on the fly; or
  * our orbax checkpoint root (`checkpoint.save_params`), as written by `launch.convert --to=jax`, which also copies
    the tokenizer and processor files (`INFERENCE_FILES`) and a `vae/` folder beside it.
The tokenizer and processor files sit in the checkpoint directory itself in both cases. An OmniMamba checkpoint
(our orbax root whose config carries "family": "omnimamba", or a release directory holding OmniMamba-1.3b.pth,
`convert/omnimamba_release.py`) is told apart by `checkpoint_family`; `load_omnimamba` returns its whole system
(`OmniMambaInference`: the LM, its `OmniMambaProcessor` from the gpt-neox-20b tokenizer files in the directory, the
DINOv2 + SigLIP tower, the projector and the VQ), while `load_model` / `load` give its language model alone.
The VAE (a diffusers AutoencoderKL directory, e.g. stabilityai/sdxl-vae) is taken from an explicit path, else from
`<checkpoint>/vae`; a checkpoint trained in another latent space carries `latent.json` (`latents.describe()`)
instead, turned into the decoder by `latents.from_description`. Every path may be local or gs:// (orbax reads
gs:// natively; what Hugging Face and safetensors read, they read from a local copy).

Every failure a user can cause (no such directory, no tokenizer, no VAE, truncated weights, a tokenizer that does not
fit the model) raises an exception whose message names the file and the fix; `USER_ERRORS` lists their types, which
the CLIs turn into one line on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
from etils import epath

from janusflow_jax.models.config import JanusFlowConfig
from janusflow_jax.models.janusflow import JanusFlow

# The files of the release that inference needs besides the weights (tokenizer + processor configuration).
INFERENCE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
                   "preprocessor_config.json")
VAE_DIR = "vae"  # the VAE's conventional place inside a checkpoint directory
# A checkpoint trained in a latent space other than the SDXL-VAE's (e.g. the digits run's space_to_depth) describes it
# here; `load` then decodes with that space instead of looking for a VAE.
LATENT_FILE = "latent.json"

# Exceptions that mean bad input (a missing or damaged file, an unusable prompt or image), not a bug. ImageError,
# PromptTooLongError and CheckpointMismatchError are ValueErrors; FileNotFoundError is an OSError.
USER_ERRORS = (ValueError, OSError)


def is_official_dir(path: str | os.PathLike) -> bool:
    """True for an official PyTorch JanusFlow directory (its config.json has a `language_config`)."""
    config = epath.Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "language_config" in json.loads(config.read_text())
    except ValueError as e:
        raise ValueError(f"{config} is not valid JSON: {e}") from None


OMNIMAMBA_RELEASE_FILE = "OmniMamba-1.3b.pth"  # hustvl/OmniMamba's weights file


def load_model(checkpoint: str | os.PathLike, dtype: str | None = None) -> tuple[Any, Any]:
    """(model, params) from an official PyTorch directory or an orbax checkpoint root: a JanusFlow, or an
    OmniMamba for an OmniMamba checkpoint (our orbax root with that family, or the release's .pth in the directory).

    dtype: compute dtype ("float32", "bfloat16"); default the checkpoint config's. Parameters keep the stored dtype
    (official directories are read as float32).
    """
    from janusflow_jax import checkpoint as checkpoint_lib
    from janusflow_jax.convert import janusflow as convert
    from janusflow_jax.models.omnimamba import OmniMamba, OmniMambaConfig

    path = epath.Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {checkpoint}")
    if (path / OMNIMAMBA_RELEASE_FILE).is_file():
        from janusflow_jax.convert import omnimamba as omnimamba_convert

        config, params = omnimamba_convert.from_release(path / OMNIMAMBA_RELEASE_FILE)
    elif checkpoint_family(path) == "omnimamba":
        config, params = checkpoint_lib.load_params(path)
        if not isinstance(config, OmniMambaConfig):  # the whole system: its language model
            config, params = config.lm, params["lm"]
    elif is_official_dir(path):
        config, params = convert.from_pytorch(path)
    elif (path / "config.json").is_file() and not any(p.name.isdigit() for p in path.iterdir()):
        raise ValueError(f"{path / 'config.json'} is not a JanusFlow config (no language_config)")
    else:
        try:
            config, params = checkpoint_lib.load_params(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{checkpoint} is neither an official JanusFlow directory (config.json + "
                                    f"model.safetensors) nor an orbax checkpoint (numbered step folders)") from None
    if dtype is not None:
        config = config.replace(dtype=jnp.dtype(dtype).name)
    return (OmniMamba if isinstance(config, OmniMambaConfig) else JanusFlow)(config), params


def require_tokenizer(checkpoint: str | os.PathLike) -> epath.Path:
    """Returns the checkpoint path; raises FileNotFoundError when it holds no tokenizer.json."""
    path = epath.Path(checkpoint)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path} has no tokenizer (tokenizer.json): put the release's {', '.join(INFERENCE_FILES)} there, or "
            f"convert with `python -m launch.convert --to=jax` from a directory that has them")
    return path


def load_processor(checkpoint: str | os.PathLike, config: JanusFlowConfig):
    """The processor from the tokenizer/processor files in `checkpoint`, with the model's image geometry (an
    OmniMambaProcessor with the model's caption length for an OmniMamba config)."""
    from janusflow_jax.data.processor import Processor
    from janusflow_jax.models.omnimamba import OmniMambaConfig

    path = require_tokenizer(checkpoint)
    if isinstance(config, OmniMambaConfig):
        from janusflow_jax.data.omnimamba_processor import OmniMambaProcessor

        processor = OmniMambaProcessor.from_pretrained(path, caption_length=config.caption_length)
        if processor.vocab_size > config.text_vocab_size:
            raise ValueError(f"the tokenizer in {path} has {processor.vocab_size} ids but the model's text embedding "
                             f"only {config.text_vocab_size}: tokenizer and weights do not belong together")
        return processor
    processor = Processor.from_pretrained(path, num_image_tokens=config.und_encoder.num_patches,
                                          image_size=config.und_encoder.image_size)
    if processor.vocab_size > config.llm.vocab_size:
        raise ValueError(f"the tokenizer in {path} has {processor.vocab_size} ids but the model's embedding table only "
                         f"{config.llm.vocab_size}: tokenizer and weights do not belong together")
    return processor


def find_vae(checkpoint: str | os.PathLike | None = None, vae: str | os.PathLike | None = None) -> epath.Path:
    """The VAE directory: `vae` if given, else `<checkpoint>/vae`. Raises FileNotFoundError naming both options."""
    if vae is not None:
        path = epath.Path(vae)
        if not path.is_dir():
            raise FileNotFoundError(f"no VAE directory {vae} (a diffusers AutoencoderKL directory: config.json + "
                                    f"diffusion_pytorch_model.safetensors)")
        return path
    path = None if checkpoint is None else epath.Path(checkpoint) / VAE_DIR
    if path is None or not path.is_dir():
        raise FileNotFoundError(f"no VAE: pass --vae DIR (a diffusers AutoencoderKL directory such as "
                                f"stabilityai/sdxl-vae) or put one at {path or '<checkpoint>/vae'}")
    return path


def load_vae(path: str | os.PathLike, dtype: str | None = None):
    """(AutoencoderKL module, params) from a diffusers VAE directory; dtype: compute dtype (fp16 is refused)."""
    from janusflow_jax.convert import vae as vae_convert
    from janusflow_jax.models import vae as vae_lib

    config, params = vae_convert.from_diffusers(path, dtype=jnp.dtype(dtype or "float32").name)
    return vae_lib.AutoencoderKL(config), params


@dataclasses.dataclass
class InferenceModel:
    """Everything inference needs, loaded from one checkpoint directory."""

    model: JanusFlow
    params: Any
    processor: Any
    vae: Any = None  # vae.AutoencoderKL, or None when not loaded (understanding only)
    vae_params: Any = None

    @property
    def config(self) -> JanusFlowConfig:
        return self.model.config


def load(checkpoint: str | os.PathLike, *, dtype: str | None = None, with_vae: bool = False,
         vae: str | os.PathLike | None = None) -> InferenceModel:
    """Loads weights + processor (+ the VAE when `with_vae` or `vae` is given) for `launch.generate`/`launch.chat`.

    The tokenizer and the VAE are located before the (possibly slow) weights are read, so a missing one fails fast.
    """
    if not epath.Path(checkpoint).is_dir():
        raise FileNotFoundError(f"no checkpoint directory {checkpoint}")
    require_tokenizer(checkpoint)
    space = None
    if (with_vae or vae is not None) and vae is None and (epath.Path(checkpoint) / LATENT_FILE).is_file():
        space = load_latent_space(checkpoint)  # a run trained in another latent space (e.g. the digits run)
    vae_path = find_vae(checkpoint, vae) if (with_vae or vae is not None) and space is None else None
    model, params = load_model(checkpoint, dtype)
    if vae_path is not None and not isinstance(model, JanusFlow):
        raise ValueError(f"{checkpoint} is an OmniMamba checkpoint: its images come from VQ codes (the LlamaGen "
                         f"tokenizer), not from an SDXL-VAE")
    processor = load_processor(checkpoint, model.config)
    vae_module = vae_params = None
    if vae_path is not None:
        vae_module, vae_params = load_vae(vae_path, dtype)
    elif space is not None:
        vae_module = space  # an object with decode(): sampler.latent_decoder applies it as is
    return InferenceModel(model, params, processor, vae_module, vae_params)


def load_latent_space(checkpoint: str | os.PathLike):
    """The latent space `<checkpoint>/latent.json` describes (`latents.describe()`), as a decoder for sampling."""
    from janusflow_jax.data import latents

    path = epath.Path(checkpoint) / LATENT_FILE
    try:
        return latents.from_description(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} does not describe a latent space: {e}") from None


def copy_inference_files(src: str | os.PathLike, dst: str | os.PathLike,
                         names: tuple[str, ...] = INFERENCE_FILES) -> list[str]:
    """Copies the tokenizer/processor files (`names`, default JanusFlow's `INFERENCE_FILES`) and a `vae/` folder from
    `src` into `dst` (either local or gs://), skipping absent ones. Returns the names copied."""
    from janusflow_jax import paths

    src, dst = epath.Path(src), epath.Path(dst)
    copied = []
    for name in names:
        if (src / name).is_file():
            paths.copy_file(src / name, dst / name)
            copied.append(name)
    if (src / VAE_DIR).is_dir():
        paths.copy_tree(src / VAE_DIR, dst / VAE_DIR)
        copied.append(VAE_DIR + "/")
    return copied


# ------------------------------------------------------------------------------------------------------ OmniMamba
OMNIMAMBA_TOKENIZER_HINT = ("EleutherAI/gpt-neox-20b's tokenizer.json, tokenizer_config.json and "
                            "special_tokens_map.json")


def checkpoint_family(checkpoint: str | os.PathLike) -> str:
    """"omnimamba" for a directory holding the OmniMamba release's .pth or our orbax checkpoint of that family, else
    "janusflow" (whatever is wrong with such a directory, `load` reports it)."""
    from janusflow_jax import checkpoint as checkpoint_lib

    if "://" not in os.fspath(checkpoint):  # local: the directory's files tell
        path = epath.Path(checkpoint)
        if (path / OMNIMAMBA_RELEASE_FILE).is_file():
            return "omnimamba"
        if is_official_dir(path) or not any(p.name.isdigit() for p in (path.iterdir() if path.is_dir() else ())):
            return "janusflow"
    try:
        config = checkpoint_lib.load_config(checkpoint)
    except FileNotFoundError:
        return "janusflow"
    return "janusflow" if isinstance(config, JanusFlowConfig) else "omnimamba"


@dataclasses.dataclass
class OmniMambaInference:
    """Everything OmniMamba inference needs, loaded from one checkpoint directory: the LM (`model`, `params`), the
    processor, the understanding tower (`vision`: DinoSigLIP), the projector (FusedGeluMLP) and the VQ (VQModel),
    each module with its parameters."""

    config: Any  # models.omnimamba.OmniMambaSystemConfig
    model: Any
    params: Any
    processor: Any
    vision: Any
    vision_params: Any
    projector: Any
    projector_params: Any
    vq: Any
    vq_params: Any


def load_omnimamba(checkpoint: str | os.PathLike, *, dtype: str | None = None) -> OmniMambaInference:
    """An OmniMamba release directory (`convert/omnimamba_release.py`, converted on the fly) or our orbax checkpoint
    of the whole system (`launch.convert --to=jax`) -> OmniMambaInference. dtype: compute dtype of every part
    (default: the LM config's). The tokenizer is looked for before the weights are read."""
    from janusflow_jax import checkpoint as checkpoint_lib
    from janusflow_jax.convert import omnimamba_release
    from janusflow_jax.models import omnimamba
    from janusflow_jax.models.dinosiglip import DinoSigLIP, FusedGeluMLP
    from janusflow_jax.models.vq import VQModel

    path = epath.Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {checkpoint}")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer (tokenizer.json): put {OMNIMAMBA_TOKENIZER_HINT} there, "
                                f"or convert with `python -m launch.convert --to=jax` from a directory that has them")
    if omnimamba_release.is_release_dir(path):
        config, params = omnimamba_release.from_release_dir(path)
    else:
        config, params = checkpoint_lib.load_params(path)
        if isinstance(config, omnimamba.OmniMambaConfig):
            raise ValueError(f"{path} holds the OmniMamba language model only: inference also needs the vision "
                             f"tower, the projector and the VQ (convert a release directory with `python -m "
                             f"launch.convert --to=jax`)")
        if not isinstance(config, omnimamba.OmniMambaSystemConfig):
            raise ValueError(f"{path} is not an OmniMamba checkpoint")
    lm = config.lm if dtype is None else config.lm.replace(dtype=jnp.dtype(dtype).name)
    towers = dict(dtype=jnp.dtype(lm.backbone.dtype))  # the parameters keep their stored dtype
    return OmniMambaInference(
        config=config, model=omnimamba.OmniMamba(lm), params=params["lm"], processor=load_processor(path, lm),
        vision=DinoSigLIP(config.vision, **towers), vision_params=params["vision"],
        projector=FusedGeluMLP(config.projector, **towers), projector_params=params["projector"],
        vq=VQModel(config.vq, **towers), vq_params=params["vq"])
