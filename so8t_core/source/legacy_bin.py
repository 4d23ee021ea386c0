"""Legacy ``pytorch_model*.bin`` shards, read safely.

A ``.bin`` shard is a pickle. It is accepted only through ``torch.load(weights_only=True)``
(which refuses pickles that would run code), after checking without unpickling that it does
not declare more storage than the file holds, and is re-saved once as safetensors in a local
cache (keyed by its sha256), so the rest of the pipeline reads every checkpoint the same way.
"""

from __future__ import annotations

import os

from so8t_core import storage
from so8t_core.errors import CheckpointError

# What torch.load says when a storage's declared size and its data disagree (legacy
# pickles allocate the declared size first; zip archives compare it with the record).
_STORAGE_SIZE_ERRORS = ("can't allocate memory", "storage has wrong byte size", "does not match expected size")


_LEGACY_SCAN = 64 << 20  # the pickles of a legacy file precede its storages; a state dict's are far smaller
_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"}
_DEVICES = ("cpu", "cuda", "mps", "meta", "xpu")


def _legacy_declared_elements(head: bytes) -> int | None:
    """The storage elements a legacy (pre-zip) torch file declares, read from its pickles
    without running them; None for a zip archive or when the head does not parse (torch's own
    loader then reports the problem).

    The legacy layout is four pickles (magic number, protocol version, system info, the object)
    and then the storages' bytes. In the object's pickle each storage is a persistent id,
    ``("storage", type, key, location, numel, ...)``: the last integer before each BINPERSID."""
    import io
    import pickletools

    if head[:4] == b"PK\x03\x04":
        return None
    stream, storages = io.BytesIO(head), {}
    try:
        for index in range(4):
            last_int, strings = None, []
            for op, arg, _ in pickletools.genops(stream):
                if op.name in _INT_OPS and isinstance(arg, int):
                    last_int = arg
                elif isinstance(arg, str) and "UNICODE" in op.name:
                    strings.append(arg)
                elif op.name == "MARK":
                    last_int, strings = None, []
                elif op.name in ("BINPERSID", "PERSID") and index == 3 and last_int is not None:
                    # A storage shared by several tensors is declared once per tensor: count its key once.
                    key = tuple(a for a in strings if a != "storage" and not a.startswith(_DEVICES))
                    storages[key or len(storages)] = max(0, last_int)
    except (ValueError, EOFError, UnicodeDecodeError, OverflowError):
        return None
    return sum(storages.values())


def _declared_size_error(bin_uri: str) -> CheckpointError:
    return CheckpointError(bin_uri, "refused to load: a tensor storage declares a size the file does not hold "
                                    "(corrupt or crafted pickle)", "re-download the file, or convert it to safetensors")


def bin_as_safetensors(bin_uri: str, cache_dir: str | None) -> str:
    """Load a ``.bin`` shard with weights_only=True and cache it as safetensors."""
    import torch
    from safetensors.torch import save_file

    cache_dir = cache_dir or storage.default_cache_dir()
    digest = storage.sha256_of(bin_uri)
    out = os.path.join(cache_dir, "bin-shards", f"{digest}.safetensors")
    if os.path.exists(out):
        return out
    fs, path = storage.resolve(bin_uri)
    declared = _legacy_declared_elements(storage.read_bytes(bin_uri, 0, min(storage.size(bin_uri), _LEGACY_SCAN)))
    if declared is not None and declared > storage.size(bin_uri):
        # Each element is at least a byte: the file cannot hold what it declares. torch would
        # allocate the declared sizes before finding that out.
        raise _declared_size_error(bin_uri)
    try:
        with fs.open(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, MemoryError, ...
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = lines[0] if lines else type(exc).__name__
        if first.startswith("Weights only load failed"):  # generic; the reason is on a later line
            first = next((line for line in lines[1:] if not line.startswith("Check the documentation")), first)
            first = first.split(" Please use")[0]  # torch's advice to allow-list the global: not ours to give
        if isinstance(exc, MemoryError) or any(s in first for s in _STORAGE_SIZE_ERRORS):
            # A storage whose declared size is not what the file holds: torch tried (and
            # failed) to allocate the declared size, or read fewer bytes than it declares.
            raise _declared_size_error(bin_uri) from None
        raise CheckpointError(bin_uri, f"refused to load: not a plain tensor pickle ({first[:200]})",
                              "only weights_only=True pickles are accepted; convert it to safetensors") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(bin_uri, "does not hold a flat {name: tensor} state dict",
                              "save the model's state_dict(), or convert it to safetensors")
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}  # break shared storage
    with storage.local_atomic_file(out) as tmp:
        save_file(tensors, tmp)
    return out
