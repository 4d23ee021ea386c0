"""Plots of a conversion (PNG, matplotlib): quantization error per tensor by layer and type,
and bits per weight by tensor class. Published in each release and shown in its model card.

Deterministic: the same staged tensors give the same PNG bytes (Agg renderer, fixed size and
DPI, no software-version or date metadata).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from so8t_core.refs import StagedTensor

_PNG_METADATA = {"Software": None}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_tensor_errors(staged: Sequence[StagedTensor], title: str, path: str) -> str:
    """Relative RMSE of every quantized tensor against its float32 source, by layer, one marker
    per tensor type (lossless tensors, whose error is 0, are left out of the log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    by_type: dict[str, list[tuple[float, float]]] = defaultdict(list)
    n_layers = max((s.layer for s in staged if s.layer is not None), default=-1) + 1
    for s in staged:
        if s.relative_rmse > 0:
            x = s.layer if s.layer is not None else (-1 if "embd" in s.gguf_name else n_layers)
            by_type[s.ggml_type].append((x, s.relative_rmse))
    markers = "osD^v<>xP*"
    for i, (qtype, points) in enumerate(sorted(by_type.items())):
        xs, ys = zip(*points)
        ax.scatter(xs, ys, s=18, marker=markers[i % len(markers)], label=qtype, alpha=0.8)
    if by_type:
        ax.set_yscale("log")
        ax.legend(title="type", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (-1: token embedding; last: output)")
    ax.set_ylabel("relative RMSE vs float32 source")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=_PNG_METADATA)
    plt.close(fig)
    return path


def plot_bits_per_weight(staged: Sequence[StagedTensor], title: str, path: str) -> str:
    """Bits per weight of each tensor class (all tensors of the class together)."""
    plt = _pyplot()
    bits: dict[str, int] = defaultdict(int)
    params: dict[str, int] = defaultdict(int)
    for s in staged:
        bits[s.tensor_class] += 8 * s.nbytes
        params[s.tensor_class] += s.n_elements
    classes = sorted(bits, key=lambda c: (-bits[c] / params[c], c))
    values = [bits[c] / params[c] for c in classes]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    bars = ax.bar(range(len(classes)), values, color="#4c72b0")
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("bits per weight")
    total = sum(bits.values()) / max(1, sum(params.values()))
    ax.set_title(f"{title} (whole model: {total:.3f} bits per weight)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=_PNG_METADATA)
    plt.close(fig)
    return path


def plot_size_vs_kld(rows: Sequence[dict], title: str, path: str) -> str:
    """Each published quant's file size against its mean KLD from the F32 model (the model card's
    ``overview_rows``); F32 and BF16 marked. A KLD of 0 sits on the linear part of the scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for r in rows:
        if r.get("kld_mean") is None:
            continue
        base = r["quant"] in ("F32", "BF16")
        x, y = r["size"] / 1e6, r["kld_mean"]
        ax.scatter([x], [y], s=70 if base else 30, marker="*" if base else "o",
                   color="#c44e52" if base else "#4c72b0", zorder=3)
        ax.annotate(r["quant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KLD vs F32 (nats)")
    ax.set_title(title, wrap=True)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=_PNG_METADATA)
    plt.close(fig)
    return path
