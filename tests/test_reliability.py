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


class WorkerDeathTest(QueueTestCase):

    @short_leases
    def test_kill_9_worker_mid_job_fails_attempt_and_reruns_once(self):
        """kill -9 a busy worker: attempt is worker lost, its group dies, reruns once."""
        # A long lease: only the supervisor, not lease expiry, can recover in time.
        self.ok("config", "set", "lease_timeout", "60")
        starts, done = self.path("starts"), self.path("done")
        job_id = self.enqueue(command=f"echo $$ >> {q(starts)}; sleep 2; "
                                      f"echo ok >> {q(done)}")
        sup = self.start_workers(1)
        wait_until(lambda: len(lines(starts)) == 1, 20, "the job to start")
        shell = int(lines(starts)[0])
        worker = self.job(job_id)["worker_pid"]
        self.assertEqual(self.worker_pids(sup.pid), [worker])

        os.kill(worker, signal.SIGKILL)
        first = wait_until(lambda: (self.history(job_id)[0]["outcome"] == "failed"
                                    and self.history(job_id)[0]), 10,
                           "the supervisor to fail the lost attempt")
        self.assertEqual(first["reason"], queuectl.WORKER_LOST)
        self.assertEqual(first["worker_pid"], worker)
        wait_until(lambda: not group_members(shell), 5,
                   "the lost attempt's process group to die")
        self.assertFalse(pid_alive(shell))

        job = self.wait_state(job_id, "completed", 20)
        self.assertEqual(lines(done), ["ok"])
        self.assertEqual(len(lines(starts)), 2)
        self.assertEqual(job["attempts"], 2)
        self.assertEqual(outcomes(job), [(1, "failed", queuectl.WORKER_LOST),
                                         (2, "completed", None)])
        replacement = job["history"][1]["worker_pid"]
        self.assertNotEqual(replacement, worker)
        self.assertEqual(self.worker_pids(sup.pid), [replacement])
        self.assertIsNone(sup.poll())
        self.assertIn(f"supervisor: job {job_id} failed: worker lost", self.log_text(sup))
        self.assertNotIn("Traceback", self.log_text(sup))

    @short_leases
    def test_job_that_kills_its_worker_every_time_ends_dead(self):
        """A job running `kill -9 $PPID` with max_retries 1 dies after 2 lost workers."""
        job_id = self.enqueue(command="kill -9 $PPID", max_retries=1)
        sup = self.start_workers(1)
        job = self.wait_state(job_id, "dead", 20)
        self.assertEqual(job["attempts"], 2)
        self.assertEqual(job["last_error"], queuectl.WORKER_LOST)
        self.assertEqual(outcomes(job), [(1, "failed", queuectl.WORKER_LOST),
                                         (2, "failed", queuectl.WORKER_LOST)])
        killed = [h["worker_pid"] for h in job["history"]]
        self.assertNotEqual(killed[0], killed[1])
        # The supervisor survives and keeps a fresh worker.
        wait_until(lambda: set(self.worker_pids(sup.pid, 1) or killed) - set(killed), 10,
                   "a replacement worker")
        self.assertFalse(any(pid_alive(p) for p in killed))
        self.assertIsNone(sup.poll())
        self.assertNotIn("Traceback", self.log_text(sup))

    @short_leases
    def test_kill_9_supervisor_orphans_finish_and_restart_recovers(self):
        """kill -9 the supervisor: orphans finish and exit; a restart runs the rest."""
        starts, done = self.path("starts"), self.path("done")
        ids = [self.enqueue(command=f"echo $QUEUECTL_JOB_ID >> {q(starts)}; sleep 1; "
                                    f"echo $QUEUECTL_JOB_ID >> {q(done)}")
               for _ in range(6)]
        first = self.start_workers(2)
        old_workers = self.worker_pids(first.pid, 2)
        running = wait_until(lambda: len(self.processing()) == 2 and self.processing(),
                             20, "both workers to be running a job")

        os.kill(first.pid, signal.SIGKILL)
        self.assertEqual(first.wait(timeout=10), -signal.SIGKILL)
        # Restart at once, as a service manager would, while the orphans still work.
        second = self.start_workers(2)

        wait_until(lambda: not any(pid_alive(p) for p in old_workers), 15,
                   "the orphaned workers to exit")
        wait_until(lambda: self.log_text(first).count("supervisor is gone; stopping")
                   == 2, 5, "both orphans to log that they stop")
        for job_id, worker in running.items():
            job = self.wait_state(job_id, "completed", 10)
            self.assertEqual(job["attempts"], 1, job_id)
            self.assertEqual(job["history"][0]["worker_pid"], worker)

        for job_id in ids:
            self.wait_state(job_id, "completed", 20)
        self.assertEqual(sorted(lines(done)), sorted(ids))
        self.assertEqual(sorted(lines(starts)), sorted(ids))
        jobs = json.loads(self.ok("list", "--json"))
        self.assertEqual({j["state"] for j in jobs}, {"completed"})
        self.assertEqual({j["attempts"] for j in jobs}, {1})
        self.assertIsNone(second.poll())
        self.assertFalse(set(self.worker_pids(second.pid, 2)) & set(old_workers))
        self.assertNotIn("Traceback", self.log_text(first) + self.log_text(second))


class FrozenWorkerTest(QueueTestCase):

    @short_leases
    def test_sigstopped_worker_past_lease_loses_job_and_writes_nothing(self):
        """A worker frozen past its lease loses its job and, resumed, writes nothing."""
        starts, done = self.path("starts"), self.path("done")
        job_id = self.enqueue(command=f"echo $$ >> {q(starts)}; sleep 3; "
                                      f"echo $QUEUECTL_ATTEMPT >> {q(done)}")
        sup = self.start_workers(2)
        wait_until(lambda: len(lines(starts)) == 1, 20, "the job to start")
        stale = self.job(job_id)["worker_pid"]
        (other,) = set(self.worker_pids(sup.pid, 2)) - {stale}
        self.addCleanup(lambda: pid_alive(stale) and os.kill(stale, signal.SIGCONT))
        self.freeze(stale)

        def reclaimed():
            history = self.history(job_id)
            return (len(history) == 2 and history[0]["outcome"] == "failed"
                    and history[1]["outcome"] == "running" and history)
        history = wait_until(reclaimed, 15, "another worker to reclaim the job")
        lost = history[0]
        self.assertEqual((lost["reason"], lost["worker_pid"]),
                         (queuectl.WORKER_LOST, stale))
        self.assertEqual(history[1]["worker_pid"], other)
        self.assertFalse(group_members(int(lines(starts)[0])),
                         "the frozen worker's command still runs")

        os.kill(stale, signal.SIGCONT)
        wait_until(lambda: f"(pid {stale}): job {job_id} was taken over" in
                   self.log_text(sup), 10, "the resumed worker to drop its result")
        job = self.wait_state(job_id, "completed", 15)
        self.assertEqual(job["attempts"], 2)
        self.assertEqual(len(job["history"]), 2)
        self.assertEqual(job["history"][0], lost)     # untouched by the stale worker
        self.assertEqual((job["history"][1]["outcome"], job["history"][1]["worker_pid"]),
                         ("completed", other))
        self.assertEqual(lines(done), ["2"])
        self.assertEqual(len(lines(starts)), 2)
        self.assertIsNone(sup.poll())
        self.assertEqual(sorted(self.worker_pids(sup.pid, 2)), sorted([stale, other]))
        self.assertNotIn("Traceback", self.log_text(sup))


class ConcurrencyTest(QueueTestCase):

    def race(self, total, enqueuers=8, workers=8, timeout=120):
        """ENQUEUERS processes add TOTAL jobs while WORKERS run them; each runs once.

        The lease stays at 1 s (the shortest allowed): a worker that is alive and
        well must not lose a job to a lease that ran out while it waited for a lock.
        """
        record = self.path("ran")
        script = self.path("enqueuer.py")
        with open(script, "w") as f:
            f.write(ENQUEUER)
        sup = self.start_workers(workers)
        started = time.monotonic()
        procs = []
        for n in range(enqueuers):
            count = total // enqueuers + (1 if n < total % enqueuers else 0)
            out = open(self.path(f"enqueuer-{n}.out"), "w+")
            err = open(self.path(f"enqueuer-{n}.err"), "w+")
            self.addCleanup(out.close)
            self.addCleanup(err.close)
            proc = subprocess.Popen(
                [sys.executable, script, ROOT, "batch" if n % 2 else "single",
                 str(count), record], env=self.env, cwd=self.dir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            self.addCleanup(lambda p=proc: p.poll() is None and (p.kill(), p.wait()))
            procs.append((proc, out, err))
        ids = []
        for proc, out, err in procs:
            self.assertEqual(proc.wait(timeout=timeout), 0)
            out.seek(0)
            err.seek(0)
            self.assertEqual(err.read(), "", "an enqueuer wrote to stderr")
            ids += out.read().split()
        self.assertEqual(len(ids), total)
        self.assertEqual(len(set(ids)), total, "enqueue returned a duplicate id")

        def finished():
            counts = json.loads(self.ok("status", "--json"))["counts"]
            return counts["completed"] == total or counts["dead"] or counts["failed"]
        wait_until(finished, timeout, f"{total} jobs to complete")
        elapsed = time.monotonic() - started

        ran = lines(record)
        twice = sorted(i for i, n in collections.Counter(ran).items() if n > 1)
        self.assertEqual(len(ran), total, "a job ran twice or not at all: " + "; ".join(
            json.dumps(self.history(i)) for i in twice[:3]))
        self.assertEqual(set(ran), set(ids))
        listed = self.run_cli("list", "--json", timeout=60)
        self.assertEqual((listed.returncode, listed.stderr), (0, ""))
        jobs = json.loads(listed.stdout)
        self.assertEqual({j["id"] for j in jobs}, set(ids))
        self.assertEqual({(j["state"], j["attempts"]) for j in jobs}, {("completed", 1)})

        os.kill(sup.pid, signal.SIGTERM)
        self.assertEqual(sup.wait(timeout=30), 0)
        self.assertCleanLog(sup)
        return elapsed

    @short_leases
    def test_8_enqueuers_8_workers_2000_jobs_each_run_once(self):
        """8 enqueuer processes race 8 workers over 2,000 jobs: each runs once."""
        self.race(2000)

    @unittest.skipUnless(os.environ.get("QUEUECTL_SOAK") == "1", "set QUEUECTL_SOAK=1")
    @short_leases
    def test_soak_8_enqueuers_8_workers_20000_jobs_each_run_once(self):
        """Soak: 8 enqueuers race 8 workers over 20,000 jobs: each runs exactly once."""
        self.race(20000, timeout=900)


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
