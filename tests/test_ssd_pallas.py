"""The fused SSD kernels (`models/ssd_pallas.py`) against the XLA reference `mamba2.ssd_chunked`, in Pallas' TPU
interpreter on the CPU: outputs, final state and every gradient, then a whole tiny OmniMamba with `ssd="pallas"`
against `ssd="xla"` (logits, loss and the loss's gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from janusflow_jax.models import mamba2, omnimamba, ssd_pallas
from janusflow_jax.perf import roofline


def _inputs(seed, batch, length, heads, head_dim, groups, state, initial: bool):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    x = normal(batch, length, heads, head_dim)
    dt = jax.nn.softplus(normal(batch, length, heads) - 1.0)
    A = -jnp.exp(jnp.asarray(rng.uniform(0.0, 2.0, heads), jnp.float32))
    B, C = normal(batch, length, groups, state), normal(batch, length, groups, state)
    s0 = normal(batch, heads, head_dim, state) if initial else None
    return x, dt, A, B, C, s0


def _vjp(fn, args, chunk, seed):
    """(y, final) and the gradients of a fixed random projection of both, for every argument."""
    shapes = jax.eval_shape(lambda *a: fn(*a, chunk), *args)
    rng = np.random.default_rng(seed + 100)
    cotangents = tuple(jnp.asarray(rng.normal(size=t.shape), jnp.float32) for t in shapes)

    @jax.jit
    def run(args, cotangents):
        out, pullback = jax.vjp(lambda *a: fn(*a, chunk), *args)
        return out, pullback(cotangents)

    (y, final), grads = run(args, cotangents)
    return y, final, grads


@pytest.mark.parametrize("length, chunk, groups, initial", [
    (37, 16, 2, True),   # 3 chunks, the last one part padding; 2 heads per group; an initial state
    (11, 16, 1, False),  # shorter than one chunk, all heads on one group (OmniMamba's ngroups = 1), zero start
])
def test_kernel_matches_reference(length, chunk, groups, initial):
    x, dt, A, B, C, s0 = _inputs(length, 2, length, 4, 8, groups, 16, initial)
    if s0 is None:  # the reference's default zero state, passed as an argument so both take a gradient for it
        s0 = jnp.zeros((2, 4, 8, 16), jnp.float32)
    args = (x, dt, A, B, C, s0)
    reference = lambda x, dt, A, B, C, s0, q: mamba2.ssd_chunked(x, dt, A, B, C, q, s0)  # noqa: E731
    kernel = lambda x, dt, A, B, C, s0, q: ssd_pallas.ssd_pallas(x, dt, A, B, C, q, s0, interpret=True)  # noqa
    y, final, grads = _vjp(kernel, args, chunk, length)
    y_ref, final_ref, grads_ref = _vjp(reference, args, chunk, length)
    scale = lambda t: float(jnp.max(jnp.abs(t)))  # noqa: E731
    assert scale(y - y_ref) <= 1e-5 * scale(y_ref)
    assert scale(final - final_ref) <= 1e-5 * scale(final_ref)
    for name, g, g_ref in zip(("x", "dt", "A", "B", "C", "initial_state"), grads, grads_ref):
        assert g.shape == g_ref.shape, name
        assert scale(g - g_ref) <= 1e-5 * scale(g_ref), (name, scale(g - g_ref), scale(g_ref))


def test_token_arrays_go_in_unpadded():
    """x, B and C reach the kernels as the model's arrays: only the per-token dt is padded to whole chunks (the
    kernels mask the last chunk's overhang, which the interpreter reads as NaN). A padded x cost a copy in HBM per
    layer, and on a TPU a transpose on each side of the kernels."""
    x, dt, A, B, C, s0 = _inputs(3, 2, 37, 4, 8, 1, 16, True)
    jaxpr = jax.make_jaxpr(lambda *a: ssd_pallas.ssd_pallas(*a, 16, s0, interpret=True))(x, dt, A, B, C)

    def pads(jaxpr):  # jnp.pad runs as a jitted function: walk the nested jaxprs too
        for e in jaxpr.eqns:
            if e.primitive.name == "pad":
                yield e.outvars[0].aval.shape
            inner = e.params.get("jaxpr")
            if e.primitive.name != "pallas_call" and inner is not None:
                yield from pads(getattr(inner, "jaxpr", inner))

    padded = list(pads(jaxpr.jaxpr))
    assert padded == [(2, 48, 4)], padded  # dt [batch, 3 chunks x 16, heads]


def test_bf16_inputs_accumulate_in_fp32():
    """bf16 x, B, C (the training step's): the kernel's bf16 matmuls with fp32 accumulation stay within bf16
    rounding of the fp32 reference on the same bf16-rounded inputs."""
    x, dt, A, B, C, s0 = _inputs(5, 1, 40, 2, 8, 1, 16, True)
    x, B, C = (t.astype(jnp.bfloat16) for t in (x, B, C))
    y, final = jax.jit(lambda *a: ssd_pallas.ssd_pallas(*a, 16, s0, interpret=True))(x, dt, A, B, C)
    y_ref, final_ref = mamba2.ssd(x, dt, A, B, C, 16, s0, implementation="xla")
    assert y.dtype == jnp.float32 and final.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(y - y_ref))) <= 2e-2 * float(jnp.max(jnp.abs(y_ref)))
    assert float(jnp.max(jnp.abs(final - final_ref))) <= 2e-2 * float(jnp.max(jnp.abs(final_ref)))


def test_config_field():
    assert mamba2.Mamba2Config().ssd == "auto"
    with pytest.raises(ValueError, match="ssd 'triton' not in"):
        mamba2.Mamba2Config(ssd="triton")
    assert omnimamba.tiny_config().replace(ssd="pallas").backbone.ssd == "pallas"


def test_omnimamba_logits_loss_and_gradients_match_xla():
    """The tiny OmniMamba's text-to-image logits, cross-entropy and its gradient with every SSD in the kernel
    (interpreted) against the XLA scan, layers scanned (one kernel body for both)."""
    config = omnimamba.tiny_config().replace(scan_layers=True)
    params = nn.unbox(omnimamba.init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, config.text_vocab_size, (1, config.t2i_prompt_length)), jnp.int32)
    image = jnp.asarray(rng.integers(0, config.image_vocab_size, (1, config.num_image_tokens)), jnp.int32)

    def loss(params, ssd):
        model = omnimamba.OmniMamba(config.replace(ssd=ssd))
        logits = model.apply({"params": params}, prompt, image, method=omnimamba.OmniMamba.t2i_logits)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), image)), logits

    run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (value, logits), grads = run(params, "xla")
    (value_k, logits_k), grads_k = run(params, "pallas")
    scale = lambda t: float(jnp.max(jnp.abs(t)))  # noqa: E731
    assert scale(logits_k - logits) <= 1e-5 * scale(logits)
    assert abs(float(value_k - value)) <= 1e-5 * abs(float(value))
    for path, (g, g_k) in zip(jax.tree_util.tree_leaves_with_path(grads), zip(jax.tree.leaves(grads),
                                                                              jax.tree.leaves(grads_k))):
        assert scale(g_k - g) <= 1e-4 * max(scale(g), 1e-6), jax.tree_util.keystr(path[0])


def test_roofline_reads_a_kernels_declared_cost():
    """A Pallas TPU kernel's `pl.CostEstimate` rides in its tpu_custom_call's backend config; the roofline counts
    its FLOPs and, where larger than its operands and results, its declared bytes (B and C are read once per block
    of heads). Hand-written HLO in the form XLA:TPU prints (no TPU compile in the suite)."""
    hlo = """HloModule m, entry_computation_layout={(bf16[2,512,1024]{2,1,0})->bf16[2,512,1024]{2,1,0}}

ENTRY %main (x: bf16[2,512,1024]) -> bf16[2,512,1024] {
  %x = bf16[2,512,1024]{2,1,0} parameter(0)
  ROOT %ssd_forward.1 = bf16[2,512,1024]{2,1,0} custom-call(%x), custom_call_target="tpu_custom_call", \
backend_config={"custom_call_config": {"body": "TUzvUgFNTElS", "cost_estimate": {"flops": "9663676416", \
"transcendentals": "33816576", "bytes_accessed": "68157440", "remote_bytes_transferred": "0"}}}
}
"""
    est = roofline.estimate(hlo, 100e12, 1e12)
    assert est["flops"] == 9663676416
    assert est["bytes"] == 68157440  # declared, above the 2 x 2 MiB of operand and result
    assert est["seconds"] == pytest.approx(max(9663676416 / 100e12, 68157440 / 1e12))


def test_under_a_mesh_the_kernels_run_per_shard():
    """Under jax.set_mesh and the logical rules the kernels run through shard_map (rows over data x fsdp, heads over
    tensor where each head has its own group); outputs and gradients equal the unsharded reference."""
    from janusflow_jax.sharding import DEFAULT_RULES, make_mesh

    args = _inputs(7, 4, 24, 4, 8, 4, 16, True)
    reference = lambda x, dt, A, B, C, s0, q: mamba2.ssd_chunked(x, dt, A, B, C, q, s0)  # noqa: E731
    kernel = lambda x, dt, A, B, C, s0, q: ssd_pallas.ssd_pallas(x, dt, A, B, C, q, s0, interpret=True)  # noqa
    want = _vjp(reference, args, 16, 7)
    with jax.set_mesh(make_mesh(data=2, fsdp=2, tensor=2)), nn.logical_axis_rules(DEFAULT_RULES):
        text = jax.jit(lambda *a: kernel(*a, 16)).lower(*args).as_text()
        assert "manual_computation" in text or "shmap" in text, "the kernels did not run per shard"
        got = _vjp(kernel, args, 16, 7)
    scale = lambda t: float(jnp.max(jnp.abs(t)))  # noqa: E731
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert scale(g - w) <= 1e-5 * scale(w)
