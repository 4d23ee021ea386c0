"""The command line's own Prefect API, for runs without ``PREFECT_API_URL``.

A Prefect run needs an API. Left to itself, Prefect starts a temporary one inside every
process that runs a flow: 5-20 s before the first task on a busy machine, and the API is a
child in the CLI's process group, so a terminal's Ctrl-C kills it first while the run still
calls it. Instead, ``so8t-gguf convert`` uses a local API of its own:

* started in the background, in a session of its own (a terminal's signals do not reach it),
  the first time a run needs it, while the CLI goes on with its checks and imports;
* recorded in ``<cache>/prefect-api/<key>/server.json`` (URL, pid, a token that is also on
  its command line, so a recycled pid is never taken for it), with its own SQLite database
  beside it; ``key`` names the Python and the Prefect version, so two installs never share one;
* reused by every later run of this user while it is healthy;
* gone after ``SO8T_GGUF_API_IDLE_SECONDS`` (default 900) without a request and without a
  running client (each CLI holds a lease, ``clients/<pid>``, while it runs).

It is a real Prefect API (Prefect's own server application, the same one the temporary API
runs), so runs keep their task states, retries, caching and artifacts. With
``PREFECT_API_URL`` set (a Prefect server, Prefect Cloud, a test harness), none of this is used.

Finding or starting the API (``LocalApi``) imports no Prefect (only the standard library): it
costs a few milliseconds when the API runs already. ``python -m flows.local_api serve ...`` is
the server.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib.metadata import version
from typing import Iterator

from so8t_core.errors import So8tError
from so8t_core.storage import default_cache_dir

IDLE_SECONDS_ENV = "SO8T_GGUF_API_IDLE_SECONDS"
DEFAULT_IDLE_SECONDS = 900
START_TIMEOUT_S = 120  # a fresh database's migrations on a busy 2-core machine can take a while
STOP_TIMEOUT_S = 10


def idle_seconds() -> float:
    value = os.environ.get(IDLE_SECONDS_ENV, "")
    try:
        return max(1.0, float(value)) if value.strip() else DEFAULT_IDLE_SECONDS
    except ValueError:
        raise So8tError(f"{IDLE_SECONDS_ENV}={value}", "not a number of seconds", "e.g. 900") from None


def api_root(cache_dir: str | None = None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), "prefect-api")


def state_dir(cache_dir: str | None = None) -> str:
    """This install's folder: one API per Python and Prefect version."""
    key = hashlib.sha256(f"{os.path.realpath(sys.executable)}|{version('prefect')}".encode()).hexdigest()[:12]
    return os.path.join(api_root(cache_dir), key)


@dataclass(frozen=True)
class Server:
    """What ``server.json`` records."""

    url: str  # the API's URL (…/api)
    pid: int
    token: str

    @classmethod
    def read(cls, folder: str) -> "Server | None":
        try:
            with open(os.path.join(folder, "server.json")) as f:
                data = json.load(f)
            return cls(url=str(data["url"]), pid=int(data["pid"]), token=str(data["token"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, folder: str) -> None:
        tmp = os.path.join(folder, f".server.json.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({"url": self.url, "pid": self.pid, "token": self.token}, f)
        os.replace(tmp, os.path.join(folder, "server.json"))

    def running(self) -> bool:
        """Its process is alive and is the one that was started with this token (its command
        line says so; without /proc, that a process with its pid is alive)."""
        if not os.path.isdir("/proc/self"):
            return _pid_alive(self.pid)
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                return self.token.encode() in f.read().split(b"\0")
        except OSError:
            return False


@contextlib.contextmanager
def _locked(folder: str) -> Iterator[None]:
    """Starters, clients taking a lease and the server deciding to stop take turns."""
    with open(os.path.join(folder, "lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    if not os.path.isdir("/proc/self"):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (OSError, IndexError):
        return False


# --- The client side ---------------------------------------------------------------------------

class LocalApi:
    """The local API a run uses: ``LocalApi.start()`` returns at once (starting the server when
    none runs); ``wait()`` returns its URL once it answers."""

    def __init__(self, folder: str, server: Server, started: bool):
        self.folder, self.server, self.started = folder, server, started
        self._lease = os.path.join(folder, "clients", str(os.getpid()))

    @classmethod
    def start(cls, cache_dir: str | None = None) -> "LocalApi":
        folder = state_dir(cache_dir)
        os.makedirs(folder, mode=0o700, exist_ok=True)  # its database holds the runs' parameters
        os.makedirs(os.path.join(folder, "clients"), mode=0o700, exist_ok=True)
        with _locked(folder):
            # The lease first: a server deciding to stop (under the same lock) sees it.
            with open(os.path.join(folder, "clients", str(os.getpid())), "w") as f:
                f.write(str(time.time()))
            server = Server.read(folder)
            started = server is None or not server.running()
            if started:
                server = _launch(folder)
        api = cls(folder, server, started)
        atexit.register(api.release)
        return api

    def wait(self, timeout: float = START_TIMEOUT_S) -> str:
        """The API's URL, once ``/health`` answers; a one-line error if the server dies or never answers."""
        deadline = time.monotonic() + timeout
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never via a proxy
        while True:
            try:
                with direct.open(self.server.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return self.server.url
            except (urllib.error.URLError, OSError):
                pass
            if not self.server.running():
                raise So8tError("the local Prefect API", f"its server (pid {self.server.pid}) exited "
                                f"before answering: {_log_tail(self.folder)}",
                                f"see {os.path.join(self.folder, 'server.log')}, or set PREFECT_API_URL "
                                "to a running Prefect server")
            if time.monotonic() > deadline:
                raise So8tError("the local Prefect API", f"{self.server.url} did not answer within {timeout:.0f} s",
                                "try again on a less busy machine, or set PREFECT_API_URL to a running "
                                "Prefect server")
            time.sleep(0.1)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.remove(self._lease)


def start_unless_configured() -> LocalApi | None:
    """The local API, found running or started, unless a Prefect API is configured
    (``PREFECT_API_URL`` in the environment or a Prefect profile, a test harness's settings):
    then None, and Prefect uses that one."""
    from prefect.settings import PREFECT_API_URL

    return None if PREFECT_API_URL.value() else LocalApi.start()


@contextlib.contextmanager
def using(api: LocalApi | None) -> Iterator[None]:
    """Prefect work inside talks to ``api`` (once it answers); with None, to the configured API."""
    if api is None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: api.wait()}):
            yield
    finally:
        api.release()


def _launch(folder: str) -> Server:
    """Start a server in its own session and return what it records (called holding the lock).

    The launcher binds the port, forks the server and exits at once: the server is then no
    child of this process (nothing to reap, no zombie), and the URL is known before the
    server has imported Prefect.
    """
    token = secrets.token_hex(16)
    with contextlib.suppress(OSError):
        os.remove(os.path.join(folder, "server.json"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{os.path.join(folder, 'prefect.db')}",
               PREFECT_UI_ENABLED="0", PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_LOGGING_LEVEL="WARNING", PREFECT_LOGGING_SERVER_LEVEL="WARNING",
               # What Prefect's temporary API sets: no UI, none of the scheduling services.
               PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
    with open(os.path.join(folder, "server.log"), "w") as log:
        launcher = subprocess.run([sys.executable, "-m", "flows.local_api", "serve", folder, token,
                                   str(idle_seconds())], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                  env=env, cwd=folder, start_new_session=True, timeout=60)
    server = Server.read(folder)
    if launcher.returncode != 0 or server is None or server.token != token:
        raise So8tError("the local Prefect API", f"could not start its server: {_log_tail(folder)}",
                        f"see {os.path.join(folder, 'server.log')}, or set PREFECT_API_URL to a running "
                        "Prefect server")
    return server


def _log_tail(folder: str) -> str:
    try:
        with open(os.path.join(folder, "server.log"), errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        lines = []
    return lines[-1][:200] if lines else "no output"


def stop(cache_dir: str | None = None) -> list[int]:
    """Stop every local API under ``cache_dir`` (all installs); the pids stopped. For tests and
    for users who want it gone before its idle time."""
    root, stopped = api_root(cache_dir), []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        folder = os.path.join(root, name)
        server = Server.read(folder)
        if server is None or not server.running():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while server.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        if server.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGKILL)
        with _locked(folder):
            if Server.read(folder) == server:  # uvicorn ends on the signal itself, before its cleanup
                os.remove(os.path.join(folder, "server.json"))
        stopped.append(server.pid)
    return stopped


# --- The server side ---------------------------------------------------------------------------

class _Activity:
    """ASGI middleware: when the API last had a request."""

    def __init__(self, app):
        self.app, self.last = app, time.monotonic()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.last = time.monotonic()
        await self.app(scope, receive, send)


def _live_leases(folder: str) -> list[int]:
    live = []
    clients = os.path.join(folder, "clients")
    for name in os.listdir(clients) if os.path.isdir(clients) else []:
        if name.isdigit() and _pid_alive(int(name)):
            live.append(int(name))
        else:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(clients, name))  # its client exited (or was killed)
    return live


def _watch(folder: str, token: str, idle: float, activity: _Activity, server) -> None:
    """Stop the server after ``idle`` seconds without a request and without a live client, or
    when server.json no longer names it."""
    while not server.should_exit:
        time.sleep(min(5.0, idle / 4))
        recorded = Server.read(folder)
        if recorded is None or recorded.token != token:
            server.should_exit = True
            return
        if time.monotonic() - activity.last < idle:
            continue
        with _locked(folder):
            if _live_leases(folder):
                continue
            os.remove(os.path.join(folder, "server.json"))  # under the lock: no client takes it from here on
        server.should_exit = True


def _serve(folder: str, token: str, idle: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound, not listening: a client connecting early is refused, and retries
    port = sock.getsockname()[1]
    pid = os.fork()
    if pid:  # the launcher: record the server and return to the CLI
        Server(url=f"http://127.0.0.1:{port}/api", pid=pid, token=token).write(folder)
        os._exit(0)
    import uvicorn
    from prefect.server.api.server import create_app

    activity = _Activity(create_app(ephemeral=True, final=True))
    server = uvicorn.Server(uvicorn.Config(activity, log_level="warning", lifespan="on"))
    threading.Thread(target=_watch, args=(folder, token, idle, activity, server), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        with _locked(folder):
            recorded = Server.read(folder)
            if recorded is not None and recorded.token == token:
                os.remove(os.path.join(folder, "server.json"))


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "serve":
        sys.exit("usage: python -m flows.local_api serve FOLDER TOKEN IDLE_SECONDS")
    _serve(sys.argv[2], sys.argv[3], float(sys.argv[4]))
