"""What llama.cpp's Gemma 2/3 assume instead of reading from the GGUF: a checkpoint that differs is refused
before any work (one line, exit 2), since llama.cpp would load it and compute something else."""

import pytest

from so8t_core.errors import UnsupportedError
from so8t_core.source.architectures import gemma3_rope_parameters, model_spec
from so8t_core.testing.fixtures import FixtureSpec, fixture_config


def config(arch: str, **changes) -> dict:
    cfg = fixture_config(FixtureSpec(arch=arch, so8t=False, layers=6))
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_fixture_configs_are_accepted(arch):
    spec = model_spec(config(arch), "x")
    assert spec.arch == arch and spec.tied_embeddings and spec.rules.norm_plus_one


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
@pytest.mark.parametrize("changes, message", [
    (dict(tie_word_embeddings=False), "untied lm_head"),
    (dict(query_pre_attn_scalar=64), "query_pre_attn_scalar 64"),  # head_dim is 16: llama.cpp scales by 1/4
    (dict(layer_types=["full_attention"] * 6), "sliding/global layer pattern"),
    (dict(use_bidirectional_attention=True), "bidirectional"),
])
def test_what_llama_cpp_would_run_differently_is_refused(arch, changes, message):
    with pytest.raises(UnsupportedError, match=message):
        model_spec(config(arch, **changes), "x")


@pytest.mark.parametrize("key", ["attn_logit_softcapping", "final_logit_softcapping"])
def test_gemma2_without_soft_capping_is_refused_and_an_absent_cap_is_transformers_default(key):
    with pytest.raises(UnsupportedError, match=f"{key} is null"):
        model_spec(config("gemma2", **{key: None}), "x")
    cfg = config("gemma2")
    del cfg[key]
    assert model_spec(cfg, "x").config[key] == {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}[key]


def test_the_27b_query_scaling_is_hidden_over_heads():
    # llama.cpp recognizes Gemma 2 27B by its 46 layers and scales queries by 1/sqrt(hidden/heads).
    cfg = config("gemma2", num_hidden_layers=46, hidden_size=128, head_dim=16, query_pre_attn_scalar=32,
                 layer_types=None)
    assert model_spec(cfg, "x").n_layers == 46
    with pytest.raises(UnsupportedError, match="query_pre_attn_scalar 16"):
        model_spec({**cfg, "query_pre_attn_scalar": 16}, "x")


def test_gemma3_attention_soft_capping_is_refused():
    with pytest.raises(UnsupportedError, match="attn_logit_softcapping"):
        model_spec(config("gemma3", attn_logit_softcapping=50.0), "x")


def test_gemma3_rope_as_transformers_reads_it():
    import transformers

    for extra in ({}, {"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, {"rope_theta": 5e5}):
        cfg = config("gemma3", **extra)
        full, sliding = gemma3_rope_parameters(cfg)
        hf = transformers.Gemma3TextConfig(**{k: v for k, v in cfg.items() if k != "architectures"}).rope_parameters
        assert (full, sliding) == (hf["full_attention"], hf["sliding_attention"]), extra
