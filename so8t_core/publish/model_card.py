"""The release's README.md, written only from facts the run established.

Every number here comes from the analysis, the staged tensors, the written files or
the validation reports of this run; nothing is copied from the source's own card.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from so8t_core.publish.report import human_size

# Ollama's Go template for ChatML, the format of templates that use <|im_start|>/<|im_end|>.
CHATML_OLLAMA_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def gguf_card_facts(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What the model card takes from the written GGUF's own metadata: license, base models,
    chat template, the tokens that end a turn, and the importance matrix it was quantized with
    (llama-quantize's ``quantize.imatrix.*`` keys)."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []

    def token(key: str) -> str | None:
        i = metadata.get(key)
        return str(tokens[i]) if isinstance(i, int) and 0 <= i < len(tokens) else None

    bases = []
    for i in range(int(metadata.get("general.base_model.count", 0) or 0)):
        # The repo URL names the repository exactly; name/organization are display forms.
        base = metadata.get(f"general.base_model.{i}.repo_url")
        if not base:
            org, name = (metadata.get(f"general.base_model.{i}.{k}") for k in ("organization", "name"))
            base = f"{org}/{name}" if org and name else name
        if base:
            bases.append(str(base).removeprefix("https://huggingface.co/"))
    template = metadata.get("tokenizer.chat_template")
    stops = [t for t in (token("tokenizer.ggml.eot_token_id"), token("tokenizer.ggml.eos_token_id")) if t]
    if template and "<|im_end|>" in template:
        stops.insert(0, "<|im_end|>")
    imatrix = {k: metadata.get(f"quantize.imatrix.{k}") for k in ("file", "dataset", "entries_count", "chunks_count")}
    return {"license": metadata.get("general.license"), "base_models": bases, "chat_template": template,
            "stop_tokens": list(dict.fromkeys(stops)), "imatrix": imatrix if imatrix["file"] else None}


def _yaml_str(text: str) -> str:
    return json.dumps(str(text))  # a JSON string is a valid YAML scalar, quotes and all


def _expert_lines(experts: dict | None) -> list[str]:
    """A mixture of experts: its experts, and the parameters a token uses of all the model has."""
    if not experts:
        return []
    shared = ", plus a shared expert every token uses" if experts["shared"] else ""
    return [f"- Mixture of experts: {experts['count']} experts per layer, {experts['used']} used per token{shared}",
            f"- Active parameters per token: {experts['active_parameters']:,} of {experts['total_parameters']:,} "
            "(the model's weights without the SO8T gates and heads)"]


def _tokenizer_lines(t: Mapping[str, Any] | None) -> list[str]:
    if not t:
        return []
    p = t["parity"]
    if p["ok"]:
        pre = f" with llama.cpp's pre-tokenizer `{t['pre_tokenizer']}`" if t["pre_tokenizer"] else ""
        return [f"- Tokenizer: {t['type']}{pre}; llama.cpp gives exactly the Hugging Face tokenizer's ids on the "
                f"probe text ({p['n_tokens']} tokens of code, numbers, whitespace runs, CJK, emoji and accents)."]
    return [f"- **Tokenizer: llama.cpp does not reproduce the Hugging Face tokenizer.** Converted anyway "
            f"(`--allow-tokenizer-mismatch`): from token {p['first_mismatch']} of the probe text "
            f"(`{p['text_at_mismatch']!r}`) Hugging Face gives {p['hf']}, llama.cpp "
            f"({t['pre_tokenizer'] or 'SentencePiece'}) {p['llama_cpp']}. Prompts tokenize differently than in "
            "training; expect lower quality on such text."]


def render_model_card(name: str, analysis: Mapping[str, Any], files: Sequence[Mapping[str, Any]],
                      validations: Mapping[str, Mapping[str, Any]], max_bake_error: float,
                      source_fingerprint: str, converter: str, facts: Mapping[str, Any] | None = None,
                      plots: Sequence[tuple[str, str]] = ()) -> str:
    """``facts``: from :func:`gguf_card_facts`; ``plots``: (file name, caption) pairs."""
    hp = analysis["hyperparameters"]
    so8t = analysis.get("so8t")
    facts = facts or {}
    front = ["---"]
    if facts.get("license"):
        front.append(f"license: {_yaml_str(facts['license'])}")
    if facts.get("base_models"):
        front += ["base_model:"] + [f"- {_yaml_str(b)}" for b in facts["base_models"]]
    lines = [
        *front,
        "tags:",
        "- gguf",
        "- so8t",
        "- llama.cpp",
        f"- {analysis['gguf_architecture']}",
        "pipeline_tag: text-generation",
        f"quantized_by: {_yaml_str(converter)}",
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
        *_expert_lines(analysis.get("experts")),
        *_tokenizer_lines(analysis.get("tokenizer")),
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
    lora = analysis.get("lora")
    if lora:
        lines.append(f"- LoRA adapter merged before the bake (`W' = W + scale·B·A`, in float32): sha256 "
                     f"`{lora['sha256']}`, r={lora['r']}, lora_alpha={lora['lora_alpha']:g}, scale "
                     f"{lora['scale']:.6g} ({lora['scaling']}), on {len(lora['merged_tensors'])} tensors "
                     f"({', '.join(f'`{m}`' for m in lora['effective_target_modules'])}). Validation compares "
                     "against the reference with the same adapter merged.")
    imatrix = facts.get("imatrix")
    if imatrix:
        shipped = any(f["name"] == imatrix["file"] for f in files)
        lines.append(f"- Quantized with an importance matrix, `{imatrix['file']}`"
                     + (" (in this release, llama-imatrix's format)" if shipped else "")
                     + (f", computed on {imatrix['dataset']}" if imatrix.get("dataset") else "")
                     + (f" ({imatrix['chunks_count']} chunks)" if imatrix.get("chunks_count") else "")
                     + f"; {imatrix['entries_count']} weights have entries.")
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
        lines.append(f"| `{f['name']}` | {human_size(f['size'], 1)} | {bpw} | `{f['sha256']}` |")
    lines += ["", "## Validation", ""]
    if validations:
        lines += ["Logits from llama.cpp on a fixed English text, compared with the PyTorch SO8T reference "
                  "(gates applied live, not baked):", "",
                  "| quant | tokens | mean KLD | top-1 agreement | read-back | max relative RMSE | tokenizer parity "
                  "| passed |",
                  "|---|---|---|---|---|---|---|---|"]
        for quant, v in validations.items():
            f = v.get("llama_cpp", {})
            tok = v.get("tokenizer") or {}
            parity = ("—" if not tok else f"same ids ({tok.get('n_tokens')} tokens)" if tok.get("ok")
                      else f"DIFFERENT (first at {tok.get('first_mismatch')})")
            lines.append(f"| {quant} | {f.get('n_tokens', '—')} | {f.get('mean_kld', float('nan')):.3g} | "
                         f"{100 * f.get('top1_agreement', float('nan')):.2f}% | "
                         f"{'ok' if v['readback']['ok'] else 'FAILED'} | "
                         f"{v['tensor_errors']['max_relative_rmse']:.3g} | {parity} | "
                         f"{'yes' if v['passed'] else 'NO'} |")
        lines += ["", "Tokenizer parity: llama.cpp tokenizes a multilingual text (English, Japanese, Chinese, "
                  "code, emoji) from the GGUF into exactly the ids the checkpoint's Hugging Face tokenizer gives."]
    else:
        lines.append("Not validated in this run (`--no-validate`).")
    if plots:
        lines += ["", "## Plots", ""]
        for file, caption in plots:
            lines += [f"![{caption}]({file})", "", f"*{caption}.*", ""]
    gguf_files = [f["name"] for f in files if f["name"].endswith(".gguf") and "so8t-heads" not in f["name"]]
    example = gguf_files[0] if gguf_files else f"{name}-Q8_0.gguf"
    lines += ["", "## Usage", "", "llama.cpp (the chat template is in the file):", "", "```sh",
              f"llama-cli -m {example} -cnv", "```", "", "Ollama: save this as `Modelfile`", "", "```"]
    lines.append(f"FROM ./{example}")
    template = facts.get("chat_template")
    if template and "<|im_start|>" in template:
        lines.append(f'TEMPLATE """{CHATML_OLLAMA_TEMPLATE}"""')
    for stop in facts.get("stop_tokens", []):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    lines += ["```", "", "then:", "", "```sh", f"ollama create {name} -f Modelfile", f"ollama run {name}", "```", ""]
    if template and "<|im_start|>" in template:
        lines.append("The file's chat template is ChatML; the `TEMPLATE` above is its Ollama form.")
    elif template:
        lines.append("Ollama reads the chat template stored in the GGUF; add a `TEMPLATE` if it does not "
                     "recognise it.")
    else:
        lines.append("The checkpoint has no chat template: this is a plain text-completion model.")
    lines += ["", "LM Studio:", "", "```sh", f"lms import {example}", "```", ""]
    if analysis["triality_heads"]:
        lines += ["Triality heads:", "", "```sh",
                  f"so8t-gguf inspect {name}.so8t-heads.gguf", "```", "",
                  "The sidecar holds each head's weight and bias (F32) and its label names; apply them to the "
                  "per-token embeddings llama.cpp computes after `output_norm`.", ""]
    return "\n".join(lines)
