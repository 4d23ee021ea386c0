"""Running the triality heads: llama.cpp computes the final hidden state, the sidecar's heads read it.

The task head is the LM head itself (llama.cpp's next-token logits); the safety and
authority heads are linear layers on the final normed hidden state, stored in the
sidecar ``<name>.so8t-heads.gguf``. Outputs are for the last token of the text, as the
triality heads are used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from so8t_core.constants import Keys
from so8t_core.errors import ValidationError
from so8t_core.gguf_file import read_gguf

TOP_TOKENS = 5


def load_heads(sidecar_path: str) -> dict[str, Any]:
    """The heads in a sidecar: {name: (weight [n_labels, hidden], bias or None, labels)} plus its keys."""
    g = read_gguf(sidecar_path)
    if g.value("general.architecture") != "so8t-heads":
        raise ValidationError(sidecar_path, "not an SO8T heads sidecar (general.architecture is "
                                            f"{g.value('general.architecture')!r})",
                              "pass the <name>.so8t-heads.gguf written beside the model")
    heads = {}
    names = {t.name for t in g.tensors}
    for head in g.value(Keys.HEADS_NAMES, []):
        weight = g.dequantized(g.tensor(f"{head}_head.weight"))
        bias = g.dequantized(g.tensor(f"{head}_head.bias")) if f"{head}_head.bias" in names else None
        heads[head] = (weight, bias, list(g.value(Keys.HEADS_LABELS.format(head=head), [])))
    return {"heads": heads, "fingerprint": g.value(Keys.SOURCE_FINGERPRINT),
            "input": g.value(Keys.HEADS_INPUT)}


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64) - np.max(x)
    e = np.exp(z)
    return e / e.sum()


def apply_heads(hidden: np.ndarray, heads: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Head logits and label probabilities for one hidden-state vector."""
    out = {}
    for head, (w, b, labels) in heads.items():
        logits = w.astype(np.float64) @ np.asarray(hidden, dtype=np.float64)
        if b is not None:
            logits = logits + b
        probs = softmax(logits)
        labels = labels or [f"label_{i}" for i in range(len(logits))]
        out[head] = {"logits": logits.tolist(), "probabilities": dict(zip(labels, probs.tolist())),
                     "label": labels[int(np.argmax(logits))]}
    return out


def run_heads(model_path: str, sidecar_path: str, text: str, n_threads: int | None = None) -> dict[str, Any]:
    from so8t_core.llama_runtime import LlamaCppModel

    side = load_heads(sidecar_path)
    model_meta = read_gguf(model_path)
    model_fp = model_meta.value(Keys.SOURCE_FINGERPRINT)
    if side["fingerprint"] and model_fp and side["fingerprint"] != model_fp:
        raise ValidationError(sidecar_path, "these heads were converted from a different checkpoint than the model "
                                            f"({side['fingerprint'][:12]}… vs {model_fp[:12]}…)",
                              "use the sidecar published with this model")
    with LlamaCppModel(model_path, n_ctx=2048, n_threads=n_threads, embeddings=True) as model:
        ids = model.tokenize(text, add_special=True)
        hidden = model.final_hidden_states_for_ids(ids)
        logits = model.logits(ids)[-1]
        top = np.argsort(-logits, kind="stable")[:TOP_TOKENS]
        probs = softmax(logits)
        task = {"next_tokens": [{"token": model.detokenize([int(t)], special=True), "id": int(t),
                                 "probability": float(probs[t])} for t in top]}
    if side["heads"]:
        width = next(iter(side["heads"].values()))[0].shape[1]
        if width != hidden.shape[1]:
            raise ValidationError(sidecar_path, f"heads read {width} features but the model's hidden state has "
                                                f"{hidden.shape[1]}", "use the sidecar published with this model")
    return {"text": text, "n_tokens": len(ids), "task": task, **apply_heads(hidden[-1], side["heads"])}


def render_heads(r: dict[str, Any]) -> str:
    lines = [f"{r['n_tokens']} tokens; outputs for the last one", "task (LM head), next token:"]
    for t in r["task"]["next_tokens"]:
        lines.append(f"  {t['token']!r:<20} {100 * t['probability']:6.2f}%")
    for head in ("safety", "authority"):
        if head in r:
            probs = ", ".join(f"{label} {100 * p:.1f}%" for label, p in r[head]["probabilities"].items())
            lines.append(f"{head}: {r[head]['label']} ({probs})")
    return "\n".join(lines)
