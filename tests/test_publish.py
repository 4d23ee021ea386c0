"""Publishing is atomic and idempotent, on a local folder and on a real S3 endpoint (moto, loopback).

A release is visible exactly when its manifest.json is there, and then every file it lists is
there with the listed size and sha256. These tests break publishing at each step and check
what a reader sees afterwards.
"""

import json

import pytest
from support.releases import FP_A, FP_B, listing, local_files, visible

from so8t_core import storage
from so8t_core.errors import StorageError
from so8t_core.publish import release as pub


def test_publish_then_republish_uploads_nothing(dest, tmp_path):
    files = local_files(tmp_path, "v1")
    release = pub.release_uri(dest, "m", FP_A, "Q4_K_M")
    assert release.endswith(f"m/{FP_A[:16]}/Q4_K_M")
    ref, uploaded = pub.publish_release(files, release, {"quant": "Q4_K_M"})
    assert uploaded == 3 and visible(release) == {n: {"sha256": r.sha256, "size": r.size} for n, r in files.items()}
    assert listing(release) == ["README.md", "m-Q4_K_M.gguf", "m-Q4_K_M.stats.parquet", "manifest.json"]
    assert json.loads(storage.read_bytes(ref.uri))["quant"] == "Q4_K_M"
    before = {n: storage.identity(storage.join(release, n)) for n in listing(release)}
    again, uploaded = pub.publish_release(files, release, {"quant": "Q4_K_M"})
    assert uploaded == 0 and again == ref
    assert {n: storage.identity(storage.join(release, n)) for n in listing(release)} == before
    # One file changes (e.g. the model card): only that one is uploaded.
    changed = dict(files, **local_files(tmp_path, "v2", names=("README.md",)))
    _, uploaded = pub.publish_release(changed, release, {"quant": "Q4_K_M"})
    assert uploaded == 1 and visible(release)["README.md"]["sha256"] == changed["README.md"].sha256


def test_latest_json_points_at_the_release_published_last(dest, tmp_path):
    for fp in (FP_A, FP_B):
        release = pub.release_uri(dest, "m", fp, "Q4_K_M")
        pub.publish_release(local_files(tmp_path, fp[:1]), release, {})
        pub.update_latest(dest, "m", {"Q4_K_M": {"source_fingerprint": fp, "release": f"{fp[:16]}/Q4_K_M/"}})
        pub.update_latest(dest, "m", {"Q8_0": {"source_fingerprint": FP_A, "release": f"{FP_A[:16]}/Q8_0/"}})
        assert pub.latest_release(dest, "m", "Q4_K_M") == release
    assert pub.read_latest(dest, "m")["quants"]["Q8_0"]["source_fingerprint"] == FP_A  # other quants kept
    assert pub.latest_release(dest, "m", "Q6_K") is None and pub.latest_release(dest, "other", "Q4_K_M") is None


class Boom(RuntimeError):
    pass


def fail_on(monkeypatch, function: str, call: int):
    """Make ``storage.<function>`` raise on its ``call``-th call (1-based)."""
    real, seen = getattr(storage, function), []

    def broken(*args, **kwargs):
        seen.append(args)
        if len(seen) == call:
            raise Boom(f"injected failure in {function}")
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, function, broken)


@pytest.mark.parametrize("where", ["upload", "verify", "move", "manifest"])
def test_a_failed_publish_leaves_the_previous_release_intact_and_nothing_half_visible(dest, tmp_path, monkeypatch,
                                                                                      where):
    old = pub.release_uri(dest, "m", FP_A, "Q4_K_M")
    pub.publish_release(local_files(tmp_path, "old"), old, {})
    pub.update_latest(dest, "m", {"Q4_K_M": {"release": f"{FP_A[:16]}/Q4_K_M/"}})
    old_files = visible(old)

    new = pub.release_uri(dest, "m", FP_B, "Q4_K_M")
    function, call = {"upload": ("upload_file", 2), "verify": ("sha256_of", 3), "move": ("move", 2),
                      "manifest": ("write_bytes_atomic", 1)}[where]
    fail_on(monkeypatch, function, call)
    with pytest.raises(Boom):
        pub.publish_release(local_files(tmp_path, "new"), new, {})
    monkeypatch.undo()
    assert visible(old) == old_files and pub.latest_release(dest, "m", "Q4_K_M") == old
    assert visible(new) is None  # no manifest: readers ignore it
    assert not [p for p in listing(new) if ".staging-" in p]  # staging cleaned up
    # The next attempt publishes it completely.
    files = local_files(tmp_path, "new")
    _, uploaded = pub.publish_release(files, new, {})
    assert visible(new) == {n: {"sha256": r.sha256, "size": r.size} for n, r in files.items()}


@pytest.mark.parametrize("where", ["upload", "verify"])
def test_a_failed_republish_of_the_same_release_keeps_the_old_one(dest, tmp_path, monkeypatch, where):
    """Same source, new bytes (an override changed): a failure before the commit changes nothing."""
    release = pub.release_uri(dest, "m", FP_A, "Q4_K_M")
    pub.publish_release(local_files(tmp_path, "old"), release, {})
    old_files = visible(release)
    fail_on(monkeypatch, *{"upload": ("upload_file", 3), "verify": ("sha256_of", 1)}[where])
    with pytest.raises(Boom):
        pub.publish_release(local_files(tmp_path, "new"), release, {})
    monkeypatch.undo()
    assert visible(release) == old_files
    assert listing(release) == ["README.md", "m-Q4_K_M.gguf", "m-Q4_K_M.stats.parquet", "manifest.json"]


def test_corrupted_upload_is_refused(dest, tmp_path, monkeypatch):
    """A store that silently changes bytes fails verification; the release is not committed."""
    real = storage.upload_file

    def corrupting(local, uri):
        real(local, uri)
        if uri.endswith(".gguf"):
            storage.write_bytes_atomic(uri, storage.read_bytes(uri)[:-1] + b"X")

    monkeypatch.setattr(storage, "upload_file", corrupting)
    release = pub.release_uri(dest, "m", FP_A, "Q4_K_M")
    with pytest.raises(StorageError, match="verification failed"):
        pub.publish_release(local_files(tmp_path, "v1"), release, {})
    assert visible(release) is None and listing(release) == []


def test_a_release_with_fewer_files_drops_the_old_ones(dest, tmp_path):
    release = pub.release_uri(dest, "m", FP_A, "F32")
    shards = ("m-F32-00001-of-00002.gguf", "m-F32-00002-of-00002.gguf", "README.md")
    pub.publish_release(local_files(tmp_path, "split", names=shards), release, {})
    pub.publish_release(local_files(tmp_path, "whole", names=("m-F32.gguf", "README.md")), release, {})
    assert listing(release) == ["README.md", "m-F32.gguf", "manifest.json"]


def test_an_unvalidated_run_does_not_replace_a_validated_release_of_the_same_bytes(dest, tmp_path):
    files = local_files(tmp_path, "v1")
    release = pub.release_uri(dest, "m", FP_A, "Q4_K_M")
    validated = {"quant": "Q4_K_M", "validation": {"passed": True, "mean_kld": 0.01}}
    ref, _ = pub.publish_release(files, release, validated)
    # The same GGUF and stats, a model card that says "not validated", no validation record.
    unvalidated = dict(files, **local_files(tmp_path, "v2", names=("README.md",)))
    again, uploaded = pub.publish_release(unvalidated, release, {"quant": "Q4_K_M", "validation": None})
    assert uploaded == 0 and again == ref
    assert pub.read_manifest(release)["validation"]["passed"]
    assert visible(release)["README.md"]["sha256"] == files["README.md"].sha256
    # Different bytes are a different model: published, validation or not.
    changed = dict(files, **local_files(tmp_path, "v3", names=("m-Q4_K_M.gguf",)))
    _, uploaded = pub.publish_release(changed, release, {"quant": "Q4_K_M", "validation": None})
    assert uploaded == 1 and pub.read_manifest(release)["validation"] is None
    # A failed validation is not worth keeping either.
    pub.publish_release(files, release, {"quant": "Q4_K_M", "validation": {"passed": False}})
    _, uploaded = pub.publish_release(unvalidated, release, {"quant": "Q4_K_M", "validation": None})
    assert uploaded == 1 and pub.read_manifest(release)["validation"] is None
