"""Concurrent publishers, on a local folder and on a real S3 endpoint (moto, loopback).

Several publishers commit different bytes to the same release at once: afterwards the release
holds one publisher's files and manifest, never a mix, and a reader watching throughout never
sees a manifest whose files do not match it. Publishers of different quants of one model all
keep their entry in latest.json.
"""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
from support.locks import contend, plant_stale_lock
from support.releases import FP_A, listing, local_files, visible
from support.reliability_record import record

from so8t_core import storage
from so8t_core.errors import So8tError
from so8t_core.publish import release as pub

# Many processes racing for a lock, on S3 too: about a minute, so out of the fast tier.
pytestmark = pytest.mark.e2e

PUBLISHERS = 4
LOCK_PROCESSES, LOCK_TRIALS = 8, 8


def run_at_once(fns) -> None:
    """Start every fn at the same instant (a barrier), re-raise the first error."""
    barrier, errors = threading.Barrier(len(fns)), []

    def go(fn):
        barrier.wait()
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_concurrent_publishers_of_one_release_leave_one_complete_release(dest, tmp_path):
    release = pub.release_uri(dest, "m", FP_A, "Q4_K_M")
    versions = {i: local_files(tmp_path, f"publisher-{i}") for i in range(PUBLISHERS)}
    pub.publish_release(local_files(tmp_path, "previous"), release, {"publisher": "previous"})
    seen, straddled, errors, stop = [], [], [], threading.Event()

    def watch():
        """A reader throughout, reading as readers must: the manifest, the files it lists, then the
        manifest again. When the manifest did not change meanwhile, the files match it."""
        while not stop.is_set():
            before = pub.read_manifest(release)
            try:
                files = visible(release)
            except (AssertionError, So8tError) as exc:  # a listed file missing, or other bytes
                files = exc
            if pub.read_manifest(release) != before:
                straddled.append(1)  # a commit happened during the read: read again
            elif isinstance(files, Exception):
                errors.append(files)
            else:
                seen.append(files)

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        run_at_once([lambda i=i: pub.publish_release(versions[i], release, {"publisher": i})
                     for i in range(PUBLISHERS)])
    finally:
        stop.set()
        reader.join()
    final = visible(release)
    winners = [i for i, files in versions.items()
               if final == {n: {"sha256": r.sha256, "size": r.size} for n, r in files.items()}]
    fs, path = storage.resolve(release)
    fs.invalidate_cache()
    leftovers = sorted(p for p in fs.find(path, withdirs=False) if "/." in p[len(path):])
    record("concurrent_publish", backend=dest.split("://")[0] if "://" in dest else "local",
           publishers=PUBLISHERS, mixed=int(len(winners) != 1) + len(errors), reads_checked=len(seen),
           reads_straddling_a_commit=len(straddled))
    assert len(winners) == 1 and pub.read_manifest(release)["publisher"] == winners[0]
    assert leftovers == []  # no staging prefix, no lock left behind
    assert not errors and len(seen) > 1


def test_concurrent_publishers_of_different_quants_all_stay_in_latest(dest):
    quants = [f"Q{i}_0" for i in range(PUBLISHERS)]
    run_at_once([lambda q=q: pub.update_latest(dest, "m", {q: {"release": f"{FP_A[:16]}/{q}/"}}) for q in quants])
    latest = pub.read_latest(dest, "m")
    record("concurrent_latest", backend=dest.split("://")[0] if "://" in dest else "local",
           publishers=PUBLISHERS, entries_lost=PUBLISHERS - len(latest["quants"]))
    assert sorted(latest["quants"]) == quants


def test_many_processes_taking_over_a_stale_lock_never_hold_it_together(dest, tmp_path):
    """A killed publisher left the lock; eight processes find it at once. Each judges it stale; before
    the takeover was made exclusive, one could remove another's fresh lock and both entered (8 of
    44 trials overlapped; 5 of 10 here, on S3). Now exactly one removes the stale lock, and the
    holders take turns."""
    folder = f"{dest}/m/{FP_A[:16]}/Q4_K_M"
    marker = str(tmp_path / "inside")
    overlaps, started = 0, time.monotonic()
    with multiprocessing.get_context("spawn").Pool(LOCK_PROCESSES) as pool:
        pool.starmap(time.sleep, [(0,)] * LOCK_PROCESSES)  # every worker started and imported
        for _ in range(LOCK_TRIALS):
            plant_stale_lock(folder)
            start_at = time.time() + 0.3
            overlaps += sum(pool.starmap(contend, [(folder, marker, start_at, 0.02)] * LOCK_PROCESSES))
    leftovers = [p for p in listing(folder) if ".publish-lock" in p]
    record("lock_takeover", backend=dest.split("://")[0] if "://" in dest else "local", processes=LOCK_PROCESSES,
           trials=LOCK_TRIALS, overlaps=overlaps, seconds=round(time.monotonic() - started, 1))
    assert overlaps == 0
    assert leftovers == []  # the stale lock, the tombstones and every holder's lock are gone
