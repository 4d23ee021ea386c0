"""A small, strict safetensors header parser that works over byte ranges.

The safetensors package validates headers only for files it memory-maps locally; a
checkpoint on object storage is read here with two range requests (8 bytes, then
the header) and every tensor later with one more. The checks mirror the reference
implementation: a bounded header size, known dtypes, shapes that match byte
lengths, and offsets that tile the data section exactly, with no gaps, overlaps or
bytes past the end. A file that passes can be read tensor by tensor without ever
allocating more than one tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from so8t_core.errors import CheckpointError, short_repr

# Same bound as the reference implementation (safetensors' MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
# A tensor's byte size must fit a signed 64-bit integer (numpy's and torch's limit; the
# reference rejects sizes that overflow usize), and numpy handles at most 64 dimensions.
MAX_TENSOR_BYTES = (1 << 63) - 1
MAX_DIMS = 64

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorSlice:
    """Where one tensor lives: absolute byte range in its file, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorSlice]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def header_length(first8: bytes, file_size: int, where: str) -> int:
    """The header length from the first 8 bytes, checked against the file size."""
    if len(first8) < 8 or file_size < 8:
        raise CheckpointError(where, f"truncated safetensors file ({file_size} bytes)",
                              "re-download or re-save the shard")
    n = int.from_bytes(first8[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(where, f"safetensors header claims {n} bytes (limit {MAX_HEADER_BYTES})",
                              "the file is corrupt or not safetensors")
    if 8 + n > file_size:
        raise CheckpointError(where, f"truncated safetensors file: header needs {8 + n} bytes, file has {file_size}",
                              "re-download or re-save the shard")
    return n


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_header(header: bytes, file_size: int, where: str) -> SafetensorsHeader:
    """Parse and validate a header (the bytes after the 8-byte length)."""
    try:
        text = header.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(where, f"safetensors header is not valid JSON ({str(exc)[:200]})",
                              "the file is corrupt or not safetensors") from None
    except RecursionError:  # "[[[[...]]]]": nesting no real header has
        raise CheckpointError(where, "safetensors header is not valid JSON (nested too deeply)",
                              "the file is corrupt or not safetensors") from None
    if not isinstance(obj, dict):
        raise CheckpointError(where, "safetensors header is not a JSON object", "the file is corrupt")

    data_start = 8 + len(header)
    data_len = file_size - data_start
    metadata = obj.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise CheckpointError(where, "safetensors __metadata__ must map strings to strings", "the file is corrupt")

    tensors: dict[str, TensorSlice] = {}
    for name, info in obj.items():
        bad = f"tensor {short_repr(name)}"
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape ("\\ud800"): not a text name
            raise CheckpointError(where, f"{bad}: name is not valid Unicode", "the file is corrupt") from None
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"} \
                or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(where, f"{bad}: header entry needs exactly dtype, shape, data_offsets",
                                  "the file is corrupt")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise CheckpointError(where, f"{bad}: unknown dtype {short_repr(dtype)}", "the file is corrupt")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(where, f"{bad}: shape {short_repr(shape)} is not a list of non-negative integers",
                                  "the file is corrupt")
        if len(shape) > MAX_DIMS:
            raise CheckpointError(where, f"{bad}: shape has {len(shape)} dimensions (at most {MAX_DIMS})",
                                  "the file is corrupt")
        # Zero-sized dimensions aside, the element count must be a size a computer can hold.
        if math.prod(d for d in shape if d) * DTYPE_SIZES[dtype] > MAX_TENSOR_BYTES:
            raise CheckpointError(where, f"{bad}: shape {short_repr(shape)} declares more than 2**63 bytes",
                                  "the file is corrupt")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise CheckpointError(where, f"{bad}: data_offsets {short_repr(offsets)} are invalid",
                                  "the file is corrupt")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise CheckpointError(where, f"{bad}: {dtype}{short_repr(shape)} needs {expected} bytes but its "
                                         f"offsets span {offsets[1] - offsets[0]}", "the file is corrupt")
        if offsets[1] > data_len:
            raise CheckpointError(where, f"{bad}: data ends at byte {data_start + offsets[1]}, past the end of the "
                                         f"{file_size}-byte file", "the file is truncated; re-download it")
        tensors[name] = TensorSlice(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])

    # The data section must be tiled exactly: sorted ranges are contiguous from 0 to the end.
    cursor = data_start
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != cursor:
            problem = "overlaps another tensor" if t.start < cursor else f"leaves a gap at byte {cursor}"
            raise CheckpointError(where, f"tensor {short_repr(t.name)} {problem}", "the file is corrupt")
        cursor = t.end
    if cursor != file_size:
        raise CheckpointError(where, f"{file_size - cursor} bytes after the last tensor are not described by "
                                     "the header", "the file is corrupt or was appended to")
    return SafetensorsHeader(tensors=tensors, metadata=metadata, data_start=data_start, file_size=file_size)


def decode_float(raw: bytes | memoryview, dtype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Raw little-endian tensor bytes → float32 array (exact for F16/BF16/F32)."""
    if dtype == "F32":
        arr = np.frombuffer(raw, dtype="<f4")
    elif dtype == "F16":
        arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    elif dtype == "BF16":  # the upper half of a float32: shift into place, in one pass
        bits = np.frombuffer(raw, dtype="<u2")
        arr = np.left_shift(bits, 16, out=np.empty(bits.size, np.uint32), dtype=np.uint32).view(np.float32)
    elif dtype == "F64":
        with np.errstate(over="ignore"):  # beyond float32's range: Inf, refused by the finiteness check
            arr = np.frombuffer(raw, dtype="<f8").astype(np.float32)
    else:
        raise CheckpointError(where, f"dtype {dtype} is not a floating-point weight type",
                              f"weights must be one of {', '.join(FLOAT_DTYPES)}")
    return arr.reshape(shape)
