"""Structure analysis of an SO8T checkpoint: what is there, what it will become.

Reads only headers and the (small) θ tensors: parameter counts by class, the gated
layers with the health of each rotation, the triality heads, and what the PET
regularizer left behind (nothing: it is a training loss).
"""

from __future__ import annotations

from typing import Any

from so8t_core.plan import TensorPlan, build_plan, check_memory_cap
from so8t_core.source.architectures import EMBEDDING, OTHER, ROTATION, TENSOR_CLASSES, TRIALITY, ModelSpec, model_spec
from so8t_core.source.checkpoint import TOKENIZER_FILES, Checkpoint
from so8t_core.source.rotation import checked_rotation, gate_rotation
from so8t_core.source.so8t import So8tStructure, find_structure
from so8t_core.source.tokenizer import (
    TEXT_FILES,
    TokenizerCheck,
    check_chat_template,
    check_tokenizer,
    check_tokenizer_files,
)
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


def preflight(uri: str, lora: str | None = None, allow_tokenizer_mismatch: bool = False,
              tokenizer: bool = True, max_memory_gb: float | None = None) -> tuple[ModelSpec, list[TensorPlan]]:
    """Everything checkable without reading the weights: files, headers, config, plan, gates,
    that a LoRA adapter's pairs fit the model's weights, that a memory cap leaves room for the
    process and its largest tensor, and that llama.cpp reproduces the tokenizer (unless
    ``allow_tokenizer_mismatch``) and that the chat template renders within limits (neither
    without ``tokenizer``: the ONNX export has no tokenizer).

    Catches most bad input in a second or two, before a pipeline run starts. Returns the
    model's spec and tensor plan, for the checks of the quant mixes.
    """
    ckpt = Checkpoint.open(uri, cache_dir=default_cache_dir())
    spec, structure, plan = checkpoint_model(ckpt)
    if max_memory_gb is not None:
        check_memory_cap(max_memory_gb, plan)
    if lora:
        from so8t_core.source.lora import load_adapter

        load_adapter(lora).bind(plan, ckpt.uri)
    for gate in structure.gates:
        checked_rotation(ckpt.read(gate.tensor), gate.parameterization, ckpt.uri, gate.tensor)
    files = {n: data for n in TEXT_FILES if (data := ckpt.read_file(n)) is not None}
    check_tokenizer_files(files, ckpt.uri)
    if tokenizer:
        check_chat_template(files, ckpt.uri)  # a template that hangs or escapes the sandbox: refused now
        require_tokenizer_parity(ckpt, allow_tokenizer_mismatch)
    return spec, plan


def tokenizer_check(ckpt: Checkpoint) -> TokenizerCheck:
    """The checkpoint's tokenizer proven (or not) in llama.cpp (``source.tokenizer.check_tokenizer``)."""
    files = {n: data for n in TOKENIZER_FILES if (data := ckpt.read_file(n)) is not None}
    return check_tokenizer(files, ckpt.config, ckpt.uri)


def require_tokenizer_parity(ckpt: Checkpoint, allow_mismatch: bool = False) -> TokenizerCheck:
    """The tokenizer check; a one-line error when llama.cpp does not reproduce the tokenizer,
    unless ``allow_mismatch``."""
    check = tokenizer_check(ckpt)
    if not check.ok and not allow_mismatch:
        raise check.error(ckpt.uri)
    return check


def analyze(ckpt: Checkpoint) -> dict[str, Any]:
    """The structure report: facts about the checkpoint's content only (it is published with each
    release, whose bytes must not depend on where the checkpoint lay), so not its location."""
    spec, structure, plan = checkpoint_model(ckpt)
    by_source = {name: p for p in plan for name in p.sources or (p.source,)}
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
        "experts": expert_report(spec, plan),
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
        "tokenizer": tokenizer_check(ckpt).as_dict(),
    }


def expert_report(spec, plan) -> dict[str, Any] | None:
    """A mixture of experts' shape and its parameters by class (routed experts, router, shared expert), and
    how many a token uses: the dense part, the router, the shared expert and ``used`` of the routed experts.
    None for a dense model. Counts are of the converted base model (no SO8T gates or heads); ``per_expert``
    is one expert in every layer (what gguf-py's size label counts)."""
    if not spec.n_experts:
        return None
    routed = sum(p.n_elements for p in plan if "_exps." in p.gguf_name)
    router = sum(p.n_elements for p in plan if ".ffn_gate_inp." in p.gguf_name)
    shared = sum(p.n_elements for p in plan if "_shexp." in p.gguf_name)
    total = sum(p.n_elements for p in plan)
    return {
        "count": spec.n_experts, "used": spec.n_experts_used, "shared": spec.rules.shared_expert,
        "expert_intermediate_size": spec.expert_intermediate_size,
        "shared_intermediate_size": spec.shared_expert_intermediate_size or None,
        "parameters": {"routed_experts": routed, "per_expert": routed // spec.n_experts, "router": router,
                       "shared_expert": shared, "dense": total - routed - router - shared},
        "total_parameters": total,
        "active_parameters": total - routed + routed // spec.n_experts * spec.n_experts_used,
    }


def render_tokenizer(t: dict[str, Any]) -> str:
    """The tokenizer check in one line or two (for ``analyze`` and the model card)."""
    p = t["parity"]
    if p["ok"]:
        pre = f", llama.cpp pre-tokenizer {t['pre_tokenizer']!r} ({t['why']})" if t["pre_tokenizer"] else ""
        return (f"tokenizer: {t['type']}{pre}; llama.cpp gives the Hugging Face ids on the probe text "
                f"({p['n_tokens']} tokens)")
    closest = t["pre_tokenizer"] or "SentencePiece"
    return (f"tokenizer: {t['type']}; llama.cpp does NOT give the Hugging Face ids: from token {p['first_mismatch']} "
            f"({p['text_at_mismatch']!r}) Hugging Face gives {p['hf']}, llama.cpp ({closest}) {p['llama_cpp']}; "
            f"tried {', '.join(t['tried'])}")


def render_text(a: dict[str, Any], source: str) -> str:
    """The report as ``so8t-gguf analyze`` prints it; ``source``: the checkpoint as the user named it."""
    hp = a["hyperparameters"]
    lines = [
        f"source        {source} ({a['weight_format']}, {a['shards']} shard{'s' if a['shards'] != 1 else ''})",
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
    if a.get("experts"):
        e, ep = a["experts"], a["experts"]["parameters"]
        lines.append(f"experts       {e['count']} per layer, {e['used']} used per token"
                     f"{', plus a shared expert' if e['shared'] else ''} (expert ffn {e['expert_intermediate_size']}"
                     f"{', shared ffn ' + str(e['shared_intermediate_size']) if e['shared'] else ''})")
        lines.append(f"              parameters: {ep['routed_experts']:,} routed ({ep['per_expert']:,} per expert), "
                     f"{ep['router']:,} router, {ep['shared_expert']:,} shared expert, {ep['dense']:,} the rest; "
                     f"{e['active_parameters']:,} active of {e['total_parameters']:,}")
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
    lines.append(render_tokenizer(a["tokenizer"]))
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
