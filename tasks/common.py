"""What every stage shares: opening a checkpoint once per process, and the retry policy."""

from __future__ import annotations

import functools

from so8t_core.errors import So8tError, StorageAccessError, StorageError
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.storage import default_cache_dir


@functools.lru_cache(maxsize=8)
def open_checkpoint(uri: str, fingerprint: str) -> Checkpoint:
    """One Checkpoint per source version per process: headers are read once, tensors on demand.

    Keyed by the fingerprint the fetch stage computed, so a checkpoint changed between two
    runs in one process (a test, a long-lived worker) is opened afresh.
    """
    return Checkpoint.open(uri, cache_dir=default_cache_dir())


def retry_transient(task, task_run, state) -> bool:
    """Retry storage/network trouble; never retry a deterministic failure of the input."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:  # the failure's exception
            exc = e
    if isinstance(exc, StorageError):
        return not isinstance(exc, StorageAccessError)  # a missing bucket stays missing
    return not isinstance(exc, (So8tError, AssertionError, ValueError, TypeError, KeyError))


# Storage and network steps: a few retries with backoff.
STORAGE_RETRIES = dict(retries=3, retry_delay_seconds=[1, 4, 15], retry_jitter_factor=0.2,
                       retry_condition_fn=retry_transient)
