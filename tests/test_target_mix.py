"""Target mixes (so8t_core.quantize.target): per-tensor types chosen from measured damage under a
bits-per-weight budget, and the recipe as a llama-quantize --tensor-type-file that makes
llama_model_quantize write the same bytes as we do from our F32 GGUF and the same imatrix."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from support.imatrix_files import write_synthetic_imatrix
from support.llama_cpp_oracle import FIXTURES, assert_same_tensors, llama_quantize

from so8t_core.assemble.sequential import convert_sequential
from so8t_core.constants import QUANT_TYPES
from so8t_core.errors import UnsupportedError
from so8t_core.gguf_file import read_gguf
from so8t_core.quantize import target
from so8t_core.quantize.engines import dequantize, quantize
from so8t_core.quantize.imatrix import load_imatrix
from so8t_core.quantize.mixes import MixOptions
from so8t_core.source.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def model(make_fixture, tmp_path_factory):
    """The llama-256 fixture's F32 GGUF, a synthetic imatrix, the measured options, and its Q4_K_M."""
    root = tmp_path_factory.mktemp("target")
    src = make_fixture(**FIXTURES["llama-256"])
    f32 = str(root / "fx-F32.gguf")
    convert_sequential(Checkpoint.open(src), "F32", f32, str(root / "staging"))
    im_path = str(root / "imatrix.gguf")
    write_synthetic_imatrix(im_path, src)
    imatrix = load_imatrix(im_path)
    cache = str(root / "damage")
    tensors = target.measure_gguf(f32, imatrix, cache_dir=cache)
    mix_file = str(root / "fx-Q4_K_M.gguf")
    llama_quantize(f32, mix_file, int(QUANT_TYPES["Q4_K_M"].file_type), imatrix=imatrix.entries)
    mix = {t.name: t.tensor_type for t in read_gguf(mix_file).tensors}
    return root, src, f32, imatrix, cache, tensors, mix


def test_candidates_follow_row_length():
    assert target.candidate_types("blk.0.attn_q.weight", (256, 256)) == target.CANDIDATE_TYPES
    rows_896 = target.candidate_types("blk.0.attn_q.weight", (896, 896))  # qwen2-896: no 256-block type
    assert T.Q4_K not in rows_896 and T.IQ4_XS not in rows_896 and set(rows_896) == {
        T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL, T.Q8_0}
    assert target.candidate_types("blk.0.attn_norm.weight", (256,)) == ()  # stays F32, as llama.cpp keeps it


def test_allocation_meets_the_budget_with_less_damage_than_the_mix(model):
    _, _, _, _, _, tensors, mix = model
    bpw = target.bits_per_weight(tensors, mix)
    types = target.target_types(tensors, bpw=bpw)
    assert target.bits_per_weight(tensors, types) <= bpw
    assert target.predicted_damage(tensors, types) < 0.8 * target.predicted_damage(tensors, mix)
    for t in tensors:  # norms stay F32; every weight gets a type its rows allow
        assert types[t.name] == T.F32 if len(t.shape) == 1 else types[t.name] in target.candidate_types(t.name, t.shape)
    assert target.target_types(tensors, bpw=bpw) == types  # deterministic
    # a larger budget never does worse; the smallest possible budget takes every smallest type
    assert target.predicted_damage(tensors, target.target_types(tensors, bpw=bpw + 1)) < \
        target.predicted_damage(tensors, types)
    smallest = sum(min(b for _, b, _ in t.options) for t in tensors)
    assert target.target_types(tensors, size=smallest) == {
        t.name: min(t.options, key=lambda o: o[1])[0] for t in tensors}
    with pytest.raises(UnsupportedError, match="raise the target"):
        target.target_types(tensors, size=smallest - 1)


def test_damage_is_cached_per_tensor_and_type(model, monkeypatch):
    _, _, f32, imatrix, cache, tensors, _ = model
    monkeypatch.setattr(target, "tensor_damage", lambda *a, **k: pytest.fail("measured again"))
    assert target.measure_gguf(f32, imatrix, cache_dir=cache) == tensors


def test_damage_is_the_relative_weighted_error():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((8, 256)).astype(np.float32)
    assert target.tensor_damage(rows, T.Q8_0) < target.tensor_damage(rows, T.Q4_K) < target.tensor_damage(rows, T.Q2_K)
    # scale-free: the same weights ×1000 have the same damage
    assert target.tensor_damage(rows * 1000, T.Q4_0) == pytest.approx(target.tensor_damage(rows, T.Q4_0), rel=1e-3)


def test_an_expert_stack_is_measured_expert_by_expert_with_its_own_importance():
    """Each expert quantized with its own importance row, as llama-quantize does, and the noise
    summed over the experts: the importance of a rarely routed expert weighs little."""
    from types import SimpleNamespace

    rng = np.random.default_rng(1)
    stack = rng.standard_normal((3, 16, 256)).astype(np.float32)
    importance = rng.uniform(0.1, 2.0, (3, 256)).astype(np.float32)
    importance[1] *= 1e-6  # expert 1: hardly ever routed
    stack[1] *= 10.0  # and large, so that without its importance it would dominate
    imatrix = SimpleNamespace(for_tensor=lambda name, shape: importance.reshape(-1))
    got = target.measured_importance(imatrix, "blk.0.ffn_down_exps.weight", stack.shape)
    np.testing.assert_array_equal(got, importance)
    options = target.measure_tensor("blk.0.ffn_down_exps.weight", stack, got)

    def expected(qtype):
        err2 = ref2 = 0.0
        for rows, imp in zip(stack, importance):
            approx = dequantize(quantize(rows, qtype, "ggml", imp), qtype, rows.shape).astype(np.float64)
            err2 += float(((approx - rows) ** 2 * imp).sum())
            ref2 += float((rows.astype(np.float64) ** 2 * imp).sum())
        return err2 / ref2

    damage = {q: d for q, _, d in options.options}
    for qtype in (T.Q2_K, T.Q4_K, T.Q8_0):
        assert damage[qtype] == pytest.approx(expected(qtype), rel=1e-9)
    unweighted = target.measure_tensor("blk.0.ffn_down_exps.weight", stack)
    assert {q: d for q, _, d in unweighted.options} != damage


def test_llama_quantize_with_the_recipe_writes_the_same_bytes(model):
    root, src, f32, imatrix, _, tensors, mix = model
    types = target.target_types(tensors, bpw=target.bits_per_weight(tensors, mix))
    recipe_file = root / "recipe.txt"
    recipe_file.write_text(target.tensor_type_file(tensors, types))
    recipe = target.parse_tensor_type_file(recipe_file.read_text())
    assert len(recipe) == sum(1 for t in tensors if len(t.shape) == 2)
    ours, written = quantize_both(src, f32, root, tensors, types, recipe, imatrix)
    assert written == {name: t.name for name, t in types.items()}
    assert len(set(written.values())) > 3  # a real mix of types, not one
    assert os.path.getsize(ours) <= os.path.getsize(str(root / "fx-Q4_K_M.gguf"))


def quantize_both(src, f32, folder, tensors, types, recipe, imatrix) -> tuple[str, dict[str, str]]:
    """(our file, each tensor's type) of the recipe with the mix it goes with, after checking that
    llama-quantize writes the same tensors from the F32 file with the same recipe and imatrix."""
    base = target.base_mix(tensors, types)
    ours = str(folder / "ours-AUTO.gguf")
    convert_sequential(Checkpoint.open(src), base, ours, str(folder / "staging"),
                       options=MixOptions(tensor_types=recipe, has_imatrix=True), imatrix=imatrix)
    theirs = str(folder / "llama-AUTO.gguf")
    llama_quantize(f32, theirs, int(QUANT_TYPES[base].file_type), overrides=recipe, imatrix=imatrix.entries)
    return ours, assert_same_tensors(ours, theirs)


def test_an_moe_recipe_measured_per_expert_is_what_llama_quantize_writes(make_fixture, tmp_path):
    """Qwen2-MoE: the expert stacks' damage uses their per-expert importance rows (it differs from
    the damage without), and the recipe still gives llama-quantize's bytes."""
    src = make_fixture(**FIXTURES["qwen2moe-256"])
    f32 = str(tmp_path / "moe-F32.gguf")
    convert_sequential(Checkpoint.open(src), "F32", f32, str(tmp_path / "staging"))
    write_synthetic_imatrix(tmp_path / "imatrix.gguf", src)
    imatrix = load_imatrix(str(tmp_path / "imatrix.gguf"))
    tensors = target.measure_gguf(f32, imatrix)
    plain = {t.name: t for t in target.measure_gguf(f32)}
    stacks = [t for t in tensors if len(t.shape) == 3]
    assert len(stacks) == 6 and all(t.options != plain[t.name].options for t in stacks)
    types = target.target_types(tensors, bpw=4.5)
    recipe = target.parse_tensor_type_file(target.tensor_type_file(tensors, types))
    _, written = quantize_both(src, f32, tmp_path, tensors, types, recipe, imatrix)
    assert written == {name: t.name for name, t in types.items()}


def test_dry_run_prints_types_and_size_and_writes_nothing(make_fixture, tmp_path):
    from support.cli import assert_one_line_error, run

    src = make_fixture(**FIXTURES["llama-256"])
    out = tmp_path / "out"
    proc = run("convert", src, "--output", str(out), "--quant", "Q4_K_M", "--quant", "Q8_0", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    q4 = {t["name"]: t["type"] for t in report["Q4_K_M"]["tensors"]}
    assert q4["output.weight"] == q4["blk.0.ffn_down.weight"] == "Q6_K" and q4["blk.1.attn_q.weight"] == "Q4_K"
    assert set(t["type"] for t in report["Q8_0"]["tensors"]) == {"Q8_0", "F32"}
    assert 4.5 < report["Q4_K_M"]["bits_per_weight"] < report["Q8_0"]["bits_per_weight"] < 8.6
    assert not out.exists()
    text = run("convert", src, "--output", str(out), "--quant", "Q4_K_M", "--dry-run")
    assert text.returncode == 0 and "blk.0.ffn_down.weight" in text.stdout and "bits per weight" in text.stdout
    assert_one_line_error(run("convert", src, "--quant", "Q9_X", "--dry-run"), "Q9_X")
    assert_one_line_error(run("convert", src, "--quant", "IQ2_XXS", "--dry-run"), "importance matrix")


def test_the_recipe_table_has_a_row_per_class_and_a_column_per_layer(model):
    _, _, _, _, _, tensors, mix = model
    types = target.target_types(tensors, bpw=target.bits_per_weight(tensors, mix))
    table = target.render_recipe(tensors, types).splitlines()
    assert table[0] == "| tensor class | not in a block | " + " | ".join(f"layer {i}" for i in range(8)) + " |"
    rows = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ")[1:] for line in table[2:] if line.startswith("| ")}
    assert set(rows) == {"output", "token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                         "ffn_down"}
    assert rows["ffn_down"][1:] == [types[f"blk.{i}.ffn_down.weight"].name for i in range(8)]
    assert rows["output"][0] == types["output.weight"].name
    assert table[-1].startswith(f"{target.bits_per_weight(tensors, types):.3f} bits per weight")


def test_a_target_no_types_can_meet_is_one_line_before_any_work(make_fixture):
    from support.cli import assert_one_line_error, run

    src = make_fixture(**FIXTURES["llama-256"])
    assert_one_line_error(run("convert", src, "--target-bpw", "2", "--dry-run"), "--target-bpw 2",
                          "the smallest types give this model", "use --target-bpw 2.")
    assert_one_line_error(run("convert", src, "--target-size", "100K"), "--target-size 100K",
                          "the smallest types give this model")
    # the smallest types' tensor data fits 1600K, but not with the file's metadata: refused as early
    refused = run("convert", src, "--target-size", "1600K", "--dry-run")
    assert_one_line_error(refused, "--target-size 1600K", "the smallest types give this model a file of")
    assert_one_line_error(run("convert", src, "--target-size", "1600K"), "--target-size 1600K")
    least = refused.stderr.split("use --target-size ")[1].split(" ")[0]
    report = run("convert", src, "--target-size", least, "--eval-chunks", "0", "--dry-run", "--json")
    assert report.returncode == 0, report.stderr
    (auto,) = [r for label, r in json.loads(report.stdout).items() if label.startswith("AUTO-")]
    assert auto["file_bytes"] <= int(least[:-1]) * 1000
