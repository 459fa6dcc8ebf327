"""The hot path with real processes: jobs sent ahead, output through pipes, start-up."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import unittest
from datetime import timedelta

from tests.support import QUEUECTL, QueueTestCase, pid_alive, proc_fields, queuectl, wait_until

q = shlex.quote


class DispatchTestCase(QueueTestCase):

    def make_quick(self, count=5):
        """Run a few quick jobs, so that idle workers are sent two jobs at a time."""
        for _ in range(count):
            self.wait_state(self.enqueue(command="true"), "completed")

    def batch(self, *jobs):
        lines = "".join(json.dumps(job) + "\n" for job in jobs)
        return self.ok("enqueue", "-", stdin=lines).split()



class DispatchTest(DispatchTestCase):

    def test_a_job_sent_ahead_is_given_back_when_the_current_one_runs_long(self):
        """A worker sent its next job early gives it back once its current job runs
        long: that job runs on the first worker free, not behind the long one."""
        proc = self.start_workers(2)
        busy = self.enqueue(command="sleep 2")
        self.wait_state(busy, "processing", timeout=10)
        self.make_quick()
        self.batch({"id": "long", "command": "sleep 8", "priority": 2},
                   {"id": "next", "command": "true", "priority": 1})
        job = self.wait_state("next", "completed", timeout=15)
        self.assertEqual(self.state("long"), "processing",
                         "the next job waited behind the long one")
        freed = self.job(busy)["history"][0]["worker_pid"]
        self.assertEqual([(h["number"], h["outcome"], h["worker_pid"])
                          for h in job["history"]], [(1, "completed", freed)])
        self.assertEqual(job["attempts"], 1)
        # Sent to the long job's worker first, given back unstarted, then run by
        # the one that came free: its start is logged once, by that worker.
        log = self.log_text(proc)
        self.assertEqual(log.count(": job next started"), 1, log)
        self.assertIn(f"(pid {freed}): job next started", log)
        self.assertNotIn(f"(pid {freed}): job long", log)

    def test_a_worker_killed_with_a_job_sent_ahead_loses_only_its_current_one(self):
        """kill -9 of a worker holding a job it had not started: that job is given
        back whole (no lost attempt); only the running one fails as worker lost."""
        proc = self.start_workers(1)
        self.make_quick()
        self.batch({"id": "killer", "command": "kill -9 $PPID", "priority": 2,
                    "max_retries": 0},
                   {"id": "victim", "command": "echo ok", "priority": 1})
        killer = self.wait_state("killer", "dead", timeout=15)
        self.assertEqual(killer["last_error"], queuectl.WORKER_LOST)
        victim = self.wait_state("victim", "completed", timeout=15)
        self.assertEqual([(h["number"], h["outcome"]) for h in victim["history"]],
                         [(1, "completed")])
        self.assertEqual((victim["attempts"], victim["output"]["stdout"]), (1, "ok\n"))
        log = self.log_text(proc)
        self.assertEqual(log.count(": job victim started"), 1, log)
        self.assertNotIn("Traceback", log)

    def test_output_far_larger_than_a_pipe_keeps_its_tail(self):
        """A job that writes 300 kB completes, keeping the last output_limit bytes
        and counting the rest as dropped."""
        self.ok("config", "set", "output_limit", "1000")
        self.start_workers(1)
        job_id = self.enqueue(command="head -c 300000 /dev/zero | tr '\\0' x; "
                                      "echo END; echo oops >&2")
        job = self.wait_state(job_id, "completed", timeout=20)
        out = job["output"]
        self.assertEqual(len(out["stdout"]), 1000)
        self.assertTrue(out["stdout"].endswith("xxxEND\n"), out["stdout"][-20:])
        self.assertEqual(out["stdout_dropped_bytes"], 300004 - 1000)
        self.assertEqual((out["stderr"], out["stderr_dropped_bytes"]), ("oops\n", 0))

    def test_a_daemon_holding_the_output_pipe_does_not_hold_the_job(self):
        """A job that starts a process in a session of its own, which keeps the
        job's stdout open, still completes when its shell exits."""
        self.start_workers(1)
        job_id = self.enqueue(command="setsid sleep 30 & echo started")
        job = self.wait_state(job_id, "completed", timeout=10)
        self.assertLess(job["history"][0]["duration_s"], 5)
        self.assertEqual(job["output"]["stdout"], "started\n")


class EventTimeTest(DispatchTestCase):
    """What the log and the database record happened when it happened, whatever
    batch writes it down."""

    def test_times_are_those_of_the_events_not_of_the_batch(self):
        """One worker, five 0.2 s jobs: each run ends at its start + its duration,
        before the next one starts, and updated_at sorts the jobs as they ran."""
        self.start_workers(1)
        self.make_quick()
        ids = self.batch(*[{"command": "sleep 0.2"} for _ in range(5)])
        for job_id in ids:
            self.wait_state(job_id, "completed", timeout=20)
        runs = []
        for job_id in ids:
            job = self.job(job_id)
            (run,) = job["history"]
            started, finished = (queuectl.parse_iso(run[k])
                                 for k in ("started_at", "finished_at"))
            self.assertAlmostEqual((finished - started).total_seconds(),
                                   run["duration_s"], delta=0.0021, msg=job_id)
            self.assertGreaterEqual(run["duration_s"], 0.2)
            self.assertEqual(job["updated_at"], run["finished_at"])
            runs.append((started, finished))
        for (_, finished), (started, _) in zip(runs, runs[1:]):
            self.assertLessEqual(finished, started)
        by_update = sorted(ids, key=lambda job_id: self.job(job_id)["updated_at"])
        self.assertEqual(by_update, ids)

    def test_each_start_is_logged_once_when_the_command_starts(self):
        """40 jobs through 2 workers log exactly 40 starts, each stamped no later
        than the job's recorded start, however often jobs were handed back."""
        proc = self.start_workers(2)
        self.make_quick()
        lines = [{"id": f"j{n}", "command": "sleep 0.05" if n % 3 else "true"}
                 for n in range(40)]
        ids = self.batch(*lines)
        for job_id in ids:
            self.wait_state(job_id, "completed", timeout=30)
        log = self.log_text(proc)
        for job_id in ids:
            started = [line for line in log.splitlines()
                       if f": job {job_id} started" in line]
            self.assertEqual(len(started), 1, log)
            stamp = queuectl.parse_iso(started[0].split()[0])
            recorded = queuectl.parse_iso(self.job(job_id)["history"][0]["started_at"])
            self.assertLess(abs((stamp - recorded).total_seconds()), 0.0021, job_id)


class ReviewFindingsTest(DispatchTestCase):
    """Failures a fresh-eyes review found in the first version of the hot path."""

    def test_big_commands_and_outputs_do_not_block_the_supervisor(self):
        """Commands and outputs larger than a pipe, both ways at once, flow."""
        proc = self.start_workers(2)
        filler = "x" * 70000
        command = (f": {filler}; head -c 70000 /dev/zero | tr '\\0' o; "
                   f"head -c 70000 /dev/zero | tr '\\0' e >&2")
        lines = "".join(json.dumps({"command": command}) + "\n" for _ in range(40))
        ids = self.ok("enqueue", "-", stdin=lines).split()
        wait_until(lambda: json.loads(self.ok("status", "--json"))["counts"]["completed"]
                   == len(ids), 60, "the big jobs to complete")
        self.assertIsNone(proc.poll())
        out = self.job(ids[-1])["output"]
        self.assertEqual((out["stdout"][-3:], out["stderr"][-3:]), ("ooo", "eee"))
        self.assertEqual(self.run_cli("worker", "stop", timeout=30).returncode, 0)

    def test_a_job_its_frozen_worker_never_started_is_not_charged(self):
        """A worker killed (frozen first) before it started the job it was sent:
        the job goes back unchanged and runs once on the next worker."""
        proc = self.start_workers(1)
        (worker,) = self.worker_pids(proc.pid, 1)
        os.kill(worker, signal.SIGSTOP)
        job_id = self.enqueue(command="echo ran", max_retries=0)
        wait_until(lambda: self.state(job_id) == "processing", 10,
                   "the job to be sent to the frozen worker")
        os.kill(worker, signal.SIGKILL)
        job = self.wait_state(job_id, "completed", timeout=15)
        self.assertEqual([(h["number"], h["outcome"]) for h in job["history"]],
                         [(1, "completed")])
        self.assertEqual(job["attempts"], 1)

    def test_a_worker_waits_quietly_while_a_stubborn_job_is_killed(self):
        """A job that ignores SIGTERM after its timeout: its worker waits out the
        grace without spinning."""
        self.start_workers(1)
        job_id = self.enqueue(command="trap '' TERM; sleep 30", timeout=1,
                              max_retries=0)
        job = self.wait_state(job_id, "processing", timeout=10)
        worker = job["worker_pid"]
        wait_until(lambda: queuectl.now_utc() > queuectl.parse_iso(
            job["history"][0]["started_at"]) + timedelta(seconds=1.2), 10,
            "the timeout to pass")

        def cpu():
            fields = proc_fields(worker)
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        before = cpu()
        job = self.wait_state(job_id, "dead", timeout=10)
        self.assertEqual(job["last_error"], "timeout after 1s")
        self.assertLess(cpu() - before, 0.3, "the worker spun during the kill grace")


if __name__ == "__main__":
    unittest.main()
