"""``so8t-gguf inspect``: what is in a GGUF file, including its SO8T provenance."""

from __future__ import annotations

from typing import Any

from so8t_core.constants import Keys, bits_per_weight
from so8t_core.gguf_file import read_gguf

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
        "metadata": {k: _preview(v) for k, v in meta.items()},
        "tensors": tensors,
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


def render_inspection(r: dict[str, Any]) -> str:
    lines = [f"{r['path']}: GGUF v{r['version']}, architecture '{r['architecture']}', {r['n_tensors']} tensors, "
             f"{r['n_elements']:,} parameters, {r['bits_per_weight']:.2f} bits per weight", "", "metadata:"]
    for k, v in r["metadata"].items():
        if not k.startswith("so8t."):
            lines.append(f"  {k} = {v}")
    s = r["so8t"]
    lines += ["", "SO8T provenance:"]
    if s["keys"]:
        lines += [f"  gated layers       {s['gated_layers']}",
                  f"  rotation           {s['rotation']} ({s['position']})",
                  f"  max bake error     {s['max_bake_error']}",
                  f"  triality heads     {s['triality_heads']}",
                  f"  source fingerprint {s['source_fingerprint']}"]
        for k, v in s["keys"].items():
            lines.append(f"  {k} = {v}")
    else:
        lines.append("  none (not written by so8t-gguf)")
    lines += ["", f"{'tensor':<40}{'type':<8}{'shape':<22}{'bytes':>14}"]
    for t in r["tensors"]:
        lines.append(f"{t['name']:<40}{t['type']:<8}{str(t['shape']):<22}{t['bytes']:>14,}")
    return "\n".join(lines)
