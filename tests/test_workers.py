"""Workers and their supervisor: one per database (PID file and record), worker
stop (warm and cold, exit 7 and 8), stop signals, and --detach with its log."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import unittest

from tests.support import (QUEUECTL, ROOT, add_postgres_variants, group_members, lines,
                           pid_alive, queuectl, QueueTestCase, short_leases,
                           wait_until)

q = shlex.quote


class PidFileTest(QueueTestCase):
    """One supervisor per database, found by its PID file or its record in the
    database."""

    def test_second_supervisor_is_refused(self):
        """A second worker start on a busy database exits 1; the first keeps working."""
        proc = self.start_workers(1)
        workers = self.worker_pids(proc.pid, 1)
        result = self.run_cli("worker", "start", timeout=20)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("already running", result.stderr)
        self.assertIn(str(proc.pid), result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIsNone(proc.poll())
        self.assertEqual(self.worker_pids(proc.pid, 1), workers)
        job_id = self.enqueue(command="true")
        self.wait_state(job_id, "completed")

    def test_a_deleted_pid_file_hides_no_supervisor(self):
        """With its PID file gone (a cleaner of old files), the live supervisor is
        still found by its record in the database: status shows it, a second
        worker start is refused, worker stop stops it."""
        proc = self.start_workers(1)
        pid_file = self.pid_file
        os.unlink(pid_file)
        os.mkdir(pid_file)                # and it cannot be written again there
        self.addCleanup(lambda: os.path.isdir(pid_file) and os.rmdir(pid_file))
        status = json.loads(self.ok("status", "--json"))
        self.assertEqual(status["supervisor_pid"], proc.pid)
        second = self.run_cli("worker", "start", timeout=20)
        self.assertEqual(second.returncode, 1, second.stderr)
        self.assertEqual(second.stderr, f"queuectl: error: workers are already running "
                                        f"on this database (supervisor pid {proc.pid})\n")
        self.assertTrue(os.path.isdir(pid_file))
        job_id = self.enqueue(command="true")
        self.wait_state(job_id, "completed")
        # Its next look at the PID file (once a second) finds it cannot write it.
        wait_until(lambda: "could not write its PID file again" in self.log_text(proc),
                   5, "the supervisor to find its PID file gone")
        self.stop_workers(proc)
        self.assertEqual(self.run_cli("worker", "stop").stdout, "no workers running\n")
        log = self.log_text(proc)
        self.assertEqual(log.count("could not write its PID file again"), 1, log)

    def test_a_supervisor_writes_its_deleted_pid_file_again(self):
        """A supervisor whose PID file was deleted writes it again within about
        a second, so worker stop and enqueue's wake-up find it at once."""
        proc = self.start_workers(1)
        os.unlink(self.pid_file)
        wait_until(lambda: self.worker_pids(proc.pid, 1), 5, "the PID file again")
        self.assertIn("PID file", self.log_text(proc))
        self.stop_workers(proc)
        self.assertFalse(os.path.exists(self.pid_file))

    def test_stale_pid_file_of_a_live_process_is_replaced(self):
        """An unlocked PID file naming a live unrelated process does not block start."""
        with open(self.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n\n")
        proc = self.start_workers(1)
        with open(self.pid_file) as f:
            self.assertEqual(f.readline().strip(), str(proc.pid))
        job_id = self.enqueue(command="true")
        self.wait_state(job_id, "completed")

    def test_stale_pid_file_of_a_dead_process_is_replaced(self):
        """A PID file left by a dead process does not block worker start."""
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait(timeout=10)
        with open(self.pid_file, "w") as f:
            f.write(f"{dead.pid}\n{dead.pid}\n")
        proc = self.start_workers(2)
        with open(self.pid_file) as f:
            self.assertEqual(f.readline().strip(), str(proc.pid))
        job_id = self.enqueue(command="true")
        self.wait_state(job_id, "completed")

    @short_leases
    def test_stale_pid_file_naming_live_process_is_not_trusted(self):
        """A stale PID file naming a live stranger: stop spares it; start replaces it."""
        self.enqueue(command="true")
        bystander = subprocess.Popen(["sleep", "30"], start_new_session=True)
        self.addCleanup(lambda: bystander.poll() is None and (bystander.kill(),
                                                               bystander.wait()))
        pidfile = self.pid_file
        with open(pidfile, "w") as f:
            f.write(f"{bystander.pid}\n{bystander.pid}\n")

        result = self.run_cli("worker", "stop")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, "no workers running\n", ""))
        status = json.loads(self.ok("status", "--json"))
        self.assertEqual((status["supervisor_pid"], status["workers"]), (None, []))
        self.assertIsNone(bystander.poll(), "worker stop signalled an unrelated process")

        sup = self.start_workers(1)
        with open(pidfile) as f:
            self.assertEqual(int(f.readline()), sup.pid)
        result = self.run_cli("worker", "stop")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.startswith("stopped"), result.stdout)
        self.assertEqual(sup.wait(timeout=20), 0)
        self.assertFalse(os.path.exists(pidfile))
        self.assertIsNone(bystander.poll(), "an unrelated process was signalled")


class SQLitePidFileTest(QueueTestCase):
    """A SQLite database's PID file is beside it: one per file, whatever its name."""

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


class WorkerStopTest(QueueTestCase):
    """worker stop: warm (jobs finish), cold after --timeout (exit 7), or no answer
    (exit 8)."""

    def test_graceful_stop_waits_for_the_running_job(self):
        """worker stop returns only after the running job completed."""
        proc = self.start_workers(1)
        done = shlex.quote(self.path("f"))
        job_id = self.enqueue_started(f"sleep 1.5; echo done >> {done}")
        result = self.run_cli("worker", "stop", timeout=30)
        job = self.job(job_id)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(job["state"], "completed")
        self.assertEqual(job["attempts"], 1)
        self.assertEqual(self.read("f"), "done\n")
        self.assertIn("stopped", result.stdout)
        self.assertEqual(len(result.stdout.splitlines()), 1, result.stdout)
        self.assertEqual(proc.wait(timeout=10), 0, self.log_text(proc))
        self.assertFalse(os.path.exists(self.pid_file))
        self.assertNotIn("Traceback", self.log_text(proc))

    def test_stop_timeout_kills_the_job_and_gives_it_back(self):
        """worker stop --timeout 1 kills a running job and requeues it unused."""
        proc = self.start_workers(1)
        pgid_file = shlex.quote(self.path("pgid"))
        job_id = self.enqueue(command=f"echo $$ > {pgid_file}; sleep 30")
        self.wait_state(job_id, "processing", timeout=10)
        pgid = int(wait_until(lambda: self.read("pgid").strip(), 10, "the job's pgid"))
        self.addCleanup(self.kill_group_cleanup, pgid)
        self.assertTrue(group_members(pgid))
        started = time.monotonic()
        result = self.stop_workers(proc, "--timeout", "1",
                                   code=queuectl.EXIT_INTERRUPTED)
        self.assertLess(time.monotonic() - started, 15)
        self.assertIn("stopped", result.stdout)
        self.assertIn(f": 1 running job(s) interrupted and put back as "
                      f"pending ({job_id})", result.stdout)
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0))
        self.assertEqual(job["history"][-1]["outcome"], "interrupted")
        self.assertIsNotNone(job["history"][-1]["finished_at"])
        wait_until(lambda: not group_members(pgid), 5, f"process group {pgid} to be gone")

    def test_worker_stop_reports_on_separate_lines_and_cold_stop_exits_7(self):
        """worker stop's progress note ends its line before the report; a stop
        that had to kill running jobs exits 7."""
        proc = self.start_workers(1)
        self.enqueue_started("sleep 30")
        result = self.run_cli("worker", "stop", "--timeout", "0.5s", timeout=30)
        self.assertEqual(result.returncode, queuectl.EXIT_INTERRUPTED, result.stderr)
        self.assertTrue(result.stderr.endswith("\n"))
        self.assertEqual(len(result.stderr.splitlines()), 1)
        self.assertTrue(result.stdout.startswith("stopped workers"), result.stdout)
        self.assertEqual(proc.wait(timeout=10), queuectl.EXIT_INTERRUPTED)

    def test_worker_stop_gives_up_on_a_frozen_supervisor(self):
        """worker stop --timeout 2 on a supervisor frozen by SIGSTOP returns soon
        after its timeout: exit 8, naming the pid; resumed, the supervisor stops."""
        proc = self.start_workers(1)
        job_id = self.enqueue(command="sleep 30")
        self.wait_state(job_id, "processing", timeout=10)
        os.kill(proc.pid, signal.SIGSTOP)
        self.addCleanup(lambda: proc.poll() is None and os.kill(proc.pid, signal.SIGCONT))
        started = time.monotonic()
        result = self.run_cli("worker", "stop", "--timeout", "2", timeout=60)
        took = time.monotonic() - started
        self.assertEqual(result.returncode, queuectl.EXIT_NO_ANSWER, result.stderr)
        self.assertLess(took, 2 + 2 * queuectl.ANSWER_GRACE_S + 2)
        last = result.stderr.splitlines()[-1]
        self.assertRegex(last, rf"^queuectl: error: supervisor pid {proc.pid} does not "
                               rf"answer: it is stopped")
        self.assertNotIn("Traceback", result.stderr)
        os.kill(proc.pid, signal.SIGCONT)        # the stop it was sent takes effect
        self.assertEqual(proc.wait(timeout=30), queuectl.EXIT_INTERRUPTED)
        self.assertEqual(self.state(job_id), "pending")

    def test_stop_with_no_workers_running(self):
        """worker stop with nothing running says so and exits 0."""
        result = self.run_cli("worker", "stop")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, "no workers running\n", ""))
        with open(self.pid_file, "w") as f:      # stale: nobody holds its lock
            f.write(f"{os.getpid()}\n\n")
        result = self.run_cli("worker", "stop")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, "no workers running\n", ""))

    def test_jobs_survive_a_restart_of_the_workers(self):
        """Pending jobs stay queued across worker stop and start, and all complete."""
        out_file = shlex.quote(self.path("out"))
        ids = [f"r{n}" for n in range(10)]
        # Long enough that the stop, a command started on a busy machine, comes
        # before all ten have run.
        commands = {i: f"sleep 1; echo {i} >> {out_file}" for i in ids}
        lines = "".join(json.dumps({"id": i, "command": c}) + "\n"
                        for i, c in commands.items())
        self.ok("enqueue", "-", stdin=lines)
        proc = self.start_workers(2)
        wait_until(lambda: self.count("completed") >= 2, 20, "two completed jobs")
        result = self.stop_workers(proc)
        self.assertIn("stopped", result.stdout)

        jobs = self.jobs()
        states = [j["state"] for j in jobs]
        self.assertEqual(set(states) - {"completed", "pending"}, set(), states)
        self.assertGreater(states.count("pending"), 0, "every job ran before the stop")
        self.assertEqual({j["attempts"] for j in jobs if j["state"] == "pending"}, {0})
        self.assertEqual(len(jobs), 10)

        self.start_workers(2)
        wait_until(lambda: self.count("completed") == 10, 20, "all 10 jobs completed")
        self.assertEqual(sorted(self.read("out").split()), sorted(ids))
        self.assertEqual({j["attempts"] for j in self.jobs()}, {1})

    def test_worker_stop_with_timeout_on_a_stopping_supervisor_stays_warm(self):
        """worker stop --timeout 30 after a SIGTERM does not turn the stop cold."""
        done = self.path("f")
        proc = self.start_workers(1)
        job_id = self.enqueue_started(f"sleep 2; echo done >> {q(done)}")

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


class StopSignalTest(QueueTestCase):
    """SIGTERM, SIGINT (Ctrl-C) and SIGHUP to the supervisor: the first a warm stop, the
    second cold."""

    def test_sigterm_to_the_supervisors_process_group_is_a_warm_stop(self):
        """SIGTERM to the supervisor's whole group lets the running job finish."""
        done = self.path("f")
        proc = self.start_workers(1)
        workers = self.worker_pids(proc.pid, 1)
        # Worker and supervisor share the group, so the signal reaches both.
        self.assertEqual(os.getpgid(proc.pid), proc.pid)
        self.assertEqual(os.getpgid(workers[0]), proc.pid)
        job_id = self.enqueue_started(f"sleep 2; echo done >> {q(done)}")

        os.killpg(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=20), 0, self.log_text(proc))
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("completed", 1),
                         (job["history"], self.log_text(proc)))
        self.assertEqual([h["outcome"] for h in job["history"]], ["completed"])
        self.assertEqual(self.read("f"), "done\n")
        self.assertNotIn("cold stop", self.log_text(proc))
        self.assertNotIn("Traceback", self.log_text(proc))

    def test_sighup_to_the_group_is_a_warm_stop_with_cleanup(self):
        """A closed terminal (SIGHUP to the group): the job finishes, no PID file left."""
        done = self.path("f")
        proc = self.start_workers(1)
        job_id = self.enqueue_started(f"sleep 2; echo done >> {q(done)}")
        os.killpg(proc.pid, signal.SIGHUP)
        self.assertEqual(proc.wait(timeout=20), 0, self.log_text(proc))
        self.assertEqual((self.state(job_id), self.read("f")), ("completed", "done\n"))
        self.assertFalse(os.path.exists(self.pid_file))
        self.assertIn("supervisor: stopped", self.log_text(proc))

    @short_leases
    def test_sigterm_lets_running_job_finish_then_exits_clean(self):
        """First SIGTERM: the job finishes, no new one starts, exit 0, nothing left."""
        starts, done = self.path("starts"), self.path("done")
        running = self.enqueue(command=f"echo $$ >> {q(starts)}; sleep 1; "
                                       f"echo ok >> {q(done)}", priority=1)
        waiting = self.enqueue(command=f"echo late >> {q(done)}")
        sup = self.start_workers(1)
        workers = self.worker_pids(sup.pid, 1)
        wait_until(lambda: lines(starts), 20, "the job to start")

        os.kill(sup.pid, signal.SIGTERM)
        self.assertEqual(sup.wait(timeout=20), 0)
        self.assertEqual(lines(done), ["ok"])
        self.assertEqual(self.state(running), "completed")
        job = self.job(waiting)
        self.assertEqual((job["state"], job["attempts"], job["history"]),
                         ("pending", 0, []))
        self.assertFalse(os.path.exists(self.pid_file))
        wait_until(lambda: not any(pid_alive(p) for p in workers), 5, "workers to exit")
        self.assertFalse(group_members(int(lines(starts)[0])))
        wait_until(lambda: not self.leftovers(), 5, "no process left on the database")
        self.assertCleanLog(sup)

    @short_leases
    def test_second_sigterm_kills_job_and_gives_it_back(self):
        """Second SIGTERM: the job's group dies, job pending with 0 attempts, exit 7
        (as worker stop reports a cold stop)."""
        starts = self.path("starts")
        job_id = self.enqueue(command=f"echo $$ >> {q(starts)}; sleep 30")
        sup = self.start_workers(1)
        workers = self.worker_pids(sup.pid, 1)
        wait_until(lambda: lines(starts), 20, "the job to start")
        group = int(lines(starts)[0])
        self.assertTrue(group_members(group))

        os.kill(sup.pid, signal.SIGTERM)
        wait_until(lambda: "running jobs finish first" in self.log_text(sup), 10,
                   "the supervisor to begin a warm stop")
        self.assertIsNone(sup.poll())
        self.assertEqual(self.state(job_id), "processing")
        started = time.monotonic()
        os.kill(sup.pid, signal.SIGTERM)
        self.assertEqual(sup.wait(timeout=20), queuectl.EXIT_INTERRUPTED)
        self.assertIn(f"1 running job(s) interrupted and put back as pending ({job_id})",
                      self.log_text(sup))
        self.assertLess(time.monotonic() - started, queuectl.COLD_STOP_GRACE_S,
                        "the cold stop needed the SIGKILL fallback")

        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0))
        self.assertEqual([h["outcome"] for h in job["history"]], ["interrupted"])
        self.assertFalse(group_members(group), "the job's processes survived")
        self.assertFalse(any(pid_alive(p) for p in workers), "a worker survived")
        self.assertFalse(os.path.exists(self.pid_file))
        # multiprocessing's resource tracker exits a moment after the supervisor.
        wait_until(lambda: not self.leftovers(), 5, "no process left on the database")
        self.assertNotIn("did not stop in time", self.log_text(sup))
        self.assertCleanLog(sup)

    @short_leases
    def test_two_ctrl_c_that_kill_a_job_exit_7(self):
        """Two Ctrl-C (SIGINT to the foreground group) that kill a running job end
        worker start with exit 7; two with nothing running end it with 0."""
        starts = self.path("starts")
        self.enqueue(command=f"echo $$ >> {q(starts)}; sleep 30")
        sup = self.start_workers(1)
        wait_until(lambda: lines(starts), 20, "the job to start")
        os.killpg(sup.pid, signal.SIGINT)
        wait_until(lambda: "running jobs finish first" in self.log_text(sup), 10,
                   "the supervisor to begin a warm stop")
        os.killpg(sup.pid, signal.SIGINT)
        self.assertEqual(sup.wait(timeout=20), queuectl.EXIT_INTERRUPTED)
        self.ok("cancel", *[job["id"] for job in json.loads(
            self.ok("list", "--state", "pending", "--json"))])
        idle = self.start_workers(1)
        os.killpg(idle.pid, signal.SIGINT)
        os.killpg(idle.pid, signal.SIGINT)
        self.assertEqual(idle.wait(timeout=20), 0)


class DetachTest(QueueTestCase):
    """worker start --detach: a supervisor in the background, and its log file."""

    def test_detach_returns_promptly_and_stop_removes_the_pid_file(self):
        """worker start --detach returns at once, even inside $(...); stop ends it."""
        script = 'x=$("$PY" "$QUEUECTL" worker start --detach --count 2) && echo "$x"'
        env = dict(self.env, PY=sys.executable, QUEUECTL=QUEUECTL)
        self.addCleanup(self.kill_detached)
        started = time.monotonic()
        result = subprocess.run(["sh", "-c", script], env=env, cwd=self.dir,
                                capture_output=True, text=True, timeout=25)
        elapsed = time.monotonic() - started
        match = re.search(r"supervisor pid (\d+)", result.stdout)
        self.assertEqual((result.returncode, result.stderr), (0, self.created_note()))
        self.assertIsNotNone(match, result.stdout)
        self.assertIn("started 2 worker(s)", result.stdout)
        self.assertLess(elapsed, 10)
        pid = int(match.group(1))
        self.assertTrue(pid_alive(pid))
        self.assertEqual(len(self.worker_pids(pid, 2) or []), 2)

        ids = [self.enqueue(command="echo hi") for _ in range(3)]
        for job_id in ids:
            self.assertEqual(self.wait_state(job_id, "completed")["output"]["stdout"],
                             "hi\n")

        stop = self.run_cli("worker", "stop", timeout=30)
        self.assertEqual(stop.returncode, 0, stop.stderr)
        self.assertIn(f"stopped workers (supervisor pid {pid})", stop.stdout)
        self.assertFalse(os.path.exists(self.pid_file))
        wait_until(lambda: not pid_alive(pid), 10, "the detached supervisor to exit")
        wait_until(lambda: not group_members(pid), 10, "the detached workers to exit")
        with open(self.local + ".log") as f:
            self.assertNotIn("Traceback", f.read())

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
        log = self.local + ".log"
        wait_until(lambda: os.path.exists(log + ".1"), 10, "the log to be rotated")
        self.assertLess(os.path.getsize(log), 3000 + 1000)
        self.assertLess(os.path.getsize(log + ".1"), 3000 + 1000)
        with open(log) as f:
            self.assertNotIn("Traceback", f.read())

    def test_a_log_line_is_written_whole_or_not_at_all(self):
        """A log that can take only part of a line (a disk filling up, a file size
        limit) keeps no torn line: the line is written whole or not at all."""
        path = self.path("q.db.log")
        with open(path, "w") as f:
            f.write(("x" * 99 + "\n") * 40)          # 4000 bytes
        limit = 4000 + 50                            # room for 50 more bytes

        def small_files():
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        with open(path, "a") as log:
            result = subprocess.run(
                [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                 "import queuectl; queuectl.log('y' * 300); queuectl.log('z')", ROOT],
                stderr=log, preexec_fn=small_files, timeout=20)
        self.assertEqual(result.returncode, 0)
        with open(path) as f:
            text = f.read()
        self.assertRegex(text, r"^(x{99}\n){40}\S+Z z\n$")


add_postgres_variants(globals())


if __name__ == "__main__":
    unittest.main()
