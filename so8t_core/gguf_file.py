"""Writing and reading GGUF files with gguf-py, one tensor at a time.

:func:`write_gguf` declares every tensor up front (name, shape, type, size), writes
the header, the metadata and the tensor infos, then streams the data one tensor at
a time from a callback, so peak memory is one tensor. The file appears at its path
only once complete. :func:`read_gguf` is its mirror for validation and ``inspect``.
"""

from __future__ import annotations

import array
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import gguf
import numpy as np

from so8t_core.errors import UnsupportedError, ValidationError


def tensor_nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes a tensor of this shape and type takes in a GGUF file."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


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


@dataclass(frozen=True)
class Split:
    """How to cut a model into files llama.cpp loads as a set (0 = no limit)."""

    max_tensors: int = 0
    max_bytes: int = 0

    @property
    def active(self) -> bool:
        return bool(self.max_tensors or self.max_bytes)


NO_SPLIT = Split()
_SIZE_UNITS = {"K": 1000, "M": 1000 ** 2, "G": 1000 ** 3}


def parse_split_size(text: str) -> int:
    """'500M', '2G', '1000000' → bytes, with the decimal units llama.cpp's converter uses."""
    t = text.strip().upper()
    unit = _SIZE_UNITS.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in _SIZE_UNITS else t
    if not digits.isdigit() or int(digits) <= 0:
        raise UnsupportedError(f"--split-max-size {text}", "not a size",
                               "a positive number, optionally followed by K, M or G (decimal)")
    return int(digits) * unit


def write_gguf(path: str, arch: str | None, kvs: Sequence[GGUFKV], tensors: Sequence[TensorInfo],
               tensor_bytes: Callable[[TensorInfo], bytes], split: Split = NO_SPLIT) -> list[str]:
    """Write a complete GGUF v3 file at ``path`` (local), streaming tensor data. ``arch`` None:
    a file that is not a model (an importance matrix), without ``general.architecture``.

    With ``split`` the model is cut into ``<stem>-00001-of-0000N.gguf`` files, as llama.cpp's
    gguf-split names them: every file carries ``split.*`` keys, the first the model's
    metadata. Files are written in a temporary folder and moved into place only when all
    are complete. Returns the written paths, the first being the one to load.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp_dir = os.path.join(folder, f".tmp-{os.path.basename(path)}-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        writer = gguf.GGUFWriter(os.path.join(tmp_dir, os.path.basename(path)), arch or "",
                                 split_max_tensors=split.max_tensors, split_max_size=split.max_bytes)
        if arch is None:  # the constructor always adds it
            writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        for kv in kvs:
            if kv.key == "general.architecture":
                continue  # written by the GGUFWriter constructor, always first
            writer.add_key_value(kv.key, kv.value, kv.vtype, kv.sub_type)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
        names = [p.name for p in writer.format_shard_names(writer.path)]
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            data = tensor_bytes(t)
            if len(data) != t.nbytes:
                raise AssertionError(f"{t.name}: got {len(data)} bytes, declared {t.nbytes}")
            writer.write_tensor_data(np.frombuffer(data, dtype=np.uint8))
        writer.close()
        out = []
        for name in names:
            os.replace(os.path.join(tmp_dir, name), os.path.join(folder, name))
            out.append(os.path.join(folder, name))
        return out
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _value_nbytes(vtype: gguf.GGUFValueType, value: Any, sub_type: gguf.GGUFValueType | None = None) -> int:
    if vtype == gguf.GGUFValueType.STRING:
        return 8 + len(value.encode("utf-8") if isinstance(value, str) else value)
    if vtype == gguf.GGUFValueType.ARRAY:  # element type, count, elements
        return 4 + 8 + sum(_value_nbytes(sub_type, v) for v in value)
    return np.dtype(gguf.GGUFReader.gguf_scalar_to_np[vtype]).itemsize  # gguf-py's scalar types, as the reader's


def gguf_size(arch: str | None, kvs: Sequence[GGUFKV], tensors: Sequence[TensorInfo]) -> int:
    """The size of the file :func:`write_gguf` writes (unsplit) from these keys and tensors, without
    writing it: the GGUF v3 layout (header, keys, tensor infos, padding to the alignment, each
    tensor's data padded to it)."""
    keys = [(kv.key, kv.vtype, kv.value, kv.sub_type) for kv in kvs if kv.key != "general.architecture"]
    if arch is not None:
        keys.insert(0, ("general.architecture", gguf.GGUFValueType.STRING, arch, None))
    align = next((int(v) for k, _, v, _ in keys if k == "general.alignment"), gguf.GGUF_DEFAULT_ALIGNMENT)
    size = 4 + 4 + 8 + 8  # magic, version, tensor count, key count
    size += sum(8 + len(k.encode()) + 4 + _value_nbytes(vtype, v, sub) for k, vtype, v, sub in keys)
    size += sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in tensors)
    pad = lambda n: -(-n // align) * align  # noqa: E731
    return pad(size) + sum(pad(t.nbytes) for t in tensors)


def split_paths(first: str) -> list[str]:
    """All files of a model given its first file (itself, when the model is not split)."""
    m = SPLIT_NAME_RE.match(os.path.basename(first))
    if not m:
        return [first]
    folder = os.path.dirname(first)
    return [os.path.join(folder, f"{m.group(1)}-{i:05d}-of-{m.group(3)}.gguf") for i in range(1, int(m.group(3)) + 1)]


SPLIT_NAME_RE = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


@dataclass
class GGUFContents:
    """A GGUF file opened for reading (memory-mapped; nothing is copied up front)."""

    path: str
    reader: gguf.GGUFReader

    @property
    def metadata(self) -> dict[str, Any]:
        return {k: f.contents() for k, f in self.reader.fields.items() if not k.startswith("GGUF.")}

    def kvs(self) -> list[GGUFKV]:
        """The metadata as :func:`write_gguf` takes it (a file written from another's tensors)."""
        return [GGUFKV(k, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
                for k, f in self.reader.fields.items() if not k.startswith("GGUF.")]

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
        if not t.n_elements:  # a zero-sized dimension (ggml allows it; gguf-py cannot dequantize it)
            return np.zeros(self.numpy_shape(t), dtype=np.float32)
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(self.numpy_shape(t)).astype(np.float32, copy=False)


def pair_tensors(tensors: Sequence[gguf.ReaderTensor], expected: Sequence[tuple[str, tuple[int, ...]]],
                 problems: list[str], allowed_types: Callable[[int], Sequence] | None = None,
                 in_order: bool = False) -> list[tuple[int, gguf.ReaderTensor]]:
    """Read-back, the structural part: a file's ``tensors`` against the ``expected`` (name, numpy
    shape) list. Unexpected and missing tensors (and, ``in_order``, reordered ones), shapes and
    types (the types ``allowed_types(i)`` allows for expected tensor ``i``) go to ``problems``; the
    (index in ``expected``, file tensor) pairs that passed come back for the caller to compare
    their contents its own way."""
    by_name = {t.name: t for t in tensors}
    names = [name for name, _ in expected]
    extra = [t.name for t in tensors if t.name not in set(names)]
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra[:5])}")
    if in_order and [t.name for t in tensors if t.name in set(names)] != [n for n in names if n in by_name]:
        problems.append("tensors are not in the planned order")
    pairs = []
    for i, (name, shape) in enumerate(expected):
        t = by_name.get(name)
        if t is None:
            problems.append(f"{name} missing")
            continue
        if GGUFContents.numpy_shape(t) != tuple(shape):
            problems.append(f"{name}: shape {list(GGUFContents.numpy_shape(t))}, expected {list(shape)}")
            continue
        if allowed_types is not None and t.tensor_type not in (allowed := allowed_types(i)):
            problems.append(f"{name}: type {t.tensor_type.name}, expected "
                            + " or ".join(getattr(a, "name", str(a)) for a in allowed))
            continue
        pairs.append((i, t))
    return pairs


# What a reader builds from a file is bounded by these counts and by the file's size, whatever its
# header declares. gguf-py builds a numpy view (hundreds of bytes) per array item, so a 32 MB
# file of 4,000,000 empty strings cost it 4 GB and minutes; here an array is one view (and, for
# strings, one offset per item), and the counts below refuse such a file before anything is built.
# The largest real vocabularies (262k tokens: tokens, scores, types, merges) hold about a million
# items in all.
MAX_METADATA_KEYS = 1 << 16
MAX_METADATA_ITEMS = 1 << 21  # array items over all the keys of a file
MAX_TENSORS = 1 << 16


class _ArrayField(gguf.ReaderField):
    """A metadata array read compactly: ``parts[-1]`` holds every value (a numeric array), or, for an
    array of strings, ``parts[-2]`` the bytes of the whole array and ``parts[-1]`` where each
    string's length prefix starts in them (one more entry: the end); strings are decoded when asked."""

    __slots__ = ()

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        if self.types[-1] != gguf.GGUFValueType.STRING:
            return self.parts[-1].tolist()[index_or_slice]
        raw, starts = memoryview(self.parts[-2]), self.parts[-1].tolist()
        if isinstance(index_or_slice, int):
            i = range(len(starts) - 1)[index_or_slice]
            return str(raw[starts[i] + 8:starts[i + 1]], "utf-8")
        return [str(raw[starts[i] + 8:starts[i + 1]], "utf-8") for i in range(len(starts) - 1)[index_or_slice]]


class _CheckedReader(gguf.GGUFReader):
    """gguf-py's reader with the bounds checks llama.cpp's loader has and gguf-py lacks, and with
    memory bounded by the file's size.

    gguf-py returns a short (or empty) array for a read past the end of the file, so an array whose
    count runs past the end loops for ever on empty reads; here such a read is an error. Counts
    past :data:`MAX_METADATA_KEYS`, :data:`MAX_METADATA_ITEMS` (over all arrays) and
    :data:`MAX_TENSORS` are refused before anything is built, and each array is read as one view.
    Arrays of arrays are refused (llama.cpp does not read them either).
    """

    def __init__(self, path: str) -> None:
        self._items = 0
        super().__init__(path)

    def _get(self, offset, dtype, count=1, override_order=None):
        if int(offset) + np.dtype(dtype).itemsize * int(count) > len(self.data):
            raise ValueError(f"{int(count)} x {np.dtype(dtype).name} at byte {int(offset)} run past the end of "
                             f"the {len(self.data)}-byte file")
        return super()._get(offset, dtype, count, override_order)

    def _build_fields(self, offs, count):
        if int(count) > MAX_METADATA_KEYS:
            raise ValueError(f"the header declares {int(count)} metadata keys (at most {MAX_METADATA_KEYS})")
        for _ in range(int(count)):
            orig_offs = offs
            key_len, key_data = self._get_str(offs)
            offs += int(key_len.nbytes + key_data.nbytes)
            raw_type = self._get(offs, np.uint32)
            offs += int(raw_type.nbytes)
            key, parts = bytes(key_data).decode("utf-8"), [key_len, key_data, raw_type]
            if int(raw_type[0]) == gguf.GGUFValueType.ARRAY:
                size, field = self._array_field(orig_offs, key, parts, offs)
            else:
                size, value_parts, idxs, types = self._get_field_parts(offs, raw_type[0])
                field = gguf.ReaderField(orig_offs, key, parts + value_parts, [i + len(parts) for i in idxs], types)
            self._push_field(field, skip_sum=True)
            offs += size
        return offs

    def _array_field(self, orig_offs: int, key: str, parts: list, offs: int) -> tuple[int, _ArrayField]:
        """(bytes the array takes after its key and type, its field)."""
        item_type = self._get(offs, np.uint32)
        n_items = self._get(offs + 4, np.uint64)
        count, start = int(n_items[0]), offs + 12
        self._items += count
        if self._items > MAX_METADATA_ITEMS:
            raise ValueError(f"metadata array {key!r} at byte {orig_offs} declares {count} items (at most "
                             f"{MAX_METADATA_ITEMS} in all arrays of a file)")
        gtype = gguf.GGUFValueType(int(item_type[0]))
        parts = [*parts, item_type, n_items]
        if gtype == gguf.GGUFValueType.STRING:
            starts = array.array("q")
            order = "=" if self.byte_order == "I" else (">" if sys.byteorder == "little" else "<")
            view, end, unpack = memoryview(self.data), start, struct.Struct(order + "Q")
            for _ in range(count):
                if end + 8 > len(view):
                    raise ValueError(f"metadata array {key!r} runs past the end of the {len(view)}-byte file")
                starts.append(end - start)
                end += 8 + unpack.unpack_from(view, end)[0]
            if end > len(view):
                raise ValueError(f"metadata array {key!r} runs past the end of the {len(view)}-byte file")
            starts.append(end - start)
            parts += [self._get(start, np.uint8, end - start), np.frombuffer(starts, dtype=np.int64)]
        elif (nptype := self.gguf_scalar_to_np.get(gtype)) is not None:
            parts.append(self._get(start, nptype, count))
            end = start + int(parts[-1].nbytes)
        else:
            raise ValueError(f"metadata array {key!r} holds {gtype.name} items (arrays of arrays are not supported)")
        return end - offs, _ArrayField(orig_offs, key, parts, [len(parts) - 1], [gguf.GGUFValueType.ARRAY, gtype])

    def _build_tensor_info(self, offs, count):
        if int(count) > MAX_TENSORS:
            raise ValueError(f"the header declares {int(count)} tensors (at most {MAX_TENSORS})")
        return super()._build_tensor_info(offs, count)


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
        reader = _CheckedReader(path)
        for field in reader.fields.values():
            field.contents()  # decode every value now (e.g. strings that are not UTF-8), not when first used
        return GGUFContents(path, reader)
    except Exception as exc:  # gguf-py raises ValueError/IndexError/struct.error on corrupt files
        raise ValidationError(path, f"corrupt GGUF file ({type(exc).__name__}: {str(exc)[:160]})",
                              "re-convert the model") from None
