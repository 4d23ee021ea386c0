"""Thread pool vs a local multi-process Dask cluster on one checkpoint: wall time, peak RSS of
every process, and whether the released files are identical.

    .venv/bin/python benchmarks/dask_scaling.py [SOURCE] [--quant Q4_K_M] [--repeat 1]

SOURCE defaults to a generated ~1.1B llama (``so8t-gguf fixture`` with TinyLlama's shape,
built once under --scratch if missing). Each run is the real command line
(``so8t-gguf convert SOURCE --runner threads|dask --no-validate``; Dask's local cluster is
sized to the machine, as the thread pool is) in a fresh work directory, so
nothing comes from staging or the task cache; without PREFECT_API_URL each run starts
Prefect's temporary API, as a user's first run does. Peak RSS is sampled every 0.1 s
per process (short spikes can be missed); CPU s is user + system time of the whole process
tree; "time in quantize tasks" sums the seconds each staged tensor records. Runs alternate
threads/dask, so background load hits both alike. Prints a Markdown table (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
# TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32/4 heads, 5632 FFN), SmolLM2's 49152 vocab.
FIXTURE_ARGS = ["--layers", "22", "--hidden", "2048", "--heads", "32", "--kv-heads", "4", "--intermediate", "5632",
                "--vocab", "49152", "--shards", "2"]
STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) ")


def role(proc: psutil.Process, root: int) -> str:
    if proc.pid == root:
        return "flow process"
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    if "spawn_main" in cmd and proc.ppid() == root:  # LocalCluster's nannies live in the flow process
        return "dask worker"
    if "uvicorn" in cmd or "prefect" in cmd and "server" in cmd:
        return "prefect API"
    return "other"


def sample(root: int, peaks: dict[int, tuple[str, int]], done: threading.Event) -> None:
    """Peak RSS of every process in the tree under ``root``, keyed by pid."""
    while not done.is_set():
        try:
            top = psutil.Process(root)
            procs = [top, *top.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            name, peak = peaks.get(p.pid, (None, 0))
            peaks[p.pid] = (name or role(p, root), max(peak, rss))
        time.sleep(0.1)


def seconds(line: str) -> float | None:
    m = STAMP.match(line)
    return None if m is None else int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])


def convert(source: str, quant: str, runner: str, scratch: Path) -> dict:
    out, work = scratch / f"out-{runner}", scratch / f"work-{runner}"
    for d in (out, work):
        shutil.rmtree(d, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # -v for the stage timestamps.
    cmd = [sys.executable, "-m", "flows.cli", "convert", source, "--quant", quant, "--no-validate", "-v",
           "--runner", runner, "--output", str(out), "--work-dir", str(work), "--name", "bench"]
    peaks: dict[int, tuple[str, int]] = {}
    done = threading.Event()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = threading.Thread(target=sample, args=(proc.pid, peaks, done), daemon=True)
    watcher.start()
    log = proc.communicate()[0]
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the whole tree: workers are waited for
    done.set()
    watcher.join()
    if proc.returncode != 0:
        sys.exit(f"{runner} run failed:\n{log[-4000:]}")
    start = end = None
    for line in log.splitlines():
        # Prefect's log lines carry a clock time; the CLI's progress copies of them do not.
        if seconds(line) is None:
            continue
        if "analyzed:" in line:
            start = seconds(line)
        elif "quantized" in line and "tensors into" in line:
            end = seconds(line)
    release = next((out / "bench").glob(f"*/{quant}"))
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(release.iterdir())}
    by_role: dict[str, list[int]] = {}
    for name, peak in peaks.values():
        by_role.setdefault(name, []).append(peak)
    # Time spent inside the quantize tasks (each staged tensor records its own).
    task_s = sum(json.loads(p.read_text())["seconds"] for p in (work / "tensors").rglob("*.json"))
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    return {"wall": wall, "quantize": None if start is None or end is None else end - start, "files": files,
            "peaks": by_role, "cpu": cpu, "task_s": task_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source", nargs="?")
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--scratch", default=os.path.join(tempfile.gettempdir(), "so8t-dask-bench"))
    args = ap.parse_args()
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    source = args.source
    if source is None:
        source = str(scratch / "llama-1.1b")
        if not os.path.exists(os.path.join(source, "config.json")):
            subprocess.run([sys.executable, "-m", "flows.cli", "fixture", source, *FIXTURE_ARGS], cwd=ROOT, check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})

    results = {"threads": [], "dask": []}
    for _ in range(args.repeat):
        for runner in results:
            load = os.getloadavg()[0]
            r = convert(source, args.quant, runner, scratch)
            r["load"] = load
            results[runner].append(r)
            print(f"{runner}: {r['wall']:.1f} s", file=sys.stderr)

    mib = 1 << 20
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB RAM; source {source}; {args.quant}, --no-validate.\n")
    print("| runner | wall s | quantize stage s | time in quantize tasks s | CPU s (all processes) "
          "| flow process peak MiB | per worker peak MiB | Prefect API MiB | load avg at start |")
    print("|---|---|---|---|---|---|---|---|---|")
    for runner, runs in results.items():
        for r in runs:
            p = r["peaks"]
            workers = ", ".join(f"{v / mib:.0f}" for v in sorted(p.get("dask worker", []))) or "—"
            api = ", ".join(f"{v / mib:.0f}" for v in p.get("prefect API", [])) or "—"
            q = "—" if r["quantize"] is None else f"{r['quantize']:.1f}"
            label = runner if runner == "threads" else f"dask, {len(p.get('dask worker', []))} worker processes"
            print(f"| {label} | {r['wall']:.1f} | {q} | {r['task_s']:.1f} | {r['cpu']:.1f} "
                  f"| {max(p['flow process']) / mib:.0f} | {workers} | {api} | {r['load']:.2f} |")
    reference = results["threads"][0]["files"]
    same = all(r["files"] == reference for runs in results.values() for r in runs)
    gguf = next(n for n in reference if n.endswith(".gguf") and "heads" not in n)
    print(f"\nRelease files identical across all runs: {'yes' if same else 'NO'} "
          f"({len(reference)} files; {gguf} sha256 {reference[gguf][:16]}…)")


if __name__ == "__main__":
    main()
