"""Operator verbs: cancel, logs, wait, pause, purge, unique and dependent jobs,
enqueue -c, and the command line around them."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import unittest
from datetime import timedelta

from tests.support import (OK, QUEUECTL, QueueTestCase, claim_one, failed, group_members,
                           proc_fields, queuectl, wait_until)

q = shlex.quote


class VerbProcessTest(QueueTestCase):
    """The verbs against real workers."""

    def test_worker_stop_reports_on_separate_lines_and_cold_stop_exits_7(self):
        """worker stop's progress note ends its line before the report; a stop
        that had to kill running jobs exits 7."""
        proc = self.start_workers(1)
        job_id = self.enqueue(command="sleep 30")
        self.wait_state(job_id, "processing", timeout=10)
        result = self.run_cli("worker", "stop", "--timeout", "0.5s", timeout=30)
        self.assertEqual(result.returncode, queuectl.EXIT_INTERRUPTED, result.stderr)
        self.assertTrue(result.stderr.endswith("\n"))
        self.assertEqual(len(result.stderr.splitlines()), 1)
        self.assertTrue(result.stdout.startswith("stopped workers"), result.stdout)
        self.assertEqual(proc.wait(timeout=10), queuectl.EXIT_INTERRUPTED)

    def test_detached_log_is_rotated(self):
        """A detached supervisor's log is rotated to one .1 file at its size limit."""
        env = dict(self.env, QUEUECTL_LOG_MAX_BYTES="3000")
        self.addCleanup(lambda: self.run_cli("worker", "stop", timeout=30))
        result = self.run_cli("worker", "start", "--detach", env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = "".join(json.dumps({"command": "true"}) + "\n" for _ in range(60))
        ids = self.ok("enqueue", "-", stdin=lines).split()
        for job_id in ids:
            self.wait_state(job_id, "completed")
        log = self.db + ".log"
        wait_until(lambda: os.path.exists(log + ".1"), 10, "the log to be rotated")
        self.assertLess(os.path.getsize(log), 3000 + 1000)
        self.assertLess(os.path.getsize(log + ".1"), 3000 + 1000)
        with open(log) as f:
            self.assertNotIn("Traceback", f.read())



if __name__ == "__main__":
    unittest.main()
