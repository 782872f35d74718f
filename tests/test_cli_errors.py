"""A newcomer's common mistakes each get one `error: ...` line that names what to change (no traceback, no page of
help), and `--config=help` / `launch.train --help` list the configs one line each. Every command runs as a user types
it, all at once in parallel processes (each fails before any compile)."""

import subprocess
import sys

import pytest

from tests.cli_helpers import ROOT, one_error_line, user_env

TRAIN = ("launch.train", "--config=stage2:tiny", "--workdir={tmp}/run")
MISTAKES = {  # name: (command, what the one line says)
    "unknown nested field": ((*TRAIN, "--config.optimizer.learning_rate=3e-5"),
                             ["--config.optimizer.learning_rate", "config.optimizer has no field 'learning_rate'",
                              "did you mean config.optimizer.lr?"]),
    "top-level typo": ((*TRAIN, "--config.batchsize=4"),
                       ["--config.batchsize", "config has no field 'batchsize'", "did you mean config.batch_size?"]),
    "field under a value": ((*TRAIN, "--config.steps.total=4"), ["config.steps is a value, not a group"]),
    "workdir is a file": (("launch.train", "--config=stage2:tiny", "--workdir={tmp}/a_file"),
                          ["--workdir=", "a_file is a file; give a directory"]),
    "empty prompt": (("launch.generate", "--checkpoint={tmp}/run", '--prompt=', "--out={tmp}/out"),
                     ["--prompt is empty"]),
    "bad variant": (("launch.train", "--config=stage2:tinyy", "--workdir={tmp}/run"),
                    ["--config=stage2:tinyy: unknown config variant 'tinyy'", "':tiny'"]),
    "bad config name": (("launch.train", "--config=stag2", "--workdir={tmp}/run"),
                        ["no config 'stag2'", "did you mean 'stage2'?"]),
    "missing workdir": (("launch.train", "--config=stage2:tiny"), ["--config and --workdir are required"]),
    "bench to a missing bucket": (("launch.bench", "data", "--config=stage2:tiny", "--out_dir=gs://no-such-bucket/b"),
                                  ["gs://no-such-bucket does not exist", "gcloud storage buckets create"]),
}
LISTINGS = {"config=help": ("launch.train", "--config=help"), "train --help": ("launch.train", "--help")}


@pytest.fixture(scope="module")
def results(gcs, tmp_path_factory):  # gcs: gs:// paths reach the emulator (inherited by the processes)
    tmp = tmp_path_factory.mktemp("mistakes")
    (tmp / "a_file").write_text("not a directory\n")
    commands = {**{k: c for k, (c, _) in MISTAKES.items()}, **LISTINGS}
    procs = {name: subprocess.Popen([sys.executable, "-m", *(a.format(tmp=tmp) for a in cmd)], cwd=tmp,
                                    env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = (p.returncode, stdout, stderr)
    assert not (tmp / "run").exists()  # no mistake leaves a half-made run behind
    return out


@pytest.mark.parametrize("name", list(MISTAKES))
def test_each_mistake_is_one_line(results, name):
    returncode, stdout, stderr = results[name]
    assert returncode != 0
    line = one_error_line(stderr)
    assert len(stderr.strip().splitlines()) == 1, stderr  # the line alone: no help printed above it
    for part in MISTAKES[name][1]:
        assert part in line, line
    assert "Traceback" not in stdout


def test_the_configs_are_listed_one_line_each(results):
    names = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.stem.startswith("_"))
    for key in LISTINGS:
        returncode, stdout, stderr = results[key]
        assert "Traceback" not in stderr and stdout, stderr  # (absl's --help exits with status 1)
        listed = [line.split()[0] for line in stdout.splitlines() if line.startswith("  ") and len(line.split()) > 1
                  and line.split()[0] in names]
        assert listed == names, stdout
    assert "stage2                Stage 2, unified pre-training" in results["config=help"][1]
