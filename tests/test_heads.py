"""The heads command: llama.cpp's final hidden state through the sidecar's heads equals the PyTorch reference."""

import json

import numpy as np
import pytest
from support.published import release as published_release

from flows.cli import main
from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.errors import ValidationError
from so8t_core.llama_runtime import LlamaCppModel
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.validate.heads import run_heads
from so8t_core.validate.reference import So8tReference

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def release(make_fixture, tmp_path_factory):
    src = make_fixture(position="post_o_proj", attention_bias=True, seed=21)
    out = tmp_path_factory.mktemp("heads")
    convert(ConvertParams(source=src, output=str(out), quants=["F32"], work_dir=str(out / "w"), name="fx"))
    return src, published_release(out, "fx", "F32")


def test_heads_match_the_reference_on_llama_cpp_hidden_states(release):
    src, out = release
    result = run_heads(str(out / "fx-F32.gguf"), str(out / "fx.so8t-heads.gguf"), TEXT)
    ref = So8tReference(Checkpoint.open(src))
    with LlamaCppModel(str(out / "fx-F32.gguf")) as m:
        ids = m.tokenize(TEXT, add_special=True)
    assert result["n_tokens"] == len(ids)
    expected = ref.head_logits(ref.final_hidden_states(ids)[-1:])
    for head in ("safety", "authority"):
        np.testing.assert_allclose(result[head]["logits"], expected[head][0], rtol=1e-3, atol=1e-3)
        assert set(result[head]["probabilities"]) == {"safe", "unsafe"} if head == "safety" else True
        assert sum(result[head]["probabilities"].values()) == pytest.approx(1.0)
    top = result["task"]["next_tokens"][0]["id"]
    assert top == int(np.argmax(ref.logits(ids)[-1]))


def test_heads_cli_and_a_mismatched_sidecar(release, make_fixture, tmp_path, capsys):
    src, out = release
    assert main(["heads", str(out / "fx-F32.gguf"), str(out / "fx.so8t-heads.gguf"), TEXT, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["safety"]["label"] in ("safe", "unsafe")
    other = tmp_path / "other"
    convert(ConvertParams(source=make_fixture(seed=22), output=str(other), quants=["F32"],
                          work_dir=str(tmp_path / "w"), name="o"))
    with pytest.raises(ValidationError, match="different checkpoint"):
        run_heads(str(out / "fx-F32.gguf"), str(published_release(other, "o", "F32") / "o.so8t-heads.gguf"), TEXT)
    assert main(["heads", str(out / "fx-F32.gguf"), str(out / "fx-F32.gguf"), TEXT]) == 2
    assert "not an SO8T heads sidecar" in capsys.readouterr().err
