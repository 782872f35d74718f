"""`python -m launch.convert` end to end on the tiny config: random official dir -> orbax -> official dir, bit-exact.

The CLI's `main` runs in-process (absl flags reset before each call); one subprocess run checks the module entry point.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from safetensors.numpy import load_file, save_file

from janusflow_jax import checkpoint
from janusflow_jax.convert import janusflow as convert
from janusflow_jax.sharding import make_mesh, param_shardings
from launch import convert as cli

import cli_helpers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args) -> int:
    return cli_helpers.run_cli(cli, *args)


def assert_same_official(dir_a: Path, dir_b: Path):
    a, b = load_file(str(dir_a / "model.safetensors")), load_file(str(dir_b / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key
    assert json.loads((dir_a / "config.json").read_text()) == json.loads((dir_b / "config.json").read_text())


def assert_same_tree(x, y):
    fx, fy = traverse_util.flatten_dict(x, sep="/"), traverse_util.flatten_dict(y, sep="/")
    assert sorted(fx) == sorted(fy)
    for key in fx:
        u, v = np.asarray(fx[key]), np.asarray(fy[key])
        assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes(), key


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory) -> Path:
    """The README's download-free quick start: a random tiny checkpoint in the official layout."""
    out = tmp_path_factory.mktemp("cli") / "tiny-official"
    assert run_cli("--to=torch", "--random_config=tiny", f"--out={out}") == 0
    return out


@pytest.fixture(scope="module")
def scanned_ckpt(official_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny-scanned"
    assert run_cli("--to=jax", f"--torch_dir={official_dir}", f"--out={out}", "--scan_layers") == 0
    return out


def test_random_official_dir(official_dir, capsys):
    assert sorted(p.name for p in official_dir.iterdir()) == ["config.json", "model.safetensors"]
    raw = json.loads((official_dir / "config.json").read_text())
    assert raw["architectures"] == ["MultiModalityCausalLM"] and raw["language_config"]["num_hidden_layers"] == 2
    state = load_file(str(official_dir / "model.safetensors"))
    assert not any(k.startswith("repa_projector.") for k in state)
    assert all(v.dtype == np.float32 for v in state.values())


def test_round_trip_fp32(official_dir, tmp_path, capsys):
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert run_cli("--to=jax", f"--torch_dir={official_dir}", f"--out={ckpt}") == 0
    assert "tensors" in capsys.readouterr().out
    config, params = checkpoint.load_params(ckpt)
    ref_config, ref_params = convert.from_pytorch(official_dir)
    assert config == ref_config
    assert_same_tree(params, ref_params)

    assert run_cli("--to=torch", f"--ckpt={ckpt}", f"--out={back}") == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("wrote 125 tensors (") and "float32" in summary and str(back) in summary, summary
    assert_same_official(official_dir, back)

    # An existing output is refused (nothing touched) unless --overwrite.
    assert run_cli("--to=torch", f"--ckpt={ckpt}", f"--out={back}") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli("--to=torch", f"--ckpt={ckpt}", f"--out={back}", "--overwrite", "--include_repa") == 0
    assert any(k.startswith("repa_projector.") for k in load_file(str(back / "model.safetensors")))


def test_relative_paths_both_ways(official_dir, tmp_path, monkeypatch, capsys):
    """As a user types it: every path relative to the current directory (orbax itself needs absolute ones)."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # the source is reached through "..": nothing is absolute
    source = Path(os.path.relpath(official_dir, tmp_path / "sub"))
    assert not source.is_absolute() and source.parts[0] == ".."
    assert run_cli("--to=jax", f"--torch_dir={source}", "--out=ckpts/tiny") == 0
    assert run_cli("--to=torch", "--ckpt=ckpts/tiny", "--out=back") == 0
    assert "wrote 125 tensors" in capsys.readouterr().out
    assert (tmp_path / "sub" / "ckpts" / "tiny").is_dir()
    assert_same_official(official_dir, tmp_path / "sub" / "back")


def test_round_trip_scanned(official_dir, scanned_ckpt, tmp_path):
    config, params = checkpoint.load_params(scanned_ckpt)
    assert config.scan_layers
    assert params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape[0] == config.llm.num_layers
    assert run_cli("--to=torch", f"--ckpt={scanned_ckpt}", f"--out={tmp_path / 'back'}") == 0
    assert_same_official(official_dir, tmp_path / "back")


def test_round_trip_bf16(official_dir, tmp_path):
    bf16_dir, ckpt, back = tmp_path / "bf16", tmp_path / "ckpt", tmp_path / "back"
    bf16_dir.mkdir()
    state = load_file(str(official_dir / "model.safetensors"))
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}, str(bf16_dir / "model.safetensors"))
    raw = json.loads((official_dir / "config.json").read_text())
    raw["torch_dtype"] = raw["language_config"]["torch_dtype"] = "bfloat16"
    (bf16_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")

    assert run_cli("--to=jax", f"--torch_dir={bf16_dir}", f"--out={ckpt}", "--param_dtype=bfloat16") == 0
    config, params = checkpoint.load_params(ckpt)
    assert config.param_dtype == "bfloat16"
    assert_same_tree(params, convert.from_pytorch(bf16_dir, param_dtype="bfloat16")[1])
    assert run_cli("--to=torch", f"--ckpt={ckpt}", f"--out={back}") == 0
    assert_same_official(bf16_dir, back)


def test_damaged_dir_fails_cleanly(official_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text((official_dir / "config.json").read_text())
    state = load_file(str(official_dir / "model.safetensors"))
    removed = "language_model.model.layers.1.mlp.up_proj.weight"
    del state[removed]
    save_file(state, str(damaged / "model.safetensors"))

    out = tmp_path / "out" / "ckpt"
    assert run_cli("--to=jax", f"--torch_dir={damaged}", f"--out={out}") == 1
    err = capsys.readouterr().err
    assert removed in err and "missing tensors (1)" in err, err
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_truncated_weights_fail_cleanly(official_dir, tmp_path, capsys):
    """A cut-short download: one line naming the file, exit 1, no traceback, nothing written."""
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((official_dir / "config.json").read_text())
    weights = (official_dir / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) - 1000])
    out = tmp_path / "out"
    assert run_cli("--to=jax", f"--torch_dir={truncated}", f"--out={out}") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {truncated / 'model.safetensors'} is not a readable safetensors file"), err
    assert not out.exists()


def test_load_params_into_mesh(scanned_ckpt):
    mesh = make_mesh(2, 2, 2)
    config, params = checkpoint.load_params(scanned_ckpt, mesh=mesh)
    expected = param_shardings(config, mesh)
    flat, flat_expected = (traverse_util.flatten_dict(t, sep="/") for t in (params, expected))
    assert sorted(flat) == sorted(flat_expected)
    for key, value in flat.items():
        assert isinstance(value, jax.Array) and isinstance(value.sharding, NamedSharding), key
        assert value.sharding == flat_expected[key], key
    embed = flat["language_model/embed_tokens/embedding"]
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert embed.addressable_shards[0].data.shape == (embed.shape[0] // 2, embed.shape[1] // 2)
    _, host = checkpoint.load_params(scanned_ckpt)
    assert_same_tree(jax.device_get(params), host)


def test_saving_small_replicated_arrays_compiles_no_slices(scanned_ckpt, tmp_path, caplog):
    """Arrays replicated over the data axis are written whole by their first replica when a replica's slice would be
    small (`checkpoint.MIN_REPLICA_SLICE_BYTES`): orbax's replica-parallel saving would compile a slice program per
    device and shape at the first save (hundreds for the tiny model on 8 devices)."""
    import logging

    config, params = checkpoint.load_params(scanned_ckpt, mesh=make_mesh(2, 2, 2))
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        checkpoint.save_params(tmp_path / "again", config, params)
    assert not [r for r in caplog.records if "jit(slice)" in r.getMessage()]
    assert_same_tree(checkpoint.load_params(tmp_path / "again")[1], jax.device_get(params))


def test_module_entry_point_usage_error():
    proc = subprocess.run([sys.executable, "-m", "launch.convert", "--to=torch", "--out=/nonexistent/x"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "exactly one of --ckpt or --random_config" in proc.stderr
