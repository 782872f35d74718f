"""Ahead-of-time compile of the train step for a TPU topology or NVIDIA GPUs on this machine: does it fit, how fast
could it be?

  python -m launch.compile --config=stage2 --topology=v5p-128
  python -m launch.compile --config=stage2 --topology=v5e-256 --config.mesh.fsdp=64 --config.mesh.tensor=4 \
      --config.model.remat_policy=full --config.micro_batches=2
  python -m launch.compile --config=stage2 --config.batch_size=40 --topology=h100   # also h200, a100, h100:8, h100:4x8
  python -m launch.compile --config=stage2:tiny --topology=cpu:8   # a quick check against local CPU devices
  python -m launch.compile --config=stage2 --topology=v5p-128 --num_slices=2 --config.mesh.dcn_data=2  # multi-slice

TPU topologies need libtpu (`pip install "jax[tpu]"`; it warns about missing TPU environment variables, harmlessly),
GPU targets JAX's CUDA plugin (`pip install "jax[cuda13]"` at the installed jax version; no GPU or driver).
`--config` resolves like launch/train.py; every --config.FIELD override works. Prints memory per chip against the
chip's HBM, the compiled and counted FLOPs, the time estimate (XLA's where it has one, else the roofline of the
compiled program, `roofline.py`), the MFU it implies and the roofline by kind of work (janusflow_jax/perf/aot.py
says how to read them). Exits 1 with one line when the topology is unknown or XLA cannot compile (e.g. out of HBM).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

# Importing launch.train defines --config (a config file, resolved by config_cli); this tool reuses it.
import launch.train  # noqa: F401  (defines --config)
from launch import config_cli

_TOPOLOGY = flags.DEFINE_string("topology", None, "v5p-128, v5e-256, v6e-256, v4-128, an explicit 'v5p:4x4x12', "
                                                  "h100, h200, a100 (optionally :GPUS or :HOSTSxGPUS), or cpu:N for "
                                                  "N local CPU devices.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU topologies: slices joined over the data-center network "
                                                   "(with --config.mesh.dcn_data set to the same number).")
_PHASE = flags.DEFINE_integer("phase", None, "Mixture phase whose batch shapes to compile (default: the longest).")
_COMPOSITIONS = flags.DEFINE_enum("compositions", "all", ["all", "first"],
                                  "Compile every batch composition the mixture schedule deals in the phase (a run "
                                  "compiles each once; the largest must fit), or the first alone.")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config = flags.FLAGS.config
    if config is None or _TOPOLOGY.value is None:
        raise app.UsageError("--config and --topology are required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from janusflow_jax import paths
    from janusflow_jax.perf import aot as train_compile
    from janusflow_jax.train import loop as trainer

    try:
        if config.mesh.get("dcn_data", 1) != _NUM_SLICES.value:
            raise ValueError(f"--num_slices={_NUM_SLICES.value} needs --config.mesh.dcn_data={_NUM_SLICES.value} (the "
                             f"data axis across the slices), got {config.mesh.get('dcn_data', 1)}")
        devices = train_compile.topology_devices(_TOPOLOGY.value, _NUM_SLICES.value)
        reports = train_compile.compile_compositions(config, devices, phase=_PHASE.value,
                                                     first_only=_COMPOSITIONS.value == "first")
    except (train_compile.TopologyError, train_compile.CompileError, trainer.TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    topology = _TOPOLOGY.value + (f" x {_NUM_SLICES.value} slices" if _NUM_SLICES.value > 1 else "")
    for report in reports:
        print(train_compile.format_report(report, topology))
    print(train_compile.format_compositions(reports))
    if _JSON.value:
        largest = max(reports, key=lambda r: r["memory_bytes"]["total"])
        paths.user_path(_JSON.value).write_text(  # local or gs://
            json.dumps({"topology": _TOPOLOGY.value, "num_slices": _NUM_SLICES.value, **largest,
                        "per_composition": reports}, indent=1))
    return 0


def _prepare_backend(argv: list[str]):
    """Before JAX starts its backends: enough fake CPU devices for cpu:N, and the CPU as the default platform (a TPU
    topology compiles from its description; no local TPU is opened or needed)."""
    for i, a in enumerate(argv):
        value = a[len("--topology="):] if a.startswith("--topology=") else \
            argv[i + 1] if a == "--topology" and i + 1 < len(argv) else ""
        if value.startswith("cpu:") and value[4:].isdigit():
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                       + f" --xla_force_host_platform_device_count={value[4:]}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def run():
    _prepare_backend(sys.argv)
    config_cli.run(main)


if __name__ == "__main__":
    run()
