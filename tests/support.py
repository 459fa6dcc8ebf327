"""Shared test helpers: temp databases, in-process and subprocess CLI runs, waits.

Tests are grouped by feature: one module per area (test_enqueue, test_workers,
test_recovery, ...), one class per verb or mechanism. Every test on a database
derives from QueueTestCase (the command line, real workers, and a sweep of what
a test leaves running) or StoreTestCase (the Store used directly).

Every behavioural test runs on both stores. A test module ends with
`add_postgres_variants(globals())`, which adds, for each database test class, a
copy named "Postgres..." that runs the same tests on a PostgreSQL database (a
schema of its own on a real server; see pg_server). The classes about SQLite's
own file (its pragmas, WAL, file modes, migrations, foreign or broken files,
tmpfs and ext4 disks) have names that start with "SQLite" and get no copy. So
tests read the database behind queuectl's back only through the helpers here
(QueueTestCase.rows and .sql, StoreTestCase.raw and .dump), which speak to
either, and name this host's files of the queue (PID file, log, spools) by
self.local, not self.db.
"""

import atexit
import contextlib
import functools
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUEUECTL = os.path.join(ROOT, "queuectl.py")
sys.path.insert(0, ROOT)

import queuectl  # noqa: E402

T0 = datetime(2026, 11, 24, 10, 0, 0, tzinfo=timezone.utc)   # the Store tests' clock
OK = queuectl.RunResult(exit_code=0, duration_s=0.1, stdout="out\n", stderr="err\n")


def failed(**kw):
    """A failed run (exit 1) for QueueTestCase.finish_next."""
    return queuectl.RunResult(exit_code=1, reason="exit 1", **kw)


def _restore_env(name, value):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def wait_until(predicate, timeout, what):
    """Poll PREDICATE until it returns a true value; fail naming WHAT after TIMEOUT s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def claim_one(store, pid, start=None, now=None):
    """Claim the best runnable job for PID with Store.claim: a Claim, or None."""
    claims, _ = store.claim([(pid, start)], now=now)
    return claims[0] if claims else None


def short_leases(test):
    """Run TEST with lease_timeout and backoff_base at 1 s, the shortest: a lost
    claim is recovered, and a failed run retried, within about a second."""
    @functools.wraps(test)
    def with_short_leases(self, *args, **kwargs):
        self.ok("config", "set", "lease_timeout", "1")
        self.ok("config", "set", "backoff_base", "1")
        return test(self, *args, **kwargs)
    return with_short_leases


def lines(path):
    """The lines of a file, or [] if it does not exist yet."""
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def proc_fields(pid):
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def pid_alive(pid):
    """True if PID exists and is not a zombie."""
    fields = proc_fields(pid)
    return bool(fields) and fields[0] != "Z"


def group_members(pgid):
    """Live (non-zombie) processes in process group PGID."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_fields(entry)
            if fields and fields[0] != "Z" and int(fields[2]) == pgid:
                found.append(int(entry))
    return found


def processes_with_env(marker):
    """Live processes (not this one) whose environment holds the entry MARKER (bytes)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0") and pid_alive(int(entry)):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def cmdline(pid):
    """The command line of PID as one string ('' if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


# -- a PostgreSQL server for the Postgres... test classes ------------------------------

PG_ENV = "QUEUECTL_TEST_PG"   # a postgresql:// URL the tests may make schemas in
_PG_SERVER = {}               # "url" or "skip": what pg_server() found, once


def pg_server():
    """The URL of a PostgreSQL server for the tests, or unittest.SkipTest saying
    why there is none. $QUEUECTL_TEST_PG names one (.ci/run starts one and sets
    it), or is "off" to run the SQLite tests alone; else the tests start a private one of Debian's postgresql package, in a
    temp directory with its own socket directory and port, stopped at exit."""
    if not _PG_SERVER:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            _PG_SERVER["skip"] = ('psycopg 3 is not installed (pip install '
                                  '"psycopg[binary]")')
            return pg_server()
        url = os.environ.get(PG_ENV)
        if url == "off":
            _PG_SERVER["skip"] = f"{PG_ENV}=off"
        elif url:
            _PG_SERVER["url"] = url
        else:
            try:
                _PG_SERVER["url"] = _start_pg_server()
            except (OSError, subprocess.SubprocessError, RuntimeError) as e:
                _PG_SERVER["skip"] = f"no PostgreSQL server: {e}"
    if "skip" in _PG_SERVER:
        if os.environ.get("QUEUECTL_TEST_PG_REQUIRED") == "1":    # .ci/run
            raise AssertionError(f"the PostgreSQL tests cannot run: "
                                 f"{_PG_SERVER['skip']}")
        raise unittest.SkipTest(_PG_SERVER["skip"])
    return _PG_SERVER["url"]


def _start_pg_server():
    """Start a throw-away PostgreSQL cluster for the whole run; its URL."""
    return PgServer().url


class PgServer:
    """A throw-away PostgreSQL cluster of Debian's postgresql package, in a temp
    directory with a private socket directory and port, stopped at exit (or by
    stop()). As root it runs as the postgres user, which PostgreSQL requires.
    Raises RuntimeError, OSError or SubprocessError if it cannot start one."""

    def __init__(self):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True,
                                text=True, check=True).stdout.strip()
        if not os.path.exists(os.path.join(bindir, "initdb")):
            raise RuntimeError(f"no initdb in {bindir} (apt-get install postgresql)")
        self.bindir = bindir
        self.top = tempfile.mkdtemp(prefix="queuectl-pg-")
        atexit.register(shutil.rmtree, self.top, True)
        self.as_user = []
        if os.getuid() == 0:
            import pwd
            account = pwd.getpwnam("postgres")
            os.chown(self.top, account.pw_uid, account.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data = os.path.join(self.top, "data")
        sock = os.path.join(self.top, "sock")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        subprocess.run(self.as_user + ["mkdir", "-m", "700", sock], check=True)
        subprocess.run(self.as_user + [os.path.join(bindir, "initdb"), "-D", self.data,
                                       "-A", "trust", "-U", "postgres", "--no-sync",
                                       "-E", "UTF8"], check=True, capture_output=True)
        self.options = (f"-p {port} -k {sock} -c listen_addresses='' -c fsync=off "
                        f"-c max_connections=300 -c shared_buffers=64MB")
        self.url = f"postgresql://postgres@/postgres?host={sock}&port={port}"
        self.pg_ctl("start", "-w", "-o", self.options, "-l",
                    os.path.join(self.top, "log"))
        atexit.register(self.stop)

    def pg_ctl(self, *argv):
        subprocess.run(self.as_user + [os.path.join(self.bindir, "pg_ctl"), "-D",
                                       self.data, *argv], check=True,
                       capture_output=True, timeout=60)

    def start(self):
        """Start it again after stop()."""
        self.pg_ctl("start", "-w", "-o", self.options, "-l",
                    os.path.join(self.top, "log"))

    def restart(self):
        """Restart it at once, dropping every connection (as a failover does)."""
        self.pg_ctl("restart", "-m", "immediate", "-w", "-o", self.options, "-l",
                    os.path.join(self.top, "log"))

    def stop(self):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.pg_ctl("stop", "-m", "immediate")


def pg_schema_url(base, schema):
    """BASE (a postgresql:// URL) with its tables in SCHEMA."""
    return base + ("&" if "?" in base else "?") + f"schema={schema}"


def pg_connect(url):
    """A psycopg connection (autocommit) to URL's database, its search path the
    URL's schema: the test's own look behind queuectl's back."""
    import psycopg
    conninfo, schema, _ = queuectl.pg_url(url)
    conn = psycopg.connect(conninfo, autocommit=True)
    conn.execute(f"SET search_path TO {schema}")
    return conn


def pg_sql(url, query, params=()):
    """Run one statement, written as for sqlite3 (? parameters), on URL; its rows."""
    with contextlib.closing(pg_connect(url)) as conn:
        cursor = conn.execute(query.replace("%", "%%").replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description else []


def drop_pg_schema(url):
    """Cleanup: drop a test's schema, after ending what is still connected to it."""
    with contextlib.closing(pg_connect(url)) as conn:
        schema = queuectl.pg_url(url)[1]
        conn.execute("DROP SCHEMA IF EXISTS " + schema + " CASCADE")


def another_db(test, name):
    """A second database of TEST's store, not made yet: the file NAME in its temp
    directory, or a schema of its own on its PostgreSQL server (dropped at cleanup)."""
    if not test.postgres:
        return test.path(name)
    url = pg_schema_url(pg_server(), "t" + os.urandom(6).hex())
    test.addCleanup(drop_pg_schema, url)
    return url


def db_exists(db):
    """Whether the database DB (a path or a postgresql:// URL) has been created."""
    if queuectl.is_postgres(db):
        return queuectl.PostgresStore.exists(db)
    return os.path.exists(db)


def created_note(db):
    """The line a command that creates the database DB writes on stderr."""
    where = queuectl.pg_url(db)[2] if queuectl.is_postgres(db) else os.path.realpath(db)
    return f"queuectl: created a new database at {where}\n"


def add_postgres_variants(namespace):
    """Add to a test module's NAMESPACE, for each database test class whose name
    does not start with "SQLite", a copy named "Postgres..." that runs its tests
    on PostgreSQL. Run one store's tests alone with -k Postgres, or -k SQLite...
    """
    for name, cls in list(namespace.items()):
        if isinstance(cls, type) and issubclass(cls, DatabaseTestCase) and \
                cls.__module__ == namespace["__name__"] and \
                not name.startswith(("SQLite", "Postgres")) and cls.on_postgres and \
                any(attr.startswith("test") for attr in dir(cls)):
            copy = type("Postgres" + name, (cls,), {
                "store_kind": "postgres", "__module__": cls.__module__,
                "__qualname__": "Postgres" + name,
                "__doc__": (cls.__doc__ or "").strip() + " (PostgreSQL)"})
            namespace[copy.__name__] = copy


class DatabaseTestCase(unittest.TestCase):
    """A temp directory and a database in it, removed at cleanup: a SQLite file's
    path, or (store_kind "postgres") a postgresql:// URL with a schema of its own.
    self.local is where this host's files of the queue start (Store.local)."""

    store_kind = "sqlite"
    on_postgres = True       # False: a test of the SQLite store only (no copy)

    @property
    def postgres(self):
        return self.store_kind == "postgres"

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        if self.postgres:
            self.db = pg_schema_url(pg_server(), "t" + os.urandom(6).hex())
            self.addCleanup(drop_pg_schema, self.db)
            # This host's files of the queue (PID file, log, spools, token) go in
            # the user's state directory: here, in the test's own.
            state = os.path.join(self.dir, "state")
            old = os.environ.get("XDG_STATE_HOME")
            os.environ["XDG_STATE_HOME"] = state
            self.addCleanup(_restore_env, "XDG_STATE_HOME", old)
        else:
            self.db = os.path.join(self.dir, "queue.db")
        self.local = queuectl.local_base(self.db)
        self.env = dict(os.environ, QUEUECTL_DB=self.db)
        self.env.pop("XDG_DATA_HOME", None)

    @property
    def pid_file(self):
        """This host's PID file of the queue (its folder made, for a test that
        writes one before any supervisor has)."""
        os.makedirs(os.path.dirname(self.local), mode=0o700, exist_ok=True)
        return self.local + ".pid"

    def db_exists(self):
        """Whether the test's database has been created."""
        if self.postgres:
            return queuectl.PostgresStore.exists(self.db)
        return os.path.exists(self.db)

    def path(self, name):
        """A path in this test's temp directory."""
        return os.path.join(self.dir, name)

    def read(self, name):
        """The text of a file in the temp directory ('' if it does not exist yet)."""
        try:
            with open(self.path(name)) as f:
                return f.read()
        except FileNotFoundError:
            return ""


class QueueTestCase(DatabaseTestCase):
    """A temp database and the ways to run queuectl against it: in-process, as a
    process, with real workers. Every process a test leaves running on its
    database (supervisor, worker, job command) is killed at cleanup."""

    def setUp(self):
        super().setUp()
        # Registered before any supervisor, so it runs after their cleanups: it
        # catches job commands, which live in their own sessions.
        self.addCleanup(self.kill_leftovers)

    # -- in-process -------------------------------------------------------------

    def cli(self, *argv, stdin=None):
        """Run queuectl.main in-process; return (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        old_stdin = sys.stdin
        if stdin is not None:
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8")),
                                         encoding="utf-8")
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = queuectl.main(["--db", self.db, *argv])
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.stdin = old_stdin
        return code, out.getvalue(), err.getvalue()

    def main_raw(self, *argv):
        """Run queuectl.main with exactly ARGV (no --db added); return (code, out, err)."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = queuectl.main(list(argv))
            except SystemExit as e:
                code = e.code
        return code, out.getvalue(), err.getvalue()

    def created_note(self, path=None):
        """The line a command that creates the database writes on stderr."""
        if self.postgres and path is None:
            where = queuectl.pg_url(self.db)[2]
        else:
            where = os.path.realpath(path or self.db)
        return f"queuectl: created a new database at {where}\n"

    def ok(self, *argv, stdin=None):
        """Run in-process, assert success with a clean stderr, return stdout. A
        command that created the database must have said so, and only that."""
        existed = self.db_exists()
        code, out, err = self.cli(*argv, stdin=stdin)
        if not existed and err.startswith(self.created_note()) and self.db_exists():
            self.assertTrue(err.startswith(self.created_note()), err)
            err = err[len(self.created_note()):]
        self.assertEqual((code, err), (0, ""), f"queuectl {' '.join(argv)}")
        return out

    def json_out(self, *argv):
        """Run, assert success, and parse the whole of stdout as one JSON document."""
        return json.loads(self.ok(*argv))

    def enqueue(self, **job):
        return self.ok("enqueue", json.dumps(job)).strip()

    def enqueue_started(self, command, **fields):
        """Enqueue COMMAND and wait until it has started, not only been claimed
        (a claim not yet started is given back by a stop); its job's id."""
        started = self.path(f"started-{time.monotonic_ns()}")
        job_id = self.enqueue(command=f"touch {shlex.quote(started)}; {command}",
                              **fields)
        wait_until(lambda: os.path.exists(started), 10, f"job {job_id} to start")
        return job_id

    def job(self, job_id):
        return json.loads(self.ok("show", job_id, "--json"))

    def state(self, job_id):
        return self.job(job_id)["state"]

    def wait_state(self, job_id, states, timeout=20):
        states = (states,) if isinstance(states, str) else states
        try:
            return wait_until(lambda: self.state(job_id) in states and self.job(job_id),
                              timeout, f"job {job_id} to be {'/'.join(states)}")
        except AssertionError as e:         # say where it stands instead
            job = self.job(job_id)
            raise AssertionError(f"{e}; it is {job['state']}, after "
                                 f"{[(h['outcome'], h['reason']) for h in job['history']]}"
                                 ) from None

    def jobs(self, state=None):
        argv = ["list", "--json"] + (["--state", state] if state else [])
        return json.loads(self.ok(*argv))

    def count(self, state):
        return len(self.jobs(state))

    def processing(self):
        """{job id: worker pid} of the jobs being processed."""
        return {j["id"]: j["worker_pid"] for j in json.loads(
            self.ok("list", "--state", "processing", "--json"))}

    def history(self, job_id):
        return self.job(job_id)["history"]

    # -- a Store playing the worker, in-process ------------------------------------

    def store(self):
        """A real Store on the test database, closed at cleanup."""
        store = queuectl.open_store(self.db)
        self.addCleanup(store.close)
        store.make()
        return store

    def run_next(self, ok=True, duration_s=0.5, pid=4321):
        """Claim the best runnable job and finish it; return (job id, new state)."""
        store = self.store()
        claim = claim_one(store, pid)
        self.assertIsNotNone(claim, "nothing to claim")
        result = queuectl.RunResult(exit_code=0 if ok else 1,
                                    reason=None if ok else "exit 1",
                                    stdout="out\n", duration_s=duration_s)
        state = store.finish(claim.id, claim.token, result)
        store.close()
        return claim.id, state

    def finish_next(self, result=OK, now=None):
        """Claim the best runnable job and end its run with RESULT; its id."""
        store = self.store()
        claim = claim_one(store, 4321, now=now)
        self.assertIsNotNone(claim, "nothing to claim")
        store.finish(claim.id, claim.token, result, now=now)
        store.close()
        return claim.id

    def make_dead(self, job_id):
        self.enqueue(id=job_id, command="false", max_retries=0, priority=100)
        self.assertEqual(self.run_next(ok=False), (job_id, "dead"))

    def make_completed(self, job_id):
        self.enqueue(id=job_id, command="true", priority=100)
        self.assertEqual(self.run_next(ok=True), (job_id, "completed"))

    def claimable(self):
        """The ids of the jobs a worker could claim now (none is left claimed)."""
        store = self.store()
        claims, _ = store.claim([(1, None)] * 10)
        for claim in claims:
            store.give_back(claim.id, claim.token)
        store.close()
        return sorted(claim.id for claim in claims)

    def make_due(self, job_id=None):
        """Make JOB_ID (or every job) runnable now, as if its backoff had passed."""
        if job_id is None:
            self.sql("UPDATE jobs SET run_at = ?", (queuectl.iso(queuectl.now_utc()),))
        else:
            self.sql("UPDATE jobs SET run_at = ? WHERE id = ?",
                     (queuectl.iso(queuectl.now_utc()), job_id))

    # -- the database behind queuectl's back ----------------------------------------

    def sql(self, query, params=()):
        """Run one SQL statement (? parameters) on the test database, committed;
        its rows (tuples)."""
        if self.postgres:
            return [tuple(row) for row in pg_sql(self.db, query, params)]
        conn = sqlite3.connect(self.db)
        try:
            with conn:
                return conn.execute(query, params).fetchall()
        finally:
            conn.close()

    def rows(self):
        """Every row of every table, to prove a command changed nothing."""
        if not self.db_exists():
            return None
        if self.postgres:
            schema = queuectl.pg_url(self.db)[1]
            with contextlib.closing(pg_connect(self.db)) as conn:
                tables = [row[0] for row in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = %s "
                    "ORDER BY tablename", (schema,))]
                return {t: sorted((tuple(row) for row in
                                   conn.execute(f"SELECT * FROM {t}")), key=repr)
                        for t in tables}
        conn = sqlite3.connect(self.db)
        try:
            tables = [row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                    for t in tables}
        finally:
            conn.close()

    def stored_config(self, key):
        """The text stored for config KEY (None if none is)."""
        found = self.sql("SELECT value FROM config WHERE key = ?", (key,))
        return found[0][0] if found else None

    def store_config_raw(self, key, value):
        """Write a config value the way an older version or sqlite3 by hand could."""
        self.sql("DELETE FROM config WHERE key = ?", (key,))
        self.sql("INSERT INTO config (key, value) VALUES (?, ?)", (key, value))

    def freeze(self, pid):
        """SIGSTOP PID at a moment it holds no write lock on the database (on
        PostgreSQL: no transaction open)."""
        for _ in range(50):
            os.kill(pid, signal.SIGSTOP)
            wait_until(lambda: (proc_fields(pid) or ["?"])[0] == "T", 5,
                       f"pid {pid} to stop")
            if self.postgres:
                if not self.sql("SELECT 1 FROM pg_stat_activity WHERE "
                                "application_name LIKE ? AND state <> 'idle'",
                                (f"queuectl pid {pid} %",)):
                    return
                os.kill(pid, signal.SIGCONT)
                continue
            conn = sqlite3.connect(self.db, timeout=2.0, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
                return
            except sqlite3.OperationalError:
                os.kill(pid, signal.SIGCONT)     # caught mid-write: try again
            finally:
                conn.close()
        self.fail(f"pid {pid} always held the database write lock")

    # -- failures -------------------------------------------------------------------

    def assertFailsCleanly(self, code, *argv, stdin=None):
        """Assert the command exits CODE with one stderr line and no change."""
        before = self.rows()
        got, out, err = self.cli(*argv, stdin=stdin)
        self.assertEqual(got, code, f"exit code of {argv}: stderr={err!r}")
        self.assertEqual(out, "")
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertTrue(err.startswith("queuectl"), err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(self.rows(), before, "database changed")
        return err

    def path_snapshot(self, path):
        """The bytes of the file PATH, or the listing of the directory PATH."""
        if os.path.isdir(path):
            return ("dir", sorted(os.listdir(path)))
        if os.path.exists(path):
            with open(path, "rb") as f:
                return ("file", f.read())
        return None

    def tree(self):
        """Every path under the test directory."""
        return sorted(os.path.join(top, name) for top, dirs, files in os.walk(self.dir)
                      for name in dirs + files)

    def assertFailsOnPath(self, code, path, *argv):
        """Like assertFailsCleanly, for a database PATH that is not a usable DB."""
        before = self.path_snapshot(path)
        tree = self.tree()
        got, out, err = self.cli(*argv, "--db", path)
        self.assertEqual(got, code, f"exit code of {argv}: stderr={err!r}")
        self.assertEqual(out, "")
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertTrue(err.startswith("queuectl"), err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(self.path_snapshot(path), before, "database path changed")
        self.assertEqual(self.tree(), tree, "files created or removed")
        return err

    def assertOneErrorLine(self, code, got, out, err):
        """A failed process: exit CODE, no stdout, one 'queuectl...' stderr line."""
        self.assertEqual(got, code, f"stderr={err[:600]!r}")
        self.assertEqual(out, "")
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.splitlines()), 1, err[:600])
        self.assertTrue(err.startswith("queuectl"), err[:600])

    # -- subprocesses -------------------------------------------------------------

    def run_cli(self, *argv, timeout=30, stdin=None, env=None, cwd=None):
        """Run queuectl.py as a real process; return CompletedProcess."""
        return subprocess.run([sys.executable, QUEUECTL, *argv], input=stdin,
                              env=env or self.env, cwd=cwd or self.dir,
                              capture_output=True, text=True, timeout=timeout)

    def run_bounded(self, *argv, stdin=None, timeout=10):
        """Run queuectl.py in its own session; kill the whole session if it is still
        running after TIMEOUT s (a supervisor that should have been refused).
        Return (exit code, or None if it had to be killed; stdout; stderr)."""
        proc = subprocess.Popen([sys.executable, QUEUECTL, *argv], env=self.env,
                                cwd=self.dir, start_new_session=True,
                                stdin=subprocess.DEVNULL if stdin is None
                                else subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=10)
            code = None
        return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def start_workers(self, count=1, extra_env=None):
        """Start a foreground supervisor as a subprocess; stopped at cleanup."""
        env = dict(self.env, **(extra_env or {}))
        log = open(os.path.join(self.dir, f"workers-{time.monotonic_ns()}.log"), "w+")
        self.addCleanup(log.close)
        proc = subprocess.Popen([sys.executable, QUEUECTL, "worker", "start",
                                 "--count", str(count)], env=env, cwd=self.dir,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
        proc.log = log
        self.addCleanup(self.kill_supervisor, proc)
        wait_until(lambda: self.worker_pids(proc.pid, count), 20,
                   f"{count} worker(s) to start")
        return proc

    def worker_pids(self, supervisor_pid=None, count=None):
        """Worker pids listed in the PID file (if it names SUPERVISOR_PID)."""
        running = queuectl.PidFile.holder(self.local + ".pid")
        if not running or (supervisor_pid and running[0] != supervisor_pid):
            return None
        if count is not None and len(running[1]) != count:
            return None
        return running[1]

    def stop_workers(self, proc, *extra, timeout=30, code=0):
        """Run `worker stop` as a process; assert it exits CODE and the supervisor
        exits with 0, or like it with 7 after a cold stop."""
        result = self.run_cli("worker", "stop", *extra, timeout=timeout)
        self.assertEqual(result.returncode, code, result.stderr)
        self.assertEqual(proc.wait(timeout=10), code if code == queuectl.EXIT_INTERRUPTED
                         else 0, self.log_text(proc))
        return result

    def log_text(self, proc):
        proc.log.flush()
        proc.log.seek(0)
        return proc.log.read()

    def assertCleanLog(self, proc):
        text = self.log_text(proc)
        for bad in ("Traceback", "database is locked", "database is busy",
                    "could not renew", "error:"):
            self.assertNotIn(bad, text)

    # -- cleanups -------------------------------------------------------------------

    def leftovers(self):
        """Live processes (workers, supervisors, job commands) of this test's database."""
        marker = f"{queuectl.ENV_DB}={self.db}".encode()
        return [p for p in processes_with_env(marker) if pid_alive(p)]

    def kill_leftovers(self):
        """Cleanup: SIGKILL every process (supervisor, worker, job) of this database."""
        for pid in self.leftovers():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def kill_supervisor(self, proc):
        """Cleanup: stop a supervisor hard if a test left it running."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def kill_stray(self, pid, needle):
        """Cleanup: SIGKILL PID if it still runs a command containing NEEDLE."""
        if pid_alive(pid) and needle in cmdline(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def kill_detached(self):
        """Cleanup: SIGKILL a detached supervisor (its own process group) if it runs."""
        running = queuectl.PidFile.holder(self.local + ".pid")
        if running:
            self.kill_group_cleanup(running[0])

    def kill_group_cleanup(self, pgid):
        """Cleanup: SIGKILL what is left of process group PGID (a detached run)."""
        if group_members(pgid):
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)


class StoreTestCase(DatabaseTestCase):
    """A real Store on the temp database, opened in setUp as self.store."""

    def setUp(self):
        super().setUp()
        self.store = self.open()

    def open(self, path=None, create=True):
        store = queuectl.open_store(path or self.db, create=create)
        self.addCleanup(store.close)
        return store

    def add(self, now=T0, **doc):
        """Enqueue one job created at NOW; return its id."""
        doc.setdefault("command", "true")
        job = queuectl.validate_job(doc, now)
        return self.store.enqueue([job], self.dir, now)[0][0]

    def raw(self, sql, params=()):
        """Run SQL (? parameters) on the store's own connection; its rows."""
        if self.postgres:
            def body(conn):
                cursor = conn.execute(sql, params)
                return cursor.fetchall() if cursor.description else []
            return self.store._write(body)
        return self.store.conn.execute(sql, params).fetchall()

    def get(self, job_id):
        return self.store.get_job(job_id)[0]

    def dump(self):
        """Every row of jobs, attempts and config, to prove nothing changed."""
        return {t: [tuple(r) for r in self.raw(f"SELECT * FROM {t} ORDER BY 1")]
                for t in ("jobs", "attempts", "config")}
