"""Parameters are created already sharded over a (data, fsdp, tensor) mesh of 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from janusflow_jax import sharding
from janusflow_jax.models.janusflow import JanusFlow, abstract_params, init_params


@pytest.mark.parametrize("scan", [False, True])
def test_create_sharded_params(tiny_config, scan):
    cfg = tiny_config.replace(scan_layers=scan)
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    params = sharding.create_sharded_params(cfg, mesh, jax.random.key(0))
    layer = params["language_model"]["layers"] if scan else params["language_model"]["layers_0"]
    lead = (None,) if scan else ()
    gate = layer["mlp"]["gate_proj"]["kernel"]
    assert gate.sharding.spec == P(*lead, "fsdp", "tensor")
    d, i = cfg.llm.hidden_size, cfg.llm.intermediate_size
    assert {s.data.shape[-2:] for s in gate.addressable_shards} == {(d // 2, i // 2)}
    assert layer["self_attn"]["o_proj"]["kernel"].sharding.spec == P(*lead, "tensor", "fsdp")
    assert params["language_model"]["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
    qkv = params["und_encoder"]["blocks" if scan else "blocks_0"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == P(*lead, "fsdp", None)  # fused [q; k; v]: not split across heads
    # A dimension the mesh does not divide is replicated: the 4-channel latent input of in_conv.
    assert params["gen_encoder"]["in_conv"]["kernel"].sharding.spec[2] is None
    # Same values as the unsharded initialisation.
    reference = init_params(cfg, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_forward_matches_single_device(tiny_config):
    cfg = tiny_config
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    host = init_params(cfg, jax.random.key(1))
    params = sharding.shard_params(jax.device_get(host), cfg, mesh)
    rng = np.random.default_rng(0)
    batch = 4
    prompt = jnp.asarray(rng.integers(0, cfg.llm.vocab_size, (batch, 6)))
    mask = jnp.ones((batch, 6), jnp.int32)
    z = jnp.asarray(rng.standard_normal((batch, cfg.latent_size, cfg.latent_size, 4)), jnp.float32)
    t = jnp.linspace(0.1, 0.9, batch)
    model = JanusFlow(cfg)
    fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=JanusFlow.velocity))
    with jax.set_mesh(mesh), sharding.nn.logical_axis_rules(sharding.DEFAULT_RULES):
        sharded = fn(params, prompt, mask, z, t)
    single = fn(host, prompt, mask, z, t)
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5 * float(jnp.abs(single).max()))


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh(data=3, fsdp=1, tensor=1)
    assert sharding.make_mesh(data=-1, fsdp=2, tensor=2).shape == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="slices"):  # one process of CPUs is one slice (tests/test_pod.py: two)
        sharding.make_mesh(dcn_data=2)


@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_axis_names(tiny_config, scan):
    from flax import traverse_util

    boxed = abstract_params(tiny_config.replace(scan_layers=scan))
    flat = traverse_util.flatten_dict(boxed, sep="/", is_leaf=lambda _, x: isinstance(x, sharding.nn.Partitioned))
    unnamed = [k for k, v in flat.items()
               if not isinstance(v, sharding.nn.LogicallyPartitioned) or len(v.names) != v.value.ndim]
    assert not unnamed
