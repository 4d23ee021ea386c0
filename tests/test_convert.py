"""The Prefect flow on fixtures: every variant converts, loads in llama.cpp and matches the reference."""

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.published import gguf_path, release

from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.errors import ValidationError
from so8t_core.gguf_file import read_gguf

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]

VARIANTS = {
    "cayley-pre": dict(rotation="cayley", position="pre_o_proj"),
    "expm-post-bias": dict(rotation="expm", position="post_o_proj", attention_bias=True),
    "tied-partial-gates": dict(tied=True, layers=4, gated_layers=(1, 2), shards=2),
    "plain": dict(so8t=False),
    # Phi-3 (fused qkv / gate_up) with its SentencePiece tokenizer and added tokens (the phi3 default).
    "phi3": dict(arch="phi3"),
}
# Model names: general.name comes from --name (by default the folder's name, as in convert), and
# llama.cpp treats a vocabulary whose general.name contains "phi3" as Phi-3's (it looks up "<s>",
# "</s>", "<unk>", "<|endoftext|>").
NAMES = {"phi3": "tiny-phi3"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fixture_variants_convert_and_match_the_reference_in_llama_cpp(variant, make_fixture, tmp_path):
    source = make_fixture(**VARIANTS[variant])
    name = NAMES.get(variant, "fx")
    result = convert(ConvertParams(source=source, output=str(tmp_path / "out"), quants=["F32", "Q8_0"],
                                   work_dir=str(tmp_path / "work"), name=name))
    f32 = result["validation"]["F32"]
    assert f32["passed"] and f32["readback"]["ok"]
    assert f32["llama_cpp"]["mean_kld"] < 1e-4 and f32["llama_cpp"]["top1_agreement"] >= 0.995
    assert f32["llama_cpp"]["n_tokens"] >= 256
    assert f32["tokenizer"]["ok"] and f32["tokenizer"]["first_mismatch"] is None
    assert f32["tokenizer"]["n_tokens"] == f32["tokenizer"]["n_tokens_llama_cpp"] > 300
    assert result["validation"]["Q8_0"]["passed"] and result["validation"]["Q8_0"]["tokenizer"]["ok"]
    g = read_gguf(str(gguf_path(tmp_path / "out", name, "Q8_0")))
    if variant == "phi3":
        assert g.value("general.architecture") == "phi3" and "phi3" in g.value("general.name").lower()
        assert g.value("tokenizer.ggml.model") == "llama" and g.value("tokenizer.ggml.add_bos_token") is True
        assert f32["tokenizer"]["hf"][0] == 1  # BOS, on both sides
    layers = VARIANTS[variant].get("gated_layers", (0, 1) if VARIANTS[variant].get("so8t", True) else ())
    assert g.value("so8t.baked_layers", []) == list(layers)
    assert ("output.weight" in {t.name for t in g.tensors}) != VARIANTS[variant].get("tied", False)
    heads = release(tmp_path / "out", name, "Q8_0") / f"{name}.so8t-heads.gguf"
    assert heads.exists() == VARIANTS[variant].get("so8t", True)


def test_output_is_deterministic_and_reruns_reuse_staged_tensors(make_fixture, tmp_path):
    src = make_fixture(seed=11)
    first = convert(ConvertParams(source=src, output=str(tmp_path / "a"), quants=["Q8_0"],
                                  work_dir=str(tmp_path / "w1"), run_validation=False, name="fx"))
    (tmp_path / "w2-elsewhere").mkdir()
    os.symlink(tmp_path / "w2-elsewhere", tmp_path / "w2")  # a work folder that is a symbolic link
    second = convert(ConvertParams(source=src, output=str(tmp_path / "b"), quants=["Q8_0"],
                                   work_dir=str(tmp_path / "w2"), run_validation=False, name="fx"))
    a, b = first["releases"]["Q8_0"]["files"], second["releases"]["Q8_0"]["files"]
    assert len(a) == 7 and {n: f["sha256"] for n, f in a.items()} == {n: f["sha256"] for n, f in b.items()}
    assert {"tensors", "runs"} <= set(os.listdir(tmp_path / "w2-elsewhere"))  # used through the link
    staged = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "w1" / "tensors") for f in fs]
    mtimes = {p: os.stat(p).st_mtime_ns for p in staged}
    third = convert(ConvertParams(source=src, output=str(tmp_path / "a"), quants=["Q8_0"],
                                  work_dir=str(tmp_path / "w1"), run_validation=False, name="fx"))
    assert third["releases"]["Q8_0"] == {**first["releases"]["Q8_0"], "uploaded": 0}  # nothing uploaded again
    assert {p: os.stat(p).st_mtime_ns for p in staged} == mtimes  # nothing re-quantized


def test_release_files_manifest_and_stats(make_fixture, tmp_path):
    out = tmp_path / "out"
    result = convert(ConvertParams(source=make_fixture(layers=3), output=str(out), quants=["F16", "Q8_0"],
                                   work_dir=str(tmp_path / "work"), name="fx"))
    fp = result["fingerprint"][:16]
    assert json.loads((out / "fx" / "latest.json").read_text()) == {"model": "fx", "quants": {
        q: {"source_fingerprint": result["fingerprint"], "release": f"{fp}/{q}/", "gguf": f"fx-{q}.gguf"}
        for q in ("F16", "Q8_0")}}
    for q in ("F16", "Q8_0"):
        rel = release(out, "fx", q)  # the current version of <out>/fx/<fp>/<quant>/
        assert rel.parent == out / "fx" / fp / q and result["releases"][q]["uri"] == str(rel.parent)
        assert result["releases"][q]["version"] == str(rel) and rel.name.startswith("v-")
        assert sorted(p.name for p in rel.parent.iterdir()) == ["current.json", rel.name]
        manifest = json.loads((rel / "manifest.json").read_text())
        assert set(manifest["files"]) == {f"fx-{q}.gguf", f"fx-{q}.stats.parquet", f"fx-{q}.validation.json",
                                          "fx.so8t-heads.gguf", "README.md", "analysis.json",
                                          f"fx-{q}.errors.png", f"fx-{q}.bits-per-weight.png"}
        assert sorted(p.name for p in rel.iterdir()) == sorted([*manifest["files"], "manifest.json"])
        assert json.loads((rel / f"fx-{q}.validation.json").read_text()) == manifest["validation"]
        import hashlib
        for name, info in manifest["files"].items():
            data = (rel / name).read_bytes()
            assert len(data) == info["size"] and hashlib.sha256(data).hexdigest() == info["sha256"]
        assert manifest["source_fingerprint"] == result["fingerprint"] and manifest["quant"] == q
    out = release(out, "fx", "Q8_0")
    manifest = json.loads((out / "manifest.json").read_text())
    table = pq.read_table(out / "fx-Q8_0.stats.parquet").to_pylist()
    assert len(table) == 3 * 9 + 3
    by_name = {r["tensor"]: r for r in table}
    q = by_name["blk.1.attn_q.weight"]
    assert q["ggml_type"] == "Q8_0" and q["shape"] == [64, 64] and q["params"] == 4096
    assert q["bytes"] == 4096 // 32 * 34 and q["bits_per_weight"] == pytest.approx(8.5)
    assert 0 < q["relative_rmse"] < 0.02 and q["cosine"] > 0.999 and q["snr_db"] > 30
    norm = by_name["blk.1.attn_norm.weight"]
    assert norm["ggml_type"] == "F32" and norm["rmse"] == 0 and np.isinf(norm["snr_db"])
    assert by_name["blk.1.attn_output.weight"]["bake_error"] < 1e-6
    assert by_name["blk.1.attn_q.weight"]["bake_error"] is None
    card = (out / "README.md").read_text()
    assert card.startswith("---\ntags:\n- gguf\n- so8t") and manifest["files"]["fx-Q8_0.gguf"]["sha256"] in card


def test_failed_validation_publishes_nothing(make_fixture, tmp_path, f32_validation_fails):
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match="validation failed .*nothing was published"):
        convert(ConvertParams(source=make_fixture(), output=str(out), quants=["F32"], work_dir=str(tmp_path / "work"),
                              name="fx"))
    assert not out.exists() or not any(out.iterdir())


def test_split_output_loads_in_llama_cpp_as_a_set(make_fixture, tmp_path):
    out = tmp_path / "out"
    result = convert(ConvertParams(source=make_fixture(layers=3), output=str(out), quants=["F32"],
                                   work_dir=str(tmp_path / "w"), name="fx", split_max_tensors=10))
    out = release(out, "fx", "F32")
    shards = sorted(p.name for p in out.glob("fx-F32-*.gguf"))
    assert shards == ["fx-F32-00001-of-00003.gguf", "fx-F32-00002-of-00003.gguf", "fx-F32-00003-of-00003.gguf"]
    f32 = result["validation"]["F32"]
    assert f32["passed"] and f32["readback"]["files"] == 3 and f32["readback"]["tensors"] == 30
    assert f32["llama_cpp"]["mean_kld"] < 1e-4  # llama.cpp loaded the set through its first file
    first = read_gguf(str(out / shards[0]))
    assert first.value("split.count") == 3 and first.value("split.tensors.count") == 30
    assert first.value("llama.block_count") == 3 and len(first.tensors) == 10
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(shards) <= set(manifest["files"]) and "fx-F32.gguf" not in manifest["files"]
    from so8t_core.gguf_file import parse_split_size
    assert parse_split_size("2G") == 2_000_000_000 and parse_split_size("500m") == 500_000_000


def test_model_card_front_matter_and_plots_come_from_the_files(make_fixture, tmp_path):
    src = shutil.copytree(make_fixture(layers=2), tmp_path / "ckpt")
    (src / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M\n---\n# x\n")
    out = tmp_path / "out"
    convert(ConvertParams(source=str(src), output=str(out), quants=["Q8_0"], run_validation=False,
                          work_dir=str(tmp_path / "w"), name="fx"))
    rel = release(out, "fx", "Q8_0")
    card = (rel / "README.md").read_text()
    front = card.split("---\n")[1]
    assert 'license: "apache-2.0"' in front and 'base_model:\n- "HuggingFaceTB/SmolLM2-135M"' in front
    assert "- gguf\n- so8t\n" in front and "pipeline_tag: text-generation" in front and "quantized_by:" in front
    for png in ("fx-Q8_0.errors.png", "fx-Q8_0.bits-per-weight.png"):
        assert (rel / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in card
    assert "FROM ./fx-Q8_0.gguf" in card and "PARAMETER stop" in card


def test_a_release_depends_on_the_checkpoint_and_the_options_not_on_the_machine(make_fixture, tmp_path):
    """The same checkpoint and adapter converted from other folders (other names too), with another
    work folder: the published bytes are the same, so the second run uploads nothing; and no file
    of the release holds a local path, the host or user name, or a date."""
    import getpass
    import re
    import socket

    from support.lora import FIXTURE, write_adapter

    from so8t_core.storage import default_cache_dir

    fixture = make_fixture(**FIXTURE)
    adapter = write_adapter(tmp_path / "adapter", fixture)
    places = []
    for where, folder in (("a", "ckpt-one"), ("b", "elsewhere")):
        src = shutil.copytree(fixture, tmp_path / where / folder)
        places.append((str(src), str(shutil.copytree(adapter, tmp_path / where / "adapter"))))
    out = tmp_path / "out"

    def run(src: str, lora: str, work: str) -> dict:
        return convert(ConvertParams(source=src, lora=lora, output=str(out), quants=["F32", "Q8_0"],
                                     work_dir=str(tmp_path / work), name="fx"))

    first = run(*places[0], "w1")
    published = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    second = run(*places[1], "w2")
    assert {q: r["uploaded"] for q, r in second["releases"].items()} == {"F32": 0, "Q8_0": 0}
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == published
    for q, r in first["releases"].items():  # the files as published, not their copies in the work folder
        assert {n: f["uri"] for n, f in r["files"].items()} == {n: os.path.join(r["version"], n) for n in r["files"]}
        assert all(os.path.isfile(f["uri"]) for f in r["files"].values())

    local = [str(tmp_path), fixture, os.path.expanduser("~"), default_cache_dir()]
    words = [w for w in (socket.gethostname(), getpass.getuser()) if len(w) >= 2]
    for path, data in published.items():
        for text in local:
            assert text.encode() not in data, (path, text)
        if path.suffix in (".json", ".md"):
            decoded = data.decode()
            for word in words:
                assert not re.search(rf"(?<![\w.-]){re.escape(word)}(?![\w.-])", decoded), (path, word)
            assert not re.search(r"\b20\d\d-[01]\d-[0-3]\d", decoded), path
