"""``so8t-gguf inspect``: what is in a GGUF file, including its SO8T provenance."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gguf import LlamaFileType

from so8t_core.constants import QUANT_TYPES, Keys, bits_per_weight
from so8t_core.gguf_file import read_gguf

FILE_TYPE_KEY = "general.file_type"

ARRAY_PREVIEW = 8


def _preview(value: Any) -> Any:
    if isinstance(value, list) and len(value) > ARRAY_PREVIEW:
        return {"length": len(value), "first": value[:ARRAY_PREVIEW]}
    if isinstance(value, str) and len(value) > 400:
        return value[:400] + f"… ({len(value)} characters)"
    return value


def inspect_gguf(path: str) -> dict[str, Any]:
    g = read_gguf(path)
    meta = g.metadata
    tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": list(g.numpy_shape(t)),
                "elements": int(t.n_elements), "bytes": int(t.n_bytes)} for t in g.tensors]
    so8t = {k: meta[k] for k in meta if k.startswith("so8t.")}
    n_elem = sum(t["elements"] for t in tensors)
    n_bytes = sum(t["bytes"] for t in tensors)
    return {
        "path": path,
        "version": int(g.reader.fields["GGUF.version"].contents()),
        "architecture": meta.get("general.architecture"),
        "file_type": file_type(meta.get(FILE_TYPE_KEY)),
        "metadata": {k: _preview(v) for k, v in meta.items()},
        "tensors": tensors,
        "tensor_types": type_counts((t["type"], t["elements"], t["bytes"]) for t in tensors),
        "n_tensors": len(tensors),
        "n_elements": n_elem,
        "bits_per_weight": bits_per_weight(n_bytes, n_elem),
        "so8t": {
            "gated_layers": so8t.get(Keys.BAKED_LAYERS, []),
            "rotation": so8t.get(Keys.ROTATION),
            "position": so8t.get(Keys.POSITION),
            "max_bake_error": so8t.get(Keys.MAX_BAKE_ERROR),
            "source_fingerprint": so8t.get(Keys.SOURCE_FINGERPRINT),
            "triality_heads": so8t.get(Keys.TRIALITY_HEADS, so8t.get(Keys.HEADS_NAMES, [])),
            "keys": {k: _preview(v) for k, v in so8t.items()},
        },
    }


def type_counts(tensors: Iterable[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """Per ggml type, from each tensor's (type name, elements, bytes): its tensors, parameters,
    bytes and bits per weight, most bytes first (``inspect``'s table, the model card's mix)."""
    by_type: dict[str, dict[str, Any]] = {}
    for ggml_type, elements, nbytes in tensors:
        row = by_type.setdefault(ggml_type, {"type": ggml_type, "tensors": 0, "elements": 0, "bytes": 0})
        row["tensors"] += 1
        row["elements"] += int(elements)
        row["bytes"] += int(nbytes)
    for row in by_type.values():
        row["bits_per_weight"] = bits_per_weight(row["bytes"], row["elements"])
    return sorted(by_type.values(), key=lambda r: (-r["bytes"], r["type"]))


def file_type(value: Any) -> dict[str, Any] | None:
    """``general.file_type`` named: llama.cpp's name for it and the --quant mix that writes it."""
    if not isinstance(value, int):
        return None
    try:
        name = LlamaFileType(value).name
    except ValueError:
        name = "unknown"
    mix = next((q.name for q in QUANT_TYPES.values() if int(q.file_type) == value), None)
    return {"value": value, "name": name, "mix": mix}


def _shown(value: Any) -> str:
    """A metadata value on one line: text with line breaks (a chat template) as a quoted string."""
    if isinstance(value, str) and any(c in value for c in "\r\n\t"):
        return repr(value)
    return str(value)


def render_inspection(r: dict[str, Any]) -> str:
    ft = r.get("file_type")
    kind = f", file type {ft['name']}" + (f" (the {ft['mix']} mix)" if ft["mix"] else "") if ft else ""
    lines = [f"{r['path']}: GGUF v{r['version']}, architecture '{r['architecture']}'{kind}, {r['n_tensors']} tensors, "
             f"{r['n_elements']:,} parameters, {r['bits_per_weight']:.2f} bits per weight", "", "metadata:"]
    for k, v in r["metadata"].items():
        if k == FILE_TYPE_KEY and ft:
            lines.append(f"  {k} = {v} ({ft['name']})")
        elif not k.startswith("so8t."):
            lines.append(f"  {k} = {_shown(v)}")
    s = r["so8t"]
    lines += ["", "SO8T provenance:"]
    if s["keys"]:
        summary = [("gated layers", s["gated_layers"] or None),
                   ("rotation", s["rotation"] and f"{s['rotation']} ({s['position']})"),
                   ("max bake error", s["max_bake_error"]), ("triality heads", s["triality_heads"] or None),
                   ("source fingerprint", s["source_fingerprint"])]
        lines += [f"  {what:<19}{value}" for what, value in summary if value is not None]  # what this file has
        for k, v in s["keys"].items():
            lines.append(f"  {k} = {_shown(v)}")
    else:
        lines.append("  none (not written by so8t-gguf)")
    lines += ["", f"{'type':<8}{'tensors':>9}{'parameters':>16}{'bytes':>16}{'bits/weight':>13}"]
    for row in r["tensor_types"]:
        lines.append(f"{row['type']:<8}{row['tensors']:>9}{row['elements']:>16,}{row['bytes']:>16,}"
                     f"{row['bits_per_weight']:>13.2f}")
    lines += ["", f"{'tensor':<40}{'type':<8}{'shape':<22}{'bytes':>14}"]
    for t in r["tensors"]:
        lines.append(f"{t['name']:<40}{t['type']:<8}{str(t['shape']):<22}{t['bytes']:>14,}")
    return "\n".join(lines)
