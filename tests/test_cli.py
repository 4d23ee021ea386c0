"""The command line as a user meets it: bad input gives one line and exit 2, never a traceback."""

import json
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

BIN = os.path.join(os.path.dirname(sys.executable), "so8t-gguf")


PROGRESS_LINE = re.compile(r"^(\[\s*\d+\.\ds\] |quantize: )")


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # As from a user's shell: the test session's Prefect log level is not inherited.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_LEVEL"}
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    # Progress (a line per stage, the tensor bar) may come before the error: the error is one line.
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("so8t-gguf: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "(hint: " in lines[0]


def copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def rewrite_tensor(folder: str, name: str, values: np.ndarray) -> None:
    """Overwrite one tensor's bytes in place (same dtype and size)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    shard = json.load(open(index))["weight_map"][name] if os.path.exists(index) else "model.safetensors"
    path = os.path.join(folder, shard)
    data = bytearray(open(path, "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    start, end = json.loads(data[8:8 + n])[name]["data_offsets"]
    raw = values.astype(np.float32).tobytes()
    assert len(raw) == end - start
    data[8 + n + start:8 + n + end] = raw
    open(path, "wb").write(bytes(data))


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


def test_nan_weights_found_during_the_pipeline(make_fixture, tmp_path):
    bad = copy(make_fixture(), tmp_path / "c")
    values = np.random.default_rng(0).standard_normal((128, 64))
    values[3, 5] = np.nan
    rewrite_tensor(bad, "model.layers.1.mlp.up_proj.weight", values)
    proc = run("convert", bad, "--output", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w"))
    assert_one_line_error(proc, "model.layers.1.mlp.up_proj.weight", "1 NaN/Inf values")
    assert not (tmp_path / "o").exists()


def test_fake_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text(json.dumps({"format": "gguf", "tensors": {}}))
    assert_one_line_error(run("inspect", str(fake)), "not a GGUF file", "looks like JSON")


def test_unknown_and_non_storage_quant_types(make_fixture):
    assert_one_line_error(run("convert", make_fixture(), "--quant", "Q8_K"), "not a file type", "Q8_0")
    assert_one_line_error(run("convert", make_fixture(), "--quant", "Q3_BOGUS"), "unknown")


@pytest.mark.usefixtures("prefect_server")
def test_convert_inspect_and_validate_commands(make_fixture, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "out"
    assert main(["convert", make_fixture(), "--output", str(out), "--quant", "F32", "--name", "fx",
                 "--work-dir", str(tmp_path / "w")]) == 0
    text = capsys.readouterr().out
    assert "validated    F32" in text and "passed" in text and "fx-F32.gguf" in text
    from published import gguf_path
    assert "latest: " in text and str(out / "fx" / "latest.json") in text
    for target in (out / "fx", gguf_path(out, "fx", "F32").parent, gguf_path(out, "fx", "F32")):
        assert main(["chat", str(target), "--quant", "F32", "Hello", "--max-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["chat", str(out / "fx"), "--quant", "Q4_K_M", "Hello"]) == 2
    assert "no release of Q4_K_M (published: F32)" in capsys.readouterr().err
    out = gguf_path(out, "fx", "F32").parent
    assert main(["inspect", str(out / "fx-F32.gguf")]) == 0
    text = capsys.readouterr().out
    assert "gated layers       [0, 1]" in text and "blk.0.attn_output.weight" in text
    assert main(["validate", str(out / "fx-F32.gguf"), "--reference", make_fixture(), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["tensor_errors"]["max_relative_rmse"] == 0.0
    # The validator notices a GGUF that does not belong to the reference.
    assert main(["validate", str(out / "fx-F32.gguf"), "--reference", make_fixture(seed=5)]) == 1


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


def test_a_reader_that_goes_away_ends_the_command_quietly(make_fixture):
    # `so8t-gguf analyze … | head`: stdout's reader is gone before anything is written.
    proc = subprocess.Popen([BIN, "analyze", make_fixture(layers=1), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert stderr == ""
