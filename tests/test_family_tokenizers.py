"""The families' real tokenizers, offline: llama.cpp ships vocabulary-only GGUFs of them (its
models/ggml-vocab-*.gguf, written by its converter from the families' Hugging Face tokenizers) with
test texts and the ids the Hugging Face tokenizers gave them. Rebuilt as tokenizer.json with the
family's pre-tokenizer, each is first proven to be the family's tokenizer (the same ids on every
test text, and convert_hf_to_gguf's own fingerprint names it); then the preflight's choice of
``tokenizer.ggml.pre`` must be the one llama.cpp's converter wrote, with parity in llama.cpp.
"""

from __future__ import annotations

import pytest
from support.vocab_files import (
    bpe_family_files,
    family_test_cases,
    family_vocab,
    load_vocab,
    split_byte_level,
    write_vocab_gguf,
)
from tokenizers import Tokenizer

from so8t_core.source.tokenizer import (
    LLAMA3_REGEX,
    PRE_BY_HASH,
    QWEN2_REGEX,
    check_tokenizer,
    chkhsh,
    tokenizer_metadata,
)
from so8t_core.testing.tokenizers import read_gguf_vocab

pytestmark = pytest.mark.e2e  # vocabularies of 50-150k tokens, each parsed and loaded in llama.cpp: ~40 s

GPT2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}

# family (llama.cpp's vocabulary file) -> its tokenizer.json's pre-tokenizer and BPE options, as shipped
FAMILIES = {
    "llama-bpe": (split_byte_level(LLAMA3_REGEX), {"ignore_merges": True, "add_bos": True}),  # Llama 3
    "qwen2": (split_byte_level(QWEN2_REGEX), {}),  # Qwen2, Qwen2.5, Qwen3
    "gpt-2": (GPT2_BYTE_LEVEL, {}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_family_s_tokenizer_gets_the_type_llama_cpp_s_converter_wrote(family, tmp_path):
    path = family_vocab(family)
    vocab = read_gguf_vocab(str(path))  # 50-150k tokens: gguf-py parses them in seconds, so once
    pre_tokenizer, model = FAMILIES[family]
    files, config = bpe_family_files(vocab, pre_tokenizer, **model)
    cases = family_test_cases(path)
    assert len(cases) >= 40

    # The rebuilt tokenizer is the family's: the Hugging Face ids of llama.cpp's test texts, and
    # convert_hf_to_gguf's fingerprint of its check text.
    hf = Tokenizer.from_str(files["tokenizer.json"].decode())
    assert [hf.encode(text, add_special_tokens=False).ids for text, _ in cases] == [ids for _, ids in cases]
    assert PRE_BY_HASH.get(chkhsh(hf)) == vocab.pre

    check = check_tokenizer(files, config, f"mem://{family}")
    assert check.ok, check
    assert check.pre == vocab.pre == family

    # With the metadata we write, llama.cpp gives the family's ids on every test text.
    llm = load_vocab(write_vocab_gguf(tmp_path / "ours.gguf", tokenizer_metadata(files, config, "mem://f")))
    for text, ids in cases:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
