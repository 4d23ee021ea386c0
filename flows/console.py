"""Progress on the terminal for the CLI: one line per stage, a bar with ETA for the tensors.

Off unless the CLI turns it on (``enable()``); the flow reports to it the same way whether or
not anyone watches, so runs from Python, a deployment or a test print nothing. Writes to
stderr, so ``--json`` output on stdout stays machine-readable.
"""

from __future__ import annotations

import sys
import threading
import time

_lock = threading.Lock()
_state = {"enabled": False, "start": 0.0, "bar": None}


def enable() -> None:
    _state.update(enabled=True, start=time.monotonic())


def disable() -> None:
    close_bar()
    _state["enabled"] = False


def stage(text: str) -> None:
    """A stage starts (or a step of one finishes): ``[  12.3s] text``."""
    if not _state["enabled"]:
        return
    with _lock:
        close_bar()
        print(f"[{time.monotonic() - _state['start']:7.1f}s] {text}", file=sys.stderr, flush=True)


def start_bar(total: int, what: str) -> None:
    if not _state["enabled"]:
        return
    from tqdm import tqdm

    with _lock:
        close_bar()
        _state["bar"] = tqdm(total=total, desc=what, unit="tensor", file=sys.stderr, dynamic_ncols=True,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}]")


def update_bar(done: int) -> None:
    bar = _state["bar"]
    if bar is not None and done > bar.n:
        with _lock:
            bar.update(done - bar.n)


def close_bar() -> None:
    bar = _state["bar"]
    if bar is not None:
        bar.close()
        _state["bar"] = None


def abandon() -> None:
    """The run ends here (Ctrl-C, from any thread): no more progress, and the bar's line is
    ended as it stands, so the CLI's last line starts a line of its own."""
    _state["enabled"] = False
    if _state["bar"] is not None:
        _state["bar"] = None
        print(file=sys.stderr, flush=True)
