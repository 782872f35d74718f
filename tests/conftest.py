"""Test setup: 8 fake CPU devices (set before JAX is imported anywhere), tiny configs, shared fixtures."""

import os

# 8 fake CPU devices for mesh tests. Backend optimisation level 0 halves XLA's CPU compile time, which dominates
# this suite of tiny models (it changes no numerics beyond summation order; parity bounds are 1e-4 relative).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from janusflow_jax.config import JanusFlowConfig  # noqa: E402


@pytest.fixture
def tiny_config() -> JanusFlowConfig:
    from configs import tiny

    return JanusFlowConfig.from_dict(tiny.get_config().model.to_dict())
