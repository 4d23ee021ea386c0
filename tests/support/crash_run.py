"""``python tests/support/crash_run.py POINT so8t-gguf-args...``: the CLI, killed with SIGKILL at POINT.

Test-only: the hooks live here, never in the library. Each point wraps one library function
and kills the process (as the OOM killer or a lost machine would: no cleanup, no ``finally``)
before or after its Nth call. tests/test_crash.py runs the matrix.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
import threading

# point -> (module, attribute, N, "before" | "after" the Nth call); what the run has done by then.
POINTS = {
    "fetch": ("so8t_core.source.checkpoint", "Checkpoint.tensor_sha256", 3, "before"),  # fingerprinting shards
    "quantize": ("so8t_core.quantize.staging", "_StagedWriter.finish", 3, "after"),  # 3 tensors staged
    "assemble": ("gguf", "GGUFWriter.write_tensor_data", 3, "after"),  # a partial GGUF on disk
    "validate": ("tasks.validate", "check_functional", 1, "before"),  # the model loaded in llama.cpp
    "publish-upload": ("so8t_core.storage", "upload_file", 2, "after"),  # 2 files staged at the destination
    "publish-verified": ("so8t_core.publish.release", "exclusive", 1, "before"),  # all staged and verified
    "publish-commit": ("so8t_core.storage", "move", 2, "after"),  # 2 files moved into the new version
    "publish-manifest": ("so8t_core.storage", "write_bytes_atomic", 1, "before"),  # moved, no manifest yet
    "publish-switch": ("so8t_core.storage", "write_bytes_atomic", 2, "before"),  # version complete, not current
    "publish-cleanup": ("so8t_core.storage", "write_bytes_atomic", 2, "after"),  # switched, old versions not pruned
    "publish-latest": ("so8t_core.storage", "write_bytes_atomic", 3, "before"),  # latest.json's lock held
}
# Points inside the commit, where a re-publish of the same release (new bytes, same source) is
# killed too: the release's current version must stay readable throughout.
COMMIT_POINTS = ("publish-commit", "publish-manifest", "publish-switch", "publish-cleanup")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    module, attribute, nth, when = POINTS[point]
    owner = importlib.import_module(module)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    lock, calls = threading.Lock(), [0]

    @functools.wraps(real)
    def hooked(*args, **kwargs):
        with lock:
            calls[0] += 1
            n = calls[0]
        if n == nth and when == "before":
            die()
        out = real(*args, **kwargs)
        if n == nth and when == "after":
            die()
        return out

    setattr(owner, name, hooked)


if __name__ == "__main__":
    arm(sys.argv[1])
    from flows.cli import main

    sys.exit(main(sys.argv[2:]))
