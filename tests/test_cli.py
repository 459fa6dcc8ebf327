"""The command line as a whole: usage errors and bad input, suggestions, the
exit-code contract, --db and the new-database note, JSON output, terminal escapes,
and the script as users run it (#! line, any name, Python 3.9)."""

import json
import os
import shutil
import subprocess
import sys
import time
import unittest
from urllib.parse import parse_qsl, quote, urlsplit

from tests.support import (QUEUECTL, ROOT, QueueTestCase, add_postgres_variants,
                           another_db, claim_one, created_note, db_exists,
                           pg_schema_url, pg_server, queuectl)

PY39 = "/root/.pyenv/versions/3.9.18/bin/python3"


class UsageErrorTest(QueueTestCase):
    """Bad commands, options and values: exit 2, one stderr line, database unchanged."""

    def setUp(self):
        super().setUp()
        self.enqueue(id="existing", command="true")

    def test_unknown_state(self):
        """list --state with an unknown state is refused."""
        err = self.assertFailsCleanly(2, "list", "--state", "bogus")
        self.assertIn("bogus", err)
        self.assertFailsCleanly(2, "list", "--limit", "0")
        self.assertFailsCleanly(2, "list", "--limit", "x")

    def test_unknown_config_key(self):
        """An unknown config key is refused for get and set."""
        self.assertFailsCleanly(2, "config", "get", "bogus")
        self.assertFailsCleanly(2, "config", "set", "bogus", "1")
        self.assertFailsCleanly(2, "config", "bogus")

    def test_bad_config_value(self):
        """A bad config value is refused and the old value kept."""
        for key, value in (("max_retries", "-1"), ("max-retries", "1.5"),
                           ("job_timeout", "abc"), ("job_timeout", "0"),
                           ("backoff_base", "0.5"), ("backoff_max", "-1"),
                           ("output_limit", "-1"), ("lease_timeout", "0"),
                           ("max_retries", "")):
            with self.subTest(key=key, value=value):
                err = self.assertFailsCleanly(2, "config", "set", key, value)
                self.assertIn(key.replace("-", "_"), err)
        self.assertEqual(self.ok("config", "get", "max_retries"), "3\n")

    def test_worker_count_zero(self):
        """worker start --count must be at least 1."""
        self.assertFailsCleanly(2, "worker", "start", "--count", "0")
        self.assertFailsCleanly(2, "worker", "start", "--count", "-1")
        self.assertFailsCleanly(2, "worker", "start", "--count", "two")
        self.assertFailsCleanly(2, "worker", "stop", "--timeout", "-1")

    def test_unknown_command(self):
        """An unknown or missing command is a usage error."""
        self.assertFailsCleanly(2, "bogus")
        self.assertFailsCleanly(2)
        self.assertFailsCleanly(2, "dlq")
        self.assertFailsCleanly(2, "dlq", "bogus")
        self.assertFailsCleanly(2, "worker", "restart")

    def test_unknown_option(self):
        """An unknown option is a usage error."""
        self.assertFailsCleanly(2, "list", "--bogus")
        self.assertFailsCleanly(2, "--bogus", "status")
        self.assertFailsCleanly(2, "status", "--json", "--nope")
        self.assertFailsCleanly(2, "enqueue", '{"command": "true"}', "--force")
        self.assertFailsCleanly(2, "show")

    def test_dlq_retry_needs_ids_or_all(self):
        """dlq retry with neither ids nor --all, or both, is a usage error."""
        self.make_dead("d1")
        self.assertFailsCleanly(2, "dlq", "retry")
        self.assertFailsCleanly(2, "dlq", "retry", "d1", "--all")


class BadInputTest(QueueTestCase):
    """Malformed text, numbers and durations: refused in one line, in one wording."""

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

    def test_digits_of_other_scripts_are_refused_everywhere(self):
        """Numbers, durations and times on the command line and in job fields take
        ASCII digits only."""
        self.enqueue(id="j", command="true")
        for argv in (("config", "set", "max_retries", "١٢"),
                     ("config", "set", "job_timeout", "١٠"),
                     ("enqueue", "-c", "x", "--priority", "١"),
                     ("enqueue", "-c", "x", "--max-retries", "٣"),
                     ("enqueue", "-c", "x", "--delay", "١٠"),
                     ("enqueue", "-c", "x", "--timeout", "１０s"),
                     ("enqueue", "-c", "x", "--run-at", "２０２６-01-01T00:00:00Z"),
                     ("enqueue", '{"command": "x", "delay": "١٠"}'),
                     ("enqueue", '{"command": "x", "timeout": "٥m"}'),
                     ("enqueue", '{"command": "x", "run_at": "2026-01-01T00:00:00+٠٢:00"}'),
                     ("list", "--limit", "١"), ("dlq", "list", "--limit", "١"),
                     ("logs", "j", "--attempt", "١"), ("status", "--max-age", "١٠"),
                     ("status", "--max-dead", "١"), ("wait", "j", "--timeout", "١"),
                     ("purge", "--state", "dead", "--older-than", "٧d")):
            with self.subTest(argv=argv):
                self.assertFailsCleanly(2, *argv)
        # A process of its own: in-process, a mistaken yes would start workers here.
        result = self.run_cli("worker", "start", "--count", "٣", timeout=10)
        self.assertEqual((result.returncode, len(result.stderr.splitlines())), (2, 1))

    def test_durations_are_echoed_as_given_and_refused_in_one_wording(self):
        self.store()
        for given, shown in (("7d", "7d"), ("10m", "10m"), ("1d1s", "1d1s"),
                             ("1h30m", "1h30m"), ("90", "1m30s")):
            self.assertEqual(self.ok("purge", "--state", "completed", "--older-than",
                                     given),
                             f"purged 0 completed job(s) older than {shown}\n")
        for argv, message in (
                (("worker", "stop", "--timeout", "-5s"), "must not be negative: '-5s'"),
                (("enqueue", "-c", "true", "--delay", "-5s"),
                 "--delay: must not be negative: '-5s'"),
                (("enqueue", "-c", "true", "--delay", "99999999999d"),
                 "--delay: too long: '99999999999d'"),
                (("enqueue", "-c", "true", "--timeout", "0"),
                 "--timeout: must be at least 0.01s: '0'"),
                (("enqueue", '{"command": "true", "delay": "10 m"}'),
                 "field 'delay': not a duration such as 90s, 10m, 2h, 7d or 1h30m: "
                 "'10 m'"),
                (("config", "set", "retention", "-5s"), "bad value for retention: '-5s'"),
                (("list", "--limit", "0"), "must be from 1 to 2147483647"),
                (("enqueue", "-c", "true", "--unique-key", "  "),
                 "--unique-key must be a string that is not blank")):
            self.assertIn(message, self.assertFailsCleanly(2, *argv))


class UsageMessageTest(QueueTestCase):
    """A usage error names the near choice, or the command whose --help to read."""

    def test_a_mistyped_command_or_choice_gets_the_near_one_suggested(self):
        """A command, action or state close to a real one is suggested on one line
        (exit 2), rather than listing every choice."""
        for argv, prog, wanted in (
                (("stauts",), "queuectl", "argument COMMAND: invalid choice: 'stauts' "
                                          "(did you mean 'status'?)"),
                (("lsit",), "queuectl", "(did you mean 'list'?)"),
                (("worker", "strat"), "queuectl worker",
                 "argument ACTION: invalid choice: 'strat' (did you mean 'start'?)"),
                (("dlq", "retyr"), "queuectl dlq", "(did you mean 'retry'?)"),
                (("config", "sho"), "queuectl config", "(did you mean 'show'?)"),
                (("list", "--state", "pendng"), "queuectl list",
                 "(did you mean 'pending'?)")):
            with self.subTest(argv=argv):
                err = self.assertFailsCleanly(2, *argv)
                self.assertTrue(err.startswith(f"{prog}: error: "), err)
                self.assertIn(wanted, err)
                self.assertTrue(err.endswith(f"(see '{prog} --help')\n"), err)
                self.assertNotIn("choose from", err)
        err = self.assertFailsCleanly(2, "xyzzy")     # nothing near: every choice
        self.assertIn("choose from", err)
        self.assertNotIn("did you mean", err)

    def test_unknown_arguments_name_the_command(self):
        """An unknown option or extra argument names the command whose --help
        to read."""
        self.enqueue(id="a", command="true")
        for argv, prog in ((["enqueue", "--bogus", "{}"], "queuectl enqueue"),
                           (["status", "--bogus"], "queuectl status"),
                           (["show", "a", "extra"], "queuectl show"),
                           (["dlq", "list", "--bogus"], "queuectl dlq list")):
            with self.subTest(argv=argv):
                err = self.assertFailsCleanly(2, *argv)
                self.assertTrue(err.startswith(f"{prog}: error: unrecognized "
                                               f"arguments"), err)
                self.assertIn(f"see '{prog} --help'", err)


class ExitCodeTest(QueueTestCase):
    """0 success, 1 runtime error, 2 usage error, in-process and as processes."""

    def test_output_that_cannot_be_written_is_one_error_line(self):
        """stdout on a full disk (/dev/full): exit 1 and one line that says the
        command's change stands (enqueue added its job), no traceback."""
        for argv, jobs in ((["enqueue", "-c", "true"], 1), (["list"], 1)):
            with open("/dev/full", "w") as full:
                result = subprocess.run([sys.executable, QUEUECTL, *argv], env=self.env,
                                        stdout=full, stderr=subprocess.PIPE, text=True,
                                        timeout=30)
            err = result.stderr.replace(self.created_note(), "")
            self.assertEqual((result.returncode, err),
                             (1, "queuectl: error: could not write its output (No "
                                 "space left on device); any change it made to the "
                                 "queue stands\n"), argv)
            self.assertEqual(self.count("pending"), jobs)

    def test_unknown_job(self):
        """show, delete and dlq retry of an unknown id fail."""
        self.enqueue(id="j1", command="true")
        for argv in (("show", "nope"), ("show", "nope", "--json"), ("delete", "nope"),
                     ("delete", "j1", "nope"), ("dlq", "retry", "nope")):
            with self.subTest(argv=argv):
                err = self.assertFailsCleanly(1, *argv)
                self.assertIn("nope", err)
        self.assertEqual(self.state("j1"), "pending")

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


class DbOptionTest(QueueTestCase):
    """--db and $QUEUECTL_DB name the database."""

    def test_db_before_and_after_subcommand(self):
        """--db works before the subcommand and after it."""
        before = another_db(self, "before.db")
        after = another_db(self, "after.db")
        code, out, err = self.main_raw("--db", before, "enqueue",
                                       '{"id": "b", "command": "true"}')
        self.assertEqual((code, out, err), (0, "b\n", created_note(before)))
        code, out, err = self.main_raw("enqueue", '{"id": "a", "command": "true"}',
                                       "--db", after)
        self.assertEqual((code, out, err), (0, "a\n", created_note(after)))
        for path, job_id in ((before, "b"), (after, "a")):
            for argv in (("--db", path, "list", "--json"), ("list", "--json", "--db", path),
                         ("dlq", "list", "--db", path, "--json"),
                         ("--db", path, "show", job_id, "--json")):
                with self.subTest(argv=argv):
                    code, out, err = self.main_raw(*argv)
                    self.assertEqual((code, err), (0, ""))
                    doc = json.loads(out)
                    if isinstance(doc, dict):
                        self.assertEqual(doc["id"], job_id)
                    elif argv[0] != "dlq":
                        self.assertEqual([j["id"] for j in doc], [job_id])
        code, out, err = self.main_raw("config", "get", "max_retries", "--db", after)
        self.assertEqual((code, out, err), (0, "3\n", ""))
        self.assertFalse(self.db_exists())

    def test_db_env_var(self):
        """Without --db, $QUEUECTL_DB names the database (subprocess)."""
        result = self.run_cli("enqueue", '{"id": "envjob", "command": "true"}')
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, "envjob\n", self.created_note()))
        self.assertTrue(self.db_exists())
        result = self.run_cli("show", "envjob", "--json")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(json.loads(result.stdout)["id"], "envjob")
        result = self.run_cli("status", "--json")
        self.assertEqual(json.loads(result.stdout)["db"], self.db)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "queuectl.db")))

    def test_db_at_every_level(self):
        """--db works after a command group's name too, and every group lists it."""
        other = another_db(self, "other.db")
        code, out, err = self.cli("enqueue", "--db", other, '{"id": "o", "command": "x"}')
        self.assertEqual((code, err), (0, created_note(other)))
        for argv in (["dlq", "--db", other, "list", "--json"],
                     ["config", "--db", other, "show", "--json"],
                     ["worker", "--db", other, "stop"]):
            with self.subTest(argv=argv):
                self.assertEqual(self.cli(*argv)[0], 0)
        self.assertEqual(self.json_out("list", "--db", other, "--json")[0]["id"], "o")
        for group in ("dlq", "worker", "config"):
            code, out, _ = self.cli(group, "--help")
            self.assertIn("--db PATH", out)


class NewDatabaseTest(QueueTestCase):
    """Which commands create the database (and say so), and which refuse a missing
    one."""

    def test_a_command_that_creates_the_database_says_so_once(self):
        """enqueue, config set and worker start say on stderr when they created the
        database, and only then."""
        queued = another_db(self, "queued.db")
        result = self.run_cli("--db", queued, "enqueue", "-c", "true")
        self.assertEqual((result.returncode, result.stderr), (0, created_note(queued)))
        result = self.run_cli("--db", queued, "enqueue", "-c", "true")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        code, out, err = self.cli("config", "set", "max_retries", "1")
        self.assertEqual((code, out, err), (0, "max_retries = 1\n", self.created_note()))
        self.assertEqual(self.cli("config", "set", "max_retries", "2")[2], "")
        fresh = another_db(self, "fresh.db")
        result = self.run_cli("--db", fresh, "worker", "start", "--detach")
        self.addCleanup(lambda: self.run_cli("--db", fresh, "worker", "stop"))
        self.assertEqual((result.returncode, result.stderr), (0, created_note(fresh)))
        self.assertEqual(self.run_cli("--db", fresh, "worker", "stop").returncode, 0)

    def test_a_refused_or_reading_command_creates_nothing_and_says_nothing(self):
        """A refused enqueue creates no database, so it says nothing of one."""
        self.assertFailsCleanly(2, "enqueue", "-c", "")
        self.assertFailsCleanly(1, "enqueue", "-c", "x", "--after", "ghost")
        self.assertEqual(self.cli("config", "show"), (0, "".join(
            f"{key} = {value}\n" for key, value in queuectl.CONFIG_DEFAULTS.items()), ""))
        self.assertEqual(os.listdir(self.dir), [])
        self.assertFalse(self.db_exists())

    def test_missing_database(self):
        """Reading commands on a missing database fail and create no file."""
        for argv in (("status",), ("status", "--check"), ("list",), ("list", "--json"),
                     ("show", "x"), ("stats",), ("dlq", "list"), ("dlq", "retry", "--all"),
                     ("delete", "x")):
            with self.subTest(argv=argv):
                err = self.assertFailsCleanly(1, *argv)
                self.assertIn(self.db, err)
                self.assertEqual(os.listdir(self.dir), [])
        self.assertFalse(self.db_exists())


class SQLiteDbPathTest(QueueTestCase):
    """--db as a SQLite file's path: relative to the current directory, in a
    directory that is missing."""

    def test_a_relative_db_names_a_file_in_the_current_directory(self):
        """A relative --db from another directory makes a second queue there, and
        the note names its absolute path."""
        other = self.path("elsewhere")
        os.mkdir(other)
        result = self.run_cli("--db", "q.db", "enqueue", "-c", "true", cwd=other)
        path = os.path.join(other, "q.db")
        self.assertEqual((result.returncode, result.stderr),
                         (0, f"queuectl: created a new database at {path}\n"))
        result = self.run_cli("--db", "q.db", "enqueue", "-c", "true", cwd=other)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertFalse(os.path.exists(self.db))

    def test_missing_database_in_missing_directory(self):
        """A missing directory is not created by reading commands."""
        path = os.path.join(self.dir, "sub", "q.db")
        self.assertFailsOnPath(1, path, "status")
        self.assertFalse(os.path.exists(os.path.dirname(path)))


class JsonOutputTest(QueueTestCase):
    """--json prints one JSON document."""

    def test_json_lists_are_one_array(self):
        """list --json and dlq list --json print one array, [] when empty."""
        self.ok("config", "set", "max_retries", "3")      # creates an empty database
        self.assertEqual(self.json_out("list", "--json"), [])
        self.assertEqual(self.json_out("dlq", "list", "--json"), [])
        self.enqueue(id="p", command="true")
        self.make_dead("d")
        self.assertEqual([j["id"] for j in self.json_out("dlq", "list", "--json")], ["d"])
        jobs = self.json_out("list", "--json")
        self.assertIsInstance(jobs, list)
        self.assertEqual(len(jobs), 2)

    def test_json_objects(self):
        """show, status, stats and config show --json each print one object."""
        self.enqueue(id="j", command="true")
        for argv in (("show", "j", "--json"), ("status", "--json"), ("stats", "--json"),
                     ("config", "show", "--json")):
            with self.subTest(argv=argv):
                self.assertIsInstance(self.json_out(*argv), dict)


class TerminalEscapesTest(QueueTestCase):
    """A job's command, directory, error or output cannot drive the terminal."""

    ESC = "\x1b[2J\x1b]0;pwned\x07"          # clear the screen, retitle the window
    SHOWN = "\\x1b[2J\\x1b]0;pwned\\x07"
    RAW = ("\x1b", "\x07", "\x9b", "\u202e")

    def make_jobs(self):
        """Job j: dead, with escapes everywhere; job k: held by a gone process."""
        folder = self.path("dir" + self.ESC)
        os.mkdir(folder)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(folder)
        self.enqueue(id="j", command=f"printf '{self.ESC}'\u202e", max_retries=0)
        self.enqueue(id="k", command=f"echo {self.ESC}")
        store = self.store()
        claim = claim_one(store, 4321)
        store.finish(claim.id, claim.token, queuectl.RunResult(
            exit_code=3, reason="exit 3" + self.ESC, stdout=self.ESC + "\nline2\tTab\n",
            stderr="\x9b31m"))
        claim_one(store, 4321)
        return folder

    def assertShown(self, text):
        for raw in self.RAW:
            self.assertNotIn(raw, text)
        self.assertIn(self.SHOWN, text)

    def test_human_output_shows_control_characters_instead_of_obeying_them(self):
        """list, show, status, wait and dlq list print control characters as
        \\x1b (keeping show's output lines and tabs); --json keeps them exact."""
        folder = self.make_jobs()
        for argv in (("list",), ("dlq", "list"), ("show", "j"), ("status",),
                     ("wait", "j")):
            with self.subTest(argv=argv):
                code, out, err = self.cli(*argv)
                self.assertEqual(code, 6 if argv[0] == "wait" else 0, err)
                self.assertShown(out)
        shown = self.ok("show", "j")
        self.assertIn(f"command:       printf '{self.SHOWN}'\\u202e\n", shown)
        self.assertIn(f"cwd:           {folder.replace(self.ESC, self.SHOWN)}\n", shown)
        self.assertIn(f"stdout of the last run:\n{self.SHOWN}\nline2\tTab\n", shown)
        self.assertIn("stderr of the last run:\n\\x9b31m\n", shown)
        job = self.job("j")
        self.assertEqual((job["command"], job["cwd"], job["output"]["stdout"]),
                         (f"printf '{self.ESC}'\u202e", folder,
                          self.ESC + "\nline2\tTab\n"))
        listed = self.json_out("list", "--json")
        self.assertEqual(listed[0]["command"], f"echo {self.ESC}")

    def on_terminal(self, *argv):
        """Run queuectl with stdout and stderr on a pseudo-terminal: (code, text)."""
        import pty
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, QUEUECTL, *argv], env=self.env,
                                stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:                   # EIO: the other end is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        code = proc.wait(timeout=30)
        return code, b"".join(chunks).decode("utf-8").replace("\r\n", "\n")

    def test_logs_escapes_on_a_terminal_only(self):
        """logs and logs --follow show escapes on a terminal; to a pipe or file
        they write the run's bytes exactly."""
        self.make_jobs()
        for argv, code in ((("logs", "j"), 0), (("logs", "j", "--follow"), 6)):
            with self.subTest(argv=argv):
                got, text = self.on_terminal(*argv)
                self.assertEqual(got, code, text)
                self.assertShown(text)
                self.assertIn(self.SHOWN + "\nline2\tTab\n", text)
                result = self.run_cli(*argv)
                self.assertEqual((result.returncode, result.stdout), (code, self.ESC +
                                                                      "\nline2\tTab\n"))
                self.assertTrue(result.stderr.startswith("\x9b31m"), result.stderr)


class ExecutableTest(QueueTestCase):
    """The script as users run it: from a fresh clone, by its #! line under any name,
    and under 3.9."""

    def clone(self):
        dest = os.path.join(self.dir, "clone")
        subprocess.run(["git", "clone", "-q", ROOT, dest], check=True, timeout=30,
                       capture_output=True)
        return dest

    @unittest.skipUnless(shutil.which("git"), "git not installed")
    def test_runs_directly_from_a_clone(self):
        """./queuectl.py runs from a fresh clone via its shebang and run bit."""
        dest = self.clone()
        script = os.path.join(dest, "queuectl.py")
        self.assertTrue(os.access(script, os.X_OK), "queuectl.py is not executable")
        with open(script) as f:                       # the scripting contract's #! line
            self.assertEqual(f.readline(), "#!/usr/bin/env python3\n")
        missing = another_db(self, "missing.db")
        result = subprocess.run(["./queuectl.py", "--db", missing, "status"], cwd=dest,
                                env=self.env, capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertTrue(result.stderr.startswith("queuectl: error: "), result.stderr)
        self.assertFalse(db_exists(missing))
        result = subprocess.run(["./queuectl.py", "--help"], cwd=dest, env=self.env,
                                capture_output=True, text=True, timeout=30)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertTrue(result.stdout.startswith("usage: queuectl "), result.stdout)

    def test_as_a_command_it_runs_under_any_name_from_any_directory(self):
        """Run by its #! line (#!/usr/bin/env python3), under any name or through a
        symlink, queuectl imports nothing from the current directory."""
        home = self.path("bin")
        os.mkdir(home)
        copy = os.path.join(home, "qc")                # not even named .py
        shutil.copy(QUEUECTL, copy)
        os.chmod(copy, 0o755)
        link = self.path("queuectl")
        os.symlink(copy, link)
        trap = self.path("cwd")
        os.mkdir(trap)
        for name in ("json", "sqlite3", "argparse", "psycopg"):
            with open(os.path.join(trap, f"{name}.py"), "w") as f:
                f.write("raise SystemExit('imported from the current directory')\n")
        env = dict(self.env, PATH=os.path.dirname(sys.executable) + os.pathsep +
                   self.env["PATH"])
        for n, argv in enumerate(([copy], [link], [copy])):
            result = subprocess.run(argv + ["enqueue", '{"command": "true"}'], cwd=trap,
                                    env=env, capture_output=True, text=True, timeout=30)
            created = self.created_note() if n == 0 else ""   # the first makes it
            self.assertEqual((result.returncode, result.stderr), (0, created), argv)
            self.assertRegex(result.stdout, r"^[0-9a-f]{10}\n$")
        jobs = json.loads(self.ok("list", "--json"))
        self.assertEqual(len(jobs), 3)
        self.assertEqual({j["cwd"] for j in jobs}, {trap})

    @unittest.skipUnless(os.path.exists(PY39), "Python 3.9 not installed")
    def test_python39_run_at_z(self):
        """Under Python 3.9 a run_at ending in Z is accepted and stored as UTC."""
        job = json.dumps({"id": "z", "command": "true", "run_at": "2030-05-06T07:08:09Z"})
        for argv, want_out in ((("enqueue", job), "z\n"), (("show", "z", "--json"), None)):
            result = subprocess.run([PY39, QUEUECTL, *argv], env=self.env, cwd=self.dir,
                                    capture_output=True, text=True, timeout=30)
            created = self.created_note() if argv[0] == "enqueue" else ""
            self.assertEqual((result.returncode, result.stderr), (0, created), argv)
            if want_out:
                self.assertEqual(result.stdout, want_out)
        self.assertEqual(json.loads(result.stdout)["run_at"], "2030-05-06T07:08:09.000Z")

    def test_version(self):
        """--version prints the program name and version."""
        code, out, err = self.cli("--version")
        self.assertEqual((code, out.strip()), (0, f"queuectl {queuectl.__version__}"))


class PostgresUrlTest(QueueTestCase):
    """--db as a postgresql:// URL: a server that is not there, a schema name that
    is not one, a password that is never shown."""

    store_kind = "postgres"
    SECRET = "pw-Xq7-never-shown"

    def test_a_server_that_is_not_there_is_one_error_line(self):
        """Every command on a URL whose server cannot be reached (no socket; nothing
        listening on the port) exits 1 with one line naming the URL, its password
        masked, and leaves no file behind. (Each rides out a lost server for
        PG_RETRY_S first, so the commands run at once, as processes.)"""
        urls = (f"postgresql://queuectl@/postgres?host={quote(self.dir)}&port=1"
                f"&password={self.SECRET}&schema=q",
                f"postgresql://queuectl:{self.SECRET}@127.0.0.1:1/postgres")
        verbs = (("status",), ("status", "--check"), ("list", "--json"), ("show", "x"),
                 ("enqueue", "-c", "true"), ("config", "show"),
                 ("config", "get", "max_retries"), ("config", "set", "max_retries", "1"))
        runs = []
        for url in urls:
            for argv in verbs[:len(verbs) if url == urls[0] else 3]:
                runs.append((url, argv, subprocess.Popen(
                    [sys.executable, QUEUECTL, "--db", url, *argv], env=self.env,
                    cwd=self.dir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)))
        for url, argv, proc in runs:
            out, err = proc.communicate(timeout=queuectl.PG_RETRY_S + 30)
            with self.subTest(url=url, argv=argv):
                self.assertOneErrorLine(1, proc.returncode, out, err)
                self.assertTrue(err.startswith(f"queuectl: error: cannot connect to "
                                               f"{queuectl.pg_url(url)[2]}: "), err)
                self.assertIn("***", err)
                self.assertNotIn(self.SECRET, err)
        self.assertEqual(self.tree(), [])

    def test_a_schema_that_is_not_a_name_is_a_usage_error(self):
        """?schema= must be a lower-case SQL name: anything else is a usage error
        (exit 2, one line), before any connection, and creates nothing."""
        for schema in ("Queue", "a;drop table jobs", "", "1x", "x" * 64, "a-b"):
            url = pg_schema_url(pg_server(), quote(schema, safe=""))
            for argv in (("status",), ("enqueue", "-c", "true"), ("config", "show"),
                         ("config", "set", "max_retries", "1"), ("worker", "stop")):
                with self.subTest(schema=schema, argv=argv):
                    code, out, err = self.main_raw("--db", url, *argv)
                    self.assertOneErrorLine(2, code, out, err)
                    self.assertIn(f"schema must be a lower-case name of letters, "
                                  f"digits and _, not starting with pg_ "
                                  f"(PostgreSQL's own): {schema!r}", err)
        result = self.run_cli("enqueue", "-c", "true", env=dict(
            self.env, QUEUECTL_DB=pg_schema_url(pg_server(), "Upper")))
        self.assertOneErrorLine(2, result.returncode, result.stdout, result.stderr)
        self.assertEqual(self.tree(), [])
        self.assertFalse(self.db_exists())

    def test_a_malformed_url_is_a_usage_error_at_once(self):
        """A misspelt scheme is not taken for a file's path, and a URL libpq
        cannot parse (an unknown parameter, a port that is no number) is not
        retried as a server away: exit 2, one line, at once, nothing made."""
        server = pg_server()
        cases = [("postgresq://postgres@/postgres", "unknown database URL scheme "
                  "postgresq://"),
                 ("postgres+psycopg://postgres@/postgres", "unknown database URL "
                  "scheme postgres+psycopg://"),
                 (server + "&bogus=1", 'invalid database URL: invalid URI query '
                  'parameter: "bogus"'),
                 (server.replace("port=", "port=x"), "invalid database URL: port "),
                 ("postgresql://postgres@localhost:abc/postgres",
                  "invalid database URL: port 'abc' is not a number"),
                 ("postgres:/postgres@/postgres", "starts postgresql:// or "
                  "postgres:// (two slashes)"),
                 (pg_schema_url(server, "pg_queue"), "not starting with pg_"),
                 (pg_schema_url(pg_schema_url(server, "a"), "b"),
                  "names a schema 2 times")]
        for url, says in cases:
            with self.subTest(url=url):
                started = time.monotonic()
                result = self.run_cli("--db", url, "enqueue", "-c", "true")
                self.assertOneErrorLine(2, result.returncode, result.stdout,
                                        result.stderr)
                self.assertIn(says, result.stderr)
                self.assertLess(time.monotonic() - started, queuectl.PG_RETRY_S / 2)
        self.assertEqual(self.tree(), [])
        self.assertFalse(self.db_exists())

    def test_a_schema_of_another_programs_tables_is_refused_and_left_alone(self):
        """A schema that holds tables not queuectl's is refused by every command
        (exit 1, one line; config show does not take it for an empty queue) and
        nothing is added to it."""
        schema = queuectl.pg_url(self.db)[1]
        self.sql(f"CREATE SCHEMA {schema}")
        self.sql("CREATE TABLE stuff (x integer)")
        for argv in (("status",), ("list",), ("config", "show"),
                     ("config", "get", "max_retries"), ("config", "set", "max_retries", "1"),
                     ("enqueue", "-c", "true")):
            with self.subTest(argv=argv):
                err = self.assertFailsCleanly(1, *argv)
                self.assertIn(f"schema {schema} holds tables that are not queuectl's", err)
        self.assertEqual(self.sql("SELECT tablename FROM pg_tables WHERE schemaname = ?",
                                  (schema,)), [("stuff",)])

    def test_a_password_in_the_url_is_never_shown(self):
        """A password in the URL (user:password@ or ?password=) is masked wherever
        the URL is shown: the new-database note, status, errors, and the names of
        this host's files."""
        parts = urlsplit(self.db)
        if parts.password or "password" in dict(parse_qsl(parts.query)):
            self.skipTest("the test server's URL has a password of its own")
        by_query = self.db + "&password=" + self.SECRET
        netloc = parts.netloc.replace("@", f":{self.SECRET}@", 1) \
            if parts.username and "@" in parts.netloc else None
        code, out, err = self.main_raw("--db", by_query, "enqueue", "-c", "true",
                                       "--id", "j")
        self.assertEqual((code, out, err), (0, "j\n", created_note(by_query)))
        self.assertIn("password=***", err)
        urls = [by_query] + ([parts._replace(netloc=netloc).geturl()] if netloc else [])
        for url in urls:
            for argv, want in ((("status",), 0), (("status", "--json"), 0), (("list",), 0),
                               (("show", "j"), 0), (("stats",), 0), (("config", "show"), 0),
                               (("worker", "stop"), 0), (("show", "nope"), 1),
                               (("enqueue", "-c", "true", "--id", "j"), 1)):
                with self.subTest(url=url, argv=argv):
                    code, out, err = self.main_raw("--db", url, *argv)
                    self.assertEqual(code, want, err)
                    self.assertNotIn(self.SECRET, out + err)
                    if argv[0] == "status":
                        self.assertIn("***", out)
            missing = url.replace(queuectl.pg_url(self.db)[1], "tmissing")
            code, out, err = self.main_raw("--db", missing, "status")
            self.assertOneErrorLine(1, code, out, err)
            self.assertIn("***", err)
            self.assertNotIn(self.SECRET, err)
        result = self.run_cli("status", "--json", env=dict(self.env, QUEUECTL_DB=by_query))
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(json.loads(result.stdout)["db"], queuectl.pg_url(by_query)[2])
        self.assertFalse([path for path in self.tree() if self.SECRET in path])


    def test_a_jobs_environment_has_the_url_without_its_password(self):
        """A job sees $QUEUECTL_DB (to enqueue more), but not the URL's password:
        a command that prints its environment shows none to logs or dashboard."""
        if "password" in dict(parse_qsl(urlsplit(self.db).query)):
            self.skipTest("the test server's URL has a password of its own")
        by_query = self.db + "&password=" + self.SECRET
        self.env = dict(self.env, QUEUECTL_DB=by_query)
        job_id = self.enqueue(command='echo "$QUEUECTL_DB"')
        self.start_workers(1)
        self.wait_state(job_id, "completed", 20)
        shown = self.ok("logs", job_id).strip()
        self.assertNotIn(self.SECRET, shown)
        self.assertEqual(queuectl.pg_url(shown)[1], queuectl.pg_url(self.db)[1])

add_postgres_variants(globals())


if __name__ == "__main__":
    unittest.main()
