"""Validation of a produced GGUF: read-back, per-tensor error, llama.cpp itself, tokenizer parity.

Four checks, each a gate. (1) Read-back: gguf-py opens the file and every tensor
has the planned name, shape, type and exact bytes, and every metadata key the
planned value. (2) Per-tensor dequantization error against the baked source stays
within the quant's bound. (3) Functional: llama.cpp's logits on a fixed text of at
least 256 tokens against the PyTorch SO8T reference (gates applied, not baked):
mean KL divergence and top-1 agreement within the quant's bounds. (4) Tokenizer:
llama.cpp tokenizes a fixed multilingual text (:data:`PARITY_TEXT`) into exactly the
ids the checkpoint's Hugging Face tokenizer gives, BOS/EOS included.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from gguf import GGMLQuantizationType

from so8t_core.analysis import checkpoint_model
from so8t_core.constants import QUANT_TYPES, SUPPORTED_TENSOR_TYPES, Keys
from so8t_core.errors import CheckpointError, ValidationError
from so8t_core.gguf_file import GGUFKV, GGUFContents, pair_tensors, read_gguf, split_paths
from so8t_core.metrics import logit_agreement
from so8t_core.plan import materialize
from so8t_core.quantize.error_stats import tensor_error_stats
from so8t_core.refs import StagedTensor
from so8t_core.source.checkpoint import TOKENIZER_FILES, Checkpoint
from so8t_core.source.lora import LoraAdapter

# A fixed English passage: long enough for ≥256 tokens with any real BPE vocabulary.
VALIDATION_TEXT = (
    "The river rose slowly through the night, and by morning the low fields beyond the mill were under a sheet "
    "of brown water. Nobody in the village was surprised. For three generations the same families had farmed "
    "the flood plain, and every spring they moved their animals to the ridge, carried seed and tools into the "
    "lofts, and waited. The water brought silt that made the soil rich, and the soil paid for the trouble. "
    "This year, however, the weather had been strange. A warm winter had melted the snow in the hills early, "
    "and then three weeks of rain had fallen on ground that was already soaked. The old miller, who kept a "
    "notebook of every flood since he was a boy, said that the water was higher than in any year he had "
    "written down. He measured it twice a day against a post painted with white rings, and he wrote the "
    "numbers in careful columns: the date, the hour, the height, and a short remark about the wind. "
    "Engineers from the city arrived on the fourth day. They asked to see the notebook, copied the figures "
    "into a laptop, and drew a curve that climbed steeply and then, to everyone's relief, began to bend. "
    "They explained that the reservoir upstream was nearly full, that the gates would be opened in a "
    "controlled way, and that the river would fall by about ten centimetres each day for a week. The "
    "villagers listened politely. Then they went back to the ridge, where the children were feeding the "
    "goats and an argument about whose turn it was to cook had been going on since breakfast. By the end of "
    "the month the fields had drained, the mill wheel was turning again, and the miller had added a new "
    "line to his notebook, underlined twice, with a note that the engineers had been right."
)
MIN_TOKENS = 256
MAX_TOKENS = 384

# Tokenizer parity text: English with contractions, digits and decimals, Japanese, Chinese,
# indented code, emoji (ZWJ sequences, skin tone, flag), odd whitespace (runs of spaces,
# tabs, a no-break and an ideographic space, trailing spaces, CRLF, blank lines), accents,
# typographic quotes. It names no special token, so how a tokenizer parses "<s>"-like text
# does not enter; it starts with a letter (see check_tokenizer_parity).
PARITY_TEXT = (
    "Tokenizer parity check, v1: the quick brown fox doesn't jump; we'll see, they're sure, I'd say it's fine.\n"
    "In 2024 the model scored 3.14159 on 1,000,000 samples (12.5% more than 2023's 0.999).\n"
    "日本語：東京は日本の首都です。ひらがな、カタカナ、漢字。\n"
    "中文：我们在2024年训练了模型，结果很好！\n"
    "def area(radius: float) -> float:\n"
    "    \"\"\"Area of a circle.\"\"\"\n"
    "    return 3.14159 * radius ** 2  # TODO: use math.pi\n"
    "\n"
    "\tif x  >=  10:\t\tprint(f\"{x:>8.3f}\")\n"
    "Emoji: 🦙🚀 😶\u200d🌫️ 👩\u200d👩\u200d👧\u200d👦 👍🏽 🏳️\u200d🌈 ✅\n"
    "Odd   spacing \u00a0non-breaking\u3000ideographic   and trailing   \n"
    "\r\nCRLF line, naïve café Ünïcödé — “quotes” ‘single’ …\n\n\n"
    "END"
)
PARITY_SHOWN_IDS = 16  # ids of each side in a report: from a little before the first mismatch


# Part of every cached validation's key: bump when a check or its report changes.
VALIDATION_VERSION = "1"


@dataclass(frozen=True)
class Gate:
    max_mean_kld: float
    min_top1: float
    max_relative_rmse: float  # per tensor, dequantized vs the baked float32 source


# Bounds per quant. F32 is the issue's contract; the others were set from measurements on
# the demo model and fixtures (docs/architecture.md) with headroom for other models.
GATES = {
    "F32": Gate(max_mean_kld=1e-4, min_top1=0.995, max_relative_rmse=0.0),
    "F16": Gate(max_mean_kld=1e-3, min_top1=0.98, max_relative_rmse=1e-3),
    "BF16": Gate(max_mean_kld=1e-2, min_top1=0.95, max_relative_rmse=1e-2),
    "Q8_0": Gate(max_mean_kld=3e-2, min_top1=0.90, max_relative_rmse=2e-2),
    # 4/5-bit: loose enough for a 135M model (measured worst: Q4_0 KLD 0.38, top-1 59%),
    # tight enough that a broken file (KLD of several nats, top-1 near 0) fails.
    "Q5_1": Gate(max_mean_kld=0.5, min_top1=0.6, max_relative_rmse=0.1),
    "Q5_0": Gate(max_mean_kld=0.5, min_top1=0.6, max_relative_rmse=0.1),
    "Q4_1": Gate(max_mean_kld=1.0, min_top1=0.45, max_relative_rmse=0.2),
    "Q4_0": Gate(max_mean_kld=1.0, min_top1=0.45, max_relative_rmse=0.2),
    "Q6_K": Gate(max_mean_kld=0.1, min_top1=0.8, max_relative_rmse=0.05),
    "Q5_K_M": Gate(max_mean_kld=0.5, min_top1=0.6, max_relative_rmse=0.1),
    "Q5_K_S": Gate(max_mean_kld=0.5, min_top1=0.6, max_relative_rmse=0.1),
    "Q4_K_M": Gate(max_mean_kld=1.0, min_top1=0.45, max_relative_rmse=0.2),
    "Q4_K_S": Gate(max_mean_kld=1.0, min_top1=0.45, max_relative_rmse=0.2),
    "Q3_K_L": Gate(max_mean_kld=1.5, min_top1=0.35, max_relative_rmse=0.3),
    "Q3_K_M": Gate(max_mean_kld=1.5, min_top1=0.35, max_relative_rmse=0.3),
    "Q3_K_S": Gate(max_mean_kld=1.5, min_top1=0.35, max_relative_rmse=0.3),
    "Q2_K": Gate(max_mean_kld=3.0, min_top1=0.2, max_relative_rmse=0.5),
    # The IQ mixes, by bits, as the K mixes of their size.
    "IQ4_NL": Gate(max_mean_kld=1.0, min_top1=0.45, max_relative_rmse=0.2),
    "IQ4_XS": Gate(max_mean_kld=1.0, min_top1=0.45, max_relative_rmse=0.2),
    "IQ3_M": Gate(max_mean_kld=1.5, min_top1=0.35, max_relative_rmse=0.3),
    "IQ3_S": Gate(max_mean_kld=1.5, min_top1=0.35, max_relative_rmse=0.3),
    "IQ3_XS": Gate(max_mean_kld=1.5, min_top1=0.35, max_relative_rmse=0.3),
    "IQ3_XXS": Gate(max_mean_kld=1.5, min_top1=0.35, max_relative_rmse=0.3),
    "Q2_K_S": Gate(max_mean_kld=3.0, min_top1=0.2, max_relative_rmse=0.5),
    "IQ2_M": Gate(max_mean_kld=3.0, min_top1=0.2, max_relative_rmse=0.5),
    "IQ2_S": Gate(max_mean_kld=3.0, min_top1=0.2, max_relative_rmse=0.5),
    "IQ2_XS": Gate(max_mean_kld=3.0, min_top1=0.2, max_relative_rmse=0.5),
    "IQ2_XXS": Gate(max_mean_kld=3.0, min_top1=0.2, max_relative_rmse=0.5),
    "IQ1_M": Gate(max_mean_kld=5.0, min_top1=0.1, max_relative_rmse=0.7),
    "IQ1_S": Gate(max_mean_kld=5.0, min_top1=0.1, max_relative_rmse=0.7),
    # A dense model has no experts: MXFP4_MOE is Q8_0 throughout.
    "MXFP4_MOE": Gate(max_mean_kld=3e-2, min_top1=0.90, max_relative_rmse=2e-2),
    # For weights trained ternary or 1-bit, which these types hold (nearly) exactly. Any other
    # model loses most of itself in them, and fails here by design (--no-validate publishes it).
    "Q2_0": Gate(max_mean_kld=1.0, min_top1=0.45, max_relative_rmse=0.2),
    "TQ2_0": Gate(max_mean_kld=1.0, min_top1=0.45, max_relative_rmse=0.2),
    "TQ1_0": Gate(max_mean_kld=1.0, min_top1=0.45, max_relative_rmse=0.2),
    "Q1_0": Gate(max_mean_kld=1.0, min_top1=0.45, max_relative_rmse=0.2),
}


def validation_token_ids(ckpt: Checkpoint) -> list[int]:
    """The fixed validation text tokenized by the checkpoint's own (Hugging Face) tokenizer."""
    from tokenizers import Tokenizer

    from so8t_core.source.tokenizer import check_tokenizer_files

    raw = ckpt.read_file("tokenizer.json")
    if raw is None:
        raise CheckpointError(ckpt.uri, "missing tokenizer.json", "copy the tokenizer files into the checkpoint")
    cfg_raw = ckpt.read_file("tokenizer_config.json")
    check_tokenizer_files({"tokenizer.json": raw, **({"tokenizer_config.json": cfg_raw} if cfg_raw else {})},
                          ckpt.uri)  # UTF-8 JSON, or a one-line error naming the file
    try:
        tok = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{ckpt.uri}/tokenizer.json", f"the Hugging Face tokenizer cannot be loaded "
                                                            f"({reason[:160]})", "check tokenizer.json") from None
    ids = tok.encode(VALIDATION_TEXT, add_special_tokens=False).ids
    tcfg = json.loads(cfg_raw) if cfg_raw else {}
    tcfg = tcfg if isinstance(tcfg, dict) else {}
    bos = ckpt.config.get("bos_token_id")
    if tcfg.get("add_bos_token") and isinstance(bos, int):
        ids = [bos] + ids
    while len(ids) < MIN_TOKENS:  # tiny vocabularies never need this; huge ones might
        ids = ids + ids
    return ids[:MAX_TOKENS]


def hf_token_ids(ckpt: Checkpoint, text: str) -> list[int]:
    """``text`` tokenized as the checkpoint's Hugging Face tokenizer does by default
    (``source.tokenizer.hf_token_ids``: the same ids the preflight's tokenizer check compares)."""
    from so8t_core.source.tokenizer import hf_token_ids as ids_of

    return ids_of({n: data for n in TOKENIZER_FILES if (data := ckpt.read_file(n)) is not None}, text, ckpt.uri)


def check_tokenizer_parity(gguf_path: str, ckpt: Checkpoint, n_threads: int | None = None,
                           text: str = PARITY_TEXT) -> dict[str, Any]:
    """llama.cpp's tokenization of ``text`` (BOS/EOS as the GGUF says, special-token text
    parsed) against the checkpoint's Hugging Face tokenizer (:func:`hf_token_ids`): the
    same ids, or the first position where they part."""
    from so8t_core.llama_runtime import LlamaCppModel

    expected = hf_token_ids(ckpt, text)
    with LlamaCppModel(gguf_path, n_ctx=64, n_batch=64, n_threads=n_threads) as model:
        got = model.tokenize(text, add_special=True, parse_special=True)
    first = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b),
                 None if len(expected) == len(got) else min(len(expected), len(got)))
    start = 0 if first is None else max(0, first - 4)
    return {"ok": first is None, "n_tokens": len(expected), "n_tokens_llama_cpp": len(got),
            "first_mismatch": first, "shown_from": start,
            "hf": expected[start:start + PARITY_SHOWN_IDS], "llama_cpp": got[start:start + PARITY_SHOWN_IDS]}


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and \
            math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def check_readback(path: str, arch: str, kvs: Sequence[GGUFKV], staged: Sequence[StagedTensor]) -> dict[str, Any]:
    """Re-open the file (every file of a split set) with gguf-py; compare every tensor and key with the plan."""
    shards = [read_gguf(p) for p in split_paths(path)]
    g = shards[0]
    problems: list[str] = []
    if g.value("general.architecture") != arch:
        problems.append(f"general.architecture is {g.value('general.architecture')!r}, expected {arch!r}")
    for kv in kvs:
        if kv.key not in g.reader.fields:
            problems.append(f"metadata key {kv.key} missing")
        elif not _same_value(g.value(kv.key), kv.value):
            problems.append(f"metadata key {kv.key} differs")
    tensors = [t for shard in shards for t in shard.tensors]
    planned = [(s.gguf_name, tuple(s.shape)) for s in staged]
    for i, t in pair_tensors(tensors, planned, problems, lambda i: [GGMLQuantizationType[staged[i].ggml_type]],
                             in_order=True):
        if hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest() != staged[i].sha256:
            problems.append(f"{staged[i].gguf_name}: data differs from the staged tensor")
    return {"ok": not problems, "tensors": len(tensors), "files": len(shards),
            "metadata_keys": len(g.reader.fields) - 3, "problems": problems[:20]}


def check_tensor_errors(relative_rmse: Mapping[str, float], gate: Gate) -> dict[str, Any]:
    """Every tensor's dequantization error (relative RMSE vs the baked source) within the bound."""
    worst = max(relative_rmse, key=relative_rmse.get)
    bad = [n for n, e in relative_rmse.items() if e > gate.max_relative_rmse]
    return {"ok": not bad, "max_relative_rmse": relative_rmse[worst], "worst_tensor": worst,
            "bound": gate.max_relative_rmse, "over_bound": bad[:20]}


def check_functional(gguf_path: str, reference_logits: np.ndarray, token_ids: Sequence[int], gate: Gate,
                     n_threads: int | None = None, lora_path: str | None = None) -> dict[str, Any]:
    """llama.cpp's logits of ``gguf_path`` (with the LoRA adapter GGUF ``lora_path`` applied) against the reference."""
    from so8t_core.llama_runtime import LlamaCppModel

    with LlamaCppModel(gguf_path, n_ctx=max(512, len(token_ids) + 8), n_threads=n_threads,
                       lora_path=lora_path) as model:
        logits = model.logits(list(token_ids))
    if logits.shape != reference_logits.shape:  # another vocabulary: not converted from this checkpoint
        raise ValidationError(gguf_path, f"llama.cpp gives {logits.shape[-1]} logits per token, the reference "
                                         f"{reference_logits.shape[-1]}", "pass the checkpoint it was converted from "
                                                                          "as --reference")
    agreement = logit_agreement(reference_logits, logits)
    ok = agreement["mean_kld"] <= gate.max_mean_kld and agreement["top1_agreement"] >= gate.min_top1
    return {"ok": ok, **agreement, "bounds": {"max_mean_kld": gate.max_mean_kld, "min_top1": gate.min_top1}}


def summarize(quant: str, readback: dict, tensor_errors: dict, functional: dict | None,
              tokenizer: dict | None = None, adapter: dict | None = None,
              tokenizer_may_differ: bool = False) -> dict[str, Any]:
    """The report of one file: every check, and the names of those that failed.
    ``tokenizer_may_differ`` (--allow-tokenizer-mismatch): a tokenizer difference is reported
    (``tokenizer.allowed``), not counted as a failure."""
    if tokenizer is not None and tokenizer_may_differ and not tokenizer["ok"]:
        tokenizer = {**tokenizer, "allowed": True}
    checks = {"readback": readback, "tensor_errors": tensor_errors}
    if adapter is not None:
        checks["adapter"] = adapter
    if functional is not None:
        checks["llama_cpp"] = functional
    if tokenizer is not None:
        checks["tokenizer"] = tokenizer
    failures = [name for name, c in checks.items() if not c["ok"] and not c.get("allowed")]
    return {"quant": quant, "passed": not failures, "failures": failures, **checks}


QUANT_BY_FILE_TYPE = {int(q.file_type): q for q in QUANT_TYPES.values()}


def validate_file(gguf_path: str, ckpt: Checkpoint, n_threads: int | None = None,
                  lora: tuple[str, LoraAdapter] | None = None) -> dict[str, Any]:
    """Validate any GGUF against the checkpoint it claims to come from, independently of a run.

    Every planned tensor is re-materialized from the checkpoint (baked, permuted) and
    compared with the file's dequantized tensor; the logits check runs as in a conversion.
    ``lora``: (adapter GGUF, the PEFT adapter it was made from): the adapter file is read back
    against the PEFT pairs in the baked model's space, and llama.cpp runs the model with it
    against the reference with the PEFT adapter merged.
    """
    shards = [read_gguf(p) for p in split_paths(gguf_path)]
    g = shards[0]
    tensors = [t for shard in shards for t in shard.tensors]
    quant = QUANT_BY_FILE_TYPE.get(g.value("general.file_type"))
    if quant is None:
        raise ValidationError(gguf_path, f"general.file_type {g.value('general.file_type')!r} is not a type this "
                                         "validator knows", f"known: {', '.join(QUANT_TYPES)}")
    gate = GATES[quant.name]
    check_converted_from(g, ckpt)
    spec, _, plan = checkpoint_model(ckpt)
    problems: list[str] = []
    if g.value("general.architecture") != spec.arch:
        problems.append(f"general.architecture is {g.value('general.architecture')!r}, expected {spec.arch!r}")
    errors: dict[str, float] = {}
    for i, t in pair_tensors(tensors, [(p.gguf_name, p.shape) for p in plan], problems,
                             lambda i: SUPPORTED_TENSOR_TYPES):
        source, _ = materialize(plan[i], ckpt.read, ckpt.uri)
        errors[plan[i].gguf_name] = tensor_error_stats(source, g.dequantized(t))["relative_rmse"]
    readback = {"ok": not problems, "tensors": len(tensors), "files": len(shards),
                "metadata_keys": len(g.reader.fields) - 3, "problems": problems[:20]}
    from so8t_core.validate.reference import So8tReference

    lora_path, adapter = lora if lora is not None else (None, None)
    adapter_check = None
    if lora is not None:
        from so8t_core.assemble.lora_gguf import check_adapter_file

        adapter_check = check_adapter_file(read_gguf(lora_path), adapter, ckpt, plan, spec.arch,
                                           g.value(Keys.SOURCE_FINGERPRINT))
    ids = validation_token_ids(ckpt)
    functional = check_functional(gguf_path, So8tReference(ckpt, adapter=adapter).logits(ids), ids, gate, n_threads,
                                  lora_path=lora_path)
    return summarize(quant.name, readback, check_tensor_errors(errors, gate) if errors else
                     {"ok": False, "max_relative_rmse": float("nan"), "worst_tensor": None, "bound":
                      gate.max_relative_rmse, "over_bound": []}, functional,
                     check_tokenizer_parity(gguf_path, ckpt, n_threads), adapter_check)


def check_converted_from(g: GGUFContents, ckpt: Checkpoint) -> None:
    """A GGUF so8t-gguf wrote records the fingerprint of the checkpoint it was converted from:
    another checkpoint as the reference is a one-line error, before anything is compared."""
    from so8t_core.source.fingerprint import fingerprint
    from so8t_core.storage import default_cache_dir, redact_uri

    recorded = g.value(Keys.SOURCE_FINGERPRINT)
    if not isinstance(recorded, str) or not recorded:
        return  # not ours: the checks themselves will tell
    actual = fingerprint(ckpt, cache_dir=default_cache_dir()).fingerprint
    if actual != recorded:
        raise ValidationError(g.path, f"converted from checkpoint {recorded[:16]}…, not from {redact_uri(ckpt.uri)} "
                                      f"({actual[:16]}…)", "pass the checkpoint it was converted from as --reference")


def render_validation(report: Mapping[str, Any], gguf: str, lora: str | None = None) -> str:
    """``validate_file``'s report as the CLI prints it (``gguf``, ``lora``: the files as the user named them)."""
    f = report.get("llama_cpp", {})
    rb, te = report["readback"], report["tensor_errors"]
    lines = [f"{gguf}: {report['quant']}",
             f"  read-back      {'ok' if rb['ok'] else 'FAILED'} ({rb['tensors']} tensors)",
             f"  tensor errors  max relative RMSE {te['max_relative_rmse']:.3g} ({te['worst_tensor']}), "
             f"{'ok' if te['ok'] else 'FAILED'}",
             f"  llama.cpp      mean KLD {f['mean_kld']:.3g}, top-1 {100 * f['top1_agreement']:.2f}% "
             f"over {f['n_tokens']} tokens, {'ok' if f['ok'] else 'FAILED'}"]
    if "adapter" in report:
        a = report["adapter"]
        lines.append(f"  LoRA adapter   {lora}: {a['pairs']} pairs, max |difference| from the PEFT pairs "
                     f"{a['max_abs_diff']:.3g}, {'ok' if a['ok'] else 'FAILED'}")
        lines += [f"  problem: {p}" for p in a["problems"]]
    if "tokenizer" in report:
        t = report["tokenizer"]
        where = "" if t["ok"] else f", first difference at token {t['first_mismatch']}"
        lines.append(f"  tokenizer      {t['n_tokens']} tokens, {'identical ids' if t['ok'] else 'DIFFERENT'}{where}")
    lines += [f"  problem: {p}" for p in rb["problems"]]
    lines.append("passed" if report["passed"] else "FAILED: " + ", ".join(report["failures"]))
    return "\n".join(lines)
