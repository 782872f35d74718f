"""A prepared dataset at the 1.3B model's shapes, for timing the input pipeline without downloads.

  python benchmarks/loader_dataset.py OUT_DIR [RECORDS_PER_TYPE=96]
  python -m launch.bench data --config=stage2 --config.data.source=prepared --config.data.dir=OUT_DIR/prepared \
      --config.batch_size=48 --config.data.num_workers=2

Random JPEG photos (384-640 px sides), captions, question/answer pairs of 40-170 words and text passages go through
the real preparation job (`prepare.run`, configs/prepare_data.py:1.3b: 384 px crops, 576 image tokens, rows of 1024
tokens) with a randomly initialised four-level VAE of the SDXL layout at tiny widths, so the records hold what the
released setup stores (the 384x384 crop and 48 x 48 x 4 posterior moments) and only the encoder's cost is not real.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from configs import prepare_data
from janusflow_jax.data import prepare
from janusflow_jax.convert import vae as vae_convert
from janusflow_jax.models import vae
from janusflow_jax.data.processor import make_tokenizer

WORDS = ("a the red blue green cat dog bird photo of what is this on in big small sky grass tree two three "
         "people street car house water mountain light dark old new man woman child table chair window").split()


def build(out: Path, records: int = 96, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    words = lambda n: " ".join(rng.choice(WORDS, n))
    gen, und, text = [], [], []
    for i in range(records):
        h, w = rng.integers(384, 641, 2)
        base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), np.uint8)  # smooth-ish: JPEG sizes like photos
        pixels = np.kron(base, np.ones((16, 16, 1), np.uint8))[:h, :w]
        pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.jpg", quality=90)
        gen.append({"image": f"images/{i}.jpg", "caption": words(int(rng.integers(8, 40)))})
        und.append({"image": f"images/{i}.jpg", "question": words(12), "answer": words(int(rng.integers(40, 170)))})
        text.append({"text": words(int(rng.integers(300, 1500)))})
    for name, rows in (("gen", gen), ("und", und), ("text", text)):
        (out / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    vae_config = vae.VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    vae_convert.to_diffusers(vae_config, vae.init_vae_params(vae_config, jax.random.key(seed)), out / "vae")
    config = prepare_data.get_config("1.3b")
    with config.unlocked():
        config.prepare.update(dict(
            out=str(out / "prepared"), tokenizer=str(make_tokenizer(out / "tokenizer", WORDS)),
            gen_jsonl=str(out / "gen.jsonl"), und_jsonl=str(out / "und.jsonl"), text_jsonl=str(out / "text.jsonl"),
            seq_len=1024, records_per_shard=32, encode_batch_per_device=8, num_threads=2))
        config.prepare.latent.vae_path = str(out / "vae")
    summary = prepare.run(config, progress=False)
    print(json.dumps(summary["counts"]), json.dumps(summary["skipped"]))
    return out / "prepared"


if __name__ == "__main__":
    print(build(Path(sys.argv[1]), *(int(a) for a in sys.argv[2:3])))
