"""A PEFT LoRA adapter as a llama.cpp LoRA adapter GGUF, in the space of our baked model.

llama.cpp applies an adapter at inference time: for every weight ``W`` with a pair it
computes ``W·x + s · B·(A·x)`` with ``s = adapter.lora.alpha / r × (user scale)``
(``llama_adapter_lora_weight::get_scale``, rank = ``lora_b``'s ne[0]; an alpha of 0 means
s = user scale). The tensors are ``<gguf weight name>.lora_a`` (A, numpy r×in, GGUF ne
[in, r]) and ``.lora_b`` (B, numpy out×r, GGUF ne [r, out]), as ``convert_lora_to_gguf.py``
writes them and ``llama_adapter_lora_init_impl`` checks them.

The base GGUF is not the checkpoint: our conversion permutes Q/K rows for llama's RoPE and
folds each SO(8) gate into ``o_proj``. Both are linear maps of W, so the adapter follows
them exactly: with the gate before o_proj, ``W' = W·Rᵀ``, so ``ΔW' = B·(A·Rᵀ)`` and A is
rotated; after it, ``W' = Rᵀ·W``, so B is; a permuted weight's B gets the same row
permutation. Fused weights (Phi-3's qkv_proj, gate_up_proj) are copied as they are, and
so are their pairs. PEFT's scale (``lora_alpha / r``, rsLoRA ``lora_alpha / sqrt(r)``) is
written as ``adapter.lora.alpha = scale · r``, so llama.cpp's alpha/r gives it back.

Tensors are F32: they are small (r·(in+out) per weight), every llama.cpp backend takes F32
for both matrix products, and F32 keeps the rotated A/B exactly what the merged F32 model
has, so the adapter and ``convert --lora`` can be compared to float rounding.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Mapping, Sequence

import gguf
import numpy as np
from gguf import Keys as K

from so8t_core import storage
from so8t_core.analysis import checkpoint_model
from so8t_core.constants import CONVERTER, Keys
from so8t_core.errors import UnsupportedError, ValidationError
from so8t_core.gguf_file import (
    GGUFKV,
    GGUFContents,
    TensorInfo,
    kv_array,
    kv_f32,
    kv_str,
    kv_u32,
    pair_tensors,
    write_gguf,
)
from so8t_core.plan import TensorPlan, permute_qk
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.fingerprint import fingerprint
from so8t_core.source.lora import LoraAdapter, load_adapter
from so8t_core.source.rotation import checked_rotation, fold_into_linear
from so8t_core.storage import default_cache_dir

ADAPTER_TENSOR_TYPE = gguf.GGMLQuantizationType.F32
SUFFIX_A, SUFFIX_B = ".lora_a", ".lora_b"
# llama.cpp applies a token_embd pair to looked-up rows, with A and B swapped and B transposed
# (llm_graph_context::build_inp_embd); PEFT saves embedding LoRA as lora_embedding_A/B, which
# load_adapter refuses, so a Linear-style pair on the embedding is not made into an adapter.
NOT_ADAPTABLE = ("token_embd.weight",)


def bind_adapter(adapter: LoraAdapter, plan: Sequence[TensorPlan], where: str) -> list[TensorPlan]:
    """The plan items the adapter's pairs land on, in the plan's (llama.cpp's) order.

    Refuses, in one line: pairs that target nothing or weights the base does not have, shape
    mismatches, non-Linear targets (all from :meth:`LoraAdapter.bind`), targets llama.cpp
    cannot take a LoRA on, and a zero scale (llama.cpp reads an alpha of 0 as "scale 1")."""
    bound = adapter.bind(plan, where)
    items = [p for p in plan if p.source in bound]
    refused = [p for p in items if p.gguf_name in NOT_ADAPTABLE]
    if refused:
        raise UnsupportedError(adapter.uri, f"a LoRA pair on {refused[0].source!r} ({refused[0].gguf_name}) cannot "
                                            "go into a llama.cpp adapter GGUF",
                               "merge it instead: so8t-gguf convert --lora")
    if adapter.scale == 0:
        raise UnsupportedError(adapter.uri, "lora_alpha is 0, so the adapter changes nothing (and llama.cpp reads "
                                            "an adapter.lora.alpha of 0 as scale 1)", "use the base model alone")
    return items


def baked_pair(adapter: LoraAdapter, item: TensorPlan, ckpt: Checkpoint) -> tuple[np.ndarray, np.ndarray]:
    """(A', B') float32 for ``item``: the PEFT pair after the item's transform (no scale applied)."""
    a, b = adapter.pair_arrays(item.source)
    if item.transform in ("permute_q", "permute_k"):
        b = permute_qk(b, item.n_heads)
    elif item.transform == "bake_o_proj":
        r = checked_rotation(ckpt.read(item.gate), item.rotation, ckpt.uri, item.gate)
        if item.position == "pre_o_proj":  # ΔW·Rᵀ = B·(A·Rᵀ)
            a, _ = fold_into_linear(a, None, r, item.position)
        else:  # Rᵀ·ΔW = (Rᵀ·B)·A
            b, _ = fold_into_linear(b, None, r, item.position)
    elif item.transform != "copy":
        raise AssertionError(f"{item.gguf_name}: no adapter for transform {item.transform}")
    return np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)


def gguf_alpha(adapter: LoraAdapter) -> float:
    """adapter.lora.alpha such that llama.cpp's alpha / r is PEFT's scale (LoRA or rsLoRA)."""
    return adapter.scale * adapter.r


def adapter_kvs(arch: str, name: str, adapter: LoraAdapter, base_fingerprint: str,
                items: Sequence[TensorPlan]) -> list[GGUFKV]:
    """Every key of the adapter GGUF: what llama.cpp reads, then our so8t.* provenance."""
    summary = adapter.summary([p.source for p in items])
    return [kv_str(K.General.ARCHITECTURE, arch),
            kv_str(K.General.TYPE, gguf.GGUFType.ADAPTER),
            kv_str(K.General.NAME, name),
            kv_str(K.Adapter.TYPE, "lora"),
            kv_f32(K.Adapter.LORA_ALPHA, gguf_alpha(adapter)),
            kv_str(Keys.SOURCE_FINGERPRINT, base_fingerprint),
            kv_str(Keys.LORA_SHA256, adapter.sha256),
            kv_u32(Keys.LORA_RANK, adapter.r),
            kv_f32(Keys.LORA_ALPHA, adapter.alpha),
            kv_str(Keys.LORA_SCALING, "rslora" if adapter.use_rslora else "lora"),
            kv_array(Keys.LORA_TARGET_MODULES, summary["effective_target_modules"], gguf.GGUFValueType.STRING),
            kv_str(Keys.CONVERTER, CONVERTER)]


def adapter_tensor_infos(adapter: LoraAdapter, items: Sequence[TensorPlan]) -> list[TensorInfo]:
    out = []
    for item in items:
        out_f, in_f = item.shape
        out += [TensorInfo(item.gguf_name + SUFFIX_A, (adapter.r, in_f), ADAPTER_TENSOR_TYPE, adapter.r * in_f * 4),
                TensorInfo(item.gguf_name + SUFFIX_B, (out_f, adapter.r), ADAPTER_TENSOR_TYPE, out_f * adapter.r * 4)]
    return out


class _PairSource:
    """Tensor bytes for write_gguf: one pair computed at a time (A and B are written in a row)."""

    def __init__(self, adapter: LoraAdapter, items: Sequence[TensorPlan], ckpt: Checkpoint):
        self.adapter, self.ckpt = adapter, ckpt
        self.items = {p.gguf_name: p for p in items}
        self._current: tuple[str, tuple[np.ndarray, np.ndarray]] | None = None

    def arrays(self, gguf_name: str) -> tuple[np.ndarray, np.ndarray]:
        if self._current is None or self._current[0] != gguf_name:
            self._current = (gguf_name, baked_pair(self.adapter, self.items[gguf_name], self.ckpt))
        return self._current[1]

    def tensor_bytes(self, t: TensorInfo) -> bytes:
        base, side = t.name.rsplit(".", 1)
        a, b = self.arrays(base)
        return (a if "." + side == SUFFIX_A else b).tobytes()


def write_lora_gguf(adapter_uri: str, base_uri: str, output: str) -> dict[str, Any]:
    """Write the llama.cpp LoRA adapter GGUF of a PEFT adapter for the model converted from ``base_uri``."""
    output = storage.local_output_file(output, ".gguf", "the adapter GGUF")
    adapter = load_adapter(adapter_uri)
    ckpt = Checkpoint.open(base_uri, cache_dir=default_cache_dir())
    spec, _, plan = checkpoint_model(ckpt)
    items = bind_adapter(adapter, plan, ckpt.uri)
    base_fingerprint = fingerprint(ckpt, cache_dir=default_cache_dir()).fingerprint
    name = os.path.basename(adapter.uri.rstrip("/")) or "lora"
    infos = adapter_tensor_infos(adapter, items)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    write_gguf(output, spec.arch, adapter_kvs(spec.arch, name, adapter, base_fingerprint, items), infos,
               _PairSource(adapter, items, ckpt).tensor_bytes)
    summary = adapter.summary([p.source for p in items])
    return {"output": output, "sha256": storage.sha256_of(output), "size": os.path.getsize(output),
            "arch": spec.arch, "tensors": len(infos), "base_fingerprint": base_fingerprint,
            "gguf_lora_alpha": gguf_alpha(adapter),
            "transforms": dict(sorted(Counter(p.transform for p in items).items())),
            "adapter_uri": storage.redact_uri(adapter.uri), "adapter_sha256": adapter.sha256,
            **{k: summary[k] for k in ("r", "lora_alpha", "use_rslora", "scale", "scaling",
                                       "effective_target_modules", "merged_tensors")}}


def check_adapter_file(g: GGUFContents, adapter: LoraAdapter, ckpt: Checkpoint, plan: Sequence[TensorPlan],
                       arch: str, base_fingerprint: str | None) -> dict[str, Any]:
    """Read-back of an adapter GGUF: its keys, and every tensor equal to the PEFT pair after the
    base's transform (F32: exactly). ``base_fingerprint``: the base GGUF's so8t.source_fingerprint."""
    if g.value(K.General.TYPE) != gguf.GGUFType.ADAPTER or g.value(K.Adapter.TYPE) != "lora":
        raise ValidationError(g.path, f"not a LoRA adapter GGUF (general.type {g.value(K.General.TYPE)!r}, "
                                      f"adapter.type {g.value(K.Adapter.TYPE)!r})",
                              "pass the file so8t-gguf lora-gguf wrote")
    problems: list[str] = []
    items = bind_adapter(adapter, plan, ckpt.uri)
    want = {kv.key: kv.value for kv in adapter_kvs(arch, "", adapter, base_fingerprint or "", items)}
    for key in (K.General.ARCHITECTURE, K.General.TYPE, K.Adapter.TYPE, Keys.LORA_SHA256):
        if g.value(key) != want[key]:
            problems.append(f"{key} is {g.value(key)!r}, expected {want[key]!r}")
    if g.value(K.Adapter.LORA_ALPHA) != np.float32(gguf_alpha(adapter)):
        problems.append(f"{K.Adapter.LORA_ALPHA} is {g.value(K.Adapter.LORA_ALPHA)!r}, expected "
                        f"{float(np.float32(gguf_alpha(adapter)))!r} (scale × r)")
    if base_fingerprint is not None and g.value(Keys.SOURCE_FINGERPRINT) != base_fingerprint:
        problems.append(f"{Keys.SOURCE_FINGERPRINT} {str(g.value(Keys.SOURCE_FINGERPRINT))[:16]}… is not the base "
                        f"model's {base_fingerprint[:16]}… (an adapter made for another base)")
    expected = adapter_tensor_infos(adapter, items)
    source = _PairSource(adapter, items, ckpt)
    max_abs = 0.0
    for i, t in pair_tensors(g.tensors, [(info.name, info.shape) for info in expected], problems,
                             lambda i: [ADAPTER_TENSOR_TYPE]):
        info = expected[i]
        want_arr = np.frombuffer(source.tensor_bytes(info), dtype=np.float32).reshape(info.shape)
        diff = float(np.abs(g.dequantized(t) - want_arr).max())
        max_abs = max(max_abs, diff)
        if diff != 0.0:
            problems.append(f"{info.name}: differs from the adapter's pair by up to {diff:.3g}")
    return {"ok": not problems, "tensors": len(g.tensors), "pairs": len(items), "max_abs_diff": max_abs,
            "sha256": adapter.sha256, "problems": problems[:20]}


def render_lora_gguf(result: Mapping[str, Any]) -> str:
    """``write_lora_gguf``'s result as the CLI prints it."""
    return "\n".join([
        f"wrote {result['output']} ({result['size']:,} bytes, sha256 {result['sha256'][:16]}...)",
        f"  adapter      r={result['r']}, lora_alpha={result['lora_alpha']:g}, scale {result['scale']:.4g} "
        f"({result['scaling']}) -> adapter.lora.alpha {result['gguf_lora_alpha']:g}",
        f"  tensors      {result['tensors']} ({len(result['merged_tensors'])} pairs on "
        f"{', '.join(result['effective_target_modules'])}; "
        + ", ".join(f"{n} {t}" for t, n in result["transforms"].items()) + ")",
        f"  base         {result['arch']}, fingerprint {result['base_fingerprint'][:16]}",
        f"run: llama-cli -m BASE.gguf --lora {result['output']}"])
