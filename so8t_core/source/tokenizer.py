"""GGUF tokenizer metadata from a Hugging Face checkpoint's tokenizer files.

:func:`tokenizer_metadata` produces the ``tokenizer.*`` key/value pairs that llama.cpp's
``convert_hf_to_gguf.py`` writes for a Llama-family model, in the same order and with
the same values:

* ``tokenizer.json`` (byte-level BPE) follows ``_set_vocab_gpt2``: ``get_vocab_base``
  for the tokens, ``get_vocab_base_pre`` for ``tokenizer.ggml.pre`` and
  ``gguf.SpecialVocab`` for merges, special token ids, add-BOS/EOS flags and the chat
  template.
* ``tokenizer.model`` (SentencePiece) follows ``_set_vocab_sentencepiece``; like
  convert's ``LlamaModel.set_vocab`` it wins when both files are present.

The tokenizer is loaded with the ``tokenizers`` library straight from the bytes of
``tokenizer.json``, plus the tokens transformers 4.x registers from tokenizer_config.json
on load, which is the vocabulary convert sees through ``AutoTokenizer``. transformers
itself is not used: 5.x rebuilds the pre-tokenizer of some tokenizer classes
(``GPT2Tokenizer``, ``Qwen2Tokenizer``) instead of reading tokenizer.json, which changes
token ids and the pre-tokenizer hash. Nothing touches the network or the file system.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import struct
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Iterator, Mapping

import gguf
from gguf import GGUFValueType as VT

from so8t_core import storage
from so8t_core.chat_template import check_chat_templates
from so8t_core.errors import CheckpointError, UnsupportedError
from so8t_core.gguf_file import GGUFKV, write_gguf

K = gguf.Keys.Tokenizer
# HF architectures convert_hf_to_gguf.py handles with LlamaModel (whose set_vocab adds two rules).
LLAMA_MODEL_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")

# HF architectures convert handles with Gemma2Model/Gemma3Model: SentencePiece, then add_space_prefix false.
# Gemma 2 has no other vocabulary; Gemma 3 falls back to a byte-level BPE when there is no tokenizer.model.
GEMMA_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")

# gguf.TokenType values (the numbers are the GGUF format).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# --- tokenizer.ggml.pre: convert's pre-tokenizer fingerprint -----------------------------------

# The check text of convert_hf_to_gguf.py get_vocab_base_pre(), character for character.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(token ids of CHKTXT)) -> tokenizer.ggml.pre, copied from llama.cpp's
# get_vocab_base_pre() (where a hash appears twice the later entry wins, as there).
PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5/3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # ruGPT3XL
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",  # also mpt-7b
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # starcoder2
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
}

# The pre-tokenizer regexes as they appear in tokenizer.json (Split patterns).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# The pre-tokenizer types of the pinned llama.cpp (src/llama-vocab.cpp) tried, in this order, after
# the family's declared one: one name per behaviour of the common families (llama.cpp treats
# llama3/falcon3/pixtral as llama-bpe, phi-2/jina/exaone4 as gpt-2, deepseek-r1-qwen as qwen2,
# llama4 as gpt-4o). The other ~40 types llama.cpp knows are reached only when convert's hash
# names them: each type tried costs a vocabulary load, and a refusal must stay under seconds.
LLAMA_CPP_PRE_TYPES = (
    "gpt-2", "llama-bpe", "qwen2", "smollm", "deepseek-llm", "deepseek-coder", "deepseek-v3", "starcoder",
    "falcon", "mpt", "olmo", "stablelm2", "command-r", "tekken", "gpt-4o", "qwen35",
)

# The text a tokenizer must reproduce in llama.cpp before any conversion work (and the held-out
# PARITY_TEXT again on the final file, in validation): whitespace runs and newlines, digits and
# long numbers, contractions, punctuation runs, code, CJK, kana, Hangul, emoji with joiners,
# accents (composed, as text is written), mixed scripts.
PROBE_TEXT = (
    "Hello world!  Two  spaces,\tand a tab.\n\nNew paragraph.\n\n\n   Indented line\r\n"
    "Numbers: 7 42 314 2718 31415 9265358 3.14159 1,000,000 0x1F 1e-9 -273.15 v2.0.1 2024-12-04\n"
    "Contractions: I'm you're he's we've they'll she'd it's DON'T Can't y'all o'clock\n"
    "Punctuation!!! Really??? ...ellipsis... --dashes-- ***stars*** ((nested)) [brackets] {braces} <angles>\n"
    "def greet(name: str) -> str:\n    return f\"Hello, {name}!\"  # comment\n"
    "if (x >= 10 && y != 0) { z += x / y; }\n"
    "日本語のテキスト、カタカナとひらがな。中文文本：你好，世界！ 한국어 문장입니다.\n"
    "Emoji: 🚀 👩‍💻 🇯🇵 👍🏽 ❤️ 😶‍🌫️\n"
    "Accents: café naïve résumé Zürich São Paulo Ελληνικά Русский текст العربية עברית हिन्दी\n"
    "Mixed: abc123def ABC_def-ghi.jkl/mno iPhone15Pro αβγ123 Tokyo東京2024 $9.99 50% (12) -5 +7 #3 @4\n"
    # Runs of each kind of whitespace before each kind of character: where pre-tokenizers differ most.
    "x 1  2   3    4\t5\t\t6 \t7\u00a08\u30009  a   b\tc ,  .   !\t?  (  [\t{  \"  '\n"
    "  \n   \n\t\n \t \n\n\n\n  end   日  本\t語  🚀   😀\t€  £  \u00a0\u00a0x\u3000\u3000y \r\n\r\n  z  \n"
)


def chkhsh(tokenizer) -> str:
    """convert's fingerprint: sha256 of ``str()`` of the ids of CHKTXT, special tokens included."""
    return sha256(str(tokenizer.encode(CHKTXT).ids).encode()).hexdigest()


def _pre_by_structure(tj: dict) -> str | None:
    """Recognise a pre-tokenizer llama.cpp implements from tokenizer.json's structure, for
    checkpoints whose vocabulary differs from the one convert hashed (fine-tunes with
    extra tokens, re-trained merges) but whose pre-tokenization is the same."""
    pre = tj.get("pre_tokenizer") or {}
    normalizer = tj.get("normalizer")
    if not isinstance(pre, dict) or not (normalizer is None or isinstance(normalizer, dict)):
        return None
    # llama.cpp's "llama-bpe" looks a whole pre-token up in the vocab before merging
    # (ignore_merges); the others always merge. The tokenizer.json must agree.
    ignore_merges = bool((tj.get("model") or {}).get("ignore_merges", False))
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]

    def byte_level(step: dict, use_regex: bool) -> bool:
        return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space", True)
                and bool(step.get("use_regex", True)) == use_regex)

    if normalizer is None and not ignore_merges and kinds == ["ByteLevel"] and byte_level(steps[0], True):
        return "gpt-2"
    if (normalizer is None and not ignore_merges and kinds == ["Digits", "ByteLevel"]
            and steps[0].get("individual_digits") and byte_level(steps[1], True)):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and byte_level(steps[1], False):
        split = steps[0]
        if split.get("behavior") != "Isolated" or split.get("invert"):
            return None
        regex = (split.get("pattern") or {}).get("Regex")
        if regex == LLAMA3_REGEX and normalizer is None and ignore_merges:
            return "llama-bpe"
        # Qwen2 ships an NFC normalizer, which llama.cpp does not apply; convert maps it to
        # "qwen2" all the same, so do we.
        if regex == QWEN2_REGEX and not ignore_merges and (normalizer is None or normalizer.get("type") == "NFC"):
            return "qwen2"
    return None


# --- file loading --------------------------------------------------------------------------------


def _text(files: Mapping[str, bytes], name: str, where: str) -> str:
    try:
        return files[name].decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(posixpath.join(where, name), f"not UTF-8 text (bad byte at offset {e.start})",
                              "re-save the file as UTF-8") from None


def _parse_json(files: Mapping[str, bytes], name: str, where: str) -> Any:
    try:
        return json.loads(_text(files, name, where))
    except json.JSONDecodeError as e:
        raise CheckpointError(posixpath.join(where, name),
                              f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                              "re-download the tokenizer files of the checkpoint") from None
    except (ValueError, RecursionError) as e:  # huge integers; "[[[[...]]]]"
        problem = str(e)[:120] if isinstance(e, ValueError) else "nested too deeply"
        raise CheckpointError(posixpath.join(where, name), f"not valid JSON ({problem})",
                              "re-download the tokenizer files of the checkpoint") from None


# Tokenizer files that are text: JSON documents, and the chat template (tokenizer.model is protobuf).
TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
              "added_tokens.json", "chat_template.jinja")


def check_tokenizer_files(files: Mapping[str, bytes], where: str) -> None:
    """Refuse tokenizer files that are not UTF-8 text or not JSON, before any conversion work.

    Only what every reader of these files needs; whether llama.cpp can reproduce the
    tokenizer is decided when the metadata is built (:func:`tokenizer_metadata`).
    """
    for name in TEXT_FILES:
        if name in files:
            _text(files, name, where) if name.endswith(".jinja") else _parse_json(files, name, where)


def _json(files: Mapping[str, bytes], name: str, where: str) -> dict | None:
    """The parsed JSON object of ``name``, or None when the file is absent."""
    if name not in files:
        return None
    obj = _parse_json(files, name, where)
    if not isinstance(obj, dict):
        raise CheckpointError(posixpath.join(where, name), f"expected a JSON object, found {type(obj).__name__}")
    return obj


# --- vocabularies --------------------------------------------------------------------------------


def _looks_special(token: str) -> bool:
    # convert's does_token_look_special(): added tokens some models forget to mark special.
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean_up_tokenization(), applied by decode() when the config asks.
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _add_config_tokens(tk, files: Mapping[str, bytes], tok_config: dict | None, where: str) -> None:
    """Register the tokens transformers' fast tokenizer adds on load (convert's view of
    the vocabulary): tokenizer_config.json's added_tokens_decoder entries and the special
    tokens of special_tokens_map.json / tokenizer_config.json that tokenizer.json does not
    list as added tokens. A token already in the vocab keeps its id but becomes an added
    (so CONTROL or USER_DEFINED) token; a new one is appended, as transformers does."""
    from tokenizers import AddedToken

    cfg = tok_config or {}
    smap = _json(files, "special_tokens_map.json", where) or {}
    known = {t.content for t in tk.get_added_tokens_decoder().values()}
    decoder = cfg.get("added_tokens_decoder") or {}
    for key in sorted(decoder, key=lambda k: int(k) if str(k).isdigit() else -1):
        data = decoder[key]
        if isinstance(data, dict) and isinstance(data.get("content"), str) and data["content"] not in known:
            special = bool(data.get("special", False))
            tk.add_tokens([AddedToken(data["content"], special=special,
                                      normalized=bool(data.get("normalized", not special)),
                                      lstrip=bool(data.get("lstrip", False)), rstrip=bool(data.get("rstrip", False)),
                                      single_word=bool(data.get("single_word", False)))])
            known.add(data["content"])
    specials = []
    for attr in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                 "additional_special_tokens"):
        value = smap.get(attr, cfg.get(attr))  # special_tokens_map.json overrides, as in transformers
        specials += value if isinstance(value, list) else [value]
    for value in specials:
        content = value.get("content") if isinstance(value, dict) else value
        if isinstance(content, str) and content not in known:
            tk.add_special_tokens([AddedToken(content, special=True, normalized=False)])
            known.add(content)


def _bpe_vocab(files: Mapping[str, bytes], tok_config: dict | None, config: Mapping, where: str,
               out: dict[str, GGUFKV]) -> tuple[dict, tuple[str, str] | None]:
    """_set_vocab_gpt2 without the SpecialVocab part; returns the parsed tokenizer.json and the
    pre-tokenizer the family declares, with why (None when neither hash nor structure names one)."""
    from tokenizers import Tokenizer

    path = posixpath.join(where, "tokenizer.json")
    tj = _json(files, "tokenizer.json", where)
    model = tj.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(path, "no \"model\" object")
    if model.get("type") != "BPE":
        raise UnsupportedError(where, f"the tokenizer.json model is {model.get('type')!r}; so8t-gguf converts "
                                      "byte-level BPE tokenizers and SentencePiece tokenizer.model files")
    if model.get("byte_fallback") and (tj.get("decoder") or {}).get("type") == "Sequence":
        # convert routes these through LlamaHfVocab (SentencePiece semantics, "llama" vocab).
        raise UnsupportedError(where, "tokenizer.json is a SentencePiece-style BPE (byte_fallback) without "
                                      "tokenizer.model", "add the checkpoint's tokenizer.model")
    try:
        tk = Tokenizer.from_str(_text(files, "tokenizer.json", where))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise CheckpointError(path, f"the tokenizers library cannot load it: {e}") from None

    _add_config_tokens(tk, files, tok_config, where)
    vocab = tk.get_vocab(with_added_tokens=True)
    if not vocab:
        raise CheckpointError(path, "the vocabulary is empty")
    vocab_size = config.get("vocab_size") or len(vocab)
    if max(vocab.values()) >= vocab_size:
        raise CheckpointError(where, f"the tokenizer has token id {max(vocab.values())} but config.json "
                                     f"vocab_size is {vocab_size}")

    # What the family declares: convert's hash of its check text, else tokenizer.json's structure.
    # Only a proposal: check_tokenizer keeps it when llama.cpp reproduces the ids with it.
    pre = PRE_BY_HASH.get(chkhsh(tk))
    declared = (pre, "convert_hf_to_gguf's hash of its check text names it") if pre else None
    if pre is None and (pre := _pre_by_structure(tj)) is not None:
        declared = (pre, "tokenizer.json's pre_tokenizer has its structure")

    added_decoder = tk.get_added_tokens_decoder()  # id -> AddedToken
    added_vocab = {tok.content: i for i, tok in sorted(added_decoder.items())}
    cleanup = bool((tok_config or {}).get("clean_up_tokenization_spaces", False))
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        if token in added_vocab:
            added = added_decoder[i]
            if not added.normalized:
                # llama.cpp expects added tokens pre-normalized: convert round-trips them.
                token = tk.decode(tk.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
                if cleanup:
                    token = _clean_up_tokenization(token)
            if added.special or _looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalize user-defined spaces (Gemma)
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)

    out[K.MODEL] = GGUFKV(K.MODEL, "gpt2", VT.STRING)
    out[K.PRE] = GGUFKV(K.PRE, pre or LLAMA_CPP_PRE_TYPES[0], VT.STRING)  # chosen by check_tokenizer
    out[K.LIST] = GGUFKV(K.LIST, tokens, VT.ARRAY, VT.STRING)
    out[K.TOKEN_TYPE] = GGUFKV(K.TOKEN_TYPE, types, VT.ARRAY, VT.INT32)
    return tj, declared


def _sentencepiece_vocab(files: Mapping[str, bytes], tok_config: dict | None, config: Mapping, where: str,
                         out: dict[str, GGUFKV]) -> int:
    """_set_vocab_sentencepiece without the SpecialVocab part; returns the token count."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(files["tokenizer.model"])
    except Exception as e:
        raise CheckpointError(posixpath.join(where, "tokenizer.model"),
                              f"not a SentencePiece model ({e})") from None
    vocab_size = config.get("vocab_size") or sp.vocab_size()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):  # convert drops ids past vocab_size
        tokens[i] = sp.IdToPiece(i)
        scores[i] = sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i)
                    else UNUSED if sp.IsUnused(i) else BYTE if sp.IsByte(i) else NORMAL)
    for content, i in (_json(files, "added_tokens.json", where) or {}).items():
        if isinstance(i, int) and 0 <= i < vocab_size:
            tokens[i], scores[i], types[i] = content, -1000.0, USER_DEFINED
    # convert walks added_tokens_decoder in file order; later entries win on a clash.
    for key, data in ((tok_config or {}).get("added_tokens_decoder") or {}).items():
        if not (str(key).isdigit() and isinstance(data, dict) and isinstance(data.get("content"), str)):
            raise CheckpointError(posixpath.join(where, "tokenizer_config.json"),
                                  f"added_tokens_decoder entry {key!r} is not an id with a \"content\" string")
        i, content = int(key), data["content"]
        if i >= vocab_size:
            continue
        if data.get("special") or _looks_special(content):
            types[i] = CONTROL
        else:
            content = content.replace("\u2581", " ")
            types[i] = USER_DEFINED
        tokens[i], scores[i] = content, -1000.0

    out[K.MODEL] = GGUFKV(K.MODEL, "llama", VT.STRING)
    out[K.PRE] = GGUFKV(K.PRE, "default", VT.STRING)
    out[K.LIST] = GGUFKV(K.LIST, tokens, VT.ARRAY, VT.STRING)
    out[K.SCORES] = GGUFKV(K.SCORES, scores, VT.ARRAY, VT.FLOAT32)
    out[K.TOKEN_TYPE] = GGUFKV(K.TOKEN_TYPE, types, VT.ARRAY, VT.INT32)
    return len(tokens)


# --- gguf.SpecialVocab ---------------------------------------------------------------------------

_ID_KEYS = {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "sep": K.SEP_ID, "pad": K.PAD_ID,
            "mask": K.MASK_ID, "eot": K.EOT_ID, "eom": K.EOM_ID}  # no writer handler for cls: skipped
_ADD_KEYS = {"bos": K.ADD_BOS, "eos": K.ADD_EOS, "sep": K.ADD_SEP}


def _special_vocab(files: Mapping[str, bytes], tj: dict | None, tok_config: dict | None, config: Mapping,
                   where: str, n_vocab: int | None, load_merges: bool, out: dict[str, GGUFKV]) -> None:
    """What gguf.SpecialVocab(dir, load_merges, n_vocab).add_to_gguf() writes."""
    types = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"]
    ids: dict[str, int] = {}
    add: dict[str, bool] = {}
    merges: list[str] = []
    lowercase = strip_accents = None
    cfg = dict(tok_config) if tok_config else None  # SpecialVocab edits its copy

    def set_id(typ: str, tid: Any) -> None:
        if not isinstance(tid, int):
            return
        if tid < 0:
            raise CheckpointError(where, f"the {typ} token id is negative ({tid})")
        if (n_vocab is None or tid < n_vocab) and typ not in ids:
            ids[typ] = tid

    if tj is not None:
        if load_merges:
            raw = (tj.get("model") or {}).get("merges") or []
            if all(isinstance(m, str) for m in raw):
                merges = list(raw)
            elif all(isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m) for m in raw):
                # Pair format (transformers >= 4.45): a space inside a piece is written as
                # U+0120, as SpecialVocab does, so the "left right" string stays splittable.
                merges = [" ".join(p.replace(" ", "\u0120") for p in m) for m in raw]
            else:
                raise CheckpointError(posixpath.join(where, "tokenizer.json"), "model.merges has an unknown format")
        lowercase, strip_accents = _normalizer_flags(tj.get("normalizer"))
        added_tokens = tj.get("added_tokens") or []
        _post_processor_flags(tj.get("post_processor"), cfg, add, types)
    else:
        added_tokens = []

    chat_template = _chat_template_field(files, cfg, where)
    if cfg:
        for typ in types:
            flag = cfg.get(f"add_{typ}_token")
            if isinstance(flag, bool) and typ not in add:
                add[typ] = flag
            entry = cfg.get(f"{typ}_token")
            content = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(content, str):
                set_id(typ, next((a.get("id") for a in added_tokens if a.get("content") == content), None))
    for typ in types:  # config.json fills what the tokenizer config left open
        tid = config.get(f"{typ}_token_id")
        if tid is None and isinstance(config.get("text_config"), dict):
            tid = config["text_config"].get(f"{typ}_token_id")
        set_id(typ, tid)

    if merges:
        out[K.MERGES] = GGUFKV(K.MERGES, merges, VT.ARRAY, VT.STRING)
    elif load_merges:
        # convert only warns; llama.cpp then refuses the file ("cannot find tokenizer merges").
        raise CheckpointError(posixpath.join(where, "tokenizer.json"), "no BPE merges (model.merges is empty)")
    for typ, tid in ids.items():
        if typ in _ID_KEYS:
            out[_ID_KEYS[typ]] = GGUFKV(_ID_KEYS[typ], tid, VT.UINT32)
    for typ, flag in add.items():
        if typ in _ADD_KEYS:
            out[_ADD_KEYS[typ]] = GGUFKV(_ADD_KEYS[typ], flag, VT.BOOL)
    if isinstance(chat_template, str):
        out[K.CHAT_TEMPLATE] = GGUFKV(K.CHAT_TEMPLATE, chat_template, VT.STRING)
    elif isinstance(chat_template, list):
        _named_templates(chat_template, out)
    if lowercase is not None:
        key = "tokenizer.ggml.normalizer.lowercase"
        out[key] = GGUFKV(key, lowercase, VT.BOOL)
    if strip_accents is not None:
        key = "tokenizer.ggml.normalizer.strip_accents"
        out[key] = GGUFKV(key, strip_accents, VT.BOOL)


def _normalizer_flags(normalizer: Any) -> tuple[bool | None, bool | None]:
    lowercase = strip_accents = None
    stack = [normalizer] if isinstance(normalizer, dict) else []
    while stack:
        n = stack.pop(0)
        kind = n.get("type")
        if kind == "Lowercase":
            lowercase = True
        elif kind == "StripAccents":
            strip_accents = True
        elif kind == "BertNormalizer":
            lowercase = n.get("lowercase", lowercase)
            strip_accents = n.get("strip_accents", strip_accents)
        elif kind == "Sequence":
            stack[:0] = [m for m in n.get("normalizers", []) if isinstance(m, dict)]
    return lowercase, strip_accents


def _post_processor_flags(post: Any, cfg: dict | None, add: dict[str, bool], types: list[str]) -> None:
    """SpecialVocab's reading of tokenizer.json's post_processor: whether BOS/EOS/SEP are
    added, and which special tokens it names when tokenizer_config.json does not."""
    if not isinstance(post, dict):
        return
    c = cfg if cfg is not None else {}
    bos, cls, eos, sep = c.get("bos_token"), c.get("cls_token"), c.get("eos_token"), c.get("sep_token")
    if not bos and cls and cfg:
        cfg["bos_token"] = bos = cls
    if not eos and sep and cfg:
        cfg["eos_token"] = eos = sep
    for proc in post.get("processors", [post]):
        kind = proc.get("type")
        if kind == "ByteLevel":
            add.setdefault("bos", False)
            add.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            add.update(bos=True, eos=True, sep=True)
            if not cls and cfg:
                cfg["cls_token"] = cls = proc.get("cls", [bos])[0]
            if not sep and cfg:
                cfg["sep_token"] = sep = proc.get("sep", [eos])[0]
        elif kind == "TemplateProcessing":
            single, pair = proc.get("single", []), proc.get("pair", [])
            first = last = None
            if len(single) > 1:
                if first := single[0].get("SpecialToken", {}).get("id"):
                    if not cfg:
                        bos = first
                    elif first not in (bos, cls):
                        if not bos:
                            cfg["bos_token"] = bos = first
                        if not cls:
                            cfg["cls_token"] = cls = first
                    add["bos"] = first in (bos, cls)
                if last := single[-1].get("SpecialToken", {}).get("id"):
                    if not cfg:
                        eos = last
                    elif last != eos:
                        # The old EOS becomes EOT (or EOM), the trailing token the new EOS.
                        for extra in ("eot", "eom"):
                            if extra not in types:
                                types.append(extra)
                                cfg[f"{extra}_token"] = eos
                                break
                        cfg["eos_token"] = eos = last
                    add["eos"] = last == eos
            if pair:
                start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
                stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
                middle = pair[start:stop]
                if (middle and middle[0].get("Sequence", {}).get("id") == "A"
                        and middle[-1].get("Sequence", {}).get("id") == "B" and (middle := middle[1:-1])):
                    add_sep = False
                    entry = middle[0].get("SpecialToken", {}).get("id")
                    if entry and entry in (sep, eos) and not last:
                        add_sep = True
                    if len(middle) == 2:
                        entry = middle[1].get("SpecialToken", {}).get("id")
                        if entry and entry in (sep, eos):
                            add_sep = True
                    add["sep"] = add_sep
                    if add_sep and not sep and cfg:
                        cfg["sep_token"] = eos


def _chat_template_field(files: Mapping[str, bytes], tok_config: Mapping | None, where: str) -> Any:
    """The chat template as convert reads it (only with a tokenizer_config.json): its
    ``chat_template``, else chat_template.jinja's or chat_template.json's; a string, a list of
    ``{"name", "template"}``, or None."""
    if not tok_config:
        return None
    if "chat_template.jinja" in files:
        alt: Any = _text(files, "chat_template.jinja", where)
    elif "chat_template.json" in files:
        alt = _json(files, "chat_template.json", where).get("chat_template")
    else:
        alt = None
    template = tok_config.get("chat_template", alt)
    return template if template is None or isinstance(template, (str, list)) else None


def chat_templates(files: Mapping[str, bytes], where: str) -> dict[str, str]:
    """The chat templates a checkpoint's GGUF will carry, by name ("default": tokenizer.chat_template;
    others: tokenizer.chat_template.<name>), without building the vocabulary."""
    field = _chat_template_field(files, _json(files, "tokenizer_config.json", where), where)
    if isinstance(field, str):
        return {"default": field}
    out: dict[str, GGUFKV] = {}
    if isinstance(field, list):
        _named_templates(field, out)
    return {("default" if key == K.CHAT_TEMPLATE else key[len(K.CHAT_TEMPLATE) + 1:]): kv.value
            for key, kv in out.items() if key != K.CHAT_TEMPLATES and isinstance(kv.value, str)}


def check_chat_template(files: Mapping[str, bytes], where: str) -> None:
    """Refuse, before any conversion work, chat templates that do not render within the limits or
    that Jinja's sandbox refuses (so8t_core/chat_template.py), naming the file they come from."""
    templates = chat_templates(files, where)
    if not templates:
        return
    tok_config = _json(files, "tokenizer_config.json", where) or {}
    source = "tokenizer_config.json" if "chat_template" in tok_config else \
        "chat_template.jinja" if "chat_template.jinja" in files else "chat_template.json"
    check_chat_templates(templates, tok_config, posixpath.join(where, source))


def _named_templates(templates: list, out: dict[str, GGUFKV]) -> None:
    # GGUFWriter.add_chat_template() for a list of {"name", "template"}; the names are
    # sorted here (the writer iterates a set, which is not deterministic).
    default, names = None, []
    for choice in templates:
        if not isinstance(choice, dict):
            continue
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in str(choice.get("name", "")))
        template = choice.get("template")
        if name and template is not None:
            if name == "default":
                default = template
            else:
                names.append(name)
                key = K.CHAT_TEMPLATE_N.format(name=name)
                out[key] = GGUFKV(key, template, VT.STRING)
    if names:
        out[K.CHAT_TEMPLATES] = GGUFKV(K.CHAT_TEMPLATES, sorted(set(names)), VT.ARRAY, VT.STRING)
    if default is not None:
        out[K.CHAT_TEMPLATE] = GGUFKV(K.CHAT_TEMPLATE, default, VT.STRING)


# --- public entry point --------------------------------------------------------------------------


def _metadata(files: Mapping[str, bytes], config: Mapping, where: str
              ) -> tuple[dict[str, GGUFKV], tuple[str, str] | None]:
    """The ``tokenizer.*`` keys as convert_hf_to_gguf would write them, and the BPE
    pre-tokenizer the family declares (with why); ``tokenizer.ggml.pre`` still to be checked.
    Cached in the process (the check and the metadata both need them; a vocabulary takes a
    fraction of a second to build)."""
    key = _check_key(files, config) + "|" + where
    if key not in _METADATA:
        _METADATA[key] = _build_metadata(files, config, where)
    out, declared = _METADATA[key]
    return dict(out), declared


_METADATA: dict[str, tuple[dict[str, GGUFKV], tuple[str, str] | None]] = {}


def _build_metadata(files: Mapping[str, bytes], config: Mapping, where: str
                    ) -> tuple[dict[str, GGUFKV], tuple[str, str] | None]:
    tok_config = _json(files, "tokenizer_config.json", where)
    out: dict[str, GGUFKV] = {}  # insertion-ordered, and a later write replaces in place (as GGUFWriter)
    archs = config.get("architectures") or [None]
    llama_model = archs[0] in LLAMA_MODEL_ARCHITECTURES  # convert's LlamaModel class, with its own set_vocab
    # LlamaModel.set_vocab writes this first, before the vocabulary.
    if llama_model and tok_config and (prefix := tok_config.get("add_prefix_space")) is not None:
        out[K.ADD_PREFIX] = GGUFKV(K.ADD_PREFIX, bool(prefix), VT.BOOL)

    declared = None
    if archs[0] == "Gemma2ForCausalLM" and "tokenizer.model" not in files:
        raise CheckpointError(where, "a Gemma 2 checkpoint needs its SentencePiece tokenizer.model",
                              "copy tokenizer.model of the base model next to config.json")
    if "tokenizer.model" in files:  # LlamaModel/Qwen2Model try SentencePiece first
        n_tokens = _sentencepiece_vocab(files, tok_config, config, where, out)
        tj = _json(files, "tokenizer.json", where)
        _special_vocab(files, tj, tok_config, config, where, n_tokens, False, out)
    elif "tokenizer.json" in files:
        tj, declared = _bpe_vocab(files, tok_config, config, where, out)
        _special_vocab(files, tj, tok_config, config, where, None, True, out)
    else:
        raise CheckpointError(where, "the checkpoint has no tokenizer (neither tokenizer.json nor tokenizer.model)",
                              "copy the tokenizer files of the base model next to config.json")

    # LlamaModel.set_vocab: "granite small models" (vocab 49152, which includes SmolLM)
    # never get BOS added.
    if llama_model and config.get("vocab_size") == 49152:
        out[K.ADD_BOS] = GGUFKV(K.ADD_BOS, False, VT.BOOL)
    if archs[0] in GEMMA_ARCHITECTURES and "tokenizer.model" in files:
        out[K.ADD_PREFIX] = GGUFKV(K.ADD_PREFIX, False, VT.BOOL)  # Gemma's SentencePiece adds no dummy prefix
    return out, declared


def tokenizer_metadata(files: Mapping[str, bytes], config: Mapping, where: str,
                       allow_mismatch: bool = False) -> list[GGUFKV]:
    """The ``tokenizer.*`` GGUF metadata of a checkpoint, as convert_hf_to_gguf writes it
    for a Llama-family model, with the pre-tokenizer llama.cpp reproduces the tokenizer with.

    ``files`` maps tokenizer file names (tokenizer.json, tokenizer_config.json,
    tokenizer.model, chat_template.jinja, ...) to their bytes; ``config`` is config.json;
    ``where`` names the checkpoint in error messages. Raises CheckpointError for missing
    or malformed files and UnsupportedError for tokenizers llama.cpp does not reproduce
    (:func:`check_tokenizer`), unless ``allow_mismatch``: then the family's declared
    pre-tokenizer (or the closest one) is written and the mismatch is the caller's to state.
    """
    out, _ = _metadata(files, config, where)
    check = check_tokenizer(files, config, where)
    if not check.ok and not allow_mismatch:
        raise check.error(where)
    if check.pre is not None:
        out[K.PRE] = GGUFKV(K.PRE, check.pre, VT.STRING)
    return list(out.values())


def vocab_gguf(files: Mapping[str, bytes], config: Mapping, where: str, allow_mismatch: bool = False) -> bytes:
    """A vocabulary-only GGUF of the checkpoint's tokenizer (the architecture and the tokenizer
    keys the model GGUF carries, no tensors): llama.cpp tokenizes with it as with the model."""
    kvs = {kv.key: kv for kv in tokenizer_metadata(files, config, where, allow_mismatch)}
    return _vocab_gguf_image(kvs, _gguf_arch(config))


def special_token_texts(files: Mapping[str, bytes], where: str) -> dict[str, str]:
    """The special tokens' text by role (``bos_token``, ``eos_token``, ...), as a Hugging Face
    tokenizer hands them to its chat template: from tokenizer_config.json, else
    special_tokens_map.json."""
    out: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = _json(files, name, where) or {}
        for typ in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
            entry = cfg.get(f"{typ}_token")
            content = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(content, str):
                out.setdefault(f"{typ}_token", content)
    return out


# --- parity: the tokenizer proven in llama.cpp -----------------------------------------------------

CHECK_VERSION = "1"  # part of the cache key: bump when the check's logic changes
SHOWN_IDS = 8  # ids of each side in a message, from the first difference on


@dataclass(frozen=True)
class TokenizerCheck:
    """Whether llama.cpp reproduces a checkpoint's Hugging Face tokenizer on PROBE_TEXT, with
    which pre-tokenizer and why; what was tried; where the ids first part when none does."""

    kind: str  # "BPE" or "SentencePiece"
    pre: str | None  # tokenizer.ggml.pre to write (BPE); for a mismatch, the closest one tried
    why: str
    tried: tuple[str, ...]
    ok: bool
    n_tokens: int
    first_mismatch: int | None = None
    text_at_mismatch: str = ""
    hf: tuple[int, ...] = ()
    llama_cpp: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "pre_tokenizer": self.pre, "why": self.why, "tried": list(self.tried),
                "parity": {"ok": self.ok, "text": "PROBE_TEXT", "n_tokens": self.n_tokens,
                           "first_mismatch": self.first_mismatch, "text_at_mismatch": self.text_at_mismatch,
                           "hf": list(self.hf), "llama_cpp": list(self.llama_cpp)}}

    def error(self, where: str) -> UnsupportedError:
        names = ", ".join(self.tried[:6]) + (f" and {len(self.tried) - 6} more" if len(self.tried) > 6 else "")
        what = "no llama.cpp pre-tokenizer reproduces" if self.kind == "BPE" else "llama.cpp does not reproduce"
        return UnsupportedError(
            where, f"{what} the Hugging Face tokenizer: at {self.text_at_mismatch!r} (token {self.first_mismatch}) "
                   f"Hugging Face gives {list(self.hf)} but llama.cpp ({self.pre or 'SentencePiece'}) gives "
                   f"{list(self.llama_cpp)}; tried {names}",
            "re-save the tokenizer with the base model's pre_tokenizer, or pass --allow-tokenizer-mismatch to "
            "convert anyway (the card and manifest then say so)")


def check_tokenizer(files: Mapping[str, bytes], config: Mapping, where: str) -> TokenizerCheck:
    """Prove the tokenizer in llama.cpp before any conversion work: write its GGUF metadata into a
    vocabulary-only GGUF (llama.cpp loads one in well under a second) and compare llama.cpp's ids of
    PROBE_TEXT with the Hugging Face tokenizer's (:func:`hf_token_ids`). A BPE tokenizer gets the
    family's declared pre-tokenizer when it reproduces the ids, else the first of
    LLAMA_CPP_PRE_TYPES that does; none that does not. Cached in the process and under
    ``<cache>/tokenizer-checks/`` by the files, the config and llama.cpp's version."""
    key = _check_key(files, config)
    if key in _CHECKS:
        return _CHECKS[key]
    path = os.path.join(storage.default_cache_dir(), "tokenizer-checks", key + ".json")
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        check = TokenizerCheck(**{**cached, "tried": tuple(cached["tried"]), "hf": tuple(cached["hf"]),
                                  "llama_cpp": tuple(cached["llama_cpp"])})
    except (OSError, ValueError, TypeError, KeyError):
        check = _probe(files, config, where)
        with storage.local_atomic_file(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(dataclasses.asdict(check), f, ensure_ascii=False)
    _CHECKS[key] = check
    return check


_CHECKS: dict[str, TokenizerCheck] = {}


def _check_key(files: Mapping[str, bytes], config: Mapping) -> str:
    import llama_cpp

    what = [CHECK_VERSION, llama_cpp.__version__, sha256(PROBE_TEXT.encode()).hexdigest(),
            sorted((n, sha256(d).hexdigest()) for n, d in files.items()), json.dumps(config, sort_keys=True,
                                                                                      default=str)]
    return sha256(json.dumps(what).encode()).hexdigest()


def _probe(files: Mapping[str, bytes], config: Mapping, where: str) -> TokenizerCheck:
    out, declared = _metadata(files, config, where)
    kind = "BPE" if out[K.MODEL].value == "gpt2" else "SentencePiece"
    expected = hf_token_ids(files, PROBE_TEXT, where)
    if kind == "BPE":
        candidates = list(dict.fromkeys(([declared[0]] if declared else []) + list(LLAMA_CPP_PRE_TYPES)))
    else:
        candidates = [out.get(K.PRE).value if K.PRE in out else ""]  # SentencePiece: as written, no choice
    image = _vocab_gguf_image(out, _gguf_arch(config))
    best: tuple[int, str | None, list[int]] = (-1, None, [])
    tried = []
    for pre, got in _tokenize_variants(image, out[K.PRE].value if K.PRE in out else "", candidates, PROBE_TEXT):
        tried.append(pre if kind == "BPE" else "llama (SentencePiece)")
        if got is None:
            continue  # llama.cpp cannot load or use this vocabulary with this pre-tokenizer
        if got == expected:
            if kind != "BPE":
                why = "SentencePiece: llama.cpp reproduces the Hugging Face ids on the probe text"
            elif declared and pre == declared[0]:
                why = declared[1]
            else:
                why = ("llama.cpp reproduces the Hugging Face ids on the probe text with it"
                       + (f" (not with the declared {declared[0]!r})" if declared else ""))
            return TokenizerCheck(kind, pre if kind == "BPE" else None, why, tuple(tried), True, len(expected))
        same = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        if same > best[0]:
            best = (same, pre, got)
    first, pre, got = best
    if first < 0:  # nothing loaded at all
        first, got = 0, []
    return TokenizerCheck(kind, pre if kind == "BPE" else None, "no type tried reproduces the ids", tuple(tried),
                          False, len(expected), first, _text_at(files, expected, first, where),
                          tuple(expected[first:first + SHOWN_IDS]), tuple(got[first:first + SHOWN_IDS]))


def _tokenize_variants(image: bytes, old: str, candidates: list[str], text: str) -> Iterator[tuple[str, list | None]]:
    """(pre, llama.cpp's ids of ``text``) for the vocabulary GGUF ``image`` with each candidate
    ``tokenizer.ggml.pre`` in turn (None where llama.cpp cannot use it); stops when the caller does."""
    from so8t_core.llama_runtime import tokenize_variants

    if not old:  # no pre-tokenizer key (SentencePiece): the image as it is
        yield from zip(candidates, tokenize_variants(image, (0, 0), [b""], text))
        return
    span = _pre_span(image, old)
    replacements = [struct.pack("<Q", len(c.encode())) + c.encode() for c in candidates]
    yield from zip(candidates, tokenize_variants(image, span, replacements, text))


def _gguf_arch(config: Mapping) -> str:
    """The GGUF architecture llama.cpp applies vocabulary rules for (Phi-3 has its own)."""
    from so8t_core.source.architectures import SUPPORTED_ARCHITECTURES

    rules = SUPPORTED_ARCHITECTURES.get((config.get("architectures") or [None])[0])
    return gguf.MODEL_ARCH_NAMES[rules.model_arch] if rules else "llama"


def _vocab_gguf_image(out: Mapping[str, GGUFKV], arch: str) -> bytes:
    """A vocabulary-only GGUF (the architecture and the tokenizer keys, no tensors) as bytes."""
    with tempfile.TemporaryDirectory(prefix="so8t-vocab-") as tmp:
        path = os.path.join(tmp, "vocab.gguf")
        write_gguf(path, arch, list(out.values()), [], lambda t: b"")
        with open(path, "rb") as f:
            return f.read()


def _pre_span(image: bytes, old: str) -> tuple[int, int]:
    """Where in ``image`` the tokenizer.ggml.pre value (a GGUF string: u64 length, bytes) lies."""
    key = K.PRE.encode()
    head = struct.pack("<Q", len(key)) + key + struct.pack("<I", int(VT.STRING))
    value = struct.pack("<Q", len(old.encode())) + old.encode()
    start = image.index(head + value) + len(head)
    return start, start + len(value)


def _text_at(files: Mapping[str, bytes], ids: list[int], index: int, where: str) -> str:
    """The probe text the Hugging Face tokens around ``index`` stand for (for a message)."""
    from tokenizers import Tokenizer

    if "tokenizer.json" not in files:
        return ""
    tk = Tokenizer.from_str(_text(files, "tokenizer.json", where))
    return tk.decode(ids[max(0, index - 2):index + 3], skip_special_tokens=False)[:60]


def hf_token_ids(files: Mapping[str, bytes], text: str, where: str) -> list[int]:
    """``text`` tokenized as the checkpoint's Hugging Face tokenizer does by default.

    tokenizer.json through the ``tokenizers`` library (transformers' fast tokenizers are that
    library), with the added tokens transformers registers from tokenizer_config.json and
    special_tokens_map.json; special-token text in ``text`` is parsed, as transformers does.
    BOS/EOS as transformers 5 adds them: tokenizer_config.json's ``add_bos_token`` /
    ``add_eos_token`` when it sets either (4.x's Llama-family tokenizers do the same), else
    tokenizer.json's post-processor. (transformers' AutoTokenizer itself is not used: 5.x
    rebuilds the normalizer/pre-tokenizer of several tokenizer classes instead of reading
    tokenizer.json, e.g. LlamaTokenizer's Metaspace drops SentencePiece's dummy prefix before
    a leading space.) A checkpoint with only tokenizer.model is tokenized by SentencePiece.
    """
    tcfg = _json(files, "tokenizer_config.json", where) or {}
    flags = {k: tcfg[k] for k in ("add_bos_token", "add_eos_token") if isinstance(tcfg.get(k), bool)}
    if "tokenizer.json" not in files:
        return _sentencepiece_ids(files, text, flags, where)
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(_text(files, "tokenizer.json", where))
        _add_config_tokens(tok, files, tcfg, where)
    except CheckpointError:
        raise
    except Exception as e:  # the tokenizers library raises plain Exceptions
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(where, f"the Hugging Face tokenizer cannot be loaded ({reason})",
                              "check tokenizer.json and tokenizer_config.json") from None
    if not flags:
        return tok.encode(text).ids  # the post-processor decides

    def special_id(kind: str) -> int | None:
        entry = tcfg.get(f"{kind}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        return tok.token_to_id(content) if isinstance(content, str) else None

    ids = tok.encode(text, add_special_tokens=False).ids
    bos, eos = special_id("bos"), special_id("eos")
    if flags.get("add_bos_token") and bos is not None:
        ids = [bos] + ids
    if flags.get("add_eos_token") and eos is not None:
        ids = ids + [eos]
    return ids


def _sentencepiece_ids(files: Mapping[str, bytes], text: str, flags: Mapping[str, bool], where: str) -> list[int]:
    """A tokenizer.model-only checkpoint: SentencePiece's ids, BOS added as Llama's tokenizer does
    unless tokenizer_config.json says otherwise."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(files["tokenizer.model"])
    except Exception as e:  # sentencepiece raises RuntimeError/OSError
        raise CheckpointError(posixpath.join(where, "tokenizer.model"), f"SentencePiece cannot load it ({e})") \
            from None
    ids = sp.encode(text)
    if flags.get("add_bos_token", True) and sp.bos_id() >= 0:
        ids = [sp.bos_id()] + ids
    if flags.get("add_eos_token", False) and sp.eos_id() >= 0:
        ids = ids + [sp.eos_id()]
    return ids
