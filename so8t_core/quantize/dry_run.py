"""``convert --dry-run``: each tensor's type and the file's size per mix, without quantizing or
writing anything (as llama-quantize's ``--dry-run`` prints them). A target mix (--target-bpw,
--target-size) cannot be known without measuring: its tensors are quantized in memory, and only the damage
cache is written."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from gguf import GGMLQuantizationType

from so8t_core.constants import bits_per_weight
from so8t_core.gguf_file import tensor_nbytes


def dry_run_report(plan: Sequence, types: dict[str, Sequence[GGMLQuantizationType]],
                   notes: dict[str, str] | None = None, file_bytes: dict[str, int] | None = None) -> dict:
    """Per quant: every tensor (name, shape, type, bytes), the tensors' bytes and bits per weight,
    the file's size where it is known (``file_bytes``), and what the report cannot know (``notes``)."""
    out = {}
    for quant, qtypes in types.items():
        tensors = []
        for p, t in zip(plan, qtypes, strict=True):
            tensors.append({"name": p.gguf_name, "shape": list(p.shape), "type": t.name,
                            "bytes": tensor_nbytes(tuple(p.shape), t)})
        nbytes = sum(t["bytes"] for t in tensors)
        n = sum(math.prod(t["shape"]) for t in tensors)
        out[quant] = {"tensors": tensors, "tensor_bytes": nbytes, "bits_per_weight": bits_per_weight(nbytes, n)}
        if file_bytes and quant in file_bytes:
            out[quant]["file_bytes"] = file_bytes[quant]
        if notes and notes.get(quant):
            out[quant]["note"] = notes[quant]
    return out


def render_dry_run(report: dict) -> str:
    lines = []
    for quant, r in report.items():
        lines.append(f"{quant}:")
        width = max(len(t["name"]) for t in r["tensors"])
        for t in r["tensors"]:
            shape = "x".join(str(d) for d in t["shape"])
            lines.append(f"  {t['name']:<{width}}  {shape:>12}  {t['type']:<7} {t['bytes'] / 2**20:10.3f} MiB")
        file = (f"the file {r['file_bytes']:,} bytes ({r['file_bytes'] / 2**20:.2f} MiB)" if "file_bytes" in r
                else "the file adds its metadata")
        lines.append(f"  {quant}: {len(r['tensors'])} tensors, {r['tensor_bytes'] / 2**20:.2f} MiB of tensor data, "
                     f"{r['bits_per_weight']:.2f} bits per weight; {file}")
        if r.get("note"):
            lines.append(f"  {quant}: {r['note']}")
    return "\n".join(lines)


def target_dry_run(ckpt, plan: Sequence, model, bpw: float = 0.0, size: int = 0, f32_file_size: int = 0,
                   imatrix=None, cache_dir: str | None = None,
                   gains: dict[str, float] | None = None) -> dict[str, tuple[str, list[GGMLQuantizationType]]]:
    """Release label → (the mix it is written as, each tensor's type) of --target-bpw and --target-size (0: not asked;
    ``f32_file_size``: the run's F32 file's, assemble.model.model_file_size), as the run would
    choose them: every planned tensor baked in memory (nothing staged or written but the damage
    cache, which the run shares) and measured in each candidate type (``model``:
    mixes.ModelShape; ``imatrix``: an Imatrix; ``gains``: the class gains the run measured,
    validate/gains.py)."""
    from so8t_core.plan import materialize
    from so8t_core.quantize import target

    tensors = []
    for item in plan:
        data, _ = materialize(item, ckpt, ckpt.uri)
        importance = target.measured_importance(imatrix, item.gguf_name, tuple(item.shape))  # as the run's
        tensors.append(target.measure_tensor(item.gguf_name, np.ascontiguousarray(data, np.float32), importance,
                                             cache_dir))
    if gains:
        tensors = target.with_gains(tensors, gains)
    shapes = [(p.gguf_name, p.shape) for p in plan]
    return {label: target.recipe_mix_types(shapes, tensors, target.allocate(tensors, budget), model,
                                           imatrix is not None)
            for label, _, budget in target.target_budgets(tensors, bpw, size, f32_file_size)}
