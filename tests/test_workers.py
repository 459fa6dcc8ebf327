"""End-to-end tests of workers: real supervisor and worker processes on a temp DB."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import unittest
from datetime import datetime, timedelta, timezone

from tests.support import (QUEUECTL, QueueTestCase, group_members, pid_alive, queuectl,
                           wait_until)

parse_iso = queuectl.parse_iso


def seconds_between(earlier, later):
    return (parse_iso(later) - parse_iso(earlier)).total_seconds()


class TestWorkers(QueueTestCase):

    def test_jobs_survive_a_restart_of_the_workers(self):
        """Pending jobs stay queued across worker stop and start, and all complete."""
        out_file = shlex.quote(self.path("out"))
        ids = [f"r{n}" for n in range(10)]
        commands = {i: f"sleep 0.3; echo {i} >> {out_file}" for i in ids}
        lines = "".join(json.dumps({"id": i, "command": c}) + "\n"
                        for i, c in commands.items())
        self.ok("enqueue", "-", stdin=lines)
        proc = self.start_workers(2)
        wait_until(lambda: self.count("completed") >= 2, 20, "two completed jobs")
        result = self.stop_workers(proc)
        self.assertIn("stopped", result.stdout)

        jobs = self.jobs()
        states = [j["state"] for j in jobs]
        self.assertEqual(set(states) - {"completed", "pending"}, set(), states)
        self.assertGreater(states.count("pending"), 0, "every job ran before the stop")
        self.assertEqual({j["attempts"] for j in jobs if j["state"] == "pending"}, {0})
        self.assertEqual(len(jobs), 10)

        self.start_workers(2)
        wait_until(lambda: self.count("completed") == 10, 20, "all 10 jobs completed")
        self.assertEqual(sorted(self.read("out").split()), sorted(ids))
        self.assertEqual({j["attempts"] for j in self.jobs()}, {1})

    def test_graceful_stop_waits_for_the_running_job(self):
        """worker stop returns only after the running job completed."""
        proc = self.start_workers(1)
        done = shlex.quote(self.path("f"))
        job_id = self.enqueue(command=f"sleep 1.5; echo done >> {done}")
        self.wait_state(job_id, "processing", timeout=10)
        result = self.run_cli("worker", "stop", timeout=30)
        job = self.job(job_id)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(job["state"], "completed")
        self.assertEqual(job["attempts"], 1)
        self.assertEqual(self.read("f"), "done\n")
        self.assertIn("stopped", result.stdout)
        self.assertEqual(len(result.stdout.splitlines()), 1, result.stdout)
        self.assertEqual(proc.wait(timeout=10), 0, self.log_text(proc))
        self.assertFalse(os.path.exists(self.db + ".pid"))
        self.assertNotIn("Traceback", self.log_text(proc))

    def test_stop_timeout_kills_the_job_and_gives_it_back(self):
        """worker stop --timeout 1 kills a running job and requeues it unused."""
        proc = self.start_workers(1)
        pgid_file = shlex.quote(self.path("pgid"))
        job_id = self.enqueue(command=f"echo $$ > {pgid_file}; sleep 30")
        self.wait_state(job_id, "processing", timeout=10)
        pgid = int(wait_until(lambda: self.read("pgid").strip(), 10, "the job's pgid"))
        self.addCleanup(self.kill_group_cleanup, pgid)
        self.assertTrue(group_members(pgid))
        started = time.monotonic()
        result = self.stop_workers(proc, "--timeout", "1",
                                   code=queuectl.EXIT_INTERRUPTED)
        self.assertLess(time.monotonic() - started, 15)
        self.assertIn("stopped", result.stdout)
        self.assertIn(f": 1 running job(s) interrupted and put back as "
                      f"pending ({job_id})", result.stdout)
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0))
        self.assertEqual(job["history"][-1]["outcome"], "interrupted")
        self.assertIsNotNone(job["history"][-1]["finished_at"])
        wait_until(lambda: not group_members(pgid), 5, f"process group {pgid} to be gone")

    def test_second_supervisor_is_refused(self):
        """A second worker start on a busy database exits 1; the first keeps working."""
        proc = self.start_workers(1)
        workers = self.worker_pids(proc.pid, 1)
        result = self.run_cli("worker", "start", timeout=20)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("already running", result.stderr)
        self.assertIn(str(proc.pid), result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIsNone(proc.poll())
        self.assertEqual(self.worker_pids(proc.pid, 1), workers)
        job_id = self.enqueue(command="true")
        self.wait_state(job_id, "completed")

    def test_a_deleted_pid_file_hides_no_supervisor(self):
        """With its PID file gone (a cleaner of old files), the live supervisor is
        still found by its record in the database: status shows it, a second
        worker start is refused, worker stop stops it."""
        proc = self.start_workers(1)
        pid_file = self.db + ".pid"
        os.unlink(pid_file)
        os.mkdir(pid_file)                # and it cannot be written again there
        self.addCleanup(lambda: os.path.isdir(pid_file) and os.rmdir(pid_file))
        status = json.loads(self.ok("status", "--json"))
        self.assertEqual(status["supervisor_pid"], proc.pid)
        second = self.run_cli("worker", "start", timeout=20)
        self.assertEqual(second.returncode, 1, second.stderr)
        self.assertEqual(second.stderr, f"queuectl: error: workers are already running "
                                        f"on this database (supervisor pid {proc.pid})\n")
        self.assertTrue(os.path.isdir(pid_file))
        job_id = self.enqueue(command="true")
        self.wait_state(job_id, "completed")
        self.stop_workers(proc)
        self.assertEqual(self.run_cli("worker", "stop").stdout, "no workers running\n")
        log = self.log_text(proc)
        self.assertEqual(log.count("could not write its PID file again"), 1, log)

    def test_a_supervisor_writes_its_deleted_pid_file_again(self):
        """A supervisor whose PID file was deleted writes it again within about
        a second, so worker stop and enqueue's wake-up find it at once."""
        proc = self.start_workers(1)
        os.unlink(self.db + ".pid")
        wait_until(lambda: self.worker_pids(proc.pid, 1), 5, "the PID file again")
        self.assertIn("PID file", self.log_text(proc))
        self.stop_workers(proc)
        self.assertFalse(os.path.exists(self.db + ".pid"))

    def test_worker_stop_gives_up_on_a_frozen_supervisor(self):
        """worker stop --timeout 2 on a supervisor frozen by SIGSTOP returns soon
        after its timeout: exit 8, naming the pid; resumed, the supervisor stops."""
        proc = self.start_workers(1)
        job_id = self.enqueue(command="sleep 30")
        self.wait_state(job_id, "processing", timeout=10)
        os.kill(proc.pid, signal.SIGSTOP)
        self.addCleanup(lambda: proc.poll() is None and os.kill(proc.pid, signal.SIGCONT))
        started = time.monotonic()
        result = self.run_cli("worker", "stop", "--timeout", "2", timeout=60)
        took = time.monotonic() - started
        self.assertEqual(result.returncode, queuectl.EXIT_NO_ANSWER, result.stderr)
        self.assertLess(took, 2 + 2 * queuectl.ANSWER_GRACE_S + 2)
        last = result.stderr.splitlines()[-1]
        self.assertRegex(last, rf"^queuectl: error: supervisor pid {proc.pid} does not "
                               rf"answer: it is stopped")
        self.assertNotIn("Traceback", result.stderr)
        os.kill(proc.pid, signal.SIGCONT)        # the stop it was sent takes effect
        self.assertEqual(proc.wait(timeout=30), queuectl.EXIT_INTERRUPTED)
        self.assertEqual(self.state(job_id), "pending")

    def test_stale_pid_file_of_a_live_process_is_replaced(self):
        """An unlocked PID file naming a live unrelated process does not block start."""
        with open(self.db + ".pid", "w") as f:
            f.write(f"{os.getpid()}\n\n")
        proc = self.start_workers(1)
        with open(self.db + ".pid") as f:
            self.assertEqual(f.readline().strip(), str(proc.pid))
        job_id = self.enqueue(command="true")
        self.wait_state(job_id, "completed")

    def test_stale_pid_file_of_a_dead_process_is_replaced(self):
        """A PID file left by a dead process does not block worker start."""
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait(timeout=10)
        with open(self.db + ".pid", "w") as f:
            f.write(f"{dead.pid}\n{dead.pid}\n")
        proc = self.start_workers(2)
        with open(self.db + ".pid") as f:
            self.assertEqual(f.readline().strip(), str(proc.pid))
        job_id = self.enqueue(command="true")
        self.wait_state(job_id, "completed")

    def test_detach_returns_promptly_and_stop_removes_the_pid_file(self):
        """worker start --detach returns at once, even inside $(...); stop ends it."""
        script = 'x=$("$PY" "$QUEUECTL" worker start --detach --count 2) && echo "$x"'
        env = dict(self.env, PY=sys.executable, QUEUECTL=QUEUECTL)
        self.addCleanup(self.kill_detached)
        started = time.monotonic()
        result = subprocess.run(["sh", "-c", script], env=env, cwd=self.dir,
                                capture_output=True, text=True, timeout=25)
        elapsed = time.monotonic() - started
        match = re.search(r"supervisor pid (\d+)", result.stdout)
        self.assertEqual((result.returncode, result.stderr), (0, self.created_note()))
        self.assertIsNotNone(match, result.stdout)
        self.assertIn("started 2 worker(s)", result.stdout)
        self.assertLess(elapsed, 10)
        pid = int(match.group(1))
        self.assertTrue(pid_alive(pid))
        self.assertEqual(len(self.worker_pids(pid, 2) or []), 2)

        ids = [self.enqueue(command="echo hi") for _ in range(3)]
        for job_id in ids:
            self.assertEqual(self.wait_state(job_id, "completed")["output"]["stdout"],
                             "hi\n")

        stop = self.run_cli("worker", "stop", timeout=30)
        self.assertEqual(stop.returncode, 0, stop.stderr)
        self.assertIn(f"stopped workers (supervisor pid {pid})", stop.stdout)
        self.assertFalse(os.path.exists(self.db + ".pid"))
        wait_until(lambda: not pid_alive(pid), 10, "the detached supervisor to exit")
        wait_until(lambda: not group_members(pid), 10, "the detached workers to exit")
        with open(self.db + ".log") as f:
            self.assertNotIn("Traceback", f.read())

    def test_stop_with_no_workers_running(self):
        """worker stop with nothing running says so and exits 0."""
        result = self.run_cli("worker", "stop")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, "no workers running\n", ""))
        with open(self.db + ".pid", "w") as f:      # stale: nobody holds its lock
            f.write(f"{os.getpid()}\n\n")
        result = self.run_cli("worker", "stop")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, "no workers running\n", ""))


if __name__ == "__main__":
    unittest.main()
