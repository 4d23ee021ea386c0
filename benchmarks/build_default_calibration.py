"""Build so8t_core/quantize/calibration_data/default.txt, the built-in calibration text
(`convert --calibration builtin`), from the sources SOURCES.md beside it names:

* chatterbot-corpus 1.3.3 (BSD-3-Clause, the wheel from PyPI): dialogue in English, Japanese,
  Chinese, Korean, German, French, Spanish, Italian, Portuguese and Russian;
* CPython 3.12.1's standard library (PSF-2.0): English prose from ``pydoc_data/topics.py`` (the
  Language Reference), Japanese prose from ``test/cjkencodings/shift_jis-utf8.txt``, Python code
  (``textwrap.py``, ``heapq.py``, ``shlex.py``, ``fnmatch.py``) and C headers (``listobject.h``,
  ``dictobject.h``, ``abstract.h``);
* ``ja_prose.txt`` beside the output: Japanese prose written for so8t-gguf (Apache-2.0).

The pieces (a conversation, a section, a function, a paragraph) are interleaved round-robin by
kind, so any run of chunks, and so ``--calibration-chunks N``, sees every kind. Deterministic:
the same sources give the same bytes.

    .venv/bin/python benchmarks/build_default_calibration.py CHATTERBOT_WHEEL CPYTHON_PREFIX
    e.g. chatterbot_corpus-1.3.3-py2.py3-none-any.whl /root/.pyenv/versions/3.12.1
"""

from __future__ import annotations

import ast
import os
import sys
import zipfile

import yaml

OUT_DIR = os.path.join(os.path.dirname(__file__), "..", "so8t_core", "quantize", "calibration_data")
PIECE_CHARS = 1800  # a piece grows to about this many characters before the next kind's turn
DIALOGUE = {  # language → chatterbot-corpus file stems, and the characters to take
    "english": (["conversations", "greetings", "literature", "science", "history", "computers", "food", "psychology",
                 "humor", "money"], 10000),
    "japanese": (["conversations", "greetings", "literature", "science", "history", "computers", "food",
                  "psychology", "emotion", "sports", "trivia", "movies", "money", "ai", "humor", "gossip",
                  "politics", "botprofile", "health"], 6000),
    "chinese": (["conversations", "greetings", "literature", "science", "history", "food"], 2000),
    "korean": (["conversations", "greetings", "science", "history", "food"], 1500),
    "german": (["conversations", "greetings", "ai", "food", "emotion", "science"], 3000),
    "french": (["conversations", "greetings", "food", "botprofile", "trivia"], 3000),
    "spanish": (["conversations", "greetings", "science", "food", "psychology"], 3000),
    "italian": (["conversations", "greetings", "science", "history", "food"], 3000),
    "portuguese": (["conversations", "greetings", "science", "history", "food"], 3000),
    "russian": (["conversations", "greetings", "food"], 2000),
}
TOPICS = ["assignment", "if", "while", "for", "try", "function", "class", "import", "lambda", "numbers",
          "comparisons", "exceptions", "naming", "sequence-types", "typesseq-mutable", "context-managers"]
PROSE_CHARS = 30000
PYTHON_FILES = {"textwrap.py": 7000, "heapq.py": 6000, "shlex.py": 5000, "fnmatch.py": 3500}  # characters taken
C_HEADERS = {"listobject.h": 2500, "dictobject.h": 3000, "abstract.h": 3000}


def dialogues(wheel: str) -> list[list[str]]:
    """Per language, its conversations as text: one turn a line, speakers alternating."""
    kinds = []
    with zipfile.ZipFile(wheel) as z:
        for lang, (stems, budget) in DIALOGUE.items():
            pieces = []
            for stem in stems:
                name = f"chatterbot_corpus/data/{lang}/{stem}.yml"
                if name not in z.namelist():
                    continue
                for conv in yaml.safe_load(z.read(name)).get("conversations") or []:
                    turns = [str(t).strip() for t in conv if isinstance(t, (str, int, float)) and str(t).strip()]
                    if len(turns) >= 2:
                        pieces.append("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns)))
            kinds.append(take(group(pieces), budget))
    return kinds


def prose(prefix: str) -> list[str]:
    """Sections of the Language Reference as pydoc shows them, without their grammar blocks."""
    lib = os.path.join(prefix, "lib", "python3.12")
    tree = ast.parse(open(os.path.join(lib, "pydoc_data", "topics.py"), encoding="utf-8").read())
    topics = ast.literal_eval(tree.body[0].value)
    paragraphs = []
    for t in TOPICS:
        for para in topics[t].split("\n\n"):
            if "::=" not in para and para.strip():
                paragraphs.append(para.strip("\n"))
    return take(group(paragraphs), PROSE_CHARS)


def japanese_prose(prefix: str) -> list[str]:
    lib = os.path.join(prefix, "lib", "python3.12")
    python_ja = open(os.path.join(lib, "test", "cjkencodings", "shift_jis-utf8.txt"), encoding="utf-8").read()
    ours = open(os.path.join(OUT_DIR, "ja_prose.txt"), encoding="utf-8").read()
    return group([p.strip() for p in (python_ja + "\n\n" + ours).split("\n\n") if p.strip()])


def code(prefix: str) -> list[str]:
    """The beginning of each Python module and C header, cut at a blank line."""
    lib = os.path.join(prefix, "lib", "python3.12")
    include = os.path.join(prefix, "include", "python3.12")
    pieces = []
    for path, budget in [(os.path.join(lib, f), n) for f, n in PYTHON_FILES.items()] + \
                        [(os.path.join(include, f), n) for f, n in C_HEADERS.items()]:
        text = open(path, encoding="utf-8").read()
        text = text[:text.rindex("\n\n", 0, budget)]
        pieces += group([b.strip("\n") for b in text.split("\n\n") if b.strip()])
    return pieces


def group(parts: list[str], joiner: str = "\n\n") -> list[str]:
    """Consecutive parts joined into pieces of about PIECE_CHARS."""
    pieces, current = [], ""
    for p in parts:
        current = f"{current}{joiner}{p}" if current else p
        if len(current) >= PIECE_CHARS:
            pieces.append(current)
            current = ""
    return pieces + ([current] if current else [])


def take(pieces: list[str], budget: int) -> list[str]:
    out, used = [], 0
    for p in pieces:
        if used >= budget:
            break
        out.append(p)
        used += len(p)
    return out


def interleave(kinds: list[list[str]]) -> list[str]:
    out = []
    for i in range(max(len(k) for k in kinds)):
        out += [k[i] for k in kinds if i < len(k)]
    return out


def main(wheel: str, prefix: str) -> None:
    kinds = [prose(prefix), code(prefix), japanese_prose(prefix), *dialogues(wheel)]
    text = "\n\n".join(interleave(kinds)) + "\n"
    with open(os.path.join(OUT_DIR, "default.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"{len(text)} characters, {len(text.encode())} bytes, {sum(map(len, kinds))} pieces")


if __name__ == "__main__":
    main(*sys.argv[1:3])
