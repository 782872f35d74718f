"""The chips this project measures and compiles for: one table of peak FLOP/s, HBM bandwidth and HBM size per chip,
and XLA's description of the NVIDIA GPUs a compile can target without the hardware.

MFU divides by `peak_bf16` (dense, per chip: what MaxText divides by); the roofline (`perf/roofline.py`) takes its
slopes from `peak_bf16` and `hbm_bandwidth`; `launch.compile` sets a compiled step's memory against `hbm_bytes`.
Keys are lower-case fragments of `jax.Device.device_kind`; the longest fragment a device's kind contains wins.
"""

from __future__ import annotations

import dataclasses

import jax

GIB, MIB = 2 ** 30, 2 ** 20


@dataclasses.dataclass(frozen=True)
class Chip:
    peak_bf16: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    hbm_bytes: int  # per chip (what the driver or libtpu reports)


_V5E, _V5P, _V6E = Chip(197e12, 0.819e12, 16 * GIB), Chip(459e12, 2.765e12, 95 * GIB), Chip(918e12, 1.64e12, 32 * GIB)
CHIPS: dict[str, Chip] = {
    "h100": Chip(989e12, 3.35e12, 81559 * MIB),  # SXM, HBM3
    "h200": Chip(989e12, 4.8e12, 143771 * MIB),  # HBM3e
    "a100": Chip(312e12, 2.039e12, 81920 * MIB),  # SXM 80GB, HBM2e
    "tpu v4": Chip(275e12, 1.2e12, 32 * GIB),
    "tpu v5 lite": _V5E, "tpu v5e": _V5E,  # v5e reports itself as "TPU v5 lite"
    "tpu v5p": _V5P, "tpu v5": _V5P,  # v5p reports itself as "TPU v5"
    "tpu v6 lite": _V6E, "tpu v6e": _V6E,  # v6e (Trillium)
}

# NVIDIA GPUs a compile can target without the hardware: XLA's deviceless GPU compiler, reached through JAX's CUDA
# plugin, takes a description of the device instead of querying one. These are the properties it reads besides
# CHIPS' memory and bandwidth (CUDA's device query: SMs, clocks, shared memory, L2; cuDNN 9.10 for fused attention).
GPU_TARGETS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", capability=(9, 0), cores=132, clock_ghz=1.98, l2=50 * MIB,
                 smem_block_optin=232448, smem_core=233472),
    "h200": dict(name="NVIDIA H200", capability=(9, 0), cores=132, clock_ghz=1.98, l2=50 * MIB,
                 smem_block_optin=232448, smem_core=233472),
    "a100": dict(name="NVIDIA A100-SXM4-80GB", capability=(8, 0), cores=108, clock_ghz=1.41, l2=40 * MIB,
                 smem_block_optin=166912, smem_core=167936),
}


def chip(device=None) -> Chip | None:
    """The CHIPS entry of `device` (default: the first device), None when the table does not know it (a CPU)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    return next((CHIPS[name] for name in sorted(CHIPS, key=len, reverse=True) if name in kind), None)


def peak_flops_per_device(device=None) -> float:
    """Peak bf16 FLOP/s of `device`, 0 when unknown (CPU: MFU is then not reported)."""
    found = chip(device)
    return found.peak_bf16 if found else 0.0


def hbm_bandwidth(device=None) -> float:
    """HBM bytes/s of `device`, 0 when unknown."""
    found = chip(device)
    return found.hbm_bandwidth if found else 0.0


def hbm_bytes(device=None) -> int:
    """HBM bytes per chip of `device`, 0 when unknown."""
    found = chip(device)
    return found.hbm_bytes if found else 0
