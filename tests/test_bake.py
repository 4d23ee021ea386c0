"""The bake, end to end in PyTorch: logits of the gated SO8T model vs the baked plain model."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from so8t_core.analysis import checkpoint_model
from so8t_core.plan import materialize
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.rotation import block_diagonal, checked_rotation
from so8t_core.validate.reference import So8tReference

TOKENS = list(np.random.default_rng(0).integers(3, 384, size=48))


def plain_model(ckpt: Checkpoint, weights: dict[str, np.ndarray]) -> LlamaForCausalLM:
    cfg = {k: v for k, v in ckpt.config.items() if k not in ("so8t", "architectures", "torch_dtype")}
    config = LlamaConfig(**cfg)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()},
                                                strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def baked_weights(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """Every base tensor in Hugging Face layout, with o_proj (and its bias) baked."""
    _, _, plan = checkpoint_model(ckpt)
    out = {}
    for item in plan:
        if item.transform.startswith("bake"):
            out[item.source], _ = materialize(item, ckpt.read, ckpt.uri)
        else:
            out[item.source] = ckpt.read(item.source)  # HF layout (no llama.cpp Q/K permutation)
    return out


@pytest.mark.parametrize("kwargs", [
    dict(rotation="cayley", position="pre_o_proj"),
    dict(rotation="expm", position="pre_o_proj", tied=True),
    dict(rotation="cayley", position="post_o_proj", attention_bias=True),
    dict(rotation="expm", position="post_o_proj", attention_bias=True, layers=4, gated_layers=(0, 2)),
])
def test_baked_model_reproduces_gated_logits(make_fixture, kwargs):
    ckpt = Checkpoint.open(make_fixture(**kwargs))
    with torch.inference_mode():
        gated = So8tReference(ckpt).logits(TOKENS)
        baked = plain_model(ckpt, baked_weights(ckpt))(torch.tensor([TOKENS])).logits[0].numpy()
        unbaked = plain_model(ckpt, {n: ckpt.read(n) for n in baked_weights(ckpt)})(
            torch.tensor([TOKENS])).logits[0].numpy()
    scale = np.abs(gated).max()
    assert np.abs(baked - gated).max() < 1e-4 * scale
    # The gates matter: dropping them changes the logits by far more than the bake error.
    assert np.abs(unbaked - gated).max() > 1e-2 * scale


def test_bake_error_is_recorded_and_the_fold_has_the_documented_form(make_fixture):
    ckpt = Checkpoint.open(make_fixture(position="post_o_proj", attention_bias=True))
    _, structure, plan = checkpoint_model(ckpt)
    item = next(p for p in plan if p.gguf_name == "blk.0.attn_output.weight")
    w2, err = materialize(item, ckpt.read, ckpt.uri)
    assert err is not None and err < 1e-6
    r = block_diagonal(checked_rotation(ckpt.read(item.gate), "cayley", "", ""))
    w = ckpt.read("model.layers.0.self_attn.o_proj.weight").astype(np.float64)
    np.testing.assert_allclose(w2, (r.T @ w).astype(np.float32), rtol=0, atol=1e-6)  # W' = Rᵀ·W
    bias_item = next(p for p in plan if p.gguf_name == "blk.0.attn_output.bias")
    b2, _ = materialize(bias_item, ckpt.read, ckpt.uri)
    b = ckpt.read("model.layers.0.self_attn.o_proj.bias").astype(np.float64)
    np.testing.assert_allclose(b2, (b @ r).astype(np.float32), rtol=0, atol=1e-6)  # b' = b·R


@pytest.mark.parametrize("kwargs", [
    dict(position="pre_o_proj"),
    dict(position="post_o_proj", attention_bias=True, rotation="expm"),
])
def test_row_chunks_give_the_same_tensor_and_bake_error_as_one_piece(make_fixture, kwargs):
    from so8t_core.plan import Materializer

    ckpt = Checkpoint.open(make_fixture(**kwargs))
    _, _, plan = checkpoint_model(ckpt)
    checked = set()
    for item in plan:
        whole, err = materialize(item, ckpt.read, ckpt.uri)  # reads whole tensors, one piece
        m = Materializer(item, ckpt, ckpt.uri)
        chunks = list(m.chunks(max_elements=64))  # 64 elements: one row or one alignment unit at a time
        if len(item.shape) == 2:
            starts = [s for s, _ in chunks]
            assert len(chunks) > 1 and all(s % m.alignment == 0 for s in starts)
        np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]).reshape(item.shape), whole)
        assert (m.bake_error is None) == (err is None)
        if err is not None:  # a matmul per chunk sums in another order
            assert m.bake_error == pytest.approx(err, rel=1e-6)
        checked.add(item.transform)
    assert {"copy", "permute_q", "permute_k", "bake_o_proj"} <= checked
