"""The queue's environment: files that are not a queuectl database, read-only
and full disks (tmpfs and ext4 mounts), and the modes of the files queuectl makes.
The classes named SQLite... are about SQLite's own file on a local disk; the
others are about this host's files of the queue (PID file, log, spools, token),
which a PostgreSQL queue keeps on this host too (under self.local)."""

import contextlib
import hashlib
import json
import os
import shlex
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import unittest

from tests.support import (add_postgres_variants, ROOT, QueueTestCase, lines, queuectl,
                           short_leases, wait_until)

q = shlex.quote


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class EnvironmentTestCase(QueueTestCase):
    """Databases made in odd places, and queuectl's refusals of them."""

    def assertRefused(self, db, argv, contains=None):
        """Run queuectl on DB: exit 1, one 'queuectl: error:' line, nothing on stdout."""
        result = self.run_cli("--db", db, *argv, timeout=20)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertTrue(result.stderr.startswith("queuectl: error: "), result.stderr)
        if contains:
            self.assertIn(contains, result.stderr.lower())
        return result.stderr

    def snapshot(self, path):
        """The bytes of PATH (or listing of a directory) and the files beside it."""
        folder = os.path.dirname(path)
        if os.path.isdir(path):
            content = sorted(os.listdir(path))
        else:
            content = sha256(path)
        return content, sorted(os.listdir(folder))

    def make_queue_db(self, path):
        result = self.run_cli("--db", path, "enqueue", '{"command": "true"}')
        self.assertEqual((result.returncode, result.stderr),
                         (0, self.created_note(path)))
        return result.stdout.strip()


class SQLiteBadFileTest(EnvironmentTestCase):
    """A database path that is not a queuectl database: refused in one line, left as it
    was."""

    @short_leases
    def test_foreign_and_broken_files_are_refused_unchanged(self):
        """Text, corrupt, foreign, newer and directory databases: one line, no change."""
        cases = {}

        def case(name):
            folder = self.path(name)
            os.mkdir(folder)
            cases[name] = os.path.join(folder, "q.db")
            return cases[name]

        with open(case("text"), "w") as f:
            f.write("just some notes\nnot a database\n")
        with open(case("corrupt"), "wb") as f:
            f.write(queuectl.SQLITE_HEADER + os.urandom(8192))
        damaged = case("damaged-pages")
        self.make_queue_db(damaged)
        with open(damaged, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(4096)
            f.write(b"\xab" * (size - 4096))
        conn = sqlite3.connect(case("foreign"))
        conn.execute("CREATE TABLE foo (x)")
        conn.execute("INSERT INTO foo VALUES (1)")
        conn.commit()
        conn.close()
        newer = case("newer-schema")
        self.make_queue_db(newer)
        conn = sqlite3.connect(newer)
        conn.execute("PRAGMA user_version = 99")
        conn.commit()
        conn.close()
        os.mkdir(case("directory"))

        for name, db in cases.items():
            for argv in (["enqueue", '{"command": "true"}'], ["config", "set",
                         "max_retries", "1"], ["worker", "start"], ["status"]):
                with self.subTest(file=name, command=argv[0]):
                    before = self.snapshot(db)
                    self.assertRefused(db, argv)
                    self.assertEqual(self.snapshot(db), before, "the file changed")
                    self.assertFalse(os.path.exists(db + ".pid"))

    def test_database_path_is_directory(self):
        """A directory as the database path fails cleanly, for reads and writes."""
        path = os.path.join(self.dir, "adir")
        os.mkdir(path)
        for argv in (("status",), ("list",), ("enqueue", '{"command": "true"}'),
                     ("config", "set", "max_retries", "1")):
            with self.subTest(argv=argv):
                err = self.assertFailsOnPath(1, path, *argv)
                self.assertIn("directory", err)

    def test_text_file_as_database(self):
        """A text file as the database is refused and left unchanged."""
        path = os.path.join(self.dir, "notes.txt")
        with open(path, "w") as f:
            f.write("shopping list\n")
        for argv in (("status",), ("list", "--json"), ("enqueue", '{"command": "true"}'),
                     ("config", "set", "max_retries", "1"), ("show", "x")):
            with self.subTest(argv=argv):
                err = self.assertFailsOnPath(1, path, *argv)
                self.assertIn("not a queuectl database", err)

    def test_foreign_sqlite_database(self):
        """Another program's SQLite file is refused and left unchanged."""
        path = os.path.join(self.dir, "app.sqlite")
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE jobs (x)")
        conn.commit()
        conn.close()
        for argv in (("status",), ("enqueue", '{"command": "true"}')):
            with self.subTest(argv=argv):
                self.assertFailsOnPath(1, path, *argv)

    def test_non_regular_file_is_refused_and_left_alone(self):
        """--db /dev/null is refused with exit 1 and no /dev/null-journal appears."""
        beside = ["/dev/null" + end for end in ("-journal", "-wal", "-shm", ".pid")]
        for path in beside:
            if os.path.exists(path):
                self.skipTest(f"{path} already exists")
            # If a regression creates it, do not leave it behind.
            self.addCleanup(lambda p=path: os.path.exists(p) and os.unlink(p))
        for argv in (("enqueue", '{"command": "true"}'), ("status",),
                     ("config", "set", "max_retries", "1"), ("worker", "start")):
            with self.subTest(command=argv[0]):
                code, out, err = self.run_bounded("--db", "/dev/null", *argv)
                self.assertEqual([p for p in beside if os.path.exists(p)], [])
                self.assertOneErrorLine(1, code, out, err)
                self.assertIn("not a regular file", err)


class DiskTestCase(EnvironmentTestCase):
    """Read-only and full disks, on tmpfs and ext4 mounts."""

    def move_queue_files(self, folder):
        """Keep this host's files of the queue in FOLDER from now on: on SQLite
        the database with them, on PostgreSQL the user's state directory."""
        if self.postgres:
            state = os.path.join(folder, "state")
            os.environ["XDG_STATE_HOME"] = state      # restored at cleanup
            self.env = dict(self.env, XDG_STATE_HOME=state)
        else:
            self.db = os.path.join(folder, "q.db")
            self.env = dict(self.env, QUEUECTL_DB=self.db)
        self.local = queuectl.local_base(self.db)
        self.assertTrue(self.local.startswith(folder + os.sep), self.local)

    def files(self, folder):
        """{path: sha256} of every file under FOLDER."""
        return {os.path.join(top, name): sha256(os.path.join(top, name))
                for top, _, names in os.walk(folder) for name in names}

    def mount_tmpfs(self, size):
        """Mount a fresh tmpfs of SIZE in the temp dir (unmounted at cleanup)."""
        if os.geteuid() != 0:
            self.skipTest("mounting a tmpfs needs root")
        folder = self.path(f"mnt-{time.monotonic_ns()}")
        os.mkdir(folder)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
                                 "tmpfs", folder], capture_output=True, text=True,
                                timeout=10)
        if result.returncode:
            self.skipTest(f"cannot mount a tmpfs: {result.stderr.strip()}")
        self.addCleanup(self.unmount, folder)
        return folder

    def mount_ext4(self, size_mb=16):
        """Mount a fresh ext4 file system of SIZE_MB (a loop device, errors=
        remount-ro, as root file systems are); return (folder, device)."""
        if os.geteuid() != 0:
            self.skipTest("mounting a loop device needs root")
        image, folder = self.path("disk.img"), self.path(f"ext4-{time.monotonic_ns()}")
        os.mkdir(folder)
        with open(image, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        steps = [["mkfs.ext4", "-q", image], ["losetup", "-f", "--show", image]]
        results = [subprocess.run(step, capture_output=True, text=True, timeout=30)
                   for step in steps]
        if any(r.returncode for r in results):
            self.skipTest(f"no loop device: {results[-1].stderr.strip()}")
        device = results[-1].stdout.strip()
        self.addCleanup(subprocess.run, ["losetup", "-d", device], timeout=10)
        subprocess.run(["blockdev", "--setrw", device], timeout=10)
        mounted = subprocess.run(["mount", "-o", "errors=remount-ro", device, folder],
                                 capture_output=True, text=True, timeout=10)
        if mounted.returncode:
            self.skipTest(f"cannot mount ext4: {mounted.stderr.strip()}")
        self.addCleanup(self.unmount, folder)
        return folder, device

    def fail_disk(self, device):
        """Make the ext4 file system on DEVICE fail as a failing disk does: the
        kernel turns it read-only at once, open files and all."""
        trigger = f"/sys/fs/ext4/{os.path.basename(device)}/trigger_fs_error"
        if not os.path.exists(trigger):
            self.skipTest("this kernel cannot fail an ext4 file system on demand")
        with open(trigger, "w") as f:
            f.write("queuectl test\n")

    def unmount(self, folder):
        result = subprocess.run(["umount", folder], capture_output=True, timeout=10)
        if result.returncode:
            subprocess.run(["umount", "-l", folder], capture_output=True, timeout=10)

    def supervise(self, env, count):
        """Start a foreground supervisor on ENV's database; (process, its log)."""
        log = open(self.path(f"supervisor-{time.monotonic_ns()}.log"), "w+")
        self.addCleanup(log.close)
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "queuectl.py"),
                                 "worker", "start", "--count", str(count)], env=env,
                                cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)
        self.addCleanup(self.end_supervisor, proc)
        return proc, log

    def end_supervisor(self, proc):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def fill(self, folder):
        """Fill the file system of FOLDER to the last byte."""
        fd = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for size in (65536, 4096, 1):
                with contextlib.suppress(OSError):
                    while os.write(fd, b"\0" * size):
                        pass
        finally:
            os.close(fd)



class SQLiteDiskTest(DiskTestCase):
    """SQLite's file on read-only and full disks: honest one-line errors, no
    acknowledged job lost."""

    @short_leases
    def test_a_disk_turned_read_only_mid_run_is_reported_honestly(self):
        """The disk turns read-only while two jobs run: the supervisor logs each OS
        error as one line and stops with 1; worker stop says their results were
        not recorded and exits 1; with the disk back, they run again."""
        folder, device = self.mount_ext4()
        db = os.path.join(folder, "q.db")
        env = dict(self.env, QUEUECTL_DB=db)
        marks = self.path("ran")
        lines_in = "".join(json.dumps({"command": f"echo x >> {q(marks)}; sleep 1"}) +
                           "\n" for _ in range(2))
        # Short leases and backoff on this database, as @short_leases gave self.db:
        # the claims the failing disk strands are recovered within a second.
        for key in ("lease_timeout", "backoff_base"):
            self.run_cli("config", "set", key, "1", env=env)
        ids = self.run_cli("enqueue", "-", stdin=lines_in, env=env).stdout.split()
        self.assertEqual(len(ids), 2)
        sup, log = self.supervise(env, 2)
        wait_until(lambda: len(lines(marks)) == 2, 20, "both jobs to start")
        self.fail_disk(device)
        stop = self.run_cli("worker", "stop", env=env, timeout=60)
        self.assertEqual(stop.returncode, 1, stop.stderr)
        self.assertNotIn("Traceback", stop.stderr)
        self.assertNotIn("finished", stop.stdout)
        self.assertEqual(len(stop.stderr.splitlines()), 2, stop.stderr)   # asked; error
        self.assertTrue(stop.stderr.splitlines()[-1].startswith("queuectl: error: "))
        self.assertEqual(sup.wait(timeout=20), 1)
        log.seek(0)
        text = log.read()
        self.assertNotIn("Traceback", text)
        for line in text.splitlines():
            self.assertRegex(line, r"^\d{4}-\d\d-\d\dT[\d:.]+Z \S", text)
        self.assertIn("could not record what became of 2 running job(s)", text)
        self.assertIn("database is read-only (its file system is)", text)
        self.assertLessEqual(text.count("could not write what workers reported"), 1, text)
        # The disk back (mounted again): the jobs are recovered and run again.
        self.unmount(folder)
        subprocess.run(["mount", device, folder], check=True, timeout=10)
        self.supervise(env, 1)
        for job_id in ids:
            wait_until(lambda: json.loads(self.run_cli(
                "show", job_id, "--json", env=env).stdout)["state"] == "completed",
                30, f"job {job_id} to run again")
        self.assertEqual(len(lines(marks)), 4)

    @short_leases
    def test_reads_on_a_completely_full_disk_say_it_is_full(self):
        """On a disk with not a byte left, status and list say the disk is full,
        in one line, not "disk I/O error"."""
        folder = self.mount_tmpfs("256k")
        db = os.path.join(folder, "q.db")
        self.make_queue_db(db)
        self.fill(folder)
        for argv in (["status"], ["list"], ["enqueue", '{"command": "true"}']):
            with self.subTest(command=argv[0]):
                error = self.assertRefused(db, argv)
                self.assertIn("the disk is full", error)

    @short_leases
    def test_full_disk_fails_in_one_line_and_keeps_acknowledged_jobs(self):
        """A full disk: enqueue fails in one line saying full; acknowledged jobs stay."""
        folder = self.mount_tmpfs("256k")
        db = os.path.join(folder, "q.db")
        acknowledged = {}
        for n in range(200):
            command = f"echo {n} " + "x" * 20000
            result = self.run_cli("--db", db, "enqueue", json.dumps({"command": command}),
                                  timeout=20)
            if result.returncode:
                break
            self.assertEqual(result.stderr, self.created_note(db) if n == 0 else "")
            acknowledged[result.stdout.strip()] = command
        else:
            self.fail("the 256k filesystem never filled up")
        self.assertTrue(acknowledged, "the first enqueue already failed")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertTrue(result.stderr.startswith("queuectl: error: "), result.stderr)
        self.assertIn("full", result.stderr)
        # Still full: a small job is refused the same way, and nothing is lost.
        self.assertRefused(db, ["enqueue", '{"command": "true"}'], contains="full")
        listed = self.run_cli("--db", db, "list", "--json", timeout=20)
        self.assertEqual((listed.returncode, listed.stderr), (0, ""))
        jobs = json.loads(listed.stdout)
        self.assertEqual({j["id"]: j["command"] for j in jobs}, acknowledged)
        self.assertEqual({j["state"] for j in jobs}, {"pending"})


class LocalFilesDiskTest(DiskTestCase):
    """This host's files of the queue on a read-only disk: what must write there
    refuses in one line, changing nothing. (On SQLite the database is there too.)"""

    def test_read_only_filesystem_gives_one_clear_line(self):
        """A read-only file system: enqueue (on SQLite, whose database is there
        too), worker start, foreground or detached, and the dashboard, which
        keeps its token there, each say read-only in one line and change
        nothing; status answers, or (SQLite) says why not in one line; on
        PostgreSQL the queue, elsewhere, still takes jobs."""
        folder = self.mount_tmpfs("1m")
        self.move_queue_files(folder)
        job_id = self.enqueue(command="true")
        queuectl.make_local_folder(self.local)     # as any earlier worker start had
        subprocess.run(["mount", "-o", "remount,ro", folder], check=True, timeout=10)
        before, rows = self.files(folder), self.rows() if self.postgres else None
        if not self.postgres:
            self.assertRefused(self.db, ["enqueue", '{"command": "true"}'],
                               contains="read-only")
        status = self.run_cli("status", timeout=20)
        self.assertNotIn("Traceback", status.stderr)
        if status.returncode == 0 or self.postgres:
            self.assertEqual((status.returncode, status.stderr), (0, ""))
            self.assertIn("pending 1", status.stdout)
        else:
            self.assertEqual(status.returncode, 1)
            self.assertEqual(len(status.stderr.splitlines()), 1, status.stderr)
            self.assertTrue(status.stderr.startswith("queuectl: error: "))
        for argv in (["worker", "start"], ["worker", "start", "--detach"],
                     ["dashboard", "--port", "0"]):
            with self.subTest(command=" ".join(argv)):
                code, out, err = self.run_bounded(*argv, timeout=20)
                self.assertOneErrorLine(1, code, out, err)
                self.assertIn("read-only", err.lower())
                self.assertIn(self.local, err)            # the file it could not write
        self.assertEqual(self.files(folder), before)
        if self.postgres:
            self.assertEqual(self.rows(), rows)
            self.ok("enqueue", '{"command": "true"}')
        self.assertTrue(job_id)


class PostgresHostDiskTest(DiskTestCase):
    """A PostgreSQL queue whose host's files (PID file, spools, token) are on a disk
    that fills up or fails: the queue is elsewhere, so no run is spoiled."""

    store_kind = "postgres"

    def test_a_full_disk_spoils_no_run_and_the_dashboard_says_full(self):
        """With this host's disk full, jobs are still taken, listed and run with
        their output whole; status answers; the dashboard, which cannot keep its
        token, says so in one line."""
        folder = self.mount_tmpfs("256k")
        self.move_queue_files(folder)
        self.store()
        sup = self.start_workers(1)                 # its PID file is written
        self.fill(folder)
        job_id = self.enqueue(command="echo one; sleep 0.3; echo two")
        job = self.wait_state(job_id, "completed")
        self.assertEqual(job["attempts"], 1)
        self.assertEqual(self.json_out("logs", job_id, "--json")["stdout"], "one\ntwo\n")
        self.assertIn("completed 1", self.ok("status"))
        self.assertEqual(len(self.jobs()), 1)
        code, out, err = self.run_bounded("dashboard", "--port", "0")
        self.assertOneErrorLine(1, code, out, err)
        self.assertIn("the disk is full", err)
        self.assertIn(self.local + ".token", err)
        self.stop_workers(sup)
        self.assertCleanLog(sup)

    def test_a_disk_turned_read_only_mid_run_spoils_no_run(self):
        """This host's disk turns read-only while two jobs run: the database is
        elsewhere, so both runs finish and are recorded; the supervisor logs each
        OS error as one line and stops with 0; worker stop says they finished.
        With the disk back, workers start again."""
        folder, device = self.mount_ext4()
        self.move_queue_files(folder)
        marks = self.path("ran")
        # Runs long enough to be running still when worker stop comes.
        lines_in = "".join(json.dumps({"command": f"echo x >> {q(marks)}; sleep 4"}) +
                           "\n" for _ in range(2))
        ids = self.ok("enqueue", "-", stdin=lines_in).split()
        self.assertEqual(len(ids), 2)
        sup, log = self.supervise(self.env, 2)
        wait_until(lambda: len(lines(marks)) == 2, 20, "both jobs to start")
        self.fail_disk(device)
        stop = self.run_cli("worker", "stop", timeout=60)
        self.assertEqual(stop.returncode, 0, stop.stderr)
        self.assertNotIn("Traceback", stop.stderr)
        self.assertIn("2 running job(s) finished", stop.stdout)
        self.assertEqual(sup.wait(timeout=20), 0)
        log.seek(0)
        text = log.read()
        self.assertNotIn("Traceback", text)
        for line in text.splitlines():
            self.assertRegex(line, r"^\d{4}-\d\d-\d\dT[\d:.]+Z \S", text)
        self.assertIn("Read-only file system", text)
        self.assertEqual(text.count(" completed in "), 2, text)
        self.assertTrue(text.endswith(" supervisor: stopped\n"), text)
        for job_id in ids:
            self.assertEqual(self.job(job_id)["state"], "completed")
            self.assertEqual(self.job(job_id)["attempts"], 1)
        # The disk back (mounted again): workers start and run jobs.
        self.unmount(folder)
        subprocess.run(["mount", device, folder], check=True, timeout=10)
        self.supervise(self.env, 1)
        job_id = self.enqueue(command=f"echo x >> {q(marks)}")
        self.wait_state(job_id, "completed")
        self.assertEqual(len(lines(marks)), 3)


class SQLiteFileModeTest(QueueTestCase):
    """The database and its WAL are the owner's only."""

    @short_leases
    def test_database_files_are_owner_only(self):
        """Database, WAL and SHM files, and a folder made for them, are the
        owner's only, even under umask 0."""
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        nested = os.path.join(self.dir, "new", "sub", "q.db")
        result = self.run_cli("--db", nested, "enqueue", '{"command": "true"}')
        self.assertEqual((result.returncode, result.stderr),
                         (0, self.created_note(nested)))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(nested)).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(nested).st_mode), 0o600)

        for suffix in ("", "-wal", "-shm"):   # made by @short_leases: create it anew
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.db + suffix)
        job_id = self.enqueue(command="true")
        sup = self.start_workers(1)
        self.wait_state(job_id, "completed")
        for suffix in ("", "-wal", "-shm", ".pid"):
            with self.subTest(file="queue.db" + suffix):
                mode = stat.S_IMODE(os.stat(self.db + suffix).st_mode)
                self.assertEqual(mode, 0o600, oct(mode))
        os.kill(sup.pid, signal.SIGTERM)
        self.assertEqual(sup.wait(timeout=20), 0)


class FileModeTest(QueueTestCase):
    """This host's files of the queue (PID file, log, spools, and the folder they
    are in) are the owner's only."""

    def test_pid_log_and_spool_files_are_owner_only(self):
        """The PID file, live output spools, the detached log, and (PostgreSQL) the
        folder made for them are owner-only, even under umask 0."""
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        job_id = self.enqueue(command="echo out; echo err >&2; sleep 1")
        sup = self.start_workers(1)
        self.wait_state(job_id, "processing")
        spools = self.local + ".out"
        wait_until(lambda: os.path.isdir(spools) and len(os.listdir(spools)) == 2, 10,
                   "both streams to be spooled")
        files = [self.local + ".pid", spools] + [os.path.join(spools, name)
                                                  for name in os.listdir(spools)]
        if self.postgres:
            files.append(os.path.dirname(self.local))
        for path in files:
            with self.subTest(file=os.path.basename(path)):
                mode = stat.S_IMODE(os.stat(path).st_mode)
                self.assertEqual(mode, 0o700 if os.path.isdir(path) else 0o600,
                                 oct(mode))
        os.kill(sup.pid, signal.SIGTERM)
        self.assertEqual(sup.wait(timeout=20), 0)
        self.assertEqual(self.state(job_id), "completed")

        result = self.run_cli("worker", "start", "--detach")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(stat.S_IMODE(os.stat(self.local + ".log").st_mode), 0o600)
        result = self.run_cli("worker", "stop")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.startswith("stopped"), result.stdout)


add_postgres_variants(globals())


if __name__ == "__main__":
    unittest.main()
