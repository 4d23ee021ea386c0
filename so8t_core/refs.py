"""Small, JSON-serializable references that pipeline stages pass to each other.

Stages never hand each other arrays: a tensor or a file travels as its URI, sha256
and size, plus the facts the next stage needs. These models are what Prefect tasks
take and return (and so what their cache keys are made of).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict

from so8t_core import storage
from so8t_core.constants import bits_per_weight


class FileRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    uri: str
    sha256: str
    size: int


def file_ref(uri: str) -> FileRef:
    """A file as stages pass it: where it is, its sha256 and its size."""
    return FileRef(uri=uri, sha256=storage.sha256_of(uri), size=storage.size(uri))


def inputs_key(*inputs: Any) -> str:
    """sha256 of what a derived file is made of (as JSON; references by their fields)."""
    def as_json(o: Any) -> Any:
        if isinstance(o, BaseModel):
            return o.model_dump(mode="json")
        return o.tolist() if hasattr(o, "tolist") else str(o)

    return hashlib.sha256(json.dumps(inputs, default=as_json, sort_keys=True).encode()).hexdigest()


def _identity(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def made_files(record: str, key: str, make: Callable[[], Sequence[str]]) -> list[FileRef]:
    """Local files made from inputs whose :func:`inputs_key` is ``key``: ``make()`` writes them and
    returns their paths, unless the record (``record``, a JSON file beside them: the key and each
    file's sha256, size and identity) says the files there were made from the same inputs and
    are untouched since. A re-run with nothing changed then neither writes nor reads them."""
    try:
        with open(record) as f:
            previous = json.load(f)
        if previous["key"] == key and all(os.path.exists(r["uri"]) and _identity(r["uri"]) == r["identity"]
                                          for r in previous["files"]):
            return [FileRef(uri=r["uri"], sha256=r["sha256"], size=r["size"]) for r in previous["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    refs = [file_ref(p) for p in make()]
    with storage.local_atomic_file(record) as tmp:
        with open(tmp, "w") as f:
            json.dump({"key": key, "files": [{**r.model_dump(), "identity": _identity(r.uri)} for r in refs]}, f)
    return refs


class SourceRef(BaseModel):
    """A fetched checkpoint: where it is and the content fingerprint of everything in it."""

    model_config = ConfigDict(frozen=True)

    uri: str
    fingerprint: str  # sha256 over config, tokenizer files and every tensor's bytes
    tensor_sha256: dict[str, str]
    n_bytes: int


class StagedTensor(BaseModel):
    """One output tensor, quantized and written to content-addressed staging."""

    # snr_db is +inf for lossless tensors; keep it exact through JSON.
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    gguf_name: str
    source: str
    layer: int | None
    tensor_class: str
    quant: str  # the --quant choice this belongs to
    ggml_type: str  # e.g. "Q8_0"
    shape: tuple[int, ...]
    uri: str
    sha256: str
    nbytes: int
    rmse: float
    relative_rmse: float
    max_abs_error: float
    cosine: float
    snr_db: float
    seconds: float
    bake_error: float | None = None

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return bits_per_weight(self.nbytes, self.n_elements)
