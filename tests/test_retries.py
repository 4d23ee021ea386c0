"""Storage and network steps retry with backoff; a deterministic failure of the input does not."""

import pytest
from prefect import flow

import so8t_core.storage as storage
from so8t_core.errors import CheckpointError
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
