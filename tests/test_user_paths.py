"""Lint: a user path (local, relative or gs://) goes through `etils.epath` (janusflow_jax/paths.py), never through
`pathlib`, `open` or `os.path`, which would write `gs://b/x` under `./gs:/b/x` on this machine or fail to read it.

Every call of `open(...)`, `pathlib.Path(...)` / a name imported from pathlib, or `os.path.<fn>(...)` in the library,
the launchers and the examples must be listed below with the reason it never sees a user's remote path. A new call
fails this test: use `paths.user_path` / `epath.Path` (or `paths.local_copy`, `paths.reads_local`, `paths.upload_tree`
for libraries that read or write local files only), or add it here with its reason."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_OWN_FILE = "the repository's own files (configs, the package), never a user path"
_LOCAL_BRANCH = "the local branch of an `is_remote` test: gs:// takes the other branch"
_READS_LOCAL = "inside a `paths.reads_local` function: a gs:// argument arrives as a local temporary copy"
_STRING = "string arithmetic on a path (also right for gs://: no file-system call)"
_TEMP = "a local temporary directory or file (then uploaded, or read by a local-only library)"
_LOCAL_API = "a local-only API (tests, the digits example's local workdir): no command passes a user's gs:// path"

# (file, call as written): why it never sees a user's remote path.
ALLOWED = {
    ("janusflow_jax/paths.py", "os.path.abspath(os.path.expanduser(text))"): "resolves a local path (remote returned "
                                                                             "before)",
    ("janusflow_jax/paths.py", "os.path.expanduser(text)"): "resolves a local path (remote returned before)",
    ("janusflow_jax/paths.py", "pathlib.Path(path)"): _LOCAL_BRANCH,
    ("janusflow_jax/paths.py", "pathlib.Path(tmp)"): _TEMP,
    ("janusflow_jax/paths.py", "pathlib.Path(local)"): "upload_tree's local source directory",
    ("launch/config_cli.py", "Path(__file__)"): _OWN_FILE,
    ("launch/config_cli.py", "Path(spec.partition(':')[0])"): _STRING + " (a config name in an error message)",
    ("janusflow_jax/perf/report.py", "Path(__file__)"): _OWN_FILE,
    ("janusflow_jax/inference/starter_files.py", "Path(tmp)"): _TEMP,
    ("launch/prepare_data.py", "Path(__file__)"): _OWN_FILE,
    ("launch/convert.py", "Path(out)"): _LOCAL_BRANCH,
    ("launch/evaluate.py", "os.path.splitext(predictions)"): _STRING,
    ("janusflow_jax/convert/janusflow.py", "Path(path)"): _READS_LOCAL,
    ("janusflow_jax/convert/janusflow.py", "Path(out_dir)"): _LOCAL_BRANCH,
    ("janusflow_jax/convert/vae.py", "Path(path)"): _READS_LOCAL,
    ("janusflow_jax/convert/vae.py", "Path(out_dir)"): _LOCAL_BRANCH,
    ("janusflow_jax/convert/tensors.py", "Path(path)"): "StateDict: its callers pass a local copy (reads_local)",
    ("janusflow_jax/convert/tensors.py", "Path(tmp)"): _TEMP,
    ("janusflow_jax/convert/tensors.py", "Path(out_dir)"): _LOCAL_BRANCH,
    ("janusflow_jax/convert/tensors.py",
     'Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))'): _LOCAL_BRANCH,
    ("janusflow_jax/data/prepare.py", 'open(path, "rb")'): "_sync: fsyncs a local temporary file before its rename "
                                                          "(gs:// writes whole objects instead)",
    ("janusflow_jax/data/prepare.py", "os.path.dirname(paths.resolve(self.path))"): _STRING,
    ("janusflow_jax/data/prepare.py", "os.path.isabs(value)"): _STRING,
    ("janusflow_jax/data/prepare.py", "os.path.join(self.image_root, value)"): _STRING,
    ("janusflow_jax/data/prepare.py", "Path(scratch, path.name)"): _TEMP,
    ("janusflow_jax/data/processor.py", "Path(tmp)"): _TEMP,
    ("janusflow_jax/data/processor.py", "Path(path)"): _LOCAL_BRANCH,
    ("janusflow_jax/data/processor.py", "Path(out_dir)"): _LOCAL_API,
    ("janusflow_jax/perf/profile.py", "Path(log_dir)"): _LOCAL_BRANCH + " (jax.profiler writes local files only)",
    ("janusflow_jax/perf/profile.py", "Path(new[-1])"): _LOCAL_BRANCH,
    ("examples/digits/pipeline.py", "Path(workdir)"): "local_workdir: refuses a gs:// workdir in one line first",
    ("examples/digits/pipeline.py", "Path(images_dir)"): "the digits example's local images (its workdir is local)",
    ("examples/digits/omnimamba.py", 'Path(summary["image_tokenizer"]["path"])'): "inside the local digits workdir",
    ("examples/digits/omnimamba.py", "Path(stage_dir)"): "inside the local digits workdir",
    ("janusflow_jax/convert/omnimamba.py", "os.path.join(tmp, path.name)"): _TEMP,
    ("janusflow_jax/eval/formats.py", 'open(os.fspath(path), "r", encoding="utf-8", newline="")'): _LOCAL_BRANCH,
    ("janusflow_jax/eval/dpg.py", 'os.path.basename(m["path"])'): _STRING + " (an image name in DPG's detail file)",
    ("launch/evaluate.py", "os.path.splitext(os.fspath(detail))"): _STRING,
    ("janusflow_jax/eval/answering.py", "os.path.dirname(os.fspath(data))"): _STRING,
    ("janusflow_jax/eval/answering.py", "os.path.isabs(value)"): _STRING,
    ("janusflow_jax/eval/answering.py", "os.path.join(image_root, value)"): _STRING,
    ("janusflow_jax/eval/formats.py", "os.path.isabs(text)"): _STRING,
    ("janusflow_jax/eval/formats.py", "os.path.join(os.getcwd(), text)"): _STRING,
    ("janusflow_jax/eval/generation.py", "os.path.join(folder, name)"): _STRING,
}


def file_calls(path: Path) -> list[tuple[int, str]]:
    """(line, call as written) of every open(...), pathlib Path(...) and os.path.<fn>(...) call in one file."""
    source = path.read_text()
    tree = ast.parse(source)
    from_pathlib = {a.asname or a.name for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.module == "pathlib" for a in n.names}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        bare = isinstance(fn, ast.Name) and (fn.id == "open" or fn.id in from_pathlib)
        pathlib_attr = isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and fn.value.id == "pathlib"
        os_path = (isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Attribute) and fn.value.attr == "path"
                   and isinstance(fn.value.value, ast.Name) and fn.value.value.id == "os")
        if bare or pathlib_attr or os_path:
            found.append((node.lineno, ast.get_source_segment(source, node)))
    return found


def calls() -> dict[tuple[str, str], list[int]]:
    files = sorted([*ROOT.glob("janusflow_jax/**/*.py"), *ROOT.glob("launch/*.py"), *ROOT.glob("examples/**/*.py")])
    out: dict[tuple[str, str], list[int]] = {}
    for path in files:
        for line, text in file_calls(path):
            out.setdefault((path.relative_to(ROOT).as_posix(), text), []).append(line)
    return out


def test_no_user_path_reaches_pathlib_open_or_os_path():
    found = calls()
    new = [f"{file}:{lines[0]}: {text}" for (file, text), lines in sorted(found.items())
           if (file, text) not in ALLOWED]
    assert not new, ("a path reaches pathlib / open / os.path; use etils.epath (janusflow_jax/paths.py) or list it "
                     "in tests/test_user_paths.py with the reason it is never a user's gs:// path:\n"
                     + "\n".join(new))
    stale = sorted(set(ALLOWED) - set(found))
    assert not stale, f"allowed calls that no longer occur (remove them from the list): {stale}"


def test_the_lint_sees_each_kind_of_call(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nimport pathlib\nfrom pathlib import Path as P\n"
                      "def f(x):\n    open(x)\n    P(x)\n    pathlib.Path(x)\n    os.path.join(x, 'a')\n"
                      "    x.open()\n")
    assert [t for _, t in file_calls(sample)] == ["open(x)", "P(x)", "pathlib.Path(x)", "os.path.join(x, 'a')"]


def test_a_figure_is_saved_to_gcs(gcs):
    """matplotlib writes local files only: `paths.save_figure` (the race plot, the digits grids) renders in memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from etils import epath

    from janusflow_jax import paths

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    paths.save_figure(fig, f"{gcs}/figures/race.png", dpi=50)
    plt.close(fig)
    assert epath.Path(f"{gcs}/figures/race.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
