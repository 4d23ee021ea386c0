"""The convert deployment's form in a real browser, as deployments/README.md sets it up: a Prefect
server on a free port (PREFECT_API_URL set before it starts), the deployment from prefect.yaml, a
process worker; Debian's chromium, headless, driven by playwright. The form shows every field of
ConvertParams as a plain field with its label and help; a run submitted from it with one mix
publishes that release, and the run the UI lists carries the summary and where the release is.

Skipped when chromium or playwright is missing, unless SO8T_GGUF_REQUIRE_BROWSER=1 (CI sets it:
.ci/run installs chromium, the test extras playwright).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.params import ConvertParams

pytestmark = pytest.mark.e2e

REPO = str(Path(__file__).resolve().parents[1])
PREFECT = os.path.join(os.path.dirname(sys.executable), "prefect")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# What works here: no sandbox (root in a container), no GPU, nothing fetched from outside.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 240


def _need_browser() -> None:
    missing = [] if os.access(CHROMIUM, os.X_OK) else ["chromium (apt-get install chromium)"]
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[test]')")
    if missing:
        message = "the browser test needs " + " and ".join(missing)
        if os.environ.get("SO8T_GGUF_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not come up: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """A process started in a session of its own, and everything it started, gone."""
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
            return


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory):
    """(the UI's URL, the API's URL) of a Prefect server with the convert deployment and a worker."""
    _need_browser()
    home = tmp_path_factory.mktemp("prefect-ui")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    # PREFECT_API_URL before the server starts: the UI it serves then talks to this port, not 4200.
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PWD": REPO,
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    started: list[subprocess.Popen] = []

    def start(what: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = home / f"{what}.log"
        proc = subprocess.Popen([PREFECT, *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        return proc, log

    try:
        server, log = start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        _wait("the Prefect server", lambda: _healthy(api), server, log)
        for args in (["work-pool", "create", "so8t-local", "--type", "process"],
                     ["--no-prompt", "deploy", "--name", "convert"]):  # as the README does it, from prefect.yaml
            done = subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        worker, log = start("worker", "worker", "start", "--pool", "so8t-local", "--limit", "1")
        _wait("the worker", lambda: "started" in log.read_text(errors="replace"), worker, log)
        yield f"http://127.0.0.1:{port}", api
    finally:
        for proc in reversed(started):
            _stop(proc)


def _api(api: str, path: str, body: dict | None = None):
    request = urllib.request.Request(api + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _eventually(ready, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def test_the_convert_form_in_a_browser_runs_a_conversion(prefect_ui, make_fixture, tmp_path):
    from playwright.sync_api import sync_playwright

    ui, api = prefect_ui
    (deployment,) = [d for d in _api(api, "/deployments/filter", {}) if d["name"] == "convert"]
    runs_of = {"deployments": {"id": {"any_": [deployment["id"]]}}}
    src, out, work = make_fixture(layers=1, seed=6), tmp_path / "out", tmp_path / "work"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{ui}/deployments/deployment/{deployment['id']}/run", wait_until="networkidle",
                      timeout=120_000)

            def field(title: str):
                """A field of the form by its label (the innermost one: the form nests in ``params``)."""
                return page.locator("xpath=//div[contains(@class,'schema-form-property')][./div[contains("
                                    "@class,'p-label__header')]//span[normalize-space(.)="
                                    f"'{title} (Optional)']]")

            # Every field, labelled and explained as ConvertParams says, a plain field to type into.
            for name, info in ConvertParams.model_fields.items():
                assert field(info.title).count() == 1, name
                assert field(info.title).locator(".schema-form-property__description").inner_text() \
                    == info.description, name
            text = page.locator("body").inner_text()
            assert 'Property is type "None"' not in text and "DEST/NAME/FINGERPRINT/QUANT/" in text
            assert "////" not in text

            for title, value in (("Source checkpoint", src), ("Destination", str(out)), ("Model name", "fx"),
                                 ("Work folder", str(work))):
                field(title).locator("textarea").fill(value)
            # One mix: F16 in, the default Q8_0 out.
            mixes = field("Quant mixes")
            mixes.locator("button.p-select-button__control").focus()
            page.keyboard.press("ArrowDown")  # opens the list
            page.get_by_role("option", name="F16", exact=True).click()
            mixes.locator(".p-tag", has_text="Q8_0").locator("button.p-tag__dismiss").click()
            page.get_by_text("Parameters", exact=True).click()  # closes the list, which would take the next click
            page.get_by_role("option", name="F16", exact=True).wait_for(state="hidden", timeout=60_000)
            assert mixes.locator("button.p-select-button__control").get_attribute("modelvalue") == "F16"
            submit = page.get_by_role("button", name="Submit")
            page.wait_for_load_state("networkidle")
            submit.click()
            # A click can be lost (seen about one time in three, the form staying with no run made):
            # submit again, only then (a run made takes the page to the run's own).
            for _ in range(2):
                if _eventually(lambda: _api(api, "/flow_runs/filter", runs_of), 60) or not submit.is_visible():
                    break
                print("submitting the form again: the first click made no run", flush=True)
                submit.click()

            deadline = time.monotonic() + 600
            latest = out / "fx" / "latest.json"
            while not latest.exists():
                runs = _api(api, "/flow_runs/filter", runs_of)
                failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED", "CANCELLED")]
                assert not failed and time.monotonic() < deadline, failed or runs
                time.sleep(1)
        finally:
            browser.close()

    assert set(json.loads(latest.read_text())["quants"]) == {"F16"}
    (release,) = out.glob("fx/*/F16/v-*")  # the version the release's current.json names
    assert (release / "manifest.json").is_file() and (release / "fx-F16.gguf").is_file()
    # The run the deployment lists (the one "Submit" made, not its subflow) says where the release is.
    (run,) = _api(api, "/flow_runs/filter", runs_of)
    deadline = time.monotonic() + 120
    while _api(api, f"/flow_runs/{run['id']}")["state_type"] != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(1)
    artifacts = {a["key"]: a["data"] for a in _api(api, "/artifacts/filter",
                                                    {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})}
    assert artifacts["fx-summary"].startswith("# fx: converted")
    assert artifacts["fx-f16-release"] == f"**fx F16 release**: `{release}`"
