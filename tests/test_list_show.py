"""list and show: order, filters, and the fields of a job."""

import re
import unittest

from tests.support import add_postgres_variants, QueueTestCase, claim_one


JOB_FIELDS = {"id", "command", "state", "attempts", "max_retries", "priority", "run_at",
              "timeout", "created_at", "updated_at", "next_retry_at", "last_error",
              "worker_pid"}


ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class ListTest(QueueTestCase):
    """list: newest first, --state and --limit."""

    def test_list_newest_first(self):
        """list shows the newest job first, in text and JSON."""
        for job_id in ("a", "b", "c"):
            self.enqueue(id=job_id, command=f"echo {job_id}")
        self.assertEqual([j["id"] for j in self.json_out("list", "--json")],
                         ["c", "b", "a"])
        lines = self.ok("list").splitlines()
        self.assertTrue(lines[0].startswith("ID"), lines)
        self.assertEqual([line.split()[0] for line in lines[1:]], ["c", "b", "a"])

    def test_list_state_and_limit(self):
        """--state filters and --limit caps the list."""
        for job_id in ("a", "b", "c", "d"):
            self.enqueue(id=job_id, command="true")
        self.make_completed("done")
        self.assertEqual([j["id"] for j in self.json_out("list", "--state", "completed",
                                                         "--json")], ["done"])
        self.assertEqual([j["id"] for j in self.json_out("list", "--state", "pending",
                                                         "--limit", "2", "--json")],
                         ["d", "c"])
        self.assertEqual([j["id"] for j in self.json_out("list", "--limit", "1",
                                                         "--json")], ["done"])
        self.assertEqual(self.json_out("list", "--state", "dead", "--json"), [])


class ShowTest(QueueTestCase):
    """show: every field of a job, its runs and output."""

    def test_job_fields(self):
        """Job objects carry every documented field; times end in Z."""
        self.enqueue(id="p", command="true")
        self.enqueue(id="f", command="false", max_retries=2, priority=50)
        self.assertEqual(self.run_next(ok=False), ("f", "failed"))
        for job in (self.job("p"), self.job("f"), *self.json_out("list", "--json")):
            with self.subTest(job=job["id"]):
                self.assertLessEqual(JOB_FIELDS, set(job))
                for key in ("run_at", "created_at", "updated_at"):
                    self.assertRegex(job[key], ISO_Z)
        failed = self.job("f")
        self.assertEqual((failed["state"], failed["attempts"], failed["last_error"],
                          failed["next_retry_at"], failed["worker_pid"]),
                         ("failed", 1, "exit 1", failed["run_at"], None))
        self.assertRegex(failed["next_retry_at"], ISO_Z)
        pending = self.job("p")
        self.assertEqual((pending["max_retries"], pending["timeout"],
                          pending["next_retry_at"], pending["last_error"]),
                         (3, 300, None, None))

    def test_show_processing_job(self):
        """show of a running job names its worker pid."""
        self.enqueue(id="busy", command="sleep 100")
        claim_one(self.store(), 31337)
        job = self.job("busy")
        self.assertEqual((job["state"], job["worker_pid"], job["attempts"]),
                         ("processing", 31337, 1))

    def test_show_history_and_output(self):
        """show --json includes the attempts and the last output; text shows them too."""
        self.enqueue(id="j", command="echo out")
        self.run_next(ok=True)
        job = self.job("j")
        self.assertEqual([h["outcome"] for h in job["history"]], ["completed"])
        self.assertEqual(job["output"]["stdout"], "out\n")
        text = self.ok("show", "j")
        self.assertIn("run 1:", text)
        self.assertIn("out", text)


add_postgres_variants(globals())


if __name__ == "__main__":
    unittest.main()
