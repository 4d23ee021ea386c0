"""Target mixes' sensitivity: each weight's damage in each candidate type, measured on the run's F32
GGUF (so8t_core/quantize/target.py), cached per (tensor sha256, type, importance entry sha256); and
the KLD gain of each tensor class, from probes in llama.cpp (so8t_core/validate/gains.py)."""

from __future__ import annotations

import os

from prefect import task

from so8t_core.quantize.imatrix import load_imatrix_cached
from so8t_core.quantize.target import TensorOptions, measure_gguf
from so8t_core.refs import FileRef
from so8t_core.validate.gains import PROBE_CHUNKS, class_gains, read_gains, write_gains
from so8t_core.validate.perplexity import read_base_file


@task(name="measure-damage")
def measure_damage(f32: FileRef, imatrix: tuple[str, str] | None, work_dir: str) -> list[TensorOptions]:
    """Every tensor's options (type, bytes, damage); ``imatrix``: (URI, sha256) the quantizers are
    given, as llama-quantize would be. The measurements are small JSON files under
    ``work_dir/damage``: a second target, or a re-run, quantizes nothing again."""
    im = load_imatrix_cached(imatrix[0], imatrix[1]) if imatrix else None
    return measure_gguf(f32.uri, im, cache_dir=os.path.join(work_dir, "damage"))


@task(name="measure-gains")
def measure_gains(f32: FileRef, base: FileRef, imatrix: tuple[str, str] | None, tensors: list[TensorOptions],
                  engine: str, path: str) -> dict[str, float]:
    """``{tensor class: mean KLD per unit of damage}``: probes of the F32 file scored against the
    first PROBE_CHUNKS chunks of the evaluation base file (the evaluate stage's); kept at ``path``
    (:func:`~so8t_core.validate.gains.gains_file`), so a re-run, a second target or a dry run reuses them."""
    gains = read_gains(path)
    if gains is None:
        first = read_base_file(base.uri, mmap=True).first_chunks(PROBE_CHUNKS)
        im = load_imatrix_cached(imatrix[0], imatrix[1]) if imatrix else None
        gains = class_gains(f32.uri, tensors, first, os.path.join(os.path.dirname(path), "probes"), im, engine)
        write_gains(path, gains)
    return gains
