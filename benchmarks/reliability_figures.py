"""The figures of docs/reliability.md: runs the reliability tests and prints their table.

    .venv/bin/python benchmarks/reliability_figures.py [--keep DIR]

Runs, in one pytest session: the fault-injection run (tests/test_faults.py), the crash matrix
(tests/test_crash.py), the concurrent publishers and the stale-lock race
(tests/test_concurrency.py), the credentials grep (tests/test_secrets.py), the bad-input corpus
(tests/test_bad_inputs.py), and the attacks on names, manifests and resource limits
(tests/test_names.py, tests/test_publish.py, tests/test_gguf_limits.py, the chat template cases
of tests/test_llama_runtime.py). The tests
append what they measured to a JSON-lines file (tests/support/reliability_record.py); pass/fail comes
from pytest's JUnit report. Prints a Markdown table with the date and the machine; exits 1 when
any of these tests failed. Takes about 8 minutes on 2 cores.
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
         "tests/test_bad_inputs.py", "tests/test_names.py", "tests/test_publish.py", "tests/test_gguf_limits.py",
         "tests/test_llama_runtime.py::test_a_chat_template_that_hangs_floods_or_escapes_is_one_line"]


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

    republish = [r for r in kills if "re-publish" in r["point"]]
    locks = by_kind["lock_takeover"]
    overlaps = sum(r["overlaps"] for r in locks)

    releases_lost = sum(r["previous_lost"] for r in kills) + partial_seen + mixed + entries_lost + overlaps
    secrets = by_kind["secrets"]
    credentials = by_kind["credentials"]
    leaked = sum(r["leaked"] for r in secrets) + sum(r["leaked"] for r in credentials)
    places = sum(r["checked"] for r in secrets)
    runs_with_credentials = sum(r["flow_runs"] for r in credentials)

    paths = by_kind["paths"]
    outside = sum(r["outside"] for r in paths)
    resources = by_kind["resources"]
    ggufs = [r for r in resources if "GGUF of" in r["attack"]]
    templates = [r for r in resources if r not in ggufs]

    def resource_row(r: dict) -> str:
        memory = f", peak memory {r['peak_mb']} MB (inspecting a tiny GGUF: {r['baseline_mb']} MB)" \
            if "peak_mb" in r else ""
        verdict = "refused in one line" if r["refused"] else "read"
        return f"{r['attack']}: {verdict} in {r['seconds']} s{memory}"

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
        ("Kill points inside a re-publish's commit (same release, new bytes)",
         f"{len(republish)} ({', '.join(r['point'] for r in republish)})",
         f"{sum(1 - r['previous_lost'] for r in republish)} left the release readable at its old or new version "
         f"and every file of the old version intact; {sum(r['identical'] for r in republish)} resumed "
         f"byte-identical"),
        ("A stale lock taken over by racing processes",
         ", ".join(f"{r['processes']} processes × {r['trials']} trials ({r['backend']})" for r in locks),
         f"{overlaps} trials with two holders at once (the takeover before: 5 of 10 trials on S3)"),
        ("Names that are paths: options, source folders, case clashes, manifests, pointers",
         f"{len(paths)} attacks ({'; '.join(r['attack'] for r in paths)})",
         f"{sum(r['refused'] for r in paths)} refused; {outside} files written or removed outside the destination"),
        ("Credentials in a URI", f"{len(credentials)} CLI options ({', '.join(r['option'] for r in credentials)})",
         f"{sum(r['refused'] for r in credentials)} refused in one line; {runs_with_credentials} flow runs "
         f"created (the secret in Prefect's database: counted in Secrets leaked)"),
        ("A small GGUF declaring millions of metadata items", f"{len(ggufs)} files",
         "; ".join(resource_row(r) for r in ggufs)),
        ("Chat templates that loop, flood or reach past Jinja's sandbox", f"{len(templates)} attacks",
         "; ".join(resource_row(r) for r in templates)),
        ("**Releases lost** (must be 0)", "previous releases, partial or mixed releases, latest.json entries, "
         "two lock holders", f"**{releases_lost}**"),
        ("**Secrets leaked** (must be 0)", f"{places} outputs, logs, exception texts, files and Prefect's database "
         "grepped", f"**{leaked}**"),
    ]
    held = (fault_runs_identical == len(faults) > 0 and resumed_identical == len(kills) == len(KILL_CASES)
            and bad and all(bad) and len(bad) == len(CASES) and releases_lost == 0 and leaked == 0
            and same_release and latest and secrets and locks and credentials and runs_with_credentials == 0
            and paths and outside == 0 and all(r["refused"] for r in paths)
            and resources and all(r["refused"] == ("within the limits" not in r["attack"]) for r in resources))
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
