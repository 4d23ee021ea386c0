"""Storage and network steps retry with backoff; a deterministic failure of the input does not."""

import pytest
from prefect import flow

import so8t_core.storage as storage
from so8t_core.errors import CheckpointError, StorageAccessError
from so8t_core.publish.release import read_manifest
from so8t_core.refs import file_ref
from tasks.fetch import fetch_checkpoint
from tasks.publish import publish_release

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]


def test_a_transient_storage_failure_is_retried(tmp_path, monkeypatch):
    local = tmp_path / "m.gguf"
    local.write_bytes(b"GGUF" * 100)
    calls, real = [], storage.upload_file

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            raise ConnectionResetError("connection reset by peer")  # what a flaky store does
        return real(src, dst)

    monkeypatch.setattr(storage, "upload_file", flaky)

    @flow
    def run():
        return publish_release({"m.gguf": file_ref(str(local))}, str(tmp_path / "dest" / "m" / "fp" / "Q8_0"), {})

    manifest, uploaded = run()
    assert len(calls) == 2 and uploaded == 1
    assert read_manifest(str(tmp_path / "dest" / "m" / "fp" / "Q8_0"))["files"].keys() == {"m.gguf"}


def test_a_bad_checkpoint_is_not_retried(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    opened = []
    import tasks.fetch

    real = tasks.fetch.Checkpoint.open
    monkeypatch.setattr(tasks.fetch.Checkpoint, "open", lambda *a, **k: opened.append(a) or real(*a, **k))

    @flow
    def run():
        return fetch_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "w"))

    with pytest.raises(CheckpointError):
        run()
    assert len(opened) == 1  # one attempt: retrying cannot fix the input


@pytest.mark.parametrize("where", ["below a file", "missing bucket"])
def test_a_destination_that_cannot_be_written_is_not_retried(tmp_path, monkeypatch, where, request):
    """Found at publish (the destination broke after the run's check): one attempt, one line."""
    local = tmp_path / "m.gguf"
    local.write_bytes(b"GGUF" * 100)
    if where == "below a file":
        (tmp_path / "dest").write_text("a file where the folder must be")
        release = str(tmp_path / "dest" / "m" / "fp" / "Q8_0")
    else:
        request.getfixturevalue("s3_endpoint")
        release = "s3://no-such-bucket-here/m/fp/Q8_0"
    calls, real = [], storage.upload_file
    monkeypatch.setattr(storage, "upload_file", lambda src, dst: calls.append(dst) or real(src, dst))

    @flow
    def run():
        return publish_release({"m.gguf": file_ref(str(local))}, release, {})

    with pytest.raises(StorageAccessError) as failed:
        run()
    assert len(calls) == 1  # retrying cannot create the bucket or move the file away
    assert "\n" not in str(failed.value) and "(hint: " in str(failed.value)
