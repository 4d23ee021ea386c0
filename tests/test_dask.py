"""The Dask runner: a local multi-process cluster and an existing cluster write the same bytes
as the thread pool; a bad scheduler address is one line and exit 2."""

import hashlib
import socket
import threading

import pytest
from support.cli import assert_one_line_error, run
from support.published import release

from flows.convert import convert
from flows.convert_model import convert_model
from flows.params import ConvertParams
from flows.runners import convert_with, task_runner
from so8t_core.errors import ClusterError, UnsupportedError

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]

QUANTS = ["Q4_K_M", "Q8_0"]
FIXTURE = dict(layers=2, hidden=256, heads=4, kv_heads=2, intermediate=512, shards=2, seed=53)
# 2 layers × 9 + embedding, output, output norm: 21 tensors, all under a million elements, that
# share quantize tasks (so8t_core.plan.quantize_batches) of about a million elements: 2 tasks.
N_QUANTIZE_TASKS = 2


def params(src, out, work) -> dict:
    return dict(source=src, output=str(out), quants=QUANTS, run_validation=False, work_dir=str(work), name="fx")


def release_files(out) -> dict[str, dict[str, str]]:
    """sha256 of every file of each quant's release."""
    return {q: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(release(out, "fx", q).iterdir())}
            for q in QUANTS}


def staged(work) -> list[str]:
    """Names of the staged tensor files (content addresses) in a work directory."""
    return sorted(p.name for p in (work / "tensors").rglob("*.bin"))


@pytest.fixture(scope="module")
def threads_run(make_fixture, tmp_path_factory):
    src = make_fixture(**FIXTURE)
    tmp = tmp_path_factory.mktemp("threads")
    convert(ConvertParams(**params(src, tmp / "out", tmp / "work")))
    return src, release_files(tmp / "out"), staged(tmp / "work")


def test_local_dask_cluster_writes_the_same_bytes_as_threads(threads_run, tmp_path, quantize_calls):
    src, expected, expected_staged = threads_run
    # A fresh work directory: nothing comes from staging or the task cache.
    convert_with(ConvertParams(runner="dask", **params(src, tmp_path / "out", tmp_path / "work")), max_workers=2)
    assert quantize_calls == []  # every tensor was quantized in the cluster's worker processes
    assert staged(tmp_path / "work") == expected_staged
    assert release_files(tmp_path / "out") == expected


def test_existing_cluster_by_address(threads_run, tmp_path):
    from distributed import LocalCluster

    src, expected, _ = threads_run
    # Workers in this process start fast; worker processes are what the test above exercises.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                      dashboard_address=":0") as cluster:
        # The convert deployment's flow: the runner and the address are fields of its form.
        convert_model(ConvertParams(runner="dask", dask_address=cluster.scheduler_address,
                                    **params(src, tmp_path / "out", tmp_path / "work")))
        ran = cluster.scheduler.task_prefixes
    assert release_files(tmp_path / "out") == expected
    # The cluster's scheduler computed every quantize task.
    assert {name: p.state_counts["memory"] for name, p in ran.items()} == {"quantize_tensors": N_QUANTIZE_TASKS}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def not_dask():
    """A TCP server that answers like an HTTP server, not a Dask scheduler."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_unreachable_dask_address_is_one_line_and_exit_2(make_fixture):
    address = f"tcp://127.0.0.1:{_closed_port()}"
    proc = run("convert", make_fixture(**FIXTURE), "--runner", "dask", "--dask-address", address, "--no-validate",
               timeout=120)
    assert_one_line_error(proc, f"--dask-address {address}: cannot reach the scheduler")


def test_what_is_not_a_dask_scheduler_is_refused(not_dask):
    for address, problem in ((not_dask, "is not a Dask scheduler"),
                             ("localhost:8786", "not a Dask scheduler address"),
                             ("inproc://x", "not a Dask scheduler address")):
        with pytest.raises(ClusterError, match=problem) as err:
            task_runner("dask", address)
        assert err.value.where == f"--dask-address {address}" and "\n" not in str(err.value)
    with pytest.raises(UnsupportedError, match="only applies to the dask runner"):
        task_runner("threads", not_dask)
