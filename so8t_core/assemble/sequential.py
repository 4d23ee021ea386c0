"""The conversion stages strung together in-process, one tensor after another.

This is the pipeline without orchestration: the same library calls the Prefect flow
makes (flows/convert.py), run sequentially, for benchmarks, tests and library users who
want one GGUF file without a flow run. It does not validate or publish.
"""

from __future__ import annotations

from dataclasses import dataclass

from so8t_core.analysis import checkpoint_model
from so8t_core.assemble.metadata import model_folder_name
from so8t_core.assemble.model import assemble_model, model_metadata
from so8t_core.constants import quant_type
from so8t_core.gguf_file import NO_SPLIT, Split
from so8t_core.quantize.mixes import MixOptions, ModelShape, mix_types
from so8t_core.quantize.staging import stage_tensor
from so8t_core.refs import FileRef, SourceRef, StagedTensor
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.fingerprint import fingerprint


@dataclass
class SequentialResult:
    source: SourceRef
    files: list[FileRef]
    staged: list[StagedTensor]


def convert_sequential(ckpt: Checkpoint, quant: str, out_path: str, staging_dir: str, name: str | None = None,
                       options: MixOptions = MixOptions(), engine: str = "ggml", split: Split = NO_SPLIT,
                       source: SourceRef | None = None, imatrix=None) -> SequentialResult:
    """Fetch, plan, bake, quantize (one mix) and assemble ``out_path`` (``imatrix``: an
    :class:`~so8t_core.quantize.imatrix.Imatrix` the quantizers are given, as with ``--imatrix``)."""
    source = source or fingerprint(ckpt)
    spec, _, plan = checkpoint_model(ckpt)
    q = quant_type(quant)
    types = mix_types(plan, [q.name], ModelShape.from_spec(spec), options,
                      None if imatrix is None else set(imatrix.entries))[q.name]
    staged = [stage_tensor(ckpt, p, [(q.name, t)], staging_dir,
                           [source.tensor_sha256[n] for n in p.inputs], engine,
                           None if imatrix is None else imatrix.for_tensor(p.gguf_name, p.shape))[0]
              for p, t in zip(plan, types)]
    name = name or model_folder_name(ckpt.uri, "model")  # as convert names a model after its folder
    arch, kvs = model_metadata(ckpt, q, name, source.fingerprint, staged)
    return SequentialResult(source, assemble_model(out_path, arch, kvs, staged, split), staged)
