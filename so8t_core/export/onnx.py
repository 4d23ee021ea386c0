"""ONNX export of the baked model, checked by onnxruntime against PyTorch.

What is exported is :func:`so8t_core.validate.reference.baked_model`: transformers' own model for the
base architecture with every SO8T gate folded into o_proj (the conversion's plan and bake) and a
LoRA adapter merged if given. The graph maps ``input_ids`` and ``attention_mask`` (int64,
[batch, sequence], both axes dynamic) to ``logits`` (float32, [batch, sequence, vocab]) over the
whole sequence: there is no KV cache, and the triality heads are not in it.

The exporter is torch's default one (``dynamo=True``: torch.export, then onnxscript), at a fixed
opset; the legacy TorchScript exporter is deprecated in torch 2.13. Nothing in the file depends
on time or on the machine, so the same checkpoint, adapter and library versions give the same
bytes. Weights over :data:`EXTERNAL_DATA_BYTES` go to ``<file>.data`` beside the graph
(protobuf cannot hold a message over 2 GiB).

The file is written and checked in a temporary folder next to the destination and moved into
place only when onnxruntime's logits of the fixed validation text agree with both the baked
PyTorch model and the SO8T reference (gates applied live) within :func:`tolerance`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from typing import Any, Mapping

import numpy as np

from so8t_core import storage
from so8t_core.constants import CONVERTER, Keys
from so8t_core.errors import UnsupportedError, ValidationError
from so8t_core.source.checkpoint import Checkpoint

# torch 2.13's default opset for its exporter: pinned, so the file does not change with torch's default.
OPSET = 20
# torch's own threshold for external data: well under protobuf's 2 GiB message limit.
EXTERNAL_DATA_BYTES = 1536 * 2**20
INSTALL_HINT = "pip install 'so8t-gguf[onnx]'"
# The check's bound, relative to the largest |logit| of the reference: float32 kernels that sum
# in a different order (onnxruntime's MatMul vs torch's) differ by a few ulps per layer.
RELATIVE_TOLERANCE = 1e-4


def tolerance(reference_logits: np.ndarray) -> float:
    """The largest max |Δlogit| the check accepts for these reference logits."""
    return RELATIVE_TOLERANCE * max(1.0, float(np.abs(reference_logits).max()))


def require_onnx() -> None:
    """One line naming the extra when onnx, onnxruntime or onnxscript is not installed."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UnsupportedError("so8t-gguf onnx", f"{', '.join(missing)} not installed", INSTALL_HINT)


def local_output_path(output: str) -> str:
    """The destination as a local path: onnxruntime and TensorRT read local files."""
    return storage.local_output_file(output, ".onnx", "the ONNX file")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs and warns about things that are not the user's concern (no torchvision,
    pytree deprecations, axis renames); a failure still raises."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "torch.__trace", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_program(model, metadata: dict[str, str]):
    """torch.onnx's ONNXProgram for ``model`` with dynamic batch and sequence axes."""
    import torch

    example = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]] * 2, dtype=torch.long)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    # No KV cache: logits are the only output. Through the config, not a use_cache argument: a
    # non-tensor argument would stop the exporter from naming the dynamic axes.
    model.config.use_cache = False
    with _quiet_exporter(), torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            model, (), None, dynamo=True, opset_version=OPSET, verbose=False, optimize=True,
            kwargs={"input_ids": example, "attention_mask": torch.ones_like(example)},
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}})
    graph = program.model.graph
    # The exporter annotates every node with its Python stack trace (install paths), fx node and
    # module path: debugging aids that would make the bytes depend on where torch is installed.
    for node in graph.all_nodes():
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()
    for value in [*graph.inputs, *graph.outputs, *graph.initializers.values()]:
        value.metadata_props.clear()
    graph.metadata_props.clear()
    program.model.metadata_props.clear()
    program.model.metadata_props.update(metadata)
    return program


def _initializer_bytes(program) -> int:
    return sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)


def _onnxruntime_logits(path: str, ids: list[int]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    batch = np.asarray([ids], dtype=np.int64)
    (logits,) = session.run(["logits"], {"input_ids": batch, "attention_mask": np.ones_like(batch)})
    return logits[0]


def export_onnx(ckpt: Checkpoint, output: str, adapter=None) -> dict[str, Any]:
    """Export the baked model of ``ckpt`` to ``output`` (a local ``.onnx`` path), check it with
    onnxruntime, and return what was written and measured.

    Raises :class:`ValidationError` (and leaves nothing at ``output``) when onnxruntime's logits
    differ from either PyTorch model by more than the tolerance.
    """
    import torch

    from so8t_core.analysis import checkpoint_model
    from so8t_core.source.fingerprint import fingerprint
    from so8t_core.storage import default_cache_dir
    from so8t_core.validate.checks import validation_token_ids
    from so8t_core.validate.reference import So8tReference, baked_model

    require_onnx()
    path = local_output_path(output)
    spec, structure, _ = checkpoint_model(ckpt)
    ids = validation_token_ids(ckpt)
    source = fingerprint(ckpt, cache_dir=os.path.join(default_cache_dir(), "work"))  # convert's tensor-hash cache
    # The GGUF's own provenance keys, so an ONNX file and a GGUF of the same checkpoint can be matched.
    metadata = {Keys.SOURCE_FINGERPRINT: source.fingerprint, Keys.BAKED_LAYERS: json.dumps(structure.gated_layers),
                Keys.CONVERTER: CONVERTER}
    if adapter is not None:
        metadata[Keys.LORA_SHA256] = adapter.sha256

    t0 = time.perf_counter()
    # One model in memory at a time: baked (export, its logits), then onnxruntime, then the reference.
    model = baked_model(ckpt, adapter)
    with torch.inference_mode():
        baked_logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    program = _export_program(model, metadata)
    del model
    external = _initializer_bytes(program) > EXTERNAL_DATA_BYTES
    os.makedirs(os.path.dirname(path), exist_ok=True)
    name = os.path.basename(path)
    work = tempfile.mkdtemp(prefix=".so8t-onnx-", dir=os.path.dirname(path))
    try:
        staged = os.path.join(work, name)
        program.save(staged, external_data=external)
        del program
        gc.collect()
        export_seconds = time.perf_counter() - t0

        onnx_logits = _onnxruntime_logits(staged, ids)
        gc.collect()
        reference_logits = So8tReference(ckpt, adapter=adapter).logits(ids)
        bound = tolerance(reference_logits)
        diff_baked = float(np.abs(onnx_logits - baked_logits).max())
        diff_reference = float(np.abs(onnx_logits - reference_logits).max())
        check = {"n_tokens": len(ids), "max_abs_diff_vs_baked_torch": diff_baked,
                 "max_abs_diff_vs_so8t_reference": diff_reference, "tolerance": bound,
                 "max_abs_reference_logit": float(np.abs(reference_logits).max()),
                 "ok": bool(diff_baked <= bound and diff_reference <= bound)}
        if not check["ok"]:
            raise ValidationError(path, f"onnxruntime's logits differ from PyTorch's by up to "
                                        f"{max(diff_baked, diff_reference):.3g} over {len(ids)} tokens "
                                        f"(tolerance {bound:.3g}); nothing was written",
                                  "report this with the checkpoint's config.json")

        data_name = name + ".data"
        stale = os.path.join(os.path.dirname(path), data_name)
        if not external and os.path.exists(stale):
            os.remove(stale)  # an earlier export's weights; this file holds its own
        if external:
            os.replace(os.path.join(work, data_name), stale)
        os.replace(staged, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {"path": path, "size": os.path.getsize(path), "sha256": storage.sha256_of(path), "opset": OPSET,
              "external_data": None, "inputs": {"input_ids": ["batch", "sequence"],
                                                "attention_mask": ["batch", "sequence"]},
              "outputs": {"logits": ["batch", "sequence", int(reference_logits.shape[-1])]},
              "metadata": metadata, "check": check, "export_seconds": round(export_seconds, 2),
              "architecture": spec.hf_architecture}
    if external:
        data = os.path.join(os.path.dirname(path), name + ".data")
        result["external_data"] = {"path": data, "size": os.path.getsize(data), "sha256": storage.sha256_of(data)}
    return result


def render_export(result: Mapping[str, Any]) -> str:
    """``export_onnx``'s result as the CLI prints it."""
    c = result["check"]
    lines = [f"exported {result['path']} ({result['size']:,} bytes, sha256 {result['sha256'][:16]}…)"]
    if result["external_data"]:
        d = result["external_data"]
        lines.append(f"  weights      {d['path']} ({d['size']:,} bytes; keep it beside the .onnx file)")
    lines.append(f"  graph        input_ids, attention_mask [batch, sequence] int64 -> logits [batch, sequence, "
                 f"{result['outputs']['logits'][2]}] float32; opset {result['opset']}; no KV cache; "
                 "triality heads not included")
    lines.append(f"  onnxruntime  max |Δlogit| {c['max_abs_diff_vs_baked_torch']:.2e} vs the baked PyTorch model, "
                 f"{c['max_abs_diff_vs_so8t_reference']:.2e} vs the SO8T reference, over {c['n_tokens']} tokens "
                 f"(tolerance {c['tolerance']:.2e}): ok")
    return "\n".join(lines)
