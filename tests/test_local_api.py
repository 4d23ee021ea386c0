"""The default mode (no PREFECT_API_URL): the CLI's own local Prefect API, start-up and interrupts.

Real processes throughout: the CLI as a user starts it, in a process group of its own, signalled
as a terminal signals it (Ctrl-C: SIGINT to the whole group) or as `kill` does (SIGTERM to the
process). The speed targets (first line within 1 s, exit within 2 s, a re-run in under 10% of a
cold run) are measured by benchmarks/startup.py; the bounds here are generous on purpose.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.cli import PROGRESS_LINE, run

from flows import local_api
from so8t_core.publish.release import read_manifest

pytestmark = pytest.mark.e2e

REPO = str(Path(__file__).resolve().parents[1])
STALL_RUN = os.path.join(os.path.dirname(__file__), "support", "stall_run.py")
EXIT_BOUND_S = 15  # the target is 2 s; a loaded CI machine gets room


def cli_env(**extra: str) -> dict[str, str]:
    """As from a user's shell: no Prefect API configured, Prefect's log level not the session's."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_LOGGING_LEVEL")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**env, **extra}


def convert_args(src: str, out: Path, work: Path) -> list[str]:
    return ["convert", src, "--output", str(out), "--work-dir", str(work), "--name", "fx", "--quant", "Q8_0"]


def manifests(out: Path) -> list[Path]:
    return sorted(out.rglob("manifest.json")) if out.exists() else []


def test_the_first_progress_line_comes_before_prefect_is_even_imported(make_fixture, tmp_path):
    """Before: nothing until Prefect's temporary API had started (10-20 s on a busy machine)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.cli",
                           *convert_args(make_fixture(), tmp_path / "o", tmp_path / "w"), "--no-validate"],
                          env=cli_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    first_progress = next(i for i, line in enumerate(lines) if PROGRESS_LINE.match(line))
    first_prefect = next(i for i, line in enumerate(lines) if line.startswith("import time:")
                         and line.rsplit("|", 1)[1].strip() == "prefect")
    assert first_progress < first_prefect, lines[first_progress]


def test_runs_share_one_local_api_that_outlives_them_and_records_real_runs(make_fixture, tmp_path):
    """Before: each run started (and stopped) a temporary API of its own."""
    src = make_fixture(layers=1)
    first = run(*convert_args(src, tmp_path / "o", tmp_path / "w"), "--no-validate")
    assert first.returncode == 0, first.stderr
    server = local_api.Server.read(local_api.state_dir())
    assert server is not None and server.running()
    second = run(*convert_args(src, tmp_path / "o", tmp_path / "w"), "--no-validate")
    assert second.returncode == 0, second.stderr
    assert local_api.Server.read(local_api.state_dir()) == server and server.running()
    assert "starting a local Prefect API" not in second.stderr

    # Real Prefect runs, kept by that API: states, task runs, artifacts.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.url}), get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs()
                if r.parameters.get("params", {}).get("work_dir") == str(tmp_path / "w")]
        assert len(runs) == 2 and all(r.state.is_completed() for r in runs)
        these = FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs]))
        tasks = [t.name for t in client.read_task_runs(flow_run_filter=these)]
        for stage in ("fetch-checkpoint", "quantize-", "assemble-Q8_0", "write-stats-Q8_0", "publish-latest"):
            assert any(name.startswith(stage) for name in tasks), (stage, tasks)
        assert {"fx-summary", "fx-q8-0-tensor-stats"} <= {a.key for a in client.read_artifacts(flow_run_filter=these)}


def test_with_prefect_api_url_set_no_local_api_is_started(prefect_server, make_fixture, tmp_path, monkeypatch):
    from flows.cli import main

    monkeypatch.setenv("SO8T_GGUF_CACHE", str(tmp_path / "cache"))
    assert main([*convert_args(make_fixture(), tmp_path / "o", tmp_path / "w"), "--no-validate", "-q"]) == 0
    assert not os.path.exists(local_api.api_root())


def test_the_local_api_stops_after_its_idle_time(tmp_path, monkeypatch):
    monkeypatch.setenv(local_api.IDLE_SECONDS_ENV, "2")
    api = local_api.LocalApi.start(cache_dir=str(tmp_path))
    try:
        api.wait()
        assert api.started and api.server.running()
        time.sleep(4)  # held by this process's lease: idle, but not stopped
        assert api.server.running()
        api.release()
        deadline = time.monotonic() + 60
        while api.server.running() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not api.server.running()
        assert local_api.Server.read(local_api.state_dir(str(tmp_path))) is None
    finally:
        local_api.stop(str(tmp_path))


def stalled(point: str, src: str, out: Path, work: Path, tmp_path: Path) -> subprocess.Popen:
    """The CLI, stalled at ``point`` (tests/support/stall_run.py), in a process group of its own."""
    marker = tmp_path / f"stalled-{point}"
    proc = subprocess.Popen([sys.executable, STALL_RUN, point, str(marker), *convert_args(src, out, work)],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not reach {point}: {proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    return proc


# Ctrl-C in a terminal signals the whole process group; `kill` signals the process. Quantize
# stalls in a task thread, validate and publish in the main thread (as llama.cpp in a C call).
CASES = [("quantize", signal.SIGINT, "group"), ("validate", signal.SIGTERM, "process"),
         ("publish-upload", signal.SIGINT, "group")]


@pytest.mark.parametrize("point, signum, target", CASES, ids=[f"{s.name}-{p}" for p, s, _ in CASES])
def test_a_signal_ends_the_run_at_once_with_one_line_and_the_rerun_completes(point, signum, target, make_fixture,
                                                                              tmp_path):
    """Before: Ctrl-C killed Prefect's temporary API first (same process group), the CLI kept calling
    it for over a minute and ended in tracebacks with status 1; SIGTERM ended it without a word."""
    src, out, work = make_fixture(layers=2, seed=4), tmp_path / "out", tmp_path / "work"
    if point.startswith("publish"):  # a release there (unvalidated): the interrupted publish must leave it whole
        assert run(*convert_args(src, out, work), "--no-validate").returncode == 0
    before = {p: p.read_bytes() for p in manifests(out)}
    proc = stalled(point, src, out, work, tmp_path)
    sent = time.monotonic()
    if target == "group":
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - sent

    word = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}[signum]
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)] \
        == [f"so8t-gguf: {word}"], stderr[-3000:]
    assert took < EXIT_BOUND_S, took
    # Nothing partial published: what was there is as it was, nothing new is visible.
    assert {p: p.read_bytes() for p in manifests(out)} == before
    # The local API is in a session of its own: the terminal's signal did not reach it.
    server = local_api.Server.read(local_api.state_dir())
    assert server is not None and server.running()

    rerun = run(*convert_args(src, out, work))
    assert rerun.returncode == 0, rerun.stderr
    # One release, now at the re-run's validated version (the version it replaced stays beside it, for readers).
    (release,) = {m.parent.parent for m in manifests(out)}
    assert read_manifest(str(release))["validation"]["passed"]
    assert local_api.Server.read(local_api.state_dir()) == server  # reused
