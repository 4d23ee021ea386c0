"""Importance-matrix files for tests: llama-imatrix's GGUF format, the legacy .dat format, and a
synthetic imatrix with an entry for every weight llama-imatrix would measure."""

from __future__ import annotations

import struct

import gguf
import numpy as np

from so8t_core.analysis import checkpoint_model
from so8t_core.source.checkpoint import Checkpoint


def write_gguf_imatrix(path, sums: dict, counts: dict, chunk_count=7) -> None:
    w = gguf.GGUFWriter(str(path), "imatrix")
    w.add_array("imatrix.datasets", ["calibration.txt"])
    w.add_uint32("imatrix.chunk_count", chunk_count)
    w.add_uint32("imatrix.chunk_size", 512)
    for name in sums:
        w.add_tensor(f"{name}.in_sum2", sums[name].astype(np.float32))
        w.add_tensor(f"{name}.counts", np.asarray(counts[name], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_legacy_imatrix(path, values: dict, ncall: int, dataset="wiki.train.raw", chunk_count=5) -> None:
    out = struct.pack("<i", len(values))
    for name, v in values.items():
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, v.size)
        out += v.astype("<f4").tobytes()
    out += struct.pack("<i", chunk_count) + struct.pack("<i", len(dataset)) + dataset.encode()
    path.write_bytes(out)


def plan_shapes(src: str) -> dict[str, tuple[int, ...]]:
    """The 2-D weights and 3-D expert tensors of a checkpoint's plan: GGUF name → numpy shape."""
    _, _, plan = checkpoint_model(Checkpoint.open(src))
    return {p.gguf_name: p.shape for p in plan if len(p.shape) >= 2}


def write_synthetic_imatrix(path, src: str, seed: int = 5, skip: tuple[str, ...] = ()) -> list[str]:
    """A GGUF imatrix with skewed random sums for every weight that multiplies activations, as
    llama-imatrix records them (all but token_embd, and output, which it skips by default),
    but ``skip``. Returns the names it covers."""
    rng = np.random.default_rng(seed)
    shapes = plan_shapes(src)
    names = [n for n in shapes if n not in ("token_embd.weight", "output.weight", *skip)]
    experts = {n: shapes[n][0] if len(shapes[n]) == 3 else 1 for n in names}  # one row and count per expert
    sums = {n: (rng.random(shapes[n][-1] * experts[n]) ** 3 * 50).astype(np.float32) for n in names}
    write_gguf_imatrix(path, sums, {n: [10.0 + e for e in range(experts[n])] for n in names})
    return names
