"""README.md and docs/ stay true to the code: the verbs, the config keys, the test
command, and every link between them."""

import argparse
import glob
import os
import re
import unittest

from tests.support import ROOT, queuectl

README = os.path.join(ROOT, "README.md")
COMMANDS = os.path.join(ROOT, "docs", "commands.md")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
HEADING = re.compile(r"(#{1,6})\s+(.+?)\s*#*\s*$")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def verbs():
    """Every verb build_parser() wires: top-level commands, and each action of a
    group (worker, dlq, config) as 'group action'."""
    def subcommands(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices
        return {}
    found = []
    for name, sub in subcommands(queuectl.build_parser()).items():
        actions = subcommands(sub)
        found += [f"{name} {action}" for action in actions] if actions else [name]
    return found


def prose_lines(text):
    """The lines of markdown TEXT outside fenced code blocks."""
    fence = None
    for line in text.splitlines():
        marker = re.match(r"\s*(```|~~~)", line)
        if marker:
            if fence is None:
                fence = marker.group(1)
            elif marker.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield line


def section(text, title):
    """The body of the '## TITLE' section of markdown TEXT."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise AssertionError(f"no '## {title}' section")
    return match.group(1)


def slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces
    made hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link: its text
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    """The anchors of the headings of markdown file PATH, numbered as GitHub numbers
    repeated ones (added, added-1, ...)."""
    seen, found = {}, set()
    for line in prose_lines(read(path)):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def markdown_files():
    return [README, os.path.join(ROOT, "CHANGELOG.md")] + \
        sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


class ReadmeTest(unittest.TestCase):

    def setUp(self):
        self.readme = read(README)

    def test_ci_runs_the_readme_test_command(self):
        """.ci/run runs exactly the test command README gives."""
        command = re.search(r"## Running the tests\s+```sh\n(.+?)\n```", self.readme).group(1)
        self.assertIn(command, read(os.path.join(ROOT, ".ci", "run")).splitlines())

    def test_the_verbs_are_those_of_the_parser(self):
        """The verb list is build_parser()'s, groups included."""
        found = verbs()
        for verb in ("enqueue", "worker start", "worker stop", "dlq retry", "config set",
                     "dashboard"):
            self.assertIn(verb, found)
        self.assertNotIn("worker", found)

    def test_every_verb_has_its_line_in_readme(self):
        """Each verb has its line in README's Commands list, linked to docs/commands.md."""
        commands = section(self.readme, "Commands")
        for verb in verbs():
            with self.subTest(verb=verb):
                lines = [line for line in commands.splitlines()
                         if f"`queuectl {verb}`" in line]
                self.assertEqual(len(lines), 1, f"one line for queuectl {verb}")
                self.assertIn("docs/commands.md#", lines[0])

    def test_every_verb_is_in_docs_commands(self):
        """Each verb is shown in docs/commands.md."""
        commands = read(COMMANDS)
        for verb in verbs():
            with self.subTest(verb=verb):
                self.assertRegex(commands, rf"queuectl {re.escape(verb)}(?![\w-])")

    def test_every_config_key_is_documented(self):
        """Each config key has its row in README's Configuration table."""
        configuration = section(self.readme, "Configuration")
        for key in queuectl.CONFIG:
            with self.subTest(key=key):
                self.assertIn(f"| `{key}` |", configuration)

    def test_every_relative_link_resolves(self):
        """Every relative link in README, CHANGELOG and docs/ names a file that exists,
        and a heading that exists when it names one."""
        for path in markdown_files():
            folder = os.path.dirname(path)
            for number, line in enumerate(prose_lines(read(path)), 1):
                for target in LINK.findall(line):
                    if re.match(r"[a-z][a-z0-9+.-]*:", target):
                        continue                      # https:, mailto: ...
                    with self.subTest(file=os.path.relpath(path, ROOT), link=target):
                        name, _, anchor = target.partition("#")
                        linked = os.path.normpath(os.path.join(folder, name)) \
                            if name else path
                        self.assertTrue(os.path.exists(linked), f"no file {name}")
                        if anchor and linked.endswith(".md"):
                            self.assertIn(anchor, anchors(linked),
                                          f"no heading #{anchor} in {name or 'this file'}")

    def test_code_is_cited_by_symbol(self):
        """No page cites queuectl.py by line number."""
        for path in markdown_files():
            with self.subTest(file=os.path.relpath(path, ROOT)):
                self.assertNotRegex(read(path),
                                    r"queuectl\.py(:\d|#L\d| line \d| lines \d)")

    def test_slugs_are_githubs(self):
        """Headings get the anchors GitHub gives them."""
        self.assertEqual(slug("Lifecycle, retries and the DLQ"),
                         "lifecycle-retries-and-the-dlq")
        self.assertEqual(slug("Dependencies: after"), "dependencies-after")
        self.assertEqual(slug("1.1.0 - 2026-11-29"), "110---2026-11-29")
        self.assertEqual(slug("The dashboard is the CLI's documents, drawn by one script"),
                         "the-dashboard-is-the-clis-documents-drawn-by-one-script")
        self.assertEqual(slug("`dlq retry` resets attempts to 0"),
                         "dlq-retry-resets-attempts-to-0")



class PackagingTest(unittest.TestCase):
    """pyproject.toml is what `pip install .` reads: a key in the wrong table
    fails the install outright."""

    def setUp(self):
        try:
            import tomllib
        except ImportError:
            self.skipTest("tomllib is in Python 3.11 and later")
        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            self.project = tomllib.load(f)["project"]

    def test_each_key_is_in_its_table(self):
        self.assertIn("Environment :: Console", self.project["classifiers"])
        self.assertEqual(self.project["scripts"], {"queuectl": "queuectl:main"})
        self.assertEqual(self.project["dependencies"], [])
        requirement = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[\w,]+\])?"
                                 r"\s*([<>=!~]=?\s*[\w.*]+\s*,?\s*)*")
        for extra, requirements in self.project["optional-dependencies"].items():
            for text in requirements:
                self.assertRegex(text, requirement.pattern + "$", extra)
        self.assertEqual(self.project["optional-dependencies"]["postgres"],
                         ["psycopg[binary]>=3.1"])


if __name__ == "__main__":
    unittest.main()
