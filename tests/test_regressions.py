"""Regression tests for the post-review fixes, run with real processes."""

import json
import os
import shlex
import signal
import time
import subprocess
import sys
import unittest

from tests.support import (QUEUECTL, QueueTestCase, claim_one, cmdline, pid_alive,
                           queuectl, wait_until)

q = shlex.quote
parse_iso = queuectl.parse_iso


class StopSignalTest(QueueTestCase):

    def test_sigterm_to_the_supervisors_process_group_is_a_warm_stop(self):
        """SIGTERM to the supervisor's whole group lets the running job finish."""
        done = self.path("f")
        proc = self.start_workers(1)
        workers = self.worker_pids(proc.pid, 1)
        # Worker and supervisor share the group, so the signal reaches both.
        self.assertEqual(os.getpgid(proc.pid), proc.pid)
        self.assertEqual(os.getpgid(workers[0]), proc.pid)
        job_id = self.enqueue(command=f"sleep 2; echo done >> {q(done)}")
        self.wait_state(job_id, "processing", timeout=10)

        os.killpg(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=20), 0, self.log_text(proc))
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("completed", 1))
        self.assertEqual([h["outcome"] for h in job["history"]], ["completed"])
        self.assertEqual(self.read("f"), "done\n")
        self.assertNotIn("cold stop", self.log_text(proc))
        self.assertNotIn("Traceback", self.log_text(proc))

    def test_sighup_to_the_group_is_a_warm_stop_with_cleanup(self):
        """A closed terminal (SIGHUP to the group): the job finishes, no PID file left."""
        done = self.path("f")
        proc = self.start_workers(1)
        job_id = self.enqueue(command=f"sleep 2; echo done >> {q(done)}")
        self.wait_state(job_id, "processing", timeout=10)
        os.killpg(proc.pid, signal.SIGHUP)
        self.assertEqual(proc.wait(timeout=20), 0, self.log_text(proc))
        self.assertEqual((self.state(job_id), self.read("f")), ("completed", "done\n"))
        self.assertFalse(os.path.exists(self.db + ".pid"))
        self.assertIn("supervisor: stopped", self.log_text(proc))

    def test_worker_stop_with_timeout_on_a_stopping_supervisor_stays_warm(self):
        """worker stop --timeout 30 after a SIGTERM does not turn the stop cold."""
        done = self.path("f")
        proc = self.start_workers(1)
        job_id = self.enqueue(command=f"sleep 2; echo done >> {q(done)}")
        self.wait_state(job_id, "processing", timeout=10)

        os.kill(proc.pid, signal.SIGTERM)
        wait_until(lambda: "running jobs finish first" in self.log_text(proc), 5,
                   "the supervisor to begin a warm stop")
        self.assertEqual(self.state(job_id), "processing", "the job ended too soon")
        result = self.run_cli("worker", "stop", "--timeout", "30", timeout=40)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, f"stopped workers (supervisor pid {proc.pid}): "
                                        f"1 running job(s) finished\n")
        self.assertEqual(proc.wait(timeout=10), 0, self.log_text(proc))
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("completed", 1))
        self.assertEqual([h["outcome"] for h in job["history"]], ["completed"])
        self.assertEqual(self.read("f"), "done\n")
        self.assertNotIn("cold stop", self.log_text(proc))


class DatabasePathTest(QueueTestCase):

    def test_symlink_to_the_database_cannot_start_a_second_supervisor(self):
        """worker start through a symlink to a busy database is refused: exit 1."""
        proc = self.start_workers(1)
        link = self.path("link.db")
        os.symlink(self.db, link)
        code, out, err = self.run_bounded("--db", link, "worker", "start", timeout=10)
        self.assertOneErrorLine(1, code, out, err)
        self.assertIn("already running", err)
        self.assertIn(str(proc.pid), err)
        self.assertFalse(os.path.exists(link + ".pid"))
        self.assertIsNone(proc.poll())
        self.wait_state(self.enqueue(command="true"), "completed")


if __name__ == "__main__":
    unittest.main()
