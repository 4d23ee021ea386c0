"""The crash matrix: a conversion killed with SIGKILL at each named point (tests/support/crash_run.py)
leaves no partial release and the previous release intact; the rerun completes, and what it
publishes is byte-identical to an uninterrupted run's.

Two scenarios: a new release (a changed source publishes into a new folder), and, at the points
inside the commit, a re-publish of the same release with other bytes (same source, --pure), where
the release's current version must stay readable: readers see the old version or the new one,
never neither."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import fsspec
import pytest
from support.crash_run import COMMIT_POINTS, POINTS
from support.reliability_record import record

from flows.cli import main
from so8t_core import storage

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]
QUANT, NAME = "Q4_K_M", "fx"
CRASH_RUN = os.path.join(os.path.dirname(__file__), "support", "crash_run.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert_args(source: str, dest: str, work: Path, *options: str) -> list[str]:
    return ["convert", source, "--output", str(dest), "--quant", QUANT, "--name", NAME, "--work-dir", str(work),
            "--quiet", *options]


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
    """What a reader would find broken: a version's manifest whose files are missing or differ, a
    release pointer naming a version without a manifest, or a latest.json entry naming a release
    without a pointer. Empty when nothing is partial."""
    files, broken = tree(dest), []
    for manifest in [n for n in files if n.endswith("/manifest.json")]:
        folder = manifest.rsplit("/", 1)[0]
        for name, info in json.loads(files[manifest])["files"].items():
            data = files.get(f"{folder}/{name}", b"")
            if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                broken.append(f"{folder}/{name}")
    for pointer in [n for n in files if n.endswith("/current.json")]:
        version = f"{pointer.rsplit('/', 1)[0]}/{json.loads(files[pointer])['version']}"
        if f"{version}/manifest.json" not in files:
            broken.append(pointer)
    latest = json.loads(files[f"{NAME}/latest.json"])
    broken += [entry["release"] for entry in latest["quants"].values()
               if f"{NAME}/{entry['release'].rstrip('/')}/current.json" not in files]
    return broken


def current_versions(dest: str) -> dict[str, str]:
    """Each release's current version (pointer path → version name)."""
    files = tree(dest)
    return {n: json.loads(files[n])["version"] for n in files if n.endswith("/current.json")}


@dataclass(frozen=True)
class Scenario:
    """Where a killed run starts from (``template``), what it runs (``options``), what an
    uninterrupted run leaves (``reference``) and its work dir (staged tensors, validation cached)."""

    template: Path
    reference: Path
    work: Path
    options: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def matrix(make_fixture, tmp_path_factory):
    """(new source, {"new": publishing a new release beside the previous one, "republish": the same
    release again with other bytes (--pure: other tensor types, same source fingerprint)})."""
    root = tmp_path_factory.mktemp("crash")
    previous, new = make_fixture(seed=21), make_fixture(seed=22, shards=2)
    template = root / "template"
    assert main(convert_args(previous, str(template), root / "work-previous")) == 0
    reference = root / "reference"
    shutil.copytree(template, reference)
    assert main(convert_args(new, str(reference), root / "work-reference")) == 0
    republished = root / "republished"
    shutil.copytree(reference, republished)
    assert main(convert_args(new, str(republished), root / "work-republished", "--pure")) == 0
    assert len(current_versions(str(republished))) == 2  # the same two releases: one got a new version
    assert current_versions(str(republished)) != current_versions(str(reference))
    return new, {"new": Scenario(template, reference, root / "work-reference"),
                 "republish": Scenario(reference, republished, root / "work-republished", ("--pure",))}


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
# there, and the locks conditional PUTs); the points inside the commit for a re-publish, on both.
CASES = ([(p, "local", "new") for p in POINTS] + [(p, "s3", "new") for p in POINTS if p.startswith("publish")]
         + [(p, b, "republish") for p in COMMIT_POINTS for b in ("local", "s3")])


@pytest.mark.parametrize("point,backend,scenario", CASES, ids=[f"{p}-{b}-{s}" for p, b, s in CASES])
def test_a_killed_run_leaves_no_partial_release_and_resumes(point, backend, scenario, matrix, tmp_path, request):
    from prefect.settings import PREFECT_API_URL

    new, scenarios = matrix
    case = scenarios[scenario]
    dest, work = destination(backend, case.template, tmp_path, request), tmp_path / "work"
    if point.startswith("publish"):  # staged tensors and validation cached: the run gets to publishing fast
        shutil.copytree(case.work, work)
    previous, versions_before = file_hashes(str(case.template)), current_versions(str(case.template))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),  # the session's API: no start-up per run
           "PYTHONPATH": os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])])}
    killed = subprocess.run([sys.executable, CRASH_RUN, point, *convert_args(new, dest, work, *case.options)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    partial_after_kill = partial_releases(dest)
    after_kill = file_hashes(dest)
    # Every file of what was published before is there with its bytes; only a release pointer may
    # have moved, and only to the new version (the switch is the one change a commit makes).
    switched = {p for p, v in current_versions(dest).items() if versions_before.get(p) != v}
    previous_intact = {k: v for k, v in after_kill.items() if k in previous and k not in switched} == \
        {k: v for k, v in previous.items() if k not in switched}
    expected = current_versions(str(case.reference))
    readable = all(current_versions(dest)[p] in (versions_before.get(p), expected[p]) for p in expected
                   if p in current_versions(dest))

    status = main(convert_args(new, dest, work, *case.options))  # the rerun, with the killed run's work dir
    identical = status == 0 and not partial_releases(dest) and file_hashes(dest) == file_hashes(str(case.reference))
    leftovers = hidden_leftovers(dest)  # what the killed run left is cleaned up by the rerun
    record("kill_point", point=f"{point} ({backend}{', re-publish' if scenario == 'republish' else ''})",
           resumed=int(status == 0), identical=int(identical), partial_after_kill=len(partial_after_kill),
           previous_lost=int(not (previous_intact and readable)), leftovers=len(leftovers))
    assert partial_after_kill == [] and previous_intact and readable
    assert status == 0 and identical
    assert leftovers == []
