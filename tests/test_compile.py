"""Ahead-of-time compile of the train step: the tiny stage-2 step against the 8 local CPU devices (and, where libtpu
is installed, against a TPU topology description), plus the topology-name mapping and the CLI's error line."""

import copy
import importlib.util
import subprocess
import sys

import jax
import pytest

from janusflow_jax.perf import aot as train_compile


def _tiny_stage2(**mesh):
    from configs import stage2

    config = stage2.get_config("tiny")
    for axis, size in mesh.items():
        setattr(config.mesh, axis, size)
    return config


@pytest.fixture(scope="module")
def cpu_compile():
    config = _tiny_stage2(data=2, fsdp=2, tensor=2)
    devices = train_compile.topology_devices("cpu:8")
    return config, devices, train_compile.compile_train_step(config, devices)


@pytest.mark.slow  # a whole train step compiled ahead of time
def test_tiny_stage2_compiles_on_a_2x2x2_cpu_mesh(cpu_compile):
    config, _, report = cpu_compile
    assert report["chips"] == 8 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert report["phase"] == 1 and report["ratio"] == (14, 80, 6)  # the longest phase by default
    assert sum(report["sub_batch"].values()) == config.batch_size
    memory = report["memory_bytes"]
    assert memory["argument"] > 0 and memory["total"] >= memory["argument"]
    assert memory["alias"] > 0  # the state is donated: its outputs reuse the argument buffers
    assert report["hbm_bytes"] is None and report["fits"] is None  # a CPU has no HBM table entry
    assert report["compiled_flops"] == pytest.approx(8 * report["compiled_flops_per_chip"])
    assert not report["flops_undercounted"]  # tiny: unrolled layers, one micro-batch
    # Our count leaves out elementwise work and the optimizer; XLA counts them (at the tiny config's widths the norms,
    # GRN and the 49 multiply-adds of each depthwise conv rival the matmuls: 3.7x measured) and adds sharding
    # overhead. Both describe the same step, so they agree within a small factor.
    assert report["counted_flops"] > 0 and report["compiled_flops_per_chip"] > 0
    assert 0.5 < report["compiled_flops"] / report["counted_flops"] < 6
    assert report["tokens"] > 0 and report["compile_seconds"] > 0
    assert report["estimated_step_seconds"] is None and report["mfu"] is None  # XLA:CPU gives no time estimate
    assert report["attention"] == "auto" and report["kernel_calls"] == 0  # "auto" is XLA attention on a CPU
    assert "mesh data=2 fsdp=2 tensor=2" in train_compile.format_report(report, "cpu:8")


@pytest.mark.parametrize("name, expected", [
    ("v5p-128", "v5p:4x4x4"), ("v5p-8", "v5p:2x2x1"), ("v5p-512", "v5p:4x8x8"), ("v4-32", "v4:2x2x4"),
    ("v5e-256", "v5e:16x16"), ("v5e-8", "v5e:2x4"), ("v6e-256", "v6e:16x16"), ("v6e-1", "v6e:1x1"),
    ("v5p:4x4x12", "v5p:4x4x12"),
])
def test_topology_names(name, expected):
    assert train_compile.topology_name(name) == expected


@pytest.mark.parametrize("name", ["v5p-96", "v7x-64", "v5p-127", "tpu", "v5e:16"])
def test_bad_topology_names_are_errors(name):
    with pytest.raises(train_compile.TopologyError):
        train_compile.topology_name(name)


def test_cpu_topology_needs_enough_devices():
    with pytest.raises(train_compile.TopologyError, match="xla_force_host_platform_device_count"):
        train_compile.topology_devices(f"cpu:{len(jax.devices('cpu')) + 1}")


def test_longest_phase():
    assert train_compile.longest_phase(((10_000, (30, 50, 20)), (390_000, (14, 80, 6)))) == 1
    assert train_compile.longest_phase(((50_000, (1, 1, 1)), (60_000, (1, 2, 1)))) == 0


def test_cli_unknown_topology_is_one_line():
    result = subprocess.run([sys.executable, "-m", "launch.compile", "--config=stage2:tiny", "--topology=v9z-8"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown topology 'v9z-8'")
    assert "Traceback" not in result.stderr


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install 'jax[tpu]')")


@pytest.fixture(scope="module")
def tpu_compile():
    config = _tiny_stage2(data=1, fsdp=4)
    config.model.attention = "splash"  # "auto" picks it from 128 tokens up; the tiny rows are shorter
    devices = train_compile.topology_devices("v5e-4")
    return config, devices, train_compile.compile_train_step(config, devices)


@needs_libtpu
def test_tiny_stage2_compiles_for_a_tpu_topology(tpu_compile):
    _, _, report = tpu_compile
    assert report["device_kind"] == "TPU v5 lite" and report["chips"] == 4
    assert report["hbm_bytes"] == 16 * train_compile.GIB and report["fits"]
    assert report["memory_bytes"]["total"] > 0 and report["compiled_flops"] > 0
    assert report["estimate_source"] == "compiler"  # unrolled tiny step: no loops, XLA's own whole-step time
    assert report["estimated_step_seconds"] > 0 and 0 < report["mfu"] < 1
    assert report["kernel_calls"] > 0  # the Pallas Splash kernel was lowered by Mosaic for the TPU


@needs_libtpu
def test_scanned_tpu_step_gets_the_roofline_estimate(tpu_compile):
    # Scanned layers hide all but one iteration from XLA's cost analysis; the roofline walks the loop by its trip
    # count, so its whole-step FLOPs must cover the unrolled step's.
    config, devices, unrolled = tpu_compile
    config = copy.deepcopy(config)
    config.model.scan_layers = True
    report = train_compile.compile_train_step(config, devices)
    assert report["flops_undercounted"] and report["compiled_flops"] < unrolled["compiled_flops"]
    assert report["estimate_source"] == "roofline" and report["estimated_step_seconds"] > 0
    assert report["whole_step_flops"] == pytest.approx(unrolled["compiled_flops"], rel=0.1)


def _gpu_devices(topology):
    try:
        return train_compile.gpu_devices(topology)
    except train_compile.TopologyError as e:  # JAX's CUDA plugin is not installed (CI: it is an optional extra)
        pytest.skip(str(e)[:200])


def test_tiny_stage2_compiles_for_two_h100s_without_a_gpu():
    # XLA's deviceless GPU compiler through JAX's CUDA plugin: the real XLA:GPU pipeline (fusion, cuBLAS/Triton
    # GEMMs, cuDNN calls) against the H100 description, then its memory plan and the roofline of its program.
    devices = _gpu_devices("h100:2")
    assert len(devices) == 2 and "H100" in devices[0].device_kind
    report = train_compile.compile_train_step(_tiny_stage2(data=2, fsdp=1, tensor=1), devices)
    assert report["hbm_bytes"] == 81559 * 2 ** 20 and report["fits"] is True
    bound = report["roofline"]
    assert bound["seconds"] > 0 and bound["kinds"]["matmul"]["flops"] > 0
    # XLA:GPU has no cost model: the roofline's FLOPs (loops walked by trip count) stand in for the compiled FLOPs.
    assert report["compiled_flops_per_chip"] == bound["flops"] and not report["flops_undercounted"]
    assert report["estimate_source"] == "roofline" and report["estimated_step_seconds"] == bound["seconds"]
    assert 0.5 < report["compiled_flops"] / report["counted_flops"] < 6
    assert "roofline per chip" in train_compile.format_report(report, "h100:2")


@needs_libtpu
def test_two_slices_compile_with_the_data_axis_across_them():
    """A multi-slice pod (two v5e-4 slices over DCN): `mesh.dcn_data=2` puts slice 0's chips, then slice 1's, along
    the data axis (`mesh_utils.create_hybrid_device_mesh`), and the step compiles for all 8 chips."""
    from janusflow_jax import sharding

    config = _tiny_stage2(data=-1, fsdp=1, tensor=1, dcn_data=2)
    devices = train_compile.topology_devices("v5e-4", num_slices=2)
    mesh = sharding.make_mesh(**config.mesh.to_dict(), devices=devices)
    assert [d.slice_index for d in mesh.devices[:, 0, 0]] == [0] * 4 + [1] * 4
    report = train_compile.compile_train_step(config, devices)
    assert report["chips"] == 8 and report["mesh"]["data"] == 8 and report["fits"]


def test_slices_are_a_tpu_topologys():
    with pytest.raises(train_compile.TopologyError, match="not 'cpu:8'"):
        train_compile.topology_devices("cpu:8", num_slices=2)


@pytest.mark.parametrize("name", ["h100:", "h100:2x", "h300", "h100:x8"])
def test_bad_gpu_topologies_are_errors(name):
    with pytest.raises(train_compile.TopologyError):
        train_compile.topology_devices(name)
