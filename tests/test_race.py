"""The long-sequence race (`perf/race.py`, `launch.bench race`) at narrow widths, and the Mamba-2 FLOP count."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from janusflow_jax.models import mamba2
from janusflow_jax.models.omnimamba import OmniMambaSystemConfig
from janusflow_jax.perf import flops as flops_lib
from janusflow_jax.perf import race, race_report, roofline

WIDTH = 64  # narrow stand-ins: race.mamba_config / llama_config at another width


@pytest.fixture(scope="module")
def narrow():
    c = race.contenders(2, 1, width=WIDTH)
    return c, {k: v.init_params(0) for k, v in c.items()}


def _cli(cwd, *args) -> int:
    """`launch.bench race` as a user runs it, in its own process from `cwd` (launch.bench's --cfg list flag would
    replace launch.evaluate's --cfg float in a process that imports both)."""
    import subprocess
    import sys

    from tests.cli_helpers import user_env

    result = subprocess.run([sys.executable, "-m", "launch.bench", "race", *args], cwd=cwd, env=user_env(),
                            capture_output=True, text=True, timeout=600)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.returncode


def test_race_cli_end_to_end(gcs, tmp_path):
    """Both models, both phases at two lengths; a time budget that only the first length's points meet (those after
    it are compiled for their plans, not run); the section goes into someone else's file and is rewritten in place.
    Every output on gs:// (this run's report, the published JSON, the plot, BENCHMARKS.md), run from an empty
    directory: nothing is written under it or into the repository."""
    from etils import epath

    from tests.cli_helpers import repository_files
    from tests.pod_helpers import _objects

    md, json_dir = epath.Path(gcs, "race", "BENCHMARKS.md"), epath.Path(gcs, "race", "benchmarks")
    md.write_text("# Benchmarks\n\nsomeone else's section\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = repository_files()
    assert _cli(cwd, f"--race_width={WIDTH}", "--race_lengths=64,128", "--race_layers=2,1", "--reps=1",
                "--race_time_budget=1e-9", f"--out_dir={gcs}/race/out", "--update_benchmarks",
                f"--benchmarks_md={md}") == 0
    assert list(cwd.iterdir()) == [] and repository_files() == before
    (path,) = json_dir.glob("race_*.json")
    assert [name.rsplit(".", 1)[1] for name in _objects(f"{gcs}/race/out")] == ["json", "md"]  # this run's own copy
    report = json.loads(path.read_text())
    rows = report["sweep"]
    assert {(r["model"], r["phase"], r["length"]) for r in rows} == {
        (m, p, n) for m in ("mamba", "llama") for p in ("prefill", "decode") for n in (64, 128)}
    for r in rows:
        assert r["memory_bytes"] > 0 and r["largest_batch"] >= 1, r
        if r["length"] == 64:
            assert r["status"] == "ok" and r["seconds"] > 0, r
        else:
            assert r["status"].startswith("over time budget") and "seconds" not in r, r
    text = md.read_text()
    assert "someone else's section" in text and text.count(race_report.RACE_BEGIN) == 1
    assert "| 128 | time budget |" in text and "race.png" in text
    assert (json_dir / race_report.PLOT_NAME).read_bytes().startswith(b"\x89PNG")
    race_report.write_markdown(md, json_dir)
    assert md.read_text().count(race_report.RACE_BEGIN) == 1  # rewritten in place


def test_decode_cost_is_flat_for_mamba_and_grows_for_llama(narrow):
    """XLA's cost of the compiled decode loop: the Mamba step's does not depend on the context length, the Llama
    step's (attention over a preallocated cache) grows with it; the counted FLOPs agree."""
    contenders, params = narrow
    cost = {}
    for kind, c in contenders.items():
        for length in (128, 1024):
            compiled, _ = race.compile_program(c, "decode", race.program_args(c, "decode", 1, length, params[kind],
                                                                             abstract=True))
            cost[kind, length] = compiled.cost_analysis()["flops"]
    assert cost["mamba", 128] == cost["mamba", 1024]
    assert cost["llama", 1024] > 2 * cost["llama", 128]
    m, ll = contenders["mamba"], contenders["llama"]
    assert m.counted_flops("decode", 1, 128) == m.counted_flops("decode", 1, 1024)
    assert ll.counted_flops("decode", 1, 1024) > 2 * ll.counted_flops("decode", 1, 128)


def test_compiled_prefill_equals_the_forward(narrow):
    """The race times real computations: the compiled prefill's last-position logits equal the plain forward's, and
    its state continues the sequence as the forward does (one decode step = the forward over one more token)."""
    contenders, params = narrow
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 4 * WIDTH, (2, 100)), jnp.int32)
    m, ll = contenders["mamba"], contenders["llama"]
    forward = jax.jit(lambda p, ids: m.module.apply({"params": p}, ids))
    logits, cache = race.PREFILL["mamba"](m.module, params["mamba"], ids)
    full = forward(params["mamba"], ids)
    np.testing.assert_allclose(logits, full[:, -1], rtol=1e-4, atol=1e-5)
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)
    step, _ = m.module.apply({"params": params["mamba"]}, nxt, cache, method=mamba2.Mamba2LM.decode_step)
    longer = forward(params["mamba"], jnp.concatenate([ids, nxt[:, None]], 1))
    np.testing.assert_allclose(step, longer[:, -1], rtol=1e-4, atol=1e-5)

    logits, cache = race.PREFILL["llama"](ll.module, params["llama"], ids)
    plain = jax.jit(lambda p, ids: ll.module.apply({"params": p}, ll.module.apply(
        {"params": p}, ids, method=type(ll.module).embed)))(params["llama"], ids)
    np.testing.assert_allclose(logits, plain["logits"][:, -1], rtol=1e-4, atol=1e-5)
    assert cache["k"].shape == (1, 2, 100, ll.config.num_kv_heads, ll.config.head_dim)


def test_a_plan_over_the_budget_is_recorded_not_run(narrow):
    contenders, _ = narrow
    rows = race.sweep({"mamba": contenders["mamba"]}, [64], memory_budget=1, reps=1)
    assert [r["status"].startswith("over memory budget") for r in rows] == [True, True]
    assert all("seconds" not in r and r["memory_bytes"] > 1 for r in rows)


def test_largest_batch_and_crossovers():
    assert race.largest_batch(100, 150, 1000) == 19  # fixed 50 + 50 per row
    rows = [{"model": m, "phase": "decode", "length": n, "status": "ok", "seconds": s, "memory_bytes": b}
            for m, pts in (("mamba", {512: (2.0, 30), 1024: (2.0, 30), 2048: (2.0, 30)}),
                           ("llama", {512: (1.0, 10), 1024: (3.0, 40), 2048: (6.0, 90)}))
            for n, (s, b) in pts.items()]
    c = race_report.compare(rows)["decode"]
    assert c["time_crossover"] == 1024 and c["time_ratio"] == 3.0 and c["longest_timed"] == 2048
    assert c["memory_crossover"] == 1024 and c["memory_ratio"] == pytest.approx(30 / 90)


@pytest.mark.parametrize("seq", [256, 200])
def test_mamba2_flops_match_the_compiled_forward(seq):
    """`flops.mamba2_forward` against XLA's count of a jitted forward (2 layers, d 256, chunks of 64; 200 tokens pad
    to 256). XLA's `cost_analysis` also counts elementwise work (exp of the decays, softplus, SiLU, norms, the mask),
    which the MaxText convention leaves out: it is 0-10% above the count. The roofline's walk of the program's dots
    and convolutions (`roofline.py`) is the matmul part alone and matches to 2%."""
    cfg = mamba2.Mamba2Config(d_model=256, n_layer=2, d_state=32, headdim=32, chunk_size=64, vocab_size=512)
    model = mamba2.Mamba2LM(cfg)
    params = jax.eval_shape(lambda: mamba2.init_params(cfg, jax.random.key(0)))
    compiled = jax.jit(lambda p, i: model.apply({"params": p}, i)).lower(
        params, jax.ShapeDtypeStruct((2, seq), jnp.int32)).compile()
    counted = flops_lib.mamba2_forward(cfg, 2, seq, logit_tokens=seq)
    assert 1.0 <= compiled.cost_analysis()["flops"] / counted < 1.1
    assert roofline.estimate(compiled.as_text(), 1e12, 1e11)["flops"] / counted == pytest.approx(1.0, abs=0.02)
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method=mamba2.Mamba2LM.decode_step)).lower(
        params, jax.ShapeDtypeStruct((2,), jnp.int32), jax.eval_shape(lambda: mamba2.init_cache(cfg, 2))).compile()
    assert 1.0 <= step.cost_analysis()["flops"] / flops_lib.mamba2_forward(cfg, 2, 1, logit_tokens=1) < 1.1


def test_omnimamba_train_step_flops_follow_the_conventions():
    system = OmniMambaSystemConfig()
    cfg = system.lm
    everything = {"lm/backbone/layers_0/mixer/x_proj/kernel": "trainable", "lm/img_embeddings/embedding": "trainable",
                  "lm/caption_embed/fc1/kernel": "trainable", "projector/fc0/kernel": "trainable",
                  "vision/dino/blocks_0/mlp/fc1/kernel": "frozen"}
    # All of the LM trains: 3x its t2i forward; nothing else runs for t2i rows.
    assert flops_lib.omnimamba_train_step_flops(system, everything, {"t2i": 4}, 0) == pytest.approx(
        3 * flops_lib.omnimamba_t2i_forward(cfg, 4))
    # Stage 1 MMU (projector + LoRA): the frozen backbone costs 2x (gradients flow to the LoRA and the projector),
    # the towers 1x, the projector 3x.
    stage1 = {"lm/backbone/layers_0/mixer/lora_mmu/A": "trainable", "lm/backbone/layers_0/mixer/x_proj/kernel": "frozen",
              "projector/fc0/kernel": "trainable", "vision/dino/blocks_0/mlp/fc1/kernel": "frozen"}
    p = system.projector
    projector = 2 * cfg.num_image_features * (p.vision_dim * p.hidden_dim + p.hidden_dim * p.llm_dim
                                              + p.llm_dim * p.llm_dim)
    want = (2 * flops_lib.omnimamba_mmu_forward(cfg, 1, 800)
            + flops_lib.dinosiglip_forward(system.vision, system.projector, 1) + 2 * projector)
    assert flops_lib.omnimamba_train_step_flops(system, stage1, {"mmu": 1}, 800) == pytest.approx(want)
    # The 1.3B backbone: ~2 x 1.3e9 FLOPs per token.
    per_token = flops_lib.mamba2_forward(cfg.backbone, 1, 4096) / 4096
    assert 2.3e9 < per_token < 3.0e9


@pytest.mark.parametrize("target", ["v5p:2x2x1", "h200"])
def test_the_compiled_llama_prefill_calls_the_fused_kernel(target):
    """The race's Llama prefill (into a preallocated cache) compiled for a TPU / an NVIDIA GPU with no device runs its
    attention in the fused kernel (Splash's tpu_custom_call / cuDNN's fmha); the decode step (one query over the
    cache) stays on XLA. Narrow and shallow: the fused path depends on the shapes' form, not their size."""
    from janusflow_jax.perf import aot

    if target.startswith("v5p") and importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install 'jax[tpu]')")
    try:
        devices = aot.topology_devices(target)
    except aot.TopologyError as e:  # JAX's CUDA plugin is not installed (an optional extra)
        pytest.skip(str(e)[:200])
    rows = race.aot_memory(devices, [256], models=("llama",), layers=(2, 1), width=WIDTH)
    calls = {r["phase"]: r["fused_attention_calls"] for r in rows}
    assert calls["prefill"] >= 1 and calls["decode"] == 0, calls
    assert all(r["status"] == "ok" and r["memory_bytes"] > 0 for r in rows)
    # The roofline counts the kernel's attention FLOPs (Splash: whole 256-token blocks, so up to 1/4 more here).
    prefill = next(r for r in rows if r["phase"] == "prefill")
    assert 0.95 < prefill["roofline_flops"] / prefill["counted_flops"] < 1.3
