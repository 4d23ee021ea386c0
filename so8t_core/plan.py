"""The tensor plan: which GGUF tensor comes from which checkpoint tensor, and how.

Every output tensor is one :class:`TensorPlan`: a source tensor, a transform
(copy, llama.cpp's Q/K permutation, or an SO8T bake into o_proj) and the output
shape. The plan is small, JSON-serializable and deterministic, so pipeline tasks
pass it around instead of arrays, and a cache key can name exactly what a tensor is.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict

from .architectures import ModelSpec, gguf_tensor_class, layer_of, rope_parameters
from .errors import CheckpointError
from .rotation import apply_gate, bake_error, checked_rotation, fold_into_linear
from .so8t import So8tStructure

Transform = Literal["copy", "permute_q", "permute_k", "bake_o_proj", "bake_o_proj_bias", "constant"]

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

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    def transform_id(self) -> str:
        """A stable description of what is done to the source (part of cache keys)."""
        parts = [self.transform]
        if self.n_heads is not None:
            parts.append(f"heads={self.n_heads}")
        if self.gate is not None:
            parts += [f"gate={self.gate}", f"rotation={self.rotation}", f"position={self.position}"]
        if self.values is not None:
            parts.append("values=" + ",".join(repr(v) for v in self.values))
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
    for name, entry in tensors.items():
        if name in so8t_tensors or name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and spec.tied_embeddings:
            continue  # tied: llama.cpp reuses token_embd, as the HF model does
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
        elif layer in gated and name.endswith("self_attn.o_proj.weight"):
            bias = name[: -len("weight")] + "bias"
            item.update(transform="bake_o_proj", gate=gated[layer].tensor, rotation=gated[layer].parameterization,
                        position=cfg.position, bias_source=bias if bias in tensors else None)
        elif layer in gated and name.endswith("self_attn.o_proj.bias") and cfg.position == "post_o_proj":
            item.update(transform="bake_o_proj_bias", gate=gated[layer].tensor,
                        rotation=gated[layer].parameterization,
                        position=cfg.position)
        plan.append(TensorPlan(**item))
    plan += generated_tensors(spec, where)

    present = {p.source for p in plan}
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


def materialize(item: TensorPlan, read: Callable[[str], np.ndarray], where: str
                ) -> tuple[np.ndarray, float | None]:
    """The float32 output tensor for ``item``, and its bake error if it was baked."""
    if item.transform == "constant":
        return np.asarray(item.values, dtype=np.float32), None
    src = read(item.source)
    if item.transform == "copy":
        return np.ascontiguousarray(src, dtype=np.float32), None
    if item.transform in ("permute_q", "permute_k"):
        return np.ascontiguousarray(permute_qk(src, item.n_heads), dtype=np.float32), None
    r = checked_rotation(read(item.gate), item.rotation, where, item.gate)
    if item.transform == "bake_o_proj":
        bias = read(item.bias_source) if item.bias_source else None
        w2, b2 = fold_into_linear(src, bias, r, item.position)
        w32 = w2.astype(np.float32)
        b32 = None if b2 is None else b2.astype(np.float32)
        return w32, bake_error(src, bias, r, item.position, w32, b32)
    # bake_o_proj_bias (post position): b' = b·R; its error is reported with the weight
    return apply_gate(src.astype(np.float64), r).astype(np.float32), None
