"""Shared test helpers: temp databases, in-process and subprocess CLI runs, waits."""

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUEUECTL = os.path.join(ROOT, "queuectl.py")
sys.path.insert(0, ROOT)

import queuectl  # noqa: E402


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


class QueueTestCase(unittest.TestCase):
    """A temp directory with a database path, and ways to run queuectl against it."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.db = os.path.join(self.dir, "queue.db")
        self.env = dict(os.environ, QUEUECTL_DB=self.db)
        self.env.pop("XDG_DATA_HOME", None)

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

    def created_note(self, path=None):
        """The line a command that creates the database writes on stderr."""
        return (f"queuectl: created a new database at "
                f"{os.path.realpath(path or self.db)}\n")

    def ok(self, *argv, stdin=None):
        """Run in-process, assert success with a clean stderr, return stdout. A
        command that created the database must have said so, and only that."""
        existed = os.path.exists(self.db)
        code, out, err = self.cli(*argv, stdin=stdin)
        if not existed and os.path.exists(self.db):
            self.assertTrue(err.startswith(self.created_note()), err)
            err = err[len(self.created_note()):]
        self.assertEqual((code, err), (0, ""), f"queuectl {' '.join(argv)}")
        return out

    def enqueue(self, **job):
        return self.ok("enqueue", json.dumps(job)).strip()

    def job(self, job_id):
        return json.loads(self.ok("show", job_id, "--json"))

    def rows(self):
        """Every row of every table, to prove a command changed nothing."""
        if not os.path.exists(self.db):
            return None
        conn = sqlite3.connect(self.db)
        try:
            tables = [row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                    for t in tables}
        finally:
            conn.close()

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

    # -- subprocesses -------------------------------------------------------------

    def run_cli(self, *argv, timeout=30, stdin=None, env=None, cwd=None):
        """Run queuectl.py as a real process; return CompletedProcess."""
        return subprocess.run([sys.executable, QUEUECTL, *argv], input=stdin,
                              env=env or self.env, cwd=cwd or self.dir,
                              capture_output=True, text=True, timeout=timeout)

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
        running = queuectl.PidFile.holder(self.db + ".pid")
        if not running or (supervisor_pid and running[0] != supervisor_pid):
            return None
        if count is not None and len(running[1]) != count:
            return None
        return running[1]

    def kill_supervisor(self, proc):
        """Cleanup: stop a supervisor hard if a test left it running."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def log_text(self, proc):
        proc.log.flush()
        proc.log.seek(0)
        return proc.log.read()

    def state(self, job_id):
        return self.job(job_id)["state"]

    def wait_state(self, job_id, states, timeout=20):
        states = (states,) if isinstance(states, str) else states
        return wait_until(lambda: self.state(job_id) in states and self.job(job_id),
                          timeout, f"job {job_id} to be {'/'.join(states)}")
