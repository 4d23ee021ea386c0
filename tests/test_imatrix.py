"""Importance matrices: both file formats read as llama-quantize reads them, and quantization with them
byte-identical to llama_model_quantize given the same importance data."""

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from support.imatrix_files import plan_shapes, write_gguf_imatrix, write_legacy_imatrix
from support.llama_cpp_oracle import FIXTURES, assert_same_tensors, llama_quantize
from support.published import gguf_path, release  # noqa: F401

from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.constants import QUANT_TYPES
from so8t_core.errors import CheckpointError
from so8t_core.gguf_file import read_gguf
from so8t_core.quantize.imatrix import load_imatrix

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]


def test_both_formats_are_read_as_llama_quantize_reads_them(tmp_path):
    rng = np.random.default_rng(1)
    sums = {"blk.0.attn_q.weight": rng.random(256).astype(np.float32) * 30,
            "blk.0.ffn_down.weight": rng.random(512).astype(np.float32) * 30}
    write_gguf_imatrix(tmp_path / "m.gguf", sums, {"blk.0.attn_q.weight": [3.0], "blk.0.ffn_down.weight": [0.0]})
    im = load_imatrix(str(tmp_path / "m.gguf"))
    np.testing.assert_array_equal(im.entries["blk.0.attn_q.weight"], sums["blk.0.attn_q.weight"] / np.float32(3))
    np.testing.assert_array_equal(im.entries["blk.0.ffn_down.weight"], np.ones(512, np.float32))  # count 0 → 1
    assert im.datasets == ["calibration.txt"] and im.chunk_count == 7

    write_legacy_imatrix(tmp_path / "m.dat", sums, ncall=4)
    legacy = load_imatrix(str(tmp_path / "m.dat"))
    np.testing.assert_array_equal(legacy.entries["blk.0.attn_q.weight"], sums["blk.0.attn_q.weight"] / np.float32(4))
    assert legacy.datasets == ["wiki.train.raw"] and legacy.chunk_count == 5

    (tmp_path / "bad.dat").write_bytes(b"\x02\x00\x00\x00\x05\x00")
    with pytest.raises(CheckpointError, match="truncated imatrix"):
        load_imatrix(str(tmp_path / "bad.dat"))
    w = gguf.GGUFWriter(str(tmp_path / "nometa.gguf"), "imatrix")
    w.add_tensor("x.in_sum2", np.ones(4, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="without its metadata"):
        load_imatrix(str(tmp_path / "nometa.gguf"))


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_S", "Q4_0", "Q5_K_S", "Q2_K"])
def test_imatrix_quantization_is_byte_identical_to_llama_quantize(mix, make_fixture, tmp_path):
    src = make_fixture(**FIXTURES["llama-256"])
    shapes = plan_shapes(src)
    rng = np.random.default_rng(5)
    # Every quantized weight but one gets an entry; the missing one is quantized without, as llama.cpp does.
    names = [n for n in shapes if n != "blk.7.ffn_up.weight"]
    sums = {n: (rng.random(shapes[n][-1]) ** 3 * 50).astype(np.float32) for n in names}
    write_gguf_imatrix(tmp_path / "imatrix.gguf", sums, {n: [10.0] for n in names})
    out = tmp_path / "out"
    result = convert(ConvertParams(source=src, output=str(out), quants=["F32", mix], run_validation=False,
                                   work_dir=str(tmp_path / "w"), name="fx", imatrix=str(tmp_path / "imatrix.gguf")))
    theirs = str(tmp_path / "llama.gguf")
    llama_quantize(str(gguf_path(out, "fx", "F32")), theirs, int(QUANT_TYPES[mix].file_type),
                   imatrix=load_imatrix(str(tmp_path / "imatrix.gguf")).entries)
    assert_same_tensors(str(gguf_path(out, "fx", mix)), theirs)
    g = read_gguf(str(gguf_path(out, "fx", mix)))
    assert g.value("quantize.imatrix.entries_count") == len(names)
    assert g.value("quantize.imatrix.chunks_count") == 7
    assert g.value("quantize.imatrix.dataset") == "calibration.txt"
    assert g.value("quantize.imatrix.file") == "imatrix.gguf"  # its name, not the local path it was given as
    files = result["releases"][mix]["files"]  # the imatrix changed the bytes: not the plain quantization
    assert files[f"fx-{mix}.gguf"]["sha256"]
    # The manifest names the tensor the imatrix had no entry for (each quant's own, though F32 came first).
    manifest = json.loads(open(result["releases"][mix]["manifest"]["uri"]).read())
    assert manifest["imatrix"]["tensors_without_entry"] == ["blk.7.ffn_up.weight"]
    if mix == "Q4_K_M":
        plain = tmp_path / "plain"
        convert(ConvertParams(source=src, output=str(plain), quants=[mix], run_validation=False,
                              work_dir=str(tmp_path / "w"), name="fx"))
        a, b = read_gguf(str(gguf_path(out, "fx", mix))), read_gguf(str(gguf_path(plain, "fx", mix)))
        assert np.ascontiguousarray(a.tensor("blk.0.attn_q.weight").data).tobytes() != \
            np.ascontiguousarray(b.tensor("blk.0.attn_q.weight").data).tobytes()


CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris, on the Seine."}]


def calibration_files(folder) -> list[str]:
    """Plain text (the fixtures' tokenizer corpus) and chat records."""
    from importlib.resources import files

    text = folder / "corpus.txt"
    text.write_text(files("so8t_core.testing").joinpath("fixture_corpus.txt").read_text())
    chats = folder / "chats.jsonl"
    chats.write_text(json.dumps({"messages": CHAT}) + "\n")
    return [str(text), str(chats)]


def test_the_run_computes_its_imatrix_publishes_it_and_quantizes_every_mix_with_it(make_fixture, tmp_path,
                                                                                    monkeypatch):
    import tasks.importance

    runs = []
    real = tasks.importance.collect_activations
    monkeypatch.setattr(tasks.importance, "collect_activations", lambda *a, **kw: runs.append(a) or real(*a, **kw))
    src = make_fixture(**FIXTURES["llama-256"])
    out, work = tmp_path / "out", str(tmp_path / "w")
    mixes = ["IQ2_XS", "Q4_K_M", "IQ4_XS"]  # IQ2_XS: refused without an imatrix
    params = ConvertParams(source=src, output=str(out), quants=["F32", *mixes], run_validation=False, work_dir=work,
                           name="fx", calibration=calibration_files(tmp_path), calibration_ctx=64)
    result = convert(params)
    assert len(runs) == 1
    published = release(out, "fx", "IQ2_XS") / "fx.imatrix.gguf"
    im = load_imatrix(str(published))
    assert im.datasets == ["corpus.txt", "chats.jsonl"] and im.chunk_count >= 2
    assert len(im.entries) == 8 * 7  # every weight of the 8 blocks
    tokens_file, = Path(work, "imatrix").glob("*.tokens")  # the calibration tokens, saved under their sha256
    calibration_sha256 = hashlib.sha256(tokens_file.read_bytes()).hexdigest()
    assert tokens_file.name == f"{calibration_sha256}.tokens"
    for mix in ["F32", *mixes]:  # one imatrix, in every release
        assert (release(out, "fx", mix) / "fx.imatrix.gguf").read_bytes() == published.read_bytes()
    for mix in mixes:
        theirs = str(tmp_path / f"llama-{mix}.gguf")
        llama_quantize(str(gguf_path(out, "fx", "F32")), theirs, int(QUANT_TYPES[mix].file_type), imatrix=im.entries)
        assert_same_tensors(str(gguf_path(out, "fx", mix)), theirs)
        g = read_gguf(str(gguf_path(out, "fx", mix)))
        assert g.value("quantize.imatrix.file") == "fx.imatrix.gguf"
        assert g.value("quantize.imatrix.dataset") == "corpus.txt"
        assert g.value("quantize.imatrix.entries_count") == len(im.entries)
        assert g.value("quantize.imatrix.chunks_count") == im.chunk_count
        card = (release(out, "fx", mix) / "README.md").read_text()
        assert (f"Quantized with an importance matrix, `fx.imatrix.gguf` (in this release, llama-imatrix's format), "
                f"computed on corpus.txt ({im.chunk_count} chunks); {len(im.entries)} weights have entries.") in card
        manifest = json.loads(open(result["releases"][mix]["manifest"]["uri"]).read())
        computed = manifest["imatrix"]["computed"]
        assert computed["calibration"] == ["corpus.txt", "chats.jsonl"] and computed["ctx"] == 64
        assert computed["calibration_sha256"] == calibration_sha256
        assert (f"- Importance matrix: yes, sha256 `{im.sha256}`, computed on corpus.txt, chats.jsonl (calibration "
                f"data: sha256 `{calibration_sha256}` of its tokens") in card
        assert computed["tokens"] == 64 * im.chunk_count
        assert {c["tokens"] for c in computed["coverage"].values()} == {computed["tokens"]}
        assert manifest["imatrix"]["tensors_without_entry"] == ["output.weight", "token_embd.weight"]
    # The same inputs again: the imatrix is found under the work folder, not computed again.
    again = convert(params)
    assert len(runs) == 1 and again["releases"]["IQ2_XS"]["uploaded"] == 0
    # --imatrix takes precedence over --calibration.
    given = convert(params.model_copy(update={"imatrix": str(published), "output": str(tmp_path / "given")}))
    assert len(runs) == 1 and read_gguf(str(gguf_path(tmp_path / "given", "fx", "IQ2_XS"))).value(
        "quantize.imatrix.file") == "fx.imatrix.gguf"
    assert "fx.imatrix.gguf" not in given["releases"]["IQ2_XS"]["files"]  # not computed: not published
    assert "given with --imatrix (the calibration data it was computed on is not recorded)" in (
        release(tmp_path / "given", "fx", "IQ2_XS") / "README.md").read_text()
