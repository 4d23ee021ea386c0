"""Caching and resume: a re-run quantizes nothing, a change re-quantizes only what it touches, and a
run killed with SIGKILL finishes on the next start with byte-identical output."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from support.checkpoints import copy, rewrite_tensor
from support.published import release

from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.plan import quantize_batches

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]


def contents(release: dict) -> dict:
    """A release's files by name: sha256 and size (their URIs differ per destination)."""
    return {n: (f["sha256"], f["size"]) for n, f in release["files"].items()}


def run(src, out, work, **kw):
    return convert(ConvertParams(source=src, output=str(out), quants=["Q8_0", "Q4_K_M"], run_validation=False,
                                 work_dir=str(work), name="fx", **kw))


def test_rerun_executes_no_quantize_task_and_changes_redo_only_what_they_touch(make_fixture, tmp_path, quantize_calls):
    src = copy(make_fixture(layers=3, hidden=256, heads=4, kv_heads=2, intermediate=512, shards=2, seed=31),
               tmp_path / "ckpt")
    first = run(src, tmp_path / "o1", tmp_path / "w")
    assert len(quantize_calls) == 30  # 3 layers × 9 + embedding, output, output norm
    quantize_calls.clear()
    second = run(src, tmp_path / "o2", tmp_path / "w")
    assert quantize_calls == []
    for q in ("Q8_0", "Q4_K_M"):
        assert contents(first["releases"][q]) == contents(second["releases"][q])

    # One tensor of one shard changes: only that tensor is quantized again.
    import numpy as np
    rewrite_tensor(src, "model.layers.2.mlp.down_proj.weight",
                   np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32))
    third = run(src, tmp_path / "o3", tmp_path / "w")
    assert quantize_calls == ["blk.2.ffn_down.weight"]
    assert third["fingerprint"] != first["fingerprint"]
    quantize_calls.clear()

    # An override changes the type of the attn_q tensors only (to one no quant has staged yet).
    run(src, tmp_path / "o4", tmp_path / "w", tensor_types=["attn_q=q5_k"])
    assert sorted(quantize_calls) == ["blk.0.attn_q.weight", "blk.1.attn_q.weight", "blk.2.attn_q.weight"]


def test_small_tensors_share_a_quantize_task_big_ones_run_alone():
    # Element counts; a group closes once it holds max_elements; groups in order of their first tensor.
    assert quantize_batches([5, 100, 3, 4, 200, 1], max_elements=8) == [[0, 2], [1], [3, 5], [4]]
    assert quantize_batches([8, 9], max_elements=8) == [[0], [1]]
    assert quantize_batches([], max_elements=8) == []
    sizes = [1 << 10, 1 << 21, 1 << 19, 1 << 19, 1 << 19, 7]  # a norm, a big matrix, small matrices
    assert quantize_batches(sizes) == [[0, 2, 3], [1], [4, 5]]


SLOW_FIXTURE = dict(layers=8, hidden=512, heads=8, kv_heads=2, intermediate=2048, shards=2, seed=41)


def test_a_killed_run_resumes_and_writes_the_same_bytes(make_fixture, tmp_path):
    src = make_fixture(**SLOW_FIXTURE)
    cli = os.path.join(os.path.dirname(sys.executable), "so8t-gguf")
    args = ["convert", src, "--quant", "Q4_K_M", "Q8_0", "F16", "--no-validate", "--name", "fx"]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # a run of its own, as from a shell

    clean = subprocess.run([cli, *args, "--output", str(tmp_path / "clean"), "--work-dir", str(tmp_path / "w1")],
                           capture_output=True, text=True, env=env)
    assert clean.returncode == 0, clean.stderr

    work = tmp_path / "w2"
    proc = subprocess.Popen([cli, *args, "--output", str(tmp_path / "out"), "--work-dir", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    staged = work / "tensors"  # one .json record per finished tensor and type
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if staged.exists() and len(list(staged.glob("*/*.json"))) >= 8:  # some tensors done, most not
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in staged.glob("*/*.json")}
    assert not list((tmp_path / "out").glob("**/manifest.json"))

    resumed = subprocess.run([cli, *args, "--output", str(tmp_path / "out"), "--work-dir", str(work), "--json"],
                             capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert 8 <= len(before) < 3 * (8 * 9 + 3)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # what was done before the kill is not redone
    for q in ("Q4_K_M", "Q8_0", "F16"):
        a = json.loads((release(tmp_path / "clean", "fx", q) / "manifest.json").read_text())["files"]
        b = json.loads((release(tmp_path / "out", "fx", q) / "manifest.json").read_text())["files"]
        for name in (f"fx-{q}.gguf", "fx.so8t-heads.gguf", f"fx-{q}.stats.parquet"):
            assert a[name] == b[name], name


def test_rerun_reuses_assembled_files_and_validation(make_fixture, tmp_path, monkeypatch):
    import tasks.validate

    checked = []
    real = tasks.validate.check_functional
    monkeypatch.setattr(tasks.validate, "check_functional", lambda *a, **k: checked.append(a[0]) or real(*a, **k))
    src = make_fixture(layers=2, seed=33)
    kw = dict(source=src, quants=["Q8_0"], work_dir=str(tmp_path / "w"), name="fx")
    first = convert(ConvertParams(output=str(tmp_path / "o1"), **kw))
    assert len(checked) == 1
    ggufs = list((tmp_path / "w" / "runs").glob("*/fx-Q8_0.gguf"))
    stamps = {p: p.stat().st_mtime_ns for p in ggufs}
    second = convert(ConvertParams(output=str(tmp_path / "o2"), **kw))
    assert len(checked) == 1  # validation came from the cache
    assert second["validation"] == first["validation"]
    assert {p: p.stat().st_mtime_ns for p in ggufs} == stamps  # not assembled again
    # A file that changed under the record is written again, not trusted.
    ggufs[0].write_bytes(b"corrupt")
    third = convert(ConvertParams(output=str(tmp_path / "o3"), **kw))
    assert contents(third["releases"]["Q8_0"]) == contents(first["releases"]["Q8_0"])


def test_rerun_makes_no_stats_plots_or_model_card_again(make_fixture, tmp_path, monkeypatch):
    """They are made from the staged tensors, validation and files, all unchanged: re-making them
    (the card reads the whole GGUF again) was most of a re-run's time."""
    import tasks.publish

    read = []
    real = tasks.publish.read_gguf
    monkeypatch.setattr(tasks.publish, "read_gguf", lambda path: read.append(path) or real(path))
    kw = dict(source=make_fixture(layers=2, seed=34), quants=["Q8_0"], work_dir=str(tmp_path / "w"), name="fx")
    first = convert(ConvertParams(output=str(tmp_path / "o1"), **kw))
    made = [p for p in (tmp_path / "w" / "runs").glob("*/Q8_0/*") if not p.name.endswith(".inputs.json")]
    reads = len(read)  # the card reads the model GGUF (its metadata, its tensors' sizes)
    assert {p.suffix for p in made} == {".md", ".parquet", ".png"} and reads >= 1
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in made}
    second = convert(ConvertParams(output=str(tmp_path / "o2"), **kw))
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in made} == stamps and len(read) == reads
    assert contents(second["releases"]["Q8_0"]) == contents(first["releases"]["Q8_0"])
    # Something the card is made of changes (no validation to report): the card alone is made again.
    third = convert(ConvertParams(output=str(tmp_path / "o3"), run_validation=False, **kw))
    assert len(read) == 2 * reads
    changed = {p.name for p in made if (p.stat().st_ino, p.stat().st_mtime_ns) != stamps[p]}
    assert changed == {"README.md"}
    assert contents(third["releases"]["Q8_0"])["README.md"] != contents(first["releases"]["Q8_0"])["README.md"]
    # A file changed under its record is made again, not trusted.
    stats = next(p for p in made if p.suffix == ".parquet")
    stats.write_bytes(b"corrupt")
    fourth = convert(ConvertParams(output=str(tmp_path / "o4"), **kw))
    assert contents(fourth["releases"]["Q8_0"]) == contents(first["releases"]["Q8_0"])
