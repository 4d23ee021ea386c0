"""Writing and reading GGUF files with gguf-py, one tensor at a time.

:func:`write_gguf` declares every tensor up front (name, shape, type, size), writes
the header, the metadata and the tensor infos, then streams the data one tensor at
a time from a callback, so peak memory is one tensor. The file appears at its path
only once complete. :func:`read_gguf` is its mirror for validation and ``inspect``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import gguf
import numpy as np

from . import storage
from .errors import ValidationError


@dataclass(frozen=True)
class GGUFKV:
    key: str
    value: Any
    vtype: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


def kv_str(key: str, value: str) -> GGUFKV:
    return GGUFKV(key, value, gguf.GGUFValueType.STRING)


def kv_u32(key: str, value: int) -> GGUFKV:
    return GGUFKV(key, int(value), gguf.GGUFValueType.UINT32)


def kv_f32(key: str, value: float) -> GGUFKV:
    return GGUFKV(key, float(value), gguf.GGUFValueType.FLOAT32)


def kv_bool(key: str, value: bool) -> GGUFKV:
    return GGUFKV(key, bool(value), gguf.GGUFValueType.BOOL)


def kv_array(key: str, values: Sequence[Any], sub_type: gguf.GGUFValueType) -> GGUFKV:
    return GGUFKV(key, list(values), gguf.GGUFValueType.ARRAY, sub_type)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy (row-major) order; GGUF stores it reversed
    ggml_type: gguf.GGMLQuantizationType
    nbytes: int


def write_gguf(path: str, arch: str, kvs: Sequence[GGUFKV], tensors: Sequence[TensorInfo],
               tensor_bytes: Callable[[TensorInfo], bytes]) -> None:
    """Write a complete GGUF v3 file at ``path`` (local), streaming tensor data."""
    with storage.local_atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        for kv in kvs:
            if kv.key == "general.architecture":
                continue  # written by the GGUFWriter constructor, always first
            writer.add_key_value(kv.key, kv.value, kv.vtype, kv.sub_type)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            data = tensor_bytes(t)
            if len(data) != t.nbytes:
                raise AssertionError(f"{t.name}: got {len(data)} bytes, declared {t.nbytes}")
            writer.write_tensor_data(np.frombuffer(data, dtype=np.uint8))
        writer.close()


@dataclass
class GGUFContents:
    """A GGUF file opened for reading (memory-mapped; nothing is copied up front)."""

    path: str
    reader: gguf.GGUFReader

    @property
    def metadata(self) -> dict[str, Any]:
        return {k: f.contents() for k, f in self.reader.fields.items() if not k.startswith("GGUF.")}

    def value(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    @property
    def tensors(self) -> list[gguf.ReaderTensor]:
        return self.reader.tensors

    def tensor(self, name: str) -> gguf.ReaderTensor:
        for t in self.reader.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @staticmethod
    def numpy_shape(t: gguf.ReaderTensor) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(t.shape.tolist()))

    def dequantized(self, t: gguf.ReaderTensor) -> np.ndarray:
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(self.numpy_shape(t)).astype(np.float32, copy=False)


def read_gguf(path: str) -> GGUFContents:
    """Open a GGUF file; anything that is not a readable GGUF is a one-line error."""
    if not os.path.isfile(path):
        raise ValidationError(path, "file not found", "check the path")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        looks = "JSON" if magic[:1] in (b"{", b"[") else "something else"
        raise ValidationError(path, f"not a GGUF file (starts with {magic!r}; looks like {looks})",
                              "a real GGUF starts with the bytes 'GGUF'; re-convert the model")
    try:
        return GGUFContents(path, gguf.GGUFReader(path))
    except Exception as exc:  # gguf-py raises ValueError/IndexError/struct.error on corrupt files
        raise ValidationError(path, f"corrupt GGUF file ({type(exc).__name__}: {str(exc)[:160]})",
                              "re-convert the model") from None
