"""Start-up, re-run and interrupt times of ``so8t-gguf convert`` in the default mode (no
PREFECT_API_URL: the CLI's own local Prefect API, flows/local_api.py), on the demo with three mixes.

    .venv/bin/python benchmarks/startup.py [--quant Q8_0 Q4_K_M Q6_K] [--reruns 2]

Everything runs in a fresh cache (SO8T_GGUF_CACHE) and PREFECT_HOME, so the first run finds no
local API and no database: the first use on a machine. The demo checkpoint is built there first,
untimed. Then, each as a user would run it (a process group of its own, stderr read as it comes):

* cold: nothing staged, no local API running, its database not created yet;
* warm: the same command again, nothing changed (the API still running);
* Ctrl-C: SIGINT to the whole process group while quantizing (fresh work folder), as a terminal
  sends it; then SIGTERM to the process while validating; each followed by the same command,
  which must complete;
* the first progress line's delay in every run.

Prints a Markdown table with the date, the machine and its load (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

CLI = os.path.join(os.path.dirname(sys.executable), "so8t-gguf")
PROGRESS = re.compile(r"^(\[\s*\d+\.\ds\] |quantize: )")


class Run:
    """One CLI run: its stderr lines with the time each arrived, its status and wall time."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.start = time.monotonic()
        self.proc = subprocess.Popen([CLI, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic() - self.start, line.rstrip("\n")))

    def wait_for(self, pattern: str, timeout: float = 900) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(pattern in line for _, line in self.lines):
                return time.monotonic() - self.start
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"never saw {pattern!r}: {self.lines[-5:]}")

    def finish(self) -> tuple[int, float]:
        status = self.proc.wait()
        self.reader.join()
        return status, time.monotonic() - self.start

    @property
    def first_line_s(self) -> float:
        return self.lines[0][0] if self.lines else float("nan")

    def other_lines(self) -> list[str]:
        return [line.strip("\r") for _, line in self.lines if line.strip() and not PROGRESS.match(line.strip("\r"))]


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", nargs="+", default=["Q8_0", "Q4_K_M", "Q6_K"])
    ap.add_argument("--reruns", type=int, default=2)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="so8t-startup-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(SO8T_GGUF_CACHE=os.path.join(root, "cache"), PREFECT_HOME=os.path.join(root, "prefect"))
    os.environ.update(SO8T_GGUF_CACHE=env["SO8T_GGUF_CACHE"])  # for local_api.stop() below
    rows: list[tuple[str, str]] = []
    loads = [load()]
    try:
        subprocess.run([sys.executable, "-c", "from flows.convert import demo_source; demo_source()"], env=env,
                       check=True)

        def convert(work: str, out: str) -> list[str]:
            return ["convert", "--quant", *args.quant, "--work-dir", os.path.join(root, work),
                    "--output", os.path.join(root, out)]

        cold = Run(convert("w", "o"), env)
        status, cold_s = cold.finish()
        assert status == 0, cold.lines[-10:]
        rows += [("cold: nothing staged, no local API, no database yet", f"{cold_s:.1f} s"),
                 ("  first progress line", f"{cold.first_line_s:.2f} s")]
        for i in range(args.reruns):
            warm = Run(convert("w", "o"), env)
            status, warm_s = warm.finish()
            assert status == 0, warm.lines[-10:]
            rows += [(f"warm re-run {i + 1}, nothing changed",
                      f"{warm_s:.1f} s ({100 * warm_s / cold_s:.1f}% of cold)"),
                     ("  first progress line", f"{warm.first_line_s:.2f} s")]

        for signum, target, when, stage in ((signal.SIGINT, "the process group", "quantize:", "quantizing"),
                                            (signal.SIGTERM, "the process", "validating in llama.cpp", "validating")):
            work, out = f"w-{signum.name}", f"o-{signum.name}"
            run = Run(convert(work, out), env)
            run.wait_for(when)
            time.sleep(0.5)
            sent = time.monotonic()
            if target == "the process group":
                os.killpg(run.proc.pid, signum)
            else:
                run.proc.send_signal(signum)
            status, _ = run.finish()
            took = time.monotonic() - sent
            published = [p for p, _, files in os.walk(os.path.join(root, out)) if "manifest.json" in files]
            again = Run(convert(work, out), env)
            rerun_status, rerun_s = again.finish()
            rows += [(f"{signum.name} to {target} while {stage}",
                      f"exit {status} in {took:.2f} s; stderr besides progress: {run.other_lines()}; "
                      f"{len(published)} releases published; the re-run: exit {rerun_status} in {rerun_s:.1f} s")]
    finally:
        loads.append(load())
        from flows import local_api

        local_api.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; load average (1/5/15 min) {loads[0]} before, {loads[1]} after; "
          f"so8t-gguf convert --quant {' '.join(args.quant)}, no PREFECT_API_URL\n")
    print("| run | figure |\n|---|---|")
    for what, figure in rows:
        print(f"| {what} | {figure} |")


if __name__ == "__main__":
    main()
