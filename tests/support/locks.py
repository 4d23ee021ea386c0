"""Processes racing for one publish lock (tests/test_concurrency.py): each waits for a common
start time, takes the lock, and notes whether another process was inside at the same time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

from so8t_core import storage
from so8t_core.publish import release as pub


def dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def plant_stale_lock(folder: str) -> None:
    """A lock whose holder, a process of this host, was killed: every publisher may take it over."""
    holder = {"token": f"stale-{time.time_ns()}", "host": socket.gethostname(), "pid": dead_pid(),
              "created": time.time()}
    storage.write_bytes_atomic(storage.join(folder, pub.LOCK_NAME), json.dumps(holder).encode())


def contend(folder: str, marker: str, start_at: float, hold: float) -> int:
    """Take ``folder``'s lock at ``start_at``; 1 when another holder was inside with us, else 0.
    ``marker`` (a local file) exists while someone is inside: created exclusively on entry."""
    time.sleep(max(0.0, start_at - time.time()))
    with pub.exclusive(folder):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return 1
        time.sleep(hold)
        os.close(fd)
        os.remove(marker)
    return 0
