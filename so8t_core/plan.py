"""The tensor plan: which GGUF tensor comes from which checkpoint tensor, and how.

Every output tensor is one :class:`TensorPlan`: a source tensor, a transform
(copy, llama.cpp's Q/K permutation, or an SO8T bake into o_proj) and the output
shape. The plan is small, JSON-serializable and deterministic, so pipeline tasks
pass it around instead of arrays, and a cache key can name exactly what a tensor is.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Literal, Mapping, Protocol, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from so8t_core.constants import ROTATION_BLOCK
from so8t_core.errors import CheckpointError, UnsupportedError
from so8t_core.source.architectures import EXPERT_RE, ModelSpec, gguf_tensor_class, layer_of, rope_parameters
from so8t_core.source.rotation import apply_gate, checked_rotation, fold_into_linear
from so8t_core.source.so8t import So8tStructure

Transform = Literal["copy", "permute_q", "permute_k", "bake_o_proj", "bake_o_proj_bias", "constant",
                    "norm_plus_one", "merge_experts"]

# Buffers some checkpoints carry that are recomputed by every runtime.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class TensorPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    gguf_name: str
    source: str  # checkpoint tensor name
    shape: tuple[int, ...]  # numpy (row-major) shape of the output tensor
    tensor_class: str
    layer: int | None = None
    transform: Transform = "copy"
    n_heads: int | None = None  # for permute_q / permute_k
    gate: str | None = None  # θ tensor, for bakes
    rotation: str | None = None  # "cayley" | "expm" for θ, "matrix" for a stored R
    position: str | None = None
    bias_source: str | None = None  # o_proj bias, so the bake error covers the whole module
    values: tuple[float, ...] | None = None  # for "constant": tensors computed from config.json
    lora: str | None = None  # sha256 of the LoRA pair merged into the source (W + scale·B@A) before the transform
    # for "merge_experts": every expert's tensor, in expert order (``source`` is the first); the output is
    # their stack, (experts, rows, columns), as llama.cpp's converter writes ffn_{gate,up,down}_exps
    sources: tuple[str, ...] | None = None

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every checkpoint tensor this output is made from (sources, gate, o_proj bias)."""
        return tuple(n for n in (*(self.sources or (self.source,)), self.gate, self.bias_source) if n)

    def transform_id(self) -> str:
        """A stable description of what is done to the source (part of cache keys)."""
        parts = [self.transform]
        if self.n_heads is not None:
            parts.append(f"heads={self.n_heads}")
        if self.gate is not None:
            parts += [f"gate={self.gate}", f"rotation={self.rotation}", f"position={self.position}"]
        if self.values is not None:
            parts.append("values=" + ",".join(repr(v) for v in self.values))
        if self.lora is not None:
            parts.append(f"lora={self.lora}")
        if self.sources is not None:
            parts.append(f"experts={len(self.sources)}")
        return ";".join(parts)


def llama_cpp_order(plan: list[TensorPlan]) -> list[TensorPlan]:
    """llama.cpp's tensor order: non-block tensors first, then by block, each sorted by name."""
    return sorted(plan, key=lambda p: (-1 if p.layer is None else p.layer, p.gguf_name))


def build_plan(tensors: Mapping[str, object], spec: ModelSpec, structure: So8tStructure, where: str
               ) -> list[TensorPlan]:
    """Plan every base-model tensor; SO8T tensors are consumed by bakes or the sidecar."""
    so8t_tensors = structure.non_base_tensors
    name_map = spec.tensor_name_map()
    required, optional = spec.layer_tensor_shapes()
    layer_shapes = {**optional, **required}
    global_shapes = {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size),
                     "lm_head.weight": (spec.vocab_size, spec.hidden_size),
                     "model.norm.weight": (spec.hidden_size,)}
    gated = {g.layer: g for g in structure.gates}
    cfg = structure.config

    plan: list[TensorPlan] = []
    experts: dict[tuple[int, str], dict[int, str]] = {}  # (layer, projection) -> expert -> tensor
    for name, entry in tensors.items():
        if name in so8t_tensors or name.endswith(IGNORED_SUFFIXES):
            continue
        if spec.n_experts and (m := EXPERT_RE.match(name)):
            expect = layer_shapes.get(name.split(".", 3)[3])
            if expect is None or int(m.group(1)) >= spec.n_layers:
                raise CheckpointError(where, f"tensor {name!r} is not an expert of this {spec.hf_architecture} "
                                             f"({spec.n_layers} layers, {spec.n_experts} experts)",
                                      "config.json and the weights disagree")
            if tuple(entry.shape) != expect:
                raise CheckpointError(where, f"tensor {name!r} has shape {list(entry.shape)} but config.json implies "
                                             f"{list(expect)}", "config.json and the weights disagree")
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = name
            continue
        if name == "lm_head.weight" and spec.tied_embeddings:
            continue  # tied: llama.cpp reuses token_embd, as the HF model does (Gemma always is)
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise CheckpointError(where, f"tensor {name!r} has no place in a {spec.arch} GGUF",
                                  "is this checkpoint really a " + spec.hf_architecture + "?")
        shape = tuple(entry.shape)
        layer = layer_of(name)
        if layer is not None:
            if layer >= spec.n_layers:
                raise CheckpointError(where, f"tensor {name!r} is in layer {layer} but config.json has "
                                             f"{spec.n_layers} layers", "config.json and the weights disagree")
            expect = layer_shapes.get(name.split(".", 3)[3])
        else:
            expect = global_shapes.get(name)
        if expect is not None and shape != expect:
            raise CheckpointError(where, f"tensor {name!r} has shape {list(shape)} but config.json implies "
                                         f"{list(expect)}", "config.json and the weights disagree")

        item = dict(gguf_name=gguf_name, source=name, shape=shape, layer=layer,
                    tensor_class=gguf_tensor_class(gguf_name))
        if spec.permutes_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            item.update(transform="permute_q", n_heads=spec.n_heads)
        elif spec.permutes_qk and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            item.update(transform="permute_k", n_heads=spec.n_kv_heads)
        elif spec.rules.norm_plus_one and name.endswith("norm.weight"):
            item.update(transform="norm_plus_one")  # Gemma's RMSNorm scales by 1 + w; llama.cpp's by w
        elif layer in gated and name.endswith("self_attn.o_proj.weight"):
            bias = name[: -len("weight")] + "bias"
            item.update(transform="bake_o_proj", gate=gated[layer].tensor, rotation=gated[layer].parameterization,
                        position=cfg.position, bias_source=bias if bias in tensors else None)
        elif layer in gated and name.endswith("self_attn.o_proj.bias") and cfg.position == "post_o_proj":
            item.update(transform="bake_o_proj_bias", gate=gated[layer].tensor,
                        rotation=gated[layer].parameterization,
                        position=cfg.position)
        plan.append(TensorPlan(**item))
    plan += merged_experts(experts, spec, layer_shapes)
    plan += generated_tensors(spec, where)

    present = {p.source for p in plan} | {n for by_expert in experts.values() for n in by_expert.values()}
    missing = [f"model.layers.{i}.{t}" for i in range(spec.n_layers) for t in required
               if f"model.layers.{i}.{t}" not in present]
    missing += [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in present]
    if not spec.tied_embeddings and "lm_head.weight" not in present:
        missing.append("lm_head.weight")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(where, f"missing tensors {', '.join(missing[:3])}{more}",
                              "the checkpoint is incomplete or config.json describes another model")
    return llama_cpp_order(plan)


def merged_experts(experts: Mapping[tuple[int, str], Mapping[int, str]], spec: ModelSpec,
                   layer_shapes: Mapping[str, tuple[int, ...]]) -> list[TensorPlan]:
    """One ``ffn_{gate,up,down}_exps`` tensor per layer and projection, the experts stacked in order, as
    llama.cpp's converter merges them. A layer missing an expert is left out here (and reported missing)."""
    name_map = spec.tensor_name_map()
    out = []
    for (layer, _), by_expert in sorted(experts.items()):
        if sorted(by_expert) != list(range(spec.n_experts)):
            continue
        names = tuple(by_expert[e] for e in range(spec.n_experts))
        projection = next(i for i in range(3) if spec.expert_tensor(layer, 0, i) == names[0])
        gguf_name = name_map.get_name(spec.merged_expert_tensor(layer, projection), try_suffixes=(".weight",))
        shape = (spec.n_experts, *layer_shapes[names[0].split(".", 3)[3]])
        out.append(TensorPlan(gguf_name=gguf_name, source=names[0], sources=names, shape=shape, layer=layer,
                              tensor_class=gguf_tensor_class(gguf_name), transform="merge_experts"))
    return out


def generated_tensors(spec: ModelSpec, where: str) -> list[TensorPlan]:
    """Tensors llama.cpp's converter computes from config.json (RoPE frequency factors)."""
    rope = rope_parameters(spec.config)
    rope_type = str(rope.get("rope_type", "")).lower()
    out = []
    if spec.arch == "llama" and rope_type == "llama3":
        out.append(_constant("rope_freqs.weight", llama3_rope_factors(spec, rope)))
    if spec.arch == "phi3" and rope.get("long_factor"):
        rope_dims = phi3_rope_dims(spec)
        long, short = rope.get("long_factor"), rope.get("short_factor")
        if not short or len(long) != len(short) or len(long) != rope_dims // 2:
            raise CheckpointError(where, f"config.json: rope long_factor/short_factor must both have "
                                         f"{rope_dims // 2} entries", "fix rope_scaling in config.json")
        out += [_constant("rope_factors_long.weight", long), _constant("rope_factors_short.weight", short)]
    return out


def _constant(gguf_name: str, values) -> TensorPlan:
    values = tuple(float(np.float32(v)) for v in values)
    return TensorPlan(gguf_name=gguf_name, source="", shape=(len(values),), tensor_class="other",
                      transform="constant", values=values)


def llama3_rope_factors(spec: ModelSpec, rope: Mapping) -> list[float]:
    """Llama 3's RoPE frequency factors, computed as llama.cpp's converter does (float32 freqs)."""
    base = rope.get("rope_theta", 10000.0)
    dim = spec.head_dim
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def phi3_rope_dims(spec: ModelSpec) -> int:
    partial = rope_parameters(spec.config).get("partial_rotary_factor", 1.0)
    return int(partial * spec.hidden_size) // spec.n_heads


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half layout → llama.cpp's interleaved RoPE layout (rows of each head)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# Rows are materialized in chunks of about this many elements (32 MiB of float32), so a
# conversion holds a few chunks per tensor in flight, never a whole large tensor.
CHUNK_ELEMENTS = 8 << 20

# Memory (--max-memory): per tensor in flight, per row chunk, the source bytes, their float32
# form, the quantized bytes and the dequantized copy used for error statistics; and the process
# itself (the interpreter, torch, Prefect), whatever the model.
BYTES_IN_FLIGHT_PER_F32_BYTE = 4
BASELINE_BYTES = 1 << 30
GIB = 1 << 30


def bytes_per_tensor_in_flight(plan: Sequence["TensorPlan"]) -> int:
    """What one quantize task holds at most: its largest chunk, four times over as float32."""
    return BYTES_IN_FLIGHT_PER_F32_BYTE * 4 * min(max((p.n_elements for p in plan), default=0), CHUNK_ELEMENTS)


def tensors_in_flight(max_memory_gb: float | None, plan: Sequence["TensorPlan"], workers: int) -> int:
    """How many quantize tasks may run at once: ``workers``, fewer under a memory cap (GiB);
    a cap below the floor (:func:`check_memory_cap`) is a one-line error."""
    if max_memory_gb is None:
        return workers
    check_memory_cap(max_memory_gb, plan)
    per_tensor = bytes_per_tensor_in_flight(plan)
    return max(1, min(workers, int((max_memory_gb * GIB - BASELINE_BYTES) // max(per_tensor, 1))))


def check_memory_cap(max_memory_gb: float, plan: Sequence["TensorPlan"]) -> None:
    """Refuse a --max-memory below what any conversion of this checkpoint needs: the process
    itself (1 GiB) and one tensor in flight. Checked in the preflight, before any work."""
    per_tensor = bytes_per_tensor_in_flight(plan)
    floor = BASELINE_BYTES + per_tensor
    if max_memory_gb * GIB < floor:
        need = math.ceil(floor / GIB * 10) / 10
        raise UnsupportedError(f"--max-memory {max_memory_gb:g}",
                               f"too small: a conversion needs at least {need:.1f} GB ({BASELINE_BYTES / GIB:.1f} GB "
                               f"for the process: Python, torch, Prefect; {per_tensor / (1 << 20):,.1f} MB for one "
                               "tensor in flight)", f"allow at least --max-memory {need:.1f}")


# Tensors smaller than this share a quantize task, up to this many elements per task: a task
# costs Prefect tens of milliseconds, more than quantizing a norm or a bias does.
BATCH_ELEMENTS = 1 << 20


def quantize_batches(sizes: Sequence[int], max_elements: int = BATCH_ELEMENTS) -> list[list[int]]:
    """Positions of ``sizes`` (element counts) grouped into quantize tasks, in order of their
    first tensor: a tensor of ``max_elements`` or more alone, smaller ones together until a
    group reaches ``max_elements``. A task works through its tensors one after the other, so
    its memory stays bounded by one tensor's row chunks, whatever the group's size."""
    batches: list[list[int]] = []
    small: list[int] = []
    small_elements = 0
    for i, n in enumerate(sizes):
        if n >= max_elements:
            batches.append([i])
            continue
        if not small:
            batches.append(small)  # in place now, filled as small tensors come
        small.append(i)
        small_elements += n
        if small_elements >= max_elements:
            small, small_elements = [], 0
    return batches


class Reader(Protocol):
    def read(self, name: str) -> np.ndarray: ...
    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray: ...


class Materializer:
    """The float32 output tensor of one plan item, produced row chunk by row chunk.

    Every transform is row-local up to a small alignment: a permuted Q/K row comes from its
    own head, a baked o_proj row depends on nothing (gate before o_proj) or on its 8-row
    block (gate after it). The bake error is accumulated over the chunks and is final once
    all chunks were produced.
    """

    def __init__(self, item: TensorPlan, reader: Reader, where: str):
        self.item, self.reader, self.where = item, reader, where
        self.bake_error: float | None = None
        self._r = None
        if item.gate is not None:
            self._r = checked_rotation(reader.read(item.gate), item.rotation, where, item.gate)
        if item.transform == "bake_o_proj":
            self._bias = reader.read(item.bias_source).astype(np.float64) if item.bias_source else None
            rng = np.random.default_rng(0)  # the probe inputs of rotation.bake_error
            self._x = rng.standard_normal((16, item.shape[1]))
            self._xg = apply_gate(self._x, self._r) if item.position == "pre_o_proj" else None
            self._max_diff = self._max_gated = 0.0

    @property
    def alignment(self) -> int:
        """Chunks start and end on multiples of this many rows."""
        item = self.item
        if item.transform in ("permute_q", "permute_k"):
            return item.shape[0] // item.n_heads
        if item.transform == "bake_o_proj" and item.position == "post_o_proj":
            return ROTATION_BLOCK
        return 1

    def chunks(self, max_elements: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 rows) covering the whole output tensor, in order."""
        item = self.item
        if item.transform == "constant":
            yield 0, np.asarray(item.values, dtype=np.float32)
            return
        if len(item.shape) < 2:  # vectors are small: one chunk
            yield 0, self._transform(0, self.reader.read(item.source))
            self._finish()
            return
        if item.transform == "merge_experts":
            yield from self._expert_chunks(max_elements)
            return
        rows, width = item.shape[0], int(np.prod(item.shape[1:]))
        align = self.alignment
        step = max(align, (max_elements // max(width, 1)) // align * align)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            yield start, self._transform(start, self.reader.read_rows(item.source, start, stop))
        self._finish()

    def _expert_chunks(self, max_elements: int) -> Iterator[tuple[int, np.ndarray]]:
        """The stacked experts as rows of the (experts · rows, columns) matrix, one expert's rows at a time:
        a chunk never spans two experts (each has its own importance row), and never holds more than
        ``max_elements``, so merging the experts of a layer holds a chunk, not the layer's experts."""
        _, rows, width = self.item.shape
        step = max(1, max_elements // max(width, 1))
        for expert, name in enumerate(self.item.sources):
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                yield expert * rows + start, np.ascontiguousarray(self.reader.read_rows(name, start, stop),
                                                                  dtype=np.float32)

    def _transform(self, start: int, src: np.ndarray) -> np.ndarray:
        item = self.item
        if item.transform == "copy":
            return np.ascontiguousarray(src, dtype=np.float32)
        if item.transform == "norm_plus_one":  # in float32, as convert adds 1 to a float32 tensor
            return np.ascontiguousarray(src, dtype=np.float32) + np.float32(1.0)
        if item.transform in ("permute_q", "permute_k"):  # whole heads: permute within each
            heads = src.shape[0] // (item.shape[0] // item.n_heads)
            return np.ascontiguousarray(permute_qk(src, heads), dtype=np.float32)
        if item.transform == "bake_o_proj_bias":  # post position: b' = b·R (error reported with the weight)
            return apply_gate(src.astype(np.float64), self._r).astype(np.float32)
        # bake_o_proj: fold the gate into these rows, and measure the fold on the probe inputs
        w = src.astype(np.float64)
        stop = start + w.shape[0]
        if item.position == "pre_o_proj":
            w2, _ = fold_into_linear(w, None, self._r, item.position)
        else:
            w2, _ = fold_into_linear(w, None, self._r[start // ROTATION_BLOCK: stop // ROTATION_BLOCK], item.position)
        w32 = w2.astype(np.float32)
        b = 0.0 if self._bias is None else self._bias[start:stop]
        if item.position == "pre_o_proj":
            gated = self._xg @ w.T + b
            baked = self._x @ w32.astype(np.float64).T + b
        else:
            r = self._r[start // ROTATION_BLOCK: stop // ROTATION_BLOCK]
            gated = apply_gate(self._x @ w.T + b, r)
            baked = self._x @ w32.astype(np.float64).T + (0.0 if self._bias is None else apply_gate(b, r))
        self._max_diff = max(self._max_diff, float(np.abs(gated - baked).max()))
        self._max_gated = max(self._max_gated, float(np.abs(gated).max()))
        return w32

    def _finish(self) -> None:
        if self.item.transform == "bake_o_proj":
            self.bake_error = self._max_diff / max(self._max_gated, 1e-30)


class _WholeTensorReader:
    def __init__(self, read: Callable[[str], np.ndarray]):
        self._read = read

    def read(self, name: str) -> np.ndarray:
        return self._read(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._read(name)[start:stop]


def materialize(item: TensorPlan, read: Callable[[str], np.ndarray] | Reader, where: str
                ) -> tuple[np.ndarray, float | None]:
    """The whole float32 output tensor for ``item``, and its bake error if it was baked."""
    reader = read if hasattr(read, "read_rows") else _WholeTensorReader(read)
    m = Materializer(item, reader, where)
    parts = [chunk for _, chunk in m.chunks()]
    data = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return data.reshape(item.shape), m.bake_error
