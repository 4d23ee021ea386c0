"""The command line as a user meets it: bad input gives one line and exit 2, never a traceback."""

import json
import os
import struct
import subprocess

import numpy as np
import pytest
from support.checkpoints import copy, rewrite_tensor
from support.cli import BIN, assert_one_line_error, run


def test_missing_config(make_fixture, tmp_path):
    bad = copy(make_fixture(), tmp_path / "c")
    os.remove(os.path.join(bad, "config.json"))
    assert_one_line_error(run("convert", bad, "--output", str(tmp_path / "o")), "missing config.json")


def test_missing_shard(make_fixture, tmp_path):
    bad = copy(make_fixture(shards=2), tmp_path / "c")
    os.remove(os.path.join(bad, "model-00001-of-00002.safetensors"))
    assert_one_line_error(run("convert", bad), "model-00001-of-00002.safetensors", "missing shard")


def test_truncated_safetensors(make_fixture, tmp_path):
    bad = copy(make_fixture(), tmp_path / "c")
    path = os.path.join(bad, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)
    assert_one_line_error(run("convert", bad), "model.safetensors", "truncated")


def test_wrong_theta_shape(make_fixture, tmp_path):
    bad = copy(make_fixture(), tmp_path / "c")
    index_free = os.path.join(bad, "model.safetensors")
    data = bytearray(open(index_free, "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["model.layers.1.self_attn.so8t_rotation_gate.theta"]["shape"] = [4, 8, 16]  # same bytes, wrong shape
    h = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(h) == n
    open(index_free, "wb").write(data[:8] + h + data[8 + n:])
    assert_one_line_error(run("analyze", bad), "so8t_rotation_gate.theta has shape [4, 8, 16]", "expected [8, 8, 8]")


def test_non_orthogonal_rotation(make_fixture, tmp_path):
    bad = copy(make_fixture(rotation="expm"), tmp_path / "c")
    rewrite_tensor(bad, "model.layers.0.self_attn.so8t_rotation_gate.theta",
                   1e12 * np.random.default_rng(0).standard_normal((8, 8, 8)))
    assert_one_line_error(run("convert", bad), "does not give a rotation")


def test_fake_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text(json.dumps({"format": "gguf", "tensors": {}}))
    assert_one_line_error(run("inspect", str(fake)), "not a GGUF file", "looks like JSON")


@pytest.mark.parametrize("args, fragment", [
    (["convert", "--target-bpw", "abc"], "argument --target-bpw: invalid float value: 'abc'"),
    (["convert", "--engine", "gpu"], "invalid choice: 'gpu'"),
    (["convert", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["inspect"], "the following arguments are required: MODEL"),
    (["frob"], "invalid choice: 'frob'"),
])
def test_what_argparse_refuses_is_one_line_too(args, fragment):
    assert_one_line_error(run(*args), fragment)


def test_unknown_and_non_storage_quant_types(make_fixture):
    assert_one_line_error(run("convert", make_fixture(), "--quant", "Q8_K"), "not a file type", "Q8_0")
    assert_one_line_error(run("convert", make_fixture(), "--quant", "Q3_BOGUS"), "unknown")


def test_mixes_llama_quantize_refuses_are_refused_before_any_work(make_fixture, tmp_path):
    from support.llama_cpp_oracle import FIXTURES

    out = tmp_path / "o"
    proc = run("convert", make_fixture(**FIXTURES["llama-256"]), "--quant", "Q4_K_M", "iq2_xs", "--output", str(out))
    assert_one_line_error(proc, "--quant IQ2_XS", "refuses IQ2_XS without an importance matrix", "--calibration",
                          "builtin", "--imatrix")
    # rows of 64: Q1_0's blocks of 128 do not fit, and llama.cpp defines no fallback for them
    assert_one_line_error(run("convert", make_fixture(), "--quant", "Q1_0", "--output", str(out)),
                          "rows of 64, not a multiple of Q1_0's 128")
    assert not out.exists()


def test_a_reader_that_goes_away_ends_the_command_quietly(make_fixture):
    # `so8t-gguf analyze … | head`: stdout's reader is gone before anything is written.
    proc = subprocess.Popen([BIN, "analyze", make_fixture(layers=1), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert stderr == ""


def test_a_missing_model_does_not_exist(tmp_path, s3_endpoint):
    for missing in (str(tmp_path / "nothing.gguf"), str(tmp_path / "no-folder"), "s3://no-such-bucket-here/m.gguf"):
        assert_one_line_error(run("inspect", missing), f"{missing}: does not exist")
        assert_one_line_error(run("chat", missing, "hi"), f"{missing}: does not exist")
        assert_one_line_error(run("heads", missing, missing, "hi"), f"{missing}: does not exist")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # the model is there, the sidecar is not
    sidecar = str(tmp_path / "m.so8t-heads.gguf")
    assert_one_line_error(run("heads", str(gguf), sidecar, "hi"), f"{sidecar}: does not exist")


def test_a_quant_not_published_names_the_published_ones(tmp_path):
    model = tmp_path / "fx"
    model.mkdir()
    (model / "latest.json").write_text(json.dumps({"model": "fx", "quants": {"F32": {
        "source_fingerprint": "a" * 64, "release": "aaaaaaaaaaaaaaaa/F32/", "gguf": "fx-F32.gguf"}}}))
    proc = run("inspect", str(model), "--quant", "q4_k_m")
    assert_one_line_error(proc, "no release of Q4_K_M (published: F32)", "choose one of F32")
    assert "pass --quant" not in proc.stderr
    assert_one_line_error(run("chat", str(model), "hi", "--quant", "q4_k"), "no release of Q4_K_M")  # the alias
    assert_one_line_error(run("chat", str(model), "hi"), "which quant? (published: F32)", "pass --quant F32")


def test_validate_against_another_checkpoint_says_so(make_fixture, tmp_path):
    from so8t_core.assemble.sequential import convert_sequential
    from so8t_core.source.checkpoint import Checkpoint

    gguf = str(tmp_path / "fx-F32.gguf")
    fp = convert_sequential(Checkpoint.open(make_fixture()), "F32", gguf, str(tmp_path / "w")).source.fingerprint
    other = make_fixture(layers=3, hidden=128, heads=8, seed=5)  # other shapes: compared, they would not fit
    assert_one_line_error(run("validate", gguf, "--reference", other), f"converted from checkpoint {fp[:16]}…",
                          f"not from {other}", "pass the checkpoint it was converted from as --reference")


def test_fixture_and_demo_checkpoint_write_only_into_new_or_empty_folders(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "notes.txt").write_text("mine")
    for command in ("fixture", "demo-checkpoint"):
        assert_one_line_error(run(command, str(model)), f"{model}: is not empty (2 entries: config.json, notes.txt)",
                              "pass --force")
        assert sorted(p.name for p in model.iterdir()) == ["config.json", "notes.txt"]  # untouched
        (tmp_path / "a-file").write_text("x")
        assert_one_line_error(run(command, str(tmp_path / "a-file")), "a-file: is a file, not a folder")
        assert_one_line_error(run(command, str(tmp_path / "a-file" / "m")), "a-file: is a file, not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("fixture", str(empty)).returncode == 0
    forced = run("fixture", str(model), "--force", "--layers", "1")
    assert forced.returncode == 0, forced.stderr
    assert "notes.txt" not in {p.name for p in model.iterdir()}  # replaced, not mixed
    assert json.loads((model / "config.json").read_text())["num_hidden_layers"] == 1


def test_inspect_names_the_file_type_sums_up_the_types_and_reads_a_sidecar(make_fixture, tmp_path):
    from so8t_core.analysis import checkpoint_model
    from so8t_core.assemble.sequential import convert_sequential
    from so8t_core.assemble.sidecar import assemble_heads_sidecar
    from so8t_core.source.checkpoint import Checkpoint

    ckpt = Checkpoint.open(make_fixture())
    gguf = str(tmp_path / "fx-Q8_0.gguf")
    fp = convert_sequential(ckpt, "Q8_0", gguf, str(tmp_path / "w")).source.fingerprint
    shown = run("inspect", gguf)
    assert shown.returncode == 0, shown.stderr
    assert "file type MOSTLY_Q8_0 (the Q8_0 mix)" in shown.stdout.splitlines()[0]
    assert "  general.file_type = 7 (MOSTLY_Q8_0)" in shown.stdout
    # One row per type: the 2-D weights in Q8_0 at 8.5 bits, the norms in F32.
    rows = [line.split() for line in shown.stdout.splitlines() if line.startswith(("Q8_0 ", "F32 "))][:2]
    assert rows == [["Q8_0", "16", "122,880", "130,560", "8.50"], ["F32", "5", "320", "1,280", "32.00"]]
    template = next(line for line in shown.stdout.splitlines() if line.startswith("  tokenizer.chat_template = "))
    assert "\\n" in template  # the template's line breaks, escaped: one line per key
    report = json.loads(run("inspect", gguf, "--json").stdout)
    assert report["file_type"] == {"value": 7, "name": "MOSTLY_Q8_0", "mix": "Q8_0"}
    assert {r["type"]: r["tensors"] for r in report["tensor_types"]} == {"Q8_0": 16, "F32": 5}
    sidecar = str(tmp_path / "fx.so8t-heads.gguf")
    assemble_heads_sidecar(sidecar, ckpt, checkpoint_model(ckpt)[1], "fx", fp)
    heads = run("inspect", sidecar)
    assert heads.returncode == 0 and "None" not in heads.stdout, heads.stdout
    assert "triality heads     ['safety', 'authority']" in heads.stdout and f"source fingerprint {fp}" in heads.stdout


def test_a_memory_cap_below_the_floor_is_refused_before_any_work(make_fixture, tmp_path):
    work = tmp_path / "w"
    proc = run("convert", make_fixture(), "--max-memory", "1", "--output", str(tmp_path / "o"), "--work-dir", str(work))
    assert_one_line_error(proc, "--max-memory 1: too small: a conversion needs at least 1.1 GB",
                          "1.0 GB for the process", "allow at least --max-memory 1.1")
    assert not work.exists()
