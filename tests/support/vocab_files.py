"""Tokenizers for the tests: variants of a tokenizer.json, and vocabulary-only GGUFs llama.cpp loads."""

import json
import os
from pathlib import Path

import gguf
import llama_cpp
import pytest

from so8t_core.testing.tokenizers import GgufVocab, bpe_tokenizer_json_from_gguf

FIXTURE_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}


def write_vocab_gguf(path, kvs) -> str:
    writer = gguf.GGUFWriter(str(path), "llama")
    for kv in kvs:
        writer.add_key_value(kv.key, kv.value, kv.vtype, kv.sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def load_vocab(path: str):
    return llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)


def with_pre_tokenizer(files: dict[str, bytes], pre_tokenizer: dict, **model) -> dict[str, bytes]:
    tj = json.loads(files["tokenizer.json"])
    tj["pre_tokenizer"] = pre_tokenizer
    tj["model"].update(model)
    return {**files, "tokenizer.json": json.dumps(tj, ensure_ascii=False).encode()}


def split_byte_level(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def family_vocab(family: str) -> Path:
    """llama.cpp's vocabulary-only GGUF of a tokenizer family (``ggml-vocab-<family>.gguf``, from its
    models/, beside its tokenizer tests' ``.inp``/``.out``), in $SO8T_LLAMA_VOCABS (`make test` and
    `make test-fast` extract them from the pinned sdist and set it). Skips when it is unset."""
    folder = os.environ.get("SO8T_LLAMA_VOCABS")
    if not folder:
        pytest.skip("SO8T_LLAMA_VOCABS is unset: `make test` extracts llama.cpp's vocabulary GGUFs and sets it")
    path = Path(folder) / f"ggml-vocab-{family}.gguf"
    if not path.is_file():
        pytest.fail(f"{path} is missing: remove {folder} and run `make test` again", pytrace=False)
    return path


def family_test_cases(vocab: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test cases for a family: each text with the ids the family's own Hugging
    Face tokenizer gave it (convert_hf_to_gguf_update.py wrote them, without special tokens)."""
    texts = vocab.with_name(vocab.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = vocab.with_name(vocab.name + ".out").read_text(encoding="utf-8").split("\n")
    texts = texts[:-1] if texts[-1] == "" else texts
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, ids, strict=False)]


def bpe_family_files(vocab: GgufVocab, pre_tokenizer: dict, add_bos: bool = False,
                     **model) -> tuple[dict[str, bytes], dict]:
    """A byte-level BPE family's tokenizer.json rebuilt from llama.cpp's vocabulary GGUF of it (read
    by testing.tokenizers.read_gguf_vocab; testing.tokenizers.bpe_tokenizer_json_from_gguf), its
    BOS prepended by the post-processor when ``add_bos`` (Llama 3); and a config.json naming its BOS/EOS."""
    bos = vocab.tokens[vocab.bos_id] if add_bos else None
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(vocab.tokens),
              "bos_token_id": vocab.bos_id, "eos_token_id": vocab.eos_id}
    return {"tokenizer.json": bpe_tokenizer_json_from_gguf(vocab, pre_tokenizer, bos, **model)}, config
