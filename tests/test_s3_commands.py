"""Every command that reads a published model takes any fsspec URL: chat, inspect, validate and
heads on a release on S3 (a GGUF, its release folder, its model folder), downloaded once into the
cache and checked against the release's manifest."""

import json
import os

import boto3
import fsspec
import pytest

from flows.cli import main
from flows.convert import convert
from flows.params import ConvertParams
from so8t_core import storage

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def published(s3_endpoint, make_fixture, tmp_path_factory):
    """(checkpoint, local output, S3 output, the release's version folder below them): a fixture
    converted to F32 in a split set of two files, published locally and copied as it is to a bucket."""
    src = make_fixture(layers=2, seed=21)
    out = tmp_path_factory.mktemp("published")
    result = convert(ConvertParams(source=src, output=str(out), quants=["F32"], name="fx", split_max_tensors=12,
                                   work_dir=str(tmp_path_factory.mktemp("w"))))
    boto3.client("s3").create_bucket(Bucket="served")
    fsspec.filesystem("s3").put(str(out) + "/", "served/models/", recursive=True)
    release = os.path.relpath(result["releases"]["F32"]["version"], out)  # <fp>/F32/v-<id>: the files' folder
    return src, str(out), "s3://served/models", release


def output(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_command_reads_a_release_on_s3(published, capsys, monkeypatch):
    src, local, remote, release = published
    shard = "fx-F32-00001-of-00002.gguf"
    local_inspect = json.loads(output(capsys, "inspect", f"{local}/{release}/{shard}", "--json")[1])
    downloads = []
    real = storage.download_file
    monkeypatch.setattr(storage, "download_file", lambda uri, to: downloads.append(uri) or real(uri, to))
    # A file, its version folder, the release folder (through current.json), the model folder.
    for model in (f"{remote}/{release}/{shard}", f"{remote}/{release}", f"{remote}/{os.path.dirname(release)}",
                  f"{remote}/fx"):
        code, out, err = output(capsys, "inspect", model, "--quant", "f32", "--json")
        assert code == 0, err
        report = json.loads(out)
        assert {k: v for k, v in report.items() if k != "path"} == {k: v for k, v in local_inspect.items()
                                                                     if k != "path"}
    # Both shards of the set, each once: the other commands find them in the cache.
    assert sorted(downloads) == [f"{remote}/{release}/fx-F32-0000{i}-of-00002.gguf" for i in (1, 2)]
    code, out, err = output(capsys, "chat", f"{remote}/fx", "--quant", "F32", "Hello", "--max-tokens", "2")
    assert code == 0 and out.strip(), err
    code, out, err = output(capsys, "validate", f"{remote}/{release}", "--reference", src, "--json")
    assert code == 0 and json.loads(out)["passed"], err
    code, out, err = output(capsys, "heads", f"{remote}/{release}", f"{remote}/{release}/fx.so8t-heads.gguf",
                            "Hello", "--json")
    assert code == 0 and set(json.loads(out)) >= {"safety", "authority"}, err
    assert len(downloads) == 3  # and the sidecar, once


def test_a_download_that_does_not_match_the_manifest_is_refused(published, capsys, tmp_path, monkeypatch):
    _, local, remote, release = published
    monkeypatch.setenv("SO8T_GGUF_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("s3")
    target = f"served/models/{release}/fx.so8t-heads.gguf"
    original = fs.cat_file(target)
    fs.pipe_file(target, original[:-1] + bytes([original[-1] ^ 1]))  # one bit: same size, other sha256
    try:
        code, _, err = output(capsys, "inspect", f"{remote}/{release}/fx.so8t-heads.gguf")
    finally:
        fs.pipe_file(target, original)
    assert code == 2 and "does not match the release's manifest.json" in err and "Traceback" not in err
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing unverified kept
