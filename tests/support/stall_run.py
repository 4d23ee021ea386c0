"""``python tests/support/stall_run.py POINT MARKER so8t-gguf-args...``: the CLI, stalled at POINT.

Test-only, like crash_run.py (whose points it uses): at the first call of POINT's function
the calling thread creates the file MARKER and then does not come back for a minute, with
SIGINT and SIGTERM blocked in that thread. That is a long tensor being quantized, or
llama.cpp busy in a C call: the thread runs no Python that could react to a signal, and the
process has to end on its own. tests/test_interrupts.py signals it there.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
import threading
import time

from crash_run import POINTS  # beside this file

# Run as a script, this folder is first on sys.path: nothing in it may shadow a package the CLI
# imports (a tests/support/tokenizers.py would hide Hugging Face's `tokenizers`).
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

STALL_S = 60


def arm(point: str, marker: str) -> None:
    module, attribute, _, _ = POINTS[point]
    owner = importlib.import_module(module)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    first = threading.Lock()

    @functools.wraps(real)
    def stalled(*args, **kwargs):
        if first.acquire(blocking=False):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            open(marker, "w").close()
            time.sleep(STALL_S)
        return real(*args, **kwargs)

    setattr(owner, name, stalled)


if __name__ == "__main__":
    # As a terminal's foreground job: Ctrl-C interrupts. (A suite started in the background by a
    # non-interactive shell hands its children SIGINT ignored, and Python then keeps it ignored.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from flows.cli import _quiet_prefect, main

    _quiet_prefect(verbose=False)  # arming may import Prefect: first, what the CLI sets before it does
    arm(sys.argv[1], sys.argv[2])

    sys.exit(main(sys.argv[3:]))
