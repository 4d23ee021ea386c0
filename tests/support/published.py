"""Where a test's conversion put its files: the current version of the release latest.json points at."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

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


@contextmanager
def releases_without_plots() -> Iterator[None]:
    """Conversions whose releases go without their two PNG plots, for tests about the other files
    (the GGUFs' bytes): matplotlib takes ~0.3 s a mix, ~10 s for a fixture in every mix, all in the
    serial publish stage. test_convert and test_demo check the plots."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("flows.convert.write_plots", lambda *args, **kwargs: {})
        yield
