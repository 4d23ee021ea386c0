"""A conversion through an unreliable object store: one request in five fails (HTTP 500, 503,
a connection reset mid-response, or a slow answer), on reads and writes alike. The run
completes, and its release is byte-identical to a clean run's."""

from __future__ import annotations

import hashlib

import boto3
import fsspec
import pytest
import s3fs
from support.faulty_s3 import FAULT_KINDS, FaultyS3Proxy
from support.reliability_record import record

from flows.convert import convert
from flows.params import ConvertParams

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]
FAULT_SHARE = 0.2


def release_hashes(root: str) -> dict[str, str]:
    """sha256 of every object under ``root`` (bucket/prefix), by path below it."""
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return {p[len(root):].lstrip("/"): hashlib.sha256(fs.cat_file(p)).hexdigest() for p in fs.find(root)}


@pytest.fixture
def through_proxy(s3_endpoint, monkeypatch):
    """Every S3 request of the code under test goes through a proxy failing FAULT_SHARE of them."""
    with FaultyS3Proxy(s3_endpoint, share=FAULT_SHARE, seed=6) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()  # clients made before keep the old endpoint
        yield proxy
    s3fs.S3FileSystem.clear_instance_cache()


def test_conversion_through_a_failing_store_matches_a_clean_run(s3_endpoint, make_fixture, tmp_path, request):
    s3 = boto3.client("s3")
    for bucket in ("faults-ckpts", "faults-clean", "faults-faulty"):
        s3.create_bucket(Bucket=bucket)
    local = make_fixture(shards=2, seed=6)
    fsspec.filesystem("s3").put(local + "/", "faults-ckpts/fx/", recursive=True)
    source = "s3://faults-ckpts/fx"

    clean = convert(ConvertParams(source=source, output="s3://faults-clean/models", quants=["Q4_K_M"],
                                  work_dir=str(tmp_path / "clean")))
    proxy = request.getfixturevalue("through_proxy")
    faulty = convert(ConvertParams(source=source, output="s3://faults-faulty/models", quants=["Q4_K_M"],
                                   work_dir=str(tmp_path / "faulty")))  # a fresh work dir: every shard is read again
    requests, faults = proxy.requests, dict(proxy.faults)
    s3fs.S3FileSystem.clear_instance_cache()

    assert faulty["validation"]["Q4_K_M"]["passed"] and faulty["fingerprint"] == clean["fingerprint"]
    assert set(faults) == set(FAULT_KINDS) and 0.1 < sum(faults.values()) / requests < 0.3, (faults, requests)
    expected = release_hashes("faults-clean/models")
    assert len(expected) >= 9 and "fx/latest.json" in expected
    identical = release_hashes("faults-faulty/models") == expected
    record("faults", requests=requests, faults=faults, share=FAULT_SHARE, runs=1, identical=int(identical))
    assert identical
