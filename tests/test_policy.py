"""Pure functions, tested directly: times, durations, backoff, job validation,
config values, text shown, stop signals, exit descriptions, output tails."""

import os
import signal
import unittest
from datetime import datetime, timedelta, timezone
from unittest import mock

from tests.support import queuectl

UTC = timezone.utc
NOW = datetime(2026, 11, 24, 10, 0, 0, 123000, tzinfo=UTC)


class TimeTest(unittest.TestCase):
    """User times in, fixed-width UTC times out."""

    def test_parse_user_time_z_suffix(self):
        """A trailing 'Z' or 'z' means UTC (also on Python 3.9)."""
        want = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
        self.assertEqual(queuectl.parse_user_time("2026-11-24T10:00:00Z"), want)
        self.assertEqual(queuectl.parse_user_time("2026-11-24T10:00:00z"), want)
        self.assertEqual(queuectl.parse_user_time(" 2026-11-24T10:00:00Z\n"), want)
        self.assertEqual(queuectl.parse_user_time("2026-11-24T10:00:00.250Z"),
                         want + timedelta(milliseconds=250))

    def test_parse_user_time_offsets(self):
        """An explicit offset is honoured and the result is converted to UTC."""
        got = queuectl.parse_user_time("2026-11-24T10:00:00+02:00")
        self.assertEqual(got, datetime(2026, 11, 24, 8, 0, tzinfo=UTC))
        self.assertEqual(got.utcoffset(), timedelta(0))
        self.assertEqual(queuectl.parse_user_time("2026-11-24T10:00:00-05:30"),
                         datetime(2026, 11, 24, 15, 30, tzinfo=UTC))
        self.assertEqual(queuectl.parse_user_time("2026-11-24T10:00:00+00:00"),
                         datetime(2026, 11, 24, 10, 0, tzinfo=UTC))

    def test_parse_user_time_rejects_naive_and_garbage(self):
        """Times with no zone, garbage, empty strings and non-strings are rejected."""
        for bad in ("2026-11-24T10:00:00", "2026-11-24", "tomorrow", "", "   ",
                    "Z", "2026-13-01T00:00:00Z", "2026-11-24T25:00:00Z", None, 5,
                    1.5, ["2026-11-24T10:00:00Z"]):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                queuectl.parse_user_time(bad)

    def test_parse_user_time_naive_message(self):
        """The error for a naive time tells the user to add a zone."""
        with self.assertRaises(ValueError) as cm:
            queuectl.parse_user_time("2026-11-24T10:00:00")
        self.assertIn("zone", str(cm.exception))

    def test_iso_fixed_width_z(self):
        """iso() writes fixed-width UTC with milliseconds and a 'Z'."""
        self.assertEqual(queuectl.iso(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
                         "2026-01-02T03:04:05.000Z")
        self.assertEqual(queuectl.iso(datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=UTC)),
                         "2026-01-02T03:04:05.999Z")
        plus2 = timezone(timedelta(hours=2))
        self.assertEqual(queuectl.iso(datetime(2026, 1, 1, 1, 0, tzinfo=plus2)),
                         "2025-12-31T23:00:00.000Z")
        for dt in (NOW, datetime(2000, 1, 1, tzinfo=UTC), queuectl.now_utc()):
            text = queuectl.iso(dt)
            self.assertEqual(len(text), 24, text)
            self.assertTrue(text.endswith("Z"), text)

    def test_iso_round_trip(self):
        """parse_iso(iso(dt)) gives dt back, to the millisecond, aware in UTC."""
        for dt in (NOW, datetime(1999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)):
            back = queuectl.parse_iso(queuectl.iso(dt))
            self.assertEqual(back, dt)
            self.assertEqual(back.tzinfo, UTC)
        self.assertEqual(queuectl.iso(queuectl.parse_iso("2026-11-24T10:00:00.123Z")),
                         "2026-11-24T10:00:00.123Z")

    def test_iso_sorts_like_time(self):
        """iso() strings compare as text in time order (the claim query relies on it)."""
        times = [NOW + timedelta(seconds=s) for s in (-86400 * 400, -1, -0.001, 0,
                                                      0.001, 9, 10, 3600 * 30)]
        self.assertEqual(sorted(queuectl.iso(t) for t in times),
                         [queuectl.iso(t) for t in times])


class DurationTest(unittest.TestCase):
    """Durations read from people (90s, 1h30m) and written for them."""

    def test_parse_duration(self):
        """Durations: plain seconds, or numbers with s, m, h, d, w, combined."""
        for text, seconds in (("90", 90), ("1.5", 1.5), ("90s", 90), ("10m", 600),
                              ("2h", 7200), ("7d", 604800), ("1w", 604800),
                              ("1h30m", 5400), (" 2H ", 7200), (12, 12)):
            with self.subTest(text=text):
                self.assertEqual(queuectl.parse_duration(text), seconds)
        for bad in ("", "x", "10 m", "-5", "m", "1.h", "inf", "nan", True, None, "5ms"):
            with self.subTest(bad=bad):
                with self.assertRaises(ValueError):
                    queuectl.parse_duration(bad)

    def test_format_duration(self):
        """Durations render for people; None renders as '-'."""
        self.assertEqual(queuectl.format_duration(None), "-")
        self.assertEqual(queuectl.format_duration(0.4), "0.4s")
        self.assertEqual(queuectl.format_duration(12), "12s")
        self.assertEqual(queuectl.format_duration(185), "3m05s")
        self.assertEqual(queuectl.format_duration(7800), "2h10m")


class AsciiDigitsTest(unittest.TestCase):
    """Numbers are ASCII digits only, wherever they are read."""

    def test_numbers_durations_and_times_take_ascii_digits_only(self):
        """Digits of other scripts are refused wherever a number is read."""
        for bad in ("١٠", "１０", "١٠m", "1h٣٠m"):
            with self.subTest(duration=bad), self.assertRaises(ValueError):
                queuectl.parse_duration(bad)
        for bad in ("２０２６-01-01T00:00:00Z", "2026-01-01T00:00:00+０２:00",
                    "2026-01-01T10:00:00.１Z", "２０２６-01-01"):
            with self.subTest(time=bad), self.assertRaises(ValueError):
                queuectl.parse_user_time(bad)
        for key, bad in (("max_retries", "١٢"), ("backoff_base", "٣"),
                         ("backoff_base", "1_0"), ("backoff_base", "1e3"),
                         ("lease_timeout", "٣٠"), ("output_limit", "１０")):
            with self.subTest(key=key, value=bad):
                with self.assertRaises(queuectl.UsageError):
                    queuectl.parse_config_value(key, bad)
        for bad in ("١", "١٠", "+-1", "1_0"):
            with self.subTest(int_arg=bad):
                with self.assertRaises(queuectl.argparse.ArgumentTypeError):
                    queuectl.int_between(0, 100)(bad)


class BackoffDelayTest(unittest.TestCase):
    """The wait before a retry: min(base ** failures, maximum)."""

    def test_powers_of_base(self):
        """With base 2 the delays after failures 1, 2, 3 are 2, 4, 8 seconds."""
        self.assertEqual([queuectl.backoff_delay(k, 2, 3600) for k in (1, 2, 3)],
                         [2.0, 4.0, 8.0])

    def test_capped_by_maximum(self):
        """The delay never exceeds the maximum."""
        self.assertEqual(queuectl.backoff_delay(11, 2, 3600), 2048.0)
        self.assertEqual(queuectl.backoff_delay(12, 2, 3600), 3600.0)
        self.assertEqual(queuectl.backoff_delay(3, 10, 50), 50.0)

    def test_huge_exponent_does_not_overflow(self):
        """A huge failure count returns the maximum instead of overflowing."""
        for k in (1100, 10 ** 6, 10 ** 12):
            self.assertEqual(queuectl.backoff_delay(k, 2, 3600), 3600.0)
            self.assertEqual(queuectl.backoff_delay(k, 2.5, 2 ** 31 - 1), 2 ** 31 - 1)
        self.assertEqual(queuectl.backoff_delay(10 ** 6, 1.5, 1e300), 1e300)

    def test_base_one(self):
        """Base 1 waits one second after every failure."""
        for k in (1, 2, 50, 10 ** 9):
            self.assertEqual(queuectl.backoff_delay(k, 1, 3600), 1.0)

    def test_float_base_and_edges(self):
        """A fractional base works; no failures or a zero maximum means no wait."""
        self.assertAlmostEqual(queuectl.backoff_delay(2, 1.5, 100), 2.25)
        self.assertEqual(queuectl.backoff_delay(0, 2, 3600), 0.0)
        self.assertEqual(queuectl.backoff_delay(3, 2, 0), 0.0)
        self.assertIsInstance(queuectl.backoff_delay(3, 2, 3600), float)


class ValidateJobTest(unittest.TestCase):
    """A job document checked and completed before it is stored."""

    def valid(self, **doc):
        doc.setdefault("command", "echo hi")
        return queuectl.validate_job(doc, NOW)

    def invalid(self, doc, fragment=None):
        with self.assertRaises(queuectl.UsageError) as cm:
            queuectl.validate_job(doc, NOW)
        if fragment:
            self.assertIn(fragment, str(cm.exception))
        return str(cm.exception)

    def test_minimal_job_defaults(self):
        """A bare command gets no id, priority 0, run_at now and config-following limits."""
        self.assertEqual(self.valid(), {
            "id": None, "command": "echo hi", "max_retries": None, "priority": 0,
            "run_at": queuectl.iso(NOW), "timeout_s": None, "after": (),
            "unique_key": None})

    def test_full_job(self):
        """Every field is carried over."""
        job = self.valid(id="job-1", max_retries=0, priority=-7, timeout=2.5,
                         run_at="2030-01-01T02:00:00+02:00", after=["a", "b", "a"],
                         unique_key="nightly")
        self.assertEqual(job, {
            "id": "job-1", "command": "echo hi", "max_retries": 0, "priority": -7,
            "run_at": "2030-01-01T00:00:00.000Z", "timeout_s": 2.5,
            "after": ("a", "b"), "unique_key": "nightly"})

    def test_after_and_unique_key(self):
        """after names job ids (one id or a list, never the job itself); unique_key
        is a non-empty string."""
        self.assertEqual(self.valid(after="a")["after"], ("a",))
        for bad in (5, [5], [""], ["a b"], [None], {"a": 1}, ["-x"]):
            with self.subTest(after=bad):
                self.invalid({"command": "true", "after": bad}, "after")
        self.invalid({"command": "true", "id": "me", "after": ["x", "me"]}, "itself")
        for bad in ("", 5, None, ["k"], "a\x00b"):
            with self.subTest(unique_key=bad):
                self.invalid({"command": "true", "unique_key": bad}, "unique_key")

    def test_not_an_object(self):
        """A document that is not a JSON object is refused."""
        for doc in ([1], "x", 5, None, ["command"], True):
            with self.subTest(doc=doc):
                self.invalid(doc, "object")

    def test_command(self):
        """command must be present, a string, and not blank."""
        self.invalid({}, "missing field 'command'")
        self.invalid({"command": None}, "command")
        for bad in ("", "   ", 5, ["ls"], {"a": 1}, True):
            with self.subTest(command=bad):
                self.invalid({"command": bad}, "command")

    def test_id(self):
        """id is a non-empty printable string without spaces, not starting with '-'."""
        self.assertEqual(self.valid(id="a.b_c:1")["id"], "a.b_c:1")
        self.assertEqual(self.valid(id="x" * 128)["id"], "x" * 128)
        for bad in ("", 5, None, True, ["a"], "a b", "-x", "a\tb", "a\nb", "a\x00b",
                    "x" * 129):
            with self.subTest(id=bad):
                self.invalid({"command": "true", "id": bad}, "'id'")

    def test_max_retries(self):
        """max_retries is a whole number >= 0 (not a bool or a float)."""
        self.assertEqual(self.valid(max_retries=0)["max_retries"], 0)
        self.assertEqual(self.valid(max_retries=10)["max_retries"], 10)
        for bad in (True, False, -1, 1.5, 2.0, "3", None, 2 ** 31, float("inf")):
            with self.subTest(max_retries=bad):
                self.invalid({"command": "true", "max_retries": bad}, "max_retries")

    def test_priority(self):
        """priority is a whole number, negative allowed."""
        self.assertEqual(self.valid(priority=-5)["priority"], -5)
        self.assertEqual(self.valid(priority=2 ** 31 - 1)["priority"], 2 ** 31 - 1)
        for bad in (True, 1.5, "1", None, 2 ** 31, -2 ** 31, float("nan")):
            with self.subTest(priority=bad):
                self.invalid({"command": "true", "priority": bad}, "priority")

    def test_run_at(self):
        """run_at needs a zone; it is stored as UTC with a 'Z'."""
        self.assertEqual(self.valid(run_at="2030-01-01T00:00:00Z")["run_at"],
                         "2030-01-01T00:00:00.000Z")
        self.assertEqual(self.valid(run_at="2030-01-01T00:00:00z")["run_at"],
                         "2030-01-01T00:00:00.000Z")
        for bad in ("2030-01-01T00:00:00", "2030-01-01", "soon", "", 5, None, True):
            with self.subTest(run_at=bad):
                self.invalid({"command": "true", "run_at": bad}, "run_at")

    def test_delay(self):
        """delay is a duration >= 0 from now: seconds, or text such as '10m'."""
        self.assertEqual(self.valid(delay=10)["run_at"],
                         queuectl.iso(NOW + timedelta(seconds=10)))
        self.assertEqual(self.valid(delay=0.5)["run_at"],
                         queuectl.iso(NOW + timedelta(seconds=0.5)))
        self.assertEqual(self.valid(delay=0)["run_at"], queuectl.iso(NOW))
        self.assertEqual(self.valid(delay="5")["run_at"],
                         queuectl.iso(NOW + timedelta(seconds=5)))
        self.assertEqual(self.valid(delay="1h30m")["run_at"],
                         queuectl.iso(NOW + timedelta(minutes=90)))
        for bad in (-1, "-5", "5 m", "soon", "", True, None, float("nan"),
                    float("inf"), 2 ** 31, "99999999d"):
            with self.subTest(delay=bad):
                self.invalid({"command": "true", "delay": bad}, "delay")

    def test_run_at_and_delay_together(self):
        """run_at and delay are mutually exclusive."""
        self.invalid({"command": "true", "delay": 1, "run_at": "2030-01-01T00:00:00Z"},
                     "not both")

    def test_timeout(self):
        """timeout is a duration > 0: seconds, or text such as '5m'."""
        self.assertEqual(self.valid(timeout=0.25)["timeout_s"], 0.25)
        self.assertEqual(self.valid(timeout=60)["timeout_s"], 60)
        self.assertEqual(self.valid(timeout="5m")["timeout_s"], 300)
        for bad in (0, -1, 0.0, "0s", "5 s", True, None, float("nan"), float("inf")):
            with self.subTest(timeout=bad):
                self.invalid({"command": "true", "timeout": bad}, "timeout")

    def test_unknown_field(self):
        """An unknown field is refused by name."""
        self.invalid({"command": "true", "retries": 3}, "'retries'")
        self.invalid({"command": "true", "state": "dead"}, "'state'")

    def test_new_job_id(self):
        """Generated ids are short hex strings and differ."""
        ids = {queuectl.new_job_id() for _ in range(200)}
        self.assertEqual(len(ids), 200)
        for job_id in ids:
            self.assertLessEqual(len(job_id), 16)
            self.assertEqual(queuectl.validate_job_id(job_id), job_id)


class ConfigParsingTest(unittest.TestCase):
    """Config keys, their defaults, and the text their values are read from and stored
    as."""

    def test_config_key_spellings(self):
        """Dashes and underscores name the same key."""
        for key in queuectl.CONFIG_DEFAULTS:
            self.assertEqual(queuectl.config_key(key), key)
            self.assertEqual(queuectl.config_key(key.replace("_", "-")), key)
        self.assertEqual(queuectl.config_key("max-retries"), "max_retries")
        self.assertEqual(queuectl.config_key("max_retries"), "max_retries")

    def test_config_key_unknown(self):
        """An unknown key is a UsageError (exit 2) that lists the known keys."""
        for bad in ("bogus", "", "max retries", "maxretries"):
            with self.subTest(bad=bad), self.assertRaises(queuectl.UsageError) as cm:
                queuectl.config_key(bad)
            self.assertEqual(cm.exception.code, 2)
            self.assertIn("max_retries", str(cm.exception))

    def test_defaults(self):
        """The documented defaults."""
        self.assertEqual(queuectl.CONFIG_DEFAULTS, {
            "max_retries": 3, "backoff_base": 2, "backoff_max": 3600,
            "job_timeout": 300, "output_limit": 65536, "lease_timeout": 15,
            "retention": 0})

    def test_parse_config_value_good(self):
        """Good values parse to numbers; whole floats become ints."""
        good = [("max_retries", "0", 0), ("max_retries", " 5 ", 5),
                ("backoff_base", "1", 1), ("backoff_base", "1.5", 1.5),
                ("backoff_base", "2.0", 2), ("backoff_max", "0", 0),
                ("backoff_max", "90.5", 90.5), ("job_timeout", "0.5", 0.5),
                ("job_timeout", "300", 300), ("output_limit", "0", 0),
                ("output_limit", "1024", 1024), ("lease_timeout", "1", 1),
                ("lease_timeout", "2.5", 2.5)]
        for key, text, want in good:
            with self.subTest(key=key, text=text):
                got = queuectl.parse_config_value(key, text)
                self.assertEqual(got, want)
                self.assertIs(type(got), type(want))

    def test_parse_config_value_bad(self):
        """Bad values are UsageErrors naming the key."""
        bad = [("max_retries", "-1"), ("max_retries", "1.5"), ("max_retries", "abc"),
               ("max_retries", ""), ("max_retries", str(2 ** 31)),
               ("backoff_base", "0.5"), ("backoff_base", "0"), ("backoff_base", "nan"),
               ("backoff_base", "inf"), ("backoff_base", "1e400"),
               ("backoff_max", "-1"), ("backoff_max", "x"),
               ("job_timeout", "0"), ("job_timeout", "-5"), ("job_timeout", "abc"),
               ("job_timeout", "1e-400"), ("job_timeout", "nan"),
               ("output_limit", "-1"), ("output_limit", "1.5"),
               ("lease_timeout", "0.5"), ("lease_timeout", "0"), ("lease_timeout", "y")]
        for key, text in bad:
            with self.subTest(key=key, text=text):
                with self.assertRaises(queuectl.UsageError) as cm:
                    queuectl.parse_config_value(key, text)
                self.assertIn(key, str(cm.exception))

    def test_stored_form_is_plain_decimal_that_the_reader_reads_back(self):
        """A config value is stored without an exponent, durations to the
        millisecond, and only if parse_config_value reads it back."""
        for key, value, text in (("job_timeout", 0.0104, "0.01"),
                                 ("job_timeout", 300, "300"),
                                 ("backoff_max", 90.5, "90.5"),
                                 ("backoff_base", 1.0000001, "1.0000001"),
                                 ("retention", 0, "0")):
            with self.subTest(key=key, value=value):
                self.assertEqual(queuectl.config_text(key, value), text)
                self.assertNotIn("e", text)
                queuectl.parse_config_value(key, text)
        with self.assertRaises(queuectl.UsageError):
            queuectl.config_text("backoff_max", 2 ** 31 - 0.0001)   # rounds to 2**31

    def test_a_timeout_below_the_floor_is_refused_naming_it(self):
        """job_timeout, and a job's own timeout, are at least 0.01 s."""
        for text in ("0.00001", "0.009", "1e-05"):
            with self.subTest(text=text), self.assertRaises(queuectl.UsageError) as cm:
                queuectl.parse_config_value("job_timeout", text)
            self.assertIn(">= 0.01s", str(cm.exception))
        self.assertEqual(queuectl.parse_config_value("job_timeout", "0.01"), 0.01)
        for bad in (5e-324, 0.001, "0.009s"):
            with self.subTest(timeout=bad), self.assertRaises(queuectl.UsageError) as cm:
                queuectl.validate_job({"command": "true", "timeout": bad}, NOW)
            self.assertIn("at least 0.01s", str(cm.exception))


class DefaultDbPathTest(unittest.TestCase):
    """Where the database is when --db is not given."""

    def test_env_var_wins(self):
        """$QUEUECTL_DB is used as given."""
        self.assertEqual(queuectl.default_db_path({"QUEUECTL_DB": "/x/q.db",
                                                   "XDG_DATA_HOME": "/xdg"}), "/x/q.db")

    def test_xdg_data_home(self):
        """Without $QUEUECTL_DB (or with it empty), $XDG_DATA_HOME/queuectl is used."""
        want = os.path.join("/xdg", "queuectl", "queuectl.db")
        self.assertEqual(queuectl.default_db_path({"XDG_DATA_HOME": "/xdg"}), want)
        self.assertEqual(queuectl.default_db_path({"QUEUECTL_DB": "",
                                                   "XDG_DATA_HOME": "/xdg"}), want)

    def test_home_fallback(self):
        """With neither variable set, ~/.local/share/queuectl/queuectl.db is used."""
        with mock.patch.dict(os.environ, {"HOME": "/home/someone"}):
            for environ in ({}, {"XDG_DATA_HOME": ""}, {"QUEUECTL_DB": ""}):
                with self.subTest(environ=environ):
                    self.assertEqual(queuectl.default_db_path(environ),
                                     "/home/someone/.local/share/queuectl/queuectl.db")

    def test_never_relative_to_cwd(self):
        """The default is absolute; a relative $XDG_DATA_HOME is ignored (XDG spec)."""
        with mock.patch.dict(os.environ, {"HOME": "/home/someone"}):
            for environ in ({}, {"XDG_DATA_HOME": ""}, {"XDG_DATA_HOME": "relative"},
                            {"XDG_DATA_HOME": "./data"}):
                with self.subTest(environ=environ):
                    path = queuectl.default_db_path(environ)
                    self.assertTrue(os.path.isabs(path), path)
                    self.assertEqual(os.path.basename(path), "queuectl.db")

    def test_reads_os_environ_by_default(self):
        """Called with no argument it reads os.environ."""
        with mock.patch.dict(os.environ, {"QUEUECTL_DB": "/from/env.db"}):
            self.assertEqual(queuectl.default_db_path(), "/from/env.db")


class ShownTest(unittest.TestCase):
    """Text shown to people: control characters written out, never obeyed."""

    def test_control_characters_are_written_out(self):
        """shown() writes C0 (but tab), DEL, C1 and bidi controls as escapes; with
        lines=True it keeps newlines."""
        text = "a\x1b[2J\x1b]0;t\x07\tb\nc\rd\x7f\x85\x9b\u202e\u2066\u2069é"
        self.assertEqual(queuectl.shown(text),
                         "a\\x1b[2J\\x1b]0;t\\x07\tb\\nc\\rd\\x7f\\x85\\x9b"
                         "\\u202e\\u2066\\u2069é")
        self.assertEqual(queuectl.shown("x\x1by\nz\t", lines=True), "x\\x1by\nz\t")
        self.assertEqual(queuectl.clip("echo \x1b[31m\nred", 40), "echo \\x1b[31m red")


class DescribeExitTest(unittest.TestCase):
    """How a run's exit status is put in words."""

    def test_exit_codes(self):
        """Plain exit statuses, with notes for 126 and 127."""
        self.assertEqual(queuectl.describe_exit(1), "exit 1")
        self.assertEqual(queuectl.describe_exit(3), "exit 3")
        self.assertEqual(queuectl.describe_exit(127), "exit 127 (command not found)")
        self.assertEqual(queuectl.describe_exit(126), "exit 126 (command not executable)")

    def test_signals(self):
        """Negative statuses name the signal, or its number if it has no name."""
        self.assertEqual(queuectl.describe_exit(-signal.SIGKILL), "killed by SIGKILL")
        self.assertEqual(queuectl.describe_exit(-signal.SIGTERM), "killed by SIGTERM")
        self.assertEqual(queuectl.describe_exit(-999), "killed by signal 999")


class StopFlagTest(unittest.TestCase):
    """Which stop (warm or cold) a stop signal asks for."""

    def levels(self, *signals):
        flag = queuectl.StopFlag(counted=(signal.SIGINT, signal.SIGTERM))
        seen = []
        for sig in signals:
            flag.handle(sig, None)
            seen.append(flag.level)
        return seen

    def test_rules(self):
        """Second SIGINT/SIGTERM is cold; worker stop's signals set their own level."""
        warm, cold = queuectl.WARM, queuectl.COLD
        term, usr2, usr1 = signal.SIGTERM, queuectl.WARM_SIGNAL, queuectl.COLD_SIGNAL
        self.assertEqual(self.levels(term, signal.SIGINT), [warm, cold])
        self.assertEqual(self.levels(usr2, usr2, usr2), [warm, warm, warm])
        self.assertEqual(self.levels(usr2, term), [warm, warm])
        self.assertEqual(self.levels(usr2, term, term), [warm, warm, cold])
        self.assertEqual(self.levels(usr1, term), [cold, cold])
        hup_flag = queuectl.StopFlag(counted=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
        hup_flag.handle(signal.SIGHUP, None)
        self.assertEqual(hup_flag.level, warm)

    def test_worker_sigterm_is_always_warm(self):
        """A worker counts nothing: SIGTERM is warm however often; only USR1 is cold."""
        flag = queuectl.StopFlag()
        for _ in range(3):
            flag.handle(signal.SIGTERM, None)
        self.assertEqual(flag.level, queuectl.WARM)
        flag.handle(queuectl.COLD_SIGNAL, None)
        self.assertEqual(flag.level, queuectl.COLD)


class StartTicksTest(unittest.TestCase):
    """A process told apart from a later one with its pid, by its start time."""

    def test_process_names_that_are_not_utf8(self):
        """start_ticks reads /proc/PID/stat of a process whose name is not UTF-8."""
        import shutil, subprocess, tempfile
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        program = os.path.join(os.fsencode(folder), b"s\xff\xfe")
        shutil.copy("/bin/sleep", program)
        proc = subprocess.Popen([program, "30"])
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        self.assertIsInstance(queuectl.start_ticks(proc.pid), int)
        self.assertTrue(queuectl.holder_running(proc.pid, queuectl.start_ticks(proc.pid)))
        self.assertFalse(queuectl.holder_running(proc.pid, 1))   # another start: reused


class OutputTailTest(unittest.TestCase):
    """The last bytes of a run's output that are kept."""

    def test_keeps_the_last_bytes_cut_at_a_character(self):
        """The tail keeps the last LIMIT bytes, less the pieces of a character
        cut in two: the text kept is then exactly the bytes kept (and logs
        --follow can line the two up)."""
        tail = queuectl.OutputTail(10)
        tail.add("€".encode() * 10)                  # 30 bytes, 3 a character
        self.assertEqual((tail.text(), tail.dropped), ("€€€", 21))
        self.assertEqual(len(tail.text().encode()) + tail.dropped, 30)
        ascii_tail = queuectl.OutputTail(4)
        ascii_tail.add(b"abcdefgh")
        self.assertEqual((ascii_tail.text(), ascii_tail.dropped), ("efgh", 4))
        binary = queuectl.OutputTail(4)
        binary.add(b"\x80" * 10)                     # no character to find: cut at 3
        binary.text()
        self.assertEqual((len(binary.data), binary.dropped), (1, 9))


if __name__ == "__main__":
    unittest.main()
