"""Writing generated images: one PNG per image carrying its prompt and the sampler's settings (iTXt chunks), and a
grid with one row per prompt."""

from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath


def save_images(out_dir: str | os.PathLike, images, prompts: Sequence[str], images_per_prompt: int,
                settings: Mapping[str, Any]) -> list[epath.Path]:
    """Writes uint8 images [n, H, W, 3] (prompt-major, as `sampler.generate_images` returns them) to
    out_dir/{prompt:03d}_{image:02d}.png plus out_dir/grid.png (one row per prompt). Each PNG's text chunks hold
    its prompt and `settings`; the grid's hold all prompts, one per line. Returns the paths, grid last."""
    from PIL import Image, PngImagePlugin

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(prompts) * images_per_prompt:
        raise ValueError(f"expected uint8 [{len(prompts) * images_per_prompt}, H, W, 3] images, got "
                         f"{images.dtype} {images.shape}")
    out = epath.Path(out_dir)  # local or gs://
    out.mkdir(parents=True, exist_ok=True)

    def save(path: epath.Path, pixels: np.ndarray, meta):
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, format="png", pnginfo=meta)
        path.write_bytes(png.getvalue())

    def info(**text) -> PngImagePlugin.PngInfo:
        meta = PngImagePlugin.PngInfo()
        for key, value in {**text, **settings, "software": "janusflow_jax"}.items():
            meta.add_itxt(key, str(value))  # iTXt: UTF-8, so any prompt survives
        return meta

    paths = []
    for k, image in enumerate(images):
        p, i = divmod(k, images_per_prompt)
        path = out / f"{p:03d}_{i:02d}.png"
        save(path, image, info(prompt=prompts[p], prompt_index=p, image_index=i))
        paths.append(path)
    h, w = images.shape[1:3]
    grid = images.reshape(len(prompts), images_per_prompt, h, w, 3).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(len(prompts) * h, images_per_prompt * w, 3)
    path = out / "grid.png"
    save(path, grid, info(prompt="\n".join(prompts)))
    return paths + [path]
