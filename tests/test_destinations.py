"""A destination that cannot be written is refused before any work, in one line; storage errors
that retrying cannot change are one-line errors that are not retried."""

import time
import uuid
from types import SimpleNamespace

import boto3
import pytest
from support.cli import assert_one_line_error, run
from support.readonly import read_only_folder

from so8t_core import storage
from so8t_core.errors import StorageAccessError, StorageError
from tasks.common import retry_transient


def refused_before_work(make_fixture, tmp_path, output: str, *fragments: str) -> None:
    work = tmp_path / "work"
    started = time.monotonic()
    proc = run("convert", make_fixture(), "--output", output, "--quant", "F32", "--work-dir", str(work))
    assert_one_line_error(proc, *fragments)
    assert not work.exists()  # nothing fetched, nothing staged
    assert time.monotonic() - started < 60  # no Prefect start, no retries (about a second unloaded)


def test_an_output_that_is_a_file(make_fixture, tmp_path):
    (tmp_path / "releases").write_text("not a folder")
    refused_before_work(make_fixture, tmp_path, str(tmp_path / "releases"), "releases: is a file, not a folder")


def test_an_output_below_a_file(make_fixture, tmp_path):
    (tmp_path / "releases").write_text("not a folder")
    refused_before_work(make_fixture, tmp_path, str(tmp_path / "releases" / "models"),
                        f"{tmp_path / 'releases'}: is a file, not a folder")


def test_a_read_only_output_folder(make_fixture, tmp_path):
    with read_only_folder(tmp_path / "locked") as locked:
        refused_before_work(make_fixture, tmp_path, str(locked / "models"), str(locked), "cannot write there")
        assert list(locked.iterdir()) == []  # the probe left nothing


def test_a_missing_bucket(make_fixture, tmp_path, s3_endpoint):
    refused_before_work(make_fixture, tmp_path, "s3://no-such-bucket-here/models", "s3://no-such-bucket-here/models",
                        "bucket does not exist")


def test_credentials_the_store_does_not_know(make_fixture, tmp_path, s3_endpoint):
    from moto.core.authorization import enable_iam_authentication

    bucket = f"pub-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    with enable_iam_authentication():  # moto checks keys against its IAM users: ours is none of them
        refused_before_work(make_fixture, tmp_path, f"s3://{bucket}/models", "access denied",
                            "Access Key Id you provided does not exist", "AWS_ACCESS_KEY_ID")


def test_a_writable_destination_keeps_nothing_of_the_probe(tmp_path, s3_endpoint):
    storage.check_writable(str(tmp_path / "new" / "folder"))
    assert list(tmp_path.iterdir()) == []  # probed in the nearest folder that exists; nothing created
    bucket = f"pub-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    storage.check_writable(f"s3://{bucket}/models")
    assert boto3.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_writes_that_cannot_succeed_are_access_errors(tmp_path, s3_endpoint):
    (tmp_path / "file").write_text("x")
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF")
    with pytest.raises(StorageAccessError, match="is a file, not a folder"):
        storage.upload_file(str(source), str(tmp_path / "file" / "m" / "m.gguf"))
    with pytest.raises(StorageAccessError, match="bucket does not exist"):
        storage.upload_file(str(source), "s3://no-such-bucket-here/m/m.gguf")
    with pytest.raises(StorageAccessError, match="bucket does not exist"):
        storage.write_bytes_atomic("s3://no-such-bucket-here/m/latest.json", b"{}")


def test_tasks_retry_transient_storage_errors_only():
    def retried(exc: BaseException) -> bool:
        return retry_transient(None, None, SimpleNamespace(data=exc))

    assert retried(StorageError("s3://b/x", "verification failed after upload"))
    assert retried(ConnectionResetError("connection reset by peer"))
    assert not retried(StorageAccessError("s3://b/x", "access denied"))
