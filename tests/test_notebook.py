"""The quick-start notebook: committed exactly as its generator writes it, and run headless on the tiny fixture."""

import importlib.util
import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from support.published import release as published_release

pytestmark = pytest.mark.e2e  # runs the notebook: a conversion and llama.cpp

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "so8t_gguf_quickstart.ipynb"
QUANTS = ["Q8_0", "Q4_K_M"]  # the notebook's defaults
NAME = "tiny-so8t"  # the folder the notebook builds the fixture into


def load_generator():
    spec = importlib.util.spec_from_file_location("build_notebook", ROOT / "notebooks" / "build_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebook_is_what_the_generator_writes():
    assert NOTEBOOK.read_text() == load_generator().render(), "run: python notebooks/build_notebook.py"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_notebook_installs_the_versions_make_installs():
    """The install cell's pins come from pyproject.toml and the Makefile, not from copies."""
    install = next(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.get("id") == "install")
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q torch==2.13.0" in makefile and '"torch==2.13.0"' in install
    flags = next(line.split(":=", 1)[1].strip() for line in makefile.splitlines()
                 if line.startswith("LLAMA_CMAKE_ARGS :="))
    assert f'"CMAKE_ARGS": "{flags}"' in install and '"llama-cpp-python==0.3.36"' in install


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook run top to bottom by a fresh kernel in an empty folder, on the tiny fixture."""
    workdir = tmp_path_factory.mktemp("notebook")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        # The kernel inherits this environment (and PYTHONPATH, where so8t-gguf is not installed).
        mp.setenv("SO8T_NOTEBOOK_MODEL", "tiny")
        mp.delenv("PREFECT_LOGGING_LEVEL", raising=False)  # as from a user's session
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(workdir)}}).execute()
    return workdir, {c.id: c for c in nb.cells}


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_install_is_skipped_where_the_package_is_importable(executed):
    _, cells = executed
    assert "already installed: nothing to install" in text_of(cells["install"])


def test_convert_publishes_validated_releases(executed):
    workdir, cells = executed
    out = text_of(cells["convert"])
    assert "$ so8t-gguf convert checkpoints/tiny-so8t --quant Q8_0 Q4_K_M --output artifacts" in out
    assert "quantize: 100%|" in out  # the progress bar reached the notebook
    for quant in QUANTS:
        release = published_release(workdir / "artifacts", NAME, quant)
        manifest = json.loads((release / "manifest.json").read_text())
        assert manifest["validation"]["passed"] and (release / f"{NAME}-{quant}.gguf").is_file()
        f = manifest["validation"]["llama_cpp"]
        # The results table shows the manifest's numbers.
        assert f"{100 * f['top1_agreement']:>7.2f}%" in text_of(cells["results"])
    assert text_of(cells["results"]).count("passed") == len(QUANTS)
    assert any("image/png" in o.get("data", {}) for o in cells["results"].outputs)  # the error plot


def test_structure_metadata_and_model_card_are_shown(executed):
    workdir, cells = executed
    assert "rotation gates on 2 layers: [0, 1]" in text_of(cells["analyze"])
    assert "gated layers       [0, 1]" in text_of(cells["inspect"])
    card = "".join(o["data"]["text/markdown"] for o in cells["card"].outputs if "text/markdown" in o.get("data", {}))
    manifest = json.loads((published_release(workdir / "artifacts", NAME, "Q8_0") / "manifest.json").read_text())
    assert manifest["files"][f"{NAME}-Q8_0.gguf"]["sha256"] in card and "![" not in card


def test_chat_answers_through_llama_cpp(executed):
    _, cells = executed
    out = text_of(cells["chat"])
    assert out.startswith("Q: What is the capital of France?\nA: ")
    assert out.split("\nA: ", 1)[1].strip()  # the tiny fixture's reply is gibberish, but there is one


def test_heads_cell_shows_the_three_heads(executed):
    _, cells = executed
    out = text_of(cells["heads"])
    assert "task (LM head), next token:" in out
    assert "\nsafety: " in out and "\nauthority: " in out


def test_last_cell_gives_the_ollama_modelfile(executed):
    _, cells = executed
    out = text_of(cells["elsewhere"])
    assert f"FROM ./{NAME}-Q8_0.gguf" in out and f"ollama create {NAME} -f Modelfile" in out
    assert f"lms import {NAME}-Q8_0.gguf" in out
    assert os.path.isfile(out.split("GGUF file: ", 1)[1].strip())


def test_a_wrong_model_path_stops_the_notebook_with_so8t_ggufs_one_line_error(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SO8T_NOTEBOOK_MODEL", "no-such-model")
        client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
        with pytest.raises(CellExecutionError, match="so8t-gguf analyze failed with exit status 2"):
            client.execute()
    analyze = next(c for c in nb.cells if c.get("id") == "analyze")
    out = text_of(analyze)
    assert "so8t-gguf: error: " in out and "not a checkpoint folder" in out and "Traceback" not in out
    assert all(c.outputs == [] for c in nb.cells[nb.cells.index(analyze) + 1:] if c.cell_type == "code")
