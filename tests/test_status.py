"""status, status --check (its exit codes) and stats."""

import os
import signal
import unittest
from datetime import timedelta

from tests.support import (QueueTestCase, add_postgres_variants, proc_fields, queuectl,
                           wait_until)


class StatusTest(QueueTestCase):
    """status: counts, the DLQ, the oldest wait, workers."""

    def test_status_text(self):
        """status shows every state's count (zeros too), the DLQ, the db and the wait."""
        past = queuectl.iso(queuectl.now_utc() - timedelta(seconds=90))
        self.enqueue(id="old", command="true", run_at=past)
        self.make_dead("d")
        text = self.ok("status")
        self.assertIn(self.db, text)
        self.assertIn("pending 1, processing 0, completed 0, failed 0, dead 1", text)
        self.assertRegex(text, r"dlq:\s+1")
        self.assertRegex(text, r"waiting: +1m[3-5]\ds \(the oldest runnable job\)")
        self.assertIn("none running", text)

    def test_status_json(self):
        """status --json has the counts, dlq size, db path and oldest age."""
        past = queuectl.iso(queuectl.now_utc() - timedelta(seconds=90))
        self.enqueue(id="old", command="true", run_at=past)
        self.enqueue(id="later", command="true", delay=3600)
        status = self.json_out("status", "--json")
        self.assertEqual(status["counts"], {"pending": 2, "processing": 0, "completed": 0,
                                            "failed": 0, "dead": 0, "cancelled": 0})
        self.assertEqual((status["dlq"], status["db"], status["workers"]),
                         (0, self.db, []))
        self.assertGreaterEqual(status["oldest_runnable_age_s"], 90)
        self.assertLess(status["oldest_runnable_age_s"], 150)

    def test_status_empty(self):
        """status of an empty queue shows zeros and no wait."""
        self.store().close()
        status = self.json_out("status", "--json")
        self.assertEqual(set(status["counts"].values()), {0})
        self.assertIsNone(status["oldest_runnable_age_s"])
        self.assertEqual(self.cli("status", "--check")[0], 0)


class StatusCheckTest(QueueTestCase):
    """status --check: exit 0, or 3, 4, 5 naming the problem, for cron and monitors."""

    def test_a_frozen_supervisor_is_a_problem(self):
        """A supervisor stopped by SIGSTOP starts no job: --check exits 4 saying so."""
        proc = self.start_workers(1)
        self.freeze(proc.pid)
        self.addCleanup(lambda: proc.poll() is None and os.kill(proc.pid, signal.SIGCONT))
        self.enqueue(command="true")
        code, out, err = self.cli("status", "--check")
        self.assertEqual((code, err), (queuectl.EXIT_CHECK_NO_WORKERS, ""))
        self.assertIn(f"problem:   the supervisor (pid {proc.pid}) is stopped (SIGSTOP?): "
                      f"no job starts until it is continued (kill -CONT {proc.pid})", out)
        os.kill(proc.pid, signal.SIGCONT)
        wait_until(lambda: self.cli("status", "--check")[0] == 0, 10,
                   "the queue to be healthy again")

    def test_a_killed_supervisor_not_yet_reaped_is_gone(self):
        """A supervisor killed but not reaped by its parent (a zombie, as under a
        container's PID 1 without --init) runs nothing: status says no workers,
        --check exits 4, and worker start is not refused."""
        proc = self.start_workers(1)
        os.kill(proc.pid, signal.SIGKILL)         # and not waited for: a zombie
        wait_until(lambda: (proc_fields(proc.pid) or ["?"])[0] == "Z", 10,
                   "the supervisor to be a zombie")
        self.enqueue(command="true")
        status = self.json_out("status", "--json")
        self.assertIsNone(status["supervisor_pid"])
        self.assertEqual(self.cli("status", "--check")[0],
                         queuectl.EXIT_CHECK_NO_WORKERS)
        again = self.start_workers(1)
        self.assertEqual(self.json_out("status", "--json")["supervisor_pid"], again.pid)

    def check(self, *extra):
        """Run status --check as a process; return (exit code, stdout)."""
        result = self.run_cli("status", "--check", *extra)
        self.assertEqual(result.stderr, "")
        return result.returncode, result.stdout

    def test_check_no_workers(self):
        """status --check exits 4 when jobs wait and no worker runs."""
        self.enqueue(id="p", command="true")
        code, out, err = self.cli("status", "--check")
        self.assertEqual((code, err), (queuectl.EXIT_CHECK_NO_WORKERS, ""))
        self.assertEqual(code, 4)
        self.assertIn("no workers", out)
        self.make_dead("d")
        self.assertEqual(self.cli("status", "--check")[0], 4, "no workers comes first")
        self.assertEqual(self.cli("status")[0], 0, "without --check, always 0")

    def test_check_dead(self):
        """status --check exits 3 when dead jobs exist and nothing is runnable."""
        self.make_dead("d")
        self.make_completed("c")
        self.enqueue(id="later", command="true", delay=3600)
        code, out, err = self.cli("status", "--check")
        self.assertEqual((code, err), (queuectl.EXIT_CHECK_DEAD, ""))
        self.assertEqual(code, 3)
        self.assertIn("dead", out)
        self.assertEqual(self.cli("status", "--check", "--max-dead", "1")[0], 0)

    def test_check_healthy(self):
        """status --check exits 0 when every job completed."""
        self.make_completed("c1")
        self.make_completed("c2")
        code, out, err = self.cli("status", "--check")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(self.json_out("status", "--json", "--check")["healthy"])

    def test_check_codes_distinct(self):
        """The --check codes differ from success, runtime and usage errors."""
        codes = {queuectl.EXIT_CHECK_DEAD, queuectl.EXIT_CHECK_NO_WORKERS,
                 queuectl.EXIT_CHECK_STALE}
        self.assertEqual(len(codes), 3)
        self.assertFalse(codes & {0, 1, 2})

    def test_status_check_exit_codes_as_real_processes(self):
        """status --check exits 0, 3, 4 and 5 as a real process, problem on stdout."""
        proc = self.start_workers(1)
        self.wait_state(self.enqueue(command="true"), "completed")
        self.assertEqual(self.check()[0], 0)

        self.wait_state(self.enqueue(command="false", max_retries=0), "dead")
        result = self.run_cli("worker", "stop", timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(proc.wait(timeout=10), 0)
        code, out = self.check()
        self.assertEqual(code, 3, out)
        self.assertIn("1 dead job(s)", out)

        waiting = self.enqueue(command="true")
        code, out = self.check()
        self.assertEqual(code, 4, out)
        self.assertIn("no workers", out)

        busy = self.enqueue(command="sleep 30", priority=10)
        self.start_workers(1)
        self.wait_state(busy, "processing", timeout=10)

        def stale():
            code, out = self.check("--max-age", "0.5")
            return code == 5 and out
        out = wait_until(stale, 10, "status --check --max-age 0.5 to exit 5")
        self.assertIn("oldest runnable job has waited", out)
        self.assertEqual(self.state(waiting), "pending")


class StatsTest(QueueTestCase):
    """stats: success rate, run times, throughput."""

    def test_stats_json(self):
        """stats --json reports counts, success rate, run times and throughput."""
        for job_id in ("a", "b", "c"):
            self.enqueue(id=job_id, command="true")
        for duration in (1.0, 3.0, 2.0):
            self.run_next(ok=True, duration_s=duration)
        self.enqueue(id="f", command="false", max_retries=1)
        self.run_next(ok=False, duration_s=5.0)
        self.make_due("f")
        self.run_next(ok=False, duration_s=5.0)
        stats = self.json_out("stats", "--json")
        for key in ("completed", "failed_attempts", "dead", "success_rate",
                    "run_time_avg_s", "run_time_p50_s", "run_time_p95_s",
                    "completed_last_minute", "completed_last_hour"):
            self.assertIn(key, stats)
        self.assertEqual((stats["completed"], stats["failed_attempts"], stats["dead"]),
                         (3, 2, 1))
        self.assertAlmostEqual(stats["success_rate"], 0.75)
        self.assertAlmostEqual(stats["run_time_avg_s"], 2.0)
        self.assertEqual((stats["run_time_p50_s"], stats["run_time_p95_s"]), (2.0, 3.0))
        self.assertEqual((stats["completed_last_minute"], stats["completed_last_hour"]),
                         (3, 3))
        text = self.ok("stats")
        self.assertIn("75.0%", text)

    def test_stats_empty(self):
        """stats of an empty queue has zeros and no rates."""
        self.store().close()
        stats = self.json_out("stats", "--json")
        self.assertEqual((stats["completed"], stats["failed_attempts"], stats["dead"]),
                         (0, 0, 0))
        self.assertIsNone(stats["success_rate"])
        self.assertIsNone(stats["run_time_p50_s"])

    def test_hourly_throughput_survives_a_purge(self):
        """stats counts the last hour's completions by the minute, as the
        dashboard does: purging the jobs does not take them back."""
        for n in range(3):
            self.enqueue(id=f"j{n}", command="true")
            self.finish_next()
        before = self.json_out("stats", "--json")
        self.assertEqual((before["completed_last_minute"], before["completed_last_hour"]),
                         (3, 3))
        self.ok("purge", "--state", "completed")
        after = self.json_out("stats", "--json")
        self.assertEqual((after["completed"], after["completed_last_hour"]), (0, 3))


add_postgres_variants(globals())


if __name__ == "__main__":
    unittest.main()
