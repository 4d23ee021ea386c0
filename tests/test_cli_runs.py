"""The command line running the pipeline: a bad tensor found mid-run, convert → inspect → validate, progress output."""

import json
import shutil

import numpy as np
import pytest
from support.checkpoints import copy, rewrite_tensor
from support.cli import assert_one_line_error, run

pytestmark = pytest.mark.e2e  # the CLI runs the flow (a temporary Prefect API each)


def test_nan_weights_found_during_the_pipeline(make_fixture, tmp_path):
    bad = copy(make_fixture(), tmp_path / "c")
    values = np.random.default_rng(0).standard_normal((128, 64))
    values[3, 5] = np.nan
    rewrite_tensor(bad, "model.layers.1.mlp.up_proj.weight", values)
    proc = run("convert", bad, "--output", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w"))
    assert_one_line_error(proc, "model.layers.1.mlp.up_proj.weight", "1 NaN/Inf values")
    assert not (tmp_path / "o").exists()


@pytest.mark.usefixtures("prefect_server")
def test_convert_inspect_and_validate_commands(make_fixture, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "out"
    assert main(["convert", make_fixture(), "--output", str(out), "--quant", "F32", "--name", "fx",
                 "--work-dir", str(tmp_path / "w")]) == 0
    text = capsys.readouterr().out
    assert "validated    F32" in text and "passed" in text and "fx-F32.gguf" in text
    from support.published import gguf_path
    assert "latest: " in text and str(out / "fx" / "latest.json") in text
    for target in (out / "fx", gguf_path(out, "fx", "F32").parent, gguf_path(out, "fx", "F32")):
        assert main(["chat", str(target), "--quant", "f32", "Hello", "--max-tokens", "2"]) == 0
        cut = capsys.readouterr()  # two tokens: the reply is cut, and says so
        assert cut.out.rstrip("\n").endswith(" […]") and "cut at 2 tokens (--max-tokens)" in cut.err
    assert main(["chat", str(out / "fx"), "--quant", "Q4_K_M", "Hello"]) == 2
    err = capsys.readouterr().err
    assert "no release of Q4_K_M (published: F32)" in err and "pass --quant" not in err
    out = gguf_path(out, "fx", "F32").parent
    assert main(["inspect", str(out / "fx-F32.gguf")]) == 0
    text = capsys.readouterr().out
    assert "gated layers       [0, 1]" in text and "blk.0.attn_output.weight" in text
    assert main(["validate", str(out / "fx-F32.gguf"), "--reference", make_fixture(), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["tensor_errors"]["max_relative_rmse"] == 0.0
    # A GGUF that does not belong to the reference is refused before anything is compared.
    assert main(["validate", str(out / "fx-F32.gguf"), "--reference", make_fixture(seed=5)]) == 2
    assert "converted from checkpoint " in capsys.readouterr().err


def test_convert_shows_progress_unless_quiet_or_json(make_fixture, tmp_path):
    src = make_fixture(layers=3, seed=9)
    common = ["--quant", "Q8_0", "Q4_K_M", "--no-validate", "--name", "fx", "--work-dir", str(tmp_path / "w")]
    shown = run("convert", src, "--output", str(tmp_path / "o1"), *common)
    assert shown.returncode == 0, shown.stderr
    stages = [line for line in shown.stderr.splitlines() if line.startswith("[")]
    assert any("s] fetching " in s for s in stages) and any("] quantized 30 tensors" in s for s in stages)
    assert any("] published Q4_K_M" in s for s in stages)
    assert "quantize: 100%|" in shown.stderr and "30/30 [" in shown.stderr  # the bar, with elapsed<remaining
    assert "latest: " in shown.stdout
    quiet = run("convert", src, "--output", str(tmp_path / "o2"), "--quiet", *common)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    as_json = run("convert", src, "--output", str(tmp_path / "o3"), "--json", *common)
    assert as_json.returncode == 0 and as_json.stderr == ""
    assert set(json.loads(as_json.stdout)["releases"]) == {"Q8_0", "Q4_K_M"}


def test_allow_tokenizer_mismatch_publishes_and_says_so(make_fixture, tmp_path):
    """A tokenizer llama.cpp does not reproduce (here: a lowercasing normalizer) is refused in the
    preflight; with --allow-tokenizer-mismatch it is converted, validated (the tokenizer check runs and
    is reported, not counted), and the card and the manifest state the mismatch."""
    from support.published import release

    from so8t_core.testing.tokenizers import fixture_tokenizer_files

    tj = json.loads(fixture_tokenizer_files(512)["tokenizer.json"])
    tj["normalizer"] = {"type": "Lowercase"}
    src = tmp_path / "ckpt"
    shutil.copytree(make_fixture(layers=1, vocab=520), src)
    (src / "tokenizer.json").write_text(json.dumps(tj))
    out = tmp_path / "out"
    args = ["convert", str(src), "--output", str(out), "--quant", "F32", "--name", "fx", "--work-dir",
            str(tmp_path / "work")]
    assert_one_line_error(run(*args), "no llama.cpp pre-tokenizer reproduces")
    proc = run(*args, "--allow-tokenizer-mismatch")
    assert proc.returncode == 0, proc.stderr
    rel = release(out, "fx", "F32")
    manifest = json.loads((rel / "manifest.json").read_text())
    assert manifest["tokenizer_mismatch"]["parity"]["ok"] is False
    assert manifest["validation"]["passed"] and manifest["validation"]["tokenizer"]["allowed"]
    assert "llama.cpp does not reproduce the Hugging Face tokenizer" in (rel / "README.md").read_text()


def test_library_notices_stay_off_the_console_unless_verbose(make_fixture, tmp_path, s3_endpoint):
    import uuid

    import boto3

    from so8t_core.assemble.sequential import convert_sequential
    from so8t_core.source.checkpoint import Checkpoint

    bucket = f"pub-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    common = ["--output", f"s3://{bucket}/m", "--quant", "F32", "--no-validate", "--work-dir", str(tmp_path / "w")]
    quiet = run("convert", make_fixture(), *common)
    assert quiet.returncode == 0 and "Found credentials" not in quiet.stderr, quiet.stderr
    verbose = run("convert", make_fixture(), *common, "-v")  # the S3 client does say it: shown when asked
    assert verbose.returncode == 0 and "Found credentials" in verbose.stderr
    # transformers advises on LongRoPE configs when validation builds the reference: not a user's concern.
    src = make_fixture(arch="phi3", longrope=True)
    gguf = str(tmp_path / "phi3-F32.gguf")
    convert_sequential(Checkpoint.open(src), "F32", gguf, str(tmp_path / "w"))
    validated = run("validate", gguf, "--reference", src)
    assert validated.returncode == 0 and validated.stderr == "", validated.stderr
