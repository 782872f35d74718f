"""Test setup: 8 fake CPU devices (set before JAX is imported anywhere), tiny configs, shared fixtures."""

import os

# 8 fake CPU devices for mesh tests. Backend optimisation level 0 halves XLA's CPU compile time, which dominates
# this suite of tiny models (it changes no numerics beyond summation order; parity bounds are 1e-4 relative).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

# One persistent compilation cache for the test run: this process, the xdist workers (they inherit the environment:
# made here, before they start) and every subprocess they start (`cli_helpers.user_env`). A program that several
# tests or launches compile (the pod files' one- and two-host steps, the tiny stage-2 step) is loaded after the
# first time, by every process of a multi-process launch too (`train/compilation_cache.py` gives CPU programs one key
# on every host: a warm 2-process stage2:tiny launch 36 s against 94 s cold). Its size is bounded, which makes jax
# lock the directory around each read and write: several processes use it at once.
SUITE_CACHE = "JANUSFLOW_TEST_JAX_CACHE"
_MADE_CACHE = SUITE_CACHE not in os.environ
if _MADE_CACHE:
    os.environ[SUITE_CACHE] = tempfile.mkdtemp(prefix="janusflow-test-jax-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ[SUITE_CACHE])
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(50 * 2**30))

import pytest  # noqa: E402

from janusflow_jax.models.config import JanusFlowConfig  # noqa: E402
from tests.pod_helpers import pod_dataset, pod_env, pod_inputs, pod_reference  # noqa: E402,F401 (session fixtures)

GCS_BUCKET = "janusflow-test"


# The test files that take longest (seconds summed over their tests, `--durations=0` of a full run on 2 cores, most
# first). pytest-xdist deals whole files to its workers in collection order (`--dist loadfile`; its default order is
# by test count, which put the 3-test pod chains late); started first, a long file cannot be the one that runs alone
# at the end while the other workers idle.
LONGEST_FIRST = ("test_pod.py", "test_docs.py", "test_pod_start.py", "test_digits.py", "test_pod_faults.py",
                 "test_train_cli.py", "test_train_step.py", "test_train_eval.py", "test_bench.py", "test_ssd_pallas.py",
                 "test_next_token.py", "test_omnimamba_train.py", "test_race.py", "test_omnimamba_digits.py",
                 "test_omnimamba.py", "test_mamba2.py", "test_omnimamba_inference.py", "test_omnimamba_configs.py",
                 "test_mixture.py", "test_evaluate.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a multi-process or whole-run scenario (the fast tier: -m 'not slow')")
    if hasattr(config.option, "loadscopereorder"):  # xdist's own order (files by test count) would undo ours
        config.option.loadscopereorder = False


def pytest_unconfigure(config):
    if _MADE_CACHE:
        shutil.rmtree(os.environ[SUITE_CACHE], ignore_errors=True)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture
def tiny_config() -> JanusFlowConfig:
    from configs import tiny

    return JanusFlowConfig.from_dict(tiny.get_config().model.to_dict())


def pytest_terminal_summary(terminalreporter):
    """The parity tests' measured errors (test_parity.py attaches them to each test's report), one line each."""
    errors: dict[str, float] = {}
    reports = [r for group in terminalreporter.stats.values() for r in group]  # teardown reports carry them
    for report in reports:
        for key, value in getattr(report, "user_properties", ()) or ():
            if key == "parity_errors":
                for name, err in value.items():
                    errors[name] = max(err, errors.get(name, 0.0))
    if errors:
        terminalreporter.section("JanusFlow vs PyTorch reference (max|jax-torch| / max|torch|)")
        for name, err in errors.items():
            terminalreporter.write_line(f"  {name:<52s} {err:.2e}")


# gcp-storage-emulator with one fidelity fix: GCS sends an object's generation with its bytes (x-goog-generation);
# the emulator does not, and tensorstore then fails to read an OCDBT manifest ("Malformed StorageGeneration", seen in
# every asynchronous orbax save after jax.distributed.initialize). The header is added to each download response.
_EMULATOR = """
import sys
from http import HTTPStatus
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])


objects.download = download


# A bucket whose name ends in "-readonly" refuses every upload with 403, as GCS does for an account without write
# access (tests of the write-access check).
def _refusing(handler):
    def refuse(request, response, storage, *args, **kwargs):
        if request.params.get("bucket_name", "").endswith("-readonly"):
            response.status = HTTPStatus.FORBIDDEN
            response.json({"error": {"code": 403, "message": "the account may not create objects in this bucket"}})
            return None
        return handler(request, response, storage, *args, **kwargs)

    return refuse


for _name in ("insert", "upload_partial", "xml_upload", "copy", "rewrite", "compose"):
    setattr(objects, _name, _refusing(getattr(objects, _name)))
from gcp_storage_emulator.__main__ import main  # noqa: E402  (builds its routes from the patched module)

sys.exit(main())
"""


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A GCS emulator (gcp-storage-emulator, in memory) in its own process on a free localhost port, bucket GCS_BUCKET,
    with every client of the stack pointed at it through the environment (inherited by subprocesses). Yields
    "gs://GCS_BUCKET". Measured: tensorstore (orbax) hangs without TENSORSTORE_GCS_HTTP_URL and when the emulator
    runs inside the test process; gcsfs (etils.epath) and google-cloud-storage (tensorboardX) read
    STORAGE_EMULATOR_HOST; array_record's reader hangs without CLOUD_STORAGE_EMULATOR_ENDPOINT;
    GOOGLE_AUTH_TOKEN_FOR_TESTING skips tensorstore's credential lookup; gcsfs's bucket-type probe (a storage-control
    call the emulator lacks) is switched off. The emulator answers a rename with 501 (gcsfs then retries ~34 s): the
    code under test never renames on gs://."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("gcs_emulator") / "log.txt"  # a file, not a pipe: nobody reads it while it runs
    with open(log, "wb") as sink:
        server = subprocess.Popen([sys.executable, "-c", _EMULATOR, "start", "--host=127.0.0.1", f"--port={port}",
                                   "--in-memory", f"--default-bucket={GCS_BUCKET}", "-q"],
                                  stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the GCS emulator did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    env = dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, CLOUD_STORAGE_EMULATOR_ENDPOINT=url,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator", GOOGLE_CLOUD_PROJECT="test",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield f"gs://{GCS_BUCKET}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.kill()
        server.wait()
