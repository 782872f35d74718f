"""Checkpoint conversion: official PyTorch JanusFlow directory <-> our orbax checkpoint; random official checkpoints.

  python -m launch.convert --to=jax --torch_dir=JanusFlow-1.3B --out=ckpt/janusflow [--param_dtype=bfloat16] [--scan_layers]
  python -m launch.convert --to=torch --ckpt=ckpt/janusflow --out=JanusFlow-export [--torch_dtype=bfloat16] [--include_repa]
  python -m launch.convert --to=torch --random_config=tiny --out=/tmp/janusflow-tiny [--seed=0]

--to=jax also copies the tokenizer and processor files (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
processor_config.json, preprocessor_config.json) and a vae/ folder, where present, beside the orbax checkpoint.
Outputs are written atomically (nothing is left behind on failure); an existing non-empty output needs --overwrite.

OmniMamba: the family is told by the directory. A --torch_dir holding OmniMamba-1.3b.pth is an OmniMamba release
directory (+ dinov2.safetensors, siglip.safetensors and gpt-neox-20b's tokenizer files; convert/omnimamba_release.py):

  python -m launch.convert --to=jax --torch_dir=OmniMamba --out=ckpt/omnimamba [--param_dtype=float32] [--scan_layers]
  python -m launch.convert --to=torch --ckpt=ckpt/omnimamba --out=OmniMamba-export [--torch_dtype=float16]

--to=jax writes one checkpoint with the LM, the DINOv2 + SigLIP tower, the projector and the VQ (--scan_layers stacks
the LM's blocks); --to=torch writes the .pth (float16 as released unless --torch_dtype), the two tower files (in the
parameters' dtype unless --torch_dtype), omnimamba_config.json and the tokenizer files. --seed and --include_repa
are JanusFlow's.

Every path may be gs://: orbax reads and writes it natively; an official directory is read from a local copy and
written locally, then uploaded with config.json last (a reader takes the directory for finished only then).
"""

from __future__ import annotations

import importlib
import json
import math
import struct
import sys
import time
from pathlib import Path

from absl import app, flags, logging
from etils import epath

from launch import config_cli

_RANDOM_CONFIGS = {"tiny": "configs.tiny", "1.3b": "configs.janusflow_1_3b"}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

_TO = flags.DEFINE_enum("to", None, ["jax", "torch"], "Output format: jax (orbax checkpoint) or torch (official dir).")
_TORCH_DIR = flags.DEFINE_string("torch_dir", None, "--to=jax: official PyTorch JanusFlow directory to read.")
_CKPT = flags.DEFINE_string("ckpt", None, "--to=torch: orbax checkpoint directory to read (written by --to=jax).")
_RANDOM_CONFIG = flags.DEFINE_enum("random_config", None, sorted(_RANDOM_CONFIGS),
                                   "--to=torch: write randomly initialised parameters of configs/<name> instead.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"],
                                 "Parameter dtype of the JAX parameters (--to=jax default float32; "
                                 "--random_config default: the config's).")
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", False, "--to=jax: store transformer blocks stacked (nn.scan layout).")
_TORCH_DTYPE = flags.DEFINE_enum("torch_dtype", None, ["float32", "bfloat16", "float16"],
                                 "--to=torch: dtype of the written tensors (default: the parameters' own).")
_INCLUDE_REPA = flags.DEFINE_bool("include_repa", False,
                                  "--to=torch: also write the REPA projector (not part of the official model).")
_SEED = flags.DEFINE_integer("seed", 0, "RNG seed for random parameters (and the REPA projector on --to=jax).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory.")


def _check_args():
    def need(flag, name):
        if flag.value is None:
            raise app.UsageError(f"--to={_TO.value} needs --{name}")

    if _TO.value is None:
        raise app.UsageError("--to=jax or --to=torch is required")
    need(_OUT, "out")
    if _TO.value == "jax":
        need(_TORCH_DIR, "torch_dir")
        unused = [n for n, f in (("ckpt", _CKPT), ("random_config", _RANDOM_CONFIG), ("torch_dtype", _TORCH_DTYPE))
                  if f.value is not None] + (["include_repa"] if _INCLUDE_REPA.value else [])
    else:
        if (_CKPT.value is None) == (_RANDOM_CONFIG.value is None):
            raise app.UsageError("--to=torch needs exactly one of --ckpt or --random_config")
        unused = [n for n, f in (("torch_dir", _TORCH_DIR),) if f.value is not None]
        unused += ["scan_layers"] if _SCAN_LAYERS.value else []
        unused += ["param_dtype"] if _CKPT.value is not None and _PARAM_DTYPE.value is not None else []
    if unused:
        raise app.UsageError(f"--to={_TO.value} does not use --{', --'.join(unused)}")


def _check_out(out: str, overwrite: bool):
    """Fails before any (possibly long) conversion rather than after it."""
    path = epath.Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")


def _dtype_name(dtype) -> str:
    return str(getattr(dtype, "name", dtype))


def to_jax(torch_dir: str, out: str, param_dtype: str = "float32", scan_layers: bool = False, seed: int = 0,
           overwrite: bool = False) -> dict:
    """Official PyTorch directory -> orbax checkpoint at `out`, with the tokenizer/processor files and a `vae/`
    folder of `torch_dir` copied beside it (so `launch.generate`/`launch.chat --checkpoint=out` need nothing else).
    Returns a summary dict."""
    import jax

    from janusflow_jax import checkpoint
    from janusflow_jax.convert import janusflow as convert
    from janusflow_jax.convert import omnimamba_release
    from janusflow_jax.inference import load as inference

    if omnimamba_release.is_release_dir(torch_dir):
        return omnimamba_to_jax(torch_dir, out, param_dtype, scan_layers, overwrite)
    _check_out(out, overwrite)
    config, params = convert.from_pytorch(torch_dir, param_dtype=param_dtype, rng=jax.random.key(seed),
                                          scan_layers=scan_layers)
    copied = []

    def write(root):
        checkpoint.save_params(root, config, params, overwrite=overwrite)
        copied.extend(inference.copy_inference_files(torch_dir, root))

    if "://" in out:  # remote (e.g. gs://): orbax's own commit is the atomic step
        write(out)
    else:  # local: write a fresh root beside `out` and rename it into place (also replaces atomically)
        convert.atomic_write_dir(Path(out), write, overwrite)
    leaves = jax.tree.leaves(params)
    return dict(tensors=len(leaves), parameters=sum(math.prod(x.shape) for x in leaves),
                dtype=_dtype_name(leaves[0].dtype), path=out, copied=copied)


def omnimamba_to_jax(torch_dir: str, out: str, param_dtype: str = "float32", scan_layers: bool = False,
                     overwrite: bool = False) -> dict:
    """OmniMamba release directory -> our one orbax checkpoint of the whole system at `out`, with the tokenizer
    files copied beside it. Returns a summary dict."""
    import jax

    from janusflow_jax import checkpoint
    from janusflow_jax.convert import omnimamba_release
    from janusflow_jax.convert.tensors import atomic_write_dir
    from janusflow_jax.inference import load as inference

    _check_out(out, overwrite)
    config, params = omnimamba_release.from_release_dir(torch_dir, param_dtype, scan_layers)
    copied = []

    def write(root):
        checkpoint.save_params(root, config, params, overwrite=overwrite)
        copied.extend(inference.copy_inference_files(torch_dir, root, omnimamba_release.TOKENIZER_FILES))

    if "://" in out:
        write(out)
    else:
        atomic_write_dir(Path(out), write, overwrite)
    leaves = jax.tree.leaves(params)
    return dict(tensors=len(leaves), parameters=sum(math.prod(x.shape) for x in leaves),
                dtype=_dtype_name(leaves[0].dtype), path=out, copied=copied,
                tokenizer=inference.OMNIMAMBA_TOKENIZER_HINT)


def omnimamba_to_torch(out: str, ckpt: str, torch_dtype: str | None = None, overwrite: bool = False) -> dict:
    """Our OmniMamba checkpoint -> a release directory (the .pth, the two tower files, omnimamba_config.json and
    the checkpoint's tokenizer files). Returns a summary dict."""
    from janusflow_jax import checkpoint
    from janusflow_jax.convert import omnimamba_release
    from janusflow_jax.models.omnimamba import OmniMambaSystemConfig

    _check_out(out, overwrite)
    config, params = checkpoint.load_params(ckpt)
    if not isinstance(config, OmniMambaSystemConfig):
        raise ValueError(f"{ckpt} holds the OmniMamba language model only; the release layout also needs the "
                         f"vision tower, the projector and the VQ")
    states = omnimamba_release.write_release_dir(config, params, out, torch_dtype, overwrite, copy_from=ckpt)
    arrays = [a for state in states.values() for a in state.values()]
    unique = {id(a): a for a in arrays}.values()  # tied copies are one tensor
    return dict(tensors=len(arrays), parameters=sum(a.size for a in unique),
                dtype="/".join(sorted({_dtype_name(a.dtype) for a in arrays})), path=out)


def _random_params(name: str, param_dtype: str | None, seed: int):
    import jax

    from janusflow_jax.models.config import JanusFlowConfig
    from janusflow_jax.models.janusflow import init_params

    config = JanusFlowConfig.from_dict(importlib.import_module(_RANDOM_CONFIGS[name]).get_config().model.to_dict())
    if param_dtype is not None:
        config = config.replace(param_dtype=param_dtype)
    return config, jax.device_get(init_params(config, jax.random.key(seed)))


def to_torch(out: str, ckpt: str | None = None, random_config: str | None = None, param_dtype: str | None = None,
             torch_dtype: str | None = None, include_repa: bool = False, seed: int = 0,
             overwrite: bool = False) -> dict:
    """Orbax checkpoint (or a random `configs/<random_config>` model) -> official directory. Returns a summary."""
    from janusflow_jax import checkpoint
    from janusflow_jax.convert import janusflow as convert
    from janusflow_jax.inference.load import checkpoint_family

    if ckpt is not None and checkpoint_family(ckpt) == "omnimamba":
        if include_repa:
            raise ValueError("--include_repa is JanusFlow's: OmniMamba has no REPA projector")
        return omnimamba_to_torch(out, ckpt, torch_dtype, overwrite)
    _check_out(out, overwrite)
    if ckpt is not None:
        config, params = checkpoint.load_params(ckpt)
    else:
        config, params = _random_params(random_config, param_dtype, seed)
    convert.to_pytorch(config, params, out, torch_dtype=torch_dtype, include_repa=include_repa, overwrite=overwrite)
    header = _safetensors_header(epath.Path(out) / "model.safetensors")  # summarise what was actually written
    shapes = [entry["shape"] for key, entry in header.items() if key != "__metadata__"]
    dtypes = {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}
    return dict(tensors=len(shapes), parameters=sum(math.prod(s) for s in shapes),
                dtype="/".join(sorted(_SAFETENSORS_DTYPES.get(d, d) for d in dtypes)), path=out)


def _safetensors_header(path) -> dict:
    """The JSON header of a safetensors file ({key: {dtype, shape, data_offsets}}), read without the tensors (the
    file may be a gs:// object of gigabytes)."""
    with epath.Path(path).open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    _check_args()
    if not flags.FLAGS["verbosity"].present:  # orbax logs every step of a save at INFO
        logging.set_verbosity(logging.WARNING)
    from janusflow_jax import paths
    from janusflow_jax.convert.janusflow import CheckpointMismatchError
    from janusflow_jax.convert.omnimamba_release import is_release_dir

    out, torch_dir, ckpt = (paths.resolve_optional(f.value) for f in (_OUT, _TORCH_DIR, _CKPT))
    start = time.perf_counter()
    try:
        paths.check_access(out, torch_dir, ckpt)
        if _TO.value == "jax" and _SEED.present and is_release_dir(torch_dir):
            raise ValueError("--seed is JanusFlow's (it initialises the REPA projector): an OmniMamba conversion "
                             "draws nothing at random")
        if _TO.value == "jax":
            summary = to_jax(torch_dir, out, _PARAM_DTYPE.value or "float32", _SCAN_LAYERS.value,
                             _SEED.value, _OVERWRITE.value)
        else:
            summary = to_torch(out, ckpt, _RANDOM_CONFIG.value, _PARAM_DTYPE.value, _TORCH_DTYPE.value,
                               _INCLUDE_REPA.value, _SEED.value, _OVERWRITE.value)
    except (CheckpointMismatchError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {summary['tensors']} tensors ({summary['parameters']:,} parameters, {summary['dtype']}) "
          f"to {summary['path']} in {time.perf_counter() - start:.1f} s")
    if _TO.value == "jax":
        copied = summary["copied"]
        print(f"copied {', '.join(copied)}" if copied else
              f"note: {_TORCH_DIR.value} has no {summary.get('tokenizer', 'tokenizer/processor files')}; add them "
              f"to {summary['path']} for launch.generate / launch.chat")
    return 0


if __name__ == "__main__":
    config_cli.run(main)
