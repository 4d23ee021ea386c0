"""The triality-head sidecar: the SO8T heads llama.cpp has no place for, as a small F32 GGUF."""

from __future__ import annotations

import gguf
import numpy as np

from so8t_core.constants import HEADS_INPUT_FINAL_NORM, SIDECAR_ARCH, Keys
from so8t_core.gguf_file import TensorInfo, kv_array, kv_str, kv_u32, write_gguf
from so8t_core.refs import FileRef, file_ref
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.so8t import So8tStructure


def sidecar_tensor_name(checkpoint_name: str) -> str:
    # so8t.triality.safety_head.weight -> safety_head.weight
    return checkpoint_name.rsplit(".", 2)[-2] + "." + checkpoint_name.rsplit(".", 1)[-1]


def assemble_heads_sidecar(path: str, ckpt: Checkpoint, structure: So8tStructure, model_name: str,
                           source_fingerprint: str) -> FileRef | None:
    """The SO8T heads as a small F32 GGUF beside the model (llama.cpp refuses extra tensors).

    Triality heads are stored as ``<head>_head.weight/bias`` with their labels; other
    classifier heads of SO8T variants (safety_head.0.weight, ...) under their own names,
    listed in ``so8t.heads.extra``, so nothing the checkpoint trained is lost.
    """
    if not structure.heads and not structure.classifier_heads:
        return None
    kvs = [kv_str("general.type", "so8t-heads"), kv_str("general.name", f"{model_name} SO8T heads"),
           kv_str(Keys.HEADS_INPUT, HEADS_INPUT_FINAL_NORM),
           kv_u32("so8t.heads.hidden_size", ckpt.config.get("hidden_size", 0)),
           kv_str(Keys.SOURCE_FINGERPRINT, source_fingerprint)]
    if structure.heads:
        kvs.append(kv_array(Keys.HEADS_NAMES, [h.head for h in structure.heads], gguf.GGUFValueType.STRING))
        kvs += [kv_array(Keys.HEADS_LABELS.format(head=h.head), list(h.labels), gguf.GGUFValueType.STRING)
                for h in structure.heads]
    if structure.classifier_heads:
        kvs.append(kv_array(Keys.HEADS_EXTRA, list(structure.classifier_heads), gguf.GGUFValueType.STRING))
    arrays = {}
    for h in structure.heads:
        for name in (h.weight, h.bias):
            if name:
                arrays[sidecar_tensor_name(name)] = np.ascontiguousarray(ckpt.read(name), dtype=np.float32)
    for name in structure.classifier_heads:
        arrays[name] = np.ascontiguousarray(ckpt.read(name), dtype=np.float32)
    infos = [TensorInfo(n, a.shape, gguf.GGMLQuantizationType.F32, a.nbytes) for n, a in arrays.items()]
    write_gguf(path, SIDECAR_ARCH, kvs, infos, lambda t: arrays[t.name].tobytes())
    return file_ref(path)
