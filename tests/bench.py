#!/usr/bin/env python3
"""Measure queuectl beside its baselines: python3 tests/bench.py [--quick].

Not a test (unittest does not collect it). Every figure is measured beside its
baseline in the same run, the best of several rounds, and reported as a ratio,
because the machine is shared and noisy: absolute times move, ratios hold.

queuectl is driven only through its command line, on temporary databases, and the
database is read with plain sqlite3; so `--queuectl PATH` measures another copy
(an older commit, say) with the same yardstick. `--db postgresql://...` measures
the PostgreSQL store instead: each database is a schema of its own on that server
(dropped at the end), read with psycopg, and the 1,000-job figure is measured on
SQLite too, in the same run, as its baseline. The dashboard's figures are SQLite's
alone.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# `python3` in a #! line or a shell resolves through PATH; make that this Python,
# not a version manager's shim.
ENV = dict(os.environ, PATH=os.path.dirname(PY) + os.pathsep + os.environ["PATH"])
ENV.pop("QUEUECTL_DB", None)

POOL_SCRIPT = """
import multiprocessing, subprocess, sys
def run(_):
    subprocess.run("true", shell=True)
if __name__ == "__main__":
    with multiprocessing.Pool(int(sys.argv[1])) as pool:
        for _ in pool.imap_unordered(run, range(int(sys.argv[2]))):
            pass
"""

HUEY_TASKS = """
import os, subprocess
from huey import SqliteHuey
huey = SqliteHuey(filename=os.environ["BENCH_HUEY_DB"])
@huey.task()
def run(command):
    subprocess.run(command, shell=True)
"""


FLOOR_SCRIPT = """
import argparse, json, signal, sqlite3, sys
from datetime import datetime, timezone
db = sys.argv[sys.argv.index("--db") + 1] + ".floor"
conn = sqlite3.connect(db, isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA synchronous=FULL")
conn.execute("CREATE TABLE IF NOT EXISTS jobs (id, command, at)")
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO jobs VALUES (?, ?, ?)", ("x", json.loads(sys.argv[-1])["command"],
             datetime.now(timezone.utc).isoformat()))
conn.execute("COMMIT")
conn.close()
"""


class Bench:
    def __init__(self, args, folder):
        self.queuectl = os.path.abspath(args.queuectl)
        self.quick = args.quick
        self.rounds = args.rounds or (1 if args.quick else 3)
        self.folder = folder
        self.rows = []
        self.notes = []
        self.count = 0
        self.big = {}                  # size: database of build_big
        self.postgres = args.db        # a server's URL, or None: SQLite files
        self.schemas = []

    def close(self):
        """Drop the schemas made on the PostgreSQL server."""
        if self.schemas:
            import psycopg
            with psycopg.connect(self.postgres, autocommit=True) as conn:
                for schema in self.schemas:
                    conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

    # -- helpers ------------------------------------------------------------------

    def db(self, name):
        self.count += 1
        if self.postgres:
            schema = f"bench_{os.getpid()}_{self.count}"
            self.schemas.append(schema)
            return (self.postgres + ("&" if "?" in self.postgres else "?") +
                    f"schema={schema}")
        return os.path.join(self.folder, f"{self.count}-{name}.db")

    @contextlib.contextmanager
    def sqlite_meanwhile(self):
        """Measure SQLite's figure meanwhile (a --db postgresql:// run's baseline)."""
        self.postgres, server = None, self.postgres
        try:
            yield
        finally:
            self.postgres = server

    def on_sqlite(self, measure):
        """MEASURE, made to measure on SQLite."""
        def on_sqlite():
            with self.sqlite_meanwhile():
                return measure()
        return on_sqlite

    @contextlib.contextmanager
    def reader(self, db):
        """A connection that reads DB behind queuectl's back: execute(sql with ?
        parameters, params) -> rows."""
        if not self.postgres:
            conn = sqlite3.connect(db, timeout=60)
            try:
                yield lambda sql, params=(): conn.execute(sql, params).fetchall()
            finally:
                conn.close()
            return
        import psycopg
        base, _, query = db.partition("?")
        params = urllib.parse.parse_qsl(query)
        schema = dict(params)["schema"]
        url = base + "?" + urllib.parse.urlencode([p for p in params if p[0] != "schema"])
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"SET search_path TO {schema}")

            def execute(sql, params=()):
                cursor = conn.execute(sql.replace("%", "%%").replace("?", "%s"),
                                      params)
                return cursor.fetchall() if cursor.description else []
            yield execute

    def cli(self, db, *argv, stdin=None, check=True):
        return subprocess.run([PY, self.queuectl, "--db", db, *argv], input=stdin,
                              capture_output=True, text=True, check=check,
                              timeout=900, env=ENV)

    @staticmethod
    def timed(argv, **kwargs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, timeout=900, env=ENV, **kwargs)
        return time.perf_counter() - start

    def enqueue_lines(self, db, lines):
        self.cli(db, "enqueue", "-", stdin="".join(line + "\n" for line in lines))

    def add(self, figure, value, baseline, ratio, target, met):
        self.rows.append((figure, value, baseline, ratio, target,
                          "yes" if met else "**no**"))
        print(f"  {figure}: {value} vs {baseline} ({ratio}; target {target}): "
              f"{'met' if met else 'NOT met'}", flush=True)

    def best(self, measure):
        """The smallest of ROUNDS results of measure() (each a number)."""
        return min(measure() for _ in range(self.rounds))

    def best_of_each(self, *measures):
        """The smallest result of each of MEASURES over ROUNDS rounds, a round
        measuring each once, in turn."""
        results = [[measure() for measure in measures] for _ in range(self.rounds)]
        return [min(column) for column in zip(*results)]

    # -- end-to-end throughput ----------------------------------------------------------

    def run_queue(self, db, count, total):
        """Start workers on DB; return seconds from `worker start` until TOTAL jobs
        have finished (by the newest `updated_at`, not by when we noticed)."""
        started = time.time()
        proc = subprocess.Popen([PY, self.queuectl, "--db", db, "worker", "start",
                                 "--count", str(count)], env=ENV,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            with self.reader(db) as sql:
                deadline = time.monotonic() + 900
                while time.monotonic() < deadline:
                    time.sleep(0.05)
                    done = sql("SELECT count(*) FROM jobs WHERE state IN "
                               "('completed', 'dead')")[0][0]
                    if done >= total:
                        break
                else:
                    raise SystemExit("bench: jobs did not finish in 900 s")
                last = sql("SELECT max(updated_at) FROM jobs WHERE state IN "
                           "('completed', 'dead')")[0][0]
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        finished = datetime.strptime(last, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=timezone.utc).timestamp()
        return finished - started

    def throughput(self, jobs, count, waiting=0):
        """Seconds for JOBS `true` jobs through COUNT workers, WAITING delayed beside."""
        def measure():
            db = self.db(f"run{jobs}x{count}")
            if waiting:
                self.enqueue_lines(db, [json.dumps({"command": "true", "delay": 86400,
                                                    "priority": 10})] * waiting)
            self.enqueue_lines(db, ['{"command": "true"}'] * jobs)
            return self.run_queue(db, count, jobs)
        return measure

    def xargs(self, jobs, count):
        path = os.path.join(self.folder, f"xargs-{jobs}")
        with open(path, "w") as f:
            f.write("true\n" * jobs)

        def measure():
            with open(path) as f:
                return self.timed(["xargs", f"-P{count}", "-n1", "sh", "-c"], stdin=f)
        return measure

    def pool(self, jobs, count):
        return lambda: self.timed([PY, "-c", POOL_SCRIPT, str(count), str(jobs)])

    def tsp(self, jobs, count):
        """task-spooler: JOBS queued behind a gate, then released into COUNT slots.

        Each queued tsp job is a waiting client process with a connection to the
        server, which accepts about 1,000 of them: so JOBS stays below that."""
        env = dict(ENV, TS_SOCKET=os.path.join(self.folder, f"tsp-{self.count}"),
                   TS_MAXFINISHED=str(jobs + 10), TS_MAXCONN=str(jobs + 10))
        self.count += 1
        gate = os.path.join(self.folder, f"gate-{self.count}")

        def ts(*argv):
            return subprocess.run(["tsp", *argv], env=env, capture_output=True,
                                  text=True, check=True, timeout=120).stdout.strip()
        ts("-S", "1")
        ts("sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.001; done")
        for _ in range(jobs):
            ts("true")
        ts("-S", str(count))
        start = time.perf_counter()
        open(gate, "w").close()
        ts("-w")
        elapsed = time.perf_counter() - start
        ts("-K")
        return elapsed

    def huey(self, jobs, count):
        """huey's SqliteHuey: JOBS tasks enqueued first, then a consumer of COUNT."""
        db = os.path.join(self.folder, f"huey-{self.count}.db")
        self.count += 1
        module = os.path.join(self.folder, "bench_huey_tasks.py")
        with open(module, "w") as f:
            f.write(HUEY_TASKS)
        env = dict(ENV, BENCH_HUEY_DB=db, PYTHONPATH=self.folder)
        subprocess.run([PY, "-c", "import bench_huey_tasks as t\n"
                        f"for _ in range({jobs}): t.run('true')"], check=True,
                       timeout=300, env=env)
        start = time.perf_counter()
        proc = subprocess.Popen([PY, "-m", "huey.bin.huey_consumer",
                                 "bench_huey_tasks.huey", "-k", "process", "-w",
                                 str(count), "-d", "0.01"], env=env, cwd=self.folder,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        conn = sqlite3.connect(db, timeout=60)
        try:
            while conn.execute("SELECT count(*) FROM task").fetchone()[0]:
                time.sleep(0.002)
            # The last task left the queue when it started; its run is ~1 ms more.
            elapsed = time.perf_counter() - start
        finally:
            conn.close()
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
        return elapsed

    def bench_throughput(self, jobs, count, target, stretch=None):
        print(f"{jobs} jobs, {count} workers ...", flush=True)
        if self.postgres:
            # Rounds alternate between the stores, so that a noisy moment of the
            # machine falls on both alike.
            ours, sqlite = self.best_of_each(self.throughput(jobs, count),
                                             self.on_sqlite(self.throughput(jobs, count)))
        else:
            ours = self.best(self.throughput(jobs, count))
        xargs = self.best(self.xargs(jobs, count))
        pool = self.best(self.pool(jobs, count))
        ratio = ours / xargs
        goal = f"<= {target}x" + (f" (stretch {stretch}x)" if stretch else "")
        self.add(f"{jobs:,} `true` jobs, `--count {count}`, `worker start` to last "
                 f"finish", f"{ours:.2f} s", f"`xargs -P{count}` {xargs:.2f} s",
                 f"{ratio:.2f}x", goal, ratio <= target)
        self.add(f"the same, against the `multiprocessing.Pool({count})` floor",
                 f"{ours:.2f} s", f"Pool {pool:.2f} s", f"{ours / pool:.2f}x",
                 "(floor)", True)
        if self.postgres:
            self.add("the same, against SQLite's figure in this run", f"{ours:.2f} s",
                     f"SQLite {sqlite:.2f} s", f"{ours / sqlite:.2f}x", "<= 1.5x",
                     ours / sqlite <= 1.5)
            return
        if shutil.which("tsp"):
            few = min(jobs, 900)
            theirs = self.best(lambda: self.tsp(few, count))
            base = xargs if few == jobs else self.best(self.xargs(few, count))
            self.add(f"task-spooler (tsp), {few:,} jobs", f"{theirs:.2f} s",
                     f"`xargs -P{count}` {base:.2f} s", f"{theirs / base:.2f}x",
                     "(reference)", True)
        else:
            self.notes.append("task-spooler (tsp) is not installed: not measured.")
        if importlib.util.find_spec("huey"):
            theirs = self.best(lambda: self.huey(jobs, count))
            self.add(f"huey's SqliteHuey on the same work", f"{theirs:.2f} s",
                     f"`xargs -P{count}` {xargs:.2f} s", f"{theirs / xargs:.2f}x",
                     "(reference)", True)
        else:
            self.notes.append("huey is not installed: not measured.")

    # -- enqueue --------------------------------------------------------------------------

    def installed(self):
        """queuectl as `pip install .` or `pipx install .` gives it: a console
        script that imports the module from its cached bytecode. A venv in the
        run's folder, with the checkout that --queuectl names installed in it."""
        venv = os.path.join(self.folder, "venv")
        script = os.path.join(venv, "bin", "queuectl")
        if not os.path.exists(script):
            source = os.path.dirname(self.queuectl)
            # On PostgreSQL the venv sees this interpreter's packages, psycopg
            # among them (as `pip install ".[postgres]"` would give it).
            shared = ["--system-site-packages"] if self.postgres else []
            subprocess.run([PY, "-m", "venv", *shared, venv], check=True, timeout=300)
            result = subprocess.run([os.path.join(venv, "bin", "pip"), "install",
                                     "--quiet", "--no-deps", source],
                                    capture_output=True, text=True, timeout=600,
                                    cwd=self.folder)
            if result.returncode:
                self.notes.append(f"pip install of {source} failed: "
                                  f"{result.stderr.strip()[-300:]}")
                return None
        return script

    def bench_enqueue_one(self, runs=15):
        print("one enqueue process ...", flush=True)
        db = self.db("one")
        self.cli(db, "config", "set", "max_retries", "3")
        job = '{"command": "true"}'
        # Each form beside the bare start of the interpreter it runs on: a venv's
        # python starts without what the outer one's site-packages load.
        bare = [PY, "-c", "pass"]
        forms = [("one `python3 queuectl.py enqueue JSON` process",
                  [PY, self.queuectl], bare)]
        if os.access(self.queuectl, os.X_OK):
            forms.append(("one `./queuectl.py enqueue JSON` process (by its #! line)",
                          [self.queuectl], bare))
        installed = self.installed()
        if installed:
            python = os.path.join(os.path.dirname(installed), "python3")
            floor = os.path.join(self.folder, "floor.py")
            with open(floor, "w") as f:
                f.write(FLOOR_SCRIPT)
            forms.append(("one `queuectl enqueue JSON` process, installed by pip",
                          [installed], [python, "-c", "pass"]))
        if installed and not self.postgres:
            # What no queue can do without: start, import what queuectl needs of
            # the standard library, and make one synced insert (into SQLite).
            forms.append(("floor: the imports queuectl needs and one synced insert",
                          [python, floor], [python, "-c", "pass"]))

        def round_():
            times = {name: ([], []) for name, _, _ in forms}
            for _ in range(runs):           # interleaved, so drift hits both alike
                for name, argv, base in forms:
                    times[name][0].append(self.timed(base))
                    times[name][1].append(self.timed(
                        argv + ["--db", db, "enqueue", job], stdout=subprocess.DEVNULL))
            return {name: (statistics.median(b), statistics.median(o))
                    for name, (b, o) in times.items()}
        results = [round_() for _ in range(self.rounds)]
        for name, _, base in forms:
            bare_s = min(r[name][0] for r in results)
            ours = min(r[name][1] for r in results)
            floor_row = name.startswith("floor")
            self.add(name, f"{ours * 1000:.0f} ms",
                     f"`{os.path.basename(base[0])} -c pass` {bare_s * 1000:.0f} ms",
                     f"{ours / bare_s:.2f}x", "(floor)" if floor_row else "<= 1.5x",
                     floor_row or ours / bare_s <= 1.5)

    def bench_enqueue_batch(self, jobs):
        print(f"enqueue - of {jobs} lines ...", flush=True)
        text = '{"command": "true"}\n' * jobs

        def measure():
            db = self.db("batch")
            self.cli(db, "config", "set", "max_retries", "3")
            return self.timed([PY, self.queuectl, "--db", db, "enqueue", "-"],
                              input=text.encode(), stdout=subprocess.DEVNULL)
        ours = self.best(measure)
        bare = self.best(lambda: self.timed([PY, "-c", "pass"]))
        rate = jobs / max(ours - bare, 1e-6)
        target = 50000 if self.postgres else 100000
        self.add(f"`enqueue -` of {jobs:,} lines, minus a bare interpreter start",
                 f"{rate:,.0f} jobs/s", f"{ours:.2f} s - {bare * 1000:.0f} ms",
                 f"{rate / target:.2f}x of target", f">= {target:,} jobs/s",
                 rate >= target)

    # -- an idle pool ---------------------------------------------------------------------

    @contextlib.contextmanager
    def detached_pool(self, db, count):
        self.cli(db, "worker", "start", "--count", str(count), "--detach")
        try:
            yield json.loads(self.cli(db, "status", "--json").stdout)["supervisor_pid"]
        finally:
            self.cli(db, "worker", "stop", check=False)

    def bench_pickup(self, samples):
        print(f"pickup, {samples} samples ...", flush=True)
        db = self.db("pickup")
        self.cli(db, "config", "set", "max_retries", "0")
        delays = []
        with self.detached_pool(db, 4):
            for n in range(samples):
                time.sleep(0.25 + 0.01 * (n % 7))     # idle again, at varied phases
                mark = os.path.join(self.folder, f"pickup-{self.count}-{n}")
                job_id = self.cli(db, "enqueue", json.dumps(
                    {"command": f"date +%s.%N > {mark}"})).stdout.strip()
                deadline = time.monotonic() + 30
                while not (os.path.exists(mark) and os.path.getsize(mark)):
                    if time.monotonic() > deadline:
                        raise SystemExit("bench: a pickup job never ran")
                    time.sleep(0.005)
                with open(mark) as f:
                    ran = float(f.read())
                with self.reader(db) as sql:
                    created = sql("SELECT created_at FROM jobs WHERE id = ?",
                                  (job_id,))[0][0]
                delays.append(ran - datetime.strptime(
                    created, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                    tzinfo=timezone.utc).timestamp())
        delays.sort()
        p50 = delays[len(delays) // 2]
        p95 = delays[min(len(delays) - 1, int(len(delays) * 0.95))]
        self.add("pickup: enqueued into an idle pool until its command starts",
                 f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms", "none", "-",
                 "p50 < 20 ms, p95 < 50 ms", p50 < 0.020 and p95 < 0.050)

    @staticmethod
    def session_ticks(sid):
        """CPU clock ticks used so far by every process of session SID."""
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                total += int(fields[11]) + int(fields[12])
        return total

    def bench_idle(self, seconds):
        print(f"idle pool, {seconds} s ...", flush=True)
        db = self.db("idle")
        self.cli(db, "config", "set", "max_retries", "0")
        with self.detached_pool(db, 4) as supervisor, self.reader(db) as sql:
            time.sleep(3.0)             # let start-up settle, and its counts be sent
            before = self.session_ticks(supervisor)
            # Transactions counted over three windows, of which the median is
            # kept: the server's own work (autovacuum after the figures before)
            # falls in some of them, the pool's polls in all.
            windows = []
            for _ in range(3):
                commits = self.commits(sql)
                time.sleep(seconds / 3)
                windows.append(self.commits(sql) - commits)
            used = self.session_ticks(supervisor) - before
        share = used / os.sysconf("SC_CLK_TCK") / seconds
        self.add(f"idle pool (supervisor + 4 workers) over {seconds} s",
                 f"{share:.2%} of a core", "none", "-", "< 0.5% of one core",
                 share < 0.005)
        if self.postgres:
            # Every transaction the server committed in the middle window of the
            # three, less this reading's own (two a reading): on a server that
            # nothing else uses, the pool's polls. A backend sends its counts at
            # most once a second, so a window may get one more or one fewer; the
            # median leaves out a window that autovacuum fell in, without
            # leaning low as the smallest would.
            rate = (sorted(windows)[1] - 2) / (seconds / 3)
            self.add(f"the same: transactions a second on the database",
                     f"{rate:.2f}", "none", "-", "<= 1 a second", rate <= 1.0)

    def commits(self, sql):
        """Transactions committed so far in the PostgreSQL server's database."""
        if not self.postgres:
            return 0
        sql("SELECT pg_stat_clear_snapshot()")
        return sql("SELECT xact_commit FROM pg_stat_database "
                   "WHERE datname = current_database()")[0][0]

    # -- scale ----------------------------------------------------------------------------

    def bench_waiting(self, waiting, jobs, count=2):
        print(f"{jobs} jobs beside {waiting} delayed ones ...", flush=True)
        empty = self.best(self.throughput(jobs, count))
        loaded = self.best(self.throughput(jobs, count, waiting))
        ratio = loaded / empty
        self.add(f"{jobs:,} jobs, `--count {count}`, beside {waiting:,} waiting "
                 f"(future `run_at`, higher priority)", f"{loaded:.2f} s",
                 f"none waiting {empty:.2f} s", f"{ratio:.2f}x", "within 10%",
                 ratio <= 1.10)

    def build_big(self, jobs):
        """A database of JOBS jobs: half completed with a run each, a tenth dead
        after four failed runs, the rest pending. Jobs are added by `enqueue -`;
        their runs are written with SQL, as years of work would have left them.
        Built once per size, and shared by the figures that only read it."""
        if jobs in self.big:
            return self.big[jobs]
        db = self.big[jobs] = self.db(f"big{jobs}")
        chunk = 200000
        for start in range(0, jobs, chunk):
            self.enqueue_lines(db, ['{"command": "true"}'] * min(chunk, jobs - start))
        if self.postgres:
            self.build_big_postgres(db)
            return db
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE jobs SET state = 'completed', attempts = 1 "
                         "WHERE rowid % 10 < 5")
            conn.execute("UPDATE jobs SET state = 'dead', attempts = 4, "
                         "last_error = 'exit 1' WHERE rowid % 10 = 5")
            conn.execute(
                "INSERT INTO attempts (job_id, number, run_token, worker_pid, "
                "started_at, finished_at, outcome, exit_code, duration_s, stdout, "
                "stderr) SELECT id, 1, lower(hex(randomblob(16))), 1, created_at, "
                "created_at, 'completed', 0, 0.01 * (1 + rowid % 300), 'ok', '' "
                "FROM jobs WHERE state = 'completed'")
            for number in range(1, 5):
                conn.execute(
                    "INSERT INTO attempts (job_id, number, run_token, worker_pid, "
                    "started_at, finished_at, outcome, exit_code, reason, duration_s, "
                    "stdout, stderr) SELECT id, ?, lower(hex(randomblob(16))), 1, "
                    "created_at, created_at, 'failed', 1, 'exit 1', 0.5, '', 'no' "
                    "FROM jobs WHERE state = 'dead'", (number,))
            conn.execute("COMMIT")
        finally:
            conn.close()
        return db

    def build_big_postgres(self, db):
        """build_big's runs, on PostgreSQL. Its triggers, which keep the counts a
        row at a time, are off meanwhile (as a superuser may), and the counts are
        made again from the jobs afterwards."""
        with self.reader(db) as sql:
            sql("SET session_replication_role = replica")
            slot = "(abs(hashtext(id)) % 10)"
            sql(f"UPDATE jobs SET state = 'completed', attempts = 1 WHERE {slot} < 5")
            sql(f"UPDATE jobs SET state = 'dead', attempts = 4, last_error = 'exit 1' "
                f"WHERE {slot} = 5")
            sql("INSERT INTO attempts (job_id, number, run_token, worker_pid, "
                "started_at, finished_at, outcome, exit_code, duration_s, stdout, "
                "stderr) SELECT id, 1, md5(id), 1, created_at, created_at, "
                "'completed', 0, 0.01 * (1 + abs(hashtext(id)) % 300), 'ok', '' "
                "FROM jobs WHERE state = 'completed'")
            for number in range(1, 5):
                sql("INSERT INTO attempts (job_id, number, run_token, worker_pid, "
                    "started_at, finished_at, outcome, exit_code, reason, duration_s, "
                    "stdout, stderr) SELECT id, %s, md5(id || %s), 1, created_at, "
                    "created_at, 'failed', 1, 'exit 1', 0.5, '', 'no' FROM jobs "
                    "WHERE state = 'dead'".replace("%s", "?"), (number, str(number)))
            sql("DELETE FROM counts")
            sql("INSERT INTO counts (state, slot, jobs) SELECT state, 0, count(*) "
                "FROM jobs GROUP BY state")
            sql("INSERT INTO run_totals (outcome, bucket, slot, runs, seconds) SELECT "
                "outcome, 0, 0, count(*), sum(duration_s) FROM attempts GROUP BY outcome")
        with self.reader(db) as sql:         # the planner's statistics, as autovacuum
            sql("ANALYZE")                   # would have them by now

    def bench_big(self, jobs, runs=5):
        print(f"status, list, stats on {jobs:,} jobs ...", flush=True)
        small, big = self.build_big(1000), self.build_big(jobs)
        commands = [("status",), ("list", "--limit", "20"), ("stats",)]
        for argv in commands:
            def median(db):
                return statistics.median(self.timed(
                    [PY, self.queuectl, "--db", db, *argv], stdout=subprocess.DEVNULL)
                    for _ in range(runs))
            base = self.best(lambda: median(small))
            ours = self.best(lambda: median(big))
            self.add(f"`{' '.join(argv)}` on {jobs:,} jobs (half completed, with "
                     f"history)", f"{ours * 1000:.0f} ms",
                     f"1,000 jobs {base * 1000:.0f} ms", f"{ours / base:.2f}x",
                     "<= 2x", ours / base <= 2)

    def dashboard_times(self, db, paths, runs):
        """{path: median seconds of a GET} from a `queuectl dashboard` on DB."""
        proc = subprocess.Popen([PY, self.queuectl, "--db", db, "dashboard", "--port",
                                 "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            printed = re.search(r"(http://\S+/)(?:\?token=(\S+))?",
                                proc.stdout.readline().decode())    # its own token
            url, token = printed.group(1), urllib.parse.unquote(printed.group(2) or "")
            times = {}
            for path in paths:
                def get():
                    started = time.perf_counter()
                    request = urllib.request.Request(url + path.lstrip("/"), headers={
                        "Authorization": "Bearer " + token} if token else {})
                    with urllib.request.urlopen(request) as response:
                        response.read()
                    return time.perf_counter() - started
                get()                                   # warm the page cache
                times[path] = statistics.median(get() for _ in range(runs))
            return times
        finally:
            proc.terminate()
            proc.wait()

    def bench_dashboard(self, jobs, runs=9):
        print(f"dashboard API on {jobs:,} jobs ...", flush=True)
        small, big = self.build_big(1000), self.build_big(jobs)
        paths = ["/api/overview", "/metrics", "/api/jobs", "/api/jobs?state=dead",
                 "/api/jobs?before={old}", "/api/dlq", "/api/jobs?q=no-such-text"]

        def timed(db, path):
            path = path.format(old=self.oldest_cursor(db, 100))
            return self.best(lambda: self.dashboard_times(db, [path], runs)[path])
        for path in paths:
            base, ours = timed(small, path), timed(big, path)
            ratio = ours / base
            bounded = "q=" in path
            shown = path.format(old="(the 100th oldest job)")
            self.add(f"dashboard `GET {shown}` on {jobs:,} jobs", f"{ours * 1000:.1f} ms",
                     f"1,000 jobs {base * 1000:.1f} ms", f"{ratio:.2f}x",
                     "< 100 ms (it scans at most 100,000 jobs)" if bounded else "<= 2x",
                     ours < 0.1 if bounded else ratio <= 2)

    def oldest_cursor(self, db, nth):
        """The page cursor (X-Next-Before) of a page that ended at the NTH oldest job."""
        conn = sqlite3.connect(db)
        try:
            return "r%d" % conn.execute("SELECT rowid FROM jobs ORDER BY rowid LIMIT 1 "
                                        "OFFSET ?", (nth,)).fetchone()[0]
        finally:
            conn.close()

    # -- report ---------------------------------------------------------------------------

    def table(self):
        head = ("figure", "queuectl", "baseline, same run", "ratio", "target", "met")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def machine():
    model = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return (f"{os.cpu_count()} CPUs ({model}), Linux {os.uname().release}, "
            f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and one round (about a minute)")
    parser.add_argument("--rounds", type=int, help="rounds per figure (3; quick: 1)")
    parser.add_argument("--queuectl", default=os.path.join(ROOT, "queuectl.py"),
                        help="the queuectl.py to measure")
    parser.add_argument("--only", help="comma-separated: run1k,run10k,one,batch,"
                                       "pickup,idle,waiting,big,dashboard")
    parser.add_argument("--db", metavar="postgresql://...",
                        help="measure the PostgreSQL store, on this server")
    args = parser.parse_args()
    quick = args.quick
    only = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="queuectl-bench-") as folder:
        bench = Bench(args, folder)
        print(f"queuectl at {bench.queuectl}\n{machine()}", flush=True)
        steps = [
            ("run1k", lambda: bench.bench_throughput(1000, 2, 1.5, 1.2)),
            ("run10k", lambda: bench.bench_throughput(2000 if quick else 10000, 4, 1.5)),
            ("one", lambda: bench.bench_enqueue_one(8 if quick else 15)),
            ("batch", lambda: bench.bench_enqueue_batch(20000 if quick else 100000)),
            ("pickup", lambda: bench.bench_pickup(12 if quick else 40)),
            ("idle", lambda: bench.bench_idle(5 if quick else 30)),
            ("waiting", lambda: bench.bench_waiting(20000 if quick else 100000, 1000)),
            ("big", lambda: bench.bench_big(100000 if quick else 1000000)),
            ("dashboard", lambda: bench.bench_dashboard(100000 if quick else 1000000)),
        ]
        if args.db:
            steps = [step for step in steps if step[0] != "dashboard"]
        try:
            for name, step in steps:
                if only is None or name in only:
                    step()
        finally:
            bench.close()
        print()
        print(machine())
        print(f"python3 tests/bench.py{' --quick' if quick else ''}"
              f"{' --db postgresql://...' if args.db else ''}, best of "
              f"{bench.rounds} round(s)\n")
        print(bench.table())
        for note in bench.notes:
            print(f"\n{note}")


if __name__ == "__main__":
    main()
