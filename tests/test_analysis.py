"""Structure analysis: counts by class, gates and their health, heads, PET, and the CLI."""

import json

import pytest

from flows.cli import main
from so8t_core.analysis import analyze
from so8t_core.source.checkpoint import Checkpoint


def test_counts_by_class_on_a_known_fixture(make_fixture):
    # 2 layers, hidden 64, 4 heads of 16, 2 KV heads, FFN 128, vocab 384, untied.
    a = analyze(Checkpoint.open(make_fixture()))
    assert a["parameters"] == {
        "total": 49152 + 24576 + 49152 + 320 + 1024 + 260,
        "embedding": 2 * 384 * 64,  # token embedding + LM head
        "attention": 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64),
        "ffn": 2 * 3 * 128 * 64,
        "norm": 2 * 2 * 64 + 64,
        "so8t_rotation": 2 * 8 * 8 * 8,
        "triality_heads": 2 * (2 * 64 + 2),
        "other": 0,
    }
    assert a["tensors"] == {"total": 27, "embedding": 2, "attention": 8, "ffn": 6, "norm": 5,
                            "so8t_rotation": 2, "triality_heads": 4, "other": 0}
    assert a["gated_layers"] == [0, 1] and a["rotation_health_ok"]
    assert a["gguf_tensors"] == 21
    assert a["baked_tensors"] == ["blk.0.attn_output.weight", "blk.1.attn_output.weight"]
    assert [h["head"] for h in a["triality_heads"]] == ["safety", "authority"]
    assert "training loss only" in a["pet"]
    assert a["variant"] == "SO8T v1, cayley rotation gates before o_proj"


def test_partial_gates_tied_embeddings_and_plain_checkpoints(make_fixture):
    a = analyze(Checkpoint.open(make_fixture(layers=4, gated_layers=(1, 3), tied=True, position="post_o_proj",
                                             rotation="expm")))
    assert a["gated_layers"] == [1, 3] and a["tensors"]["so8t_rotation"] == 2
    assert a["tensors"]["embedding"] == 1 and a["hyperparameters"]["tied_embeddings"]
    assert a["variant"] == "SO8T v1, expm rotation gates after o_proj"
    plain = analyze(Checkpoint.open(make_fixture(so8t=False)))
    assert plain["variant"] == "plain (no SO8T)" and plain["gated_layers"] == [] and plain["so8t"] is None
    assert plain["tensors"]["so8t_rotation"] == 0 and plain["tensors"]["triality_heads"] == 0


def test_analyze_cli_text_and_json(make_fixture, capsys):
    path = make_fixture()
    assert main(["analyze", path]) == 0
    text = capsys.readouterr().out
    assert "rotation gates on 2 layers: [0, 1]" in text and "so8t_rotation" in text and "PET:" in text
    assert main(["analyze", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"]["total"] == 27


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.pop("so8t"), 'config.json has no "so8t" block'),
    (lambda c: c["so8t"].update(rotation="quaternion"), "so8t.rotation 'quaternion' is not one of"),
    (lambda c: c["so8t"].update(version=2), "so8t.version 2 is not supported"),
    (lambda c: c.update(num_hidden_layers=3), "missing tensors model.layers.2"),
    (lambda c: c.update(intermediate_size=96), "config.json and the weights disagree"),
    (lambda c: c.update(architectures=["GPTNeoXForCausalLM"]), "GPTNeoXForCausalLM is not supported"),
])
def test_config_problems_are_one_line_errors(make_fixture, tmp_path, capsys, mutate, message):
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(make_fixture(), dst)
    config = json.loads((dst / "config.json").read_text())
    mutate(config)
    (dst / "config.json").write_text(json.dumps(config))
    assert main(["analyze", str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("so8t-gguf: error: ") and message in err and err.count("\n") == 1
