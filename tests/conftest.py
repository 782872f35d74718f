"""Test setup: 8 fake CPU devices (set before JAX is imported anywhere), tiny configs, shared fixtures."""

import os

# 8 fake CPU devices for mesh tests. Backend optimisation level 0 halves XLA's CPU compile time, which dominates
# this suite of tiny models (it changes no numerics beyond summation order; parity bounds are 1e-4 relative).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from janusflow_jax.models.config import JanusFlowConfig  # noqa: E402


@pytest.fixture
def tiny_config() -> JanusFlowConfig:
    from configs import tiny

    return JanusFlowConfig.from_dict(tiny.get_config().model.to_dict())


def pytest_terminal_summary(terminalreporter):
    """The parity tests' measured errors (test_parity.py attaches them to each test's report), one line each."""
    errors: dict[str, float] = {}
    reports = [r for group in terminalreporter.stats.values() for r in group]  # teardown reports carry them
    for report in reports:
        for key, value in getattr(report, "user_properties", ()) or ():
            if key == "parity_errors":
                for name, err in value.items():
                    errors[name] = max(err, errors.get(name, 0.0))
    if errors:
        terminalreporter.section("JanusFlow vs PyTorch reference (max|jax-torch| / max|torch|)")
        for name, err in errors.items():
            terminalreporter.write_line(f"  {name:<52s} {err:.2e}")
