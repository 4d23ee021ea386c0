"""Importance matrices computed on the user's own text, as llama-imatrix computes them.

Two halves:

* the calibration text (:func:`read_calibration`): any number of fsspec URIs, each plain
  text (one document, its last newline dropped as llama-imatrix's ``-f`` drops it), JSONL
  records with a ``text`` field, or JSONL chat records (``messages``: role/content pairs)
  rendered with the checkpoint's own chat template, as the fine-tune saw them. Documents are
  joined with a blank line and tokenized by llama.cpp in one piece, BOS added as the
  vocabulary says (``common_tokenize(ctx, text, add_special=true, parse_special)``); special
  tokens in the text are tokens only when chat records were rendered (llama-imatrix's
  ``--parse-special``), since their template writes them as text.
* the computation (:func:`collect_activations`): the baked F32 GGUF runs in llama.cpp (the
  pinned llama-cpp-python) over the tokens with an eval callback
  (``llama_context_params.cb_eval``) that does what llama-imatrix's ``collect_imatrix`` does:
  for every matrix multiplication whose weight is a ``blk.*`` tensor and whose input holds
  at least 16 F32 rows, it adds each input column's squares to the weight's sums and the rows
  to its count, row by row in float32. Chunking is ``compute_imatrix``'s: ``n_ctx``-token
  chunks, the first token of each replaced by BOS where the vocabulary adds one, as many
  chunks per batch as fit in llama-imatrix's batch of 2048 (each its own sequence), every
  token an output, the KV cache cleared between batches; at least two chunks' worth of
  tokens. The context is created as llama-imatrix creates it (context ``n_seq · n_ctx``,
  ``n_seq`` sequences, batch 2048, micro-batch 512), so llama.cpp splits the batches into the
  same micro-batches and the sums see the same rows in the same order.

The result is written in llama.cpp's GGUF imatrix format by
:func:`so8t_core.quantize.imatrix.write_imatrix` and read back like any ``--imatrix`` file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from so8t_core import storage
from so8t_core.chat_template import ChatTemplateError, render_conversations
from so8t_core.errors import CalibrationError

# Part of the imatrix stage's cache key: bump when the same tokens and model may give other sums.
CALIBRATION_VERSION = "1"
DEFAULT_CTX = 512  # llama-imatrix's default context (-c)
LLAMA_IMATRIX_BATCH = 2048  # llama-imatrix's batch (-b, common_params.n_batch): chunks per pass
LLAMA_IMATRIX_UBATCH = 512  # common_params.n_ubatch: the micro-batches llama.cpp computes
MIN_ROWS = 16  # llama-imatrix ignores products with fewer input rows ("why are small batches ignored?")
DOCUMENT_SEPARATOR = "\n\n"
# --calibration's word for the built-in calibration text (calibration_data/SOURCES.md): prose,
# dialogue, code, several languages including Japanese; none of it is the validation text.
BUILTIN = "builtin"
BUILTIN_DATASET = "so8t-gguf/calibration_data/default.txt"  # what imatrix.datasets records for it
SHOWN_CHARS = 60


# --- the calibration text ----------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationText:
    """The calibration documents of a run, joined, and how llama.cpp is to tokenize them."""

    text: str
    parse_special: bool  # chat records were rendered: their special-token text is tokens
    datasets: list[str]  # what imatrix.datasets records: each source's file name
    documents: int


def read_calibration(uris: Sequence[str], chat_template: str | None = None,
                     special_tokens: Mapping[str, str] | None = None) -> CalibrationText:
    """Read every calibration source (see the module doc); bad input is a one-line error naming
    the source (and the line of a JSONL record)."""
    documents: list[str] = []
    chats: list[tuple[int, str, int, list]] = []  # (position in documents, uri, line, messages)
    for uri in uris:
        data = builtin_text() if uri == BUILTIN else storage.read_bytes(uri)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CalibrationError(storage.redact_uri(uri), f"not UTF-8 text (byte {exc.start})",
                                   "give plain text or JSONL in UTF-8") from None
        records = _jsonl_records(uri, text)
        if records is None:
            documents.append(text[:-1] if text.endswith("\n") else text)
            continue
        for line, record in records:
            if isinstance(record.get("text"), str):
                documents.append(record["text"])
            elif isinstance(record.get("messages"), list):
                chats.append((len(documents), uri, line, _checked_messages(uri, line, record["messages"],
                                                                            chat_template)))
                documents.append("")
            else:
                raise CalibrationError(f"{storage.redact_uri(uri)}: line {line}", "a JSONL record with neither "
                                       "a 'text' string nor a 'messages' list",
                                       'write {"text": "..."} or {"messages": [{"role": ..., "content": ...}]}')
    if chats:
        for (position, _, _, _), prompt in zip(chats, _render_chats(chats, chat_template, special_tokens or {})):
            documents[position] = prompt
    chat = bool(chats)
    documents = [d for d in documents if d]
    if not documents:
        raise CalibrationError(", ".join(storage.redact_uri(u) for u in uris), "no calibration text in it",
                               "give text the model should see: prose, dialogue, code, ...")
    return CalibrationText(DOCUMENT_SEPARATOR.join(documents), chat,
                           [BUILTIN_DATASET if u == BUILTIN else posixpath.basename(u.rstrip("/")) for u in uris],
                           len(documents))


def builtin_text() -> bytes:
    """The built-in calibration text (UTF-8): ``calibration_data/default.txt``."""
    from importlib.resources import files

    return files("so8t_core.quantize").joinpath("calibration_data", "default.txt").read_bytes()


def _jsonl_records(uri: str, text: str) -> list[tuple[int, dict]] | None:
    """The records of a JSONL file (line number, object), or None when the text is not JSONL
    (its first non-blank line is not a JSON object)."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None or not lines[first].lstrip().startswith("{"):
        return None
    try:
        head = json.loads(lines[first])
    except ValueError:
        return None
    if not isinstance(head, dict):
        return None
    records = []
    for i, line in enumerate(lines[first:], start=first + 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise CalibrationError(f"{storage.redact_uri(uri)}: line {i}", f"not a JSON object ({exc.msg})",
                                   "one JSON object per line") from None
        if not isinstance(record, dict):
            raise CalibrationError(f"{storage.redact_uri(uri)}: line {i}", "not a JSON object",
                                   "one JSON object per line")
        records.append((i, record))
    return records


def _checked_messages(uri: str, line: int, messages: list, template: str | None) -> list:
    where = f"{storage.redact_uri(uri)}: line {line}"
    if not template:
        raise CalibrationError(where, "a chat record, but the checkpoint has no chat template",
                               "give the conversations as text records, or add the template to tokenizer_config.json")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise CalibrationError(where, f"a message that is not a role/content pair: {str(m)[:SHOWN_CHARS]}",
                                   'each message: {"role": "user", "content": "..."}')
    return messages


def _render_chats(chats: list[tuple[int, str, int, list]], template: str, special: Mapping[str, str]) -> list[str]:
    """The chat records as the fine-tune saw them: the checkpoint's chat template, rendered as
    transformers' ``apply_chat_template`` renders it, in a child process within limits (the
    template is the checkpoint's code: chat_template.render_conversations)."""
    try:
        return render_conversations(template, [messages for *_, messages in chats], special)
    except ChatTemplateError as exc:
        index = getattr(exc, "index", None)
        if index is None:  # the whole render ran out of time or memory
            raise CalibrationError(", ".join(sorted({storage.redact_uri(uri) for _, uri, _, _ in chats})),
                                   f"the chat template {exc.problem}", exc.hint) from None
        _, uri, line, _ = chats[index]
        hint = exc.hint or "check the roles the template accepts"
        raise CalibrationError(f"{storage.redact_uri(uri)}: line {line}",
                               f"the chat template cannot render this record ({exc.problem})", hint) from None


def calibration_tokens(ckpt, uris: Sequence[str], allow_tokenizer_mismatch: bool = False
                       ) -> tuple[CalibrationText, np.ndarray]:
    """The calibration text of ``uris`` for a checkpoint (its chat template renders chat records)
    and its tokens, as llama.cpp tokenizes them with the vocabulary the model GGUF carries."""
    from so8t_core.source.checkpoint import TOKENIZER_FILES
    from so8t_core.source.tokenizer import special_token_texts, tokenizer_metadata, vocab_gguf

    files = {n: data for n in TOKENIZER_FILES if (data := ckpt.read_file(n)) is not None}
    keys = {kv.key: kv.value for kv in tokenizer_metadata(files, ckpt.config, ckpt.uri, allow_tokenizer_mismatch)}
    calibration = read_calibration(uris, keys.get("tokenizer.chat_template"), special_token_texts(files, ckpt.uri))
    with tempfile.NamedTemporaryFile(suffix=".gguf", prefix="so8t-vocab-") as f:
        f.write(vocab_gguf(files, ckpt.config, ckpt.uri, allow_tokenizer_mismatch))
        f.flush()
        return calibration, tokenize_calibration(calibration, f.name)


def tokenize_calibration(calibration: CalibrationText, vocab_gguf: str) -> np.ndarray:
    """The calibration text's tokens, as llama-imatrix tokenizes its prompt (int32)."""
    from so8t_core.llama_runtime import LlamaVocab

    with LlamaVocab(vocab_gguf) as vocab:
        return np.asarray(vocab.tokenize(calibration.text, add_special=True,
                                         parse_special=calibration.parse_special), dtype=np.int32)


def tokens_sha256(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes()).hexdigest()


def check_enough_tokens(n_tokens: int, n_ctx: int, where: str) -> None:
    """llama-imatrix's own floor: two chunks' worth of tokens."""
    if n_tokens < 2 * n_ctx:
        raise CalibrationError(where, f"the calibration text is {n_tokens} tokens; an importance matrix with "
                               f"a context of {n_ctx} needs at least {2 * n_ctx}",
                               "give more text, or a smaller --calibration-ctx")


def measured_weights(names_shapes: Sequence[tuple[str, Sequence[int]]]) -> set[str]:
    """The weights llama-imatrix records: the matrices of the blocks, which multiply activations
    (not token_embd, a lookup, nor output, which it skips by default)."""
    return {n for n, shape in names_shapes if len(shape) == 2 and n.startswith("blk.") and n.endswith(".weight")}


# --- the computation ----------------------------------------------------------------------------


@dataclass
class ActivationSums:
    """What llama-imatrix's collector holds at the end: per weight, the sums of squared inputs
    per column (float32, one row of them per matrix) and the rows counted per matrix."""

    sums: dict[str, np.ndarray] = field(repr=False)
    counts: dict[str, np.ndarray]
    chunk_count: int
    chunk_size: int
    tokens: int  # tokens evaluated
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class _Tensor(ctypes.Structure):
    """``struct ggml_tensor`` of the pinned ggml (ggml.h), checked against libggml on first use."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


GGML_TYPE_F32, GGML_TYPE_I32 = 0, 26  # enum ggml_type of the pinned ggml
GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID = 29, 30  # enum ggml_op of the pinned ggml
GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object)


@functools.lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    """libggml-base, with the layout and enum values above checked against it."""
    from so8t_core.quantize.engines.ggml import libggml

    lib = libggml()
    lib.ggml_op_name.argtypes, lib.ggml_op_name.restype = [ctypes.c_int], ctypes.c_char_p
    lib.ggml_tensor_overhead.argtypes, lib.ggml_tensor_overhead.restype = [], ctypes.c_size_t
    lib.ggml_backend_buffer_is_host.argtypes, lib.ggml_backend_buffer_is_host.restype = [ctypes.c_void_p], \
        ctypes.c_bool
    if (lib.ggml_op_name(GGML_OP_MUL_MAT), lib.ggml_op_name(GGML_OP_MUL_MAT_ID)) != (b"MUL_MAT", b"MUL_MAT_ID") \
            or lib.ggml_tensor_overhead() != GGML_OBJECT_SIZE + ctypes.sizeof(_Tensor):
        raise RuntimeError("libggml's tensor layout or op numbering is not the one this module was written for")
    return lib


def _weight_name(raw: bytes) -> str:
    """llama-imatrix's filter_tensor_name: ``CUDA0#blk.0.attn_k.weight#0`` → ``blk.0.attn_k.weight``."""
    name = raw.decode("utf-8", errors="replace")
    return name.split("#")[1] if "#" in name else name


class _Collector:
    """llama-imatrix's IMatrixCollector.collect_imatrix, as an eval callback: dense matrix products, and an
    MoE's experts (MUL_MAT_ID: each token's input counted for the experts it was routed to)."""

    def __init__(self, chunk_size: int) -> None:
        self.lib = _ggml()
        self.chunk_size = chunk_size
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.last_chunk = 0
        self.error: BaseException | None = None
        self.callback = _EvalCallback(self._on_eval)  # kept: C holds only the pointer

    def _on_eval(self, t_ptr: int, ask: bool, _user_data) -> bool:
        try:
            t = _Tensor.from_address(t_ptr)
            if ask:
                return self._wanted(t)
            self._collect(t)
            return True
        except BaseException as exc:  # never let an exception cross into C; raised after the decode
            self.error = self.error or exc
            return False

    def _wanted(self, t: _Tensor) -> bool:
        if t.op == GGML_OP_MUL_MAT_ID:
            return True  # an MoE's experts, whatever the batch (as llama-imatrix asks for them)
        if t.op != GGML_OP_MUL_MAT:
            return False
        src0, src1 = _Tensor.from_address(t.src[0]), _Tensor.from_address(t.src[1])
        if src1.ne[1] < MIN_ROWS or src1.type != GGML_TYPE_F32:
            return False
        return _weight_name(src0.name).startswith("blk.")

    def _collect(self, t: _Tensor) -> None:
        src0, src1 = _Tensor.from_address(t.src[0]), _Tensor.from_address(t.src[1])
        name = _weight_name(src0.name)
        if not self.lib.ggml_backend_buffer_is_host(src1.buffer) or src1.nb[0] != 4:
            raise RuntimeError(f"{name}: the activations are not in host memory as float32 rows")
        if t.op == GGML_OP_MUL_MAT_ID:
            self._collect_experts(t, src0, src1, name)
            return
        ne0, n_mat = src1.ne[0], src0.ne[2] * src0.ne[3]
        acc = self.sums.get(name)
        if acc is None:
            acc = self.sums[name] = np.zeros((n_mat, ne0), dtype=np.float32)
            self.counts[name] = np.zeros(1, dtype=np.int64)
        elif acc.shape != (n_mat, ne0):
            raise RuntimeError(f"{name}: inconsistent size ({acc.size} vs {n_mat * ne0})")
        for i3 in range(src1.ne[3]):
            for i2 in range(src1.ne[2]):
                mat = (i3 % src0.ne[3]) * src0.ne[2] + (i2 % src0.ne[2])
                rows = _rows(src1.data + i2 * src1.nb[2] + i3 * src1.nb[3], src1.ne[1], ne0, src1.nb[1])
                accumulate_squares(acc[mat], rows)
        if not np.isfinite(acc).all():
            raise CalibrationError(name, "non-finite activations", "the model overflows on this text")
        rows_total = src1.ne[1] * src1.ne[2] * src1.ne[3]
        self.counts[name] += rows_total // n_mat
        self.last_chunk = max(self.last_chunk, int(self.counts[name].max()) // self.chunk_size)


    def _collect_experts(self, t: _Tensor, src0: _Tensor, src1: _Tensor, name: str) -> None:
        """llama-imatrix's MUL_MAT_ID branch: for each expert slot (outer) and token (inner), the token's input
        row to that slot (src1 [cols, 1 or n_used, tokens]) is squared into the sums of the expert the router
        chose (ids [n_used, tokens]), and that expert's count goes up by one. An expert's additions happen in
        that order, so gathering its rows in that order and adding them one after the other is the same sum."""
        ids = _Tensor.from_address(t.src[2])
        n_as, n_ids, n_tokens, ne0, ne1 = src0.ne[2], ids.ne[0], src1.ne[2], src1.ne[0], src1.ne[1]
        if ids.ne[1] != n_tokens or src1.ne[3] != 1 or ids.type != GGML_TYPE_I32 \
                or not self.lib.ggml_backend_buffer_is_host(ids.buffer):
            raise RuntimeError(f"{name}: expert ids or activations not in the layout llama-imatrix reads")
        chosen = np.array(_strided(ids.data, np.int32, (n_ids, n_tokens), (ids.nb[0], ids.nb[1]))).reshape(-1)
        if chosen.size and (chosen.min() < 0 or chosen.max() >= n_as):
            raise RuntimeError(f"{name}: an expert id out of range")
        inputs = _strided(src1.data, np.float32, (ne1, n_tokens, ne0), (src1.nb[1], src1.nb[2], 4))
        acc = self.sums.get(name)
        if acc is None:
            acc = self.sums[name] = np.zeros((n_as, ne0), dtype=np.float32)
            self.counts[name] = np.zeros(n_as, dtype=np.int64)
        elif acc.shape != (n_as, ne0):
            raise RuntimeError(f"{name}: inconsistent size ({acc.size} vs {n_as * ne0})")
        slot = np.repeat(np.arange(n_ids), n_tokens) % ne1  # (slot, token) pairs, slot-major as llama-imatrix
        token = np.tile(np.arange(n_tokens), n_ids)
        for expert in np.unique(chosen):
            picked = chosen == expert
            accumulate_squares(acc[expert], inputs[slot[picked], token[picked]])
            self.counts[name][expert] += int(picked.sum())
            if not np.isfinite(acc[expert]).all():
                raise CalibrationError(name, "non-finite activations", "the model overflows on this text")
        self.last_chunk = max(self.last_chunk, int(self.counts[name].max()) // self.chunk_size)


def _strided(address: int, dtype, shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """A read-only view of C memory at ``address`` with the given byte strides."""
    span = sum((n - 1) * s for n, s in zip(shape, strides)) + np.dtype(dtype).itemsize
    buffer = (ctypes.c_char * span).from_address(address)
    view = np.ndarray(shape, dtype=dtype, buffer=buffer, strides=strides)
    view.flags.writeable = False
    return view


_EvalCallback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)


def _rows(address: int, nrows: int, ne0: int, row_stride: int) -> np.ndarray:
    """``nrows`` float32 rows of ``ne0`` at ``address``, ``row_stride`` bytes apart (a view, no copy)."""
    span = (nrows - 1) * row_stride + ne0 * 4
    base = np.frombuffer((ctypes.c_char * span).from_address(address), dtype=np.uint8)
    return np.lib.stride_tricks.as_strided(base.view(np.float32)[:1], shape=(nrows, ne0), strides=(row_stride, 4),
                                           writeable=False) if row_stride != ne0 * 4 else \
        base.view(np.float32).reshape(nrows, ne0)


def accumulate_squares(acc: np.ndarray, rows: np.ndarray) -> None:
    """``acc[j] += x[j]·x[j]`` for each row ``x`` in order, in float32, as llama-imatrix adds them:
    each square rounded, then each addition. numpy adds the rows of a C-ordered array one
    after the other when it reduces along them, so the first row's squares start from ``acc``."""
    squares = np.multiply(rows, rows, dtype=np.float32)
    squares[0] += acc
    np.add.reduce(squares, axis=0, out=acc)


def collect_activations(gguf_path: str, tokens: np.ndarray, n_ctx: int = DEFAULT_CTX, n_chunks: int | None = None,
                        n_threads: int | None = None) -> ActivationSums:
    """Run ``gguf_path`` (an F32 GGUF) in llama.cpp over ``tokens`` as llama-imatrix does and
    return its collector's sums (see the module doc). ``n_chunks``: at most this many chunks
    (None: all the text gives)."""
    import llama_cpp

    from so8t_core.errors import ValidationError
    from so8t_core.llama_runtime import captured_llama_log, default_threads

    check_enough_tokens(len(tokens), n_ctx, gguf_path)
    n_seq = max(1, LLAMA_IMATRIX_BATCH // n_ctx)
    n_kv = n_seq * n_ctx
    n_batch = min(LLAMA_IMATRIX_BATCH, n_kv)
    n_chunk_max = len(tokens) // n_ctx
    n_chunk = n_chunk_max if n_chunks is None else min(n_chunks, n_chunk_max)
    threads = n_threads or default_threads()
    collector = _Collector(chunk_size=n_ctx)
    with captured_llama_log() as log:
        llama_cpp.llama_backend_init()
        model = llama_cpp.llama_model_load_from_file(gguf_path.encode(), llama_cpp.llama_model_default_params())
        if not model:
            raise ValidationError(gguf_path, f"llama.cpp could not load it: {'; '.join(log.errors()) or '?'}", "")
        ctx = batch = None
        try:
            params = llama_cpp.llama_context_default_params()
            params.n_ctx, params.n_seq_max, params.n_batch, params.n_ubatch = n_kv, n_seq, n_batch, LLAMA_IMATRIX_UBATCH
            params.n_threads = params.n_threads_batch = threads
            params.cb_eval = ctypes.cast(collector.callback, llama_cpp.ggml_backend_sched_eval_callback)
            params.cb_eval_user_data = None
            params.no_perf = True
            ctx = llama_cpp.llama_init_from_model(model, params)
            if not ctx:
                raise ValidationError(gguf_path, f"llama.cpp could not create a context: {'; '.join(log.errors())}",
                                      "")
            vocab = llama_cpp.llama_model_get_vocab(model)
            bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
            batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq)
            memory = llama_cpp.llama_get_memory(ctx)
            started = time.perf_counter()
            for i in range(0, n_chunk, n_seq):
                llama_cpp.llama_memory_clear(memory, True)
                n_seq_batch = min(n_seq, n_chunk - i)
                for j in range(0, n_ctx, n_batch):  # one pass unless a chunk is longer than the batch
                    size = min(n_ctx - j, n_batch)
                    k = 0
                    for seq in range(n_seq_batch):
                        start = (i + seq) * n_ctx + j
                        for pos in range(size):
                            token = bos if (bos is not None and j == 0 and pos == 0) else int(tokens[start + pos])
                            batch.token[k], batch.pos[k], batch.n_seq_id[k] = token, j + pos, 1
                            batch.seq_id[k][0], batch.logits[k] = seq, 1
                            k += 1
                    batch.n_tokens = k
                    status = llama_cpp.llama_decode(ctx, batch)
                    if collector.error is not None:
                        raise collector.error
                    if status != 0:
                        raise ValidationError(gguf_path, f"llama.cpp failed to evaluate the calibration text "
                                              f"(status {status}): {'; '.join(log.errors())}", "")
            seconds = time.perf_counter() - started
        finally:
            if batch is not None:
                llama_cpp.llama_batch_free(batch)
            if ctx:
                llama_cpp.llama_free(ctx)
            llama_cpp.llama_model_free(model)
    return ActivationSums({n: a.reshape(-1) for n, a in collector.sums.items()}, collector.counts,
                          collector.last_chunk, n_ctx, n_chunk * n_ctx, seconds)


def coverage(sums: ActivationSums) -> dict[str, dict]:
    """Per weight: the tokens it saw and, for a weight of several matrices (an MoE's experts),
    those that saw none."""
    return {n: {"tokens": int(c.max()), "matrices_without_tokens": int((c == 0).sum())}
            for n, c in sorted(sums.counts.items())}


def write_tokens(tokens: np.ndarray, folder: str) -> tuple[str, str]:
    """Tokens saved under their sha256 in ``folder`` (for tasks that need them): (path, sha256)."""
    sha = tokens_sha256(tokens)
    path = os.path.join(folder, f"{sha}.tokens")
    if not os.path.exists(path):
        with storage.local_atomic_file(path) as tmp:
            np.ascontiguousarray(tokens, dtype="<i4").tofile(tmp)
    return path, sha


def read_tokens(path: str) -> np.ndarray:
    return np.fromfile(path, dtype="<i4")
