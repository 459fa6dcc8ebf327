"""config show, get and set: keys, values stored and read back, defaults."""

import json
import os
import unittest

from tests.support import add_postgres_variants, QueueTestCase, queuectl, wait_until


class ConfigTest(QueueTestCase):
    """config show, get and set on a database."""

    def setUp(self):
        super().setUp()
        self.store().close()

    def test_show_defaults(self):
        """config show lists every key with its default."""
        want = {"max_retries": 3, "backoff_base": 2, "backoff_max": 3600,
                "job_timeout": 300, "output_limit": 65536, "lease_timeout": 15,
                "retention": 0}
        self.assertEqual(self.json_out("config", "show", "--json"), want)
        text = self.ok("config", "show")
        for key, value in want.items():
            self.assertIn(f"{key} = {value}", text)
        self.assertEqual(len(text.splitlines()), len(want))

    def test_get_prints_only_the_value(self):
        """config get prints just the value, for either spelling."""
        self.assertEqual(self.ok("config", "get", "max_retries"), "3\n")
        self.assertEqual(self.ok("config", "get", "max-retries"), "3\n")
        self.assertEqual(self.ok("config", "get", "lease-timeout"), "15\n")

    def test_set_both_spellings(self):
        """config set accepts dashes or underscores and the value sticks."""
        self.ok("config", "set", "max-retries", "5")
        self.assertEqual(self.ok("config", "get", "max_retries"), "5\n")
        self.ok("config", "set", "max_retries", "0")
        self.assertEqual(self.ok("config", "get", "max-retries"), "0\n")
        self.ok("config", "set", "backoff-base", "1.5")
        self.assertEqual(self.ok("config", "get", "backoff_base"), "1.5\n")
        self.ok("config", "set", "job_timeout", "2.0")
        self.assertEqual(self.ok("config", "get", "job_timeout"), "2\n")
        shown = self.json_out("config", "show", "--json")
        self.assertEqual((shown["max_retries"], shown["backoff_base"],
                          shown["job_timeout"]), (0, 1.5, 2))

    def test_config_applies_to_jobs_without_own_value(self):
        """Jobs without max_retries or timeout follow the config."""
        self.enqueue(id="j", command="true")
        self.enqueue(id="own", command="true", max_retries=1, timeout=9)
        self.ok("config", "set", "max_retries", "7")
        self.ok("config", "set", "job_timeout", "42")
        self.assertEqual((self.job("j")["max_retries"], self.job("j")["timeout"]), (7, 42))
        self.assertEqual((self.job("own")["max_retries"], self.job("own")["timeout"]),
                         (1, 9))


class ConfigValueTest(QueueTestCase):
    """What config set stores and config show and get read back: plain decimals,
    defaults when nothing usable is stored."""

    def test_a_value_too_large_says_the_largest(self):
        """A value past the largest a key takes names that largest, not only the
        smallest (which it satisfies)."""
        for key, value, most in (("output_limit", "99999999999999", "2147483647"),
                                 ("lease_timeout", "99999999999d", "2147483647s"),
                                 ("max_retries", "99999999999999999999", "2147483647")):
            err = self.assertFailsCleanly(2, "config", "set", key, value)
            self.assertEqual(err, f"queuectl: error: bad value for {key}: {value!r} "
                                  f"(too large: at most {most})\n")

    def test_a_tiny_duration_is_refused_and_values_are_stored_plainly(self):
        """config set refuses a job_timeout under 0.01 s (it used to store 1e-05,
        which the queue then could not read) and stores plain decimals."""
        self.enqueue(id="j", command="true")
        err = self.assertFailsCleanly(2, "config", "set", "job_timeout", "0.00001")
        self.assertIn("expected a duration >= 0.01s", err)
        self.assertEqual(self.ok("config", "set", "job_timeout", "0.0104"),
                         "job_timeout = 0.01\n")
        self.assertEqual(self.stored_config("job_timeout"), "0.01")
        self.assertEqual(self.ok("config", "set", "backoff_max", "1.5m"),
                         "backoff_max = 90\n")
        self.assertEqual(self.stored_config("backoff_max"), "90")
        self.assertEqual(self.json_out("config", "show", "--json")["job_timeout"], 0.01)
        self.assertEqual(self.job("j")["timeout"], 0.01)

    def test_a_bad_stored_value_falls_back_to_its_default_and_says_so(self):
        """A stored value the reader refuses never stops the queue: every command
        works with that key's default, and config show and get say why."""
        self.enqueue(id="j", command="true")
        self.store_config_raw("job_timeout", "1e-05")
        self.store_config_raw("max_retries", "١٢")
        for argv in (("status",), ("status", "--json"), ("list",), ("show", "j"),
                     ("stats",)):
            with self.subTest(argv=argv):
                self.ok(*argv)
        self.assertEqual((self.job("j")["timeout"], self.job("j")["max_retries"]),
                         (300, 3))
        text = self.ok("config", "show")
        line = next(l for l in text.splitlines() if l.startswith("job_timeout"))
        self.assertIn("job_timeout = 300  (config job_timeout: stored value '1e-05' "
                      "is not a duration >= 0.01s", line)
        self.assertIn("using the default, 300", line)
        self.assertEqual(len(text.splitlines()), len(queuectl.CONFIG))
        code, out, err = self.cli("config", "show", "--json")
        self.assertEqual((code, json.loads(out)["job_timeout"]), (0, 300))
        self.assertEqual(len(err.splitlines()), 2, err)
        self.assertTrue(all(l.startswith("queuectl: config ") for l in err.splitlines()))
        code, out, err = self.cli("config", "get", "job_timeout")
        self.assertEqual((code, out), (0, "300\n"))
        self.assertIn("stored value '1e-05'", err)
        self.assertEqual(set(self.store().config_problems()),
                         {"job_timeout", "max_retries"})
        self.ok("config", "set", "job_timeout", "60")
        self.assertEqual(set(self.store().config_problems()), {"max_retries"})

    def test_a_running_supervisor_goes_on_with_a_bad_stored_value(self):
        """Workers keep claiming with the default, and the supervisor logs why."""
        self.enqueue(id="first", command="true")
        self.store_config_raw("job_timeout", "1e-05")
        proc = self.start_workers(1)
        self.wait_state("first", "completed")
        self.enqueue(id="second", command="true")
        self.wait_state("second", "completed")
        wait_until(lambda: "supervisor: config job_timeout: stored value '1e-05'"
                   in self.log_text(proc), 10, "the supervisor to log the bad value")

    def test_config_set_help_lists_valid_values_and_durations_work(self):
        """config set --help lists each key's valid values; durations are accepted
        wherever a duration is asked for."""
        code, out, _ = self.cli("config", "set", "--help")
        for key, spec in queuectl.CONFIG.items():
            self.assertIn(key, out)
        self.assertIn("a duration such as 7d", " ".join(out.split()))
        self.assertEqual(self.ok("config", "set", "job_timeout", "5m"), "job_timeout = 300\n")
        self.assertEqual(self.ok("config", "set", "retention", "7d"), "retention = 604800\n")
        self.assertFailsCleanly(2, "config", "set", "retention", "-1d")
        self.assertFailsCleanly(2, "status", "--max-age", "ten minutes")
        self.assertEqual(self.cli("status", "--max-age", "10m")[0], 0)

    def test_config_show_and_get_print_the_defaults_and_create_nothing(self):
        """Before the first job, config show and get print the defaults (they
        used to fail) and create no file."""
        want = dict(queuectl.CONFIG_DEFAULTS)
        self.assertEqual(self.json_out("config", "show", "--json"), want)
        self.assertEqual(self.ok("config", "show"),
                         "".join(f"{key} = {value}\n" for key, value in want.items()))
        self.assertEqual(self.ok("config", "get", "job-timeout"), "300\n")
        self.assertEqual(self.cli("config", "get", "bogus")[0], 2)
        if self.postgres:                           # an empty schema, made by hand
            schema = queuectl.pg_url(self.db)[1]
            self.sql(f"CREATE SCHEMA {schema}")
            self.assertEqual(self.ok("config", "get", "max_retries"), "3\n")
            self.assertEqual(self.sql("SELECT count(*) FROM pg_tables WHERE "
                                      "schemaname = ?", (schema,)), [(0,)])
        else:
            open(self.db, "w").close()              # an empty file (mktemp) too
            self.assertEqual(self.ok("config", "get", "max_retries"), "3\n")
            os.remove(self.db)
        self.assertEqual(os.listdir(self.dir), [])
        self.assertFalse(self.db_exists())


add_postgres_variants(globals())


if __name__ == "__main__":
    unittest.main()
