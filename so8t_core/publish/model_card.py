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
    languages = metadata.get("general.languages")
    return {"license": metadata.get("general.license"), "base_models": bases, "chat_template": template,
            "languages": [str(x) for x in languages] if isinstance(languages, (list, tuple)) else [],
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
                      plots: Sequence[tuple[str, str]] = (), extras: Mapping[str, Any] | None = None) -> str:
    """``facts``: from :func:`gguf_card_facts`; ``plots``: (file name, caption) pairs; ``extras``:
    what the mix became (``types``, ``fallbacks``), ``llama_cpp`` (the version whose bytes these
    are), ``imatrix`` (the manifest's summary), ``prompt`` (the chat template rendered),
    ``source_card`` (the checkpoint's own README.md) and ``quant``."""
    extras = extras or {}
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
    lines += _mix_lines(extras)
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
    lines += _evaluation_lines(extras.get("evaluation"))
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
    if extras.get("prompt"):
        lines += ["## Prompt format", "",
                  "What the file's chat template makes of one user message (`Hello`), default system turn "
                  "included; an Ollama `TEMPLATE` must keep it:", "", "```text", extras["prompt"].rstrip("\n"),
                  "```", ""]
    if analysis["triality_heads"]:
        quant = extras.get("quant", "Q8_0")
        lines += ["Triality heads (task, safety, authority outputs at the last token, from llama.cpp's final "
                  "hidden state):", "", "```sh",
                  f"so8t-gguf heads {example} {name}.so8t-heads.gguf \"Is this request safe?\" --quant {quant}",
                  f"so8t-gguf inspect {name}.so8t-heads.gguf", "```", "",
                  "The sidecar holds each head's weight and bias (F32) and its label names; apply them to the "
                  "per-token embeddings llama.cpp computes after `output_norm`.", ""]
    if extras.get("source_card"):
        lines += ["## The source model's card", "",
                  "Carried over unchanged from the checkpoint's README.md (its intended use, limitations and "
                  "license apply to these files too):", ""]
        lines += ["> " + line if line else ">" for line in extras["source_card"].strip().splitlines()]
        lines.append("")
    return "\n".join(lines)


def _evaluation_lines(record: Mapping[str, Any] | None) -> list[str]:
    """The evaluation against the F32 model, as llama-perplexity --kl-divergence reports it."""
    if not record:
        return []
    st, se = record["statistics"], record["settings"]
    return ["", "## Quality against the F32 model", "",
            f"On `{se['text']}` (sha256 `{se['text_sha256'][:16]}…`), {st['n_chunk']} chunks of {st['n_ctx']} tokens, "
            f"{st['count']} scored, computed as `llama-perplexity --kl-divergence` does "
            f"({'passed' if record['passed'] else 'FAILED'} the gates: mean KLD ≤ {record['gate']['max_kld']:g}, "
            f"same top p ≥ {100 * record['gate']['min_same_top']:g}%):", "",
            "| PPL(Q)/PPL(F32) | mean KLD | 99% KLD | max KLD | RMS Δp | same top p |", "|---|---|---|---|---|---|",
            f"| {st['ppl_ratio']:.4f} ± {st['ppl_ratio_unc']:.4f} | {st['kld_mean']:.4f} ± {st['kld_unc']:.4f} | "
            f"{st['kld_percentiles']['99.0']:.4f} | {st['kld_max']:.4f} | {100 * st['delta_p_rms']:.3f}% | "
            f"{100 * st['same_top_p']:.2f} ± {100 * st['same_top_p_unc']:.2f}% |"]


def source_card_text(readme: bytes | None, limit: int = 20_000) -> str | None:
    """The body of a checkpoint's README.md (its YAML front matter left out), at most ``limit``
    characters; None when it has none."""
    if not readme:
        return None
    text = readme.decode("utf-8", errors="replace")
    if text.startswith("---"):
        end = text.find("\n---", 3)
        text = text[end + 4:] if end >= 0 else text
    text = text.strip()
    if len(text) > limit:
        text = text[:limit].rstrip() + "\n\n[… cut at 20,000 characters: see the source's README.md]"
    return text or None


def _recipe_lines(extras: Mapping[str, Any], recipe: Mapping[str, Any]) -> list[str]:
    """A target mix (AUTO-<B>): what it was asked, the types chosen per tensor class and layer
    (``quantize.target.render_recipe``'s table and its predicted damage), the measured KLD when
    the run evaluated it, and how llama-quantize reproduces it."""
    goal = recipe["target"]
    asked = (f"at most {goal['bpw']:g} bits per weight" if "bpw" in goal else
             f"the smallest file whose mean KLD on the evaluation text is at most {goal['kld']:g}" if "kld" in goal
             else f"a file of at most {goal['size']:,} bytes")
    predicted = recipe.get("predicted_kld")
    weighted = ", times its tensor class's KLD gain measured with probes in llama.cpp" if predicted is not None else ""
    lines = ["", "## The recipe", "",
             f"A target mix: {asked}, each 2-D weight given the type that leaves the least measured damage "
             f"(its layer's relative output noise{', importance-weighted' if extras.get('imatrix') else ''}"
             f"{weighted}; docs/architecture.md), chosen per tensor:", "",
             recipe["table"]]
    stats = (extras.get("evaluation") or {}).get("statistics")
    if stats:
        lines += ["", f"Measured on the evaluation text: mean KLD {stats['kld_mean']:.4g} against the F32 model"
                  + (f" (predicted {predicted:.4g})." if predicted is not None else ".")]
    if recipe.get("search"):
        lines += _search_lines(recipe["search"])
    lines += ["", f"`{recipe['file']}` is this recipe as llama-quantize's `--tensor-type-file`: "
              f"`llama-quantize --tensor-type-file {recipe['file']} [--imatrix FILE] MODEL-F32.gguf OUT.gguf "
              f"{recipe['base_mix']}` writes these tensors' bytes from the F32 GGUF (and the same importance matrix)."]
    return lines


def _search_lines(search: Mapping[str, Any]) -> list[str]:
    """--target-kld's search: each budget tried, in order, with its measured mean KLD."""
    k = search["max_kld"]
    nxt = search.get("next_smaller")
    found = (f"the next smaller budget tried, {nxt['bits_per_weight']:.3f} bits per weight, measured "
             f"{nxt['kld_mean']:.4g} (over {k:g})" if nxt else "the smallest types already met it")
    lines = ["", f"The budgets tried (bisection between the smallest and the largest types), in order; this file "
                 f"is the smallest within {k:g}, and {found}:", "",
             "| bits per weight | tensor bytes | mean KLD | within |", "|---|---|---|---|"]
    for t in search["trials"]:
        lines.append(f"| {t['bits_per_weight']:.3f} | {t['tensor_bytes']:,} | {t['kld_mean']:.4g} | "
                     f"{'yes' if t['within'] else 'no'} |")
    return lines


FALLBACK_NAMES_SHOWN = 3  # a fallback of this few tensors names them
OUTPUT_TENSORS = ("output.weight", "token_embd.weight")  # named in any fallback: the output rule's, often large


def _mix_lines(extras: Mapping[str, Any]) -> list[str]:
    """What the mix became, type by type; the tensors that fell back from the mix's types and why;
    the llama.cpp version; the importance matrix."""
    lines: list[str] = []
    types = extras.get("types")
    recipe = extras.get("recipe")
    if recipe:
        lines += _recipe_lines(extras, recipe)
    if types:
        total = sum(t["bytes"] for t in types.values()) or 1
        rules = (f"The recipe, given to llama-quantize's {recipe['base_mix']} mix as per-tensor overrides (llama.cpp "
                 if recipe else f"The {extras.get('quant', '')} mix's rules (llama-quantize's, llama.cpp ")
        lines += ["", "## What the mix became", "",
                  rules + f"{extras.get('llama_cpp', '?')}: these are the bytes it writes) gave these types:", "",
                  "| type | tensors | bytes | share of the file's tensor bytes |", "|---|---|---|---|"]
        for t, v in sorted(types.items(), key=lambda kv: (-kv[1]["bytes"], kv[0])):
            lines.append(f"| {t} | {v['tensors']} | {human_size(v['bytes'])} | {100 * v['bytes'] / total:.1f}% |")
    fallbacks = extras.get("fallbacks") or []
    if fallbacks:
        by_change: dict[tuple[str, str, int], list[str]] = {}
        for f in fallbacks:
            by_change.setdefault((f["wanted"], f["got"], f["row_length"]), []).append(f["tensor"])
        lines += ["", f"> **Warning: {len(fallbacks)} tensors fell back from the mix's types.** Their rows do not "
                  "fit the type's blocks, so llama.cpp uses another type, as llama-quantize does (for the output "
                  "tensor, or the token embedding tied to it, llama.cpp's output rule gives Q8_0):"]
        for (wanted, got, row), names in sorted(by_change.items()):
            named = [n for n in names if len(names) <= FALLBACK_NAMES_SHOWN or n in OUTPUT_TENSORS]
            which = (f" ({'' if len(named) == len(names) else 'among them '}{', '.join(f'`{n}`' for n in named)})"
                     if named else "")
            lines.append(f"> - {len(names)} × {wanted} → {got}{which}: rows of {row} are not a multiple of "
                         f"{wanted}'s block")
        lines.append("> The file is then larger (and usually better) than the mix's name suggests; see the table.")
    imatrix = extras.get("imatrix")
    if types:
        if imatrix:
            computed = imatrix.get("computed")
            if computed:
                on = ", ".join(map(str, computed["calibration"]))
                sha = computed.get("calibration_sha256")
                source = f", computed on {on}" + (f" (calibration data: sha256 `{sha}` of its tokens as llama.cpp "
                                                  "tokenized them, int32 little-endian)" if sha else "")
            else:
                source = ", given with --imatrix (the calibration data it was computed on is not recorded)"
            lines += ["", f"- Importance matrix: yes, sha256 `{imatrix.get('sha256')}`{source}."]
        else:
            lines += ["", "- Importance matrix: none (llama-quantize's plain quantizers)."]
    return lines


# --- The model's own card: every published quant on one page ----------------------------------

# The context llama-cli and llama-server run with when none is given (-c; common.h's n_ctx): the
# KV cache the recommendation adds to each file's size is sized for it (or the model's own, if shorter).
DEFAULT_RUN_CTX = 4096
BASE_QUANTS = ("F32", "BF16", "F16")  # the unquantized files: the evaluation's base and its peers
# The verdict's thresholds on mean KLD (nats), from the tightest up.
VERDICTS = ((0.01, "excellent"), (0.05, "good"), (0.2, "fair"))


def verdict(quant: str, kld_mean: float | None) -> str:
    """One word for a quant's quality (the card states the rule)."""
    if quant == "F32":
        return "base"
    if kld_mean is None:
        return "unevaluated"
    return next((word for limit, word in VERDICTS if kld_mean < limit), "poor")


def kv_cache_bytes(hyperparameters: Mapping[str, Any], n_ctx: int) -> int:
    """llama.cpp's F16 KV cache for ``n_ctx`` tokens: K and V, every layer, every KV head."""
    hp = hyperparameters
    return 2 * 2 * hp["layers"] * hp["kv_heads"] * hp["head_dim"] * n_ctx


def overview_rows(model: str, quants: Mapping[str, Mapping[str, Any]],
                  manifests: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per published quant (latest.json's entries, their releases' manifests), largest first."""
    rows = []
    for q, entry in quants.items():
        m = manifests.get(q)
        if m is None:
            continue
        ggufs = [n for n in m["files"] if n.startswith(f"{model}-{q}") and n.endswith(".gguf")]
        stats = (m.get("evaluation") or {}).get("statistics") or {}
        rows.append({"quant": q, "file": entry["gguf"], "release": entry["release"],
                     "size": sum(m["files"][n]["size"] for n in ggufs), "bits_per_weight": m.get("bits_per_weight"),
                     "ppl_ratio": stats.get("ppl_ratio"), "kld_mean": stats.get("kld_mean"),
                     "same_top_p": stats.get("same_top_p"),
                     "evaluation": (m.get("evaluation") or {}).get("settings"),
                     "gate": (m.get("evaluation") or {}).get("gate")})
    return sorted(rows, key=lambda r: (-r["size"], r["quant"]))


def _figure(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_model_overview(model: str, rows: Sequence[Mapping[str, Any]], analysis: Mapping[str, Any],
                          facts: Mapping[str, Any], converter: str, plot: str | None) -> str:
    """``<dest>/<model>/README.md``: Hugging Face front matter, every published quant with its size
    and quality against the F32 model, the size/KLD plot, the recommendation, and how to run one."""
    hp = analysis["hyperparameters"]
    n_ctx = min(DEFAULT_RUN_CTX, hp["context_length"] or DEFAULT_RUN_CTX)
    kv = kv_cache_bytes(hp, n_ctx)
    front = ["---"]
    if facts.get("base_models"):
        front += ["base_model:"] + [f"- {_yaml_str(b)}" for b in facts["base_models"]]
        front.append("base_model_relation: quantized")
    front.append(f"license: {_yaml_str(facts.get('license') or 'other')}")
    if facts.get("languages"):
        front += ["language:"] + [f"- {_yaml_str(lang)}" for lang in facts["languages"]]
    front += ["tags:", "- gguf", "- so8t", "- llama.cpp", f"- {analysis['gguf_architecture']}",
              "pipeline_tag: text-generation", f"quantized_by: {_yaml_str(converter)}", "---"]
    lines = [*front, "", f"# {model} (GGUF)", "",
             f"Every published quantization of {model}, converted by {converter}: standard "
             f"`{analysis['gguf_architecture']}` GGUF files that unmodified llama.cpp, Ollama and LM Studio load. "
             "Each quant is its own release (`<fingerprint>/<quant>/`) with its own card, files and manifest.", "",
             "## Quants", ""]
    settings = next((r["evaluation"] for r in rows if r["evaluation"]), None)
    if settings:
        lines += [f"Quality is measured against the F32 model as `llama-perplexity --kl-divergence` does, on "
                  f"`{settings['text']}` (sha256 `{settings['text_sha256'][:16]}…`, chunks of {settings['ctx']} "
                  f"tokens, at most {settings['max_chunks']}): PPL ratio is PPL(Q)/PPL(F32), mean KLD the "
                  "KL divergence of the next-token distributions in nats, same top p how often both pick the "
                  "same most likely token.", ""]
    lines += [f"| file | size | bits/weight | memory at {n_ctx} ctx | PPL ratio | mean KLD | same top p | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = None if r["same_top_p"] is None else 100 * r["same_top_p"]
        lines.append(f"| [{r['file']}]({r['release']}) | {human_size(r['size'])} | "
                     f"{_figure(r['bits_per_weight'], '.2f')} | {human_size(r['size'] + kv)} | "
                     f"{_figure(r['ppl_ratio'], '.4f')} | {_figure(r['kld_mean'], '.4f')} | "
                     f"{_figure(same, '.2f')}{'' if same is None else '%'} | {verdict(r['quant'], r['kld_mean'])} |")
    gate = next((r["gate"] for r in rows if r["gate"]), None)
    lines += ["", "Verdict: mean KLD below " + ", ".join(f"{limit:g} {word}" for limit, word in VERDICTS)
              + ", else poor; F32 is the base."
              + (f" Quality gates: a quant with a mean KLD above {gate['max_kld']:g} or a same top p below "
                 f"{100 * gate['min_same_top']:g}% is not published." if gate else ""), ""]
    if plot:
        lines += [f"![size against mean KLD]({plot})", "",
                  "*File size against mean KLD from the F32 model (F32/BF16 marked): lower left is better.*", ""]
    lines += ["## Which one to use", "",
              f"The largest that fits in memory. Memory needed ≈ the file plus llama.cpp's KV cache "
              f"({human_size(kv)} at the default context of {n_ctx} tokens: F16 K and V, {hp['layers']} layers × "
              f"{hp['kv_heads']} KV heads × {hp['head_dim']}; it grows linearly with `-c`), the table's memory "
              "column. Below about 4 bits per weight quality drops fast; check the mean KLD column.", "",
              "## Download and run one quant", ""]
    example = rows[-1]["file"] if rows else f"{model}-Q8_0.gguf"
    for r in rows:
        if r["quant"] == "Q4_K_M":
            example = r["file"]
    release = next((r["release"] for r in rows if r["file"] == example), "<fingerprint>/<quant>/")
    lines += ["Each release's `current.json` names its current version folder, which holds the file:", "",
              "```sh", f"so8t-gguf chat <dest>/{model} \"Hello\" --quant {example[len(model) + 1:-5]}"
              "   # fetches and runs it", "```", "",
              f"or copy `{release}<version>/{example}` and run it with llama.cpp:", "", "```sh",
              f"llama-cli -m {example} -cnv", f"llama-server -m {example} -c {n_ctx} --port 8080"
              "   # OpenAI-compatible API", "```", "",
              f"Ollama: a `Modelfile` with `FROM ./{example}` (the release's own card has the full one), then "
              f"`ollama create {model} -f Modelfile` and `ollama run {model}`. LM Studio: `lms import {example}`.", ""]
    return "\n".join(lines)
