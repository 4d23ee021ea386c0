"""What a run reports about itself: the per-tensor stats table and the Markdown summary.

Pure functions of a run's facts (no Prefect): ``tasks/artifacts.py`` turns them into Prefect
artifacts. Nothing here may carry credentials: URIs are shown without any user-info part.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

from so8t_core.constants import bits_per_weight
from so8t_core.refs import StagedTensor
from so8t_core.storage import redact_uri


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from free-form parts."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower())).strip("-")


def _num(x: float | None, fmt: str) -> str | float | None:
    if x is None:
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # JSON has no inf/nan; a table cell can say it
    return float(format(x, fmt))


def stats_rows(staged: Sequence[StagedTensor]) -> list[dict[str, Any]]:
    """One row per tensor: what the table artifact shows (the Parquet file has more)."""
    return [{
        "tensor": s.gguf_name, "type": s.ggml_type, "shape": "×".join(map(str, s.shape)), "bytes": s.nbytes,
        "bits/weight": _num(s.bits_per_weight, ".4g"), "relative RMSE": _num(s.relative_rmse, ".3g"),
        "cosine": _num(s.cosine, ".6g"), "SNR dB": _num(s.snr_db, ".4g"), "bake error": _num(s.bake_error, ".3g"),
    } for s in staged]


def human_size(n: float, decimals: int = 2) -> str:
    """A byte count in B, KiB, MiB or GiB (``decimals`` digits after the point above B)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.{decimals}f} {unit}"
        n /= 1024
    return str(n)


def summary_markdown(name: str, source: str, fingerprint: str, quants: Sequence[str],
                     staged: Mapping[str, Sequence[StagedTensor]], validations: Mapping[str, dict],
                     releases: Mapping[str, Mapping[str, Any]], max_bake_error: float,
                     failure: str | None = None) -> str:
    """The run's summary: outcome, per-quant size and validation, bake error, releases."""
    lines = [f"# {name}: {'FAILED' if failure else 'converted'}", "",
             f"- source: `{redact_uri(source)}`", f"- source fingerprint: `{fingerprint}`",
             f"- max bake error (gated layers): {max_bake_error:.3g}"]
    if failure:
        lines += ["", f"**{'Only the releases below were' if releases else 'Nothing was'} published.** {failure}"]
    lines += ["", "| quant | tensors | size | bits/weight | mean KLD | top-1 | tokenizer | validation |",
              "|---|---|---|---|---|---|---|---|"]
    for q in quants:
        tensors = staged.get(q, [])
        nbytes = sum(s.nbytes for s in tensors)
        n = sum(s.n_elements for s in tensors)
        v = validations.get(q)
        f = (v or {}).get("llama_cpp") or {}
        tok = (v or {}).get("tokenizer") or {}
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            q, len(tensors), human_size(nbytes), f"{bits_per_weight(nbytes, n):.2f}" if n else "-",
            f"{f['mean_kld']:.3g}" if "mean_kld" in f else "-",
            f"{100 * f['top1_agreement']:.1f}%" if "top1_agreement" in f else "-",
            ("same ids" if tok.get("ok") else "DIFFERENT") if tok else "-",
            "not run" if v is None else ("passed" if v["passed"] else "FAILED: " + "; ".join(v["failures"]))))
    if releases:
        lines += ["", "## Releases", ""]
        for q, r in releases.items():
            state = "unchanged, nothing uploaded" if r["uploaded"] == 0 else f"{r['uploaded']} files uploaded"
            lines.append(f"- {q}: `{redact_uri(r['uri'])}` ({state})")
    return "\n".join(lines) + "\n"


def render_conversion(result: Mapping[str, Any]) -> str:
    """The convert flow's result as the CLI prints it: fingerprint, bake error, LoRA, each quant's
    validation, and each release with its files."""
    lines = [f"converted {result['source']}", f"  fingerprint  {result['fingerprint']}",
             f"  bake error   {result['max_bake_error']:.2e} (max over gated layers)"]
    if result.get("lora"):
        lo = result["lora"]
        lines.append(f"  LoRA         {lo['uri']}: r={lo['r']}, alpha={lo['lora_alpha']:g}, scale {lo['scale']:.4g} "
                     f"({lo['scaling']}), merged into {len(lo['merged_tensors'])} tensors "
                     f"({', '.join(lo['effective_target_modules'])})")
    for quant, v in result["validation"].items():
        f = v.get("llama_cpp", {})
        lines.append(f"  validated    {quant}: mean KLD {f.get('mean_kld', float('nan')):.3g}, "
                     f"top-1 {100 * f.get('top1_agreement', float('nan')):.2f}% over {f.get('n_tokens')} tokens, "
                     f"{'passed' if v['passed'] else 'FAILED'}")
    for quant, release in result["releases"].items():
        state = "already published, nothing uploaded" if release["uploaded"] == 0 else "published"
        lines.append(f"{quant}: {release['uri']} ({state})")
        lines += [f"  {name:<48} {ref['size']:>12,} bytes" for name, ref in sorted(release["files"].items())]
        lines.append(f"  {'manifest.json':<48} {release['manifest']['size']:>12,} bytes")
    lines.append(f"latest: {result['latest']['uri']}")
    return "\n".join(lines)
