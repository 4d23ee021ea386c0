"""Target mixes in llama.cpp: KLD gains per tensor class from probes (so8t_core.validate.gains), and an
AUTO file at Q4_K_M's bits per weight whose measured mean KLD is at most 0.8× Q4_K_M's (same imatrix,
same text), no larger. Small: the llama-256 fixture, chunks of 128 tokens of the fixture corpus."""

from __future__ import annotations

import os

import pytest
from support.imatrix_files import write_synthetic_imatrix
from support.llama_cpp_oracle import FIXTURES

from so8t_core.assemble.sequential import convert_sequential
from so8t_core.gguf_file import read_gguf
from so8t_core.llama_runtime import LlamaCppModel
from so8t_core.quantize import target
from so8t_core.quantize.imatrix import load_imatrix
from so8t_core.quantize.mixes import MixOptions
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.validate.gains import class_gains
from so8t_core.validate.perplexity import base_log_probs, evaluation_tokens, kl_divergence

pytestmark = pytest.mark.e2e

N_CTX = 128
TEXT = os.path.join(os.path.dirname(__file__), os.pardir, "so8t_core", "testing", "fixture_corpus.txt")


def test_auto_beats_the_mix_at_its_size(make_fixture, tmp_path):
    src = make_fixture(**FIXTURES["llama-256"])
    ckpt = Checkpoint.open(src)
    staging = str(tmp_path / "staging")
    f32 = str(tmp_path / "F32.gguf")
    convert_sequential(ckpt, "F32", f32, staging)
    write_synthetic_imatrix(tmp_path / "imatrix.gguf", src)
    imatrix = load_imatrix(str(tmp_path / "imatrix.gguf"))
    with LlamaCppModel(f32, n_ctx=N_CTX) as model, open(TEXT, encoding="utf-8") as f:
        base = base_log_probs(model, evaluation_tokens(model, f.read(), N_CTX, 8), N_CTX)
    measured = target.measure_gguf(f32, imatrix)
    gains = class_gains(f32, measured, base, str(tmp_path / "probes"), imatrix)
    assert set(gains) == {"token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                          "ffn_down"}
    assert all(g > 0 for g in gains.values()), gains
    tensors = target.with_gains(measured, gains)

    def kld(path: str) -> float:
        with LlamaCppModel(path, n_ctx=N_CTX) as model:
            return kl_divergence(model, base).kld_mean

    mix_file = str(tmp_path / "Q4_K_M.gguf")
    convert_sequential(ckpt, "Q4_K_M", mix_file, staging, options=MixOptions(has_imatrix=True), imatrix=imatrix)
    mix_types = {t.name: t.tensor_type for t in read_gguf(mix_file).tensors}
    types = target.target_types(tensors, bpw=target.bits_per_weight(tensors, mix_types))
    auto_file = str(tmp_path / "AUTO.gguf")
    recipe = target.parse_tensor_type_file(target.tensor_type_file(tensors, types))
    convert_sequential(ckpt, target.base_mix(tensors, types), auto_file, staging, imatrix=imatrix,
                       options=MixOptions(tensor_types=recipe, has_imatrix=True))
    mix_kld, auto_kld = kld(mix_file), kld(auto_file)
    assert auto_kld <= 0.8 * mix_kld, (auto_kld, mix_kld)
    assert os.path.getsize(auto_file) <= os.path.getsize(mix_file)
    # with the gains, the summed damage predicts the measured KLD (within a factor of 1.5 here)
    for predicted, measured_kld in ((target.predicted_damage(tensors, mix_types), mix_kld),
                                    (target.predicted_damage(tensors, types), auto_kld)):
        assert measured_kld / 1.5 < predicted < 1.5 * measured_kld, (predicted, measured_kld)
