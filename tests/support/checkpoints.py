"""Editing checkpoint folders in place: a copy, one tensor rewritten."""

import json
import os
import shutil
import struct

import numpy as np


def copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def rewrite_tensor(folder: str, name: str, values: np.ndarray) -> None:
    """Overwrite one tensor's bytes in place (same dtype and size)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    shard = json.load(open(index))["weight_map"][name] if os.path.exists(index) else "model.safetensors"
    path = os.path.join(folder, shard)
    data = bytearray(open(path, "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    start, end = json.loads(data[8:8 + n])[name]["data_offsets"]
    raw = values.astype(np.float32).tobytes()
    assert len(raw) == end - start
    data[8 + n + start:8 + n + end] = raw
    open(path, "wb").write(bytes(data))
