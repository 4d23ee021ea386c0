"""Thin, explicit wrappers around llama-cpp-python: llama.cpp, the ground truth every stage checks against.

:class:`LlamaCppModel` loads one GGUF in llama.cpp (CPU) and exposes exactly what the
validation gates need: full per-position logits for a token sequence, the per-token
final hidden states (after ``output_norm``), tokenization, and a greedy chat smoke
test that uses the GGUF's own ``tokenizer.chat_template``.

Design notes (llama-cpp-python 0.3.36):

* Evaluation does not go through ``Llama.eval``/``Llama.scores``. With
  ``logits_all=True`` that path keeps an ``[n_ctx, n_vocab]`` float32 buffer and copies
  into it; instead we own a ``llama_batch``, mark every token as an output, call
  ``llama_decode`` per chunk of ``n_batch`` tokens and read each row with
  ``llama_get_logits_ith`` / ``llama_get_embeddings_ith`` (which map batch positions
  to output rows, so llama.cpp's internal output reordering cannot bite us).
* Every evaluation starts from an empty KV cache (``llama_memory_clear``) and leaves
  it empty, and the ``Llama`` object's token bookkeeping is reset with it. Without
  that, ``create_chat_completion`` reuses a matching prompt prefix from the KV cache,
  which changes the batch shapes and can flip a near-tied greedy token.
* llama.cpp logs through a process-wide callback. While this module calls into
  llama.cpp it installs a capturing callback (restored afterwards): nothing reaches
  stderr, and the error lines llama.cpp logged explain a failed load in the
  :class:`~so8t_core.errors.ValidationError` message.
* ``embeddings=True`` creates the context with ``pooling_type=NONE``: llama.cpp then
  returns, per token, the output of the final ``output_norm`` (the tensor the LM
  head multiplies). Logits are still produced in that mode.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jinja2
import llama_cpp
import llama_cpp.llama_chat_format as llama_chat_format
import numpy as np

from so8t_core.chat_template import ChatTemplateError, render_chat
from so8t_core.errors import ValidationError

# Fixed so sampling state is reproducible; generation is greedy anyway. Note that
# llama-cpp-python turns seed=0 into LLAMA_DEFAULT_SEED (= random), so avoid 0.
DEFAULT_SEED = 1234
DEFAULT_N_BATCH = 512
GGUF_MAGIC = b"GGUF"
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
# Llama's name for the handler built from the GGUF's tokenizer.chat_template.
_GGUF_CHAT_FORMAT = "chat_template.default"

# ggml.h: NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5. (llama-cpp-python 0.3.36's
# own _logger.py still assumes the older INFO=1/WARN=2/ERROR=3 numbering, so with
# verbose=False it prints llama.cpp *warnings* as errors; we never use that callback.)
_GGML_LOG_LEVEL_ERROR = 4
_GGML_LOG_LEVEL_CONT = 5
_MAX_REASON_CHARS = 400

_LOAD_HINT = (
    "check that the file is a complete GGUF written by so8t-gguf (not truncated) and "
    "that its architecture and tensor types are supported by llama-cpp-python "
    f"{llama_cpp.__version__}"
)


def default_threads() -> int:
    """CPUs this process may run on (affinity-aware where Python exposes it)."""
    process_cpu_count = getattr(os, "process_cpu_count", None)  # Python >= 3.13
    if process_cpu_count is not None:
        return max(1, process_cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# --- llama.cpp log capture ------------------------------------------------------------


class _LogCapture:
    """Collects llama.cpp/ggml log records instead of printing them."""

    def __init__(self) -> None:
        self.records: list[tuple[int, str]] = []
        # Keep a reference: the C side only holds a raw function pointer.
        self.callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes, _user_data: Any) -> None:
        try:
            message = text.decode("utf-8", errors="replace") if text else ""
            if level == _GGML_LOG_LEVEL_CONT and self.records:
                prev_level, prev_text = self.records[-1]
                self.records[-1] = (prev_level, prev_text + message)
            else:
                self.records.append((level, message))
        except Exception:  # never let an exception cross into C
            pass

    def errors(self) -> list[str]:
        """Distinct ERROR-level lines, in order."""
        seen: list[str] = []
        for level, text in self.records:
            line = " ".join(text.split())
            if level == _GGML_LOG_LEVEL_ERROR and line and line not in seen:
                seen.append(line)
        return seen


_LOG_LOCK = threading.RLock()


@contextlib.contextmanager
def captured_llama_log() -> Iterator[_LogCapture]:
    """Route llama.cpp logging into a :class:`_LogCapture`, then restore the previous callback."""
    with _LOG_LOCK:
        previous = llama_cpp.llama_log_callback()
        previous_user_data = ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_user_data))
        capture = _LogCapture()
        llama_cpp.llama_log_set(capture.callback, ctypes.c_void_p(0))
        try:
            yield capture
        finally:
            llama_cpp.llama_log_set(previous, previous_user_data)


def _reason(capture: _LogCapture, exc: BaseException | None = None) -> str:
    lines = capture.errors()
    if not lines and exc is not None:
        lines = [str(exc) or type(exc).__name__]
    text = "; ".join(lines) if lines else "no error message from llama.cpp"
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text


def _check_gguf_file(path: str) -> None:
    """Cheap checks before llama.cpp sees the file, for clearer messages."""
    where = path
    problem = "llama.cpp could not load this file: "
    if not os.path.exists(path):
        raise ValidationError(where, problem + "no such file", "check the path")
    if not os.path.isfile(path):
        raise ValidationError(where, problem + "not a regular file", "pass the path of a .gguf file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ValidationError(where, problem + f"cannot read it ({exc.strerror or exc})",
                              "check the file's permissions") from None
    if magic != GGUF_MAGIC:
        raise ValidationError(
            where, problem + f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})",
            "pass a .gguf file produced by so8t-gguf")


class _LimitedChatFormatter:
    """What llama-cpp-python's Jinja2ChatFormatter returns for the GGUF's own template, with the
    template rendered within limits of time, output and memory (chat_template.py): its
    sandbox alone bounds neither, and a template of nested loops hung ``chat``."""

    def __init__(self, template: str, bos_token: str, eos_token: str, eos_id: int) -> None:
        self.template, self.bos_token, self.eos_token, self.eos_id = template, bos_token, eos_token, eos_id

    def __call__(self, *, messages, **_unused: Any) -> llama_chat_format.ChatFormatterResponse:
        prompt = render_chat(self.template, messages, self.bos_token, self.eos_token)

        def stop_on_eos(tokens: np.ndarray, _logits: np.ndarray) -> bool:
            return tokens[-1] == self.eos_id

        return llama_chat_format.ChatFormatterResponse(
            prompt=prompt, stop=[self.eos_token], added_special=True,
            stopping_criteria=llama_cpp.StoppingCriteriaList([stop_on_eos]))


# --- a vocabulary only ------------------------------------------------------------------


class LlamaVocab:
    """A GGUF's tokenizer in llama.cpp, nothing else (``vocab_only``: no weights, no context).
    Loads in tens of milliseconds, so a tokenizer can be tried before any conversion work."""

    def __init__(self, gguf_path: str) -> None:
        self.gguf_path = os.fspath(gguf_path)
        _check_gguf_file(self.gguf_path)
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        with captured_llama_log() as log:
            llama_cpp.llama_backend_init()
            self._model = llama_cpp.llama_model_load_from_file(self.gguf_path.encode(), params)
            if not self._model:
                raise ValidationError(self.gguf_path, f"llama.cpp could not load its vocabulary: {_reason(log)}",
                                      _LOAD_HINT)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

    def __enter__(self) -> LlamaVocab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._model:
            with captured_llama_log():
                llama_cpp.llama_model_free(self._model)
            self._model = None

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` as llama.cpp gives them (BOS/EOS as the GGUF says when
        ``add_special``; special-token text parsed when ``parse_special``)."""
        if not self._model:
            raise RuntimeError(f"LlamaVocab({self.gguf_path!r}) is closed")
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            out = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), out, size, add_special, parse_special)
            if n >= 0:
                return [int(t) for t in out[:n]]
            size = -n


_ANSWER = "so8t-vocab-ids: "  # marks the child's answers among whatever llama.cpp prints


def tokenize_variants(image: bytes, span: tuple[int, int], replacements: Sequence[bytes], text: str
                      ) -> Iterator[list[int] | None]:
    """llama.cpp's ids of ``text`` (BOS/EOS as each file says, special text parsed) for variants of
    the vocabulary-only GGUF ``image`` whose bytes ``span`` are replaced by each of
    ``replacements``, yielded in order; None for a variant llama.cpp cannot load or use.

    Run in child processes, one per CPU (two at most), each on every other variant: llama.cpp
    aborts its process (GGML_ASSERT) on some combinations of vocabulary and settings, and that
    must cost one variant, not the caller. A child that dies takes the variant it was on with
    it, and a new one goes on from the next. The caller may stop early (the children are then
    killed)."""
    import queue
    import subprocess
    import sys
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    answers: queue.SimpleQueue = queue.SimpleQueue()  # (index, ids)
    children: list[subprocess.Popen] = []
    stop = threading.Event()

    def run_share(tmp: str, base: str, share: list[int]) -> None:
        """Tokenize the variants ``share`` (indices), restarting after a child that died."""
        while share and not stop.is_set():
            request = os.path.join(tmp, f"request-{share[0]}.json")
            with open(request, "w", encoding="utf-8") as f:
                json.dump({"image": base, "span": list(span), "text": text,
                           "replacements": [replacements[i].hex() for i in share]}, f)
            child = subprocess.Popen([sys.executable, "-m", "so8t_core.llama_runtime", request],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
            children.append(child)
            for line in child.stdout:
                if line.startswith(_ANSWER):
                    answers.put((share.pop(0), json.loads(line[len(_ANSWER):])))
            child.wait()
            if share:  # the child died on this one
                answers.put((share.pop(0), None))

    with tempfile.TemporaryDirectory(prefix="so8t-vocab-") as tmp:
        base = os.path.join(tmp, "base.gguf")
        with open(base, "wb") as f:
            f.write(image)
        n = max(1, min(2, default_threads(), len(replacements)))
        threads = [threading.Thread(target=run_share, args=(tmp, base, list(range(k, len(replacements), n))),
                                    daemon=True) for k in range(n)]
        for t in threads:
            t.start()
        try:
            ready: dict[int, list[int] | None] = {}
            for want in range(len(replacements)):
                while want not in ready:
                    index, ids = answers.get()
                    ready[index] = ids
                yield ready.pop(want)
        finally:
            stop.set()
            for child in children:
                child.kill()
            for t in threads:
                t.join()


def _tokenize_variants_child(request_path: str) -> None:
    """The child side of :func:`tokenize_variants`: one answer line per variant, as soon as known."""
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    with open(request["image"], "rb") as f:
        image = f.read()
    start, end = request["span"]
    path = request_path + ".gguf"  # one file per child: children run side by side
    for replacement in request["replacements"]:
        with open(path, "wb") as f:
            f.write(image[:start] + bytes.fromhex(replacement) + image[end:])
        try:
            with LlamaVocab(path) as vocab:
                ids = vocab.tokenize(request["text"], add_special=True, parse_special=True)
        except ValidationError:
            ids = None
        print(_ANSWER + json.dumps(ids), flush=True)


# --- the model ------------------------------------------------------------------------


class LlamaCppModel:
    """One GGUF loaded in llama.cpp. Use as a context manager; ``close()`` frees it.

    ``n_ctx`` bounds the number of tokens one call may evaluate; longer inputs are
    decoded in chunks of ``n_batch`` tokens (which also sizes llama.cpp's
    ``[n_batch, n_vocab]`` output buffer). ``embeddings=True``
    is required for :meth:`final_hidden_states` (pooling NONE; logits still work).
    All evaluation is deterministic: fresh KV cache per call, greedy decoding.
    """

    def __init__(self, gguf_path: str, n_ctx: int = 2048, n_threads: int | None = None,
                 embeddings: bool = False, n_batch: int = DEFAULT_N_BATCH, lora_path: str | None = None) -> None:
        """``lora_path``: a LoRA adapter GGUF applied at scale 1 (llama.cpp's ``--lora``)."""
        self.gguf_path = os.fspath(gguf_path)
        if n_ctx <= 0 or n_batch <= 0:
            raise ValueError(f"n_ctx and n_batch must be positive, got {n_ctx}, {n_batch}")
        self.n_threads = int(n_threads) if n_threads else default_threads()
        self.embeddings = bool(embeddings)
        self._llm: llama_cpp.Llama | None = None
        self._batch: llama_cpp.llama_batch | None = None

        _check_gguf_file(self.gguf_path)
        if lora_path is not None:
            _check_gguf_file(os.fspath(lora_path))
        n_batch = min(n_ctx, n_batch)
        with captured_llama_log() as log:
            try:
                self._llm = llama_cpp.Llama(
                    model_path=self.gguf_path,
                    n_ctx=n_ctx,
                    n_batch=n_batch,
                    n_ubatch=n_batch,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    n_gpu_layers=0,
                    seed=DEFAULT_SEED,
                    logits_all=False,  # we request per-token outputs in our own batch
                    embedding=self.embeddings,
                    pooling_type=(llama_cpp.LLAMA_POOLING_TYPE_NONE if self.embeddings
                                  else llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED),
                    lora_path=None if lora_path is None else os.fspath(lora_path),
                    verbose=False,
                )
            except jinja2.TemplateError as exc:
                # llama-cpp-python compiles tokenizer.chat_template while loading.
                raise ValidationError(
                    self.gguf_path, f"llama.cpp could not load this file: its {CHAT_TEMPLATE_KEY} "
                    f"is not a valid Jinja2 template ({exc})",
                    "write the tokenizer's chat template unchanged into the GGUF") from None
            except (ValueError, RuntimeError, OSError) as exc:
                raise ValidationError(
                    self.gguf_path, f"llama.cpp could not load this file: {_reason(log, exc)}",
                    _LOAD_HINT) from None
        self.n_ctx = int(self._llm.n_ctx())
        self.n_batch = int(self._llm.n_batch)
        self.n_vocab = int(self._llm.n_vocab())
        self.n_embd = int(self._llm.n_embd())
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.metadata: dict[str, str] = dict(self._llm.metadata)
        self.chat_template: str | None = self.metadata.get(CHAT_TEMPLATE_KEY)
        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        # What llama.cpp's own tools put at the start of a sequence (llama-perplexity: every chunk).
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos_token = int(llama_cpp.llama_vocab_bos(vocab))
        if self.chat_template:
            # Always render the GGUF's own template (Llama may otherwise pick a
            # built-in format it guessed from the template), within limits.
            self._llm.chat_format = _GGUF_CHAT_FORMAT
            eos_id, bos_id = self._llm.token_eos(), self._llm.token_bos()
            text = self._llm._model.token_get_text
            formatter = _LimitedChatFormatter(self.chat_template, text(bos_id) if bos_id != -1 else "",
                                              text(eos_id) if eos_id != -1 else "", eos_id)
            self._llm._chat_handlers[_GGUF_CHAT_FORMAT] = \
                llama_chat_format.chat_formatter_to_chat_completion_handler(formatter)

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the llama.cpp model, context and batch (idempotent)."""
        with captured_llama_log():
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            if self._llm is not None:
                self._llm.close()
                self._llm = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _require_open(self) -> llama_cpp.Llama:
        if self._llm is None:
            raise RuntimeError(f"LlamaCppModel({self.gguf_path!r}) is closed")
        return self._llm

    # -- tokenizer ------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` with the GGUF's tokenizer.

        ``add_special`` adds BOS/EOS as the GGUF's ``tokenizer.ggml.add_*_token`` say;
        ``parse_special`` turns special-token text (``<|im_start|>``) into its id.
        """
        llm = self._require_open()
        return [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=add_special,
                                              special=parse_special)]

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        """Text of ``ids``; ``special=True`` also renders special tokens as text."""
        llm = self._require_open()
        return llm.detokenize([int(t) for t in ids], special=special).decode("utf-8", errors="replace")

    # -- evaluation -----------------------------------------------------------------

    def _reset(self, llm: llama_cpp.Llama) -> None:
        """Empty the KV cache and Llama's record of evaluated tokens."""
        memory = llama_cpp.llama_get_memory(llm.ctx)
        if memory is not None:
            llama_cpp.llama_memory_clear(memory, True)
        llm.reset()

    def _check_tokens(self, token_ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("no tokens to evaluate")
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit the context (n_ctx={self.n_ctx})")
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.n_vocab}): {bad[:5]}")
        return ids

    def _evaluate(self, token_ids: Sequence[int], want_logits: bool,
                  want_hidden: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Decode one fresh sequence with every token as an output; read rows back."""
        llm = self._require_open()
        ids = self._check_tokens(token_ids)
        if want_hidden and not self.embeddings:
            raise RuntimeError("final hidden states need LlamaCppModel(..., embeddings=True)")
        n = len(ids)
        logits = np.empty((n, self.n_vocab), dtype=np.float32) if want_logits else None
        hidden = np.empty((n, self.n_embd), dtype=np.float32) if want_hidden else None
        batch = self._batch
        assert batch is not None
        with captured_llama_log() as log:
            self._reset(llm)
            try:
                for start in range(0, n, self.n_batch):
                    chunk = ids[start:start + self.n_batch]
                    batch.n_tokens = len(chunk)
                    for i, token in enumerate(chunk):
                        batch.token[i] = token
                        batch.pos[i] = start + i
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = 0
                        batch.logits[i] = True
                    rc = llama_cpp.llama_decode(llm.ctx, batch)
                    if rc != 0:
                        raise ValidationError(
                            self.gguf_path,
                            f"llama.cpp failed to evaluate {n} tokens: llama_decode returned "
                            f"{rc} ({_reason(log)})",
                            "the GGUF loads but cannot run; check its tensor shapes and types")
                    for i in range(len(chunk)):
                        if logits is not None:
                            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, i)
                            if not ptr:
                                raise RuntimeError(f"llama.cpp returned no logits for output {i}")
                            logits[start + i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
                        if hidden is not None:
                            ptr = llama_cpp.llama_get_embeddings_ith(llm.ctx, i)
                            if not ptr:
                                raise RuntimeError(f"llama.cpp returned no embeddings for output {i}")
                            hidden[start + i] = np.ctypeslib.as_array(ptr, shape=(self.n_embd,))
            finally:
                self._reset(llm)
        return logits, hidden

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """``[n_tokens, n_vocab]`` float32 logits at every position of one fresh sequence.

        Row ``i`` is the prediction for token ``i + 1``. Nothing (no BOS) is added.
        """
        logits, _ = self._evaluate(token_ids, want_logits=True, want_hidden=False)
        assert logits is not None
        return logits

    def final_hidden_states(self, text: str, add_special: bool = True) -> np.ndarray:
        """``[n_tokens, n_embd]`` float32 hidden states after the final ``output_norm``.

        ``text`` is tokenized with ``parse_special=False`` and, like llama.cpp's
        embedding tools, ``add_special=True`` (BOS if the GGUF asks for one). Needs
        ``embeddings=True``. For a tied-embedding model, ``hidden @ token_embd.T``
        reproduces :meth:`logits` for the same tokens.
        """
        return self.final_hidden_states_for_ids(self.tokenize(text, add_special=add_special))

    def final_hidden_states_for_ids(self, token_ids: Sequence[int]) -> np.ndarray:
        """Like :meth:`final_hidden_states` for explicit token ids."""
        _, hidden = self._evaluate(token_ids, want_logits=False, want_hidden=True)
        assert hidden is not None
        return hidden

    # -- chat -----------------------------------------------------------------------

    def generate_chat(self, user_message: str, max_tokens: int = 48) -> str:
        """:meth:`chat_reply`'s text."""
        return self.chat_reply(user_message, max_tokens)[0]

    def chat_reply(self, user_message: str, max_tokens: int = 48) -> tuple[str, bool]:
        """(text, cut): the greedy reply to one user message, formatted with the GGUF's chat
        template, and whether it was cut at ``max_tokens`` rather than ended by the model.

        The prompt is the GGUF's ``tokenizer.chat_template`` rendered by
        llama-cpp-python's Jinja2 chat formatter (``add_generation_prompt=True``);
        decoding is greedy (temperature 0, no repetition penalty) from an empty KV
        cache, so the same input always gives the same text. Generation stops at an
        end-of-generation token or after ``max_tokens`` tokens.
        """
        llm = self._require_open()
        if not self.chat_template:
            raise ValidationError(
                self.gguf_path, f"has no {CHAT_TEMPLATE_KEY}; cannot run a chat smoke test",
                "write the tokenizer's chat template into the GGUF")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        with captured_llama_log() as log:
            self._reset(llm)
            try:
                response = llm.create_chat_completion(
                    messages=[{"role": "user", "content": user_message}],
                    temperature=0.0,
                    top_k=1,
                    repeat_penalty=1.0,
                    max_tokens=max_tokens,
                    seed=DEFAULT_SEED,
                    stream=False,
                )
            except ChatTemplateError as exc:  # a template that hangs, floods, or the sandbox refuses
                raise ValidationError(self.gguf_path, f"its {CHAT_TEMPLATE_KEY} {exc.problem}",
                                      exc.hint or "re-convert the model with a working chat template") from None
            except RuntimeError as exc:
                raise ValidationError(
                    self.gguf_path, f"llama.cpp failed to generate: {_reason(log, exc)}",
                    "the GGUF loads but cannot run; check its tensor shapes and types") from None
            finally:
                self._reset(llm)
        choice = response["choices"][0]  # type: ignore[index]
        return choice["message"]["content"] or "", choice.get("finish_reason") == "length"


if __name__ == "__main__":  # the child process of tokenize_variants
    import sys

    _tokenize_variants_child(sys.argv[1])
