"""launch.bench writes where it is told: a smoke run leaves the repository as it was (its report goes to runs/bench
under the current directory), and only --update_benchmarks rewrites a BENCHMARKS.md."""

import json
import subprocess
import sys

from tests.cli_helpers import repository_files, user_env


def _bench(cwd, *args):
    result = subprocess.run([sys.executable, "-m", "launch.bench", "data", "--config=stage2:tiny", "--steps=2",
                             "--warmup=0", *args], cwd=cwd, env=user_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def test_a_bench_smoke_leaves_the_repository_unchanged(tmp_path):
    before = repository_files()
    _bench(tmp_path)  # the defaults, as the docs run it
    assert repository_files() == before
    (report,) = (tmp_path / "runs" / "bench").glob("data_*.json")
    assert json.loads(report.read_text())["mode"] == "data"
    assert "examples/s" in report.with_suffix(".md").read_text()

    md = tmp_path / "BENCHMARKS.md"  # the explicit flag, aimed at a copy: only then is a section rewritten
    md.write_text("# Benchmarks\n\nsomeone else's section\n")
    _bench(tmp_path, f"--out_dir={tmp_path / 'elsewhere'}", "--update_benchmarks", f"--benchmarks_md={md}")
    assert "someone else's section" in md.read_text() and "<!-- bench:begin -->" in md.read_text()
    assert len(list((tmp_path / "benchmarks").glob("data_*.json"))) == 1
    assert len(list((tmp_path / "elsewhere").glob("data_*"))) == 2
    assert repository_files() == before
