#!/usr/bin/env python3
"""queuectl: a durable background job queue for shell commands, in one file.

Jobs live in a database, a SQLite file by default. A supervisor runs a pool of
worker processes that run each job's command through /bin/sh with a timeout,
retry failures with exponential backoff and move exhausted jobs to a dead letter
queue (DLQ).

How the processes work together (docs/design.md says why)::

  enqueue, cancel, dlq retry, pause,       status, list, show, logs, wait, stats,
  config set, dashboard actions            dashboard pages and /metrics
          |  one transaction each                    |  reads only
          v                                          v
  +------------------------------ Store ------------------------------+
  |  jobs, attempts (runs), deps, config, counts, supervisors         |
  +-------------------------------------------------------------------+
          ^  claim: one transaction takes a job for every idle worker
          |  record: results, starts, lease renewals; one per batch
  +-------+---------------------------------------------------+
  |  Supervisor: the only writer of the hot path; PID file      |
  +-------+--------------------------------------^-------------+
          |  Run, Abort, Unqueue, Recorded       |  Ready, Started, Beat,
          |  (a pair of pipes per worker)        |  Done, Returned, Log
          v                                      |
  Worker 1..N (forked) --posix_spawn--> /bin/sh -c COMMAND, in a session of
                                        its own; its output through pipes,
                                        spooled beside the database for
                                        logs --follow

A section uses only the sections above it: constants, errors, time and text,
records and policy (the job fields, the rules), stores, running a job, workers,
operations and documents (each action once, for every front end), commands,
the dashboard's HTTP handlers, the command line, and last the dashboard's page,
style and script.

Usage:
    queuectl enqueue '{"id": "job1", "command": "sleep 2"}'   (or -c COMMAND [flags])
    queuectl worker start --count 4         (foreground; --detach for background)
    queuectl worker stop [--timeout DURATION]
    queuectl status [--json] [--check]
    queuectl list [--state S] | show ID | logs ID [--follow] | wait ID...
    queuectl cancel ID... | pause | resume | purge --state S [--older-than D]
    queuectl dlq list | dlq retry ID... | delete ID...
    queuectl config show | config get KEY | config set KEY VALUE
    queuectl stats [--json]
    queuectl dashboard [--host 127.0.0.1] [--port 8765] [--token TOKEN]

Exit codes:
    0    success
    1    runtime error: unknown job, job in the wrong state, workers already running,
         unusable database, results that could not be recorded
    2    usage or validation error: bad option, bad JSON, bad job field, unknown
         state or config key, bad config value, dashboard on a public address
         without a token or with one shorter than 16 characters
    3    status --check: dead jobs in the DLQ
    4    status --check: runnable jobs are waiting but no workers are running
    5    status --check: the oldest runnable job has waited longer than --max-age
    6    wait, logs --follow: a job ended without completing (dead or cancelled)
    7    worker stop, worker start: running jobs were killed and put back (a
         cold stop)
    8    worker stop: the supervisor does not answer (stopped by SIGSTOP)
    124  wait --timeout ran out first
"""

import argparse
import collections
import contextlib
import errno
import fcntl
import io
import json
import marshal
import math
import operator
import os
import re
import select
import signal
import sqlite3
import stat
import sys
import time
from datetime import datetime, timedelta, timezone

# Only `worker start` needs multiprocessing, selectors and subprocess, and only
# `dashboard` needs http.server: they are imported where they are used, so that
# one `enqueue` starts in milliseconds.

__version__ = "1.2.0.dev0"


####
# Constants ####
####

PROG = "queuectl"
ENV_DB = "QUEUECTL_DB"
ENV_TOKEN = "QUEUECTL_TOKEN"               # the dashboard's token, if not --token
ENV_LOG_MAX = "QUEUECTL_LOG_MAX_BYTES"     # where a detached supervisor's log rotates
LOG_MAX_BYTES = 10 * 1024 * 1024
DB_FILENAME = "queuectl.db"
PID_SUFFIX = ".pid"        # <db>.pid: the supervisor's PID file and lock
LOG_SUFFIX = ".log"        # <db>.log: where a --detach'ed supervisor logs
SPOOL_SUFFIX = ".out"      # <db>.out/: live output of running jobs (logs --follow)
TOKEN_SUFFIX = ".token"    # <db>.token: the dashboard's token if none is given

# A job's state.
PENDING = "pending"
PROCESSING = "processing"
COMPLETED = "completed"
FAILED = "failed"          # failed, waiting for its retry
DEAD = "dead"              # in the DLQ
CANCELLED = "cancelled"    # stopped by `cancel`: no retry, not in the DLQ
STATES = (PENDING, PROCESSING, COMPLETED, FAILED, DEAD, CANCELLED)
FINISHED = (COMPLETED, DEAD, CANCELLED)
UNFINISHED = (PENDING, PROCESSING, FAILED)           # what `cancel` can stop
DELETED = "deleted"        # not a state: what wait and show say of a deleted job
DELETED_MARK = " deleted"  # deps.after_id of a dependency deleted unfinished

# How a run (an attempts row) ended; RUN_GOING while it has not.
RUN_GOING = "running"
INTERRUPTED = "interrupted"  # stopped by a cold shutdown; does not use up an attempt
WORKER_LOST = "worker lost"
# Why a run was stopped from outside (RunResult.aborted).
ABORT_COLD = "cold stop"
ABORT_LOST = "claim lost"
ABORT_CANCELLED = "cancelled"
ABORT_FENCED = "lease not renewed"   # the database was away: see Supervisor.fence
AFTER_FAILURE = {FAILED: "will retry after its backoff", DEAD: "moved to the DLQ"}

# What a supervisor is doing, as its PID file and its record tell.
SUPERVISOR_STARTING, SUPERVISOR_UP, SUPERVISOR_STOPPING = \
    "starting", "running", "stopping"

# Stop signals. To a supervisor: SIGINT and SIGTERM step up (the first is a warm
# stop, the second cold); WARM_SIGNAL (from `worker stop`) asks for a warm stop and
# COLD_SIGNAL for a cold one, however often they come. To a worker: SIGTERM is a
# warm stop, COLD_SIGNAL a cold one.
WARM, COLD = 1, 2
WARM_SIGNAL = signal.SIGUSR2
COLD_SIGNAL = signal.SIGUSR1
# enqueue (and anything else that makes work) nudges the supervisor with this
# signal. By default it is ignored, so it can do no harm anywhere else.
WAKE_SIGNAL = signal.SIGURG
SHELL = "/bin/sh"
# Python ignores SIGPIPE and SIGXFSZ, and workers catch these; a job gets the
# default actions back, as it would from subprocess.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGHUP,
                    signal.SIGTERM, WARM_SIGNAL, COLD_SIGNAL, WAKE_SIGNAL)
CLAIM_ENV = "QUEUECTL_CLAIM"   # marks every process of a run, to find orphans later

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CHECK_DEAD = 3
EXIT_CHECK_NO_WORKERS = 4
EXIT_CHECK_STALE = 5
EXIT_NOT_COMPLETED = 6     # wait, logs --follow: a job ended without completing
EXIT_INTERRUPTED = 7       # worker stop: running jobs were killed and put back
EXIT_NO_ANSWER = 8         # worker stop: the supervisor does not answer (frozen)
EXIT_TIMEOUT = 124         # wait --timeout ran out (as timeout(1) does)

# Limits of what a user may give.
ID_MAX_LEN = 128
ID_SPACE = 16 ** 10         # generated ids are 10 hex digits
# The longest command /bin/sh -c can be given: Linux refuses a single argument of
# MAX_ARG_STRLEN (131072) bytes or more, NUL included, with E2BIG.
COMMAND_MAX_BYTES = 131071
MAX_WORKERS = 256
INT_LIMIT = 2 ** 31        # priorities and retries stay well inside SQLite's int64
# A timeout shorter than this (a job's own or config job_timeout) is refused: it
# could only kill the command before it starts, or be stored as 1e-05.
MIN_TIMEOUT_S = 0.01
DURATION_EXAMPLES = "90s, 10m, 2h, 7d or 1h30m"

# How often and how long things wait.
STATS_RUNS = 1000          # stats: run times of the last this many completed runs
WAIT_POLL_S = 0.1          # wait, logs --follow: how often they look for a change
FOLLOW_POLL_S = 0.1
CANCEL_RECHECK_S = 0.3     # cancel looks again for a run that started as it cancelled
PURGE_BATCH = 2000         # jobs deleted a transaction by purge and retention
RUN_MINUTES_KEPT_S = 86400 # per-minute run counts are kept for a day
IDLE_RECHECK_S = 1.0       # the supervisor checks leases and looks for jobs this often
FENCE_MARGIN_S = 0.5       # at least this (see fence_margin)
HOST_LOST_AFTER_S = 5.0    # a shared store's supervisor unseen this long (or its
                           # lease_timeout, if longer) is lost
STARTED_AFTER_S = 0.01     # a run that lasts this long has its process group recorded
NO_PIDFD_POLL_S = 0.01     # without pidfds (Linux < 5.3), how often a run is checked
READ_CHUNK = 65536         # bytes read from a job's output pipe at a time
KILL_POLL_S = 0.02         # while a run is being killed, how often to look again
RECOVERY_POLL_S = 0.05     # the same, for the supervisor, which has other work too
RECORD_EVERY_S = 0.005     # results are written (and fsynced) in batches this often
SPOOL_LINGER_S = 5.0       # an ended run's spool stays this long for its followers
UPKEEP_EVERY_S = 60.0      # how often the supervisor purges (config retention)
KILL_GRACE_S = 2.0         # between SIGTERM and SIGKILL for a job's process group
COLD_STOP_GRACE_S = 10.0   # how long a cold-stopped worker may take before SIGKILL
RESTART_DELAY_S = 1.0      # before restarting a worker that crashed right after start
STOP_RECORD_TRIES_S = 2.0  # a stopping supervisor retries writing results this long
ANSWER_GRACE_S = 3.0       # worker stop: a supervisor that has not taken its signal
                           # (or was stopped) this long does not answer
DETACH_WAIT_S = 15.0       # how long --detach waits for the workers to come up

# The dashboard.
DASHBOARD_PORT = 8765
DASHBOARD_CLIENT_TIMEOUT_S = 10.0          # a client slower to send its request is dropped
DASHBOARD_MAX_CLIENTS = 64                 # connections served at once; more get 503
TOKEN_MIN_LEN = 16                         # shorter tokens are refused: too easy to guess
TOKEN_HOWTO = "python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"
SIGNIN_FREE_FAILURES = 5                   # wrong tokens from a client before it waits:
SIGNIN_WAIT_MAX_S = 60                     # 1 s, then 2, 4 ... up to this
SIGNIN_FORGET_S = 900                      # failures are forgotten after this long
SIGNIN_CLIENTS_MAX = 4096                  # clients whose failures are remembered
SEARCH_SCAN = 100000       # the dashboard's search looks at this many newest jobs
SEARCH_MAX_LEN = 1000      # and for text of at most this many characters


####
# Errors ####
####

class QueueError(Exception):
    """A failure to report to the user in one line, with an exit code."""

    code = EXIT_ERROR


class UsageError(QueueError):
    """Bad input: a bad option, JSON document, job field or config value."""

    code = EXIT_USAGE


class NoDatabase(QueueError):
    """No database there yet (a command that does not create one)."""


class NotFound(QueueError):
    """An id that names no job, or a run number that names no run."""


class Refused(QueueError):
    """An action that a job's state forbids (cancelling a completed job)."""


class NoAnswer(QueueError):
    """A supervisor that does not act on worker stop's signals (frozen)."""

    code = EXIT_NO_ANSWER


####
# Time and text ####
####

class Pattern:
    """A regular expression compiled when first used: most commands use none of
    these, and compiling them all costs every start a millisecond or two."""

    def __init__(self, pattern):
        self.pattern = pattern
        self.compiled = None

    def __getattr__(self, name):           # fullmatch, match, sub, findall ...
        if self.compiled is None:
            self.compiled = re.compile(self.pattern)
        return getattr(self.compiled, name)


# Numbers as users write them: ASCII digits only ([0-9], never \d, which takes
# any script's digits: int("١٢") is 12), no exponent, no "_", no inf or nan.
WHOLE_NUMBER = Pattern(r"[+-]?[0-9]+")
DECIMAL = Pattern(r"[0-9]+(?:\.[0-9]+)?")

# A duration as users write it: seconds alone, or numbers with units (1h30m).
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DURATION_PART = Pattern(r"([0-9]+(?:\.[0-9]+)?)([smhdw])")
DURATION = Pattern(r"([0-9]+(?:\.[0-9]+)?)|(?:[0-9]+(?:\.[0-9]+)?[smhdw])+")

# An ISO-8601 time as users write it: date, T or space, time, Z or an offset.
USER_TIME = Pattern(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[T ]([0-9]{2}):([0-9]{2})"
    r"(?::([0-9]{2})(?:[.,]([0-9]{1,9}))?)?"
    r"(?:([zZ])|([+-])([0-9]{2}):?([0-9]{2}))?")
DATE_ONLY = Pattern(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def now_utc():
    return datetime.now(timezone.utc)


def iso(dt):
    """Format an aware datetime as fixed-width UTC ISO-8601 with a Z suffix."""
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def parse_iso(text):
    """Parse a time written by iso()."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def wall_time(mono):
    """The wall-clock time at which time.monotonic() read MONO.

    Workers and the supervisor share the host's monotonic clock, so an event one
    process timed is stamped by another as when it happened, not when it was
    written down."""
    return now_utc() - timedelta(seconds=max(0.0, time.monotonic() - mono))


def parse_user_time(text):
    """Parse an ISO-8601 time given by a user; it must carry Z or an offset.

    A pattern of our own, not fromisoformat: that rejects Z before 3.11 and accepts
    other forms on newer Pythons, and a job file must mean the same on all of them.
    """
    match = USER_TIME.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None and isinstance(text, str) and DATE_ONLY.fullmatch(text.strip()):
        raise ValueError(f"a date needs a time and a zone too, as in "
                         f"{text.strip()}T00:00:00Z: {text!r}")
    if match is None:
        raise ValueError(f"not an ISO-8601 time such as 2026-11-24T10:00:00Z: "
                         f"{text!r}")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = \
        match.groups()
    if not zulu and not sign:
        raise ValueError(f"time has no zone (add Z or an offset like +02:00): {text!r}")
    offset = timedelta(0)
    if sign:
        if int(off_h) > 23 or int(off_m) > 59:
            raise ValueError(f"bad zone offset: {text!r}")
        offset = timedelta(hours=int(off_h), minutes=int(off_m))
        offset = -offset if sign == "-" else offset
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        dt = datetime(int(year), int(month), int(day), int(hour), int(minute),
                      int(second or 0), micro, tzinfo=timezone(offset))
        return dt.astimezone(timezone.utc)
    except (ValueError, OverflowError) as e:
        raise ValueError(f"not a valid time ({e}): {text!r}") from None


def parse_duration(text):
    """Seconds in a duration as users write it: 90, 1.5, 90s, 10m, 2h, 7d, 1h30m
    (ASCII digits only)."""
    if is_number(text):
        return float(text)
    match = DURATION.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if match is None or not text.strip():
        if isinstance(text, str) and text.strip().startswith("-") and \
                DURATION.fullmatch(text.strip()[1:].lower()):
            raise ValueError(f"must not be negative: {text!r}")
        raise ValueError(f"not a duration such as {DURATION_EXAMPLES}: {text!r}")
    if match.group(1) is not None:
        return float(match.group(1))
    return sum(float(number) * DURATION_UNITS[unit]
               for number, unit in DURATION_PART.findall(text.strip().lower()))


def check_duration(seconds, text, positive=False):
    """SECONDS, if it is a duration a job or command may use; else ValueError
    naming TEXT, the duration as given. POSITIVE: a timeout, at least
    MIN_TIMEOUT_S."""
    if positive and seconds < MIN_TIMEOUT_S:
        raise ValueError(f"must be at least {MIN_TIMEOUT_S}s: {text!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative: {text!r}")
    if seconds >= INT_LIMIT:
        raise ValueError(f"too long: {text!r} (at most {format_span(INT_LIMIT - 1)})")
    return seconds


def format_duration(seconds):
    """Render seconds for people: 0.4s, 12s, 3m05s, 2h10m, 3d4h."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def format_span(seconds):
    """Render a duration someone gave, exactly as they could have typed it: 7d,
    1h30m, 1d1s, 0.5s."""
    whole = int(seconds)
    if seconds != whole or whole == 0:
        return f"{seconds:g}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts)


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_text(text, what):
    """Refuse text that cannot be stored or passed to a shell: NUL, bad UTF-8."""
    if "\0" in text:
        raise UsageError(f"{what} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8 text") from None


def shown(text, lines=False):
    """TEXT as it is safe to show on a terminal: control characters (C0 but tab,
    DEL, C1) and the bidi controls written out, as \\x1b or \\u202e. A job's
    command, output or error, printed by a human-readable command, cannot then
    clear the screen, retitle the window or reorder what is shown. LINES keeps
    newlines, for text shown as lines (a run's output); else it is one line."""
    return (_CONTROL_LINES if lines else _CONTROL).sub(_escape, text)


def _escape(match):
    char = match.group()
    code = ord(char)
    return _ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


_CONTROL = Pattern("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_LINES = Pattern("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_ESCAPES = {"\n": "\\n", "\r": "\\r"}


def clip(text, width):
    """Fold TEXT onto one line of at most WIDTH characters, shown() safe."""
    text = " ".join(shown(text, lines=True).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def log(*messages, at=None):
    """Write timestamped lines to stderr, one line each, in a single write; AT
    is when what they say happened (default: now), and a message that is a pair
    (when, text) says its own. A line is shown() safe: it cannot be split, nor
    send escape sequences to the terminal that shows it."""
    stamp = iso(at or now_utc())
    lines = "".join(f"{stamp} {shown(message)}\n" if isinstance(message, str) else
                    f"{iso(message[0])} {shown(message[1])}\n" for message in messages)
    _write_whole(sys.stderr, lines.encode("utf-8", "replace"))
    if LogRotation.path is not None:
        LogRotation.check()


def _write_whole(stream, data):
    """Write DATA to STREAM's file in one write, whole or not at all: on a full
    disk a log keeps no torn line. A closed or full log must not stop the queue."""
    try:
        fd = stream.fileno()
        info = os.fstat(fd)
        written = os.write(fd, data)
        if written < len(data) and stat.S_ISREG(info.st_mode):
            os.ftruncate(fd, os.fstat(fd).st_size - written)
    except (OSError, ValueError):
        pass


def _open_owner_only(path, flags):
    """Open (creating 0600) a regular file of ours beside the database, or raise
    QueueError. Never follows a symlink or blocks on a FIFO."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as e:
        raise QueueError(f"cannot open {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise QueueError(f"not a regular file: {path}")
    return fd


class LogRotation:
    """The log of a detached supervisor (its stderr): once it has grown past
    max_bytes it is renamed to <log>.1 (replacing the older one) and a new log
    started, so a queue that runs for months cannot fill its disk."""

    path = None                      # the log file that stderr is, once enabled
    max_bytes = LOG_MAX_BYTES

    @classmethod
    def enable(cls, path):
        """Rotate PATH if it is what stderr writes to (a detached supervisor)."""
        with contextlib.suppress(OSError, ValueError):
            here, there = os.fstat(sys.stderr.fileno()), os.stat(path)
            if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
                cls.path = path
                cls.max_bytes = int(os.environ.get(ENV_LOG_MAX, LOG_MAX_BYTES))

    @classmethod
    def check(cls):
        with contextlib.suppress(OSError, ValueError):
            if os.fstat(sys.stderr.fileno()).st_size <= cls.max_bytes:
                return
            os.replace(cls.path, cls.path + ".1")
            fd = _open_owner_only(cls.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, sys.stderr.fileno())
            os.close(fd)


def current_dir():
    try:
        return os.getcwd()
    except FileNotFoundError:
        raise QueueError("the current directory no longer exists") from None


def default_db_path(environ=None):
    """Return $QUEUECTL_DB, else the XDG data directory's queuectl.db."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_DB):
        return environ[ENV_DB]
    data_home = environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(data_home):      # the XDG spec: ignore relative values
        data_home = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "queuectl", DB_FILENAME)


def host_identity():
    """(host name, boot id) of this machine: a pid means something only on the
    host, and in the boot, that it was recorded on."""
    global _HOST_IDENTITY
    if _HOST_IDENTITY is None:
        boot = ""
        with contextlib.suppress(OSError):
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
        _HOST_IDENTITY = (os.uname().nodename, boot)
    return _HOST_IDENTITY


_HOST_IDENTITY = None


def host_id():
    """This host in one word, as claims record it: its name and boot."""
    name, boot = host_identity()
    return f"{name}/{boot}" if boot else name


def on_this_host(host):
    """Whether a claim recorded on HOST (a host_id(), or None from before hosts
    were recorded) is this host's, in this boot."""
    return host is None or host == host_id()


def new_job_id():
    return os.urandom(5).hex()


def new_job_ids(count):
    """COUNT new job ids: consecutive numbers from a random start, so that a
    batch fills the id index in order (a fifth faster than random ids). A clash
    with an existing id is caught by the insert, which then draws again."""
    if count == 1:
        return [new_job_id()]
    start = int.from_bytes(os.urandom(5), "big")
    return [format((start + n) % ID_SPACE, "010x") for n in range(count)]


def new_token():
    """A random claim or run token: 128 bits, as hex."""
    return os.urandom(16).hex()


####
# Records and policy ####
####

# -- settings ------------------------------------------------------------------

class Setting(collections.namedtuple("Setting", "default kind minimum wanted")):
    """A config key: its DEFAULT, its KIND (int, float or "duration"), the
    smallest value it takes, and how a message describes what it WANTS."""


CONFIG = {
    "max_retries": Setting(3, int, 0, "a whole number >= 0"),
    "backoff_base": Setting(2, float, 1, "a number >= 1"),
    "backoff_max": Setting(3600, "duration", 0, "a duration >= 0, such as 600 or 10m"),
    "job_timeout": Setting(300, "duration", MIN_TIMEOUT_S,
                           f"a duration >= {MIN_TIMEOUT_S}s, such as 300 or 5m"),
    "output_limit": Setting(65536, int, 0, "a whole number of bytes >= 0"),
    "lease_timeout": Setting(15, "duration", 1, "a duration >= 1s, such as 15"),
    "retention": Setting(0, "duration", 0, "a duration such as 7d, or 0 to keep "
                                           "forever"),
}
CONFIG_DEFAULTS = {key: setting.default for key, setting in CONFIG.items()}
PAUSED_KEY = "paused"      # a row of the config table while the queue is paused


def config_key(name):
    """Return the canonical config key for NAME (max-retries == max_retries)."""
    key = name.strip().lower().replace("-", "_")
    if key not in CONFIG:
        known = ", ".join(CONFIG)
        raise UsageError(f"unknown config key {name!r} (known: {known})")
    return key


def parse_config_value(key, text):
    """Validate TEXT as a value for config KEY and return it as a number. The one
    reader of config values: what config set stores, and what the store reads."""
    _, kind, minimum, wanted = CONFIG[key]
    text = str(text).strip()
    try:
        if kind == "duration":
            value = parse_duration(text)
        elif (WHOLE_NUMBER if kind == int else DECIMAL).fullmatch(text):
            value = kind(text)
        else:
            raise ValueError(text)
    except ValueError:
        raise UsageError(f"bad value for {key}: {text!r} (expected {wanted})") from None
    if kind != int and value == int(value):
        value = int(value)
    if value < minimum:
        raise UsageError(f"bad value for {key}: {text!r} (expected {wanted})")
    if value >= INT_LIMIT:
        raise UsageError(f"bad value for {key}: {text!r} (too large: at most "
                         f"{INT_LIMIT - 1}{'s' if kind == 'duration' else ''})")
    return value


def config_text(key, value):
    """How config KEY's VALUE is stored: plain decimal, never an exponent (str(1e-05)
    is '1e-05'), durations to the millisecond; refused (UsageError) unless
    parse_config_value reads it back."""
    if CONFIG[key].kind == "duration" and not is_int(value):
        text = f"{value:.3f}".rstrip("0").rstrip(".")
    else:
        text = repr(value)                 # an int, or a float from 1 to 2**31
    try:
        parse_config_value(key, text)
    except UsageError:
        raise UsageError(f"bad value for {key}: {value!r} (expected "
                         f"{CONFIG[key].wanted})") from None
    return text


def config_problem(key, value):
    """Why a stored VALUE of config KEY is not used, or None if it is good: a
    value the reader refuses (written by hand, or by an older version) must not
    stop the queue; its key keeps its default."""
    try:
        parse_config_value(key, value)
        return None
    except UsageError:
        return (f"config {key}: stored value {value!r} is not {CONFIG[key].wanted}; "
                f"using the default, {CONFIG[key].default} (config set {key} to fix "
                f"it)")


def effective(value, default):
    """A job's own setting, else the config's; a whole float as an int."""
    value = default if value is None else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


# -- job fields ------------------------------------------------------------------

class WholeNumber:
    """A check of a whole-number field: from LOW to HIGH (NOTE says what it means)."""

    def __init__(self, low, high, note=""):
        self.low, self.high, self.note = low, high, note

    def __call__(self, value, what, now):
        if not is_int(value) or not self.low <= value <= self.high:
            raise UsageError(f"{what} must be a whole number from {self.low} to "
                             f"{self.high}{self.note}")
        return value


def _check_command(value, what, now):
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{what} must be a non-empty string")
    check_text(value, what)
    if len(value) > COMMAND_MAX_BYTES // 4:      # else it cannot be too long
        size = len(value.encode("utf-8"))
        if size > COMMAND_MAX_BYTES:
            raise UsageError(f"{what} is {size} bytes long; /bin/sh -c takes at most "
                             f"{COMMAND_MAX_BYTES} bytes (the kernel's limit on one "
                             f"argument): put the commands in a script file and "
                             f"enqueue the script")
    return value


def _check_id(value, what, now):
    return validate_job_id(value, what)


def _check_run_at(value, what, now):
    try:
        return iso(parse_user_time(value))
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None


def _check_delay(value, what, now):
    return iso(now + timedelta(seconds=_duration_field(value, what)))


def _check_timeout(value, what, now):
    return _duration_field(value, what, positive=True)


def _check_after(value, what, now):
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise UsageError(f"{what} must be a list of job ids")
    return tuple(dict.fromkeys(validate_job_id(item, what, one=False)
                               for item in value))


def _check_unique_key(value, what, now):
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{what} must be a string that is not blank")
    check_text(value, what)
    return value


def _duration_field(value, what, positive=False):
    """A job field holding a duration: seconds, or text such as '10m'. WHAT
    names it in a message."""
    try:
        if isinstance(value, bool):
            raise ValueError(f"not a duration such as {DURATION_EXAMPLES}: {value!r}")
        return check_duration(parse_duration(value), value, positive)
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None


def validate_job_id(value, what="field 'id'", one=True):
    """VALUE, if it is a good job id; WHAT names where it was given (ONE id, or
    one of a list)."""
    if not isinstance(value, str) or not value:
        raise UsageError(f"{what} must be a non-empty string" if one
                         else f"{what} must hold non-empty strings")
    check_text(value, what)
    if len(value) > ID_MAX_LEN:
        raise UsageError(f"{what}: id {value[:20]!r}... is longer than {ID_MAX_LEN} "
                         f"characters")
    if value.startswith("-") or any(c.isspace() or not c.isprintable() for c in value):
        raise UsageError(f"{what}: id {value!r} must not start with '-' or contain "
                         f"spaces or control characters")
    if value in (".", ".."):                 # a URL would take it for a directory
        raise UsageError(f"{what}: id {value!r} is not allowed")
    return value


ENQUEUE_TIME = "enqueue time"    # a JobField default: when the job is enqueued


class JobField(collections.namedtuple(
        "JobField", "name column default check flag metavar help shown")):
    """One field of a job, in one place: its JSON NAME; the jobs COLUMN it fills
    (or "after", the deps table) and that column's DEFAULT when no field sets it;
    CHECK(value, what, now), which refuses a bad value (WHAT names the field as
    the user gave it) or returns what to store; the enqueue FLAG and METAVAR that
    give it with -c, and the HELP they print; and how job documents show it:
    SHOWN is True (as stored), a config key (the job's own value, else that
    setting), or False."""


# A new field is an entry here, its column (a migration), and a check of its own:
# validation, defaults, the insert, job documents, the enqueue flags and their
# help, and the dashboard's job page all follow this table.
JOB_FIELDS = (
    JobField("command", "command", None, _check_command, "-c", "COMMAND",
             "the command, run with /bin/sh -c (required)", True),
    JobField("id", "id", None, _check_id, "--id", "ID",
             "its id (default: a new one)", True),
    JobField("max_retries", "max_retries", None, WholeNumber(0, INT_LIMIT - 1),
             "--max-retries", "N", "retries after the first run (default: config "
             "max_retries)", "max_retries"),
    JobField("priority", "priority", 0,
             WholeNumber(1 - INT_LIMIT, INT_LIMIT - 1, " (higher runs first)"),
             "--priority", "N", "higher runs first (default 0)", True),
    JobField("run_at", "run_at", ENQUEUE_TIME, _check_run_at, "--run-at", "TIME",
             "run it at this ISO-8601 time, with Z or an offset", True),
    JobField("delay", "run_at", None, _check_delay, "--delay", "DURATION",
             "run it this long from now (instead of run_at)", False),
    JobField("timeout", "timeout_s", None, _check_timeout, "--timeout", "DURATION",
             "kill it after this long (default: config job_timeout)", "job_timeout"),
    JobField("after", "after", (), _check_after, "--after", "ID",
             "run it once job ID has completed (repeat for more)", False),
    JobField("unique_key", "unique_key", None, _check_unique_key, "--unique-key",
             "KEY", "add nothing while an unfinished job holds KEY", True),
)
JOB_FIELD_NAMES = tuple(field.name for field in JOB_FIELDS)
_JOB_FIELD_BY_NAME = {field.name: field for field in JOB_FIELDS}
# The jobs columns the fields fill, each once (delay fills run_at's).
JOB_COLUMNS = tuple(dict.fromkeys(field.column for field in JOB_FIELDS
                                  if field.column != "after"))
# Never given together.
EXCLUSIVE_FIELDS = (("run_at", "delay"),)


_JOB_FIELD_ORDER = {field.name: n for n, field in enumerate(JOB_FIELDS)}
_JOB_CHECKS = tuple((field.name, field.column, field.check) for field in JOB_FIELDS)
# What messages call each field, given as JSON.
_FIELD_WHAT = {field.name: f"field {field.name!r}" for field in JOB_FIELDS}
# A job's values before any field is given: the columns' defaults, but those that
# default to the enqueue time, which is set per job.
_JOB_DEFAULTS = {f.column: f.default for f in reversed(JOB_FIELDS)
                 if f.default is not ENQUEUE_TIME}
# A job's run_at was reckoned from the time it was validated at (delay); so was
# every time of _TIME_DEFAULTS. A store whose clock is not this host's moves
# them to its own (Store.enqueue).
RELATIVE = "relative"
_TIME_DEFAULTS = tuple(dict.fromkeys(f.column for f in JOB_FIELDS
                                     if f.default is ENQUEUE_TIME))


def validate_job(doc, now=None, stamp=None, names=None):
    """Check one job document and return the values to store, by column, or raise
    UsageError. STAMP is iso(now), for callers that validate many jobs at one
    time. NAMES maps a field to what the user typed for it (enqueue -c:
    {"delay": "--delay"}), for the messages; by default they say "field 'delay'"."""
    if not isinstance(doc, dict):
        raise UsageError("a job must be a JSON object like "
                         "{\"command\": \"echo hi\"}")
    if not doc.keys() <= _JOB_FIELD_ORDER.keys():
        unknown = sorted(set(doc) - _JOB_FIELD_ORDER.keys())
        raise UsageError(f"unknown field {unknown[0]!r} "
                         f"(known: {', '.join(JOB_FIELD_NAMES)})")
    if doc.get("command") is None:
        raise UsageError("missing field 'command'")
    for one, other in EXCLUSIVE_FIELDS:
        if one in doc and other in doc:
            raise UsageError(f"give either {(names or {}).get(one) or repr(one)} or "
                             f"{(names or {}).get(other) or repr(other)}, not both")
    now = now or now_utc()
    job = _JOB_DEFAULTS.copy()
    for column in _TIME_DEFAULTS:
        job[column] = stamp or iso(now)
    # The fields in the table's order, so that of two bad ones the same is named.
    for name, column, check in _JOB_CHECKS:
        if name in doc:
            job[column] = check(doc[name], names and names.get(name) or
                                _FIELD_WHAT[name], now)
    if "delay" in doc:
        job[RELATIVE] = True       # its run_at counts from NOW: see Store.enqueue
    if job["id"] is not None and job["id"] in job["after"]:
        raise UsageError(f"job {job['id']} cannot run after itself")
    return job


def job_flag_names():
    """{field: the enqueue flag that gives it}, as validate_job's NAMES."""
    return {field.name: field.flag for field in JOB_FIELDS}


# A job document (show --json, list --json, the dashboard): its life, then its
# fields as JOB_FIELDS show them.
JOB_LIFE_BEFORE = ("state", "attempts")
JOB_LIFE_AFTER = ("created_at", "updated_at", "next_retry_at", "last_error",
                  "worker_pid", "worker_host", "lease_until", "cwd")
JOB_DOCUMENT_FIELDS = (("id", "command") + JOB_LIFE_BEFORE +
                       tuple(f.name for f in JOB_FIELDS
                             if f.shown and f.name not in ("id", "command")) +
                       JOB_LIFE_AFTER)


def job_dict(row, config):
    """The public JSON form of a jobs row: JOB_DOCUMENT_FIELDS."""
    state = row["state"]
    job = {"id": row["id"], "command": row["command"], "state": state,
           "attempts": row["attempts"]}
    for field in JOB_FIELDS:
        if field.shown and field.name not in job:
            value = row[field.column]
            job[field.name] = (value if field.shown is True
                               else effective(value, config[field.shown]))
    job.update(created_at=row["created_at"], updated_at=row["updated_at"],
               next_retry_at=row["run_at"] if state == FAILED else None,
               last_error=row["last_error"],
               worker_pid=row["worker_pid"] if state == PROCESSING else None,
               # The host name (not its boot) of the worker: the pid means
               # something only there.
               worker_host=(row["claim_host"] or "").split("/")[0] or None
               if state == PROCESSING else None,
               lease_until=row["lease_until"] if state == PROCESSING else None,
               cwd=row["cwd"])
    return job


# -- the rules of a job's life ------------------------------------------------------

def fence_margin(lease_s):
    """How long before its lease may run out a host stops a run whose lease it
    could not renew: a fifth of the lease, at least FENCE_MARGIN_S."""
    return max(FENCE_MARGIN_S, lease_s / 5)


def backoff_delay(failures, base, maximum):
    """Seconds to wait after failed attempt number `failures`: min(base ** k, max)."""
    if failures <= 0:
        return 0.0
    # Compare exponents so a large k cannot overflow a float.
    if maximum <= 0 or failures * math.log(base) >= math.log(maximum):
        return float(max(maximum, 0))
    return float(base ** failures)


def no_retry_left(attempts, max_retries, config):
    """Whether a job that has used ATTEMPTS may not run again."""
    return attempts > effective(max_retries, config["max_retries"])


def after_run(ok, attempts, max_retries, config, ended):
    """What becomes of a job whose run (attempt number ATTEMPTS) ended at ENDED:
    (its state, when it may run next, or None). It completed; it failed and waits
    its backoff; or it used its last retry and is dead."""
    if ok:
        return COMPLETED, None
    if no_retry_left(attempts, max_retries, config):
        return DEAD, None
    wait = backoff_delay(attempts, config["backoff_base"], config["backoff_max"])
    return FAILED, ended + timedelta(seconds=wait)


def dependency_error(dep, state):
    """The last_error of a job that ended dead because its dependency DEP did."""
    return (f"dependency {dep} was cancelled" if state == CANCELLED
            else f"dependency {dep} is dead")


def readiness(dependencies):
    """How a new job starts, given {dependency: its state}: (state, ready, why).
    Dead already if one is dead or cancelled; waiting (ready -1) while one has
    not completed; else READY None: due or not by its run_at."""
    for dep, state in dependencies.items():
        if state in (DEAD, CANCELLED):
            return DEAD, 0, dependency_error(dep, state)
    if any(state != COMPLETED for state in dependencies.values()):
        return PENDING, -1, None
    return PENDING, None, None


def retry_problem(dep, state, chosen=(), left=(), never_again=lambda dep: None):
    """Why a dead job cannot go back with the jobs CHOSEN, of which those in
    LEFT stay dead, because of its dependency DEP in STATE; or None.
    NEVER_AGAIN(dep) says why a dead DEP can never run again, if it cannot."""
    if state == CANCELLED:
        return f"its dependency {dep} was cancelled and cannot run again"
    if state == DELETED:
        return f"its dependency {dep} was deleted before it completed"
    if state == DEAD and dep in left:
        return f"its dependency {dep} stays dead too"
    if state == DEAD and dep not in chosen:
        why = never_again(dep)
        if why:                          # no retry can bring it back: say why
            return f"its dependency {dep} can never run again ({why})"
        return f"its dependency {dep} is dead (retry them together)"
    return None


def unknown_dependencies(unknown, index, count, skipped):
    """Why job INDEX of a batch of COUNT cannot run after the ids UNKNOWN: no
    such job, or (SKIPPED: {id: (its holder, key)}) one not added earlier in
    the batch because another job held its unique key."""
    where = f"line {index + 1}: " if count > 1 else ""
    dep = next((dep for dep in unknown if dep in skipped), None)
    if dep is not None:
        holder, key = skipped[dep]
        return (f"{where}job {dep} (in 'after') was not added: {holder} holds its "
                f"unique key {key!r}")
    return f"{where}no such job: {', '.join(unknown)} (in 'after')"


def percentile(ordered, fraction):
    """The value at FRACTION of the sorted list ORDERED (nearest rank), or None."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


# -- records that pass between processes ------------------------------------------

# A live supervisor as its PID file (or the database's record of it) describes it;
# start is its start time in /proc ticks, None if unknown.
Supervised = collections.namedtuple("Supervised", "pid workers state start",
                                    defaults=(None,))

# A job claimed for a worker, with the settings in force when it was claimed.
Claim = collections.namedtuple(
    "Claim", "id command cwd token attempt max_retries timeout_s output_limit lease_s")
# The end of a run, to write: its claim, when it ended (AT) and started (STARTED,
# if known), and its RunResult.
RunEnd = collections.namedtuple("RunEnd", "job_id token at result started")
# What a supervisor of a shared store learns once a tick (Store.tick): the stop
# asked of it (0, WARM, COLD), the (job id, token) of claims its workers hold
# that are no longer theirs (cancelled), the expired claims of every host (as
# Store.expired_claims), since when the queue is paused (or None), whether a job
# may be claimed now, and whether its row had been forgotten (it was lost).
Tick = collections.namedtuple("Tick", "stop gone expired paused work forgotten")


class RunResult:
    """How one run of a command ended."""

    __slots__ = ("exit_code", "reason", "stdout", "stderr", "stdout_dropped",
                 "stderr_dropped", "duration_s", "aborted", "started_mono")

    def __init__(self, exit_code, reason=None, stdout="", stderr="", stdout_dropped=0,
                 stderr_dropped=0, duration_s=None, aborted=None, started_mono=None):
        self.exit_code = exit_code
        self.reason = reason                  # why it failed; None when it succeeded
        self.stdout = stdout
        self.stderr = stderr
        self.stdout_dropped = stdout_dropped  # bytes cut from the head (output_limit)
        self.stderr_dropped = stderr_dropped
        self.duration_s = duration_s
        self.aborted = aborted                # why the run was stopped from outside
        self.started_mono = started_mono      # time.monotonic() when it started

    @property
    def ok(self):
        return self.exit_code == 0 and self.reason is None

    def fields(self):
        """Its values in order, as RunResult(*fields) takes them (to send it)."""
        return tuple(getattr(self, name) for name in self.__slots__)


####
# Stores ####
####

# A store keeps the jobs, and nothing else touches a database: the commands, the
# supervisor, its workers and the dashboard call only these methods, each one
# transaction. Every store provides them all:
#
#   opening      open_store(target, create) -> a store; close(); path;
#                created (it made a new database); data_version()
#   settings     config(), config_problems(), set_config(), pause(), resume(),
#                paused()
#   jobs         enqueue(), get_job(), list_jobs(), search_jobs(), run_of(),
#                job_ends(), require_jobs(), delete(), cancel(), retry_dead(),
#                purge(), trim_run_minutes()
#   claims       claim(), record(), finish(), renew(), give_back(), take_over(),
#                fence(), requeue(), expired_claims(), running_tokens(),
#                not_held()
#   reports      status(), waiting_for_dependencies(), oldest_waiting(), stats(),
#                run_minutes(), run_totals()
#   supervisors  register_supervisor(), update_supervisor(),
#                remove_supervisor(), supervisors()
#
# `Store` holds what every store shares: the logic of each method and its SQL,
# as named statements beside the short methods that run them, in the SQL that
# SQLite speaks. A store class below it holds only its dialect: how it connects
# and runs a transaction (_read, _write), its schema and migrations, its clock,
# how its errors read, and the statements it must say otherwise. The rules
# (retries, backoff, dependencies) are the plain functions of "Records and
# policy"; a store only applies them.
#
# Times are stored as fixed-width ISO-8601 text (iso()), which sorts as time
# does, so every comparison is one of text.

class Store:
    """The logic every store shares; see the list above."""

    path = None              # where its database is (what messages name)
    local = None             # where this host's files of it start (local_base)
    created = False          # whether opening it created a new database
    # Whether supervisors on many hosts share it. Then its server can crash while
    # a host's runs go on, so what a host is told (a claim, a lease renewed) is
    # committed durably: were it lost, the job could run twice at once.
    shared = False

    def __init__(self):
        self._config_cache = self._config_version = self._paused = None
        self._config_problems = {}

    def close(self):
        raise NotImplementedError

    def make(self):
        """Create the database now if opening it did not (PostgreSQL's schema is
        made by the first transaction)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # The dialect: what a store class provides.
    def _read(self, body):
        """Run body(conn) in one read-only transaction; return what it returns."""
        raise NotImplementedError

    def _write(self, body, mode="IMMEDIATE", durable=True):
        """Run body(conn) in one write transaction (MODE EXCLUSIVE for a claim);
        a DURABLE one is on disk before this returns."""
        raise NotImplementedError

    def _changes(self, conn):
        """A number that changes whenever another connection commits."""
        raise NotImplementedError

    def _now(self, conn, now=None):
        """NOW if given (tests), else the store's clock."""
        raise NotImplementedError

    def clock_estimate(self):
        """The store's time now, without asking it if it need not be asked (a
        supervisor waiting for a delayed job's run_at)."""
        return now_utc()

    def _clock_moment(self, before):
        """When (time.monotonic()) the clock that _now just read was read, if
        asking began at BEFORE: between the two."""
        return (before + time.monotonic()) / 2

    def _notify(self, conn):
        """Tell every supervisor, in this transaction, that there is work or a
        change of claims (once a transaction). A SQLite supervisor is woken by
        a signal instead (wake_supervisor), so by default this does nothing."""

    def listener(self):
        """Something whose fileno() turns readable when _notify was called, with
        a drain() method; None where wake-ups come as signals."""
        return None

    # -- SQL used in many places: one name each ------------------------------------

    # A job that may run once due (run_at <= now; ready 1 when the claim has seen
    # it due, 0 before, -1 while it waits for its dependencies).
    _WAITING = "state IN ('pending', 'failed')"
    _RUNNABLE = _WAITING + " AND ready = 1"
    _SCHEDULED = _WAITING + " AND ready = 0"
    # A job whose unique key is held, and that jobs after it still wait for.
    _UNFINISHED = "state IN ('pending', 'processing', 'failed')"
    _ENDED = "state IN ('completed', 'dead', 'cancelled')"
    # A claim, ended: what a job no longer holds once its run is over.
    _NO_CLAIM = ("claim_token = NULL, run_token = NULL, worker_pid = NULL, "
                 "worker_start = NULL, claim_host = NULL, run_pgid = NULL, "
                 "run_pg_start = NULL, lease_until = NULL")
    _HELD = "id = ? AND claim_token = ? AND state = 'processing'"

    # -- settings ------------------------------------------------------------------

    _CONFIG = "SELECT key, value FROM config"
    _SET_CONFIG = "INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)"
    _CONFIG_VALUE = "SELECT value FROM config WHERE key = ?"
    _ADD_CONFIG = "INSERT INTO config (key, value) VALUES (?, ?)"
    _DROP_CONFIG = "DELETE FROM config WHERE key = ?"

    def _config(self, conn):
        """The settings, read again only if another connection has committed
        since the last read (the supervisor reads them for every batch). A stored
        value the reader refuses keeps its key's default (config_problems)."""
        version = self._changes(conn)
        if version != self._config_version:
            values, problems, self._paused = dict(CONFIG_DEFAULTS), {}, None
            for key, value in self._config_rows(conn):
                if key in values:
                    problems[key] = config_problem(key, value)
                    if problems[key] is None:
                        values[key] = parse_config_value(key, value)
                        del problems[key]
                elif key == PAUSED_KEY:
                    self._paused = value
            self._config_cache, self._config_version = values, version
            self._config_problems = problems
        return dict(self._config_cache)

    def _config_rows(self, conn):
        """The (key, value) rows of the config table."""
        return conn.execute(self._CONFIG)

    def config(self):
        return self._read(self._config)

    def config_problems(self):
        """{key: why its stored value is not used} of the settings that fell back
        to their defaults; {} when every stored value is good."""
        def body(conn):
            self._config(conn)
            return dict(self._config_problems)
        return self._read(body)

    def set_config(self, key, value):
        """Store VALUE for KEY in its canonical form (config_text); return that."""
        text = config_text(key, value)
        self._config_version = None
        self._write(lambda conn: conn.execute(self._SET_CONFIG, (key, text)))
        return text

    def pause(self, now=None):
        """Stop claims until resume(); return since when the queue is paused."""
        def body(conn):
            row = conn.execute(self._CONFIG_VALUE, (PAUSED_KEY,)).fetchone()
            if row:
                return row[0]
            since = iso(self._now(conn, now))
            conn.execute(self._ADD_CONFIG, (PAUSED_KEY, since))
            self._notify(conn)
            return since
        self._config_version = None
        return self._write(body)

    def resume(self):
        """Let claims go on; return since when it was paused, or None."""
        def body(conn):
            row = conn.execute(self._CONFIG_VALUE, (PAUSED_KEY,)).fetchone()
            conn.execute(self._DROP_CONFIG, (PAUSED_KEY,))
            self._notify(conn)
            return row[0] if row else None
        self._config_version = None
        return self._write(body)

    def paused(self):
        """Since when the queue is paused, or None."""
        return self._read(lambda conn: self._config(conn) and self._paused)

    # -- jobs: adding --------------------------------------------------------------

    _FIELD_COLUMNS = tuple(column for column in JOB_COLUMNS if column != "id")
    _INSERT_COLUMNS = ("id", "cwd", "state", "ready", "created_at", "updated_at",
                       "last_error") + _FIELD_COLUMNS
    _INSERT_JOB = (f"INSERT INTO jobs ({', '.join(_INSERT_COLUMNS)}) VALUES "
                   f"({', '.join('?' * len(_INSERT_COLUMNS))})")
    # Values in _INSERT_COLUMNS' order, picked in C, from a row (a dict) or from a
    # job's fields: `enqueue -` of 100,000 jobs builds no dict a job.
    _insert_values = staticmethod(operator.itemgetter(*_INSERT_COLUMNS))
    _field_values = staticmethod(operator.itemgetter(*_FIELD_COLUMNS))
    _COUNT_ADDED = "UPDATE counts SET jobs = jobs + ? WHERE state = ?"
    _ADD_DEPENDENCY = "INSERT OR IGNORE INTO deps (job_id, after_id) VALUES (?, ?)"
    _KEY_HOLDER = (f"SELECT id FROM jobs INDEXED BY jobs_unique "
                   f"WHERE unique_key = ? AND {_UNFINISHED}")
    _STATE_OF = "SELECT state FROM jobs WHERE id = ?"
    _DEPENDENCY_STATE = _STATE_OF          # of a job that a new one runs after

    def enqueue(self, jobs, cwd, now=None, validated_at=None):
        """Insert validated jobs (validate_job's) in one transaction. Return (ids,
        notes): each job's id, and {index: a note for the user} of the jobs not
        added because an unfinished job held their unique key (their id is that
        job's), and of those added dead because a dependency had already failed.
        VALIDATED_AT: the time (this host's) the jobs were validated at, when
        that is not the store's clock: their times reckoned from it (a delay, or
        now) are moved to the store's clock."""
        fresh = iter(new_job_ids(len(jobs)))
        ids = [job["id"] or next(fresh) for job in jobs]

        def body(conn):
            at = self._now(conn, now)
            stamp = iso(at)
            batch = jobs if validated_at is None else \
                self._reckoned(jobs, validated_at, at)

            def rows():
                return [dict(job, id=job_id, cwd=cwd, state=PENDING, last_error=None,
                             created_at=stamp, updated_at=stamp,
                             ready=1 if job["run_at"] <= stamp else 0)
                        for job, job_id in zip(batch, ids)]
            notes, added = {}, {PENDING: len(batch), DEAD: 0}
            if any(job["after"] or job["unique_key"] for job in batch):
                made = rows()
                kept = self._enqueue_linked(conn, batch, made, notes)
                added = {state: sum(1 for row in kept if row["state"] == state)
                         for state in added}
                made = [row["id"] for row in made]
            else:
                made = self._insert_jobs(conn, batch, ids, cwd, stamp, rows)
            for state, count in added.items():
                conn.execute(self._COUNT_ADDED, (count, state))
            self._notify(conn)
            return made, notes
        return self._write(body)

    @staticmethod
    def _reckoned(jobs, then, now):
        """JOBS validated at THEN (a host's clock), their relative times moved to
        NOW (the store's): a job due at once is due now, not at a skewed clock's
        now; one delayed is delayed from now."""
        since, shift = iso(then), now - then
        moved = []
        for job in jobs:
            if job["run_at"] == since or job.get(RELATIVE):
                job = dict(job, run_at=iso(parse_iso(job["run_at"]) + shift),
                           **{RELATIVE: False})
            moved.append(job)
        return moved

    def _insert_jobs(self, conn, jobs, ids, cwd, stamp, rows):
        """Insert JOBS with IDS at once and return the ids; if an id clashes, one
        by one (ROWS() makes their rows), so that a clash of a generated id draws
        again and one of a given id is named."""
        conn.execute("SAVEPOINT batch")
        try:
            self._insert_rows(conn, [
                (job_id, cwd, PENDING, 1 if job["run_at"] <= stamp else 0, stamp,
                 stamp, None) + self._field_values(job)
                for job, job_id in zip(jobs, ids)])
        except self.IntegrityError:
            conn.execute("ROLLBACK TO batch")
            made = rows()
            for row, job in zip(made, jobs):
                self._insert_job(conn, row, job)
            ids = [row["id"] for row in made]
        conn.execute("RELEASE batch")
        return ids

    def _insert_rows(self, conn, rows):
        """Insert jobs' rows (values in _INSERT_COLUMNS' order) at once."""
        conn.executemany(self._INSERT_JOB, rows)

    def _insert_job(self, conn, row, job):
        """Insert one row; draw a new id if a generated one clashes."""
        for _ in range(100):
            conn.execute("SAVEPOINT job")
            try:
                conn.execute(self._INSERT_JOB, self._insert_values(row))
                conn.execute("RELEASE job")
                return
            except self.IntegrityError:
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                if job["id"]:
                    raise QueueError(f"duplicate job id: {job['id']}") from None
                row["id"] = new_job_id()

    def _enqueue_linked(self, conn, jobs, rows, notes):
        """Insert jobs with unique keys or dependencies, one by one; return the
        rows added."""
        added, states, keys, skipped = [], {}, {}, {}
        for index, (row, job) in enumerate(zip(rows, jobs)):
            key = job["unique_key"]
            if key is not None:
                holder, named = keys.get(key) or (self._key_holder(conn, key), None)
                if holder:
                    notes[index] = (f"job {holder} holds unique key {key!r} already: "
                                    f"nothing added")
                    if job["id"] is not None:
                        # A job of this batch is named as the user knows it: an
                        # id drawn for it is gone if the batch is refused.
                        skipped[job["id"]] = (named or f"job {holder}", key)
                    row["id"] = holder
                    continue
            found = {dep: states.get(dep) or self._state_of(conn, dep,
                                                            self._DEPENDENCY_STATE)
                     for dep in job["after"]}
            unknown = [dep for dep, state in found.items() if state is None]
            if unknown:
                raise NotFound(unknown_dependencies(unknown, index, len(jobs), skipped))
            state, ready, why = readiness(found)
            row["state"], row["last_error"] = state, why
            if ready is not None:
                row["ready"] = ready
            if why:
                notes[index] = f"job {row['id']} is dead already: its {why}"
            self._insert_job(conn, row, job)
            conn.executemany(self._ADD_DEPENDENCY,
                             [(row["id"], dep) for dep in job["after"]])
            states[row["id"]] = row["state"]
            if key is not None and row["state"] == PENDING:
                keys[key] = (row["id"], f"job {job['id']}" if job["id"] is not None
                             else f"the job of line {index + 1}")
            added.append(row)
        return added

    def _key_holder(self, conn, key):
        row = conn.execute(self._KEY_HOLDER, (key,)).fetchone()
        return row[0] if row else None

    def _state_of(self, conn, job_id, statement=None):
        row = conn.execute(statement or self._STATE_OF, (job_id,)).fetchone()
        return row[0] if row else None

    # -- jobs: reading ---------------------------------------------------------------

    _NO_LIMIT = -1           # what LIMIT ? takes to mean none
    _JOB = "SELECT * FROM jobs WHERE id = ?"
    _RUNS = "SELECT * FROM attempts WHERE job_id = ? ORDER BY id"
    _RUN_TOKENS = ("SELECT run_token FROM jobs INDEXED BY jobs_leases "
                   "WHERE state = 'processing'")
    _NEWEST = "SELECT rowid, * FROM jobs ORDER BY rowid DESC LIMIT ?"
    _NEWEST_IN = ("SELECT rowid, * FROM jobs INDEXED BY jobs_state WHERE state = ? "
                  "ORDER BY rowid DESC LIMIT ?")
    _LAST_RUN = ("SELECT * FROM attempts INDEXED BY attempts_job WHERE job_id = ? "
                 "ORDER BY id DESC LIMIT 1")
    _RUN_NUMBER = ("SELECT * FROM attempts INDEXED BY attempts_job WHERE job_id = ? "
                   "AND number = ?")
    _RUN_COUNT = "SELECT count(*) FROM attempts WHERE job_id = ?"
    _HOLDS = f"SELECT 1 FROM jobs WHERE {_HELD}"
    _DEPENDENCIES = ("SELECT deps.after_id, jobs.state FROM deps LEFT JOIN jobs "
                     "ON jobs.id = deps.after_id WHERE deps.job_id = ? "
                     "ORDER BY deps.after_id")

    def get_job(self, job_id):
        """Return the job (with the jobs it runs after, as [{id, state}]) and its
        attempts, each with its output."""
        def body(conn):
            row = conn.execute(self._JOB, (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no such job: {job_id}")
            attempts = conn.execute(self._RUNS, (job_id,)).fetchall()
            job = job_dict(row, self._config(conn))
            job["after"] = [{"id": dep, "state": state} for dep, state in
                            self._dependency_states(conn, job_id)]
            return job, [dict(a) for a in attempts]
        return self._read(body)

    def running_tokens(self):
        """The run tokens of the jobs being processed."""
        return self._read(lambda conn: {row[0] for row in conn.execute(
            self._RUN_TOKENS)})

    def list_jobs(self, state=None, limit=None):
        """Jobs, newest first (in the order they were added), each with
        waiting_for: the ids of the unfinished jobs it waits for, if any."""
        def body(conn):
            limit_ = limit or self._NO_LIMIT
            rows = (conn.execute(self._NEWEST_IN, (state, limit_)) if state else
                    conn.execute(self._NEWEST, (limit_,))).fetchall()
            return self._listed(conn, rows)
        return self._read(body)

    def _listed(self, conn, rows):
        """The job_dict of each jobs row, with waiting_for: the ids of the jobs
        it runs after that have not completed, while it waits for them."""
        config = self._config(conn)
        jobs = []
        for row in rows:
            job = job_dict(row, config)
            job["waiting_for"] = []
            if row["ready"] == -1 and row["state"] == PENDING:     # jobs_blocked
                job["waiting_for"] = [dep for dep, state in
                                      self._dependency_states(conn, row["id"])
                                      if state != COMPLETED]
            jobs.append(job)
        return jobs

    def search_jobs(self, state=None, text=None, before=None, limit=50,
                    scan=SEARCH_SCAN):
        """A page of jobs, newest first: in STATE, whose id or command holds TEXT,
        after the position of cursor BEFORE. A search looks at the newest SCAN of
        those jobs only, for a bounded cost on any database. Return (jobs, the
        cursor of the next page or None, whether the search stopped short).

        A cursor names a position in the listing, not a job, so it stays good
        when the job a page ended on is deleted or purged: "r" and the rowid of
        the job the page ended on (the listing order)."""
        def body(conn):
            where, params = [], []
            table = "jobs"
            if state:
                table += " INDEXED BY jobs_state"
                where.append("state = ?")
                params.append(state)
            if before is not None:
                where.append("rowid < ?")          # a range of the rowid: no scan
                params.append(self._position(before))
            condition = " WHERE " + " AND ".join(where) if where else ""
            newest = f"SELECT rowid, * FROM {table}{condition} ORDER BY rowid DESC"
            short, end = False, None
            if text:
                like = "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%"
                sql = (f"SELECT * FROM ({newest} LIMIT ?) AS newest WHERE id LIKE ? "
                       f"ESCAPE '\\' OR command LIKE ? ESCAPE '\\' "
                       f"ORDER BY 1 DESC LIMIT ?")    # 1: rowid (PostgreSQL: twice)
                params_all = params + [scan, like, like, limit]
                # The window's last row, and whether one lies beyond it: a search
                # that stopped short goes on from the last row it looked at.
                edge = [row[0] for row in conn.execute(
                    f"SELECT rowid FROM {table}{condition} ORDER BY rowid DESC "
                    f"LIMIT 2 OFFSET ?", params + [scan - 1])]
                short = len(edge) == 2
                end = edge[0] if short else None
            else:
                sql, params_all = newest + " LIMIT ?", params + [limit]
            rows = conn.execute(sql, params_all).fetchall()
            if len(rows) == limit:
                end = rows[-1]["rowid"]
            return (self._listed(conn, rows), None if end is None else f"r{end}",
                    short)
        return self._read(body)

    @staticmethod
    def _position(cursor):
        """The rowid a page cursor names, or UsageError."""
        match = re.fullmatch(r"r([1-9][0-9]{0,18})", cursor)
        if match is None or int(match.group(1)) >= 2 ** 63:
            raise UsageError(f"before takes the X-Next-Before of the page before, "
                             f"not a job id: {cursor[:40]!r}")
        return int(match.group(1))

    def job_ends(self, job_ids):
        """{id: (state, last error, outcome of its last run or None)} of those of
        JOB_IDS that exist."""
        def body(conn):
            ends = {}
            for job_id in job_ids:
                row = conn.execute(self._JOB, (job_id,)).fetchone()
                if row is not None:
                    last = conn.execute(self._LAST_RUN, (job_id,)).fetchone()
                    ends[job_id] = (row["state"], row["last_error"],
                                    last["outcome"] if last else None)
            return ends
        return self._read(body)

    def require_jobs(self, job_ids):
        """Refuse, naming every one, ids of jobs that do not exist."""
        self._read(lambda conn: self._require_jobs(conn, job_ids, STATES, "find"))

    def _require_jobs(self, conn, job_ids, allowed, action):
        """Check every id exists and is in an allowed state; raise naming every
        one that is not (in one line)."""
        problems, missing = [], 0
        for job_id in job_ids:
            state = self._state_of(conn, job_id)
            if state is None:
                problems.append(f"no such job: {job_id}")
                missing += 1
            elif state not in allowed:
                problems.append(f"cannot {action} job {job_id}: it is {state}")
        if problems:
            raise (NotFound if missing == len(problems) else Refused)("; ".join(problems))

    def run_of(self, job_id, number=None):
        """(job row, attempt row) of a job's run NUMBER (1, 2, ...), by default its
        last; the attempt is None if it has not run yet."""
        def body(conn):
            job = conn.execute(self._JOB, (job_id,)).fetchone()
            if job is None:
                raise NotFound(f"no such job: {job_id}")
            if number is None:
                run = conn.execute(self._LAST_RUN, (job_id,)).fetchone()
            else:
                run = conn.execute(self._RUN_NUMBER, (job_id, number)).fetchone()
                if run is None:
                    runs = conn.execute(self._RUN_COUNT, (job_id,)).fetchone()[0]
                    raise NotFound(f"job {job_id} has no run {number} (it has run "
                                   f"{runs} time(s))")
            return dict(job), (dict(run) if run else None)
        return self._read(body)

    def not_held(self, claims):
        """Those of CLAIMS ((job id, token) pairs) that no longer hold their job:
        cancelled, or taken over."""
        def body(conn):
            return [(job_id, token) for job_id, token in claims
                    if conn.execute(self._HOLDS, (job_id, token)).fetchone() is None]
        return self._read(body)

    # -- jobs: dependencies ----------------------------------------------------------

    _AFTER_ANY = "SELECT 1 FROM deps INDEXED BY deps_after WHERE after_id = ? LIMIT 1"
    _DEPENDANTS = "SELECT job_id FROM deps INDEXED BY deps_after WHERE after_id = ?"
    _UNFINISHED_DEPENDANTS = (f"SELECT jobs.id FROM deps INDEXED BY deps_after "
                              f"JOIN jobs ON jobs.id = deps.job_id "
                              f"WHERE deps.after_id = ? AND jobs.{_UNFINISHED}")
    _STILL_WAITS = ("SELECT 1 FROM deps LEFT JOIN jobs ON jobs.id = deps.after_id "
                    "WHERE deps.job_id = ? AND coalesce(jobs.state, '') <> "
                    "'completed' LIMIT 1")
    _RELEASE = ("UPDATE jobs SET ready = 0 WHERE id = ? AND state = 'pending' "
                "AND ready = -1")
    _END_DEPENDANT = ("UPDATE jobs SET state = ?, ready = 0, last_error = ?, "
                      "updated_at = ? WHERE id = ? AND state = 'pending' "
                      "AND ready = -1")

    def _dependency_states(self, conn, job_id):
        """[(dependency id, its state)] of a job; DELETED for a dependency deleted
        before it completed."""
        return [(dep, state) if state else (dep.split(" ")[0], DELETED)
                for dep, state in conn.execute(self._DEPENDENCIES, (job_id,))]

    def _dependants(self, conn, job_id):
        """The unfinished jobs that run after JOB_ID."""
        return [row[0] for row in conn.execute(self._UNFINISHED_DEPENDANTS,
                                               (job_id,))]

    def _after_ended(self, conn, job_id, state, stamp, ended=None):
        """JOB_ID has just ended in STATE. If it completed, its dependants that now
        wait for nothing become runnable; if it died or was cancelled, they end
        dead naming it, and theirs in turn (added to ENDED, if a list, as (job
        id, why)). Return how many became runnable."""
        if conn.execute(self._AFTER_ANY, (job_id,)).fetchone() is None:
            return 0                                # the common case: nothing waits
        if state == COMPLETED:
            runnable = 0
            for (dependant,) in conn.execute(self._DEPENDANTS, (job_id,)).fetchall():
                if conn.execute(self._STILL_WAITS, (dependant,)).fetchone() is None:
                    runnable += conn.execute(self._RELEASE, (dependant,)).rowcount
            return runnable
        chain = [(job_id, state)]
        while chain:
            failed, how = chain.pop()
            for (dependant,) in conn.execute(self._DEPENDANTS, (failed,)).fetchall():
                why = dependency_error(failed, how)
                if conn.execute(self._END_DEPENDANT,
                                (DEAD, why, stamp, dependant)).rowcount:
                    chain.append((dependant, DEAD))
                    if ended is not None:
                        ended.append((dependant, why))
        return 0

    # -- jobs: retrying, cancelling, deleting ----------------------------------------

    _DEAD_JOBS = ("SELECT id FROM jobs INDEXED BY jobs_state WHERE state = 'dead' "
                  "ORDER BY rowid")
    _POSITION_AND_KEY = "SELECT rowid, unique_key FROM jobs WHERE id = ?"
    _RETRY = ("UPDATE jobs SET state = 'pending', ready = ?, attempts = 0, "
              "run_at = ?, updated_at = ? WHERE id = ? AND state = 'dead'")
    _CANCEL = (f"UPDATE jobs SET state = 'cancelled', ready = 0, {_NO_CLAIM}, "
               f"updated_at = ? WHERE id = ?")
    _END_RUN = ("UPDATE attempts SET outcome = ?, reason = ?, finished_at = ?, "
                "duration_s = ? WHERE run_token = ? AND outcome = 'running'")
    _RUN_START = "SELECT started_at FROM attempts WHERE run_token = ?"
    _DELETE_RUNS = "DELETE FROM attempts WHERE job_id = ?"
    _DELETE_DEPENDENCIES = "DELETE FROM deps WHERE job_id = ?"
    # Jobs that ran after a completed job need it no more. Those that one that
    # did not complete left dead go on naming it, marked deleted (no id holds a
    # space), so that neither a retry nor a new job of the same id can pass for
    # it having completed.
    _MARK_DELETED = ("UPDATE deps SET after_id = after_id || ? WHERE after_id = ? "
                     "AND (SELECT state FROM jobs WHERE id = ?) <> 'completed'")
    _FORGET_DEPENDANTS = "DELETE FROM deps WHERE after_id = ?"
    _DELETE_JOB = "DELETE FROM jobs WHERE id = ?"
    _ENDED_BEFORE = (f"SELECT id FROM jobs INDEXED BY jobs_finished "
                     f"WHERE {_ENDED} AND state = ? AND updated_at < ? LIMIT ?")
    _TRIM_MINUTES = "DELETE FROM run_minutes WHERE minute < ?"

    def retry_dead(self, job_ids=None, now=None):
        """Put dead jobs back to pending, attempts 0; return (the ids retried,
        {id: why not} of those left dead). Named jobs are retried all or none:
        any that cannot be is refused (Refused, naming each). With JOB_IDS None,
        every dead job that can be is retried, and the rest are returned."""
        def body(conn):
            stamp = iso(self._now(conn, now))
            ids = job_ids
            if ids is None:
                ids = [row[0] for row in conn.execute(self._DEAD_JOBS)]
            else:
                self._require_jobs(conn, ids, {DEAD}, "retry")
            left = self._not_retryable(conn, ids)
            if left and job_ids is not None:
                raise Refused("; ".join(f"cannot retry job {job_id}: {why}"
                                        for job_id, why in left.items()))
            retried = [job_id for job_id in ids if job_id not in left]
            for job_id in retried:          # those that wait for others, wait again
                waits = any(state != COMPLETED for _, state in
                            self._dependency_states(conn, job_id))
                conn.execute(self._RETRY, (-1 if waits else 1, stamp, stamp, job_id))
            if retried:
                self._notify(conn)
            return retried, left
        return self._write(body)

    def _not_retryable(self, conn, ids):
        """{id: why} of the dead jobs IDS that cannot go back to pending together:
        a dependency that was cancelled, deleted unfinished, or is dead and not
        retried with it; or a unique key that an unfinished job (or one of IDS
        that goes back) holds."""
        rows = {job_id: conn.execute(self._POSITION_AND_KEY, (job_id,)).fetchone()
                for job_id in ids}
        chosen, left, keys = set(ids), {}, {}
        # A job is added after its dependencies: in the order they were added,
        # whether each dependency goes back is known before its dependants ask.
        for job_id in sorted(ids, key=lambda job_id: rows[job_id][0]):
            why, key = None, rows[job_id][1]
            for dep, state in self._dependency_states(conn, job_id):
                why = why or retry_problem(dep, state, chosen, left,
                                           lambda dep: self._never_again(conn, dep))
            if why is None and key is not None:
                if key in keys:
                    why = (f"job {keys[key]}, retried with it, has the same unique key "
                           f"{key!r}")
                elif self._key_holder(conn, key):
                    why = (f"job {self._key_holder(conn, key)} holds its unique key "
                           f"{key!r}")
            if why:
                left[job_id] = why
            elif key is not None:
                keys[key] = job_id
        return {job_id: left[job_id] for job_id in ids if job_id in left}

    def _never_again(self, conn, job_id):
        """Why dead job JOB_ID can never run again, or None: a job it runs after,
        or one those run after, was cancelled or deleted before it completed."""
        seen, todo = {job_id}, [job_id]
        while todo:
            for dep, state in self._dependency_states(conn, todo.pop()):
                if state in (CANCELLED, DELETED):
                    return (f"job {dep}, before it, was " +
                            ("cancelled" if state == CANCELLED else "deleted"))
                if state == DEAD and dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return None

    def cancel(self, job_ids, now=None, ended=None):
        """Cancel jobs that have not finished, in one transaction. Return (id,
        state it had, run) for each: run is the (run token, pgid, pgid's start
        ticks) of a running job's run, for the caller to kill, or None. ENDED,
        if a list, is filled with (job id, why) of the jobs that waited for them
        and so ended dead."""
        def body(conn):
            at = self._now(conn, now)
            stamp = iso(at)
            if ended is not None:
                del ended[:]                  # a retried transaction starts afresh
            self._require_jobs(conn, job_ids, UNFINISHED, "cancel")
            done = []
            for job_id in job_ids:
                row = conn.execute(self._JOB, (job_id,)).fetchone()
                conn.execute(self._CANCEL, (stamp, job_id))
                run = None
                if row["state"] == PROCESSING:
                    self._end_run(conn, row["run_token"], CANCELLED, ABORT_CANCELLED,
                                  at)
                    run = (row["run_token"], row["run_pgid"], row["run_pg_start"],
                           row["claim_host"])
                self._after_ended(conn, job_id, CANCELLED, stamp, ended)
                done.append((job_id, row["state"], run))
            self._notify(conn)
            return done
        return self._write(body)

    def _end_run(self, conn, run_token, outcome, reason, at):
        """End a run that was going at AT, its duration since its start."""
        started = conn.execute(self._RUN_START, (run_token,)).fetchone()
        duration = (round(max(0.0, (at - parse_iso(started[0])).total_seconds()), 3)
                    if started else None)
        conn.execute(self._END_RUN, (outcome, reason, iso(at), duration, run_token))

    def delete(self, job_ids):
        """Delete jobs that are not running, with their history; refuse a job
        that unfinished jobs wait for."""
        def body(conn):
            self._require_jobs(conn, job_ids, set(STATES) - {PROCESSING}, "delete")
            waiting = []
            for job_id in job_ids:
                waiting += [f"cannot delete job {job_id}: job {dependant} runs after it"
                            for dependant in self._dependants(conn, job_id)
                            if dependant not in job_ids]
            if waiting:
                raise QueueError("; ".join(waiting))
            for job_id in job_ids:
                self._delete_job(conn, job_id)
        self._write(body)

    def _delete_job(self, conn, job_id):
        conn.execute(self._DELETE_RUNS, (job_id,))
        conn.execute(self._DELETE_DEPENDENCIES, (job_id,))
        conn.execute(self._MARK_DELETED, (DELETED_MARK, job_id, job_id))
        conn.execute(self._FORGET_DEPENDANTS, (job_id,))
        conn.execute(self._DELETE_JOB, (job_id,))

    def purge(self, state, older_than_s=0, now=None, limit=None):
        """Delete finished jobs in STATE that last changed more than OLDER_THAN_S
        ago, with their history and output; at most LIMIT. A transaction a batch
        of PURGE_BATCH, so that workers never wait long. Return how many."""
        total = 0
        while limit is None or total < limit:
            size = PURGE_BATCH if limit is None else min(PURGE_BATCH, limit - total)

            def body(conn):
                cutoff = iso(self._now(conn, now) - timedelta(seconds=older_than_s))
                ids = [row[0] for row in conn.execute(self._ENDED_BEFORE,
                                                      (state, cutoff, size))]
                for job_id in ids:
                    self._delete_job(conn, job_id)
                return len(ids)
            deleted = self._write(body)
            total += deleted
            if deleted < size:
                break
        return total

    def trim_run_minutes(self, now=None):
        """Forget the per-minute run counts older than RUN_MINUTES_KEPT_S."""
        def body(conn):
            cutoff = self._now(conn, now) - timedelta(seconds=RUN_MINUTES_KEPT_S)
            conn.execute(self._TRIM_MINUTES, (iso(cutoff)[:16],))
        self._write(body, durable=False)

    # -- claims ----------------------------------------------------------------------

    _PROMOTE_DUE = (f"UPDATE jobs INDEXED BY jobs_scheduled SET ready = 1 "
                    f"WHERE {_SCHEDULED} AND run_at <= ?")
    _NEXT_RUNNABLE = (f"SELECT * FROM jobs INDEXED BY jobs_ready WHERE {_RUNNABLE} "
                      f"ORDER BY priority DESC, run_at, created_at, rowid LIMIT ?")
    _NO_RETRY_LEFT = ("UPDATE jobs SET state = 'dead', updated_at = ? "
                      "WHERE id = ? AND state = 'failed'")
    _TAKE = ("UPDATE jobs SET state = 'processing', ready = 0, attempts = ?, "
             "claim_token = ?, run_token = ?, worker_pid = ?, worker_start = ?, "
             "claim_host = ?, run_pgid = NULL, run_pg_start = NULL, lease_until = ?, "
             "updated_at = ? WHERE id = ? AND state = ?")
    # attempts.number counts every run of the job (1, 2, ...), while jobs.attempts
    # counts those that use up retries.
    _ADD_RUN = ("INSERT INTO attempts (job_id, number, run_token, worker_pid, "
                "started_at, outcome) SELECT ?, count(*) + 1, ?, ?, ?, 'running' "
                "FROM attempts WHERE job_id = ?")
    _NEXT_DUE = (f"SELECT min(run_at) FROM jobs INDEXED BY jobs_scheduled "
                 f"WHERE {_SCHEDULED}")

    def claim(self, holders, now=None, ended=None):
        """Take the best runnable jobs, one for each holder (pid, start ticks) in
        turn; return (claims, next_due). next_due is when the next waiting job is
        due, or None; it is looked up only if fewer jobs than holders were found.
        ENDED, if a list, is filled with (job id, why) of jobs that it found had
        no retry left (max_retries was lowered) and so ended dead, and of their
        dependants.

        One EXCLUSIVE transaction selects the jobs and moves each to processing
        with a fresh claim token, so no two holders can ever hold the same job.
        It acknowledges nothing, so on SQLite it is not synced: a power cut that
        loses it leaves the jobs as they were, waiting, and their runs (if any
        started) died in it too. On a shared store it is (see Store.shared).
        """
        def body(conn):
            terms = self._claim_terms(conn, now, ended)
            if terms is None:
                return [], None
            stamp, config, lease = terms
            conn.execute(self._PROMOTE_DUE, (stamp,))
            claims = []
            while len(claims) < len(holders):
                rows = conn.execute(self._NEXT_RUNNABLE,
                                    (len(holders) - len(claims),)).fetchall()
                if not rows:
                    break
                for row in rows:
                    if row["state"] == FAILED and no_retry_left(
                            row["attempts"], row["max_retries"], config):
                        self._end_spent(conn, row["id"], stamp, config, ended)
                        continue
                    claim = self._take(conn, row, holders[len(claims)], config,
                                       stamp, lease)
                    if claim is None:
                        return claims, None
                    claims.append(claim)
            next_due = None
            if len(claims) < len(holders):
                next_due = conn.execute(self._NEXT_DUE).fetchone()[0]
            return claims, next_due
        return self._write(body, "EXCLUSIVE", durable=self.shared)

    def _claim_terms(self, conn, now, ended):
        """What a claim reads first, once the lock is its own: (the time stamp,
        the config, the lease's end), or None while the queue is paused."""
        at = self._now(conn, now)
        config = self._config(conn)
        if ended is not None:
            del ended[:]                  # a retried transaction starts afresh
        if self._paused:
            return None
        return iso(at), config, iso(at + timedelta(seconds=config["lease_timeout"]))

    def _end_spent(self, conn, job_id, stamp, config, ended):
        """A job a claim found with no retry left (max_retries was lowered while
        it waited) ends dead, and what runs after it with it."""
        conn.execute(self._NO_RETRY_LEFT, (stamp, job_id))
        if ended is not None:
            ended.append((job_id, f"no retry left (max_retries is now "
                                  f"{config['max_retries']})"))
        self._after_ended(conn, job_id, DEAD, stamp, ended)

    @staticmethod
    def _claim_of(row, token, attempt, config):
        """The Claim of a job ROW taken with TOKEN for its run number ATTEMPT."""
        return Claim(row["id"], row["command"], row["cwd"], token, attempt,
                     effective(row["max_retries"], config["max_retries"]),
                     effective(row["timeout_s"], config["job_timeout"]),
                     config["output_limit"], config["lease_timeout"])

    def _take(self, conn, row, holder, config, stamp, lease):
        """Move one runnable job ROW to processing for HOLDER; its Claim, or None
        if it was not as read."""
        pid, start = holder
        token = new_token()
        attempt = row["attempts"] + 1
        if not self._take_job(conn, (attempt, token, token, pid, start, host_id(),
                                     lease, stamp, row["id"], row["state"]),
                              (row["id"], token, pid, stamp, row["id"])):
            return None
        return self._claim_of(row, token, attempt, config)

    def _take_job(self, conn, take, run):
        """Move a job to processing (_TAKE with TAKE) and add its attempt
        (_ADD_RUN with RUN); False if the job was not as read."""
        if conn.execute(self._TAKE, take).rowcount != 1:
            return False
        conn.execute(self._ADD_RUN, run)
        return True

    _STARTED = f"UPDATE jobs SET run_pgid = ?, run_pg_start = ? WHERE {_HELD}"
    _RUN_STARTED = ("UPDATE attempts SET started_at = ? WHERE run_token = ? "
                    "AND outcome = 'running'")
    _RENEW = f"UPDATE jobs SET lease_until = ? WHERE {_HELD}"

    def record(self, finished=(), started=(), renewed=(), unstarted=(), now=None,
               ended=None):
        """Write what workers reported, in one transaction. FINISHED holds (job id,
        token, RunResult) to end attempts with; STARTED (job id, token, pgid, start
        ticks, time.monotonic() at its start) of commands that started; RENEWED
        (job id, token, lease_s) of leases to extend; UNSTARTED (job id, token) of
        claims given back unrun. Every write is a compare-and-set on the claim
        token. Each event is stamped when it happened (a run's start, and its end
        = start + duration), not when this batch writes it.

        Return (states, lost, runnable): each finished job's new state (None if
        its claim was taken away, and then nothing is written for it; CANCELLED if
        it was cancelled, and then only the run's output is kept), the (job id,
        token) of started or renewed claims no longer held, and how many waiting
        jobs became runnable (their dependencies completed). ENDED, if a list, is
        filled with (job id, why) of the jobs that ended dead because a job they
        ran after died.

        Durable before it returns if anything finished: a recorded result
        survives a power cut. On SQLite, starts and renewals alone are not
        synced; losing one only delays the recovery of a run that the same power
        cut ended. On a shared store they are (see Store.shared).
        """
        def body(conn):
            # The clock is read between these two moments: the middle of them is
            # the best guess of when, by this host's monotonic clock.
            before = time.monotonic()
            at = self._now(conn, now)
            mono = self._clock_moment(before)
            if ended is not None:
                del ended[:]                  # a retried transaction starts afresh
            config = self._config(conn) if finished else None
            states, runnable, ends = [], 0, []
            for job_id, token, result in finished:
                start = end = None
                if result.started_mono is not None and now is None:
                    start = at - timedelta(seconds=max(0.0, mono - result.started_mono))
                    end = min(start + timedelta(seconds=result.duration_s or 0.0), at)
                ends.append(RunEnd(job_id, token, end or at, result, start))
            for end, (state, waited_on) in zip(ends, self._end_attempts(conn, ends,
                                                                        config)):
                if state in (COMPLETED, DEAD) and waited_on:
                    runnable += self._after_ended(conn, end.job_id, state,
                                                  iso(end.at), ended)
                states.append(state)
            lost = []
            for job_id, token, pgid, pg_start, started_mono in started:
                if not conn.execute(self._STARTED,
                                    (pgid, pg_start, job_id, token)).rowcount:
                    lost.append((job_id, token))
                elif started_mono is not None and now is None:
                    since = timedelta(seconds=max(0.0, mono - started_mono))
                    conn.execute(self._RUN_STARTED, (iso(at - since), token))
            for job_id, token, lease_s in renewed:
                lease = iso(at + timedelta(seconds=lease_s))
                if not conn.execute(self._RENEW, (lease, job_id, token)).rowcount:
                    lost.append((job_id, token))
            for job_id, token in unstarted:
                self._give_back(conn, job_id, token, at)
            return states, lost, runnable
        return self._write(body, durable=bool(finished or unstarted) or self.shared)

    _SHARE_OUTPUT = ("UPDATE attempts SET stdout = ?, stdout_dropped = ?, stderr = ?, "
                     "stderr_dropped = ? WHERE run_token = ? AND outcome = 'running'")

    def share_output(self, tails):
        """Store what running jobs have printed so far, for followers on other
        hosts (a shared store): TAILS holds (run token, stdout, bytes of it not
        kept, stderr, bytes of it not kept). Not synced: the next one replaces it."""
        if tails:
            self._write(lambda conn: conn.executemany(
                self._SHARE_OUTPUT, [(out, out_dropped, err, err_dropped, token)
                                     for token, out, out_dropped, err, err_dropped
                                     in tails]), durable=False)

    def finish(self, job_id, token, result, now=None):
        """End an attempt with a RunResult; return the job's new state, or None if
        the claim was taken away meanwhile (then nothing is written)."""
        return self.record(finished=[(job_id, token, result)], now=now)[0][0]

    def renew(self, job_id, token, lease_s, now=None):
        """Extend a claim's lease by LEASE_S; False if the claim was taken away."""
        return not self.record(renewed=[(job_id, token, lease_s)], now=now)[1]

    def fence(self, job_id, token, reason, now=None):
        """End a claimed attempt as failed with REASON (the run's result is lost)."""
        return self.finish(job_id, token, RunResult(exit_code=None, reason=reason), now)

    # waited_on: whether any job runs after it (read here, to save a query a job).
    _HELD_RUN = (f"SELECT attempts, max_retries, run_at, run_token, EXISTS (SELECT 1 "
                 f"FROM deps WHERE after_id = jobs.id) AS waited_on FROM jobs "
                 f"WHERE {_HELD}")
    _KEEP_OUTPUT = ("UPDATE attempts SET exit_code = ?, stdout = ?, stderr = ?, "
                    "stdout_dropped = ?, stderr_dropped = ? WHERE run_token = ? AND "
                    "outcome = 'cancelled'")
    _END_JOB_RUN = (f"UPDATE jobs SET state = ?, ready = 0, run_at = ?, "
                    f"last_error = ?, {_NO_CLAIM}, updated_at = ? "
                    f"WHERE id = ? AND claim_token = ?")
    _RUN_ENDED = ("UPDATE attempts SET outcome = ?, started_at = coalesce(?, "
                  "started_at), finished_at = ?, exit_code = ?, reason = ?, "
                  "duration_s = ?, stdout = ?, stderr = ?, stdout_dropped = ?, "
                  "stderr_dropped = ? WHERE run_token = ?")

    def _end_attempts(self, conn, ends, config):
        """End the attempts of ENDS (RunEnd); return (state, waited_on) of each,
        as _end_attempt does."""
        return [self._end_attempt(conn, end.job_id, end.token, end.at, end.result,
                                  config, end.started) for end in ends]

    def _end_attempt(self, conn, job_id, token, ended, result, config, started=None):
        """End the attempt of a claim with RESULT at ENDED (when the run ended);
        STARTED, if known, is when its command started. Return the job's state,
        and whether any job runs after it (None if not known)."""
        row = conn.execute(self._HELD_RUN, (job_id, token)).fetchone()
        if row is None:
            # Fenced: someone else owns this job now, or it was cancelled, and then
            # what the run printed until it was killed is kept with it.
            kept = conn.execute(self._KEEP_OUTPUT, (
                result.exit_code, result.stdout, result.stderr, result.stdout_dropped,
                result.stderr_dropped, token)).rowcount
            return (CANCELLED if kept else None), None
        state, run_at = after_run(result.ok, row["attempts"], row["max_retries"],
                                  config, ended)
        stamp = iso(ended)
        started_at = iso(started) if started else None
        duration = result.duration_s
        if duration is None:          # a lost run: it ran from its start until now
            since = started_at or conn.execute(
                self._RUN_START, (row["run_token"],)).fetchone()[0]
            duration = max(0.0, (ended - parse_iso(since)).total_seconds())
        self._end_job_run(conn, (
            state, iso(run_at) if run_at else row["run_at"], result.reason,
            stamp, job_id, token), (
            COMPLETED if result.ok else FAILED, started_at, stamp,
            result.exit_code, result.reason, round(duration, 3), result.stdout,
            result.stderr, result.stdout_dropped, result.stderr_dropped,
            row["run_token"]))
        return state, bool(row["waited_on"])

    def _end_job_run(self, conn, job, run):
        """End a held job's claim (_END_JOB_RUN with JOB) and its run's attempt
        (_RUN_ENDED with RUN)."""
        conn.execute(self._END_JOB_RUN, job)
        conn.execute(self._RUN_ENDED, run)

    _GIVE_BACK = (f"UPDATE jobs SET state = 'pending', ready = 0, attempts = "
                  f"CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, {_NO_CLAIM}, "
                  f"updated_at = ? WHERE id = ?")
    _FORGET_RUN = "DELETE FROM attempts WHERE run_token = ?"
    # Runnable again from now, so status does not count the run as waiting.
    _REQUEUE = (f"UPDATE jobs SET state = 'pending', ready = 1, attempts = "
                f"CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, run_at = ?, "
                f"{_NO_CLAIM}, updated_at = ? WHERE id = ?")
    _TAKE_OVER = (f"UPDATE jobs SET claim_token = ?, worker_pid = ?, "
                  f"worker_start = ?, lease_until = ? WHERE {_HELD}")
    _OLD_HOST = "SELECT claim_host FROM jobs WHERE id = ?"
    _TAKE_OVER_EXPIRED = _TAKE_OVER + " AND lease_until < ?"
    _RUN_OF_CLAIM = ("SELECT run_token, run_pgid, run_pg_start, claim_host FROM jobs "
                     "WHERE id = ?")
    _EXPIRED = ("SELECT id, claim_token, worker_pid, worker_start, claim_host "
                "FROM jobs INDEXED BY jobs_leases WHERE state = 'processing' "
                "AND lease_until < ?")

    def give_back(self, job_id, token, now=None):
        """Undo a claim whose command never started, as if it had not been made;
        return False if the claim is no longer held."""
        return self._write(lambda conn: self._give_back(conn, job_id, token,
                                                        self._now(conn, now)))

    def _give_back(self, conn, job_id, token, at):
        row = conn.execute(self._HELD_RUN, (job_id, token)).fetchone()
        if row is None:
            return False
        conn.execute(self._GIVE_BACK, (iso(at), job_id))
        conn.execute(self._FORGET_RUN, (row["run_token"],))
        return True

    def requeue(self, job_id, token, reason, now=None):
        """Give a claimed job back as pending without using up an attempt."""
        def body(conn):
            at = self._now(conn, now)
            row = conn.execute(self._HELD_RUN, (job_id, token)).fetchone()
            if row is None:
                return False
            conn.execute(self._REQUEUE, (iso(at), iso(at), job_id))
            self._end_run(conn, row["run_token"], INTERRUPTED, reason, at)
            return True
        return self._write(body)

    def take_over(self, job_id, token, new_token, worker_pid, worker_start=None,
                  only_expired=False, now=None):
        """Move a claim to NEW_TOKEN (held by WORKER_PID) if TOKEN still holds it
        (and, with ONLY_EXPIRED, its lease has run out). Return the run to end, as
        (run_token, run_pgid, run_pg_start, the host that ran it), or None if it
        did not. The run's host stays named: only that host may touch its
        processes."""
        def body(conn):
            at = self._now(conn, now)
            lease = iso(at + timedelta(seconds=self._config(conn)["lease_timeout"]))
            params = [new_token, worker_pid, worker_start, lease, job_id, token]
            if only_expired:
                taken = conn.execute(self._TAKE_OVER_EXPIRED, params + [iso(at)])
            else:
                taken = conn.execute(self._TAKE_OVER, params)
            if taken.rowcount != 1:
                return None
            return tuple(conn.execute(self._RUN_OF_CLAIM, (job_id,)).fetchone())
        return self._write(body)

    def expired_claims(self, now=None):
        """Return (job id, token, holder pid, holder start, holder's host) of
        claims whose lease has run out."""
        return self._read(lambda conn: [tuple(row) for row in conn.execute(
            self._EXPIRED, (iso(self._now(conn, now)),))])

    # -- reports ---------------------------------------------------------------------

    _COUNTS = "SELECT state, jobs FROM counts"
    _HOLDERS = ("SELECT id, worker_pid, claim_host, command, lease_until FROM jobs "
                "INDEXED BY jobs_leases WHERE state = 'processing' ORDER BY updated_at")
    _BLOCKED = ("SELECT count(*) FROM jobs INDEXED BY jobs_blocked "
                "WHERE state = 'pending' AND ready = -1")
    _OLDEST_SCHEDULED = (f"SELECT min(run_at) FROM jobs INDEXED BY jobs_scheduled "
                         f"WHERE {_SCHEDULED} AND run_at <= ?")
    _FIRST_READY = (f"SELECT priority, run_at FROM jobs INDEXED BY jobs_ready "
                    f"WHERE {_RUNNABLE} ORDER BY priority DESC, run_at LIMIT 1")
    _FIRST_READY_BELOW = (f"SELECT priority, run_at FROM jobs INDEXED BY jobs_ready "
                          f"WHERE {_RUNNABLE} AND priority < ? "
                          f"ORDER BY priority DESC, run_at LIMIT 1")
    _OLDEST_READY = (f"SELECT min(run_at) FROM jobs INDEXED BY jobs_ready "
                     f"WHERE {_RUNNABLE}")
    _WAITING_SINCE = (f"SELECT id, command, run_at FROM jobs WHERE run_at = ? AND "
                      f"{_WAITING} AND ready >= 0 ORDER BY rowid LIMIT 1")
    _MINUTES = "SELECT minute, outcome, runs FROM run_minutes WHERE minute >= ?"
    _TOTALS = ("SELECT outcome, bucket, runs, seconds FROM run_totals "
               "ORDER BY outcome, bucket")
    _RUNS_BY_OUTCOME = "SELECT outcome, sum(runs) FROM run_totals GROUP BY outcome"
    _COMPLETED_SINCE = ("SELECT count(*) FROM attempts INDEXED BY attempts_finished "
                        "WHERE outcome = 'completed' AND finished_at >= ?")
    _RECENT_DURATIONS = ("SELECT duration_s FROM attempts INDEXED BY "
                         "attempts_finished WHERE outcome = 'completed' "
                         "ORDER BY finished_at DESC LIMIT ?")
    _COMPLETED_MINUTES = ("SELECT coalesce(sum(runs), 0) FROM run_minutes "
                          "WHERE minute >= ? AND outcome = 'completed'")

    def _counts(self, conn):
        counts = dict.fromkeys(STATES, 0)
        for state, jobs in conn.execute(self._COUNTS):
            counts[state] = jobs
        return counts

    def status(self, now=None):
        """(jobs per state, the earliest run_at of a runnable job, {(holder's
        host, holder pid): the job it holds}) for status."""
        def body(conn):
            counts = self._counts(conn)
            holders = {}
            for row in conn.execute(self._HOLDERS):
                # A worker may hold a second claim, for the job it starts next.
                holders.setdefault((row["claim_host"], row["worker_pid"]), dict(row))
            stamp = iso(self._now(conn, now))
            return counts, self._oldest_runnable(conn, stamp), holders
        return self._read(body)

    def waiting_for_dependencies(self):
        """How many pending jobs wait for jobs they run after (ready = -1)."""
        return self._read(lambda conn: conn.execute(self._BLOCKED).fetchone()[0])

    def _oldest_runnable(self, conn, stamp):
        """The earliest run_at of the jobs that could run now (at STAMP).

        The claim indexes hold them, ready jobs ordered by priority first: so the
        oldest is the oldest of the first entry of each priority, one lookup per
        priority (a scan only if there are very many priorities).
        """
        oldest = conn.execute(self._OLDEST_SCHEDULED, (stamp,)).fetchone()[0]
        row = conn.execute(self._FIRST_READY).fetchone()
        for _ in range(64):
            if row is None:
                return oldest
            oldest = min(oldest or row[1], row[1])
            row = conn.execute(self._FIRST_READY_BELOW, (row[0],)).fetchone()
        first = conn.execute(self._OLDEST_READY).fetchone()[0]
        return min(oldest or first, first)

    def oldest_waiting(self, now=None):
        """The runnable job that has waited longest past its run_at, as a dict of
        id, command and run_at, or None."""
        def body(conn):
            run_at = self._oldest_runnable(conn, iso(self._now(conn, now)))
            if run_at is None:
                return None
            row = conn.execute(self._WAITING_SINCE, (run_at,)).fetchone()
            return dict(row) if row else None
        return self._read(body)

    def run_minutes(self, since):
        """{minute: {outcome: runs}} of runs that ended from the minute of SINCE on."""
        def body(conn):
            minutes = {}
            for minute, outcome, runs in conn.execute(self._MINUTES,
                                                      (iso(since)[:16],)):
                minutes.setdefault(minute, {})[outcome] = runs
            return minutes
        return self._read(body)

    def run_totals(self):
        """{outcome: [(bucket, runs, seconds)]}: every ended run, for /metrics."""
        def body(conn):
            totals = {}
            for outcome, bucket, runs, seconds in conn.execute(self._TOTALS):
                totals.setdefault(outcome, []).append((bucket, runs, seconds))
            return totals
        return self._read(body)

    def stats(self, now=None):
        """Counts, run totals, and run times of the last STATS_RUNS completed runs."""
        def body(conn):
            at = self._now(conn, now)
            counts = self._counts(conn)
            runs = dict(conn.execute(self._RUNS_BY_OUTCOME).fetchall())
            recent = sorted(row[0] for row in conn.execute(self._RECENT_DURATIONS,
                                                           (STATS_RUNS,)))
            ended = counts[COMPLETED] + counts[DEAD]
            minute_ago = iso(at - timedelta(seconds=60))
            hour_ago = iso(at - timedelta(minutes=59))[:16]
            return {
                "jobs": counts,
                "completed": counts[COMPLETED],
                "failed_attempts": runs.get(FAILED, 0),
                "dead": counts[DEAD],
                "success_rate": counts[COMPLETED] / ended if ended else None,
                "run_time_avg_s": sum(recent) / len(recent) if recent else None,
                "run_time_p50_s": percentile(recent, 0.50),
                "run_time_p95_s": percentile(recent, 0.95),
                "completed_last_minute": conn.execute(
                    self._COMPLETED_SINCE, (minute_ago,)).fetchone()[0],
                # By the minute, as the dashboard counts: purged jobs too.
                "completed_last_hour": int(conn.execute(
                    self._COMPLETED_MINUTES, (hour_ago,)).fetchone()[0]),
            }
        return self._read(body)

    # -- a whole queue, copied to another store (copy --to) -----------------------------

    _JOB_TABLE = ("id", "command", "cwd", "state", "ready", "priority", "attempts",
                  "max_retries", "timeout_s", "run_at", "created_at", "updated_at",
                  "last_error", "unique_key", "claim_token", "run_token", "worker_pid",
                  "worker_start", "claim_host", "run_pgid", "run_pg_start",
                  "lease_until")
    _RUN_TABLE = ("job_id", "number", "run_token", "worker_pid", "started_at",
                  "finished_at", "outcome", "exit_code", "reason", "duration_s",
                  "stdout", "stderr", "stdout_dropped", "stderr_dropped")
    _EVERY_JOB = f"SELECT {', '.join(_JOB_TABLE)} FROM jobs ORDER BY rowid"
    _EVERY_RUN = f"SELECT {', '.join(_RUN_TABLE)} FROM attempts ORDER BY id"
    _EVERY_DEPENDENCY = "SELECT job_id, after_id FROM deps ORDER BY job_id, after_id"
    _COPY_JOB = (f"INSERT INTO jobs ({', '.join(_JOB_TABLE)}) VALUES "
                 f"({', '.join('?' * len(_JOB_TABLE))})")
    _COPY_RUN = (f"INSERT INTO attempts ({', '.join(_RUN_TABLE)}) VALUES "
                 f"({', '.join('?' * len(_RUN_TABLE))})")
    _ADD_RUN_TOTAL = ("INSERT INTO run_totals (outcome, bucket, runs, seconds) "
                      "VALUES (?, ?, ?, ?) ON CONFLICT (outcome, bucket) DO UPDATE "
                      "SET runs = runs + excluded.runs, "
                      "seconds = seconds + excluded.seconds")
    _ADD_RUN_MINUTE = ("INSERT INTO run_minutes (minute, outcome, runs) VALUES "
                       "(?, ?, ?) ON CONFLICT (minute, outcome) DO UPDATE "
                       "SET runs = runs + excluded.runs")

    def export(self):
        """Everything of the queue, read in one transaction, to copy into another
        store (import_queue): jobs, runs, dependencies, settings, run counts.
        Refused while a job is processing: its run would go on in this queue."""
        def body(conn):
            jobs = [tuple(row) for row in conn.execute(self._EVERY_JOB)]
            running = [job[0] for job in jobs if job[3] == PROCESSING]
            if running:
                raise Refused(f"{len(running)} job(s) are processing ({', '.join(running[:5])}"
                              f"{', ...' if len(running) > 5 else ''}): stop the "
                              f"workers first (worker stop), then copy")
            return {"jobs": jobs,
                    "runs": [tuple(row) for row in conn.execute(self._EVERY_RUN)],
                    "deps": [tuple(row) for row in conn.execute(self._EVERY_DEPENDENCY)],
                    "config": [tuple(row) for row in conn.execute(self._CONFIG)],
                    "totals": [tuple(row) for row in conn.execute(self._TOTALS)],
                    "minutes": [tuple(row) for row in conn.execute(self._MINUTES, ("",))]}
        return self._read(body)

    def import_queue(self, data):
        """Add a queue that export() read, in one transaction; refuse (naming them)
        jobs whose ids this queue has already. Its settings replace these."""
        def body(conn):
            clash = [job[0] for job in data["jobs"] if self._state_of(conn, job[0])]
            if clash:
                raise Refused(f"the destination has {len(clash)} job(s) of the same "
                              f"id already ({', '.join(clash[:5])}"
                              f"{', ...' if len(clash) > 5 else ''}): nothing copied")
            conn.executemany(self._COPY_JOB, data["jobs"])
            conn.executemany(self._COPY_RUN, data["runs"])
            conn.executemany(self._ADD_DEPENDENCY, data["deps"])
            for key, value in data["config"]:
                conn.execute(self._SET_CONFIG, (key, value))
            states = collections.Counter(job[3] for job in data["jobs"])
            for state, count in states.items():
                conn.execute(self._COUNT_ADDED, (count, state))
            conn.executemany(self._ADD_RUN_TOTAL, data["totals"])
            conn.executemany(self._ADD_RUN_MINUTE, data["minutes"])
            self._notify(conn)
        self._config_version = None
        self._write(body)

    # -- supervisors -----------------------------------------------------------------

    _SUPERVISORS = "SELECT * FROM supervisors ORDER BY started_at"
    _FORGET_SUPERVISOR = "DELETE FROM supervisors WHERE id = ?"
    _ADD_SUPERVISOR = ("INSERT INTO supervisors (id, host, boot_id, pid, pid_start, "
                       "workers, state, started_at, seen_at) VALUES (:id, :host, "
                       ":boot_id, :pid, :pid_start, :workers, :state, :started_at, "
                       ":seen_at)")
    _UPDATE_SUPERVISOR = ("UPDATE supervisors SET workers = ?, state = ?, "
                          "seen_at = ? WHERE id = ?")

    _STOP_ASKED = "SELECT stop FROM supervisors WHERE id = ?"
    _ASK_STOP = "UPDATE supervisors SET stop = ? WHERE id = ? AND stop < ?"
    _ANY_RUNNABLE = f"SELECT 1 FROM jobs INDEXED BY jobs_ready WHERE {_RUNNABLE} LIMIT 1"
    _ANY_DUE = (f"SELECT 1 FROM jobs INDEXED BY jobs_scheduled WHERE {_SCHEDULED} "
                f"AND run_at <= ? LIMIT 1")

    def register_supervisor(self, record, judge):
        """Record a supervisor (a dict of the supervisors table's columns). For
        each one recorded already, JUDGE(row, with "lost") says: "refuse" (it is
        alive on this host: refuse, naming its pid), "forget" (it is gone: drop
        its row) or "keep" (another host's, still answering). One transaction, so
        two supervisors starting at once cannot both be recorded."""
        def body(conn):
            for row in self._supervisor_rows(conn):
                verdict = judge(row)
                if verdict == "refuse":
                    raise QueueError(f"workers are already running on this database "
                                     f"(supervisor pid {row['pid']})")
                if verdict == "forget":
                    conn.execute(self._FORGET_SUPERVISOR, (row["id"],))
            conn.execute(self._ADD_SUPERVISOR, record)
        self._write(body)

    def _supervisor_rows(self, conn):
        """The supervisors rows (dicts), each with lost: on a shared store, True
        if it has not been seen for HOST_LOST_AFTER_S or its lease_timeout,
        whichever is longer (a local one is judged by its pid instead)."""
        rows = [dict(row) for row in conn.execute(self._SUPERVISORS)]
        if rows and self.shared:
            silence = max(HOST_LOST_AFTER_S, self._config(conn)["lease_timeout"])
            since = iso(self._now(conn) - timedelta(seconds=silence))
            for row in rows:
                row["lost"] = row["seen_at"] < since
        for row in rows:
            row.setdefault("lost", False)
        return rows

    def tick(self, record, held, now=None):
        """A supervisor of a shared store, once a tick (IDLE_RECHECK_S), in one
        short transaction: say it is alive (RECORD: its row; written again if
        another host forgot it as lost), and learn what it must act on. HELD:
        the (job id, token) of the claims its workers hold. Return a Tick."""
        def body(conn):
            stamp = iso(self._now(conn, now))
            seen = conn.execute(self._UPDATE_SUPERVISOR, (
                record["workers"], record["state"], stamp, record["id"])).rowcount
            if not seen:
                conn.execute(self._ADD_SUPERVISOR, dict(record, seen_at=stamp))
            stop = conn.execute(self._STOP_ASKED, (record["id"],)).fetchone()[0]
            gone = [(job_id, token) for job_id, token in held
                    if conn.execute(self._HOLDS, (job_id, token)).fetchone() is None]
            self._config(conn)
            expired = [tuple(row) for row in conn.execute(self._EXPIRED, (stamp,))]
            work = self._paused is None and bool(
                conn.execute(self._ANY_RUNNABLE).fetchone() or
                conn.execute(self._ANY_DUE, (stamp,)).fetchone())
            return Tick(stop, gone, expired, self._paused, work, not seen)
        return self._write(body, durable=False)

    def ask_stop(self, host, level):
        """Ask the supervisors on HOST (a host name; None: every host) to stop
        (LEVEL WARM or COLD) at their next tick. Return their rows."""
        def body(conn):
            rows = [row for row in self._supervisor_rows(conn)
                    if host is None or row["host"] == host]
            for row in rows:
                conn.execute(self._ASK_STOP, (level, row["id"], level))
            return rows
        return self._write(body)

    def update_supervisor(self, supervisor_id, workers, state, now=None):
        self._write(lambda conn: conn.execute(self._UPDATE_SUPERVISOR, (
            " ".join(map(str, workers)), state, iso(self._now(conn, now)),
            supervisor_id)))

    def remove_supervisor(self, supervisor_id):
        self._write(lambda conn: conn.execute(self._FORGET_SUPERVISOR,
                                              (supervisor_id,)))

    def supervisors(self):
        """The recorded supervisors (dicts, each with lost: see _supervisor_rows),
        live or not."""
        return self._read(self._supervisor_rows)


# -- the SQLite store --------------------------------------------------------------

SQLITE_HEADER = b"SQLite format 3\x00"
APPLICATION_ID = 0x51435444  # "QCTD": marks a SQLite file as a queuectl database

# SQLite's own busy handler sleeps up to 100 ms between tries, so under heavy load a
# waiting writer can starve for seconds. So SQLite waits only briefly, and _run
# retries the transaction after a short random pause, up to BUSY_DEADLINE_S.
BUSY_TIMEOUT_S = 0.02
BUSY_RETRY_MAX_S = 0.005
BUSY_DEADLINE_S = 60.0

# Upper bounds (seconds) of the run-time histogram's buckets; the last bucket
# holds everything longer. Schema version 2 bakes them into a trigger: never edit
# them, add a migration instead.
RUN_TIME_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5,
                    10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000,
                    50000, 100000)


def _run_bucket_sql(seconds):
    """SQL for the RUN_TIME_BUCKETS index of a run that took SECONDS (a column)."""
    return "CASE " + " ".join(
        f"WHEN coalesce({seconds}, 0) <= {bound} THEN {n}"
        for n, bound in enumerate(RUN_TIME_BUCKETS)) + f" ELSE {len(RUN_TIME_BUCKETS)} END"


def _sqlite_message(error, path):
    """Turn a sqlite3 error into one line a user can act on."""
    text = str(error)
    lowered = text.lower()
    if "readonly" in lowered or "read-only" in lowered:
        return f"database is read-only: {path}"
    if "disk is full" in lowered or "database or disk is full" in lowered:
        return f"database or disk is full: {path}"
    if "not a database" in lowered or "malformed" in lowered:
        return f"not a queuectl database, or corrupt: {path}"
    if "unable to open" in lowered or "disk i/o" in lowered:
        # SQLite names neither a full nor a read-only disk when it fails to make
        # or grow its -shm and -wal files, even to read: ask the file system.
        folder = os.path.dirname(path)
        disk = _disk_state(folder)
        if disk == "full":
            return f"the disk is full (no space left in {folder}): {path}"
        if disk == "read-only":
            return f"database is read-only (its file system is): {path}"
        if "unable to open" in lowered:
            if not os.access(folder, os.W_OK):
                # WAL needs its -wal and -shm files beside the database.
                return f"database is read-only (cannot write in {folder}): {path}"
            return f"cannot open database: {path}"
        return f"disk I/O error on database: {path}"
    if "locked" in lowered or "busy" in lowered:
        return f"database is busy (still locked after {BUSY_DEADLINE_S:.0f}s): {path}"
    return f"database error ({text}): {path}"


def _disk_state(folder):
    """"full" or "read-only" if the file system holding FOLDER is, else None."""
    try:
        info = os.statvfs(folder)
    except OSError:
        return None
    if info.f_flag & os.ST_RDONLY:
        return "read-only"
    if info.f_bavail == 0:
        return "full"
    # A failing disk turned read-only by the kernel shows it only when written.
    probe = os.path.join(folder, f".queuectl-probe-{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        return {errno.EROFS: "read-only", errno.ENOSPC: "full"}.get(e.errno)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def _is_busy(error):
    return isinstance(error, sqlite3.OperationalError) and (
        "locked" in str(error) or "busy" in str(error))


# MIGRATIONS[n] takes a database from schema version n to n + 1 (version 0 is a new,
# empty file). Each runs in one transaction with the version bump; append, never edit.
MIGRATIONS = (
    (
        """CREATE TABLE jobs (
            id           TEXT PRIMARY KEY,
            command      TEXT NOT NULL CHECK (command <> ''),
            cwd          TEXT NOT NULL,
            state        TEXT NOT NULL CHECK (state IN ('pending', 'processing',
                                              'completed', 'failed', 'dead')),
            priority     INTEGER NOT NULL DEFAULT 0,
            attempts     INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            max_retries  INTEGER CHECK (max_retries >= 0),   -- NULL: follow config
            timeout_s    REAL CHECK (timeout_s > 0),         -- NULL: follow config
            run_at       TEXT NOT NULL,      -- not before; for a failed job, its retry
            created_at   TEXT NOT NULL,
            updated_at   TEXT NOT NULL,
            last_error   TEXT,
            -- Set while processing. claim_token is who owns the claim now (a
            -- recoverer takes it over); run_token names the run itself: it marks the
            -- run's processes and its attempts row, and never changes.
            claim_token  TEXT,
            run_token    TEXT,
            worker_pid   INTEGER,
            worker_start INTEGER,            -- the holder's start time (/proc ticks)
            run_pgid     INTEGER,            -- the command's process group, once started
            run_pg_start INTEGER,            -- its leader's start time (/proc ticks)
            lease_until  TEXT                -- a claim not renewed by then is lost
        )""",
        # The claim order, and when the next job is due; queries name these indexes
        # with INDEXED BY (and literal states, so they match the partial WHERE).
        """CREATE INDEX jobs_runnable ON jobs (priority DESC, run_at, created_at)
           WHERE state IN ('pending', 'failed')""",
        """CREATE INDEX jobs_due ON jobs (run_at)
           WHERE state IN ('pending', 'failed')""",
        "CREATE INDEX jobs_leases ON jobs (lease_until) WHERE state = 'processing'",
        "CREATE INDEX jobs_state_created ON jobs (state, created_at)",
        "CREATE INDEX jobs_created ON jobs (created_at)",
        """CREATE TABLE attempts (
            id             INTEGER PRIMARY KEY,
            job_id         TEXT NOT NULL,
            number         INTEGER NOT NULL,
            run_token      TEXT NOT NULL UNIQUE,
            worker_pid     INTEGER NOT NULL,
            started_at     TEXT NOT NULL,
            finished_at    TEXT,
            outcome        TEXT NOT NULL CHECK (outcome IN ('running', 'completed',
                                                'failed', 'interrupted')),
            exit_code      INTEGER,
            reason         TEXT,
            duration_s     REAL,
            stdout         TEXT,
            stderr         TEXT,
            stdout_dropped INTEGER NOT NULL DEFAULT 0,
            stderr_dropped INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX attempts_job ON attempts (job_id, id)",
        "CREATE INDEX attempts_finished ON attempts (outcome, finished_at)",
        "CREATE INDEX attempts_duration ON attempts (outcome, duration_s)",
        "CREATE TABLE config (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    (
        # Version 2 (queuectl 1.1) rebuilds both tables: their CHECKs learn the
        # state and outcome `cancelled`, and jobs gain `ready` and `unique_key`.
        """CREATE TABLE jobs_v2 (
            id           TEXT PRIMARY KEY,
            command      TEXT NOT NULL CHECK (command <> ''),
            cwd          TEXT NOT NULL,
            state        TEXT NOT NULL CHECK (state IN ('pending', 'processing',
                                              'completed', 'failed', 'dead',
                                              'cancelled')),
            -- Of a pending or failed job: 1 due, claimable from jobs_ready; 0 maybe
            -- not due yet (always safe to write: the claim promotes the due ones);
            -- -1 waiting for its dependencies (deps).
            ready        INTEGER NOT NULL DEFAULT 0,
            priority     INTEGER NOT NULL DEFAULT 0,
            attempts     INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            max_retries  INTEGER CHECK (max_retries >= 0),   -- NULL: follow config
            timeout_s    REAL CHECK (timeout_s > 0),         -- NULL: follow config
            run_at       TEXT NOT NULL,      -- not before; for a failed job, its retry
            created_at   TEXT NOT NULL,
            updated_at   TEXT NOT NULL,
            last_error   TEXT,
            unique_key   TEXT,               -- held while pending, processing or failed
            claim_token  TEXT,
            run_token    TEXT,
            worker_pid   INTEGER,
            worker_start INTEGER,
            run_pgid     INTEGER,
            run_pg_start INTEGER,
            lease_until  TEXT
        )""",
        """INSERT INTO jobs_v2 (rowid, id, command, cwd, state, priority, attempts,
               max_retries, timeout_s, run_at, created_at, updated_at, last_error,
               claim_token, run_token, worker_pid, worker_start, run_pgid,
               run_pg_start, lease_until)
           SELECT rowid, id, command, cwd, state, priority, attempts, max_retries,
               timeout_s, run_at, created_at, updated_at, last_error, claim_token,
               run_token, worker_pid, worker_start, run_pgid, run_pg_start,
               lease_until FROM jobs""",
        "DROP TABLE jobs",
        "ALTER TABLE jobs_v2 RENAME TO jobs",
        # The claim order, over due jobs only: jobs waiting for a later run_at,
        # however many and whatever their priority, cost a claim nothing.
        """CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, created_at)
           WHERE state IN ('pending', 'failed') AND ready = 1""",
        """CREATE INDEX jobs_scheduled ON jobs (run_at)
           WHERE state IN ('pending', 'failed') AND ready = 0""",
        "CREATE INDEX jobs_leases ON jobs (lease_until) WHERE state = 'processing'",
        # Listing is newest first by rowid, which needs no index of its own.
        "CREATE INDEX jobs_state ON jobs (state)",
        """CREATE INDEX jobs_finished ON jobs (state, updated_at)
           WHERE state IN ('completed', 'dead', 'cancelled')""",
        """CREATE UNIQUE INDEX jobs_unique ON jobs (unique_key)
           WHERE unique_key IS NOT NULL AND state IN ('pending', 'processing',
                                                      'failed')""",
        """CREATE TABLE attempts_v2 (
            id             INTEGER PRIMARY KEY,
            job_id         TEXT NOT NULL,
            number         INTEGER NOT NULL,
            run_token      TEXT NOT NULL UNIQUE,
            worker_pid     INTEGER NOT NULL,
            started_at     TEXT NOT NULL,
            finished_at    TEXT,
            outcome        TEXT NOT NULL CHECK (outcome IN ('running', 'completed',
                                                'failed', 'interrupted', 'cancelled')),
            exit_code      INTEGER,
            reason         TEXT,
            duration_s     REAL,
            stdout         TEXT,
            stderr         TEXT,
            stdout_dropped INTEGER NOT NULL DEFAULT 0,
            stderr_dropped INTEGER NOT NULL DEFAULT 0
        )""",
        "INSERT INTO attempts_v2 SELECT * FROM attempts",
        "DROP TABLE attempts",
        "ALTER TABLE attempts_v2 RENAME TO attempts",
        "CREATE INDEX attempts_job ON attempts (job_id, id)",
        "CREATE INDEX attempts_finished ON attempts (outcome, finished_at)",
        # A job runs only once every job in its `after` list has completed.
        """CREATE TABLE deps (
            job_id    TEXT NOT NULL,
            after_id  TEXT NOT NULL,
            PRIMARY KEY (job_id, after_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX deps_after ON deps (after_id)",
        # Jobs per state, kept by triggers, so status costs the same on a million
        # jobs as on ten. Inserts are counted by Store.enqueue, once per batch.
        """CREATE TABLE counts (state TEXT PRIMARY KEY, jobs INTEGER NOT NULL)
           WITHOUT ROWID""",
        """INSERT INTO counts (state, jobs) VALUES ('pending', 0), ('processing', 0),
           ('completed', 0), ('failed', 0), ('dead', 0), ('cancelled', 0)""",
        """UPDATE counts SET jobs = (SELECT count(*) FROM jobs
                                     WHERE jobs.state = counts.state)""",
        """CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
           WHEN NEW.state <> OLD.state BEGIN
               UPDATE counts SET jobs = jobs - 1 WHERE state = OLD.state;
               UPDATE counts SET jobs = jobs + 1 WHERE state = NEW.state;
           END""",
        """CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs BEGIN
               UPDATE counts SET jobs = jobs - 1 WHERE state = OLD.state;
           END""",
        # Every ended run, by outcome and run-time bucket (RUN_TIME_BUCKETS), and
        # by outcome and minute: for stats, the dashboard and /metrics. Counted
        # once, when the run ends; never uncounted (run_minutes is trimmed).
        """CREATE TABLE run_totals (
            outcome  TEXT NOT NULL,
            bucket   INTEGER NOT NULL,
            runs     INTEGER NOT NULL,
            seconds  REAL NOT NULL,
            PRIMARY KEY (outcome, bucket)
        ) WITHOUT ROWID""",
        f"""INSERT INTO run_totals (outcome, bucket, runs, seconds)
            SELECT outcome, {_run_bucket_sql("duration_s")}, count(*), total(duration_s)
            FROM attempts WHERE outcome <> 'running' GROUP BY 1, 2""",
        """CREATE TABLE run_minutes (
            minute   TEXT NOT NULL,        -- 2026-11-24T10:30
            outcome  TEXT NOT NULL,
            runs     INTEGER NOT NULL,
            PRIMARY KEY (minute, outcome)
        ) WITHOUT ROWID""",
        """INSERT INTO run_minutes (minute, outcome, runs)
           SELECT substr(finished_at, 1, 16), outcome, count(*) FROM attempts
           WHERE outcome <> 'running' AND finished_at IS NOT NULL GROUP BY 1, 2""",
        f"""CREATE TRIGGER attempts_ended AFTER UPDATE OF outcome ON attempts
            WHEN OLD.outcome = 'running' AND NEW.outcome <> 'running' BEGIN
                INSERT OR IGNORE INTO run_totals VALUES
                    (NEW.outcome, {_run_bucket_sql("NEW.duration_s")}, 0, 0);
                UPDATE run_totals SET runs = runs + 1,
                                      seconds = seconds + coalesce(NEW.duration_s, 0)
                WHERE outcome = NEW.outcome
                  AND bucket = {_run_bucket_sql("NEW.duration_s")};
                INSERT OR IGNORE INTO run_minutes VALUES
                    (substr(NEW.finished_at, 1, 16), NEW.outcome, 0);
                UPDATE run_minutes SET runs = runs + 1
                WHERE minute = substr(NEW.finished_at, 1, 16)
                  AND outcome = NEW.outcome;
            END""",
    ),
    (
        # Version 3 (queuectl 1.2): who supervises this database, recorded where
        # deleting a file cannot hide it. A row is only a claim: a reader proves
        # it live (same host and boot, the pid with the same start time).
        """CREATE TABLE supervisors (
            id          TEXT PRIMARY KEY,      -- a token of this supervisor's run
            host        TEXT NOT NULL,         -- the host name
            boot_id     TEXT NOT NULL,         -- the host's boot; '' if unknown
            pid         INTEGER NOT NULL,
            pid_start   INTEGER,               -- its start time (/proc ticks)
            workers     TEXT NOT NULL DEFAULT '',   -- worker pids, space-separated
            state       TEXT NOT NULL,         -- starting, running or stopping
            started_at  TEXT NOT NULL,
            seen_at     TEXT NOT NULL
        )""",
        # The jobs that wait for their dependencies, which status counts apart.
        """CREATE INDEX jobs_blocked ON jobs (ready)
           WHERE state = 'pending' AND ready = -1""",
    ),
    (
        # Version 4 (queuectl 1.2): the host that holds a claim (host_id()): only
        # that host may signal or inspect the processes of its run.
        "ALTER TABLE jobs ADD COLUMN claim_host TEXT",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class SQLiteStore(Store):
    """The default store: a SQLite file in WAL mode, made owner-only, its writes
    one at a time (BEGIN IMMEDIATE, or EXCLUSIVE for a claim), retried while
    another process holds the lock, every acknowledging commit synced
    (synchronous=FULL). Its clock is this host's."""

    IntegrityError = sqlite3.IntegrityError

    def __init__(self, path, create=True):
        super().__init__()
        self.path = self.local = os.path.abspath(os.path.expanduser(path))
        self.conn = None
        if self._check_file(create):
            self._identify()
        try:
            self.conn = self._retrying(lambda: sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None))
            self.conn.row_factory = sqlite3.Row
            # In WAL, NORMAL may lose the last commits on power loss; FULL does not.
            # Every statement is retried while busy, this first one too: it reads
            # the schema, which another process may hold a moment longer than the
            # busy timeout (it did, on a loaded machine, as a supervisor reopened
            # the file after starting a worker).
            self._retrying(lambda: self.conn.execute("PRAGMA synchronous=FULL"))
            self._sync = "FULL"
            # Know whose file it is, and migrate it, before switching it to WAL: a
            # refused or failed open must leave the file as it was.
            if self._retrying(lambda: self._version(self.conn)) < SCHEMA_VERSION:
                self._write(self._migrate, "EXCLUSIVE")
            mode = self._retrying(lambda: self.conn.execute(
                "PRAGMA journal_mode=WAL").fetchone()[0])
            if mode.lower() != "wal":
                raise QueueError(f"cannot switch database to WAL mode: {self.path}")
        except sqlite3.Error as e:
            self.close()
            raise QueueError(_sqlite_message(e, self.path)) from None
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # -- opening ---------------------------------------------------------------

    def _identify(self):
        """Refuse a foreign or newer file from its header alone.

        Opening it would already change it: a connection checkpoints its WAL on
        close, and even a read-only one creates -wal and -shm files. The check of
        the open connection (_version) stays the final word.
        """
        try:
            with open(self.path, "rb") as f:
                header = f.read(100)
        except OSError as e:
            raise QueueError(f"cannot read database {self.path}: {e.strerror}") from None
        if len(header) < 100:
            raise QueueError(f"not a queuectl database, or corrupt: {self.path}")
        pages, version, app_id = (int.from_bytes(header[i:i + 4], "big")
                                  for i in (28, 60, 68))
        if app_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise QueueError(f"database schema version {version} is newer than "
                                 f"this queuectl understands ({SCHEMA_VERSION}); "
                                 f"upgrade queuectl: {self.path}")
        elif app_id != 0 or pages > 1:
            raise QueueError(f"not a queuectl database (a SQLite database of another "
                             f"program): {self.path}")

    def _check_file(self, create):
        """Refuse directories and foreign files; create a new database owner-only.
        Return whether the file already holds data."""
        path = self.path
        if os.path.isdir(path):
            raise QueueError(f"database path is a directory: {path}")
        if os.path.exists(path) and not os.path.isfile(path):
            raise QueueError(f"database path is not a regular file: {path}")
        if os.path.exists(path) and os.stat(path).st_nlink > 1:
            # Two names would get two PID files and two WALs: a corrupt database.
            raise QueueError(f"database file has more than one name (a hard link): "
                             f"{path}")
        try:
            with open(path, "rb") as f:
                header = f.read(len(SQLITE_HEADER))
        except FileNotFoundError:
            if not create:
                raise NoDatabase(f"no database at {path} (enqueue, config set or "
                                 f"worker start creates it)") from None
            self._create_file()
            return False
        except OSError as e:
            raise QueueError(f"cannot read database {path}: {e.strerror}") from None
        if header and header != SQLITE_HEADER:
            raise QueueError(f"not a queuectl database (not a SQLite file): {path}")
        if not header:            # an empty file (mktemp): a new database, if allowed
            if not create:
                raise NoDatabase(f"no database at {path} (the file is empty; enqueue, "
                                 f"config set or worker start makes it one)")
            with contextlib.suppress(OSError):
                os.chmod(path, 0o600)
        return bool(header)

    def _create_file(self):
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            self.created = True
        except FileExistsError:
            pass  # another process created it first; it is checked when opened
        except OSError as e:
            raise QueueError(f"cannot create database {self.path}: "
                             f"{e.strerror}") from None

    def _version(self, conn):
        """Return the schema version of a queuectl file (0: new); refuse others."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if app_id != APPLICATION_ID:
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id != 0 or tables:
                raise QueueError(f"not a queuectl database (a SQLite database of "
                                 f"another program): {self.path}")
            version = 0
        if version > SCHEMA_VERSION:
            raise QueueError(f"database schema version {version} is newer than this "
                             f"queuectl understands ({SCHEMA_VERSION}); upgrade "
                             f"queuectl: {self.path}")
        return version

    def _migrate(self, conn):
        """Bring a new or older database up to SCHEMA_VERSION (in one transaction)."""
        version = self._version(conn)     # again, now under the write lock
        for steps in MIGRATIONS[version:]:
            for statement in steps:
                conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- transactions -------------------------------------------------------------

    def _retrying(self, action):
        """Return action(), retried while the database is busy; map sqlite3 errors."""
        deadline = time.monotonic() + BUSY_DEADLINE_S
        while True:
            try:
                return action()
            except sqlite3.Error as e:
                if _is_busy(e) and time.monotonic() < deadline:
                    import random
                    time.sleep(random.uniform(0, BUSY_RETRY_MAX_S))
                    continue
                raise QueueError(_sqlite_message(e, self.path)) from None

    def _run(self, body, begin, durable=True):
        """Run body(conn) in one transaction, retried as a whole while busy.

        A DURABLE commit is on disk before this returns (synchronous=FULL). One
        that is not (NORMAL) becomes durable with the next durable commit, since
        a WAL is one file synced in order; callers say why losing it is safe.
        """
        sync = "FULL" if durable else "NORMAL"
        if sync != self._sync:
            self._retrying(lambda: self.conn.execute(f"PRAGMA synchronous={sync}"))
            self._sync = sync

        def transaction():
            self.conn.execute(begin)
            try:
                result = body(self.conn)
                self.conn.execute("COMMIT")
                return result
            except BaseException:
                if self.conn.in_transaction:   # SQLite may have rolled back already
                    self.conn.execute("ROLLBACK")
                raise
        return self._retrying(transaction)

    def _write(self, body, mode="IMMEDIATE", durable=True):
        return self._run(body, "BEGIN " + mode, durable)

    def _read(self, body):
        return self._run(body, "BEGIN DEFERRED")

    @staticmethod
    def _changes(conn):
        return conn.execute("PRAGMA data_version").fetchone()[0]

    @staticmethod
    def _now(conn, now=None):
        return now or now_utc()

    def data_version(self):
        """Return a number that changes whenever another connection commits."""
        return self._retrying(lambda: self._changes(self.conn))

    def clock(self):
        """The store's time now: this host's."""
        return now_utc()


# -- the PostgreSQL store ------------------------------------------------------------

PG_SCHEMES = ("postgresql://", "postgres://")
PG_DEFAULT_SCHEMA = "queuectl"
PG_INSTALL = ('pip install "psycopg[binary]" (from a clone of queuectl: pip install '
              '".[postgres]")')
PG_CONNECT_TIMEOUT_S = 10
PG_IMPATIENT_CONNECT_S = 2  # a supervisor's loop waits at most this for a connection
PG_TCP_TIMEOUT_MS = 10000  # unacknowledged data this long: the connection is lost
PG_RETRY_S = 10.0          # a command rides out a lost connection this long
PG_COUNT_SLOTS = 16        # a counter is this many rows, so hosts do not queue on one
PG_SCHEMA_NAME = Pattern(r"[a-z_][a-z0-9_]{0,62}")


def is_postgres(target):
    """Whether TARGET (a --db value) names a PostgreSQL database."""
    return isinstance(target, str) and target.startswith(PG_SCHEMES)


def pg_url(url):
    """(what libpq connects with, the schema of the queue's tables, the URL as it
    may be shown: its password masked) of a postgresql:// URL. The schema is a
    query parameter of ours, ?schema=NAME (default queuectl), not libpq's."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    if len(schemas) > 1:
        raise UsageError(f"the URL names a schema {len(schemas)} times: give one")
    schema = schemas[0] if schemas else PG_DEFAULT_SCHEMA
    if not PG_SCHEMA_NAME.fullmatch(schema) or schema.startswith("pg_"):
        raise UsageError(f"schema must be a lower-case name of letters, digits and "
                         f"_, not starting with pg_ (PostgreSQL's own): {schema!r}")
    rest = [(key, value) for key, value in query if key != "schema"]
    conninfo = urlunsplit(parts._replace(query=urlencode(rest)))
    _check_conninfo(conninfo)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(":" + parts.password + "@", ":***@", 1)
    shown_query = urlencode([(key, "***" if key == "password" else value)
                             for key, value in query], safe="/*")
    return conninfo, schema, urlunsplit(parts._replace(netloc=netloc,
                                                       query=shown_query))


def without_password(url):
    """A postgresql:// URL with no password in it: what a job's environment gets
    as $QUEUECTL_DB, so that a command that prints its environment shows none
    (one that enqueues finds it where libpq looks: ~/.pgpass, $PGPASSWORD)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(":" + parts.password + "@", "@", 1)
    query = urlencode([(key, value) for key, value in parse_qsl(
        parts.query, keep_blank_values=True) if key != "password"], safe="/")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _check_conninfo(conninfo):
    """Refuse, as a usage error, a URL that libpq cannot parse (an unknown
    parameter, a port that is no number): at once, not after retrying it."""
    try:
        from psycopg import conninfo as parser
    except ImportError:
        return                              # said by _psycopg, when it is needed
    try:
        parser.conninfo_to_dict(conninfo)
    except Exception as e:              # psycopg.ProgrammingError: its words
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "invalid"
        raise UsageError(f"invalid database URL: {reason}") from None
    port = parser.conninfo_to_dict(conninfo).get("port")
    if port is not None and not all(p.isdigit() for p in str(port).split(",")):
        raise UsageError(f"invalid database URL: port {port!r} is not a number")


def pg_local_base(url):
    """Where this host keeps its files of the PostgreSQL queue at URL: in this
    user's state directory, named by the database and schema (not the role or
    password, which may differ between users of one queue)."""
    import hashlib
    from urllib.parse import parse_qsl, urlsplit
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    place = "|".join([parts.hostname or query.get("host", ""),
                      str(parts.port or query.get("port", "")),
                      parts.path.lstrip("/") or query.get("dbname", ""),
                      query.get("schema", PG_DEFAULT_SCHEMA)])
    state = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):
        state = os.path.join(os.path.expanduser("~"), ".local", "state")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", parts.path.lstrip("/") or "db")[:40]
    digest = hashlib.sha256(place.encode()).hexdigest()[:12]
    return os.path.join(state, "queuectl", f"pg-{name}-{digest}")


def _psycopg():
    """psycopg 3, imported only for a postgresql:// database."""
    try:
        import psycopg
    except ImportError:
        raise UsageError(f"a postgresql:// database needs psycopg 3: "
                         f"{PG_INSTALL}") from None
    # psycopg logs a warning of its own when a pipeline is left after an error
    # (one that _run handles): it must not reach a supervisor's log as noise.
    import logging
    logging.getLogger("psycopg").addHandler(logging.NullHandler())
    logging.getLogger("psycopg").propagate = False
    return psycopg


class Native(str):
    """A statement already in PostgreSQL's words, which _pg_sql leaves alone."""


_PG_SQL = {}


def _pg_sql(sql):
    """SQL written for SQLite (Store's statements), said as PostgreSQL says it:
    %s and %(name)s parameters for ? and :name, no INDEXED BY hints, INSERT OR
    IGNORE as ON CONFLICT DO NOTHING, LIKE blind to case as SQLite's is (ILIKE).
    Translated once per statement."""
    if isinstance(sql, Native):
        return sql
    text = _PG_SQL.get(sql)
    if text is None:
        text = sql.replace("%", "%%")
        text = re.sub(r"\s+INDEXED BY \w+", "", text)
        text = re.sub(r"(?<![:\w]):([a-z_]+)", r"%(\1)s", text)
        text = text.replace("?", "%s").replace(" LIKE ", " ILIKE ")
        if text.startswith("INSERT OR IGNORE INTO "):
            text = "INSERT INTO " + text[len("INSERT OR IGNORE INTO "):] + \
                   " ON CONFLICT DO NOTHING"
        _PG_SQL[sql] = text
    return text


class _PgRow:
    """A row as sqlite3.Row is read: by position or by column name, keys()."""

    __slots__ = ("values", "index")

    def __init__(self, values, index):
        self.values, self.index = values, index

    def __getitem__(self, key):
        return self.values[key if isinstance(key, (int, slice)) else self.index[key]]

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)

    def keys(self):
        return list(self.index)


def _pg_rows(cursor):
    """psycopg's row factory for _PgRow (of a column named twice, the first)."""
    index = {}
    for position, column in enumerate(cursor.description or ()):
        index.setdefault(column.name, position)
    return lambda values: _PgRow(values, index)


class _PgConnection:
    """A psycopg connection that takes the statements Store says in SQLite's
    words (see _pg_sql), and whose execute() returns a cursor, as sqlite3's
    does."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql, params=None):
        # Always with parameters, if none: then psycopg reads %% as %, which
        # _pg_sql doubles every literal % into.
        cursor = self.conn.cursor()
        cursor.execute(_pg_sql(sql), () if params is None else params)
        return cursor

    def executemany(self, sql, rows):
        cursor = self.conn.cursor()
        rows = list(rows)
        if rows:
            cursor.executemany(_pg_sql(sql), rows)
        return cursor


# The PostgreSQL schema, version by version (as MIGRATIONS is SQLite's); each runs
# in one transaction under an advisory lock, with its version recorded. Times are
# ISO-8601 text, as in SQLite: the same statements compare them, and a time's text
# is what every document shows. Counters are spread over PG_COUNT_SLOTS rows, each
# transaction adding to the row of its backend, so that hosts do not queue on one.
PG_MIGRATIONS = (
    (
        "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
        """CREATE TABLE jobs (
            rowid        bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
            id           text PRIMARY KEY,
            command      text NOT NULL CHECK (command <> ''),
            cwd          text NOT NULL,
            state        text NOT NULL CHECK (state IN ('pending', 'processing',
                                  'completed', 'failed', 'dead', 'cancelled')),
            ready        integer NOT NULL DEFAULT 0,
            priority     bigint NOT NULL DEFAULT 0,
            attempts     integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            max_retries  bigint CHECK (max_retries >= 0),
            timeout_s    double precision CHECK (timeout_s > 0),
            run_at       text NOT NULL,
            created_at   text NOT NULL,
            updated_at   text NOT NULL,
            last_error   text,
            unique_key   text,
            claim_token  text,
            run_token    text,
            worker_pid   bigint,
            worker_start bigint,
            claim_host   text,
            run_pgid     bigint,
            run_pg_start bigint,
            lease_until  text
        ) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02,
                autovacuum_vacuum_cost_delay = 1)""",
        """CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, created_at, rowid)
           WHERE state IN ('pending', 'failed') AND ready = 1""",
        """CREATE INDEX jobs_scheduled ON jobs (run_at)
           WHERE state IN ('pending', 'failed') AND ready = 0""",
        "CREATE INDEX jobs_leases ON jobs (lease_until) WHERE state = 'processing'",
        "CREATE INDEX jobs_state ON jobs (state, rowid)",
        """CREATE INDEX jobs_finished ON jobs (state, updated_at)
           WHERE state IN ('completed', 'dead', 'cancelled')""",
        """CREATE UNIQUE INDEX jobs_unique ON jobs (unique_key)
           WHERE unique_key IS NOT NULL AND state IN ('pending', 'processing',
                                                      'failed')""",
        """CREATE INDEX jobs_blocked ON jobs (ready)
           WHERE state = 'pending' AND ready = -1""",
        """CREATE TABLE attempts (
            id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            job_id         text NOT NULL,
            number         integer NOT NULL,
            run_token      text NOT NULL UNIQUE,
            worker_pid     bigint NOT NULL,
            started_at     text NOT NULL,
            finished_at    text,
            outcome        text NOT NULL CHECK (outcome IN ('running', 'completed',
                                   'failed', 'interrupted', 'cancelled')),
            exit_code      integer,
            reason         text,
            duration_s     double precision,
            stdout         text,
            stderr         text,
            stdout_dropped bigint NOT NULL DEFAULT 0,
            stderr_dropped bigint NOT NULL DEFAULT 0
        ) WITH (autovacuum_vacuum_scale_factor = 0.05)""",
        "CREATE INDEX attempts_job ON attempts (job_id, id)",
        "CREATE INDEX attempts_finished ON attempts (outcome, finished_at)",
        """CREATE TABLE deps (
            job_id    text NOT NULL,
            after_id  text NOT NULL,
            PRIMARY KEY (job_id, after_id)
        )""",
        "CREATE INDEX deps_after ON deps (after_id)",
        "CREATE TABLE config (key text PRIMARY KEY, value text NOT NULL)",
        """CREATE TABLE counts (
            state  text NOT NULL,
            slot   integer NOT NULL,
            jobs   bigint NOT NULL,
            PRIMARY KEY (state, slot)
        )""",
        """CREATE TABLE run_totals (
            outcome  text NOT NULL,
            bucket   integer NOT NULL,
            slot     integer NOT NULL,
            runs     bigint NOT NULL,
            seconds  double precision NOT NULL,
            PRIMARY KEY (outcome, bucket, slot)
        )""",
        """CREATE TABLE run_minutes (
            minute   text NOT NULL,
            outcome  text NOT NULL,
            slot     integer NOT NULL,
            runs     bigint NOT NULL,
            PRIMARY KEY (minute, outcome, slot)
        )""",
        """CREATE TABLE supervisors (
            id          text PRIMARY KEY,
            host        text NOT NULL,
            boot_id     text NOT NULL,
            pid         bigint NOT NULL,
            pid_start   bigint,
            workers     text NOT NULL DEFAULT '',
            state       text NOT NULL,
            started_at  text NOT NULL,
            seen_at     text NOT NULL,
            stop        integer NOT NULL DEFAULT 0
        )""",
        f"""CREATE FUNCTION count_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE my_slot integer := pg_backend_pid() % {PG_COUNT_SLOTS};
            BEGIN
                IF TG_OP = 'UPDATE' THEN          -- one statement: half the cost
                    INSERT INTO counts VALUES (OLD.state, my_slot, -1),
                                              (NEW.state, my_slot, 1)
                    ON CONFLICT (state, slot) DO UPDATE
                    SET jobs = counts.jobs + EXCLUDED.jobs;
                ELSE
                    INSERT INTO counts VALUES (OLD.state, my_slot, -1)
                    ON CONFLICT (state, slot) DO UPDATE SET jobs = counts.jobs - 1;
                END IF;
                RETURN NULL;
            END $$""",
        """CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
           FOR EACH ROW WHEN (NEW.state <> OLD.state) EXECUTE FUNCTION count_jobs()""",
        """CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs
           FOR EACH ROW EXECUTE FUNCTION count_jobs()""",
        f"""CREATE FUNCTION count_run() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE
                my_slot integer := pg_backend_pid() % {PG_COUNT_SLOTS};
                my_bucket integer := {_run_bucket_sql("NEW.duration_s")};
            BEGIN
                INSERT INTO run_totals VALUES (NEW.outcome, my_bucket, my_slot, 1,
                                               coalesce(NEW.duration_s, 0))
                ON CONFLICT (outcome, bucket, slot) DO UPDATE
                SET runs = run_totals.runs + 1,
                    seconds = run_totals.seconds + EXCLUDED.seconds;
                INSERT INTO run_minutes VALUES (substr(NEW.finished_at, 1, 16),
                                                NEW.outcome, my_slot, 1)
                ON CONFLICT (minute, outcome, slot) DO UPDATE
                SET runs = run_minutes.runs + 1;
                RETURN NULL;
            END $$""",
        """CREATE TRIGGER attempts_ended AFTER UPDATE OF outcome ON attempts
           FOR EACH ROW WHEN (OLD.outcome = 'running' AND NEW.outcome <> 'running')
           EXECUTE FUNCTION count_run()""",
    ),
)
PG_SCHEMA_VERSION = len(PG_MIGRATIONS)


class PostgresStore(Store):
    """A PostgreSQL database, shared by the supervisors of many hosts. Claims lock
    the jobs they take with FOR UPDATE SKIP LOCKED, so no two supervisors take
    one job; every time is read from the database's clock, never a host's; a
    lost connection is made again, and a transaction that never reached COMMIT
    is run again. Its tables live in a schema of their own (?schema=, default
    queuectl), so the queue can share a database. psycopg 3 is imported only
    here."""

    shared = True

    def __init__(self, url, create=True, retry_s=PG_RETRY_S, check_only=False,
                 connect_timeout_s=PG_CONNECT_TIMEOUT_S):
        super().__init__()
        self.connect_timeout_s = connect_timeout_s
        self.clock_read = None           # (the database's time, monotonic) last read
        self.psycopg = _psycopg()
        self.IntegrityError = self.psycopg.IntegrityError
        self.url = url
        self.conninfo, self.schema, self.path = pg_url(url)
        self.local = pg_local_base(url)
        self.channel = f"{self.schema}_wake"
        self.retry_s = retry_s
        self.conn = None
        self.prefetched = None           # see _PREFETCH
        self.made = False                # its tables are known to be there
        self._begin = f"BEGIN; SET LOCAL search_path TO {self.schema}"
        self.version = PG_SCHEMA_VERSION       # so that this read migrates nothing
        try:
            self.version = self._read(self._version)
            self.made = self.version == PG_SCHEMA_VERSION
            if not check_only:
                self._prepare(create)
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    @classmethod
    def exists(cls, url):
        """Whether the queue at URL has its tables (False if it cannot be asked)."""
        with contextlib.suppress(QueueError):
            with cls(url, create=True, retry_s=0, check_only=True) as store:
                return store.version > 0
        return False

    # -- connecting --------------------------------------------------------------

    def _connect(self):
        """A connection (made again if it was lost), or QueueError."""
        if self.conn is not None and not self.conn.closed:
            return self.conn
        self.conn = None
        try:
            conn = self.psycopg.connect(self.conninfo, autocommit=True,
                                        **self._connect_options())
        except self.psycopg.Error as e:
            raise QueueError(f"cannot connect to {self.path}: "
                             f"{_pg_reason(e)}") from None
        conn.row_factory = _pg_rows
        try:
            # What must be durable must not be made otherwise by a server, database
            # or role whose default is synchronous_commit off (see Store.shared);
            # a stronger one (remote_apply) is kept.
            if conn.execute("SHOW synchronous_commit").fetchone()[0] == "off":
                conn.execute("SET synchronous_commit = on")
        except self.psycopg.Error as e:
            with contextlib.suppress(Exception):
                conn.close()
            raise QueueError(f"cannot connect to {self.path}: "
                             f"{_pg_reason(e)}") from None
        self.conn = conn
        return conn

    def _connect_options(self):
        """What a connection is made with, unless the URL says otherwise: a
        connect timeout, and TCP keepalives and a user timeout, so that a
        network cut ends a statement in seconds, not after TCP's minutes. Its
        name says which process on which host holds it (pg_stat_activity)."""
        given = self.psycopg.conninfo.conninfo_to_dict(self.conninfo)
        options = {"connect_timeout": self.connect_timeout_s, "keepalives": 1,
                   "keepalives_idle": 5, "keepalives_interval": 2,
                   "keepalives_count": 3, "tcp_user_timeout": PG_TCP_TIMEOUT_MS}
        options = {key: value for key, value in options.items() if key not in given}
        options["application_name"] = f"{PROG} pid {os.getpid()} {host_id()}"[:63]
        return options

    def _prepare(self, create):
        """Know the schema before anything is written: refuse a newer version and
        another program's tables. Creating it, or migrating an older one, is done
        by the first transaction, before its own work and under an advisory
        lock: so a command that fails (a job that names an unknown dependency)
        leaves no new schema behind."""
        if self.version == 0 and not create:
            # The same words as SQLite's; the URL names the schema, if not the default.
            raise NoDatabase(f"no database at {self.path} (enqueue, config set or "
                             f"worker start creates it)")

    def make(self):
        """Create or migrate the schema now, if that is still to do."""
        if self.version != PG_SCHEMA_VERSION:
            self._write(lambda conn: None)

    def _version(self, conn):
        meta = conn.execute(Native("SELECT to_regclass(%s)"),
                            (f"{self.schema}.meta",)).fetchone()[0]
        if meta is None:
            tables = conn.execute(Native(
                "SELECT count(*) FROM pg_tables WHERE schemaname = %s"),
                (self.schema,)).fetchone()[0]
            if tables:
                raise QueueError(f"schema {self.schema} holds tables that are not "
                                 f"queuectl's: {self.path}")
            return 0
        version = int(conn.execute(Native(
            f"SELECT value FROM {self.schema}.meta WHERE key = 'schema_version'"))
            .fetchone()[0])
        if version > PG_SCHEMA_VERSION:
            raise QueueError(f"database schema version {version} is newer than this "
                             f"queuectl understands ({PG_SCHEMA_VERSION}); upgrade "
                             f"queuectl: {self.path}")
        return version

    def _migrate(self, conn):
        """Bring the schema to PG_SCHEMA_VERSION, in the transaction of CONN."""
        conn.execute(Native("SELECT pg_advisory_xact_lock(hashtext(%s))"),
                     (f"queuectl:{self.schema}",))
        version = self._version(conn)           # again, now under the lock
        if version == 0 and conn.execute(Native(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s"),
                (self.schema,)).fetchone() is None:
            conn.execute(Native(f"CREATE SCHEMA {self.schema}"))
        conn.execute(Native(f"SET LOCAL search_path TO {self.schema}"))
        if version == PG_SCHEMA_VERSION:
            return version
        for steps in PG_MIGRATIONS[version:]:
            for statement in steps:
                conn.execute(Native(statement.replace("%", "%%")))
        conn.execute(Native(
            "INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"),
            (str(PG_SCHEMA_VERSION),))
        return version

    # -- transactions ------------------------------------------------------------

    def _run(self, body, durable=True, begin=None):
        """Run body(conn) in one transaction. A lost connection is made again and
        the transaction run again, for up to retry_s, unless it was lost while
        committing: then whether the change was made is unknown, and it says so.
        A commit that durable=False says nothing relies on (a tick, shared output)
        is not waited for on disk (synchronous_commit off)."""
        psycopg = self.psycopg
        deadline = time.monotonic() + self.retry_s
        pause = 0.05
        while True:
            committing = False
            migrate = self.version != PG_SCHEMA_VERSION
            prefetch = self.made and not migrate
            self.prefetched = None
            try:
                conn = self._connect()
                sent = time.monotonic()
                cursor = conn.execute(
                    ("BEGIN" if migrate else (begin or self._begin)) +
                    ("" if durable else "; SET LOCAL synchronous_commit = off") +
                    ("; " + self._PREFETCH if prefetch else ""))
                if prefetch:
                    self.prefetched = self._prefetch(cursor, sent)
                wrapped = _PgConnection(conn)
                if migrate:
                    was = self._migrate(wrapped)
                result = body(wrapped)
                committing = True
                self.prefetched = None
                conn.execute("COMMIT")
                if migrate:
                    self.version, self.created = PG_SCHEMA_VERSION, was == 0
                    self.made = True
                return result
            except (psycopg.errors.SerializationFailure,
                    psycopg.errors.DeadlockDetected):
                self._rollback()
                time.sleep(pause)
            except psycopg.OperationalError as e:
                lost = self.conn is None or self.conn.closed or self.conn.broken
                if not lost:
                    self._rollback()
                    raise QueueError(_pg_message(e, self.path)) from None
                self.close()
                if committing:
                    raise QueueError(f"the connection to {self.path} was lost while "
                                     f"committing: the change may or may not have "
                                     f"been made") from None
                if time.monotonic() >= deadline:
                    raise QueueError(f"lost the connection to {self.path}: "
                                     f"{_pg_reason(e)}") from None
                time.sleep(pause)
            except QueueError as e:
                if "cannot connect" in str(e) and time.monotonic() < deadline:
                    time.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                self._rollback()
                raise
            except psycopg.Error as e:
                self._rollback()
                raise QueueError(_pg_message(e, self.path)) from None
            except BaseException:
                self._rollback()
                raise
            pause = min(pause * 2, 1.0)

    # Read with BEGIN, in its round trip: what nearly every transaction reads
    # first (_now, _config), a round trip less each. No transaction writes the
    # config and then reads it, so its rows as of BEGIN are the rows it reads.
    _PREFETCH = ("SELECT clock_timestamp(), (SELECT coalesce(json_agg(json_build_array("
                 "key, value)), '[]'::json) FROM config)")

    @staticmethod
    def _prefetch(cursor, sent):
        """(the clock, the config rows, when the clock was read by time.monotonic():
        between SENT and now) from _PREFETCH's result, the last of those of
        BEGIN's round trip."""
        while cursor.description is None and cursor.nextset():
            pass
        at, rows = cursor.fetchone()
        return at, [tuple(row) for row in rows], (sent + time.monotonic()) / 2

    def _clock_moment(self, before):
        if self.prefetched is not None:         # read with BEGIN: then
            return self.prefetched[2]
        return Store._clock_moment(self, before)

    def _config_rows(self, conn):
        if self.prefetched is not None:
            return self.prefetched[1]
        return conn.execute(self._CONFIG)

    def _rollback(self):
        self.prefetched = None
        if self.conn is not None and not self.conn.closed:
            with contextlib.suppress(Exception):
                self.conn.execute("ROLLBACK")

    def _write(self, body, mode="IMMEDIATE", durable=True, begin=None):
        return self._run(body, durable, begin)

    def _read(self, body):
        return self._run(body)

    @staticmethod
    def _changes(conn):
        return object()                  # no cheap change counter: read again

    def _now(self, conn, now=None):
        if now:
            return now
        if self.prefetched is not None:
            at, _, mono = self.prefetched
        else:
            at = conn.execute(Native("SELECT clock_timestamp()")).fetchone()[0]
            mono = time.monotonic()
        self.clock_read = (at, mono)
        return at

    def clock_estimate(self):
        """The database's time now, reckoned from when it was last read."""
        if self.clock_read is None:
            return self.clock()
        at, mono = self.clock_read
        return at + timedelta(seconds=time.monotonic() - mono)

    def clock(self):
        """The database's time now: the one clock every host goes by."""
        return self._read(self._now)

    def data_version(self):
        """A number that changes whenever another connection may have committed:
        here, always (callers that poll read again each time)."""
        return time.monotonic()

    def _notify(self, conn):
        conn.execute(Native("SELECT pg_notify(%s, '')"), (self.channel,))

    def listener(self):
        """A connection that hears _notify's wake-ups (LISTEN): its fileno() turns
        readable when one came, and drain() reads them. Behind a pooler that
        drops LISTEN (PgBouncer in transaction mode) none come, and the
        supervisor's tick, once a second, finds the work instead."""
        try:
            conn = self.psycopg.connect(self.conninfo, autocommit=True,
                                        **self._connect_options())
            conn.execute(f"LISTEN {self.channel}")
        except self.psycopg.Error as e:
            raise QueueError(f"cannot listen on {self.path}: {_pg_reason(e)}") from None
        return _PgListener(conn)

    def _insert_rows(self, conn, rows):
        """Insert jobs' rows with COPY, one stream rather than a statement a row:
        `enqueue -` of 100,000 lines is several times faster. A clashing id fails
        it whole, as it does the INSERTs (Store._insert_jobs goes one by one)."""
        with conn.conn.cursor().copy(self._COPY_JOBS) as copy:
            for row in rows:
                copy.write_row(row)

    # -- the statements PostgreSQL says otherwise ------------------------------------

    _COPY_JOBS = Native(f"COPY jobs ({', '.join(Store._INSERT_COLUMNS)}) FROM STDIN")

    def claim(self, holders, now=None, ended=None):
        """As Store's, in three round trips however many jobs it takes: BEGIN's;
        one for _PROMOTE_DUE, _CLAIM_BATCH (one statement that locks the best
        runnable jobs, moves them to processing and adds their attempts) and
        _NEXT_DUE, sent together in a pipeline; and COMMIT. A job found with no
        retry left (max_retries was lowered while it waited) ends dead as in
        Store's, and the rest are taken by another round."""
        def body(conn):
            terms = self._claim_terms(conn, now, ended)
            if terms is None:
                return [], None
            stamp, config, lease = terms
            claims, promote = [], True
            while len(claims) < len(holders):
                wanted = holders[len(claims):]
                with self._pipeline():        # one round trip for the three
                    if promote:
                        conn.execute(self._PROMOTE_DUE, (stamp,))
                        promote = False
                    taking = conn.execute(self._CLAIM_BATCH, {
                        "n": len(wanted), "max_retries": config["max_retries"],
                        "tokens": [new_token() for _ in wanted],
                        "pids": [pid for pid, _ in wanted],
                        "starts": [start for _, start in wanted],
                        "host": host_id(), "lease": lease, "stamp": stamp})
                    due = conn.execute(self._NEXT_DUE)
                rows = taking.fetchall()
                taken = sorted((row for row in rows if row["n"] is not None),
                               key=operator.itemgetter("n"))
                claims += [self._claim_of(row, row["token"], row["attempts"], config)
                           for row in taken]
                spent = [row["id"] for row in rows if row["n"] is None]
                for job_id in spent:
                    self._end_spent(conn, job_id, stamp, config, ended)
                if not spent:
                    break
            next_due = None
            if len(claims) < len(holders):
                next_due = due.fetchone()[0]
            return claims, next_due
        return self._write(body)

    # The best runnable jobs, locked (skipping those another supervisor locks),
    # taken for the holders in turn, their attempts added: one statement. A job
    # with no retry left is returned with n NULL, untouched.
    _CLAIM_BATCH = Native(f"""
        WITH picked AS MATERIALIZED (
            SELECT id, state, attempts, max_retries, priority, run_at, created_at,
                   rowid FROM jobs WHERE {Store._RUNNABLE}
            ORDER BY priority DESC, run_at, created_at, rowid
            LIMIT %(n)s FOR UPDATE SKIP LOCKED),
        spent AS (
            SELECT id FROM picked WHERE state = 'failed'
            AND attempts > coalesce(max_retries, %(max_retries)s)),
        ranked AS (
            SELECT id, row_number() OVER (ORDER BY priority DESC, run_at, created_at,
                                          rowid) AS n
            FROM picked WHERE id NOT IN (SELECT id FROM spent)),
        holders AS (
            SELECT * FROM unnest(%(tokens)s::text[], %(pids)s::bigint[],
                                 %(starts)s::bigint[]) WITH ORDINALITY
                          AS h(token, pid, start_ticks, n)),
        taken AS (
            UPDATE jobs SET state = 'processing', ready = 0,
                attempts = jobs.attempts + 1, claim_token = holders.token,
                run_token = holders.token, worker_pid = holders.pid,
                worker_start = holders.start_ticks, claim_host = %(host)s,
                run_pgid = NULL, run_pg_start = NULL, lease_until = %(lease)s,
                updated_at = %(stamp)s
            FROM ranked JOIN holders USING (n) WHERE jobs.id = ranked.id
            RETURNING holders.n, jobs.id, jobs.command, jobs.cwd,
                      holders.token, jobs.attempts, jobs.max_retries, jobs.timeout_s,
                      holders.pid),
        runs AS (
            INSERT INTO attempts (job_id, number, run_token, worker_pid, started_at,
                                  outcome)
            SELECT id, (SELECT count(*) + 1 FROM attempts WHERE job_id = taken.id),
                   token, pid, %(stamp)s, 'running' FROM taken)
        SELECT n, id, command, cwd, token, attempts, max_retries, timeout_s
        FROM taken
        UNION ALL
        SELECT NULL, id, NULL, NULL, NULL, NULL, NULL, NULL FROM spent""")

    def _pipeline(self):
        """A block whose statements go to the server together, their results read
        after it (psycopg's pipeline mode); an ordinary block where libpq is
        older than 14 and has none."""
        pipeline = getattr(self.psycopg, "Pipeline", None)     # psycopg 3.1 on
        if pipeline is not None and pipeline.is_supported():
            return self.conn.pipeline()
        return contextlib.nullcontext()

    def _end_attempts(self, conn, ends, config):
        """As Store's; but the runs that completed, the common case, are ended
        together in one statement that reads and writes: _END_COMPLETED. Whether
        jobs run after those that ended is read after they are locked, in a
        statement of its own: a job enqueued after one of them meanwhile (which
        waits for that lock, _DEPENDENCY_STATE) has committed by then, and is
        seen."""
        quick = [end for end in ends if end.result.ok and
                 end.result.duration_s is not None]
        done = {}
        if quick:
            results = [end.result for end in quick]
            done = {tuple(row) for row in conn.execute(
                self._END_COMPLETED, {
                    "ids": [end.job_id for end in quick],
                    "tokens": [end.token for end in quick],
                    "stamps": [iso(end.at) for end in quick],
                    "starts": [iso(end.started) if end.started else None
                               for end in quick],
                    "codes": [r.exit_code for r in results],
                    "durations": [round(r.duration_s, 3) for r in results],
                    "outs": [r.stdout for r in results],
                    "errs": [r.stderr for r in results],
                    "outs_dropped": [r.stdout_dropped for r in results],
                    "errs_dropped": [r.stderr_dropped for r in results]})}
        states = [COMPLETED if (end.job_id, end.token) in done else
                  self._end_attempt(conn, end.job_id, end.token, end.at, end.result,
                                    config, end.started)[0] for end in ends]
        over = [end.job_id for end, state in zip(ends, states)
                if state in (COMPLETED, DEAD)]
        waited_on = {row[0] for row in conn.execute(self._WAITED_ON, (over,))} \
            if over else set()
        return [(state, end.job_id in waited_on) for end, state in zip(ends, states)]

    _WAITED_ON = Native("SELECT DISTINCT after_id FROM deps WHERE after_id = ANY(%s)")

    # Store._end_attempt of runs that completed, all at once. The jobs' rows are
    # locked as they are read (and skipped if their claim moved meanwhile), as by
    # _HELD_RUN here.
    _END_COMPLETED = Native(f"""
        WITH ends AS (
            SELECT * FROM unnest(%(ids)s::text[], %(tokens)s::text[],
                %(stamps)s::text[], %(starts)s::text[], %(codes)s::integer[],
                %(durations)s::double precision[], %(outs)s::text[], %(errs)s::text[],
                %(outs_dropped)s::bigint[], %(errs_dropped)s::bigint[])
            AS e(id, token, stamp, started, exit_code, duration, stdout, stderr,
                 stdout_dropped, stderr_dropped)),
        held AS (
            SELECT ends.*, jobs.run_token
            FROM jobs JOIN ends ON jobs.id = ends.id AND jobs.claim_token = ends.token
            WHERE jobs.state = 'processing' FOR UPDATE OF jobs),
        ended AS (
            UPDATE jobs SET state = 'completed', ready = 0, last_error = NULL,
                {Store._NO_CLAIM}, updated_at = held.stamp
            FROM held WHERE jobs.id = held.id),
        run AS (
            UPDATE attempts SET outcome = 'completed',
                started_at = coalesce(held.started, attempts.started_at),
                finished_at = held.stamp, exit_code = held.exit_code, reason = NULL,
                duration_s = held.duration, stdout = held.stdout,
                stderr = held.stderr, stdout_dropped = held.stdout_dropped,
                stderr_dropped = held.stderr_dropped
            FROM held WHERE attempts.run_token = held.run_token)
        SELECT id, token FROM held""")
    # Locked as read: a claim taken over meanwhile by another host is not ended
    # by a run that no longer holds it.
    _HELD_RUN = Native(_pg_sql(Store._HELD_RUN) + " FOR UPDATE")

    def _end_job_run(self, conn, job, run):
        """As Store's, in one statement: a round trip less a job finished."""
        conn.execute(self._END_JOB_AND_RUN, job + run)

    _END_JOB_AND_RUN = Native(f"WITH ended AS ({_pg_sql(Store._END_JOB_RUN)}) "
                              f"{_pg_sql(Store._RUN_ENDED)}")

    _NO_LIMIT = None
    _SET_CONFIG = Native("INSERT INTO config (key, value) VALUES (%s, %s) "
                         "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value")
    _COUNT_ADDED = Native(f"INSERT INTO counts (jobs, state, slot) VALUES (%s, %s, "
                          f"pg_backend_pid() %% {PG_COUNT_SLOTS}) ON CONFLICT "
                          f"(state, slot) DO UPDATE SET jobs = counts.jobs + "
                          f"EXCLUDED.jobs")
    # The sum of a bigint is a numeric (a Decimal): made an int again.
    _COUNTS = "SELECT state, sum(jobs)::bigint FROM counts GROUP BY state"
    _TOTALS = ("SELECT outcome, bucket, sum(runs)::bigint, sum(seconds) FROM "
               "run_totals GROUP BY outcome, bucket ORDER BY outcome, bucket")
    _RUNS_BY_OUTCOME = ("SELECT outcome, sum(runs)::bigint FROM run_totals "
                        "GROUP BY outcome")
    _MINUTES = ("SELECT minute, outcome, sum(runs)::bigint FROM run_minutes "
                "WHERE minute >= ? GROUP BY minute, outcome")
    _ADD_RUN_TOTAL = ("INSERT INTO run_totals (outcome, bucket, slot, runs, seconds) "
                      "VALUES (?, ?, 0, ?, ?) ON CONFLICT (outcome, bucket, slot) DO "
                      "UPDATE SET runs = run_totals.runs + excluded.runs, "
                      "seconds = run_totals.seconds + excluded.seconds")
    _ADD_RUN_MINUTE = ("INSERT INTO run_minutes (minute, outcome, slot, runs) VALUES "
                       "(?, ?, 0, ?) ON CONFLICT (minute, outcome, slot) DO UPDATE "
                       "SET runs = run_minutes.runs + excluded.runs")
    # Lock after filtering, and skip what another supervisor holds (Oban, River).
    _PROMOTE_DUE = (f"UPDATE jobs SET ready = 1 WHERE id IN (SELECT id FROM jobs "
                    f"WHERE {Store._SCHEDULED} AND run_at <= ? FOR UPDATE SKIP "
                    f"LOCKED)")
    # Locked as read: a job that a new job runs after, and that a run is ending
    # meanwhile, is read once that end is committed (see _end_attempts).
    _DEPENDENCY_STATE = Native(_pg_sql(Store._DEPENDENCY_STATE) + " FOR SHARE")


class _PgListener:
    """A LISTEN connection (PostgresStore.listener)."""

    def __init__(self, conn):
        self.conn = conn
        self.fd = conn.pgconn.socket      # asked once: a lost connection has none

    def fileno(self):
        return self.fd

    def drain(self):
        """Read the wake-ups that came; raise QueueError if the connection is lost."""
        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
            while pgconn.notifies() is not None:
                pass
        except Exception as e:            # psycopg's pq errors: the connection is gone
            raise QueueError(f"lost the connection that listens: {e}") from None
        if pgconn.status != 0:            # not CONNECTION_OK
            raise QueueError("lost the connection that listens")

    def close(self):
        with contextlib.suppress(Exception):
            self.conn.close()


def _pg_reason(error):
    """The first line of what PostgreSQL or libpq said."""
    diag = getattr(error, "diag", None)
    text = (diag and diag.message_primary) or str(error) or type(error).__name__
    return " ".join(text.strip().splitlines()[:1]) if text.strip() else text


def _pg_message(error, where):
    return f"database error ({_pg_reason(error)}): {where}"


def open_store(target, create=True, patient=True):
    """The store TARGET names: a postgresql:// (or postgres://) URL, else a
    SQLite file's path. CREATE: make a new database if there is none (else
    refuse, saying what creates one). Not PATIENT (a supervisor's loop): a
    PostgreSQL server that is away fails a transaction at once, not after
    PG_RETRY_S, so that the loop goes on with its other work and tries again."""
    if is_postgres(target):
        if patient:
            return PostgresStore(target, create)
        return PostgresStore(target, create, retry_s=0,
                             connect_timeout_s=PG_IMPATIENT_CONNECT_S)
    return SQLiteStore(target, create)


def make_local_folder(local):
    """Make the folder this host's files of a queue go in (owner-only), if need be."""
    try:
        os.makedirs(os.path.dirname(local), mode=0o700, exist_ok=True)
    except OSError as e:
        raise QueueError(f"cannot make {os.path.dirname(local)}: {e.strerror}") from None


def local_base(target):
    """The path this host's files of the queue at TARGET start with (PID file,
    log, live output, the dashboard's token): the SQLite file's own, or for a
    PostgreSQL queue one in this user's state directory."""
    return pg_local_base(target) if is_postgres(target) else target


####
# Running a job ####
####

def describe_exit(returncode):
    """Say why a shell exit status is a failure: 'exit 1', 'killed by SIGKILL'."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    if returncode == 127:
        return "exit 127 (command not found)"
    if returncode == 126:
        return "exit 126 (command not executable)"
    return f"exit {returncode}"


class OutputTail:
    """What a command wrote to one stream: its last LIMIT bytes, and how many
    bytes came before them. Memory stays bounded however much it writes. Once
    a run lasts, it is also spooled for `logs --follow` (see Spool)."""

    def __init__(self, limit):
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0
        self.spool = None

    def add(self, chunk):
        self.data += chunk
        if self.spool is not None:
            self.spool.write(chunk)
        if len(self.data) > 2 * self.limit + READ_CHUNK:   # trim now and then
            self._trim()

    def follow(self, path):
        """Spool what was written so far, and from now on what comes."""
        with contextlib.suppress(OSError):     # no live output, then; nothing worse
            self.spool = Spool(path, self.limit, self.dropped, bytes(self.data))

    def unfollow(self):
        if self.spool is not None:
            self.spool.close()
            self.spool = None

    def _trim(self):
        excess = len(self.data) - self.limit
        if excess > 0:
            # Cut at a character's start (UTF-8 continuation bytes are 10xxxxxx),
            # so that the text kept is exactly the bytes kept.
            cut = excess
            while cut < min(excess + 3, len(self.data)) and self.data[cut] & 0xC0 == 0x80:
                cut += 1
            del self.data[:cut]
            self.dropped += cut

    def text(self):
        self._trim()
        return self.data.decode("utf-8", "replace")


class Spool:
    """One stream of a running job's output, where other processes can follow
    it: a file holding the last CAPACITY bytes in a ring, after a header that
    counts every byte ever written. Disk use stays bounded however much a job
    writes, and a reader that falls behind learns how much it missed.

    The writer writes the bytes, then the count; a reader reads the count, the
    bytes, and the count again, and trusts only bytes that cannot have been
    overwritten in between.
    """

    HEADER = 16                     # bytes written (8), capacity (8), little-endian

    def __init__(self, path, capacity, start, data):
        """Create the file; the stream so far had START bytes, ending in DATA."""
        self.path = path
        self.capacity = capacity
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                          0o600)
        self.total = start
        self._header()
        self.write(data)

    def _header(self):
        os.pwrite(self.fd, self.total.to_bytes(8, "little") +
                  self.capacity.to_bytes(8, "little"), 0)

    def write(self, data):
        if not self.capacity:
            self.total += len(data)
            self._header()
            return
        skip = max(0, len(data) - self.capacity)      # older than the ring holds
        position, data = self.total + skip, memoryview(data)[skip:]
        while data:
            offset = position % self.capacity
            part = data[:self.capacity - offset]
            os.pwrite(self.fd, part, self.HEADER + offset)
            position, data = position + len(part), data[len(part):]
        self.total = position
        self._header()

    def close(self):
        """Stop writing. The file stays a little longer (SPOOL_LINGER_S), so that
        a follower ends with exactly the bytes it has not printed yet; the
        supervisor removes it once the run's result is written."""
        os.close(self.fd)

    @classmethod
    def read(cls, path, position):
        """(bytes from absolute POSITION on, bytes skipped because they were
        overwritten, the position after them), or None if there is no spool."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            header = os.pread(fd, cls.HEADER, 0)
            if len(header) < cls.HEADER:
                return b"", 0, position
            total = int.from_bytes(header[:8], "little")
            capacity = int.from_bytes(header[8:], "little")
            start = max(position, total - capacity)
            data = bytearray()
            at = start
            while at < total:
                offset = at % capacity
                part = os.pread(fd, min(total - at, capacity - offset),
                                cls.HEADER + offset)
                if not part:
                    break
                data += part
                at += len(part)
            # Bytes the writer may have overwritten while we read are not trusted.
            now = int.from_bytes(os.pread(fd, 8, 0), "little")
            lost = max(0, now - capacity - start)
            return bytes(data[lost:]), start + min(lost, len(data)) - position, \
                start + len(data)
        finally:
            os.close(fd)


def spool_path(db_path, run_token, stream):
    """Where the live output (STREAM "out" or "err") of a run is spooled."""
    return os.path.join(db_path + SPOOL_SUFFIX, f"{run_token}.{stream}")


def sweep_spools(db_path, going):
    """Remove the spools of runs whose tokens are not among GOING (left by a
    crash)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(db_path + SPOOL_SUFFIX):
            if name.rpartition(".")[0] not in going:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(db_path + SPOOL_SUFFIX, name))


def remove_spools(db_path, run_token):
    for stream in ("out", "err"):
        with contextlib.suppress(OSError):
            os.unlink(spool_path(db_path, run_token, stream))


def _signal_group(pgid, sig):
    """Send SIG to a process group; return False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass          # a member changed user (setuid); the rest were signalled
    return True


def _proc_stat(pid):
    """Fields of /proc/PID/stat after the name: [state, ppid, pgrp, ...], or None."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The name in parentheses can hold any bytes; what follows is ASCII.
    _, _, rest = data.rpartition(b")")
    return rest.decode("ascii", "replace").split() or None


def _children(pid):
    """(pid, start ticks) of the live children of PID (Linux /proc), or []."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            fields = _proc_stat(entry) if entry.isdigit() else None
            if fields and fields[0] not in "ZX" and int(fields[1]) == pid:
                found.append((int(entry), int(fields[19])))
    return found


def start_ticks(pid):
    """When PID started (clock ticks after boot), or None without /proc.

    With the pid it names one process for good: a reused pid starts later.
    """
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def holder_running(pid, started):
    """Whether the process that holds a claim is alive and not stopped (SIGSTOP).

    Such a holder is still running its job even if its lease ran out (a clock step,
    a long pause of the whole group): its claim is left alone.
    """
    if pid is None or started is None:
        return False
    fields = _proc_stat(pid)
    return bool(fields) and int(fields[19]) == started and fields[0] not in "TtZX"


def _group_alive(pgid):
    """Whether process group PGID has a member that is not a zombie.

    A zombie still counts for kill(), and one whose parent is slow to reap it (a
    frozen worker, a container's PID 1) would otherwise hold every job for the
    full grace.
    """
    if not _signal_group(pgid, 0):
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True                  # no /proc: trust kill()
    for entry in entries:
        fields = _proc_stat(entry) if entry.isdigit() else None
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def spawn(command, env, stdout_fd, stderr_fd):
    """Start `/bin/sh -c COMMAND` in a session of its own (so its process group is
    the job), stdin from /dev/null, and return its pid. The caller reaps it.

    posix_spawn, not subprocess: it costs one vfork-like clone and no Python in
    the child, a third of what Popen costs a short job.
    """
    try:
        return os.posix_spawn(
            SHELL, [SHELL, "-c", command], env, setsid=True,
            setsigdef=_DEFAULT_SIGNALS,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, stdout_fd, 1),
                          (os.POSIX_SPAWN_DUP2, stderr_fd, 2)])
    except (AttributeError, NotImplementedError):
        pass      # a libc without POSIX_SPAWN_SETSID: fork and exec by hand
    pid = os.fork()
    if pid == 0:                                   # pragma: no cover (the child)
        try:
            os.setsid()
            for sig in _DEFAULT_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(stdout_fd, 1)
            os.dup2(stderr_fd, 2)
            os.execve(SHELL, [SHELL, "-c", command], env)
        finally:
            os._exit(127)
    return pid


class Run:
    """One run of a command: its process, the pipes it writes to, and its end.

    The run registers its fds (two pipes and a pidfd) with the owner's POLLER,
    and the owner calls readable(fd) for those that are ready: the run reads
    output into bounded tails, and reaps the shell when its pidfd says it has
    exited. No sleeping in a loop: a short job ends the moment its shell does.
    stop() ends a run early: SIGTERM to its group, SIGKILL after the grace.
    """

    def __init__(self, claim, env, poller):
        self.claim = claim
        self.env = env
        self.poller = poller
        self.pid = None
        self.pidfd = None
        self.returncode = None
        self.pipes = {}                # read fd -> OutputTail
        self.tails = (OutputTail(claim.output_limit), OutputTail(claim.output_limit))
        self.started = time.monotonic()
        self.reason = None             # why it failed from outside: a timeout
        self.aborted = None            # why it was stopped: cold stop, claim lost
        self.kill_at = None            # when stop() escalates to SIGKILL
        self.duration_s = None

    def start(self):
        """Start the command; return None, or a RunResult if it could not start."""
        try:
            os.chdir(self.claim.cwd)
        except FileNotFoundError:
            return self.failed(f"cannot start: directory {self.claim.cwd} does not exist")
        except OSError as e:
            return self.failed(f"cannot start: cannot enter {self.claim.cwd}: "
                               f"{e.strerror}")
        try:
            out_r, out_w = os.pipe()
        except OSError as e:
            return self.failed(f"cannot start: no pipe for its output: {e.strerror}")
        try:
            err_r, err_w = os.pipe()
        except OSError as e:
            os.close(out_r)
            os.close(out_w)
            return self.failed(f"cannot start: no pipe for its output: {e.strerror}")
        try:
            self.started = time.monotonic()
            self.pid = spawn(self.claim.command, self.env, out_w, err_w)
        except OSError as e:
            for fd in (out_r, err_r):
                os.close(fd)
            return self.failed(f"cannot start: {e.strerror}: {SHELL}")
        finally:
            os.close(out_w)
            os.close(err_w)
        for fd, tail in ((out_r, self.tails[0]), (err_r, self.tails[1])):
            os.set_blocking(fd, False)
            self.pipes[fd] = tail
            self.poller.register(fd, select.POLLIN)
        try:
            self.pidfd = os.pidfd_open(self.pid)
            self.poller.register(self.pidfd, select.POLLIN)
        except (AttributeError, OSError):
            self.pidfd = None          # no pidfd (Linux < 5.3): tick() polls instead
        return None

    def failed(self, reason):
        return RunResult(exit_code=None, reason=reason, duration_s=0.0)

    def _close(self, fd):
        self.poller.unregister(fd)
        os.close(fd)

    @property
    def exited(self):
        return self.returncode is not None

    def readable(self, fd):
        """Handle one of its fds that poll() found ready; False if not one of its."""
        if fd in self.pipes:
            self._read(fd)
        elif fd == self.pidfd:
            self.reap(block=True)
        else:
            return False
        return True

    def _read(self, fd):
        """Read one chunk from a pipe; return whether there may be more now."""
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return False
        if chunk:
            self.pipes[fd].add(chunk)
            return True
        del self.pipes[fd]             # EOF: every writer has gone
        self._close(fd)
        return False

    def reap(self, block=False):
        """Collect the shell's exit status if it exited (or, with BLOCK, wait)."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.duration_s = time.monotonic() - self.started
                if self.pidfd is not None:
                    self._close(self.pidfd)
                    self.pidfd = None
        return self.returncode

    def stop(self, reason=None, aborted=None):
        """End the run early: SIGTERM to its group now, SIGKILL at the grace."""
        if self.kill_at is None and not self.exited:
            self.reason, self.aborted = reason, aborted
            _signal_group(self.pid, signal.SIGTERM)
            self.kill_at = time.monotonic() + KILL_GRACE_S

    def timeout_s(self, now):
        """How long the owner may wait before calling tick(), in seconds."""
        if self.kill_at is not None:                 # stopping: only the grace counts
            wait = self.kill_at - now
        else:
            wait = self.started + self.claim.timeout_s - now
        if self.pidfd is None:
            wait = min(wait, NO_PIDFD_POLL_S)
        return max(0.0, wait)

    def tick(self, now):
        """Act on the clock: the timeout, the end of a stop's grace, no pidfd."""
        if self.pidfd is None:
            self.reap()
        if self.exited:
            return
        if self.kill_at is not None and now >= self.kill_at:
            _signal_group(self.pid, signal.SIGKILL)
            self.kill_at = now + KILL_GRACE_S        # and again, if it must
        elif now >= self.started + self.claim.timeout_s:
            self.stop(reason=f"timeout after {self.claim.timeout_s:g}s")

    def follow(self, db_path):
        """Spool both streams beside the database, for `logs --follow`."""
        with contextlib.suppress(OSError):
            os.mkdir(db_path + SPOOL_SUFFIX, 0o700)
        for tail, stream in zip(self.tails, ("out", "err")):
            tail.follow(spool_path(db_path, self.claim.token, stream))

    def finish(self):
        """After the shell exited: end what it left in its group (SIGTERM, then
        SIGKILL after the grace), read the last of its output, return a RunResult.

        A job is its whole process group, so nothing it started outlives it. The
        group's id cannot be reused while a member lives, so no stranger is hit.
        """
        if _signal_group(self.pid, signal.SIGTERM):
            deadline = time.monotonic() + KILL_GRACE_S
            while time.monotonic() < deadline and _group_alive(self.pid):
                self._drain()
                time.sleep(0.02)
            _signal_group(self.pid, signal.SIGKILL)
        if self.reason or self.aborted:
            kill_run(self.claim.token)    # processes that left the group (setsid)
        self._drain()
        for fd in list(self.pipes):       # a process outside the group holds it open
            del self.pipes[fd]
            self._close(fd)
        for tail in self.tails:
            tail.unfollow()
        returncode = self.returncode
        reason = self.reason
        if reason is None and returncode != 0:
            reason = describe_exit(returncode)
        if self.aborted:
            reason = self.aborted
        (out, err) = self.tails
        return RunResult(exit_code=returncode, reason=reason, stdout=out.text(),
                         stderr=err.text(), stdout_dropped=out.dropped,
                         stderr_dropped=err.dropped, duration_s=self.duration_s,
                         aborted=self.aborted, started_mono=self.started)

    def _drain(self):
        """Read whatever is in the pipes now, without waiting for more."""
        for fd in list(self.pipes):
            while fd in self.pipes and self._read(fd):
                pass


def _processes_of_claim(token):
    """Return the pids whose environment carries this claim's marker (Linux /proc)."""
    marker = f"{CLAIM_ENV}={token}".encode()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue   # gone, or not ours to read
    return found


class RunKill:
    """Ends what is left of a run, a step at a time: SIGTERM to its processes,
    then, if any is left after GRACE_S, SIGKILL. poll() takes the next step when
    its time has come and says whether the run is gone, so a loop with other
    work to do (the supervisor's) can wait for it without blocking.

    It finds the run's processes two ways, each proven before a signal: its process
    group, if the group's leader is still the process that started it (same start
    time), and every process whose environment carries the run's marker (which
    also finds those that left the group). A reused pid is never hit. Zombies
    count as gone: they are dead, only not yet reaped by their parent.
    """

    def __init__(self, run_token, pgid=None, pg_start=None, grace_s=KILL_GRACE_S):
        self.run_token = run_token
        self.pgid = pgid
        self.pg_start = pg_start
        self.grace_s = grace_s
        self.signals = [signal.SIGTERM, signal.SIGKILL]
        self.deadline = 0.0

    def targets(self):
        if self.run_token is None:           # another host's run: nothing here
            return set(), []
        groups = set()
        if self.pgid and self.pg_start is not None and \
                start_ticks(self.pgid) == self.pg_start and _group_alive(self.pgid):
            groups.add(self.pgid)
        pids = _processes_of_claim(self.run_token)
        for pid in pids:
            with contextlib.suppress(OSError):
                groups.add(os.getpgid(pid))
        return groups, pids

    def poll(self):
        """Signal or look again; return True once nothing of the run is left (or
        the grace after SIGKILL has run out too)."""
        groups, pids = self.targets()
        if not groups and not pids:
            return True
        if time.monotonic() < self.deadline:
            return False
        if not self.signals:
            return True
        sig = self.signals.pop(0)
        for group in groups:
            with contextlib.suppress(OSError):
                os.killpg(group, sig)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        self.deadline = time.monotonic() + self.grace_s
        return False


def kill_run(run_token, pgid=None, pg_start=None, grace_s=KILL_GRACE_S):
    """Kill what is left of a run (see RunKill), waiting until it is gone."""
    kill = RunKill(run_token, pgid, pg_start, grace_s)
    while not kill.poll():
        time.sleep(KILL_POLL_S)


####
# Workers ####
####

class StopFlag:
    """Turns stop signals into a level: 0 run, WARM finish jobs, COLD kill them.

    COUNTED signals (a supervisor's SIGINT and SIGTERM) ask for a warm stop the
    first time and a cold one the second, counting only themselves. Any other stop
    signal sets its own level, so a repeat of it, or one that reaches a whole
    process group, changes nothing.
    """

    def __init__(self, counted=()):
        self.level = 0
        self.counted = counted
        self.count = 0

    def handle(self, signum, frame):
        if signum == COLD_SIGNAL:
            wanted = COLD
        elif signum in self.counted:
            self.count += 1
            wanted = min(self.count, COLD)
        else:
            wanted = WARM
        self.level = max(self.level, wanted)


class Recovery:
    """A lost claim being recovered: taken over, its run killed, then ended.

    Taking over first (a compare-and-set that swaps the owner token) leaves alone a
    claim renewed meanwhile and keeps everyone else off the job while its old
    processes are killed. The run keeps its own token, so if the recoverer dies
    half-way, the next one still finds those processes. The job then ends failed
    as worker lost, or (COLD) goes back to pending, or (not STARTED: its worker
    was lost before it began it) goes back as if it had never been claimed.
    """

    def __init__(self, job_id, taker, run_token, kill, who, cold, started):
        self.job_id = job_id
        self.taker = taker
        self.run_token = run_token
        self.kill = kill
        self.who = who
        self.cold = cold
        self.started = started
        self.killed = False          # its run is gone; only its record is left

    @classmethod
    def begin(cls, store, job_id, token, who, only_expired=False, cold=False,
              started=True, group=None):
        """Take the claim over; return a Recovery, or None if the claim was held
        (renewed, or recovered by someone else). GROUP is the run's (pgid, start
        ticks) if known from elsewhere than its record in the database."""
        taker = new_token()
        run = store.take_over(job_id, token, taker, os.getpid(),
                              start_ticks(os.getpid()), only_expired)
        if run is None:
            return None
        run_token, pgid, pg_start, host = run
        if pgid is None and group is not None:
            pgid, pg_start = group
        if not on_this_host(host):
            # Another host's run: its pids mean nothing here. That host ends its
            # run itself once it finds its claim gone; here it is only ended.
            return cls(job_id, taker, run_token, RunKill(None), who, cold, started)
        return cls(job_id, taker, run_token, RunKill(run_token, pgid, pg_start), who,
                   cold, started)

    def end(self, store):
        """Once its run is gone: end the attempt (and say so in the log). Return
        True if a run was interrupted and its job put back (a cold stop)."""
        remove_spools(store.local, self.run_token)
        if not self.started:
            store.give_back(self.job_id, self.taker)
        elif self.cold:
            if store.requeue(self.job_id, self.taker, ABORT_COLD):
                log(f"{self.who}: job {self.job_id} interrupted; back to pending")
                return True
        else:
            state = store.fence(self.job_id, self.taker, WORKER_LOST)
            if state:
                log(f"{self.who}: job {self.job_id} failed: {WORKER_LOST}; "
                    f"{AFTER_FAILURE[state]}")
        return False


def recover_claim(store, job_id, token, who, **how):
    """Recover a lost claim (see Recovery), waiting while its run is killed;
    return True if it did."""
    recovery = Recovery.begin(store, job_id, token, who, **how)
    if recovery is None:
        return False
    while not recovery.kill.poll():
        time.sleep(KILL_POLL_S)
    recovery.end(store)
    return True


def reclaim_expired(store, who, recover=recover_claim, known=None, claims=None,
                    mine=()):
    """Recover every job whose lease ran out and whose holder is not still
    running it; return the (job id, token) of the claims recovered. KNOWN(job
    id, token) says what the caller knows of a claim's run ({"started": ...,
    "group": ...}); RECOVER does the recovering. CLAIMS: the expired claims, if
    read already (Store.expired_claims). MINE: the pids of the caller's workers,
    whose claims it knows all of."""
    recovered = []
    for job_id, token, holder, holder_start, host in (
            store.expired_claims() if claims is None else claims):
        how = known(job_id, token) if known else {}
        # Whoever reclaims runs no job at this moment: a claim it holds itself is
        # one it took over and failed to end, so it is lost too; so is one its
        # own workers hold unknown to it (a claim whose commit it never heard
        # of). Another host's holder cannot be looked at: its lease is all there
        # is to go by.
        fenced = how.pop("fenced", False)
        if on_this_host(host) and holder in mine and not how:
            how = {"started": False}     # handed to no worker: it never ran
        elif on_this_host(host) and holder != os.getpid() and not fenced and \
                holder_running(holder, holder_start):
            continue       # late with its renewal (a pause, a clock step), not lost
        if recover(store, job_id, token, who, only_expired=True, **how):
            recovered.append((job_id, token))
    return recovered


def result_line(who, claim, result, state):
    """The log line of what became of a job after a run: STATE, or None if it
    was taken over."""
    if state is None:
        return (f"{who}: job {claim.id} was taken over (its lease ran out); this "
                f"run's result is dropped")
    if state == CANCELLED:
        return f"{who}: job {claim.id} was cancelled; its run ended ({result.reason})"
    if state == COMPLETED:
        return f"{who}: job {claim.id} completed in {format_duration(result.duration_s)}"
    return f"{who}: job {claim.id} failed: {result.reason}; {AFTER_FAILURE[state]}"


# The messages between a supervisor and one of its workers, over a pair of pipes.
#
# Supervisor to worker:
Assign = collections.namedtuple("Assign", "claim")
Assign.__doc__ = "Run this job (a Claim) next."
Abort = collections.namedtuple("Abort", "job_id token reason")
Abort.__doc__ = "Drop this claim, killing its run: cancelled, taken over (REASON)."
Unqueue = collections.namedtuple("Unqueue", "job_id token")
Unqueue.__doc__ = "Give this claim back if its run has not started (a pause)."
Recorded = collections.namedtuple("Recorded", "tokens")
Recorded.__doc__ = "These reports (claim tokens) are written down: forget them."
Leased = collections.namedtuple("Leased", "job_id token until")
Leased.__doc__ = ("This claim's lease is this host's until UNTIL (time.monotonic()): "
                  "a run still going a little before then is stopped (a shared store).")
# Worker to supervisor:
Ready = collections.namedtuple("Ready", "pid start")
Ready.__doc__ = "The worker's loop runs; START is its start time (/proc ticks)."
Started = collections.namedtuple("Started", "job_id token pgid pg_start started_mono")
Started.__doc__ = ("A command has run STARTED_AFTER_S: its process group, the group "
                   "leader's start ticks, and time.monotonic() when it started.")
Beat = collections.namedtuple("Beat", "job_id token")
Beat.__doc__ = "Renew this claim's lease: its run goes on."
Done = collections.namedtuple("Done", "job_id token result")
Done.__doc__ = "A run ended, with this RunResult (or never started: aborted)."
Returned = collections.namedtuple("Returned", "job_id token")
Returned.__doc__ = "This claim is given back unstarted."
Log = collections.namedtuple("Log", "line")
Log.__doc__ = "A line for the supervisor's log."

MESSAGES = (Assign, Abort, Unqueue, Recorded, Ready, Started, Beat, Done, Returned,
            Log, Leased)
_MESSAGE_CODES = {kind: code for code, kind in enumerate(MESSAGES)}


def _to_wire(message):
    """A message as plain values for marshal: its type's code, then its fields,
    the records among them (Claim, RunResult) as tuples."""
    if isinstance(message, Assign):
        return _MESSAGE_CODES[Assign], tuple(message.claim)
    if isinstance(message, Done):
        return (_MESSAGE_CODES[Done], message.job_id, message.token,
                message.result.fields())
    return (_MESSAGE_CODES[type(message)], *message)


def _from_wire(values):
    kind = MESSAGES[values[0]]
    if kind is Assign:
        return Assign(Claim(*values[1]))
    if kind is Done:
        return Done(values[1], values[2], RunResult(*values[3]))
    return kind(*values[1:])


class Channel:
    """Messages between the supervisor and one worker, over a pair of pipes.

    A message (one of MESSAGES) is sent as a 4-byte length and the marshal
    encoding of its plain values: both ends are the same program.
    receive() never waits. send() waits while the pipe is full, unless the
    channel is non-blocking (the supervisor's ends): then what does not fit
    waits in `outbox` for flush(), so that a worker that does not read (frozen,
    or busy sending) cannot block its supervisor.
    """

    def __init__(self, read_fd, write_fd):
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.buffer = bytearray()
        self.outbox = bytearray()
        self.ended = False                 # the other end has closed
        os.set_blocking(read_fd, False)

    def nonblocking(self):
        os.set_blocking(self.write_fd, False)
        return self

    @classmethod
    def pair(cls):
        """Two connected channels: (one end, the other end)."""
        a_read, b_write = os.pipe()
        b_read, a_write = os.pipe()
        return cls(a_read, a_write), cls(b_read, b_write)

    def fileno(self):
        return self.read_fd

    def fds(self):
        return [fd for fd in (self.read_fd, self.write_fd) if fd is not None]

    def send(self, message):
        """Send MESSAGE; raise OSError (BrokenPipeError) if the other end is gone."""
        data = marshal.dumps(_to_wire(message))
        self.outbox += len(data).to_bytes(4, "big") + data
        self.flush()

    def flush(self):
        """Write what the outbox holds, as much as the pipe takes now."""
        while self.outbox:
            try:
                written = os.write(self.write_fd, self.outbox)
            except BlockingIOError:
                return
            del self.outbox[:written]

    def receive(self):
        """Return the messages that have arrived (maybe none), without waiting.
        Once the other end has closed and all is read, `ended` is true."""
        while True:
            try:
                chunk = os.read(self.read_fd, READ_CHUNK)
            except BlockingIOError:
                break
            if not chunk:
                self.ended = True
                break
            self.buffer += chunk
        messages = []
        while len(self.buffer) >= 4:
            end = 4 + int.from_bytes(self.buffer[:4], "big")
            if len(self.buffer) < end:
                break
            messages.append(_from_wire(marshal.loads(self.buffer[4:end])))
            del self.buffer[:end]
        return messages

    def close(self):
        for fd in self.fds():
            os.close(fd)
        self.read_fd = self.write_fd = None


class RunMark:
    """What a worker is running, in memory it shares with its supervisor: the
    claim token of the run it is about to start, written before its command
    starts, then the command's process group and its leader's start ticks.

    So if the worker dies, even the instant its command starts (a command that
    kills its worker: `kill -9 $PPID`), its supervisor knows which claim may have
    run and counts it as a run, and finds its command, even if the command
    cleared its environment. The worker clears it once the run's end is
    reported; the supervisor reads a dead worker's last reports before its mark,
    so a mark left between the two names a claim already ended.
    """

    SIZE = 32                       # token (16 bytes), pgid (8), start ticks (8)

    def __init__(self):
        import mmap
        self.memory = mmap.mmap(-1, self.SIZE)    # anonymous, shared with the fork

    def starting(self, token):
        self.memory[16:] = bytes(16)
        self.memory[:16] = bytes.fromhex(token)

    def running(self, pgid, ticks):
        self.memory[16:] = pgid.to_bytes(8, "little") + (ticks or 0).to_bytes(8, "little")

    def clear(self):
        self.memory[:] = bytes(self.SIZE)

    def read(self, token):
        """(started, group) for the claim TOKEN: started False if the worker never
        began it; group (pgid, start ticks), or None if not written yet."""
        data = bytes(self.memory)
        if data[:16] != bytes.fromhex(token):
            return False, None
        pgid = int.from_bytes(data[16:24], "little")
        return True, ((pgid, int.from_bytes(data[24:], "little")) if pgid else None)


class Worker:
    """A worker process: runs the jobs its supervisor sends, one at a time, and
    reports how each run ended. It does not touch the database while its
    supervisor lives; orphaned, it finishes its job, records it, and exits.

    It takes Assign, Abort, Unqueue and Recorded messages, and sends Ready,
    Started, Beat, Done, Returned and Log (see MESSAGES).

    A worker whose jobs are quick may be sent its next job before the current one
    ends. It keeps that job only while the current one is young: once the
    current one has run STARTED_AFTER_S, or a stop comes, it gives it back.
    """

    def __init__(self, conn, index, db_path, local, stop, wake_fd, mark):
        self.conn = conn
        self.mark = mark                   # shared with the supervisor: see RunMark
        self.index = index
        self.db_path = db_path
        self.local = local                 # where its runs' output is spooled
        self.stop = stop
        self.wake_fd = wake_fd
        self.pid = os.getpid()
        self.name = f"worker {index} (pid {self.pid})"
        self.orphaned = False
        self.store = None                  # opened once orphaned
        self.inbox = collections.deque()
        # Reports sent but not yet written, by claim token: if the supervisor
        # dies before it writes them, this worker does.
        self.unconfirmed = {}
        # On a shared store: claim token -> until when its lease is surely this
        # host's (time.monotonic()), as its supervisor said (Leased).
        self.leased = {}
        self.env = dict(os.environ)
        if is_postgres(self.env.get(ENV_DB)):
            self.env[ENV_DB] = without_password(self.env[ENV_DB])
        self.poller = select.poll()
        self.poller.register(conn.fileno(), select.POLLIN)
        self.poller.register(wake_fd, select.POLLIN)

    def close(self):
        if self.store is not None:
            self.store.close()

    def loop(self):
        self.send(Ready(self.pid, start_ticks(self.pid)))
        while True:
            self.receive()
            if self.stop.level or self.orphaned:
                break
            if not self.inbox:
                self.poll(None)
                continue
            message = self.inbox.popleft()
            if isinstance(message, Assign):
                self.run(message.claim)
            # an "abort" of a run that has ended needs nothing
        self.give_back()                   # jobs handed over as the stop came
        if self.orphaned:
            self.log(f"{self.name}: supervisor is gone; stopping")

    def give_back(self, only=None):
        """Give back the jobs in the inbox (or the one ONLY names: its id and
        token): this worker will not start them."""
        for message in list(self.inbox):
            if not isinstance(message, Assign):
                continue
            claim = message.claim
            if only is not None and (claim.id, claim.token) != tuple(only):
                continue
            self.inbox.remove(message)
            if self.send(Returned(claim.id, claim.token)):
                self.unconfirmed[claim.token] = (claim, None)
            else:
                self.open_store().give_back(claim.id, claim.token)

    # -- talking to the supervisor ---------------------------------------------------

    def poll(self, timeout_s):
        """Wait up to TIMEOUT_S (None: until something happens); read messages and
        signals, and return the other fds that are ready."""
        ms = -1 if timeout_s is None else math.ceil(timeout_s * 1000)
        others = []
        for fd, _ in self.poller.poll(ms):
            if fd == self.wake_fd:
                with contextlib.suppress(OSError):
                    os.read(fd, 512)       # the signal's flag is set already
            elif fd == self.conn.fileno() and not self.orphaned:
                self.receive()
            else:
                others.append(fd)
        return others

    def receive(self):
        """Move every message waiting in the pipe to the inbox."""
        if not self.orphaned:
            for message in self.conn.receive():
                if isinstance(message, Unqueue):     # the queue was paused
                    self.give_back((message.job_id, message.token))
                elif isinstance(message, Recorded):
                    for token in message.tokens:
                        self.unconfirmed.pop(token, None)
                elif isinstance(message, Leased):
                    self.leased[message.token] = message.until
                else:
                    self.inbox.append(message)
            if self.conn.ended:
                self.orphan()

    def send(self, message):
        """Send MESSAGE to the supervisor; False once it is gone."""
        if not self.orphaned:
            try:
                self.conn.send(message)
                return True
            except OSError:
                self.orphan()
        return False

    def orphan(self):
        """The supervisor is gone: from now on this worker writes for itself,
        starting with what it reported that its supervisor had not written."""
        if not self.orphaned:
            self.orphaned = True
            self.poller.unregister(self.conn.fileno())
            for token, (claim, result) in list(self.unconfirmed.items()):
                del self.unconfirmed[token]
                if result is None:
                    self.open_store().give_back(claim.id, claim.token)
                else:
                    self.write_own(claim, result, again=True)

    def log(self, line):
        if not self.send(Log(line)):
            log(line)

    def aborted(self, claim):
        """Why the supervisor took CLAIM away (an "abort" in the inbox), or None."""
        for message in self.inbox:
            if isinstance(message, Abort) and \
                    (message.job_id, message.token) == (claim.id, claim.token):
                self.inbox.remove(message)
                return message.reason
        return None

    # -- running a job --------------------------------------------------------------

    def run(self, claim):
        self.receive()
        why = self.aborted(claim)
        if why is None and self.stop.level >= COLD:
            why = ABORT_COLD
        if why is not None:                # taken away before it started
            result = RunResult(exit_code=None, reason=why, aborted=why)
        else:
            env = dict(self.env, QUEUECTL_JOB_ID=claim.id,
                       QUEUECTL_ATTEMPT=str(claim.attempt), **{CLAIM_ENV: claim.token})
            run = Run(claim, env, self.poller)
            self.mark.starting(claim.token)
            result = run.start()
            if result is None:
                self.mark.running(run.pid, start_ticks(run.pid))
                result = self.watch(run)
        if self.send(Done(claim.id, claim.token, result)):
            self.unconfirmed[claim.token] = (claim, result)
        else:
            self.write_own(claim, result)
        self.mark.clear()

    def watch(self, run):
        """Wait for RUN to end, minding its timeout, stops, aborts and lease."""
        claim = run.claim
        beat_s = claim.lease_s / 3
        next_beat = run.started + beat_s
        tell_start = run.started + STARTED_AFTER_S
        while not run.exited:
            now = time.monotonic()
            wait = min(run.timeout_s(now), next_beat - now)
            if tell_start:
                wait = min(wait, tell_start - now)
            fence_at = self.fence_at(claim)
            if fence_at is not None and run.kill_at is None:
                wait = min(wait, fence_at - now)
            for fd in self.poll(max(0.0, wait)):
                run.readable(fd)
            now = time.monotonic()
            run.tick(now)
            why = self.aborted(claim)
            if why is None and self.stop.level >= COLD:
                why = ABORT_COLD
            fence_at = self.fence_at(claim)
            if why is None and fence_at is not None and now >= fence_at and \
                    run.kill_at is None:
                # Neither its supervisor nor this worker could renew the lease (the
                # database is away, or the supervisor frozen): another host may take
                # the job once it runs out, so this run must end before then.
                why = ABORT_FENCED
                self.log(f"{self.name}: job {claim.id}: its lease could not be renewed "
                         f"in time; stopping its run, so that it never runs twice at "
                         f"once")
            if why is not None:
                run.stop(aborted=why)
            if run.exited:
                break
            if tell_start and now >= tell_start:
                # Only a run that lasts is worth a record (a recoverer kills its
                # group by it, even if the command cleared its environment) and
                # a spool of its output.
                self.send(Started(claim.id, claim.token, run.pid,
                                  start_ticks(run.pid), run.started))
                run.follow(self.local)
                tell_start = None
            if not tell_start or self.stop.level:
                self.give_back()           # the next job must not wait behind this
            if now >= next_beat:
                if not self.beat(claim):
                    run.stop(aborted=ABORT_LOST)
                next_beat = now + beat_s
        return run.finish()

    def fence_at(self, claim):
        """When a run of CLAIM must be stopped if its lease is not renewed by
        then (a shared store), or None."""
        until = self.leased.get(claim.token)
        return None if until is None else until - fence_margin(claim.lease_s)

    def beat(self, claim):
        """Keep the claim's lease alive; False once the claim has been taken away."""
        if self.send(Beat(claim.id, claim.token)):
            return True
        try:
            asked = time.monotonic()
            renewed = self.open_store().renew(claim.id, claim.token, claim.lease_s)
            if renewed and claim.token in self.leased:
                self.leased[claim.token] = asked + claim.lease_s
            return renewed
        except QueueError as e:
            log(f"{self.name}: job {claim.id}: could not renew lease: {e}")
            return True      # try again at the next beat; the lease has slack

    def open_store(self):
        if self.store is None:
            self.store = open_store(self.db_path, create=False)
        return self.store

    def write_own(self, claim, result, again=False):
        """Orphaned: write the end of a run as the supervisor would have. AGAIN: it
        was reported, and its supervisor may have written it already."""
        store = self.open_store()
        remove_spools(self.local, claim.token)
        if result.aborted == ABORT_COLD:
            if store.requeue(claim.id, claim.token, ABORT_COLD):
                log(f"{self.name}: job {claim.id} interrupted; back to pending")
            return
        state = store.finish(claim.id, claim.token, result)
        if state is not None or not again:
            log(result_line(self.name, claim, result, state))


def _ignore_signal(signum, frame):
    pass


def _name_process(name):
    """Name this process for ps and top (Linux; 15 characters at most)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])


def run_worker(conn, index, db_path, local, private_fds, mark):
    """Entry point of a worker process, forked by its supervisor."""
    # First drop what the fork copied from the supervisor: its signal wake-up
    # pipe, its PID file (whose lock must die with the supervisor, not with its
    # last worker), and the other ends of every pipe, so that each worker sees
    # end-of-file the moment its supervisor dies.
    signal.set_wakeup_fd(-1)
    for fd in private_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    # The supervisor relays Ctrl-C and a closed terminal. Handlers, not SIG_IGN,
    # which would survive into the commands this worker starts.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _ignore_signal)
    stop = StopFlag()
    for sig in (signal.SIGTERM, WARM_SIGNAL, COLD_SIGNAL):
        signal.signal(sig, stop.handle)
    signal.signal(WAKE_SIGNAL, signal.SIG_DFL)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    _name_process(f"queuectl-w{index}")
    worker = Worker(conn, index, db_path, local, stop, wake_r, mark)
    try:
        worker.loop()
    except QueueError as e:        # an orphan could not reach the database
        log(f"{worker.name}: error: {e}")
        sys.exit(EXIT_ERROR)
    finally:
        worker.close()


class PidFile:
    """The supervisor's PID file beside the database, locked while it runs.

    The exclusive flock, not the pid written in the file, answers "is it running?":
    a stale file from a crash holds no lock, whatever process now has its pid.
    Line 1 is the supervisor pid, line 2 the worker pids, line 3 the supervisor's
    state: starting, running or stopping.

    The file is a fast path, not the only proof: the supervisor also records itself
    in the database (see find_supervisor), and writes the file again if something
    deletes it. Every OS error here is the caller's to log, as one line.
    """

    def __init__(self, path):
        self.path = path
        self.fd = None
        self.content = ([], SUPERVISOR_STARTING)

    def acquire(self):
        """Lock and claim the file, or raise QueueError if a supervisor holds it."""
        # A reader (status, worker stop) holds a shared lock for a moment, so a
        # held lock is only conclusive once it has stayed held a little while.
        deadline = time.monotonic() + 0.5
        while True:
            fd = self._lock()
            if fd is None:
                if time.monotonic() > deadline:
                    supervised = self._parse(self.path)
                    pid = supervised.pid if supervised else "?"
                    raise QueueError(f"workers are already running on this database "
                                     f"(supervisor pid {pid})") from None
                time.sleep(0.02)
                continue
            if fd is not False:
                self.fd = fd
                self.write(*self.content)
                return

    def _lock(self):
        """Open and lock the file at PATH: its fd; None if another process holds
        it; False if it was replaced meanwhile (try again)."""
        fd = _open_owner_only(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # The file may have been unlinked by an exiting supervisor after we
        # opened it; then our lock guards nothing, so start over.
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return False
        return fd

    def write(self, worker_pids, state):
        """Write the file's content (raise OSError if the disk refuses)."""
        self.content = (worker_pids, state)
        data = f"{os.getpid()}\n{' '.join(map(str, worker_pids))}\n{state}\n".encode()
        # Written over, then cut to length: a reader never sees the file empty,
        # and what an old, longer content leaves for a moment follows the last
        # line it reads.
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def restore(self):
        """If the file was deleted or replaced, write and lock it again; return
        True if it did. Raise QueueError or OSError if it cannot."""
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                return False
        except FileNotFoundError:
            pass
        fd = self._lock()
        if fd is None or fd is False:
            return False          # another process holds the new one: look again later
        os.close(self.fd)
        self.fd = fd
        self.write(*self.content)
        return True

    def release(self):
        """Unlock, and remove the file if it is still ours (raise OSError if the
        disk refuses; the lock is released all the same)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                        os.unlink(self.path)      # ours: not one put there since
            finally:
                os.close(fd)

    @staticmethod
    def _parse(path):
        """Return a Supervised read from PATH, or None if it is not complete yet."""
        try:
            with open(path) as f:
                lines = f.read().split("\n")
            pid = int(lines[0])
            return Supervised(pid, [int(p) for p in lines[1].split()], lines[2],
                              start_ticks(pid))
        except (OSError, ValueError, IndexError):
            return None

    @classmethod
    def holder(cls, path, tries=50):
        """Return a Supervised if a live supervisor holds PATH, else None."""
        for attempt in range(tries):
            try:
                fd = _open_owner_only(path, os.O_RDONLY)
            except QueueError:
                if not os.path.lexists(path):
                    return None
                if attempt >= 2:             # not a file of ours, for good
                    raise
                time.sleep(0.02)             # it was being made: look again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None                      # nobody holds it: stale or absent
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
            supervised = cls._parse(path)
            if supervised:
                return supervised
            time.sleep(0.02)                     # locked, not written yet
        return None




def supervisor_alive(row):
    """Whether the supervisor a supervisors row describes still runs: the same
    host and boot, and its pid still the process that started then."""
    if (row["host"], row["boot_id"]) != host_identity():
        return False
    fields = _proc_stat(row["pid"])
    if fields and fields[0] in "ZX":
        return False                           # exited; its parent has not reaped it
    if row["pid_start"] is None or start_ticks(row["pid"]) is None:
        return _pid_exists(row["pid"])         # no /proc: the pid alone
    return start_ticks(row["pid"]) == row["pid_start"]


def _pid_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                  # exists, but another user's
    return True


def find_supervisor(target, store=None):
    """The live supervisor, on this host, of the queue at TARGET (its --db, or
    for a SQLite file its local_base, which is the same), as a Supervised, or
    None.

    Its PID file's lock answers first. Something may have deleted that file (a
    cleaner of old files), so the database's record of the supervisor, proven
    alive, is asked next: deleting a file cannot hide a supervisor, nor let a
    second one start."""
    with contextlib.suppress(QueueError):      # not a file of ours: ask the database
        found = PidFile.holder(pid_path(local_base(target)))
        if found:
            return found
    try:
        if store is not None:
            rows = store.supervisors()
        else:
            with open_store(target, create=False, patient=False) as opened:
                rows = opened.supervisors()
    except NoDatabase:
        return None                           # no database: no supervisor either
    except QueueError:
        if not is_postgres(target):
            return None                       # a file it cannot read: nothing runs
        raise                                 # a server away: nothing is known
    for row in rows:
        if supervisor_alive(row):
            return Supervised(row["pid"], [int(p) for p in row["workers"].split()],
                              row["state"], row["pid_start"])
    return None


def pid_path(local):
    return local + PID_SUFFIX


def wake_supervisor(local):
    """Nudge this host's supervisor of the queue whose files start with LOCAL
    (Store.local), if one runs, to look for jobs now. (Other hosts' supervisors
    of a PostgreSQL queue hear it from the store, Store._notify.)

    The signal's default action is to do nothing, and the PID file's lock proves
    the pid is the supervisor's, so a nudge can never hurt another process.
    """
    with contextlib.suppress(QueueError):
        supervised = PidFile.holder(pid_path(local), tries=1)
        if supervised:
            with contextlib.suppress(OSError):
                os.kill(supervised.pid, WAKE_SIGNAL)


class Slot:
    """The supervisor's view of one worker process."""

    def __init__(self, index, process, conn, mark):
        self.index = index
        self.process = process
        self.conn = conn
        self.mark = mark          # what the worker runs (see RunMark)
        self.pid = process.pid
        self.start = start_ticks(process.pid)
        self.name = f"worker {index} (pid {self.pid})"
        self.born = time.monotonic()
        self.ready = False        # it said so: its loop runs
        self.writing = False      # its pipe is watched until its outbox is empty
        self.claims = []          # sent to it, not yet reported: [0] runs, [1] waits
        self.quick = False        # its last job ended within STARTED_AFTER_S

    def wants(self):
        """How many jobs to send it now: one if it is idle, and one more, to start
        when the current one ends, if its jobs are quick; so that no job waits
        behind a long one, a worker gives that one back as soon as it sees its
        current job run long."""
        if not self.ready:
            return 0
        return max(0, (2 if self.quick else 1) - len(self.claims))

    def run_facts(self, claim):
        """What is known of the run of one of its claims: whether the worker may
        have started it (it marks a run before starting its command), and its
        command's (pgid, start ticks) if known: from the mark or, if the worker
        stopped before writing it there (frozen the moment it started the
        command), from its child."""
        started, group = self.mark.read(claim.token)
        if started and group is None and start_ticks(self.pid) == self.start:
            children = _children(self.pid)      # of this worker, not of a reused pid
            group = children[0] if children else None
        return {"started": started, "group": group}

    def holding(self, job_id, token):
        """The position of that claim among the ones it holds, or None."""
        for position, claim in enumerate(self.claims):
            if (claim.id, claim.token) == (job_id, token):
                return position
        return None

    def send(self, message):
        """Send MESSAGE to the worker; False if it is gone (its exit says the rest)."""
        try:
            self.conn.send(message)
            return True
        except OSError:
            return False


WRITE_TROUBLE = "write what workers reported; will retry"
# What a supervisor may fail to do when a shared store's server is away.
DATABASE_TROUBLES = ("reach the database; jobs go on running, and what they report is "
                     "kept until it is back", "claim jobs", "check the jobs workers hold",
                     WRITE_TROUBLE,
                     "recover expired claims or purge", "store the output of running jobs")


class Supervisor:
    """Runs COUNT worker processes and writes for them.

    The supervisor is the one writer of the hot path: it claims jobs for its idle
    workers in one transaction, hands each over a pipe, and writes what the
    workers report (results, started process groups, lease renewals) in one
    transaction per batch. So workers never wait for SQLite's lock, and an fsync
    covers a batch. It replaces workers that die and recovers their jobs.

    First SIGINT/SIGTERM: warm stop (workers finish their jobs). Second: cold stop
    (workers kill their jobs and put them back as pending).
    """

    def __init__(self, db_path, count):
        self.db_path = db_path
        self.count = count
        self.stop = StopFlag(counted=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
        self.relayed = 0
        self.slots = {}              # index -> Slot
        self.restarts = {}           # index -> when to start that worker again
        self.recoveries = []         # Recovery of lost claims, their runs being killed
        self.local = local_base(db_path)   # its PID file, log and spools
        self.pidfile = PidFile(pid_path(self.local))
        self.store = None
        self.selector = None
        self.wake_fds = ()
        self.published = None
        self.look = True             # look for jobs: woken, due, or a worker is free
        self.check = False           # check the jobs workers hold: woken
        self.next_upkeep = 0.0       # retention, and trimming run_minutes
        self.next_due = None         # when the next delayed job is due (monotonic)
        self.next_tick = 0.0
        self.cold_deadline = None
        self.finished = []           # (slot, claim, RunResult) not yet written
        self.started = []            # (job id, token, pgid, its start ticks, start mono)
        self.renewed = []            # (job id, token, lease_s)
        self.unstarted = []          # (slot, claim) given back unrun
        self.spooled = set()         # tokens of runs that spool their output
        self.spent = collections.deque()   # (when, token): spools to remove then
        self.announced = set()       # tokens of runs whose start was logged
        self.starts = []             # (time.monotonic() at a start, its log line)
        self.interrupted = []        # ids of jobs a cold stop killed and put back
        self.record_at = None        # when to write them: RECORD_EVERY_S after the first
        self.id = new_token()        # this run's row in the supervisors table
        self.complaints = {}         # what it could not do -> the last error it logged
        # A shared store (PostgreSQL, many hosts): see tick_shared and fence.
        self.shared = False
        self.started_at = None
        self.listener = None         # hears other hosts' wake-ups (LISTEN)
        self.leases = {}             # claim token -> when its lease may run out
                                     # (monotonic), as far as this host knows
        self.fenced = {}             # token of a run stopped for a lease not renewed
                                     # -> when (monotonic)
        self.fence_kills = []        # RunKill of those runs, in case their worker froze
        self.unwritten = []          # ids of jobs whose recovery it could not begin
        self.database_away = False   # a shared store did not answer: say when it does
        self.shared_output = {}      # run token -> the size of its output last stored

    def run(self):
        import selectors
        # Handlers first: a stop may come the moment the PID file names us.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, WARM_SIGNAL,
                    COLD_SIGNAL):
            signal.signal(sig, self.stop.handle)
        signal.signal(WAKE_SIGNAL, self.wake)
        make_local_folder(self.local)
        self.pidfile.acquire()
        try:
            _name_process("queuectl-super")
            os.chdir("/")    # hold no directory busy; every path used is absolute
            LogRotation.enable(self.local + LOG_SUFFIX)
            with open_store(self.db_path) as store:
                self.shared = store.shared
                shown_db = store.path          # a password in a URL masked
                self.register(store)
                recovered = reclaim_expired(store, "supervisor")
                going = store.running_tokens()
            if recovered:
                log(f"supervisor: recovered {len(recovered)} job(s) of lost workers")
            sweep_spools(self.local, going)
            log(f"supervisor (pid {os.getpid()}): starting {self.count} worker(s) "
                f"on {shown_db}")
            # Signals wake the loop through this pipe; their handlers set flags.
            self.wake_fds = os.pipe()
            for fd in self.wake_fds:
                os.set_blocking(fd, False)
            signal.set_wakeup_fd(self.wake_fds[1])
            self.selector = selectors.DefaultSelector()
            self.selector.register(self.wake_fds[0], selectors.EVENT_READ,
                                   self.on_signal)
            for index in range(1, self.count + 1):
                if self.stop.level:
                    break
                self.start_worker(index)
            self.store = open_store(self.db_path, patient=False)
            self.listen()
            self.loop()
        finally:
            try:
                self.kill_all()
            finally:
                signal.set_wakeup_fd(-1)
                self.unlisten()
                if self.store is not None:
                    self.attempt("remove its record from the database",
                                 self.store.remove_supervisor, self.id)
                    self.store.close()
                if self.selector is not None:
                    self.selector.close()
                for fd in self.wake_fds:
                    os.close(fd)
                self.attempt("remove its PID file", self.pidfile.release)
        unrecorded = self.unrecorded()
        if unrecorded:
            log(f"supervisor: stopped; could not record what became of "
                f"{len(unrecorded)} running job(s) ({', '.join(unrecorded)}); they "
                f"stay processing until workers start again and recover them")
            return EXIT_ERROR
        if self.interrupted:
            log(f"supervisor: stopped; {len(self.interrupted)} running job(s) "
                f"interrupted and put back as pending ({', '.join(self.interrupted)})")
            return EXIT_INTERRUPTED
        log("supervisor: stopped")
        return EXIT_OK

    def register(self, store):
        """Record this supervisor in the database, or refuse to run beside another
        one on this host that is alive (its PID file may have been deleted). The
        rows of those that are gone are forgotten: on this host, those whose
        process is gone; of other hosts (a shared store), the lost ones."""
        def judge(row):
            if (row["host"], row["boot_id"]) == host_identity():
                alive = row["pid"] != os.getpid() and supervisor_alive(row)
                return "refuse" if alive else "forget"
            return "keep" if store.shared and not row["lost"] else "forget"
        self.started_at = iso(store.clock())
        store.register_supervisor(self.record(), judge)

    def record(self, workers=(), state=SUPERVISOR_STARTING):
        """This supervisor's row of the supervisors table."""
        host, boot = host_identity()
        return {"id": self.id, "host": host, "boot_id": boot, "pid": os.getpid(),
                "pid_start": start_ticks(os.getpid()),
                "workers": " ".join(map(str, workers)), "state": state,
                "started_at": self.started_at, "seen_at": self.started_at}

    def attempt(self, what, action, *args):
        """Do ACTION(*ARGS); if the disk or database refuses, log it (once for as
        long as the same error repeats) and go on: a read-only or full disk
        must not stop a supervisor mid-stop, nor leave a traceback."""
        try:
            action(*args)
        except (OSError, QueueError) as e:
            self.complain(what, e)
            return False
        self.complaints.pop(what, None)
        return True

    def complain(self, what, error):
        """Log that the supervisor could not do WHAT, unless it said so already."""
        if what in DATABASE_TROUBLES:
            self.database_away = self.shared
        error = error.strerror if isinstance(error, OSError) and error.strerror \
            else str(error)
        if self.complaints.get(what) != error:
            self.complaints[what] = error
            log(f"supervisor: could not {what}: {error}")

    def unrecorded(self):
        """Ids of jobs whose end this supervisor could not write down."""
        ids = [claim.id for _, claim, _ in self.finished]
        ids += [recovery.job_id for recovery in self.recoveries]
        ids += self.unwritten
        return list(dict.fromkeys(ids))

    def wake(self, signum, frame):
        """WAKE_SIGNAL: something was enqueued, cancelled, paused or resumed."""
        self.look = self.check = True

    def check_claims(self):
        """After a wake-up: drop what workers hold of jobs that were cancelled,
        and, if the queue was paused, give back the jobs they have not started."""
        self.check = False
        held = [(slot, claim) for slot in self.slots.values() for claim in slot.claims]
        if not held:
            return
        try:
            gone = self.store.not_held([(claim.id, claim.token) for _, claim in held])
            paused = self.store.paused()
        except QueueError as e:
            self.complain("check the jobs workers hold", e)
            return
        self.abort(gone, ABORT_CANCELLED)
        if paused:
            self.unqueue_all()

    def unqueue_all(self):
        """The queue is paused: take back the jobs workers hold but have not
        started."""
        for slot in self.slots.values():
            for claim in slot.claims[1:]:
                slot.send(Unqueue(claim.id, claim.token))

    # -- the loop ---------------------------------------------------------------------

    def loop(self):
        while self.slots or (self.restarts and not self.stop.level):
            self.react()
            if self.cold_deadline is not None and time.monotonic() > self.cold_deadline:
                log("supervisor: workers did not stop in time; killing them")
                return                          # run() kills them
            self.advance()
            self.watch_outboxes()
            self.publish(SUPERVISOR_STOPPING if self.stop.level else self.up_state())
            for key, _ in self.selector.select(self.timeout()):
                key.data(key.fileobj)

    def react(self):
        """Act on stop signals and on the clock."""
        if self.recoveries:
            self.step_recoveries()
        now = time.monotonic()
        while self.spent and self.spent[0][0] <= now:
            remove_spools(self.local, self.spent.popleft()[1])
        if self.stop.level > self.relayed:
            self.relay_stop()
            if self.stop.level >= COLD and self.cold_deadline is None:
                self.cold_deadline = now + COLD_STOP_GRACE_S
        if not self.stop.level:
            for index, when in list(self.restarts.items()):
                if now >= when:
                    del self.restarts[index]
                    self.start_worker(index)
        if self.next_due is not None and now >= self.next_due:
            self.look, self.next_due = True, None
        if self.shared:
            self.fence(now)
        if now >= self.next_tick:
            self.next_tick = now + IDLE_RECHECK_S
            self.restore_pidfile()
            if self.shared:
                self.tick_shared(now)
                return
            self.look = True                    # the safety net for a missed wake-up
            if not self.stop.level:
                try:
                    lost = reclaim_expired(self.store, "supervisor",
                                           recover=self.start_recovery,
                                           known=self.run_facts)
                    if now >= self.next_upkeep:
                        self.next_upkeep = now + self.upkeep()
                except QueueError as e:
                    log(f"supervisor: could not check leases or purge: {e}")
                else:
                    # A worker of ours, frozen: when it wakes it must not start
                    # the job, or go on running it.
                    self.abort(lost, ABORT_LOST)

    # -- a shared store: many hosts ------------------------------------------------------

    def tick_shared(self, now):
        """Once a tick, on a store that supervisors of many hosts share: one short
        transaction says this supervisor is alive and brings what other hosts
        did (a stop asked by worker stop --host, cancelled claims, a pause,
        expired claims, work to claim), which wake-ups (LISTEN) also bring
        sooner. Then recover the expired claims, and upkeep."""
        held = [(claim.id, claim.token) for slot in self.slots.values()
                for claim in slot.claims]
        state = SUPERVISOR_STOPPING if self.stop.level else self.up_state()
        record = self.record([slot.pid for slot in self.slots.values()], state)
        try:
            tick = self.store.tick(record, held)
        except QueueError as e:
            self.complain("reach the database; jobs go on running, and what they "
                          "report is kept until it is back", e)
            self.unlisten()
            return
        if self.database_away:
            # Said once, as each trouble was: the next one is said again.
            self.database_away = False
            for what in DATABASE_TROUBLES:
                self.complaints.pop(what, None)
            log("supervisor: the database answers again")
        if self.listener is None:
            self.listen()
        if tick.forgotten:
            log("supervisor: other hosts had taken this one for lost; recorded it "
                "again")
        if tick.stop > self.stop.level:
            log(f"supervisor: asked to stop by worker stop on another host"
                + (" (cold)" if tick.stop >= COLD else ""))
            self.stop.level = tick.stop
        self.abort(tick.gone, ABORT_CANCELLED)
        if tick.paused:
            self.unqueue_all()
        self.look = self.look or tick.work
        self.share_output()
        if self.stop.level:
            return
        try:
            lost = reclaim_expired(self.store, "supervisor", recover=self.start_recovery,
                                   known=self.run_facts, claims=tick.expired,
                                   mine=self.worker_pids())
            if now >= self.next_upkeep:
                self.next_upkeep = now + self.upkeep()
        except QueueError as e:
            self.complain("recover expired claims or purge", e)
        else:
            self.abort(lost, ABORT_LOST)

    def worker_pids(self):
        return {slot.pid for slot in self.slots.values()}

    def share_output(self):
        """Store the output of this host's running jobs that changed since the
        last tick, so that logs --follow and the dashboard on any host show it
        (about a second behind). It comes from their spools: bounded as they are."""
        tails = []
        for token in self.spooled:
            tail, ends = [token], []
            for short in ("out", "err"):
                data, _, end = Spool.read(spool_path(self.local, token, short),
                                          0) or (b"", 0, 0)
                tail += [data.decode("utf-8", "replace"), end - len(data)]
                ends.append(end)
            if self.shared_output.get(token) != ends:
                self.shared_output[token] = ends
                tails.append(tuple(tail))
        for token in set(self.shared_output) - self.spooled:
            del self.shared_output[token]
        self.attempt("store the output of running jobs", self.store.share_output,
                     tails)

    def fence(self, now):
        """Stop the runs whose lease this host could not renew in time (the
        database away, or their worker frozen), before it runs out and another
        host may take the job and run it again: the worker is told to, and, in
        case it is frozen, their processes here are killed too. Their jobs go
        back to pending once the database answers, unless another host has
        taken them (then nothing is written). A worker does the same for itself
        when its supervisor says nothing (Leased)."""
        for slot in self.slots.values():
            for claim in slot.claims:
                until = self.leases.get(claim.token)
                if until is None or claim.token in self.fenced or \
                        now < until - fence_margin(claim.lease_s):
                    continue
                self.fenced[claim.token] = now
                log(f"supervisor: job {claim.id}: its lease could not be renewed in "
                    f"time; stopping its run, so that it never runs twice at once")
                slot.send(Abort(claim.id, claim.token, ABORT_FENCED))
                group = slot.run_facts(claim)["group"]
                self.fence_kills.append(RunKill(claim.token, *(group or (None, None))))
        self.fence_kills = [kill for kill in self.fence_kills if not kill.poll()]

    def lease_kept(self, slot, claim, until):
        """Note that CLAIM's lease holds until UNTIL (monotonic), and tell its
        worker (a shared store)."""
        self.leases[claim.token] = until
        if self.shared:
            slot.send(Leased(claim.id, claim.token, until))

    def listen(self):
        """Hear other hosts' wake-ups (a shared store), if it can."""
        try:
            self.listener = self.store.listener()
        except QueueError as e:
            self.complain("listen for wake-ups; looking once a second instead", e)
            return
        if self.listener is not None:
            import selectors
            self.selector.register(self.listener, selectors.EVENT_READ, self.on_notify)

    def unlisten(self):
        if self.listener is not None:
            self.unregister(self.listener)
            self.listener.close()
            self.listener = None

    def on_notify(self, listener):
        """Another host enqueued, cancelled, paused or resumed."""
        try:
            listener.drain()
        except QueueError:
            self.unlisten()                     # the next tick listens again
        self.look = self.check = True

    def restore_pidfile(self):
        """Write the PID file again if something deleted it, so that the next
        worker stop finds it at once."""
        def restore():
            if self.pidfile.restore():
                log(f"supervisor: its PID file {self.pidfile.path} was deleted or "
                    f"replaced; wrote it again")
        self.attempt("write its PID file again", restore)

    def upkeep(self):
        """Purge completed jobs older than config `retention`, a batch at a time;
        trim the per-minute run counts. Return seconds until the next upkeep."""
        retention = self.store.config()["retention"]
        log(*(f"supervisor: {why}" for why in self.store.config_problems().values()))
        purged = 0
        if retention:
            purged = self.store.purge(COMPLETED, retention, limit=PURGE_BATCH)
            if purged:
                log(f"supervisor: purged {purged} completed job(s) older than "
                    f"{format_span(retention)} (retention)")
        self.store.trim_run_minutes()
        return IDLE_RECHECK_S if purged == PURGE_BATCH else UPKEEP_EVERY_S

    def timeout(self):
        """Seconds until the loop must run even if no fd is ready."""
        times = [self.next_tick, *self.restarts.values()]
        if self.next_due is not None:
            times.append(self.next_due)
        if self.cold_deadline is not None:
            times.append(self.cold_deadline)
        if self.record_at is not None:
            times.append(self.record_at)
        if self.spent:
            times.append(self.spent[0][0])
        if self.recoveries or self.fence_kills:
            times.append(time.monotonic() + RECOVERY_POLL_S)
        if self.shared:
            times += [self.leases[claim.token] - fence_margin(claim.lease_s)
                      for slot in self.slots.values() for claim in slot.claims
                      if claim.token in self.leases and claim.token not in self.fenced]
        return max(0.0, min(times) - time.monotonic())

    def on_signal(self, fd):
        with contextlib.suppress(OSError):
            os.read(fd, 512)                    # the handlers have set their flags

    def on_message(self, slot):
        """Read everything the worker sent."""
        if slot.conn.read_fd is None:
            return                              # on_exit came first, in one batch
        for message in slot.conn.receive():
            self.handle(slot, message)
        if slot.conn.ended:
            self.unregister(slot.conn)          # it is exiting; on_exit follows

    def handle(self, slot, message):
        """Act on one message from SLOT's worker."""
        if isinstance(message, Ready):
            slot.ready = True
            if self.relayed:                    # it may have missed the stop
                self.signal_worker(slot, self.relayed)
            return
        if isinstance(message, Log):
            log(message.line)
            return
        position = slot.holding(message.job_id, message.token)
        if position is None:
            return                              # a claim it no longer holds
        if isinstance(message, Done):
            claim, result = slot.claims.pop(position), message.result
            if claim.token in self.announced:
                self.announced.discard(claim.token)
            elif result.started_mono is not None:     # a run too short to say so
                self.announce(slot, claim, result.started_mono)
            slot.quick = (result.duration_s or 0) < STARTED_AFTER_S
            self.finished.append((slot, claim, result))
            self.look = True
        elif isinstance(message, Returned):
            self.unstarted.append((slot, slot.claims.pop(position)))
            self.look = True
        elif isinstance(message, Started):
            slot.quick = False
            self.spooled.add(message.token)
            self.started.append(tuple(message))
            self.announce(slot, slot.claims[position], message.started_mono)
            self.announced.add(message.token)
        elif isinstance(message, Beat):
            claim = slot.claims[position]
            self.renewed.append((claim.id, claim.token, claim.lease_s))
        self.reported()

    def announce(self, slot, claim, started_mono):
        """Log that a job's command started, stamped when it did: once, and only
        for a run that really started (not a claim given back unused). The line
        goes out with the loop's next batch of lines, in the same write."""
        self.starts.append((started_mono, f"{slot.name}: job {claim.id} started "
                                          f"(attempt {claim.attempt} of "
                                          f"{claim.max_retries + 1}): "
                                          f"{clip(claim.command, 200)}"))

    def start_lines(self):
        """The start lines announced since the last batch, each with its time."""
        if not self.starts:
            return []
        now, mono = now_utc(), time.monotonic()
        lines = [(now - timedelta(seconds=max(0.0, mono - started)), text)
                 for started, text in self.starts]
        self.starts = []
        return lines

    # -- writing: claims, then results ---------------------------------------------

    def advance(self):
        """Hand jobs to idle workers, then write what workers reported.

        Claims come first: they need no fsync, so a worker that just finished
        gets its next job at once (but after a job given back, see below). Reports are written in batches, at most
        RECORD_EVERY_S after the first of them, so one fsync covers many
        results; a worker never waits for that. The log says it the other way
        round, as a reader expects.
        """
        if self.check:
            self.check_claims()
        lines = []
        if self.unstarted and WRITE_TROUBLE not in self.complaints:
            # A job given back unstarted (sent ahead behind one that ran long) is
            # written back before the next claim, so that it goes first again,
            # not after the jobs queued behind it. (While writes fail, they are
            # retried at their own pace.)
            lines = self.write_reports()
        lines += self.dispatch()
        if self.record_at is not None and (time.monotonic() >= self.record_at
                                           or self.stop.level):
            lines = self.write_reports() + lines
            lines += self.dispatch()            # for jobs whose dependencies completed
        lines = self.start_lines() + lines
        if lines:
            log(*lines)

    def reported(self):
        """Something to write came in: write it within RECORD_EVERY_S."""
        if self.record_at is None:
            self.record_at = time.monotonic() + RECORD_EVERY_S

    def dispatch(self):
        """Claim a job for each idle worker, then one more for each worker whose
        jobs are quick, and send them; return the log lines."""
        if not self.look or self.stop.level:
            return []
        wants = [(slot, slot.wants()) for slot in self.slots.values()]
        slots = [slot for slot, n in wants if n]                  # their next job first
        slots += [slot for slot, n in wants if n == 2]            # then one more
        if not slots:
            return []
        ended = []
        asked = time.monotonic()        # no later than the database stamps the lease
        try:
            claims, next_due = self.store.claim([(s.pid, s.start) for s in slots],
                                                ended=ended)
        except QueueError as e:
            self.look = False                   # the next tick tries again
            if self.shared:
                self.complain("claim jobs", e)
                return []
            return [f"supervisor: could not claim jobs: {e}"]
        self.complaints.pop("claim jobs", None)
        lines = [f"supervisor: job {job_id} dead: {why}" for job_id, why in ended]
        for slot, claim in zip(slots, claims):
            slot.claims.append(claim)
            slot.send(Assign(claim))            # if it died, on_exit recovers the job
            self.lease_kept(slot, claim, asked + claim.lease_s)
        if len(claims) < len(slots):
            self.look = False
            self.next_due = None
            if next_due is not None:
                wait = (parse_iso(next_due) -
                        self.store.clock_estimate()).total_seconds()
                self.next_due = time.monotonic() + max(0.0, wait)
        return lines

    def write_reports(self):
        """Write every reported result, start and renewal in one transaction;
        return the log lines."""
        finished, started, renewed = self.finished, self.started, self.renewed
        # A run stopped by a cold stop goes back as pending; any other result is
        # written with a compare-and-set, which keeps only the output of a run
        # that was cancelled or taken over meanwhile.
        # A run this host stopped because it could not renew its lease goes back
        # as pending too, if no other host has taken its job meanwhile.
        for slot, claim, result in finished:
            if claim.token in self.fenced and result.aborted != ABORT_COLD:
                result.aborted = ABORT_FENCED   # it may have been killed, not aborted
        ended = [(slot, claim, result) for slot, claim, result in finished
                 if result.aborted not in (ABORT_COLD, ABORT_FENCED)]
        lines, dead = [], []
        asked = time.monotonic()        # no later than the database stamps leases
        try:
            states, lost, runnable = self.store.record(
                [(claim.id, claim.token, result) for _, claim, result in ended],
                started, renewed,
                [(claim.id, claim.token) for _, claim in self.unstarted], ended=dead)
            for slot, claim, result in finished:
                if result.aborted in (ABORT_COLD, ABORT_FENCED):
                    if self.store.requeue(claim.id, claim.token, result.aborted):
                        if result.aborted == ABORT_COLD:
                            self.interrupted.append(claim.id)
                        lines.append(f"{slot.name}: job {claim.id} interrupted"
                                     + ("" if result.aborted == ABORT_COLD else
                                        f" ({result.aborted})") + "; back to pending")
                    elif result.aborted == ABORT_FENCED:
                        lines.append(result_line(slot.name, claim, result, None))
        except QueueError as e:
            self.record_at = time.monotonic() + IDLE_RECHECK_S / 4
            self.complain(WRITE_TROUBLE, e)
            return []
        self.complaints.pop(WRITE_TROUBLE, None)
        lost_tokens = {token for _, token in lost}
        for slot in self.slots.values():
            for claim in slot.claims:
                if any(token == claim.token for _, token, _ in renewed) and \
                        claim.token not in lost_tokens:
                    self.lease_kept(slot, claim, asked + claim.lease_s)
        for _, claim, _ in finished:
            self.leases.pop(claim.token, None)
            self.fenced.pop(claim.token, None)
        for _, claim in self.unstarted:
            self.leases.pop(claim.token, None)
        # Followers of those runs read the rest from their spools, for a while.
        linger = time.monotonic() + SPOOL_LINGER_S
        for _, claim, _ in finished:
            if claim.token in self.spooled:
                self.spooled.discard(claim.token)
                self.spent.append((linger, claim.token))
        # Tell each worker what it no longer needs to keep.
        written = {}
        for slot, claim in [(slot, claim) for slot, claim, _ in finished] + self.unstarted:
            written.setdefault(slot, []).append(claim.token)
        for slot, tokens in written.items():
            if self.slots.get(slot.index) is slot:
                slot.send(Recorded(tokens))
        self.finished, self.started, self.renewed, self.unstarted = [], [], [], []
        self.record_at = None
        for (slot, claim, result), state in zip(ended, states):
            lines.append(result_line(slot.name, claim, result, state))
            if state == FAILED:
                self.look = True                # to learn when its retry is due
        lines += [f"supervisor: job {job_id} dead: {why}" for job_id, why in dead]
        if runnable:
            self.look = True                    # their dependencies completed
        self.abort(lost, ABORT_LOST)
        return lines

    def abort(self, claims, reason):
        """Tell the workers holding CLAIMS ((job id, token) pairs) to drop them."""
        for job_id, token in claims:
            for slot in self.slots.values():
                if slot.holding(job_id, token) is not None:
                    slot.send(Abort(job_id, token, reason))

    # -- workers: start, exit, stop ------------------------------------------------------

    def start_worker(self, index):
        import multiprocessing
        import selectors
        context = multiprocessing.get_context("fork")
        ours, theirs = Channel.pair()
        mark = RunMark()
        private = [self.pidfile.fd, *self.wake_fds, *ours.fds()]
        with contextlib.suppress(AttributeError):
            private.append(self.selector.fileno())
        if self.listener is not None:
            private.append(self.listener.fileno())
        for slot in self.slots.values():
            private += [slot.process.sentinel, *slot.conn.fds()]
        # fork, not spawn: a worker is up in a millisecond, not after a new
        # interpreter has started. It must not carry an open SQLite connection
        # (SQLite's locks are per process), so the supervisor closes its own. A
        # server's connection is a socket: the worker closes its copy, and the
        # supervisor keeps its own, so that a worker's death while the server is
        # away does not need the server.
        reopen = self.store is not None and not self.store.shared
        if self.store is not None and self.store.shared and self.store.conn is not None:
            with contextlib.suppress(Exception):
                private.append(self.store.conn.fileno())
        if reopen:
            self.store.close()
            self.store = None
        try:
            process = context.Process(target=run_worker, name=f"queuectl-worker-{index}",
                                      args=(theirs, index, self.db_path, self.local,
                                            private, mark))
            process.start()
        finally:
            theirs.close()
            if reopen:
                self.store = open_store(self.db_path, patient=False)
        slot = Slot(index, process, ours.nonblocking(), mark)
        self.slots[index] = slot
        self.selector.register(ours, selectors.EVENT_READ,
                               lambda _: self.on_message(slot))
        self.selector.register(process.sentinel, selectors.EVENT_READ,
                               lambda _: self.on_exit(slot))

    def unregister(self, fileobj):
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.unregister(fileobj)

    def watch_outboxes(self):
        """Watch the pipes of workers with messages waiting to be written."""
        import selectors
        for slot in self.slots.values():
            if slot.conn.outbox and not slot.writing:
                self.selector.register(slot.conn.write_fd, selectors.EVENT_WRITE,
                                       lambda _, slot=slot: self.on_writable(slot))
                slot.writing = True
            elif not slot.conn.outbox and slot.writing:
                self.unregister(slot.conn.write_fd)
                slot.writing = False

    def on_writable(self, slot):
        if slot.conn.write_fd is None:
            return                              # on_exit came first, in one batch
        try:
            slot.conn.flush()
        except OSError:
            slot.conn.outbox.clear()            # it is gone; on_exit follows

    def forget(self, slot):
        """Take an exited worker out of the pool."""
        self.unregister(slot.conn)
        if slot.writing:
            self.unregister(slot.conn.write_fd)
        self.unregister(slot.process.sentinel)
        slot.process.join()
        slot.conn.close()
        del self.slots[slot.index]

    def on_exit(self, slot):
        self.on_message(slot)         # what it sent before it died: a last result
        self.forget(slot)
        if slot.claims:               # it died running a job: recover it now
            self.recover(slot, cold=self.stop.level >= COLD)
            self.look = True
        if self.stop.level:
            return
        log(f"supervisor: {slot.name} ended ({describe_exit(slot.process.exitcode)}); "
            f"starting a new one")
        now = time.monotonic()
        # Do not spin on a worker that cannot start.
        self.restarts[slot.index] = now + (RESTART_DELAY_S
                                           if now - slot.born < RESTART_DELAY_S else 0)

    def recover(self, slot, cold):
        """Recover the jobs of a worker that is gone (see Slot.run_facts)."""
        for claim in list(slot.claims):
            self.spooled.discard(claim.token)       # the recovery removes its spools
            self.announced.discard(claim.token)
            self.leases.pop(claim.token, None)
            how = slot.run_facts(claim)
            try:
                self.start_recovery(self.store, claim.id, claim.token, "supervisor",
                                    cold=cold, **how)
            except QueueError as e:
                log(f"supervisor: could not recover job {claim.id} of pid "
                    f"{slot.pid} ({e}); the lease check will retry")
        slot.claims = []

    def run_facts(self, job_id, token):
        """What is known of the run of a claim held by one of the workers; with
        fenced True if this supervisor stopped it (see fence) and its worker has
        not answered since: then it is lost once its lease runs out, even if
        its worker lives (frozen)."""
        for slot in self.slots.values():
            for claim in slot.claims:
                if (claim.id, claim.token) == (job_id, token):
                    fenced = self.fenced.get(claim.token)
                    return dict(slot.run_facts(claim), fenced=fenced is not None and
                                time.monotonic() - fenced > KILL_GRACE_S + 1)
        return {}

    def start_recovery(self, store, job_id, token, who, **how):
        """Begin recovering a claim; its run is killed while the loop goes on."""
        recovery = Recovery.begin(store, job_id, token, who, **how)
        if recovery is not None:
            self.recoveries.append(recovery)
        return recovery is not None

    def step_recoveries(self):
        """Take the next step of each recovery; end those whose runs are gone."""
        for recovery in list(self.recoveries):
            if not recovery.kill.poll():
                continue
            recovery.killed = True
            ended = []
            if not self.attempt("write the end of a recovered job; will retry",
                                lambda: ended.append(recovery.end(self.store))):
                continue
            if ended[0]:
                self.interrupted.append(recovery.job_id)
            self.recoveries.remove(recovery)
            self.look = True

    def relay_stop(self):
        self.relayed = self.stop.level
        self.restarts.clear()
        if self.stop.level == WARM:
            log("supervisor: stopping; running jobs finish first (a second Ctrl-C "
                "or SIGTERM, or worker stop --timeout, kills them)")
        else:
            log("supervisor: cold stop; killing running jobs and putting them back")
        for slot in self.slots.values():
            self.signal_worker(slot, self.stop.level)

    @staticmethod
    def signal_worker(slot, level):
        with contextlib.suppress(ProcessLookupError):
            os.kill(slot.pid, signal.SIGTERM if level == WARM else COLD_SIGNAL)

    def kill_all(self):
        """SIGKILL every worker still alive and give its job back (cold stop)."""
        self.stop.level = max(self.stop.level, COLD)
        self.restarts.clear()
        for slot in list(self.slots.values()):
            self.on_message(slot)
            if slot.process.is_alive():
                slot.process.kill()
            known = [(claim, slot.run_facts(claim)) for claim in slot.claims]
            self.forget(slot)
            if self.store is not None:
                for claim, how in known:
                    try:
                        self.start_recovery(self.store, claim.id, claim.token,
                                            "supervisor", cold=True, **how)
                    except QueueError as e:
                        # The database is away: the run goes all the same; its
                        # claim is recovered once its lease runs out.
                        self.complain("recover the jobs of its workers", e)
                        group = how.get("group") or (None, None)
                        self.fence_kills.append(RunKill(claim.token, *group))
                        self.unwritten.append(claim.id)
        # Kill every run; then write what became of them, for a short while if the
        # database refuses (read-only, full): processes must go, records may wait.
        give_up = None
        while self.store is not None and (self.recoveries or self.record_at or
                                          self.fence_kills):
            self.fence_kills = [kill for kill in self.fence_kills if not kill.poll()]
            self.step_recoveries()
            if self.record_at is not None:
                log(*(self.start_lines() + self.write_reports()))
            if not self.fence_kills and all(recovery.killed
                                            for recovery in self.recoveries):
                give_up = give_up or time.monotonic() + STOP_RECORD_TRIES_S
                if time.monotonic() > give_up:
                    break
            time.sleep(KILL_POLL_S)
        while self.spent:
            remove_spools(self.local, self.spent.popleft()[1])

    # -- the PID file --------------------------------------------------------------------

    def up_state(self):
        """running once every worker has reached its loop, else starting."""
        ready = self.slots and all(slot.ready for slot in self.slots.values())
        return SUPERVISOR_UP if ready and not self.restarts else SUPERVISOR_STARTING

    def publish(self, state):
        """Write the live worker pids and the state to the PID file and the
        database's record, if changed."""
        now = ([slot.pid for slot in self.slots.values()], state)
        if now != self.published:
            self.published = now
            self.attempt("write its PID file", self.pidfile.write, *now)
            self.attempt("record its state in the database",
                         self.store.update_supervisor, self.id, *now)


def start_detached(db_path, count, log_path):
    """Start a supervisor in the background; return (pid, worker pids) once up."""
    import subprocess
    script = os.path.abspath(__file__)
    fd = _open_owner_only(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        offset = os.lseek(fd, 0, os.SEEK_END)
        # A new session and no inherited stdout: the caller's shell never waits on us.
        # A URL goes in the environment, not on the command line, where `ps`
        # would show a password it holds to every user of the machine.
        postgres = is_postgres(db_path)
        proc = subprocess.Popen(
            # -I -S: start faster, and import nothing from where it was started;
            # but psycopg lives in site-packages.
            [sys.executable, *([] if postgres else ["-I", "-S"]), script,
             *([] if postgres else ["--db", db_path]), "worker", "start",
             "--count", str(count)],
            env=dict(os.environ, **{ENV_DB: db_path}) if postgres else None,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fd,
            start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    wait_s = DETACH_WAIT_S + count * 0.5
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise QueueError(_last_error_line(log_path, offset)
                             or f"supervisor exited with code {proc.returncode}")
        supervisor = PidFile.holder(pid_path(local_base(db_path)))
        if supervisor and supervisor.pid == proc.pid and \
                supervisor.state == SUPERVISOR_UP:
            return supervisor
        time.sleep(0.05)
    # Half started is worse than not started: stop it (warm: it runs no job yet).
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    raise QueueError(f"workers did not start within {wait_s:.0f}s; see {log_path}")


def _last_error_line(log_path, offset):
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return None
    errors = [line for line in lines if "error: " in line]
    return errors[-1].split("error: ", 1)[-1] if errors else None


####
# Operations and documents ####
####

# Each action is one function here, used by the command line and the dashboard
# alike: it changes the store, wakes the supervisor when its workers have
# something to do (work became runnable, or claims they hold must be dropped),
# and says what it did in one Outcome, in the same words for both.

class Outcome(collections.namedtuple("Outcome", "lines notes code")):
    """What an action did: LINES (the CLI prints them on stdout; the dashboard
    answers them), NOTES of what it left undone or wants known (stderr), and the
    exit CODE of the CLI."""

    def __new__(cls, lines=(), notes=(), code=EXIT_OK):
        return super().__new__(cls, list(lines), list(notes), code)

    def message(self, most=3):
        """The lines and notes as one message, the first MOST of each."""
        def some(items):
            return items[:most] + ([f"... and {len(items) - most} more"]
                                   if len(items) > most else [])
        return "; ".join(some(self.lines) + some(self.notes))


def enqueue_jobs(store, jobs, cwd, now=None):
    """Add validated jobs (validated at NOW, by this host's clock); lines: their
    ids; notes: the jobs that a unique key kept out or a dead dependency added
    dead. A shared store stamps them by its own clock."""
    if store.shared:
        ids, notes = store.enqueue(jobs, cwd, validated_at=now)
    else:
        ids, notes = store.enqueue(jobs, cwd, now)
    wake_supervisor(store.local)
    return Outcome(ids, [notes[index] for index in sorted(notes)])


def cancel_jobs(store, job_ids):
    """Cancel jobs that have not finished (Store.cancel), kill what runs of them,
    and say which waiting jobs ended dead with them."""
    ended = []
    cancelled = store.cancel(job_ids, ended=ended)
    wake_supervisor(store.local)            # so that its workers drop these at once
    # A run on another host is killed there, by its own supervisor.
    runs = [run[:3] for _, _, run in cancelled if run and on_this_host(run[3])]
    for run in runs:
        kill_run(*run)                     # SIGTERM now, SIGKILL after the grace
    if runs:
        # A run that its worker started the moment it was cancelled: its worker
        # is told to kill it too; this makes sure.
        time.sleep(CANCEL_RECHECK_S)
        for run in runs:
            kill_run(*run)
    lines = [f"{job_id}: cancelled" + ("" if not run else
                                       " (its run was killed)" if on_this_host(run[3])
                                       else f" (its run on host {run[3].split('/')[0]} "
                                            f"is killed there within about a second)")
             for job_id, _, run in cancelled]
    lines += [f"{job_id}: dead ({why})" for job_id, why in ended
              if job_id not in job_ids]
    return Outcome(lines)


def retry_jobs(store, job_ids=None):
    """Send dead jobs back to pending: those named (all or none), or with None
    every dead job that can go back, naming the others."""
    ids, left = store.retry_dead(job_ids)
    if ids:
        wake_supervisor(store.local)
    notes = [f"job {job_id} stays dead: {why}" for job_id, why in left.items()]
    if not ids and not left:
        notes = ["the DLQ is empty"]
    return Outcome([f"{job_id}: back to pending" for job_id in ids], notes)


def delete_jobs(store, job_ids):
    store.delete(job_ids)
    return Outcome([f"{job_id}: deleted" for job_id in job_ids])


def pause_queue(store):
    since = store.pause()
    wake_supervisor(store.local)            # so that it takes back unstarted jobs
    return Outcome([f"paused since {since}: workers start no new job; running "
                    f"jobs go on (resume lets them start jobs again)"])


def resume_queue(store):
    since = store.resume()
    wake_supervisor(store.local)
    return Outcome([f"resumed (paused since {since})" if since
                    else "the queue was not paused"])


def purge_jobs(store, states, older_than_s=0):
    """Delete finished jobs in STATES older than OLDER_THAN_S, with their history."""
    age = f" older than {format_span(older_than_s)}" if older_than_s else ""
    return Outcome([f"purged {store.purge(state, older_than_s)} {state} job(s){age}"
                    for state in states])


# -- documents: what --json prints and the dashboard's API answers -------------------

def status_report(store, max_age=None, max_dead=0):
    """The status --json document, and the --check exit codes of its problems."""
    counts, oldest, running = store.status()
    blocked = store.waiting_for_dependencies()
    paused = store.paused()
    now = store.clock()
    oldest_age = max(0.0, (now - parse_iso(oldest)).total_seconds()) if oldest else None
    running = {(host or host_id(), pid): job for (host, pid), job in running.items()}
    supervisors = supervisor_documents(store, running)
    here = next((s for s in supervisors if s["this_host"]), None)
    workers = here["workers"] if here else []
    listed = {(s["host_id"], w["pid"]) for s in supervisors for w in s["workers"]}
    answering = {s["host_id"] for s in supervisors if not s["lost"]}
    # Jobs held by processes that are not the workers of a supervisor: the workers
    # of a killed supervisor finishing up, or claims waiting for their lease to
    # run out (of a lost host, too).
    others = [{"pid": pid, "host": host.split("/")[0],
               "job_id": job["id"], "command": job["command"],
               "alive": _pid_exists(pid) if on_this_host(host) else host in answering,
               "lease_until": job["lease_until"]}
              for (host, pid), job in sorted(running.items(), key=repr)
              if (host, pid) not in listed]
    state = here["state"] if here else None
    working = [s for s in supervisors if not s["lost"] and s["workers"]]
    problems = []
    # A paused queue's jobs wait on purpose: that is no sign of missing workers.
    if oldest is not None and not paused and \
            all(s["state"] == SUPERVISOR_STOPPING for s in working):
        problems.append((EXIT_CHECK_NO_WORKERS,
                         "jobs are waiting but no workers are running"
                         + (" (they are stopping)" if working else "")))
    stuck = [w["job_id"] for w in others if not w["alive"]]
    if stuck and not working:
        problems.append((EXIT_CHECK_NO_WORKERS,
                         f"{len(stuck)} job(s) held by a worker that is gone; start "
                         f"workers to recover them"))
    fields = _proc_stat(here["pid"]) if here else None
    if fields and fields[0] in "Tt":
        problems.append((EXIT_CHECK_NO_WORKERS,
                         f"the supervisor (pid {here['pid']}) is stopped (SIGSTOP?): no "
                         f"job starts until it is continued (kill -CONT {here['pid']})"))
    lost = [s["host"] for s in supervisors if s["lost"]]
    if lost:
        problems.append((EXIT_CHECK_NO_WORKERS,
                         f"{len(lost)} host(s) stopped answering: {', '.join(lost)}"))
    if oldest_age is not None and max_age is not None and oldest_age > max_age:
        problems.append((EXIT_CHECK_STALE, f"oldest runnable job has waited "
                                           f"{format_duration(oldest_age)} "
                                           f"(more than {max_age:g}s)"))
    if counts[DEAD] > max_dead:
        problems.append((EXIT_CHECK_DEAD, f"{counts[DEAD]} dead job(s) in the DLQ"))
    report = {
        "db": store.path,
        "counts": counts,
        "waiting_for_dependencies": blocked,     # of the pending jobs
        "dlq": counts[DEAD],
        "oldest_runnable_age_s": oldest_age,
        "paused": paused is not None,
        "paused_since": paused,
        "supervisor_pid": here["pid"] if here else None,
        "supervisor_state": state,
        "workers": workers,
        "supervisors": [{key: value for key, value in s.items()
                         if key not in ("host_id", "this_host")} for s in supervisors],
        "other_claims": others,
        "healthy": not problems,
        "problems": [text for _, text in problems],
    }
    return report, [code for code, _ in problems]


def supervisor_documents(store, running):
    """Every supervisor of the queue, as status shows it: this host's (proven
    alive, see find_supervisor) first, then, on a shared store, those of other
    hosts, each marked lost once it stops answering. Each lists its workers and
    the job each holds (RUNNING: Store.status's)."""
    here = host_id()
    found = []
    supervisor = find_supervisor(store.local, store)
    rows = store.supervisors() if store.shared else []
    if supervisor:
        row = next((row for row in rows if row["pid"] == supervisor.pid and
                    (row["host"], row["boot_id"]) == host_identity()), {})
        found.append({"host": host_identity()[0], "host_id": here, "this_host": True,
                      "pid": supervisor.pid, "state": supervisor.state,
                      "workers": supervisor.workers,
                      "started_at": row.get("started_at"), "seen_at": row.get("seen_at"),
                      "lost": False})
    for row in rows:
        if (row["host"], row["boot_id"]) == host_identity():
            continue                        # this host's: its PID file says more
        found.append({"host": row["host"], "this_host": False,
                      "host_id": f"{row['host']}/{row['boot_id']}" if row["boot_id"]
                      else row["host"], "pid": row["pid"], "state": row["state"],
                      "workers": [int(pid) for pid in row["workers"].split()],
                      "started_at": row["started_at"], "seen_at": row["seen_at"],
                      "lost": row["lost"]})
    for supervisor in found:
        supervisor["workers"] = [
            {"pid": pid,
             "job_id": running[(supervisor["host_id"], pid)]["id"]
             if (supervisor["host_id"], pid) in running else None,
             "command": running[(supervisor["host_id"], pid)]["command"]
             if (supervisor["host_id"], pid) in running else None}
            for pid in supervisor["workers"]]
    return found


def job_document(store, job_id):
    """The show --json document of a job: its fields, runs and last output."""
    job, attempts = store.get_job(job_id)
    history = [{
        "number": a["number"], "worker_pid": a["worker_pid"],
        "started_at": a["started_at"], "finished_at": a["finished_at"],
        "outcome": a["outcome"], "exit_code": a["exit_code"], "reason": a["reason"],
        "duration_s": a["duration_s"]} for a in attempts]
    last = next((a for a in reversed(attempts)
                 if a["outcome"] in (COMPLETED, FAILED, CANCELLED)), None)
    waiting_for = [dep["id"] for dep in job["after"] if dep["state"] != COMPLETED]
    if job["state"] != PENDING:
        waiting_for = []
    job["waiting_for"] = waiting_for
    output = None
    if last is not None:
        output = {"stdout": last["stdout"] or "", "stderr": last["stderr"] or "",
                  "stdout_dropped_bytes": last["stdout_dropped"],
                  "stderr_dropped_bytes": last["stderr_dropped"]}
    return dict(job, history=history, output=output)


def ended_unrun(job, again=False):
    """Say that a job ended without a (new) run: cancelled, or dead through a
    dependency."""
    return (f"job {job['id']} ended {job['state']} without running"
            + (" again" if again else "")
            + (f": {job['last_error']}" if job["last_error"] else ""))


def logs_document(db_path, job, run):
    """The logs --json document of a job's RUN (an attempts row, or None)."""
    if run is None:                      # the same fields, all empty
        return {"id": job["id"], "state": job["state"], "run": None, "outcome": None,
                "stdout": "", "stdout_dropped_bytes": 0, "stderr": "",
                "stderr_dropped_bytes": 0}
    return dict({"id": job["id"], "state": job["state"], "run": run["number"],
                 "outcome": run["outcome"]}, **_run_output(db_path, run))


def _run_output(db_path, run):
    """A run's stdout and stderr: the stored copy, or while it runs, its spool
    (on this host; that of a run on another host, stored by its supervisor
    once a second, is the stored copy too)."""
    output = {}
    for stream, short in (("stdout", "out"), ("stderr", "err")):
        text, dropped = run[stream] or "", run[f"{stream}_dropped"]
        if run["outcome"] == RUN_GOING:
            spooled = Spool.read(spool_path(db_path, run["run_token"], short), 0)
            if spooled:
                data, dropped, _ = spooled
                text = data.decode("utf-8", "replace")
        output[stream], output[f"{stream}_dropped_bytes"] = text, dropped
    return output


def run_ending(job, run):
    """How a run that did not complete ended, and what became of its job:
    'run 2 of job X failed (exit 3); the job will be retried'."""
    how = run["reason"] if run["reason"] and run["reason"] != run["outcome"] else None
    after = {FAILED: "the job will be retried", DEAD: "the job is dead (in the DLQ)",
             PENDING: "the job is back to pending",
             PROCESSING: "the job runs again"}.get(job["state"])
    return (f"run {run['number']} of job {job['id']} ended {run['outcome']}"
            + (f" ({how})" if how else "") + (f"; {after}" if after else ""))


def config_document(db_path):
    """(values, problems) of a database's settings (Store.config_problems); the
    defaults, creating nothing, before there is a database."""
    if not is_postgres(db_path) and (
            not os.path.exists(db_path) or
            (os.path.isfile(db_path) and not os.path.getsize(db_path))):
        return dict(CONFIG_DEFAULTS), {}
    if is_postgres(db_path):
        # No schema yet: the defaults. A server that cannot be reached, or a
        # schema of another program's tables, is an error, as for a SQLite file.
        with PostgresStore(db_path, check_only=True) as store:
            if not store.version:
                return dict(CONFIG_DEFAULTS), {}
            return store.config(), store.config_problems()
    with open_store(db_path, create=False) as store:
        return store.config(), store.config_problems()


def overview_document(store):
    """What the dashboard's overview shows: status, the last hour's runs by
    minute, and the job that has waited longest."""
    now = store.clock()
    report = status_report(store)[0]
    by_minute = store.run_minutes(now - timedelta(minutes=59))
    oldest = store.oldest_waiting(now)
    minutes = []
    for n in range(59, -1, -1):
        minute = iso(now - timedelta(minutes=n))[:16]
        runs = by_minute.get(minute, {})
        minutes.append({"minute": minute + ":00.000Z",    # as every time here
                        "completed": runs.get(COMPLETED, 0),
                        "failed": runs.get(FAILED, 0)})
    return {"status": report, "minutes": minutes, "oldest_waiting": oldest}


def _label(value):
    """VALUE as a Prometheus label value: backslash, quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_metrics(report, totals):
    """The Prometheus text format of the queue's state and run totals."""
    lines = []

    def metric(name, kind, help_text, samples):
        lines.append(f"# HELP queuectl_{name} {help_text}")
        lines.append(f"# TYPE queuectl_{name} {kind}")
        for labels, value in samples:
            label = "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""
            lines.append(f"queuectl_{name}{label} {value!r}")   # floats exact

    metric("jobs", "gauge", "Jobs by state.",
           [((("state", state),), report["counts"][state]) for state in STATES])
    metric("runs_total", "counter", "Runs that have ended, by outcome.",
           [((("outcome", outcome),), sum(runs for _, runs, _ in totals.get(outcome, ())))
            for outcome in (COMPLETED, FAILED, INTERRUPTED, CANCELLED)])
    cumulative, samples = 0, []
    completed = dict((bucket, runs) for bucket, runs, _ in totals.get(COMPLETED, ()))
    for bucket, bound in enumerate(RUN_TIME_BUCKETS):
        cumulative += completed.get(bucket, 0)
        samples.append(((("le", f"{bound:g}"),), cumulative))
    cumulative += completed.get(len(RUN_TIME_BUCKETS), 0)
    samples.append(((("le", "+Inf"),), cumulative))
    lines.append("# HELP queuectl_run_duration_seconds Run time of completed runs.")
    lines.append("# TYPE queuectl_run_duration_seconds histogram")
    for labels, value in samples:
        lines.append(f'queuectl_run_duration_seconds_bucket{{le="{labels[0][1]}"}} {value}')
    seconds = sum(s for _, _, s in totals.get(COMPLETED, ()))
    lines.append(f"queuectl_run_duration_seconds_sum {float(seconds)!r}")
    lines.append(f"queuectl_run_duration_seconds_count {cumulative}")
    metric("workers", "gauge", "Worker processes of the running supervisor.",
           [((), len(report["workers"]))])
    if report["supervisors"]:               # every host's (a shared store: many)
        hosts = [((("host", _label(s["host"])),), s) for s in report["supervisors"]]
        metric("host_workers", "gauge", "Worker processes of each host's supervisor.",
               [(labels, len(s["workers"])) for labels, s in hosts])
        metric("host_lost", "gauge", "1 if a host's supervisor stopped answering.",
               [(labels, int(s["lost"])) for labels, s in hosts])
    metric("paused", "gauge", "1 while the queue is paused.", [((), int(report["paused"]))])
    # No sample while nothing waits (/api/status says null): 0 would claim a job
    # that has just become due, and NaN breaks max() and sum() across queues.
    age_s = report["oldest_runnable_age_s"]
    metric("oldest_waiting_seconds", "gauge",
           "How long the oldest runnable job has waited past its run_at; absent "
           "while no job waits.", [] if age_s is None else [((), float(age_s))])
    metric("healthy", "gauge", "1 if status --check finds no problem.",
           [((), int(report["healthy"]))])
    return "\n".join(lines) + "\n"


####
# Commands ####
####

# Each command is its cmd_ function, declared where it stands by @command: its
# name, its help and its arguments. build_parser (Command line) reads COMMANDS.

CommandSpec = collections.namedtuple("CommandSpec",
                                     "name func help arguments json epilog")
COMMANDS = []              # in the order `queuectl --help` lists them
GROUPS = {"worker": "start or stop workers", "dlq": "the dead letter queue",
          "config": "show or change settings"}


def command(name, help_text, *arguments, json=False, epilog=None):
    """Declare, above its cmd_ function, a command: NAME ("status", or "worker
    start" for an action of a group), its help, its ARGUMENTS (each arg(...));
    JSON gives it --json."""
    def declare(func):
        COMMANDS.append(CommandSpec(name, func, help_text, arguments, json, epilog))
        return func
    return declare


def arg(*flags, **options):
    """One argument of a command, as ArgumentParser.add_argument takes it."""
    return flags, options


ENQUEUE_EPILOG = (
    "job fields in JSON, each with the flag that gives it: " +
    ", ".join(f"{field.name} ({field.flag})" for field in JOB_FIELDS) +
    "; run_at is ISO-8601 with Z or an offset, delay and timeout are durations" +
    ". Examples: queuectl enqueue '{\"id\": \"job1\", \"command\": \"sleep 2\", "
    "\"priority\": 5}'; queuectl enqueue -c 'make report' --after job1 --timeout 10m")

CONFIG_KEYS_HELP = ("keys and their valid values: " +
                    "; ".join(f"{key} ({setting.wanted})"
                              for key, setting in CONFIG.items()) +
                    ". - or _ both work in a key")


def int_between(low, high):
    """An argparse type: a whole number from LOW to HIGH."""
    def parse(text):
        if not WHOLE_NUMBER.fullmatch(text.strip()):     # int("٣") would be 3
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}: {text!r}")
        return value
    return parse


def duration(text):
    """An argparse type: a duration >= 0 (90, 90s, 10m, 2h, 7d)."""
    try:
        return check_duration(parse_duration(text), text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def store_of(args, create=False):
    """The store that --db names."""
    return open_store(args.db, create=create)


def note_created(store):
    """Say that STORE's database is new: a --db path mistyped, or relative to
    another directory, would otherwise start a second, empty queue unseen."""
    if store.created:
        print(f"queuectl: created a new database at {shown(store.path)}",
              file=sys.stderr)


def print_outcome(outcome):
    """Print what an operation did: its lines on stdout, its notes on stderr."""
    for note in outcome.notes:
        print(f"queuectl: {shown(note)}", file=sys.stderr)
    sys.stdout.write(shown("".join(f"{line}\n" for line in outcome.lines), lines=True))
    return outcome.code


def print_json(value):
    print(json.dumps(value, indent=2, ensure_ascii=False))


@command("enqueue", "add a job (or, with -, one per line from stdin)",
         arg("job", metavar="JSON", nargs="?",
             help='job as JSON, e.g. \'{"command": "sleep 2"}\', or - for stdin'),
         arg("-c", "--command", dest="shell_command", metavar="COMMAND",
             help="the job's command, instead of JSON; the flags below give its "
                  "other fields"),
         *(arg(field.flag, dest=field.name, metavar=field.metavar, help=field.help,
               action="append" if field.column == "after" else "store")
           for field in JOB_FIELDS if field.name != "command"),
         epilog=ENQUEUE_EPILOG)
def cmd_enqueue(args):
    now = now_utc()
    flags = _job_flags(args)
    if args.shell_command is not None:
        if args.job is not None and (args.job == "-" or args.job.lstrip().startswith("{")):
            raise UsageError("give a job as JSON or as -c COMMAND, not both")
        if args.job is not None:            # -c echo hi: the shell split the command
            raise UsageError(f"-c takes the whole command as one argument: quote it, "
                             f"as in -c '{args.shell_command} {args.job}'")
        jobs = [validate_job(dict(flags, command=args.shell_command), now,
                             names=job_flag_names())]
    elif flags:
        raise UsageError(f"{job_flag_names()[next(iter(flags))]} goes with "
                         f"-c COMMAND; in JSON, give it as a field")
    elif args.job is None:
        raise UsageError("give a job: JSON, - to read one per line from stdin, or "
                         "-c COMMAND")
    elif args.job == "-":
        if sys.stdin is None:
            raise UsageError("enqueue - reads jobs from standard input, which is closed")
        jobs = read_jobs(sys.stdin.buffer.read(), now)
        if not jobs:
            raise UsageError("no jobs on standard input")
    else:
        jobs = [validate_job(_parse_argument(args.job), now)]
    cwd = current_dir()
    check_text(cwd, "the current directory's name")
    if not is_postgres(args.db) and not os.path.exists(args.db):
        # Refuse unknown dependencies before a new database is created.
        earlier, keys, skipped = set(), {}, {}
        for index, job in enumerate(jobs):
            key = job["unique_key"]
            if key in keys:                    # as Store.enqueue will: not added
                if job["id"] is not None:
                    skipped[job["id"]] = (keys[key], key)
                continue
            unknown = [dep for dep in job["after"] if dep not in earlier]
            if unknown:
                raise NotFound(unknown_dependencies(unknown, index, len(jobs),
                                                     skipped))
            earlier.add(job["id"])
            if key is not None:
                keys[key] = (f"job {job['id']}" if job["id"] is not None
                             else f"the job of line {index + 1}")
    with store_of(args, create=True) as store:
        outcome = enqueue_jobs(store, jobs, cwd, now)
    note_created(store)
    return print_outcome(outcome)


def _job_flags(args):
    """The job fields given as enqueue flags (all but -c): whole numbers where a
    field wants one and they parse as one, so that validate_job judges them
    exactly as it judges JSON."""
    fields = {}
    for field in JOB_FIELDS:
        value = getattr(args, field.name, None)
        if value is None or field.name == "command":
            continue
        if isinstance(field.check, WholeNumber) and \
                WHOLE_NUMBER.fullmatch(value.strip()):
            value = int(value)
        fields[field.name] = value
    return fields


def read_jobs(data, now):
    """Validate DATA, one JSON job per line (blank lines skipped), all or none. A
    UTF-8 byte-order mark before the first line (Windows editors) is skipped."""
    stamp = iso(now)
    jobs, lines_of = [], {}
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
            if line.strip():
                job = validate_job(_parse_json(line), now, stamp)
                jobs.append(job)
                if job["id"] is not None:
                    if job["id"] in lines_of:
                        raise QueueError(f"line {number}: duplicate job id: {job['id']} "
                                         f"(line {lines_of[job['id']]} has it too)")
                    lines_of[job["id"]] = number
        except UnicodeDecodeError:
            raise UsageError(f"line {number}: not valid UTF-8") from None
        except UsageError as e:
            raise UsageError(f"line {number}: {e}") from None
    return jobs


def _parse_json(text):
    """Parse one JSON document (raw_decode skips decode's regexes: 30% faster)."""
    text = text.strip(" \t\r\n")              # JSON's whitespace, no other
    try:
        value, end = _JSON.raw_decode(text)
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    except ValueError as e:
        raise UsageError(f"invalid JSON: {e}") from None
    except RecursionError:
        raise UsageError("invalid JSON: nested too deeply") from None
    return value


def _parse_argument(text):
    """Parse the JSON job given as an argument; say how to give it if it is not
    JSON: a command without -c, or a document the shell took the quotes off."""
    try:
        return _parse_json(text)
    except UsageError as e:
        if text.lstrip().startswith("{"):
            hint = ("put the whole document in single quotes, as in "
                    "'{\"command\": \"echo hi\"}'")
        else:
            hint = f"to give a command without JSON: -c '{clip(text, 60)}'"
        raise UsageError(f"{e} ({hint})") from None


def _no_duplicate_keys(pairs):
    """Make a dict of a JSON object's pairs; refuse a key given twice (json would
    keep the last one silently)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [key for key, _ in pairs]
        twice = next(key for key in keys if keys.count(key) > 1)
        raise UsageError(f"field {twice!r} is given twice")
    return result


_JSON = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)


@command("worker start", "run workers until stopped",
         arg("--count", type=int_between(1, MAX_WORKERS), default=1, metavar="N",
             help="number of worker processes (default 1)"),
         arg("--detach", action="store_true",
             help="run in the background; return once the workers are up"))
def cmd_worker_start(args):
    db_path = args.db
    with open_store(db_path) as store:  # create or check the database before forking
        store.make()
        note_created(store)
        supervisor = find_supervisor(db_path, store)
    if supervisor:
        raise QueueError(f"workers are already running on this database "
                         f"(supervisor pid {supervisor.pid})")
    if args.detach:
        make_local_folder(local_base(db_path))
        log_path = local_base(db_path) + LOG_SUFFIX
        supervisor = start_detached(db_path, args.count, log_path)
        print(f"started {len(supervisor.workers)} worker(s) in the background "
              f"(supervisor pid {supervisor.pid}); log: {log_path}")
        return EXIT_OK
    return Supervisor(db_path, args.count).run()


@command("worker stop", "stop the workers gracefully",
         arg("--timeout", type=duration, default=None, metavar="DURATION",
             help="after this long, kill running jobs and put them back (default: "
                  "wait for them); exit 7 if it did, 8 if the supervisor does not "
                  "answer (frozen)"),
         arg("--host", metavar="NAME", default=None,
             help="stop the workers of host NAME instead (a postgresql:// queue), "
                  "asking through the database"),
         arg("--all-hosts", action="store_true",
             help="stop the workers of every host (a postgresql:// queue)"))
def cmd_worker_stop(args):
    if args.host is not None or args.all_hosts:
        return stop_hosts(args)
    supervisor = find_supervisor(args.db)
    if not supervisor:
        print("no workers running")
        return EXIT_OK
    pid = supervisor.pid
    held = _jobs_of_workers(args.db, supervisor.workers)
    _signal_supervisor(pid, WARM_SIGNAL)
    how_long = ("until its running jobs finish" if args.timeout is None else
                f"up to {args.timeout:g}s for its running jobs to finish")
    print(f"asked supervisor {pid} to stop; waiting {how_long}", file=sys.stderr)
    try:
        if not _wait_stopped(supervisor, args.timeout, WARM_SIGNAL):
            _signal_supervisor(pid, COLD_SIGNAL)
            if not _wait_stopped(supervisor, COLD_STOP_GRACE_S + KILL_GRACE_S + 10,
                                 COLD_SIGNAL):
                raise QueueError(f"supervisor {pid} did not stop")
    except KeyboardInterrupt:
        print("stopped waiting; the workers go on stopping (run worker stop again "
              "to wait)", file=sys.stderr)
        return 130
    return report_ends(args.db, held, f"stopped workers (supervisor pid {pid})")


def report_ends(db_path, held, stopped):
    """After a stop (STOPPED says of whom): say what became of the jobs HELD
    (ids) that were running, whoever decided it; return the exit code. A job a
    worker held but had not started went back as it was: it was not running."""
    ends = {}
    if held:
        try:
            with open_store(db_path, create=False) as store:
                ends = store.job_ends(held)
        except QueueError as e:
            print(stopped)
            raise QueueError(f"could not read what became of its running jobs: "
                             f"{e}") from None
    interrupted = sorted(job_id for job_id, (state, _, last_run) in ends.items()
                         if state == PENDING and last_run == INTERRUPTED)
    unrecorded = sorted(job_id for job_id, (state, _, _) in ends.items()
                        if state == PROCESSING)
    finished = [job_id for job_id, (state, _, _) in ends.items()
                if state not in (PENDING, PROCESSING)]
    parts = [f"{len(finished)} running job(s) finished"] if finished else []
    if interrupted:
        parts.append(f"{len(interrupted)}{'' if parts else ' running job(s)'} "
                     f"interrupted and put back as pending ({', '.join(interrupted)})")
    if unrecorded:
        parts.append(f"{len(unrecorded)}{'' if parts else ' running job(s)'} not "
                     f"recorded ({', '.join(unrecorded)})")
    print(stopped + (": " + ", ".join(parts) if parts else ""))
    if unrecorded:
        raise QueueError(f"the supervisor could not record what became of "
                         f"{', '.join(unrecorded)} (see its log); they stay processing "
                         f"until workers start again and recover them")
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


def stop_hosts(args):
    """worker stop --host NAME / --all-hosts: ask those hosts' supervisors to stop
    through the database (each reads it at its next tick), and wait as worker
    stop does. A host that stopped answering (lost) cannot be asked: its record
    is forgotten, and other hosts recover its jobs once their leases run out."""
    if args.host is not None and args.all_hosts:
        raise UsageError("give --host NAME or --all-hosts, not both")
    if not is_postgres(args.db):
        raise UsageError("--host and --all-hosts are for a queue that many hosts "
                         "share (a postgresql:// database); on SQLite every worker "
                         "runs on this host: worker stop")
    with open_store(args.db, create=False) as store:
        asked = store.ask_stop(args.host, WARM)
        if not asked:
            if args.host is None:
                print("no workers running")
                return EXIT_OK
            hosts = sorted({row["host"] for row in store.supervisors()})
            raise NotFound(f"no workers recorded on host {args.host}" +
                           (f" (hosts: {', '.join(hosts)})" if hosts else
                            " (none on any host)"))
        lost = [row for row in asked if row["lost"]]
        for row in lost:
            store.remove_supervisor(row["id"])
        live = [row for row in asked if not row["lost"]]
        hosts = {row["host"] for row in live}
        held = sorted(job["id"] for job in store.list_jobs(PROCESSING)
                      if job["worker_host"] in hosts)
        names = ", ".join(f"{row['host']} (pid {row['pid']})" for row in live)
        if live:
            how_long = ("until their running jobs finish" if args.timeout is None else
                        f"up to {args.timeout:g}s for their running jobs to finish")
            print(f"asked the supervisors of {names} to stop; waiting {how_long}",
                  file=sys.stderr)
            try:
                if not _wait_hosts(store, live, args.timeout):
                    store.ask_stop(args.host, COLD)
                    if not _wait_hosts(store, live, COLD_STOP_GRACE_S + KILL_GRACE_S
                                       + 10):
                        raise QueueError(f"the supervisors of {names} did not stop")
            except KeyboardInterrupt:
                print("stopped waiting; the workers go on stopping (run worker stop "
                      "again to wait)", file=sys.stderr)
                return 130
    code = report_ends(args.db, held, f"stopped the workers of {names}") \
        if live else EXIT_OK
    if lost:
        raise NoAnswer("; ".join(
            f"host {row['host']} does not answer (not seen since {row['seen_at']}); "
            f"forgot its record: other hosts recover its jobs once their leases run "
            f"out" for row in lost))
    return code


def _wait_hosts(store, asked, timeout_s):
    """Wait until the supervisors ASKED (rows) have exited: False if TIMEOUT_S
    ran out first. Raise NoAnswer if one stops answering, or has not taken the
    stop within ANSWER_GRACE_S after its next tick."""
    started = time.monotonic()
    ids = {row["id"] for row in asked}
    while True:
        rows = [row for row in store.supervisors() if row["id"] in ids]
        if not rows:
            return True
        now = time.monotonic()
        deaf = [row for row in rows if row["lost"] or
                (row["state"] != SUPERVISOR_STOPPING and
                 now - started > IDLE_RECHECK_S + ANSWER_GRACE_S)]
        if deaf:
            raise NoAnswer("; ".join(f"the supervisor of {row['host']} (pid "
                                     f"{row['pid']}) does not answer" +
                                     (": lost" if row["lost"] else "")
                                     for row in deaf))
        if timeout_s is not None and now - started >= timeout_s:
            return False
        time.sleep(0.2)


def _wait_stopped(supervisor, timeout_s, sig):
    """Wait until SUPERVISOR (a Supervised) has exited; False if TIMEOUT_S ran out
    first. Raise NoAnswer if it does not act on the stop: the signal SIG sent to
    it is still pending, or it has been stopped (SIGSTOP), after ANSWER_GRACE_S.

    Pending signals are the kernel's to tell (/proc), so this needs nothing
    written by the supervisor: it holds on a read-only or full disk too."""
    started = time.monotonic()
    deadline = None if timeout_s is None else started + timeout_s
    frozen_since = None
    while _still_running(supervisor):
        now = time.monotonic()
        fields = _proc_stat(supervisor.pid)
        frozen = bool(fields) and fields[0] in "Tt"
        frozen_since = (frozen_since or now) if frozen else None
        if frozen_since is not None and now - frozen_since > ANSWER_GRACE_S:
            raise NoAnswer(f"supervisor pid {supervisor.pid} does not answer: it is "
                           f"stopped (SIGSTOP?); it stops once resumed (kill -CONT "
                           f"{supervisor.pid}), or end it with kill -KILL {supervisor.pid} "
                           f"and its jobs are recovered")
        if now - started > ANSWER_GRACE_S and _signal_pending(supervisor.pid, sig) and \
                _still_running(supervisor):
            raise NoAnswer(f"supervisor pid {supervisor.pid} does not answer: it has not "
                           f"taken the stop signal after {ANSWER_GRACE_S:g}s")
        if deadline is not None and now >= deadline:
            return False
        time.sleep(0.05)
    return True


def _still_running(supervisor):
    """Whether SUPERVISOR (a Supervised) is still that process, and
    not a zombie: one that exited, waiting for its parent to reap it."""
    fields = _proc_stat(supervisor.pid)
    if fields is None:
        return not os.path.isdir("/proc/self") and _pid_exists(supervisor.pid)
    return fields[0] not in "ZX" and (supervisor.start is None or
                                      int(fields[19]) == supervisor.start)


def _signal_pending(pid, sig):
    """Whether signal SIG sent to PID waits undelivered (Linux /proc; False if
    unknown). A live process takes a signal at once, whatever it is doing."""
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = [int(line.split()[1], 16) for line in f
                     if line.startswith(("SigPnd:", "ShdPnd:"))]
    except (OSError, ValueError, IndexError):
        return False
    return any(mask >> (sig - 1) & 1 for mask in masks)


def _jobs_of_workers(db_path, worker_pids):
    """Ids of the jobs the given worker processes are running ([] if unknown)."""
    try:
        with open_store(db_path, create=False) as store:
            return sorted(job["id"] for job in store.list_jobs(PROCESSING)
                          if job["worker_pid"] in worker_pids)
    except QueueError:
        return []            # stopping must not depend on the database


def _signal_supervisor(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass                                  # it exited meanwhile
    except PermissionError:
        raise QueueError(f"not allowed to signal supervisor pid {pid}") from None


@command("status", "show queue health",
         arg("--check", action="store_true",
             help="exit 3/4/5 when the queue needs attention (for cron)"),
         arg("--max-age", type=duration, default=None, metavar="DURATION",
             help="with --check: problem if a runnable job waited longer"),
         arg("--max-dead", type=int_between(0, INT_LIMIT - 1), default=0, metavar="N",
             help="with --check: problem if the DLQ holds more than N (0)"),
         json=True)
def cmd_status(args):
    with store_of(args) as store:
        report, codes = status_report(store, args.max_age, args.max_dead)
    if args.json:
        print_json(report)
    else:
        print_status(report, args.check)
    if args.check and codes:
        return codes[0]            # the most urgent: no workers, stale, dead
    return EXIT_OK


def print_workers(workers, indent):
    for w in workers:
        doing = f"job {w['job_id']}: {clip(w['command'], 60)}" if w["job_id"] else "idle"
        print(f"{indent}pid {w['pid']}: {doing}")


def print_status(report, check):
    counts = report["counts"]
    print(f"database:  {shown(report['db'])}")
    blocked = report["waiting_for_dependencies"]
    print("jobs:      " + ", ".join(
        f"{s} {counts[s]}" + (f" ({blocked} waiting for other jobs)"
                              if s == PENDING and blocked else "") for s in STATES))
    age = report["oldest_runnable_age_s"]
    print("waiting:   " + ("no runnable job" if age is None else
                           f"{format_duration(age)} (the oldest runnable job)"))
    print(f"dlq:       {counts[DEAD]}")
    if report["paused"]:
        print(f"paused:    since {shown(report['paused_since'])} (workers start no "
              f"new job; queuectl resume)")
    elsewhere = report["supervisors"][1 if report["supervisor_pid"] else 0:]
    if report["supervisor_pid"]:
        print(f"workers:   {len(report['workers'])}, {report['supervisor_state']} "
              f"(supervisor pid {report['supervisor_pid']})")
    else:
        print("workers:   none " + ("on this host" if elsewhere else "running"))
    print_workers(report["workers"], "  ")
    for other in elsewhere:
        if other["lost"]:
            print(f"host {shown(other['host'])}: lost: not seen since "
                  f"{other['seen_at']} (supervisor pid {other['pid']}); its jobs are "
                  f"recovered once their leases run out")
        else:
            print(f"host {shown(other['host'])}: {len(other['workers'])} worker(s), "
                  f"{other['state']} (supervisor pid {other['pid']})")
        print_workers(other["workers"], "  ")
    for w in report["other_claims"]:
        whose = ("not one of ours" if w["alive"] else
                 f"gone; recovered once its lease ends at {w['lease_until']}")
        where = f" on {shown(w['host'])}" if elsewhere else ""
        print(f"  pid {w['pid']}{where} ({whose}): job {w['job_id']}: "
              f"{clip(w['command'], 40)}")
    if check:
        for text in report["problems"]:
            print(f"problem:   {text}")


@command("list", "list jobs, newest first",
         arg("--state", choices=STATES, help="only jobs in this state"),
         arg("--limit", type=int_between(1, INT_LIMIT - 1), default=None,
             metavar="N", help="at most N jobs"),
         json=True)
def cmd_list(args):
    print_jobs(args, args.state, args.limit)


def print_jobs(args, state, limit):
    with store_of(args) as store:
        jobs = store.list_jobs(state, limit)
    if args.json:
        print_json(jobs)
    else:
        print_job_table(jobs)


def print_job_table(jobs):
    if not jobs:
        print("no jobs", file=sys.stderr)
        return
    rows = [("ID", "STATE", "TRIES", "PRIO", "RUN AT", "UPDATED", "LAST ERROR",
             "COMMAND")]
    for job in jobs:
        waiting = job["state"] in (PENDING, FAILED)
        run_at = job["run_at"][:19] + "Z" if waiting else "-"
        if job.get("waiting_for"):             # not before these complete
            run_at = clip("after " + ",".join(job["waiting_for"]), len(run_at))
        rows.append((job["id"], job["state"],
                     f"{job['attempts']}/{job['max_retries'] + 1}",
                     str(job["priority"]), run_at,
                     job["updated_at"][:19] + "Z",
                     clip(job["last_error"] or "-", 32), clip(job["command"], 50)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        print("  ".join(cells + [row[-1]]))


@command("show", "show one job whole", arg("id", metavar="ID"), json=True)
def cmd_show(args):
    with store_of(args) as store:
        job = job_document(store, args.id)
    if args.json:
        print_json(job)
        return
    history, output = job.pop("history"), job.pop("output")
    for key, value in job.items():
        if key == "after":
            value = ", ".join(f"{dep['id']} ({dep['state']})" for dep in value) or None
        elif key == "waiting_for":
            value = ", ".join(value) or None
        print(f"{key + ':':15}{'-' if value is None else shown(str(value))}")
    print("history:")
    if not history:
        print("  (not run yet)")
    for h in history:
        how = h["outcome"]
        if h["reason"] and h["reason"] != how:       # not "cancelled: cancelled"
            how += f": {shown(h['reason'])}"
        elif h["exit_code"] is not None:            # "killed by SIGTERM", "exit 0"
            how += f" ({describe_exit(h['exit_code'])})"
        print(f"  run {h['number']}: {h['started_at']} -> "
              f"{h['finished_at'] or '...'}  {how}  (worker pid {h['worker_pid']})")
    if output is not None:
        for stream in ("stdout", "stderr"):
            text = output[stream]
            dropped = output[f"{stream}_dropped_bytes"]
            note = f" (first {dropped} bytes dropped)" if dropped else ""
            print(f"{stream} of the last run{note}:" + ("" if text else " (empty)"))
            text = shown(text, lines=True)
            print(text if text.endswith("\n") or not text else text + "\n", end="")


@command("logs", "print a run's stdout and stderr",
         arg("id", metavar="ID"),
         arg("--attempt", type=int_between(1, INT_LIMIT - 1), metavar="N",
             help="run N (1 is the first; default: the last)"),
         arg("-f", "--follow", action="store_true",
             help="stream the job's output as it is written, run after run, until "
                  "the job completes (exit 0) or ends dead or cancelled (6); with "
                  "--attempt, that run only"),
         json=True)
def cmd_logs(args):
    if args.follow and args.json:
        raise UsageError("--follow streams as text; --json prints one document")
    with store_of(args) as store:
        job, run = store.run_of(args.id, args.attempt)
        if args.follow:
            return follow_logs(store, job, run, args.attempt)
    if run is None:
        if args.json:
            print_json(logs_document(store.local, job, run))
        elif job["state"] in FINISHED:
            print(f"queuectl: {shown(ended_unrun(job))}", file=sys.stderr)
        else:
            print(f"queuectl: job {job['id']} has not run yet", file=sys.stderr)
        return EXIT_OK
    output = logs_document(store.local, job, run)
    if args.json:
        print_json(output)
        return EXIT_OK
    for stream, dest in (("stdout", sys.stdout), ("stderr", sys.stderr)):
        if output[f"{stream}_dropped_bytes"]:
            print(f"queuectl: the first {output[f'{stream}_dropped_bytes']} bytes of "
                  f"{stream} were not kept (output_limit)", file=sys.stderr)
        # To a terminal, escape sequences are shown, not obeyed; elsewhere the bytes
        # stay exact.
        dest.write(shown(output[stream], lines=True) if dest.isatty() else output[stream])
        dest.flush()
    if run["outcome"] == RUN_GOING:
        print(f"queuectl: job {job['id']} is still running (logs --follow streams "
              f"the rest)", file=sys.stderr)
    elif run["stdout"] is None and run["stderr"] is None:
        print(f"queuectl: {shown(run_ending(job, run))}; the run's output was not "
              f"kept", file=sys.stderr)
    return EXIT_OK


def follow_logs(store, job, run, number):
    """Stream a run's output as it is written (like tail -f). Run NUMBER: until
    that run ends; return 0 if it completed, else EXIT_NOT_COMPLETED. Without a
    NUMBER, see the job through: after a run that did not complete, say how it
    ended and follow the next, until the job is completed (0), dead or
    cancelled (EXIT_NOT_COMPLETED), as wait does."""
    import codecs
    streams = (("stdout", "out", sys.stdout.buffer),
               ("stderr", "err", sys.stderr.buffer))
    printed = {"stdout": 0, "stderr": 0}         # absolute positions reached
    # To a terminal, a run's escape sequences are shown (shown()), not obeyed; to
    # a pipe or a file, every byte goes through as the command wrote it.
    decoders = {stream: codecs.getincrementaldecoder("utf-8")("replace")
                for stream, _, dest in streams if dest.isatty()}

    def emit(stream, dest, data, skipped):
        if skipped:
            sys.stderr.flush()
            sys.stderr.buffer.write(f"[queuectl: {skipped} bytes of {stream} skipped "
                                    f"here: they were not kept]\n".encode())
            sys.stderr.buffer.flush()
        if data:
            text = decoders[stream].decode(data) if stream in decoders else None
            dest.write(data if text is None else
                       shown(text, lines=True).encode("utf-8", "replace"))
            dest.flush()
        printed[stream] += skipped + len(data)

    def emit_stored(stream, dest, run):
        """Print what is new in the stored copy of a run's STREAM."""
        data = (run[stream] or "").encode("utf-8", "replace")
        start = run[f"{stream}_dropped"]
        at = max(printed[stream], start)
        if at - start < len(data) or at > printed[stream]:
            emit(stream, dest, data[at - start:], at - printed[stream])

    def end_run():
        """After a run's last byte: be ready to print the next run from its first."""
        for stream, _, dest in streams:
            if stream in decoders:             # a character cut short at the end
                dest.write(shown(decoders[stream].decode(b"", True), True).encode())
                dest.flush()
                decoders[stream].reset()
            printed[stream] = 0

    version = None
    following = None       # the run whose output is being printed, till it ends
    # A job that a cold stop put back will run again: follow its next run.
    past = None
    if number is None and run is not None and run["outcome"] == INTERRUPTED and \
            job["state"] == PENDING:
        past = run["number"]
    while True:
        if (run is None or run["number"] == past) and job["state"] in FINISHED:
            print(f"queuectl: {shown(ended_unrun(job, again=run is not None))}",
                  file=sys.stderr)
            return EXIT_NOT_COMPLETED
        if run is not None and run["number"] == past:
            pass                                       # waiting for its next run
        elif run is not None and run["outcome"] != RUN_GOING:
            for stream, short, dest in streams:
                # The rest: from its spool, which stays a while after the run, so
                # every byte is printed once; else from the stored copy.
                spooled = Spool.read(spool_path(store.local, run["run_token"], short),
                                     printed[stream])
                if spooled:
                    emit(stream, dest, spooled[0], spooled[1])
                    continue
                emit_stored(stream, dest, run)
            end_run()
            following = None
            if run["outcome"] == COMPLETED:
                return EXIT_OK
            sys.stderr.flush()
            print(f"queuectl: {shown(run_ending(job, run))}", file=sys.stderr,
                  flush=True)
            if number is not None or job["state"] in FINISHED:
                return EXIT_NOT_COMPLETED
            past = run["number"]               # it runs again: follow that run
        elif run is not None:
            following = run["number"]
            for stream, short, dest in streams:
                spooled = Spool.read(spool_path(store.local, run["run_token"], short),
                                     printed[stream])
                if spooled:
                    emit(stream, dest, spooled[0], spooled[1])
                elif run[stream]:
                    # A run on another host: what its supervisor stored last.
                    emit_stored(stream, dest, run)
        time.sleep(FOLLOW_POLL_S)
        current = store.data_version()
        if current != version:                     # something was committed
            version = current
            job, run = store.run_of(job["id"], number)
            if following is not None and run["number"] != following:
                # The run being printed ended, and the next began, between two
                # looks: print the end of that one first (and look again after).
                job, run = store.run_of(job["id"], following)
                job["state"], version = PROCESSING, None


@command("wait", "wait until jobs have finished",
         arg("ids", nargs="+", metavar="ID"),
         arg("--timeout", type=duration, default=None, metavar="DURATION",
             help="give up after this long (exit 124)"),
         json=True, epilog="exit 0 if every job completed, 6 if one ended dead or "
                           "cancelled, 124 if --timeout ran out first")
def cmd_wait(args):
    ids = _unique(args.ids)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    ended, last_seen = {}, {}
    with store_of(args) as store:
        store.require_jobs(ids)
        version = None
        while True:
            current = store.data_version()
            if current != version:                 # something was committed
                version = current
                ends = store.job_ends([i for i in ids if i not in ended])
                for job_id in ids:
                    if job_id in ended:
                        continue
                    state, error, _ = ends.get(job_id, (DELETED, None, None))
                    last_seen[job_id] = (state, error)
                    if state in FINISHED or state == DELETED:
                        ended[job_id] = (state, error)
                        if not args.json:
                            note = (f" ({shown(error)})" if error and state != COMPLETED
                                    else "")
                            print(f"{job_id}: {state}{note}", flush=True)
            if len(ended) == len(ids):
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            pause = WAIT_POLL_S
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            time.sleep(pause)
    waiting = [job_id for job_id in ids if job_id not in ended]
    completed = all(ended.get(job_id, ("",))[0] == COMPLETED for job_id in ids)
    if args.json:
        print_json({"jobs": [{"id": job_id, "state": last_seen[job_id][0],
                              "last_error": last_seen[job_id][1],
                              "finished": job_id in ended} for job_id in ids],
                    "completed": completed, "timed_out": bool(waiting)})
    if waiting:
        print(f"queuectl: timed out after {format_span(args.timeout)}; still "
              f"waiting for {', '.join(waiting)}", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_OK if completed else EXIT_NOT_COMPLETED


@command("cancel", "cancel jobs that have not finished (a running job's "
                   "processes are killed)", arg("ids", nargs="+", metavar="ID"))
def cmd_cancel(args):
    with store_of(args) as store:
        return print_outcome(cancel_jobs(store, _unique(args.ids)))


@command("pause", "stop workers from starting jobs (running jobs go on)")
def cmd_pause(args):
    with store_of(args) as store:
        return print_outcome(pause_queue(store))


@command("resume", "let workers start jobs again")
def cmd_resume(args):
    with store_of(args) as store:
        return print_outcome(resume_queue(store))


@command("purge", "delete finished jobs with their history and output",
         arg("--state", choices=FINISHED, required=True, action="append",
             help="completed, dead or cancelled (repeat for more)"),
         arg("--older-than", type=duration, metavar="DURATION",
             help="only jobs that finished longer ago than this"))
def cmd_purge(args):
    with store_of(args) as store:
        return print_outcome(purge_jobs(store, _unique(args.state), args.older_than or 0))


@command("dlq list", "list dead jobs, newest first",
         arg("--limit", type=int_between(1, INT_LIMIT - 1), default=None,
             metavar="N", help="at most N jobs"),
         json=True)
def cmd_dlq_list(args):
    print_jobs(args, DEAD, args.limit)


@command("dlq retry", "put dead jobs back to pending",
         arg("ids", nargs="*", metavar="ID"),
         arg("--all", action="store_true", help="every dead job"))
def cmd_dlq_retry(args):
    if bool(args.ids) == bool(args.all):
        raise UsageError("give job ids or --all, not both or neither")
    with store_of(args) as store:
        return print_outcome(retry_jobs(store, None if args.all else _unique(args.ids)))


def _unique(items):
    return list(dict.fromkeys(items))


@command("delete", "delete jobs that are not running",
         arg("ids", nargs="+", metavar="ID"))
def cmd_delete(args):
    with store_of(args) as store:
        return print_outcome(delete_jobs(store, _unique(args.ids)))


@command("config show", "show every setting", json=True)
def cmd_config_show(args):
    values, problems = config_document(args.db)
    if args.json:
        for key in problems:
            print(f"queuectl: {shown(problems[key])}", file=sys.stderr)
        print_json(values)
    else:
        for key, value in values.items():
            note = f"  ({shown(problems[key])})" if key in problems else ""
            print(f"{key} = {value}{note}")


@command("config get", "print one setting's value", arg("key", metavar="KEY"),
         epilog=CONFIG_KEYS_HELP)
def cmd_config_get(args):
    key = config_key(args.key)
    values, problems = config_document(args.db)
    value, problem = values[key], problems.get(key)
    if problem:
        print(f"queuectl: {shown(problem)}", file=sys.stderr)
    print(value)


@command("config set", "change a setting", arg("key", metavar="KEY"),
         arg("value", metavar="VALUE"), epilog=CONFIG_KEYS_HELP)
def cmd_config_set(args):
    key = config_key(args.key)
    value = parse_config_value(key, args.value)
    config_text(key, value)              # refuse it before creating a database
    with store_of(args, create=True) as store:
        text = store.set_config(key, value)
    note_created(store)
    print(f"{key} = {text}")


@command("copy", "copy the queue into another database (to move it)",
         arg("--to", required=True, metavar="DATABASE",
             help="the database to copy into: a postgresql:// URL, or a SQLite file's "
                  "path (created if need be)"),
         epilog="copies every job with its runs, output, dependencies and unique key, "
                "and the settings, in one transaction; refused while workers run on "
                "this queue, or if the destination has a job of the same id")
def cmd_copy(args):
    target = database_target(args.to)
    if target == args.db:
        raise UsageError("--to names the database being copied")
    with store_of(args) as source:
        here = find_supervisor(args.db, source)
        elsewhere = [row for row in source.supervisors() if source.shared and
                     not row["lost"] and (row["host"], row["boot_id"]) != host_identity()]
        if here or elsewhere:
            where = f"supervisor pid {here.pid}" if here else \
                f"on host {elsewhere[0]['host']}"
            raise Refused(f"workers are running on this queue ({where}): stop them "
                          f"first (worker stop), so that no job runs on both")
        data = source.export()
    with open_store(target) as destination:
        destination.import_queue(data)
    note_created(destination)
    print(f"copied {len(data['jobs'])} job(s), {len(data['runs'])} run(s) and "
          f"{len(data['config'])} setting(s) to {shown(destination.path)}")
    return EXIT_OK


@command("stats", "show throughput and run times", json=True)
def cmd_stats(args):
    with store_of(args) as store:
        stats = store.stats()
    if args.json:
        print_json(stats)
        return
    rate = stats["success_rate"]
    print(f"completed:        {stats['completed']}")
    print(f"failed attempts:  {stats['failed_attempts']}")
    print(f"dead:             {stats['dead']}")
    print(f"success rate:     {'-' if rate is None else f'{rate:.1%}'}")
    print(f"run time:         avg {format_duration(stats['run_time_avg_s'])}, "
          f"p50 {format_duration(stats['run_time_p50_s'])}, "
          f"p95 {format_duration(stats['run_time_p95_s'])}")
    print(f"throughput:       {stats['completed_last_minute']} in the last minute, "
          f"{stats['completed_last_hour']} in the last hour")


####
# Dashboard: HTTP ####
####

def _loopback(host):
    """Whether HOST is this machine's loopback: localhost, or a loopback address
    written as one (127.0.0.1, ::1); never a name that merely starts with 127."""
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpError(Exception):
    """An HTTP answer other than 200: a status and a short message."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers)


def check_token(token, where):
    """Refuse a token too short to be safe from guessing, saying how to make one."""
    check_text(token, f"the token {where}")
    if len(token) < TOKEN_MIN_LEN:
        raise UsageError(f"the token {where} is too short: it needs at least "
                         f"{TOKEN_MIN_LEN} characters; make one with {TOKEN_HOWTO}")


def dashboard_token(db_path):
    """The token kept in <db>.token: made at random on first use, then reused, so
    a bookmarked sign-in URL survives restarts. Like the database it is readable
    by its owner only; a file that is not a regular file of ours, or that others
    may read, is refused rather than trusted or changed."""
    import secrets
    path = db_path + TOKEN_SUFFIX
    fd = _open_owner_only(path, os.O_RDWR | os.O_CREAT)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise QueueError(f"not yours: {path} belongs to user {info.st_uid}")
        if info.st_mode & 0o077:
            raise QueueError(f"others may read the token in {path}: delete the file "
                             f"to make a new token")
        fcntl.flock(fd, fcntl.LOCK_EX)     # two dashboards starting at once: one token
        text = os.read(fd, 4096)
        if not text.strip():
            token = secrets.token_urlsafe(24)
            data = (token + "\n").encode()
            try:
                if os.pwrite(fd, data, 0) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(fd)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)        # no half token for the next start
                reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
                raise QueueError(f"cannot write {path}: {reason}") from None
            return token
        try:
            token = text.decode("utf-8").strip()
        except UnicodeDecodeError:
            token = ""
        if len(token) < TOKEN_MIN_LEN or len(text) == 4096:
            raise QueueError(f"no usable token in {path} (one line of {TOKEN_MIN_LEN} "
                             f"or more characters): delete the file to make a new one")
        return token
    finally:
        os.close(fd)


class SignInThrottle:
    """Slows down guessing: after SIGNIN_FREE_FAILURES wrong tokens from one
    client, its next try is answered 429 until it has waited 1 s, then 2, 4 ...
    up to SIGNIN_WAIT_MAX_S after each further failure; a right token clears its
    count. Memory stays bounded: the SIGNIN_CLIENTS_MAX clients that failed
    last are remembered, and failures are forgotten after SIGNIN_FORGET_S."""

    def __init__(self, clock=time.monotonic):
        import threading
        self.lock = threading.Lock()
        self.clock = clock
        self.clients = collections.OrderedDict()   # key: (failures, last_s, until_s)

    @staticmethod
    def client(address):
        """Who is counted: an address; an IPv6 host by its /64, all of which one
        host usually has."""
        import ipaddress
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return address
        if ip.version == 6 and ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        if ip.version == 6:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)

    def check(self, address, right):
        """RIGHT() (whether the token given is the token), or HttpError 429 with
        Retry-After while ADDRESS must wait. Comparing under the lock makes
        clients that send many guesses at once wait their turn too."""
        key = self.client(address)
        with self.lock:
            now = self.clock()
            failures, last, until = self.clients.get(key, (0, now, now))
            if now < until:
                wait = math.ceil(until - now)
                raise HttpError(429, f"too many wrong tokens: try again in {wait} s",
                                {"Retry-After": str(wait)})
            if right():
                self.clients.pop(key, None)
                return True
            if now - last > SIGNIN_FORGET_S:
                failures = 0
            failures += 1
            beyond = failures - SIGNIN_FREE_FAILURES
            wait = 0 if beyond < 0 else min(SIGNIN_WAIT_MAX_S, 2 ** min(beyond, 16))
            self.clients.pop(key, None)
            self.clients[key] = (failures, now, now + wait)  # the newest failure last
            if len(self.clients) > SIGNIN_CLIENTS_MAX:
                self.clients.popitem(last=False)
            return False


class Dashboard:
    """What every request of one `queuectl dashboard` shares: the database path,
    the token, whether it answers loopback names only, failed sign-ins, and the
    CSRF tokens its pages carry: one for actions, on the pages the token guards,
    and one for the sign-in form, which anyone sees."""

    def __init__(self, db_path, token, port, loopback_only=False):
        import hashlib
        import hmac
        self.db_path = db_path
        # The database as pages show it: a URL's password masked.
        self.shown_db = pg_url(db_path)[2] if is_postgres(db_path) else db_path
        self.token = token
        self.loopback_only = loopback_only
        self.csrf = os.urandom(16).hex()
        self.login_csrf = os.urandom(16).hex()
        self.throttle = SignInThrottle()
        # The login cookie: derived from the token, so it stays valid across
        # restarts and proves the token without holding it. Browsers send a
        # cookie of 127.0.0.1 to each of its ports: the name holds the port, so
        # that two dashboards do not sign each other out.
        self.cookie_name = f"queuectl_session_{port}"
        self.session = hmac.new(token.encode(), b"queuectl session",
                                hashlib.sha256).hexdigest()
        self._compare = hmac.compare_digest

    def compare(self, given, wanted):
        """Compare secrets in constant time (any text given, even not ASCII)."""
        return wanted is not None and self._compare(
            given.encode("utf-8", "replace"), wanted.encode("utf-8"))

    def signed_in(self, address, given):
        """Whether GIVEN is the token, at the pace the throttle allows ADDRESS."""
        return self.throttle.check(address, lambda: self.compare(given, self.token))

    def session_cookie(self):
        return f"{self.cookie_name}={self.session}; HttpOnly; SameSite=Strict; Path=/"

    def store(self):
        return open_store(self.db_path, create=False)


# A route of the dashboard: METHOD and PATTERN (a regular expression of the path,
# its groups the handler's arguments) answered by HANDLER (a method's name); a
# PAGE is HTML, so a request without the token is sent to sign in rather than
# refused; NAV is a page's label in the navigation; a PUBLIC one needs no token.
Route = collections.namedtuple("Route", "method pattern handler page nav public")
JOB_PATH = r"/jobs/([^/]+)"


def route(method, pattern, page=False, nav=None, public=False):
    """Declare, above a handler, a route it answers (see Route)."""
    def declare(handler):
        handler.routes = getattr(handler, "routes", ()) + (
            Route(method, pattern, handler.__name__, page or nav is not None, nav,
                  public),)
        return handler
    return declare


class DashboardHandler:
    """One request to the dashboard: a page, the JSON API, /metrics, or an action.

    GET never changes a job; actions are POSTs that carry the page's CSRF token
    and come from the dashboard's own origin (or carry the API token in an
    Authorization header, which no other site can make a browser send). It is
    mixed with http.server's BaseHTTPRequestHandler when the dashboard starts,
    so that no other command pays for importing http.server.
    """

    server_version = "queuectl"
    timeout = DASHBOARD_CLIENT_TIMEOUT_S     # a slow or silent client is dropped

    # -- plumbing ---------------------------------------------------------------------

    def do_GET(self):
        self.answer("GET")

    def do_HEAD(self):
        self.answer("HEAD")

    def do_POST(self):
        self.answer("POST")

    def do_OTHER(self):
        self.answer(self.command)              # 405 where a path is known, else 404

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_OTHER

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request, a method it does not
        know) in the dashboard's short form, with its headers."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":   # too broken to say: answer in 1.0
            self.request_version = "HTTP/1.0"
        message = message or self.responses.get(code, ("error",))[0]
        self.send_text(code, message, {"Connection": "close"},
                       json_error=path_is_api(self))

    def setup(self):
        super().setup()
        self.rfile = io.BufferedReader(RequestDeadline(
            self.connection, time.monotonic() + DASHBOARD_CLIENT_TIMEOUT_S))

    def answer(self, method):
        import socket
        from urllib.parse import parse_qs, unquote, urlsplit
        dashboard = self.server.dashboard
        self.bearer = False
        self.connection.settimeout(self.timeout)   # for the answer: the read is done
        try:
            url = urlsplit(self.path)
            path = url.path                  # still quoted: an id may hold a "/"
            query = {key: values[-1] for key, values in
                     parse_qs(url.query, keep_blank_values=True).items()}
            self.check_host(dashboard)
            found, args = self.find_route(path, method)
            if found.page and "token" in query and method != "POST":
                return self.sign_in_by_url(dashboard, url)
            if not found.public:
                self.authenticate(dashboard, page=found.page)
                if method == "POST":
                    self.check_same_origin(dashboard)
            getattr(self, found.handler)(dashboard, query,
                                         *(unquote(arg) for arg in args))
        except HttpError as e:
            self.send_text(e.status, str(e), e.headers, json_error=path_is_api(self))
        except QueueError as e:
            status = (404 if isinstance(e, NotFound) else 400 if isinstance(e, UsageError)
                      else 409 if isinstance(e, Refused) else 503)
            self.send_text(status, str(e), json_error=path_is_api(self))
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True             # the client went away, or stalled
        except Exception as e:                       # a bug: say so, keep serving
            log(f"dashboard: {self.command} {redact(self.path)}: {type(e).__name__}: "
                f"{e}")
            with contextlib.suppress(OSError):
                self.send_text(500, f"internal error: {type(e).__name__}",
                               json_error=path_is_api(self))

    def find_route(self, path, method):
        """The Route and its arguments for PATH and METHOD (HEAD is GET)."""
        allowed = []
        for declared in ROUTES:
            match = re.fullmatch(declared.pattern, path)
            if match is not None:
                if declared.method == method or \
                        (declared.method, method) == ("GET", "HEAD"):
                    return declared, match.groups()
                allowed.append(declared.method)
        if allowed:
            raise HttpError(405, f"use {' or '.join(allowed)}",
                            {"Allow": ", ".join(allowed)})
        raise HttpError(404, "not found")

    def check_host(self, dashboard):
        """With the token of <db>.token, answer only to loopback names: a page of
        another site cannot then reach this one by renaming it (DNS rebinding).
        A token given by hand may be meant for a proxy that passes its own name."""
        if not dashboard.loopback_only:
            return
        host = self.headers.get("Host") or ""
        host = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        if not _loopback(host):
            raise HttpError(421, "this dashboard answers only to localhost and "
                                 "loopback addresses such as 127.0.0.1")

    def authenticate(self, dashboard, page=False):
        """Every request must carry the token: in an Authorization header
        (scripts, Prometheus) or as the cookie a sign-in sets (browsers). A wrong
        token counts as a failed sign-in; a signed-in browser goes on meanwhile."""
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        bearer = scheme.lower() == "bearer"            # the scheme's case is free
        refused = None
        if bearer:
            try:
                if dashboard.signed_in(self.client_address[0], given.strip()):
                    self.bearer = True
                    return
            except HttpError as e:                     # 429: it must wait
                refused = e
        if dashboard.compare(self.cookie(dashboard.cookie_name), dashboard.session):
            return
        if refused is not None:
            raise refused
        if page:
            raise HttpError(303, "sign in first", {"Location": "/login"})
        raise HttpError(401, "wrong token" if bearer else
                        "a token is needed: Authorization: Bearer TOKEN",
                        {"WWW-Authenticate": "Bearer"})

    def check_same_origin(self, dashboard):
        """An action must come from a page of this dashboard (its Origin and CSRF
        token), unless it carries the API token itself."""
        if self.bearer:
            return
        from urllib.parse import urlsplit
        origin = self.headers.get("Origin")
        if not origin or urlsplit(origin).netloc != self.headers.get("Host"):
            raise HttpError(403, "refused: the request does not come from this "
                                 "dashboard (Origin)")
        if not dashboard.compare(self.headers.get("X-CSRF-Token", ""), dashboard.csrf):
            raise HttpError(403, "refused: missing or wrong CSRF token")

    def cookie(self, name):
        for part in (self.headers.get("Cookie") or "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return ""

    def send(self, status, body, content_type, headers=()):
        data = body.encode("utf-8") if isinstance(body, str) else body
        headers = dict(headers)
        for value in headers.values():
            value.encode("latin-1")        # raise before anything is sent, not after
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Security-Policy", DASHBOARD_CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, value, headers=()):
        self.send(200, json.dumps(value, indent=2, ensure_ascii=False) + "\n",
                  "application/json; charset=utf-8", headers)

    def send_text(self, status, message, headers=(), json_error=False):
        message = clip(message, 200)          # an error names what it got, briefly
        if json_error:
            self.send(status, json.dumps({"error": message}) + "\n",
                      "application/json; charset=utf-8", headers)
        else:
            self.send(status, message + "\n", "text/plain; charset=utf-8", headers)

    def send_page(self, dashboard, page, title, job="", status=200, head="",
                  headers=(), **fields):
        import html
        csrf = dashboard.login_csrf if page == "login" else dashboard.csrf
        main = DASHBOARD_MAIN[page].format(
            csrf=csrf, job=html.escape(job),
            **{key: html.escape(str(value)) if key != "state_options" else value
               for key, value in fields.items()})
        nav = "".join(f'<a href="{route_path(r.pattern)}">{r.nav}</a>'
                      for r in ROUTES if r.nav)
        self.send(status, DASHBOARD_PAGE.format(
            csrf=csrf, title=html.escape(title), page=page, head=head, nav=nav,
            job=html.escape(job, quote=True),
            db="" if page == "login" else html.escape(dashboard.shown_db),
            main=main), "text/html; charset=utf-8", headers)

    def log_request(self, code="-", size="-"):
        """Log only what a reader wants: errors and actions, not every poll; never
        a token a URL carries."""
        code = getattr(code, "value", code)
        if str(code).startswith(("4", "5")) or self.command == "POST":
            log(f'dashboard: {self.address_string()} '
                f'"{clip(redact(self.requestline), 300)}" {code}')   # short, always

    def log_error(self, format, *args):
        if not format.startswith("code %d"):      # send_error's: log_request follows
            log(f"dashboard: {self.address_string()} "
                f"{clip(redact(format % args), 300)}")

    # -- pages ------------------------------------------------------------------------

    @route("GET", r"/", nav="Overview")
    def page_overview(self, dashboard, query):
        self.send_page(dashboard, "overview", "Overview")

    @route("GET", r"/jobs", nav="Jobs")
    def page_jobs(self, dashboard, query):
        state = query.get("state") or None
        if state is not None and state not in STATES:
            raise HttpError(400, f"unknown state: {state}")
        options = "".join(
            f'<option value="{s}"{" selected" if s == state else ""}>{s}</option>'
            for s in STATES)
        self.send_page(dashboard, "jobs", "Jobs", state_options=options,
                       q=query.get("q", ""))

    @route("GET", JOB_PATH, page=True)
    def page_job(self, dashboard, query, job_id):
        with dashboard.store() as store:
            store.run_of(job_id)                      # 404 if there is no such job
        self.send_page(dashboard, "job", f"Job {job_id}", job=job_id)

    @route("GET", r"/dlq", nav="DLQ")
    def page_dlq(self, dashboard, query):
        self.send_page(dashboard, "dlq", "DLQ")

    @route("GET", r"/login", page=True, public=True)
    def page_login(self, dashboard, query, error="", status=200):
        self.send_page(dashboard, "login", "Sign in", status=status, error=error)

    def sign_in_by_url(self, dashboard, url):
        """A page's URL with ?token=, as `queuectl dashboard` prints it: the right
        token sets the cookie and opens the page without the token in its URL;
        a wrong one gets the sign-in form."""
        import html
        from urllib.parse import parse_qsl, urlencode
        pairs = parse_qsl(url.query, keep_blank_values=True)
        given = [value for key, value in pairs if key == "token"][-1]
        if not dashboard.signed_in(self.client_address[0], given):
            return self.page_login(dashboard, {}, error="That is not the token.",
                                   status=403)
        rest = urlencode([(key, value) for key, value in pairs if key != "token"])
        target = ("/" if url.path == "/login" else url.path) + ("?" + rest if rest
                                                                else "")
        self.send_page(dashboard, "signed_in", "Signed in", target=target,
                       head=f'\n<meta http-equiv="refresh" content="0; url='
                            f'{html.escape(target, quote=True)}">',
                       headers={"Set-Cookie": dashboard.session_cookie()})

    @route("POST", r"/login", public=True)
    def post_login(self, dashboard, query):
        from urllib.parse import parse_qs, urlsplit
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != self.headers.get("Host"):
            raise HttpError(403, "refused: the request does not come from this "
                                 "dashboard (Origin)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HttpError(400, "bad Content-Length") from None
        form = parse_qs(self.rfile.read(max(0, min(length, 4096))).decode("utf-8",
                                                                         "replace"))
        token = form.get("token", [""])[-1]
        if not dashboard.compare(form.get("csrf", [""])[-1], dashboard.login_csrf) or \
                not dashboard.signed_in(self.client_address[0], token):
            return self.page_login(dashboard, query, error="That is not the token.",
                                   status=403)
        raise HttpError(303, "signed in", {"Location": "/",
                                           "Set-Cookie": dashboard.session_cookie()})

    @route("GET", r"/static/(app\.js|app\.css|icon\.svg)", public=True)
    def static(self, dashboard, query, name):
        self.send(200, *DASHBOARD_STATIC[name])

    @route("GET", r"/favicon\.ico", public=True)       # browsers ask for it anyway
    def favicon(self, dashboard, query):
        self.send(200, *DASHBOARD_STATIC["icon.svg"])

    # -- the JSON API: the CLI's --json documents ---------------------------------------

    @route("GET", r"/api/?")
    def api_index(self, dashboard, query):
        """These endpoints: each one's method, path and what it answers."""
        self.send_json({"endpoints": api_endpoints()})

    @route("GET", r"/api/status")
    def api_status(self, dashboard, query):
        """The queue's status: `status --json`."""
        with dashboard.store() as store:
            self.send_json(status_report(store)[0])

    @route("GET", r"/api/stats")
    def api_stats(self, dashboard, query):
        """Throughput and run times: `stats --json`."""
        with dashboard.store() as store:
            self.send_json(store.stats())

    @route("GET", r"/api/config")
    def api_config(self, dashboard, query):
        """The configuration: `config show --json`."""
        with dashboard.store() as store:
            self.send_json(store.config())

    @route("GET", r"/api/jobs")
    def api_jobs(self, dashboard, query, state=None):
        """Jobs, newest first: `list --json`, with ?state=S, ?q=TEXT (a search of
        ids and commands), ?limit=N (1 to 1000; 50) and ?before= (the page
        before's X-Next-Before)."""
        state = state or query.get("state") or None
        if state is not None and state not in STATES:
            raise HttpError(400, f"unknown state: {state}")
        limit = whole_number(query.get("limit", "50"), "limit", 1, 1000)
        if len(query.get("q", "")) > SEARCH_MAX_LEN:
            raise HttpError(400, f"q must be at most {SEARCH_MAX_LEN} characters")
        with dashboard.store() as store:
            jobs, next_before, short = store.search_jobs(
                state, query.get("q") or None, query.get("before") or None, limit)
        headers = {}
        if next_before is not None:
            headers["X-Next-Before"] = next_before        # letters and digits
        if short:
            headers["X-Search-Limited"] = str(SEARCH_SCAN)
        self.send_json(jobs, headers)

    @route("GET", r"/api" + JOB_PATH)
    def api_job(self, dashboard, query, job_id):
        """A job with its runs and dependencies: `show ID --json`."""
        with dashboard.store() as store:
            self.send_json(job_document(store, job_id))

    @route("GET", r"/api" + JOB_PATH + "/logs")
    def api_logs(self, dashboard, query, job_id):
        """The output of a job's last run (or ?attempt=N): `logs ID --json`."""
        number = None
        if query.get("attempt"):
            number = whole_number(query["attempt"], "attempt", 1, INT_LIMIT - 1)
        with dashboard.store() as store:
            job, run = store.run_of(job_id, number)
            self.send_json(logs_document(store.local, job, run))

    @route("GET", r"/api/dlq")
    def api_dlq(self, dashboard, query):
        """Dead jobs, newest first: `dlq list --json`, paged as /api/jobs is."""
        self.api_jobs(dashboard, query, state=DEAD)

    @route("GET", r"/api/overview")
    def api_overview(self, dashboard, query):
        """What the overview page shows: status, the last hour's runs by minute,
        and the job that has waited longest."""
        with dashboard.store() as store:
            self.send_json(overview_document(store))

    # -- actions --------------------------------------------------------------------------

    @route("POST", r"/api" + JOB_PATH + "/cancel")
    def act_cancel(self, dashboard, query, job_id):
        """Cancel a pending, failed or running job (its run is killed): `cancel ID`."""
        self.act(dashboard, cancel_jobs, [job_id])

    @route("POST", r"/api" + JOB_PATH + "/retry")
    def act_retry(self, dashboard, query, job_id):
        """Send a dead job back to pending: `dlq retry ID`."""
        self.act(dashboard, retry_jobs, [job_id])

    @route("POST", r"/api/dlq/retry")
    def act_retry_all(self, dashboard, query):
        """Send every dead job back to pending: `dlq retry --all`."""
        self.act(dashboard, retry_jobs)

    @route("POST", r"/api/pause")
    def act_pause(self, dashboard, query):
        """Pause the queue: `pause`."""
        self.act(dashboard, pause_queue)

    @route("POST", r"/api/resume")
    def act_resume(self, dashboard, query):
        """Resume the queue: `resume`."""
        self.act(dashboard, resume_queue)

    def act(self, dashboard, operation, *args):
        """Do OPERATION (of "Operations and documents") and answer its message."""
        with dashboard.store() as store:
            self.send_json({"message": operation(store, *args).message()})

    # -- /metrics ---------------------------------------------------------------------------

    @route("GET", r"/metrics")
    def metrics(self, dashboard, query):
        """The queue's metrics in Prometheus's text format."""
        with dashboard.store() as store:
            report = status_report(store)[0]
            totals = store.run_totals()
        self.send(200, prometheus_metrics(report, totals),
                  "text/plain; version=0.0.4; charset=utf-8")


class RequestDeadline(io.RawIOBase):
    """A request's input, read against one deadline in all: every receive waits
    only for what is left of it, so a client that sends its request a byte at a
    time is dropped as surely as a silent one (http.server drops it as it drops
    one that timed out)."""

    def __init__(self, sock, deadline):
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.deadline - time.monotonic()
        if left <= 0:
            import socket
            raise socket.timeout("the request took too long to arrive")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


def whole_number(text, name, low, high):
    """TEXT, a query parameter, as a whole number from LOW to HIGH, or 400. ASCII
    digits only: int() would also take '١٢', ' 12', '+12' and '1_2'."""
    if not (text.isascii() and text.isdigit()):
        raise HttpError(400, f"{name} must be a whole number")
    value = int(text) if len(text) <= 18 else None       # no 10,000-digit parse
    if value is None or not low <= value <= high:
        raise HttpError(400, f"{name} must be from {low} to {high}")
    return value


def redact(text):
    """TEXT (a request line, a path) with the value of each token= parameter
    replaced: a log must not give the token of a sign-in URL away."""
    from urllib.parse import unquote_plus

    def hide(match):
        key = unquote_plus(match.group(2)).strip().lower()
        return match.group(1) + ("REDACTED" if key == "token" else match.group(3))
    return re.sub(r"([?&;]([^=&;\s]*)=)([^&;\s#]*)", hide, text)


def path_is_api(handler):
    return re.match(r"/api([/?#]|$)", getattr(handler, "path", "")) is not None


def route_path(pattern):
    """A route's pattern as a path a reader understands: /api/jobs/{id}/logs."""
    return re.sub(r"\\(.)", r"\1", pattern.replace("([^/]+)", "{id}").replace("/?", "/"))


def api_endpoints():
    """The API's routes (and /metrics), each with the first paragraph of its
    handler's docstring: the route table and the code stay the only copy."""
    endpoints = []
    for declared in ROUTES:
        path = route_path(declared.pattern)
        if path.startswith("/api/") or path == "/metrics":
            doc = getattr(DashboardHandler, declared.handler).__doc__.split("\n\n")[0]
            endpoints.append({"method": declared.method, "path": path,
                              "description": " ".join(doc.split())})
    return endpoints


DASHBOARD_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                 "img-src 'self'; connect-src 'self'; form-action 'self'; "
                 "base-uri 'none'; frame-ancestors 'none'")
# Every route, as its handler declares it, in the order they are written.
ROUTES = [declared for handler in vars(DashboardHandler).values()
          for declared in reversed(getattr(handler, "routes", ()))]


@command("dashboard", "serve a web dashboard of the queue (Ctrl-C to stop)",
         arg("--host", default="127.0.0.1",
             help="address to listen on (default 127.0.0.1; any other needs a token)"),
         arg("--port", type=int_between(0, 65535), default=DASHBOARD_PORT,
             metavar="N", help=f"port (default {DASHBOARD_PORT}; 0: any free one)"),
         arg("--token", metavar="TOKEN",
             help=f"the token every request must carry, at least {TOKEN_MIN_LEN} "
                  f"characters (default: ${ENV_TOKEN}, which `ps` does not show; "
                  f"else, on 127.0.0.1, the one kept in <db>{TOKEN_SUFFIX})"))
def cmd_dashboard(args):
    token = args.token or os.environ.get(ENV_TOKEN) or None
    if token is not None:
        check_token(token, "given" if args.token else f"in ${ENV_TOKEN}")
    elif not _loopback(args.host):
        raise UsageError(f"refusing to serve on {args.host} without a token: give "
                         f"--token or set ${ENV_TOKEN} (or serve on 127.0.0.1 and open "
                         f"it through an SSH tunnel)")
    open_store(args.db, create=False).close()           # there must be a queue to show
    given = token is not None
    if not given:
        # Every account on this machine can reach a loopback port, and commands
        # carry secrets: the token is kept beside the database, as private.
        make_local_folder(local_base(args.db))
        token = dashboard_token(local_base(args.db))
    server_module = http_server()
    import threading
    handler = type("Handler", (DashboardHandler, server_module.BaseHTTPRequestHandler),
                   {})

    class Server(server_module.ThreadingHTTPServer):
        address_family = socket_family(args.host)
        request_queue_size = DASHBOARD_MAX_CLIENTS  # a burst is taken in, not stalled
        clients = threading.BoundedSemaphore(DASHBOARD_MAX_CLIENTS)

        def process_request(self, request, client_address):
            """Serve the request in a thread of its own, which gives its slot back
            when it ends; with no slot free, answer 503 and hang up."""
            if not self.clients.acquire(blocking=False):
                with contextlib.suppress(OSError):    # too many at once: not this one
                    request.setblocking(False)
                    request.send(b"HTTP/1.0 503 Service Unavailable\r\n"
                                 b"Content-Type: text/plain\r\nConnection: close\r\n"
                                 b"\r\ntoo many clients at once\n")
                self.shutdown_request(request)
                return
            thread = threading.Thread(target=self.process_request_thread,
                                      args=(request, client_address),
                                      daemon=True)    # Ctrl-C does not wait for it
            try:
                thread.start()
            except RuntimeError:                      # no thread to be had
                self.clients.release()
                self.shutdown_request(request)

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.clients.release()

        def handle_error(self, request, client_address):
            error = sys.exc_info()[1]
            if not isinstance(error, (ConnectionError, TimeoutError, OSError)):
                super().handle_error(request, client_address)

    try:
        server = Server((args.host, args.port), handler)
    except OSError as e:
        raise QueueError(f"cannot serve on {args.host}:{args.port}: {e.strerror}") \
            from None
    port = server.server_address[1]
    server.dashboard = Dashboard(args.db, token, port, loopback_only=not given)
    host, where = args.host, ""
    if host in ("0.0.0.0", "::"):              # every address: name one to open
        import socket
        host, where = socket.gethostname(), "on every address of this machine; "
    host = f"[{host}]" if ":" in host else host
    # The sign-in URL carries the token of <db>.token, which nobody else can
    # read; a token given by hand its owner knows, and it stays out of the log.
    from urllib.parse import quote
    sign_in = "" if given else "?token=" + quote(token, safe="")
    print(f"queuectl dashboard of {server.dashboard.shown_db}: "
          f"http://{host}:{port}/{sign_in} "
          f"({where}Ctrl-C to stop)", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK


def http_server():
    """http.server, imported only by the dashboard."""
    import http.server
    return http.server


def socket_family(host):
    import socket
    return socket.AF_INET6 if ":" in host else socket.AF_INET


####
# Command line ####
####

class HelpFormatter(argparse.HelpFormatter):
    """argparse's, but it finds the terminal's width as shutil would without
    importing shutil, which would add 3 ms to every command's start."""

    def __init__(self, prog, **kwargs):
        if "width" not in kwargs:
            try:
                columns = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                try:
                    columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
                except (AttributeError, ValueError, OSError):
                    columns = 80
            kwargs["width"] = max(columns, 20) - 2
        super().__init__(prog, **kwargs)


class Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line, like every other error here."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # "-5s" is a (negative) value, not an unknown option: let the option's own
        # check say what is wrong with it. (argparse's own test, which knows only
        # numbers, from Python 3.13 looks like this.)
        self._negative_number_matcher = re.compile(r"^-\.?[0-9]")

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} "
                              f"(see '{self.prog} --help')\n")

    def _check_value(self, action, value):
        """A choice that is not one, close to one, gets a suggestion in place of
        the list of every choice: 'stauts' (did you mean 'status'?)."""
        choices = action.choices
        if choices is not None and isinstance(value, str) and value not in choices:
            import difflib        # only here: it would slow down every start
            near = difflib.get_close_matches(value, list(choices), n=3)
            # Two letters swapped ('stauts') is the likeliest slip: that first.
            near.sort(key=lambda choice: sorted(choice) != sorted(value))
            if near:
                raise argparse.ArgumentError(
                    action, f"invalid choice: {value!r} (did you mean {near[0]!r}?)")
        super()._check_value(action, value)


DB_HELP = (f"database: a SQLite file, or a postgresql:// URL (default: ${ENV_DB}, "
           f"else $XDG_DATA_HOME/queuectl/{DB_FILENAME}, else ~/.local/share/queuectl/"
           f"{DB_FILENAME})")
EPILOG = ("exit codes: 0 ok, 1 runtime error (unknown job, wrong state, workers "
          "running, unusable database), 2 usage or validation error; status --check: "
          "3 dead jobs, 4 no workers, 5 a job waited too long; wait and logs "
          "--follow: 6 a job ended without completing, 124 wait timed out; worker "
          "stop and worker start: 7 running jobs were interrupted; worker stop: 8 the "
          "supervisor does not answer. Durations: 90, 90s, 10m, 2h, 7d, 1h30m.")


class LazyParsers(dict):
    """The parsers of a command's subcommands (argparse's choices), each built the
    first time it is looked up: a command line builds only the parser it uses,
    not twenty (a tenth of a millisecond each, at every start)."""

    def __init__(self, builders):
        super().__init__()
        self.builders = builders          # name -> a function that builds it

    def __contains__(self, name):
        return name in self.builders

    def __iter__(self):
        return iter(self.builders)

    def __len__(self):
        return len(self.builders)

    def __missing__(self, name):
        self[name] = parser = self.builders[name]()
        return parser

    def keys(self):
        return self.builders.keys()

    def items(self):
        return [(name, self[name]) for name in self.builders]

    def values(self):
        return [self[name] for name in self.builders]


def build_parser():
    """The command line's parser, read from COMMANDS (see @command)."""
    common = Parser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, metavar="PATH", help=DB_HELP)
    json_opt = Parser(add_help=False)
    json_opt.add_argument("--json", action="store_true",
                          help="print one JSON document")
    parser = Parser(prog=PROG, description="A durable background job queue for "
                                           "shell commands.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--db", default=None, metavar="PATH", help=DB_HELP)

    def subcommands(parent, dest, metavar, entries):
        """Add ENTRIES ({name: (help, build(sub))}) to PARENT, built lazily."""
        action = parent.add_subparsers(dest=dest, metavar=metavar, required=True,
                                       parser_class=Parser)

        def builder(name, help_text, build):
            def build_it():            # as add_parser builds it, less the listing
                sub = Parser(prog=f"{action._prog_prefix} {name}",
                             description=help_text, **build[1])
                build[0](sub)
                return sub
            return build_it
        action.choices = action._name_parser_map = LazyParsers(
            {name: builder(name, help_text, build)
             for name, (help_text, build) in entries.items()})
        for name, (help_text, _) in entries.items():
            action._choices_actions.append(
                action._ChoicesPseudoAction(name, (), help_text))

    def verb(spec):
        def build(sub):
            sub.set_defaults(func=spec.func, parser=sub)
            for flags, options in spec.arguments:
                sub.add_argument(*flags, **options)
        options = {"parents": [common] + ([json_opt] if spec.json else []),
                   "epilog": spec.epilog}
        return spec.help, (build, options)

    def group(name, specs):
        def build(sub):
            sub.set_defaults(parser=sub)
            subcommands(sub, "action", "ACTION",
                        {spec.name.split()[1]: verb(spec) for spec in specs})
        return GROUPS[name], (build, {"parents": [common]})

    entries = {}
    for spec in COMMANDS:
        name = spec.name.split()[0]
        if name in GROUPS:
            if name not in entries:
                entries[name] = group(name, [s for s in COMMANDS
                                             if s.name.split()[0] == name])
        else:
            entries[name] = verb(spec)
    subcommands(parser, "command", "COMMAND", entries)
    return parser


def database_target(given):
    """What --db (or $QUEUECTL_DB) names: a postgresql:// URL as it is, or the
    real, absolute path of a SQLite file."""
    if is_postgres(given):
        pg_url(given)                         # a bad ?schema= is a usage error
        return given
    if re.match(r"postgres(ql)?:", given):          # postgres:/db, postgresql:db
        raise UsageError("a PostgreSQL URL starts postgresql:// or postgres:// "
                         "(two slashes); this one does not")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", given)
    if scheme:                    # postgresq://..., postgres+psycopg://...: not a path
        raise UsageError(f"unknown database URL scheme {scheme.group(1)}://: give a "
                         f"postgresql:// URL, or a SQLite file's path")
    path = os.path.expanduser(given)
    if not os.path.isabs(path):
        path = os.path.join(current_dir(), path)
    # One database, one PID file: a symlinked path must not get a second one.
    path = os.path.realpath(path)
    if os.path.isdir(path):
        raise QueueError(f"database path is a directory: {path}")
    return path


def _enqueue_hint(args, extra):
    """For enqueue given words it did not expect, how to give a command."""
    if getattr(args, "func", None) is not cmd_enqueue:
        return ""
    if args.shell_command is not None:         # -c ls -l: the shell split it
        words = " ".join([args.shell_command, *([args.job] if args.job else []), *extra])
        return f" (-c takes the whole command as one argument: -c '{words}')"
    if args.job not in (None, "-") and not args.job.lstrip().startswith("{"):
        return f" (to give a command without JSON: -c '{' '.join([args.job, *extra])}')"
    return ""


def _drop_stdout():
    """Send the rest of stdout (and what is buffered of it) nowhere, so that
    Python's own flush at exit fails no more."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv=None):
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args, extra = parser.parse_known_args(argv)
    if extra:       # name the command whose --help to read, not just "queuectl"
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}"
                          f"{_enqueue_hint(args, extra)}")
    if args.db == "":
        parser.error("argument --db: expected a file path, got ''")
    try:
        args.db = database_target(args.db or default_db_path())
        code = args.func(args) or EXIT_OK
        sys.stdout.flush()      # here, so a closed pipe is caught below
        return code
    except QueueError as e:
        # One line, whatever a job id or path in the message contains.
        print(f"{PROG}: error: {shown(str(e))}", file=sys.stderr)
        return e.code
    except UnicodeEncodeError:
        # An argument that is not UTF-8 (the shell passed raw bytes) reaching SQLite.
        print(f"{PROG}: error: arguments must be valid UTF-8 text", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (queuectl list | head): not an error of ours.
        _drop_stdout()
        return EXIT_OK
    except OSError as e:
        # Its output could not be written (a full disk: > /dev/full); what it did
        # is done, and says so, so that a script does not do it again blindly.
        _drop_stdout()
        print(f"{PROG}: error: could not write its output ({e.strerror or e}); any "
              f"change it made to the queue stands", file=sys.stderr)
        return EXIT_ERROR



####
# Dashboard: page, style and script ####
####

# Every page is this skeleton, filled by the server with escaped text only; the
# script (served from /static/app.js: the Content-Security-Policy allows no
# other) fetches the JSON API and builds the rest with textContent, never HTML.
DASHBOARD_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{csrf}">
<title>{title} - queuectl</title>
<link rel="stylesheet" href="/static/app.css">
<link rel="icon" href="/static/icon.svg" type="image/svg+xml">
<script src="/static/app.js" defer></script>{head}
</head>
<body data-page="{page}" data-job="{job}">
<header>
<a class="brand" href="/">queuectl</a>
<nav>{nav}</nav>
<span id="paused" class="badge" hidden>paused</span>
<span class="db">{db}</span>
</header>
<main>
{main}
</main>
<p id="message" role="status"></p>
</body>
</html>
"""

DASHBOARD_MAIN = {
    "overview": """<h1>Overview</h1>
<p id="verdict" class="verdict">Loading...</p>
<div id="counts" class="cards"></div>
<div class="row">
<section class="panel"><h2>Last hour</h2><p id="rate"></p>
<svg id="chart" viewBox="0 0 600 120" role="img"
 aria-label="completions and failures per minute"></svg>
<p class="legend"><span>an hour ago</span><span><span class="key ok"></span>completed
<span class="key bad"></span>failed, per minute</span><span>now</span></p></section>
<section class="panel"><h2>Workers</h2><p id="supervisor"></p><ul id="workers"></ul><ul id="hosts"></ul>
</section>
</div>
<div class="row">
<section class="panel"><h2>Oldest waiting job</h2><p id="oldest"></p></section>
<section class="panel"><h2>Queue</h2><p id="queue-state"></p>
<p><button id="pause" data-action="/api/pause" data-ask="Pause the queue? Workers
 will start no new job; running jobs go on.">Pause</button>
<button id="resume" data-action="/api/resume" data-ask="Resume the queue?">Resume</button>
</p></section>
</div>""",
    "jobs": """<h1>Jobs</h1>
<form id="filter" method="get" action="/jobs">
<label>State <select name="state"><option value="">any</option>{state_options}</select>
</label>
<label>Search <input name="q" value="{q}" placeholder="id or command"></label>
<button type="submit">Show</button>
</form>
<table id="jobs"><thead><tr><th>id</th><th>state</th><th>tries</th><th>priority</th>
<th>updated (UTC)</th><th>last error</th><th>command</th></tr></thead>
<tbody></tbody></table>
<p id="note"></p>
<p><a id="older" href="/jobs" hidden>Older jobs</a></p>""",
    "job": """<h1>Job <span id="job-id">{job}</span></h1>
<p id="actions"><button id="cancel" data-ask="Cancel this job? A running job is
 killed." hidden>Cancel</button>
<button id="retry" data-ask="Retry this dead job?" hidden>Retry</button></p>
<table id="fields" class="fields"><tbody></tbody></table>
<h2>Runs</h2>
<table id="runs"><thead><tr><th>run</th><th>worker</th><th>started (UTC)</th>
<th>duration</th><th>outcome</th><th>exit code or reason</th></tr></thead><tbody></tbody></table>
<h2 id="output-title">Output</h2>
<h3>stdout</h3><pre id="stdout"></pre>
<h3>stderr</h3><pre id="stderr"></pre>""",
    "dlq": """<h1>Dead letter queue</h1>
<p><button id="retry-all" data-action="/api/dlq/retry" data-ask="Retry every dead
 job?">Retry all</button></p>
<table id="dlq"><thead><tr><th>id</th><th>tries</th><th>updated (UTC)</th>
<th>last error</th><th>command</th><th></th></tr></thead><tbody></tbody></table>
<p id="note"></p>
<p><a id="older" href="/dlq" hidden>Older dead jobs</a></p>""",
    "login": """<h1>Sign in</h1>
<form method="post" action="/login">
<label>Token <input type="password" name="token" autocomplete="current-password"
 autofocus></label>
<input type="hidden" name="csrf" value="{csrf}">
<button type="submit">Sign in</button>
</form>
<p class="error">{error}</p>""",
    # A sign-in URL's answer: the cookie is set, and the page's own refresh
    # (a same-site navigation, which carries a SameSite=Strict cookie where a
    # redirect from another site's link would not) opens the page asked for.
    "signed_in": """<h1>Signed in</h1>
<p><a href="{target}">Open the dashboard</a></p>""",
}

# The tab's icon: three queued bars.
DASHBOARD_ICON = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">
<rect width="32" height="32" rx="6" fill="#1d2733"/>
<rect x="7" y="8" width="18" height="4" rx="1" fill="#2e9d52"/>
<rect x="7" y="14" width="14" height="4" rx="1" fill="#e6edf3"/>
<rect x="7" y="20" width="10" height="4" rx="1" fill="#e6edf3"/>
</svg>
"""

DASHBOARD_CSS = """
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: #1d2733; background: #f4f6f9; }
header { display: flex; align-items: center; gap: 1.5em; padding: 0.7em 1.5em;
         background: #1d2733; color: #fff; }
header a { color: #fff; text-decoration: none; }
.brand { font-weight: 700; font-size: 1.1em; }
nav a { margin-right: 1.1em; opacity: 0.85; }
nav a:hover { opacity: 1; text-decoration: underline; }
.db { margin-left: auto; font-size: 0.85em; opacity: 0.7; }
.badge { background: #e0a100; color: #1d2733; border-radius: 4px; padding: 0 0.5em;
         font-weight: 600; }
main { max-width: 1200px; margin: 0 auto; padding: 1em 1.5em 3em; }
h1 { font-size: 1.5em; margin: 0.4em 0 0.6em; }
h2 { font-size: 1.1em; margin: 0 0 0.5em; }
h3 { font-size: 0.95em; margin: 1em 0 0.3em; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; margin-bottom: 1em; }
.card { flex: 1 1 120px; background: #fff; border-radius: 8px; padding: 0.8em 1em;
        box-shadow: 0 1px 2px #0002; color: inherit; text-decoration: none; }
.card .n { display: block; font-size: 1.8em; font-weight: 700; }
.card.dead .n, .card.failed .n { color: #b3261e; }
.card.completed .n { color: #1f7a3a; }
.row { display: flex; flex-wrap: wrap; gap: 1em; margin-bottom: 1em; }
.panel { flex: 1 1 400px; background: #fff; border-radius: 8px; padding: 1em;
         box-shadow: 0 1px 2px #0002; }
.verdict { font-weight: 600; padding: 0.5em 0.8em; border-radius: 6px; background: #e3f3e7;
           color: #1f7a3a; }
.verdict.bad { background: #fbe4e2; color: #b3261e; }
#chart { width: 100%; height: 120px; background: #fafbfc; border: 1px solid #e3e7ec; }
#chart .ok { fill: #2e9d52; }
#chart .bad { fill: #d33b2f; }
.legend { display: flex; justify-content: space-between; margin: 0.2em 0 0;
          font-size: 0.85em; color: #5b6775; }
.key { display: inline-block; width: 0.8em; height: 0.8em; margin: 0 0.3em 0 0.8em; }
.key.ok { background: #2e9d52; }
.key.bad { background: #d33b2f; }
table { width: 100%; border-collapse: collapse; background: #fff; margin-bottom: 1em;
        box-shadow: 0 1px 2px #0002; }
th, td { text-align: left; padding: 0.4em 0.6em; border-bottom: 1px solid #e3e7ec;
         vertical-align: top; }
th { background: #eef1f5; font-weight: 600; font-size: 0.9em; }
td.command, td.error, td.code { font-family: ui-monospace, monospace; font-size: 0.88em;
                       overflow-wrap: anywhere; }
td.nowrap { white-space: nowrap; }
.fields th { width: 12em; background: #fff; }
code { font-family: ui-monospace, monospace; font-size: 0.88em; }
pre { background: #1d2733; color: #e6edf3; padding: 0.8em; border-radius: 6px;
      overflow: auto; max-height: 30em; white-space: pre-wrap; word-break: break-all; }
pre:empty::before { content: "(nothing)"; opacity: 0.5; }
form { margin-bottom: 1em; }
label { margin-right: 1em; }
input, select, button { font: inherit; padding: 0.3em 0.6em; }
button { border: 1px solid #1d2733; background: #fff; border-radius: 4px;
         cursor: pointer; }
button:hover { background: #1d2733; color: #fff; }
#message { position: fixed; bottom: 1em; right: 1em; margin: 0; padding: 0.6em 1em;
           background: #1d2733; color: #fff; border-radius: 6px; }
#message:empty { display: none; }
.error { color: #b3261e; }
[hidden] { display: none !important; }
"""

DASHBOARD_JS = r"""
"use strict";
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const body = document.body;
// FACTS, from Python, comes first in this file: the states, which can be
// cancelled or retried, which are final, and the fields of a job document.
const STATES = FACTS.states;

// Build an element; children are nodes or strings (always text, never HTML).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(
      child === null || child === undefined ? "" : String(child)));
  }
  return node;
}

function jobLink(id) {
  return el("a", {href: "/jobs/" + encodeURIComponent(id)}, id);
}

function short(text, width) {
  text = text === null || text === undefined ? "" : String(text);
  return text.length > width ? text.slice(0, width - 1) + "\u2026" : text;
}

// A timestamp, short (to the second, in UTC), with the exact one in its tooltip.
function when(stamp) {
  if (!stamp) return "-";
  return el("span", {title: stamp}, stamp.slice(0, 19).replace("T", " "));
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 60) return seconds.toFixed(seconds < 10 ? 1 : 0) + "s";
  if (seconds < 3600) return Math.floor(seconds / 60) + "m" + Math.floor(seconds % 60) + "s";
  if (seconds < 86400) return Math.floor(seconds / 3600) + "h" +
    Math.floor(seconds % 3600 / 60) + "m";
  return Math.floor(seconds / 86400) + "d" + Math.floor(seconds % 86400 / 3600) + "h";
}

function say(text) {
  const message = document.getElementById("message");
  message.textContent = text;
  clearTimeout(say.timer);
  say.timer = setTimeout(() => { message.textContent = ""; }, 6000);
}

async function api(path, method) {
  const response = await fetch(path, {
    method: method || "GET", credentials: "same-origin",
    headers: method === "POST" ? {"X-CSRF-Token": csrf} : {"Accept": "application/json"}});
  let doc = null;
  try { doc = await response.json(); } catch (e) { doc = null; }
  if (!response.ok) {
    throw new Error(doc && doc.error ? doc.error : response.status + " " + response.statusText);
  }
  return {doc: doc, response: response};
}

// An action: ask, POST it, say what came of it, refresh the page's data.
async function act(path, question, refresh) {
  if (!window.confirm(question)) return;
  try {
    const {doc} = await api(path, "POST");
    say(doc.message);
  } catch (e) {
    say("Failed: " + e.message);
  }
  refresh();
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

// The link to the next page of a paged list, from the API's X-Next-Before.
function pageOn(response, path, params) {
  const next = response.headers.get("X-Next-Before");
  const older = document.getElementById("older");
  older.hidden = !next;
  if (next) {
    const more = new URLSearchParams(params);
    more.set("before", next);
    older.setAttribute("href", path + "?" + more.toString());
  }
}

function setPaused(paused) {
  document.getElementById("paused").hidden = !paused;
}

// Every page refreshes its data every two seconds, without reloading.
function every(refresh) {
  const run = async () => {
    try { await refresh(); } catch (e) { say("Could not load: " + e.message); }
  };
  run();
  setInterval(run, 2000);
  return run;
}

const pages = {
  overview() {
    const refresh = every(async () => {
      const {doc} = await api("/api/overview");
      const status = doc.status;
      setPaused(status.paused);
      const verdict = document.getElementById("verdict");
      verdict.textContent = status.healthy ? "Healthy: no problem found" :
        "Needs attention: " + status.problems.join("; ");
      verdict.className = "verdict" + (status.healthy ? "" : " bad");
      document.getElementById("counts").replaceChildren(...STATES.map(state =>
        el("a", {class: "card " + state, href: "/jobs?state=" + state},
           el("span", {class: "n"}, status.counts[state]), state)));
      drawChart(doc.minutes);
      const done = doc.minutes.reduce((sum, m) => sum + m.completed, 0);
      const failed = doc.minutes.reduce((sum, m) => sum + m.failed, 0);
      document.getElementById("rate").textContent = done + " runs completed, " + failed +
        " failed" + (done + failed ? " (" + (100 * failed / (done + failed)).toFixed(1) +
        "% of runs failed)" : "");
      // Other hosts' supervisors (a shared store), as status lists them.
      const elsewhere = status.supervisors.slice(status.supervisor_pid ? 1 : 0);
      document.getElementById("supervisor").textContent = status.supervisor_pid ?
        status.workers.length + " worker(s), " + status.supervisor_state +
        " (supervisor pid " + status.supervisor_pid + ")" :
        elsewhere.length ? "No workers on this host." : "No workers running.";
      const workerItems = workers => workers.map(w =>
        el("li", {}, "pid " + w.pid + ": ", ...(w.job_id ? [jobLink(w.job_id), " ",
           el("code", {}, short(w.command, 80))] : ["idle"])));
      document.getElementById("workers").replaceChildren(...workerItems(status.workers));
      document.getElementById("hosts").replaceChildren(...elsewhere.map(s =>
        el("li", {}, el("strong", {}, "host " + s.host), s.lost ?
           ": lost: not seen since " + s.seen_at + " (supervisor pid " + s.pid +
           "); its jobs are recovered once their leases run out" :
           ": " + s.workers.length + " worker(s), " + s.state + " (supervisor pid " +
           s.pid + ")", el("ul", {}, ...workerItems(s.workers)))));
      const oldest = doc.oldest_waiting;
      document.getElementById("oldest").replaceChildren(...(oldest ?
        [jobLink(oldest.id), " has waited " + age(status.oldest_runnable_age_s) + ": ",
         el("code", {}, short(oldest.command, 80))] : ["No job is waiting."]));
      document.getElementById("queue-state").textContent = status.paused ?
        "Paused since " + status.paused_since + ": workers start no new job." :
        "Running: workers take jobs as they come.";
      document.getElementById("pause").hidden = status.paused;
      document.getElementById("resume").hidden = !status.paused;
    });
    for (const button of document.querySelectorAll("button[data-action]")) {
      button.addEventListener("click", () =>
        act(button.dataset.action, button.dataset.ask, refresh));
    }
  },

  jobs() {
    const params = new URLSearchParams(location.search);
    every(async () => {
      const {doc, response} = await api("/api/jobs?" + params.toString());
      pageOn(response, "/jobs", params);
      replaceRows(document.querySelector("#jobs tbody"), doc.map(job => el("tr", {},
        el("td", {class: "nowrap"}, jobLink(job.id)), el("td", {}, job.state),
        el("td", {}, job.attempts + "/" + (job.max_retries + 1)),
        el("td", {}, job.priority), el("td", {class: "nowrap"}, when(job.updated_at)),
        el("td", {class: "error"}, short(job.last_error, 60)),
        el("td", {class: "command"}, short(job.command, 120)))));
      document.getElementById("note").textContent =
        (doc.length ? "" : "No jobs. ") + (response.headers.get("X-Search-Limited") ?
        "The search looked at the newest " + response.headers.get("X-Search-Limited") +
        " jobs only; narrow it with a state, or page on." : "");
    });
  },

  job() {
    const id = body.dataset.job;
    const path = "/api/jobs/" + encodeURIComponent(id);
    const refresh = every(async () => {
      const {doc: job} = await api(path);
      const rows = FACTS.job_fields.map(name => el("tr", {}, el("th", {}, name),
        el("td", {class: name === "command" ? "command" : null},
           job[name] === null ? "-" : job[name])));
      rows.push(el("tr", {}, el("th", {}, "after"), el("td", {},
        ...(job.after.length ? job.after.flatMap((dep, i) =>
          [i ? ", " : "", jobLink(dep.id), " (" + dep.state + ")"]) : ["-"]))));
      rows.push(el("tr", {}, el("th", {}, "waiting for"),
        el("td", {}, job.waiting_for.join(", ") || "-")));
      replaceRows(document.querySelector("#fields tbody"), rows);
      replaceRows(document.querySelector("#runs tbody"), job.history.map(run =>
        el("tr", {}, el("td", {}, run.number), el("td", {}, run.worker_pid),
           el("td", {class: "nowrap"}, when(run.started_at)),
           el("td", {}, run.duration_s === null ? "-" : run.duration_s + "s"),
           el("td", {}, run.outcome),
           el("td", {class: run.outcome === "completed" ? "code" : "error"},
              run.reason || (run.exit_code === null ? "-" : "exit " + run.exit_code)))));
      document.getElementById("cancel").hidden =
        !FACTS.cancellable.includes(job.state);
      document.getElementById("retry").hidden = !FACTS.retryable.includes(job.state);
      // The output of its last run; while it runs, what it wrote so far.
      const {doc: logs} = await api(path + "/logs");
      document.getElementById("output-title").textContent = logs.run !== null ?
        "Output of run " + logs.run + " (" + logs.outcome + ")" :
        FACTS.finished.includes(logs.state) ?
        "Output (it ended " + logs.state + " without running)" : "Output (not run yet)";
      for (const stream of ["stdout", "stderr"]) {
        const dropped = logs[stream + "_dropped_bytes"];
        document.getElementById(stream).textContent = (dropped ? "[the first " + dropped +
          " bytes were not kept]\n" : "") + (logs[stream] || "");
      }
    });
    document.getElementById("cancel").addEventListener("click", () =>
      act(path + "/cancel", document.getElementById("cancel").dataset.ask, refresh));
    document.getElementById("retry").addEventListener("click", () =>
      act(path + "/retry", document.getElementById("retry").dataset.ask, refresh));
  },

  dlq() {
    const params = new URLSearchParams(location.search);
    const refresh = every(async () => {
      const {doc, response} = await api("/api/dlq?" + params.toString());
      pageOn(response, "/dlq", params);
      replaceRows(document.querySelector("#dlq tbody"), doc.map(job => {
        const retry = el("button", {}, "Retry");
        retry.addEventListener("click", () => act(
          "/api/jobs/" + encodeURIComponent(job.id) + "/retry",
          "Retry dead job " + job.id + "?", refresh));
        return el("tr", {}, el("td", {class: "nowrap"}, jobLink(job.id)),
          el("td", {}, job.attempts + "/" + (job.max_retries + 1)),
          el("td", {class: "nowrap"}, when(job.updated_at)),
          el("td", {class: "error"}, job.last_error),
          el("td", {class: "command"}, short(job.command, 120)), el("td", {}, retry));
      }));
      document.getElementById("note").textContent = doc.length ? "" : "The DLQ is empty.";
      document.getElementById("retry-all").hidden = !doc.length;
    });
    const all = document.getElementById("retry-all");
    all.addEventListener("click", () => act(all.dataset.action, all.dataset.ask, refresh));
  },

  login() {},
};

// The chart: completions (green) and failures (red) of each of the last 60
// minutes, as SVG bars.
function drawChart(minutes) {
  const svg = document.getElementById("chart");
  const ns = "http://www.w3.org/2000/svg";
  const top = Math.max(1, ...minutes.map(m => m.completed + m.failed));
  const width = 600 / minutes.length;
  const bars = [];
  minutes.forEach((m, i) => {
    const done = 110 * m.completed / top;
    const failed = 110 * m.failed / top;
    for (const [height, y, cls] of [[done, 115 - done, "ok"],
                                    [failed, 115 - done - failed, "bad"]]) {
      if (!height) continue;
      const bar = document.createElementNS(ns, "rect");
      bar.setAttribute("x", (i * width + 1).toFixed(1));
      bar.setAttribute("y", y.toFixed(1));
      bar.setAttribute("width", Math.max(1, width - 2).toFixed(1));
      bar.setAttribute("height", height.toFixed(1));
      bar.setAttribute("class", cls);
      const title = document.createElementNS(ns, "title");
      title.textContent = m.minute.slice(0, 16).replace("T", " ") + ": " + m.completed + " completed, " + m.failed +
        " failed";
      bar.append(title);
      bars.push(bar);
    }
  });
  svg.replaceChildren(...bars);
}

(pages[body.dataset.page] || (() => {}))();
"""


# What the script repeats of Python's facts, handed to it at the top of app.js.
DASHBOARD_FACTS = {
    "states": STATES,
    "cancellable": UNFINISHED,
    "retryable": (DEAD,),
    "finished": FINISHED,
    "job_fields": [name for name in JOB_DOCUMENT_FIELDS if name != "id"],
}
# The dashboard's own script and style: the only ones its pages may load.
DASHBOARD_STATIC = {
    "app.js": (f"const FACTS = {json.dumps(DASHBOARD_FACTS)};\n" + DASHBOARD_JS,
               "text/javascript; charset=utf-8"),
    "app.css": (DASHBOARD_CSS, "text/css; charset=utf-8"),
    "icon.svg": (DASHBOARD_ICON, "image/svg+xml"),
}


if __name__ == "__main__":
    sys.exit(main())
