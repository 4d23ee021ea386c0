"""Running the CLI as a user does, and what a one-line error looks like."""

import os
import re
import subprocess
import sys

BIN = os.path.join(os.path.dirname(sys.executable), "so8t-gguf")


PROGRESS_LINE = re.compile(r"^(\[\s*\d+\.\ds\] |quantize: )")


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # As from a user's shell: the test session's Prefect log level is not inherited.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_LEVEL"}
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    # Progress (a line per stage, the tensor bar) may come before the error: the error is one line.
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("so8t-gguf: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "(hint: " in lines[0]
