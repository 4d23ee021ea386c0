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
    """Bits per weight of each tensor class (all tensors of the class together), each bar as wide
    as the class's share of the file's tensor bytes: what the size is made of. A class too thin to
    see (norms: F32, a fraction of a percent of the bytes) does not set the scale."""
    plt = _pyplot()
    bits: dict[str, int] = defaultdict(int)
    params: dict[str, int] = defaultdict(int)
    for s in staged:
        bits[s.tensor_class] += 8 * s.nbytes
        params[s.tensor_class] += s.n_elements
    total_bits = max(1, sum(bits.values()))
    classes = sorted(bits, key=lambda c: (-bits[c], c))
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    x, visible, thin = 0.0, [], []
    for i, c in enumerate(classes):
        share, bpw = bits[c] / total_bits, bits[c] / max(1, params[c])
        ax.bar(x, bpw, width=share, align="edge", color=f"C{i % 10}", edgecolor="white", linewidth=0.5)
        if share >= 0.04:
            ax.annotate(f"{c}\n{bpw:.2f}", (x + share / 2, bpw), ha="center", va="bottom", fontsize=7)
        else:
            thin.append(f"{c} {bpw:.2f}")
        if share >= 0.01:
            visible.append(bpw)
        x += share
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.25 * max(visible or [1.0]))
    ax.set_xlabel("share of the file's tensor bytes" + (f" (thin: {', '.join(thin[:6])})" if thin else ""),
                  fontsize=8, wrap=True)
    ax.set_ylabel("bits per weight")
    total = sum(bits.values()) / max(1, sum(params.values()))
    ax.set_title(f"{title}\nwhole model: {total:.3f} bits per weight", fontsize=10)
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
        x, y = r["size"] / 2**20, r["kld_mean"]  # MiB, as the card's table
        ax.scatter([x], [y], s=70 if base else 30, marker="*" if base else "o",
                   color="#c44e52" if base else "#4c72b0", zorder=3)
        ax.annotate(r["quant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.margins(x=0.08, y=0.1)  # room for the labels of the points at the edges
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KLD vs F32 (nats)")
    ax.set_title(title, wrap=True)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=_PNG_METADATA)
    plt.close(fig)
    return path
