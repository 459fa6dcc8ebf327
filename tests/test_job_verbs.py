"""The verbs that act on jobs: cancel, pause and resume, wait, purge, delete, and
dlq retry; in-process and against real workers."""

import json
import os
import shlex
import subprocess
import sys
import time
import unittest
from datetime import timedelta

from tests.support import (add_postgres_variants, OK, QUEUECTL, QueueTestCase, claim_one,
                           failed, group_members, proc_fields, queuectl, wait_until)

q = shlex.quote


class CancelTest(QueueTestCase):
    """cancel: a job ends at once, killed if it runs, never retried."""

    def test_cancel_pending_and_failed_jobs(self):
        """cancel ends pending and failed jobs at once: no retry, not in the DLQ,
        counted and listed as cancelled, kept with their history."""
        self.enqueue(id="a", command="true")
        self.enqueue(id="b", command="false", max_retries=3, priority=9)
        self.finish_next(failed())                       # b is now failed, retrying
        self.assertEqual(self.state("b"), "failed")
        self.assertEqual(self.ok("cancel", "a", "b"), "a: cancelled\nb: cancelled\n")
        for job_id in ("a", "b"):
            job = self.job(job_id)
            self.assertEqual(job["state"], "cancelled")
            self.assertIsNone(job["next_retry_at"])
        self.assertEqual(len(self.job("b")["history"]), 1)   # its failed run is kept
        status = self.json_out("status", "--json")
        self.assertEqual((status["counts"]["cancelled"], status["dlq"]), (2, 0))
        self.assertEqual([j["id"] for j in self.json_out("list", "--state", "cancelled",
                                                         "--json")], ["b", "a"])
        self.assertEqual(self.claimable(), [])
        self.assertIn("cancelled 2", self.ok("status"))

    def test_cancel_refuses_finished_and_unknown_jobs_naming_each(self):
        """Cancelling completed, dead, cancelled or unknown jobs exits 1, names
        every one in one line, and changes nothing, not even the good ids."""
        self.enqueue(id="done", command="true", priority=3)
        self.finish_next()
        self.enqueue(id="gone", command="false", max_retries=0, priority=2)
        self.finish_next(failed())
        self.enqueue(id="off", command="true")
        self.ok("cancel", "off")
        self.enqueue(id="fine", command="true")
        err = self.assertFailsCleanly(1, "cancel", "fine", "done", "gone", "off", "nope")
        for part in ("job done: it is completed", "job gone: it is dead",
                     "job off: it is cancelled", "no such job: nope"):
            self.assertIn(part, err)
        self.assertEqual(self.state("fine"), "pending")

    def test_cancel_kills_a_running_job_within_a_second(self):
        """cancel of a running job kills its whole process group within a second,
        wherever its worker is; the run ends cancelled with its output kept."""
        proc = self.start_workers(2)
        pid_file = self.path("pid")
        job_id = self.enqueue(command=f"echo started; echo $$ > {q(pid_file)}; "
                                      f"sleep 60 & sleep 60")
        self.wait_state(job_id, "processing", timeout=10)
        shell = int(wait_until(lambda: self.read("pid").strip(), 10, "the job's pid"))
        self.assertTrue(group_members(shell))
        # In-process: the second measured is the cancel's, not a Python start's
        # (which, importing psycopg for PostgreSQL, takes half of it).
        started = time.monotonic()
        self.assertEqual(self.cli("cancel", job_id),
                         (0, f"{job_id}: cancelled (its run was killed)\n", ""))
        wait_until(lambda: not group_members(shell), 5, "the job's processes to die")
        self.assertLess(time.monotonic() - started, 1.5)
        job = self.job(job_id)
        self.assertEqual(job["state"], "cancelled")
        self.assertEqual([(h["outcome"], h["reason"]) for h in job["history"]],
                         [("cancelled", "cancelled")])
        wait_until(lambda: self.job(job_id)["output"] and
                   self.job(job_id)["output"]["stdout"] == "started\n", 10,
                   "the run's output to be kept")
        wait_until(lambda: f"job {job_id} was cancelled" in self.log_text(proc), 10,
                   "the supervisor to log the cancel")
        shown = [line for line in self.ok("show", job_id).splitlines()
                 if line.startswith("  run 1:")]
        self.assertRegex(shown[0], r"  cancelled \(killed by SIGTERM\)  \(worker pid \d+\)$")
        # The worker is free again.
        self.wait_state(self.enqueue(command="true"), "completed")
        self.assertNotIn("Traceback", self.log_text(proc))

    def test_cancel_races_finishing_jobs(self):
        """Cancels fired as short jobs finish: each job ends either completed (the
        cancel refused) or cancelled (its run, if any, ended), never both."""
        self.start_workers(2)
        outcomes = set()
        for n in range(16):
            job_id = self.enqueue(command=f"sleep 0.0{n % 4}")
            time.sleep(0.002 * (n % 8))
            result = self.run_cli("cancel", job_id)
            self.assertNotIn("Traceback", result.stderr)
            job = wait_until(lambda: self.job(job_id)["state"] in ("completed",
                                                                   "cancelled")
                             and self.job(job_id), 10, f"job {job_id} to end")
            if result.returncode == 0:
                self.assertEqual(job["state"], "cancelled", job)
                self.assertNotIn("completed", [h["outcome"] for h in job["history"]])
            else:
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertIn("it is completed", result.stderr)
                self.assertEqual(job["state"], "completed")
            outcomes.add(job["state"])
            runs = [h for h in job["history"] if h["outcome"] == "running"]
            wait_until(lambda: not [h for h in self.job(job_id)["history"]
                                    if h["outcome"] == "running"], 10, "no run left open")
        status = json.loads(self.ok("status", "--json"))
        self.assertEqual(status["counts"]["processing"], 0)
        self.assertEqual(status["counts"]["completed"] + status["counts"]["cancelled"], 16)


class PauseTest(QueueTestCase):
    """pause and resume: no claims while paused."""

    def test_pause_and_resume_in_status_and_claims(self):
        """pause stops claims and shows in status (text and JSON); resume undoes
        it; both say what they did, twice over too."""
        self.enqueue(id="a", command="true")
        out = self.ok("pause")
        self.assertTrue(out.startswith("paused since "), out)
        self.assertEqual(self.ok("pause"), out)              # already paused: the same
        self.assertEqual(self.claimable(), [])
        status = self.json_out("status", "--json")
        self.assertTrue(status["paused"])
        self.assertTrue(status["paused_since"].endswith("Z"))
        self.assertIn("paused:    since", self.ok("status"))
        # Waiting jobs of a paused queue are no sign of missing workers.
        code, out, _ = self.cli("status", "--check")
        self.assertEqual(code, 0, out)
        self.assertTrue(self.ok("resume").startswith("resumed (paused since "))
        self.assertEqual(self.ok("resume"), "the queue was not paused\n")
        self.assertEqual(self.claimable(), ["a"])
        self.assertEqual(self.cli("status", "--check")[0], queuectl.EXIT_CHECK_NO_WORKERS)

    def test_pause_holds_new_jobs_across_restarts_until_resume(self):
        """pause stops claims (a running job goes on), lasts across a restart of
        the workers, and resume starts the held jobs."""
        proc = self.start_workers(1)
        running = self.enqueue(command="sleep 1")
        self.wait_state(running, "processing", timeout=10)
        self.ok("pause")
        held = self.enqueue(command="true")
        self.wait_state(running, "completed", timeout=10)
        # What is under test is an absence: longer than the 1 s safety net.
        time.sleep(1.5)
        self.assertEqual(self.state(held), "pending")
        result = self.run_cli("worker", "stop", timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(proc.wait(timeout=10), 0)
        self.start_workers(1)
        time.sleep(1.5)
        self.assertEqual(self.state(held), "pending")
        self.ok("resume")
        self.wait_state(held, "completed", timeout=10)

    def test_pause_and_resume_without_a_database_say_what_creates_one(self):
        """pause and resume on a missing database fail (exit 1), create nothing,
        and name the commands that create a database."""
        for argv in (("pause",), ("resume",)):
            with self.subTest(argv=argv):
                err = self.assertFailsCleanly(1, *argv)
                self.assertEqual(err, f"queuectl: error: no database at {self.db} "
                                      f"(enqueue, config set or worker start creates "
                                      f"it)\n")
                self.assertEqual(os.listdir(self.dir), [])
                self.assertFalse(self.db_exists())
                if self.postgres:                    # not even an empty schema
                    self.assertEqual(self.sql("SELECT 1 FROM pg_namespace WHERE nspname = ?",
                                              (queuectl.pg_url(self.db)[1],)), [])


class WaitTest(QueueTestCase):
    """wait: until jobs end, with their verdict."""

    def test_wait_times_out_with_124(self):
        """wait --timeout ends with 124 and names the jobs still waited for."""
        self.enqueue(id="slow", command="true")
        started = time.monotonic()
        code, out, err = self.cli("wait", "slow", "--timeout", "0.3")
        self.assertEqual(code, queuectl.EXIT_TIMEOUT)
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        self.assertIn("still waiting for slow", err)
        code, out, _ = self.cli("wait", "slow", "--timeout", "0.1", "--json")
        self.assertEqual(json.loads(out), {"jobs": [{"id": "slow", "state": "pending",
                                                     "last_error": None,
                                                     "finished": False}],
                                           "completed": False, "timed_out": True})

    def test_wait_for_finished_jobs_returns_their_verdict(self):
        """wait on jobs already finished returns at once: 0 if all completed, 6 if
        one ended dead or cancelled."""
        self.enqueue(id="ok", command="true", priority=2)
        self.finish_next()
        self.assertEqual(self.cli("wait", "ok"), (0, "ok: completed\n", ""))
        self.enqueue(id="bad", command="false", max_retries=0)
        self.finish_next(failed())
        code, out, _ = self.cli("wait", "ok", "bad")
        self.assertEqual((code, out), (queuectl.EXIT_NOT_COMPLETED,
                                       "ok: completed\nbad: dead (exit 1)\n"))

    def test_wait_refuses_unknown_ids(self):
        """wait on ids that do not exist exits 1 naming each of them."""
        self.enqueue(id="real", command="true")
        err = self.assertFailsCleanly(1, "wait", "real", "ghost", "phantom")
        self.assertIn("no such job: ghost; no such job: phantom", err)

    def test_wait_blocks_until_jobs_end_and_costs_little(self):
        """wait returns when its jobs end, with their verdict, and uses little CPU
        while it waits."""
        self.start_workers(2)
        slow = self.enqueue(command="sleep 2")
        bad = self.enqueue(command="exit 1", max_retries=0)
        waiter = subprocess.Popen([sys.executable, QUEUECTL, "wait", slow, bad],
                                  env=self.env, stdout=subprocess.PIPE, text=True)
        self.addCleanup(lambda: waiter.poll() is None and waiter.kill())
        wait_until(lambda: self.state(slow) == "processing", 10, "the slow job")
        time.sleep(1)           # the span measured: the waiter waits, nothing else
        fields = proc_fields(waiter.pid)
        cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        out, _ = waiter.communicate(timeout=20)
        self.assertEqual(waiter.returncode, queuectl.EXIT_NOT_COMPLETED)
        self.assertEqual(sorted(out.splitlines()),
                         sorted([f"{slow}: completed", f"{bad}: dead (exit 1)"]))
        self.assertLess(cpu_s, 0.5, "wait used the CPU while it waited")


class PurgeTest(QueueTestCase):
    """purge and retention: old finished jobs deleted with their history."""

    def test_purge_deletes_old_finished_jobs_with_their_history(self):
        """purge --state S --older-than D deletes those jobs, their runs and output,
        and prints how many; newer jobs and other states stay."""
        now = queuectl.now_utc()
        for n in range(3):
            self.enqueue(id=f"old{n}", command="true", priority=5)
            self.finish_next(now=now - timedelta(hours=3))
        self.enqueue(id="new", command="true", priority=4)
        self.finish_next(now=now - timedelta(minutes=5))
        self.enqueue(id="dead", command="false", max_retries=0, priority=3)
        self.finish_next(failed(), now=now - timedelta(hours=3))
        self.assertEqual(self.ok("purge", "--state", "completed", "--older-than", "2h"),
                         "purged 3 completed job(s) older than 2h\n")
        left = {j["id"] for j in self.json_out("list", "--json")}
        self.assertEqual(left, {"new", "dead"})
        self.assertEqual(self.sql(
            "SELECT count(*) FROM attempts WHERE job_id LIKE 'old%'")[0][0], 0)
        counts = self.json_out("status", "--json")["counts"]
        self.assertEqual((counts["completed"], counts["dead"]), (1, 1))
        self.assertEqual(self.ok("purge", "--state", "dead"), "purged 1 dead job(s)\n")
        self.assertFailsCleanly(2, "purge", "--state", "pending")
        self.assertFailsCleanly(2, "purge", "--state", "completed", "--older-than", "soon")
        self.assertFailsCleanly(2, "purge")

    def test_purge_takes_several_states(self):
        for job_id, result in (("ok", OK), ("bad", failed())):
            self.enqueue(id=job_id, command="x", max_retries=0)
            self.finish_next(result)
        self.assertEqual(self.ok("purge", "--state", "completed", "--state", "dead"),
                         "purged 1 completed job(s)\npurged 1 dead job(s)\n")
        self.assertEqual(self.json_out("list", "--json"), [])

    def test_purge_while_workers_run(self):
        """purge while workers complete jobs: no error, no job lost, counts right."""
        self.start_workers(2)
        lines = "".join(json.dumps({"command": "true"}) + "\n" for _ in range(300))
        ids = self.ok("enqueue", "-", stdin=lines).split()
        purged = 0
        while True:
            result = self.run_cli("purge", "--state", "completed")
            self.assertEqual((result.returncode, result.stderr), (0, ""))
            purged += int(result.stdout.split()[1])
            status = json.loads(self.ok("status", "--json"))
            if sum(status["counts"].values()) == 0:
                break
        self.assertEqual(purged, len(ids))
        self.assertEqual(json.loads(self.ok("list", "--json")), [])

    def test_retention_purges_completed_jobs_on_its_own(self):
        """With retention set, the supervisor purges completed jobs older than it."""
        self.ok("config", "set", "retention", "1s")
        proc = self.start_workers(1)
        ids = [self.enqueue(command="true") for _ in range(3)]
        for job_id in ids:
            self.wait_state(job_id, "completed")
        result = self.run_cli("worker", "stop", timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(proc.wait(timeout=10), 0)
        time.sleep(1.1)         # the jobs age past the retention
        keep = self.enqueue(command="sleep 30")
        proc = self.start_workers(1)
        wait_until(lambda: "purged 3 completed job(s)" in self.log_text(proc), 10,
                   "the supervisor to purge")
        self.assertEqual([j["id"] for j in json.loads(self.ok("list", "--json"))], [keep])


class DeleteTest(QueueTestCase):
    """delete: jobs and their history go."""

    def test_delete(self):
        """delete removes jobs and their history."""
        self.enqueue(id="a", command="true")
        self.enqueue(id="b", command="true")
        self.make_completed("c")
        self.make_dead("d")
        out = self.ok("delete", "a", "c", "d")
        self.assertEqual(out.splitlines(), ["a: deleted", "c: deleted", "d: deleted"])
        self.assertEqual([j["id"] for j in self.json_out("list", "--json")], ["b"])
        self.assertEqual(self.rows()["attempts"], [])
        self.assertFailsCleanly(1, "show", "a")

    def test_delete_processing_job(self):
        """A job that is running cannot be deleted."""
        self.enqueue(id="busy", command="sleep 100")
        claim = claim_one(self.store(), 9999)
        self.assertEqual(claim.id, "busy")
        err = self.assertFailsCleanly(1, "delete", "busy")
        self.assertIn("processing", err)
        self.assertEqual(self.state("busy"), "processing")


class DlqRetryTest(QueueTestCase):
    """dlq retry: dead jobs back to pending, unless a dependency or a unique key keeps
    them dead."""

    def test_dlq_retry_all(self):
        """dlq retry --all puts every dead job back to pending with attempts 0."""
        self.make_dead("d1")
        self.make_dead("d2")
        self.enqueue(id="p", command="true")
        out = self.ok("dlq", "retry", "--all")
        self.assertEqual(sorted(out.splitlines()),
                         ["d1: back to pending", "d2: back to pending"])
        for job_id in ("d1", "d2"):
            job = self.job(job_id)
            self.assertEqual((job["state"], job["attempts"]), ("pending", 0))
        self.assertEqual(self.json_out("dlq", "list", "--json"), [])

    def test_dlq_retry_ids(self):
        """dlq retry ID retries only that job."""
        self.make_dead("d1")
        self.make_dead("d2")
        self.assertEqual(self.ok("dlq", "retry", "d2"), "d2: back to pending\n")
        self.assertEqual((self.state("d1"), self.state("d2")), ("dead", "pending"))

    def test_dlq_retry_pending_job(self):
        """dlq retry of a job that is not dead fails and names its state."""
        self.enqueue(id="p1", command="true")
        self.make_dead("d1")
        err = self.assertFailsCleanly(1, "dlq", "retry", "d1", "p1")
        self.assertIn("pending", err)
        self.assertEqual(self.state("d1"), "dead")

    def test_dlq_retry_names_every_bad_id(self):
        """dlq retry of several bad ids names each one, and retries none."""
        self.make_dead("d")
        self.enqueue(id="p", command="true")
        err = self.assertFailsCleanly(1, "dlq", "retry", "d", "p", "x", "y")
        self.assertIn("cannot retry job p: it is pending; no such job: x; no such job: y",
                      err)
        self.assertEqual(self.state("d"), "dead")

    def test_a_dependant_is_never_retried_after_its_unfinished_dependency_went(self):
        """Deleting or purging a dependency that did not complete does not free
        its dead dependants to run without it; one that completed does."""
        self.enqueue(id="p", command="sleep 30", delay="1h")
        self.enqueue(id="c", command="echo c ran", after=["p"])
        self.ok("cancel", "p")
        self.assertEqual(self.job("c")["last_error"], "dependency p was cancelled")
        self.assertEqual(self.ok("purge", "--state", "cancelled"),
                         "purged 1 cancelled job(s)\n")
        err = self.assertFailsCleanly(1, "dlq", "retry", "c")
        self.assertIn("cannot retry job c: its dependency p was deleted before it "
                      "completed", err)
        self.assertEqual(self.job("c")["after"], [{"id": "p", "state": "deleted"}])
        self.assertIn("after:         p (deleted)", self.ok("show", "c"))
        # A new job that takes the old one's id does not stand in for it.
        self.enqueue(id="p", command="true", priority=99)
        self.finish_next()
        self.assertEqual(self.state("p"), "completed")
        self.assertIn("its dependency p was deleted before it completed",
                      self.assertFailsCleanly(1, "dlq", "retry", "c"))
        self.assertEqual(self.job("c")["after"], [{"id": "p", "state": "deleted"}])
        self.ok("delete", "c")                           # and its marks go with it
        self.assertEqual(self.rows()["deps"], [])

        self.enqueue(id="a", command="true", priority=9)
        self.finish_next()                                 # a completed
        self.enqueue(id="b", command="false", max_retries=0)
        self.enqueue(id="d", command="true", after=["a", "b"])
        self.finish_next(failed())                         # b dead, so d dead
        self.ok("delete", "a")
        self.ok("dlq", "retry", "b", "d")                  # a had completed: fine
        self.assertEqual(self.job("d")["after"], [{"id": "b", "state": "pending"}])
        self.assertEqual(self.claimable(), ["b"])

    def test_retry_all_retries_every_dead_job_it_can(self):
        """--all is not blocked by a dead job whose dependency was cancelled: it
        retries the others, and says which stay dead and why."""
        self.enqueue(id="fails", command="false", max_retries=0)
        self.finish_next(failed())
        self.enqueue(id="mid", command="true", delay="1h")
        self.enqueue(id="tail", command="true", after=["mid"])
        self.enqueue(id="end", command="true", after=["tail"])
        self.ok("cancel", "mid")
        self.assertEqual([self.state(j) for j in ("fails", "tail", "end")],
                         ["dead"] * 3)
        err = self.assertFailsCleanly(1, "dlq", "retry", "tail", "fails")
        self.assertIn("cannot retry job tail: its dependency mid was cancelled and "
                      "cannot run again", err)
        self.assertNotIn("retry them together", err)
        code, out, err = self.cli("dlq", "retry", "--all")
        self.assertEqual((code, out), (0, "fails: back to pending\n"))
        self.assertEqual(err, "queuectl: job tail stays dead: its dependency mid was "
                              "cancelled and cannot run again\n"
                              "queuectl: job end stays dead: its dependency tail stays "
                              "dead too\n")
        self.assertEqual([self.state(j) for j in ("fails", "tail", "end")],
                         ["pending", "dead", "dead"])

    def test_retrying_jobs_that_share_a_unique_key(self):
        """Two dead jobs with one unique key are not retried together, nor one
        whose key an unfinished job holds: refused naming the holder, no raw
        SQLite error; --all retries the first."""
        for job_id in ("u1", "u3"):
            self.enqueue(id=job_id, command="false", max_retries=0, unique_key="nightly")
            self.finish_next(failed())
        err = self.assertFailsCleanly(1, "dlq", "retry", "u1", "u3")
        self.assertIn("cannot retry job u3: job u1, retried with it, has the same unique "
                      "key 'nightly'", err)
        code, out, err = self.cli("dlq", "retry", "--all")
        self.assertEqual((code, out, err),
                         (0, "u1: back to pending\n", "queuectl: job u3 stays dead: "
                                                      "job u1, retried with it, has the "
                                                      "same unique key 'nightly'\n"))
        err = self.assertFailsCleanly(1, "dlq", "retry", "u3")
        self.assertIn("job u1 holds its unique key 'nightly'", err)

    def test_a_job_that_stays_dead_holds_no_unique_key_for_retry_all(self):
        self.enqueue(id="c", command="true", delay="1h")
        self.enqueue(id="a", command="true", unique_key="k", after=["c"])
        self.ok("cancel", "c")                                   # a: dead
        self.enqueue(id="b0", command="false", max_retries=0, unique_key="k")
        self.finish_next(failed())                               # b0: dead
        code, out, err = self.cli("dlq", "retry", "--all")
        self.assertEqual((code, out), (0, "b0: back to pending\n"))
        self.assertIn("job a stays dead: its dependency c was cancelled", err)

    def test_a_key_goes_to_the_first_job_that_does_go_back(self):
        """d stays dead (an unfinished job holds its key), so
        a, after d, stays dead too, and its key k must not keep b dead."""
        self.enqueue(id="d", command="false", max_retries=0, unique_key="k2")
        self.finish_next(failed())
        self.cli("enqueue", "-c", "true", "--id", "a", "--unique-key", "k",
                 "--after", "d")                                   # dead at once
        self.enqueue(id="b", command="false", max_retries=0, unique_key="k")
        self.finish_next(failed())
        self.enqueue(id="h", command="true", delay="1h", unique_key="k2")
        code, out, err = self.cli("dlq", "retry", "--all")
        self.assertEqual((code, out, err),
                         (0, "b: back to pending\n",
                          "queuectl: job d stays dead: job h holds its unique key "
                          "'k2'\nqueuectl: job a stays dead: its dependency d stays "
                          "dead too\n"))

    def test_a_dead_dependency_that_can_never_run_is_named_as_such(self):
        self.enqueue(id="e", command="true", delay="1h")
        self.enqueue(id="f", command="true", after=["e"])
        self.enqueue(id="f2", command="true", after=["f"])
        self.ok("cancel", "e")
        err = self.assertFailsCleanly(1, "dlq", "retry", "f2")
        self.assertIn("its dependency f can never run again (job e, before it, was "
                      "cancelled)", err)
        self.assertNotIn("retry them together", err)
        self.assertEqual(self.cli("logs", "f2"),
                         (0, "", "queuectl: job f2 ended dead without running: "
                                 "dependency f is dead\n"))


add_postgres_variants(globals())


if __name__ == "__main__":
    unittest.main()
