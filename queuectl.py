#!/usr/bin/env python3
"""queuectl: a durable background job queue for shell commands, in one file.

Jobs live in a SQLite database; a supervisor runs a pool of worker processes that
claim jobs, run them through /bin/sh with a timeout, retry failures with exponential
backoff and move exhausted jobs to a dead letter queue (DLQ).

Usage:
    queuectl enqueue '{"id": "job1", "command": "sleep 2"}'
    queuectl worker start --count 4         (foreground; --detach for background)
    queuectl worker stop
    queuectl status [--json] [--check]
    queuectl list [--state S] | show ID | dlq list | dlq retry ID... | delete ID...
    queuectl config show | config get KEY | config set KEY VALUE
    queuectl stats [--json]

Exit codes:
    0  success
    1  runtime error: unknown job, job in the wrong state, workers already running,
       unusable database
    2  usage or validation error: bad option, bad JSON, bad job field, unknown state
       or config key, bad config value
    3  status --check: dead jobs in the DLQ
    4  status --check: runnable jobs are waiting but no workers are running
    5  status --check: the oldest runnable job has waited longer than --max-age
"""

import argparse
import collections
import contextlib
import dataclasses
import fcntl
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import secrets
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

__version__ = "1.0.0"


####
# Constants ####
####

PROG = "queuectl"
ENV_DB = "QUEUECTL_DB"
DB_FILENAME = "queuectl.db"
PID_SUFFIX = ".pid"        # <db>.pid: the supervisor's PID file and lock
LOG_SUFFIX = ".log"        # <db>.log: where a --detach'ed supervisor logs

PENDING = "pending"
PROCESSING = "processing"
COMPLETED = "completed"
FAILED = "failed"          # failed, waiting for its retry
DEAD = "dead"              # in the DLQ
STATES = (PENDING, PROCESSING, COMPLETED, FAILED, DEAD)

# What ended an attempt (attempts.outcome).
RUNNING = "running"
INTERRUPTED = "interrupted"  # stopped by a cold shutdown; does not use up an attempt
WORKER_LOST = "worker lost"

# Stop signals. To a supervisor: SIGINT and SIGTERM step up (the first is a warm
# stop, the second cold); WARM_SIGNAL (from `worker stop`) asks for a warm stop and
# COLD_SIGNAL for a cold one, however often they come. To a worker: SIGTERM is a
# warm stop, COLD_SIGNAL a cold one.
WARM, COLD = 1, 2
WARM_SIGNAL = signal.SIGUSR2
COLD_SIGNAL = signal.SIGUSR1
ABORT_COLD = "cold stop"
AFTER_FAILURE = {FAILED: "will retry after its backoff", DEAD: "moved to the DLQ"}
ABORT_LOST = "claim lost"
CLAIM_ENV = "QUEUECTL_CLAIM"   # marks every process of a run, to find orphans later
# What a supervisor is doing, as its PID file tells.
STARTING, RUNNING_STATE, STOPPING = "starting", "running", "stopping"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CHECK_DEAD = 3
EXIT_CHECK_NO_WORKERS = 4
EXIT_CHECK_STALE = 5

# key: (default, type, smallest valid value or None for "above 0", valid values)
CONFIG = {
    "max_retries": (3, int, 0, "a whole number >= 0"),
    "backoff_base": (2, float, 1, "a number >= 1"),
    "backoff_max": (3600, float, 0, "a number of seconds >= 0"),
    "job_timeout": (300, float, None, "a number of seconds > 0"),
    "output_limit": (65536, int, 0, "a whole number of bytes >= 0"),
    "lease_timeout": (15, float, 1, "a number of seconds >= 1"),
}
CONFIG_DEFAULTS = {key: spec[0] for key, spec in CONFIG.items()}

JOB_FIELDS = ("id", "command", "max_retries", "priority", "run_at", "delay", "timeout")

# An ISO-8601 time as users write it: date, T or space, time, Z or an offset.
USER_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?"
    r"(?:([zZ])|([+-])(\d{2}):?(\d{2}))?")

# SQLite's own busy handler sleeps up to 100 ms between tries, so under heavy load a
# waiting writer can starve for seconds. So SQLite waits only briefly, and _run
# retries the transaction after a short random pause, up to BUSY_DEADLINE_S.
BUSY_TIMEOUT_S = 0.02
BUSY_RETRY_MAX_S = 0.005
BUSY_DEADLINE_S = 60.0
IDLE_POLL_S = 0.05         # how often an idle worker looks for a change to the database
IDLE_RECHECK_S = 1.0       # an idle worker claims and reclaims at least this often
TICK_S = 0.1               # how often a running job is checked (timeout, stop, lease)
KILL_GRACE_S = 2.0         # between SIGTERM and SIGKILL for a job's process group
COLD_STOP_GRACE_S = 10.0   # how long a cold-stopped worker may take before SIGKILL
RESTART_DELAY_S = 1.0      # before restarting a worker that crashed right after start
DETACH_WAIT_S = 15.0       # how long --detach waits for the workers to come up
ID_MAX_LEN = 128
MAX_WORKERS = 256
INT_LIMIT = 2 ** 31        # priorities and retries stay well inside SQLite's int64

SQLITE_HEADER = b"SQLite format 3\x00"
APPLICATION_ID = 0x51435444  # "QCTD": marks a SQLite file as a queuectl database

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
)
SCHEMA_VERSION = len(MIGRATIONS)


####
# Errors ####
####

class QueueError(Exception):
    """A failure to report to the user in one line, with an exit code."""

    code = EXIT_ERROR


class UsageError(QueueError):
    """Bad input: a bad option, JSON document, job field or config value."""

    code = EXIT_USAGE


####
# Helpers ####
####

def now_utc():
    return datetime.now(timezone.utc)


def iso(dt):
    """Format an aware datetime as fixed-width UTC ISO-8601 with a Z suffix."""
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def parse_iso(text):
    """Parse a time written by iso()."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def parse_user_time(text):
    """Parse an ISO-8601 time given by a user; it must carry Z or an offset.

    A pattern of our own, not fromisoformat: that rejects Z before 3.11 and accepts
    other forms on newer Pythons, and a job file must mean the same on all of them.
    """
    match = USER_TIME.fullmatch(text.strip()) if isinstance(text, str) else None
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


def backoff_delay(failures, base, maximum):
    """Seconds to wait after failed attempt number `failures`: min(base ** k, max)."""
    if failures <= 0:
        return 0.0
    # Compare exponents so a large k cannot overflow a float.
    if maximum <= 0 or failures * math.log(base) >= math.log(maximum):
        return float(max(maximum, 0))
    return float(base ** failures)


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


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def config_key(name):
    """Return the canonical config key for NAME (max-retries == max_retries)."""
    key = name.strip().lower().replace("-", "_")
    if key not in CONFIG:
        known = ", ".join(CONFIG)
        raise UsageError(f"unknown config key {name!r} (known: {known})")
    return key


def parse_config_value(key, text):
    """Validate TEXT as a value for config KEY and return it as a number."""
    _, kind, minimum, wanted = CONFIG[key]
    try:
        value = kind(str(text).strip())
    except ValueError:
        raise UsageError(f"bad value for {key}: {text!r} (expected {wanted})") from None
    if kind is float:
        if not math.isfinite(value):
            raise UsageError(f"bad value for {key}: {text!r} (expected {wanted})")
        if value == int(value):
            value = int(value)
    too_small = value <= 0 if minimum is None else value < minimum
    if too_small or value >= INT_LIMIT:
        raise UsageError(f"bad value for {key}: {text!r} (expected {wanted})")
    return value


def validate_job(doc, now=None):
    """Check one job document and return the values to store, or raise UsageError."""
    if not isinstance(doc, dict):
        raise UsageError("a job must be a JSON object like "
                         "{\"command\": \"echo hi\"}")
    unknown = sorted(set(doc) - set(JOB_FIELDS))
    if unknown:
        raise UsageError(f"unknown field {unknown[0]!r} "
                         f"(known: {', '.join(JOB_FIELDS)})")
    now = now or now_utc()
    command = doc.get("command")
    if command is None:
        raise UsageError("missing field 'command'")
    if not isinstance(command, str) or not command.strip():
        raise UsageError("field 'command' must be a non-empty string")
    check_text(command, "field 'command'")
    job = {"id": None, "command": command, "max_retries": None, "priority": 0,
           "run_at": iso(now), "timeout_s": None}
    if "id" in doc:
        job["id"] = validate_job_id(doc["id"])
    if "max_retries" in doc:
        value = doc["max_retries"]
        if not is_int(value) or not 0 <= value < INT_LIMIT:
            raise UsageError("field 'max_retries' must be a whole number >= 0")
        job["max_retries"] = value
    if "priority" in doc:
        value = doc["priority"]
        if not is_int(value) or abs(value) >= INT_LIMIT:
            raise UsageError("field 'priority' must be a whole number "
                             "(higher runs first)")
        job["priority"] = value
    if "run_at" in doc and "delay" in doc:
        raise UsageError("give either 'run_at' or 'delay', not both")
    if "run_at" in doc:
        try:
            job["run_at"] = iso(parse_user_time(doc["run_at"]))
        except ValueError as e:
            raise UsageError(f"field 'run_at': {e}") from None
    if "delay" in doc:
        value = doc["delay"]
        if not is_number(value) or not 0 <= value < INT_LIMIT:
            raise UsageError("field 'delay' must be a number of seconds >= 0")
        job["run_at"] = iso(now + timedelta(seconds=value))
    if "timeout" in doc:
        value = doc["timeout"]
        if not is_number(value) or not 0 < value < INT_LIMIT:
            raise UsageError("field 'timeout' must be a number of seconds > 0")
        job["timeout_s"] = value
    return job


def check_text(text, what):
    """Refuse text that cannot be stored or passed to a shell: NUL, bad UTF-8."""
    if "\0" in text:
        raise UsageError(f"{what} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8 text") from None


def validate_job_id(value):
    if not isinstance(value, str) or not value:
        raise UsageError("field 'id' must be a non-empty string")
    check_text(value, "field 'id'")
    if len(value) > ID_MAX_LEN:
        raise UsageError(f"field 'id' is longer than {ID_MAX_LEN} characters")
    if value.startswith("-") or any(c.isspace() or not c.isprintable() for c in value):
        raise UsageError("field 'id' must not start with '-' or contain spaces or "
                         "control characters")
    return value


def new_job_id():
    return secrets.token_hex(5)


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


def clip(text, width):
    """Fold TEXT onto one line of at most WIDTH characters."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def log(message):
    """Write one timestamped line to stderr in a single write (workers share it)."""
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    line = f"{iso(now_utc())} {message}\n".encode("utf-8", "replace")
    try:
        os.write(sys.stderr.fileno(), line)
    except (OSError, ValueError):
        pass  # a closed or full log must not stop the queue


####
# Records ####
####

# A live supervisor as its PID file describes it.
Supervised = collections.namedtuple("Supervised", "pid workers state")


@dataclasses.dataclass
class Claim:
    """A job a worker has claimed, with the settings in force when it did."""

    id: str
    command: str
    cwd: str
    token: str
    attempt: int
    max_retries: int
    timeout_s: float
    output_limit: int
    lease_s: float


@dataclasses.dataclass
class RunResult:
    """How one run of a command ended."""

    exit_code: "int | None"
    reason: "str | None" = None     # why it failed; None when it succeeded
    stdout: str = ""
    stderr: str = ""
    stdout_dropped: int = 0          # bytes cut from the head to keep output_limit
    stderr_dropped: int = 0
    duration_s: "float | None" = None
    aborted: "str | None" = None     # set when should_abort() stopped the run

    @property
    def ok(self):
        return self.exit_code == 0 and self.reason is None


####
# Store ####
####

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
    if "unable to open" in lowered:
        folder = os.path.dirname(path)
        if not os.access(folder, os.W_OK):
            # WAL needs its -wal and -shm files beside the database.
            return f"database is read-only (cannot write in {folder}): {path}"
        return f"cannot open database: {path}"
    if "locked" in lowered or "busy" in lowered:
        return f"database is busy (still locked after {BUSY_DEADLINE_S:.0f}s): {path}"
    if "disk i/o" in lowered:
        return f"disk I/O error on database: {path}"
    return f"database error ({text}): {path}"


def _is_busy(error):
    return isinstance(error, sqlite3.OperationalError) and (
        "locked" in str(error) or "busy" in str(error))


class Store:
    """The job database; the only code that holds SQL or knows sqlite3."""

    def __init__(self, path, create=True):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.conn = None
        if self._check_file(create):
            self._identify()
        try:
            self.conn = self._retrying(lambda: sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None))
            self.conn.row_factory = sqlite3.Row
            # In WAL, NORMAL may lose the last commits on power loss; FULL does not.
            self.conn.execute("PRAGMA synchronous=FULL")
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

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

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
                raise QueueError(f"no database at {path} (enqueue a job or start "
                                 f"workers to create it)") from None
            self._create_file()
            return False
        except OSError as e:
            raise QueueError(f"cannot read database {path}: {e.strerror}") from None
        if header and header != SQLITE_HEADER:
            raise QueueError(f"not a queuectl database (not a SQLite file): {path}")
        if not header:            # an empty file (mktemp): a new database, if allowed
            if not create:
                raise QueueError(f"no database at {path} (the file is empty; enqueue "
                                 f"a job or start workers to create it)")
            with contextlib.suppress(OSError):
                os.chmod(path, 0o600)
        return bool(header)

    def _create_file(self):
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
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
                    time.sleep(random.uniform(0, BUSY_RETRY_MAX_S))
                    continue
                raise QueueError(_sqlite_message(e, self.path)) from None

    def _run(self, body, begin):
        """Run body(conn) in one transaction, retried as a whole while busy."""
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

    def _write(self, body, mode="IMMEDIATE"):
        return self._run(body, "BEGIN " + mode)

    def _read(self, body):
        return self._run(body, "BEGIN DEFERRED")

    def data_version(self):
        """Return a number that changes whenever another connection commits."""
        return self._retrying(
            lambda: self.conn.execute("PRAGMA data_version").fetchone()[0])

    # -- config -------------------------------------------------------------------

    @staticmethod
    def _config(conn):
        values = dict(CONFIG_DEFAULTS)
        for row in conn.execute("SELECT key, value FROM config"):
            if row["key"] in values:
                values[row["key"]] = parse_config_value(row["key"], row["value"])
        return values

    def config(self):
        return self._read(self._config)

    def set_config(self, key, value):
        self._write(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)", (key, str(value))))

    # -- jobs: adding, reading, deleting -----------------------------------------

    def enqueue(self, jobs, cwd, now=None):
        """Insert validated jobs in one transaction and return their ids."""
        stamp = iso(now or now_utc())

        def body(conn):
            ids = []
            for job in jobs:
                job_id = job["id"]
                for _ in range(100):
                    candidate = job_id or new_job_id()
                    try:
                        conn.execute(
                            "INSERT INTO jobs (id, command, cwd, state, priority, "
                            "max_retries, timeout_s, run_at, created_at, updated_at) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (candidate, job["command"], cwd, PENDING, job["priority"],
                             job["max_retries"], job["timeout_s"], job["run_at"],
                             stamp, stamp))
                        break
                    except sqlite3.IntegrityError:
                        if job_id:
                            raise QueueError(f"duplicate job id: {job_id}") from None
                ids.append(candidate)
            return ids
        return self._write(body)

    def get_job(self, job_id):
        """Return the job, its attempts and the output of its last run."""
        def body(conn):
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise QueueError(f"no such job: {job_id}")
            attempts = conn.execute(
                "SELECT * FROM attempts WHERE job_id = ? ORDER BY id",
                (job_id,)).fetchall()
            return job_dict(row, self._config(conn)), [dict(a) for a in attempts]
        return self._read(body)

    def list_jobs(self, state=None, limit=None):
        def body(conn):
            sql = "SELECT * FROM jobs"
            params = []
            if state:
                sql += " WHERE state = ?"
                params.append(state)
            sql += " ORDER BY created_at DESC, rowid DESC"
            if limit:
                sql += " LIMIT ?"
                params.append(limit)
            config = self._config(conn)
            return [job_dict(row, config) for row in conn.execute(sql, params)]
        return self._read(body)

    def job_states(self, job_ids):
        """Return {id: state} of those of JOB_IDS that exist."""
        def body(conn):
            states = {}
            for job_id in job_ids:
                row = conn.execute("SELECT state FROM jobs WHERE id = ?",
                                   (job_id,)).fetchone()
                if row is not None:
                    states[job_id] = row["state"]
            return states
        return self._read(body)

    def _require_jobs(self, conn, job_ids, allowed, action):
        """Check every id exists and is in an allowed state; raise on the first not."""
        for job_id in job_ids:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?",
                               (job_id,)).fetchone()
            if row is None:
                raise QueueError(f"no such job: {job_id}")
            if row["state"] not in allowed:
                raise QueueError(f"cannot {action} job {job_id}: it is {row['state']}")

    def delete(self, job_ids):
        def body(conn):
            self._require_jobs(conn, job_ids, set(STATES) - {PROCESSING}, "delete")
            for job_id in job_ids:
                conn.execute("DELETE FROM attempts WHERE job_id = ?", (job_id,))
                conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        self._write(body)

    def retry_dead(self, job_ids=None, now=None):
        """Put dead jobs (all of them if job_ids is None) back to pending, attempts 0."""
        stamp = iso(now or now_utc())

        def body(conn):
            ids = job_ids
            if ids is None:
                ids = [r["id"] for r in conn.execute(
                    "SELECT id FROM jobs WHERE state = ? ORDER BY created_at, rowid",
                    (DEAD,))]
            self._require_jobs(conn, ids, {DEAD}, "retry")
            for job_id in ids:
                conn.execute(
                    "UPDATE jobs SET state = ?, attempts = 0, run_at = ?, "
                    "updated_at = ? WHERE id = ? AND state = ?",
                    (PENDING, stamp, stamp, job_id, DEAD))
            return ids
        return self._write(body)

    # -- status and stats ---------------------------------------------------------

    @staticmethod
    def _counts(conn):
        counts = dict.fromkeys(STATES, 0)
        for row in conn.execute("SELECT state, count(*) AS n FROM jobs GROUP BY state"):
            counts[row["state"]] = row["n"]
        return counts

    def status(self, now=None):
        stamp = iso(now or now_utc())

        def body(conn):
            counts = self._counts(conn)
            oldest = conn.execute(
                "SELECT min(run_at) FROM jobs INDEXED BY jobs_due "
                "WHERE state IN ('pending', 'failed') AND run_at <= ?",
                (stamp,)).fetchone()[0]
            running = {row["worker_pid"]: dict(row) for row in conn.execute(
                "SELECT id, worker_pid, command, lease_until FROM jobs "
                "INDEXED BY jobs_leases WHERE state = 'processing'")}
            return counts, oldest, running
        return self._read(body)

    def stats(self, now=None):
        now = now or now_utc()

        def percentile(conn, count, fraction):
            if not count:
                return None
            offset = min(count - 1, max(0, math.ceil(fraction * count) - 1))
            return conn.execute(
                "SELECT duration_s FROM attempts WHERE outcome = ? "
                "ORDER BY duration_s LIMIT 1 OFFSET ?",
                (COMPLETED, offset)).fetchone()[0]

        def finished_since(conn, seconds):
            return conn.execute(
                "SELECT count(*) FROM attempts WHERE outcome = ? AND finished_at >= ?",
                (COMPLETED, iso(now - timedelta(seconds=seconds)))).fetchone()[0]

        def body(conn):
            counts = self._counts(conn)
            runs, average = conn.execute(
                "SELECT count(*), avg(duration_s) FROM attempts WHERE outcome = ?",
                (COMPLETED,)).fetchone()
            failed_attempts = conn.execute(
                "SELECT count(*) FROM attempts WHERE outcome = ?",
                (FAILED,)).fetchone()[0]
            ended = counts[COMPLETED] + counts[DEAD]
            return {
                "jobs": counts,
                "completed": counts[COMPLETED],
                "failed_attempts": failed_attempts,
                "dead": counts[DEAD],
                "success_rate": counts[COMPLETED] / ended if ended else None,
                "run_time_avg_s": average,
                "run_time_p50_s": percentile(conn, runs, 0.50),
                "run_time_p95_s": percentile(conn, runs, 0.95),
                "completed_last_minute": finished_since(conn, 60),
                "completed_last_hour": finished_since(conn, 3600),
            }
        return self._read(body)

    # -- the claim protocol ----------------------------------------------------------

    def has_runnable(self, now=None):
        """Cheaply tell whether a claim could succeed (no lock taken)."""
        stamp = iso(now or now_utc())
        return self._retrying(lambda: self.conn.execute(
            "SELECT 1 FROM jobs INDEXED BY jobs_due "
            "WHERE state IN ('pending', 'failed') AND run_at <= ? LIMIT 1",
            (stamp,)).fetchone() is not None)

    def next_run_at(self):
        """Return when the next waiting job becomes runnable, or None."""
        def body(conn):
            return conn.execute(
                "SELECT min(run_at) FROM jobs INDEXED BY jobs_due "
                "WHERE state IN ('pending', 'failed')").fetchone()[0]
        value = self._read(body)
        return parse_iso(value) if value else None

    def claim(self, worker_pid, worker_start=None, now=None):
        """Take the best runnable job for worker_pid, or return None.

        One EXCLUSIVE transaction selects the job and moves it to processing with a
        fresh claim token, so no two workers can ever hold the same job.
        """
        def body(conn):
            at = now or now_utc()    # read the clock once the lock is ours
            stamp = iso(at)
            config = self._config(conn)
            while True:
                row = conn.execute(
                    "SELECT * FROM jobs INDEXED BY jobs_runnable "
                    "WHERE state IN ('pending', 'failed') AND run_at <= ? "
                    "ORDER BY priority DESC, run_at, created_at, rowid LIMIT 1",
                    (stamp,)).fetchone()
                if row is None:
                    return None
                max_retries = _effective(row["max_retries"], config["max_retries"])
                if row["state"] == PENDING or row["attempts"] <= max_retries:
                    break
                # max_retries was lowered while this job waited: it has no retry left.
                conn.execute("UPDATE jobs SET state = ?, updated_at = ? "
                             "WHERE id = ? AND state = ?",
                             (DEAD, stamp, row["id"], FAILED))
            token = secrets.token_hex(16)
            lease = iso(at + timedelta(seconds=config["lease_timeout"]))
            attempt = row["attempts"] + 1
            updated = conn.execute(
                "UPDATE jobs SET state = ?, attempts = ?, claim_token = ?, "
                "run_token = ?, worker_pid = ?, worker_start = ?, run_pgid = NULL, "
                "run_pg_start = NULL, lease_until = ?, updated_at = ? "
                "WHERE id = ? AND state = ?",
                (PROCESSING, attempt, token, token, worker_pid, worker_start, lease,
                 stamp, row["id"], row["state"])).rowcount
            if updated != 1:
                return None
            # attempts.number counts every run of the job (1, 2, ...), while
            # jobs.attempts counts those that use up retries.
            conn.execute(
                "INSERT INTO attempts (job_id, number, run_token, worker_pid, "
                "started_at, outcome) SELECT ?, count(*) + 1, ?, ?, ?, ? "
                "FROM attempts WHERE job_id = ?",
                (row["id"], token, worker_pid, stamp, RUNNING, row["id"]))
            return Claim(
                id=row["id"], command=row["command"], cwd=row["cwd"], token=token,
                attempt=attempt, max_retries=max_retries,
                timeout_s=_effective(row["timeout_s"], config["job_timeout"]),
                output_limit=config["output_limit"],
                lease_s=config["lease_timeout"])
        return self._write(body, "EXCLUSIVE")

    def holds(self, job_id, token):
        """Whether TOKEN still owns the claim on the job (a read; no lock)."""
        def body(conn):
            return conn.execute(
                "SELECT 1 FROM jobs WHERE id = ? AND claim_token = ? AND state = ?",
                (job_id, token, PROCESSING)).fetchone() is not None
        return self._read(body)

    def started(self, job_id, token, pgid, pg_start, lease_s, now=None):
        """Record the command's process group and renew; False if the claim is gone."""
        def body(conn):
            at = now or now_utc()
            return conn.execute(
                "UPDATE jobs SET run_pgid = ?, run_pg_start = ?, lease_until = ? "
                "WHERE id = ? AND claim_token = ? AND state = ?",
                (pgid, pg_start, iso(at + timedelta(seconds=lease_s)), job_id, token,
                 PROCESSING)).rowcount == 1
        return self._write(body)

    def renew(self, job_id, token, lease_s, now=None):
        """Extend a claim's lease by LEASE_S; False if the claim was taken away."""
        def body(conn):
            at = now or now_utc()
            return conn.execute(
                "UPDATE jobs SET lease_until = ? "
                "WHERE id = ? AND claim_token = ? AND state = ?",
                (iso(at + timedelta(seconds=lease_s)), job_id, token,
                 PROCESSING)).rowcount == 1
        return self._write(body)

    def finish(self, job_id, token, result, now=None):
        """End an attempt with a RunResult; return the job's new state, or None if
        the claim was taken away meanwhile (then nothing is written)."""
        def body(conn):
            return self._end_attempt(conn, job_id, token, now or now_utc(), result)
        return self._write(body)

    def take_over(self, job_id, token, new_token, worker_pid, worker_start=None,
                  only_expired=False, now=None):
        """Move a claim to NEW_TOKEN (held by WORKER_PID) if TOKEN still holds it
        (and, with ONLY_EXPIRED, its lease has run out). Return the run to end, as
        (run_token, run_pgid, run_pg_start), or None if it did not."""
        def body(conn):
            at = now or now_utc()
            lease_s = self._config(conn)["lease_timeout"]
            sql = ("UPDATE jobs SET claim_token = ?, worker_pid = ?, worker_start = ?, "
                   "lease_until = ? "
                   "WHERE id = ? AND claim_token = ? AND state = 'processing'")
            params = [new_token, worker_pid, worker_start,
                      iso(at + timedelta(seconds=lease_s)), job_id, token]
            if only_expired:
                sql += " AND lease_until < ?"
                params.append(iso(at))
            if conn.execute(sql, params).rowcount != 1:
                return None
            row = conn.execute("SELECT run_token, run_pgid, run_pg_start FROM jobs "
                               "WHERE id = ?", (job_id,)).fetchone()
            return tuple(row)
        return self._write(body)

    def fence(self, job_id, token, reason, now=None):
        """End a claimed attempt as failed with REASON (the run's result is lost)."""
        result = RunResult(exit_code=None, reason=reason)

        def body(conn):
            return self._end_attempt(conn, job_id, token, now or now_utc(), result)
        return self._write(body)

    def requeue(self, job_id, token, reason, now=None):
        """Give a claimed job back as pending without using up an attempt."""
        def body(conn):
            stamp = iso(now or now_utc())
            row = conn.execute(
                "SELECT run_token FROM jobs WHERE id = ? AND claim_token = ? AND "
                "state = ?", (job_id, token, PROCESSING)).fetchone()
            if row is None:
                return False
            # Runnable again from now, so status does not count the run as waiting.
            conn.execute(
                "UPDATE jobs SET state = ?, attempts = max(attempts - 1, 0), "
                "run_at = ?, claim_token = NULL, run_token = NULL, worker_pid = NULL, "
                "worker_start = NULL, run_pgid = NULL, run_pg_start = NULL, "
                "lease_until = NULL, updated_at = ? WHERE id = ?",
                (PENDING, stamp, stamp, job_id))
            conn.execute(
                "UPDATE attempts SET outcome = ?, reason = ?, finished_at = ? "
                "WHERE run_token = ?", (INTERRUPTED, reason, stamp, row["run_token"]))
            return True
        return self._write(body)

    def _end_attempt(self, conn, job_id, token, now, result):
        row = conn.execute(
            "SELECT * FROM jobs WHERE id = ? AND claim_token = ? AND state = ?",
            (job_id, token, PROCESSING)).fetchone()
        if row is None:
            return None      # fenced: someone else owns this job now
        stamp = iso(now)
        config = self._config(conn)
        if result.ok:
            state, run_at, error = COMPLETED, row["run_at"], None
        else:
            error = result.reason
            max_retries = _effective(row["max_retries"], config["max_retries"])
            if row["attempts"] > max_retries:
                state, run_at = DEAD, row["run_at"]
            else:
                delay = backoff_delay(row["attempts"], config["backoff_base"],
                                      config["backoff_max"])
                state, run_at = FAILED, iso(now + timedelta(seconds=delay))
        conn.execute(
            "UPDATE jobs SET state = ?, run_at = ?, last_error = ?, claim_token = NULL, "
            "run_token = NULL, worker_pid = NULL, worker_start = NULL, run_pgid = NULL, "
            "run_pg_start = NULL, lease_until = NULL, updated_at = ? "
            "WHERE id = ? AND claim_token = ?",
            (state, run_at, error, stamp, job_id, token))
        run_token = row["run_token"]
        started = conn.execute("SELECT started_at FROM attempts WHERE run_token = ?",
                               (run_token,)).fetchone()
        duration = result.duration_s
        if duration is None and started is not None:
            duration = max(0.0, (now - parse_iso(started[0])).total_seconds())
        if duration is not None:
            duration = round(duration, 3)
        conn.execute(
            "UPDATE attempts SET outcome = ?, finished_at = ?, exit_code = ?, "
            "reason = ?, duration_s = ?, stdout = ?, stderr = ?, stdout_dropped = ?, "
            "stderr_dropped = ? WHERE run_token = ?",
            (COMPLETED if result.ok else FAILED, stamp, result.exit_code, error,
             duration, result.stdout, result.stderr, result.stdout_dropped,
             result.stderr_dropped, run_token))
        return state

    def expired_claims(self, now=None):
        """Return (job id, token, holder pid, holder start) of claims whose lease
        has run out."""
        stamp = iso(now or now_utc())

        def body(conn):
            return [tuple(r) for r in conn.execute(
                "SELECT id, claim_token, worker_pid, worker_start FROM jobs "
                "INDEXED BY jobs_leases WHERE state = 'processing' AND lease_until < ?",
                (stamp,))]
        return self._read(body)

    def claims_of(self, worker_pid):
        """Return (job id, token) of the claims held by a worker process."""
        def body(conn):
            return [(r["id"], r["claim_token"]) for r in conn.execute(
                "SELECT id, claim_token FROM jobs INDEXED BY jobs_leases "
                "WHERE state = 'processing' AND worker_pid = ?", (worker_pid,))]
        return self._read(body)


def _effective(value, default):
    value = default if value is None else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def job_dict(row, config):
    """Return the public JSON form of a jobs row."""
    state = row["state"]
    return {
        "id": row["id"],
        "command": row["command"],
        "state": state,
        "attempts": row["attempts"],
        "max_retries": _effective(row["max_retries"], config["max_retries"]),
        "priority": row["priority"],
        "run_at": row["run_at"],
        "timeout": _effective(row["timeout_s"], config["job_timeout"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "next_retry_at": row["run_at"] if state == FAILED else None,
        "last_error": row["last_error"],
        "worker_pid": row["worker_pid"] if state == PROCESSING else None,
        "lease_until": row["lease_until"] if state == PROCESSING else None,
        "cwd": row["cwd"],
    }


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


def _read_tail(f, limit):
    """Return (text, dropped bytes) of the last LIMIT bytes written to file F."""
    size = f.seek(0, os.SEEK_END)
    start = max(0, size - limit)
    f.seek(start)
    data = f.read(limit) if limit else b""
    return data.decode("utf-8", "replace"), start


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
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The name in parentheses can hold any bytes; what follows is ASCII.
    _, _, rest = data.rpartition(b")")
    return rest.decode("ascii", "replace").split() or None


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

    A zombie still counts for kill(), and one whose new parent is slow to reap it
    (a container's PID 1) would otherwise hold every job for the full grace.
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


def kill_group(proc, grace_s=KILL_GRACE_S):
    """End a command's process group: SIGTERM, then SIGKILL after GRACE_S; reap it.

    Called on timeout and stop, and after every run, so that nothing a job started
    outlives it. Never hits an unrelated process: the group's id stays taken while
    the shell is unreaped or any member of the group lives.
    """
    if _signal_group(proc.pid, signal.SIGTERM):
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                break
            time.sleep(0.02)
        _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def run_command(command, cwd, timeout_s, output_limit, env=None, should_abort=None,
                on_start=None):
    """Run COMMAND through /bin/sh in its own process group and return a RunResult.

    on_start(proc) is called once the command runs; if it returns False the run is
    killed at once (RunResult.aborted = ABORT_LOST). should_abort() is called every
    TICK_S; a non-empty string it returns kills the group and ends the run with
    that reason in RunResult.aborted.
    """
    started = time.monotonic()
    if not os.path.isdir(cwd):
        return RunResult(exit_code=None, duration_s=0.0,
                         reason=f"cannot start: directory {cwd} does not exist")
    try:
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    except OSError as e:
        return RunResult(exit_code=None, duration_s=0.0,
                         reason=f"cannot start: no file for its output: {e.strerror}")
    with out, err:
        try:
            proc = subprocess.Popen(command, shell=True, cwd=cwd, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        except ValueError as e:       # e.g. a NUL byte: cannot be an argument
            return RunResult(exit_code=None, duration_s=0.0,
                             reason=f"cannot start: {e}")
        except OSError as e:
            return RunResult(exit_code=None, duration_s=0.0,
                             reason=f"cannot start: {e.strerror}: {e.filename or cwd}")
        reason = aborted = None
        if on_start is not None and not on_start(proc):
            aborted = ABORT_LOST
        deadline = started + timeout_s
        while aborted is None:
            try:
                proc.wait(timeout=min(TICK_S, max(0.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() >= deadline:
                reason = f"timeout after {timeout_s:g}s"
            elif should_abort is not None:
                aborted = should_abort()
            if reason or aborted:
                break
        duration = time.monotonic() - started
        kill_group(proc)      # the whole job on timeout or stop; leftovers otherwise
        if (reason or aborted) and env and CLAIM_ENV in env:
            kill_run(env[CLAIM_ENV])    # children that left the group (setsid)
        returncode = proc.returncode
        stdout, stdout_dropped = _read_tail(out, output_limit)
        stderr, stderr_dropped = _read_tail(err, output_limit)
    if reason is None and aborted is None and returncode != 0:
        reason = describe_exit(returncode)
    if aborted:
        reason = aborted
    return RunResult(exit_code=returncode, reason=reason, stdout=stdout, stderr=stderr,
                     stdout_dropped=stdout_dropped, stderr_dropped=stderr_dropped,
                     duration_s=duration, aborted=aborted)


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


def kill_run(run_token, pgid=None, pg_start=None, grace_s=KILL_GRACE_S):
    """Kill what is left of a run: SIGTERM, then SIGKILL after GRACE_S.

    It finds the run's processes two ways, each proven before a signal: its process
    group, if the group's leader is still the process that started it (same start
    time), and every process whose environment carries the run's marker (which
    also finds those that left the group). A reused pid is never hit.
    """
    def targets():
        groups = set()
        if pgid and pg_start is not None and start_ticks(pgid) == pg_start:
            groups.add(pgid)
        pids = _processes_of_claim(run_token)
        for pid in pids:
            with contextlib.suppress(OSError):
                groups.add(os.getpgid(pid))
        return groups, pids

    groups, pids = targets()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not groups and not pids:
            return
        for group in groups:
            with contextlib.suppress(OSError):
                os.killpg(group, sig)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            groups, pids = targets()
            if not groups and not pids:
                return
            time.sleep(0.05)


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


def recover_claim(store, job_id, token, who, only_expired=False, cold=False):
    """Take a lost claim over, kill what is left of its run, and end it: failed as
    worker lost, or (COLD) given back as pending. Return True if it did.

    Taking over first (a compare-and-set that swaps the owner token) leaves alone a
    claim renewed meanwhile and keeps everyone else off the job while its old
    processes are killed. The run keeps its own token, so if this recoverer dies
    half-way, the next one still finds those processes.
    """
    new_token = secrets.token_hex(16)
    run = store.take_over(job_id, token, new_token, os.getpid(),
                          start_ticks(os.getpid()), only_expired)
    if run is None:
        return False
    kill_run(*run)
    if cold:
        if store.requeue(job_id, new_token, ABORT_COLD):
            log(f"{who}: job {job_id} interrupted; back to pending")
        return True
    state = store.fence(job_id, new_token, WORKER_LOST)
    if state:
        log(f"{who}: job {job_id} failed: {WORKER_LOST}; {AFTER_FAILURE[state]}")
    return True


def reclaim_expired(store, who):
    """Recover every job whose lease ran out and whose holder is not still
    running it; return how many."""
    count = 0
    for job_id, token, holder, holder_start in store.expired_claims():
        # Whoever reclaims runs no job at this moment: a claim it holds itself is
        # one it took over and failed to end, so it is lost too.
        if holder != os.getpid() and holder_running(holder, holder_start):
            continue       # late with its renewal (a pause, a clock step), not lost
        if recover_claim(store, job_id, token, who, only_expired=True):
            count += 1
    return count


class Worker:
    """One worker process: claims jobs and runs them until told to stop."""

    def __init__(self, store, index, stop, parent_pid):
        self.store = store
        self.index = index
        self.stop = stop
        self.parent_pid = parent_pid
        self.pid = os.getpid()
        self.start = start_ticks(self.pid)
        self.name = f"worker {index} (pid {self.pid})"
        self.next_reclaim = 0.0

    def orphaned(self):
        return os.getppid() != self.parent_pid

    def loop(self):
        log(f"{self.name}: started")
        while not self.stop.level:
            if self.orphaned():
                log(f"{self.name}: supervisor is gone; stopping")
                break
            if time.monotonic() >= self.next_reclaim:
                reclaim_expired(self.store, self.name)
                self.next_reclaim = time.monotonic() + IDLE_RECHECK_S
            # Read the version before looking, so a job enqueued after the look
            # still wakes us.
            version = self.store.data_version()
            claim = (self.store.claim(self.pid, self.start)
                     if self.store.has_runnable() else None)
            if claim is None:
                self.idle(version)
            else:
                self.run(claim)
        log(f"{self.name}: stopped")

    def idle(self, version):
        """Sleep until the database changes from VERSION, a delayed job is due,
        or a stop."""
        due = self.store.next_run_at()
        wake = time.monotonic() + IDLE_RECHECK_S
        if due is not None:
            wake = min(wake, time.monotonic() + (due - now_utc()).total_seconds())
        while not self.stop.level and time.monotonic() < wake:
            time.sleep(IDLE_POLL_S)
            if self.store.data_version() != version or self.orphaned():
                return

    def run(self, claim):
        log(f"{self.name}: job {claim.id} started (attempt {claim.attempt} of "
            f"{claim.max_retries + 1}): {clip(claim.command, 200)}")
        env = dict(os.environ, QUEUECTL_JOB_ID=claim.id,
                   QUEUECTL_ATTEMPT=str(claim.attempt), **{CLAIM_ENV: claim.token})
        heartbeat = Heartbeat(self.store, claim)

        def should_abort():
            if self.stop.level >= COLD:
                return ABORT_COLD
            if not heartbeat.beat():
                return ABORT_LOST
            return None

        def on_start(proc):
            # Record the group, so a recoverer can kill it even if the command
            # clears its environment; and if this worker was frozen between claim
            # and start long enough to lose the claim, stop the command at once.
            try:
                return self.store.started(claim.id, claim.token, proc.pid,
                                          start_ticks(proc.pid), claim.lease_s)
            except QueueError as e:
                log(f"{self.name}: job {claim.id}: could not record its start: {e}")
                return True      # the heartbeat will tell if the claim is gone

        if not self.store.holds(claim.id, claim.token):
            log(f"{self.name}: job {claim.id} was taken over before it started")
            return
        result = run_command(claim.command, claim.cwd, claim.timeout_s,
                             claim.output_limit, env=env, should_abort=should_abort,
                             on_start=on_start)
        if result.aborted == ABORT_COLD:
            if self.store.requeue(claim.id, claim.token, result.aborted):
                log(f"{self.name}: job {claim.id} interrupted; back to pending")
            return
        state = None
        if result.aborted != ABORT_LOST:
            state = self.store.finish(claim.id, claim.token, result)
        if state is None:
            log(f"{self.name}: job {claim.id} was taken over (its lease ran out); "
                f"this run's result is dropped")
        elif state == COMPLETED:
            log(f"{self.name}: job {claim.id} completed in "
                f"{format_duration(result.duration_s)}")
        else:
            log(f"{self.name}: job {claim.id} failed: {result.reason}; "
                f"{AFTER_FAILURE[state]}")


class Heartbeat:
    """Renews a claim's lease every third of the lease while its command runs."""

    def __init__(self, store, claim):
        self.store = store
        self.claim = claim
        self.interval_s = claim.lease_s / 3
        self.next_at = time.monotonic() + self.interval_s

    def beat(self):
        """Renew if due; return False once the claim has been taken away."""
        if time.monotonic() < self.next_at:
            return True
        try:
            alive = self.store.renew(self.claim.id, self.claim.token,
                                     self.claim.lease_s)
        except QueueError as e:
            log(f"job {self.claim.id}: could not renew lease: {e}")
            alive = True     # try again at the next beat; the lease has slack
        self.next_at = time.monotonic() + self.interval_s
        return alive


def _name_process(name):
    """Name this process for ps and top (Linux; 15 characters at most)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])


def run_worker(db_path, index, parent_pid, ready=None):
    """Entry point of a worker process (a plain function, for spawn and fork)."""
    # The supervisor relays Ctrl-C and a closed terminal. Handlers, not SIG_IGN, so
    # the commands this worker starts get the defaults back when they exec.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: None)
    _name_process(f"queuectl-w{index}")
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop.handle)
    signal.signal(COLD_SIGNAL, stop.handle)
    store = None
    try:
        store = Store(db_path, create=False)
        if ready is not None:
            ready.set()
        Worker(store, index, stop, parent_pid).loop()
    except QueueError as e:
        log(f"worker {index} (pid {os.getpid()}): error: {e}")
        sys.exit(EXIT_ERROR)
    finally:
        if store is not None:
            store.close()


class PidFile:
    """The supervisor's PID file beside the database, locked while it runs.

    The exclusive flock, not the pid written in the file, answers "is it running?":
    a stale file from a crash holds no lock, whatever process now has its pid.
    Line 1 is the supervisor pid, line 2 the worker pids, line 3 the supervisor's
    state: starting, running or stopping.
    """

    def __init__(self, path):
        self.path = path
        self.fd = None

    def acquire(self):
        """Lock and claim the file, or raise QueueError if a supervisor holds it."""
        # A reader (status, worker stop) holds a shared lock for a moment, so a
        # held lock is only conclusive once it has stayed held a little while.
        deadline = time.monotonic() + 0.5
        while True:
            fd = _open_owner_only(self.path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    supervised = self._parse(self.path)
                    pid = supervised.pid if supervised else "?"
                    raise QueueError(f"workers are already running on this database "
                                     f"(supervisor pid {pid})") from None
                time.sleep(0.02)
                continue
            # The file may have been unlinked by an exiting supervisor after we
            # opened it; then our lock guards nothing, so start over.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                self.write([], STARTING)
                return
            os.close(fd)

    def write(self, worker_pids, state):
        data = f"{os.getpid()}\n{' '.join(map(str, worker_pids))}\n{state}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(self.path)      # ours: not one put there since
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def _parse(path):
        """Return a Supervised read from PATH, or None if it is not complete yet."""
        try:
            with open(path) as f:
                lines = f.read().split("\n")
            return Supervised(int(lines[0]), [int(p) for p in lines[1].split()],
                              lines[2])
        except (OSError, ValueError, IndexError):
            return None

    @classmethod
    def running(cls, path):
        """Return a Supervised if a live supervisor holds PATH, else None."""
        for _ in range(50):
            try:
                fd = _open_owner_only(path, os.O_RDONLY)
            except QueueError:
                if not os.path.lexists(path):
                    return None
                raise
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


def pid_path(db_path):
    return db_path + PID_SUFFIX


class Supervisor:
    """Runs COUNT worker processes, replaces crashed ones, and stops them on signals.

    First SIGINT/SIGTERM: warm stop (workers finish their jobs). Second: cold stop
    (workers kill their jobs and put them back as pending).
    """

    def __init__(self, db_path, count):
        self.db_path = db_path
        self.count = count
        self.stop = StopFlag(counted=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
        self.relayed = 0
        self.workers = {}        # index -> Process
        self.ready = {}          # index -> Event the worker sets once in its loop
        self.started_at = {}     # index -> monotonic start time
        # spawn: a worker shares no connection, lock or thread with this process.
        self.context = multiprocessing.get_context("spawn")
        self.pidfile = PidFile(pid_path(db_path))
        self.store = None
        self.state = STARTING

    def run(self):
        # Handlers first: a stop may come the moment the PID file names us.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, WARM_SIGNAL,
                    COLD_SIGNAL):
            signal.signal(sig, self.stop.handle)
        self.pidfile.acquire()
        try:
            _name_process("queuectl-super")
            os.chdir("/")    # hold no directory busy; every path used is absolute
            self.store = Store(self.db_path)
            recovered = reclaim_expired(self.store, "supervisor")
            if recovered:
                log(f"supervisor: recovered {recovered} job(s) of lost workers")
            log(f"supervisor (pid {os.getpid()}): starting {self.count} worker(s) "
                f"on {self.db_path}")
            for index in range(1, self.count + 1):
                if self.stop.level:
                    break
                self.start_worker(index)
            self.wait_ready()
            self.publish(STOPPING if self.stop.level else self.up_state())
            self.watch()
        finally:
            try:
                self.kill_all()
            finally:
                if self.store is not None:
                    self.store.close()
                self.pidfile.release()
        log("supervisor: stopped")
        return EXIT_OK

    def publish(self, state):
        """Write the live worker pids and the state to the PID file."""
        self.state = state
        self.pidfile.write([p.pid for p in self.workers.values()], state)

    def up_state(self):
        """running once every worker has reached its loop, else starting."""
        ready = all(e.is_set() for e in self.ready.values())
        return RUNNING_STATE if ready else STARTING

    def wait_ready(self):
        """Wait until every worker is in its loop (or one died, or a stop came)."""
        while not self.stop.level and self.up_state() != RUNNING_STATE:
            if any(not p.is_alive() for p in self.workers.values()):
                return              # watch() restarts it; the state stays starting
            time.sleep(0.02)

    def start_worker(self, index):
        self.ready[index] = self.context.Event()
        proc = self.context.Process(target=run_worker, name=f"queuectl-worker-{index}",
                                    args=(self.db_path, index, os.getpid(),
                                          self.ready[index]))
        # An ignored SIGINT survives exec: a Ctrl-C while the worker is still
        # starting cannot kill it with a KeyboardInterrupt traceback.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            proc.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        self.workers[index] = proc
        self.started_at[index] = time.monotonic()

    def watch(self):
        cold_deadline = None
        next_reclaim = 0.0
        while self.workers:
            # Workers reclaim only between jobs; this bounds the wait when all are busy.
            if not self.stop.level and time.monotonic() >= next_reclaim:
                try:
                    reclaim_expired(self.store, "supervisor")
                except QueueError as e:
                    log(f"supervisor: could not check leases: {e}")
                next_reclaim = time.monotonic() + IDLE_RECHECK_S
            if self.stop.level > self.relayed:
                self.relay_stop()
                if self.stop.level >= COLD and cold_deadline is None:
                    cold_deadline = time.monotonic() + COLD_STOP_GRACE_S
            if cold_deadline is not None and time.monotonic() > cold_deadline:
                log("supervisor: workers did not stop in time; killing them")
                self.kill_all()
                return
            if self.state == STARTING and not self.stop.level \
                    and self.up_state() == RUNNING_STATE:
                self.publish(RUNNING_STATE)
            sentinels = {p.sentinel: i for i, p in self.workers.items()}
            for ready in multiprocessing.connection.wait(list(sentinels), timeout=0.2):
                self.worker_exited(sentinels[ready])

    def relay_stop(self):
        self.relayed = self.stop.level
        if self.stop.level == WARM:
            log("supervisor: stopping; running jobs finish first (a second Ctrl-C "
                "or SIGTERM, or worker stop --timeout, kills them)")
            sig = signal.SIGTERM
        else:
            log("supervisor: cold stop; killing running jobs and putting them back")
            sig = COLD_SIGNAL
        for proc in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
        self.publish(STOPPING)

    def worker_exited(self, index):
        proc = self.workers.pop(index)
        proc.join()
        # Whatever it held is lost: recover it now rather than wait for the lease.
        try:
            self.recover(proc.pid)
        except QueueError as e:
            log(f"supervisor: could not recover the jobs of pid {proc.pid} ({e}); "
                f"the lease check will retry")
        if self.stop.level:
            self.publish(STOPPING)
            return
        log(f"supervisor: worker {index} (pid {proc.pid}) ended "
            f"({describe_exit(proc.exitcode)}); starting a new one")
        if time.monotonic() - self.started_at[index] < RESTART_DELAY_S:
            time.sleep(RESTART_DELAY_S)     # do not spin on a worker that cannot start
            if self.stop.level:             # a stop came during the pause
                self.publish(STOPPING)
                return
        self.start_worker(index)
        self.publish(self.up_state())

    def recover(self, worker_pid):
        """Recover the claims of a worker that exited: lost, or given back on a
        cold stop."""
        for job_id, token in self.store.claims_of(worker_pid):
            recover_claim(self.store, job_id, token, "supervisor",
                          cold=self.stop.level >= COLD)

    def kill_all(self):
        """SIGKILL every worker still alive and give its jobs back (cold stop)."""
        self.stop.level = max(self.stop.level, COLD)
        for index, proc in list(self.workers.items()):
            if proc.is_alive():
                proc.kill()
            proc.join()
            del self.workers[index]
            if self.store is not None:
                try:
                    self.recover(proc.pid)
                except QueueError as e:
                    log(f"supervisor: could not give back the jobs of pid {proc.pid} "
                        f"({e}); their leases will expire")


def start_detached(db_path, count, log_path):
    """Start a supervisor in the background; return (pid, worker pids) once up."""
    script = os.path.abspath(__file__)
    fd = _open_owner_only(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        offset = os.lseek(fd, 0, os.SEEK_END)
        # A new session and no inherited stdout: the caller's shell never waits on us.
        proc = subprocess.Popen(
            [sys.executable, script, "--db", db_path, "worker", "start",
             "--count", str(count)],
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
        running = PidFile.running(pid_path(db_path))
        if running and running.pid == proc.pid and running.state == RUNNING_STATE:
            return running
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
# Commands ####
####

def open_store(args, create=False):
    return Store(args.db, create=create)


def print_json(value):
    print(json.dumps(value, indent=2, ensure_ascii=False))


def cmd_enqueue(args):
    now = now_utc()
    if args.job == "-":
        jobs = []
        for number, raw in enumerate(sys.stdin.buffer, 1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    jobs.append(validate_job(_parse_json(line), now))
            except UnicodeDecodeError:
                raise UsageError(f"line {number}: not valid UTF-8") from None
            except UsageError as e:
                raise UsageError(f"line {number}: {e}") from None
        if not jobs:
            raise UsageError("no jobs on standard input")
    else:
        jobs = [validate_job(_parse_json(args.job), now)]
    cwd = current_dir()
    check_text(cwd, "the current directory's name")
    with open_store(args, create=True) as store:
        ids = store.enqueue(jobs, cwd, now)
    for job_id in ids:
        print(job_id)


def _parse_json(text):
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except ValueError as e:
        raise UsageError(f"invalid JSON: {e}") from None
    except RecursionError:
        raise UsageError("invalid JSON: nested too deeply") from None


def _no_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise UsageError(f"field {key!r} is given twice")
    return dict(pairs)


def cmd_worker_start(args):
    db_path = args.db
    Store(db_path).close()         # create or check the database before forking
    if args.detach:
        log_path = db_path + LOG_SUFFIX
        running = PidFile.running(pid_path(db_path))
        if running:
            raise QueueError(f"workers are already running on this database "
                             f"(supervisor pid {running.pid})")
        running = start_detached(db_path, args.count, log_path)
        print(f"started {len(running.workers)} worker(s) in the background "
              f"(supervisor pid {running.pid}); log: {log_path}")
        return EXIT_OK
    return Supervisor(db_path, args.count).run()


def cmd_worker_stop(args):
    path = pid_path(args.db)
    running = PidFile.running(path)
    if not running:
        print("no workers running")
        return EXIT_OK
    pid = running.pid
    held = _jobs_of_workers(args.db, running.workers)
    _signal_supervisor(pid, WARM_SIGNAL)
    how_long = ("until its running jobs finish" if args.timeout is None else
                f"up to {args.timeout:g}s for its running jobs to finish")
    print(f"asked supervisor {pid} to stop; waiting {how_long}", file=sys.stderr)
    try:
        if not _wait_stopped(path, args.timeout):
            _signal_supervisor(pid, COLD_SIGNAL)
            if not _wait_stopped(path, COLD_STOP_GRACE_S + KILL_GRACE_S + 10):
                raise QueueError(f"supervisor {pid} did not stop")
    except KeyboardInterrupt:
        print("stopped waiting; the workers go on stopping (run worker stop again "
              "to wait)", file=sys.stderr)
        return 130
    # Report what became of the jobs that were running, whoever decided it.
    states = {}
    if held:
        with Store(args.db, create=False) as store:
            states = store.job_states(held)
    interrupted = sorted(job_id for job_id in held if states.get(job_id) == PENDING)
    report = f"stopped workers (supervisor pid {pid})"
    if held:
        report += f": {len(held) - len(interrupted)} running job(s) finished"
    if interrupted:
        report += (f", {len(interrupted)} interrupted and put back as pending "
                   f"({', '.join(interrupted)})")
    print(report)
    return EXIT_OK


def _jobs_of_workers(db_path, worker_pids):
    """Ids of the jobs the given worker processes are running ([] if unknown)."""
    try:
        with Store(db_path, create=False) as store:
            return sorted(job["id"] for job in store.list_jobs(PROCESSING)
                          if job["worker_pid"] in worker_pids)
    except QueueError:
        return []            # stopping must not depend on the database


def _pid_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                  # exists, but another user's
    return True


def _signal_supervisor(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass                                  # it exited meanwhile
    except PermissionError:
        raise QueueError(f"not allowed to signal supervisor pid {pid}") from None


def _wait_stopped(path, timeout_s):
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while PidFile.running(path):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def cmd_status(args):
    with open_store(args) as store:
        counts, oldest, running = store.status()
    now = now_utc()
    oldest_age = max(0.0, (now - parse_iso(oldest)).total_seconds()) if oldest else None
    supervisor = PidFile.running(pid_path(store.path))
    worker_pids = supervisor.workers if supervisor else []
    workers = [{"pid": pid,
                "job_id": running[pid]["id"] if pid in running else None,
                "command": running[pid]["command"] if pid in running else None}
               for pid in worker_pids]
    # Jobs held by processes that are not our workers: the workers of a killed
    # supervisor finishing up, or claims waiting for their lease to run out.
    others = [{"pid": pid, "job_id": job["id"], "command": job["command"],
               "alive": _pid_exists(pid), "lease_until": job["lease_until"]}
              for pid, job in sorted(running.items()) if pid not in worker_pids]
    state = supervisor.state if supervisor else None
    problems = []
    if oldest is not None and (not workers or state == STOPPING):
        problems.append((EXIT_CHECK_NO_WORKERS,
                         "jobs are waiting but no workers are running"
                         + (" (they are stopping)" if workers else "")))
    stuck = [w["job_id"] for w in others if not w["alive"]]
    if stuck and not workers:
        problems.append((EXIT_CHECK_NO_WORKERS,
                         f"{len(stuck)} job(s) held by a worker that is gone; start "
                         f"workers to recover them"))
    if oldest_age is not None and args.max_age is not None and oldest_age > args.max_age:
        problems.append((EXIT_CHECK_STALE, f"oldest runnable job has waited "
                                           f"{format_duration(oldest_age)} "
                                           f"(more than {args.max_age:g}s)"))
    if counts[DEAD] > args.max_dead:
        problems.append((EXIT_CHECK_DEAD, f"{counts[DEAD]} dead job(s) in the DLQ"))
    report = {
        "db": store.path,
        "counts": counts,
        "dlq": counts[DEAD],
        "oldest_runnable_age_s": oldest_age,
        "supervisor_pid": supervisor.pid if supervisor else None,
        "supervisor_state": state,
        "workers": workers,
        "other_claims": others,
        "healthy": not problems,
        "problems": [text for _, text in problems],
    }
    if args.json:
        print_json(report)
    else:
        print_status(report, args.check)
    if args.check and problems:
        return problems[0][0]      # the most urgent: no workers, stale, dead
    return EXIT_OK


def print_status(report, check):
    counts = report["counts"]
    print(f"database:  {report['db']}")
    print("jobs:      " + ", ".join(f"{s} {counts[s]}" for s in STATES))
    age = report["oldest_runnable_age_s"]
    print("waiting:   " + ("no runnable job" if age is None else
                           f"{format_duration(age)} (the oldest runnable job)"))
    print(f"dlq:       {counts[DEAD]}")
    if report["supervisor_pid"]:
        print(f"workers:   {len(report['workers'])}, {report['supervisor_state']} "
              f"(supervisor pid {report['supervisor_pid']})")
    else:
        print("workers:   none running")
    for w in report["workers"]:
        doing = f"job {w['job_id']}: {clip(w['command'], 60)}" if w["job_id"] else "idle"
        print(f"  pid {w['pid']}: {doing}")
    for w in report["other_claims"]:
        whose = ("not one of ours" if w["alive"] else
                 f"gone; recovered once its lease ends at {w['lease_until']}")
        print(f"  pid {w['pid']} ({whose}): job {w['job_id']}: "
              f"{clip(w['command'], 40)}")
    if check:
        for text in report["problems"]:
            print(f"problem:   {text}")


def cmd_list(args):
    print_jobs(args, args.state, args.limit)


def print_jobs(args, state, limit):
    with open_store(args) as store:
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
        rows.append((job["id"], job["state"],
                     f"{job['attempts']}/{job['max_retries'] + 1}",
                     str(job["priority"]), job["run_at"][:19] + "Z" if waiting else "-",
                     job["updated_at"][:19] + "Z",
                     clip(job["last_error"] or "-", 32), clip(job["command"], 50)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        print("  ".join(cells + [row[-1]]))


def cmd_show(args):
    with open_store(args) as store:
        job, attempts = store.get_job(args.id)
    history = [{
        "number": a["number"], "worker_pid": a["worker_pid"],
        "started_at": a["started_at"], "finished_at": a["finished_at"],
        "outcome": a["outcome"], "exit_code": a["exit_code"], "reason": a["reason"],
        "duration_s": a["duration_s"]} for a in attempts]
    last = next((a for a in reversed(attempts) if a["outcome"] in (COMPLETED, FAILED)),
                None)
    output = None
    if last is not None:
        output = {"stdout": last["stdout"] or "", "stderr": last["stderr"] or "",
                  "stdout_dropped_bytes": last["stdout_dropped"],
                  "stderr_dropped_bytes": last["stderr_dropped"]}
    if args.json:
        print_json(dict(job, history=history, output=output))
        return
    for key, value in job.items():
        print(f"{key + ':':15}{'-' if value is None else value}")
    print("history:")
    if not history:
        print("  (not run yet)")
    for h in history:
        how = h["outcome"]
        if h["reason"]:
            how += f": {h['reason']}"
        elif h["exit_code"] is not None:
            how += f" (exit {h['exit_code']})"
        print(f"  run {h['number']}: {h['started_at']} -> "
              f"{h['finished_at'] or '...'}  {how}  (worker pid {h['worker_pid']})")
    if output is not None:
        for stream in ("stdout", "stderr"):
            text = output[stream]
            dropped = output[f"{stream}_dropped_bytes"]
            note = f" (first {dropped} bytes dropped)" if dropped else ""
            print(f"{stream} of the last run{note}:" + ("" if text else " (empty)"))
            print(text if text.endswith("\n") or not text else text + "\n", end="")


def cmd_dlq_list(args):
    print_jobs(args, DEAD, args.limit)


def cmd_dlq_retry(args):
    if bool(args.ids) == bool(args.all):
        raise UsageError("give job ids or --all, not both or neither")
    with open_store(args) as store:
        ids = store.retry_dead(None if args.all else _unique(args.ids))
    if not ids:
        print("the DLQ is empty", file=sys.stderr)
    for job_id in ids:
        print(f"{job_id}: back to pending")


def _unique(items):
    return list(dict.fromkeys(items))


def cmd_delete(args):
    with open_store(args) as store:
        store.delete(_unique(args.ids))
    for job_id in _unique(args.ids):
        print(f"{job_id}: deleted")


def cmd_config_show(args):
    with open_store(args) as store:
        values = store.config()
    if args.json:
        print_json(values)
    else:
        for key, value in values.items():
            print(f"{key} = {value}")


def cmd_config_get(args):
    key = config_key(args.key)
    with open_store(args) as store:
        print(store.config()[key])


def cmd_config_set(args):
    key = config_key(args.key)
    value = parse_config_value(key, args.value)
    with open_store(args, create=True) as store:
        store.set_config(key, value)
    print(f"{key} = {value}")


def cmd_stats(args):
    with open_store(args) as store:
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
# Command line ####
####

class Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line, like every other error here."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} "
                              f"(see '{self.prog} --help')\n")


def int_between(low, high):
    """An argparse type: a whole number from LOW to HIGH."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}: {text!r}")
        return value
    return parse


def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0: {text!r}")
    return value


DB_HELP = (f"database file (default: ${ENV_DB}, else $XDG_DATA_HOME/queuectl/"
           f"{DB_FILENAME}, else ~/.local/share/queuectl/{DB_FILENAME})")
EPILOG = ("exit codes: 0 ok, 1 runtime error (unknown job, wrong state, workers "
          "running, unusable database), 2 usage or validation error; status --check: "
          "3 dead jobs, 4 no workers, 5 a job waited too long")


def build_parser():
    common = Parser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, metavar="PATH", help=DB_HELP)
    json_opt = Parser(add_help=False)
    json_opt.add_argument("--json", action="store_true",
                          help="print one JSON document")

    parser = Parser(prog=PROG, description="A durable background job queue for "
                                           "shell commands.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--db", default=None, metavar="PATH", help=DB_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=Parser)

    def command(parent, name, func, help_text, parents=()):
        sub = parent.add_parser(name, help=help_text, description=help_text,
                                parents=[common, *parents])
        sub.set_defaults(func=func)
        return sub

    sub = command(commands, "enqueue", cmd_enqueue, "add a job (or, with -, one per "
                                                    "line from stdin)")
    sub.epilog = ("job fields: command (required), id, max_retries, priority, run_at "
                  "(ISO-8601 with Z or an offset) or delay (seconds), timeout "
                  "(seconds). Example: queuectl enqueue "
                  "'{\"id\": \"job1\", \"command\": \"sleep 2\", \"priority\": 5}'")
    sub.add_argument("job", metavar="JSON",
                     help='job as JSON, e.g. \'{"command": "sleep 2"}\', or - for stdin')

    worker = commands.add_parser("worker", help="start or stop workers",
                                 description="start or stop workers")
    actions = worker.add_subparsers(dest="action", metavar="ACTION", required=True,
                                    parser_class=Parser)
    sub = command(actions, "start", cmd_worker_start, "run workers until stopped")
    sub.add_argument("--count", type=int_between(1, MAX_WORKERS), default=1, metavar="N",
                     help="number of worker processes (default 1)")
    sub.add_argument("--detach", action="store_true",
                     help="run in the background; return once the workers are up")
    sub = command(actions, "stop", cmd_worker_stop, "stop the workers gracefully")
    sub.add_argument("--timeout", type=non_negative_float, default=None, metavar="S",
                     help="after S seconds, kill running jobs and put them back "
                          "(default: wait for them)")

    sub = command(commands, "status", cmd_status, "show queue health", [json_opt])
    sub.add_argument("--check", action="store_true",
                     help="exit 3/4/5 when the queue needs attention (for cron)")
    sub.add_argument("--max-age", type=non_negative_float, default=None, metavar="S",
                     help="with --check: problem if a runnable job waited over S s")
    sub.add_argument("--max-dead", type=int_between(0, INT_LIMIT), default=0, metavar="N",
                     help="with --check: problem if the DLQ holds more than N (0)")

    sub = command(commands, "list", cmd_list, "list jobs, newest first", [json_opt])
    sub.add_argument("--state", choices=STATES, help="only jobs in this state")
    sub.add_argument("--limit", type=int_between(1, INT_LIMIT), default=None, metavar="N",
                     help="at most N jobs")

    sub = command(commands, "show", cmd_show, "show one job whole", [json_opt])
    sub.add_argument("id", metavar="ID")

    dlq = commands.add_parser("dlq", help="the dead letter queue",
                              description="the dead letter queue")
    actions = dlq.add_subparsers(dest="action", metavar="ACTION", required=True,
                                 parser_class=Parser)
    sub = command(actions, "list", cmd_dlq_list, "list dead jobs, newest first",
                  [json_opt])
    sub.add_argument("--limit", type=int_between(1, INT_LIMIT), default=None,
                     metavar="N", help="at most N jobs")
    sub = command(actions, "retry", cmd_dlq_retry, "put dead jobs back to pending")
    sub.add_argument("ids", nargs="*", metavar="ID")
    sub.add_argument("--all", action="store_true", help="every dead job")

    sub = command(commands, "delete", cmd_delete, "delete jobs that are not running")
    sub.add_argument("ids", nargs="+", metavar="ID")

    config = commands.add_parser("config", help="show or change settings",
                                 description="show or change settings")
    actions = config.add_subparsers(dest="action", metavar="ACTION", required=True,
                                    parser_class=Parser)
    command(actions, "show", cmd_config_show, "show every setting", [json_opt])
    keys = "keys: " + ", ".join(CONFIG) + " (- or _ both work)"
    sub = command(actions, "get", cmd_config_get, "print one setting's value")
    sub.epilog = keys
    sub.add_argument("key", metavar="KEY")
    sub = command(actions, "set", cmd_config_set, "change a setting")
    sub.epilog = keys
    sub.add_argument("key", metavar="KEY")
    sub.add_argument("value", metavar="VALUE")

    command(commands, "stats", cmd_stats, "show throughput and run times", [json_opt])
    return parser


def main(argv=None):
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    if args.db == "":
        parser.error("argument --db: expected a file path, got ''")
    try:
        path = os.path.expanduser(args.db or default_db_path())
        if not os.path.isabs(path):
            path = os.path.join(current_dir(), path)
        # One database, one PID file: a symlinked path must not get a second one.
        args.db = os.path.realpath(path)
        if os.path.isdir(args.db):
            raise QueueError(f"database path is a directory: {args.db}")
        code = args.func(args) or EXIT_OK
        sys.stdout.flush()      # here, so a closed pipe is caught below
        return code
    except QueueError as e:
        # One line, whatever a job id or path in the message contains.
        message = str(e).replace("\r", "\\r").replace("\n", "\\n")
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return e.code
    except UnicodeEncodeError:
        # An argument that is not UTF-8 (the shell passed raw bytes) reaching SQLite.
        print(f"{PROG}: error: arguments must be valid UTF-8 text", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (queuectl list | head): not an error of ours.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
