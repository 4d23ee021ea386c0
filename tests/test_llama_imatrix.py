"""The importance matrix so8t-gguf computes is llama-imatrix's: on the same F32 GGUF, text and settings,
every sum and count of ours is within 1e-4 (relative) of what llama-imatrix (built from the pinned
llama.cpp by `make llama-tools`) writes, on a fixture of each architecture and on the demo at
llama-imatrix's default context; chat records rendered with the chat template equal llama-imatrix
on the rendered text with --parse-special."""

from __future__ import annotations

import json
from importlib.resources import files

import numpy as np
import pytest
from support.llama_cpp_oracle import FIXTURES, llama_imatrix

from so8t_core.assemble.sequential import convert_sequential
from so8t_core.gguf_file import read_gguf
from so8t_core.quantize.calibration import calibration_tokens, collect_activations
from so8t_core.quantize.imatrix import write_imatrix
from so8t_core.source.checkpoint import Checkpoint

pytestmark = pytest.mark.e2e

TOLERANCE = 1e-4  # relative, per entry


def corpus(times: int = 1) -> str:
    return "\n\n".join([files("so8t_core.testing").joinpath("fixture_corpus.txt").read_text().strip()] * times)


def f32_gguf(src: str, folder) -> str:
    path = str(folder / "model-F32.gguf")
    convert_sequential(Checkpoint.open(src), "F32", path, str(folder / "staging"))
    return path


def ours(src: str, model: str, calibration: list[str], out: str, ctx: int, chunks: int | None = None) -> str:
    text, tokens = calibration_tokens(Checkpoint.open(src), calibration)
    sums = collect_activations(model, tokens, ctx, chunks, n_threads=2)
    write_imatrix(out, sums.sums, sums.counts, text.datasets, sums.chunk_count, sums.chunk_size)
    return out


def assert_same_imatrix(a: str, b: str) -> float:
    """Every entry of ``a`` within TOLERANCE of ``b``'s, and the same entries and chunks; the worst
    relative difference."""
    ga, gb = read_gguf(a), read_gguf(b)
    ta = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in ga.tensors}
    tb = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in gb.tensors}
    assert set(ta) == set(tb) and ta
    worst = 0.0
    for name, theirs in tb.items():
        assert ta[name].shape == theirs.shape, name
        rel = np.abs(ta[name] - theirs) / np.maximum(np.abs(theirs), np.finfo(np.float32).tiny)
        worst = max(worst, float(rel.max()))
    assert worst <= TOLERANCE, worst
    for key in ("imatrix.chunk_count", "imatrix.chunk_size"):
        assert ga.value(key) == gb.value(key), key
    return worst


@pytest.mark.parametrize("case", list(FIXTURES))
def test_each_architecture_matches_llama_imatrix(case, make_fixture, tmp_path):
    src = make_fixture(**FIXTURES[case])
    model = f32_gguf(src, tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text(corpus() + "\n")
    theirs = llama_imatrix(model, str(text), str(tmp_path / "theirs.gguf"), ctx=64, chunks=12)
    assert_same_imatrix(ours(src, model, [str(text)], str(tmp_path / "ours.gguf"), ctx=64, chunks=12), theirs)


def test_chat_records_match_llama_imatrix_on_the_rendered_text(make_fixture, tmp_path):
    src = make_fixture(**FIXTURES["llama-256"])
    model = f32_gguf(src, tmp_path)
    turns = [{"messages": [{"role": "user", "content": f"Question {i}: {line}"},
                           {"role": "assistant", "content": line[::-1]}]}
             for i, line in enumerate(corpus().splitlines()) if line.strip()]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(t) + "\n" for t in turns))
    text, _ = calibration_tokens(Checkpoint.open(src), [str(chats)])
    rendered = tmp_path / "rendered.txt"
    rendered.write_text(text.text)
    theirs = llama_imatrix(model, str(rendered), str(tmp_path / "theirs.gguf"), ctx=64, parse_special=True)
    assert_same_imatrix(ours(src, model, [str(chats)], str(tmp_path / "ours.gguf"), ctx=64), theirs)


def test_the_demo_matches_llama_imatrix_at_its_default_context(demo_checkpoint, tmp_path):
    model = f32_gguf(demo_checkpoint, tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text(corpus(times=4) + "\n")
    theirs = llama_imatrix(model, str(text), str(tmp_path / "theirs.gguf"), ctx=512, chunks=3)
    worst = assert_same_imatrix(ours(demo_checkpoint, model, [str(text)], str(tmp_path / "ours.gguf"), ctx=512,
                                     chunks=3), theirs)
    print(f"demo: worst relative difference {worst:.3g}")
