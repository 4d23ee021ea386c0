"""The evaluate stage in a real Prefect run on a small fixture: every quant scored against the F32
model over the evaluation text (llama-perplexity's --kl-divergence statistics), the quality gates
per quant, and what a run publishes when one quant fails them.

One conversion (Q8_0, Q4_K_M, Q5_K_M; no F32, so the base is staged for the evaluation) with Q4_K_M's
file corrupted after assembly (one tensor's bytes scrambled, as a fault validation cannot see does:
validation is off here, or its read-back would stop the run first) feeds every assertion.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import gguf
import numpy as np
import pytest
from support.corrupt import scramble_tensor
from support.published import release

import flows.convert
import tasks.evaluate
from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.errors import ValidationError
from so8t_core.publish.model_card import DEFAULT_RUN_CTX, kv_cache_bytes, verdict
from so8t_core.publish.release import LATEST_NAME, read_manifest
from so8t_core.publish.report import human_size
from so8t_core.refs import file_ref
from so8t_core.validate.perplexity import (
    DEFAULT_MAX_KLD,
    DEFAULT_MIN_SAME_TOP,
    KlDivergenceStatistics,
    evaluate_file,
    read_base_file,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]

QUANTS = ["Q8_0", "Q4_K_M", "Q5_K_M"]
CORRUPTED = "Q4_K_M"
SCRAMBLED = "blk.1.ffn_down.weight"
N_CTX, N_CHUNKS = 128, 3
SOURCE_CARD = """---
license: apache-2.0
language: [en, ja]
base_model: example-org/fx-base
---
# fx

## Intended use
Research on rotation-gated attention. Not for production.
"""
# A template with a default system turn, as SmolLM2's: the card's prompt format must show it.
SYSTEM_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful fixture."
                   "<|im_end|>\\n' }}{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + "
                   "'\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def run(make_fixture, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    source = str(root / "fx")
    shutil.copytree(make_fixture(layers=2, hidden=256, intermediate=512, seed=3), source)
    (root / "fx" / "README.md").write_text(SOURCE_CARD, encoding="utf-8")
    config = json.loads((root / "fx" / "tokenizer_config.json").read_text())
    (root / "fx" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": SYSTEM_TEMPLATE}))
    params = ConvertParams(source=source, output=str(root / "out"), work_dir=str(root / "work"), name="fx",
                           quants=QUANTS, run_validation=False, eval_ctx=N_CTX, eval_chunks=N_CHUNKS)
    real_assemble = flows.convert.assemble_gguf

    def assemble_corrupting(src, quant, *args, **kwargs):
        refs = real_assemble(src, quant, *args, **kwargs)
        if quant == CORRUPTED:
            scramble_tensor(refs[0].uri, SCRAMBLED)
            refs = [file_ref(refs[0].uri), *refs[1:]]
        return refs

    calls = []
    real_evaluate, real_base = tasks.evaluate.evaluate_file, tasks.evaluate.write_evaluation_base
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flows.convert, "assemble_gguf", assemble_corrupting)
        mp.setattr(tasks.evaluate, "evaluate_file", lambda *a: calls.append("evaluate") or real_evaluate(*a))
        mp.setattr(tasks.evaluate, "write_evaluation_base", lambda *a: calls.append("base") or real_base(*a))
        with pytest.raises(ValidationError) as first:
            convert(params)
        first_calls = list(calls)
        calls.clear()
        with pytest.raises(ValidationError) as again:  # the same run again: everything from the caches
            convert(params)
    return root, params, str(first.value), first_calls, str(again.value), list(calls)


def evaluation(root, quant: str) -> dict:
    return json.loads((root / "work" / "runs").glob(f"fx-*/fx-{quant}.evaluation.json").__next__().read_text())


def test_a_corrupted_quant_fails_its_gate_and_is_not_published_the_others_are(run):
    root, _, message, _, _, _ = run
    # One line: which quant failed which gate, and what was published.
    assert "\n" not in message
    assert f"quality gates failed ({CORRUPTED}: mean KLD" in message and "--max-kld 1" in message
    assert f"not published: {CORRUPTED}; published: Q8_0, Q5_K_M" in message
    latest = json.loads((root / "out" / "fx" / LATEST_NAME).read_text())
    assert set(latest["quants"] if "quants" in latest else latest) >= {"Q8_0", "Q5_K_M"}
    assert CORRUPTED not in json.dumps(latest)
    for q in ("Q8_0", "Q5_K_M"):
        folder = release(root / "out", "fx", q)
        assert (folder / f"fx-{q}.gguf").exists() and (folder / f"fx-{q}.evaluation.json").exists()
    assert not list((root / "out" / "fx").glob(f"*/{CORRUPTED}"))


def test_each_release_records_its_statistics_settings_and_gate(run):
    root, params, _, _, _, _ = run
    for q in ("Q8_0", "Q5_K_M"):
        manifest = read_manifest(str(release(root / "out", "fx", q).parent))
        record = manifest["evaluation"]
        assert record == evaluation(root, q)
        assert record["passed"] and record["failures"] == []
        assert record["gate"] == {"max_kld": DEFAULT_MAX_KLD, "min_same_top": DEFAULT_MIN_SAME_TOP}
        settings = record["settings"]
        assert settings["text"] == "builtin" and settings["ctx"] == N_CTX and settings["max_chunks"] == N_CHUNKS
        assert settings["base"] == "F32" and len(settings["text_sha256"]) == 64
        stats = KlDivergenceStatistics(**record["statistics"])
        assert stats.n_chunk == N_CHUNKS and stats.count == N_CHUNKS * (N_CTX - 1 - N_CTX // 2)
        assert 0 < stats.kld_mean < 0.5 and stats.same_top_p > 0.6
        assert stats.kld_min <= stats.kld_median <= stats.kld_percentiles["99.0"] <= stats.kld_max
    q8, q5 = (evaluation(root, q)["statistics"] for q in ("Q8_0", "Q5_K_M"))
    assert q8["kld_mean"] < q5["kld_mean"] and q8["same_top_p"] >= q5["same_top_p"]  # more bits, closer
    bad = evaluation(root, CORRUPTED)
    assert not bad["passed"] and bad["failures"][0].startswith("mean KLD")


def test_the_figures_are_the_librarys_on_the_published_file_and_the_base_is_memory_mapped(run):
    """The recorded statistics are evaluate_file's on the released GGUF against the run's base file."""
    root, _, _, _, _, _ = run
    [base_file] = (root / "work" / "evaluation").glob("*.kld")
    base = read_base_file(str(base_file), mmap=True)
    assert isinstance(base.rows, np.memmap) and (base.n_ctx, base.n_chunk) == (N_CTX, N_CHUNKS)
    published = release(root / "out", "fx", "Q5_K_M") / "fx-Q5_K_M.gguf"
    assert evaluate_file(str(published), str(base_file)).as_record() == evaluation(root, "Q5_K_M")["statistics"]


def test_the_base_is_computed_once_and_a_rerun_reuses_every_evaluation(run):
    _, _, first, first_calls, again, again_calls = run
    assert sorted(first_calls) == ["base"] + ["evaluate"] * len(QUANTS)
    assert again_calls == [] and again == first


def test_an_evaluation_text_too_short_is_one_line(make_fixture, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Too short to evaluate on.\n", encoding="utf-8")
    with pytest.raises(ValidationError, match="the evaluation text has .* tokens; a context of 128 needs"):
        convert(ConvertParams(source=make_fixture(), output=str(tmp_path / "out"), work_dir=str(tmp_path / "w"),
                              quants=["Q8_0"], run_validation=False, eval_text=str(text), eval_ctx=N_CTX,
                              eval_chunks=2))
    assert not os.path.exists(tmp_path / "out" / "ckpt")


def card_rows(card: str) -> dict[str, list[str]]:
    """The quant table of the model's card: quant → its cells, in the card's order."""
    rows = {}
    for line in card.splitlines():
        if m := re.match(r"^\| \[fx-(?P<quant>[A-Z0-9_]+)\.gguf\]", line):
            rows[m["quant"]] = [c.strip() for c in line.strip("|").split("|")]
    return rows


def test_the_model_card_lists_every_published_quant_with_the_figures_of_its_record(run):
    root, _, _, _, _, _ = run
    folder = root / "out" / "fx"
    card = (folder / "README.md").read_text()
    front = card.split("---")[1]
    assert "license:" in front and "pipeline_tag: text-generation" in front and "quantized_by:" in front
    assert "- gguf" in front
    rows = card_rows(card)
    assert list(rows) == ["Q8_0", "Q5_K_M"]  # published only, largest first
    latest = json.loads((folder / LATEST_NAME).read_text())["quants"]
    hp = json.loads((release(root / "out", "fx", "Q8_0") / "analysis.json").read_text())["hyperparameters"]
    for q, cells in rows.items():
        manifest = read_manifest(str(release(root / "out", "fx", q).parent))
        stats = manifest["evaluation"]["statistics"]
        size = manifest["files"][f"fx-{q}.gguf"]["size"]
        assert cells[0] == f"[fx-{q}.gguf]({latest[q]['release']})"
        assert cells[1] == human_size(size)
        assert float(cells[2]) == pytest.approx(manifest["bits_per_weight"], abs=0.005)
        assert cells[3] == human_size(size + kv_cache_bytes(hp, min(DEFAULT_RUN_CTX, hp["context_length"])))
        assert float(cells[4]) == pytest.approx(stats["ppl_ratio"], abs=5e-5)
        assert float(cells[5]) == pytest.approx(stats["kld_mean"], abs=5e-5)
        assert float(cells[6].rstrip("%")) == pytest.approx(100 * stats["same_top_p"], abs=5e-3)
        assert cells[7] == verdict(q, stats["kld_mean"])
    plot = folder / "fx.size-vs-kld.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "(fx.size-vs-kld.png)" in card
    assert "The largest that fits in memory" in card and "llama-server -m" in card and "ollama create" in card
    assert "lms import" in card


def test_each_quants_card_says_what_the_mix_became_and_how_to_prompt_and_run_it(run):
    root, _, _, _, _, _ = run
    folder = release(root / "out", "fx", "Q5_K_M")
    card = (folder / "README.md").read_text()
    tensors = gguf.GGUFReader(str(folder / "fx-Q5_K_M.gguf")).tensors
    for t in {t.tensor_type.name for t in tensors}:  # every type in the file, with its tensor count and bytes
        n = sum(1 for x in tensors if x.tensor_type.name == t)
        size = human_size(sum(int(x.n_bytes) for x in tensors if x.tensor_type.name == t))
        assert f"| {t} | {n} | {size} |" in card, t
    assert "llama.cpp 0.3.36" in card and "Importance matrix: none" in card
    assert "fell back" not in card  # rows of 256 and 512 fit every K type
    prompt = card.split("## Prompt format")[1]
    assert "<|im_start|>system\nYou are a helpful fixture.<|im_end|>\n<|im_start|>user\nHello<|im_end|>" in prompt
    assert 'so8t-gguf heads fx-Q5_K_M.gguf fx.so8t-heads.gguf "' in card and "--quant Q5_K_M" in card
    assert "> Research on rotation-gated attention. Not for production." in card
    stats = evaluation(root, "Q5_K_M")["statistics"]
    assert f"| {stats['ppl_ratio']:.4f} ± {stats['ppl_ratio_unc']:.4f} | {stats['kld_mean']:.4f} ±" in card
    overview = (root / "out" / "fx" / "README.md").read_text().split("---")[1]
    assert '- "example-org/fx-base"' in overview and "base_model_relation: quantized" in overview
    assert 'license: "apache-2.0"' in overview and '- "ja"' in overview
