"""``convert --dry-run``: each tensor's type and the file's size per mix, without quantizing or
writing anything (as llama-quantize's ``--dry-run`` prints them)."""

from __future__ import annotations

import math
from typing import Sequence

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from so8t_core.constants import bits_per_weight


def dry_run_report(plan: Sequence, types: dict[str, Sequence[GGMLQuantizationType]]) -> dict:
    """Per quant: every tensor (name, shape, type, bytes), the tensors' bytes and bits per weight."""
    out = {}
    for quant, qtypes in types.items():
        tensors = []
        for p, t in zip(plan, qtypes, strict=True):
            block, size = GGML_QUANT_SIZES[t]
            tensors.append({"name": p.gguf_name, "shape": list(p.shape), "type": t.name,
                            "bytes": math.prod(p.shape) // block * size})
        nbytes = sum(t["bytes"] for t in tensors)
        n = sum(math.prod(t["shape"]) for t in tensors)
        out[quant] = {"tensors": tensors, "tensor_bytes": nbytes, "bits_per_weight": bits_per_weight(nbytes, n)}
    return out


def render_dry_run(report: dict) -> str:
    lines = []
    for quant, r in report.items():
        lines.append(f"{quant}:")
        width = max(len(t["name"]) for t in r["tensors"])
        for t in r["tensors"]:
            shape = "x".join(str(d) for d in t["shape"])
            lines.append(f"  {t['name']:<{width}}  {shape:>12}  {t['type']:<7} {t['bytes'] / 2**20:10.3f} MiB")
        lines.append(f"  {quant}: {len(r['tensors'])} tensors, {r['tensor_bytes'] / 2**20:.2f} MiB of tensor data, "
                     f"{r['bits_per_weight']:.2f} bits per weight (the file adds its metadata)")
    return "\n".join(lines)
