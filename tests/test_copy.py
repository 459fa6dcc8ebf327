"""copy --to: a whole queue into another database (to move it to PostgreSQL, or
back), with every job's state, runs, output, dependencies and unique key, and the
settings."""

import json
import unittest

from tests.support import (QueueTestCase, add_postgres_variants, another_db,
                           created_note, db_exists, drop_pg_schema, pg_schema_url,
                           pg_server, queuectl)


class CopyTest(QueueTestCase):
    """From the test's store to the other (SQLite to PostgreSQL and back), and to
    another database of the same kind."""

    def fill(self):
        """A queue with a job in each interesting state, and a setting."""
        self.make_completed("done")
        self.make_dead("dead")
        self.enqueue(id="later", command="echo later", delay="1h", priority=5)
        code, _, err = self.cli("enqueue", "-c", "echo after", "--id", "after",
                                "--after", "dead")
        self.assertEqual((code, err), (0, "queuectl: job after is dead already: its "
                                          "dependency dead is dead\n"))
        self.enqueue(id="keyed", command="echo keyed", unique_key="k")
        self.enqueue(id="waits", command="echo waits", after=["keyed"])
        self.ok("config", "set", "backoff_base", "3")

    def documents(self, db):
        """What every reading command says of the queue at DB."""
        def out(*argv):
            code, text, err = self.cli("--db", db, *argv)
            self.assertEqual(code, 0, err)
            return json.loads(text)
        jobs = out("list", "--json")
        shown = {job["id"]: out("show", job["id"], "--json") for job in jobs}
        stats = out("stats", "--json")
        for key in ("completed_last_minute", "completed_last_hour"):
            del stats[key]             # they count by the clock of the copy
        return jobs, shown, stats, out("config", "show", "--json")

    def test_copy_carries_every_job_with_its_history_and_back(self):
        """A copy to a database of the other kind reads the same, job by job, and
        so does a copy of that copy back into a new one of the test's kind; its
        dependencies and unique keys hold there too."""
        self.fill()
        before = self.documents(self.db)
        if self.postgres:
            other = self.path("moved.db")
        else:
            other = pg_schema_url(pg_server(), "tmoved")     # skips without a server
            self.addCleanup(drop_pg_schema, other)
        code, out, err = self.cli("copy", "--to", other)
        self.assertEqual((code, err), (0, created_note(other)))
        shown = queuectl.pg_url(other)[2] if queuectl.is_postgres(other) else other
        self.assertEqual(out, f"copied 6 job(s), 2 run(s) and 1 setting(s) to {shown}\n")
        self.assertEqual(self.documents(other), before)
        back = another_db(self, "back.db")
        self.assertEqual(self.cli("--db", other, "copy", "--to", back)[0], 0)
        self.assertEqual(self.documents(back), before)

        # The copy is a queue like any: its keys and dependencies hold.
        code, out, err = self.cli("--db", back, "enqueue", "-c", "x", "--unique-key", "k")
        self.assertEqual((code, out.strip()), (0, "keyed"))
        code, out, err = self.cli("--db", back, "dlq", "retry", "after")
        self.assertEqual(code, 1)
        self.assertIn("cannot retry job after", err)
        self.assertEqual(self.rows() and self.documents(self.db), before)   # untouched

    def test_copy_is_refused_while_workers_run_or_a_job_is_processing(self):
        """Workers running on the queue, or a job processing (a supervisor killed),
        refuse the copy: a job would run on both. Nothing is written anywhere."""
        self.enqueue(id="slow", command="sleep 30")
        proc = self.start_workers(1)
        self.wait_state("slow", "processing")
        other = another_db(self, "other.db")
        code, out, err = self.cli("copy", "--to", other)
        self.assertEqual((code, out), (1, ""))
        self.assertRegex(err, r"^queuectl: error: workers are running on this queue "
                              r"\(supervisor pid \d+\): stop them first")
        self.kill_supervisor(proc)
        self.kill_leftovers()
        code, out, err = self.cli("copy", "--to", other)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "queuectl: error: 1 job(s) are processing (slow): stop "
                              "the workers first (worker stop), then copy\n")
        self.assertFalse(db_exists(other))

    def test_copy_refuses_jobs_the_destination_has_and_changes_nothing(self):
        """A destination that has a job of the same id takes none of the copy."""
        self.fill()
        other = another_db(self, "other.db")
        self.assertEqual(self.cli("--db", other, "enqueue", "-c", "mine", "--id",
                                  "later")[0], 0)
        before = self.cli("--db", other, "list", "--json")
        code, out, err = self.cli("copy", "--to", other)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "queuectl: error: the destination has 1 job(s) of the "
                              "same id already (later): nothing copied\n")
        self.assertEqual(self.cli("--db", other, "list", "--json"), before)
        code, out, err = self.cli("copy", "--to", self.db)
        self.assertEqual((code, err), (2, "queuectl: error: --to names the database "
                                          "being copied\n"))


add_postgres_variants(globals())


if __name__ == "__main__":
    unittest.main()
