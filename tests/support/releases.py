"""Releases as a reader sees them, and local files to publish."""

import hashlib

from so8t_core import storage
from so8t_core.publish import release as pub
from so8t_core.refs import file_ref

FP_A = "a" * 64


FP_B = "b" * 64


def local_files(tmp_path, tag: str, names=("m-Q4_K_M.gguf", "m-Q4_K_M.stats.parquet", "README.md")):
    folder = tmp_path / f"local-{tag}"
    folder.mkdir(exist_ok=True)
    refs = {}
    for name in names:
        path = folder / name
        path.write_bytes(f"{name} {tag} ".encode() * 1000)
        refs[name] = file_ref(str(path))
    return refs


def visible(release: str) -> dict | None:
    """What a reader sees: None (no release) or the files, each checked against the manifest."""
    manifest = pub.read_manifest(release)
    if manifest is None:
        return None
    for name, info in manifest["files"].items():
        data = storage.read_bytes(storage.join(release, name))
        assert len(data) == info["size"] and hashlib.sha256(data).hexdigest() == info["sha256"], name
    return manifest["files"]


def listing(uri: str) -> list[str]:
    fs, path = storage.resolve(uri)
    fs.invalidate_cache()
    return sorted(p[len(path):].lstrip("/") for p in fs.find(path, withdirs=False))
