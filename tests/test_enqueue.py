"""enqueue: JSON, stdin batches, -c and its flags, what is refused and the hints
given, command length, unique keys, and dependencies (given at enqueue, then
waited for, shown, and ended dead with a dependency that dies)."""

import json
import os
import shlex
import subprocess
import sys
import unittest

from tests.support import (QUEUECTL, QueueTestCase, add_postgres_variants, failed,
                           wait_until)

q = shlex.quote


class EnqueueTest(QueueTestCase):
    """enqueue JSON: the id it prints and what it stores."""

    def test_prints_only_the_id(self):
        """enqueue prints the job id and nothing else."""
        out = self.ok("enqueue", '{"id": "job1", "command": "echo hi"}')
        self.assertEqual(out, "job1\n")
        job = self.job("job1")
        self.assertEqual((job["command"], job["state"], job["attempts"]),
                         ("echo hi", "pending", 0))

    def test_generated_ids_short_and_unique(self):
        """Jobs without an id get short, distinct, usable ids."""
        ids = [self.enqueue(command="true") for _ in range(5)]
        ids += self.ok("enqueue", "-", stdin='{"command": "true"}\n' * 40).split()
        self.assertEqual(len(set(ids)), 45)
        for job_id in ids:
            self.assertRegex(job_id, r"^[0-9A-Za-z_-]{4,16}$")
        self.assertEqual(self.job(ids[-1])["id"], ids[-1])

    def test_duplicate_id(self):
        """Enqueuing an id that exists fails with exit 1 and changes nothing."""
        self.enqueue(id="job1", command="true")
        err = self.assertFailsCleanly(1, "enqueue", '{"id": "job1", "command": "ls"}')
        self.assertIn("job1", err)
        self.assertEqual(self.job("job1")["command"], "true")

    def test_all_fields(self):
        """Every job field is stored and shown; run_at offsets become UTC."""
        self.enqueue(id="full", command="echo x", max_retries=5, priority=-3, timeout=2.5,
                     run_at="2030-01-01T02:00:00+02:00")
        job = self.job("full")
        self.assertEqual((job["max_retries"], job["priority"], job["timeout"],
                          job["run_at"]), (5, -3, 2.5, "2030-01-01T00:00:00.000Z"))
        self.assertEqual(job["cwd"], os.getcwd())


class EnqueueStdinTest(QueueTestCase):
    """enqueue -: a batch of JSON lines, added whole or not at all."""

    def test_a_byte_order_mark_is_skipped_and_a_twice_given_id_is_located(self):
        """A UTF-8 byte-order mark before the first line (a Windows editor) is
        skipped; an id given on two lines is refused naming both lines."""
        code, out, err = self.cli("enqueue", "-", stdin='\ufeff{"command": "x"}\n')
        self.assertEqual((code, len(out.split())), (0, 1), err)
        batch = '{"command": "a", "id": "d1"}\n{"command": "b", "id": "d1"}\n'
        err = self.assertFailsCleanly(1, "enqueue", "-", stdin=batch)
        self.assertEqual(err, "queuectl: error: line 2: duplicate job id: d1 (line 1 "
                              "has it too)\n")

    def test_a_closed_stdin_is_one_error_line(self):
        """enqueue - with standard input closed (<&-): exit 2, one line."""
        self.ok("enqueue", "-c", "true")
        result = subprocess.run(["sh", "-c", 'exec "$0" "$1" enqueue - <&-',
                                 sys.executable, QUEUECTL], env=self.env,
                                capture_output=True, text=True, timeout=30)
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (2, "", "queuectl: error: enqueue - reads jobs from standard "
                                 "input, which is closed\n"))

    def test_stdin_batch(self):
        """enqueue - adds every line at once, prints one id per line, skips blanks."""
        stdin = ('{"id": "a", "command": "echo a"}\n\n   \n'
                 '{"command": "echo b"}\n{"id": "c", "command": "echo c"}')
        lines = self.ok("enqueue", "-", stdin=stdin).splitlines()
        self.assertEqual(len(lines), 3)
        self.assertEqual((lines[0], lines[2]), ("a", "c"))
        jobs = self.json_out("list", "--json")
        self.assertEqual(sorted(j["id"] for j in jobs), sorted(lines))
        self.assertEqual(len({j["created_at"] for j in jobs}), 1, "one batch, one time")
        self.assertEqual(self.job(lines[1])["command"], "echo b")

    def test_stdin_bad_line_refuses_batch(self):
        """One bad line refuses the whole batch, naming the line; nothing is added."""
        self.enqueue(id="existing", command="true")
        stdin = ('{"id": "n1", "command": "true"}\n\n'
                 '{"id": "n2", "command": ""}\n{"id": "n3", "command": "true"}\n')
        err = self.assertFailsCleanly(2, "enqueue", "-", stdin=stdin)
        self.assertIn("line 3", err)
        err = self.assertFailsCleanly(2, "enqueue", "-",
                                      stdin='{"command": "true"}\n{"command": "x"}\n{oops\n')
        self.assertIn("line 3", err)
        self.assertEqual([j["id"] for j in self.json_out("list", "--json")], ["existing"])

    def test_stdin_bad_line_creates_no_database(self):
        """A refused batch does not create the database."""
        self.assertFailsCleanly(2, "enqueue", "-", stdin='{"command": "true"}\n[1]\n')
        self.assertFalse(self.db_exists())

    def test_stdin_empty(self):
        """enqueue - with no jobs on stdin is a usage error."""
        err = self.assertFailsCleanly(2, "enqueue", "-", stdin="\n  \n")
        self.assertIn("no jobs", err)

    def test_stdin_duplicate_within_batch(self):
        """Two lines with the same id refuse the batch with exit 1."""
        self.enqueue(id="existing", command="true")
        stdin = '{"id": "d", "command": "true"}\n{"id": "d", "command": "true"}\n'
        err = self.assertFailsCleanly(1, "enqueue", "-", stdin=stdin)
        self.assertIn("duplicate", err)

    def test_stdin_duplicate_of_existing(self):
        """A batch clashing with a stored id adds none of its jobs."""
        self.enqueue(id="existing", command="true")
        stdin = ('{"id": "new1", "command": "true"}\n{"command": "true"}\n'
                 '{"id": "existing", "command": "true"}\n')
        err = self.assertFailsCleanly(1, "enqueue", "-", stdin=stdin)
        self.assertIn("duplicate job id: existing", err)


class EnqueueFlagsTest(QueueTestCase):
    """enqueue -c COMMAND with flags: the JSON form's fields, named as typed."""

    def test_enqueue_c_with_every_flag_equals_the_json_form(self):
        """enqueue -c COMMAND with flags stores what the same JSON stores."""
        self.enqueue(id="base", command="true")
        self.ok("enqueue", "-c", "echo 'hi there'", "--id", "flags", "--priority", "-3",
                "--max-retries", "5", "--timeout", "2m", "--delay", "1h",
                "--after", "base", "--unique-key", "k1")
        self.enqueue(id="json", command="echo 'hi there'", priority=-3, max_retries=5,
                     timeout="2m", delay=3600, after=["base"], unique_key="k2")
        a, b = self.job("flags"), self.job("json")
        for field in ("command", "priority", "max_retries", "timeout", "after", "state"):
            self.assertEqual(a[field], b[field], field)
        self.assertEqual(a["timeout"], 120)
        self.ok("enqueue", "-c", "true", "--run-at", "2030-01-01T00:00:00+01:00",
                "--id", "at")
        self.assertEqual(self.job("at")["run_at"], "2029-12-31T23:00:00.000Z")

    def test_enqueue_c_validates_like_json(self):
        """Bad flag values are refused naming the flag; -c with JSON, flags without
        -c, and no job at all are usage errors; nothing changes."""
        for argv, words in ((["--priority", "high"], "--priority"),
                            (["--max-retries", "-1"], "--max-retries"),
                            (["--timeout", "0"], "--timeout"),
                            (["--delay", "soon"], "--delay"),
                            (["--run-at", "tomorrow"], "--run-at"),
                            (["--id", "a b"], "--id"),
                            (["--after", "ghost"], "no such job: ghost")):
            with self.subTest(argv=argv):
                code = 1 if argv[0] == "--after" else 2
                err = self.assertFailsCleanly(code, "enqueue", "-c", "true", *argv)
                self.assertIn(words, err)
        self.assertFailsCleanly(2, "enqueue", "-c", "true", '{"command": "x"}')
        self.assertFailsCleanly(2, "enqueue", '{"command": "x"}', "--priority", "1")
        self.assertFailsCleanly(2, "enqueue")
        self.assertFailsCleanly(2, "enqueue", "-c", "")

    def test_messages_name_the_flags_that_were_typed(self):
        """A mistake in enqueue -c names -c, --run-at, --delay, not JSON fields."""
        for argv, message in (
                (("-c", ""), "queuectl: error: -c must be a non-empty string\n"),
                (("-c", "x", "--run-at", "2030-01-01T00:00:00Z", "--delay", "5"),
                 "queuectl: error: give either --run-at or --delay, not both\n"),
                (("-c", "x", "--id", ""),
                 "queuectl: error: --id must be a non-empty string\n"),
                (("-c", "x\x00y"), "queuectl: error: -c contains a NUL character\n"),
                (("-c", "x", "--unique-key", "a\x00"),
                 "queuectl: error: --unique-key contains a NUL character\n")):
            with self.subTest(argv=argv):
                self.assertEqual(self.assertFailsCleanly(2, "enqueue", *argv), message)
        err = self.assertFailsCleanly(
            2, "enqueue", '{"command": "x", "run_at": "2030-01-01T00:00:00Z", '
                          '"delay": 5}')
        self.assertIn("give either 'run_at' or 'delay', not both", err)


class EnqueueValidationTest(QueueTestCase):
    """A bad job, as an argument or a line of stdin: exit 2, one stderr line, database
    unchanged."""

    def setUp(self):
        super().setUp()
        self.enqueue(id="existing", command="true")

    def bad_jobs(self, docs):
        for doc in docs:
            text = doc if isinstance(doc, str) else json.dumps(doc)
            with self.subTest(job=text):
                self.assertFailsCleanly(2, "enqueue", text)
                self.assertFailsCleanly(2, "enqueue", "-", stdin=text + "\n")

    def test_invalid_json(self):
        """Text that is not JSON is refused."""
        self.bad_jobs(["{", "not json", "", "{'command': 'ls'}", '{"command": "ls",}'])

    def test_not_an_object(self):
        """JSON that is not an object is refused."""
        self.bad_jobs(["[1]", '"x"', "5", "null", "true", '["ls"]'])

    def test_command_missing_or_empty(self):
        """A job needs a non-empty string command."""
        self.bad_jobs([{}, {"id": "x"}, {"command": ""}, {"command": "  "},
                       {"command": None}, {"command": 5}, {"command": ["ls"]}])

    def test_bad_field_types(self):
        """Each field with a wrong type or range is refused."""
        self.bad_jobs([
            {"command": "true", "id": 5}, {"command": "true", "id": ""},
            {"command": "true", "id": "a b"}, {"command": "true", "id": "-x"},
            {"command": "true", "id": "x" * 129}, {"command": "true", "id": None},
            {"command": "true", "max_retries": -1}, {"command": "true", "max_retries": 1.5},
            {"command": "true", "max_retries": True}, {"command": "true", "max_retries": "3"},
            {"command": "true", "priority": 1.5}, {"command": "true", "priority": "high"},
            {"command": "true", "priority": False}, {"command": "true", "priority": 2 ** 40},
            {"command": "true", "run_at": 5}, {"command": "true", "run_at": "soon"},
            {"command": "true", "delay": -1}, {"command": "true", "delay": "5 m"},
            {"command": "true", "delay": True},
            {"command": "true", "timeout": 0}, {"command": "true", "timeout": -2},
            {"command": "true", "timeout": "soon"}, {"command": "true", "timeout": False},
            {"command": "true", "after": "no such job"}, {"command": "true", "after": 5},
            {"command": "true", "unique_key": ""}, {"command": "true", "unique_key": 7},
            '{"command": "true", "delay": NaN}', '{"command": "true", "timeout": Infinity}',
        ])

    def test_unknown_field(self):
        """An unknown field is refused and named."""
        err = self.assertFailsCleanly(2, "enqueue", '{"command": "true", "retries": 3}')
        self.assertIn("retries", err)

    def test_naive_run_at(self):
        """A run_at with no zone is refused."""
        err = self.assertFailsCleanly(
            2, "enqueue", '{"command": "true", "run_at": "2030-01-01T00:00:00"}')
        self.assertIn("run_at", err)

    def test_run_at_and_delay(self):
        """run_at and delay together are refused."""
        self.assertFailsCleanly(2, "enqueue", json.dumps(
            {"command": "true", "run_at": "2030-01-01T00:00:00Z", "delay": 5}))


class EnqueueHintTest(QueueTestCase):
    """The likeliest enqueue mistakes say how to do it right."""

    def test_a_command_given_as_json_or_split_by_the_shell_gets_a_hint(self):
        """The likeliest first mistakes say how to do it right."""
        err = self.assertFailsCleanly(2, "enqueue", "echo hi")
        self.assertIn("invalid JSON", err)
        self.assertIn("to give a command without JSON: -c 'echo hi'", err)
        err = self.assertFailsCleanly(2, "enqueue", "{command:echo hi}")   # unquoted
        self.assertIn("put the whole document in single quotes", err)
        err = self.assertFailsCleanly(2, "enqueue", "-c", "echo", "hi")
        self.assertIn("-c takes the whole command as one argument: quote it, as in "
                      "-c 'echo hi'", err)
        err = self.assertFailsCleanly(2, "enqueue", "-c", "true", '{"command": "x"}')
        self.assertIn("give a job as JSON or as -c COMMAND, not both", err)

    def test_more_enqueue_mistakes_get_a_hint(self):
        self.store()
        self.assertIn("(to give a command without JSON: -c 'echo hi')",
                      self.assertFailsCleanly(2, "enqueue", "echo", "hi"))
        self.assertIn("(-c takes the whole command as one argument: -c 'ls -l')",
                      self.assertFailsCleanly(2, "enqueue", "-c", "ls", "-l"))

    def test_out_of_range_numbers_and_a_bare_date_say_what_is_wrong(self):
        self.store()
        for argv, message in (
                (("enqueue", '{"command": "x", "priority": 99999999999}'),
                 "field 'priority' must be a whole number from -2147483647 to "
                 "2147483647"),
                (("enqueue", "-c", "x", "--max-retries", "99999999999"),
                 "--max-retries must be a whole number from 0 to 2147483647"),
                (("enqueue", "-c", "x", "--run-at", "2027-01-15"),
                 "a date needs a time and a zone too, as in 2027-01-15T00:00:00Z")):
            self.assertIn(message, self.assertFailsCleanly(2, *argv))


class CommandLengthTest(QueueTestCase):
    """A command longer than the kernel takes is refused at enqueue, not at each run."""

    def test_a_command_longer_than_the_kernel_takes_is_refused_at_enqueue(self):
        """A command of more than 131071 bytes (the kernel's limit on one argument)
        is refused naming the limit, instead of failing every run."""
        limit = 131071
        long_command = ": " + "é" * ((limit - 1) // 2)        # limit + 1 bytes
        self.assertEqual(len(long_command.encode()), limit + 1)
        for argv, stdin in ((("enqueue", "-c", long_command), None),
                            (("enqueue", json.dumps({"command": long_command})), None),
                            (("enqueue", "-"), json.dumps({"command": "true"}) + "\n" +
                             json.dumps({"command": long_command}) + "\n")):
            with self.subTest(how=argv[1][:2]):
                err = self.assertFailsCleanly(2, *argv, stdin=stdin)
                self.assertIn(f"is {limit + 1} bytes long", err)
                self.assertIn(f"at most {limit} bytes", err)
                self.assertIn("script file", err)
                self.assertFalse(self.db_exists())
        self.assertIn("-c is 131072 bytes long", self.cli("enqueue", "-c",
                                                          long_command)[2])

    def test_a_command_of_exactly_the_limit_runs(self):
        """The longest command accepted does run (the limit is not one byte off)."""
        command = ": " + "x" * (131071 - 8) + "; true"
        self.assertEqual(len(command.encode()), 131071)
        job_id = self.ok("enqueue", "-", stdin=json.dumps({"command": command})).strip()
        self.start_workers(1)
        self.assertEqual(self.wait_state(job_id, ("completed", "dead"))["state"],
                         "completed")


class UniqueKeyTest(QueueTestCase):
    """unique_key: while a job holds a key, another job with it adds nothing."""

    def test_a_held_unique_key_adds_nothing_until_its_job_finishes(self):
        """While an unfinished job holds a unique key, enqueueing another job with
        that key prints the holder's id, says so on stderr and adds nothing."""
        job = json.dumps({"command": "backup.sh", "unique_key": "nightly"})
        first = self.ok("enqueue", job).strip()
        code, out, err = self.cli("enqueue", job)
        self.assertEqual((code, out), (0, f"{first}\n"))
        self.assertEqual(err, f"queuectl: job {first} holds unique key 'nightly' already: "
                              f"nothing added\n")
        self.assertEqual(len(self.json_out("list", "--json")), 1)
        self.assertEqual(self.job(first)["unique_key"], "nightly")
        self.finish_next()
        second = self.ok("enqueue", job).strip()
        self.assertNotEqual(second, first)
        lines = job + "\n" + job + "\n"
        code, out, err = self.cli("enqueue", "-", stdin=lines)
        self.assertEqual((code, out), (0, f"{second}\n{second}\n"))
        self.assertEqual(err.count("nothing added"), 2)
        self.assertEqual(len(self.json_out("list", "--json")), 2)

    def test_a_job_after_one_its_unique_key_kept_out_refuses_the_batch(self):
        """A batch whose line runs after a job of the batch that a held unique key
        kept out is refused whole, saying so (it said 'no such job')."""
        def line(**job):
            return json.dumps(dict(job, command="true")) + "\n"
        # In a new database: the key is held by an earlier line of the batch.
        batch = line(unique_key="k") + line(id="a1", unique_key="k") + \
            line(id="b", after=["a1"])
        err = self.assertFailsCleanly(1, "enqueue", "-", stdin=batch)
        self.assertEqual(err, "queuectl: error: line 3: job a1 (in 'after') was not "
                              "added: the job of line 1 holds its unique key 'k'\n")
        self.assertFalse(self.db_exists())
        # In a database where a job holds the key.
        self.enqueue(id="x", command="true", unique_key="k")
        batch = line(id="c") + line(id="a1", unique_key="k") + line(id="b", after="a1")
        err = self.assertFailsCleanly(1, "enqueue", "-", stdin=batch)
        self.assertEqual(err, "queuectl: error: line 3: job a1 (in 'after') was not "
                              "added: job x holds its unique key 'k'\n")
        self.assertEqual([job["id"] for job in self.json_out("list", "--json")], ["x"])


class DependencyTest(QueueTestCase):
    """after: a job runs once the jobs it names completed, and ends dead if one of them
    cannot."""

    def test_a_job_runs_only_after_its_dependencies_completed(self):
        """A job with `after` is claimable only once every job it names has
        completed; show lists them and what it still waits for."""
        self.enqueue(id="a", command="true", priority=1)
        self.enqueue(id="b", command="true", priority=1)
        self.enqueue(id="c", command="true", priority=9, after=["a", "b"])
        self.assertEqual(self.claimable(), ["a", "b"])
        job = self.job("c")
        self.assertEqual(job["after"], [{"id": "a", "state": "pending"},
                                        {"id": "b", "state": "pending"}])
        self.assertEqual(job["waiting_for"], ["a", "b"])
        self.assertIn("waiting_for:   a, b", self.ok("show", "c"))
        self.assertEqual(self.finish_next(), "a")
        self.assertEqual(self.claimable(), ["b"])
        self.assertEqual(self.finish_next(), "b")
        self.assertEqual(self.claimable(), ["c"])
        self.assertEqual(self.job("c")["waiting_for"], [])
        # After a job that has completed already, a new job runs at once.
        self.enqueue(id="d", command="true", after="a")
        self.assertEqual(self.claimable(), ["c", "d"])

    def test_bad_dependencies_are_refused_at_enqueue(self):
        """after naming an unknown job, or the job itself, is refused; a running
        dependency cannot be deleted from under its dependants."""
        self.enqueue(id="a", command="true")
        err = self.assertFailsCleanly(1, "enqueue", json.dumps(
            {"command": "true", "after": ["a", "nope"]}))
        self.assertIn("no such job: nope", err)
        self.assertFailsCleanly(2, "enqueue", json.dumps(
            {"id": "me", "command": "true", "after": ["me"]}))
        # Within a batch, a job may run after one added earlier in it.
        lines = (json.dumps({"id": "x", "command": "true"}) + "\n" +
                 json.dumps({"id": "y", "command": "true", "after": ["x"]}) + "\n")
        self.ok("enqueue", "-", stdin=lines)
        err = self.assertFailsCleanly(1, "delete", "x")
        self.assertIn("cannot delete job x: job y runs after it", err)
        self.ok("delete", "x", "y")

    def test_every_unknown_dependency_is_named_with_its_line(self):
        self.enqueue(id="real", command="true")
        err = self.assertFailsCleanly(1, "enqueue", "-c", "true", "--after", "nope",
                                      "--after", "real", "--after", "nope2")
        self.assertIn("no such job: nope, nope2 (in 'after')", err)
        batch = '{"command": "true"}\n{"command": "x", "after": ["real", "zz"]}\n'
        err = self.assertFailsCleanly(1, "enqueue", "-", stdin=batch)
        self.assertIn("line 2: no such job: zz (in 'after')", err)

    def test_list_and_status_show_jobs_that_wait_for_others(self):
        """list shows what a job waits for in RUN AT (and waiting_for in --json);
        status counts such pending jobs apart (waiting_for_dependencies)."""
        self.enqueue(id="a1", command="true", priority=9)
        self.enqueue(id="a2", command="true", priority=8)
        self.enqueue(id="b", command="true", after=["a1", "a2"])
        self.enqueue(id="c", command="true", priority=7, after=["a2"])
        table = self.ok("list").splitlines()
        b_row = next(line for line in table if line.startswith("b "))
        self.assertIn("after a1,a2", b_row)
        a_row = next(line for line in table if line.startswith("a1 "))
        self.assertRegex(a_row, r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  ")
        jobs = {job["id"]: job for job in self.json_out("list", "--json")}
        self.assertEqual((jobs["b"]["waiting_for"], jobs["a1"]["waiting_for"]),
                         (["a1", "a2"], []))
        self.assertEqual(self.job("b")["waiting_for"], ["a1", "a2"])
        status = self.json_out("status", "--json")
        self.assertEqual((status["counts"]["pending"], status["waiting_for_dependencies"]),
                         (4, 2))
        self.assertIn("jobs:      pending 4 (2 waiting for other jobs), processing 0",
                      self.ok("status"))
        self.assertEqual(self.run_next(), ("a1", "completed"))
        self.assertEqual(self.json_out("list", "--json")[1]["waiting_for"], ["a2"])
        self.assertEqual(self.run_next(), ("a2", "completed"))
        self.assertEqual(self.json_out("status", "--json")["waiting_for_dependencies"], 0)
        self.assertIn("jobs:      pending 2, processing 0", self.ok("status"))
        self.assertNotIn("after", self.ok("list"))

    def test_a_long_list_of_dependencies_is_clipped_to_the_column(self):
        """RUN AT stays as wide as a time: a long list of ids is clipped."""
        for n in range(5):
            self.enqueue(id=f"dependency-{n}", command="true")
        self.enqueue(id="last", command="true", after=[f"dependency-{n}" for n in range(5)])
        row = next(line for line in self.ok("list").splitlines()
                   if line.startswith("last "))
        self.assertIn("after dependency-...", row)

    def test_cancelling_a_dependency_ends_its_dependants_dead(self):
        """A job that runs after a cancelled one ends dead, naming it, and so do
        the jobs after that one."""
        self.enqueue(id="a", command="true")
        self.enqueue(id="b", command="true", after=["a"])
        self.enqueue(id="c", command="true", after=["b"])
        self.ok("cancel", "a")
        self.assertEqual((self.state("b"), self.job("b")["last_error"]),
                         ("dead", "dependency a was cancelled"))
        self.assertEqual(self.job("c")["last_error"], "dependency b is dead")

    def test_cancel_names_the_jobs_that_die_with_it(self):
        """cancel says which waiting jobs ended dead because of it."""
        self.enqueue(id="a", command="true")
        self.enqueue(id="b", command="true", after=["a"])
        self.enqueue(id="c", command="true", after=["b"])
        self.assertEqual(self.ok("cancel", "a"),
                         "a: cancelled\nb: dead (dependency a was cancelled)\n"
                         "c: dead (dependency b is dead)\n")

    def test_a_dead_dependency_ends_the_chain_dead(self):
        """If a dependency ends dead, its dependants end dead naming it, and
        theirs too; a new job after a dead one is dead at once."""
        self.enqueue(id="a", command="false", max_retries=0)
        self.enqueue(id="b", command="true", after=["a"])
        self.enqueue(id="c", command="true", after=["b"])
        self.finish_next(failed())
        self.assertEqual([(self.state(j), self.job(j)["last_error"]) for j in "bc"],
                         [("dead", "dependency a is dead"),
                          ("dead", "dependency b is dead")])
        self.assertEqual(self.cli("enqueue", json.dumps({"id": "d", "command": "true",
                                                         "after": ["a"]})),
                         (0, "d\n", "queuectl: job d is dead already: its dependency a "
                                     "is dead\n"))
        self.assertEqual(self.job("d")["last_error"], "dependency a is dead")
        self.assertEqual(self.json_out("status", "--json")["counts"]["dead"], 4)
        # Retried together with its dependency, a dependant waits for it again.
        err = self.assertFailsCleanly(1, "dlq", "retry", "b")
        self.assertIn("its dependency a is dead", err)
        self.ok("dlq", "retry", "a", "b")
        self.assertEqual(self.claimable(), ["a"])
        self.assertEqual(self.job("b")["waiting_for"], ["a"])

    def test_jobs_that_die_with_their_dependency_are_logged(self):
        """A job ended dead because the job it runs after died gets a line in the
        worker log, naming why, and so do the jobs after it."""
        proc = self.start_workers(1)
        self.ok("enqueue", "-", stdin="".join(json.dumps(job) + "\n" for job in (
            {"id": "a", "command": "exit 3", "max_retries": 0},
            {"id": "b", "command": "true", "after": ["a"]},
            {"id": "c", "command": "true", "after": ["b"]})))
        self.wait_state("c", "dead", timeout=15)
        wait_until(lambda: "job c dead" in self.log_text(proc), 10, "the log line of c")
        log = self.log_text(proc)
        self.assertIn("supervisor: job b dead: dependency a is dead\n", log)
        self.assertIn("supervisor: job c dead: dependency b is dead\n", log)

    def test_dependants_wait_across_workers(self):
        """With two workers, a job after another starts only once it completed."""
        self.start_workers(2)
        record = self.path("order")
        first = self.enqueue(command=f"sleep 1; echo first >> {q(record)}")
        second = self.enqueue(command=f"echo second >> {q(record)}", after=[first])
        self.wait_state(second, "completed", timeout=20)
        self.assertEqual(self.read("order"), "first\nsecond\n")
        start = self.job(second)["history"][0]["started_at"]
        self.assertGreaterEqual(start, self.job(first)["updated_at"])


add_postgres_variants(globals())


if __name__ == "__main__":
    unittest.main()
