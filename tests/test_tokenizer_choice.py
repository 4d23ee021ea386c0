"""Tokenizers as users have them: llama.cpp's pre-tokenizer chosen by behaviour, parity proven in the
preflight on a vocabulary-only GGUF, and what no pre-tokenizer reproduces refused there in one line.

The corpus is built here, from the real SmolLM2 vocabulary and the fixtures' small BPE and
SentencePiece vocabularies: each family's structure as shipped, and the variants users' tools
produce (re-saved by transformers, digit splitting on and off, other Split regexes, added tokens
with and without normalization, byte fallback, NFC and lowercase normalizers).
"""

from __future__ import annotations

import json
import shutil
import time

import gguf
import pytest
from support.cli import assert_one_line_error, run
from support.vocab_files import FIXTURE_CONFIG, load_vocab, split_byte_level, with_pre_tokenizer, write_vocab_gguf
from tokenizers import Tokenizer

from so8t_core.errors import UnsupportedError
from so8t_core.source.tokenizer import (
    LLAMA3_REGEX,
    PROBE_TEXT,
    QWEN2_REGEX,
    check_tokenizer,
    hf_token_ids,
    tokenizer_metadata,
)
from so8t_core.testing.tokenizers import (
    fixture_spm_tokenizer_files,
    fixture_tokenizer_files,
    smollm2_gguf_path,
    smollm2_tokenizer_files,
)
from so8t_core.validate.checks import PARITY_TEXT

SMOLLM2_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
                  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
DIGITS_THEN_BYTE_LEVEL = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}


def smollm2() -> dict[str, bytes]:
    return dict(smollm2_tokenizer_files(smollm2_gguf_path()))


def resaved_by_transformers(files: dict[str, bytes], tmp_path) -> dict[str, bytes]:
    """What a fine-tuning stack leaves: the tokenizer loaded with transformers and saved again."""
    from transformers import AutoTokenizer

    src, dst = tmp_path / "orig", tmp_path / "saved"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))
    return {p.name: p.read_bytes() for p in dst.iterdir() if p.name in files or p.name == "tokenizer.json"}


def with_normalizer(files: dict[str, bytes], normalizer: dict) -> dict[str, bytes]:
    tj = json.loads(files["tokenizer.json"])
    tj["normalizer"] = normalizer
    return {**files, "tokenizer.json": json.dumps(tj, ensure_ascii=False).encode()}


def with_added_token(files: dict[str, bytes], content: str, **flags) -> dict[str, bytes]:
    tj = json.loads(files["tokenizer.json"])
    new_id = max(tj["model"]["vocab"].values()) + 1 + len(tj["added_tokens"])
    tj["added_tokens"].append({"id": new_id, "content": content, "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": False, **flags})
    return {**files, "tokenizer.json": json.dumps(tj, ensure_ascii=False).encode()}


def llama_cpp_ids(files: dict[str, bytes], config: dict, text: str, tmp_path) -> list[int]:
    """llama.cpp's ids of ``text`` with the metadata we write (what the final GGUF holds)."""
    kvs = tokenizer_metadata(files, config, "mem://corpus")
    llm = load_vocab(write_vocab_gguf(tmp_path / "final.gguf", kvs))
    return llm.tokenize(text.encode(), add_bos=True, special=True)


def variants(tmp_path_factory) -> dict[str, tuple[dict[str, bytes], dict]]:
    fixture = fixture_tokenizer_files(512)
    cfg = {**FIXTURE_CONFIG, "vocab_size": 520}
    spm = fixture_spm_tokenizer_files(512, seed=2, style="llama")
    return {
        "smollm2 as shipped": (smollm2(), SMOLLM2_CONFIG),
        "smollm2 re-saved by transformers": (resaved_by_transformers(smollm2(), tmp_path_factory.mktemp("rs")),
                                             SMOLLM2_CONFIG),
        "smollm2 with an added user token, normalized": (with_added_token(smollm2(), "so8t-gguf", normalized=True),
                                                         {**SMOLLM2_CONFIG, "vocab_size": 49153}),
        "smollm2 with an added special token, lstrip/rstrip": (
            with_added_token(smollm2(), "<|tool|>", special=True, lstrip=True, rstrip=True),
            {**SMOLLM2_CONFIG, "vocab_size": 49153}),
        "smollm2 with a lowercase normalizer": (with_normalizer(smollm2(), {"type": "Lowercase"}), SMOLLM2_CONFIG),
        "bpe, digits split": (with_pre_tokenizer(fixture, DIGITS_THEN_BYTE_LEVEL), cfg),
        "bpe, digits not split": (with_pre_tokenizer(fixture, BYTE_LEVEL), cfg),
        "bpe, llama3 regex": (with_pre_tokenizer(fixture, split_byte_level(LLAMA3_REGEX), ignore_merges=True), cfg),
        "bpe, qwen2 regex": (with_pre_tokenizer(fixture, split_byte_level(QWEN2_REGEX)), cfg),
        "bpe, qwen2 regex and NFC": (with_normalizer(with_pre_tokenizer(fixture, split_byte_level(QWEN2_REGEX)),
                                                     {"type": "NFC"}), cfg),
        "bpe, numbers of up to 2 digits": (
            with_pre_tokenizer(fixture, split_byte_level(LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}{1,2}")),
                               ignore_merges=True), cfg),
        "smollm2 split on whitespace alone": (with_pre_tokenizer(smollm2(), split_byte_level(r"\s+|\S+")),
                                              SMOLLM2_CONFIG),
        "sentencepiece with byte fallback": (spm, {"vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2}),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return variants(tmp_path_factory)


EXPECTED = {  # what each variant gets: its pre-tokenizer, or None for "refused in the preflight"
    "smollm2 as shipped": "smollm",
    "smollm2 re-saved by transformers": "gpt-2",
    "smollm2 with an added user token, normalized": "smollm",
    "smollm2 with an added special token, lstrip/rstrip": "smollm",
    "smollm2 with a lowercase normalizer": None,
    "bpe, digits split": "smollm",
    "bpe, digits not split": "gpt-2",
    "bpe, llama3 regex": "llama-bpe",
    "bpe, qwen2 regex": "qwen2",
    "bpe, qwen2 regex and NFC": "qwen2",
    # A regex llama.cpp has no type for, which the small vocabulary cannot tell from llama3's (it has no
    # multi-digit tokens): the ids are the same, so it converts; the real vocabulary below cannot.
    "bpe, numbers of up to 2 digits": "llama-bpe",
    "smollm2 split on whitespace alone": None,
    "sentencepiece with byte fallback": "SentencePiece",
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_tokenizer_converts_with_proven_parity_or_is_refused_in_one_line(name, corpus, tmp_path):
    files, config = corpus[name]
    started = time.monotonic()
    check = check_tokenizer(files, config, f"mem://{name}")
    elapsed = time.monotonic() - started
    expected = EXPECTED[name]
    if expected is None:
        assert not check.ok
        with pytest.raises(UnsupportedError) as err:
            tokenizer_metadata(files, config, "mem://corpus")
        line = err.value.one_line()
        assert "\n" not in line and "Hugging Face gives" in line and "llama.cpp" in line and "tried" in line
        assert "--allow-tokenizer-mismatch" in line
    else:
        assert check.ok, check
        assert (check.pre or "SentencePiece") == expected
        # Parity on the probe text and on held-out text the check never saw, with the metadata we write.
        for text in (PROBE_TEXT, PARITY_TEXT):
            assert llama_cpp_ids(files, config, text, tmp_path) == hf_token_ids(files, text, "mem://corpus")
    print(f"{name}: {check.pre if check.ok else 'refused'} in {elapsed:.2f} s ({len(check.tried)} tried)")


def test_the_family_s_own_type_is_what_convert_wrote():
    """SmolLM2 as shipped: the type the shipped GGUF (written by llama.cpp's converter) names."""
    shipped = gguf.GGUFReader(smollm2_gguf_path()).fields["tokenizer.ggml.pre"].contents()
    assert check_tokenizer(smollm2(), SMOLLM2_CONFIG, "mem://smollm2").pre == shipped == "smollm"


def test_a_re_saved_tokenizer_no_longer_gets_the_type_that_breaks_it(corpus, tmp_path):
    """The reported failure: re-saved SmolLM2 declared "smollm", which llama.cpp splits differently
    from Hugging Face around whitespace before digits; the check picks one that agrees."""
    files, config = corpus["smollm2 re-saved by transformers"]
    tj = json.loads(files["tokenizer.json"])
    assert tj["pre_tokenizer"]["type"] == "ByteLevel"  # no Digits split any more
    check = check_tokenizer(files, config, "mem://resaved")
    assert check.tried[0] == "smollm" and check.pre == "gpt-2"
    assert "not with the declared 'smollm'" in check.why
    kvs = {kv.key: kv for kv in tokenizer_metadata(files, config, "mem://resaved")}
    kvs["tokenizer.ggml.pre"] = gguf_kv("tokenizer.ggml.pre", "smollm")
    llm = load_vocab(write_vocab_gguf(tmp_path / "smollm.gguf", list(kvs.values())))
    assert llm.tokenize(PARITY_TEXT.encode(), add_bos=True, special=True) != \
        hf_token_ids(files, PARITY_TEXT, "mem://resaved")


def gguf_kv(key: str, value: str):
    from so8t_core.gguf_file import kv_str

    return kv_str(key, value)


def test_the_check_is_cached_across_processes(corpus, tmp_path, monkeypatch):
    import so8t_core.source.tokenizer as tokenizer

    files, config = corpus["bpe, qwen2 regex"]
    first = check_tokenizer(files, config, "mem://cached")
    monkeypatch.setattr(tokenizer, "_CHECKS", {})  # a new process: only the disk cache
    monkeypatch.setattr(tokenizer, "_probe", lambda *a: pytest.fail("probed again"))
    assert check_tokenizer(files, config, "mem://cached") == first


# --- the command line --------------------------------------------------------------------------------


def fixture_with(tmp_path, make_fixture, files: dict[str, bytes]) -> str:
    src = tmp_path / "ckpt"
    shutil.copytree(make_fixture(layers=1, vocab=520), src)
    for name, data in files.items():
        (src / name).write_bytes(data)
    return str(src)


def test_convert_refuses_a_tokenizer_llama_cpp_does_not_reproduce_before_any_work(make_fixture, tmp_path):
    bad = with_normalizer(fixture_tokenizer_files(512), {"type": "Lowercase"})
    src = fixture_with(tmp_path, make_fixture, {"tokenizer.json": bad["tokenizer.json"]})
    out = tmp_path / "out"
    proc = run("convert", src, "--output", str(out), "--work-dir", str(tmp_path / "work"))
    assert_one_line_error(proc, "no llama.cpp pre-tokenizer reproduces the Hugging Face tokenizer",
                          "--allow-tokenizer-mismatch")
    assert not out.exists() and not (tmp_path / "work").exists()  # refused before fetching anything
    analyzed = run("analyze", src)
    assert analyzed.returncode == 0 and "llama.cpp does NOT give the Hugging Face ids" in analyzed.stdout


def test_analyze_reports_the_tokenizer_and_why(make_fixture, tmp_path):
    fixture = fixture_tokenizer_files(512)
    src = fixture_with(tmp_path, make_fixture, {"tokenizer.json": with_pre_tokenizer(fixture, BYTE_LEVEL)[
        "tokenizer.json"]})
    proc = run("analyze", src, "--json")
    assert proc.returncode == 0, proc.stderr
    t = json.loads(proc.stdout)["tokenizer"]
    assert (t["type"], t["pre_tokenizer"], t["parity"]["ok"]) == ("BPE", "gpt-2", True)
    assert t["why"] and t["tried"][0] == "gpt-2" and t["parity"]["n_tokens"] > 300
    assert "llama.cpp pre-tokenizer 'gpt-2'" in run("analyze", src).stdout


def test_the_probe_text_covers_what_users_type():
    tk = Tokenizer.from_str(smollm2()["tokenizer.json"].decode())
    pieces = tk.pre_tokenizer.pre_tokenize_str(PROBE_TEXT)
    assert len(pieces) > 300
    for needle in ("  \n", "\t\t", "9265358", "'ll", "日本語", "한국어", "🚀", "é", "\u00a0", "\u3000", "def ", "\r\n"):
        assert needle in PROBE_TEXT, needle
