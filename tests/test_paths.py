"""User paths are resolved once where they enter: local ones against the current directory, remote ones unchanged."""

import os

import ml_collections

from janusflow_jax import paths


def test_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.resolve("runs/digits") == str(tmp_path / "runs" / "digits")
    assert paths.resolve("../x") == str(tmp_path.parent / "x")
    assert paths.resolve("/abs/dir") == "/abs/dir"
    assert paths.resolve("~/ckpt") == os.path.join(os.path.expanduser("~"), "ckpt")
    assert paths.resolve("gs://bucket/runs/stage2") == "gs://bucket/runs/stage2"  # no collapse of "//"
    assert paths.resolve("") == "" and paths.resolve_optional(None) is None
    assert os.fspath(paths.user_path("runs")) == str(tmp_path / "runs")


def test_config_path_fields(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ml_collections.ConfigDict(dict(
        init=dict(kind="checkpoint", path="runs/stage1/checkpoints", llm_path="", siglip_path="gs://b/siglip"),
        data=dict(dir="data/prepared", workers=2),
        prepare=dict(out="out", tokenizer="tok", tfds=dict(data_dir="tfds", name="mnist"), latent=dict(vae_path="")),
    ))
    config.lock()
    paths.resolve_config_paths(config)
    assert config.init.path == str(tmp_path / "runs" / "stage1" / "checkpoints")
    assert config.init.llm_path == "" and config.init.siglip_path == "gs://b/siglip"
    assert config.data.dir == str(tmp_path / "data" / "prepared") and config.data.workers == 2
    assert config.prepare.out == str(tmp_path / "out") and config.prepare.tokenizer == str(tmp_path / "tok")
    assert config.prepare.tfds.data_dir == str(tmp_path / "tfds") and config.prepare.tfds.name == "mnist"
    assert config.prepare.latent.vae_path == ""
