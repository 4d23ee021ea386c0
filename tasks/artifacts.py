"""Prefect artifacts of a conversion run: quantization progress, per-tensor stats tables, the
Markdown summary and where the published releases are (``so8t_core/publish/report.py`` renders them).

Artifacts are a view of the run for the UI, not part of its result: an API error while
creating one is logged and the run goes on.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping, Sequence
from uuid import UUID

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from so8t_core.constants import MODEL_CARD_NAME
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


# Where a browser can open what is published on S3 (docs/cli.md): a public https URL template
# with {bucket} and {key}, or else a presigned URL valid this many seconds. Neither: the s3://
# URI is shown as text.
PUBLIC_URL_ENV = "SO8T_GGUF_PUBLIC_URL"
PRESIGN_ENV = "SO8T_GGUF_PRESIGN_SECONDS"


def release_link(uri: str) -> tuple[str | None, str]:
    """(a URL a browser opens, or None; the release's location as text) for a release at ``uri``.

    A local folder is its absolute path, as text: Prefect's link artifacts take no file:// URL
    (and a relative one means nothing in a browser). On S3 the link is the release's model card
    (README.md), through SO8T_GGUF_PUBLIC_URL or a presigned URL (SO8T_GGUF_PRESIGN_SECONDS)
    when one is configured.
    """
    if uri.startswith(("http://", "https://")):
        return uri, redact_uri(uri)
    if "://" not in uri or uri.startswith("file://"):
        return None, os.path.abspath(uri.removeprefix("file://"))
    text = redact_uri(uri)
    if not uri.startswith("s3://"):
        return None, text
    bucket, _, prefix = text.removeprefix("s3://").partition("/")
    card = f"{prefix.rstrip('/')}/{MODEL_CARD_NAME}"
    if template := os.environ.get(PUBLIC_URL_ENV, "").strip():
        return template.format(bucket=bucket, key=card), text
    if seconds := os.environ.get(PRESIGN_ENV, "").strip():
        import fsspec

        return fsspec.filesystem("s3").sign(f"{bucket}/{card}", expiration=int(seconds)), text
    return None, text


def release_links(name: str, releases: Mapping[str, Mapping[str, Any]]) -> None:
    for quant, release in releases.items():
        def create(quant: str = quant, release: Mapping[str, Any] = release) -> None:
            url, where = release_link(release.get("version", release["uri"]))  # the version this run published
            key, title = artifact_key(name, quant, "release"), f"{name} {quant} release"
            description = f"{name} {quant}: the published release (manifest.json lists its files)"
            if url:
                create_link_artifact(url, link_text=title, key=key, description=description)
            else:
                create_markdown_artifact(f"**{title}**: `{where}`", key=key, description=description)

        _best_effort("release link", create)


def release_keys(name: str, quants: Sequence[str]) -> list[str]:
    """The keys of a conversion's summary and release artifacts (those a parent run repeats)."""
    return [artifact_key(name, "summary"), *(artifact_key(name, q, "release") for q in quants)]


def repeat_from(flow_run_id: UUID, keys: Sequence[str]) -> None:
    """The Markdown artifacts ``keys`` of run ``flow_run_id`` (a subflow of this run), on this run
    too. The deployment's run is the one the UI opens after "Submit": it shows the conversion's
    summary and where its releases are without a click into the subflow."""
    def repeat() -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=list(keys)), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        for artifact in sorted(found, key=lambda a: (list(keys).index(a.key), a.created)):
            if artifact.type == "markdown":  # link artifacts are stored as Markdown too
                create_markdown_artifact(artifact.data, key=artifact.key, description=artifact.description)

    _best_effort("summary and release", repeat)
