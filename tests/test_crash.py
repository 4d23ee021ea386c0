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


def partial_releases(dest: Path) -> list[str]:
    """What a reader would find broken: a manifest whose files are missing or differ, or a
    latest.json entry naming a release without a manifest. Empty when nothing is partial."""
    broken = []
    for manifest in dest.rglob("manifest.json"):
        for name, info in json.loads(manifest.read_text())["files"].items():
            path = manifest.parent / name
            data = path.read_bytes() if path.is_file() else b""
            if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                broken.append(str(path.relative_to(dest)))
    latest = json.loads((dest / NAME / "latest.json").read_text())
    broken += [entry["release"] for entry in latest["quants"].values()
               if not (dest / NAME / entry["release"] / "manifest.json").is_file()]
    return broken


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

    partial_after_kill = partial_releases(dest)
    after_kill = file_hashes(dest)
    previous_intact = {k: v for k, v in after_kill.items() if k in previous} == previous

    status = main(convert_args(new, dest, work))  # the rerun, with the killed run's work dir
    identical = status == 0 and not partial_releases(dest) and file_hashes(dest) == file_hashes(reference)
    record("kill_point", point=point, resumed=int(status == 0), identical=int(identical),
           partial_after_kill=len(partial_after_kill), previous_lost=int(not previous_intact))
    assert partial_after_kill == [] and previous_intact
    assert status == 0 and identical
