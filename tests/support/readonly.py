"""A folder nobody can write to, even root (the tests run as root, where chmod stops nothing)."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


@contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """``path`` made as a folder that refuses new entries: mode 0555 for an ordinary user; for
    root, the immutable attribute (``chattr +i``: ext2/3/4, XFS, Btrfs; root needs
    CAP_LINUX_IMMUTABLE), since root ignores modes. Skips the test where neither works."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no way to make a read-only folder")
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i is not supported here ({made.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
