"""The built-in evaluation text: long enough, varied, and none of the calibration or validation text."""

from __future__ import annotations

import re

import pytest

from so8t_core.errors import ValidationError
from so8t_core.quantize.calibration import builtin_text
from so8t_core.validate.checks import PARITY_TEXT, VALIDATION_TEXT
from so8t_core.validate.perplexity import BUILTIN_EVAL_TEXT, read_eval_text


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?。])\s+|\n", text) if len(s.strip()) > 20 and re.search(r"\w{3}", s)]


def test_the_builtin_text_is_varied_and_long_enough():
    text = read_eval_text(BUILTIN_EVAL_TEXT)
    assert "execution model" in text.lower() and "__hash__" in text and "pdb" in text  # reference, manual
    assert any("\u4e00" <= c <= "\u9fff" for c in text) and any("\uac00" <= c <= "\ud7a3" for c in text)
    # SmolLM2's tokenizer gives 11,400 tokens (SOURCES.md); about 3.8 characters a token for this text.
    assert len(text) >= 8192 * 4.5


def test_the_builtin_text_holds_none_of_the_calibration_or_validation_text():
    text = read_eval_text(BUILTIN_EVAL_TEXT)
    others = sentences(builtin_text().decode()) + sentences(VALIDATION_TEXT + "\n" + PARITY_TEXT)
    assert len(others) > 500
    assert [s for s in others if s in text] == []


def test_a_user_text_is_read_from_a_uri_and_must_be_utf8(tmp_path):
    (tmp_path / "eval.txt").write_text("Some text of the user's own.\n", encoding="utf-8")
    assert read_eval_text(str(tmp_path / "eval.txt")) == "Some text of the user's own.\n"
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValidationError, match="not UTF-8"):
        read_eval_text(str(tmp_path / "bad.txt"))
