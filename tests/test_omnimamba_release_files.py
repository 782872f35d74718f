"""The OmniMamba release directory as downloaded: the .pth without the VQ (as released: the release builds its VQ-16
from LlamaGen's `vq_ds16_t2i.pt` and loads the .pth with strict=False), the VQ read from `vq_ds16_t2i.pt` beside it
(LlamaGen's checkpoint layout: {"model": state dict, "args": argparse.Namespace, ...}); the older layout with the VQ
inside the .pth still reads the same parameters; with neither, one line naming the file to download. Both layouts are
built with the PyTorch references (reference/omnimamba_torch.py, reference/vq_torch.py) and timm."""

from __future__ import annotations

import argparse
import json
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from flax import traverse_util  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from janusflow_jax.convert import omnimamba_release as release  # noqa: E402
from janusflow_jax.data.omnimamba_processor import make_tokenizer  # noqa: E402
from launch import convert as convert_cli  # noqa: E402
from cli_helpers import one_error_line, run_cli  # noqa: E402
from test_cli_omnimamba import DINO, SIGLIP, SYSTEM, WORDS, reference_lm, reference_vq, timm_state  # noqa: E402


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """{"inside": VQ in the .pth, "beside": .pth without VQ + vq_ds16_t2i.pt, "neither": no VQ anywhere}."""
    root = tmp_path_factory.mktemp("layouts")
    model = reference_lm()
    vq_model = reference_vq()
    half = lambda state: {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}  # noqa
    lm_state, vq_state = half(model.state_dict()), half(vq_model.state_dict())
    dirs = {name: root / name for name in ("inside", "beside", "neither")}
    for name, path in dirs.items():
        path.mkdir()
        make_tokenizer(path, WORDS)
        save_file(timm_state(DINO, "vit_large_patch14_reg4_dinov2", seed=2), str(path / release.DINO_FILE))
        save_file(timm_state(SIGLIP, "vit_so400m_patch14_siglip_384", seed=3), str(path / release.SIGLIP_FILE))
        (path / release.CONFIG_FILE).write_text(json.dumps(SYSTEM.to_dict()))
        inside = {f"llm_backbone.vqvae.{k}": v for k, v in vq_state.items()} if name == "inside" else {}
        torch.save({**lm_state, **inside}, path / release.RELEASE_FILE)
    # LlamaGen's training checkpoint: the VQ under "model", beside the optimizer state and the pickled argparse args.
    torch.save({"model": vq_state, "optimizer": {"state": {}}, "steps": 10,
                "args": argparse.Namespace(vq_model="VQ-16")}, dirs["beside"] / release.VQ_FILE)
    return dirs


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


def test_the_vq_beside_the_pth_reads_as_the_vq_inside(layouts):
    config_in, inside = release.from_release_dir(layouts["inside"])
    config_beside, beside = release.from_release_dir(layouts["beside"])
    assert config_in == config_beside
    a, b = flat(inside), flat(beside)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes(), key


def test_no_vq_anywhere_is_one_line_naming_the_download(layouts, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"no VQ .*vq_ds16_t2i\.pt.*hf download peizesun/llamagen_t2i"):
        release.from_release_dir(layouts["neither"])
    assert run_cli(convert_cli, "--to=jax", f"--torch_dir={layouts['neither']}", f"--out={tmp_path / 'out'}") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "hf download peizesun/llamagen_t2i vq_ds16_t2i.pt" in line, line
    assert not (tmp_path / "out").exists()


def test_a_damaged_vq_file_is_one_line(layouts, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(layouts["beside"], damaged)
    data = (damaged / release.VQ_FILE).read_bytes()
    (damaged / release.VQ_FILE).write_bytes(data[: len(data) // 2])
    assert run_cli(convert_cli, "--to=jax", f"--torch_dir={damaged}", f"--out={tmp_path / 'out'}") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "vq_ds16_t2i.pt is not a readable LlamaGen VQ checkpoint" in line, line


def test_a_release_directory_on_gcs(layouts, gcs, tmp_path, monkeypatch):
    """gs:// like a local path: read (the VQ beside the .pth, the tokenizer), and written back."""
    from janusflow_jax import paths
    from janusflow_jax.convert import omnimamba as lm_convert
    from janusflow_jax.data.omnimamba_processor import OmniMambaProcessor

    monkeypatch.chdir(tmp_path)
    remote = f"{gcs}/release_files/beside"
    paths.copy_tree(layouts["beside"], remote)
    _, local = release.from_release_dir(layouts["beside"])
    config, params = release.from_release_dir(remote)
    a, b = flat(local), flat(params)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    processor = OmniMambaProcessor.from_pretrained(remote, caption_length=5)
    processor.save_pretrained(f"{gcs}/release_files/tokenizer")
    again = OmniMambaProcessor.from_pretrained(f"{gcs}/release_files/tokenizer")
    assert again.caption_length == 5 and again.token_ids == processor.token_ids
    release.write_release_dir(config, params, f"{gcs}/release_files/out", copy_from=remote)
    _, back = release.from_release_dir(f"{gcs}/release_files/out")
    c = flat(back)
    assert all(np.array_equal(a[k], c[k]) for k in a)
    lm_convert.to_release(config.lm, params["lm"], f"{gcs}/release_files/lm.pth")
    _, lm = lm_convert.from_release(f"{gcs}/release_files/lm.pth", config.lm)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(lm), jax.tree.leaves(params["lm"])))
    assert not list(tmp_path.iterdir())  # nothing written under the working directory (no ./gs:/...)
