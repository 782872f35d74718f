"""The preparation job (latents, tokens, crops -> ArrayRecord shards):

  python -m launch.prepare_data --config=configs/prepare_data.py:tiny --config.prepare.out=DIR \
      --config.prepare.tokenizer=DIR --config.prepare.gen_jsonl=captions.jsonl [...]

Variants: `tiny` (configs/tiny.py's model on 64 px images with the download-free space_to_depth latent: 8 x 8 px
blocks -> 192 channels, so the model's gen encoder/decoder read and write 192 channels) and `1.3b` (the release:
384 px, SDXL-VAE latents 48 x 48 x 4; set --config.prepare.latent.vae_path). The `model` field is the model the data
is prepared for: image size, latent grid, image tokens and latent channels are read from it, never repeated here.

OmniMamba (family "omnimamba": mmu and t2i records, janusflow_jax/data/omnimamba_prepare.py): `omnimamba` (the
release: the 384 px tower, 16 x 16 VQ-16 codes of 256 px images, mmu_len 453; set image_tokenizer.path to a
converted OmniMamba checkpoint) and `omnimamba_tiny` (configs/_omnimamba_base.py's tiny system: 14 px tower, 4 x 4
codes of 16 px images from a patch_kmeans codebook, e.g. fitted by the job with image_tokenizer.fit=True):

  python -m launch.prepare_data --config=configs/prepare_data.py:omnimamba --config.prepare.out=DIR \
      --config.prepare.tokenizer=checkpoints/OmniMamba --config.prepare.image_tokenizer.path=checkpoints/omnimamba_jax \
      --config.prepare.t2i_jsonl=captions.jsonl --config.prepare.mmu_jsonl=vqa.jsonl
"""

import ml_collections
from ml_collections import config_dict

from configs import _omnimamba_base, janusflow_1_3b, tiny


def prepare_config(**overrides) -> ml_collections.ConfigDict:
    """The job's fields (see janusflow_jax/data/prepare.py for the inputs and the record format)."""
    job = ml_collections.ConfigDict(dict(
        family="janusflow",  # the model family the records are for: "janusflow" (gen/und/text) or "omnimamba" (mmu/t2i)
        out="",  # output directory, seen by every host
        tokenizer="",  # a directory with tokenizer.json (+ processor_config.json / preprocessor_config.json)
        # Inputs: comma-separated JSON-lines files per data type, and/or one local TFDS caption dataset.
        gen_jsonl="",
        und_jsonl="",
        text_jsonl="",
        mmu_jsonl="",  # OmniMamba: understanding ({"image", "question", "answer"} or {"image", "caption"})
        t2i_jsonl="",  # OmniMamba: text-to-image ({"image", "caption"})
        image_root="",  # relative image paths are resolved against this (default: the manifest's folder)
        tfds=dict(name="", data_dir="", split="train", image_key="image", caption_key="caption"),
        # Token budgets: longer understanding examples are skipped, longer texts split, longer prompts skipped.
        seq_len=4096,
        prompt_len=128,
        # Share of generation prompts in the SFT template "User: {p}\n\nAssistant:"; the rest use the pre-training
        # template "<prompt>" (docs/reference.md §7: pre-training data as <prompt><image>, SFT data in the chat template).
        sft_fraction=0.0,
        system_prompt=config_dict.placeholder(str),  # None: the official system prompt; "" for none
        gen_crop="random",  # "random" (paper) or "center" square crop of the short-side-resized image (also t2i)
        max_images_per_record=1,
        text_overflow="split",  # "split" into seq_len pieces or "skip"
        latent=dict(kind="space_to_depth", vae_path="", scaling_factor=config_dict.placeholder(float),
                    dtype="float32"),
        mmu_len=453,  # OmniMamba: understanding ids per record at most (the 4 task ids + 449 text tokens)
        # OmniMamba's image tokenizer for t2i codes: "vq16" (path: an orbax root holding an OmniMamba system) or
        # "patch_kmeans" (path: its .npz; fit=True fits it first on the first fit_images t2i images, patch 0 = the
        # model VQ's downsampling, and writes it to path, default <out>/patch_kmeans.npz)
        image_tokenizer=dict(kind="vq16", path="", fit=False, patch=0, fit_images=4096),
        records_per_shard=1024,
        encode_batch_per_device=8,
        num_threads=8,  # image decoding threads per host
        seed=0,
        array_record_options="group_size:1",  # one record per chunk: cheap random access for the loader
    ))
    job.update(overrides)
    return job


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    if arg == "tiny":
        model = tiny.model_config()
        channels = 3 * (model.und_encoder.image_size // model.latent_size) ** 2  # space_to_depth: 3 f^2
        model.gen_encoder.in_channels = channels
        model.gen_decoder.out_channels = channels
        config.model = model
        config.prepare = prepare_config(seq_len=512, prompt_len=32)
    elif arg == "1.3b":
        config.model = janusflow_1_3b.model_config()
        config.prepare = prepare_config()
        config.prepare.latent.kind = "sdxl_vae"
    elif arg == "omnimamba":
        config.model = _omnimamba_base.release_model()
        config.prepare = prepare_config(family="omnimamba")
    elif arg == "omnimamba_tiny":
        config.model = _omnimamba_base.tiny_model()
        config.prepare = prepare_config(family="omnimamba", mmu_len=64)
        config.prepare.image_tokenizer.kind = "patch_kmeans"
    else:
        raise ValueError(f"unknown variant {arg!r}; use 'tiny', '1.3b', 'omnimamba' or 'omnimamba_tiny'")
    config.lock()
    return config
