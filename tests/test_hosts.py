"""Many hosts on one PostgreSQL queue.

Each host here is a supervisor in namespaces of its own, as on a machine of its
own: its host name (UTS), its process tree (PID, with its own /proc) and its own
state directory (PID file, log, spools). The hosts share only the database. A
host's namespace dies with its first process, so killing that one is a power
cut: every process of the host ends at once, nothing of it writes anything.

These need root (or user namespaces) for unshare, and skip without; faketime
(Debian's faketime package) gives a host a skewed clock.
"""

import functools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import unittest
from datetime import timedelta

from tests.test_dashboard import DashboardTestCase
from tests.support import (QUEUECTL, PgServer, QueueTestCase, lines, pg_schema_url,
                           queuectl, wait_until)

q = shlex.quote
UNSHARE = ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "--"]
# The namespace's first process: it names the host, runs the supervisor, and
# (a shell, not exec'd away) reaps what is orphaned in it, as init does.
HOST_INIT = 'hostname "$0" && "$@"; exit $?'


@functools.lru_cache(maxsize=None)
def namespaces_missing():
    """Why a host cannot be made here, or None."""
    if not shutil.which("unshare"):
        return "unshare (util-linux) is not installed"
    try:
        done = subprocess.run(UNSHARE + ["sh", "-c", HOST_INIT, "probe", "true"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unshare does not run: {e}"
    if done.returncode:
        return f"unshare --uts --pid is not allowed here: {done.stderr.strip()}"
    return None


class HostsTestCase(QueueTestCase):
    """Hosts (start_host) on the test's PostgreSQL queue; the test process itself
    is one more host, with this machine's name, that runs commands only."""

    store_kind = "postgres"
    on_postgres = False          # PostgreSQL's already: no copy

    def setUp(self):
        missing = namespaces_missing()
        if missing:
            self.skipTest(missing)
        super().setUp()
        self.store()                     # the queue exists before any host

    def start_host(self, name, count=2, wrap=(), wait=True):
        """Start host NAME: a supervisor of COUNT workers in namespaces of its own,
        its command line prefixed by WRAP (faketime ...). Killed at cleanup."""
        env = dict(self.env, XDG_STATE_HOME=self.path(f"state-{name}"))
        log = open(self.path(f"{name}.log"), "w+")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            UNSHARE + ["sh", "-c", HOST_INIT, name, *wrap, sys.executable, QUEUECTL,
                       "worker", "start", "--count", str(count)],
            env=env, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True)
        proc.name, proc.log = name, log
        self.addCleanup(self.power_cut, proc)
        if wait:
            try:
                wait_until(lambda: self.running_on(name, count), 30,
                           f"host {name} to run {count} worker(s)")
            except AssertionError as e:
                raise AssertionError(f"{e}; its log: {self.log_text(proc)}; status: "
                                     f"{self.status()['supervisors']}") from None
        return proc

    def power_cut(self, proc):
        """Kill host PROC's every process at once."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)    # its init: the namespace goes too
            proc.wait(timeout=10)

    def status(self):
        return json.loads(self.ok("status", "--json"))

    def host(self, name):
        """Host NAME's supervisor as status lists it, or None."""
        return next((s for s in self.status()["supervisors"] if s["host"] == name),
                    None)

    def running_on(self, name, count):
        host = self.host(name)
        return host if host and host["state"] == "running" and \
            len(host["workers"]) == count and not host["lost"] else None

    def batch(self, commands):
        """Enqueue one job a command, in one batch; their ids."""
        return self.ok("enqueue", "-", stdin="".join(
            json.dumps({"command": command}) + "\n" for command in commands)).split()

    def assertCleanHostLog(self, proc):
        text = self.log_text(proc)         # a host's log: start_host gives it .log
        self.assertNotIn("Traceback", text)


def runs_of(path):
    """{job id: [(host, start ns, end ns or None)]} from a file that each run
    writes "start" and "end" lines to (see RECORDED)."""
    runs = {}
    for line in lines(path):
        job_id, host, what, ns = line.split()
        if what == "start":
            runs.setdefault(job_id, []).append([host, int(ns), None])
        else:
            for run in runs[job_id]:
                if run[0] == host and run[2] is None:
                    run[2] = int(ns)
                    break
    return runs


def recorded(path, work="sleep 0.05"):
    """A job's command that writes when each run starts and ends (runs_of), also
    when it is stopped (SIGTERM), but not when it is killed outright."""
    stamp = f'echo "$QUEUECTL_JOB_ID $(hostname) %s $(date +%%s%%N)" >> {path}'
    return (f"{stamp % 'start'}; trap '{stamp % 'end'}; exit 143' TERM; {work}; "
            f"{stamp % 'end'}")


class SharedPoolTest(HostsTestCase):
    """Hosts with the same URL make one pool."""

    def test_two_hosts_share_the_work_and_each_job_runs_once(self):
        """Two hosts of two workers take 60 jobs between them: each job runs once,
        on one of them, and status lists both hosts with their workers."""
        runs = self.path("runs")
        self.start_host("alpha")
        self.start_host("beta")
        status = self.status()
        self.assertEqual(sorted(s["host"] for s in status["supervisors"]),
                         ["alpha", "beta"])
        self.assertEqual(status["workers"], [])        # none on this host
        ids = self.batch([recorded(runs, "sleep 0.1")] * 60)
        self.ok("wait", *ids)
        done = runs_of(runs)
        self.assertEqual(sorted(done), sorted(ids))
        for job_id in ids:
            self.assertEqual(len(done[job_id]), 1, done[job_id])
            self.assertIsNotNone(done[job_id][0][2])
        hosts = {run[0] for job_runs in done.values() for run in job_runs}
        self.assertEqual(hosts, {"alpha", "beta"})
        text = self.ok("status")
        self.assertIn("workers:   none on this host", text)
        self.assertIn("host alpha: 2 worker(s), running", text)
        self.assertIn("host beta: 2 worker(s), running", text)

    def test_a_job_on_another_host_shows_there_in_status_and_show(self):
        """A running job is listed under its host, and show names the host."""
        self.start_host("alpha", count=1)
        job_id = self.enqueue(command="sleep 30")
        job = self.wait_state(job_id, "processing")
        self.assertEqual(job["worker_host"], "alpha")
        alpha = self.host("alpha")
        self.assertEqual(alpha["workers"], [{"pid": job["worker_pid"], "job_id": job_id,
                                             "command": "sleep 30"}])
        self.assertEqual(self.status()["other_claims"], [])
        self.ok("cancel", job_id)

    def test_a_new_job_wakes_an_idle_host_at_once(self):
        """An idle host hears of a new job (LISTEN/NOTIFY), well before its
        once-a-second look."""
        runs = self.path("runs")
        self.start_host("alpha", count=1)
        delays = []
        for _ in range(5):
            added = time.time_ns()
            job_id = self.enqueue(command=recorded(runs, "true"))
            self.ok("wait", job_id)
            delays.append((runs_of(runs)[job_id][0][1] - added) / 1e9)
        # A shell's start is in it too; a look once a second would take half a
        # second on average.
        self.assertLess(sorted(delays)[2], 0.25, delays)


class LostHostTest(HostsTestCase):
    """A host that dies: its jobs are run by the others once their leases run out,
    never beside a run of its own."""

    def test_a_host_killed_outright_has_its_jobs_run_by_another(self):
        """Host alpha dies (a power cut) while running two jobs: within the lease
        beta runs them, each run after alpha's ended, and status says alpha is
        lost until worker stop --host alpha forgets it."""
        self.ok("config", "set", "lease_timeout", "2")
        self.ok("config", "set", "backoff_base", "1")
        runs = self.path("runs")
        alpha = self.start_host("alpha")
        ids = self.batch([recorded(runs, "sleep 30")] * 2)
        for job_id in ids:
            self.wait_state(job_id, "processing")
        wait_until(lambda: len(runs_of(runs)) == 2, 10, "both runs to start")
        self.start_host("beta")
        self.power_cut(alpha)
        cut = time.time_ns()
        for job_id in ids:
            job = wait_until(lambda: [h for h in self.history(job_id)
                                      if h["outcome"] == "running" and h["number"] == 2],
                             15, f"beta to run {job_id}")
        status = self.status()
        for job_id in ids:
            first, second = runs_of(runs)[job_id]
            self.assertEqual((first[0], first[2]), ("alpha", None))   # killed
            self.assertEqual(second[0], "beta")
            self.assertGreater(second[1], cut)
            history = self.history(job_id)
            self.assertEqual([(h["outcome"], h["reason"]) for h in history],
                             [("failed", "worker lost"), ("running", None)])
            self.assertEqual(self.job(job_id)["worker_host"], "beta")
        self.assertEqual(len(status["supervisors"]), 2)
        lost = wait_until(lambda: (self.host("alpha") or {}).get("lost") and
                          self.host("alpha"), 15, "alpha to be seen as lost")
        self.assertEqual(lost["state"], "running")
        check = self.cli("status", "--check")
        self.assertEqual(check[0], queuectl.EXIT_CHECK_NO_WORKERS, check)
        self.assertIn("host alpha: lost", check[1])
        self.assertIn("1 host(s) stopped answering: alpha", check[1])

        code, out, err = self.cli("worker", "stop", "--host", "alpha")
        self.assertEqual((code, out), (queuectl.EXIT_NO_ANSWER, ""), err)
        self.assertIn("host alpha does not answer", err)
        self.assertIsNone(self.host("alpha"))
        self.ok("cancel", *ids)

    def test_a_host_whose_supervisor_freezes_stops_its_own_runs_in_time(self):
        """Alpha's supervisor freezes (its workers and jobs go on): its workers
        stop their runs before the lease runs out, so beta's runs of those jobs
        never overlap alpha's, and when alpha thaws it writes nothing over them."""
        self.ok("config", "set", "lease_timeout", "2")
        runs = self.path("runs")
        alpha = self.start_host("alpha")
        ids = self.batch([recorded(runs, "sleep 30")] * 2)
        wait_until(lambda: len(runs_of(runs)) == 2, 10, "both runs to start")
        self.start_host("beta")
        supervisor = self.host("alpha")["pid"]
        os.kill(self.root_pid(alpha, supervisor), signal.SIGSTOP)
        try:
            for job_id in ids:
                wait_until(lambda: len(runs_of(runs).get(job_id, [])) == 2, 15,
                           f"beta to run {job_id}")
        finally:
            os.kill(self.root_pid(alpha, supervisor), signal.SIGCONT)
        for job_id in ids:
            first, second = runs_of(runs)[job_id]
            self.assertEqual((first[0], second[0]), ("alpha", "beta"))
            self.assertIsNotNone(first[2], "alpha's run was not stopped")
            self.assertLess(first[2], second[1], "the two runs overlapped")
        wait_until(lambda: "could not be renewed in time" in self.log_text(alpha), 10,
                   "alpha's workers to say why they stopped")
        for job_id in ids:
            history = self.history(job_id)
            self.assertEqual([h["outcome"] for h in history], ["failed", "running"])
        self.assertCleanHostLog(alpha)
        self.ok("cancel", *ids)

    def root_pid(self, host, pid_in_host):
        """The pid, as this test sees it, of the supervisor that is PID_IN_HOST in
        the PID namespace of HOST (a start_host process): status shows a host's
        pids as it sees them, and every host's supervisor has the same one, so
        it is looked for among HOST's descendants alone (tests run side by side)."""
        parents, found = {}, []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            parents[int(entry)] = int(fields.get("PPid", "0"))
            pids = fields.get("NSpid", "").split()
            if len(pids) > 1 and int(pids[-1]) == pid_in_host and \
                    fields["Name"].strip() == "queuectl-super":
                found.append(int(entry))
        for pid in found:
            ancestor = pid
            while ancestor > 1:
                ancestor = parents.get(ancestor, 0)
                if ancestor == host.pid:
                    return pid
        raise AssertionError(f"no supervisor of pid {pid_in_host} in host {host.name}")


class HostsDashboardTest(HostsTestCase, DashboardTestCase):
    """The dashboard, on a host that runs no workers, shows every host's."""

    def test_metrics_and_the_api_show_every_host_and_a_lost_one(self):
        """/metrics has each host's workers and whether it is lost; /api/status
        lists both supervisors, the lost one as lost, and their workers' jobs."""
        self.ok("config", "set", "lease_timeout", "2")
        alpha = self.start_host("alpha", count=1)
        self.start_host("beta", count=2)
        job_id = self.enqueue(command="sleep 30")
        self.wait_state(job_id, "processing")
        self.power_cut(alpha)
        wait_until(lambda: (self.host("alpha") or {}).get("lost"), 15,
                   "alpha to be seen as lost")
        self.start_dashboard()
        metrics = self.get("/metrics").text.splitlines()
        for line in ('queuectl_host_workers{host="alpha"} 1',
                     'queuectl_host_workers{host="beta"} 2',
                     'queuectl_host_lost{host="alpha"} 1',
                     'queuectl_host_lost{host="beta"} 0',
                     'queuectl_workers 0'):                  # none on this host
            self.assertIn(line, metrics)
        status = self.get_json("/api/status")
        hosts = {s["host"]: s for s in status["supervisors"]}
        self.assertEqual(sorted(hosts), ["alpha", "beta"])
        self.assertEqual((hosts["alpha"]["lost"], hosts["beta"]["lost"]), (True, False))
        self.assertEqual(len(hosts["beta"]["workers"]), 2)
        # The job alpha ran, beta runs once alpha's lease ran out: beta's workers say so.
        wait_until(lambda: self.job(job_id)["worker_host"] == "beta", 15,
                   "beta to run the job")
        beta = [s for s in self.get_json("/api/status")["supervisors"]
                if s["host"] == "beta"][0]
        self.assertIn(job_id, [w["job_id"] for w in beta["workers"]])
        self.ok("cancel", job_id)


class CrossHostTest(HostsTestCase):
    """What one host asks of another, through the database."""

    def test_cancel_reaches_a_run_on_another_host_within_a_second(self):
        """cancel here kills the job's run on alpha about a second later at most."""
        runs = self.path("runs")
        self.start_host("alpha", count=1)
        job_id = self.enqueue(command=recorded(runs, "sleep 30"))
        wait_until(lambda: runs_of(runs).get(job_id), 10, "the run to start")
        cancelled = time.time_ns()
        self.assertEqual(self.ok("cancel", job_id),
                         f"{job_id}: cancelled (its run on host alpha is killed there "
                         f"within about a second)\n")
        (run,) = wait_until(lambda: [run for run in runs_of(runs)[job_id]
                                     if run[2] is not None], 5, "alpha to kill the run")
        self.assertLess((run[2] - cancelled) / 1e9, 1.5)
        self.assertEqual(self.state(job_id), "cancelled")

    def test_logs_follow_shows_a_run_on_another_host(self):
        """logs --follow here prints, as it comes, what a job prints on alpha."""
        self.start_host("alpha", count=1)
        gate = self.path("gate")
        job_id = self.enqueue(command=f"echo first; while [ ! -e {q(gate)} ]; do "
                                      f"sleep 0.05; done; echo second; echo oops >&2")
        self.wait_state(job_id, "processing")
        follow = subprocess.Popen([sys.executable, QUEUECTL, "logs", "--follow", job_id],
                                  env=self.env, cwd=self.dir, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: follow.poll() is None and follow.kill())
        self.assertEqual(follow.stdout.readline(), "first\n")   # while it runs
        open(gate, "w").close()
        out, err = follow.communicate(timeout=20)
        self.assertEqual((follow.returncode, out, err), (0, "second\n", "oops\n"))
        self.assertEqual(self.cli("logs", job_id), (0, "first\nsecond\n", "oops\n"))

    def test_worker_stop_asks_one_host_or_all_through_the_database(self):
        """worker stop --host beta stops beta only, its running job finishing
        first; --all-hosts stops the rest; on this host none was running."""
        runs = self.path("runs")
        alpha = self.start_host("alpha", count=1)
        beta = self.start_host("beta", count=1)
        # The runs go on until the gate opens: once beta has taken the stop.
        gate = self.path("gate")
        ids = self.batch([recorded(runs, f"while [ ! -e {q(gate)} ]; do sleep 0.05; "
                                         f"done")] * 2)
        wait_until(lambda: len(runs_of(runs)) == 2, 10, "both runs to start")
        stop = subprocess.Popen([sys.executable, QUEUECTL, "worker", "stop", "--host",
                                 "beta"], env=self.env, cwd=self.dir, text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        self.addCleanup(lambda: stop.poll() is None and (stop.kill(), stop.wait()))
        wait_until(lambda: (self.host("beta") or {}).get("state") == "stopping", 30,
                   "beta to take the stop")
        open(gate, "w").close()
        out, err = stop.communicate(timeout=30)
        self.assertEqual(stop.returncode, 0, err)
        self.assertIn("asked the supervisors of beta", err)
        self.assertRegex(out, r"^stopped the workers of beta \(pid \d+\): "
                              r"1 running job\(s\) finished\n$")
        self.assertEqual(beta.wait(timeout=10), 0)
        self.assertIsNone(alpha.poll())
        self.assertIn("asked to stop by worker stop on another host", self.log_text(beta))
        self.assertEqual(self.run_cli("worker", "stop").stdout, "no workers running\n")
        self.assertIsNone(alpha.poll())
        result = self.run_cli("worker", "stop", "--all-hosts", timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(alpha.wait(timeout=10), 0)
        self.assertEqual(self.status()["supervisors"], [])
        for job_id in ids:
            self.assertEqual(self.state(job_id), "completed")
        code, out, err = self.cli("worker", "stop", "--host", "gamma")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "queuectl: error: no workers recorded on host gamma "
                              "(none on any host)\n")

    def test_worker_stop_timeout_puts_another_hosts_jobs_back(self):
        """worker stop --host alpha --timeout 1s: alpha's running job is killed and
        put back as pending (exit 7)."""
        alpha = self.start_host("alpha", count=1)
        job_id = self.enqueue(command="sleep 30")
        self.wait_state(job_id, "processing")
        result = self.run_cli("worker", "stop", "--host", "alpha", "--timeout", "1s",
                              timeout=30)
        self.assertEqual(result.returncode, queuectl.EXIT_INTERRUPTED, result.stderr)
        self.assertIn(f"interrupted and put back as pending ({job_id})", result.stdout)
        self.assertEqual(alpha.wait(timeout=10), queuectl.EXIT_INTERRUPTED)
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0))


def libfaketime():
    """The path of Debian's libfaketime, or None. (Preloaded by hand: the
    faketime wrapper's semaphore clashes across PID namespaces.)"""
    for folder in ("/usr/lib/x86_64-linux-gnu/faketime", "/usr/lib/aarch64-linux-gnu/"
                   "faketime", "/usr/lib/faketime"):
        path = os.path.join(folder, "libfaketime.so.1")
        if os.path.exists(path):
            return path
    return None


def skewed(offset):
    """A command prefix that runs a command with its clock OFFSET off (+10m): its
    wall clock, as a misset host's is; its monotonic clock, which only ever
    measures intervals on its own host, is left true (faked too, it made
    psycopg 3.2's connect time out at once)."""
    return ["env", f"LD_PRELOAD={libfaketime()}", f"FAKETIME={offset}",
            "FAKETIME_DONT_FAKE_MONOTONIC=1"]


class ClockTest(HostsTestCase):
    """Every time is the database's: a host whose clock is off changes nothing."""

    def setUp(self):
        super().setUp()
        if not libfaketime():
            self.skipTest("libfaketime is not installed (apt-get install faketime)")

    def test_a_host_whose_clock_runs_ahead_takes_no_live_claim(self):
        """Beta's clock is 10 minutes ahead: alpha's claims, renewed by the
        database's clock, never look expired to it, and its delayed job waits
        by the database's clock too, without spinning."""
        self.ok("config", "set", "lease_timeout", "2")
        runs = self.path("runs")
        alpha = self.start_host("alpha", count=2)
        ids = self.batch([recorded(runs, "sleep 4")] * 2)
        wait_until(lambda: len(runs_of(runs)) == 2, 10, "alpha to start both")
        beta = self.start_host("beta", count=1, wrap=skewed("+10m"))
        delayed = self.enqueue(command="true", delay="3s")
        self.ok("wait", *ids, delayed)
        done = runs_of(runs)
        for job_id in ids:
            self.assertEqual([run[0] for run in done[job_id]], ["alpha"])
            self.assertEqual([h["outcome"] for h in self.history(job_id)],
                             ["completed"])
        job = self.job(delayed)           # its times are the database's
        waited = (queuectl.parse_iso(job["history"][0]["started_at"]) -
                  queuectl.parse_iso(job["created_at"])).total_seconds()
        self.assertGreater(waited, 2.9)
        self.assertLess(waited, 6)
        self.assertCleanHostLog(alpha)
        self.assertCleanHostLog(beta)

    def test_a_job_enqueued_by_a_skewed_host_is_due_by_the_database_clock(self):
        """enqueue from a host 1 hour behind or ahead: the job is due now (not in
        an hour), and --delay counts from the database's now."""
        def enqueue(skew, *argv):
            """Enqueue from a host SKEW off; the job's id, and the database's
            clock just before and just after."""
            before = self.sql("SELECT clock_timestamp()")[0][0]
            result = subprocess.run([*skewed(skew), sys.executable, QUEUECTL,
                                     "enqueue", "-c", "true", *argv], env=self.env,
                                    capture_output=True, text=True, timeout=60)
            self.assertEqual(result.returncode, 0, result.stderr)
            return result.stdout.strip(), before, self.sql("SELECT clock_timestamp()")[0][0]

        for skew, argv, due in (("+1h", (), 0), ("-1h", ("--delay", "1m"), 60)):
            job_id, before, after = enqueue(skew, *argv)
            job = self.job(job_id)
            created = queuectl.parse_iso(job["created_at"])
            slack = timedelta(milliseconds=1)            # stored to the millisecond
            self.assertTrue(before - slack <= created <= after + slack,
                            (skew, before, job, after))
            # Due DUE s after the moment it was checked, just before it was added.
            run_at = queuectl.parse_iso(job["run_at"])
            self.assertTrue(before - slack <= run_at - timedelta(seconds=due) <= created,
                            (skew, before, job))


class ServerRestartTest(HostsTestCase):
    """The database restarts (a failover) while jobs run on two hosts."""

    def setUp(self):
        super().setUp()
        try:
            self.server = PgServer()
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            self.skipTest(f"cannot start a private PostgreSQL server: {e}")
        self.addCleanup(self.server.stop)
        self.db = pg_schema_url(self.server.url, "restart")
        self.local = queuectl.local_base(self.db)
        self.env = dict(self.env, QUEUECTL_DB=self.db)
        self.store()

    def test_a_restart_mid_run_loses_nothing_and_doubles_nothing(self):
        """60 jobs on two hosts; the server restarts twice meanwhile. Every job
        completes, each ran to its end exactly once, and no log has a traceback."""
        runs = self.path("runs")
        alpha = self.start_host("alpha")
        beta = self.start_host("beta")
        ids = self.batch([recorded(runs, "sleep 0.3")] * 60)
        for started in (15, 35):
            wait_until(lambda: len(runs_of(runs)) >= started, 30, f"{started} runs")
            self.server.restart()
        self.ok("wait", "--timeout", "60s", *ids)
        done = runs_of(runs)
        try:
            for job_id in ids:
                ended = [run for run in done[job_id] if run[2] is not None]
                self.assertEqual(len(ended), 1, (job_id, done[job_id]))
                spans = sorted((run[1], run[2] or run[1]) for run in done[job_id])
                for (_, end), (start, _) in zip(spans, spans[1:]):
                    self.assertLessEqual(end, start, f"{job_id} ran twice at once: "
                                                     f"{done[job_id]}")
        except AssertionError as e:
            # What each host did, and the job's history, say how it came about.
            history = self.sql("SELECT job_id, number, outcome, reason, worker_pid, "
                               "started_at, finished_at FROM attempts WHERE job_id = ?",
                               (job_id,))
            raise AssertionError(f"{e}\nattempts: {history}\n" + "".join(
                f"--- {host.name}:\n{self.log_text(host)}" for host in (alpha, beta))
            ) from None
        for host in (alpha, beta):
            self.assertIsNone(host.poll())
            self.assertCleanHostLog(host)
        self.assertIn("the database answers again",
                      self.log_text(alpha) + self.log_text(beta))


    def test_what_a_host_was_told_survives_a_crash_of_the_server(self):
        """A claim and a lease renewal, once acknowledged, survive the server's
        crash: the host's run goes on, so losing either would let the job run
        twice at once (a claim lost: taken again; a renewal lost: taken over
        before its time)."""
        for _ in range(3):
            job_id = self.enqueue(command="true")
            store = self.store()
            claims, _ = store.claim([(4242, None)])
            [claim] = claims
            self.server.restart()                  # at once: a crash
            store = self.store()
            job = self.job(job_id)
            self.assertEqual((job["state"], job["attempts"], len(job["history"])),
                             ("processing", 1, 1), job)
            self.assertTrue(store.renew(job_id, claim.token, 3600))
            lease = self.sql("SELECT lease_until FROM jobs WHERE id = ?", (job_id,))
            self.server.restart()
            self.assertEqual(self.sql("SELECT lease_until FROM jobs WHERE id = ?",
                                      (job_id,)), lease)
            self.store().finish(job_id, claim.token, queuectl.RunResult(
                exit_code=0, duration_s=0.1))

    def test_a_worker_that_dies_while_the_server_is_down_is_replaced(self):
        """The server stops; a worker is killed meanwhile: the supervisor starts
        another without needing the server, goes on, and runs jobs once it is back."""
        sup = self.start_workers(1)
        [worker] = self.worker_pids(sup.pid, 1)
        self.server.stop()
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: set(self.worker_pids(sup.pid, 1) or [worker]) - {worker}, 15,
                   "a new worker")
        self.assertIsNone(sup.poll(), self.log_text(sup))
        self.server.start()
        job_id = self.enqueue(command="true")
        self.wait_state(job_id, "completed", 30)
        self.assertIsNone(sup.poll())
        self.assertNotIn("Traceback", self.log_text(sup))


class ManyHostsLoadTest(HostsTestCase):
    """Four hosts of four workers and 20,000 jobs: each runs exactly once."""

    def test_four_hosts_run_each_of_20000_jobs_exactly_once(self):
        count = int(os.environ.get("QUEUECTL_HOSTS_JOBS", "20000"))
        done = self.path("done")
        hosts = [self.start_host(name, count=4) for name in ("h1", "h2", "h3", "h4")]
        ids = self.ok("enqueue", "-", stdin="".join(
            json.dumps({"command": f"echo $QUEUECTL_JOB_ID >> {q(done)}"}) + "\n"
            for _ in range(count))).split()
        self.assertEqual(len(ids), count)
        wait_until(lambda: self.status()["counts"]["completed"] == count, 600,
                   f"{count} jobs to complete")
        again = self.sql("SELECT job_id, number, outcome, reason, worker_pid FROM "
                         "attempts WHERE job_id IN (SELECT job_id FROM attempts "
                         "GROUP BY job_id HAVING count(*) > 1) ORDER BY job_id, number")
        logs = "".join(line + "\n" for host in hosts for line in
                       self.log_text(host).splitlines()
                       if "completed in" not in line and " started" not in line)
        self.assertEqual(again, [], "jobs ran more than once; the hosts' logs:\n" + logs)
        ran = lines(done)
        self.assertEqual(len(ran), count)
        self.assertEqual(sorted(ran), sorted(ids))
        attempts = self.sql("SELECT count(*), count(DISTINCT job_id) FROM attempts")
        self.assertEqual(attempts, [(count, count)])
        for host in hosts:
            self.assertIsNone(host.poll())
            self.assertCleanHostLog(host)
            self.assertIn("completed in", self.log_text(host), "a host ran nothing")
        self.assertEqual(self.status()["counts"]["processing"], 0)


if __name__ == "__main__":
    unittest.main()
