"""What a download-free run leaves beside its checkpoint so that `launch.generate` and `launch.chat` accept it: a
small word-level tokenizer with the processor settings, and for JanusFlow a randomly initialised VAE of the SDXL-VAE's
shape (8x downsampling, 4 latent channels) at a few channels, in `vae/`.

A run on synthetic batches (`data.source = "synthetic"`, e.g. `--config=stage2:tiny`) has no tokenizer or VAE of its
own: the ids and latents it trains on are random. These files give its checkpoint the same layout as a release
directory, so the whole path from training to an image and an answer runs without a download (the images and the
answers are those of a model trained on noise). The tokenizer fits the model's vocabulary (OmniMamba's [PAD] lands on
the config's `data.pad_id`, as in the synthetic rows).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from etils import epath

# Words of the quick start's prompts and questions (each one id); more than the smallest vocabulary needs.
WORDS = ("a the red blue green yellow white black cat dog fox bird fish horse cow on in of and with snow grass sky "
         "tree house car boat mat what is this that picture photo image color colour there how many where who which "
         "does are small big").split()


def _janusflow(model_cfg, root: Path, seed: int):
    from janusflow_jax.convert import vae as vae_convert
    from janusflow_jax.data.processor import Processor, make_tokenizer
    from janusflow_jax.inference.load import VAE_DIR
    from janusflow_jax.models import vae as vae_lib

    make_tokenizer(root, WORDS)
    Processor.from_pretrained(root, num_image_tokens=model_cfg.und_encoder.num_patches,
                              image_size=model_cfg.und_encoder.image_size).save_pretrained(root)
    # 4 blocks: 8x downsampling, as the SDXL-VAE's (the model's latent grid of side S decodes to 8 S pixels).
    vae_config = vae_lib.VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1,
                                   latent_channels=model_cfg.gen_encoder.in_channels)
    vae_convert.to_diffusers(vae_config, _random_params(vae_lib.AutoencoderKL(vae_config), seed), root / VAE_DIR)


def _random_params(model, seed: int) -> dict:
    """Random parameters of the shapes `model.init` would give, drawn in numpy (compiling the VAE's init takes far
    longer than these few thousand numbers): kernels ~ N(0, 1 / fan_in), norm scales 1, biases 0."""
    from janusflow_jax.models.vae import AutoencoderKL

    shapes = jax.eval_shape(lambda r: model.init(r, method=AutoencoderKL.init_all), jax.random.key(0))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key)
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes))


def _omnimamba(system_cfg, root: Path, pad_id: int):
    from tokenizers import Tokenizer

    from janusflow_jax.data.omnimamba_processor import OmniMambaProcessor, make_tokenizer

    size = Tokenizer.from_file(str(make_tokenizer(root, ()) / "tokenizer.json")).get_vocab_size()  # the base alone
    if pad_id <= size:
        raise ValueError(f"data.pad_id {pad_id} leaves no room for a tokenizer below it")
    words = (list(WORDS) + [f"word{i}" for i in range(pad_id)])[:pad_id - size]  # [PAD] comes right after them
    make_tokenizer(root, words)
    OmniMambaProcessor.from_pretrained(root, caption_length=system_cfg.lm.caption_length).save_pretrained(root)


def write(config, checkpoint_root) -> bool:
    """Writes the files into `checkpoint_root` (local or gs://) unless a tokenizer is already there; True if it
    wrote them. `config`: the run config (its model, family and data.pad_id)."""
    root = epath.Path(checkpoint_root)
    if (root / "tokenizer.json").exists():
        return False
    from janusflow_jax.data.omnimamba_processor import PROCESSOR_CONFIG
    from janusflow_jax.inference.load import INFERENCE_FILES, copy_inference_files

    with tempfile.TemporaryDirectory() as tmp:  # written locally, then copied (the root may be gs://)
        if config.get("family", "janusflow") == "omnimamba":
            from janusflow_jax.models.omnimamba import OmniMambaSystemConfig

            _omnimamba(OmniMambaSystemConfig.from_dict(config.model.to_dict()), Path(tmp), int(config.data.pad_id))
        else:
            from janusflow_jax.models.config import JanusFlowConfig

            _janusflow(JanusFlowConfig.from_dict(config.model.to_dict()), Path(tmp), int(config.seed))
        root.mkdir(parents=True, exist_ok=True)
        copy_inference_files(tmp, root, (*INFERENCE_FILES, PROCESSOR_CONFIG))
    return True
