"""Recovery with real processes: workers and supervisors killed or frozen, leases
running out, and many enqueuers racing many workers (each job runs once)."""

import collections
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import unittest

from tests.support import (ROOT, add_postgres_variants, claim_one, cmdline,
                           group_members, lines, pid_alive, proc_fields, queuectl,
                           QueueTestCase, short_leases, wait_until)

q = shlex.quote
parse_iso = queuectl.parse_iso


# One enqueuer process: "batch" runs `queuectl enqueue -` processes with batches of
# varied size; "single" runs one-job enqueues in-process (each its own connection and
# transaction), with every 50th one as a real `queuectl enqueue JSON` process.
ENQUEUER = r'''
import json, shlex, subprocess, sys
root, mode, count, record = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, root)
import queuectl
script = root + "/queuectl.py"
command = "echo $QUEUECTL_JOB_ID >> " + shlex.quote(record)

def job(i):
    return json.dumps({"command": command, "priority": i % 3})

def run(argv, stdin=None):
    r = subprocess.run([sys.executable, script] + argv, input=stdin,
                       capture_output=True, text=True, timeout=120)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    if r.returncode:
        sys.exit(r.returncode)

done = 0
if mode == "batch":
    sizes = [50, 1, 17, 100, 3]
    while done < count:
        n = min(sizes[0], count - done)
        sizes = sizes[1:] + sizes[:1]
        run(["enqueue", "-"], "".join(job(done + k) + "\n" for k in range(n)))
        done += n
else:
    for i in range(count):
        if i % 50 == 0:
            run(["enqueue", job(i)])
        else:
            code = queuectl.main(["enqueue", job(i)])
            if code:
                sys.exit(code)
        sys.stdout.flush()
'''


def outcomes(job):
    """(number, outcome, reason) of each attempt in a job's history."""
    return [(h["number"], h["outcome"], h["reason"]) for h in job["history"]]


class WorkerDeathTest(QueueTestCase):
    """A worker killed mid-job: its attempt fails as worker lost, its job's processes
    die, the job runs again."""

    @short_leases
    def test_kill_9_worker_mid_job_fails_attempt_and_reruns_once(self):
        """kill -9 a busy worker: attempt is worker lost, its group dies, reruns once."""
        # A long lease: only the supervisor, not lease expiry, can recover in time.
        self.ok("config", "set", "lease_timeout", "60")
        starts, done = self.path("starts"), self.path("done")
        job_id = self.enqueue(command=f"echo $$ >> {q(starts)}; sleep 2; "
                                      f"echo ok >> {q(done)}")
        sup = self.start_workers(1)
        wait_until(lambda: len(lines(starts)) == 1, 20, "the job to start")
        shell = int(lines(starts)[0])
        worker = self.job(job_id)["worker_pid"]
        self.assertEqual(self.worker_pids(sup.pid), [worker])

        os.kill(worker, signal.SIGKILL)
        def lost_attempt():          # (its start is written in the next batch)
            history = self.history(job_id)
            return history and history[0]["outcome"] == "failed" and history[0]
        first = wait_until(lost_attempt, 10, "the supervisor to fail the lost attempt")
        self.assertEqual(first["reason"], queuectl.WORKER_LOST)
        self.assertEqual(first["worker_pid"], worker)
        wait_until(lambda: not group_members(shell), 5,
                   "the lost attempt's process group to die")
        self.assertFalse(pid_alive(shell))

        job = self.wait_state(job_id, "completed", 20)
        self.assertEqual(lines(done), ["ok"])
        self.assertEqual(len(lines(starts)), 2)
        self.assertEqual(job["attempts"], 2)
        self.assertEqual(outcomes(job), [(1, "failed", queuectl.WORKER_LOST),
                                         (2, "completed", None)])
        replacement = job["history"][1]["worker_pid"]
        self.assertNotEqual(replacement, worker)
        self.assertEqual(self.worker_pids(sup.pid), [replacement])
        self.assertIsNone(sup.poll())
        self.assertIn(f"supervisor: job {job_id} failed: worker lost", self.log_text(sup))
        self.assertNotIn("Traceback", self.log_text(sup))

    @short_leases
    def test_job_that_kills_its_worker_every_time_ends_dead(self):
        """A job running `kill -9 $PPID` with max_retries 1 dies after 2 lost workers."""
        job_id = self.enqueue(command="kill -9 $PPID", max_retries=1)
        sup = self.start_workers(1)
        try:
            job = self.wait_state(job_id, "dead", 20)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_text(sup)}") from None
        self.assertEqual(job["attempts"], 2)
        self.assertEqual(job["last_error"], queuectl.WORKER_LOST)
        self.assertEqual(outcomes(job), [(1, "failed", queuectl.WORKER_LOST),
                                         (2, "failed", queuectl.WORKER_LOST)])
        killed = [h["worker_pid"] for h in job["history"]]
        self.assertNotEqual(killed[0], killed[1])
        # The supervisor survives and keeps a fresh worker.
        wait_until(lambda: set(self.worker_pids(sup.pid, 1) or killed) - set(killed), 10,
                   "a replacement worker")
        self.assertFalse(any(pid_alive(p) for p in killed))
        self.assertIsNone(sup.poll())
        self.assertNotIn("Traceback", self.log_text(sup))

    def test_a_job_that_clears_its_environment_is_still_killed(self):
        """kill -9 a worker whose job ran `exec env -i ...`: its group still dies."""
        self.ok("config", "set", "backoff_base", "30")     # no rerun during the test
        pidfile = self.path("pid")
        proc = self.start_workers(1)
        job_id = self.enqueue(command=f"echo $$ > {q(pidfile)}; exec env -i sleep 60")
        self.wait_state(job_id, "processing", timeout=10)
        pid = int(wait_until(lambda: self.read("pid").strip(), 10, "the job's pid"))
        # Until env has run sleep, the process is env, whose environment is not
        # cleared yet ("env -i sleep 60" holds "sleep" too).
        wait_until(lambda: cmdline(pid).split() == ["sleep", "60"], 10,
                   "the exec into env -i sleep")
        with open(f"/proc/{pid}/environ", "rb") as f:
            self.assertNotIn(b"QUEUECTL_CLAIM", f.read())
        worker = self.worker_pids(proc.pid, 1)[0]
        os.kill(worker, signal.SIGKILL)
        job = self.wait_state(job_id, "failed", timeout=15)
        self.assertEqual(job["last_error"], "worker lost")
        wait_until(lambda: not pid_alive(pid), 10, "the env-cleared command to die")


class RunMarkTest(unittest.TestCase):
    """A worker marks the claim it is about to run before its command starts, so a
    worker killed by its command (`kill -9 $PPID`) before it could say more still
    has that claim counted as a run, not given back to run again and again."""

    def slot(self, mark, pid):
        process = collections.namedtuple("Process", "pid")(pid)
        return queuectl.Slot(1, process, None, mark)

    def claim(self):
        return collections.namedtuple("Claim", "id token")("j", queuectl.new_token())

    def test_a_claim_marked_by_a_worker_that_died_counts_as_started(self):
        mark = queuectl.RunMark()
        claim, other = self.claim(), self.claim()
        pid = os.fork()
        if pid == 0:                       # the worker: marks, then dies at once
            mark.starting(claim.token)
            os._exit(0)
        os.waitpid(pid, 0)
        slot = self.slot(mark, pid)
        self.assertEqual(slot.run_facts(claim), {"started": True, "group": None})
        # The other claim it held (sent ahead) never started.
        self.assertEqual(slot.run_facts(other), {"started": False, "group": None})

    def test_a_mark_holds_the_group_once_written_and_nothing_once_cleared(self):
        mark = queuectl.RunMark()
        claim = self.claim()
        slot = self.slot(mark, os.getpid())
        self.assertFalse(slot.run_facts(claim)["started"])
        mark.starting(claim.token)
        mark.running(4242, 17)
        self.assertEqual(slot.run_facts(claim), {"started": True, "group": (4242, 17)})
        mark.clear()
        self.assertEqual(slot.run_facts(claim), {"started": False, "group": None})


class SupervisorDeathTest(QueueTestCase):
    """The supervisor killed: its workers finish and write what they ran; a new
    supervisor runs the rest."""

    @short_leases
    def test_kill_9_supervisor_orphans_finish_and_restart_recovers(self):
        """kill -9 the supervisor: orphans finish and exit; a restart runs the rest."""
        starts, done = self.path("starts"), self.path("done")
        ids = [self.enqueue(command=f"echo $QUEUECTL_JOB_ID >> {q(starts)}; sleep 1; "
                                    f"echo $QUEUECTL_JOB_ID >> {q(done)}")
               for _ in range(6)]
        first = self.start_workers(2)
        old_workers = self.worker_pids(first.pid, 2)
        running = wait_until(lambda: len(self.processing()) == 2 and self.processing(),
                             20, "both workers to be running a job")

        os.kill(first.pid, signal.SIGKILL)
        self.assertEqual(first.wait(timeout=10), -signal.SIGKILL)
        # Restart at once, as a service manager would, while the orphans still work.
        second = self.start_workers(2)

        wait_until(lambda: not any(pid_alive(p) for p in old_workers), 15,
                   "the orphaned workers to exit")
        wait_until(lambda: self.log_text(first).count("supervisor is gone; stopping")
                   == 2, 5, "both orphans to log that they stop")
        for job_id, worker in running.items():
            job = self.wait_state(job_id, "completed", 10)
            self.assertEqual(job["attempts"], 1, job_id)
            self.assertEqual(job["history"][0]["worker_pid"], worker)

        for job_id in ids:
            self.wait_state(job_id, "completed", 20)
        self.assertEqual(sorted(lines(done)), sorted(ids))
        self.assertEqual(sorted(lines(starts)), sorted(ids))
        jobs = json.loads(self.ok("list", "--json"))
        self.assertEqual({j["state"] for j in jobs}, {"completed"})
        self.assertEqual({j["attempts"] for j in jobs}, {1})
        self.assertIsNone(second.poll())
        self.assertFalse(set(self.worker_pids(second.pid, 2)) & set(old_workers))
        self.assertNotIn("Traceback", self.log_text(first) + self.log_text(second))

    def test_kill_9_of_the_supervisor_loses_no_reported_result(self):
        """kill -9 of the supervisor among many short jobs: results its workers had
        reported but it had not written yet are written by the orphaned workers,
        so no job that ran is charged a lost run."""
        self.ok("config", "set", "lease_timeout", "1")
        record = self.path("ran")
        lines = "".join(json.dumps({"command": f"echo $QUEUECTL_JOB_ID >> {q(record)}"})
                        + "\n" for _ in range(3000))
        ids = self.ok("enqueue", "-", stdin=lines).split()
        first = self.start_workers(2)
        wait_until(lambda: len(self.read("ran").splitlines()) > 300, 20, "jobs to run")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        self.start_workers(2)
        wait_until(lambda: json.loads(self.ok("status", "--json"))["counts"]["completed"]
                   == len(ids), 60, "every job to complete")
        jobs = json.loads(self.ok("list", "--json"))
        lost = [j["id"] for j in jobs if j["attempts"] > 1]
        # Only a claim made in the microseconds before the kill, and never sent,
        # can still be charged: it is not known to have run.
        self.assertLessEqual(len(lost), 2, lost)
        ran = self.read("ran").split()
        self.assertEqual(set(ran), set(ids))
        twice = {i for i in ran if ran.count(i) > 1} if len(ran) != len(ids) else set()
        self.assertLessEqual(twice, set(lost))


class FrozenWorkerTest(QueueTestCase):
    """A worker frozen past its lease loses its job to another, and never runs it beside
    it."""

    @short_leases
    def test_sigstopped_worker_past_lease_loses_job_and_writes_nothing(self):
        """A worker frozen past its lease loses its job and, resumed, writes nothing."""
        starts, done = self.path("starts"), self.path("done")
        job_id = self.enqueue(command=f"echo $$ >> {q(starts)}; sleep 3; "
                                      f"echo $QUEUECTL_ATTEMPT >> {q(done)}")
        sup = self.start_workers(2)
        wait_until(lambda: len(lines(starts)) == 1, 20, "the job to start")
        stale = self.job(job_id)["worker_pid"]
        (other,) = set(self.worker_pids(sup.pid, 2)) - {stale}
        self.addCleanup(lambda: pid_alive(stale) and os.kill(stale, signal.SIGCONT))
        self.freeze(stale)

        def reclaimed():
            history = self.history(job_id)
            return (len(history) == 2 and history[0]["outcome"] == "failed"
                    and history[1]["outcome"] == "running" and history)
        history = wait_until(reclaimed, 15, "another worker to reclaim the job")
        lost = history[0]
        self.assertEqual((lost["reason"], lost["worker_pid"]),
                         (queuectl.WORKER_LOST, stale))
        self.assertEqual(history[1]["worker_pid"], other)
        self.assertFalse(group_members(int(lines(starts)[0])),
                         "the frozen worker's command still runs")

        os.kill(stale, signal.SIGCONT)
        wait_until(lambda: f"(pid {stale}): job {job_id} was taken over" in
                   self.log_text(sup), 10, "the resumed worker to drop its result")
        job = self.wait_state(job_id, "completed", 15)
        self.assertEqual(job["attempts"], 2)
        self.assertEqual(len(job["history"]), 2)
        self.assertEqual(job["history"][0], lost)     # untouched by the stale worker
        self.assertEqual((job["history"][1]["outcome"], job["history"][1]["worker_pid"]),
                         ("completed", other))
        self.assertEqual(lines(done), ["2"])
        self.assertEqual(len(lines(starts)), 2)
        self.assertIsNone(sup.poll())
        self.assertEqual(sorted(self.worker_pids(sup.pid, 2)), sorted([stale, other]))
        self.assertNotIn("Traceback", self.log_text(sup))

    def test_a_frozen_workers_env_clearing_command_is_killed_before_a_rerun(self):
        """A worker frozen as its command clears its environment: recovery finds the
        command by the group the worker shared, so two runs never overlap."""
        self.ok("config", "set", "lease_timeout", "1")
        self.ok("config", "set", "backoff_base", "1")
        sup = self.start_workers(2)
        pids = self.path("pids")
        job_id = self.enqueue(command=f"echo $$ >> {q(pids)}; "
                                      f"[ $QUEUECTL_ATTEMPT = 1 ] && kill -STOP $PPID; "
                                      f"exec env -i sleep 30")
        first = int(wait_until(lambda: self.read("pids").split(), 20, "the first run")[0])
        frozen = int((proc_fields(first) or [0, 0])[1])        # its worker (its parent)
        self.addCleanup(lambda: frozen and pid_alive(frozen) and
                        os.kill(frozen, signal.SIGCONT))
        wait_until(lambda: len(self.read("pids").split()) == 2, 20, "the second run")
        self.assertFalse(pid_alive(first), "the first run still runs beside the second")
        history = self.job(job_id)["history"]
        if self.postgres and len(history) == 1:
            # On a shared store the supervisor may stop the run first, as its lease
            # could not be renewed: if the frozen worker never reported its start,
            # it goes back as never started, and only the second run is on record.
            self.assertIn("its lease could not be renewed in time", self.log_text(sup))
            self.assertEqual(history[0]["outcome"], "running", history)
            return
        self.assertIn((history[0]["outcome"], history[0]["reason"]),
                      [("failed", queuectl.WORKER_LOST)] +
                      [("interrupted", queuectl.ABORT_FENCED)] * self.postgres, history)


class LeaseTest(QueueTestCase):
    """Leases: an expired claim is recovered, a live one is not."""

    def test_expired_claim_is_recovered_while_every_worker_is_busy(self):
        """The supervisor recovers an expired claim while its only worker is busy."""
        self.ok("config", "set", "backoff_base", "1")
        busy = self.enqueue(command="sleep 30")
        proc = self.start_workers(1)
        self.wait_state(busy, "processing", timeout=10)   # with the default lease

        # A claim whose worker is gone: its lease runs out a second from now, while
        # the only worker is inside `sleep 30` and cannot look at leases.
        self.ok("config", "set", "lease_timeout", "1")
        lost = self.enqueue(command="true")
        dead = subprocess.Popen(["true"])
        dead.wait(timeout=10)
        store = queuectl.open_store(self.db)
        try:
            claim = claim_one(store, dead.pid)
        finally:
            store.close()
        self.assertEqual(claim.id, lost)

        wait_until(lambda: self.state(lost) != "processing", 8,
                   f"the lost claim on {lost} to be recovered")
        job = self.job(lost)
        self.assertEqual([(h["number"], h["outcome"], h["reason"])
                          for h in job["history"]], [(1, "failed", "worker lost")])
        self.assertEqual(job["last_error"], "worker lost")
        self.assertEqual(job["state"], "failed")
        busy_job = self.job(busy)
        self.assertEqual((busy_job["state"], busy_job["attempts"]), ("processing", 1),
                         "the worker was not busy all along")
        wait_until(lambda: f"supervisor: job {lost} failed: worker lost" in self.log_text(proc),
                   5, "the supervisor to log the recovery")

    def test_lowering_lease_timeout_mid_run_keeps_the_claims_own_lease(self):
        """Lowering lease_timeout mid-run does not shorten or expire a running claim."""
        self.ok("config", "set", "lease_timeout", "3")
        self.start_workers(2)
        job_id = self.enqueue(command=f"sleep 4; echo ok >> {q(self.path('f'))}")
        self.wait_state(job_id, "processing", timeout=10)
        self.assertEqual(self.ok("config", "set", "lease_timeout", "1"),
                         "lease_timeout = 1\n")
        before = self.job(job_id)["lease_until"]

        # The next renewal (every second: a third of the claim's 3 s lease) still
        # grants 3 s; with the new 1 s the lease would lapse before each renewal.
        def renewed():
            job = self.job(job_id)
            return job["lease_until"] != before and job
        job = wait_until(renewed, 5, "the lease to be renewed")
        self.assertEqual(job["state"], "processing")
        left = (parse_iso(job["lease_until"]) - queuectl.now_utc()).total_seconds()
        self.assertGreater(left, 2.0, "the renewal used the new, shorter lease")

        job = self.wait_state(job_id, "completed", timeout=15)
        self.assertEqual(job["attempts"], 1)
        self.assertEqual([(h["outcome"], h["reason"]) for h in job["history"]],
                         [("completed", None)])
        self.assertEqual(self.read("f"), "ok\n")

    def test_pausing_the_whole_group_past_the_lease_kills_nothing(self):
        """SIGSTOP then SIGCONT to supervisor and workers (Ctrl-Z, fg): jobs finish.
        On a store that many hosts share, another host may have taken the jobs
        once their leases ran out: so a supervisor that finds it could not renew
        them in time stops their runs at once, and they go back to pending and
        run again (never two runs at once)."""
        self.ok("config", "set", "lease_timeout", "1")
        done = self.path("done")
        proc = self.start_workers(2)
        # Each run has seconds left after the pause: time for a fence to land first.
        ids = [self.enqueue(command=f"sleep 6; echo x >> {q(done)}") for _ in range(2)]
        for job_id in ids:
            self.wait_state(job_id, "processing", timeout=10)
        os.killpg(proc.pid, signal.SIGSTOP)
        self.addCleanup(lambda: os.killpg(proc.pid, signal.SIGCONT)
                        if proc.poll() is None else None)
        time.sleep(2.5)     # the pause under test: longer than the 1 s lease
        os.killpg(proc.pid, signal.SIGCONT)
        for job_id in ids:
            job = self.wait_state(job_id, "completed", timeout=30)
            if self.postgres:
                self.assertEqual([(h["outcome"], h["reason"]) for h in job["history"]],
                                 [("interrupted", "lease not renewed"),
                                  ("completed", None)])
                self.assertEqual(job["attempts"], 1)
            else:
                self.assertEqual([h["outcome"] for h in job["history"]], ["completed"])
        self.assertEqual(self.read("done"), "x\nx\n")
        self.assertNotIn("worker lost", self.log_text(proc))


class ConcurrencyTest(QueueTestCase):
    """Enqueuer processes race workers: every job runs exactly once (the soak test is
    opt-in)."""

    def race(self, total, enqueuers=8, workers=8, timeout=120):
        """ENQUEUERS processes add TOTAL jobs while WORKERS run them; each runs once.

        The lease stays at 1 s (the shortest allowed): a worker that is alive and
        well must not lose a job to a lease that ran out while it waited for a lock.
        On PostgreSQL, 3 s: there a host stops a run whose lease it has not renewed
        half a second before it runs out (fencing), and on a loaded machine a
        renewal may take longer than the half second a 1 s lease leaves.
        """
        if self.postgres:
            self.ok("config", "set", "lease_timeout", "3")
        record = self.path("ran")
        script = self.path("enqueuer.py")
        with open(script, "w") as f:
            f.write(ENQUEUER)
        sup = self.start_workers(workers)
        started = time.monotonic()
        procs = []
        for n in range(enqueuers):
            count = total // enqueuers + (1 if n < total % enqueuers else 0)
            out = open(self.path(f"enqueuer-{n}.out"), "w+")
            err = open(self.path(f"enqueuer-{n}.err"), "w+")
            self.addCleanup(out.close)
            self.addCleanup(err.close)
            proc = subprocess.Popen(
                [sys.executable, script, ROOT, "batch" if n % 2 else "single",
                 str(count), record], env=self.env, cwd=self.dir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            self.addCleanup(lambda p=proc: p.poll() is None and (p.kill(), p.wait()))
            procs.append((proc, out, err))
        ids = []
        for proc, out, err in procs:
            code = proc.wait(timeout=timeout)
            out.seek(0)
            err.seek(0)
            self.assertEqual((code, err.read()), (0, ""), "an enqueuer failed")
            ids += out.read().split()
        self.assertEqual(len(ids), total)
        self.assertEqual(len(set(ids)), total, "enqueue returned a duplicate id")

        def finished():
            counts = json.loads(self.ok("status", "--json"))["counts"]
            return counts["completed"] == total or counts["dead"] or counts["failed"]
        wait_until(finished, timeout, f"{total} jobs to complete")
        elapsed = time.monotonic() - started

        ran = lines(record)
        twice = sorted(i for i, n in collections.Counter(ran).items() if n > 1)
        self.assertEqual(len(ran), total, "a job ran twice or not at all: " + "; ".join(
            json.dumps(self.history(i)) for i in twice[:3]))
        self.assertEqual(set(ran), set(ids))
        listed = self.run_cli("list", "--json", timeout=60)
        self.assertEqual((listed.returncode, listed.stderr), (0, ""))
        jobs = json.loads(listed.stdout)
        self.assertEqual({j["id"] for j in jobs}, set(ids))
        self.assertEqual({(j["state"], j["attempts"]) for j in jobs}, {("completed", 1)})

        os.kill(sup.pid, signal.SIGTERM)
        self.assertEqual(sup.wait(timeout=30), 0)
        self.assertCleanLog(sup)
        return elapsed

    @short_leases
    def test_8_enqueuers_8_workers_2000_jobs_each_run_once(self):
        """8 enqueuer processes race 8 workers over 2,000 jobs: each runs once."""
        self.race(2000)

    @unittest.skipUnless(os.environ.get("QUEUECTL_SOAK") == "1", "set QUEUECTL_SOAK=1")
    @short_leases
    def test_soak_8_enqueuers_8_workers_20000_jobs_each_run_once(self):
        """Soak: 8 enqueuers race 8 workers over 20,000 jobs: each runs exactly once."""
        self.race(20000, timeout=900)


add_postgres_variants(globals())


if __name__ == "__main__":
    unittest.main()
