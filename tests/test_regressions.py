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


class JobProcessTest(QueueTestCase):

    def test_what_a_command_leaves_running_is_killed_when_it_exits(self):
        """A background process a job leaves in its group dies when the job exits."""
        self.start_workers(1)
        job_id = self.enqueue(command=f"sleep 60 & echo $! > {q(self.path('bg.pid'))}")
        self.wait_state(job_id, "completed", timeout=10)
        pid = int(wait_until(lambda: self.read("bg.pid").strip(), 5,
                             "the background pid file"))
        self.addCleanup(self.kill_stray, pid, "sleep")
        wait_until(lambda: not pid_alive(pid), 5, f"background sleep {pid} to be gone")

    def test_jobs_do_not_inherit_an_ignored_sigint(self):
        """The shell that runs a job does not have SIGINT ignored."""
        self.start_workers(1)
        job_id = self.enqueue(command=f"grep SigIgn /proc/$$/status > "
                                      f"{q(self.path('out'))}")
        self.wait_state(job_id, "completed", timeout=10)
        fields = self.read("out").split()
        self.assertEqual(fields[0], "SigIgn:", fields)
        ignored = int(fields[1], 16)
        self.assertFalse(ignored & (1 << (signal.SIGINT - 1)),
                         f"SIGINT is ignored in the job's shell (SigIgn {fields[1]})")


class ExitCodeTest(QueueTestCase):

    def check(self, *extra):
        """Run status --check as a process; return (exit code, stdout)."""
        result = self.run_cli("status", "--check", *extra)
        self.assertEqual(result.stderr, "")
        return result.returncode, result.stdout

    def test_usage_and_runtime_errors_as_real_processes(self):
        """A usage error exits 2, a runtime error 1, each with one stderr line."""
        self.enqueue(id="keep", command="true")
        result = self.run_cli("list", "--state", "bogus")
        self.assertOneErrorLine(2, result.returncode, result.stdout, result.stderr)
        result = self.run_cli("show", "nope")
        self.assertOneErrorLine(1, result.returncode, result.stdout, result.stderr)
        self.assertEqual(result.stderr, "queuectl: error: no such job: nope\n")

    def test_list_into_a_reader_that_quits_exits_0_quietly(self):
        """list | head -1 (300 jobs) and list --limit 3 | true: exit 0, no stderr."""
        lines = "".join(json.dumps({"command": f"echo {n}"}) + "\n" for n in range(300))
        self.ok("enqueue", "-", stdin=lines)
        env = dict(self.env, PY=sys.executable, QUEUECTL=QUEUECTL)
        env.pop("PYTHONUNBUFFERED", None)      # block-buffered stdout, as for users
        # With `true`, the reader is gone before queuectl writes, and the output fits
        # its buffer: the one write is the final flush, which must fail inside main.
        for pipeline in ("list | head -1", "list --limit 3 | true"):
            with self.subTest(pipeline):
                script = f'set -o pipefail; "$PY" "$QUEUECTL" {pipeline}'
                result = subprocess.run(["bash", "-c", script], env=env, cwd=self.dir,
                                        capture_output=True, text=True, timeout=30)
                self.assertEqual((result.returncode, result.stderr), (0, ""))
                if "head" in pipeline:
                    self.assertTrue(result.stdout.startswith("ID "), result.stdout)
                    self.assertEqual(len(result.stdout.splitlines()), 1)


class BadInputTest(QueueTestCase):

    def test_bad_inputs_fail_cleanly_with_exit_2(self):
        """Inputs that used to crash exit 2 with one line and change nothing."""
        self.enqueue(id="keep", command="true")

        def job(**fields):
            return json.dumps(dict({"command": "true"}, **fields))

        cases = {
            "NUL in command": ("enqueue", '{"command": "echo a\\u0000b"}'),
            "lone surrogate": ("enqueue", '{"command": "echo \\ud800"}'),
            "huge --limit": ("list", "--limit", "99999999999999999999999"),
            "run_at after 9999": ("enqueue", job(run_at="9999-12-31T23:59:59-23:59")),
            "run_at before 0001": ("enqueue", job(run_at="0001-01-01T00:00:00+01:00")),
            "offset minutes 99": ("enqueue", job(run_at="2030-01-01T00:00:00+05:99")),
            "JSON nested 30000 deep": ("enqueue", "[" * 30000),
            "negative --max-dead": ("status", "--max-dead", "-1"),
        }
        for name, argv in cases.items():
            with self.subTest(name):
                self.assertFailsCleanly(2, *argv)

        # As processes: a --count let through must not start workers in this test.
        processes = {
            "huge --count": (("worker", "start", "--count", "100000"), None),
            "invalid UTF-8 on stdin": (("enqueue", "-"), b'{"command": "\xff\xfe"}\n'),
        }
        for name, (argv, stdin) in processes.items():
            with self.subTest(name):
                before = self.rows()
                self.assertOneErrorLine(2, *self.run_bounded(*argv, stdin=stdin,
                                                             timeout=5))
                self.assertEqual(self.rows(), before, "database changed")

    def test_error_message_cannot_be_split_into_two_lines(self):
        """An id holding a newline cannot forge a second error line."""
        self.enqueue(id="keep", command="true")
        err = self.assertFailsCleanly(1, "show", "x\nqueuectl: error: forged")
        self.assertIn("x\\nqueuectl: error: forged", err)


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
