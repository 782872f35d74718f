"""Device mesh (data, fsdp, tensor), the logical-axis rules table, parameters created already sharded, and the hosts'
rows placed as one global batch.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, ...); one rules table maps them to mesh axes.
A dimension that the mapped mesh axis does not divide is replicated instead (e.g. a 4-channel conv on 8 devices).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from janusflow_jax import hosts
from janusflow_jax.models.config import JanusFlowConfig
from janusflow_jax.models.janusflow import JanusFlow, abstract_params

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis or axes). A logical name absent from the table is replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    # LLM
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    # SigLIP
    ("vit_embed", "fsdp"),
    ("vit_heads", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_qkv", None),  # fused [q; k; v] output: a contiguous split would cut across heads
    # generation encoder/decoder (small: only the wide ConvNeXt MLP is split)
    ("gen_mlp", "tensor"),
    ("gen_channels", "fsdp"),
    # Mamba-2 (models/mamba2.py): the inner width and the per-head values split like the Llama's MLP and heads;
    # the B/C state width and the conv taps are small
    ("ssm_inner", "tensor"),
    ("ssm_heads", "tensor"),
    ("ssm_state", None),
    ("conv_width", None),
    # stacked layers, norms and conv spatial dims stay replicated
    ("layers", None),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, dcn_data: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one of data/fsdp/tensor may be -1 (= the rest).

    Devices are placed by the topology (`mesh_utils.create_device_mesh`: on a TPU, neighbours on the interconnect
    are neighbours in the mesh), not in enumeration order. `dcn_data` > 1 spans several slices of a multi-slice pod
    (or, where all devices report one slice, e.g. CPUs, several processes): data, fsdp and tensor then describe one
    slice, and the data axis also runs across the `dcn_data` slices over the data-center network
    (`mesh_utils.create_hybrid_device_mesh`), so only the gradient all-reduce crosses it. The mesh's data axis is
    `dcn_data * data`.
    """
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    hosts.check_slices(dcn_data, devices)
    if dcn_data < 1 or len(devices) % dcn_data:
        raise ValueError(f"dcn_data {dcn_data} does not divide the {len(devices)} devices into slices")
    per_slice = len(devices) // dcn_data
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if per_slice % known:
            raise ValueError(f"{per_slice} devices per slice cannot be split into mesh {shape}")
        shape[shape.index(-1)] = per_slice // known
    if math.prod(shape) != per_slice:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices per slice, have "
                         f"{per_slice}" + (f" ({len(devices)} in {dcn_data} slices)" if dcn_data > 1 else ""))
    if dcn_data == 1:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        # TPU slices carry distinct slice indices; where all devices report one slice (CPUs, GPUs), processes stand
        # for slices.
        by_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1
        grid = mesh_utils.create_hybrid_device_mesh(shape, [dcn_data, 1, 1], devices, process_is_granule=by_process,
                                                    allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


def _fit(spec: PartitionSpec, shape: tuple, mesh: Mesh) -> PartitionSpec:
    """Replicates any dimension that its mesh axes do not divide evenly."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*out)


def logical_to_shardings(abstract_boxed, mesh: Mesh, rules=DEFAULT_RULES):
    """Boxed abstract params (from eval_shape of init) -> a matching tree of NamedShardings."""
    logical = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(logical, rules)
    shapes = nn.unbox(abstract_boxed)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)), mesh_specs, shapes,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[Mesh]:
    """The mesh and the logical-axis rules in force together: what tracing the model under a mesh needs (its
    activation constraints name logical axes; the fused attention kernels read the mesh)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


def param_shardings(config: JanusFlowConfig, mesh: Mesh, rules=DEFAULT_RULES):
    """The parameters' shardings for a JanusFlowConfig, an OmniMambaConfig or an OmniMambaSystemConfig."""
    from janusflow_jax.models import omnimamba

    if isinstance(config, omnimamba.OmniMambaSystemConfig):
        return logical_to_shardings(omnimamba.abstract_system_params(config), mesh, rules)
    if isinstance(config, omnimamba.OmniMambaConfig):
        return logical_to_shardings(omnimamba.abstract_params(config), mesh, rules)
    return logical_to_shardings(abstract_params(config), mesh, rules)


def create_sharded_params(config: JanusFlowConfig, mesh: Mesh, rng, rules=DEFAULT_RULES):
    """Initialises parameters directly into their shards: no host or single device ever holds the full model."""
    model = JanusFlow(config)
    shardings = param_shardings(config, mesh, rules)
    init = jax.jit(lambda r: nn.unbox(model.init(r, method=JanusFlow.init_all)["params"]), out_shardings=shardings)
    with mesh_context(mesh, rules):
        return init(rng)


def shard_params(params, config: JanusFlowConfig, mesh: Mesh, rules=DEFAULT_RULES):
    """Places host parameters (e.g. from `convert.from_pytorch`) onto the mesh with the model's shardings."""
    return jax.device_put(params, param_shardings(config, mesh, rules))


# ---------------------------------------------------------------------------------------------------- global batch
def global_batch(local: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding]) -> dict:
    """Every host's rows -> global arrays over the mesh: host p's n rows are rows [p * n, (p + 1) * n) of the global
    batch, whatever the order of the mesh's devices. The loader lays a host's rows out so that this is the batch one
    host reading every stream builds (data/loader.py), so the batch is the same on any host count.

    `jax.make_array_from_process_local_data` alone puts a host's rows where that host's devices sit on the batch axis
    (in sorted order of their slices). Where a host's devices are not one block there (a TPU topology mesh can
    alternate the hosts' chips along an axis), the rows go first onto the same devices taken host by host, then
    move to the mesh's order on the devices (`jax.device_put` between two orders of one device set: a collective
    permute, this step's batch only)."""
    out = {}
    for key, rows in local.items():
        sharding = shardings[key]
        shape = (rows.shape[0] * jax.process_count(), *rows.shape[1:])
        staging = _host_blocks(sharding, shape)
        out[key] = jax.make_array_from_process_local_data(staging, rows, shape)
        if staging is not sharding:
            out[key] = jax.device_put(out[key], sharding)
    return out


@functools.lru_cache(maxsize=256)
def _host_blocks(sharding: NamedSharding, shape: tuple) -> NamedSharding:
    """`sharding` where each host's devices hold only that host's block of rows, else the same sharding over the
    mesh's devices re-ordered host by host (in their order within each host)."""
    if _in_host_blocks(sharding, shape):
        return sharding
    mesh = sharding.mesh
    by_host = sorted(mesh.devices.flat, key=lambda d: d.process_index)  # stable: each host's devices keep their order
    staging = NamedSharding(Mesh(np.array(by_host).reshape(mesh.devices.shape), mesh.axis_names), sharding.spec)
    if not _in_host_blocks(staging, shape):
        raise ValueError(f"a batch of {shape[0]} rows sharded {sharding.spec} over the mesh {dict(mesh.shape)} gives "
                         f"some rows to devices of several hosts, but each of the {jax.process_count()} hosts reads "
                         f"its own rows: keep the mesh axes that do not split the batch within a host")
    return staging


def _in_host_blocks(sharding: NamedSharding, shape: tuple) -> bool:
    """Whether every device of `sharding` holds rows of its own host's block only (host p: [p * n, (p + 1) * n))."""
    per_host = shape[0] // jax.process_count()
    for device, index in sharding.devices_indices_map(shape).items():
        first, stop, _ = index[0].indices(shape[0])
        if first // per_host != device.process_index or (stop - 1) // per_host != device.process_index:
            return False
    return True
