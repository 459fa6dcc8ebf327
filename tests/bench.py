#!/usr/bin/env python3
"""Measure queuectl's speed on this machine: python3 tests/bench.py [--jobs N].

Not a test (unittest does not collect it): it prints numbers to compare between
changes. Every figure comes from real processes on a temporary database.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUEUECTL = os.path.join(ROOT, "queuectl.py")
sys.path.insert(0, ROOT)

import queuectl  # noqa: E402


def cli(db, *argv, stdin=None):
    return subprocess.run([sys.executable, QUEUECTL, "--db", db, *argv], input=stdin,
                          capture_output=True, text=True, check=True, timeout=600)


def wait_all_done(db, timeout_s=600):
    store = queuectl.Store(db, create=False)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            counts = store.status()[0]
            if counts["completed"] + counts["dead"] == sum(counts.values()):
                return
            time.sleep(0.02)
        raise SystemExit("benchmark: jobs did not finish in time")
    finally:
        store.close()


def bench_enqueue(folder, jobs):
    db = os.path.join(folder, "enqueue.db")
    lines = "".join(json.dumps({"command": "true"}) + "\n" for _ in range(jobs))
    cli(db, "config", "set", "max_retries", "3")  # create the database untimed
    start = time.perf_counter()
    cli(db, "enqueue", "-", stdin=lines)
    batch = jobs / (time.perf_counter() - start)
    singles = []
    for _ in range(20):
        start = time.perf_counter()
        cli(db, "enqueue", '{"command": "true"}')
        singles.append(time.perf_counter() - start)
    return [("enqueue - (one batch)", f"{batch:,.0f} jobs/s"),
            ("single enqueue, one process each", f"{statistics.median(singles) * 1000:.0f} ms "
                                                 f"median")]


def bench_store(folder, jobs):
    db = os.path.join(folder, "store.db")
    store = queuectl.Store(db)
    try:
        store.enqueue([queuectl.validate_job({"command": "true"}) for _ in range(jobs)],
                      folder)
        done = queuectl.RunResult(exit_code=0, duration_s=0.0)
        start = time.perf_counter()
        while True:
            claim = store.claim(os.getpid())
            if claim is None:
                break
            store.finish(claim.id, claim.token, done)
        rate = jobs / (time.perf_counter() - start)
    finally:
        store.close()
    return [("claim + finish, in-process (no command)", f"{rate:,.0f} jobs/s")]


def bench_workers(folder, jobs, count):
    db = os.path.join(folder, f"workers{count}.db")
    lines = "".join(json.dumps({"command": "true"}) + "\n" for _ in range(jobs))
    cli(db, "enqueue", "-", stdin=lines)
    start = time.perf_counter()
    cli(db, "worker", "start", "--count", str(count), "--detach")
    try:
        wait_all_done(db)
        rate = jobs / (time.perf_counter() - start)
    finally:
        cli(db, "worker", "stop")
    return [(f"{count} worker(s), `true` jobs, end to end", f"{rate:,.0f} jobs/s")]


def bench_pickup(folder, samples=10):
    db = os.path.join(folder, "pickup.db")
    cli(db, "worker", "start", "--count", "2", "--detach")
    delays = []
    try:
        for _ in range(samples):
            job_id = cli(db, "enqueue", '{"command": "true"}').stdout.strip()
            wait_all_done(db)
            job = json.loads(cli(db, "show", job_id, "--json").stdout)
            started = queuectl.parse_iso(job["history"][0]["started_at"])
            delays.append((started - queuectl.parse_iso(job["created_at"]))
                          .total_seconds())
            time.sleep(0.3)   # let the workers go idle again
    finally:
        cli(db, "worker", "stop")
    return [("idle worker picks up a new job", f"{statistics.median(delays) * 1000:.0f} ms "
                                               f"median, {max(delays) * 1000:.0f} ms max")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per measurement")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        rows += bench_enqueue(folder, args.jobs)
        rows += bench_store(folder, args.jobs)
        for count in (1, 4):
            rows += bench_workers(folder, args.jobs // 2, count)
        rows += bench_pickup(folder)
    width = max(len(name) for name, _ in rows)
    print(f"queuectl {queuectl.__version__}, Python {sys.version.split()[0]}, "
          f"SQLite {queuectl.sqlite3.sqlite_version}, {os.cpu_count()} CPUs")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
