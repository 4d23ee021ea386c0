"""so8t_core.llama_runtime on a real GGUF (SmolLM2-135M-Instruct, Q4_1, tied embeddings)."""

from __future__ import annotations

import ctypes
import json
import time

import gguf
import llama_cpp
import numpy as np
import pytest
from support.chat_templates import FLOOD, NESTED_LOOPS, SANDBOX_ESCAPE, gguf_with_template
from support.reliability_record import record

from so8t_core.chat_template import RENDER_SECONDS, render_chat
from so8t_core.errors import ValidationError
from so8t_core.llama_runtime import LlamaCppModel
from so8t_core.metrics import logit_agreement
from so8t_core.quantize.error_stats import tensor_error_stats
from so8t_core.testing.tokenizers import smollm2_gguf_path

pytestmark = pytest.mark.e2e  # runs models in llama.cpp

SMOLLM2 = smollm2_gguf_path()

PROMPT = "The capital of France is"
TEXT = ("The capital of France is Paris, and the capital of Germany is Berlin. "
        "SmolLM2 is a small language model.")


@pytest.fixture(scope="module")
def model():
    # embeddings=True also serves logits, tokenization and chat (checked below).
    with LlamaCppModel(SMOLLM2, n_ctx=1024, embeddings=True) as m:
        yield m


@pytest.fixture(scope="module")
def token_embd() -> np.ndarray:
    """token_embd.weight dequantized from the GGUF: [n_vocab, n_embd] float32."""
    reader = gguf.GGUFReader(SMOLLM2)
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied embeddings
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


def _log_callback_address() -> int | None:
    callback = llama_cpp.llama_log_callback()
    user_data = ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(user_data))
    return ctypes.cast(callback, ctypes.c_void_p).value


def test_model_properties(model):
    assert (model.n_vocab, model.n_embd, model.n_ctx) == (49152, 576, 1024)
    assert model.n_threads >= 1
    assert model.chat_template and "<|im_start|>" in model.chat_template
    assert model.metadata["general.architecture"] == "llama"


def test_logits_shape_determinism_and_paris(model):
    ids = model.tokenize(PROMPT)
    logits = model.logits(ids)
    assert logits.shape == (len(ids), 49152) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    assert model.detokenize([int(np.argmax(logits[-1]))]) == " Paris"
    # Same tokens again (and after another sequence): bit-identical, the KV cache is reset.
    np.testing.assert_array_equal(model.logits(ids), logits)
    model.logits(model.tokenize("Something else entirely, to dirty the cache."))
    np.testing.assert_array_equal(model.logits(ids), logits)
    # Causal: the rows of a prefix do not depend on what follows.
    np.testing.assert_allclose(model.logits(ids[:3]), logits[:3], rtol=0, atol=1e-4)


def test_logits_longer_than_one_batch(model):
    ids = model.tokenize(" ".join([TEXT] * 6))  # ~150 tokens
    reference = model.logits(ids)  # one decode call (n_batch=512)
    with LlamaCppModel(SMOLLM2, n_ctx=256, n_batch=64, embeddings=True) as chunked:
        assert chunked.n_batch == 64 and len(ids) > 2 * 64  # three decode calls
        logits = chunked.logits(ids)
        hidden = chunked.final_hidden_states_for_ids(ids)
    assert logits.shape == reference.shape and hidden.shape == (len(ids), 576)
    # Positions in later chunks attend to the KV cache of earlier ones: same result up
    # to batch-shape rounding. Measured: bit-identical (max KLD 0.0) on this build.
    stats = logit_agreement(reference, logits)
    assert stats["max_kld"] < 1e-6 and stats["top1_agreement"] == 1.0
    np.testing.assert_allclose(hidden, model.final_hidden_states_for_ids(ids), rtol=0, atol=1e-3)


def test_logits_rejects_bad_token_ids(model):
    with pytest.raises(ValueError):
        model.logits([])
    with pytest.raises(ValueError):
        model.logits([model.n_vocab])
    with pytest.raises(ValueError):
        model.logits([1] * (model.n_ctx + 1))


def test_embedding_mode_logits_equal_plain_mode(model):
    ids = model.tokenize(TEXT)
    with LlamaCppModel(SMOLLM2, n_ctx=256) as plain:
        np.testing.assert_array_equal(plain.logits(ids), model.logits(ids))
        with pytest.raises(RuntimeError, match="embeddings=True"):
            plain.final_hidden_states(TEXT)


def test_tokenize_detokenize_round_trip(model):
    for text in [PROMPT, TEXT, "  leading spaces, unicode: Grüße, 東京, emoji 🙂\nnew line"]:
        ids = model.tokenize(text)
        assert ids and all(isinstance(t, int) for t in ids)
        assert model.detokenize(ids) == text
    # Special tokens: parsed only on request, rendered only on request.
    chat = "<|im_start|>user\nhi<|im_end|>"
    special_ids = model.tokenize(chat, parse_special=True)
    assert special_ids[0] == 1 and len(special_ids) < len(model.tokenize(chat))
    assert model.detokenize(special_ids, special=True) == chat
    assert model.detokenize(special_ids) == "user\nhi"
    # SmolLM2 does not ask for a BOS, so add_special changes nothing here.
    assert model.tokenize(PROMPT, add_special=True) == model.tokenize(PROMPT)


def test_generate_chat_is_deterministic(model):
    first = model.generate_chat("Name three colors.", max_tokens=24)
    assert first.strip()
    assert "Red" in first  # measured: '1. Red\n2. Blue\n3. Green'
    # A different prompt in between must not leak through the KV cache.
    model.generate_chat("What is the capital of France?", max_tokens=8)
    assert model.generate_chat("Name three colors.", max_tokens=24) == first
    assert model.generate_chat("Name three colors.", max_tokens=2) != first  # max_tokens honoured


def test_final_hidden_states_reproduce_logits(model, token_embd):
    ids = model.tokenize(TEXT, add_special=True)
    hidden = model.final_hidden_states(TEXT)
    assert hidden.shape == (len(ids), 576) and hidden.dtype == np.float32
    np.testing.assert_array_equal(model.final_hidden_states_for_ids(ids), hidden)
    logits = model.logits(ids)

    # Tied embeddings: the LM head is token_embd, so hidden @ token_embd.T ~ logits.
    # llama.cpp quantizes the activations to Q8_0 for the Q8_0 token_embd matmul, so a
    # float product differs slightly. Measured: relative RMSE 0.0075, cosine 0.99997,
    # mean KLD 6e-4, top-1 agreement 24/25 (a near tie).
    product = hidden.astype(np.float64) @ token_embd.T.astype(np.float64)
    stats = tensor_error_stats(logits, product)
    assert stats["relative_rmse"] < 0.02
    assert stats["cosine"] > 0.9995
    agreement = logit_agreement(logits, product)
    assert agreement["mean_kld"] < 5e-3 and agreement["top1_agreement"] >= 0.9

    # Quantizing hidden to Q8_0 first, as llama.cpp does, reproduces the logits to
    # float32 rounding. Measured: max abs error 1.0e-5, relative RMSE 1.6e-7.
    q8 = gguf.GGMLQuantizationType.Q8_0
    hidden_q8 = gguf.quants.dequantize(gguf.quants.quantize(hidden, q8), q8)
    exact = hidden_q8.astype(np.float64) @ token_embd.T.astype(np.float64)
    np.testing.assert_allclose(exact, logits, rtol=0, atol=1e-3)
    assert tensor_error_stats(logits, exact)["relative_rmse"] < 1e-5
    assert np.array_equal(np.argmax(exact, -1), np.argmax(logits, -1))

    # ... and it really is *after* output_norm: RMSNorm output times the norm weight has
    # a per-row RMS fixed by the weights, not the residual stream's growing scale.
    assert np.all(np.sqrt(np.mean(hidden.astype(np.float64) ** 2, axis=-1)) < 10)


def test_not_a_gguf_raises_one_line_validation_error(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 576}))
    with pytest.raises(ValidationError) as info:
        LlamaCppModel(str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    assert "llama.cpp could not load this file" in message and "not a GGUF" in message


def test_missing_file_raises_validation_error(tmp_path):
    with pytest.raises(ValidationError, match="no such file"):
        LlamaCppModel(str(tmp_path / "missing.gguf"))


def test_llama_cpp_refusal_is_reported_quietly(tmp_path, capfd):
    # Valid magic, truncated body: the error comes from llama.cpp's own loader.
    path = tmp_path / "truncated.gguf"
    with open(SMOLLM2, "rb") as src:
        path.write_bytes(src.read(100_000))
    before = _log_callback_address()
    with pytest.raises(ValidationError) as info:
        LlamaCppModel(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert "llama.cpp could not load this file" in message and "failed to load model" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert _log_callback_address() == before  # our log capture is undone
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_runtime_is_quiet(capfd):
    capfd.readouterr()
    with LlamaCppModel(SMOLLM2, n_ctx=128, n_threads=1, embeddings=True) as m:
        ids = m.tokenize(PROMPT)
        m.logits(ids)
        m.final_hidden_states(PROMPT)
        m.generate_chat("Hi", max_tokens=4)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    with pytest.raises(RuntimeError, match="closed"):
        m.logits(ids)
    m.close()  # idempotent


@pytest.mark.parametrize("template, words, what", [
    (NESTED_LOOPS, ["does not render within"], "two nested range(100000) loops"),
    (SANDBOX_ESCAPE, ["refused by Jinja's sandbox"], "reaching for Python internals (__class__)"),
    (FLOOD, ["renders more than"], "writing 500 MB"),
], ids=["loops", "sandbox", "flood"])
def test_a_chat_template_that_hangs_floods_or_escapes_is_one_line(template, words, what, tmp_path, capsys):
    """Before: the nested loops hung `chat` (each range within the sandbox's cap), and the sandbox's
    SecurityError came out as a traceback."""
    from flows.cli import main

    path = gguf_with_template(SMOLLM2, str(tmp_path / "bad.gguf"), template)
    started = time.monotonic()
    status = main(["chat", path, "Hello"])
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    record("resources", attack=f"chat: a GGUF whose chat template is {what}", refused=int(status == 2),
           seconds=round(seconds, 1))
    assert status == 2
    assert err.count("\n") == 1 and "tokenizer.chat_template" in err and all(w in err for w in words), err
    assert seconds < RENDER_SECONDS + 20


def test_the_prompt_is_the_one_llama_cpp_python_renders(model):
    """Rendered within limits in a child process, the prompt is still Jinja2ChatFormatter's."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    theirs = Jinja2ChatFormatter(model.chat_template, "<|im_end|>", "<|im_start|>")(messages=messages).prompt
    assert render_chat(model.chat_template, messages, "<|im_start|>", "<|im_end|>") == theirs
