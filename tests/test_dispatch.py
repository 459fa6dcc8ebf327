"""How workers run jobs, with real processes: output and retries, order and start
times, jobs sent ahead, output through pipes, event times, and the processes a
job leaves behind."""

import json
import os
import shlex
import signal
import time
import unittest
from datetime import datetime, timedelta, timezone

from tests.support import (add_postgres_variants, pid_alive, proc_fields, queuectl,
                           QueueTestCase, wait_until)

q = shlex.quote
parse_iso = queuectl.parse_iso


def seconds_between(earlier, later):
    return (parse_iso(later) - parse_iso(earlier)).total_seconds()


class DispatchTestCase(QueueTestCase):

    def make_quick(self, count=5):
        """Run a few quick jobs, so that idle workers are sent two jobs at a time."""
        for _ in range(count):
            self.wait_state(self.enqueue(command="true"), "completed")

    def batch(self, *jobs):
        lines = "".join(json.dumps(job) + "\n" for job in jobs)
        return self.ok("enqueue", "-", stdin=lines).split()


class JobRunTest(QueueTestCase):
    """Jobs through real workers: output kept, retries after their backoff, order and
    start times."""

    def test_job_completes_and_output_is_captured(self):
        """A job completes and show --json holds its stdout and stderr."""
        self.start_workers(1)
        job_id = self.enqueue(command="echo to-out; echo to-err >&2")
        job = self.wait_state(job_id, "completed")
        self.assertEqual(job["attempts"], 1)
        self.assertIsNone(job["last_error"])
        self.assertEqual(job["output"]["stdout"], "to-out\n")
        self.assertEqual(job["output"]["stderr"], "to-err\n")
        self.assertEqual(job["output"]["stdout_dropped_bytes"], 0)
        self.assertEqual(len(job["history"]), 1)
        self.assertEqual(job["history"][0]["outcome"], "completed")
        self.assertEqual(job["history"][0]["exit_code"], 0)

    def test_failing_job_backs_off_goes_dead_and_dlq_retry_reruns_it(self):
        """A failing job retries after min(base**k, max), dies, and dlq retry reruns it."""
        base, maximum, retries = 1.5, 2, 2
        self.ok("config", "set", "backoff_base", str(base))
        self.ok("config", "set", "backoff_max", str(maximum))
        flag = self.path("flag")
        proc = self.start_workers(1)
        job_id = self.enqueue(command=f"test -e {shlex.quote(flag)} || exit 1",
                              max_retries=retries)
        job = self.wait_state(job_id, "dead", timeout=20)
        self.assertEqual(job["attempts"], retries + 1)
        self.assertEqual(job["last_error"], "exit 1")
        self.assertIsNone(job["next_retry_at"])
        history = job["history"]
        self.assertEqual([h["outcome"] for h in history], ["failed"] * (retries + 1))
        self.assertEqual([h["number"] for h in history], list(range(1, retries + 2)))
        for k in range(1, retries + 1):
            delay = min(base ** k, maximum)
            gap = seconds_between(history[k - 1]["finished_at"], history[k]["started_at"])
            self.assertGreaterEqual(gap, delay - 0.001, f"gap after attempt {k}")
            self.assertLess(gap, delay + 1.5, f"gap after attempt {k}")

        # Stop the workers so the job can be seen pending before it runs again.
        self.stop_workers(proc)
        code, out, err = self.cli("dlq", "retry", job_id)
        self.assertEqual((code, out, err), (0, f"{job_id}: back to pending\n", ""))
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0))
        self.assertIsNone(job["next_retry_at"])

        open(flag, "w").close()
        self.start_workers(1)
        job = self.wait_state(job_id, "completed")
        self.assertEqual(job["attempts"], 1)
        self.assertIsNone(job["last_error"])
        self.assertEqual([h["outcome"] for h in job["history"]],
                         ["failed"] * (retries + 1) + ["completed"])
        # Run numbers keep counting across dlq retry; attempts (above) start over.
        self.assertEqual([h["number"] for h in job["history"]],
                         list(range(1, retries + 3)))

    def test_missing_command_fails_cleanly(self):
        """A command that does not exist fails with exit 127, no traceback."""
        proc = self.start_workers(1)
        job_id = self.enqueue(command="queuectl-no-such-command-xyz", max_retries=0)
        job = self.wait_state(job_id, "dead")
        self.assertIn("127", job["last_error"])
        self.assertEqual(job["attempts"], 1)
        self.assertEqual(job["history"][0]["exit_code"], 127)
        self.assertIn("not found", job["output"]["stderr"])
        wait_until(lambda: job_id in self.log_text(proc), 5, "the job in the worker log")
        self.assertNotIn("Traceback", self.log_text(proc))

    def test_priority_then_run_at_then_age_order(self):
        """One worker runs queued jobs by priority, then run_at, then age."""
        out_file = shlex.quote(self.path("out"))
        past = (datetime.now(timezone.utc) - timedelta(hours=1)).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        specs = [("old0", {}), ("low", {"priority": -5}), ("new0", {}),
                 ("past0", {"run_at": past}), ("high", {"priority": 10}),
                 ("mid", {"priority": 5})]
        for name, extra in specs:
            self.enqueue(id=name, command=f"echo {name} >> {out_file}", **extra)
        self.start_workers(1)
        wait_until(lambda: self.count("completed") == len(specs), 20, "all jobs completed")
        self.assertEqual(self.read("out").split(),
                         ["high", "mid", "past0", "old0", "new0", "low"])

    def test_delayed_jobs_do_not_start_before_run_at(self):
        """Jobs with delay or a future run_at (Z or offset) start at their time."""
        self.start_workers(1)
        soon = datetime.now(timezone.utc) + timedelta(seconds=1.5)
        given = {
            "zulu": soon.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "plus0": soon.isoformat(),
            "plus2": soon.astimezone(timezone(timedelta(hours=2))).isoformat(),
        }
        self.assertTrue(given["plus0"].endswith("+00:00"))
        for name, run_at in given.items():
            self.enqueue(id=name, command="true", run_at=run_at, priority=1)
        self.enqueue(id="delayed", command="true", delay=2, priority=1)
        # A due job of lower priority: a claim happens while the others must wait.
        self.wait_state(self.enqueue(command="true"), "completed")
        for name in [*given, "delayed"]:
            job = self.wait_state(name, "completed", timeout=10)
            started = job["history"][0]["started_at"]
            self.assertGreaterEqual(started, job["run_at"], f"{name} started early")
            self.assertLess(seconds_between(job["run_at"], started), 1.5, name)
            if name == "delayed":
                wanted = parse_iso(job["created_at"]) + timedelta(seconds=2)
            else:
                wanted = soon
            self.assertLess(abs((parse_iso(job["run_at"]) - wanted).total_seconds()),
                            0.002, f"run_at of {name}")

    def test_idle_worker_starts_a_new_job_promptly(self):
        """An idle worker starts a newly enqueued job well before its idle recheck."""
        self.start_workers(1)
        first = self.enqueue(command="true")
        self.wait_state(first, "completed")
        # The scenario, not a wait: the worker has just gone idle; let it sit a while.
        # Its periodic recheck (IDLE_RECHECK_S = 1s) is then ~0.75s away, so only a
        # wake-up on the enqueue itself starts the job within 0.5s.
        time.sleep(0.25)
        job_id = self.enqueue(command="true")
        job = self.wait_state(job_id, "completed")
        self.assertLess(seconds_between(job["created_at"], job["history"][0]["started_at"]),
                        0.5)

    def test_running_workers_see_config_changes(self):
        """A job_timeout set while workers run applies to the next job."""
        self.start_workers(1)
        first = self.enqueue(command="true")
        self.wait_state(first, "completed")
        self.assertEqual(self.ok("config", "set", "job_timeout", "1"), "job_timeout = 1\n")
        job_id = self.enqueue(command="sleep 5", max_retries=0)
        job = self.wait_state(job_id, "dead", timeout=10)
        self.assertEqual(job["last_error"], "timeout after 1s")
        self.assertEqual(job["timeout"], 1)
        self.assertLess(job["history"][0]["duration_s"], 1 + queuectl.KILL_GRACE_S + 1)

    def test_four_workers_run_200_jobs_each_exactly_once(self):
        """Four workers run 200 jobs; every job runs exactly once."""
        out_file = shlex.quote(self.path("out"))
        ids = [f"job-{n:03d}" for n in range(200)]
        lines = "".join(json.dumps({"id": i, "command": f"echo {i} >> {out_file}"}) + "\n"
                        for i in ids)
        self.assertEqual(self.ok("enqueue", "-", stdin=lines).split(), ids)
        self.start_workers(4)
        wait_until(lambda: self.count("completed") == 200, 40, "200 completed jobs")
        written = self.read("out").splitlines()
        self.assertEqual(len(written), 200)
        self.assertEqual(sorted(written), ids)
        self.assertEqual({j["attempts"] for j in self.jobs()}, {1})


class SentAheadTest(DispatchTestCase):
    """A worker sent its next job before it is free: the job is given back whole if the
    worker cannot start it."""

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


class OutputPipeTest(DispatchTestCase):
    """Commands and output through pipes, however big, never block a job or the
    supervisor."""

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
            # Both are stamped to the millisecond. On PostgreSQL the record goes
            # by the server's clock, read in a round trip: a little more slack.
            slack = 0.0021 + (0.01 if self.postgres else 0)
            self.assertLess(abs((stamp - recorded).total_seconds()), slack, job_id)


class JobProcessTest(QueueTestCase):
    """A job's processes: what it leaves running, a timeout and its kill grace, signals
    it inherits."""

    def test_what_a_command_leaves_running_is_killed_when_it_exits(self):
        """A background process a job leaves in its group dies when the job exits."""
        self.start_workers(1)
        job_id = self.enqueue(command=f"sleep 60 & echo $! > {q(self.path('bg.pid'))}")
        self.wait_state(job_id, "completed", timeout=10)
        pid = int(wait_until(lambda: self.read("bg.pid").strip(), 5,
                             "the background pid file"))
        self.addCleanup(self.kill_stray, pid, "sleep")
        wait_until(lambda: not pid_alive(pid), 5, f"background sleep {pid} to be gone")

    def test_timeout_kills_the_jobs_grandchild(self):
        """A timed-out job's background grandchild is killed with it."""
        pidfile = self.path("grandchild.pid")
        inner = f"sleep 60 & echo $! > {shlex.quote(pidfile)}; wait"
        self.start_workers(1)
        job_id = self.enqueue(command=f"sh -c {shlex.quote(inner)}", timeout=1,
                              max_retries=0)
        pid = int(wait_until(lambda: self.read("grandchild.pid").strip(), 10,
                             "the grandchild's pid file"))
        self.addCleanup(self.kill_stray, pid, "sleep")
        job = self.wait_state(job_id, "dead", timeout=10)
        self.assertEqual(job["last_error"], "timeout after 1s")
        self.assertLess(job["history"][0]["duration_s"], 1 + queuectl.KILL_GRACE_S + 1)
        wait_until(lambda: not pid_alive(pid), 5, f"grandchild {pid} to be gone")

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


add_postgres_variants(globals())


if __name__ == "__main__":
    unittest.main()
