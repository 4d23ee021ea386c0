"""Importance matrices, read as llama-quantize reads them (``--imatrix FILE``).

Two formats exist (llama.cpp common/imatrix-loader.cpp):

* GGUF: per weight ``<name>.in_sum2`` (sums of squared activations, F32) and
  ``<name>.counts`` (F32, one per expert), with ``imatrix.datasets``,
  ``imatrix.chunk_count`` and ``imatrix.chunk_size``; the importance is
  ``in_sum2 / count`` (1 where a count is 0);
* legacy ``.dat``: ``int32 n_entries``, then per entry ``int32 len, name, int32 ncall,
  int32 nval, float32[nval]`` (already averaged, times ncall), then optionally
  ``int32 chunk_count, int32 len, dataset``; the importance is ``values / ncall``.

Values are computed in float32, exactly as llama-quantize does, since they steer the
quantizer and so the output bytes. :func:`write_imatrix` writes the GGUF format as
llama-imatrix does (what :mod:`so8t_core.quantize.calibration` computes).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from gguf import GGMLQuantizationType

from so8t_core import storage
from so8t_core.errors import CheckpointError

KV_FILE = "quantize.imatrix.file"
KV_DATASET = "quantize.imatrix.dataset"
KV_ENTRIES = "quantize.imatrix.entries_count"
KV_CHUNKS = "quantize.imatrix.chunks_count"
UNQUANTIZED_TYPES = ("F32", "F16", "BF16")  # types whose tensors are written without an imatrix
MAX_KV_STRING = 127  # llama-quantize copies these strings into a 128-byte buffer


@dataclass
class Imatrix:
    uri: str
    sha256: str
    entries: dict[str, np.ndarray] = field(repr=False)  # GGUF tensor name → importance per column
    datasets: list[str]
    chunk_count: int

    def for_tensor(self, gguf_name: str, shape: Sequence[int]) -> np.ndarray | None:
        """The importance vector llama-quantize would use for this tensor (numpy ``shape``), or None: one value
        per column, for each expert of a 3-D expert tensor (experts × columns, expert after expert)."""
        values = self.entries.get(gguf_name)
        if values is None:
            return None
        n_values = shape[-1] * (shape[0] if len(shape) == 3 else 1)
        if values.size != n_values:
            if gguf_name == "token_embd.weight":
                return None  # llama.cpp ignores the embedding's mismatching entry
            rows = f"rows of {shape[-1]}" + (f" in {shape[0]} experts" if len(shape) == 3 else "")
            raise CheckpointError(self.uri, f"imatrix entry {gguf_name!r} has {values.size} values but the tensor "
                                            f"has {rows}", "the imatrix was computed for another model")
        return values

    def uncovered(self, plan: Sequence, types: Sequence[GGMLQuantizationType]) -> list[str]:
        """The tensors of a plan quantized (to ``types``) without an entry here: llama-quantize
        quantizes them without importance and only logs it, a quality loss worth reporting."""
        return [p.gguf_name for p, t in zip(plan, types, strict=True)
                if t.name not in UNQUANTIZED_TYPES and p.gguf_name not in self.entries]

    def summary(self, uncovered: Sequence[str]) -> dict:
        """What a release's manifest records of the importance matrix it was quantized with."""
        return {"sha256": self.sha256, "entries": len(self.entries), "tensors_without_entry": list(uncovered)}


def load_imatrix(uri: str) -> Imatrix:
    """Read an imatrix file (GGUF or legacy) from any fsspec URI; bad files are one-line errors."""
    data = storage.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    return _parse(uri, digest, data)


# Per process, for tasks that each need the entries of the file the flow checked.
load_imatrix_cached = storage.Pinned(load_imatrix, "the imatrix file", maxsize=2)


def _parse(uri: str, digest: str, data: bytes) -> Imatrix:
    if data[:4] == b"GGUF":
        return _parse_gguf(uri, digest, data)
    return _parse_legacy(uri, digest, data)


def _parse_gguf(uri: str, digest: str, data: bytes) -> Imatrix:
    import tempfile

    from so8t_core.gguf_file import read_gguf

    with tempfile.NamedTemporaryFile(suffix=".gguf") as tmp:
        tmp.write(data)
        tmp.flush()
        g = read_gguf(tmp.name)
        keys = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
        if any(g.value(k) is None for k in keys):
            raise CheckpointError(uri, "GGUF imatrix without its metadata (imatrix.datasets, chunk_count, "
                                       "chunk_size)", "recompute it with llama-imatrix")
        sums, counts = {}, {}
        for t in g.tensors:
            if t.tensor_type.name != "F32":
                raise CheckpointError(uri, f"imatrix tensor {t.name!r} is {t.tensor_type.name}, not F32", "")
            if t.name.endswith(".in_sum2"):
                sums[t.name[: -len(".in_sum2")]] = np.array(t.data, dtype=np.float32).reshape(-1)
            elif t.name.endswith(".counts"):
                counts[t.name[: -len(".counts")]] = np.array(t.data, dtype=np.float32).reshape(-1)
        if not sums:
            raise CheckpointError(uri, "no data in the imatrix file", "recompute it with llama-imatrix")
        entries = {}
        for name in sorted(set(sums) | set(counts)):
            if name not in sums or name not in counts:
                raise CheckpointError(uri, f"mismatched sums and counts for {name!r}", "the file is corrupt")
            s, c = sums[name], np.rint(counts[name]).astype(np.int64)  # counts are lround()ed
            if c.size == 0 or s.size % c.size:
                raise CheckpointError(uri, f"{name!r}: {s.size} sums do not split into {c.size} experts", "")
            per = s.reshape(c.size, -1)
            out = np.ones_like(per)
            for j, count in enumerate(c):
                if count > 0:
                    out[j] = per[j] / np.float32(count)
            entries[name] = _finite(uri, name, out.reshape(-1))
        return Imatrix(uri, digest, entries, [str(d) for d in g.value("imatrix.datasets")],
                       int(g.value("imatrix.chunk_count")))


def _parse_legacy(uri: str, digest: str, data: bytes) -> Imatrix:
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise CheckpointError(uri, "truncated imatrix file", "not a GGUF or legacy .dat imatrix, or cut short")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise CheckpointError(uri, "not an imatrix file (no entries)", "pass a GGUF or legacy .dat imatrix")
    entries = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if length < 0 or length > 4096:
            raise CheckpointError(uri, "corrupt imatrix entry name", "the file is corrupt")
        name = bytes(take(f"<{length}s")[0]).decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval < 1 or nval > 1 << 28:
            raise CheckpointError(uri, f"imatrix entry {name!r} claims {nval} values", "the file is corrupt")
        values = np.array(take(f"<{nval}f"), dtype=np.float32)
        entries[name] = _finite(uri, name, values / np.float32(ncall) if ncall > 0 else values)
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= len(data) - pos:
                datasets.append(bytes(take(f"<{length}s")[0]).split(b"\0")[0].decode("utf-8", errors="replace"))
    return Imatrix(uri, digest, entries, datasets, chunk_count)


def _finite(uri: str, name: str, values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all():
        raise CheckpointError(uri, f"imatrix entry {name!r} has non-finite values", "recompute the imatrix")
    return values


def write_imatrix(path: str, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray], datasets: Sequence[str],
                  chunk_count: int, chunk_size: int) -> None:
    """An importance matrix in llama.cpp's GGUF format, as llama-imatrix's save_imatrix writes it:
    ``general.type`` = imatrix, ``imatrix.datasets``, ``imatrix.chunk_count``,
    ``imatrix.chunk_size``; per weight, by name, ``<name>.in_sum2`` (F32, one row of column
    sums per matrix) and ``<name>.counts`` (F32, one per matrix); no architecture."""
    from gguf import GGUFValueType

    from so8t_core.gguf_file import TensorInfo, kv_array, kv_str, kv_u32, write_gguf

    kvs = [kv_str("general.type", "imatrix"), kv_array("imatrix.datasets", list(datasets), GGUFValueType.STRING),
           kv_u32("imatrix.chunk_count", chunk_count), kv_u32("imatrix.chunk_size", chunk_size)]
    data, tensors = {}, []
    for name in sorted(sums):
        n_mat = counts[name].size
        # ggml's [ne0, n_mat] and [1, n_mat], stored without trailing dimensions of 1 as ggml stores them
        values = np.ascontiguousarray(sums[name], dtype=np.float32).reshape((n_mat, -1) if n_mat > 1 else (-1,))
        per_matrix = np.asarray(counts[name], dtype=np.float32).reshape((n_mat, 1) if n_mat > 1 else (1,))
        for key, array in ((f"{name}.in_sum2", values), (f"{name}.counts", per_matrix)):
            data[key] = array.tobytes()
            tensors.append(TensorInfo(key, array.shape, GGMLQuantizationType.F32, array.nbytes))
    write_gguf(path, None, kvs, tensors, lambda t: data[t.name])


def imatrix_kvs(im: Imatrix, given_as: str) -> list:
    """The keys llama-quantize adds when quantizing with an imatrix."""
    from gguf import GGUFValueType

    from so8t_core.gguf_file import GGUFKV, kv_str

    kvs = [kv_str(KV_FILE, given_as[:MAX_KV_STRING])]
    if im.datasets:
        kvs.append(kv_str(KV_DATASET, im.datasets[0][:MAX_KV_STRING]))
    kvs.append(GGUFKV(KV_ENTRIES, len(im.entries), GGUFValueType.INT64))
    if im.chunk_count > 0:
        kvs.append(GGUFKV(KV_CHUNKS, im.chunk_count, GGUFValueType.INT64))
    return kvs
