"""Publishing is atomic and idempotent, on a local folder and on a real S3 endpoint (moto, loopback).

A release is visible exactly when its current.json names a complete version (one whose
manifest.json is there), and then every file that manifest lists is there with the listed size
and sha256. A published version is never modified in place: readers see the old version or the
new one, never neither. These tests break publishing at each step and check what a reader sees
afterwards.
"""

import json
import os

import pytest
from support.releases import FP_A, FP_B, listing, local_files, version_listing, versions, visible
from support.reliability_record import record

from so8t_core import storage
from so8t_core.errors import So8tError, StorageError
from so8t_core.publish import release as pub


def test_publish_then_republish_uploads_nothing(dest, tmp_path):
    files = local_files(tmp_path, "v1")
    release = pub.release_uri(dest, "m", FP_A, "Q4_K_M")
    assert release.endswith(f"m/{FP_A[:16]}/Q4_K_M")
    ref, uploaded = pub.publish_release(files, release, {"quant": "Q4_K_M"})
    assert uploaded == 3 and visible(release) == {n: {"sha256": r.sha256, "size": r.size} for n, r in files.items()}
    assert version_listing(release) == ["README.md", "m-Q4_K_M.gguf", "m-Q4_K_M.stats.parquet", "manifest.json"]
    version = pub.version_name(storage.read_bytes(ref.uri))
    assert listing(release) == ["current.json", *(f"{version}/{n}" for n in version_listing(release))]
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
    assert visible(new) is None  # no pointer to a complete version: readers ignore it
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
    assert version_listing(release) == ["README.md", "m-Q4_K_M.gguf", "m-Q4_K_M.stats.parquet", "manifest.json"]


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
    assert version_listing(release) == ["README.md", "m-F32.gguf", "manifest.json"]


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


# --- A published version is never modified in place ------------------------------------------


def snapshot(folder: str) -> dict[str, bytes]:
    return {name: storage.read_bytes(storage.join(folder, name)) for name in listing(folder)}


def test_a_republish_never_modifies_the_published_version(dest, tmp_path):
    """Same release, new bytes (an override changed): a new version; the old one stays as it was
    (same bytes, same objects) until two later versions replaced it."""
    release = pub.release_uri(dest, "m", FP_A, "Q4_K_M")
    pub.publish_release(local_files(tmp_path, "v1"), release, {"v": 1})
    first = pub.current_version(release)
    before, identities = snapshot(first.folder), {n: storage.identity(storage.join(first.folder, n))
                                                  for n in listing(first.folder)}
    _, uploaded = pub.publish_release(dict(local_files(tmp_path, "v1"), **local_files(tmp_path, "v2",
                                                                                     names=("README.md",))),
                                      release, {"v": 2})
    second = pub.current_version(release)
    assert uploaded == 1 and second.name != first.name and second.manifest["v"] == 2
    assert snapshot(first.folder) == before  # the old version, readable as it was
    assert {n: storage.identity(storage.join(first.folder, n)) for n in listing(first.folder)} == identities
    assert versions(release) == sorted([first.name, second.name])
    pub.publish_release(local_files(tmp_path, "v3"), release, {"v": 3})
    third = pub.current_version(release)
    assert versions(release) == sorted([second.name, third.name])  # the one replaced stays; older ones go
    # Publishing the previous content again is switching back to it: nothing uploaded.
    _, uploaded = pub.publish_release(dict(local_files(tmp_path, "v1"), **local_files(tmp_path, "v2",
                                                                                     names=("README.md",))),
                                      release, {"v": 2})
    assert uploaded == 0 and pub.current_version(release).name == second.name


@pytest.mark.parametrize("where", ["move", "copy", "manifest", "pointer"])
def test_a_republish_failing_inside_its_commit_leaves_the_old_version_visible(dest, tmp_path, monkeypatch, where):
    """Readers see the old version or the new one, never neither: the code before versions removed
    the old manifest first, so a failure among the moves left no release at all."""
    release = pub.release_uri(dest, "m", FP_A, "Q4_K_M")
    pub.publish_release(local_files(tmp_path, "old"), release, {})
    old_files = visible(release)
    new = dict(local_files(tmp_path, "new", names=("m-Q4_K_M.gguf", "README.md")),
               **{"m-Q4_K_M.stats.parquet": local_files(tmp_path, "old")["m-Q4_K_M.stats.parquet"]})
    fail_on(monkeypatch, *{"move": ("move", 2), "copy": ("copy", 1), "manifest": ("write_bytes_atomic", 1),
                           "pointer": ("write_bytes_atomic", 2)}[where])
    with pytest.raises(Boom):
        pub.publish_release(new, release, {})
    monkeypatch.undo()
    assert visible(release) == old_files
    pub.publish_release(new, release, {})  # the next attempt completes the new version
    assert visible(release) == {n: {"sha256": r.sha256, "size": r.size} for n, r in new.items()}
    assert not [p for p in listing(release) if "/." in "/" + p]  # no staging or lock left


# --- Names that become paths --------------------------------------------------------------------


def plant(uri: str, data: bytes) -> None:
    fs, path = storage.resolve(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


@pytest.mark.parametrize("layout", ["before-versions", "version"])
def test_a_manifest_naming_files_outside_the_release_deletes_nothing_there(dest, tmp_path, layout):
    """Stale-file cleanup trusted the old manifest's names: one listing ``../../../../victim.txt``
    made the next publish of that release delete victim.txt, outside the destination."""
    release = pub.release_uri(dest, "m", FP_A, "Q4_K_M")
    victim = storage.join(dest.rsplit("/", 1)[0] if "://" in dest else os.path.dirname(dest), "victim.txt")
    plant(victim, b"not yours")
    escape = "/".join([".."] * 4) + "/victim.txt"  # from <dest>/m/<fp>/<quant>/ to beside <dest>
    manifest = json.dumps({"files": {escape: {"sha256": "0" * 64, "size": 9}}}).encode()
    if layout == "version":
        bad = "v-" + "0" * 16
        plant(storage.join(release, bad, "manifest.json"), manifest)
        plant(storage.join(release, "current.json"), json.dumps({"version": bad}).encode())
    else:
        plant(storage.join(release, "manifest.json"), manifest)
    rejected = pub.read_manifest(release) is None and visible(release) is None  # not a release
    for tag in ("one", "two"):
        pub.publish_release(local_files(tmp_path, tag), release, {})
    intact = storage.exists(victim) and storage.read_bytes(victim) == b"not yours"
    record("paths", attack=f"a {layout} manifest listing {escape} ({'s3' if '://' in dest else 'local'})",
           refused=int(rejected), outside=int(not intact))
    assert rejected and intact
    assert visible(release) is not None


def test_pointers_and_latest_entries_naming_paths_lead_nowhere(dest, tmp_path):
    release = pub.release_uri(dest, "m", FP_A, "Q4_K_M")
    pub.publish_release(local_files(tmp_path, "v1"), release, {})
    good = pub.current_version(release)
    plant(storage.join(release, "current.json"), json.dumps({"version": "../../../" + good.name}).encode())
    pointer_refused = pub.current_version(release) is None
    plant(storage.join(dest, "m", "latest.json"),
          json.dumps({"quants": {"Q4_K_M": {"release": "../../elsewhere/Q4_K_M/"}}}).encode())
    latest_refused = pub.latest_release(dest, "m", "Q4_K_M") is None
    backend = "s3" if "://" in dest else "local"
    record("paths", attack=f"current.json naming ../../../{good.name} ({backend})", refused=int(pointer_refused),
           outside=0)
    record("paths", attack=f"latest.json naming ../../elsewhere/Q4_K_M/ ({backend})", refused=int(latest_refused),
           outside=0)
    assert pointer_refused and latest_refused


def test_file_names_that_are_not_plain_or_differ_only_in_case_are_refused(dest, tmp_path):
    files = local_files(tmp_path, "v1")
    release = pub.release_uri(dest, "m", FP_A, "Q4_K_M")
    for bad in ("../x.gguf", "sub/x.gguf", ".hidden", "current.json", "manifest.json"):
        with pytest.raises(So8tError):
            pub.publish_release(dict(files, **{bad: files["README.md"]}), release, {})
    with pytest.raises(StorageError, match="differ only in letter case"):
        pub.publish_release(dict(files, **{"readme.md": files["README.md"]}), release, {})
    assert listing(release) == []
    for bad in ("../m", "m/x", "M/../m"):
        with pytest.raises(So8tError):
            pub.release_uri(dest, bad, FP_A, "Q4_K_M")


def test_a_symbolic_link_planted_in_a_release_is_not_written_through(tmp_path):
    dest, outside = tmp_path / "releases", tmp_path / "outside"
    outside.mkdir()
    files = local_files(tmp_path, "v1")
    release = pub.release_uri(str(dest), "m", FP_A, "Q4_K_M")
    version = pub.version_name(pub._json_bytes(pub.manifest_document(files, {})))
    os.makedirs(release)
    os.symlink(outside, os.path.join(release, version))
    with pytest.raises(StorageError, match="resolves outside its folder"):
        pub.publish_release(files, release, {})
    record("paths", attack="a version folder planted as a symbolic link out of the release", refused=1,
           outside=len(list(outside.iterdir())))
    assert list(outside.iterdir()) == []


def test_a_release_published_before_versions_is_read_then_replaced(dest, tmp_path):
    """The layout before versions (files and manifest.json in the release folder) still reads; a new
    publish makes a version of it, and the old files go once a second version replaced it."""
    release = pub.release_uri(dest, "m", FP_A, "Q4_K_M")
    old = local_files(tmp_path, "old")
    for name, ref in old.items():
        plant(storage.join(release, name), open(ref.uri, "rb").read())
    plant(storage.join(release, "manifest.json"), pub._json_bytes(pub.manifest_document(old, {})))
    assert visible(release) == {n: {"sha256": r.sha256, "size": r.size} for n, r in old.items()}
    pub.publish_release(local_files(tmp_path, "new"), release, {})
    assert "manifest.json" in listing(release)  # the replaced release stays for readers still reading it
    pub.publish_release(local_files(tmp_path, "newer"), release, {})
    assert [p for p in listing(release) if "/" not in p] == ["current.json"]
