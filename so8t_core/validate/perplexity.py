"""llama-perplexity's ``--kl-divergence`` statistics, computed from llama.cpp's logits the way it does.

Mirrors ``tools/perplexity/perplexity.cpp`` of the pinned llama.cpp (``perplexity`` with
``--kl-divergence-base`` for the base model, ``kl_divergence`` for the quantized one):

* The text loses one trailing newline (as ``-f`` reads it) and is tokenized with BOS as the GGUF
  says, special text not parsed. It is cut into ``len(tokens) // n_ctx`` chunks of ``n_ctx``
  tokens (at least two are needed); each chunk is evaluated from an empty KV cache with its
  first token replaced by BOS when the vocabulary adds one.
* Only the second half of each chunk is scored: the logits at positions ``n_ctx/2 .. n_ctx-2``
  predict tokens ``n_ctx/2 + 1 .. n_ctx - 1``, so the model always has context.
* The base model's log-probabilities are kept as llama-perplexity keeps them: per row a scale
  and a minimum log-probability (two floats) and one uint16 per token over the 16 nats below the
  top logit, in its base-file layout (:func:`write_base_file` writes a file that llama-perplexity
  reads). The base PPL and the KLD are computed from those 16-bit values, as there.
* The uncertainties, percentiles (linear interpolation in float) and the medians use the same
  formulas, and :func:`render_kl_divergence` prints them under the same names.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from so8t_core import storage
from so8t_core.errors import ValidationError

if TYPE_CHECKING:  # llama.cpp is loaded where a model is run, not where the settings are read (the CLI)
    from so8t_core.llama_runtime import LlamaCppModel

BASE_FILE_MAGIC = b"_logits_"
# llama-perplexity computes no summary statistics over fewer scored tokens.
MIN_SCORED_TOKENS = 100
BUILTIN_EVAL_TEXT = "builtin"  # --eval-text's value for the text the package ships
BUILTIN_EVAL_PATH = os.path.join(os.path.dirname(__file__), "evaluation_data", "default.txt")
KLD_PERCENTILES = (0.999, 0.990, 0.950, 0.900, 0.100, 0.050, 0.010, 0.001)
DELTA_P_PERCENTILES = (0.999, 0.990, 0.950, 0.900, 0.750, 0.250, 0.100, 0.050, 0.010, 0.001)
_F32 = np.float32
# The evaluation a run does by default: llama-perplexity's default context, and 16 chunks of it
# (8192 tokens, 4080 of them scored); --eval-chunks 0 takes the whole text.
DEFAULT_EVAL_CTX = 512
DEFAULT_EVAL_CHUNKS = 16
EVALUATION_VERSION = 2  # part of the evaluation's cache key: bump when the statistics change


def _expf(x: np.ndarray) -> np.ndarray:
    """C's ``expf`` as glibc computes it, correctly rounded to float32 (from float64's exp): numpy's own
    float32 exp is off by an ulp in about 40% of the values, which moved the base file's minimum
    log-probability by an ulp in 18 of the demo's 4080 rows."""
    return np.exp(np.asarray(x, np.float64)).astype(_F32)


def _row_width(n_vocab: int) -> int:
    """uint16 values per stored row: two floats (scale, minimum) then the vocabulary, padded even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def read_eval_text(uri: str) -> str:
    """The evaluation text: ``builtin`` (evaluation_data/default.txt) or any storage URI of UTF-8 text."""
    if uri == BUILTIN_EVAL_TEXT:
        with open(BUILTIN_EVAL_PATH, encoding="utf-8") as f:
            return f.read()
    data = storage.read_bytes(uri)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(storage.redact_uri(uri), f"the evaluation text is not UTF-8 (byte {exc.start})",
                              "pass a UTF-8 text file") from None
    if not text.strip():
        raise ValidationError(storage.redact_uri(uri), "the evaluation text is empty",
                              "pass a text of 8k tokens or more")
    return text


def evaluation_tokens(model: LlamaCppModel, text: str, n_ctx: int, n_chunks: int | None = None) -> np.ndarray:
    """``[n_chunk * n_ctx]`` int32 token ids of ``text`` as llama-perplexity takes them."""
    if n_ctx < 4:
        raise ValueError(f"n_ctx must be at least 4, got {n_ctx}")
    if text.endswith("\n"):
        text = text[:-1]
    tokens = model.tokenize(text, add_special=True, parse_special=False)
    if len(tokens) < 2 * n_ctx:
        raise ValueError(f"the evaluation text has {len(tokens)} tokens; a context of {n_ctx} needs at least "
                         f"{2 * n_ctx}")
    n_chunk = len(tokens) // n_ctx if n_chunks is None else min(n_chunks, len(tokens) // n_ctx)
    return np.asarray(tokens[:n_chunk * n_ctx], dtype=np.int32)


def _scored_logits(model: LlamaCppModel, tokens: np.ndarray, n_ctx: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per chunk: (logits at positions n_ctx/2 .. n_ctx-2, the tokens they predict)."""
    if model.n_ctx < n_ctx:
        raise ValueError(f"the model's context ({model.n_ctx}) is smaller than the chunk size {n_ctx}")
    bos = model.bos_token if model.add_bos else None
    first = n_ctx // 2
    for start in range(0, len(tokens), n_ctx):
        chunk = [int(t) for t in tokens[start:start + n_ctx]]
        if bos is not None:
            chunk[0] = bos
        logits = model.logits(chunk)
        yield logits[first:n_ctx - 1], tokens[start + first + 1:start + n_ctx]


@dataclass(frozen=True)
class BaseLogProbs:
    """The base model's scored log-probabilities, in llama-perplexity's base-file layout."""

    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # int32 [n_chunk * n_ctx]
    rows: np.ndarray  # uint16 [n_chunk, n_ctx - 1 - n_ctx/2, row width]

    @property
    def n_chunk(self) -> int:
        return len(self.tokens) // self.n_ctx

    def first_chunks(self, k: int) -> "BaseLogProbs":
        """The first ``k`` chunks (all when there are fewer), as a base file of them would hold."""
        k = min(k, self.n_chunk)
        return BaseLogProbs(self.n_ctx, self.n_vocab, self.tokens[:k * self.n_ctx], self.rows[:k])


def _quantize_log_probs(logits: np.ndarray) -> np.ndarray:
    """llama-perplexity's 16-bit rows for ``[n, n_vocab]`` logits (its ``log_softmax`` with ``log_prob``)."""
    n, n_vocab = logits.shape
    rows = np.zeros((n, _row_width(n_vocab)), dtype=np.uint16)
    head = rows[:, :4].view(np.float32)  # [n, 2]: scale, min_log_prob
    for i, row in enumerate(logits.astype(_F32, copy=False)):
        max_logit = row.max()
        min_logit = max(row.min(), _F32(max_logit - _F32(16)))
        log_sum_exp = _F32(math.log(_expf(row - max_logit).sum(dtype=np.float64)))
        scale = _F32((max_logit - min_logit) / _F32(65535))
        head[i] = (scale, _F32(_F32(min_logit - max_logit) - log_sum_exp))
        if scale:
            q = np.rint((_F32(1) / scale) * (row - min_logit))
            rows[i, 4:4 + n_vocab] = np.where(row > min_logit, q, 0).astype(np.uint16)
    return rows


def base_log_probs(model: LlamaCppModel, tokens: np.ndarray, n_ctx: int) -> BaseLogProbs:
    """The base model's pass (llama-perplexity ``--kl-divergence-base``) over ``tokens``."""
    rows = [_quantize_log_probs(logits) for logits, _ in _scored_logits(model, tokens, n_ctx)]
    return BaseLogProbs(n_ctx, model.n_vocab, np.asarray(tokens, np.int32), np.stack(rows))


def write_base_pass(model: LlamaCppModel, tokens: np.ndarray, n_ctx: int, path: str) -> None:
    """:func:`base_log_probs` written to ``path`` as llama-perplexity's base file chunk by chunk,
    so that only one chunk's rows are in memory (the demo's base file is 552 MB)."""
    tokens = np.asarray(tokens, np.int32)
    with open(path, "wb") as f:
        f.write(BASE_FILE_MAGIC + struct.pack("<Iii", n_ctx, model.n_vocab, len(tokens) // n_ctx))
        f.write(tokens.astype("<i4").tobytes())
        for logits, _ in _scored_logits(model, tokens, n_ctx):
            f.write(_quantize_log_probs(logits).astype("<u2").tobytes())


def write_base_file(base: BaseLogProbs, path: str) -> None:
    """``base`` as llama-perplexity's ``--kl-divergence-base`` file (it can read it back)."""
    with open(path, "wb") as f:
        f.write(BASE_FILE_MAGIC + struct.pack("<Iii", base.n_ctx, base.n_vocab, base.n_chunk))
        f.write(base.tokens.astype("<i4").tobytes())
        f.write(base.rows.astype("<u2").tobytes())


def read_base_file(path: str, mmap: bool = False) -> BaseLogProbs:
    """A ``--kl-divergence-base`` file, written by llama-perplexity or :func:`write_base_file`;
    ``mmap``: its rows memory-mapped, read chunk by chunk as they are used, not loaded."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:8] != BASE_FILE_MAGIC or len(head) < 20:
        raise ValueError(f"{path} does not look like a file containing log-probabilities")
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<Iii", head, 8)
    shape = (n_chunk, n_ctx - 1 - n_ctx // 2, _row_width(n_vocab))
    offset = 20 + 4 * n_ctx * n_chunk
    if os.path.getsize(path) != offset + 2 * int(np.prod(shape)):
        raise ValueError(f"{path} is not as long as its header says (truncated?)")
    tokens = np.fromfile(path, "<i4", n_ctx * n_chunk, offset=20).astype(np.int32)
    if mmap:
        rows = np.memmap(path, "<u2", "r", offset, shape)
    else:
        rows = np.fromfile(path, "<u2", int(np.prod(shape)), offset=offset).reshape(shape)
    return BaseLogProbs(n_ctx, n_vocab, tokens, rows)


@dataclass(frozen=True)
class KlDivergenceStatistics:
    """llama-perplexity's final summary; probabilities (Δp, same top p) as fractions, not percent."""

    n_ctx: int
    n_chunk: int
    count: int
    ppl_q: float
    ppl_q_unc: float
    ppl_base: float
    ppl_base_unc: float
    ln_ppl_cor: float
    ln_ppl_ratio: float
    ln_ppl_ratio_unc: float
    ppl_ratio: float
    ppl_ratio_unc: float
    ppl_diff: float
    ppl_diff_unc: float
    kld_mean: float
    kld_unc: float
    kld_max: float
    kld_percentiles: dict[str, float]  # "99.9" .. "0.1"
    kld_median: float
    kld_min: float
    delta_p_mean: float
    delta_p_unc: float
    delta_p_max: float
    delta_p_percentiles: dict[str, float]  # "99.9" .. "0.1"
    delta_p_median: float
    delta_p_min: float
    delta_p_rms: float
    delta_p_rms_unc: float
    same_top_p: float
    same_top_p_unc: float

    def as_record(self) -> dict:
        return asdict(self)


def _mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    var = total2 / count - mean * mean
    return mean, (math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0)


def _covariance(total_a: float, total_b: float, total_ab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (total_ab / count - (total_a / count) * (total_b / count)) / (count - 1)


def _percentile(values: np.ndarray, fraction: float) -> float:
    """perplexity.cpp's ``percentile``: linear interpolation, in float, of sorted float values."""
    p = _F32(_F32(fraction) * _F32(len(values) - 1))
    ip = int(p)
    p = _F32(p - _F32(ip))
    return float(_F32((_F32(1) - p) * values[ip] + p * values[min(ip + 1, len(values) - 1)]))


def _median(values: np.ndarray) -> float:
    n = len(values)
    return float(values[n // 2] if n % 2 else _F32(_F32(0.5) * _F32(values[n // 2] + values[n // 2 - 1])))


def _label(fraction: float) -> str:
    return f"{100 * fraction:.1f}"


def kl_divergence(model: LlamaCppModel, base: BaseLogProbs) -> KlDivergenceStatistics:
    """The quantized model's pass (llama-perplexity ``--kl-divergence``) against ``base``."""
    if model.n_vocab != base.n_vocab:
        raise ValueError(f"inconsistent vocabulary ({model.n_vocab} vs {base.n_vocab})")
    n_vocab = base.n_vocab
    sums = dict.fromkeys(("nll", "nll2", "nll_base", "nll_base2", "nll_nll_base", "kld", "kld2",
                          "p_diff", "p_diff2", "p_diff4"), 0.0)
    kld_values: list[np.ndarray] = []
    p_diff_values: list[np.ndarray] = []
    n_same_top = 0
    for (logits, targets), chunk_rows in zip(_scored_logits(model, base.tokens, base.n_ctx), base.rows, strict=True):
        logits = logits.astype(_F32, copy=False)
        head = np.ascontiguousarray(chunk_rows[:, :4]).view(np.float32)
        scale, min_log_prob = head[:, 0:1], head[:, 1:2]
        p_log_base = (scale * chunk_rows[:, 4:4 + n_vocab].astype(_F32) + min_log_prob).astype(_F32)
        max_logit = logits.max(axis=1, keepdims=True)
        log_sum_exp = np.log(_expf(logits - max_logit).sum(axis=1, dtype=np.float64, keepdims=True)).astype(_F32)
        rows = np.arange(len(targets))
        nll = (max_logit[:, 0] + log_sum_exp[:, 0] - logits[rows, targets]).astype(_F32)
        nll_base = (-p_log_base[rows, targets]).astype(_F32)
        log_norm = (max_logit + log_sum_exp).astype(_F32)
        terms = _expf(p_log_base) * (p_log_base - logits + log_norm)
        kld = np.where(p_log_base > _F32(-16), terms, _F32(0)).sum(axis=1, dtype=np.float64)
        n_same_top += int((logits.argmax(axis=1) == p_log_base.argmax(axis=1)).sum())
        p_diff = (_expf(-nll) - _expf(-nll_base)).astype(_F32)
        nll64, nll_base64, p_diff2 = nll.astype(np.float64), nll_base.astype(np.float64), (p_diff * p_diff).astype(
            np.float64)
        sums["nll"] += nll64.sum()
        sums["nll2"] += (nll64 * nll64).sum()
        sums["nll_base"] += nll_base64.sum()
        sums["nll_base2"] += (nll_base64 * nll_base64).sum()
        sums["nll_nll_base"] += (nll64 * nll_base64).sum()
        sums["kld"] += kld.sum()
        sums["kld2"] += (kld * kld).sum()
        sums["p_diff"] += p_diff.astype(np.float64).sum()
        sums["p_diff2"] += p_diff2.sum()
        sums["p_diff4"] += (p_diff2 * p_diff2).sum()
        kld_values.append(kld.astype(_F32))
        p_diff_values.append(p_diff)
    count = sum(len(v) for v in kld_values)
    if count < MIN_SCORED_TOKENS:
        raise ValueError(f"only {count} scored tokens; llama-perplexity computes statistics from "
                         f"{MIN_SCORED_TOKENS} on (use a longer text or a larger context)")
    klds = np.sort(np.concatenate(kld_values))
    p_diffs = np.sort(np.concatenate(p_diff_values))

    log_ppl, log_ppl_unc = _mean_and_uncertainty(sums["nll"], sums["nll2"], count)
    log_base, log_base_unc = _mean_and_uncertainty(sums["nll_base"], sums["nll_base2"], count)
    cov = _covariance(sums["nll"], sums["nll_base"], sums["nll_nll_base"], count)
    ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
    ppl_unc, ppl_base_unc = ppl * log_ppl_unc, ppl_base * log_base_unc
    ratio_ln = log_ppl - log_base
    ratio_ln_unc = math.sqrt(max(0.0, log_ppl_unc ** 2 + log_base_unc ** 2 - 2.0 * cov))
    ppl_ratio = math.exp(ratio_ln)
    ppl_cov = ppl * ppl_base * cov
    kld_mean, kld_unc = _mean_and_uncertainty(sums["kld"], sums["kld2"], count)
    p_mean, p_unc = _mean_and_uncertainty(sums["p_diff"], sums["p_diff2"], count)
    mse, mse_unc = _mean_and_uncertainty(sums["p_diff2"], sums["p_diff4"], count)
    rms = math.sqrt(mse)
    same_top = n_same_top / count
    unc_product = log_ppl_unc * log_base_unc
    return KlDivergenceStatistics(
        n_ctx=base.n_ctx, n_chunk=base.n_chunk, count=count,
        ppl_q=ppl, ppl_q_unc=ppl_unc, ppl_base=ppl_base, ppl_base_unc=ppl_base_unc,
        ln_ppl_cor=cov / unc_product if unc_product else 0.0,
        ln_ppl_ratio=ratio_ln, ln_ppl_ratio_unc=ratio_ln_unc,
        ppl_ratio=ppl_ratio, ppl_ratio_unc=ppl_ratio * ratio_ln_unc,
        ppl_diff=ppl - ppl_base,
        ppl_diff_unc=math.sqrt(max(0.0, ppl_unc ** 2 + ppl_base_unc ** 2 - 2.0 * ppl_cov)),
        kld_mean=kld_mean, kld_unc=kld_unc, kld_max=float(klds[-1]),
        kld_percentiles={_label(f): _percentile(klds, f) for f in KLD_PERCENTILES},
        kld_median=_median(klds), kld_min=float(klds[0]),
        delta_p_mean=p_mean, delta_p_unc=p_unc, delta_p_max=float(p_diffs[-1]),
        delta_p_percentiles={_label(f): _percentile(p_diffs, f) for f in DELTA_P_PERCENTILES},
        delta_p_median=_median(p_diffs), delta_p_min=float(p_diffs[0]),
        delta_p_rms=rms, delta_p_rms_unc=0.5 / rms * mse_unc if rms else 0.0,
        same_top_p=same_top, same_top_p_unc=math.sqrt(same_top * (1.0 - same_top) / (count - 1)),
    )


def write_evaluation_base(f32_gguf: str, text: str, n_ctx: int, n_chunks: int | None, path: str) -> None:
    """The base model's pass over ``text`` (its first ``n_chunks`` chunks; None: all), written to
    ``path`` as llama-perplexity's ``--kl-divergence-base`` file."""
    from so8t_core.llama_runtime import LlamaCppModel

    with LlamaCppModel(f32_gguf, n_ctx=n_ctx) as model:
        try:
            tokens = evaluation_tokens(model, text, n_ctx, n_chunks)
        except ValueError as exc:
            raise ValidationError(f32_gguf, str(exc), "pass a longer --eval-text or a smaller --eval-ctx") from None
        write_base_pass(model, tokens, n_ctx, path)


def evaluate_file(gguf: str, base_file: str) -> KlDivergenceStatistics:
    """Any GGUF of the model (the first file of a split set) scored against a base file: what the
    evaluate stage records per quant, callable on its own (its rows memory-mapped, not loaded)."""
    from so8t_core.llama_runtime import LlamaCppModel

    base = read_base_file(base_file, mmap=True)
    with LlamaCppModel(gguf, n_ctx=base.n_ctx) as model:
        try:
            return kl_divergence(model, base)
        except ValueError as exc:
            raise ValidationError(gguf, str(exc), "pass a longer --eval-text or a larger --eval-chunks") from None


def render_kl_divergence(s: KlDivergenceStatistics) -> str:
    """The summary as llama-perplexity prints it (same names, same formats)."""
    def pct(label: str) -> str:
        return f"{label}%".ljust(8)

    lines = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {s.ppl_q:10.6f} ± {s.ppl_q_unc:10.6f}",
             f"Mean PPL(base)                : {s.ppl_base:10.6f} ± {s.ppl_base_unc:10.6f}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s.ln_ppl_cor:6.2f}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {s.ln_ppl_ratio:10.6f} ± {s.ln_ppl_ratio_unc:10.6f}",
             f"Mean PPL(Q)/PPL(base)         : {s.ppl_ratio:10.6f} ± {s.ppl_ratio_unc:10.6f}",
             f"Mean PPL(Q)-PPL(base)         : {s.ppl_diff:10.6f} ± {s.ppl_diff_unc:10.6f}",
             "",
             "====== KL divergence statistics ======",
             f"Mean    KLD: {s.kld_mean:10.6f} ± {s.kld_unc:10.6f}",
             f"Maximum KLD: {s.kld_max:10.6f}"]
    kld_labels = [_label(f) for f in KLD_PERCENTILES]
    lines += [f"{pct(label).rjust(8)}KLD: {s.kld_percentiles[label]:10.6f}" for label in kld_labels[:4]]
    lines.append(f"Median  KLD: {s.kld_median:10.6f}")
    lines += [f"{pct(label.rjust(4))}KLD: {s.kld_percentiles[label]:10.6f}" for label in kld_labels[4:]]
    lines += [f"Minimum KLD: {s.kld_min:10.6f}",
              "",
              "====== Token probability statistics ======",
              f"Mean    Δp: {100 * s.delta_p_mean:6.3f} ± {100 * s.delta_p_unc:5.3f} %",
              f"Maximum Δp: {100 * s.delta_p_max:6.3f}%"]
    dp_labels = [_label(f) for f in DELTA_P_PERCENTILES]
    lines += [f"{pct(label)}Δp: {100 * s.delta_p_percentiles[label]:6.3f}%" for label in dp_labels[:5]]
    lines.append(f"Median  Δp: {100 * s.delta_p_median:6.3f}%")
    lines += [f"{pct(label.rjust(4))}Δp: {100 * s.delta_p_percentiles[label]:6.3f}%" for label in dp_labels[5:]]
    lines += [f"Minimum Δp: {100 * s.delta_p_min:6.3f}%",
              f"RMS Δp    : {100 * s.delta_p_rms:6.3f} ± {100 * s.delta_p_rms_unc:5.3f} %",
              f"Same top p: {100 * s.same_top_p:6.3f} ± {100 * s.same_top_p_unc:5.3f} %"]
    return "\n".join(lines) + "\n"


# Quality gates. The defaults reject a broken file, not a weak quantization: the demo's Q2_K measured
# a mean KLD of 0.37 and top-1 agreement of 61% on the validation passage (docs/architecture.md), while
# a fixture's Q4_K_M with one tensor's bytes scrambled gives 4.2 nats (or NaN) and 0% same top p.
DEFAULT_MAX_KLD = 1.0  # nats, mean KLD
DEFAULT_MIN_SAME_TOP = 0.40  # fraction of scored tokens


def gate_failures(stats: KlDivergenceStatistics, max_kld: float = DEFAULT_MAX_KLD,
                  min_same_top: float = DEFAULT_MIN_SAME_TOP) -> list[str]:
    """Why ``stats`` fail the gates (empty when they pass). NaN fails: a file whose logits are not
    numbers is broken whatever its other figures."""
    failures = []
    if not stats.kld_mean <= max_kld:
        failures.append(f"mean KLD {stats.kld_mean:.4g} is above --max-kld {max_kld:g}")
    if not stats.same_top_p >= min_same_top:
        failures.append(f"same top p {100 * stats.same_top_p:.2f}% is below --min-same-top "
                        f"{100 * min_same_top:g}%")
    return failures
