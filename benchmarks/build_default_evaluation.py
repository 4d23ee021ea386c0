"""Build so8t_core/validate/evaluation_data/default.txt, the built-in evaluation text (the text the
llama-perplexity KL-divergence statistics are measured on), from the sources SOURCES.md beside it names:

* CPython 3.12.1's standard library (PSF-2.0): English prose from ``pydoc_data/topics.py`` (the
  Language Reference sections on the execution model and customization (special methods), and the
  pdb manual), none of them a section the built-in calibration text takes; Chinese and Korean
  prose from ``test/cjkencodings/{big5,gb2312,euc_kr}-utf8.txt`` (the calibration text takes the
  Japanese one).

The pieces are interleaved round-robin by kind. Deterministic: the same sources give the same bytes.

    .venv/bin/python benchmarks/build_default_evaluation.py CPYTHON_PREFIX   # e.g. /root/.pyenv/versions/3.12.1
"""

from __future__ import annotations

import ast
import os
import sys

# Run as a script: its folder is on sys.path. How pieces are cut and mixed is the calibration text's.
from build_default_calibration import group, interleave, take

OUT = os.path.join(os.path.dirname(__file__), "..", "so8t_core", "validate", "evaluation_data", "default.txt")
# (topics, characters taken): about 10,000 tokens with SmolLM2's tokenizer, 19 chunks of 512
REFERENCE_TOPICS = (["execmodel", "customization"], 24000)
MANUAL_TOPICS = (["debugger"], 17000)
CJK_FILES = ["big5-utf8.txt", "gb2312-utf8.txt", "euc_kr-utf8.txt"]


def topics(prefix: str, names: list[str], budget: int) -> list[str]:
    """Sections as pydoc shows them, without grammar blocks, in pieces, up to ``budget`` characters."""
    lib = os.path.join(prefix, "lib", "python3.12")
    tree = ast.parse(open(os.path.join(lib, "pydoc_data", "topics.py"), encoding="utf-8").read())
    table = ast.literal_eval(tree.body[0].value)
    paragraphs = [p.strip("\n") for t in names for p in table[t].split("\n\n") if "::=" not in p and p.strip()]
    return take(group(paragraphs), budget)


def cjk(prefix: str) -> list[str]:
    folder = os.path.join(prefix, "lib", "python3.12", "test", "cjkencodings")
    return [open(os.path.join(folder, f), encoding="utf-8").read().strip() for f in CJK_FILES]





def main(prefix: str) -> None:
    kinds = [topics(prefix, *REFERENCE_TOPICS), topics(prefix, *MANUAL_TOPICS), cjk(prefix)]
    text = "\n\n".join(interleave(kinds)) + "\n"
    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"{len(text)} characters, {len(text.encode())} bytes, {sum(map(len, kinds))} pieces")


if __name__ == "__main__":
    main(sys.argv[1])
