"""Stage 1, fetch: open the checkpoint lazily and fingerprint every tensor by byte range."""

from __future__ import annotations

from prefect import task

from so8t_core.refs import SourceRef
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.fingerprint import fingerprint
from so8t_core.storage import default_cache_dir
from tasks.common import STORAGE_RETRIES


@task(name="fetch-checkpoint", **STORAGE_RETRIES)
def fetch_checkpoint(source: str, work_dir: str) -> SourceRef:
    """Fingerprint every tensor; shards unchanged since an earlier run are not read again."""
    return fingerprint(Checkpoint.open(source, cache_dir=default_cache_dir()), cache_dir=work_dir)
