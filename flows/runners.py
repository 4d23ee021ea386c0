"""Where the per-tensor quantize tasks run: a thread pool (the default) or a Dask cluster.

A Prefect flow's task runner is fixed when the flow run starts, so the choice is made by
the caller, not by a flow parameter::

    from flows.convert import convert
    from flows.runners import task_runner

    convert.with_options(task_runner=task_runner("dask"))(ConvertParams(source=..., quants=[...]))
    convert.with_options(task_runner=task_runner("dask", "tcp://scheduler:8786"))(...)

or with :func:`convert_with`, which reads the runner and the scheduler address from the
parameters, as the CLI and the ``convert`` deployment's flow (``flows/convert_model.py``) do. Only
the quantize tasks are submitted to the runner; fetch, analyze, assemble, validate and
publish run in the flow's own process.

On a cluster every worker must import this project (same code, same Python packages), read
the source and write the work directory at the same path as the flow (a shared file system
such as NFS for several machines), reach the Prefect API, and have the same credentials for
object storage (``AWS_*``). See docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from typing import Any, Iterator

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.params import RUNNERS
from so8t_core.errors import ClusterError, UnsupportedError

CONNECT_TIMEOUT_S = 10  # reaching the scheduler
WORKERS_TIMEOUT_S = 30  # a scheduler with no worker yet: how long to wait for one


def local_cluster_kwargs(cpus: int | None = None) -> dict[str, Any]:
    """A local cluster sized to the machine: worker processes × threads = the CPUs.

    Dask's own split (one single-threaded process per CPU up to 4 CPUs, e.g. 2 × 1 on 2
    cores; 8 processes × 4 threads on 32). Each worker thread runs one quantize task whose
    quantizer uses one thread, so the CPUs are busy and not oversubscribed. The dashboard
    gets a free port (logged with -v), so runs side by side do not collide.
    """
    from distributed.deploy.utils import nprocesses_nthreads

    processes, threads = nprocesses_nthreads(cpus or os.cpu_count() or 2)
    return {"n_workers": processes, "threads_per_worker": threads, "processes": True, "dashboard_address": ":0"}


def task_runner(runner: str = "threads", address: str | None = None, max_workers: int | None = None) -> TaskRunner:
    """The task runner for ``convert``.

    ``threads``: a thread pool of ``max_workers`` (default: the CPUs). ``dask`` with an
    ``address`` (``tcp://host:8786``): an existing cluster, checked here (reachable, at least
    one worker) so a bad address fails in seconds with one line. ``dask`` without: a local
    multi-process cluster (``max_workers`` single-threaded worker processes, default sized
    to the machine), started when the flow run starts and closed when it ends.
    """
    if runner not in RUNNERS:
        raise UnsupportedError("--runner", f"unknown runner {runner!r}", f"use one of: {', '.join(RUNNERS)}")
    if runner == "threads":
        if address:
            raise UnsupportedError("--dask-address", "only applies to the dask runner", "add --runner dask")
        return ThreadPoolTaskRunner(max_workers=max_workers or os.cpu_count() or 2)
    from prefect_dask import DaskTaskRunner

    if address:
        hosts = check_scheduler(address)
        if not _api_url_set() and not hosts <= _this_host():
            raise ClusterError(f"--dask-address {address}",
                               "workers on other machines need a Prefect server they can reach",
                               "run `prefect server start --host 0.0.0.0` and set PREFECT_API_URL=http://<host>:4200/api"
                               " for the flow and the workers")
        return DaskTaskRunner(address=address)
    kwargs = local_cluster_kwargs()
    if max_workers:
        kwargs.update(n_workers=max_workers, threads_per_worker=1)
    return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs=kwargs)


def local_cluster(**kwargs: Any):
    """``distributed.LocalCluster(**kwargs)``, with two of Dask's process defaults undone.

    Dask's nannies start workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which makes glibc
    map and fault in fresh pages for every row chunk: quantizing is about 1.5× slower in
    such a worker (measured, docs/scaling.md). And they set their variables (that one,
    ``OMP_NUM_THREADS=1``, ...) in the parent's ``os.environ`` for good, which would leave
    the flow's own later work (validation's PyTorch reference) single-threaded. Workers
    here keep glibc's defaults and one BLAS thread each; the flow's environment is restored.
    """
    import dask
    from distributed import LocalCluster

    before = dict(os.environ)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            return LocalCluster(**kwargs)
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update({k: v for k, v in before.items() if os.environ.get(k) != v})


def check_scheduler(address: str) -> set[str]:
    """The hosts of the workers of the Dask scheduler at ``address``; a one-line
    ClusterError if it cannot be reached, is not a Dask scheduler, or has no worker."""
    from distributed.comm import get_address_host, parse_address
    from distributed.comm.addressing import parse_host_port

    where = f"--dask-address {address}"
    hint = ("start one with `dask scheduler` and `dask worker <address>`, "
            "or leave out --dask-address for a local cluster")
    try:
        scheme, location = parse_address(address, strict=True)
        if scheme == "tcp":
            host, port = parse_host_port(location)
        elif scheme not in ("tls", "ws", "wss", "ucx"):
            raise ValueError(f"{scheme}:// cannot reach another process")
    except (ValueError, TypeError) as exc:
        raise ClusterError(where, f"not a Dask scheduler address ({exc})", "e.g. tcp://scheduler-host:8786") from None
    if scheme == "tcp":  # a refused or unroutable address fails fast, without Dask's retries
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise ClusterError(where, f"cannot reach the scheduler ({exc.strerror or exc})", hint) from None
    try:
        workers = _in_thread(_scheduler_workers(address))
    except NoWorkers:
        raise ClusterError(where, f"the scheduler has no workers (waited {WORKERS_TIMEOUT_S} s)",
                           f"start some with `dask worker {address}`") from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise ClusterError(where, f"no Dask scheduler answers there ({type(exc).__name__}: {exc})", hint) from None
    except Exception as exc:  # something that does not speak Dask's protocol
        raise ClusterError(where, f"what answers there is not a Dask scheduler ({type(exc).__name__}: "
                                  f"{str(exc)[:120]})", hint) from None
    return {get_address_host(w) for w in workers}


class NoWorkers(Exception):
    pass


async def _scheduler_workers(address: str) -> list[str]:
    """The scheduler's worker addresses, once there is at least one (NoWorkers if none comes)."""
    from distributed.core import rpc
    from distributed.security import Security

    connection_args = Security().get_connection_args("client")  # TLS settings from Dask's config
    async with rpc(address, timeout=CONNECT_TIMEOUT_S, connection_args=connection_args) as scheduler:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WORKERS_TIMEOUT_S
        while True:
            info = await asyncio.wait_for(scheduler.identity(), CONNECT_TIMEOUT_S)
            if info.get("type") != "Scheduler":
                raise ValueError(f"a {info.get('type')} answers, not a scheduler")
            if info["workers"]:
                return list(info["workers"])
            if loop.time() > deadline:
                raise NoWorkers
            await asyncio.sleep(0.5)


def _in_thread(coro):
    """Run a coroutine to completion on a fresh event loop in its own thread (the caller may
    be inside one already)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _this_host() -> set[str]:
    names = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    with contextlib.suppress(OSError):
        names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    return names


def _api_url_set() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


@contextlib.contextmanager
def api_for_workers() -> Iterator[None]:
    """Make Dask workers report to the flow's Prefect API.

    With no ``PREFECT_API_URL``, Prefect starts a temporary API inside each process that
    needs one: every worker process would start its own (about 6 s each, all on one SQLite
    file). Here the flow's temporary API is started first and its URL set for the run, so
    the workers (which get the flow's settings with each task) use it too. Only workers on
    this machine can reach it (it listens on 127.0.0.1). With ``PREFECT_API_URL`` set,
    nothing changes.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    if _api_url_set() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process's one temporary API, the one Prefect would start
    server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def convert_with(params, max_workers: int | None = None, flow_run_name: str | None = None,
                 return_state: bool = False) -> Any:
    """Run ``convert`` with ``params`` (a ``ConvertParams``) on the task runner they name
    (what the CLI and the ``convert`` deployment do): its result, or its final state."""
    from flows.convert import convert

    runner = params.runner.value
    options: dict[str, Any] = {"task_runner": task_runner(runner, params.dask_address, max_workers)}
    if flow_run_name:
        options["flow_run_name"] = flow_run_name
    flow_ = convert.with_options(**options)
    if runner != "dask":
        return flow_(params, return_state=return_state)
    with api_for_workers():
        return flow_(params, return_state=return_state)


def task_slots() -> tuple[int, int | None]:
    """(quantize tasks to keep in flight, quantizer threads per task) for the running flow.

    A thread pool: the CPUs, threads left to the flow (CPUs / tasks in flight). A Dask
    cluster: twice its worker threads, so every worker has its next task queued while it
    runs one (a worker runs at most its threads' worth at once, so its memory is bounded by
    them, not by this); per task, the CPUs of its machine divided by the worker threads
    there (the smallest over machines), so no machine is oversubscribed.
    """
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    dask = sys.modules.get("prefect_dask.task_runners")  # never imported unless a Dask runner was made
    if ctx is not None and dask is not None and isinstance(ctx.task_runner, dask.DaskTaskRunner):
        return cluster_slots(ctx.task_runner.client)
    return os.cpu_count() or 2, None


def cluster_slots(client) -> tuple[int, int]:
    """Tasks in flight and threads per task for a Dask cluster, after checking that every
    worker runs this version of so8t-gguf."""
    from distributed.comm import get_address_host

    where = f"Dask cluster {client.scheduler.address}"
    try:
        client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
    except TimeoutError:
        raise ClusterError(where, "no workers", "start workers with `dask worker <scheduler address>`") from None
    nthreads = client.nthreads()
    try:
        info = client.run(_worker_info)
    except Exception as exc:  # the function could not even be unpickled there
        raise ClusterError(where, f"a worker cannot run so8t-gguf's tasks ({type(exc).__name__}: {exc})",
                           "install this project (same version) on every worker, or add it to PYTHONPATH") from None
    from so8t_core.constants import CONVERTER

    for worker, facts in info.items():
        if facts.get("converter") != CONVERTER:
            problem = facts.get("error") or f"runs {facts.get('converter')}, this flow {CONVERTER}"
            raise ClusterError(where, f"worker {worker} cannot run so8t-gguf's tasks ({problem})",
                               "install this project (same version) on every worker")
    per_host: dict[str, list[int]] = {}  # host: [worker threads, CPUs]
    for worker, n in nthreads.items():
        host = per_host.setdefault(get_address_host(worker), [0, 0])
        host[0] += n
        host[1] = max(host[1], info.get(worker, {}).get("cpus") or 1)
    threads = min(max(1, cpus // n) for n, cpus in per_host.values())
    return 2 * sum(nthreads.values()), threads


def _worker_info() -> dict:
    """Runs on each worker: its CPUs and the so8t-gguf it imports."""
    try:
        import tasks.quantize  # noqa: F401
        from so8t_core.constants import CONVERTER
    except Exception as exc:
        return {"cpus": os.cpu_count(), "error": f"{type(exc).__name__}: {exc}"}
    return {"cpus": os.cpu_count(), "converter": CONVERTER}
