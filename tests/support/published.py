"""Where a test's conversion put its files: the current version of the release latest.json points at."""

from __future__ import annotations

from pathlib import Path

from so8t_core.publish.release import current_version, latest_release


def release(out, name: str, quant: str) -> Path:
    """The local folder of the files of ``name`` at ``quant`` under the output ``out``: the version
    its release (the one latest.json names) is at now."""
    uri = latest_release(str(out), name, quant)
    assert uri is not None, f"no release of {name} {quant} under {out}"
    version = current_version(uri)
    assert version is not None, f"{uri} has no complete version"
    return Path(version.folder.removeprefix("file://"))


def gguf_path(out, name: str, quant: str) -> Path:
    """The (single-file) GGUF of that release."""
    return release(out, name, quant) / f"{name}-{quant}.gguf"
