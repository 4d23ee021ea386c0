"""The crash matrix: a conversion killed with SIGKILL at each named point (tests/support/crash_run.py)
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
import uuid
from pathlib import Path

import boto3
import fsspec
import pytest
from support.crash_run import POINTS
from support.reliability_record import record

from flows.cli import main
from so8t_core import storage

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]
QUANT, NAME = "Q4_K_M", "fx"
CRASH_RUN = os.path.join(os.path.dirname(__file__), "support", "crash_run.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert_args(source: str, dest: str, work: Path) -> list[str]:
    return ["convert", source, "--output", str(dest), "--quant", QUANT, "--name", NAME, "--work-dir", str(work),
            "--quiet"]


def tree(dest: str) -> dict[str, bytes]:
    """Every file under ``dest`` (a folder or s3://…) a reader may look at, by path below it
    (hidden staging prefixes and locks excluded)."""
    fs, root = storage.resolve(dest)
    fs.invalidate_cache()
    paths = [p for p in fs.find(root) if not any(part.startswith(".") for part in p[len(root):].split("/"))]
    return {p[len(root):].lstrip("/"): fs.cat_file(p) for p in paths}


def hidden_leftovers(dest: str) -> list[str]:
    """Staging prefixes and locks under ``dest`` (a finished run leaves none)."""
    fs, root = storage.resolve(dest)
    fs.invalidate_cache()
    return sorted(p[len(root):] for p in fs.find(root) if "/." in p[len(root):])


def file_hashes(dest: str) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in tree(dest).items()}


def partial_releases(dest: str) -> list[str]:
    """What a reader would find broken: a manifest whose files are missing or differ, or a
    latest.json entry naming a release without a manifest. Empty when nothing is partial."""
    files, broken = tree(dest), []
    for manifest in [n for n in files if n.endswith("/manifest.json")]:
        folder = manifest.rsplit("/", 1)[0]
        for name, info in json.loads(files[manifest])["files"].items():
            data = files.get(f"{folder}/{name}", b"")
            if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                broken.append(f"{folder}/{name}")
    latest = json.loads(files[f"{NAME}/latest.json"])
    broken += [entry["release"] for entry in latest["quants"].values()
               if f"{NAME}/{entry['release'].rstrip('/')}/manifest.json" not in files]
    return broken


@pytest.fixture(scope="module")
def matrix(make_fixture, tmp_path_factory):
    """(new source, destination holding the previous release, an uninterrupted run's destination,
    the uninterrupted run's work dir)."""
    root = tmp_path_factory.mktemp("crash")
    previous, new = make_fixture(seed=21), make_fixture(seed=22, shards=2)
    template = root / "template"
    assert main(convert_args(previous, str(template), root / "work-previous")) == 0
    reference = root / "reference"
    shutil.copytree(template, reference)
    assert main(convert_args(new, str(reference), root / "work-reference")) == 0
    return new, template, reference, root / "work-reference"


def destination(backend: str, template: Path, tmp_path: Path, request) -> str:
    """A copy of ``template`` (the previous release) on the backend."""
    if backend == "local":
        shutil.copytree(template, tmp_path / "dest")
        return str(tmp_path / "dest")
    request.getfixturevalue("s3_endpoint")
    bucket = f"crash-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    fsspec.filesystem("s3").put(str(template) + "/", f"{bucket}/dest/", recursive=True)
    return f"s3://{bucket}/dest"


# Every point on a local folder; the publishing points on S3 too (moves are copy-then-delete
# there, and the locks conditional PUTs).
CASES = [(p, "local") for p in POINTS] + [(p, "s3") for p in POINTS if p.startswith("publish")]


@pytest.mark.parametrize("point,backend", CASES, ids=[f"{p}-{b}" for p, b in CASES])
def test_a_killed_run_leaves_no_partial_release_and_resumes(point, backend, matrix, tmp_path, request):
    from prefect.settings import PREFECT_API_URL

    new, template, reference, warm_work = matrix
    dest, work = destination(backend, template, tmp_path, request), tmp_path / "work"
    if point.startswith("publish"):  # staged tensors and validation cached: the run gets to publishing fast
        shutil.copytree(warm_work, work)
    previous = file_hashes(str(template))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),  # the session's API: no start-up per run
           "PYTHONPATH": os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])])}
    killed = subprocess.run([sys.executable, CRASH_RUN, point, *convert_args(new, dest, work)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    partial_after_kill = partial_releases(dest)
    after_kill = file_hashes(dest)
    previous_intact = {k: v for k, v in after_kill.items() if k in previous} == previous

    status = main(convert_args(new, dest, work))  # the rerun, with the killed run's work dir
    identical = status == 0 and not partial_releases(dest) and file_hashes(dest) == file_hashes(str(reference))
    leftovers = hidden_leftovers(dest)  # what the killed run left is cleaned up by the rerun
    record("kill_point", point=f"{point} ({backend})", resumed=int(status == 0), identical=int(identical),
           partial_after_kill=len(partial_after_kill), previous_lost=int(not previous_intact),
           leftovers=len(leftovers))
    assert partial_after_kill == [] and previous_intact
    assert status == 0 and identical
    assert leftovers == []
