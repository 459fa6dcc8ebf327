"""logs and logs --follow: a run's output as stored, and as it is written."""

import os
import shlex
import signal
import subprocess
import sys
import time
import unittest

from tests.support import (add_postgres_variants, QUEUECTL, QueueTestCase, claim_one,
                           failed, queuectl, wait_until)

q = shlex.quote


class LogsTest(QueueTestCase):
    """logs: a run's stdout and stderr as stored."""

    def test_logs_prints_a_runs_stdout_and_stderr(self):
        """logs prints the last run's stdout to stdout and stderr to stderr;
        --attempt N picks a run; --json gives both."""
        self.enqueue(id="j", command="x", max_retries=2)
        self.finish_next(failed(stdout="first out\n", stderr="first err\n"))
        self.make_due()
        self.finish_next(queuectl.RunResult(exit_code=0, stdout="second\n",
                                            stderr="", stdout_dropped=7))
        code, out, err = self.cli("logs", "j")
        self.assertEqual((code, out), (0, "second\n"))
        self.assertIn("first 7 bytes of stdout were not kept", err)
        self.assertEqual(self.cli("logs", "j", "--attempt", "1")[1:],
                         ("first out\n", "first err\n"))
        doc = self.json_out("logs", "j", "--attempt", "1", "--json")
        self.assertEqual((doc["run"], doc["outcome"], doc["stdout"], doc["stderr"]),
                         (1, "failed", "first out\n", "first err\n"))
        err = self.assertFailsCleanly(1, "logs", "j", "--attempt", "3")
        self.assertIn("has no run 3", err)
        self.assertFailsCleanly(1, "logs", "nope")
        self.assertFailsCleanly(2, "logs", "j", "--follow", "--json")
        self.enqueue(id="new", command="true")
        self.assertEqual(self.cli("logs", "new"), (0, "", "queuectl: job new has not run "
                                                          "yet\n"))

    def test_logs_json_of_a_job_not_run_has_every_field(self):
        self.enqueue(id="new", command="true")
        self.assertEqual(self.json_out("logs", "new", "--json"),
                         {"id": "new", "state": "pending", "run": None, "outcome": None,
                          "stdout": "", "stdout_dropped_bytes": 0, "stderr": "",
                          "stderr_dropped_bytes": 0})

    def test_logs_says_why_a_run_did_not_complete(self):
        """logs --follow of a run that failed says how it ended and what became
        of its job; logs of a run whose output was not kept says so."""
        self.enqueue(id="f", command="x", max_retries=1)
        self.finish_next(queuectl.RunResult(exit_code=3, reason="exit 3",
                                            stdout="partial\n"))
        # Run 1 only: without --attempt, it would wait for the retry.
        result = self.run_cli("logs", "f", "--follow", "--attempt", "1")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (6, "partial\n", "queuectl: run 1 of job f ended failed "
                                          "(exit 3); the job will be retried\n"))
        self.enqueue(id="i", command="x")
        store = self.store()
        claim = claim_one(store, 4321)
        store.requeue(claim.id, claim.token, queuectl.ABORT_COLD)
        store.close()
        self.assertEqual(self.cli("logs", "i"),
                         (0, "", "queuectl: run 1 of job i ended interrupted (cold "
                                 "stop); the job is back to pending; the run's output "
                                 "was not kept\n"))
        self.assertIsNotNone(self.job("i")["history"][0]["duration_s"])


class LogsFollowTest(QueueTestCase):
    """logs --follow: a job's output as it is written, through its retries, to how the
    job ends."""

    def follow(self, job_id):
        follower = subprocess.Popen([sys.executable, QUEUECTL, "logs", job_id, "--follow"],
                                    env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: follower.poll() is None and follower.kill())
        return follower

    def test_logs_follow_streams_output_as_it_is_written(self):
        """logs --follow prints a running job's output as it comes, and exits 0
        when the run completes (6 when it fails)."""
        self.start_workers(1)
        job_id = self.enqueue(command="echo one; echo err1 >&2; sleep 1.5; echo two")
        self.wait_state(job_id, "processing", timeout=10)
        follower = subprocess.Popen([sys.executable, QUEUECTL, "logs", job_id, "-f"],
                                    env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: follower.poll() is None and follower.kill())
        first = follower.stdout.readline()
        self.assertEqual(first, "one\n")
        self.assertEqual(self.state(job_id), "processing", "printed only at the end")
        out, err = follower.communicate(timeout=20)
        self.assertEqual((follower.returncode, first + out, err), (0, "one\ntwo\n",
                                                                    "err1\n"))
        bad = self.enqueue(command="echo x; exit 3", max_retries=0)
        result = self.run_cli("logs", bad, "--follow", timeout=20)
        self.assertEqual((result.returncode, result.stdout),
                         (queuectl.EXIT_NOT_COMPLETED, "x\n"))

    def test_logs_follow_prints_every_byte_once_even_if_not_text(self):
        """Output that is not UTF-8 text, written just before the run ends, is
        printed exactly once: the follower ends from the run's spool, not from
        the stored text (in which each bad byte became a U+FFFD)."""
        self.start_workers(1)
        tail = bytes(range(128, 256)) * 10
        job_id = self.enqueue(command="echo start; sleep 1; " + q(sys.executable) +
                              " -c 'import sys; sys.stdout.buffer.write(bytes(range("
                              "128, 256)) * 10)'")
        self.wait_state(job_id, "processing", timeout=10)
        follower = subprocess.run([sys.executable, QUEUECTL, "logs", job_id, "-f"],
                                  env=self.env, capture_output=True, timeout=30)
        self.assertEqual((follower.returncode, follower.stdout, follower.stderr),
                         (0, b"start\n" + tail, b""))

    def test_logs_follow_ends_for_a_job_that_ended_without_running(self):
        """A follower of a job that is cancelled, or dead through a dependency,
        before any run exits 6 at once (it used to wait forever)."""
        self.enqueue(id="first", command="false", max_retries=0)
        self.finish_next(failed())
        code, out, err = self.cli("enqueue", "-c", "true", "--id", "next",
                                  "--after", "first")
        self.assertEqual((code, out), (0, "next\n"))
        self.assertEqual(err, "queuectl: job next is dead already: its dependency first "
                              "is dead\n")
        self.assertEqual(self.state("next"), "dead")
        result = self.run_cli("logs", "next", "--follow")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (6, "", "queuectl: job next ended dead without running: "
                                 "dependency first is dead\n"))
        follower = subprocess.Popen(
            [sys.executable, QUEUECTL, "logs", self.enqueue(id="later", command="true",
                                                            delay="1h"), "--follow"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: follower.poll() is None and follower.kill())
        time.sleep(0.3)                          # let it start waiting for a run
        self.ok("cancel", "later")
        out, err = follower.communicate(timeout=10)
        self.assertEqual((follower.returncode, out, err),
                         (6, "", "queuectl: job later ended cancelled without running\n"))

    def test_logs_follow_of_a_job_a_cold_stop_put_back_follows_its_next_run(self):
        """It used to exit 6 at once, though the job runs again."""
        job_id = self.enqueue(command="echo run-$QUEUECTL_ATTEMPT; sleep 30")
        proc = self.start_workers(1)
        wait_until(lambda: "run-1" in self.cli("logs", job_id)[1], 10,
                   "the command to start")
        self.assertEqual(self.run_cli("worker", "stop", "--timeout", "0.5s",
                                      timeout=60).returncode, queuectl.EXIT_INTERRUPTED)
        proc.wait(timeout=30)
        self.assertEqual(self.state(job_id), "pending")
        follower = subprocess.Popen(
            [sys.executable, QUEUECTL, "logs", job_id, "--follow"], env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: follower.poll() is None and follower.kill())
        self.start_workers(1)
        # The interrupted run kept no output: this line is the next run's.
        self.assertEqual(follower.stdout.readline(), "run-1\n")
        self.ok("cancel", job_id)
        out, err = follower.communicate(timeout=20)
        self.assertEqual(follower.returncode, queuectl.EXIT_NOT_COMPLETED)
        self.assertIn("ended cancelled", err)

    def test_logs_follow_sees_a_job_through_its_retries(self):
        """Without --attempt, logs --follow says how a failed run ended and follows
        the retry, until the job completes (exit 0); it used to exit 6 at once."""
        self.ok("config", "set", "backoff_base", "1")         # retries 1 s later
        marker = q(self.path("marker"))
        job_id = self.enqueue(command=f"echo run-$QUEUECTL_ATTEMPT; test -e {marker} "
                                      f"|| {{ touch {marker}; echo oops >&2; exit 3; }}; "
                                      f"echo done")
        follower = self.follow(job_id)
        self.start_workers(1)
        out, err = follower.communicate(timeout=30)
        self.assertEqual((follower.returncode, out, err), (
            0, "run-1\nrun-2\ndone\n",
            f"oops\nqueuectl: run 1 of job {job_id} ended failed (exit 3); the job will "
            f"be retried\n"))
        self.assertEqual(self.job(job_id)["attempts"], 2)

    def test_logs_follow_exits_6_once_the_job_is_dead(self):
        """Following a job that fails every run ends with exit 6 when it is dead,
        having said how each run ended; a follower that joins during the backoff
        replays the failed run and waits for the next."""
        self.ok("config", "set", "backoff_base", "1")
        job_id = self.enqueue(command="echo run-$QUEUECTL_ATTEMPT; exit 3",
                              max_retries=1)
        follower = self.follow(job_id)
        self.start_workers(1)
        self.wait_state(job_id, ("failed", "processing", "dead"))
        late = self.follow(job_id)
        out, err = follower.communicate(timeout=30)
        ending = f"queuectl: run %d of job {job_id} ended failed (exit 3); the job %s\n"
        self.assertEqual((follower.returncode, out, err), (
            6, "run-1\nrun-2\n", ending % (1, "will be retried") +
            ending % (2, "is dead (in the DLQ)")))
        out, err = late.communicate(timeout=30)
        self.assertEqual(late.returncode, 6)
        self.assertTrue(out.endswith("run-2\n"), out)
        self.assertTrue(err.endswith(ending % (2, "is dead (in the DLQ)")), err)

    def test_a_follower_that_missed_a_runs_end_prints_it_before_the_next(self):
        """A follower that looks again only after its run ended and the next one
        ran (here: stopped meanwhile) prints the rest of its run and how it
        ended, then the next run whole."""
        self.ok("config", "set", "backoff_base", "1")
        job_id = self.enqueue(command="echo run-$QUEUECTL_ATTEMPT; sleep 0.5; exit 3",
                              max_retries=1)
        follower = self.follow(job_id)
        self.start_workers(1)
        self.assertEqual(follower.stdout.readline(), "run-1\n")
        os.kill(follower.pid, signal.SIGSTOP)
        self.addCleanup(lambda: follower.poll() is None and
                        os.kill(follower.pid, signal.SIGCONT))
        self.wait_state(job_id, "dead")
        os.kill(follower.pid, signal.SIGCONT)
        out, err = follower.communicate(timeout=30)
        self.assertEqual((follower.returncode, out, err), (
            6, "run-2\n",
            f"queuectl: run 1 of job {job_id} ended failed (exit 3); the job runs "
            f"again\nqueuectl: run 2 of job {job_id} ended failed (exit 3); the job is "
            f"dead (in the DLQ)\n"))


class OutputSpoolTest(QueueTestCase):
    """The spool a running job's output goes through: bounded, removed after its run."""

    def test_a_job_that_writes_without_end_stays_bounded(self):
        """A job that writes without end keeps only output_limit bytes of it while
        it runs, on disk too; --follow says what it skipped."""
        self.ok("config", "set", "output_limit", "10000")
        self.start_workers(1)
        job_id = self.enqueue(command="yes spam", timeout=3, max_retries=0)
        job = self.wait_state(job_id, "processing", timeout=10)
        token = self.job(job_id)["history"][0]
        spool = self.local + ".out"
        wait_until(lambda: os.path.isdir(spool) and os.listdir(spool), 5,
                   "the job's output to be spooled")
        follower = subprocess.run([sys.executable, QUEUECTL, "logs", job_id, "-f"],
                                  env=self.env, capture_output=True, timeout=30)
        self.assertEqual(follower.returncode, queuectl.EXIT_NOT_COMPLETED)
        self.assertIn(b"bytes of stdout skipped here", follower.stderr)
        job = self.wait_state(job_id, "dead")
        out = job["output"]
        self.assertEqual(len(out["stdout"]), 10000)
        self.assertGreater(out["stdout_dropped_bytes"], 1000000)
        # It stays a while for followers (SPOOL_LINGER_S), then goes.
        wait_until(lambda: os.listdir(spool) == [], queuectl.SPOOL_LINGER_S + 5,
                   "the spool to be removed after its run")
        self.assertTrue(token)

    def test_spool_stays_within_its_capacity_while_written(self):
        """While a job writes a lot, each spool file holds at most output_limit
        bytes after its header."""
        self.ok("config", "set", "output_limit", "4096")
        self.start_workers(1)
        job_id = self.enqueue(command="for i in $(seq 2000); do echo line $i; done; "
                                      "sleep 2")
        self.wait_state(job_id, "processing", timeout=10)
        spool = self.local + ".out"
        wait_until(lambda: os.path.isdir(spool) and len(os.listdir(spool)) == 2, 5,
                   "both streams to be spooled")
        sizes = [os.path.getsize(os.path.join(spool, name)) for name in os.listdir(spool)]
        self.assertLessEqual(max(sizes), queuectl.Spool.HEADER + 4096)
        result = self.run_cli("logs", job_id)
        self.assertTrue(result.stdout.endswith("line 2000\n"), result.stdout[-40:])
        self.assertIn("were not kept", result.stderr)


add_postgres_variants(globals())


if __name__ == "__main__":
    unittest.main()
