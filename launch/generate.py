"""Text-to-image generation: one PNG per image and a grid, prompt and settings in the PNG metadata.

  python -m launch.generate --checkpoint=CKPT --prompt="a red fox in the snow" --num_images=4 --cfg=2 --steps=30 \\
      --out=samples [--prompts_file=prompts.txt] [--vae=VAE_DIR] [--seed=0] [--batch_size=8] [--dtype=bfloat16]

CKPT: an official JanusFlow directory (config.json + model.safetensors + tokenizer files) or an orbax checkpoint
written by `launch.convert --to=jax`. The VAE: --vae (a diffusers AutoencoderKL directory, e.g. stabilityai/sdxl-vae),
else CKPT/vae. Files: OUT/{prompt:03d}_{image:02d}.png and OUT/grid.png (one row per prompt).

OmniMamba (CKPT an OmniMamba release directory or our checkpoint of it; the family is read from CKPT):

  python -m launch.generate --checkpoint=CKPT --prompt="a red fox in the snow" --num_images=4 --out=samples \
      [--temperature=1 --top_k=0 --top_p=0.95] [--cfg=1] [--seed=0] [--batch_size=8] [--dtype=bfloat16]

The LM writes 256 VQ codes after the 72-token prompt, greedily by default (the release's setting); --temperature > 0
samples, restricted to --top_k (0 = all) and the --top_p nucleus. --cfg defaults to 1 (off): the release was never
trained with dropped captions, so guidance is an experiment. The VQ decodes the codes to 256 x 256 images.
--steps, --vae, --template and --reference_t_rounding are JanusFlow's; --temperature, --top_k and --top_p OmniMamba's.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging
from etils import epath

from launch import config_cli

# allow_override: launch.convert/generate/chat define some of the same flags (--checkpoint, --out, --seed,
# --dtype) with the same meaning; one process (the test suite) may import all of them.
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Official JanusFlow directory or orbax checkpoint root.",
                                  allow_override=True)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Text prompt (repeat the flag for several).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "File with one prompt per line (blank lines skipped).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "Images per prompt.")
_CFG = flags.DEFINE_float("cfg", None, "Classifier-free guidance weight w >= 1 (1 = no guidance; default: 2 for "
                         "JanusFlow, 1 for OmniMamba, whose release was not trained for guidance).")
_STEPS = flags.DEFINE_integer("steps", 30, "Euler steps of the rectified-flow ODE.")
_OUT = flags.DEFINE_string("out", None, "Output directory (created if needed).", allow_override=True)
_VAE = flags.DEFINE_string("vae", None, "Diffusers AutoencoderKL directory (default: CHECKPOINT/vae).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed; image i of the run always uses the same noise.",
                             allow_override=True)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per batch (CFG doubles the rows the LLM sees).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype of the model and the VAE (default: the checkpoint config's / float32).",
                           allow_override=True)
_TEMPLATE = flags.DEFINE_enum("template", "sft", ["sft", "pretrain"], "Prompt template.")
_REFERENCE_T = flags.DEFINE_bool("reference_t_rounding", False,
                                 "Round t to bfloat16 as the official sampler does (for comparisons).")
# OmniMamba's sampling of VQ codes. temperature and top_p are launch.chat's flags too, with the same defaults (one
# process may import both modules, and the last definition's default would win).
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "OmniMamba: sampling temperature; 0 = greedy.",
                                  allow_override=True)
_TOP_K = flags.DEFINE_integer("top_k", 0, "OmniMamba: sample among the k most likely codes (0 = all; with "
                              "--temperature > 0).")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "OmniMamba: nucleus sampling mass (with --temperature > 0).",
                            allow_override=True)
JANUSFLOW_ONLY = ("steps", "vae", "template", "reference_t_rounding")
OMNIMAMBA_ONLY = ("temperature", "top_k", "top_p")


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    out = [p for p in prompts if p.strip()]
    if prompts_file is not None:
        try:
            text = epath.Path(prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read prompts file {prompts_file}: {e}") from None
        out += [line.strip() for line in text.splitlines() if line.strip()]
    if not out:
        if prompts:  # --prompt="" (or only blanks): say so rather than that none was given
            raise app.UsageError("--prompt is empty: give the text of the image to draw (or --prompts_file)")
        raise app.UsageError("give --prompt or --prompts_file")
    return out


def refuse_flags(names, family: str):
    """A ValueError naming the given flags that the user set but `family` does not use."""
    given = [name for name in names if flags.FLAGS[name].present]
    if given:
        raise ValueError(f"--{', --'.join(given)} {'does' if len(given) == 1 else 'do'} not apply to {family} "
                         f"checkpoints")


def generate_omnimamba(checkpoint: str, prompts: list[str]) -> tuple:
    """(uint8 images, settings) for an OmniMamba checkpoint."""
    from janusflow_jax.inference import load as inference
    from janusflow_jax.inference import omnimamba

    refuse_flags(JANUSFLOW_ONLY, "OmniMamba")
    settings = dict(cfg=1.0 if _CFG.value is None else _CFG.value, temperature=_TEMPERATURE.value,
                    top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
    loaded = inference.load_omnimamba(checkpoint, dtype=_DTYPE.value)
    images = omnimamba.generate_images(loaded, prompts, images_per_prompt=_NUM_IMAGES.value,
                                       batch_size=_BATCH_SIZE.value, **settings)
    return images, settings


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    for flag, name in ((_CHECKPOINT, "checkpoint"), (_OUT, "out")):
        if flag.value is None:
            raise app.UsageError(f"--{name} is required")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every restore step at INFO
        logging.set_verbosity(logging.WARNING)
    from janusflow_jax import paths
    from janusflow_jax.inference import images as images_lib
    from janusflow_jax.inference import load as inference
    from janusflow_jax.inference import sampler

    checkpoint, out, vae = (paths.resolve_optional(f.value) for f in (_CHECKPOINT, _OUT, _VAE))
    try:
        paths.check_access(checkpoint, out, vae, _PROMPTS_FILE.value)
        prompts = read_prompts(_PROMPT.value, paths.resolve_optional(_PROMPTS_FILE.value))
        start = time.perf_counter()
        if inference.checkpoint_family(checkpoint) == "omnimamba":
            images, settings = generate_omnimamba(checkpoint, prompts)
        else:
            refuse_flags(OMNIMAMBA_ONLY, "JanusFlow")
            loaded = inference.load(checkpoint, dtype=_DTYPE.value, with_vae=True, vae=vae)
            settings = dict(cfg=2.0 if _CFG.value is None else _CFG.value, steps=_STEPS.value, seed=_SEED.value,
                            template=_TEMPLATE.value, reference_t_rounding=_REFERENCE_T.value)
            images = sampler.generate_images(loaded.model, loaded.params, loaded.processor, loaded.vae,
                                             loaded.vae_params, prompts, images_per_prompt=_NUM_IMAGES.value,
                                             batch_size=_BATCH_SIZE.value, progress=True, **settings)
        files = images_lib.save_images(out, images, prompts, _NUM_IMAGES.value, dict(settings, checkpoint=checkpoint))
    except inference.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(images)} images and {files[-1].name} to {_OUT.value} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    config_cli.run(main)
