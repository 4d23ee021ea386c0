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
    """What a reader sees: None (no release) or the current version's files, each checked against
    its manifest."""
    version = pub.current_version(release)
    if version is None:
        return None
    for name, info in version.manifest["files"].items():
        data = storage.read_bytes(storage.join(version.folder, name))
        assert len(data) == info["size"] and hashlib.sha256(data).hexdigest() == info["sha256"], name
    return version.manifest["files"]


def listing(uri: str) -> list[str]:
    """Every file under ``uri``, as paths below it."""
    fs, path = storage.resolve(uri)
    fs.invalidate_cache()
    return sorted(p[len(path):].lstrip("/") for p in fs.find(path, withdirs=False))


def version_listing(release: str) -> list[str]:
    """The files of the release's current version (its folder's listing)."""
    version = pub.current_version(release)
    assert version is not None, f"no complete version in {release}"
    return listing(version.folder)


def versions(release: str) -> list[str]:
    """The version folders a release holds."""
    return sorted({p.split("/", 1)[0] for p in listing(release) if p.startswith(pub.VERSION_PREFIX)})
