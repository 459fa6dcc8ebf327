"""README.md stays true to the code: cited lines, the test command, the CLI surface."""

import os
import re
import unittest

from tests.support import ROOT, queuectl

README = os.path.join(ROOT, "README.md")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


class ReadmeTest(unittest.TestCase):

    def setUp(self):
        self.readme = read(README)
        self.source = read(os.path.join(ROOT, "queuectl.py")).splitlines()

    def cited(self, pattern):
        """The line numbers README cites in the sentence matching PATTERN."""
        match = re.search(pattern, self.readme, re.S)
        self.assertIsNotNone(match, pattern)
        return [int(n) for n in match.groups()]

    def at(self, number):
        return self.source[number - 1]

    def test_claim_line_references(self):
        """The lines README cites for atomic claiming hold that code."""
        start, end = self.cited(r"`Store\.claim` \(`queuectl\.py` lines (\d+)-(\d+)\)")
        self.assertIn("def claim(self", self.at(start))
        self.assertIn('self._write(body, "EXCLUSIVE"', self.at(end))
        begin, commit, rollback = self.cited(
            r"`BEGIN EXCLUSIVE` \(line\s+(\d+)\).*?COMMIT`s \(line\s+(\d+)\).*?"
            r"\(line\s+(\d+)\)")
        self.assertIn("self.conn.execute(begin)", self.at(begin))
        self.assertIn('"COMMIT"', self.at(commit))
        self.assertIn('"ROLLBACK"', self.at(rollback))
        select, update, where, check = self.cited(
            r"Inside, line\s+(\d+) selects.*?lines\s+(\d+)-(\d+) move it.*?"
            r"line\s+(\d+) gives up")
        self.assertIn("SELECT * FROM jobs", self.at(select))
        self.assertIn("UPDATE jobs SET state = ?", self.at(update))
        self.assertIn("WHERE id = ? AND state = ?", self.at(where))
        self.assertIn("if updated != 1:", self.at(check))
        self.assertTrue(start < select < update <= where < check < end)

    def test_ci_runs_the_readme_test_command(self):
        """.ci/run runs exactly the test command README gives."""
        command = re.search(r"## Running the tests\s+```sh\n(.+?)\n```", self.readme).group(1)
        self.assertIn(command, read(os.path.join(ROOT, ".ci", "run")).splitlines())

    def test_every_command_and_config_key_is_documented(self):
        """Each subcommand and config key appears in README."""
        for name in ("enqueue", "worker start", "worker stop", "status", "list", "show",
                     "logs", "wait", "cancel", "pause", "resume", "purge",
                     "dlq list", "dlq retry", "delete", "config show", "config get",
                     "config set", "stats", "dashboard"):
            self.assertIn(f"queuectl {name}", self.readme)
        for key in queuectl.CONFIG:
            self.assertIn(f"`{key}`", self.readme)


if __name__ == "__main__":
    unittest.main()
