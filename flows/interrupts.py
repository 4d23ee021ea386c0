"""Ctrl-C and SIGTERM: the CLI ends within a second or two, with one line and status 130 or 143.

SIGINT raises ``KeyboardInterrupt`` in the main thread, and SIGTERM raises
:class:`Terminated` there (Prefect's flow engine turns a SIGTERM into its own exception while
a flow runs, marks the run crashed, then hands the signal back to this handler). The main
thread then ends the process at once (:func:`leave`): quantize tasks still running in other
threads must not hold the exit up, and nothing they could still do is needed, since a release
is committed atomically (an interrupted publish leaves the previous release, or an invisible
one the next run completes).

The main thread cannot always take the exception in time: Python runs signal handlers
between bytecodes, and a long C call (llama.cpp evaluating, a quantizer) holds it. So a
watcher thread also hears each signal (``signal.set_wakeup_fd``: the C-level handler writes
the signal's number to a pipe the moment it arrives) and, if the process is still there
:data:`GRACE_S` later, ends it itself.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable, NoReturn

GRACE_S = 1.0  # what the main thread gets to mark the run crashed and leave on its own
MESSAGES = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}

_leaving = threading.Lock()


class Terminated(BaseException):
    """SIGTERM, as ``KeyboardInterrupt`` is SIGINT (a BaseException: no ``except Exception`` catches it)."""


def signal_of(exc: BaseException) -> int | None:
    """The signal an exception stands for: Ctrl-C, our SIGTERM, or Prefect's (``TerminationSignal``)."""
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(exc, Terminated):
        return signal.SIGTERM
    prefect_exceptions = sys.modules.get("prefect.exceptions")
    if prefect_exceptions is not None and isinstance(exc, prefect_exceptions.TerminationSignal):
        return exc.signal if exc.signal in MESSAGES else signal.SIGTERM
    return None


def leave(signum: int) -> NoReturn:
    """One line on stderr, then exit with 128 + the signal's number, at once (from any thread)."""
    with _leaving:  # whoever comes first (the main thread or the watcher) says it, once
        from flows import console

        console.abandon()
        word, status = MESSAGES[signum]
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stdout must not cost the one line
            pass
        print(f"so8t-gguf: {word}", file=sys.stderr, flush=True)
        os._exit(status)


def install() -> Callable[[], None]:
    """SIGTERM raises :class:`Terminated`, and the watcher listens; returns what undoes both
    (``main`` may run inside another program, a test)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    threading.Thread(target=_watch, args=(read_end,), name="so8t-gguf-signals", daemon=True).start()

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous_term)
        signal.set_wakeup_fd(previous_fd)
        os.close(write_end)  # the watcher reads end-of-file and stops

    return restore


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _watch(read_end: int) -> None:
    try:
        while data := os.read(read_end, 64):
            for signum in data:
                if signum in MESSAGES:
                    time.sleep(GRACE_S)
                    leave(signum)
    finally:
        os.close(read_end)
