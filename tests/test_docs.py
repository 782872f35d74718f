"""Every command in README.md and docs/*.md runs as written, or says why not.

Each ```bash block runs in one temporary working directory shared by all of them, in page order (README.md first,
then docs/*.md by name), as a user would type them one after another: the README's first run leaves the checkpoints
that later pages generate from, and a repeated training command resumes instead of training again. The only changes
are the visible `SUBSTITUTIONS` below (fewer steps, one block per tower: the commands are what is tested, not the
depth). A block whose fence is preceded by `<!-- skip: <reason> -->` is not run; the reason says what it needs (a
download, a TPU, a GPU, minutes of compiling) and the test prints it. The repository itself is never written.
"""

from __future__ import annotations

import re
import resource
import subprocess
import time

import jax
import pytest

from tests.cli_helpers import ROOT, repository_files, user_env

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"^<!-- skip: (.*\S) -->$")
ONE_BLOCK = ("--config.model.llm.num_layers=1 --config.model.und_encoder.depth=1 --config.model.repa.layer=1 "
             "--config.model.gen_encoder.num_blocks=1 --config.model.gen_decoder.num_blocks=1")
# What the test changes in a page's commands (text as written -> text as run), applied in this order.
SUBSTITUTIONS = {
    "--config=stage2:tiny": f"--config=stage2:tiny --config.steps=2 {ONE_BLOCK}",  # one mixture phase, one compile
    "--config=omnimamba_stage2:tiny": ("--config=omnimamba_stage2:tiny --config.steps=2 "
                                       "--config.optimizer.warmup_steps=1"),
    "--max_new_tokens=16": "--max_new_tokens=4",
}


def blocks(page) -> list[tuple[str, int, str | None, str]]:
    """(page name, line of the fence, skip reason or None, text) of every ```bash block of `page`."""
    lines = page.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip() != "```bash":
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        skip = SKIP.match(lines[i - 1].strip()) if i else None
        found.append((page.relative_to(ROOT).as_posix(), i + 1, skip.group(1) if skip else None,
                      "\n".join(lines[i + 1:end]) + "\n"))
    return found


BLOCKS = [b for page in PAGES for b in blocks(page)]
RUN = [b for b in BLOCKS if b[2] is None]


def as_run(text: str) -> str:
    for written, run in SUBSTITUTIONS.items():
        text = text.replace(written, run)
    return text


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs every block not marked skip, in order, in one fresh directory; (returncode, output tail, seconds) each."""
    cwd = tmp_path_factory.mktemp("user")
    env = user_env()
    before, out = repository_files(), {}
    cpu = []
    for page, line, _, text in RUN:
        start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", as_run(text)], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=900)
        out[page, line] = (proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime)
    print("\n".join(f"{page}:{line}: rc {rc}, {seconds:.0f} s, {c:.0f} s CPU"
                    for ((page, line), (rc, _, seconds)), c in zip(out.items(), cpu)))
    print("\n".join(f"skipped {page}:{line}: {reason}" for page, line, reason, _ in BLOCKS if reason))
    assert repository_files() == before, "a documented command wrote into the repository"
    return out


@pytest.mark.parametrize("block", RUN, ids=[f"{page}:{line}" for page, line, _, _ in RUN])
@pytest.mark.slow  # every page's commands, both families' first runs
def test_block_runs(results, block):
    page, line, _, text = block
    returncode, output, _ = results[page, line]
    assert returncode == 0, f"{page}:{line} failed:\n{as_run(text)}\n---\n{output[-4000:]}"


def test_every_marker_is_a_reason_before_a_block():
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("<!-- skip"):
                assert SKIP.match(line.strip()), f"{page.name}:{i + 1}: write it as <!-- skip: <reason> -->"
                assert i + 1 < len(lines) and lines[i + 1].strip() == "```bash", \
                    f"{page.name}:{i + 1}: a skip marker goes on the line right above a ```bash fence"
    assert RUN and len(RUN) < len(BLOCKS)


@pytest.mark.slow  # every page's commands, both families' first runs
def test_the_first_run_generates_and_chats_for_both_families(results):
    """The README's download-free first run ends in images and answers (no dead end), for both families; it says
    when it compiles and what its loss is, and the same command again says the run is finished."""
    readme = [(page, line) for page, line, _, text in RUN if page == "README.md" and "launch.chat" in text]
    assert len(readme) == 2 and all(results[key][0] == 0 for key in readme)
    janusflow = results[readme[0]][1]
    assert "compiling the train step for mixture phase 0, batch composition 1 of 1" in janusflow
    assert "compiled 1 step program in" in janusflow and "the reweighted total of (ar " in janusflow
    assert "wrote 2 images and grid.png to runs/samples_tiny" in janusflow
    again = [results[page, line][1] for page, line, _, text in RUN
             if page in ("docs/training.md", "docs/omnimamba.md") and "launch.train" in text]
    assert len(again) == 2 and all("already finished at step 2" in o and "final loss" not in o for o in again)


def test_ci_runs_the_readme_test_command():
    """The README's one-line test command (install the test extra, run pytest) is what CI does."""
    line = next(line for _, _, _, text in BLOCKS for line in text.splitlines() if "python -m pytest tests " in line)
    install, _, test_command = line.partition(" && ")
    assert install == 'pip install -e ".[test]"'
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    assert '-e ".[test]"' in ci


def test_compute_both_paths_example(tmp_path, tiny_config):
    """docs/inference.md's Python example runs on a tiny checkpoint in place of the release."""
    from janusflow_jax import init_params
    from janusflow_jax.convert import janusflow as convert

    text = (ROOT / "docs" / "inference.md").read_text()
    checkpoint = tmp_path / "janusflow_tiny"
    convert.to_pytorch(tiny_config, init_params(tiny_config, jax.random.key(0)), checkpoint)
    example = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "method=JanusFlow.velocity" in b)
    namespace = {}
    exec(example.replace("runs/janusflow_tiny", str(checkpoint)), namespace)  # noqa: S102
    cfg = namespace["config"]
    assert namespace["logits"].shape == (1, namespace["seq"], cfg.llm.vocab_size)
    assert namespace["v"].shape == (2, cfg.latent_size, cfg.latent_size, 4)
