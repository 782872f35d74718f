"""The train step on the tiny model: sharded == single device, accumulation == one big batch, frozen parameters
untouched and stateless, a NaN batch skipped, a fixed batch overfitted. One compiled step per mesh/micro setting."""

import jax
import numpy as np
import pytest

from janusflow_jax.data.synthetic import SyntheticSource
from janusflow_jax.models.janusflow import init_params
from janusflow_jax.sharding import mesh_context
from janusflow_jax.train import loop as trainer
from janusflow_jax.train import step as train_step


def _config(stage="stage2", data=-1, fsdp=1, tensor=1, micro=1, lr=1e-3, eps=1e-8):
    import importlib

    config = importlib.import_module(f"configs.{stage}").get_config("tiny")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    config.batch_size = 24
    config.mixture = ((6, (1, 1, 1)),)  # 8 / 8 / 8 rows on any of the meshes below
    config.micro_batches = micro
    config.optimizer.lr = lr
    config.optimizer.warmup_steps = 0
    config.optimizer.eps = eps
    return config


# Adam's first update is lr·g/(|g| + eps): for gradients near eps (zero-initialised GRN paths) it turns float rounding
# into O(lr) differences. A large eps makes the update linear in g, so parameters compare as tightly as gradients.
LINEAR_EPS = 1e-2
OVERFIT_LR = 3e-3


class Runner:
    """A plan, its compiled step and a fresh state from fixed host parameters."""

    def __init__(self, config, devices, host_params):
        import flax.linen as nn

        from janusflow_jax.sharding import param_shardings

        self.plan = trainer.make_plan(config, devices)
        self.mesh = self.plan.mesh
        sizes = self.plan.sizes_at(0)
        self.b_sh = self.plan.batch_shardings(sizes)
        self.step_fn = self.plan.jitted_step(0, sizes)
        self.params = jax.device_put(host_params, param_shardings(self.plan.model_cfg, self.mesh))
        self.init = jax.jit(lambda p: train_step.init_state(p, self.plan.labels, self.plan.tx, True),
                            out_shardings=self.plan.state_sh)
        self.nn = nn
        self.reset()

    def reset(self):
        """A fresh state from the same parameters (the compiled step is kept)."""
        self.state = self.init(self.params)
        return self

    def step(self, batch):
        with mesh_context(self.mesh):
            self.state, metrics = self.step_fn(self.state, trainer.global_batch(batch, self.b_sh))
        return {k: float(v) for k, v in jax.device_get(metrics).items()}


@pytest.fixture(scope="module")
def setup():
    config = _config()
    plan = trainer.make_plan(config, jax.devices()[:1])
    host_params = jax.device_get(init_params(plan.model_cfg, jax.random.key(0)))
    source = SyntheticSource(plan.host_sizes(plan.sizes_at(0)), 0, 0, plan.geometry)
    batches = [next(source) for _ in range(3)]
    # The single-device runner of the tests that do not compare updates (frozen, NaN, overfit) steps at the
    # overfitting test's learning rate: one compile serves all three.
    single = Runner(_config(lr=OVERFIT_LR), jax.devices()[:1], host_params)
    return config, host_params, batches, single


@pytest.fixture(scope="module")
def linear_reference(setup):
    """The single-device reference of the equality tests, compiled once for both."""
    _, host_params, _, _ = setup
    return Runner(_config(eps=LINEAR_EPS), jax.devices()[:1], host_params)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_close(a, b, atol):
    for x, y in zip(_leaves(a), _leaves(b)):
        assert float(np.abs(x - y).max()) <= atol


@pytest.mark.slow  # train steps compiled on 8 devices and on 1
def test_frozen_parameters_unchanged_and_stateless(setup):
    config, host_params, batches, single = setup
    before = _leaves(single.state["frozen"])
    trainable_before = _leaves(single.state["trainable"])
    metrics = single.step(batches[0])
    assert metrics["finite"] == 1.0 and metrics["ar_tokens"] > 0 and metrics["gen_examples"] == 8
    for a, b in zip(before, _leaves(single.state["frozen"])):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(trainable_before, _leaves(single.state["trainable"])))
    assert set(single.state["frozen"]) == {"und_encoder"}
    # Optimizer moments exist for exactly the trainable leaves; nothing of SigLIP's size lives in the state.
    n_trainable = len(jax.tree.leaves(single.state["trainable"]))
    moments = [x for x in jax.tree.leaves(single.state["opt_state"]) if x.ndim > 0]
    assert len(moments) == 2 * n_trainable
    assert jax.tree.structure(single.state["ema"]) == jax.tree.structure(single.state["trainable"])
    # EMA after one step: decay·init + (1 − decay)·new.
    decay = config.optimizer.ema_decay
    init_flat = jax.tree.leaves(jax.tree.map(np.asarray, host_params["gen_decoder"]))
    new_flat = _leaves(single.state["trainable"]["gen_decoder"])
    for e, i, n in zip(_leaves(single.state["ema"]["gen_decoder"]), init_flat, new_flat):
        np.testing.assert_allclose(e, decay * i + (1 - decay) * n, rtol=1e-5, atol=1e-7)


def test_nan_batch_is_skipped(setup):
    _, _, batches, single = setup
    before = _leaves({k: single.state[k] for k in ("trainable", "opt_state", "ema")})
    bad = dict(batches[1])
    bad["gen/latents"] = np.full_like(bad["gen/latents"], np.nan)
    metrics = single.step(bad)
    assert metrics["finite"] == 0.0
    after = _leaves({k: single.state[k] for k in ("trainable", "opt_state", "ema")})
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert int(single.state["skips"]) == 1
    assert single.step(batches[1])["finite"] == 1.0 and int(single.state["skips"]) == 0


@pytest.mark.slow  # train steps compiled on 8 devices and on 1
def test_sharded_step_equals_single_device(setup, linear_reference):
    """data 2 x fsdp 2 x tensor 2 with the TPU attention kernel (Pallas Splash, interpreted on a CPU, run per shard
    as a pod runs it) against one device with XLA attention: one compile covers the sharding and the kernel."""
    config, host_params, batches, _ = setup
    reference = linear_reference.reset()
    sharded_config = _config(data=2, fsdp=2, tensor=2, eps=LINEAR_EPS)
    sharded_config.model.attention = "splash"
    sharded = Runner(sharded_config, jax.devices(), host_params)
    assert dict(sharded.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    m_ref, m_sh = reference.step(batches[0]), sharded.step(batches[0])
    for key in ("loss", "ar", "rf", "repa", "grad_norm"):
        np.testing.assert_allclose(m_sh[key], m_ref[key], rtol=1e-5)
    # The update is linear in g here; fp32 reductions in another order (conv weight gradients summed over 4 data
    # shards) move g by ~1e-5 relative, i.e. parameters by ~1e-3·lr. A wrong reduction or sharding moves them by ~lr.
    _assert_close(sharded.state["trainable"], reference.state["trainable"], 1e-2 * config.optimizer.lr)
    # Parameters really are split over the mesh (not silently replicated).
    kernel = sharded.state["trainable"]["language_model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert len({str(s.index) for s in kernel.addressable_shards}) > 1


@pytest.mark.slow  # train steps compiled on 8 devices and on 1
def test_accumulation_equals_one_big_batch(setup, linear_reference):
    config, host_params, batches, _ = setup
    reference = linear_reference.reset()
    accumulated = Runner(_config(micro=2, eps=LINEAR_EPS), jax.devices()[:1], host_params)
    m_ref, m_acc = reference.step(batches[0]), accumulated.step(batches[0])
    for key in ("loss", "ar", "rf", "repa", "grad_norm"):
        np.testing.assert_allclose(m_acc[key], m_ref[key], rtol=1e-5)
    _assert_close(accumulated.state["trainable"], reference.state["trainable"], 1e-3 * config.optimizer.lr)
    mu_acc, mu_ref = accumulated.state["opt_state"][1][0].mu, reference.state["opt_state"][1][0].mu
    for x, y in zip(_leaves(mu_acc), _leaves(mu_ref)):  # first moment = 0.1 * gradient
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6 * float(np.abs(y).max() + 1e-12))


def test_tiny_model_overfits_a_batch(setup):
    _, _, batches, single = setup
    runner = single.reset()
    first = runner.step(batches[2])
    for _ in range(40):
        last = runner.step(batches[2])
    # AR on a fixed batch memorises; RF/REPA draw fresh t and z0 every step, so only the AR factor is large.
    assert last["ar"] < first["ar"] / 4, (first, last)
    assert last["loss"] < first["loss"] / 2, (first, last)



def test_xla_tpu_flags_become_compiler_options_on_tpus_only():
    """`xla_tpu_flags` ("--name=value ...") parse to jax.jit compiler options; a CPU mesh gets none (its compiler
    refuses TPU options), a malformed flag is an error on any machine. OmniMamba's configs turn windowed einsums off."""
    import importlib

    flags = importlib.import_module("configs.omnimamba_stage2").get_config().xla_tpu_flags
    assert train_step.parse_xla_flags(flags) == {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                                                 "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
    assert train_step.parse_xla_flags("--a=true -b=12 c=x") == {"a": True, "b": 12, "c": "x"}
    assert importlib.import_module("configs.stage2").get_config().xla_tpu_flags == ""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    assert train_step.compiler_options(flags, mesh) is None
    with pytest.raises(ValueError, match="'--oops' is not --name=value"):
        train_step.compiler_options("--oops", mesh)
    config = _config()
    config.xla_tpu_flags = "--xla_tpu_enable_windowed_einsum_for_all_gather=false oops"
    with pytest.raises(trainer.TrainingError, match="'oops' is not --name=value"):  # before any compile
        trainer.make_plan(config)
