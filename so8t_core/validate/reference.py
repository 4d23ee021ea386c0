"""The PyTorch SO8T reference: the base model from transformers with the gates applied live.

The base model is transformers' own class for ``architectures[0]`` (LlamaForCausalLM,
Qwen2ForCausalLM, Phi3ForCausalLM, ...), loaded with the checkpoint's tensors.

Nothing is baked here: each gated layer's o_proj gets a hook that rotates its input
(``pre_o_proj``) or its output (``post_o_proj``) exactly as SO8T's forward does, so
this is the model the checkpoint describes. Validation compares llama.cpp's logits
on the baked GGUF against these. Unlike conversion, this loads the whole model.
"""

from __future__ import annotations

import numpy as np

from so8t_core.source.architectures import ModelSpec, model_spec
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.lora import MergedReader
from so8t_core.source.rotation import checked_rotation
from so8t_core.source.so8t import So8tStructure, find_structure


def _gate_fn(r: np.ndarray):
    import torch

    rt = torch.from_numpy(r.astype(np.float32))

    def rotate(x):
        n = rt.shape[0]
        xb = x.reshape(*x.shape[:-1], n, 8)
        return torch.einsum("...ni,nio->...no", xb, rt.to(x.dtype)).reshape(x.shape)

    return rotate


def _tensor(a: np.ndarray):
    """A float32 torch view of ``a``, copied only when it must be (read-only buffers, other dtypes)."""
    import torch

    if a.dtype != np.float32 or not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, dtype=np.float32)
    return torch.from_numpy(a)


def base_model(config: dict, spec: ModelSpec, state: dict[str, np.ndarray]):
    """transformers' own float32 model for ``spec`` (eager attention, eval mode) holding exactly ``state``.

    ``config`` is the checkpoint's config.json; its SO8T block is not the base model's."""
    import torch
    import transformers

    model_class = getattr(transformers, spec.hf_architecture)
    cfg = {k: v for k, v in config.items() if k not in ("so8t", "architectures", "torch_dtype", "dtype")}
    hf_config = model_class.config_class(**cfg)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_class(hf_config).float().eval()
    if spec.n_experts:
        state = transformers_expert_state(spec, state, set(model.state_dict()))
    missing, unexpected = model.load_state_dict({k: _tensor(v) for k, v in state.items()}, strict=False)
    allowed_missing = {"lm_head.weight"} if spec.tied_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"reference model mismatch: missing {missing}, unexpected {unexpected}")
    if spec.tied_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def transformers_expert_state(spec: ModelSpec, state: dict[str, np.ndarray], model_keys: set[str]
                              ) -> dict[str, np.ndarray]:
    """The checkpoint's experts (one tensor per expert and projection, as the Hub ships MoE models) in the
    layout of the installed transformers' model: transformers 5 holds each layer's experts as two 3-D
    parameters, ``mlp.experts.gate_up_proj`` (gate rows, then up rows) and ``mlp.experts.down_proj``, and
    Mixtral's router as ``mlp.gate``. Its routing is llama.cpp's (softmax over the router's logits, top-k,
    renormalized where the architecture's rules say so, Qwen2-MoE's sigmoid-gated shared expert), which
    model_spec checks the config agrees with."""
    if "model.layers.0.mlp.experts.gate_up_proj" not in model_keys:
        return state  # per-expert parameters: the checkpoint's own names
    out = {k: v for k, v in state.items() if ".experts." not in k}
    block = "block_sparse_moe" if spec.rules.experts == "mixtral" else "mlp"
    for layer in range(spec.n_layers):
        experts = range(spec.n_experts)
        gate, up, down = ([state[spec.expert_tensor(layer, e, i)] for e in experts] for i in range(3))
        p = f"model.layers.{layer}."
        out[p + "mlp.experts.gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gate, up)])
        out[p + "mlp.experts.down_proj"] = np.stack(down)
        out[p + "mlp.gate.weight"] = out.pop(p + f"{block}.gate.weight")
    return out


class So8tReference:
    def __init__(self, checkpoint: Checkpoint, structure: So8tStructure | None = None, adapter=None):
        """``adapter``: a :class:`so8t_core.source.lora.LoraAdapter` merged into the weights (W + scale·B@A),
        so the reference is the model the conversion with ``--lora`` produces."""
        import torch

        spec = model_spec(checkpoint.config, checkpoint.uri)
        self.structure = structure or find_structure(checkpoint.tensors, checkpoint.config, spec, checkpoint.uri)
        so8t_names = self.structure.non_base_tensors
        # The adapter's delta is merged as the conversion merges it (lora.MergedReader).
        reader = checkpoint if adapter is None else MergedReader(checkpoint, adapter)
        state = {name: reader.read(name)
                 for name in checkpoint.tensors if name not in so8t_names and not name.endswith("rotary_emb.inv_freq")}
        if adapter is not None and (unknown := sorted(set(adapter.pairs) - set(state))):
            raise RuntimeError(f"reference model has no parameter {unknown[0]!r} for the LoRA adapter")
        model = base_model(checkpoint.config, spec, state)

        position = self.structure.config.position if self.structure.config else None
        for gate in self.structure.gates:
            r = checked_rotation(checkpoint.read(gate.tensor), gate.parameterization, checkpoint.uri, gate.tensor)
            rotate = _gate_fn(r)
            o_proj = model.model.layers[gate.layer].self_attn.o_proj
            if position == "pre_o_proj":
                o_proj.register_forward_pre_hook(lambda mod, args, f=rotate: (f(args[0]),) + tuple(args[1:]))
            else:
                o_proj.register_forward_hook(lambda mod, args, out, f=rotate: f(out))

        self.heads = {h.head: (torch.from_numpy(checkpoint.read(h.weight).copy()),
                               None if h.bias is None else torch.from_numpy(checkpoint.read(h.bias).copy()))
                      for h in self.structure.heads}
        self.model = model
        self.spec = spec

    def logits(self, token_ids: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            ids = torch.tensor([list(token_ids)], dtype=torch.long)
            return self.model(input_ids=ids).logits[0].float().numpy()

    def final_hidden_states(self, token_ids: list[int]) -> np.ndarray:
        """The final normed hidden state (what the triality heads and the LM head read)."""
        import torch

        with torch.inference_mode():
            ids = torch.tensor([list(token_ids)], dtype=torch.long)
            return self.model.model(input_ids=ids).last_hidden_state[0].float().numpy()

    def head_logits(self, hidden: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        out = {}
        for head, (w, b) in self.heads.items():
            y = torch.from_numpy(np.asarray(hidden, dtype=np.float32)) @ w.T
            out[head] = (y if b is None else y + b).numpy()
        return out


def baked_model(checkpoint: Checkpoint, adapter=None):
    """The plain model the GGUF stands for, as a transformers model: every gate folded into its
    o_proj exactly as the conversion folds it (the same plan, the same float64 bake), the LoRA
    adapter (if any) merged before the bake, no hooks and no SO8T tensors.

    Weights stay in Hugging Face layout: the Q/K row permutation of the plan is llama.cpp's
    and is not applied here. The triality heads are not part of it (see ``So8tReference.heads``).
    """
    from so8t_core.analysis import checkpoint_model
    from so8t_core.plan import materialize

    spec, _, plan = checkpoint_model(checkpoint)
    reader = checkpoint
    if adapter is not None:
        adapter.bind(plan, checkpoint.uri)
        reader = MergedReader(checkpoint, adapter)
    state = {}
    for item in plan:
        if item.transform == "constant":
            continue  # llama.cpp's RoPE factor tensors; transformers computes them from config.json
        if item.transform.startswith("bake"):
            state[item.source], _ = materialize(item, reader, checkpoint.uri)
        else:
            state.update({name: reader.read(name) for name in item.sources or (item.source,)})
    return base_model(checkpoint.config, spec, state)
