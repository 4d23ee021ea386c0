"""Figures for docs/reliability.md: reliability tests append what they measured here.

When ``SO8T_RELIABILITY_FIGURES`` names a file (``benchmarks/reliability_figures.py`` sets it),
each call appends one JSON line to it; otherwise nothing is written. The tests assert the
guarantees themselves; this only counts them for the table.
"""

from __future__ import annotations

import json
import os
import threading

ENV = "SO8T_RELIABILITY_FIGURES"
_lock = threading.Lock()


def record(kind: str, **figures) -> None:
    """``kind``: faults | kill_point | concurrent_publish | concurrent_latest | lock_takeover | secrets |
    credentials | paths | resources; ``figures``: JSON values."""
    path = os.environ.get(ENV)
    if not path:
        return
    with _lock, open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": kind, **figures}, sort_keys=True) + "\n")
