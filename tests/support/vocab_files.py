"""Tokenizers for the tests: variants of a tokenizer.json, and vocabulary-only GGUFs llama.cpp loads."""

import json

import gguf
import llama_cpp

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
