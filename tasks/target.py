"""Target mixes' sensitivity: each weight's damage in each candidate type, measured on the run's F32
GGUF (so8t_core/quantize/target.py), cached per (tensor sha256, type, importance entry sha256)."""

from __future__ import annotations

import os

from prefect import task

from so8t_core.quantize.imatrix import load_imatrix_cached
from so8t_core.quantize.target import TensorOptions, measure_gguf
from so8t_core.refs import FileRef


@task(name="measure-damage")
def measure_damage(f32: FileRef, imatrix: tuple[str, str] | None, work_dir: str) -> list[TensorOptions]:
    """Every tensor's options (type, bytes, damage); ``imatrix``: (URI, sha256) the quantizers are
    given, as llama-quantize would be. The measurements are small JSON files under
    ``work_dir/damage``: a second target, or a re-run, quantizes nothing again."""
    im = load_imatrix_cached(imatrix[0], imatrix[1]) if imatrix else None
    return measure_gguf(f32.uri, im, cache_dir=os.path.join(work_dir, "damage"))
