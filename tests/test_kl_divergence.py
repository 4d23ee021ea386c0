"""llama-perplexity's --kl-divergence statistics from so8t_core.validate.perplexity against the real binary.

A small fixture's F32 GGUF is the base; its Q4_K_M and Q8_0 (llama_model_quantize) are scored over the
same text with the same settings (-c 128 -b 128, flash attention off, as llama_runtime runs). Every
statistic must equal llama-perplexity's within 1e-3 relative (or the last digit it prints), and both
sides print the same names.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from support.corrupt import scramble_tensor
from support.llama_cpp_oracle import FIXTURES, llama_quantize

from so8t_core.assemble.sequential import convert_sequential
from so8t_core.llama_runtime import LlamaCppModel
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.testing.fixtures import FixtureSpec, build_fixture
from so8t_core.validate.perplexity import (
    base_log_probs,
    evaluation_tokens,
    gate_failures,
    kl_divergence,
    read_base_file,
    render_kl_divergence,
    write_base_file,
)

pytestmark = pytest.mark.e2e

N_CTX = 128
LLAMA_PERPLEXITY = os.environ.get("SO8T_LLAMA_PERPLEXITY")
TEXT = os.path.join(os.path.dirname(__file__), os.pardir, "so8t_core", "testing", "fixture_corpus.txt")
FTYPES = {"Q4_K_M": 15, "Q8_0": 7}
_STAT = re.compile(r"^(?P<name>[^:]+?)\s*:\s*(?P<value>-?\d+\.(?P<digits>\d+))\s*%?"
                   r"(?:\s*±\s*(?P<unc>-?\d+\.\d+)\s*%?)?$")


def summary(text: str) -> dict[str, tuple[str, str | None]]:
    """name -> (value, uncertainty) as printed, from llama-perplexity's final summary."""
    out = {}
    for line in text[text.index("====== Perplexity statistics"):].splitlines():
        if m := _STAT.match(line.strip()):
            out[m["name"]] = (m["value"], m["unc"])
    return out


def run_llama_perplexity(*args: str, expect: str | None = None) -> str:
    """Its stdout; run again (ten tries) while ``expect`` is missing from it: the pinned llama.cpp's
    logger is never flushed at exit (common_log_main leaks it, llama.cpp issue 22142), so on a busy
    machine the last lines printed, the summary, can be lost."""
    for _ in range(10):
        proc = subprocess.run([LLAMA_PERPLEXITY, "-c", str(N_CTX), "-b", str(N_CTX), "-fa", "off", "-t", "2", *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        if expect is None or expect in proc.stdout:
            break
    return proc.stdout


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if not LLAMA_PERPLEXITY:
        pytest.skip("SO8T_LLAMA_PERPLEXITY is not set (make llama-tools builds it; make test sets it)")
    root = tmp_path_factory.mktemp("kld")
    src = build_fixture(str(root / "ckpt"), FixtureSpec(**FIXTURES["llama-256"]))
    f32 = str(root / "fx-F32.gguf")
    convert_sequential(Checkpoint.open(src), "F32", f32, str(root / "staging"))
    quants = {}
    for name, ftype in FTYPES.items():
        quants[name] = str(root / f"fx-{name}.gguf")
        llama_quantize(f32, quants[name], ftype)
    base_file = str(root / "base.kld")
    run_llama_perplexity("-m", f32, "-f", TEXT, "--kl-divergence-base", base_file)
    with LlamaCppModel(f32, n_ctx=N_CTX) as model, open(TEXT, encoding="utf-8") as f:
        base = base_log_probs(model, evaluation_tokens(model, f.read(), N_CTX), N_CTX)
    return root, f32, quants, base_file, base


def within(ours: float, printed: str) -> bool:
    """1e-3 relative, or half a unit of the last digit llama-perplexity prints (plus float noise)."""
    theirs = float(printed)
    half_unit = 0.5 * 10.0 ** -len(printed.split(".")[1])
    return abs(ours - theirs) <= max(1e-3 * abs(theirs), half_unit * 1.01)


def test_the_base_pass_is_llama_perplexitys(models):
    """Same tokens (BOS handling, chunking) and the same bytes as its base file: the 16-bit
    log-probabilities and each row's scale and minimum (exp as C's expf rounds it, not numpy's)."""
    _, _, _, base_file, base = models
    theirs = read_base_file(base_file)
    assert (theirs.n_ctx, theirs.n_vocab, theirs.n_chunk) == (base.n_ctx, base.n_vocab, base.n_chunk)
    np.testing.assert_array_equal(theirs.tokens, base.tokens)
    np.testing.assert_array_equal(theirs.rows, base.rows)


@pytest.mark.parametrize("quant", list(FTYPES))
def test_statistics_match_llama_perplexity(models, quant):
    root, _, quants, base_file, base = models
    with LlamaCppModel(quants[quant], n_ctx=N_CTX) as model:
        stats = kl_divergence(model, base)
    theirs = summary(run_llama_perplexity("-m", quants[quant], "--kl-divergence-base", base_file, "--kl-divergence",
                                       expect="Same top p:"))
    rendered = render_kl_divergence(stats)
    assert list(summary(rendered)) == list(theirs)  # the same statistics, same names, same order
    pct = {**{f"{k}%   KLD".strip(): v for k, v in stats.kld_percentiles.items()},
           **{f"{k}%   Δp".strip(): 100 * v for k, v in stats.delta_p_percentiles.items()}}
    ours = {
        "Mean PPL(Q)": (stats.ppl_q, stats.ppl_q_unc), "Mean PPL(base)": (stats.ppl_base, stats.ppl_base_unc),
        "Cor(ln(PPL(Q)), ln(PPL(base)))": (100 * stats.ln_ppl_cor, None),
        "Mean ln(PPL(Q)/PPL(base))": (stats.ln_ppl_ratio, stats.ln_ppl_ratio_unc),
        "Mean PPL(Q)/PPL(base)": (stats.ppl_ratio, stats.ppl_ratio_unc),
        "Mean PPL(Q)-PPL(base)": (stats.ppl_diff, stats.ppl_diff_unc),
        "Mean    KLD": (stats.kld_mean, stats.kld_unc), "Maximum KLD": (stats.kld_max, None),
        "Median  KLD": (stats.kld_median, None), "Minimum KLD": (stats.kld_min, None),
        "Mean    Δp": (100 * stats.delta_p_mean, 100 * stats.delta_p_unc),
        "Maximum Δp": (100 * stats.delta_p_max, None), "Median  Δp": (100 * stats.delta_p_median, None),
        "Minimum Δp": (100 * stats.delta_p_min, None),
        "RMS Δp": (100 * stats.delta_p_rms, 100 * stats.delta_p_rms_unc),
        "Same top p": (100 * stats.same_top_p, 100 * stats.same_top_p_unc),
        **{name: (value, None) for name, value in pct.items()},
    }
    assert set(ours) == set(theirs)
    far = {name: (ours[name], theirs[name]) for name in theirs
           if not within(ours[name][0], theirs[name][0])
           or (theirs[name][1] is not None and not within(ours[name][1], theirs[name][1]))}
    assert not far, far
    assert stats.count == stats.n_chunk * (N_CTX - 1 - N_CTX // 2) and stats.n_chunk == base.n_chunk

    # llama-perplexity reads the base file this module writes, and agrees with itself on it.
    ours_file = str(root / f"ours-{quant}.kld")
    write_base_file(base, ours_file)
    again = summary(run_llama_perplexity("-m", quants[quant], "--kl-divergence-base", ours_file, "--kl-divergence",
                                      expect="Same top p:"))
    assert list(again) == list(theirs)
    assert all(within(float(again[n][0]), theirs[n][0]) for n in theirs), (again, theirs)


@pytest.mark.parametrize("tensor", ["blk.3.ffn_down.weight", "output.weight"])
def test_a_corrupted_quant_fails_the_gates_and_the_real_ones_pass(models, tensor):
    root, _, quants, _, base = models
    for quant in FTYPES:
        with LlamaCppModel(quants[quant], n_ctx=N_CTX) as model:
            assert gate_failures(kl_divergence(model, base)) == []
    bad = str(root / "fx-Q4_K_M-corrupt.gguf")
    shutil.copy(quants["Q4_K_M"], bad)
    scramble_tensor(bad, tensor)
    with LlamaCppModel(bad, n_ctx=N_CTX) as model:
        failures = gate_failures(kl_divergence(model, base))
    # A scrambled output matrix gives logits that are not numbers: NaN fails too.
    assert any(f.startswith("mean KLD") and "--max-kld 1" in f for f in failures), failures
    assert any(f.startswith("same top p") and "--min-same-top 40%" in f for f in failures), failures
