"""Mixture of experts without llama.cpp: how experts are planned, streamed and stacked, what llama.cpp's MoE
graphs assume that a config must agree with, the MoE branches of the mix rules, per-expert importance rows,
and what analyze reports. (Byte parity with llama.cpp's converter and llama-quantize, and the logits against
the reference, are in test_converter_parity, test_quant_mixes and test_architectures.)"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from so8t_core.analysis import analyze, checkpoint_model
from so8t_core.constants import quant_type
from so8t_core.errors import CheckpointError, UnsupportedError
from so8t_core.plan import Materializer, materialize
from so8t_core.quantize.calibration import ActivationSums, coverage
from so8t_core.quantize.imatrix import Imatrix
from so8t_core.quantize.mixes import ModelShape, assign_types, ggml_n_dims
from so8t_core.quantize.staging import expert_importance
from so8t_core.source.architectures import model_spec
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.testing.fixtures import FixtureSpec, fixture_config


@pytest.fixture(scope="module")
def qwen2moe(tmp_path_factory):
    from so8t_core.testing.fixtures import build_fixture

    return Checkpoint.open(build_fixture(str(tmp_path_factory.mktemp("moe") / "q"),
                                         FixtureSpec(arch="qwen2moe", expert_intermediate=32, shared_intermediate=48)))


def test_experts_are_one_stacked_tensor_per_projection(qwen2moe):
    spec, _, plan = checkpoint_model(qwen2moe)
    merged = {p.gguf_name: p for p in plan if p.transform == "merge_experts"}
    assert sorted(merged) == [f"blk.{i}.ffn_{w}_exps.weight" for i in range(2) for w in ("down", "gate", "up")]
    down = merged["blk.1.ffn_down_exps.weight"]
    assert down.shape == (4, 64, 32) and down.sources == tuple(
        f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(4))
    assert set(down.inputs) == set(down.sources)  # every expert's sha256 is in the staging key
    stacked, _ = materialize(down, qwen2moe.read, qwen2moe.uri)
    assert np.array_equal(stacked, np.stack([qwen2moe.read(n) for n in down.sources]))
    # every expert tensor is planned exactly once, nothing is left over as "not converted"
    report = analyze(qwen2moe)
    assert not report["not_converted"] and spec.n_experts == 4


def test_merging_experts_streams_bounded_chunks_that_never_span_two_experts(qwen2moe):
    _, _, plan = checkpoint_model(qwen2moe)
    gate = next(p for p in plan if p.gguf_name == "blk.0.ffn_gate_exps.weight")  # (4, 32, 64)
    chunks = list(Materializer(gate, qwen2moe, qwen2moe.uri).chunks(max_elements=10 * 64))
    assert all(c.shape[0] <= 10 for _, c in chunks)  # rows of 64: at most 10 rows held at once
    assert [start for start, _ in chunks] == [e * 32 + r for e in range(4) for r in (0, 10, 20, 30)]
    assert all(start // 32 == (start + len(c) - 1) // 32 for start, c in chunks)
    whole = np.concatenate([c for _, c in chunks]).reshape(gate.shape)
    assert np.array_equal(whole, materialize(gate, qwen2moe.read, qwen2moe.uri)[0])


def test_a_missing_expert_is_a_one_line_error(qwen2moe, tmp_path):
    from so8t_core.plan import build_plan
    from so8t_core.source.so8t import find_structure

    spec = model_spec(qwen2moe.config, qwen2moe.uri)
    tensors = {n: e for n, e in qwen2moe.tensors.items() if n != "model.layers.1.mlp.experts.2.up_proj.weight"}
    structure = find_structure(tensors, qwen2moe.config, spec, qwen2moe.uri)
    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.1\.mlp\.experts\.2\.up_proj"):
        build_plan(tensors, spec, structure, qwen2moe.uri)


@pytest.mark.parametrize("arch, changes, message", [
    ("qwen2moe", dict(norm_topk_prob=True), "never renormalizes"),
    ("qwen3moe", dict(norm_topk_prob=False), "always renormalizes"),
    ("qwen3moe", dict(mlp_only_layers=[1]), "dense"),
    ("qwen2moe", dict(decoder_sparse_step=2), "dense"),
    ("mixtral", dict(num_experts_per_tok=5), "more than the 4 experts"),
])
def test_what_llama_cpp_would_route_differently_is_refused(arch, changes, message):
    config = {**fixture_config(FixtureSpec(arch=arch, so8t=False)), **changes}
    with pytest.raises((UnsupportedError, CheckpointError), match=message):
        model_spec(config, "x")


def test_expert_hyperparameters_as_llama_cpp_reads_them():
    mixtral = model_spec(fixture_config(FixtureSpec(arch="mixtral", experts=8, intermediate=96)), "x")
    assert (mixtral.arch, mixtral.n_experts, mixtral.n_experts_used, mixtral.expert_intermediate_size) == \
        ("llama", 8, 2, 96)
    qwen3 = fixture_config(FixtureSpec(arch="qwen3moe", expert_intermediate=48))
    del qwen3["num_experts"]  # Qwen3MoeConfig's default, as convert reads it through transformers
    spec = model_spec(qwen3, "x")
    assert (spec.n_experts, spec.expert_intermediate_size, spec.shared_expert_intermediate_size) == (128, 48, 0)


def test_one_row_matrices_are_1d_to_llama_cpp():
    assert [ggml_n_dims(s) for s in ((1, 256), (4, 1, 256), (256, 256), (256,))] == [1, 3, 2, 1]


def moe_tensors(n_expert: int) -> list:
    out = [("token_embd.weight", (512, 256)), ("output.weight", (512, 256))]
    for i in range(2):
        out += [(f"blk.{i}.attn_k.weight", (128, 256)), (f"blk.{i}.attn_output.weight", (256, 256)),
                (f"blk.{i}.attn_q.weight", (256, 256)), (f"blk.{i}.attn_v.weight", (128, 256)),
                (f"blk.{i}.ffn_down_exps.weight", (n_expert, 256, 256)),
                (f"blk.{i}.ffn_gate_exps.weight", (n_expert, 256, 256)),
                (f"blk.{i}.ffn_gate_inp.weight", (n_expert, 256)),
                (f"blk.{i}.ffn_up_exps.weight", (n_expert, 256, 256))]
    return out


def test_mix_rules_for_experts():
    tensors = moe_tensors(8)
    names = [n for n, _ in tensors]
    shape8 = ModelShape(arch="llama", n_layers=2, n_heads=4, n_kv_heads=2, n_expert=8)
    mxfp4 = dict(zip(names, assign_types(tensors, quant_type("MXFP4_MOE"), shape8)))
    assert mxfp4["blk.0.ffn_up_exps.weight"] == T.MXFP4 and mxfp4["blk.0.attn_q.weight"] == T.Q8_0
    assert mxfp4["blk.0.ffn_gate_inp.weight"] == T.F32  # the router is never quantized
    q4 = dict(zip(names, assign_types(tensors, quant_type("Q4_K_M"), shape8)))
    assert q4["blk.1.attn_v.weight"] == q4["blk.1.attn_k.weight"] == T.Q8_0  # 8 experts: ~128 MB for quality
    assert q4["blk.0.attn_output.weight"] == T.Q5_K
    dense = ModelShape(arch="llama", n_layers=2, n_heads=4, n_kv_heads=2)
    q4_dense = dict(zip(names, assign_types(tensors, quant_type("Q4_K_M"), dense)))
    assert q4_dense["blk.1.attn_k.weight"] == T.Q4_K and q4_dense["blk.0.attn_output.weight"] == T.Q4_K


def test_each_expert_quantizes_with_its_own_importance_row():
    weights = np.arange(4 * 8, dtype=np.float32)
    assert np.array_equal(expert_importance(weights, (4, 16, 8), 2 * 16 + 5), weights[16:24])
    row = weights[:8]
    assert expert_importance(row, (16, 8), 5) is row  # a 2-D tensor: the entry as it is
    im = Imatrix("x", "0", {"blk.0.ffn_up_exps.weight": weights}, [], 1)
    assert im.for_tensor("blk.0.ffn_up_exps.weight", (4, 16, 8)) is weights
    with pytest.raises(CheckpointError, match="rows of 8 in 2 experts"):
        im.for_tensor("blk.0.ffn_up_exps.weight", (2, 16, 8))


def test_coverage_names_experts_never_routed_to():
    counts = {"blk.0.ffn_up_exps.weight": np.array([5, 0, 7, 0]), "blk.0.attn_q.weight": np.array([12])}
    sums = ActivationSums({}, counts, 0, 64, 12, 1.0)
    assert coverage(sums) == {"blk.0.attn_q.weight": {"tokens": 12, "matrices_without_tokens": 0},
                              "blk.0.ffn_up_exps.weight": {"tokens": 7, "matrices_without_tokens": 2}}


def test_analyze_reports_experts_and_active_parameters(qwen2moe):
    e = analyze(qwen2moe)["experts"]
    assert (e["count"], e["used"], e["shared"]) == (4, 2, True)
    p = e["parameters"]
    assert p["per_expert"] == 2 * 3 * 32 * 64 and p["routed_experts"] == 4 * p["per_expert"]  # per expert: all layers
    assert p["router"] == 2 * 4 * 64 and p["shared_expert"] == 2 * (3 * 48 * 64 + 64)
    assert e["total_parameters"] == p["routed_experts"] + p["router"] + p["shared_expert"] + p["dense"]
    assert e["active_parameters"] == e["total_parameters"] - p["routed_experts"] // 2  # 2 of 4 experts used
