"""Publishing a release: copy files to the destination, verify them, write the manifest last.

Each file is uploaded, then its size and sha256 are checked at the destination; only
when every file checks out is ``manifest.json`` written. A reader that trusts only
releases with a manifest never sees a partial one.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from . import storage
from .constants import MANIFEST_NAME
from .errors import StorageError
from .refs import FileRef


def publish_release(files: Mapping[str, FileRef], dest: str, manifest_extra: Mapping[str, Any]) -> FileRef:
    """Upload ``files`` (name → local FileRef) to ``dest``; return the manifest's ref."""
    storage.makedirs(dest)
    for name, ref in files.items():
        target = storage.join(dest, name)
        if storage.exists(target) and storage.size(target) == ref.size and storage.sha256_of(target) == ref.sha256:
            continue  # already published: same bytes
        storage.upload_file(ref.uri, target)
        if storage.size(target) != ref.size or storage.sha256_of(target) != ref.sha256:
            raise StorageError(target, "verification failed after upload (size or sha256 differs)",
                               "retry; the destination may be unreliable")
    manifest = {
        **manifest_extra,
        "files": {name: {"sha256": ref.sha256, "size": ref.size} for name, ref in sorted(files.items())},
    }
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    target = storage.join(dest, MANIFEST_NAME)
    storage.write_bytes_atomic(target, data)
    return FileRef(uri=target, sha256=storage.sha256_bytes(data), size=len(data))
