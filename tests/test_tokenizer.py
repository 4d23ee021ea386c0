"""Tokenizer metadata: equal to what convert_hf_to_gguf wrote for SmolLM2, and tokenizing
exactly like the Hugging Face tokenizer once llama.cpp loads it.

llama.cpp is driven through llama-cpp-python with ``vocab_only=True`` on GGUFs that hold
only ``general.architecture`` and the tokenizer keys (no hyperparameters, no tensors):
llama.cpp loads those without complaint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import gguf
import pytest
from support.vocab_files import FIXTURE_CONFIG, load_vocab, split_byte_level, with_pre_tokenizer, write_vocab_gguf
from tokenizers import Tokenizer

from so8t_core.errors import CheckpointError, UnsupportedError
from so8t_core.source.tokenizer import LLAMA3_REGEX, QWEN2_REGEX, tokenizer_metadata
from so8t_core.testing.tokenizers import (
    CHATML_TEMPLATE,
    _fixture_files_cached,
    fixture_tokenizer_files,
    smollm2_gguf_path,
    smollm2_tokenizer_files,
)

# English, Japanese, code, emoji (with ZWJ and skin tone), digits, odd whitespace, contractions.
TEXT = (
    "Hello, world! In 2024 we computed π ≈ 3.14159 and 1234567 apples, 1000 pears.\n"
    "日本語のテキスト：東京は日本の首都です。カタカナとひらがな、漢字。\n"
    "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # 🦙🚀\n"
    "   leading spaces, trailing tabs\t\t\n\n\n"
    "Emoji 😶\u200d🌫️ 👍🏽 — naïve café, Ünïcödé; I've they'll WE'RE don't 12,345.678\n"
)
SMOLLM2_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
                  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def hf(files: dict[str, bytes]) -> Tokenizer:
    return Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))


def assert_parity(llm, tok: Tokenizer, text: str = TEXT) -> list[int]:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    assert llm.detokenize(ids).decode("utf-8") == text
    return ids


# --- SmolLM2: the real 49152-token vocabulary ---------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_files():
    return smollm2_tokenizer_files(smollm2_gguf_path())


@pytest.fixture(scope="module")
def smollm2_kvs(smollm2_files):
    return tokenizer_metadata(smollm2_files, SMOLLM2_CONFIG, "mem://smollm2")


@pytest.fixture(scope="module")
def smollm2_reference():
    """The tokenizer.* fields of the GGUF convert_hf_to_gguf produced for SmolLM2."""
    reader = gguf.GGUFReader(smollm2_gguf_path())
    return {k: (f.contents(), f.types) for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_kvs, tmp_path_factory):
    return load_vocab(write_vocab_gguf(tmp_path_factory.mktemp("smollm2") / "vocab.gguf", smollm2_kvs))


def test_smollm2_metadata_equals_shipped_gguf(smollm2_kvs, smollm2_reference):
    ours = {kv.key: kv for kv in smollm2_kvs}
    for key, (value, types) in smollm2_reference.items():
        assert key in ours, key
        kv = ours[key]
        assert kv.vtype == types[0], key
        if kv.vtype == gguf.GGUFValueType.ARRAY:
            assert kv.sub_type == types[-1], key
        assert kv.value == value, key
    # The shipped file comes from an older convert; today's SpecialVocab also writes
    # add_eos_token=False for a ByteLevel post-processor.
    assert {k: v.value for k, v in ours.items() if k not in smollm2_reference} == {
        "tokenizer.ggml.add_eos_token": False}
    assert ours["tokenizer.ggml.pre"].value == "smollm"
    # Convert's order: prefix flag (LlamaModel), vocab, merges, ids, add flags, template.
    assert [kv.key for kv in smollm2_kvs] == [
        "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.model", "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
        "tokenizer.chat_template"]


def test_smollm2_files_are_pinned_and_load_in_transformers(smollm2_files, tmp_path):
    # Byte-stable: any change to these bytes changes every checkpoint built from them.
    assert {k: hashlib.sha256(v).hexdigest()[:16] for k, v in smollm2_files.items()} == SMOLLM2_SHA
    tj = json.loads(smollm2_files["tokenizer.json"])
    assert tj["pre_tokenizer"]["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}

    from transformers import AutoTokenizer

    for name, data in smollm2_files.items():
        (tmp_path / name).write_bytes(data)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (1, 2, 8192)
    assert tok.encode(TEXT, add_special_tokens=False) == hf(smollm2_files).encode(TEXT, add_special_tokens=False).ids
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


SMOLLM2_SHA = {
    "special_tokens_map.json": "2b7379f3ae813529",
    "tokenizer.json": "96a0af06f7c3dc6e",
    "tokenizer_config.json": "e55e84d8aae8750e",
}


def test_smollm2_llama_cpp_tokenizes_like_hf(smollm2_llm, smollm2_files):
    tok = hf(smollm2_files)
    ids = assert_parity(smollm2_llm, tok)
    # SmolLM's Digits pre-tokenizer: numbers go digit by digit on both sides.
    assert [tok.id_to_token(i) for i in tok.encode(" 2024").ids] == ["Ġ", "2", "0", "2", "4"]
    assert smollm2_llm.tokenize(b" 2024", add_bos=False, special=False) == tok.encode(" 2024").ids
    # Special tokens in the text, parsed as such on both sides.
    chat = "<|im_start|>user\n3.14159 は π<|im_end|>\n<|im_start|>assistant\n"
    assert smollm2_llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat).ids
    # ... and the GGUF convert wrote tokenizes the same way.
    shipped = load_vocab(smollm2_gguf_path())
    assert shipped.tokenize(TEXT.encode(), add_bos=False, special=False) == ids


# --- the fixture tokenizer ----------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [300, 512])
def test_fixture_tokenizer_size_determinism_and_parity(vocab_size, tmp_path):
    files = fixture_tokenizer_files(vocab_size)
    # Built twice from scratch (bypassing the cache): the same bytes.
    assert dict(_fixture_files_cached.__wrapped__(vocab_size, 0)) == files
    assert dict(_fixture_files_cached.__wrapped__(vocab_size, 1)) != files
    tok = hf(files)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    assert [tok.id_to_token(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

    kvs = {kv.key: kv.value for kv in tokenizer_metadata(files, FIXTURE_CONFIG, "mem://fixture")}
    assert kvs["tokenizer.ggml.pre"] == "gpt-2"  # unknown hash, recognised by structure
    assert len(kvs["tokenizer.ggml.tokens"]) == vocab_size
    assert len(kvs["tokenizer.ggml.merges"]) == vocab_size - 259
    assert kvs["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert (kvs["tokenizer.ggml.bos_token_id"], kvs["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert kvs["tokenizer.chat_template"] == CHATML_TEMPLATE

    llm = load_vocab(write_vocab_gguf(tmp_path / "fixture.gguf", tokenizer_metadata(files, FIXTURE_CONFIG, "x")))
    assert_parity(llm, tok)


def test_fixture_pins_and_limits():
    assert hashlib.sha256(fixture_tokenizer_files(512)["tokenizer.json"]).hexdigest()[:16] == FIXTURE_512_SHA
    with pytest.raises(ValueError):
        fixture_tokenizer_files(299)


FIXTURE_512_SHA = "8d463ce9aeecd4e0"


def test_vocab_padded_to_config_vocab_size(tmp_path):
    files = fixture_tokenizer_files(300)
    kvs = tokenizer_metadata(files, {**FIXTURE_CONFIG, "vocab_size": 320}, "mem://padded")
    values = {kv.key: kv.value for kv in kvs}
    assert values["tokenizer.ggml.tokens"][300:] == [f"[PAD{i}]" for i in range(300, 320)]
    assert values["tokenizer.ggml.token_type"][300:] == [5] * 20  # UNUSED
    llm = load_vocab(write_vocab_gguf(tmp_path / "padded.gguf", kvs))
    assert llm.n_vocab() == 320
    assert_parity(llm, hf(files))


@pytest.mark.parametrize("pre, pre_tokenizer, model", [
    ("llama-bpe", split_byte_level(LLAMA3_REGEX), {"ignore_merges": True}),
    ("qwen2", split_byte_level(QWEN2_REGEX), {}),
    ("smollm", {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}, {}),
])
def test_pre_tokenizer_recognised_by_structure(pre, pre_tokenizer, model, tmp_path):
    """Unknown hash, known structure: the name we pick makes llama.cpp split like HF."""
    files = with_pre_tokenizer(fixture_tokenizer_files(512), pre_tokenizer, **model)
    kvs = tokenizer_metadata(files, FIXTURE_CONFIG, "mem://structure")
    assert {kv.key: kv.value for kv in kvs}["tokenizer.ggml.pre"] == pre
    assert_parity(load_vocab(write_vocab_gguf(tmp_path / "v.gguf", kvs)), hf(files))


def test_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    from so8t_core.testing.tokenizers import _FIXTURE_CORPUS

    model = io.BytesIO()
    # Llama-style SentencePiece: identity normalizer, whitespace kept, byte fallback.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_FIXTURE_CORPUS.splitlines()), model_writer=model, vocab_size=400,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    files = {"tokenizer.model": model.getvalue()}
    kvs = tokenizer_metadata(files, {"vocab_size": 400, "bos_token_id": 1, "eos_token_id": 2}, "mem://spm")
    values = {kv.key: kv.value for kv in kvs}
    assert (values["tokenizer.ggml.model"], values["tokenizer.ggml.pre"]) == ("llama", "default")
    assert values["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # unk, <s>, </s>, <0x00>
    assert len(values["tokenizer.ggml.scores"]) == 400
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(files["tokenizer.model"])
    llm = load_vocab(write_vocab_gguf(tmp_path / "spm.gguf", kvs))
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == sp.encode(TEXT)


# --- bad input ----------------------------------------------------------------------------------


def test_missing_tokenizer_files():
    with pytest.raises(CheckpointError) as err:
        tokenizer_metadata({"tokenizer_config.json": b"{}"}, {}, "s3://bucket/ckpt")
    assert "tokenizer.json" in str(err.value) and "hint:" in str(err.value)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_invalid_json_names_the_file(name):
    files = {**fixture_tokenizer_files(300), name: b'{"model": {\n  "type": "BPE",,\n}'}
    with pytest.raises(CheckpointError) as err:
        tokenizer_metadata(files, FIXTURE_CONFIG, "s3://bucket/ckpt")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"s3://bucket/ckpt/{name}: not valid JSON")


def test_non_utf8_file():
    files = {**fixture_tokenizer_files(300), "chat_template.jinja": b"{{ '\xff' }}"}
    files["tokenizer_config.json"] = json.dumps(
        {k: v for k, v in json.loads(files["tokenizer_config.json"]).items() if k != "chat_template"}).encode()
    with pytest.raises(CheckpointError, match=r"ckpt/chat_template\.jinja: not UTF-8"):
        tokenizer_metadata(files, FIXTURE_CONFIG, "ckpt")


def test_unsupported_tokenizers():
    files = fixture_tokenizer_files(300)
    metaspace = with_pre_tokenizer(files, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                                            "split": True})
    with pytest.raises(UnsupportedError, match=r"^mem://odd: no llama.cpp pre-tokenizer reproduces the Hugging Face"):
        tokenizer_metadata(metaspace, FIXTURE_CONFIG, "mem://odd")
    tj = json.loads(files["tokenizer.json"])
    tj["model"] = {"type": "WordPiece", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"}
    with pytest.raises(UnsupportedError, match="WordPiece"):
        tokenizer_metadata({**files, "tokenizer.json": json.dumps(tj).encode()}, {}, "mem://bert")
    with pytest.raises(CheckpointError, match="vocab_size is 100"):
        tokenizer_metadata(files, {"vocab_size": 100}, "mem://small")


def test_bos_from_template_post_processor(tmp_path):
    """A Llama-3-style TemplateProcessing post-processor: BOS added, on both sides."""
    files = with_pre_tokenizer(fixture_tokenizer_files(512), split_byte_level(LLAMA3_REGEX), ignore_merges=True)
    tj = json.loads(files["tokenizer.json"])
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {**bos}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    config = {**json.loads(files["tokenizer_config.json"]), "add_bos_token": True}
    files = {**files, "tokenizer.json": json.dumps(tj).encode(), "tokenizer_config.json": json.dumps(config).encode()}
    kvs = tokenizer_metadata(files, {"bos_token_id": 1, "eos_token_id": 2}, "mem://llama3ish")
    values = {kv.key: kv.value for kv in kvs}
    assert (values["tokenizer.ggml.pre"], values["tokenizer.ggml.add_bos_token"]) == ("llama-bpe", True)
    assert "tokenizer.ggml.add_eos_token" not in values  # no trailing special token, no add_eos_token in config
    llm = load_vocab(write_vocab_gguf(tmp_path / "bos.gguf", kvs))
    ids = hf(files).encode(TEXT).ids
    assert ids[0] == 1
    assert llm.tokenize(TEXT.encode(), add_bos=True, special=False) == ids


def test_chat_template_sources():
    base = fixture_tokenizer_files(300)
    config = json.loads(base["tokenizer_config.json"])
    del config["chat_template"]
    files = {**base, "tokenizer_config.json": json.dumps(config).encode()}

    def template(extra: dict[str, bytes]):
        values = {kv.key: kv.value for kv in tokenizer_metadata({**files, **extra}, FIXTURE_CONFIG, "m")}
        return values.get("tokenizer.chat_template")

    assert template({}) is None
    assert template({"chat_template.jinja": b"{{ jinja }}", "chat_template.json": b'{"chat_template": "x"}'}) \
        == "{{ jinja }}"
    assert template({"chat_template.json": b'{"chat_template": "{{ json }}"}'}) == "{{ json }}"
    # tokenizer_config.json's own template wins over both files.
    assert tokenizer_metadata({**base, "chat_template.jinja": b"other"}, FIXTURE_CONFIG, "m")[-1].value \
        == CHATML_TEMPLATE


def test_special_tokens_known_only_from_tokenizer_config():
    """Special tokens missing from tokenizer.json's added_tokens are still CONTROL, as
    transformers (and so convert) registers them from tokenizer_config.json on load."""
    files = fixture_tokenizer_files(300)
    tj = json.loads(files["tokenizer.json"])
    tj["added_tokens"] = []
    kvs = tokenizer_metadata({**files, "tokenizer.json": json.dumps(tj).encode()}, FIXTURE_CONFIG, "m")
    values = {kv.key: kv.value for kv in kvs}
    assert values["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    # SpecialVocab finds ids in tokenizer.json's added_tokens only; config.json fills in.
    assert (values["tokenizer.ggml.bos_token_id"], values["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert "tokenizer.ggml.unknown_token_id" not in values


# --- the SentencePiece fixture tokenizer (Llama 2 / Phi-3 style) ----------------------------------

SPM_PINS = {  # sha256[:16] of (vocab 384, seed 0): any change changes every spm fixture checkpoint
    "llama": {"tokenizer.model": "8ff5b26c7840ea52", "tokenizer.json": "66515ff3c4fa1569",
              "tokenizer_config.json": "3adac1f6414adc2f", "special_tokens_map.json": "6fa06efa2785e450"},
    "phi3": {"tokenizer.model": "8d6b4f6e4b65bf4c", "tokenizer.json": "a2e10a16695a5d49",
             "tokenizer_config.json": "77dac2e6ad205e62", "special_tokens_map.json": "3627b916d48030f8",
             "added_tokens.json": "00b3581657d41549"},
    "gemma": {"tokenizer.model": "928d6809817afde2", "tokenizer.json": "ab529cd6f0992007",
              "tokenizer_config.json": "f0909fc57cf601ba", "special_tokens_map.json": "6fa06efa2785e450"},
}


def _sha16(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest()[:16] for k, v in files.items()}


def _sp(files):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(files["tokenizer.model"])
    return sp


@pytest.mark.parametrize("style", ["llama", "phi3", "gemma"])
def test_spm_fixture_is_deterministic_and_exactly_sized(style):
    import subprocess
    import sys

    from so8t_core.testing.tokenizers import PHI3_ADDED_TOKENS, _fixture_spm_files_cached, fixture_spm_tokenizer_files

    files = fixture_spm_tokenizer_files(384, style=style)
    assert _sha16(files) == SPM_PINS[style]
    # Trained again from scratch, here and in a fresh interpreter (other hash seed): the same bytes.
    assert dict(_fixture_spm_files_cached.__wrapped__(384, 0, style)) == files
    code = ("import hashlib, json; from so8t_core.testing.tokenizers import fixture_spm_tokenizer_files as f; "
            f"print(json.dumps({{k: hashlib.sha256(v).hexdigest()[:16] for k, v in f(384, 0, {style!r}).items()}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert json.loads(out) == SPM_PINS[style]
    assert fixture_spm_tokenizer_files(384, seed=1, style=style)["tokenizer.model"] != files["tokenizer.model"]

    extra = PHI3_ADDED_TOKENS if style == "phi3" else ()
    sp, tok = _sp(files), hf(files)
    assert sp.vocab_size() + len(extra) == 384 == tok.get_vocab_size(with_added_tokens=True)
    assert [sp.IdToPiece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert [tok.id_to_token(i) for i in range(sp.vocab_size())] == [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    assert [tok.id_to_token(sp.vocab_size() + k) for k in range(len(extra))] == list(extra)
    config = json.loads(files["tokenizer_config.json"])
    assert (config["tokenizer_class"], config["add_bos_token"], config["bos_token"], config["eos_token"],
            config["unk_token"]) == ("GemmaTokenizer" if style == "gemma" else "LlamaTokenizer", True, "<s>", "</s>",
                                     "<unk>")
    assert ("added_tokens.json" in files) == (style == "phi3")
    if style == "phi3":
        assert json.loads(files["added_tokens.json"]) == {t: 373 + k for k, t in enumerate(extra)}
        assert "<|user|>" in config["chat_template"] and "<|assistant|>" in config["chat_template"]
    else:
        assert "[INST]" in config["chat_template"]
    for bad in (335, 1025):
        with pytest.raises(ValueError, match="vocab_size must be in"):
            fixture_spm_tokenizer_files(bad)


@pytest.mark.parametrize("style, vocab_size", [("llama", 384), ("llama", 700), ("phi3", 384), ("phi3", 512)])
def test_spm_fixture_metadata_and_llama_cpp_parity(style, vocab_size, tmp_path):
    from so8t_core.testing.tokenizers import PHI3_ADDED_TOKENS, fixture_spm_tokenizer_files
    from so8t_core.validate.checks import PARITY_TEXT

    files = fixture_spm_tokenizer_files(vocab_size, seed=2, style=style)
    sp, tok = _sp(files), hf(files)
    n_pieces = sp.vocab_size()
    config = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2}
    kvs = tokenizer_metadata(files, config, "mem://spm-fixture")
    values = {kv.key: kv.value for kv in kvs}
    assert (values["tokenizer.ggml.model"], values["tokenizer.ggml.pre"]) == ("llama", "default")
    assert len(values["tokenizer.ggml.tokens"]) == len(values["tokenizer.ggml.scores"]) == vocab_size
    types = values["tokenizer.ggml.token_type"]
    # <unk> <s> </s> are in tokenizer_config.json's added_tokens_decoder, so CONTROL with score -1000 (as
    # convert writes them, <unk> included); then the byte pieces and the normal pieces with SentencePiece's scores.
    assert types[:3] == [3, 3, 3] and values["tokenizer.ggml.scores"][:3] == [-1000.0] * 3
    assert set(types[3:259]) == {6} and set(types[259:n_pieces]) == {1}
    assert values["tokenizer.ggml.scores"][259:n_pieces] == [sp.GetScore(i) for i in range(259, n_pieces)]
    if style == "phi3":  # Phi-3's added tokens: CONTROL, score -1000, as convert writes them
        assert values["tokenizer.ggml.tokens"][n_pieces:] == list(PHI3_ADDED_TOKENS)
        assert set(types[n_pieces:]) == {3} and set(values["tokenizer.ggml.scores"][n_pieces:]) == {-1000.0}
    assert (values["tokenizer.ggml.bos_token_id"], values["tokenizer.ggml.eos_token_id"],
            values["tokenizer.ggml.unknown_token_id"], values["tokenizer.ggml.add_bos_token"]) == (1, 2, 0, True)
    assert values["tokenizer.chat_template"] == json.loads(files["tokenizer_config.json"])["chat_template"]

    # SentencePiece, Hugging Face (tokenizer.json; its post-processor adds BOS) and llama.cpp agree.
    expected = [1] + sp.encode(PARITY_TEXT)
    assert tok.encode(PARITY_TEXT).ids == expected
    llm = load_vocab(write_vocab_gguf(tmp_path / "spm.gguf", kvs))
    assert llm.tokenize(PARITY_TEXT.encode(), add_bos=True, special=True) == expected
    assert llm.tokenize(PARITY_TEXT.encode(), add_bos=True, special=False) == expected
    assert sp.decode(expected[1:]) == tok.decode(expected) == PARITY_TEXT
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == sp.encode(TEXT)
    assert len(set(expected)) > 100 and sum(3 <= t < 259 for t in expected) > 50  # merges and byte fallback both


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "Gemma3ForCausalLM"])
def test_gemma_sentencepiece_adds_no_space_prefix_in_hf_sentencepiece_and_llama_cpp(arch, tmp_path):
    """Gemma's SentencePiece has no dummy prefix; convert says so with add_space_prefix false, written
    last (Gemma2Model/Gemma3Model.set_vocab), and llama.cpp then tokenizes as Hugging Face does."""
    from so8t_core.testing.tokenizers import fixture_spm_tokenizer_files
    from so8t_core.validate.checks import PARITY_TEXT

    files = fixture_spm_tokenizer_files(384, seed=2, style="gemma")
    sp, tok = _sp(files), hf(files)
    kvs = tokenizer_metadata(files, {"architectures": [arch], "vocab_size": 384, "bos_token_id": 1,
                                     "eos_token_id": 2}, "mem://gemma")
    assert (kvs[-1].key, kvs[-1].value) == ("tokenizer.ggml.add_space_prefix", False)
    expected = [1] + sp.encode(PARITY_TEXT)
    assert not sp.IdToPiece(expected[1]).startswith("\u2581")  # no dummy prefix before the first word
    assert tok.encode(PARITY_TEXT).ids == expected
    llm = load_vocab(write_vocab_gguf(tmp_path / "gemma.gguf", kvs))
    assert llm.tokenize(PARITY_TEXT.encode(), add_bos=True, special=False) == expected
    assert llm.tokenize(" Hello world".encode(), add_bos=False, special=False) == sp.encode(" Hello world")
    # Llama-style SentencePiece under the same keys would differ: the prefix is really what is checked.
    llama_kvs = tokenizer_metadata(fixture_spm_tokenizer_files(384, seed=2), {"vocab_size": 384}, "mem://llama")
    assert "tokenizer.ggml.add_space_prefix" not in {kv.key for kv in llama_kvs}


def test_gemma2_needs_its_sentencepiece_model():
    with pytest.raises(CheckpointError, match="Gemma 2 checkpoint needs its SentencePiece tokenizer.model"):
        tokenizer_metadata(fixture_tokenizer_files(384), {**FIXTURE_CONFIG, "architectures": ["Gemma2ForCausalLM"]},
                           "mem://gemma2-bpe")


def test_spm_fixture_phi3_chat_text_tokenizes_like_hf_when_named_phi3(tmp_path):
    """Phi-3's added tokens swallow the whitespace after them (rstrip); llama.cpp does the same
    only for a model whose general.name contains "phi3" (the name that made it demand "</s>",
    "<unk>", "<s>" and "<|endoftext|>", which the byte-level BPE fixture lacks)."""
    from gguf import GGUFValueType

    from so8t_core.gguf_file import GGUFKV
    from so8t_core.testing.tokenizers import fixture_spm_tokenizer_files

    files = fixture_spm_tokenizer_files(384, style="phi3")
    kvs = tokenizer_metadata(files, {"vocab_size": 384, "bos_token_id": 1, "eos_token_id": 2}, "mem://phi3")
    name = GGUFKV("general.name", "Tiny Phi3", GGUFValueType.STRING)
    llm = load_vocab(write_vocab_gguf(tmp_path / "phi3.gguf", [name, *kvs]))
    chat = "<|system|>\nBe brief.<|end|>\n<|user|>\nHi  there</s> \n<|end|>\n<|assistant|>\n"
    ids = hf(files).encode(chat).ids
    assert ids[:2] == [1, 373 + 6] and "<0x0A>" not in [hf(files).id_to_token(i) for i in ids]
    assert llm.tokenize(chat.encode(), add_bos=True, special=True) == ids
    # The byte-level BPE fixture has none of those tokens: llama.cpp refuses it under that name.
    bpe_kvs = tokenizer_metadata(fixture_tokenizer_files(384), FIXTURE_CONFIG, "mem://bpe")
    with pytest.raises(ValueError):
        load_vocab(write_vocab_gguf(tmp_path / "bpe.gguf", [name, *bpe_kvs]))


@pytest.mark.parametrize("style", ["llama", "phi3"])
def test_spm_fixture_loads_in_transformers(style, tmp_path):
    from transformers import AutoTokenizer

    from so8t_core.testing.tokenizers import fixture_spm_tokenizer_files
    from so8t_core.validate.checks import PARITY_TEXT

    files = fixture_spm_tokenizer_files(384, style=style)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (1, 2, 0, 384)
    assert tok.encode(PARITY_TEXT) == [1] + _sp(files).encode(PARITY_TEXT)
    messages = [{"role": "user", "content": "Hi"}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == ("<|user|>\nHi<|end|>\n<|assistant|>\n" if style == "phi3" else "<s>[INST] Hi [/INST]")
