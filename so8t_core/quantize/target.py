"""Mixes that hit a size: each 2-D weight's type chosen from its measured sensitivity.

llama.cpp's mixes are fixed rules. A target mix (``AUTO-<B>``) instead gives every weight the
type that, under a budget for the whole file (bits per weight or bytes), leaves the least
predicted damage:

1. **Candidates.** A tensor llama.cpp never quantizes (1-D, norms) stays F32 and is a fixed
   cost. Every other tensor may take each type of :data:`CANDIDATE_TYPES` whose block fits its
   rows (rows of 576 cannot take the 256-blocks of the K and IQ4_XS/IQ3_S types). Types
   llama-quantize refuses without an importance matrix, Q2_0 and the ternary and 1-bit types (for
   models trained ternary or 1-bit) and MXFP4 (for MoE experts) are not candidates.
2. **Sensitivity** (:func:`tensor_damage`): the tensor is quantized with each candidate through
   libggml (the importance-weighted quantizer when the importance matrix has an entry, as
   llama-quantize would) and dequantized; the damage is the relative output noise of the
   layer, ``Σ ΔW_ij² I_j / Σ W_ij² I_j`` with ``I`` the importance (llama-imatrix's mean squared
   input per column; 1 without one). For a linear layer ``y = W x`` with inputs whose columns
   are uncorrelated, ``Σ_ij ΔW_ij² E[x_j²]`` is the expected ``‖Δy‖²`` and the denominator the
   expected ``‖y‖²``, so the damage is the noise-to-signal ratio the quantization adds to that
   layer's output. The ratio is scale-free, so tensors with and without an importance entry
   (the embedding, the output) are on one scale. How much a layer's noise moves the logits
   depends on the layer: :func:`with_gains` scales the damage by a gain per tensor class, which
   ``validate/gains.py`` measures with one probe per class in llama.cpp; with the gains the summed
   damage is the predicted mean KLD (small, independent perturbations add up to first order;
   docs/benchmarks.md compares it with the measured KLD).
   Rows are sampled (at most ``max_rows``, evenly spaced, always the same ones) so a large
   embedding costs what a layer does. An MoE expert stack with per-expert importance (what
   llama-imatrix writes for ``ffn_*_exps``) is sampled expert by expert, each quantized with its
   own importance row, and the sums run over all experts: an expert the router rarely uses has
   small importance and weighs little.
3. **Allocation** (:func:`allocate`): each tensor starts at its smallest candidate; then, as a
   Lagrangian greedy, the upgrade with the largest damage removed per extra byte is taken, on
   each tensor's lower convex hull of (bytes, damage), while it fits the budget. Ties break by
   tensor order, so the same inputs give the same recipe.

Measured damage is cached per (the tensor's sha256, type, importance entry's sha256, rows
sampled, code version) in a folder of small JSON files, so a second target on the same model
re-quantizes nothing. The chosen types are published as a llama-quantize ``--tensor-type-file``
(:func:`tensor_type_file`): one anchored ``name=type`` per quantized tensor, which with the mix
:func:`base_mix` names and the same importance matrix makes llama-quantize write the same bytes.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from so8t_core import constants
from so8t_core.constants import AUTO_PREFIX
from so8t_core.errors import UnsupportedError
from so8t_core.gguf_file import tensor_nbytes
from so8t_core.quantize.mixes import allows_quantization

# Smallest to largest, for reading; the allocator sorts by bytes itself.
CANDIDATE_TYPES = (T.Q2_K, T.Q3_K, T.IQ3_S, T.IQ4_XS, T.Q4_0, T.IQ4_NL, T.Q4_K, T.Q4_1, T.Q5_0, T.Q5_K, T.Q5_1,
                   T.Q6_K, T.Q8_0)
# The mix a recipe is given to llama-quantize with (its default type = the recipe's most used
# type by weights): only general.file_type depends on it, every quantized tensor is named.
MIX_OF_TYPE = {T.Q2_K: "Q2_K", T.Q3_K: "Q3_K_M", T.IQ3_S: "IQ3_S", T.IQ4_XS: "IQ4_XS", T.Q4_0: "Q4_0",
               T.IQ4_NL: "IQ4_NL", T.Q4_K: "Q4_K_M", T.Q4_1: "Q4_1", T.Q5_0: "Q5_0", T.Q5_K: "Q5_K_M",
               T.Q5_1: "Q5_1", T.Q6_K: "Q6_K", T.Q8_0: "Q8_0"}
MAX_ROWS = 1024  # rows sampled per tensor for its damage
DAMAGE_VERSION = "nsr/1"  # part of the cache key: bump when the measure changes


def candidate_types(name: str, shape: Sequence[int]) -> tuple[T, ...]:
    """The types a target mix may give this tensor; () for one llama.cpp keeps in F32."""
    if not allows_quantization(name, shape):
        return ()
    return tuple(t for t in CANDIDATE_TYPES if shape[-1] % GGML_QUANT_SIZES[t][0] == 0)


def sampled_rows(data: np.ndarray, max_rows: int = MAX_ROWS, per_expert: bool = False) -> np.ndarray:
    """Every k-th row, at most ``max_rows`` (``per_expert``: of each expert of a 3-D stack, at most
    ``max_rows`` in all, kept as (experts, rows, columns))."""
    if per_expert:
        per = max(1, max_rows // data.shape[0])
        return np.stack([sampled_rows(expert, per) for expert in data])
    rows = data.reshape(-1, data.shape[-1])
    step = -(-rows.shape[0] // max_rows)
    return np.ascontiguousarray(rows[::step], dtype=np.float32)


def tensor_damage(rows: np.ndarray, qtype: T, importance: np.ndarray | None = None,
                  n_threads: int | None = None) -> float:
    """The relative output noise ``Σ ΔW² I / Σ W² I`` of quantizing ``rows`` to ``qtype``
    (``importance``: the per-column weights the quantizer is given too; None: plain). For an
    expert stack, ``rows`` is (experts, rows, columns) and ``importance`` (experts, columns): each
    expert quantized with its own, as llama-quantize does, and the sums taken over all."""
    if rows.ndim == 3:
        err2, ref2 = (sum(pair) for pair in zip(*(_noise(r, qtype, i, n_threads) for r, i in zip(rows, importance))))
    else:
        err2, ref2 = _noise(rows, qtype, importance, n_threads)
    if ref2 == 0.0:
        return 0.0 if err2 == 0.0 else math.inf
    return float(err2 / ref2)


def _noise(rows: np.ndarray, qtype: T, importance: np.ndarray | None, n_threads: int | None) -> tuple[float, float]:
    """(Σ ΔW² I, Σ W² I) of quantizing the 2-D ``rows``."""
    from so8t_core.quantize.engines import dequantize, quantize

    raw = quantize(rows, qtype, "ggml", importance, n_threads)
    approx = dequantize(raw, qtype, rows.shape, n_threads)
    weights = np.ones(rows.shape[-1]) if importance is None else np.asarray(importance, dtype=np.float64)
    return (float(np.einsum("ij,j->", np.square(approx.astype(np.float64) - rows), weights)),
            float(np.einsum("ij,j->", np.square(rows.astype(np.float64)), weights)))


@dataclass(frozen=True)
class TensorOptions:
    """One tensor's choices: (type, bytes, damage) per candidate, or its one fixed type."""

    name: str
    shape: tuple[int, ...]
    options: tuple[tuple[T, int, float], ...]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def fixed_tensor(name: str, shape: Sequence[int], qtype: T = T.F32) -> TensorOptions:
    return TensorOptions(name, tuple(shape), ((qtype, tensor_nbytes(tuple(shape), qtype), 0.0),))


def damage_key(tensor_sha256: str, qtype: T, importance: np.ndarray | None, max_rows: int) -> str:
    imp = "" if importance is None else hashlib.sha256(np.ascontiguousarray(importance, np.float32)).hexdigest()
    text = "|".join([tensor_sha256, qtype.name, imp, str(max_rows), DAMAGE_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()


def measure_tensor(name: str, data: np.ndarray, importance: np.ndarray | None = None, cache_dir: str | None = None,
                   tensor_sha256: str | None = None, max_rows: int = MAX_ROWS,
                   n_threads: int | None = None) -> TensorOptions:
    """A tensor's options with their damage, from ``cache_dir`` when measured before."""
    types = candidate_types(name, data.shape)
    if not types:
        return fixed_tensor(name, data.shape)
    if tensor_sha256 is None:
        tensor_sha256 = hashlib.sha256(np.ascontiguousarray(data, np.float32)).hexdigest()
    rows = None
    options = []
    for qtype in types:
        path = None
        if cache_dir is not None:
            key = damage_key(tensor_sha256, qtype, importance, max_rows)
            path = os.path.join(cache_dir, key[:2], key + ".json")
            if os.path.exists(path):
                with open(path) as f:
                    options.append((qtype, tensor_nbytes(tuple(data.shape), qtype), json.load(f)["damage"]))
                continue
        if rows is None:
            rows = sampled_rows(data, max_rows, per_expert=importance is not None and importance.ndim == 2)
        damage = tensor_damage(rows, qtype, importance, n_threads)
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"tensor": name, "type": qtype.name, "damage": damage}, f)
            os.replace(tmp, path)
        options.append((qtype, tensor_nbytes(tuple(data.shape), qtype), damage))
    return TensorOptions(name, tuple(data.shape), tuple(options))


def measure_gguf(path: str, imatrix=None, cache_dir: str | None = None, max_rows: int = MAX_ROWS,
                 n_threads: int | None = None) -> list[TensorOptions]:
    """Every tensor of an F32 GGUF (the run's F32 file), in its order, measured."""
    from so8t_core.gguf_file import read_gguf

    contents = read_gguf(path)
    out = []
    for t in contents.tensors:
        if t.tensor_type != T.F32:
            raise UnsupportedError(path, f"{t.name} is {t.tensor_type.name}, not F32",
                                   "measure the F32 file of the run")
        shape = contents.numpy_shape(t)
        data = np.asarray(t.data).reshape(shape)
        out.append(measure_tensor(t.name, data, measured_importance(imatrix, t.name, shape), cache_dir,
                                  max_rows=max_rows, n_threads=n_threads))
    return out


def measured_importance(imatrix, name: str, shape: Sequence[int]) -> np.ndarray | None:
    """The importance a tensor's damage is measured with (``imatrix``: an Imatrix or None): its
    entry, one value per column, or for an expert stack (experts, columns), one row per expert."""
    importance = imatrix.for_tensor(name, shape) if imatrix is not None and len(shape) > 1 else None
    if importance is not None and len(shape) == 3:
        return importance.reshape(shape[0], shape[-1])
    return importance


def probe_type(t: TensorOptions) -> T:
    """The type a gain probe gives a tensor: its candidate nearest 4.5 bits per weight (Q4_K, Q4_0)."""
    return min(t.options, key=lambda o: (abs(8.0 * o[1] / t.n_elements - 4.5), o[1]))[0]


def with_gains(tensors: Sequence[TensorOptions], gains: Mapping[str, float]) -> list[TensorOptions]:
    """The damages scaled by a gain per tensor class (``mixes.category``: attn_q, ffn_down, output…),
    e.g. measured KLD per unit of damage from probes (one class quantized, the rest near-lossless):
    the relative noise of one layer's output does not move the logits as much as another's."""
    from so8t_core.quantize.mixes import category

    return [TensorOptions(t.name, t.shape, tuple((q, b, d * gains.get(category(t.name), 1.0)) for q, b, d in t.options))
            for t in tensors]


def total_bytes(tensors: Sequence[TensorOptions], types: Mapping[str, T]) -> int:
    return sum(next(b for q, b, _ in t.options if q == types[t.name]) for t in tensors)


def bits_per_weight(tensors: Sequence[TensorOptions], types: Mapping[str, T]) -> float:
    return constants.bits_per_weight(total_bytes(tensors, types), sum(t.n_elements for t in tensors))


def predicted_damage(tensors: Sequence[TensorOptions], types: Mapping[str, T]) -> float:
    """The summed damage of a choice of types: the predicted mean KLD when the damages carry gains."""
    return sum(next(d for q, _, d in t.options if q == types[t.name]) for t in tensors)


def budget_for_bpw(tensors: Sequence[TensorOptions], bpw: float) -> int:
    """The bytes of tensor data a file of ``bpw`` bits per weight may hold (constants.bits_per_weight)."""
    return math.floor(bpw * sum(t.n_elements for t in tensors) / 8.0)


def _hull(options: Sequence[tuple[T, int, float]]) -> list[tuple[T, int, float]]:
    """The lower convex hull of (bytes, damage), from the smallest option, damage falling."""
    pts = sorted(options, key=lambda o: (o[1], o[2], o[0].name))
    frontier = []
    for p in pts:  # drop options no better than a smaller one
        if not frontier or p[2] < frontier[-1][2]:
            frontier.append(p)
    hull: list[tuple[T, int, float]] = []
    for p in frontier:
        while len(hull) >= 2:
            (_, b0, d0), (_, b1, d1) = hull[-2], hull[-1]
            # hull[-1] lies on or above the chord hull[-2] → p: not on the lower hull
            if (d1 - d0) * (p[1] - b0) >= (p[2] - d0) * (b1 - b0):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(tensors: Sequence[TensorOptions], budget_bytes: int) -> dict[str, T]:
    """Each tensor's type, so that the tensors' bytes are at most ``budget_bytes`` and the summed
    damage is least (greedy on damage removed per byte along each tensor's convex hull)."""
    hulls = [_hull(t.options) for t in tensors]
    level = [0] * len(tensors)
    used = sum(h[0][1] for h in hulls)
    if used > budget_bytes:
        raise UnsupportedError("target", f"the smallest types need {used} bytes of tensors, the budget is "
                               f"{budget_bytes}", "raise the target")
    heap = []

    def push(i: int) -> None:
        h, k = hulls[i], level[i]
        if k + 1 < len(h):
            gain = (h[k][2] - h[k + 1][2]) / (h[k + 1][1] - h[k][1])
            heapq.heappush(heap, (-gain, i))

    for i in range(len(tensors)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        h, k = hulls[i], level[i]
        extra = h[k + 1][1] - h[k][1]
        if used + extra > budget_bytes:
            continue  # this tensor's later upgrades cost more per gain: it stays
        used += extra
        level[i] = k + 1
        push(i)
    return {t.name: h[k][0] for t, h, k in zip(tensors, hulls, level)}


def base_mix(tensors: Sequence[TensorOptions], types: Mapping[str, T]) -> str:
    """The llama-quantize mix a recipe goes with: the one whose type most weights got."""
    weights: dict[T, int] = {}
    for t in tensors:
        if len(t.options) > 1 or types[t.name] in MIX_OF_TYPE:
            weights[types[t.name]] = weights.get(types[t.name], 0) + t.n_elements
    if not weights:
        return "Q8_0"
    top = max(weights.items(), key=lambda kv: (kv[1], -CANDIDATE_TYPES.index(kv[0])))[0]
    return MIX_OF_TYPE[top]


def tensor_type_file(tensors: Sequence[TensorOptions], types: Mapping[str, T]) -> str:
    """llama-quantize's ``--tensor-type-file``: ``pattern=type`` separated by newlines, one per
    quantized tensor, the pattern the tensor's whole name (tools/quantize/quantize.cpp reads it
    with ``>>``, lower-cases the pattern, and std::regex_search's it against each tensor name)."""
    return "".join(f"^{re.escape(t.name)}$={types[t.name].name.lower()}\n"
                   for t in tensors if candidate_types(t.name, t.shape))


def parse_tensor_type_file(text: str) -> tuple[tuple[str, T], ...]:
    """A ``--tensor-type-file`` as llama-quantize reads it (whitespace-separated ``REGEX=TYPE``)."""
    from so8t_core.quantize.mixes import parse_tensor_types

    return parse_tensor_types(text.split())


def target_types(tensors: Sequence[TensorOptions], *, bpw: float | None = None,
                 size: int | None = None) -> dict[str, T]:
    """The allocation for a target bits per weight or a target size of tensor data (bytes)."""
    if (bpw is None) == (size is None):
        raise ValueError("give exactly one of bpw and size")
    budget = budget_for_bpw(tensors, bpw) if bpw is not None else int(size)
    return allocate(tensors, budget)


def file_overhead(n_weights: int, n_tensors: int, f32_file_size: int) -> int:
    """What a model file holds beyond its tensor data, as a target size counts it: the F32 file's
    header, metadata and alignment padding (``f32_file_size``, its tensors all F32), with a margin
    for the keys only a quantized file has (quantize.imatrix.*) and per-tensor padding."""
    return f32_file_size - 4 * n_weights + 32 * n_tensors + 65536


def size_budget(tensors: Sequence[TensorOptions], size: int, f32_file_size: int) -> int:
    """The bytes of tensor data a file of at most ``size`` bytes may hold."""
    return size - file_overhead(sum(t.n_elements for t in tensors), len(tensors), f32_file_size)


def target_budgets(tensors: Sequence[TensorOptions], bpw: float = 0.0, size: int = 0,
                   f32_file_size: int = 0) -> list[tuple[str, dict, int]]:
    """(release label, the goal as the manifest records it, bytes of tensor data) for --target-bpw
    and --target-size (0: not asked; a size needs the F32 file's size): the run and its dry run."""
    out = []
    if bpw:
        out.append((auto_label(bpw), {"bpw": bpw}, budget_for_bpw(tensors, bpw)))
    if size:
        budget = size_budget(tensors, size, f32_file_size)
        out.append((auto_label(8.0 * budget / sum(t.n_elements for t in tensors)), {"size": size}, budget))
    return out


def smallest_bytes(shapes: Sequence[tuple[str, Sequence[int]]]) -> int:
    """The fewest bytes of tensor data any target mix can give these tensors (every weight at its
    smallest candidate, the rest F32): known from the plan alone, before anything is measured."""
    return sum(min((tensor_nbytes(tuple(shape), q) for q in candidate_types(name, shape)),
                   default=tensor_nbytes(tuple(shape), T.F32)) for name, shape in shapes)


def recipe_mix_types(shapes: Sequence[tuple[str, Sequence[int]]], tensors: Sequence[TensorOptions],
                     types: Mapping[str, T], model, has_imatrix: bool) -> tuple[str, list[T]]:
    """(the mix a recipe goes with, each tensor's type as llama-quantize's rules give it with the
    recipe as overrides): how an AUTO release is quantized, like any mix with --tensor-type
    (``model``: mixes.ModelShape)."""
    from so8t_core.constants import quant_type
    from so8t_core.quantize.mixes import MixOptions, assign_types

    base = base_mix(tensors, types)
    options = MixOptions(tensor_types=parse_tensor_type_file(tensor_type_file(tensors, types)), has_imatrix=has_imatrix)
    return base, assign_types(shapes, quant_type(base), model, options)


def render_recipe(tensors: Sequence[TensorOptions], types: Mapping[str, T], gains: bool = True) -> str:
    """The recipe as the per-quant card shows it: a Markdown table, one row per tensor class, one
    column per layer (the tensors outside the blocks in a column of their own), and the total
    (``gains``: whether the damages carry class gains, i.e. whether their sum predicts the KLD)."""
    from so8t_core.quantize.mixes import category

    quantized = [t for t in tensors if candidate_types(t.name, t.shape)]
    layers = sorted({int(t.name.split(".")[1]) for t in quantized if t.name.startswith("blk.")})
    cells: dict[str, dict[str, str]] = {}
    for t in quantized:
        column = t.name.split(".")[1] if t.name.startswith("blk.") else "—"
        cells.setdefault(category(t.name), {})[column] = types[t.name].name
    columns = ["—", *map(str, layers)] if any("—" in row for row in cells.values()) else list(map(str, layers))
    lines = ["| tensor class | " + " | ".join("not in a block" if c == "—" else f"layer {c}" for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for cls, row in cells.items():
        lines.append(f"| {cls} | " + " | ".join(row.get(c, "") for c in columns) + " |")
    damage = predicted_damage(tensors, types)
    lines.append(f"\n{bits_per_weight(tensors, types):.3f} bits per weight, {total_bytes(tensors, types):,} bytes of "
                 "tensor data; " + (f"predicted mean KLD {damage:.4g}" if gains else
                                    f"summed relative output noise {damage:.4g} (no class gains: not a KLD)"))
    return "\n".join(lines)


def auto_label(bpw: float) -> str:
    """The release label of a bpw target: AUTO-4.89 (two decimals, as the card prints bpw)."""
    return f"{AUTO_PREFIX}{bpw:.2f}"


# --- The smallest file within a measured KLD (--target-kld) ----------------------------------

KLD_SEARCH_STEPS = 6  # bisection steps after the two ends: at most 8 files quantized and evaluated
KLD_SEARCH_RESOLUTION = 0.05  # bits per weight: a budget interval this narrow is not split again


@dataclass(frozen=True)
class KldTrial:
    """One budget the search tried: its allocation's bytes of tensor data and bits per weight, and
    the mean KLD its file measured."""

    budget_bytes: int
    bits_per_weight: float
    tensor_bytes: int
    kld: float

    def as_record(self, max_kld: float) -> dict:
        return {"bits_per_weight": round(self.bits_per_weight, 4), "tensor_bytes": self.tensor_bytes,
                "kld_mean": self.kld, "within": self.kld <= max_kld}


@dataclass(frozen=True)
class KldSearch:
    """What :func:`search_kld` found: the chosen allocation (None: not even the largest types meet the
    bound), the trials in the order they were made, and the largest budget tried that failed below
    the chosen one (None: the smallest types already meet it)."""

    max_kld: float
    types: dict[str, T] | None
    chosen: KldTrial | None
    next_smaller: KldTrial | None
    trials: tuple[KldTrial, ...]

    def as_record(self) -> dict:
        """What a release's manifest records of the search."""
        return {"max_kld": self.max_kld, "trials": [t.as_record(self.max_kld) for t in self.trials],
                "chosen": self.chosen and self.chosen.as_record(self.max_kld),
                "next_smaller": self.next_smaller and self.next_smaller.as_record(self.max_kld)}


def search_kld(tensors: Sequence[TensorOptions], max_kld: float, measure_kld,
               steps: int = KLD_SEARCH_STEPS, resolution: float = KLD_SEARCH_RESOLUTION) -> KldSearch:
    """The smallest allocation whose file measures a mean KLD of at most ``max_kld``
    (``measure_kld(types) -> float``: quantize, assemble and evaluate that allocation).

    A bisection on the budget between the smallest types (every weight at its smallest candidate)
    and the largest useful ones (every weight at the least damage of its hull), each budget's types
    from :func:`allocate`. The largest is tried first: when it is over the bound, nothing is (the
    search ends there). Then the smallest: when it is within, it is the answer. Otherwise the
    invariant is "the upper end is within, the lower is not", so whatever the measured KLD does
    between budgets (it need not fall at every step), the answer is within the bound and the
    largest budget tried below it was not. A budget whose allocation is an end's is not measured
    again; the search stops after ``steps`` measured midpoints or when the ends' files are within
    ``resolution`` bits per weight of each other, or no allocation lies between them."""
    hulls = [_hull(t.options) for t in tensors]
    n_weights = sum(t.n_elements for t in tensors)
    trials: list[KldTrial] = []

    def trial(budget: int) -> tuple[dict[str, T], KldTrial]:
        types = allocate(tensors, budget)
        nbytes = total_bytes(tensors, types)
        known = next((t for t in trials if t.tensor_bytes == nbytes and t.budget_bytes == budget), None)
        if known is not None:
            return types, known
        made = KldTrial(budget, constants.bits_per_weight(nbytes, n_weights), nbytes, float(measure_kld(types)))
        trials.append(made)
        return types, made

    top_types, top = trial(sum(h[-1][1] for h in hulls))
    if not top.kld <= max_kld:  # NaN is not within either
        return KldSearch(max_kld, None, None, top, tuple(trials))
    low_types, low = trial(sum(h[0][1] for h in hulls))
    if low.kld <= max_kld:
        return KldSearch(max_kld, low_types, low, None, tuple(trials))
    lo_budget, hi_budget = low.budget_bytes, top.budget_bytes
    measured = 0
    while measured < steps and top.bits_per_weight - low.bits_per_weight > resolution:
        mid = (lo_budget + hi_budget) // 2
        if mid in (lo_budget, hi_budget):
            break
        types = allocate(tensors, mid)
        if types == low_types:
            lo_budget = mid  # the same file as the lower end: no need to measure it
            continue
        if types == top_types:
            hi_budget = mid
            continue
        types, made = trial(mid)
        measured += 1
        if made.kld <= max_kld:
            top_types, top, hi_budget = types, made, mid
        else:
            low_types, low, lo_budget = types, made, mid
    return KldSearch(max_kld, top_types, top, low, tuple(trials))


def kld_label(max_kld: float) -> str:
    """The release label of a KLD target: AUTO-KLD-0.05. It names what was asked, as AUTO-4.50 names
    --target-bpw 4.5, not the bits per weight the search found (which the manifest records): a
    catalog knows the label before the run, and a re-run that finds another size republishes the
    same release rather than adding one."""
    return f"{AUTO_PREFIX}KLD-" + f"{max_kld:.10f}".rstrip("0").rstrip(".")
