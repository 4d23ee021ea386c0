"""Credentials never appear in what a run leaves: the CLI's output and errors, exception text,
logs, and every byte of the release and the work directory (model files included).

The S3 credentials (from the environment, as s3fs takes them) and credentials written into a
URI (``s3://key:secret@bucket/...``, which fsspec accepts) are both grepped for.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path

import boto3
import fsspec
import pytest
from support.reliability_record import record

from flows.cli import main
from so8t_core.errors import So8tError
from so8t_core.source.checkpoint import Checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]
URI_KEY, URI_SECRET = "AKIAURIKEYLEAKTEST01", "uri-secret-never-to-be-seen-3f9a1c"


def secrets() -> list[bytes]:
    return [s.encode() for s in (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"], URI_KEY,
                                 URI_SECRET)]


def leaks(blobs: dict[str, bytes]) -> list[str]:
    return [f"{where} holds {s.decode()!r}" for where, blob in blobs.items() for s in secrets() if s in blob]


@pytest.fixture(scope="module")
def s3_source(s3_endpoint, make_fixture):
    s3 = boto3.client("s3")
    for bucket in ("secrets-ckpts", "secrets-releases"):
        s3.create_bucket(Bucket=bucket)
    fsspec.filesystem("s3").put(make_fixture(seed=31) + "/", "secrets-ckpts/fx/", recursive=True)
    return "s3://secrets-ckpts/fx"


def test_no_credentials_in_the_output_logs_release_or_work_files(s3_source, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    work = tmp_path / "work"
    assert main(["convert", s3_source, "--output", "s3://secrets-releases/models", "--quant", "Q4_K_M",
                 "--work-dir", str(work), "--json"]) == 0
    out = capsys.readouterr()
    blobs = {"stdout": out.out.encode(), "stderr": out.err.encode(), "logs": caplog.text.encode()}
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    released = fs.find("secrets-releases/models")
    blobs.update({f"s3://{p}": fs.cat_file(p) for p in released})  # GGUF and Parquet bytes too
    blobs.update({str(p): p.read_bytes() for p in Path(work).rglob("*") if p.is_file()})
    assert any(p.endswith(".gguf") for p in released) and len(blobs) > 20
    found = leaks(blobs)
    record("secrets", places="output, logs, release files, work files", checked=len(blobs), leaked=len(found))
    assert found == []


@pytest.mark.parametrize("uri", [
    f"s3://{URI_KEY}:{URI_SECRET}@secrets-ckpts/fx",  # credentials in the URI: refused, not echoed
    "s3://secrets-no-such-bucket/fx",  # the bucket does not exist
    "s3://secrets-ckpts/no-such-model",  # nothing at that key
    "s3://secrets-ckpts/fx/model.safetensors",  # a file, not a checkpoint folder
])
def test_no_credentials_in_errors(s3_source, uri, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    assert main(["convert", uri, "--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")]) == 2
    out = capsys.readouterr()
    with pytest.raises(So8tError) as raised:
        Checkpoint.open(uri)
    blobs = {"stdout": out.out.encode(), "stderr": out.err.encode(), "logs": caplog.text.encode(),
             "exception": "".join(traceback.format_exception(raised.value)).encode(),
             "exception repr": repr(raised.value).encode()}
    found = leaks(blobs)
    record("secrets", places="errors: " + uri.rsplit("@", 1)[-1], checked=len(blobs), leaked=len(found))
    assert found == []


def prefect_database() -> dict[str, bytes]:
    """Every file of the session's Prefect database (flow runs and their parameters, task runs and
    their names, logs, events), as bytes."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    folder = os.path.dirname(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
    return {f"prefect database {n}": (Path(folder) / n).read_bytes() for n in os.listdir(folder)}


def flow_run_count() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(limit=200))


@pytest.mark.parametrize("option", ["SOURCE", "--output", "--lora", "--imatrix", "--work-dir", "--eval-text"])
def test_credentials_in_any_uri_are_refused_before_a_flow_run_exists(s3_source, option, tmp_path, capsys):
    """Before: ``--output s3://KEY:SECRET@bucket/x`` was refused only at publishing, after the whole
    conversion; the secret was in the flow run's parameters, a task run's name and events."""
    given = {"SOURCE": s3_source, "--output": "s3://secrets-releases/models", "--work-dir": str(tmp_path / "work"),
             option: f"s3://{URI_KEY}:{URI_SECRET}@secrets-releases/models"}
    argv = ["convert", given.pop("SOURCE"), *(a for pair in given.items() for a in pair), "--quant", "Q4_K_M",
            "--no-validate"]
    runs = flow_run_count()
    assert main(argv) == 2
    out = capsys.readouterr()
    created = flow_run_count() - runs
    found = leaks({"stdout": out.out.encode(), "stderr": out.err.encode()})
    record("credentials", option=option, refused=int("credentials in the URI are not accepted" in out.err),
           flow_runs=created, leaked=len(found))
    assert "credentials in the URI are not accepted" in out.err and created == 0
    assert found == []


def test_no_credentials_reach_prefects_database(s3_source, tmp_path):
    """After the conversions and refusals above (and a Python caller's): the secrets appear nowhere in
    what Prefect stored."""
    from flows.params import ConvertParams

    with pytest.raises(So8tError):
        ConvertParams(source=s3_source, output=f"s3://{URI_KEY}:{URI_SECRET}@secrets-releases/models")
    time.sleep(6)  # events reach the database a few seconds after they happen
    blobs = prefect_database()
    found = leaks(blobs)
    record("secrets", places="Prefect's database (flow run parameters, task run names, logs, events)",
           checked=len(blobs), leaked=len(found))
    assert blobs and found == []
