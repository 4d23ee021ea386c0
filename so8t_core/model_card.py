"""The release's README.md, written only from facts the run established.

Every number here comes from the analysis, the staged tensors, the written files or
the validation reports of this run; nothing is copied from the source's own card.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_model_card(name: str, analysis: Mapping[str, Any], files: Sequence[Mapping[str, Any]],
                      validations: Mapping[str, Mapping[str, Any]], max_bake_error: float,
                      source_fingerprint: str, converter: str) -> str:
    hp = analysis["hyperparameters"]
    so8t = analysis.get("so8t")
    lines = [
        "---",
        "tags:",
        "- gguf",
        "- so8t",
        "- llama.cpp",
        f"- {analysis['gguf_architecture']}",
        "pipeline_tag: text-generation",
        f"quantized_by: {converter}",
        "---",
        "",
        f"# {name} (GGUF)",
        "",
        f"GGUF files converted by {converter} from an SO8T checkpoint "
        f"(source fingerprint `{source_fingerprint[:16]}…`). They are standard `{analysis['gguf_architecture']}` "
        "GGUF files: unmodified llama.cpp, Ollama and LM Studio load them.",
        "",
        "## Model",
        "",
        f"- Base architecture: {analysis['architecture']} → GGUF `{analysis['gguf_architecture']}`",
        f"- {hp['layers']} layers, hidden size {hp['hidden_size']}, {hp['heads']} attention heads "
        f"({hp['kv_heads']} KV heads), FFN {hp['intermediate_size']}, vocabulary {hp['vocab_size']}, "
        f"context {hp['context_length']}" + (", tied embeddings" if hp["tied_embeddings"] else ""),
        f"- Parameters in the checkpoint: {analysis['parameters']['total']:,}",
        "",
        "## SO8T structure and what was done with it",
        "",
    ]
    if so8t:
        gated = analysis["gated_layers"]
        lines += [
            f"- Variant: {analysis['variant']}.",
            f"- Rotation gates on {len(gated)} of {hp['layers']} layers: {gated}. Each is block-diagonal with "
            "8×8 rotations on contiguous channel blocks of the attention output.",
            ("- Baked exactly into `o_proj` (`W' = W·Rᵀ` for a gate before o_proj; `W' = Rᵀ·W`, `b' = b·R` after "
             f"it). Largest bake error (max |gated − baked| / max |gated| on probe inputs): {max_bake_error:.2e}."),
            "- Rotation health: " + ("all gates are proper rotations" if analysis["rotation_health_ok"]
                                     else "NOT all gates are proper rotations (see analysis.json)")
            + " (orthogonality error and determinant checked per gate).",
        ]
    else:
        lines.append("- No SO8T gates: converted as a plain checkpoint.")
    if analysis["triality_heads"]:
        heads = ", ".join(f"{h['head']} ({', '.join(h['labels'])})" for h in analysis["triality_heads"])
        lines.append(f"- Triality heads {heads} read the final normed hidden state; they are in "
                     f"`{name}.so8t-heads.gguf`, not in the model file (the task head is the LM head).")
    lines.append(f"- PET: {analysis['pet']}")
    for item in analysis["not_converted"]:
        lines.append(f"- Not converted: `{item['tensor']}` ({item['reason']}).")
    for item in analysis.get("stripped", []):
        lines.append(f"- Stripped: `{item['tensor']}` ({item['reason']}).")
    extra = sorted(set(analysis.get("to_sidecar", [])) - {h["tensor"] for h in analysis["triality_heads"]}
                   - {h["tensor"].replace(".weight", ".bias") for h in analysis["triality_heads"]})
    if extra:
        lines.append(f"- Other SO8T classifier heads, kept unchanged in `{name}.so8t-heads.gguf`: "
                     + ", ".join(f"`{n}`" for n in extra) + ".")
    lines += ["", "## Files", "", "| file | size | bits per weight | sha256 |", "|---|---|---|---|"]
    for f in files:
        bpw = f"{f['bits_per_weight']:.2f}" if f.get("bits_per_weight") else "—"
        lines.append(f"| `{f['name']}` | {_size(f['size'])} | {bpw} | `{f['sha256']}` |")
    lines += ["", "## Validation", ""]
    if validations:
        lines += ["Logits from llama.cpp on a fixed English text, compared with the PyTorch SO8T reference "
                  "(gates applied live, not baked):", "",
                  "| quant | tokens | mean KLD | top-1 agreement | read-back | max relative RMSE | passed |",
                  "|---|---|---|---|---|---|---|"]
        for quant, v in validations.items():
            f = v.get("llama_cpp", {})
            lines.append(f"| {quant} | {f.get('n_tokens', '—')} | {f.get('mean_kld', float('nan')):.3g} | "
                         f"{100 * f.get('top1_agreement', float('nan')):.2f}% | "
                         f"{'ok' if v['readback']['ok'] else 'FAILED'} | "
                         f"{v['tensor_errors']['max_relative_rmse']:.3g} | {'yes' if v['passed'] else 'NO'} |")
    else:
        lines.append("Not validated in this run (`--no-validate`).")
    gguf_files = [f["name"] for f in files if f["name"].endswith(".gguf") and "so8t-heads" not in f["name"]]
    example = gguf_files[0] if gguf_files else f"{name}-Q8_0.gguf"
    lines += [
        "", "## Usage", "",
        "llama.cpp:", "", "```sh", f"llama-cli -m {example} -cnv", "```", "",
        "Ollama:", "", "```sh", f"echo 'FROM ./{example}' > Modelfile", f"ollama create {name} -f Modelfile",
        f"ollama run {name}", "```", "",
        "LM Studio:", "", "```sh", f"lms import {example}", "```", "",
    ]
    if analysis["triality_heads"]:
        lines += ["Triality heads:", "", "```sh",
                  f"so8t-gguf inspect {name}.so8t-heads.gguf", "```", "",
                  "The sidecar holds each head's weight and bias (F32) and its label names; apply them to the "
                  "per-token embeddings llama.cpp computes after `output_norm`.", ""]
    return "\n".join(lines)
