"""The crash matrix: a conversion killed with SIGKILL at each named point (tests/crash_run.py)
leaves no partial release and the previous release intact; the rerun completes, and what it
publishes is byte-identical to an uninterrupted run's."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from crash_run import POINTS
from flows.cli import main
from reliability_record import record

pytestmark = pytest.mark.usefixtures("prefect_server")
QUANT, NAME = "Q4_K_M", "fx"
CRASH_RUN = os.path.join(os.path.dirname(__file__), "crash_run.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert_args(source: str, dest: Path, work: Path) -> list[str]:
    return ["convert", source, "--output", str(dest), "--quant", QUANT, "--name", NAME, "--work-dir", str(work),
            "--quiet"]


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file a reader may look at (hidden staging and lock names excluded)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def assert_nothing_partial(dest: Path) -> int:
    """Every manifest's files are there with their sha256; latest.json names only complete releases.
    Returns how many complete releases there are."""
    complete = 0
    for manifest in dest.rglob("manifest.json"):
        for name, info in json.loads(manifest.read_text())["files"].items():
            data = (manifest.parent / name).read_bytes()
            assert len(data) == info["size"] and hashlib.sha256(data).hexdigest() == info["sha256"], name
        complete += 1
    latest = json.loads((dest / NAME / "latest.json").read_text())
    for entry in latest["quants"].values():
        assert (dest / NAME / entry["release"] / "manifest.json").is_file()
    return complete


@pytest.fixture(scope="module")
def matrix(make_fixture, tmp_path_factory):
    """(new source, destination holding the previous release, an uninterrupted run's destination)."""
    root = tmp_path_factory.mktemp("crash")
    previous, new = make_fixture(seed=21), make_fixture(seed=22, shards=2)
    template = root / "template"
    assert main(convert_args(previous, template, root / "work-previous")) == 0
    reference = root / "reference"
    shutil.copytree(template, reference)
    assert main(convert_args(new, reference, root / "work-reference")) == 0
    return new, template, reference, root / "work-reference"


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_a_killed_run_leaves_no_partial_release_and_resumes(point, matrix, tmp_path):
    from prefect.settings import PREFECT_API_URL

    new, template, reference, warm_work = matrix
    dest, work = tmp_path / "dest", tmp_path / "work"
    shutil.copytree(template, dest)
    if point.startswith("publish"):  # staged tensors and validation cached: the run gets to publishing fast
        shutil.copytree(warm_work, work)
    previous = file_hashes(template)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),  # the session's API: no start-up per run
           "PYTHONPATH": os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])])}
    killed = subprocess.run([sys.executable, CRASH_RUN, point, *convert_args(new, dest, work)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    assert assert_nothing_partial(dest) >= 1
    after_kill = file_hashes(dest)
    assert {k: v for k, v in after_kill.items() if k in previous} == previous  # the previous release intact

    assert main(convert_args(new, dest, work)) == 0  # the rerun, with the killed run's work dir
    assert_nothing_partial(dest)
    identical = file_hashes(dest) == file_hashes(reference)
    record("kill_point", point=point, killed=1, resumed=1, identical=int(identical), releases_lost=0)
    assert identical
