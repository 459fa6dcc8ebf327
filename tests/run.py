"""Run the test suite in parallel: python3 tests/run.py [-j N] [-k PATTERN] [NAME ...]

Most of the suite's time is spent waiting: for real worker processes to start,
claim, run, be killed and be recovered. So its test classes run side by side, in
N processes of their own (default: twice the CPUs, at least 4), each class whole
in one process, the longest-known classes first. Each class's verbose report is
printed when it ends, then every failure in full, then one summary line; the exit
status is 0 only if every test passed (or was skipped, saying why).

NAME selects test modules or classes as unittest does (test_workers,
test_workers.CancelTest); -k keeps the tests whose id contains PATTERN (as
unittest's -k; give it more than once for any of them). With no PostgreSQL
server named in $QUEUECTL_TEST_PG, one private server is started here for the
whole run (see support.pg_server), rather than one in each process.
"""

import argparse
import concurrent.futures
import contextlib
import faulthandler
import io
import multiprocessing
import os
import sys
import time
import unittest

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]

CLASS_DEADLINE_S = 900      # a class still running after this is hung: its process
                            # prints every thread's stack and ends, failing the run

# Classes that take much longer than the rest, by module: started first, so that
# the run does not end waiting on one of them alone (both stores' copies).
SLOW_FIRST = ("test_hosts", "test_recovery", "test_dashboard", "test_environment",
              "test_workers", "test_dispatch")

# Classes that keep every CPU busy for a minute (thousands of jobs through many
# workers): they run one after another, in a lane of their own, so that no two
# of them starve each other, or the timing of the rest, at once.
HEAVY = ("ManyHostsLoadTest", "ConcurrencyTest", "PostgresConcurrencyTest")


def test_classes(names, patterns):
    """The ids of the test classes to run ("module.Class"), slowest-known first."""
    loader = unittest.TestLoader()
    loader.testNamePatterns = patterns or None
    suite = (loader.loadTestsFromNames(names) if names else
             loader.discover(TESTS, pattern="test*.py", top_level_dir=TESTS))
    found = {}
    for test in _flatten(suite):
        if isinstance(test, unittest.loader._FailedTest):    # a module that won't load
            raise SystemExit(f"run.py: cannot load {test.id()}: "
                             f"{getattr(test, '_exception', '')}")
        cls = type(test)
        found.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls.__module__)

    def rank(item):
        name, module = item
        slow = SLOW_FIRST.index(module) if module in SLOW_FIRST else len(SLOW_FIRST)
        return slow, name
    return [name for name, _ in sorted(found.items(), key=rank)]


def _flatten(suite):
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from _flatten(test)
        else:
            yield test


def run_class(name, patterns):
    """In a worker process: run the test class NAME; its report and counts."""
    loader = unittest.TestLoader()
    loader.testNamePatterns = patterns or None
    stream = io.StringIO()
    faulthandler.dump_traceback_later(CLASS_DEADLINE_S, exit=True)
    started = time.monotonic()
    result = unittest.TextTestRunner(stream=stream, verbosity=2).run(
        loader.loadTestsFromName(name))
    faulthandler.cancel_dump_traceback_later()
    return {"name": name, "report": stream.getvalue(), "run": result.testsRun,
            "failures": len(result.failures), "errors": len(result.errors),
            "skipped": len(result.skipped),
            "unexpected": len(result.unexpectedSuccesses),
            "seconds": time.monotonic() - started}


def share_one_postgres_server():
    """Start one PostgreSQL server for every worker process, unless one is named."""
    if os.environ.get("QUEUECTL_TEST_PG"):
        return
    import support
    try:
        os.environ["QUEUECTL_TEST_PG"] = support.pg_server()
    except unittest.SkipTest:               # each test class says why, itself
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="tests/run.py", description="Run the test suite in parallel.")
    parser.add_argument("-j", "--jobs", type=int,
                        default=max(4, 2 * (os.cpu_count() or 1)),
                        help="test classes to run at once (default: %(default)s)")
    parser.add_argument("-k", dest="patterns", action="append", default=[],
                        help="only the tests whose id contains PATTERN")
    parser.add_argument("names", nargs="*", help="test modules or classes")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("-j must be at least 1")
    patterns = [p if "*" in p else f"*{p}*" for p in args.patterns]

    os.chdir(os.path.dirname(TESTS))
    classes = test_classes(args.names, patterns)
    share_one_postgres_server()
    started = time.monotonic()
    totals = dict.fromkeys(("run", "failures", "errors", "skipped", "unexpected"), 0)
    reports, slowest, broken = [], [], []
    context = multiprocessing.get_context("spawn")      # fresh, like unittest's own
    heavy = [name for name in classes if name.rpartition(".")[2] in HEAVY]
    lanes = [(heavy, 1), ([name for name in classes if name not in heavy],
                          max(1, args.jobs - bool(heavy)))]
    with contextlib.ExitStack() as stack:
        futures = {}
        for names, width in lanes:
            if names:
                pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                    width, mp_context=context))
                futures.update({pool.submit(run_class, name, patterns): name
                                for name in names})
        for future in concurrent.futures.as_completed(futures):
            try:
                outcome = future.result()
            except Exception as e:                # its process died: a hang or a crash
                broken.append(f"{futures[future]}: its process ended ({e!r})")
                continue
            print(outcome["report"].split("\n" + "-" * 70)[0].rstrip()
                  .split("\n" + "=" * 70)[0], flush=True)
            if outcome["failures"] or outcome["errors"] or outcome["unexpected"]:
                reports.append(outcome["report"])
            for key in totals:
                totals[key] += outcome[key]
            slowest.append((outcome["seconds"], outcome["name"]))

    for report in reports:
        print("\n" + report.rstrip())
    for line in broken:
        print("\nBROKEN: " + line)
    print("\nslowest classes: " + ", ".join(
        f"{name} {seconds:.0f}s" for seconds, name in sorted(slowest)[::-1][:5]))
    print("-" * 70)
    print(f"Ran {totals['run']} tests in {time.monotonic() - started:.1f}s "
          f"({len(classes)} classes, {args.jobs} at a time)\n")
    bad = {key: totals[key] for key in ("failures", "errors", "unexpected")
           if totals[key]}
    if broken:
        bad["broken"] = len(broken)
    details = ", ".join(f"{key}={value}" for key, value in
                        {**bad, "skipped": totals["skipped"]}.items() if value)
    print(("FAILED" if bad else "OK") + (f" ({details})" if details else ""))
    return 1 if bad or not classes else 0


if __name__ == "__main__":
    sys.exit(main())
