"""Shared fixtures: isolated caches, one Prefect test server per session, built checkpoints."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# Isolate everything the code caches or Prefect stores, before anything imports prefect.
_SESSION_DIR = tempfile.mkdtemp(prefix="so8t-gguf-tests-")
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)  # 1-2 GB a session: work dirs, Prefect's DB
os.environ["SO8T_GGUF_CACHE"] = os.path.join(_SESSION_DIR, "cache")
os.environ["PREFECT_HOME"] = os.path.join(_SESSION_DIR, "prefect-home")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(_SESSION_DIR, "prefect-results")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# CLI runs without PREFECT_API_URL start the local Prefect API (flows/local_api.py) under the
# session's cache; it is stopped when the session ends, and goes by itself if the session is killed.
os.environ.setdefault("SO8T_GGUF_API_IDLE_SECONDS", "300")
# No evaluation by default (flows/params.py: EVAL_CHUNKS): the suite's many conversions of tiny
# fixtures would each pay for one; the evaluation's tests ask for it with eval_chunks.
os.environ["SO8T_EVAL_CHUNKS"] = "0"


# tmp_path_factory folders of session-scoped fixtures start with this; the others go with their module.
SESSION_TMP = "session-"


@pytest.fixture(scope="module", autouse=True)
def _module_temp_folders_removed(request, tmp_path_factory):
    """The folders a module's fixtures made (tmp_path_factory.mktemp: converted models, releases)
    are removed when the module is done, unless one of its tests failed: the suite writes tens of
    GB of models, more than a CI machine's disk may hold at once."""
    base = tmp_path_factory.getbasetemp()
    before = set(os.listdir(base))
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for name in set(os.listdir(base)) - before:
            if not name.startswith(SESSION_TMP):
                shutil.rmtree(base / name, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _stop_local_prefect_api():
    yield
    from flows.local_api import stop

    stop()


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API for the whole session (flow tests use it)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_checkpoint() -> str:
    """The embedded demo checkpoint, where `convert` with no source builds it (once)."""
    from flows.convert import demo_source

    return demo_source()


@pytest.fixture(scope="session")
def make_fixture(tmp_path_factory):
    """Build (once per distinct spec) a tiny random SO8T checkpoint."""
    from so8t_core.testing.fixtures import FixtureSpec, build_fixture

    built: dict = {}

    def make(**kwargs) -> str:
        spec = FixtureSpec(**kwargs)
        key = repr(spec)
        if key not in built:
            built[key] = build_fixture(str(tmp_path_factory.mktemp(SESSION_TMP + "fixture") / "ckpt"), spec)
        return built[key]

    return make


@pytest.fixture
def f32_validation_fails(monkeypatch) -> None:
    """The F32 validation gate set so that no file can pass it (a mean KLD below -1)."""
    from so8t_core.validate import checks as validation

    monkeypatch.setitem(validation.GATES, "F32", validation.Gate(max_mean_kld=-1.0, min_top1=1.0,
                                                                 max_relative_rmse=0.0))


@pytest.fixture
def quantize_calls(monkeypatch) -> list[str]:
    """The GGUF names of the tensors quantized in this process, in order: staged tensors found
    by a re-run, and work done on Dask workers, do not show here."""
    import tasks.quantize

    seen: list[str] = []
    real = tasks.quantize.stage_tensor

    def counting(ckpt, item, *a, **kw):
        seen.append(item.gguf_name)
        return real(ckpt, item, *a, **kw)

    monkeypatch.setattr(tasks.quantize, "stage_tensor", counting)
    return seen


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on loopback (moto's server); s3fs finds it through AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing-key-id",
                      AWS_SECRET_ACCESS_KEY="testing-secret", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()


@pytest.fixture(params=["local", "s3"])
def dest(request, tmp_path):
    """A publishing destination: a local folder, and a fresh bucket on the S3 endpoint."""
    if request.param == "local":
        return str(tmp_path / "releases")
    request.getfixturevalue("s3_endpoint")
    import uuid

    import boto3

    bucket = f"pub-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/models"
