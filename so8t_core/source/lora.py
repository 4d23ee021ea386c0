"""PEFT LoRA adapters, merged into the base weights before the SO8T bake.

An adapter folder (local or any fsspec URI) holds ``adapter_config.json`` and
``adapter_model.safetensors`` with tensors named like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (A: r×in, B: out×r).
Merging gives ``W' = W + scale · B @ A`` with ``scale = lora_alpha / r`` (rsLoRA:
``lora_alpha / sqrt(r)``), computed in float32 per row chunk of W (rows of B), so memory
stays bounded; the merged rows then go through the permutation or the bake like any others.

Only plain LoRA on Linear weights is merged. DoRA, trained biases, ``modules_to_save``,
embedding LoRA, per-module rank/alpha patterns and fan-in-fan-out (Conv1D) adapters are
refused with a reason, and so is an adapter whose pairs do not all fit a weight of the base model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from so8t_core import storage
from so8t_core.errors import CheckpointError, UnsupportedError
from so8t_core.source.checkpoint import refuse_links_outside
from so8t_core.source.safetensors_format import TensorSlice, decode_float, header_length, parse_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Transforms of planned tensors that a merged delta passes through unchanged in meaning.
MERGEABLE_TRANSFORMS = ("copy", "permute_q", "permute_k", "bake_o_proj")
# PEFT wrapper prefixes of saved adapter keys (the base model's own names follow).
PREFIXES = ("base_model.model.", "base_model.")
PAIR_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


@dataclass
class LoraPair:
    module: str  # base module name, e.g. model.layers.0.self_attn.q_proj
    a: TensorSlice
    b: TensorSlice
    sha256: str = ""  # of A's bytes, B's bytes and the scale: what the merged tensor depends on

    @property
    def weight(self) -> str:
        return self.module + ".weight"


@dataclass
class LoraAdapter:
    uri: str
    config: dict[str, Any]
    sha256: str  # of adapter_config.json and adapter_model.safetensors
    r: int
    alpha: float
    use_rslora: bool
    scale: float
    pairs: dict[str, LoraPair]  # by base weight name
    weights_uri: str
    _a_cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    # --- reading ----------------------------------------------------------------------

    def _read(self, t: TensorSlice, start: int | None = None, stop: int | None = None) -> np.ndarray:
        shape = t.shape
        lo, hi = t.start, t.end
        if start is not None:
            row = t.nbytes // t.shape[0]
            lo, hi = t.start + start * row, t.start + stop * row
            shape = (stop - start, *t.shape[1:])
        arr = decode_float(storage.read_bytes(self.weights_uri, lo, hi), t.dtype, shape,
                           f"{self.weights_uri}: tensor {t.name!r}")
        if not np.isfinite(arr).all():
            raise CheckpointError(self.weights_uri, f"tensor {t.name!r} has NaN/Inf values",
                                  "the adapter is corrupt or training diverged")
        return arr

    def pair_arrays(self, weight: str) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) of the pair on ``weight``, float32, as saved (A: r×in, B: out×r; unscaled)."""
        pair = self.pairs[weight]
        return self._read(pair.a), self._read(pair.b)

    def delta_rows(self, weight: str, start: int, stop: int) -> np.ndarray:
        """``scale · B[start:stop] @ A`` in float32: the change of rows start:stop of ``weight``."""
        pair = self.pairs[weight]
        a = self._a_cache.get(weight)
        if a is None:
            a = self._a_cache[weight] = self._read(pair.a)
        b = self._read(pair.b, start, stop)
        return (b @ a) * np.float32(self.scale)

    def delta(self, weight: str) -> np.ndarray:
        pair = self.pairs[weight]
        return self.delta_rows(weight, 0, pair.b.shape[0])

    # --- the base model ---------------------------------------------------------------

    def bind(self, plan: Sequence, where: str) -> dict[str, str]:
        """Check every pair against the planned tensors; ``{base weight: pair sha256}``.

        An adapter none of whose pairs names a weight of the model is an error, and so is
        one with some pairs that fit nothing (it was trained on another model)."""
        by_source = {p.source: p for p in plan}
        unmatched = [w for w in self.pairs if w not in by_source]
        if len(unmatched) == len(self.pairs):
            raise CheckpointError(self.uri, f"the adapter's {len(self.pairs)} LoRA pairs (e.g. on "
                                            f"{unmatched[0]!r}) target no weight of {where}",
                                  "the adapter was trained on another model, or its target_modules match nothing")
        if unmatched:
            raise CheckpointError(self.uri, f"{len(unmatched)} of the adapter's LoRA pairs target weights that "
                                            f"{where} does not have (e.g. {unmatched[0]!r})",
                                  "the adapter was trained on another model")
        out = {}
        for weight, pair in self.pairs.items():
            item = by_source[weight]
            if item.transform not in MERGEABLE_TRANSFORMS or len(item.shape) != 2:
                raise UnsupportedError(self.uri, f"LoRA on {weight!r} ({item.transform}, {len(item.shape)}-D) "
                                                 "cannot be merged", "only Linear weights of the base model merge")
            out_f, in_f = item.shape
            if pair.a.shape[1] != in_f or pair.b.shape[0] != out_f:
                raise CheckpointError(self.uri, f"LoRA pair on {weight!r} is {pair.b.shape[0]}×{pair.a.shape[1]} "
                                                f"but the weight is {out_f}×{in_f}",
                                      "the adapter was trained on another model")
            out[weight] = pair.sha256
        return out

    def summary(self, targets: Sequence[str] | None = None) -> dict[str, Any]:
        """What the manifest, the analysis and the model card say about the adapter: its content
        (sha256, the configuration), never where it lay."""
        weights = sorted(self.pairs if targets is None else targets)
        modules = sorted({w.rsplit(".", 2)[-2] for w in weights})
        return {"sha256": self.sha256, "r": self.r, "lora_alpha": self.alpha,
                "use_rslora": self.use_rslora, "scale": self.scale,
                "scaling": "rslora: lora_alpha / sqrt(r)" if self.use_rslora else "lora: lora_alpha / r",
                "target_modules_config": self.config.get("target_modules"),
                "effective_target_modules": modules, "merged_tensors": weights,
                "base_model_name_or_path": _hub_id(self.config.get("base_model_name_or_path"))}


def _hub_id(base: Any) -> str | None:
    """The adapter config's base model when it is a Hub id ("org/name"); None for a local path
    (PEFT writes the folder the base was loaded from), which a release must not carry."""
    if not isinstance(base, str) or not base or base.startswith(("/", "~", ".", "\\")) or ":" in base:
        return None
    return base


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _refuse(uri: str, what: str, hint: str = "merge it with PEFT (merge_and_unload) and convert the merged "
                                               "checkpoint") -> UnsupportedError:
    return UnsupportedError(uri, what, hint)


def load_adapter(uri: str) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter folder; its tensors stay on storage until merged."""
    uri = uri.rstrip("/") if "://" in uri else storage.local_path(uri)
    cfg_uri, weights_uri = storage.join(uri, ADAPTER_CONFIG), storage.join(uri, ADAPTER_WEIGHTS)
    if not storage.exists(uri):
        raise CheckpointError(uri, "no such adapter folder", "pass the folder PEFT's save_pretrained wrote")
    if not storage.exists(cfg_uri):
        raise CheckpointError(cfg_uri, "missing adapter_config.json", "pass the folder PEFT's save_pretrained wrote")
    if not storage.exists(weights_uri):
        bin_hint = " (adapter_model.bin is not read: re-save with safe_serialization=True)" \
            if storage.exists(storage.join(uri, "adapter_model.bin")) else ""
        raise CheckpointError(weights_uri, "missing adapter_model.safetensors" + bin_hint,
                              "pass the folder PEFT's save_pretrained wrote")
    if storage.is_local(uri):
        refuse_links_outside(uri, [ADAPTER_CONFIG, ADAPTER_WEIGHTS], "adapter")
    cfg_bytes = storage.read_bytes(cfg_uri)
    try:
        cfg = json.loads(cfg_bytes)
    except ValueError as exc:
        raise CheckpointError(cfg_uri, f"not valid JSON ({exc})", "fix or re-save adapter_config.json") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(cfg_uri, "must be a JSON object", "")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _refuse(cfg_uri, f"peft_type {peft_type} is not LoRA", "only LoRA and rsLoRA adapters merge")
    if cfg.get("use_dora"):
        raise _refuse(cfg_uri, "DoRA adapters (use_dora) are not supported: their magnitude vector rescales "
                               "whole columns")
    if cfg.get("bias", "none") not in (None, "none") or cfg.get("lora_bias"):
        raise _refuse(cfg_uri, f"adapters that train biases (bias={cfg.get('bias')!r}, "
                               f"lora_bias={cfg.get('lora_bias')!r}) are not supported")
    if cfg.get("modules_to_save"):
        raise _refuse(cfg_uri, f"modules_to_save {cfg['modules_to_save']} replace whole modules; not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise _refuse(cfg_uri, f"per-module {key} is not supported")
    if cfg.get("target_parameters"):
        raise _refuse(cfg_uri, "LoRA on parameters (target_parameters) is not supported")
    if cfg.get("fan_in_fan_out"):
        raise _refuse(cfg_uri, "fan_in_fan_out (Conv1D, GPT-2 style) adapters are not supported",
                      "the supported architectures use Linear layers: set fan_in_fan_out to false")
    try:
        r = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(cfg_uri, "needs an integer r and a number lora_alpha", "fix adapter_config.json") \
            from None
    if r <= 0 or not math.isfinite(alpha):
        raise CheckpointError(cfg_uri, f"r must be positive and lora_alpha finite (r={r}, lora_alpha={alpha})", "")
    use_rslora = bool(cfg.get("use_rslora", False))
    scale = lora_scale(alpha, r, use_rslora)

    size = storage.size(weights_uri)
    first = storage.read_bytes(weights_uri, 0, min(size, 8))
    n = header_length(first, size, weights_uri)
    header = parse_header(storage.read_bytes(weights_uri, 8, 8 + n), size, weights_uri)
    halves: dict[str, dict[str, TensorSlice]] = {}
    for name, t in header.tensors.items():
        short = name
        for prefix in PREFIXES:
            if short.startswith(prefix):
                short = short[len(prefix):]
                break
        if "lora_embedding_" in short:
            raise _refuse(weights_uri, f"embedding LoRA ({name!r}) is not supported")
        if "lora_magnitude_vector" in short:
            raise _refuse(weights_uri, f"DoRA magnitude vector {name!r}: DoRA adapters are not supported")
        m = PAIR_RE.match(short)
        if m is None:
            if ".lora_" in short:
                raise _refuse(weights_uri, f"tensor {name!r} is not a LoRA A/B weight (trained bias?)")
            raise _refuse(weights_uri, f"tensor {name!r} is not a LoRA weight (modules_to_save or a "
                                       "non-Linear module?)")
        if len(t.shape) != 2:
            raise _refuse(weights_uri, f"tensor {name!r} is {len(t.shape)}-D: LoRA on non-Linear modules "
                                       "(convolutions) is not supported")
        side = halves.setdefault(m["module"], {})
        if m["ab"] in side:
            raise CheckpointError(weights_uri, f"two lora_{m['ab']} tensors for {m['module']!r}",
                                  "save one adapter per folder")
        side[m["ab"]] = t
    if not halves:
        raise CheckpointError(weights_uri, "holds no LoRA weights", "is this a LoRA adapter?")
    pairs: dict[str, LoraPair] = {}
    for module, side in halves.items():
        if set(side) != {"A", "B"}:
            missing = ({"A", "B"} - set(side)).pop()
            raise CheckpointError(weights_uri, f"{module!r} has no lora_{missing} weight", "the adapter is incomplete")
        a, b = side["A"], side["B"]
        if a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(weights_uri, f"LoRA pair on {module!r} has rank {a.shape[0]}/{b.shape[1]} but "
                                               f"adapter_config.json says r={r}", "the config and weights disagree")
        pairs[module + ".weight"] = LoraPair(module, a, b)
    # Per pair: its bytes and the scale, so changing one pair re-stages one tensor.
    for pair in pairs.values():
        h = hashlib.sha256(f"{scale!r}".encode())
        for t in (pair.a, pair.b):
            h.update(f"|{t.dtype}|{t.shape}|".encode())
            h.update(storage.read_bytes(weights_uri, t.start, t.end))
        pair.sha256 = h.hexdigest()
    whole = hashlib.sha256(hashlib.sha256(cfg_bytes).digest() + storage.sha256_of(weights_uri).encode()).hexdigest()
    return LoraAdapter(uri=uri, config=cfg, sha256=whole, r=r, alpha=alpha, use_rslora=use_rslora, scale=scale,
                       pairs=pairs, weights_uri=weights_uri)


# Per process, for tasks that each need pairs of the adapter the flow checked (its A
# matrices are cached once read).
load_adapter_cached = storage.Pinned(load_adapter, "the LoRA adapter")


class MergedReader:
    """A checkpoint reader whose targeted weights come back with the LoRA delta added (float32)."""

    def __init__(self, reader, adapter: LoraAdapter):
        self.reader, self.adapter = reader, adapter

    def read(self, name: str) -> np.ndarray:
        arr = self.reader.read(name)
        if name in self.adapter.pairs:
            arr = arr.astype(np.float32) + self.adapter.delta(name)
        return arr

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        arr = self.reader.read_rows(name, start, stop)
        if name in self.adapter.pairs:
            arr = arr.astype(np.float32) + self.adapter.delta_rows(name, start, stop)
        return arr


def apply_to_plan(plan: Sequence, adapter: LoraAdapter, where: str) -> list:
    """The plan with each targeted item marked (its transform id then names the pair)."""
    bound = adapter.bind(plan, where)
    return [p.model_copy(update={"lora": bound[p.source]}) if p.source in bound else p for p in plan]
