"""Checkpoints on object storage in, releases to object storage out (a real S3 endpoint on loopback)."""

import hashlib
import json

import boto3
import fsspec
import numpy as np
import pytest

from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.source.checkpoint import Checkpoint

pytestmark = pytest.mark.e2e  #


@pytest.fixture(scope="module")
def s3_fixture(s3_endpoint, make_fixture):
    s3 = boto3.client("s3")
    for bucket in ("ckpts", "releases"):
        s3.create_bucket(Bucket=bucket)
    local = make_fixture(shards=2, position="post_o_proj", attention_bias=True)
    fsspec.filesystem("s3").put(local + "/", "ckpts/fx/", recursive=True)
    return local, "s3://ckpts/fx"


def test_checkpoint_on_s3_reads_like_the_local_copy(s3_fixture):
    local, remote = s3_fixture
    a, b = Checkpoint.open(local), Checkpoint.open(remote)
    assert set(a.tensors) == set(b.tensors) and len(b.shards) == 2
    for name in a.tensors:
        np.testing.assert_array_equal(a.read(name), b.read(name))
    assert Checkpoint.open("file://" + local).tensors.keys() == a.tensors.keys()


@pytest.mark.usefixtures("prefect_server")
def test_convert_from_s3_and_publish_to_s3(s3_fixture, tmp_path):
    _, remote = s3_fixture
    result = convert(ConvertParams(source=remote, output="s3://releases/models", quants=["F32"],
                                   work_dir=str(tmp_path / "w")))
    assert result["validation"]["F32"]["passed"]
    fs = fsspec.filesystem("s3")
    fp = result["fingerprint"]
    latest = json.loads(fs.cat_file("releases/models/fx/latest.json"))
    assert latest["quants"]["F32"] == {"source_fingerprint": fp, "release": f"{fp[:16]}/F32/", "gguf": "fx-F32.gguf"}
    assert result["releases"]["F32"]["uri"] == f"s3://releases/models/fx/{fp[:16]}/F32"
    release = result["releases"]["F32"]["version"].removeprefix("s3://")  # the version current.json names
    assert json.loads(fs.cat_file(f"releases/models/fx/{fp[:16]}/F32/current.json"))["version"] == \
        release.rsplit("/", 1)[1]
    manifest = json.loads(fs.cat_file(f"{release}/manifest.json"))
    assert "fx-F32.gguf" in manifest["files"] and manifest["source_fingerprint"] == fp
    for name, info in manifest["files"].items():
        data = fs.cat_file(f"{release}/{name}")
        assert len(data) == info["size"] and hashlib.sha256(data).hexdigest() == info["sha256"]
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(release)) == sorted([*manifest["files"], "manifest.json"])
    # The same run again: every task cached, nothing uploaded, the release untouched.
    etags = {p: fs.info(p)["ETag"] for p in fs.find(release)}
    again = convert(ConvertParams(source=remote, output="s3://releases/models", quants=["F32"],
                                  work_dir=str(tmp_path / "w")))
    assert again["releases"]["F32"]["uploaded"] == 0
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in fs.find(release)} == etags


@pytest.mark.usefixtures("prefect_server")
def test_credentials_never_reach_logs_artifacts_or_releases(s3_fixture, tmp_path, caplog):
    import logging
    import os

    from support.artifacts import run_artifacts

    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    _, remote = s3_fixture
    caplog.set_level(logging.DEBUG)
    state = convert(ConvertParams(source=remote, output="s3://releases/secrets", quants=["Q8_0"],
                                  work_dir=str(tmp_path / "w")), return_state=True)
    result = state.result()
    texts = [caplog.text, json.dumps(result, default=str)]
    texts += [a.data if isinstance(a.data, str) else json.dumps(a.data, default=str)
              for arts in run_artifacts(state.state_details.flow_run_id).values() for a in arts]
    fs = fsspec.filesystem("s3")
    texts += [fs.cat_file(p).decode("utf-8", "replace") for p in fs.find("releases/secrets")
              if not p.endswith((".gguf", ".parquet"))]
    assert len(texts) > 5
    for secret in secrets:
        assert not [t for t in texts if secret in t]
