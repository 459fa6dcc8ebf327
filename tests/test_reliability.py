"""Fault injection with real processes: kills, freezes, races, bad files, full disks."""

import collections
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

from tests.support import (ROOT, QueueTestCase, group_members, lines, pid_alive,
                           queuectl, short_leases, wait_until)

q = shlex.quote

# One enqueuer process: "batch" runs `queuectl enqueue -` processes with batches of
# varied size; "single" runs one-job enqueues in-process (each its own connection and
# transaction), with every 50th one as a real `queuectl enqueue JSON` process.
ENQUEUER = r'''
import json, shlex, subprocess, sys
root, mode, count, record = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, root)
import queuectl
script = root + "/queuectl.py"
command = "echo $QUEUECTL_JOB_ID >> " + shlex.quote(record)

def job(i):
    return json.dumps({"command": command, "priority": i % 3})

def run(argv, stdin=None):
    r = subprocess.run([sys.executable, script] + argv, input=stdin,
                       capture_output=True, text=True, timeout=120)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    if r.returncode:
        sys.exit(r.returncode)

done = 0
if mode == "batch":
    sizes = [50, 1, 17, 100, 3]
    while done < count:
        n = min(sizes[0], count - done)
        sizes = sizes[1:] + sizes[:1]
        run(["enqueue", "-"], "".join(job(done + k) + "\n" for k in range(n)))
        done += n
else:
    for i in range(count):
        if i % 50 == 0:
            run(["enqueue", job(i)])
        else:
            code = queuectl.main(["enqueue", job(i)])
            if code:
                sys.exit(code)
        sys.stdout.flush()
'''


def outcomes(job):
    """(number, outcome, reason) of each attempt in a job's history."""
    return [(h["number"], h["outcome"], h["reason"]) for h in job["history"]]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class BadEnvironmentTest(QueueTestCase):

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

    @short_leases
    def test_a_log_line_is_written_whole_or_not_at_all(self):
        """A log that can take only part of a line (a disk filling up, a file size
        limit) keeps no torn line: the line is written whole or not at all."""
        path = self.path("q.db.log")
        with open(path, "w") as f:
            f.write(("x" * 99 + "\n") * 40)          # 4000 bytes
        limit = 4000 + 50                            # room for 50 more bytes

        def small_files():
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        with open(path, "a") as log:
            result = subprocess.run(
                [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                 "import queuectl; queuectl.log('y' * 300); queuectl.log('z')", ROOT],
                stderr=log, preexec_fn=small_files, timeout=20)
        self.assertEqual(result.returncode, 0)
        with open(path) as f:
            text = f.read()
        self.assertRegex(text, r"^(x{99}\n){40}\S+Z z\n$")


class FilesTest(QueueTestCase):

    @short_leases
    def test_stale_pid_file_naming_live_process_is_not_trusted(self):
        """A stale PID file naming a live stranger: stop spares it; start replaces it."""
        self.enqueue(command="true")
        bystander = subprocess.Popen(["sleep", "30"], start_new_session=True)
        self.addCleanup(lambda: bystander.poll() is None and (bystander.kill(),
                                                               bystander.wait()))
        pidfile = self.db + ".pid"
        with open(pidfile, "w") as f:
            f.write(f"{bystander.pid}\n{bystander.pid}\n")

        result = self.run_cli("worker", "stop")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, "no workers running\n", ""))
        status = json.loads(self.ok("status", "--json"))
        self.assertEqual((status["supervisor_pid"], status["workers"]), (None, []))
        self.assertIsNone(bystander.poll(), "worker stop signalled an unrelated process")

        sup = self.start_workers(1)
        with open(pidfile) as f:
            self.assertEqual(int(f.readline()), sup.pid)
        result = self.run_cli("worker", "stop")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.startswith("stopped"), result.stdout)
        self.assertEqual(sup.wait(timeout=20), 0)
        self.assertFalse(os.path.exists(pidfile))
        self.assertIsNone(bystander.poll(), "an unrelated process was signalled")


class ShutdownTest(QueueTestCase):

    @short_leases
    def test_sigterm_lets_running_job_finish_then_exits_clean(self):
        """First SIGTERM: the job finishes, no new one starts, exit 0, nothing left."""
        starts, done = self.path("starts"), self.path("done")
        running = self.enqueue(command=f"echo $$ >> {q(starts)}; sleep 1; "
                                       f"echo ok >> {q(done)}", priority=1)
        waiting = self.enqueue(command=f"echo late >> {q(done)}")
        sup = self.start_workers(1)
        workers = self.worker_pids(sup.pid, 1)
        wait_until(lambda: lines(starts), 20, "the job to start")

        os.kill(sup.pid, signal.SIGTERM)
        self.assertEqual(sup.wait(timeout=20), 0)
        self.assertEqual(lines(done), ["ok"])
        self.assertEqual(self.state(running), "completed")
        job = self.job(waiting)
        self.assertEqual((job["state"], job["attempts"], job["history"]),
                         ("pending", 0, []))
        self.assertFalse(os.path.exists(self.db + ".pid"))
        wait_until(lambda: not any(pid_alive(p) for p in workers), 5, "workers to exit")
        self.assertFalse(group_members(int(lines(starts)[0])))
        wait_until(lambda: not self.leftovers(), 5, "no process left on the database")
        self.assertCleanLog(sup)

    @short_leases
    def test_second_sigterm_kills_job_and_gives_it_back(self):
        """Second SIGTERM: the job's group dies, job pending with 0 attempts, exit 7
        (as worker stop reports a cold stop)."""
        starts = self.path("starts")
        job_id = self.enqueue(command=f"echo $$ >> {q(starts)}; sleep 30")
        sup = self.start_workers(1)
        workers = self.worker_pids(sup.pid, 1)
        wait_until(lambda: lines(starts), 20, "the job to start")
        group = int(lines(starts)[0])
        self.assertTrue(group_members(group))

        os.kill(sup.pid, signal.SIGTERM)
        wait_until(lambda: "running jobs finish first" in self.log_text(sup), 10,
                   "the supervisor to begin a warm stop")
        self.assertIsNone(sup.poll())
        self.assertEqual(self.state(job_id), "processing")
        started = time.monotonic()
        os.kill(sup.pid, signal.SIGTERM)
        self.assertEqual(sup.wait(timeout=20), queuectl.EXIT_INTERRUPTED)
        self.assertIn(f"1 running job(s) interrupted and put back as pending ({job_id})",
                      self.log_text(sup))
        self.assertLess(time.monotonic() - started, queuectl.COLD_STOP_GRACE_S,
                        "the cold stop needed the SIGKILL fallback")

        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0))
        self.assertEqual([h["outcome"] for h in job["history"]], ["interrupted"])
        self.assertFalse(group_members(group), "the job's processes survived")
        self.assertFalse(any(pid_alive(p) for p in workers), "a worker survived")
        self.assertFalse(os.path.exists(self.db + ".pid"))
        # multiprocessing's resource tracker exits a moment after the supervisor.
        wait_until(lambda: not self.leftovers(), 5, "no process left on the database")
        self.assertNotIn("did not stop in time", self.log_text(sup))
        self.assertCleanLog(sup)

    @short_leases
    def test_two_ctrl_c_that_kill_a_job_exit_7(self):
        """Two Ctrl-C (SIGINT to the foreground group) that kill a running job end
        worker start with exit 7; two with nothing running end it with 0."""
        starts = self.path("starts")
        self.enqueue(command=f"echo $$ >> {q(starts)}; sleep 30")
        sup = self.start_workers(1)
        wait_until(lambda: lines(starts), 20, "the job to start")
        os.killpg(sup.pid, signal.SIGINT)
        wait_until(lambda: "running jobs finish first" in self.log_text(sup), 10,
                   "the supervisor to begin a warm stop")
        os.killpg(sup.pid, signal.SIGINT)
        self.assertEqual(sup.wait(timeout=20), queuectl.EXIT_INTERRUPTED)
        self.ok("cancel", *[job["id"] for job in json.loads(
            self.ok("list", "--state", "pending", "--json"))])
        idle = self.start_workers(1)
        os.killpg(idle.pid, signal.SIGINT)
        os.killpg(idle.pid, signal.SIGINT)
        self.assertEqual(idle.wait(timeout=20), 0)


if __name__ == "__main__":
    unittest.main()
