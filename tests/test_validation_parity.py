"""The tokenizer parity gate: llama.cpp must tokenize PARITY_TEXT into the checkpoint's Hugging Face ids.

Each fixture is converted to F32 once (in-process, no Prefect) and checked against its own
checkpoint (parity) and against a checkpoint whose tokenizer differs (no parity).
"""

from __future__ import annotations

import json
import shutil

import pytest

from so8t_core.assemble.sequential import convert_sequential
from so8t_core.errors import ValidationError
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.testing.fixtures import FixtureSpec, build_fixture
from so8t_core.validate.checks import (
    PARITY_SHOWN_IDS,
    PARITY_TEXT,
    check_tokenizer_parity,
    hf_token_ids,
    summarize,
    validate_file,
)

# kind -> (checkpoint folder name, FixtureSpec arguments). The phi3 folder name makes general.name
# "Tiny Phi3", under which llama.cpp applies its Phi-3 vocabulary rules.
KINDS = {"phi3-spm": ("tiny-phi3", dict(arch="phi3")), "llama-bpe": ("ckpt", dict(arch="llama", layers=1))}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """kind -> (F32 GGUF, its checkpoint, a checkpoint with the same layout but another tokenizer seed)."""
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for kind, (folder, kwargs) in KINDS.items():
        src = build_fixture(str(root / kind / folder), FixtureSpec(**kwargs))
        other = build_fixture(str(root / kind / "other"), FixtureSpec(**kwargs, seed=7))
        gguf = str(root / kind / "fx-F32.gguf")
        convert_sequential(Checkpoint.open(src), "F32", gguf, str(root / "staging"))
        out[kind] = (gguf, Checkpoint.open(src), Checkpoint.open(other))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_parity_with_its_own_checkpoint(converted, kind):
    gguf, ckpt, _ = converted[kind]
    report = check_tokenizer_parity(gguf, ckpt)
    assert report["ok"] and report["first_mismatch"] is None
    assert report["n_tokens"] == report["n_tokens_llama_cpp"] > 300
    ids = hf_token_ids(ckpt, PARITY_TEXT)
    assert report["hf"] == report["llama_cpp"] == ids[:PARITY_SHOWN_IDS]
    # add_bos as Hugging Face does it: the SentencePiece (Llama/Phi-3) tokenizer adds <s>, the byte-level BPE nothing.
    assert (ids[0] == 1) == (kind == "phi3-spm")


@pytest.mark.parametrize("kind", list(KINDS))
def test_parity_fails_against_another_tokenizer(converted, kind):
    gguf, ckpt, other = converted[kind]
    report = check_tokenizer_parity(gguf, other)
    assert not report["ok"]
    first = report["first_mismatch"]
    assert isinstance(first, int) and 0 < first < 8  # the vocabularies part within the first words
    shown = report["shown_from"]
    assert report["hf"] == hf_token_ids(other, PARITY_TEXT)[shown:shown + PARITY_SHOWN_IDS]
    assert report["hf"][first - shown] != report["llama_cpp"][first - shown]
    assert len(json.dumps(report)) < 600  # small enough for a validation report and the manifest

    checks = summarize("F32", {"ok": True}, {"ok": True}, {"ok": True}, report)
    assert not checks["passed"] and checks["failures"] == ["tokenizer"] and checks["tokenizer"] is report
    assert summarize("F32", {"ok": True}, {"ok": True}, None)["passed"]  # no tokenizer check given: as before


def test_add_bos_mismatch_is_caught(converted, tmp_path):
    """The same vocabulary, but the checkpoint's tokenizer_config.json turns BOS off: transformers then adds
    none, while the GGUF (converted with BOS on) tells llama.cpp to add one."""
    gguf, ckpt, _ = converted["phi3-spm"]
    copy = shutil.copytree(ckpt.uri, tmp_path / "no-bos")
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    report = check_tokenizer_parity(gguf, Checkpoint.open(str(copy)))
    assert not report["ok"] and report["first_mismatch"] == 0
    assert report["llama_cpp"][0] == 1 and report["hf"][0] != 1
    assert report["n_tokens_llama_cpp"] == report["n_tokens"] + 1


def test_validate_file_runs_the_tokenizer_gate(converted, monkeypatch):
    from so8t_core.validate import checks

    gguf, ckpt, other = converted["llama-bpe"]
    good = validate_file(gguf, ckpt)
    assert good["passed"] and good["tokenizer"]["ok"]
    with pytest.raises(ValidationError, match="converted from checkpoint"):
        validate_file(gguf, other)  # refused on the recorded fingerprint, before any gate runs
    monkeypatch.setattr(checks, "check_converted_from", lambda g, ckpt: None)  # the gates themselves, here
    bad = validate_file(gguf, other)  # other seed: other weights and another tokenizer
    assert not bad["passed"] and "tokenizer" in bad["failures"]
