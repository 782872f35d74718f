"""launch.bench writes where it is told: a smoke run leaves the repository as it was (its report goes to runs/bench
under the current directory, or to a gs:// --out_dir with nothing local), and only --update_benchmarks rewrites a
BENCHMARKS.md."""

import json
import subprocess
import sys

from tests.cli_helpers import repository_files, user_env
from tests.pod_helpers import _objects


def _bench(cwd, *args):
    result = subprocess.run([sys.executable, "-m", "launch.bench", "data", "--config=stage2:tiny", "--steps=2",
                             "--warmup=0", *args], cwd=cwd, env=user_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def test_a_bench_smoke_leaves_the_repository_unchanged(gcs, tmp_path):
    before = repository_files()
    _bench(tmp_path)  # the defaults, as the docs run it
    assert repository_files() == before
    (report,) = (tmp_path / "runs" / "bench").glob("data_*.json")
    assert json.loads(report.read_text())["mode"] == "data"
    assert "examples/s" in report.with_suffix(".md").read_text()

    md = tmp_path / "BENCHMARKS.md"  # the explicit flag, aimed at a copy: only then is a section rewritten
    md.write_text("# Benchmarks\n\nsomeone else's section\n")
    cwd = tmp_path / "elsewhere"  # the report to gs://: nothing under the working directory
    cwd.mkdir()
    _bench(cwd, f"--out_dir={gcs}/bench", "--update_benchmarks", f"--benchmarks_md={md}")
    assert "someone else's section" in md.read_text() and "<!-- bench:begin -->" in md.read_text()
    assert len(list((tmp_path / "benchmarks").glob("data_*.json"))) == 1
    saved = _objects(f"{gcs}/bench")
    assert [name.rsplit(".", 1)[1] for name in saved] == ["json", "md"] and saved[0].startswith("data_"), saved
    assert list(cwd.iterdir()) == [] and repository_files() == before
