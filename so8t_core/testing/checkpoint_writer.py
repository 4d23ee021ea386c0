"""Writing Hugging Face checkpoint folders (for the demo model and test fixtures).

Deterministic by construction: a fixed tensor order, fixed JSON formatting and no
timestamps, so the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Mapping

import numpy as np

from so8t_core import storage

DTYPES = ("float32", "float16", "bfloat16")


def dumps(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _split(names: list[str], sizes: dict[str, int], n_shards: int) -> list[list[str]]:
    """Consecutive groups of roughly equal byte size, in the given order."""
    total = sum(sizes.values())
    shards: list[list[str]] = [[]]
    acc = 0
    for name in names:
        if shards[-1] and len(shards) < n_shards and acc >= total * len(shards) / n_shards:
            shards.append([])
        shards[-1].append(name)
        acc += sizes[name]
    return shards


def write_checkpoint(dest: str, config: Mapping, tensors: Mapping[str, np.ndarray], files: Mapping[str, bytes],
                     n_shards: int = 1, dtype: str = "bfloat16") -> str:
    """Write config.json, weights (1 file or ``n_shards`` + index) and extra files to ``dest``."""
    import torch  # for bfloat16 and safetensors' writer; imported here to keep start-up light
    from safetensors.torch import save_file

    if n_shards < 1 or n_shards > len(tensors):
        raise ValueError(f"n_shards must be in 1..{len(tensors)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}")
    tdtype = getattr(torch, dtype)
    names = list(tensors)
    sizes = {n: int(np.prod(tensors[n].shape)) * tdtype.itemsize for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        out: dict[str, bytes | str] = {"config.json": dumps(dict(config))}
        if n_shards == 1:
            groups, shard_names = [names], ["model.safetensors"]
        else:
            groups = _split(names, sizes, n_shards)
            shard_names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
            out["model.safetensors.index.json"] = dumps({
                "metadata": {"total_size": sum(sizes.values())},
                "weight_map": {n: shard for shard, g in zip(shard_names, groups) for n in sorted(g)},
            })
        for shard, group in zip(shard_names, groups):
            path = os.path.join(tmp, shard)
            save_file({n: torch.from_numpy(np.array(tensors[n], dtype=np.float32)).to(tdtype) for n in group},
                      path, metadata={"format": "pt"})
            out[shard] = path
        out.update(files)
        _publish_folder(dest, out)
    return dest


def _publish_folder(dest: str, files: Mapping[str, bytes | str]) -> None:
    """Place files (bytes, or paths of local temp files) into ``dest``."""
    if storage.is_local(dest):
        root = storage.local_path(dest)
        os.makedirs(root, exist_ok=True)
        for name, content in files.items():
            target = os.path.join(root, name)
            if isinstance(content, str):
                shutil.copyfile(content, target)
            else:
                with open(target, "wb") as f:
                    f.write(content)
        return
    for name, content in files.items():
        target = storage.join(dest, name)
        if isinstance(content, str):
            storage.upload_file(content, target)
        else:
            storage.write_bytes_atomic(target, content)
