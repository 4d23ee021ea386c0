"""Calibration text for importance matrices: the three formats read as documented, chat records rendered
as transformers renders them, tokenized as llama-imatrix tokenizes, bad text refused in one line before
any work; the sums accumulated in llama-imatrix's order; the GGUF imatrix written as it writes it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.cli import assert_one_line_error, run

from so8t_core.errors import CalibrationError
from so8t_core.quantize.calibration import (
    BUILTIN,
    BUILTIN_DATASET,
    DEFAULT_CTX,
    DOCUMENT_SEPARATOR,
    accumulate_squares,
    calibration_tokens,
    measured_weights,
    read_calibration,
)
from so8t_core.quantize.imatrix import load_imatrix, write_imatrix
from so8t_core.source.checkpoint import Checkpoint

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_plain_text_jsonl_text_and_chat_records(make_fixture, tmp_path):
    from transformers import AutoTokenizer

    src = make_fixture()
    plain = tmp_path / "notes.txt"
    plain.write_text("First document.\n\nStill the first.\n")  # one document, its last newline dropped
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "Second."}, {"text": "Third.", "id": 3}])
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}])
    ckpt = Checkpoint.open(src)
    calibration, tokens = calibration_tokens(ckpt, [str(plain), texts, chats])
    rendered = AutoTokenizer.from_pretrained(src).apply_chat_template(CHAT, tokenize=False)
    assert calibration.text == DOCUMENT_SEPARATOR.join(["First document.\n\nStill the first.", "Second.", "Third.",
                                                        rendered])
    assert calibration.documents == 4 and calibration.parse_special
    assert calibration.datasets == ["notes.txt", "texts.jsonl", "chats.jsonl"]
    # Chat records were rendered: their special tokens are tokens (llama-imatrix's --parse-special).
    assert "<|im_start|>" in rendered
    im_start = AutoTokenizer.from_pretrained(src).convert_tokens_to_ids("<|im_start|>")
    assert im_start in tokens.tolist()
    plain_only, plain_tokens = calibration_tokens(ckpt, [str(plain)])
    assert not plain_only.parse_special and im_start not in plain_tokens.tolist()


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe not text", ["not UTF-8 text"]),
    (b"", ["no calibration text"]),
    (b'{"text": "a"}\n{"text": \n', ["line 2", "not a JSON object"]),
    (b'{"text": "a"}\n[1, 2]\n', ["line 2", "not a JSON object"]),
    (b'{"title": "a"}\n', ["line 1", "neither a 'text' string nor a 'messages' list"]),
    (b'{"messages": [{"role": "user"}]}\n', ["line 1", "not a role/content pair"]),
])
def test_malformed_calibration_is_one_line(tmp_path, content, words):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(CalibrationError) as err:
        read_calibration([str(path)], chat_template="{{ messages }}")
    line = err.value.one_line()
    assert all(w in line for w in words) and "bad.jsonl" in line, line


def test_chat_records_need_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}])
    with pytest.raises(CalibrationError, match="the checkpoint has no chat template"):
        read_calibration([path], chat_template=None)


def test_a_short_or_malformed_calibration_text_is_refused_before_any_work(make_fixture, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Far too short to compute anything on.")
    out = tmp_path / "out"
    proc = run("convert", make_fixture(), "--quant", "Q4_K_M", "--calibration", str(short), "--output", str(out))
    assert_one_line_error(proc, "--calibration", "needs at least 1024", "give more text, or a smaller "
                          "--calibration-ctx")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops}\n')
    proc = run("convert", make_fixture(), "--calibration", str(bad), "--output", str(out))
    assert_one_line_error(proc, "bad.jsonl: line 2", "not a JSON object")
    assert not out.exists()


def test_squares_are_summed_row_after_row_in_float32():
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((300, 77)) * rng.random(77) * 30).astype(np.float32)
    acc = (rng.random(77) * 1e3).astype(np.float32)
    expected = acc.copy()
    for row in rows:  # llama-imatrix: acc[j] += x[j]*x[j], one row after the other
        for j in range(77):
            expected[j] = np.float32(expected[j] + np.float32(row[j] * row[j]))
    accumulate_squares(acc, rows)
    assert acc.tobytes() == expected.tobytes()


def test_the_imatrix_file_is_read_back_as_llama_quantize_reads_it(tmp_path):
    from so8t_core.gguf_file import read_gguf

    rng = np.random.default_rng(1)
    sums = {"blk.0.attn_q.weight": (rng.random(64) * 50).astype(np.float32),
            "blk.0.ffn_down.weight": (rng.random(128) * 50).astype(np.float32)}
    counts = {"blk.0.attn_q.weight": np.array([512]), "blk.0.ffn_down.weight": np.array([512])}
    write_imatrix(str(tmp_path / "m.gguf"), sums, counts, ["calibration.txt"], chunk_count=4, chunk_size=128)
    g = read_gguf(str(tmp_path / "m.gguf"))
    assert g.value("general.type") == "imatrix" and g.value("general.architecture") is None
    assert [t.name for t in g.tensors] == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                                           "blk.0.ffn_down.weight.in_sum2", "blk.0.ffn_down.weight.counts"]
    assert [list(t.shape) for t in g.tensors] == [[64], [1], [128], [1]]  # as ggml stores [n, 1]
    im = load_imatrix(str(tmp_path / "m.gguf"))
    np.testing.assert_array_equal(im.entries["blk.0.attn_q.weight"], sums["blk.0.attn_q.weight"] / np.float32(512))
    assert im.datasets == ["calibration.txt"] and im.chunk_count == 4


def test_the_weights_an_imatrix_measures():
    tensors = [("token_embd.weight", (512, 64)), ("output.weight", (512, 64)), ("output_norm.weight", (64,)),
               ("blk.0.attn_q.weight", (64, 64)), ("blk.0.attn_q.bias", (64,)), ("blk.0.attn_norm.weight", (64,)),
               ("blk.0.ffn_down.weight", (64, 128)), ("blk.1.ffn_up_exps.weight", (4, 128, 64))]
    assert measured_weights(tensors) == {"blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.1.ffn_up_exps.weight"}


def test_the_builtin_text_is_varied_and_long_enough_and_tokenizes(make_fixture):
    calibration, tokens = calibration_tokens(Checkpoint.open(make_fixture()), [BUILTIN])
    text = calibration.text
    assert calibration.datasets == [BUILTIN_DATASET] and not calibration.parse_special
    assert len(tokens) >= 2 * DEFAULT_CTX
    assert "Assignment statements" in text  # prose
    assert "class TextWrapper" in text and "PyAPI_FUNC(" in text  # Python and C
    assert "A: " in text and "\nB: " in text  # dialogue
    assert any("\u3040" <= c <= "\u309f" for c in text)  # hiragana
    assert any("\uac00" <= c <= "\ud7a3" for c in text)  # hangul
    assert any("\u0400" <= c <= "\u04ff" for c in text)  # cyrillic
    assert "¿" in text and "é" in text and "ü" in text  # Spanish, French, German
    # Every kind early on: the first chunks of --calibration-chunks N see them all.
    head = text[:20000]
    assert "Assignment" in head and "TextWrapper" in head and "A: " in head \
        and any("\u3040" <= c <= "\u309f" for c in head)


def test_the_builtin_text_holds_none_of_the_validation_text():
    import re

    from so8t_core.quantize.calibration import builtin_text
    from so8t_core.validate.checks import PARITY_TEXT, VALIDATION_TEXT

    text = builtin_text().decode()
    sentences = [s for s in re.split(r"(?<=[.!?。])\s*|\n", VALIDATION_TEXT + "\n" + PARITY_TEXT) if len(s) > 12]
    assert len(sentences) > 15
    assert [s for s in sentences if s in text] == []


@pytest.mark.parametrize("template, words", [
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", ["does not render"]),
    ("{{ 'x' * 2000000000 }}", ["MiB"]),
    ("{% for m in messages %}{{ raise_exception('no ' + m.role) if m.role == 'system' else m.content }}"
     "{% endfor %}", ["line 2", "cannot render this record", "no system"]),
])
def test_a_chat_template_renders_calibration_records_within_limits(tmp_path, monkeypatch, template, words):
    """The template is the checkpoint's code: it renders in a child process with a time and memory
    limit (an endless loop, a huge string are one line after seconds), and a record it refuses is
    named by its line."""
    import so8t_core.chat_template as chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 3)
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT[1:]}, {"messages": CHAT}])
    with pytest.raises(CalibrationError) as err:
        read_calibration([path], chat_template=template)
    line = err.value.one_line()
    assert all(w in line for w in words) and "chats.jsonl" in line, line
