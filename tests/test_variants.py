"""Real SO8T checkpoint shapes: each converts, and llama.cpp's logits of the baked GGUF match the
unbaked PyTorch reference (gates applied live); what never reaches the logits is stripped."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from support.published import gguf_path, release  # noqa: F401

from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.analysis import analyze
from so8t_core.errors import RotationError
from so8t_core.gguf_file import read_gguf
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.rotation import rotation_blocks

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]

GATE = "self_attn.so8t_rotation_gate.theta"


def rewrite(src: str, dst, rename=lambda n: n, extra=None, config=None, transform=None) -> str:
    """Copy a single-shard fixture, renaming / transforming tensors and editing config.json."""
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for name, value in tensors.items():
        new = transform(name, value) if transform else (name, value)
        if new is not None:
            out[rename(new[0])] = new[1]
    out.update(extra or {})
    save_file(out, os.path.join(dst, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    if config:
        config(cfg)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    for f in os.listdir(src):
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())
    return str(dst)


def stored_rotation(name, value):
    if name.endswith(GATE):  # θ → R, saved in float32 as the original project's rotation_matrices
        return name.replace(".theta", ".rotation"), rotation_blocks(value, "cayley").astype(np.float32)
    return name, value


def legacy_flags(cfg):
    cfg.pop("so8t")
    cfg.update(so8t_integrated=True, so8t_use_cayley=False)


rng = np.random.default_rng(0)
SAFETY_AWARE_EXTRAS = {
    "so8t_adapters.0.proj.weight": rng.standard_normal((8, 64)).astype(np.float32),
    "so8t_adapters.0.A_params": rng.standard_normal((8, 8)).astype(np.float32),
    "so8t_adapters.0.strength": np.zeros((), dtype=np.float32),
    "alpha_gate": np.full((), -5.0, dtype=np.float32),
    "so8_rotation_gate.theta": rng.standard_normal((8, 8, 8)).astype(np.float32),
    "safety_head.0.weight": rng.standard_normal((6, 12)).astype(np.float32),
    "safety_head.2.weight": rng.standard_normal((3, 6)).astype(np.float32),
    "verifier_head.2.bias": rng.standard_normal(1).astype(np.float32),
    "group_structure.non_commutative_gate.R_safe.rotation_params": rng.standard_normal((8, 8)).astype(np.float32),
}

VARIANTS = {
    # gate key aliases of the original project
    "alias-o_proj-gate": dict(rename=lambda n: n.replace(GATE, "self_attn.o_proj.so8t_rotation_gate.theta")),
    "alias-rotation_gate": dict(rename=lambda n: n.replace(GATE, "self_attn.rotation_gate.theta")),
    # precomputed rotations R instead of θ
    "stored-rotation": dict(transform=stored_rotation),
    # wrapped prefixes
    "peft-prefix": dict(rename=lambda n: "base_model.model." + n),
    "ddp-prefix": dict(rename=lambda n: "module." + n),
    # SafetyAware model: base under base_model., post-hoc modules, classifier heads, dead params at top level
    "safety-aware": dict(rename=lambda n: n if n.startswith("so8t.") else "base_model." + n,
                         extra=SAFETY_AWARE_EXTRAS),
    # legacy config flags instead of the so8t block (so8t_use_cayley false → expm)
    "legacy-flags": dict(config=legacy_flags),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_converts_and_matches_the_unbaked_reference(variant, make_fixture, tmp_path):
    kwargs = {"rotation": "expm"} if variant == "legacy-flags" else {}
    src = rewrite(make_fixture(layers=3, gated_layers=(0, 2), **kwargs), tmp_path / "ckpt", **VARIANTS[variant])
    a = analyze(Checkpoint.open(src))
    assert a["gated_layers"] == [0, 2] and a["rotation_health_ok"]
    result = convert(ConvertParams(source=src, output=str(tmp_path / "out"), quants=["F32"],
                                   work_dir=str(tmp_path / "w"), name="v"))
    f = result["validation"]["F32"]
    assert f["passed"], f
    assert f["llama_cpp"]["mean_kld"] < 1e-4 and f["llama_cpp"]["top1_agreement"] >= 0.995
    g = read_gguf(str(gguf_path(tmp_path / "out", "v", "F32")))
    assert g.value("so8t.baked_layers") == [0, 2]
    assert len(g.tensors) == 1 + 1 + 1 + 3 * 9  # embd, output, output_norm, 3 layers × 9
    if variant == "stored-rotation":
        assert {gt["parameterization"] for gt in a["rotation_gates"]} == {"matrix"}
    if variant == "legacy-flags":
        assert a["so8t"] == {"version": 1, "rotation": "expm", "position": "pre_o_proj", "read_from": "legacy flags"}
    if variant == "safety-aware":
        stripped = {s["tensor"] for s in a["stripped"]}
        assert stripped == {"so8t_adapters.0.proj.weight", "so8t_adapters.0.A_params", "so8t_adapters.0.strength",
                            "alpha_gate", "so8_rotation_gate.theta",
                            "group_structure.non_commutative_gate.R_safe.rotation_params"}
        assert a["wrapper_prefix"] == "base_model."
        side = read_gguf(str(release(tmp_path / "out", "v", "F32") / "v.so8t-heads.gguf"))
        assert side.value("so8t.heads.extra") == ["safety_head.0.weight", "safety_head.2.weight",
                                                  "verifier_head.2.bias"]
        np.testing.assert_array_equal(side.dequantized(side.tensor("safety_head.2.weight")),
                                      SAFETY_AWARE_EXTRAS["safety_head.2.weight"])
        card = (release(tmp_path / "out", "v", "F32") / "README.md").read_text()
        assert "Stripped: `so8t_adapters.0.proj.weight`" in card


def test_non_orthogonal_stored_rotation_is_refused(make_fixture, tmp_path):
    def skewed(name, value):
        if name.endswith(GATE):
            r = rotation_blocks(value, "cayley")
            r[0] *= 1.05  # a scaled block: not a rotation
            return name.replace(".theta", ".rotation"), r.astype(np.float32)
        return name, value

    src = rewrite(make_fixture(), tmp_path / "ckpt", transform=skewed)
    from so8t_core.analysis import preflight

    with pytest.raises(RotationError, match="does not give a rotation"):
        preflight(src)
    assert analyze(Checkpoint.open(src))["rotation_health_ok"] is False


def test_gates_without_any_config_are_refused(make_fixture, tmp_path):
    from so8t_core.errors import CheckpointError

    src = rewrite(make_fixture(), tmp_path / "ckpt", config=lambda c: c.pop("so8t"))
    with pytest.raises(CheckpointError, match='no "so8t" block'):
        analyze(Checkpoint.open(src))
