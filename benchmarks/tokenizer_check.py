"""How long the preflight's tokenizer check takes: the corpus of tests/test_tokenizer_choice.py,
each tokenizer checked from a cold cache (llama.cpp loads a vocabulary-only GGUF per type tried).

    .venv/bin/python benchmarks/tokenizer_check.py

Prints a Markdown table (tokenizer, outcome, types tried, seconds) with the machine described.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def main() -> None:
    os.environ["SO8T_GGUF_CACHE"] = tempfile.mkdtemp(prefix="so8t-tokenizer-bench-")  # a cold cache
    from test_tokenizer_choice import variants

    from so8t_core.source.tokenizer import check_tokenizer

    class Factory:  # what variants() needs of pytest's tmp_path_factory
        def mktemp(self, name):
            from pathlib import Path

            return Path(tempfile.mkdtemp(prefix=name))

    corpus = variants(Factory())
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%Y-%m-%d')}")
    print()
    print("| tokenizer | outcome | types tried | seconds |")
    print("|---|---|---|---|")
    for name, (files, config) in corpus.items():
        started = time.monotonic()
        check = check_tokenizer(files, config, f"mem://{name}")
        seconds = time.monotonic() - started
        outcome = (check.pre or "SentencePiece") if check.ok else "refused"
        print(f"| {name} | {outcome} | {len(check.tried)} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
