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


class CommandLineTest(QueueTestCase):

    def test_unknown_arguments_name_the_command(self):
        """An unknown option or extra argument names the command whose --help
        to read."""
        self.enqueue(id="a", command="true")
        for argv, prog in ((["enqueue", "--bogus", "{}"], "queuectl enqueue"),
                           (["status", "--bogus"], "queuectl status"),
                           (["show", "a", "extra"], "queuectl show"),
                           (["dlq", "list", "--bogus"], "queuectl dlq list")):
            with self.subTest(argv=argv):
                err = self.assertFailsCleanly(2, *argv)
                self.assertTrue(err.startswith(f"{prog}: error: unrecognized "
                                               f"arguments"), err)
                self.assertIn(f"see '{prog} --help'", err)

    def test_db_at_every_level(self):
        """--db works after a command group's name too, and every group lists it."""
        other = self.path("other.db")
        code, out, err = self.cli("enqueue", "--db", other, '{"id": "o", "command": "x"}')
        self.assertEqual((code, err), (0, self.created_note(other)))
        for argv in (["dlq", "--db", other, "list", "--json"],
                     ["config", "--db", other, "show", "--json"],
                     ["worker", "--db", other, "stop"]):
            with self.subTest(argv=argv):
                self.assertEqual(self.cli(*argv)[0], 0)
        self.assertEqual(self.json_out("list", "--db", other, "--json")[0]["id"], "o")
        for group in ("dlq", "worker", "config"):
            code, out, _ = self.cli(group, "--help")
            self.assertIn("--db PATH", out)


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


class WalkthroughTest(QueueTestCase):
    """What a new user's walkthrough of the verbs found."""

    def test_durations_are_echoed_as_given_and_refused_in_one_wording(self):
        self.store()
        for given, shown in (("7d", "7d"), ("10m", "10m"), ("1d1s", "1d1s"),
                             ("1h30m", "1h30m"), ("90", "1m30s")):
            self.assertEqual(self.ok("purge", "--state", "completed", "--older-than",
                                     given),
                             f"purged 0 completed job(s) older than {shown}\n")
        for argv, message in (
                (("worker", "stop", "--timeout", "-5s"), "must not be negative: '-5s'"),
                (("enqueue", "-c", "true", "--delay", "-5s"),
                 "--delay: must not be negative: '-5s'"),
                (("enqueue", "-c", "true", "--delay", "99999999999d"),
                 "--delay: too long: '99999999999d'"),
                (("enqueue", "-c", "true", "--timeout", "0"),
                 "--timeout: must be at least 0.01s: '0'"),
                (("enqueue", '{"command": "true", "delay": "10 m"}'),
                 "field 'delay': not a duration such as 90s, 10m, 2h, 7d or 1h30m: "
                 "'10 m'"),
                (("config", "set", "retention", "-5s"), "bad value for retention: '-5s'"),
                (("list", "--limit", "0"), "must be from 1 to 2147483647"),
                (("enqueue", "-c", "true", "--unique-key", "  "),
                 "--unique-key must be a string that is not blank")):
            self.assertIn(message, self.assertFailsCleanly(2, *argv))



if __name__ == "__main__":
    unittest.main()
