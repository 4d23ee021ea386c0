"""convert --target-bpw in a real Prefect run on the llama-256 fixture: the AUTO-<B> release goes
through staging, assembly, validation, evaluation and publishing like any mix; its file is at most
B bits per weight; it holds its recipe as a llama-quantize --tensor-type-file, which, given to
llama_model_quantize with the run's F32 GGUF and the same imatrix, writes the same tensors; the card
shows the recipe table with the predicted (class gains from probes) and the measured KLD. One
conversion (Q8_0 + AUTO-4.50) feeds every assertion."""

from __future__ import annotations

import glob
import json

import pytest
from support.imatrix_files import write_synthetic_imatrix
from support.llama_cpp_oracle import FIXTURES, assert_same_tensors, llama_quantize
from support.published import release

from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.constants import QUANT_TYPES, bits_per_weight
from so8t_core.gguf_file import read_gguf
from so8t_core.publish.retrieve import model_gguf
from so8t_core.quantize import target
from so8t_core.quantize.imatrix import load_imatrix

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]

BPW = 4.5
LABEL = "AUTO-4.50"
SIZE = 3_400_000  # --target-size 3400K: about 5.6 bits per weight


@pytest.fixture(scope="module")
def run(make_fixture, tmp_path_factory):
    root = tmp_path_factory.mktemp("target-convert")
    src = make_fixture(**FIXTURES["llama-256"])
    write_synthetic_imatrix(root / "imatrix.gguf", src)
    params = ConvertParams(source=src, output=str(root / "out"), work_dir=str(root / "work"), name="fx",
                           quants=["Q8_0"], imatrix=str(root / "imatrix.gguf"), target_bpw=BPW, target_size="3400K",
                           eval_ctx=128, eval_chunks=2)
    return root, convert(params), src


def size_label(result: dict) -> str:
    (label,) = set(result["releases"]) - {"Q8_0", LABEL}
    return label


def test_the_auto_release_is_within_the_target(run):
    root, result, _ = run
    assert len(result["releases"]) == 3 and size_label(result).startswith("AUTO-")
    sized = release(root / "out", "fx", size_label(result)) / f"fx-{size_label(result)}.gguf"
    assert SIZE - 100_000 < sized.stat().st_size <= SIZE  # --target-size: the whole file, close under it
    folder = release(root / "out", "fx", LABEL)
    g = read_gguf(str(folder / f"fx-{LABEL}.gguf"))
    nbytes = sum(t.n_bytes for t in g.tensors)
    assert bits_per_weight(nbytes, sum(int(t.n_elements) for t in g.tensors)) <= BPW
    assert len({t.tensor_type for t in g.tensors}) > 3  # a real mix of types
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["quant"] == LABEL and manifest["bits_per_weight"] <= BPW
    assert manifest["recipe"]["tensor_type_file"] == f"fx-{LABEL}.tensor-types.txt"
    assert manifest["validation"]["passed"] and manifest["evaluation"]["passed"]
    assert g.value("general.file_type") == int(QUANT_TYPES[manifest["recipe"]["base_mix"]].file_type)
    # chat, inspect and validate name it as users see it, any case
    assert model_gguf(str(root / "out" / "fx"), "auto-4.50") == str(folder / f"fx-{LABEL}.gguf")


def test_llama_quantize_with_the_published_recipe_writes_the_same_tensors(run):
    root, _, _ = run
    folder = release(root / "out", "fx", LABEL)
    recipe = target.parse_tensor_type_file((folder / f"fx-{LABEL}.tensor-types.txt").read_text())
    assert len(recipe) == sum(1 for t in read_gguf(str(folder / f"fx-{LABEL}.gguf")).tensors if len(t.shape) == 2)
    f32 = glob.glob(str(root / "work" / "runs" / "fx-*" / "f32" / "fx-F32.gguf"))[0]
    base = json.loads((folder / "manifest.json").read_text())["recipe"]["base_mix"]
    theirs = str(root / "llama-AUTO.gguf")
    llama_quantize(f32, theirs, int(QUANT_TYPES[base].file_type), overrides=recipe,
                   imatrix=load_imatrix(str(root / "imatrix.gguf")).entries)
    assert_same_tensors(str(folder / f"fx-{LABEL}.gguf"), theirs)


def test_the_card_shows_the_recipe_and_the_measured_kld(run):
    root, _, _ = run
    folder = release(root / "out", "fx", LABEL)
    card = (folder / "README.md").read_text()
    kld = json.loads((folder / "manifest.json").read_text())["evaluation"]["statistics"]["kld_mean"]
    assert "## The recipe" in card and "at most 4.5 bits per weight" in card
    assert "| ffn_down | " in card and "| tensor class | not in a block | layer 0 |" in card
    recipe = json.loads((folder / "manifest.json").read_text())["recipe"]
    # the run evaluates, so the damages carry class gains from probes and their sum predicts the KLD
    assert set(recipe["class_gains"]) >= {"token_embd", "output", "attn_q", "ffn_down"}
    assert all(g >= 0 for g in recipe["class_gains"].values()) and recipe["predicted_kld"] > 0
    assert f"predicted mean KLD {recipe['predicted_kld']:.4g}" in card
    assert f"mean KLD {kld:.4g} against the F32 model (predicted {recipe['predicted_kld']:.4g})." in card
    assert f"--tensor-type-file fx-{LABEL}.tensor-types.txt" in card


def test_the_dry_run_prints_the_types_and_file_sizes_the_run_wrote(run):
    from support.cli import run as cli

    root, result, src = run
    def dry_run(eval_ctx: int) -> dict:
        proc = cli("convert", src, "--imatrix", str(root / "imatrix.gguf"), "--quant", "Q8_0", "--target-bpw", str(BPW),
                   "--target-size", "3400K", "--name", "fx", "--work-dir", str(root / "work"), "--eval-ctx",
                   str(eval_ctx), "--eval-chunks", "2", "--dry-run", "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    # the run's evaluation settings: the class gains it measured are in the work folder
    report = dry_run(128)
    assert set(report) == set(result["releases"])
    for label, r in report.items():
        assert "note" not in r
        path = release(root / "out", "fx", label) / f"fx-{label}.gguf"
        published = read_gguf(str(path))
        assert {t["name"]: t["type"] for t in r["tensors"]} == {t.name: t.tensor_type.name for t in published.tensors}
        assert r["file_bytes"] == path.stat().st_size  # metadata and padding included, to the byte
    assert report[LABEL]["bits_per_weight"] <= BPW and report[size_label(result)]["file_bytes"] <= SIZE
    # other evaluation settings: no gains measured for them, and the report says what that means
    assert "a run first measures each tensor class's KLD gain" in dry_run(256)[LABEL]["note"]
