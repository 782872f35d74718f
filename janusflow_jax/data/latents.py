"""The latent space a run trains in: x = encode(image) is the t = 1 end of the rectified flow (paper §3.2).

Two spaces, chosen by name:
  "sdxl_vae"        JanusFlow's own: the SDXL-VAE posterior (`vae.AutoencoderKL`, read from a diffusers directory),
                    latents = scaling_factor (0.13025) x (mean or a posterior draw); [b, S, S, 3] -> [b, S/8, S/8, 4]
                    (docs/reference.md §7, §8).
  "space_to_depth"  download-free: every f x f block of pixels is folded into the channels, [b, S, S, 3] ->
                    [b, S/f, S/f, 3 f^2] (channel order: row in block, column in block, RGB), times `scaling_factor`
                    (default 1: pixels in [-1, 1] are already on the noise's scale). Exactly invertible and free of
                    parameters, so a tiny run trains and samples end to end without any download; the model's
                    gen_encoder.in_channels and gen_decoder.out_channels must be 3 f^2 (192 for 64 px -> 8 x 8).

Both spaces share one small interface, always in the model's SCALED units, images [batch, height, width, 3] in [-1, 1]:
  encode(images, rng=None) -> latents [batch, h, w, latent_channels]  (the posterior mean, or a draw with `rng`)
  decode(latents) -> images
  moments(images) -> (mean, logvar | None)  the scaled posterior (logvar + 2 log scale); None for exact maps
  latent_channels, downsample, describe() (a JSON dict that `from_description` turns back into the space)

`decode` already divides by the scaling factor, so a space is handed to `sampler.latent_decoder` as is: it carries no
`scaling_factor` or `config` attribute, and that helper therefore applies a factor of 1 (do not add one).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

KINDS = ("sdxl_vae", "space_to_depth")


def _check_images(images, downsample: int):
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [batch, height, width, 3], got shape {tuple(images.shape)}")
    if images.shape[1] % downsample or images.shape[2] % downsample:
        raise ValueError(f"image size {tuple(images.shape[1:3])} is not a multiple of the latent downsample "
                         f"factor {downsample}")


class LatentSpace:
    """Common plumbing: a pure `_moments_fn(params, images)` / `_decode_fn(params, latents)`, jitted once.

    `place(mesh)` replicates the parameters over a mesh, so that `moments` on a batch sharded over that mesh runs
    data-parallel on every device (the preparation job's 1-D mesh over all devices of all hosts).
    """

    kind: str
    latent_channels: int
    downsample: int

    def __init__(self, params: Any = None):
        self._params = params
        self._moments_jit = jax.jit(self._moments_fn)
        self._decode_jit = jax.jit(self._decode_fn)

    # Pure functions of (params, array) in the scaled space; subclasses define them.
    def _moments_fn(self, params, images):
        raise NotImplementedError

    def _decode_fn(self, params, latents):
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    @property
    def stochastic(self) -> bool:
        """Whether `moments` returns a log-variance (a posterior to sample from) rather than None."""
        return False

    def place(self, mesh: Mesh) -> "LatentSpace":
        """Replicates the parameters over `mesh` (returns self)."""
        if self._params is not None:
            self._params = jax.device_put(self._params, NamedSharding(mesh, PartitionSpec()))
        return self

    def moments(self, images):
        """images [batch, S, S, 3] in [-1, 1] -> (mean, logvar or None), each [batch, S/f, S/f, latent_channels]."""
        _check_images(images, self.downsample)
        return self._moments_jit(self._params, images)

    def encode(self, images, rng=None):
        """images [batch, S, S, 3] in [-1, 1] -> latents [batch, S/f, S/f, latent_channels] (mean, or a draw)."""
        mean, logvar = self.moments(images)
        if rng is None or logvar is None:
            return mean
        return sample(rng, mean, logvar)

    def decode(self, latents):
        """latents [batch, h, w, latent_channels] (scaled) -> images [batch, h f, w f, 3], roughly in [-1, 1]."""
        if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
            raise ValueError(f"latents must be [batch, h, w, {self.latent_channels}], got {tuple(latents.shape)}")
        return self._decode_jit(self._params, latents)


def sample(rng, mean, logvar):
    """A draw of the diagonal Gaussian posterior: mean + exp(logvar / 2) * eps (the scale is already folded in)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


class SpaceToDepth(LatentSpace):
    """[b, S, S, 3] <-> [b, S/f, S/f, 3 f^2] x scaling_factor: a lossless pixel latent for download-free runs."""

    kind = "space_to_depth"

    def __init__(self, factor: int, scaling_factor: float = 1.0):
        if factor < 1:
            raise ValueError(f"space_to_depth factor must be >= 1, got {factor}")
        if not scaling_factor > 0:
            raise ValueError(f"scaling_factor must be positive, got {scaling_factor}")
        self.downsample = int(factor)
        self.latent_channels = 3 * self.downsample ** 2
        self._scale = float(scaling_factor)
        super().__init__(None)

    def _moments_fn(self, params, images):
        del params
        b, h, w, c = images.shape
        f = self.downsample
        x = images.astype(jnp.float32).reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h // f, w // f, f * f * c) * self._scale, None

    def _decode_fn(self, params, latents):
        del params
        b, h, w, _ = latents.shape
        f = self.downsample
        x = (latents.astype(jnp.float32) / self._scale).reshape(b, h, w, f, f, 3).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h * f, w * f, 3)

    def describe(self) -> dict:
        return dict(kind=self.kind, latent_channels=self.latent_channels, downsample=self.downsample,
                    scaling_factor=self._scale)


class SDXLVAE(LatentSpace):
    """The SDXL-VAE latent: scaling_factor x posterior of `vae.AutoencoderKL` (SDXL's shift_factor is None)."""

    kind = "sdxl_vae"

    def __init__(self, vae_config, params, scaling_factor: float | None = None, path: str | None = None):
        from janusflow_jax.models import vae as vae_lib

        if vae_config.in_channels != 3:
            raise ValueError(f"the VAE must read RGB images (in_channels=3), got {vae_config.in_channels}")
        # Held as `vae_config`, not `config`: see the module docstring on sampler.latent_decoder.
        self.vae_config = vae_config
        self._module = vae_lib.AutoencoderKL(vae_config)
        self._scale = float(vae_config.scaling_factor if scaling_factor is None else scaling_factor)
        self._shift = float(vae_config.shift_factor or 0.0)
        self.latent_channels = vae_config.latent_channels
        self.downsample = vae_config.downsample_factor
        self._path = None if path is None else os.fspath(path)
        super().__init__(params)

    @classmethod
    def from_diffusers(cls, path, dtype: str = "float32", scaling_factor: float | None = None) -> "SDXLVAE":
        """Reads a diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors)."""
        from janusflow_jax.convert import vae as vae_convert

        config, params = vae_convert.from_diffusers(path, param_dtype="float32", dtype=dtype)
        return cls(config, params, scaling_factor, path)

    @property
    def stochastic(self) -> bool:
        return True

    def _moments_fn(self, params, images):
        mean, logvar = self._module.apply({"params": params}, images, method="encode")
        # z_model = (z_vae - shift) * scale: the mean maps affinely, the variance by scale^2.
        return (mean - self._shift) * self._scale, logvar + 2.0 * math.log(self._scale)

    def _decode_fn(self, params, latents):
        z = latents.astype(jnp.float32) / self._scale + self._shift
        return self._module.apply({"params": params}, z, method="decode")

    def describe(self) -> dict:
        return dict(kind=self.kind, latent_channels=self.latent_channels, downsample=self.downsample,
                    scaling_factor=self._scale, shift_factor=self._shift, vae_path=self._path,
                    vae_dtype=self.vae_config.dtype)


def make_latent_space(kind: str, *, image_size: int, latent_size: int, vae_path: str | None = None,
                      scaling_factor: float | None = None, dtype: str = "float32") -> LatentSpace:
    """The latent space `kind` for images of side `image_size` mapped to a grid of side `latent_size`.

    space_to_depth: the factor is image_size / latent_size. sdxl_vae: read from `vae_path` (a diffusers directory);
    its downsample factor must equal image_size / latent_size. scaling_factor None: 1 for space_to_depth, the VAE's
    own (0.13025) for sdxl_vae.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown latent space {kind!r}; choose one of {list(KINDS)}")
    if latent_size < 1 or image_size % latent_size:
        raise ValueError(f"image_size {image_size} is not a multiple of latent_size {latent_size}")
    factor = image_size // latent_size
    if kind == "space_to_depth":
        return SpaceToDepth(factor, 1.0 if scaling_factor is None else scaling_factor)
    if not vae_path:
        raise ValueError("latent space 'sdxl_vae' needs vae_path (a diffusers AutoencoderKL directory)")
    space = SDXLVAE.from_diffusers(vae_path, dtype=dtype, scaling_factor=scaling_factor)
    if space.downsample != factor:
        raise ValueError(f"the VAE at {vae_path} downsamples by {space.downsample}, but image_size/latent_size = "
                         f"{image_size}/{latent_size} = {factor}")
    return space


def from_description(description: dict) -> LatentSpace:
    """Rebuilds the space `describe()` wrote (e.g. metadata.json of a prepared dataset), for decoding samples."""
    kind = description.get("kind")
    if kind == "space_to_depth":
        return SpaceToDepth(description["downsample"], description["scaling_factor"])
    if kind == "sdxl_vae":
        if not description.get("vae_path"):
            raise ValueError("this sdxl_vae description names no vae_path to read the VAE from")
        return SDXLVAE.from_diffusers(description["vae_path"], description.get("vae_dtype", "float32"),
                                      description["scaling_factor"])
    raise ValueError(f"unknown latent space {kind!r}; choose one of {list(KINDS)}")


def batch_sharded(fn: Callable, mesh: Mesh) -> Callable[[np.ndarray], Any]:
    """Wraps fn(global batch) to take THIS HOST's rows: the rows of all hosts form one batch sharded over the 1-D
    `mesh` (axis "data"); outputs come back as this host's rows, as numpy (None stays None).

    The host batch must be a multiple of the host's device count. Every host must call it the same number of times
    (one SPMD program), which the preparation job guarantees by running the same number of batches per round.
    """
    from jax.experimental import multihost_utils

    spec = PartitionSpec(mesh.axis_names[0])
    sharding = NamedSharding(mesh, spec)

    def run(local: np.ndarray):
        global_batch = jax.make_array_from_process_local_data(sharding, local)
        out = fn(global_batch)
        return jax.tree.map(lambda x: np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec)),
                            out)

    return run
