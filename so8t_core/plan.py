"""The tensor plan: which GGUF tensor comes from which checkpoint tensor, and how.

Every output tensor is one :class:`TensorPlan`: a source tensor, a transform
(copy, llama.cpp's Q/K permutation, or an SO8T bake into o_proj) and the output
shape. The plan is small, JSON-serializable and deterministic, so pipeline tasks
pass it around instead of arrays, and a cache key can name exactly what a tensor is.
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict

from .architectures import ModelSpec, gguf_tensor_class, layer_of
from .errors import CheckpointError
from .rotation import apply_gate, bake_error, checked_rotation, fold_into_linear
from .so8t import So8tStructure

Transform = Literal["copy", "permute_q", "permute_k", "bake_o_proj", "bake_o_proj_bias"]

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
    rotation: str | None = None
    position: str | None = None
    bias_source: str | None = None  # o_proj bias, so the bake error covers the whole module

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
        return ";".join(parts)


def llama_cpp_order(plan: list[TensorPlan]) -> list[TensorPlan]:
    """llama.cpp's tensor order: non-block tensors first, then by block, each sorted by name."""
    return sorted(plan, key=lambda p: (-1 if p.layer is None else p.layer, p.gguf_name))


def _expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    h, hd = spec.hidden_size, spec.head_dim
    q, kv, ff = spec.n_heads * hd, spec.n_kv_heads * hd, spec.intermediate_size
    return {
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.bias": (h,),
        "mlp.gate_proj.weight": (ff, h), "mlp.up_proj.weight": (ff, h), "mlp.down_proj.weight": (h, ff),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }


REQUIRED_LAYER_TENSORS = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
)


def build_plan(tensors: Mapping[str, object], spec: ModelSpec, structure: So8tStructure, where: str
               ) -> list[TensorPlan]:
    """Plan every base-model tensor; SO8T tensors are consumed by bakes or the sidecar."""
    so8t_tensors = {g.tensor for g in structure.gates}
    for head in structure.heads:
        so8t_tensors |= {head.weight} | ({head.bias} if head.bias else set())
    name_map = spec.tensor_name_map()
    layer_shapes = _expected_shapes(spec)
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
            suffix = name.split(".", 3)[3]
            expect = layer_shapes.get(suffix)
        else:
            expect = {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size),
                      "lm_head.weight": (spec.vocab_size, spec.hidden_size),
                      "model.norm.weight": (spec.hidden_size,)}.get(name)
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
            item.update(transform="bake_o_proj", gate=gated[layer].tensor, rotation=cfg.rotation,
                        position=cfg.position, bias_source=bias if bias in tensors else None)
        elif layer in gated and name.endswith("self_attn.o_proj.bias") and cfg.position == "post_o_proj":
            item.update(transform="bake_o_proj_bias", gate=gated[layer].tensor, rotation=cfg.rotation,
                        position=cfg.position)
        plan.append(TensorPlan(**item))

    present = {p.source for p in plan}
    missing = [f"model.layers.{i}.{t}" for i in range(spec.n_layers) for t in REQUIRED_LAYER_TENSORS
               if f"model.layers.{i}.{t}" not in present]
    missing += [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in present]
    if not spec.tied_embeddings and "lm_head.weight" not in present:
        missing.append("lm_head.weight")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(where, f"missing tensors {', '.join(missing[:3])}{more}",
                              "the checkpoint is incomplete or config.json describes another model")
    return llama_cpp_order(plan)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half layout → llama.cpp's interleaved RoPE layout (rows of each head)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def materialize(item: TensorPlan, read: Callable[[str], np.ndarray], where: str
                ) -> tuple[np.ndarray, float | None]:
    """The float32 output tensor for ``item``, and its bake error if it was baked."""
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
