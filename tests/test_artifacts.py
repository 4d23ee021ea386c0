"""Every run leaves artifacts in Prefect: progress, per-tensor stats tables, a summary, release links."""

import json
import os

import pytest
from support.artifacts import run_artifacts

from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.errors import ValidationError
from so8t_core.publish.report import artifact_key
from so8t_core.storage import redact_uri

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]


def test_a_run_reports_progress_stats_summary_and_links(make_fixture, tmp_path):
    state = convert(ConvertParams(source=make_fixture(layers=2), output=str(tmp_path / "out"), quants=["F32", "Q8_0"],
                                  work_dir=str(tmp_path / "w"), name="fx"), return_state=True)
    result = state.result()
    arts = run_artifacts(state.state_details.flow_run_id)
    assert sorted(arts) == ["markdown", "progress", "table"]  # Prefect stores link artifacts as markdown
    (progress,) = arts["progress"]
    assert progress.key == "fx-quantize-progress" and float(progress.data) == 100.0
    tables = {a.key: json.loads(a.data) if isinstance(a.data, str) else a.data for a in arts["table"]}
    assert set(tables) == {"fx-f32-tensor-stats", "fx-q8-0-tensor-stats"}
    rows = {r["tensor"]: r for r in tables["fx-q8-0-tensor-stats"]}
    assert len(rows) == 2 * 9 + 3 and rows["blk.0.attn_q.weight"]["type"] == "Q8_0"
    assert rows["blk.0.attn_q.weight"]["bits/weight"] == 8.5 and rows["output_norm.weight"]["SNR dB"] == "inf"
    markdown = {a.key: a.data for a in arts["markdown"]}
    text = markdown.pop("fx-summary")
    assert text.startswith("# fx: converted")
    assert result["fingerprint"] in text and "| Q8_0 | 21 |" in text and "passed" in text and "same ids" in text
    assert f"{result['validation']['Q8_0']['llama_cpp']['mean_kld']:.3g}" in text
    assert result["releases"]["Q8_0"]["uri"] in text
    # Bits per weight: one definition (tensor data / weights) in the summary, the model card and inspect.
    from so8t_core.validate.inspection import inspect_gguf

    files = result["releases"]["Q8_0"]["files"]
    card = open(files["README.md"]["uri"]).read()
    in_summary = next(line for line in text.splitlines() if line.startswith("| Q8_0 |")).split(" | ")[3]
    in_card = next(line for line in card.splitlines() if line.startswith("| `fx-Q8_0.gguf` |")).split(" | ")[2]
    assert in_summary == in_card == f"{inspect_gguf(files['fx-Q8_0.gguf']['uri'])['bits_per_weight']:.2f}"
    for q in ("f32", "q8-0"):
        plots = markdown.pop(f"fx-{q}-plots")
        assert plots.count("](data:image/png;base64,iVBOR") == 2  # two inline PNGs
    # A local release is its absolute path, as text: Prefect takes no file:// link. The link is to the
    # version this run published (immutable), inside the release folder.
    assert markdown == {f"fx-{q.lower().replace('_', '-')}-release":
                        f"**fx {q} release**: `{result['releases'][q]['version']}`" for q in ("F32", "Q8_0")}
    for q in ("F32", "Q8_0"):
        assert result["releases"][q]["version"].startswith(result["releases"][q]["uri"] + "/v-")


def test_a_failed_validation_says_why_in_the_summary(make_fixture, tmp_path, f32_validation_fails):
    state = convert(ConvertParams(source=make_fixture(layers=2), output=str(tmp_path / "out"), quants=["F32"],
                                  work_dir=str(tmp_path / "w"), name="fx"), return_state=True)
    assert state.is_failed()
    with pytest.raises(ValidationError):
        state.result()
    text = {a.key: a.data for a in run_artifacts(state.state_details.flow_run_id)["markdown"]}["fx-summary"]
    assert text.startswith("# fx: FAILED") and "Nothing was published." in text
    assert "Validation failed: F32: llama_cpp" in text and "| FAILED: llama_cpp |" in text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_uris_in_reports_carry_no_credentials():
    assert redact_uri("s3://AKIAXXXX:s3cr3t@bucket/models/x?X-Amz-Signature=abc") == "s3://bucket/models/x"
    assert redact_uri("https://user:pw@host:9000/b/k") == "https://host:9000/b/k"
    assert redact_uri("/local/path") == "/local/path"
    assert artifact_key("SmolLM2_135M", "Q4_K_M", "tensor-stats") == "smollm2-135m-q4-k-m-tensor-stats"


def test_the_deployment_s_run_shows_the_summary_and_where_the_releases_are(make_fixture, tmp_path, monkeypatch):
    """After "Submit" the UI opens the convert-model run, not its convert subflow: that run carries
    the summary and the releases too. A relative destination is shown as the absolute folder."""
    from flows.convert_model import convert_model

    monkeypatch.chdir(tmp_path)
    state = convert_model(ConvertParams(source=make_fixture(layers=2), output="rel-out", quants=["Q8_0"],
                                        run_validation=False, work_dir=str(tmp_path / "w"), name="fx"),
                          return_state=True)
    result = state.result()
    markdown = {a.key: a.data for a in run_artifacts(state.state_details.flow_run_id).get("markdown", [])}
    assert set(markdown) == {"fx-summary", "fx-q8-0-release"}
    assert markdown["fx-summary"].startswith("# fx: converted")
    where = os.path.abspath(result["releases"]["Q8_0"]["version"])  # the version this run published
    assert where.startswith(str(tmp_path / "rel-out" / "fx" / result["fingerprint"][:16] / "Q8_0" / "v-"))
    assert markdown["fx-q8-0-release"] == f"**fx Q8_0 release**: `{where}`" and os.path.isdir(where)


def test_the_deployment_s_run_says_why_a_conversion_failed(make_fixture, tmp_path, f32_validation_fails):
    from flows.convert_model import convert_model

    state = convert_model(ConvertParams(source=make_fixture(layers=2), output=str(tmp_path / "out"), quants=["F32"],
                                        work_dir=str(tmp_path / "w"), name="fx"), return_state=True)
    assert state.is_failed()
    with pytest.raises(ValidationError):
        state.result()
    markdown = {a.key: a.data for a in run_artifacts(state.state_details.flow_run_id).get("markdown", [])}
    assert set(markdown) == {"fx-summary"} and markdown["fx-summary"].startswith("# fx: FAILED")
