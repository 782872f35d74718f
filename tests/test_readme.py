"""The README's commands work as written: its test command is CI's, and its Python example runs."""

import pathlib
import re

import jax

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    """The README's one-line test command (install the test extra, run pytest) is what CI does."""
    line = next(line for block in _blocks("bash") for line in block.splitlines() if "python -m pytest" in line)
    install, _, test_command = line.partition(" && ")
    assert install == 'pip install -e ".[test]"'
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    assert '-e ".[test]"' in ci


def test_compute_both_paths_example(tmp_path, tiny_config):
    from janusflow_jax import init_params
    from janusflow_jax.convert import janusflow as convert

    checkpoint = tmp_path / "janusflow_tiny"
    convert.to_pytorch(tiny_config, init_params(tiny_config, jax.random.key(0)), checkpoint)
    example = next(block for block in _blocks("python") if "method=JanusFlow.velocity" in block)
    namespace = {}
    exec(example.replace("/tmp/janusflow_tiny", str(checkpoint)), namespace)  # noqa: S102
    cfg = namespace["config"]
    assert namespace["logits"].shape == (1, namespace["seq"], cfg.llm.vocab_size)
    assert namespace["v"].shape == (2, cfg.latent_size, cfg.latent_size, 4)
