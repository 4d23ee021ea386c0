"""A corrupted quant: one tensor's bytes shuffled in place, a fault only the file's output shows."""

import gguf
import numpy as np


def scramble_tensor(path: str, name: str) -> None:
    """Shuffle the bytes of tensor ``name`` in the GGUF at ``path`` in place (deterministically)."""
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    with open(path, "r+b") as f:
        f.seek(tensor.data_offset)
        data = np.frombuffer(f.read(tensor.n_bytes), np.uint8)
        f.seek(tensor.data_offset)
        f.write(np.random.default_rng(0).permutation(data).tobytes())
