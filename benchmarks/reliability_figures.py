"""The figures of docs/reliability.md: runs the reliability tests and prints their table.

    .venv/bin/python benchmarks/reliability_figures.py [--keep DIR]

Runs, in one pytest session: the fault-injection run (tests/test_faults.py), the crash matrix
(tests/test_crash.py), the concurrent publishers (tests/test_concurrency.py), the credentials
grep (tests/test_secrets.py) and the bad-input corpus (tests/test_bad_inputs.py). The tests
append what they measured to a JSON-lines file (tests/support/reliability_record.py); pass/fail comes
from pytest's JUnit report. Prints a Markdown table with the date and the machine; exits 1 when
any of these tests failed. Takes 3-5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ["tests/test_faults.py", "tests/test_crash.py", "tests/test_concurrency.py", "tests/test_secrets.py",
         "tests/test_bad_inputs.py"]


def run_tests(folder: str) -> tuple[list[dict], dict[str, list[tuple[str, bool]]]]:
    """(the tests' records, test file → [(test id, passed)])."""
    figures, junit = os.path.join(folder, "figures.jsonl"), os.path.join(folder, "junit.xml")
    env = {**os.environ, "SO8T_RELIABILITY_FIGURES": figures,
           "PYTHONPATH": os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *TESTS],
                   cwd=ROOT, env=env, check=False)
    records = []
    if os.path.exists(figures):
        with open(figures, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    outcomes: dict[str, list[tuple[str, bool]]] = collections.defaultdict(list)
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        failed = any(child.tag in ("failure", "error") for child in case)
        skipped = any(child.tag == "skipped" for child in case)
        if not skipped:
            outcomes[module].append((case.get("name", ""), not failed))
    return records, outcomes


def table(records: list[dict], outcomes: dict[str, list[tuple[str, bool]]]) -> tuple[str, bool]:
    """(the Markdown table, whether every guarantee held)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    from test_bad_inputs import CASES
    from test_crash import CASES as KILL_CASES

    by_kind = collections.defaultdict(list)
    for r in records:
        by_kind[r["kind"]].append(r)

    faults = by_kind["faults"]
    requests = sum(r["requests"] for r in faults)
    injected = collections.Counter()
    for r in faults:
        injected.update(r["faults"])
    fault_runs_identical = sum(r["identical"] for r in faults)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(injected.items()))

    kills = by_kind["kill_point"]
    resumed_identical = sum(r["identical"] for r in kills)
    partial_seen = sum(r["partial_after_kill"] for r in kills)

    bad = [ok for name, ok in outcomes.get("test_bad_inputs", []) if name.startswith("test_bad_input_is_refused")]

    same_release = by_kind["concurrent_publish"]
    latest = by_kind["concurrent_latest"]
    mixed = sum(r["mixed"] for r in same_release)
    entries_lost = sum(r["entries_lost"] for r in latest)
    reads = sum(r["reads_checked"] for r in same_release)

    releases_lost = sum(r["previous_lost"] for r in kills) + partial_seen + mixed + entries_lost
    secrets = by_kind["secrets"]
    leaked = sum(r["leaked"] for r in secrets)
    places = sum(r["checked"] for r in secrets)

    rows = [
        ("Faults injected on S3 (share of requests failed)",
         f"{sum(injected.values())} of {requests} requests ({kinds})",
         f"{fault_runs_identical} of {len(faults)} conversion(s) completed, release byte-identical to a clean run"),
        ("Kill points (SIGKILL)", f"{len(kills)} of {len(KILL_CASES)} ({', '.join(r['point'] for r in kills)})",
         f"{resumed_identical} resumed, release byte-identical to an uninterrupted run; "
         f"{partial_seen} partial releases visible after a kill; "
         f"{sum(r.get('leftovers', 0) for r in kills)} staging prefixes or locks left after the rerun"),
        ("Bad inputs", f"{len(bad)} of {len(CASES)} corpus cases run",
         f"{sum(bad)} refused in one line, exit 2, nothing published"),
        ("Concurrent publishers", f"{sum(r['publishers'] for r in same_release)} on one release "
         f"({len(same_release)} backends), {sum(r['publishers'] for r in latest)} on one latest.json",
         f"{mixed} mixed releases ({reads} consistent reads during the races); {entries_lost} latest.json "
         f"entries lost"),
        ("**Releases lost** (must be 0)", "previous releases, partial or mixed releases, latest.json entries",
         f"**{releases_lost}**"),
        ("**Secrets leaked** (must be 0)", f"{places} outputs, logs, exception texts and files grepped",
         f"**{leaked}**"),
    ]
    held = (fault_runs_identical == len(faults) > 0 and resumed_identical == len(kills) == len(KILL_CASES)
            and bad and all(bad) and len(bad) == len(CASES) and releases_lost == 0 and leaked == 0
            and same_release and latest and secrets)
    lines = ["| guarantee | tried | result |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines), bool(held)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="keep the records and the JUnit report in this folder")
    args = parser.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="so8t-reliability-")
    os.makedirs(folder, exist_ok=True)
    records, outcomes = run_tests(folder)
    failed = [f"{m}::{n}" for m, cases in outcomes.items() for n, ok in cases if not ok]
    text, held = table(records, outcomes)
    print(f"\nMeasured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}.\n")
    print(text)
    if failed:
        print(f"\nFailed: {', '.join(failed)}")
    return 0 if held and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
