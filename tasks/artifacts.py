"""Prefect artifacts of a conversion run: quantization progress, per-tensor stats tables, the
Markdown summary and links to the published releases (``so8t_core/publish/report.py`` renders them).

Artifacts are a view of the run for the UI, not part of its result: an API error while
creating one is logged and the run goes on.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence
from uuid import UUID

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from so8t_core.publish.report import artifact_key, stats_rows, summary_markdown
from so8t_core.refs import StagedTensor
from so8t_core.storage import redact_uri

log = logging.getLogger("so8t_gguf.artifacts")


def _best_effort(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a UI view must not fail a conversion
        log.warning("could not create the %s artifact: %s", what, exc)
        return None


class QuantizeProgress:
    """A progress artifact for the quantize stage, updated as tensors finish (about every 2%)."""

    def __init__(self, name: str, total: int):
        self.total, self.reported = max(1, total), -1.0
        self.id: UUID | None = _best_effort("progress", lambda: create_progress_artifact(
            0.0, key=artifact_key(name, "quantize-progress"), description=f"{name}: tensors quantized (%)"))

    def update(self, done: int) -> None:
        pct = round(100.0 * done / self.total, 1)
        if self.id is not None and (pct - self.reported >= 2.0 or pct >= 100.0) and pct != self.reported:
            self.reported = pct
            _best_effort("progress", lambda: update_progress_artifact(self.id, pct))


def stats_tables(name: str, staged: Mapping[str, Sequence[StagedTensor]]) -> None:
    for quant, tensors in staged.items():
        _best_effort("stats table", lambda: create_table_artifact(
            stats_rows(tensors), key=artifact_key(name, quant, "tensor-stats"),
            description=f"{name} {quant}: per-tensor type, size and quantization error"))


def summary(name: str, **facts) -> None:
    _best_effort("summary", lambda: create_markdown_artifact(
        summary_markdown(name, **facts), key=artifact_key(name, "summary"),
        description=f"{name}: conversion summary"))


def plots(name: str, quant: str, pngs: Mapping[str, str]) -> None:
    """The release's plots, inlined (data URIs): the UI shows them without reaching the store."""
    import base64

    body = "\n\n".join(f"![{n}](data:image/png;base64,{base64.b64encode(open(p, 'rb').read()).decode()})"
                         for n, p in sorted(pngs.items()))
    _best_effort("plots", lambda: create_markdown_artifact(
        f"# {name} {quant}\n\n{body}\n", key=artifact_key(name, quant, "plots"),
        description=f"{name} {quant}: quantization error per tensor and bits per weight by tensor class"))


def release_links(name: str, releases: Mapping[str, Mapping[str, Any]]) -> None:
    for quant, release in releases.items():
        uri = redact_uri(release["uri"])
        uri = uri if "://" in uri else "file://" + uri
        _best_effort("release link", lambda: create_link_artifact(
            uri, link_text=f"{name} {quant} release", key=artifact_key(name, quant, "release"),
            description=f"{name} {quant}: the published release (manifest.json lists its files)"))
