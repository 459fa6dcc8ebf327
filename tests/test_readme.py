"""README.md stays true to the code: the test command and the CLI surface."""

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
