"""Stage 1, fetch: open the checkpoint lazily and fingerprint every tensor by byte range."""

from __future__ import annotations

from prefect import task

from so8t_core.checkpoint import fingerprint
from so8t_core.refs import SourceRef

from .common import STORAGE_RETRIES, open_checkpoint


@task(name="fetch-checkpoint", **STORAGE_RETRIES)
def fetch_checkpoint(source: str) -> SourceRef:
    return fingerprint(open_checkpoint(source))
