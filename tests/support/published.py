"""Where a test's conversion put its files: the release ``latest.json`` points at."""

from __future__ import annotations

from pathlib import Path

from so8t_core.publish.release import latest_release


def release(out, name: str, quant: str) -> Path:
    """The local release folder of ``name`` at ``quant`` under the output ``out``."""
    uri = latest_release(str(out), name, quant)
    assert uri is not None, f"no release of {name} {quant} under {out}"
    return Path(uri.removeprefix("file://"))


def gguf_path(out, name: str, quant: str) -> Path:
    """The (single-file) GGUF of that release."""
    return release(out, name, quant) / f"{name}-{quant}.gguf"
