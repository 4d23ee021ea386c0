"""Per-tensor statistics of a converted model, as a Parquet table."""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from so8t_core.refs import StagedTensor

SCHEMA = pa.schema([
    ("tensor", pa.string()),
    ("source_tensor", pa.string()),
    ("layer", pa.int32()),
    ("tensor_class", pa.string()),
    ("ggml_type", pa.string()),
    ("shape", pa.list_(pa.int64())),
    ("params", pa.int64()),
    ("bytes", pa.int64()),
    ("bits_per_weight", pa.float64()),
    ("rmse", pa.float64()),
    ("relative_rmse", pa.float64()),
    ("max_abs_error", pa.float64()),
    ("cosine", pa.float64()),
    ("snr_db", pa.float64()),
    ("bake_error", pa.float64()),
])
# No timings: a release's files are a function of its inputs (same inputs, same bytes).


def stats_table(staged: Sequence[StagedTensor]) -> pa.Table:
    rows = [{
        "tensor": s.gguf_name, "source_tensor": s.source, "layer": s.layer, "tensor_class": s.tensor_class,
        "ggml_type": s.ggml_type, "shape": list(s.shape), "params": s.n_elements, "bytes": s.nbytes,
        "bits_per_weight": s.bits_per_weight, "rmse": s.rmse, "relative_rmse": s.relative_rmse,
        "max_abs_error": s.max_abs_error, "cosine": s.cosine, "snr_db": s.snr_db, "bake_error": s.bake_error,
    } for s in staged]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_stats(path: str, staged: Sequence[StagedTensor]) -> None:
    pq.write_table(stats_table(staged), path, compression="zstd")
