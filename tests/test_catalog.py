"""The catalog flow: re-quantizes only what changed since the last published release."""

import asyncio
import json
import os

import numpy as np
import pytest
import yaml
from support.checkpoints import copy, rewrite_tensor

import so8t_core.source.checkpoint
import so8t_core.storage
import tasks.quantize
from flows.catalog import requantize_catalog
from flows.convert_model import convert_model

pytestmark = pytest.mark.e2e  #

# --- the catalog file ----------------------------------------------------------------------------



# --- the flows -----------------------------------------------------------------------------------


@pytest.fixture
def counters(monkeypatch):
    """What actually ran: quantize work (a cached task does not stage), uploads, tensor hashing."""
    seen = {"quantized": [], "uploaded": [], "hashed": []}
    stage, upload, sha = tasks.quantize.stage_tensor, so8t_core.storage.upload_file, \
        so8t_core.source.checkpoint.Checkpoint.tensor_sha256

    def staging(ckpt, item, *a, **kw):
        seen["quantized"].append(item.gguf_name)
        return stage(ckpt, item, *a, **kw)

    def uploading(local, uri):
        seen["uploaded"].append(uri)
        return upload(local, uri)

    def hashing(self, name):
        seen["hashed"].append(name)
        return sha(self, name)

    monkeypatch.setattr(tasks.quantize, "stage_tensor", staging)
    monkeypatch.setattr(so8t_core.storage, "upload_file", uploading)
    monkeypatch.setattr(so8t_core.source.checkpoint.Checkpoint, "tensor_sha256", hashing)

    def take():
        out = {k: list(v) for k, v in seen.items()}
        for v in seen.values():
            v.clear()
        return out

    return take


@pytest.fixture
def bucket(s3_endpoint):
    import boto3
    import fsspec

    boto3.client("s3").create_bucket(Bucket="catalog-tests")
    return fsspec.filesystem("s3")


def summary_artifact(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    artifacts = asyncio.run(read())
    (artifact,) = [a for a in artifacts if a.key == "catalog-nightly"]
    return artifact.data


@pytest.mark.usefixtures("prefect_server")
def test_catalog_runs_convert_only_what_changed(make_fixture, tmp_path, bucket, counters):
    a = copy(make_fixture(shards=2, seed=51), tmp_path / "a")
    b = copy(make_fixture(seed=52), tmp_path / "b")
    catalog = {"destination": "s3://catalog-tests/releases", "run_validation": False,
               "models": [{"name": "a", "source": a, "quants": ["Q8_0", "Q4_K_M"]}, {"name": "b", "source": b}]}
    bucket.pipe_file("catalog-tests/nightly.yaml", yaml.safe_dump(catalog).encode())
    url, work = "s3://catalog-tests/nightly.yaml", str(tmp_path / "work")

    first = requantize_catalog(url, work_dir=work)
    assert first["converted"] == {"a": {"Q8_0": "not published yet", "Q4_K_M": "not published yet"},
                                  "b": {"Q8_0": "not published yet"}}
    assert first["skipped"] == {} and first["failed"] == {}
    done = counters()
    assert len(done["quantized"]) == 2 * (2 * 9 + 3)  # two models, 2 layers x 9 + embedding, output, norm
    latest = {m: json.loads(bucket.cat_file(f"catalog-tests/releases/{m}/latest.json")) for m in "ab"}
    assert set(latest["a"]["quants"]) == {"Q8_0", "Q4_K_M"} and set(latest["b"]["quants"]) == {"Q8_0"}

    # Nothing changed: nothing quantized, uploaded, or even hashed again (shard identities unchanged).
    second = requantize_catalog(url, work_dir=work)
    assert second["converted"] == {} and second["failed"] == {}
    fp_a = latest["a"]["quants"]["Q8_0"]["source_fingerprint"]
    assert second["skipped"]["a"] == {q: f"up to date ({fp_a[:16]}/{q})" for q in ("Q8_0", "Q4_K_M")}
    assert set(second["skipped"]) == {"a", "b"}
    assert counters() == {"quantized": [], "uploaded": [], "hashed": []}

    # One tensor of one shard of model a changes: a dry run says so and does nothing...
    rewrite_tensor(a, "model.layers.1.mlp.down_proj.weight",
                   np.random.default_rng(7).standard_normal((64, 128)).astype(np.float32))
    plan = requantize_catalog(url, work_dir=work, dry_run=True)
    assert set(plan["would_convert"]) == {"a"} and set(plan["skipped"]) == {"b"}
    assert plan["would_convert"]["a"]["Q8_0"].startswith(f"source changed ({fp_a[:16]} -> ")
    done = counters()
    assert done["quantized"] == [] and done["uploaded"] == []
    changed_shard = set(done["hashed"])  # only the rewritten shard is read again
    assert "model.layers.1.mlp.down_proj.weight" in changed_shard
    assert len(changed_shard) < len(so8t_core.source.checkpoint.Checkpoint.open(a).tensors)

    # ...and the real run converts model a only, re-quantizing the one tensor that changed.
    third = requantize_catalog(url, work_dir=work)
    assert set(third["converted"]) == {"a"} and set(third["converted"]["a"]) == {"Q8_0", "Q4_K_M"}
    assert set(third["skipped"]) == {"b"}
    done = counters()
    assert done["quantized"] == ["blk.1.ffn_down.weight"]
    assert done["uploaded"] and all("/releases/a/" in u for u in done["uploaded"])
    assert done["hashed"] == []

    # b's release lost its manifest (an interrupted publish), and a model whose checkpoint is
    # gone joins the catalog: b is published again, the missing model fails, the run fails.
    fp_b = latest["b"]["quants"]["Q8_0"]["source_fingerprint"]
    pointer = f"catalog-tests/releases/b/{fp_b[:16]}/Q8_0/current.json"
    manifest = pointer.replace("current.json", json.loads(bucket.cat_file(pointer))["version"] + "/manifest.json")
    bucket.rm(manifest)
    catalog["models"].append({"name": "gone", "source": str(tmp_path / "gone")})
    bucket.pipe_file("catalog-tests/nightly.yaml", yaml.safe_dump(catalog).encode())
    state = requantize_catalog(url, work_dir=work, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "\n" not in message and message.startswith(f"catalog {url}: 1 of 3 model(s) failed: gone: "), message
    assert "not a checkpoint folder" in message
    done = counters()
    assert done["quantized"] == [] and done["uploaded"] and all("/releases/b/" in u for u in done["uploaded"])
    bucket.invalidate_cache()
    assert bucket.exists(manifest)
    report = summary_artifact(state.state_details.flow_run_id)
    assert "| b | Q8_0 | converted | release incomplete (no manifest.json) |" in report
    assert "| gone | | **failed** |" in report and "| a | Q4_K_M | skipped | up to date" in report
    # Each model's own card is linked: every quant it has published, with its quality.
    assert "## Model cards" in report and "- a: `s3://catalog-tests/releases/a/README.md`" in report
    assert "- b: `s3://catalog-tests/releases/b/README.md`" in report and "- gone:" not in report


@pytest.mark.usefixtures("prefect_server")
def test_a_bad_catalog_fails_the_run_with_one_line(tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text("destination: /d\nmodels:\n  - {name: a, source: /s, quants: [Q4_X]}\n")
    state = requantize_catalog(str(path), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "\n" not in message and message.startswith(f"catalog {path}: models[0].quants[0] (model a): 'Q4_X' is")
    path.write_text("destination: /d\nmodels:\n  - {name: a, source: /s}\n")
    state = requantize_catalog(str(path), models=["b"], return_state=True)
    assert state.is_failed() and str(state.result(raise_on_failure=False)) == \
        f"catalog {path}: no model named b (hint: models: a)"


@pytest.mark.usefixtures("prefect_server")
def test_the_convert_form_runs_convert(make_fixture, tmp_path):
    # As a deployment run submits it: a JSON object, validated into ConvertParams by Prefect.
    result = convert_model(params={"source": make_fixture(), "output": str(tmp_path / "out"), "quants": ["q8_0"],
                                   "run_validation": False, "name": "fx", "work_dir": str(tmp_path / "w")})
    assert set(result["releases"]) == {"Q8_0"}
    assert os.path.exists(os.path.join(result["releases"]["Q8_0"]["version"], "manifest.json"))
