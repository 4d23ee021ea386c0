"""The card's account of a mix (fallbacks: rows that do not fit the type's blocks) and the
bits-per-weight plot weighted by bytes; pure functions, no flow."""

from __future__ import annotations

import hashlib

from gguf import GGMLQuantizationType as T

from so8t_core.constants import quant_type
from so8t_core.publish.model_card import _mix_lines, overview_rows, verdict
from so8t_core.publish.plots import plot_bits_per_weight, plot_size_vs_kld
from so8t_core.quantize.mixes import ModelShape, assign_types
from so8t_core.refs import StagedTensor

# The demo's shapes: rows of 576, which the K types' 256-blocks do not divide.
DEMO_576 = [("output.weight", (49152, 576)), ("token_embd.weight", (49152, 576)), ("blk.0.attn_q.weight", (576, 576)),
            ("blk.0.attn_v.weight", (192, 576)), ("blk.0.ffn_down.weight", (576, 1536)),
            ("blk.0.ffn_up.weight", (1536, 576)), ("blk.0.attn_norm.weight", (576,))]
SHAPE = ModelShape(arch="llama", n_layers=1, n_heads=9, n_kv_heads=3)


def test_a_q4_k_m_of_rows_of_576_reports_its_fallbacks_and_the_card_warns_with_the_reason():
    fell: list = []
    types = assign_types(DEMO_576, quant_type("Q4_K_M"), SHAPE, fallbacks=fell)
    assert [(n, w, g) for n, w, g in fell] == [
        ("output.weight", T.Q6_K, T.Q8_0),  # llama.cpp's output rule, not its fallback: still not the rule's type
        ("token_embd.weight", T.Q4_K, T.Q5_0), ("blk.0.attn_q.weight", T.Q4_K, T.Q5_0),
        ("blk.0.attn_v.weight", T.Q6_K, T.Q8_0), ("blk.0.ffn_up.weight", T.Q4_K, T.Q5_0)]
    assert types[0] == T.Q8_0 and types[4] == T.Q6_K  # ffn_down's rows of 1536 fit: no fallback there
    rows = dict(DEMO_576)
    lines = "\n".join(_mix_lines({"quant": "Q4_K_M", "llama_cpp": "0.3.36",
                                  "types": {"Q5_0": {"tensors": 3, "bytes": 300}, "Q8_0": {"tensors": 2, "bytes": 100}},
                                  "fallbacks": [{"tensor": n, "wanted": w.name, "got": g.name,
                                                 "row_length": rows[n][-1]} for n, w, g in fell]}))
    assert "**Warning: 5 tensors fell back from the mix's types.**" in lines
    assert ("> - 3 × Q4_K → Q5_0 (`token_embd.weight`, `blk.0.attn_q.weight`, `blk.0.ffn_up.weight`): rows of 576 "
            "are not a multiple of Q4_K's block") in lines
    assert ("> - 2 × Q6_K → Q8_0 (`output.weight`, `blk.0.attn_v.weight`): rows of 576 are not a multiple of "
            "Q6_K's block") in lines
    assert "| Q5_0 | 3 | 300 B | 75.0% |" in lines and "llama.cpp 0.3.36" in lines
    assert "Importance matrix: none" in lines


def test_a_tied_token_embedding_takes_the_output_rule_and_its_q8_0_is_reported_once():
    tied = [t for t in DEMO_576 if t[0] != "output.weight"]
    fell: list = []
    assert assign_types(tied, quant_type("Q4_K_M"), SHAPE, fallbacks=fell)[0] == T.Q8_0
    assert fell[0] == ("token_embd.weight", T.Q6_K, T.Q8_0)
    # The demo's Q4_K_M: the embedding among 15 tensors of one fallback, still named.
    many = [{"tensor": n, "wanted": "Q6_K", "got": "Q8_0", "row_length": 576}
            for n in ["token_embd.weight", *(f"blk.{i}.attn_v.weight" for i in range(14))]]
    lines = "\n".join(_mix_lines({"fallbacks": many}))
    assert "> - 15 × Q6_K → Q8_0 (among them `token_embd.weight`): rows of 576 are not a multiple" in lines
    fell = []
    assign_types(tied, quant_type("Q8_0"), SHAPE, fallbacks=fell)
    assert fell == []  # the Q8_0 mix's output rule keeps Q8_0, which fits
    fell = []  # rows of 48 fit neither Q6_K nor the output rule's Q8_0: one entry, to F16
    assert assign_types([("token_embd.weight", (64, 48))], quant_type("Q4_K_M"), SHAPE, fallbacks=fell) == [T.F16]
    assert fell == [("token_embd.weight", T.Q6_K, T.F16)]


def test_the_card_gives_the_importance_matrix_and_its_calibration_datas_sha256():
    types = {"Q4_K": {"tensors": 1, "bytes": 10}}
    computed = {"calibration": ["corpus.txt"], "calibration_sha256": "c" * 64}
    lines = "\n".join(_mix_lines({"types": types, "imatrix": {"sha256": "a" * 64, "computed": computed}}))
    assert (f"- Importance matrix: yes, sha256 `{'a' * 64}`, computed on corpus.txt (calibration data: sha256 "
            f"`{'c' * 64}` of its tokens as llama.cpp tokenized them, int32 little-endian).") in lines
    lines = "\n".join(_mix_lines({"types": types, "imatrix": {"sha256": "a" * 64}}))
    assert "given with --imatrix (the calibration data it was computed on is not recorded)" in lines


def staged(name: str, cls: str, ggml_type: str, shape: tuple[int, ...], nbytes: int) -> StagedTensor:
    return StagedTensor(gguf_name=name, source=name, layer=0, tensor_class=cls, quant="Q4_K_M", ggml_type=ggml_type,
                        shape=shape, uri="/x", sha256="0" * 64, nbytes=nbytes, rmse=0, relative_rmse=0,
                        max_abs_error=0, cosine=1, snr_db=0, seconds=0)


def test_the_bits_per_weight_plot_is_weighted_by_bytes_and_deterministic(tmp_path):
    tensors = [staged("blk.0.ffn_up.weight", "ffn_up", "Q4_K", (1024, 1024), 1024 * 1024 * 9 // 16),
               staged("blk.0.attn_norm.weight", "norm", "F32", (1024,), 4096)]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    title = "a-model-with-a-rather-long-name Q4_K_M: bits per weight by tensor class"
    plot_bits_per_weight(tensors, title, str(a))
    plot_bits_per_weight(tensors, title, str(b))
    assert a.read_bytes() == b.read_bytes() and a.read_bytes()[:4] == b"\x89PNG"
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    # The 32-bit norm (0.7% of the bytes) no longer sets the scale: the axis ends near 4.5 × 1.25.
    fig_axes = []
    real_close = plt.close
    plt.close = lambda fig: fig_axes.append(fig.axes[0]) or real_close(fig)
    try:
        plot_bits_per_weight(tensors, title, str(tmp_path / "c.png"))
    finally:
        plt.close = real_close
    ax = fig_axes[0]
    assert ax.get_ylim()[1] < 6 and ax.get_xlim() == (0, 1)
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths[0] < 0.01 and widths[1] > 0.99  # each bar as wide as its share of the bytes
    assert ax.get_title().count("\n") == 1  # the whole-model figure on a line of its own, not clipped


def test_the_model_overview_rows_and_plot():
    manifests = {q: {"files": {f"m-{q}.gguf": {"size": size}, "analysis.json": {"size": 5}}, "bits_per_weight": bpw,
                     "evaluation": {"statistics": {"ppl_ratio": 1.01, "kld_mean": kld, "same_top_p": 0.9},
                                    "settings": {}, "gate": {}}}
                 for q, size, bpw, kld in (("Q4_K_M", 100, 4.9, 0.03), ("Q8_0", 200, 8.5, 0.001), ("F32", 800, 32, 0))}
    quants = {q: {"gguf": f"m-{q}.gguf", "release": f"abc/{q}/"} for q in manifests}
    rows = overview_rows("m", quants, manifests)
    assert [r["quant"] for r in rows] == ["F32", "Q8_0", "Q4_K_M"] and rows[1]["size"] == 200
    assert [verdict(r["quant"], r["kld_mean"]) for r in rows] == ["base", "excellent", "good"]
    digests = set()
    for _ in range(2):
        path = "/tmp/so8t-size-kld-test.png"
        plot_size_vs_kld(rows, "m: size against KLD", path)
        digests.add(hashlib.sha256(open(path, "rb").read()).hexdigest())
    assert len(digests) == 1
