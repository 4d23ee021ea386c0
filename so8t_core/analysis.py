"""Structure analysis of an SO8T checkpoint: what is there, what it will become.

Reads only headers and the (small) θ tensors: parameter counts by class, the gated
layers with the health of each rotation, the triality heads, and what the PET
regularizer left behind (nothing: it is a training loss).
"""

from __future__ import annotations

from typing import Any

from so8t_core.plan import TensorPlan, build_plan
from so8t_core.source.architectures import EMBEDDING, OTHER, ROTATION, TENSOR_CLASSES, TRIALITY, ModelSpec, model_spec
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.rotation import checked_rotation, gate_rotation
from so8t_core.source.so8t import So8tStructure, find_structure
from so8t_core.source.tokenizer import TEXT_FILES, check_chat_template, check_tokenizer_files
from so8t_core.storage import default_cache_dir

POSITION_WORDS = {"pre_o_proj": "before o_proj", "post_o_proj": "after o_proj"}
PET_NOTE = ("PET regularization is a training loss only (a second-order difference penalty on hidden "
            "states); it has no parameters or buffers, so there is nothing to convert.")


def checkpoint_model(ckpt: Checkpoint) -> tuple[ModelSpec, So8tStructure, list[TensorPlan]]:
    """Spec, SO8T structure and tensor plan: the three things every stage derives from a checkpoint."""
    spec = model_spec(ckpt.config, ckpt.uri)
    structure = find_structure(ckpt.tensors, ckpt.config, spec, ckpt.uri)
    plan = build_plan(ckpt.tensors, spec, structure, ckpt.uri)
    return spec, structure, plan


def preflight(uri: str, lora: str | None = None) -> None:
    """Everything checkable without reading the weights: files, headers, config, plan, gates, that
    a LoRA adapter's pairs fit the model's weights, and that the chat template renders within limits.

    Catches most bad input in about a second, before a pipeline run starts.
    """
    ckpt = Checkpoint.open(uri, cache_dir=default_cache_dir())
    _, structure, plan = checkpoint_model(ckpt)
    if lora:
        from so8t_core.source.lora import load_adapter

        load_adapter(lora).bind(plan, ckpt.uri)
    for gate in structure.gates:
        checked_rotation(ckpt.read(gate.tensor), gate.parameterization, ckpt.uri, gate.tensor)
    files = {n: data for n in TEXT_FILES if (data := ckpt.read_file(n)) is not None}
    check_tokenizer_files(files, ckpt.uri)
    check_chat_template(files, ckpt.uri)  # a template that hangs or escapes the sandbox: refused now


def analyze(ckpt: Checkpoint) -> dict[str, Any]:
    spec, structure, plan = checkpoint_model(ckpt)
    by_source = {p.source: p for p in plan}
    gate_names = {g.tensor for g in structure.gates}
    head_names = structure.triality_tensors | set(structure.classifier_heads)
    stripped = dict(structure.stripped)

    params = dict.fromkeys(TENSOR_CLASSES, 0)
    counts = dict.fromkeys(TENSOR_CLASSES, 0)
    not_converted = []
    for name, e in ckpt.tensors.items():
        if name in gate_names:
            cls = ROTATION
        elif name in head_names:
            cls = TRIALITY
        elif name in stripped:
            cls = OTHER
        elif name in by_source:
            cls = by_source[name].tensor_class
        elif name == "lm_head.weight":
            cls = EMBEDDING
            not_converted.append({"tensor": name, "reason": "tied to the token embedding; llama.cpp reuses token_embd"})
        else:
            cls = OTHER
            not_converted.append({"tensor": name, "reason": "runtime buffer, recomputed by llama.cpp"})
        params[cls] += e.n_elements
        counts[cls] += 1

    gates = []
    for g in structure.gates:
        _, health = gate_rotation(ckpt.read(g.tensor), g.parameterization)
        gates.append({"layer": g.layer, "tensor": g.tensor, "blocks": g.n_blocks,
                      "parameterization": g.parameterization, **health.as_dict()})

    cfg = structure.config
    return {
        "source": ckpt.uri,
        "weight_format": ckpt.weight_format,
        "shards": len(ckpt.shards),
        "architecture": spec.hf_architecture,
        "gguf_architecture": spec.arch,
        "variant": ("plain (no SO8T)" if cfg is None else
                    f"SO8T v{cfg.version}, {cfg.rotation} rotation gates {POSITION_WORDS[cfg.position]}"),
        "so8t": None if cfg is None else {"version": cfg.version, "rotation": cfg.rotation, "position": cfg.position,
                                          "read_from": cfg.source},
        "wrapper_prefix": ckpt.unwrapped_prefix or None,
        "hyperparameters": {
            "layers": spec.n_layers, "hidden_size": spec.hidden_size, "heads": spec.n_heads,
            "kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim, "intermediate_size": spec.intermediate_size,
            "vocab_size": spec.vocab_size, "context_length": spec.context_length,
            "tied_embeddings": spec.tied_embeddings,
        },
        "parameters": {"total": sum(params.values()), **params},
        "tensors": {"total": sum(counts.values()), **counts},
        "gated_layers": structure.gated_layers,
        "rotation_gates": gates,
        "rotation_health_ok": all(g["ok"] for g in gates),
        "triality_heads": [{"head": h.head, "tensor": h.weight, "labels": list(h.labels),
                            "reads": "final normed hidden state"} for h in structure.heads],
        "pet": PET_NOTE,
        "gguf_tensors": len(plan),
        "baked_tensors": [p.gguf_name for p in plan if p.transform.startswith("bake")],
        "not_converted": not_converted,
        "stripped": [{"tensor": n, "reason": r} for n, r in structure.stripped],
        "to_sidecar": sorted(head_names),
    }


def render_text(a: dict[str, Any]) -> str:
    hp = a["hyperparameters"]
    lines = [
        f"source        {a['source']} ({a['weight_format']}, {a['shards']} shard{'s' if a['shards'] != 1 else ''})",
        f"architecture  {a['architecture']} -> GGUF '{a['gguf_architecture']}'",
        f"variant       {a['variant']}",
        f"shape         {hp['layers']} layers, hidden {hp['hidden_size']}, heads {hp['heads']}/{hp['kv_heads']} "
        f"(head_dim {hp['head_dim']}), ffn {hp['intermediate_size']}, vocab {hp['vocab_size']}, "
        f"context {hp['context_length']}{', tied embeddings' if hp['tied_embeddings'] else ''}",
        "",
        f"{'class':<16}{'tensors':>9}{'parameters':>16}",
    ]
    for cls in TENSOR_CLASSES:
        lines.append(f"{cls:<16}{a['tensors'][cls]:>9}{a['parameters'][cls]:>16,}")
    lines.append(f"{'total':<16}{a['tensors']['total']:>9}{a['parameters']['total']:>16,}")
    lines.append("")
    if a["rotation_gates"]:
        lines.append(f"rotation gates on {len(a['gated_layers'])} layers: {a['gated_layers']}")
        for g in a["rotation_gates"]:
            lines.append(f"  layer {g['layer']:>3}: {g['blocks']} blocks, "
                         f"max|RᵀR−I| {g['max_orthogonality_error']:.2e}, "
                         f"det [{g['min_det']:.6f}, {g['max_det']:.6f}], "
                         f"{'finite' if g['finite'] else 'NOT FINITE'}, {'ok' if g['ok'] else 'NOT A ROTATION'}")
    else:
        lines.append("rotation gates: none")
    if a["triality_heads"]:
        lines.append("triality heads (to the sidecar; the task head is the LM head): " + ", ".join(
            f"{h['head']} {h['labels']}" for h in a["triality_heads"]))
    else:
        lines.append("triality heads: none")
    lines.append(f"PET: {a['pet']}")
    lines.append(f"GGUF: {a['gguf_tensors']} tensors, {len(a['baked_tensors'])} with a rotation baked in")
    for item in a["not_converted"]:
        lines.append(f"not converted: {item['tensor']} ({item['reason']})")
    for item in a["stripped"]:
        lines.append(f"stripped: {item['tensor']} ({item['reason']})")
    if a["to_sidecar"]:
        lines.append(f"to the heads sidecar: {', '.join(a['to_sidecar'])}")
    if a["wrapper_prefix"]:
        lines.append(f"wrapper prefix removed from tensor names: {a['wrapper_prefix']!r}")
    return "\n".join(lines)
