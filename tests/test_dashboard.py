"""The web dashboard: a real `queuectl dashboard` on a free port, real workers,
requests through http.client and sockets, and a real browser where one exists."""

import contextlib
import getpass
import html
import http.client
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from tests.support import (add_postgres_variants, QUEUECTL, QueueTestCase, cmdline,
                           queuectl, wait_until)

q = shlex.quote
TOKEN = "s3cret-s3cret-s3cret"              # a token given by hand: 16 characters or more
PROMETHEUS_LINE = re.compile(
    r'(# (HELP|TYPE) queuectl_\w+ .+|queuectl_\w+(\{(\w+="[^"]*",?)+\})? [0-9.e+-]+)')


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = {key.lower(): value for key, value in headers}
        self.body = body
        self.text = body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)


class DashboardTestCase(QueueTestCase):
    """A dashboard subprocess on this test's database, and ways to talk to it:
    signed in, as a browser is, with the URL it prints when the token is its own."""

    session = None

    def start_dashboard(self, *args, env=None):
        """Start `queuectl dashboard --port 0 ARGS`; wait for the URL it prints, and
        sign in with it if it carries a token."""
        proc = subprocess.Popen([sys.executable, QUEUECTL, "dashboard", "--port", "0",
                                 *args], env=env or self.env, cwd=self.dir,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        self.addCleanup(self.stop_dashboard, proc)
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        self.assertTrue(ready, "the dashboard printed no URL within 20 s")
        line = self.banner = proc.stdout.readline().decode()
        if not line:                            # it ended at once: say why
            proc.wait(timeout=10)
            line = f"(exit {proc.returncode}) " + proc.stderr.read(2000).decode()
        match = re.search(r"http://([^/]+):(\d+)/(\?token=(\S+))? \((.*)Ctrl-C to "
                          r"stop\)$", line.strip())
        self.assertIsNotNone(match, f"no URL in {line!r}")
        self.host, self.port = match.group(1), int(match.group(2))
        self.where = match.group(5)
        self.token = unquote(match.group(4)) if match.group(4) else None
        self.session = self.sign_in(self.token) if self.token else None
        return proc

    def sign_in(self, token):
        """Open the sign-in URL; return the Cookie header it sets."""
        response = self.request("GET", "/?token=" + quote(token, safe=""), auth=False)
        self.assertEqual(response.status, 200, response.text)
        return response.headers["set-cookie"].split(";")[0]

    def cookie_line(self):
        """The session's Cookie header as a raw request line."""
        return f"Cookie: {self.session}\r\n".encode()

    def remove_database(self):
        """Take the queue away behind the dashboard's back: the SQLite file (and
        its WAL), or the PostgreSQL schema."""
        if self.postgres:
            self.sql("DROP SCHEMA " + queuectl.pg_url(self.db)[1] + " CASCADE")
            return
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.db + suffix)

    def put_foreign_database(self):
        """Put something that is no queue where the queue was: a file of text, or
        a schema of another program's table."""
        if self.postgres:
            schema = queuectl.pg_url(self.db)[1]
            self.sql(f"CREATE SCHEMA {schema}")
            self.sql(f"CREATE TABLE {schema}.notes (line text)")
            return
        with open(self.db, "wb") as f:
            f.write(b"this is not a database" * 100)

    def stop_dashboard(self, proc):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)

    def request(self, method, path, headers=None, body=None, host=None, auth=True):
        """One request; the Host header is HOST (default: 127.0.0.1:PORT). Unless
        it carries credentials of its own, or AUTH is false, it carries the
        session cookie."""
        sent = {"Host": host or f"{self.host}:{self.port}", **(headers or {})}
        if auth and self.session and not {"Cookie", "Authorization"} & set(sent):
            sent["Cookie"] = self.session
        conn = http.client.HTTPConnection(self.host, self.port, timeout=15)
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            return Response(response.status, response.getheaders(), response.read())
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def get_json(self, path, **kw):
        response = self.get(path, **kw)
        self.assertEqual(response.status, 200, f"{path}: {response.text}")
        self.assertTrue(response.headers["content-type"].startswith("application/json"))
        return response.json()

    def csrf(self, **kw):
        page = self.get("/", **kw)
        return re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">',
                         page.text).group(1)

    def post(self, path, origin=True, csrf=True, headers=None):
        """A POST as the dashboard's own page sends it (Origin and CSRF token)."""
        sent = dict(headers or {})
        if origin:
            sent["Origin"] = (origin if isinstance(origin, str)
                              else f"http://{self.host}:{self.port}")
        if csrf:
            sent["X-CSRF-Token"] = csrf if isinstance(csrf, str) else self.csrf()
        return self.request("POST", path, headers=sent)

    def assertError(self, response, status, needle=""):
        """A short error body: JSON {"error": ...} under /api/, else one text line."""
        self.assertEqual(response.status, status, response.text)
        text = response.text.strip()
        self.assertLess(len(text), 300)
        self.assertNotIn("Traceback", text)
        self.assertIn(needle, text)


class DashboardApiTest(DashboardTestCase):
    """Pages and API documents: the CLI's documents, filtered, searched, paged, with
    short errors."""

    def test_pages_and_api_documents_equal_the_cli_with_workers_running(self):
        """Each page loads with its own script and style only; each API document
        is the CLI's --json document, while real workers run jobs."""
        self.enqueue(id="hello", command="echo hello; echo oops >&2")
        self.enqueue(id="bad", command="exit 3", max_retries=0)
        self.enqueue(id="later", command="true", delay="1h")
        self.enqueue(id="child", command="true", after=["hello"])
        self.start_workers(2)
        self.start_dashboard()
        for job_id in ("hello", "child"):
            self.wait_state(job_id, "completed")
        self.wait_state("bad", "dead")

        for path in ("/", "/jobs", "/jobs?state=dead&q=ba", "/jobs/hello", "/dlq"):
            page = self.get(path)
            self.assertEqual(page.status, 200, path)
            self.assertEqual(page.headers["content-type"], "text/html; charset=utf-8")
            self.assertIn("script-src 'self'", page.headers["content-security-policy"])
            self.assertEqual(re.findall(r"<script[^>]*>", page.text),
                             ['<script src="/static/app.js" defer>'], path)
        for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
            static = self.get("/static/" + name)
            self.assertEqual(static.status, 200)
            self.assertTrue(static.headers["content-type"].startswith(kind))

        status = self.get_json("/api/status")
        cli_status = self.json_out("status", "--json")
        for key in ("db", "counts", "dlq", "paused", "supervisor_pid", "workers",
                    "healthy", "problems"):
            self.assertEqual(status[key], cli_status[key], key)
        self.assertEqual(len(status["workers"]), 2)
        self.assertEqual(status["counts"]["completed"], 2)
        for path, argv in (("/api/jobs/hello", ("show", "hello")),
                           ("/api/jobs/child", ("show", "child")),
                           ("/api/jobs/hello/logs", ("logs", "hello")),
                           ("/api/jobs/bad/logs?attempt=1", ("logs", "bad", "--attempt",
                                                              "1")),
                           ("/api/dlq", ("dlq", "list")),
                           ("/api/config", ("config", "show")),
                           ("/api/stats", ("stats",)),
                           ("/api/jobs?state=pending&limit=5",
                            ("list", "--state", "pending", "--limit", "5"))):
            self.assertEqual(self.get_json(path), self.json_out(*argv, "--json"), path)
        logs = self.get_json("/api/jobs/hello/logs")
        self.assertEqual((logs["stdout"], logs["stderr"]), ("hello\n", "oops\n"))
        self.assertEqual([job["id"] for job in self.get_json("/api/dlq")], ["bad"])
        cursor = self.get("/api/dlq?limit=1").headers["x-next-before"]
        self.assertEqual(self.get_json("/api/dlq?before=" + cursor), [])

        overview = self.get_json("/api/overview")
        self.assertEqual(overview["status"]["counts"], status["counts"])
        self.assertEqual(len(overview["minutes"]), 60)
        self.assertEqual(sum(m["completed"] for m in overview["minutes"]), 2)
        self.assertEqual(sum(m["failed"] for m in overview["minutes"]), 1)
        self.assertIsNone(overview["oldest_waiting"])     # "later" is not due yet

    def test_jobs_are_filtered_searched_and_paged(self):
        for n in range(25):
            self.enqueue(id=f"job{n:02}", command=f"echo {'needle' if n % 5 == 0 else n}")
        self.ok("cancel", "job03", "job04")
        self.start_dashboard()
        page = self.get("/api/jobs?limit=10")
        first = [job["id"] for job in page.json()]
        self.assertEqual(first, [f"job{n:02}" for n in range(24, 14, -1)])
        self.assertRegex(page.headers["x-next-before"], r"^[A-Za-z0-9]+$")
        second = self.get("/api/jobs?limit=10&before=" + page.headers["x-next-before"])
        self.assertEqual([job["id"] for job in second.json()],
                         [f"job{n:02}" for n in range(14, 4, -1)])
        last = self.get("/api/jobs?limit=10&before=" + second.headers["x-next-before"])
        self.assertEqual(len(last.json()), 5)
        self.assertNotIn("x-next-before", last.headers)
        found = self.get_json("/api/jobs?q=needle")
        self.assertEqual([job["id"] for job in found], ["job20", "job15", "job10", "job05",
                                                        "job00"])
        self.assertEqual(self.get_json("/api/jobs?q=NeedLE"), found)   # blind to case
        self.assertEqual([job["id"] for job in self.get_json("/api/jobs?q=job1&limit=3")],
                         ["job19", "job18", "job17"])
        self.assertEqual([job["id"] for job in self.get_json("/api/jobs?state=cancelled")],
                         ["job04", "job03"])
        self.assertEqual(self.get_json("/api/jobs?q=%25"), [])    # LIKE's % is literal

    def test_a_search_looks_at_a_bounded_window_and_says_so(self):
        """On a big database a text search stops after the newest SEARCH_SCAN jobs,
        says so, and pages on from there."""
        lines = "".join(json.dumps({"id": f"j{n}", "command": "true"}) + "\n"
                        for n in range(30))
        self.ok("enqueue", "-", stdin=lines)
        store = self.store()
        jobs, cursor, short = store.search_jobs(text="j1", limit=50, scan=10)
        self.assertEqual((jobs, short), ([], True))          # it saw j29..j20 only
        self.assertIsNotNone(cursor)                        # and goes on from j20
        jobs, cursor, short = store.search_jobs(text="j1", before=cursor, limit=50,
                                                scan=10)
        self.assertEqual(([job["id"] for job in jobs], short),
                         ([f"j{n}" for n in range(19, 9, -1)], True))
        jobs, cursor, short = store.search_jobs(text="j1", before=cursor, limit=50,
                                                scan=10)
        self.assertEqual(([job["id"] for job in jobs], cursor, short),
                         (["j1"], None, False))

    def test_unknown_paths_and_ids_get_404_and_bad_parameters_400(self):
        self.enqueue(id="a", command="true")
        self.start_dashboard()
        for path in ("/nope", "/api/nope", "/jobs/nope", "/api/jobs/nope",
                     "/api/jobs/nope/logs", "/static/other.js", "/jobs/a/b"):
            self.assertError(self.get(path), 404)
        self.assertError(self.get("/api/jobs/nope"), 404, "no such job: nope")
        self.assertEqual(self.get("/api/nope").json(), {"error": "not found"})
        for path, needle in (("/api/jobs?state=weird", "unknown state: weird"),
                             ("/jobs?state=weird", "unknown state: weird"),
                             ("/api/jobs?limit=abc", "limit must be a whole number"),
                             ("/api/jobs?limit=0", "limit must be from 1 to 1000"),
                             ("/api/jobs?limit=5000", "limit must be from 1 to 1000"),
                             ("/api/jobs?before=nope", "not a job id: 'nope'"),
                             ("/api/jobs/a/logs?attempt=x", "attempt must be a whole"),
                             ("/api/jobs/a/logs?attempt=7", "")):
            response = self.get(path)
            self.assertIn(response.status, (400, 404), path)
            self.assertError(response, response.status, needle)
        self.assertError(self.get("/api/jobs?limit=0"), 400)

        # Other methods: 405 naming the right one where the path is known, 404
        # where not; one http.server does not know, 501; each short, with the CSP.
        for method, path, status in (("DELETE", "/api/jobs/a", 405),
                                     ("PUT", "/api/pause", 405),
                                     ("OPTIONS", "/", 405),
                                     ("PATCH", "/api/nope", 404),
                                     ("BREW", "/api/status", 501)):
            response = self.request(method, path)
            self.assertError(response, status)
            self.assertIn("script-src 'self'", response.headers[
                "content-security-policy"], method)
            if path.startswith("/api/"):
                self.assertIn("error", response.json(), method)
        self.assertEqual(self.request("DELETE", "/api/jobs/a").headers["allow"], "GET")
        self.assertEqual(self.state("a"), "pending")

        self.remove_database()
        self.assertError(self.get("/api/status"), 503, "no database at")
        self.assertError(self.get("/jobs/a"), 503, "no database at")
        self.put_foreign_database()
        self.assertError(self.get("/api/jobs"), 503)

    def test_the_api_root_lists_every_endpoint_from_the_route_table(self):
        """GET /api/ (and /api) names each endpoint's method and path with one line
        of description, read from the route table; each GET one listed answers."""
        self.enqueue(id="a", command="true")
        self.start_dashboard()
        index = self.get_json("/api/")
        self.assertEqual(self.get_json("/api"), index)
        listed = [(e["method"], e["path"]) for e in index["endpoints"]]
        routed = [(r.method, queuectl.route_path(r.pattern))
                  for r in queuectl.ROUTES
                  if r.pattern.startswith("/api") or r.pattern == "/metrics"]
        self.assertEqual(listed, routed)
        self.assertIn(("GET", "/api/jobs/{id}/logs"), listed)
        self.assertIn(("POST", "/api/pause"), listed)
        for endpoint in index["endpoints"]:
            self.assertRegex(endpoint["description"], r"^[^\n]{10,200}$", endpoint)
            if endpoint["method"] == "GET":
                path = endpoint["path"].replace("{id}", "a")
                self.assertEqual(self.get(path).status, 200, path)
        self.assertError(self.request("POST", "/api/"), 405)

    def test_paging_past_an_id_that_is_not_latin_1(self):
        """X-Next-Before names a position, not the id, so any id can end a page."""
        self.enqueue(id="first", command="true")
        self.enqueue(id="ジョブ", command="true")
        self.start_dashboard()
        response = self.get("/api/jobs?limit=1")
        self.assertEqual(response.status, 200)
        self.assertEqual([job["id"] for job in response.json()], ["ジョブ"])
        older = self.get_json("/api/jobs?limit=1&before=" +
                              response.headers["x-next-before"])
        self.assertEqual([job["id"] for job in older], ["first"])

    def test_paging_goes_on_when_the_job_a_page_ended_on_is_gone(self):
        """The next page's cursor names a position, not a job: deleting or purging
        the job a page ended on leaves the next page as it was. A job id or a
        malformed cursor gets 400."""
        for n in range(7):
            self.enqueue(id=f"j{n}", command="true")
        self.ok("cancel", "j3")
        self.start_dashboard()
        first = self.get("/api/jobs?limit=2")               # j6, j5
        self.ok("delete", "j5")
        second = self.get("/api/jobs?limit=2&before=" + first.headers["x-next-before"])
        self.assertEqual(second.status, 200, second.text)
        self.assertEqual([job["id"] for job in second.json()], ["j4", "j3"])
        self.ok("purge", "--state", "cancelled")           # j3, where it ended
        third = self.get_json("/api/jobs?limit=2&before=" +
                              second.headers["x-next-before"])
        self.assertEqual([job["id"] for job in third], ["j2", "j1"])
        pending = self.get("/api/jobs?state=pending&limit=1")
        self.ok("delete", "j6")
        cursor = pending.headers["x-next-before"]
        self.assertEqual([job["id"] for job in self.get_json(
            "/api/jobs?state=pending&limit=1&before=" + cursor)], ["j4"])
        for cursor in ("j2", "r", "r0", "r-1", "r１", "r01", "r" + "9" * 19, " r5"):
            self.assertError(self.get("/api/jobs?before=" + quote(cursor)), 400,
                             "before takes the X-Next-Before of the page before")

    def test_numeric_parameters_take_ascii_digits_only(self):
        """limit and attempt are ASCII digits: Arabic-Indic or full-width digits,
        a sign, spaces or underscores, which int() would take, get 400."""
        self.enqueue(id="a", command="true")
        self.ok("cancel", "a")
        self.start_dashboard()
        for text in ("١٢", "１２", "+5", " 5", "5 ", "1_0", "²"):
            self.assertError(self.get("/api/jobs?limit=" + quote(text)), 400,
                             "limit must be a whole number")
            self.assertError(self.get("/api/jobs/a/logs?attempt=" + quote(text)), 400,
                             "attempt must be a whole number")
        self.assertEqual(len(self.get_json("/api/jobs?limit=0012")), 1)
        self.assertError(self.get("/api/jobs?limit=" + "9" * 5000), 400,
                         "limit must be from 1 to 1000")

    def test_odd_parameters_and_slow_bodies_get_short_answers(self):
        self.enqueue(id="a", command="true")
        self.start_dashboard(env=dict(self.env, QUEUECTL_TOKEN=TOKEN))
        bearer = {"Authorization": "Bearer " + TOKEN}
        for path in ("/api/jobs/a/logs?attempt=99999999999999999999",
                     "/api/jobs/a/logs?attempt=0", "/api/jobs/a/logs?attempt=-1",
                     "/api/jobs?q=" + "x" * 50010):
            self.assertError(self.get(path, headers=bearer), 400)
        self.assertError(self.get("/api/jobs/" + "x" * 60000, headers=bearer), 404,
                         "no such job")
        login = self.get("/login")
        self.assertNotIn(self.db, login.text)               # no path before sign-in
        self.assertFailsCleanly(2, "enqueue", '{"id": "..", "command": "true"}')
        self.assertFailsCleanly(2, "enqueue", "-c", "true", "--id", ".")


class DashboardMetricsTest(DashboardTestCase):
    """/metrics in the Prometheus text format."""

    def test_metrics_in_the_prometheus_text_format(self):
        self.enqueue(id="ok1", command="true")
        self.enqueue(id="ok2", command="sleep 0.2")
        self.ok("config", "set", "backoff_base", "1")            # retry after 1 s
        self.enqueue(id="bad", command="false", max_retries=1)
        self.start_workers(2)
        self.start_dashboard()
        for job_id in ("ok1", "ok2"):
            self.wait_state(job_id, "completed")
        self.wait_state("bad", "dead")
        response = self.get("/metrics")
        self.assertEqual(response.status, 200)
        self.assertTrue(response.headers["content-type"].startswith("text/plain; "
                                                                   "version=0.0.4"))
        samples = {}
        for line in response.text.splitlines():
            self.assertRegex(line, PROMETHEUS_LINE)
            if not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        self.assertEqual(samples['queuectl_jobs{state="completed"}'], 2)
        self.assertEqual(samples['queuectl_jobs{state="dead"}'], 1)
        self.assertEqual(samples['queuectl_jobs{state="pending"}'], 0)
        self.assertEqual(samples['queuectl_runs_total{outcome="completed"}'], 2)
        self.assertEqual(samples['queuectl_runs_total{outcome="failed"}'], 2)
        self.assertEqual(samples["queuectl_workers"], 2)
        self.assertEqual(samples["queuectl_paused"], 0)
        self.assertEqual(samples["queuectl_healthy"], 0)             # a dead job
        buckets = [value for name, value in samples.items()
                   if name.startswith("queuectl_run_duration_seconds_bucket")]
        self.assertEqual(buckets, sorted(buckets))
        self.assertEqual(buckets[-1], samples["queuectl_run_duration_seconds_count"])
        self.assertEqual(buckets[-1], 2)
        self.assertGreaterEqual(samples["queuectl_run_duration_seconds_sum"], 0.2)
        # `true` took under 0.1 s, and `sleep 0.2` over (on a busy machine, `true` too).
        quick = sum(self.job(job_id)["history"][-1]["duration_s"] <= 0.1
                    for job_id in ("ok1", "ok2"))
        self.assertEqual(samples['queuectl_run_duration_seconds_bucket{le="0.1"}'], quick)

    def test_metrics_keep_every_digit(self):
        text = queuectl.prometheus_metrics(
            {"counts": dict.fromkeys(queuectl.STATES, 0), "workers": [],
             "supervisors": [], "paused": False, "oldest_runnable_age_s": 1234567.891, "healthy": True},
            {"completed": [(5, 3, 1234569.5)]})
        self.assertIn("queuectl_run_duration_seconds_sum 1234569.5\n", text)
        self.assertIn("queuectl_oldest_waiting_seconds 1234567.891\n", text)

    def test_metrics_and_status_agree_when_no_job_waits(self):
        """/api/status says null for the oldest waiting job when none waits; /metrics
        then has no queuectl_oldest_waiting_seconds sample (not 0), and has one
        once a job waits."""
        self.enqueue(id="later", command="true", delay="1h")
        self.start_dashboard()

        def oldest_samples():
            return [line for line in self.get("/metrics").text.splitlines()
                    if line.startswith("queuectl_oldest_waiting_seconds")]
        self.assertIsNone(self.get_json("/api/status")["oldest_runnable_age_s"])
        self.assertEqual(oldest_samples(), [])
        self.assertIn("# TYPE queuectl_oldest_waiting_seconds gauge",
                      self.get("/metrics").text)
        self.ok("pause")
        self.enqueue(id="now", command="true")
        age = self.get_json("/api/status")["oldest_runnable_age_s"]
        self.assertIsNotNone(age)
        [sample] = oldest_samples()
        self.assertGreaterEqual(float(sample.split()[1]), age)


class DashboardActionTest(DashboardTestCase):
    """Actions (cancel, retry, pause, resume): sent from the dashboard's page only."""

    def test_actions_change_jobs_when_sent_from_the_dashboard(self):
        """Cancel (pending, failed, running), retry a dead job and all of them,
        pause and resume: each changes what the CLI then shows."""
        marker = self.path("second-time")
        flaky = f"test -e {q(marker)} || {{ touch {q(marker)}; exit 1; }}"
        self.enqueue(id="flaky", command=flaky, max_retries=0)
        self.enqueue(id="flaky2", command=flaky + "2", max_retries=0)
        self.ok("config", "set", "backoff_base", "100")
        self.enqueue(id="retrying", command="false", max_retries=5)
        self.enqueue(id="long", command="sleep 60")
        self.start_workers(2)
        self.start_dashboard()
        self.wait_state("flaky", "dead")
        self.wait_state("flaky2", "dead")
        self.wait_state("retrying", "failed")
        running = self.wait_state("long", "processing")

        response = self.post("/api/jobs/long/cancel")
        self.assertEqual(response.status, 200, response.text)
        # The same words as `queuectl cancel long` prints.
        self.assertEqual(response.json(), {"message": "long: cancelled (its run was "
                                                      "killed)"})
        self.wait_state("long", "cancelled", timeout=5)
        wait_until(lambda: self.job("long")["history"][-1]["outcome"] == "cancelled", 5,
                   "the killed run to be recorded")
        self.assertTrue(running["worker_pid"])
        self.assertEqual(self.post("/api/jobs/retrying/cancel").status, 200)
        self.assertEqual(self.state("retrying"), "cancelled")
        self.assertError(self.post("/api/jobs/retrying/cancel"), 409, "cancelled")

        self.assertEqual(self.post("/api/jobs/flaky/retry").json(),
                         {"message": "flaky: back to pending"})
        self.wait_state("flaky", "completed")
        self.assertError(self.post("/api/jobs/flaky/retry"), 409)
        self.assertError(self.post("/api/jobs/nope/retry"), 404, "nope")
        self.assertEqual(self.post("/api/dlq/retry").json(),
                         {"message": "flaky2: back to pending"})
        self.wait_state("flaky2", ("completed", "dead"))

        self.assertEqual(self.post("/api/pause").status, 200)
        self.assertTrue(self.json_out("status", "--json")["paused"])
        self.enqueue(id="held", command="true")
        self.assertRegex(self.post("/api/resume").json()["message"],
                         r"^resumed \(paused since \S+Z\)$")
        self.assertFalse(self.json_out("status", "--json")["paused"])
        self.wait_state("held", "completed")

    def test_actions_without_origin_or_csrf_token_or_by_get_change_nothing(self):
        """Each rule alone refuses the action: GET (405), no or foreign Origin
        (403), no or wrong CSRF token (403)."""
        self.enqueue(id="a", command="true", run_at="2999-01-01T00:00:00Z")
        self.start_dashboard()
        before = self.rows()
        cases = [
            (self.get("/api/jobs/a/cancel"), 405),
            (self.request("GET", "/api/pause"), 405),
            (self.post("/api/jobs/a/cancel", origin=False), 403),
            (self.post("/api/jobs/a/cancel", origin="http://evil.example"), 403),
            (self.post("/api/jobs/a/cancel", origin=f"http://localhost:{self.port}"),
             403),
            (self.post("/api/jobs/a/cancel", csrf=False), 403),
            (self.post("/api/jobs/a/cancel", csrf="0" * 32), 403),
            (self.post("/api/pause", csrf=False), 403),
        ]
        for response, status in cases:
            self.assertError(response, status)
        self.assertEqual(self.get("/api/jobs/a/cancel").headers["allow"], "POST")
        self.assertEqual(self.rows(), before)
        self.assertEqual(self.post("/api/jobs/a/cancel").status, 200)    # control
        self.assertEqual(self.state("a"), "cancelled")


class DashboardSignInTest(DashboardTestCase):
    """The token: signing in with it, its file, and the throttle on wrong ones."""

    def test_a_token_guards_every_request(self):
        """With a token, the API needs it as a Bearer header, pages a cookie from the
        login form; the static files and the form itself are open."""
        self.enqueue(id="a", command="true", run_at="2999-01-01T00:00:00Z")
        self.start_dashboard("--token", TOKEN)
        bearer = {"Authorization": "Bearer " + TOKEN}
        self.assertError(self.get("/api/status"), 401, "token")
        self.assertError(self.get("/metrics"), 401)
        self.assertError(self.get("/api/status", headers={"Authorization":
                                                          "Bearer wrong"}), 401)
        forged = {"Cookie": f"queuectl_session_{self.port}=forged"}
        self.assertError(self.get("/api/status", headers=forged), 401)
        self.assertEqual(self.get("/api/status", headers=bearer).status, 200)
        self.assertEqual(self.get("/metrics", headers=bearer).status, 200)
        self.assertEqual(self.get("/static/app.js").status, 200)
        for path in ("/favicon.ico", "/static/icon.svg"):     # no 404 in the log
            icon = self.get(path)
            self.assertEqual((icon.status, icon.headers["content-type"]),
                             (200, "image/svg+xml"), path)
        for path in ("/", "/jobs", "/dlq", "/jobs/a"):
            response = self.get(path)
            self.assertEqual((response.status, response.headers["location"]),
                             (303, "/login"), path)

        form = self.get("/login")
        self.assertEqual(form.status, 200)
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', form.text).group(1)
        origin = {"Origin": f"http://{self.host}:{self.port}",
                  "Content-Type": "application/x-www-form-urlencoded"}
        wrong = self.request("POST", "/login", headers=origin,
                             body=f"token=guess&csrf={csrf}")
        self.assertEqual(wrong.status, 403)
        self.assertIn("That is not the token.", wrong.text)
        self.assertNotIn("set-cookie", wrong.headers)
        no_csrf = self.request("POST", "/login", headers=origin, body="token=" + TOKEN)
        self.assertNotIn("set-cookie", no_csrf.headers)
        signed = self.request("POST", "/login", headers=origin,
                              body=f"token={TOKEN}&csrf={csrf}")
        self.assertEqual((signed.status, signed.headers["location"]), (303, "/"))
        cookie = signed.headers["set-cookie"]
        self.assertIn("HttpOnly", cookie)
        self.assertIn("SameSite=Strict", cookie)
        self.assertNotIn(TOKEN, cookie)
        session = {"Cookie": cookie.split(";")[0]}
        self.assertEqual(self.get("/", headers=session).status, 200)
        self.assertEqual(self.get("/api/status", headers=session).status, 200)

        # Actions: a cookie alone is not enough (CSRF), nor the sign-in form's token,
        # which anyone can read; a Bearer header is.
        self.assertError(self.post("/api/pause", csrf=False, headers=session), 403)
        self.assertError(self.post("/api/pause", csrf=csrf, headers=session), 403)
        self.assertError(self.post("/api/pause", origin=False, csrf=False), 401)
        self.assertFalse(self.json_out("status", "--json")["paused"])
        page_csrf = self.csrf(headers=session)
        self.assertEqual(self.post("/api/pause", csrf=page_csrf, headers=session).status,
                         200)
        self.assertEqual(self.post("/api/resume", origin=False, csrf=False,
                                   headers=bearer).status, 200)
        self.assertEqual(self.request("POST", "/api/jobs/a/cancel",
                                      headers=bearer).status, 200)
        self.assertEqual(self.state("a"), "cancelled")

    def test_on_loopback_every_request_needs_the_token_of_its_file(self):
        """Any account on the machine can reach 127.0.0.1: without --token the
        dashboard makes a token, keeps it in <db>.token (0600, reused on restart so
        a bookmark survives), and answers nothing, read or action, without it."""
        self.enqueue(id="a", command="echo secret", run_at="2999-01-01T00:00:00Z")
        proc = self.start_dashboard()
        token_file = self.local + ".token"
        with open(token_file) as f:
            self.assertEqual(f.read(), self.token + "\n")
        self.assertEqual(os.stat(token_file).st_mode & 0o777, 0o600)
        self.assertGreaterEqual(len(self.token), 16)
        self.assertNotIn(self.token, cmdline(proc.pid))       # not in `ps`
        self.session = None                                   # another local user
        for path in ("/api/status", "/api/jobs", "/api/jobs/a", "/api/jobs/a/logs",
                     "/api/", "/metrics"):
            self.assertError(self.get(path), 401, "token")
        for path in ("/", "/jobs", "/jobs/a", "/dlq"):
            self.assertEqual(self.get(path).headers.get("location"), "/login", path)
        form = self.get("/login").text                        # anyone can read it
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', form).group(1)
        self.assertError(self.post("/api/pause", csrf=csrf), 401)
        self.assertError(self.post("/api/jobs/a/cancel", csrf=csrf), 401)
        self.assertEqual(self.get("/api/status", headers={
            "Authorization": "Bearer " + self.token}).status, 200)
        self.assertEqual(self.state("a"), "pending")
        self.assertFalse(self.json_out("status", "--json")["paused"])

        first = self.token
        self.stop_dashboard(proc)
        self.start_dashboard()                                # a restart: same token
        self.assertEqual(self.token, first)
        self.assertEqual(self.get_json("/api/jobs/a")["command"], "echo secret")

    def test_the_printed_url_signs_in_and_keeps_the_token_out_of_urls_and_logs(self):
        """The printed URL (or any page's URL with ?token=) sets the session cookie
        and opens the page without the token; a wrong token gets the form; the
        log shows neither."""
        self.enqueue(id="a", command="true")
        proc = self.start_dashboard()
        token, self.session = self.token, None
        opened = self.get(f"/jobs?state=pending&token={quote(token)}&q=a")
        self.assertEqual(opened.status, 200, opened.text)
        self.assertIn('<meta http-equiv="refresh" content="0; url=/jobs?state=pending'
                      '&amp;q=a">', opened.text)
        self.assertNotIn(token, opened.text)
        cookie = opened.headers["set-cookie"]
        self.assertTrue(cookie.startswith(f"queuectl_session_{self.port}="), cookie)
        for flag in ("HttpOnly", "SameSite=Strict", "Path=/"):
            self.assertIn(flag, cookie)
        self.assertNotIn(token, cookie)
        session = {"Cookie": cookie.split(";")[0]}
        self.assertEqual(self.get("/jobs?state=pending", headers=session).status, 200)
        self.assertEqual(self.get("/api/jobs", headers=session).status, 200)
        self.assertIn('content="0; url=/"', self.get("/login?token=" + token).text)

        wrong = self.get("/?token=not-the-token-at-all")
        self.assertEqual(wrong.status, 403)
        self.assertIn("That is not the token.", wrong.text)
        self.assertNotIn("set-cookie", wrong.headers)
        self.assertError(self.get("/api/status?token=" + token), 401)   # API: Bearer
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        err = err.decode()
        self.assertIn('"GET /?token=REDACTED HTTP/1.1" 403', err)
        self.assertIn('"GET /api/status?token=REDACTED HTTP/1.1" 401', err)
        self.assertNotIn(token, err)
        self.assertNotIn("not-the-token", err)
        self.assertEqual(
            queuectl.redact("GET /x?a=1&%74oken=s&TOKEN=t;token=u#f HTTP/1.1"),
            "GET /x?a=1&%74oken=REDACTED&TOKEN=REDACTED;token=REDACTED#f HTTP/1.1")

    def test_a_token_file_that_is_not_a_private_file_of_ours_is_refused(self):
        """<db>.token as a symlink, a FIFO, readable by others, another user's, or
        holding no usable token: one line, exit 1, the file left as it was."""
        self.store()
        token_file = self.local + ".token"
        os.makedirs(os.path.dirname(token_file), exist_ok=True)
        elsewhere = self.path("elsewhere")
        with open(elsewhere, "w") as f:
            f.write("a-token-nobody-should-use\n")

        def refused(needle):
            code, out, err = self.run_bounded("dashboard", "--port", "0")
            self.assertOneErrorLine(1, code, out, err)
            self.assertIn(needle, err)
            self.assertIn(token_file, err)
        os.symlink(elsewhere, token_file)
        refused("cannot open")
        os.unlink(token_file)
        os.mkfifo(token_file, 0o600)
        refused("not a regular file")
        os.unlink(token_file)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"short\n")
        os.close(fd)
        refused("no usable token")
        with open(token_file, "w") as f:
            f.write("long-enough-but-shared\n")
        os.chmod(token_file, 0o644)
        refused("others may read")
        self.assertEqual(os.stat(token_file).st_mode & 0o777, 0o644)
        if os.geteuid() == 0:                                 # root can give it away
            os.chmod(token_file, 0o600)
            os.chown(token_file, 65534, -1)
            refused("not yours")
        with open(token_file) as f:
            self.assertEqual(f.read(), "long-enough-but-shared\n")

    def test_a_token_too_short_to_be_safe_is_refused_saying_how_to_make_one(self):
        """Fewer than 16 characters (--token or $QUEUECTL_TOKEN): exit 2, one line
        naming the minimum and a command that makes a token; nothing written."""
        self.store()
        before = self.rows()
        for args, env in ((["--token", "x"], self.env),
                          ([], dict(self.env, QUEUECTL_TOKEN="fifteen-chars!!")),
                          (["--token", "y" * 15, "--host", "0.0.0.0"], self.env)):
            proc = subprocess.run([sys.executable, QUEUECTL, "dashboard", "--port", "0",
                                   *args], env=env, capture_output=True, text=True,
                                  timeout=10, cwd=self.dir)
            self.assertOneErrorLine(2, proc.returncode, proc.stdout, proc.stderr)
            self.assertIn("at least 16 characters", proc.stderr)
            self.assertIn(queuectl.TOKEN_HOWTO, proc.stderr)
        self.assertEqual(self.rows(), before)
        self.assertFalse(os.path.exists(self.local + ".token"))
        self.start_dashboard(env=dict(self.env, QUEUECTL_TOKEN="sixteen-chars!!!"))
        self.assertEqual(self.get("/api/status", headers={
            "Authorization": "Bearer sixteen-chars!!!"}).status, 200)

    def test_wrong_tokens_from_a_client_are_answered_429_ever_more_slowly(self):
        """After 5 wrong tokens (Bearer, the sign-in form or a sign-in URL, counted
        together per client address) the next try waits 1 s, then 2 s...: 429 with
        Retry-After, even with the right token; a signed-in browser goes on, and
        the right token after the wait clears the count."""
        self.store()
        self.start_dashboard(env=dict(self.env, QUEUECTL_TOKEN=TOKEN))
        session = {"Cookie": self.sign_in(TOKEN)}
        wrong = {"Authorization": "Bearer wrong-wrong-wrong-wrong"}
        right = {"Authorization": "Bearer " + TOKEN}
        form = self.get("/login").text
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', form).group(1)

        def sign_in_form(token):
            return self.request("POST", "/login", body=f"token={token}&csrf={csrf}",
                                headers={"Content-Type":
                                         "application/x-www-form-urlencoded"})
        self.assertError(self.get("/api/status", headers=wrong), 401)
        self.assertEqual(sign_in_form("guess-one").status, 403)
        self.assertEqual(self.get("/?token=guess-two").status, 403)
        self.assertError(self.get("/api/status", headers=wrong), 401)
        self.assertEqual(sign_in_form("guess-three").status, 403)    # the 5th
        for response in (self.get("/api/status", headers=wrong),
                         self.get("/api/status", headers=right),
                         sign_in_form(TOKEN), self.get("/?token=" + TOKEN)):
            self.assertError(response, 429, "too many wrong tokens")
            self.assertEqual(response.headers["retry-after"], "1")
        self.assertEqual(self.get("/api/status", headers=session).status, 200)
        wait_until(lambda: self.get("/api/status", headers=wrong).status == 401, 5,
                   "the first wait to end")                     # the 6th
        waited = self.get("/api/status", headers=right)
        self.assertError(waited, 429)
        self.assertEqual(waited.headers["retry-after"], "2")   # it doubled
        wait_until(lambda: self.get("/api/status", headers=right).status == 200, 5,
                   "the second wait to end")
        for _ in range(5):                                      # the count is cleared
            self.assertError(self.get("/api/status", headers=wrong), 401)

    def test_the_sign_in_throttle_doubles_the_wait_caps_it_and_forgets(self):
        """1, 2, 4 ... 60 s after the 5th failure; forgotten after 15 minutes
        without one; an IPv6 host counts by its /64; memory stays bounded."""
        now = [1000.0]
        throttle = queuectl.SignInThrottle(clock=lambda: now[0])
        waits = []
        for _ in range(14):
            try:
                self.assertFalse(throttle.check("10.0.0.1", lambda: False))
            except queuectl.HttpError as e:
                self.fail(f"refused before its wait ended: {e}")
            _, _, until = throttle.clients["10.0.0.1"]
            waits.append(until - now[0])
            now[0] = until
        self.assertEqual(waits, [0, 0, 0, 0, 1, 2, 4, 8, 16, 32, 60, 60, 60, 60])
        self.assertFalse(throttle.check("10.0.0.1", lambda: False))
        now[0] += 0.5
        with self.assertRaises(queuectl.HttpError) as caught:
            throttle.check("10.0.0.1", lambda: True)
        self.assertEqual((caught.exception.status, caught.exception.headers),
                         (429, {"Retry-After": "60"}))
        self.assertTrue(throttle.check("10.0.0.2", lambda: True))   # another client
        now[0] += queuectl.SIGNIN_FORGET_S + 61
        self.assertFalse(throttle.check("10.0.0.1", lambda: False))
        self.assertEqual(throttle.clients["10.0.0.1"][0], 1)         # forgotten
        self.assertTrue(throttle.check("10.0.0.1", lambda: True))
        self.assertNotIn("10.0.0.1", throttle.clients)                # cleared
        self.assertEqual(throttle.client("2001:db8::1"), throttle.client("2001:db8::2"))
        self.assertNotEqual(throttle.client("2001:db8::1"),
                            throttle.client("2001:db8:0:1::1"))
        self.assertEqual(throttle.client("::ffff:10.0.0.9"), "10.0.0.9")
        for n in range(queuectl.SIGNIN_CLIENTS_MAX + 1000):
            throttle.check(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", lambda: False)
        self.assertEqual(len(throttle.clients), queuectl.SIGNIN_CLIENTS_MAX)

    def test_the_bearer_scheme_is_case_blind_and_a_wrong_token_says_so(self):
        self.enqueue(id="a", command="true")
        self.start_dashboard(env=dict(self.env, QUEUECTL_TOKEN=TOKEN))
        for scheme in ("Bearer", "bearer", "BEARER"):
            self.assertEqual(self.get("/api/status", headers={
                "Authorization": f"{scheme} {TOKEN}"}).status, 200, scheme)
        self.assertError(self.get("/api/status", headers={
            "Authorization": "bearer nope"}), 401, "wrong token")
        self.assertError(self.get("/api/status"), 401, "a token is needed")
        minutes = self.get_json("/api/overview", headers={
            "Authorization": "Bearer " + TOKEN})["minutes"]
        self.assertRegex(minutes[-1]["minute"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:00\.000Z$")


class DashboardSafetyTest(DashboardTestCase):
    """Who may reach the dashboard (addresses, Host names), and that what it shows is
    escaped."""

    def test_any_other_address_needs_a_token_or_it_refuses_to_start(self):
        self.store()                                  # create the database
        before = self.rows()
        code, out, err = self.run_bounded("dashboard", "--host", "0.0.0.0", "--port", "0")
        self.assertOneErrorLine(2, code, out, err)
        self.assertIn("without a token", err)
        self.assertEqual(self.rows(), before)
        self.start_dashboard("--host", "0.0.0.0",
                             env=dict(self.env, QUEUECTL_TOKEN="from-env-" + TOKEN))
        # It prints a URL to open from elsewhere: this machine's name, not 0.0.0.0.
        self.assertEqual((self.host, self.where),
                         (socket.gethostname(), "on every address of this machine; "))
        self.host = "127.0.0.1"
        self.assertError(self.get("/api/status"), 401)
        self.assertEqual(self.get("/api/status", headers={
            "Authorization": "Bearer from-env-" + TOKEN}).status, 200)

    def test_with_the_token_of_its_file_only_loopback_names_are_answered(self):
        """DNS rebinding: a page of evil.example that resolves to 127.0.0.1 sends
        Host: evil.example, and gets nothing."""
        self.store()
        self.start_dashboard()
        for host in ("evil.example", f"evil.example:{self.port}", "10.0.0.1"):
            self.assertError(self.get("/api/status", host=host), 421)
        for host in (f"localhost:{self.port}", f"127.0.0.1:{self.port}", "localhost"):
            self.assertEqual(self.get("/api/status", host=host).status, 200, host)

    def test_a_name_that_only_starts_with_127_is_not_loopback(self):
        """DNS rebinding through 127.attacker.example: refused like any other
        foreign name, and it is no address to serve on without a token."""
        self.enqueue(id="a", command="true")
        self.start_dashboard()
        for host in (f"127.attacker.example:{self.port}", "127.0.0.1.nip.io",
                     "localhost.attacker.example"):
            self.assertError(self.get("/api/status", host=host), 421)
            self.assertError(self.request("POST", "/api/pause", host=host, headers={
                "Origin": f"http://{host}"}), 421)
        self.assertFalse(self.json_out("status", "--json")["paused"])
        for host in ("[::1]", f"[::1]:{self.port}", "127.0.0.2"):
            self.assertEqual(self.get("/api/status", host=host).status, 200, host)
        self.assertTrue(queuectl._loopback("127.0.0.1"))
        self.assertFalse(queuectl._loopback("127.attacker.example"))
        code, out, err = self.run_bounded("dashboard", "--host", "127.attacker.example",
                                          "--port", "0")
        self.assertOneErrorLine(2, code, out, err)

    def test_everything_from_the_database_is_escaped(self):
        """A job whose id and command hold HTML shows as text on every page the
        server fills; JSON is served as JSON, never sniffed as HTML."""
        evil = '<img/src=x/onerror=alert(1)>"'
        self.enqueue(id=evil, command="echo '<script>alert(1)</script>'")
        self.start_dashboard()
        page = self.get("/jobs/" + quote(evil, safe=""))
        self.assertEqual(page.status, 200)
        self.assertNotIn("<img", page.text)
        self.assertIn("&lt;img/src=x/onerror=alert(1)&gt;&quot;", page.text)
        search = self.get("/jobs?q=" + quote('"><script>alert(1)</script>'))
        self.assertNotIn("<script>alert", search.text)
        self.assertIn('value="&quot;&gt;&lt;script&gt;', search.text)
        api = self.get("/api/jobs/" + quote(evil, safe=""))
        self.assertEqual(api.json()["id"], evil)
        self.assertEqual(api.headers["x-content-type-options"], "nosniff")
        self.assertEqual(api.headers["content-type"], "application/json; charset=utf-8")
        self.assertEqual(self.get("/api/jobs/%3Cb%3E").json(),
                         {"error": "no such job: <b>"})           # JSON, not HTML


class PostgresDashboardPasswordTest(DashboardTestCase):
    """A password in the postgresql:// URL is shown to no one: not in the
    dashboard's pages, API, /metrics or log, nor by status. PostgreSQL only (a
    SQLite path holds no password); the server's trust authentication ignores
    the password, unless the server's URL already had one: then that one."""

    store_kind = "postgres"

    def setUp(self):
        super().setUp()
        parts = urlsplit(self.db)
        given = parts.password or dict(parse_qsl(parts.query)).get("password")
        self.secrets = [given] if given else ["userinfo-pw-s3cret", "query-pw-s3cret"]
        if not given:
            user = quote(parts.username or getpass.getuser(), safe="")
            netloc = f"{user}:{self.secrets[0]}@" + parts.netloc.rpartition("@")[2]
            self.db = urlunsplit(parts._replace(
                netloc=netloc, query=parts.query + "&password=" + self.secrets[1]))
            self.env = dict(self.env, QUEUECTL_DB=self.db)
        self.assertEqual(queuectl.local_base(self.db), self.local)   # the same files

    def assertNoSecret(self, text, where):
        for secret in self.secrets:
            self.assertNotIn(secret, text, where)

    def test_a_password_in_the_url_is_shown_nowhere(self):
        """Every page, every GET endpoint of /api/, /metrics, an action's answer, an
        error naming the database, the URL line and log of the dashboard, and
        status (text and --json) show the URL with its password masked."""
        self.enqueue(id="ok", command="echo hello")
        self.enqueue(id="bad", command="false", max_retries=0)
        self.start_workers(1)
        self.wait_state("ok", "completed")
        self.wait_state("bad", "dead")
        proc = self.start_dashboard()
        masked = self.json_out("status", "--json")["db"]
        self.assertIn("***", masked)
        if len(self.secrets) == 2:                  # both places are masked
            self.assertRegex(masked, r"^postgresql://[^:/@]+:\*\*\*@[^?]*\?.*"
                                     r"&password=\*\*\*")
        self.assertIn(masked, self.banner)
        seen = {"the dashboard's URL line": self.banner}
        paths = ["/", "/jobs", "/jobs?q=ok", "/jobs/ok", "/dlq", "/metrics", "/api/"]
        paths += [endpoint["path"].replace("{id}", "ok") for endpoint in
                  self.get_json("/api/")["endpoints"] if endpoint["method"] == "GET"]
        for path in paths:
            response = self.get(path)
            self.assertEqual(response.status, 200, path)
            seen[path] = response.text
        seen["/login"] = self.get("/login", auth=False).text
        self.assertIn(html.escape(masked), seen["/jobs/ok"])
        self.assertEqual(json.loads(seen["/api/status"])["db"], masked)
        for path in ("/api/pause", "/api/resume"):
            seen["POST " + path] = self.post(path).text
        seen["status"] = self.ok("status")
        seen["status --json"] = self.ok("status", "--json")
        self.assertIn(masked, seen["status"])
        self.remove_database()                    # an error names the database
        missing = self.get("/api/status")
        self.assertError(missing, 503, "no database at")
        if len(self.secrets) == 2:
            self.assertIn(":***@", missing.text)
        seen["503"] = missing.text
        code, out, err = self.cli("status")
        self.assertEqual(code, 1)
        self.assertIn(masked, err)
        seen["status's error"] = out + err
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        seen["the dashboard's output"] = (out + err).decode()
        for where, text in seen.items():
            self.assertNoSecret(text, where)


    def test_a_detached_supervisor_keeps_the_password_off_command_lines(self):
        """worker start --detach passes the URL on in the environment: `ps` shows
        no password on the command line of its supervisor or workers."""
        code, out, err = self.cli("worker", "start", "--count", "2", "--detach")
        self.assertEqual(code, 0, err)
        self.addCleanup(self.cli, "worker", "stop")
        supervisor = wait_until(lambda: self.worker_pids(count=2) and
                                queuectl.PidFile.holder(self.pid_file).pid, 20,
                                "the supervisor and its workers")
        pids = [supervisor, *self.worker_pids(count=2)]
        for pid in pids:
            self.assertIn("worker start", cmdline(pid))
            self.assertNoSecret(cmdline(pid), f"the command line of pid {pid}")
        self.assertNoSecret(out + err, "worker start's output")
        code, out, err = self.cli("worker", "stop")
        self.assertEqual(code, 0, err)


class DashboardServerTest(DashboardTestCase):
    """The server under odd, slow, vanishing or too many clients; start-up errors and
    stopping."""

    def test_bad_slow_and_vanishing_clients_do_not_stop_or_block_it(self):
        """A garbage request gets 400; a silent client and one that hangs up in the
        middle of a big answer leave the server answering others at once."""
        lines = "".join(json.dumps({"id": f"j{n}", "command": "echo " + "x" * 2000})
                        + "\n" for n in range(1000))
        self.ok("enqueue", "-", stdin=lines)
        # A sign-in whose body never comes (a dashboard with a token reads it).
        self.start_dashboard(env=dict(self.env, QUEUECTL_TOKEN=TOKEN))
        short = socket.create_connection((self.host, self.port))
        self.addCleanup(short.close)
        short.sendall(b"POST /login HTTP/1.0\r\nContent-Length: 100\r\n\r\ntoken=x")
        proc = self.start_dashboard()

        silent = socket.create_connection((self.host, self.port))
        self.addCleanup(silent.close)
        half = socket.create_connection((self.host, self.port))
        self.addCleanup(half.close)
        half.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")   # no end
        drip = socket.create_connection((self.host, self.port))
        self.addCleanup(drip.close)
        dripped = threading.Thread(target=send_a_byte_a_second, args=(drip, 30))
        dripped.start()
        started = time.monotonic()
        self.assertEqual(self.get("/api/status").status, 200)
        self.assertLess(time.monotonic() - started, 5)

        with socket.create_connection((self.host, self.port)) as garbage:
            garbage.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            self.assertIn(b"400", read_all(garbage))
        with socket.create_connection((self.host, self.port)) as long_line:
            long_line.sendall(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
            self.assertIn(b" 414 ", read_all(long_line))

        for _ in range(5):
            gone = socket.create_connection((self.host, self.port))
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            gone.sendall(b"GET /api/jobs?limit=1000 HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
                         self.cookie_line() + b"\r\n")
            gone.recv(100)
            gone.close()                                   # RST in mid-answer
        self.assertEqual(len(self.get_json("/api/jobs?limit=1000")), 1000)

        for client in (silent, half):                   # dropped after 10 s
            client.settimeout(30)
            self.assertEqual(client.recv(100), b"")
        short.settimeout(30)                            # dropped too, and no 500
        self.assertNotIn(b" 500 ", read_all(short))
        dripped.join(timeout=30)                        # a byte at a time: the same
        self.assertFalse(dripped.is_alive())
        self.assertLess(time.monotonic() - started, 20, "the drip was not dropped")
        self.assertEqual(self.get("/api/status").status, 200)
        self.assertIsNone(proc.poll())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, 0)
        self.assertNotIn(b"Traceback", err)
        self.assertEqual(err.count(b"Request timed out"), 3, err)
        self.assertIn(b'127.0.0.1 "\\x16\\x03\\x01 not http at all" 400', err)

    def test_too_many_clients_at_once_get_503_and_the_rest_go_on(self):
        self.store()
        self.start_dashboard()
        held = []
        for _ in range(queuectl.DASHBOARD_MAX_CLIENTS):
            client = socket.create_connection((self.host, self.port))
            client.sendall(b"GET /api/status HTTP/1.0\r\n")   # and no more yet
            held.append(client)
        # The server accepts in order: these came first, so they hold every slot.
        with socket.create_connection((self.host, self.port)) as extra:
            extra.settimeout(10)
            self.assertIn(b" 503 ", read_all(extra))
        for client in held:
            client.close()
        wait_until(lambda: self.get("/api/status").status == 200, 10,
                   "the dashboard to answer again")

    def test_ctrl_c_and_sigterm_stop_it_at_once_with_exit_0(self):
        """Even with a client connected and silent, it stops at once."""
        self.store()
        for sig in (signal.SIGINT, signal.SIGTERM):
            proc = self.start_dashboard()
            silent = socket.create_connection((self.host, self.port))
            self.addCleanup(silent.close)
            self.assertEqual(self.get("/api/status").status, 200)
            started = time.monotonic()
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=10)
            self.assertLess(time.monotonic() - started, 3)
            self.assertEqual((proc.returncode, err), (0, b""), sig)

    def test_reads_do_not_hold_up_workers_or_enqueue(self):
        """A big page being read does not hold a lock writers wait on."""
        lines = "".join(json.dumps({"id": f"j{n}", "command": "true"}) + "\n"
                        for n in range(3000))
        self.ok("enqueue", "-", stdin=lines)
        self.start_dashboard()
        slow = socket.create_connection((self.host, self.port))
        self.addCleanup(slow.close)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(b"GET /api/jobs?limit=1000 HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
                     self.cookie_line() + b"\r\n")
        slow.recv(100)                                  # and read no more for now
        started = time.monotonic()
        self.ok("enqueue", json.dumps({"id": "new", "command": "true"}))
        self.ok("cancel", "j5")
        self.assertLess(time.monotonic() - started, 5)

    def test_missing_database_and_busy_port_are_one_line_errors(self):
        code, out, err = self.run_bounded("dashboard", "--port", "0")
        self.assertOneErrorLine(1, code, out, err)
        self.assertFalse(self.db_exists())
        self.store()
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, out, err = self.run_bounded("dashboard", "--port",
                                          str(taken.getsockname()[1]))
        self.assertOneErrorLine(1, code, out, err)
        self.assertIn("cannot serve on 127.0.0.1", err)
        for bad in (["--port", "-1"], ["--port", "x"], ["--port", "70000"]):
            code, out, err = self.run_bounded("dashboard", *bad)
            self.assertOneErrorLine(2, code, out, err)


def send_a_byte_a_second(sock, seconds):
    """Send a request a byte a second until the server hangs up (or SECONDS)."""
    for byte in (b"GET /api/status HTTP/1.0\r\n" * 10)[:seconds]:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return                                     # hung up on
        time.sleep(1)
        ready, _, _ = select.select([sock], [], [], 0)
        if ready and not sock.recv(100):
            return


def read_all(sock):
    """Everything SOCK receives until the other end closes it."""
    sock.settimeout(15)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@unittest.skipUnless(chromium(), "no Chromium: install Debian's chromium package "
                                 "(.ci/run does) to run the browser tests")
class DashboardBrowserTest(DashboardTestCase):
    """Headless Chromium loads the live pages, runs their script, and shows what a
    user would see."""

    def browse(self, path, *flags):
        """Open PATH as a user does: through the sign-in URL the dashboard printed,
        here followed from a local file (a link from elsewhere), which keeps the
        token off Chromium's command line, where `ps` would show it. None if
        Chromium hung (seen on a loaded machine): it is killed, to be asked again."""
        profile = tempfile.mkdtemp(dir=self.dir)
        url = f"http://{self.host}:{self.port}{path}"
        url += ("&" if "?" in path else "?") + "token=" + quote(self.token, safe="")
        link = os.path.join(profile, "sign-in.html")
        with open(link, "w") as f:
            f.write(f'<meta http-equiv="refresh" content="0; url={url}">')
        proc = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--virtual-time-budget=3000", *flags,
             "file://" + link],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.dir,
            start_new_session=True)
        try:
            out, err = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)         # and its helpers
            proc.communicate(timeout=10)
            return None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def dom(self, path):
        """The DOM of PATH once its script ran. Headless Chromium's virtual time
        may run out between the sign-in URL's two hops, leaving nothing to dump:
        then it is asked again."""
        def shown():
            result = self.browse(path, "--dump-dom")
            if result is None:
                return None
            self.assertEqual(result.returncode, 0, result.stderr[-2000:])
            text = result.stdout.decode("utf-8", "replace")
            return text if "<body" in text and 'data-page="signed_in"' not in text \
                else None
        return wait_until(shown, 90, f"Chromium to show {path}")

    def test_the_browser_renders_counts_output_and_keeps_injected_script_inert(self):
        inject = ("<script>document.documentElement.setAttribute('data-pwned','1')"
                  "</script><img src=x onerror=\"document.documentElement"
                  ".setAttribute('data-pwned','2')\">")
        for n in range(3):
            self.enqueue(id=f"ok{n}", command="true")
        self.enqueue(id="evil", command=f"echo {q(inject)}; echo {q(inject)} >&2")
        self.enqueue(id="bad", command="false", max_retries=0)
        self.start_workers(1)
        self.start_dashboard()
        self.wait_state("evil", "completed")
        self.wait_state("bad", "dead")
        wait_until(lambda: all(self.state(f"ok{n}") == "completed" for n in range(3)),
                   20, "the ok jobs to complete")

        overview = self.dom("/")
        counts = dict(re.findall(r'<a class="card (\w+)" href="/jobs\?state=\w+">'
                                 r'<span class="n">(\d+)</span>', overview))
        self.assertEqual(counts, {"pending": "0", "processing": "0", "completed": "4",
                                  "failed": "0", "dead": "1", "cancelled": "0"})
        self.assertIn("Needs attention: 1 dead job(s) in the DLQ", overview)
        self.assertIn("1 worker(s), running", overview)
        self.assertEqual(len(re.findall(r'<rect [^>]*class="ok"', overview)), 1)

        job = self.dom("/jobs/evil")
        self.assertIn('<span id="job-id">evil</span>', job)
        self.assertIn("Output of run 1 (completed)", job)
        shown = inject.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        self.assertIn(f'<pre id="stdout">{shown}\n</pre>', job)
        self.assertIn(f'<pre id="stderr">{shown}\n</pre>', job)
        self.assertTrue(job.startswith('<!DOCTYPE html>\n<html lang="en"><head>'),
                        job[:100])                     # no data-pwned attribute
        self.assertNotIn('<img src="x"', job)
        self.assertTrue(self.dom("/jobs").startswith(
            '<!DOCTYPE html>\n<html lang="en"><head>'))

        dlq = self.dom("/dlq")
        self.assertIn('<a href="/jobs/bad">bad</a>', dlq)
        self.assertIn("exit 1", dlq)

        shot = os.path.join(self.dir, "overview.png")

        def screenshot():                               # as dom(): maybe twice
            result = self.browse("/", f"--screenshot={shot}", "--window-size=1200,800",
                                 "--hide-scrollbars")
            if result is None:
                return None
            self.assertEqual(result.returncode, 0, result.stderr[-2000:])
            if not os.path.exists(shot):                # no page to take yet
                return None
            with open(shot, "rb") as f:
                png = f.read()
            return png if len(png) > 20000 else None
        png = wait_until(screenshot, 90, "Chromium to show the overview")
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        self.assertEqual(struct.unpack(">II", png[16:24]), (1200, 800))
        self.assertGreater(len(png), 20000)            # not a blank page


add_postgres_variants(globals())


if __name__ == "__main__":
    unittest.main()
