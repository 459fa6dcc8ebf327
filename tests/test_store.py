"""The Store on a real temporary database: claims, fencing, retries, status;
SQLite's own file (pragmas, modes, foreign files, migrations); PostgreSQL's own
schema (its version, its making under a lock, its place) and concurrent claims."""

import os
import re
import sqlite3
import stat
import threading
import unittest
from datetime import timedelta
from unittest import mock

from tests.support import (add_postgres_variants, T0, StoreTestCase, claim_one,
                           pg_connect, pg_sql, queuectl, wait_until)

OK = queuectl.RunResult(exit_code=0, duration_s=0.5)


def failed(reason="exit 1", **kw):
    return queuectl.RunResult(exit_code=1, reason=reason, **kw)


def at(seconds):
    return T0 + timedelta(seconds=seconds)


class ClaimTest(StoreTestCase):
    """Which job a claim takes, and what it records."""

    def test_claim_order(self):
        """Claims go by priority (high first), then run_at, then age."""
        self.add(id="C", priority=5, run_at="2026-11-24T09:59:50Z", now=at(-5))
        self.add(id="D", priority=0, run_at="2026-11-24T09:40:00Z", now=at(-2000))
        self.add(id="B", priority=5, run_at="2026-11-24T09:59:50Z", now=at(-20))
        self.add(id="E", priority=9, run_at="2026-11-24T09:59:59Z", now=at(0))
        self.add(id="A", priority=5, run_at="2026-11-24T09:58:20Z", now=at(-50))
        self.add(id="F", priority=-1, run_at="2026-11-24T09:00:00Z", now=at(-9000))
        order = [claim_one(self.store, 100 + i, now=T0).id for i in range(6)]
        self.assertEqual(order, ["E", "A", "B", "C", "D", "F"])
        self.assertIsNone(claim_one(self.store, 200, now=T0))

    def test_one_claim_takes_a_job_for_each_holder_in_turn(self):
        """A claim for three holders takes the three best jobs, the best for the
        first holder, each with its own token and attempt; a fourth waits."""
        for job_id, priority in (("low", 0), ("top", 9), ("mid", 5), ("last", -1)):
            self.add(id=job_id, priority=priority)
        claims, _ = self.store.claim([(11, 1), (12, 2), (13, 3)], now=T0)
        self.assertEqual([c.id for c in claims], ["top", "mid", "low"])
        self.assertEqual(len({c.token for c in claims}), 3)
        rows = self.raw("SELECT id, worker_pid, worker_start, claim_token FROM jobs "
                        "WHERE state = 'processing' ORDER BY worker_pid")
        self.assertEqual([tuple(r) for r in rows],
                         [(c.id, 11 + i, 1 + i, c.token) for i, c in enumerate(claims)])
        for claim in claims:
            _, attempts = self.store.get_job(claim.id)
            self.assertEqual([(a["number"], a["outcome"]) for a in attempts],
                             [(1, queuectl.RUN_GOING)])
        self.assertEqual(self.get("last")["state"], queuectl.PENDING)

    def test_future_run_at_not_claimed(self):
        """A job whose run_at is in the future waits until then."""
        job_id = self.add(delay=60)
        self.assertEqual(self.store.claim([(1, None)], now=at(59.9)),
                         ([], queuectl.iso(at(60))))
        self.assertEqual(self.get(job_id)["state"], queuectl.PENDING)
        claim = claim_one(self.store, 1, now=at(60))
        self.assertEqual(claim.id, job_id)

    def test_claim_sets_processing_with_token(self):
        """A claim moves the job to processing with a token, a lease and an attempt."""
        job_id = self.add(max_retries=4, timeout=7)
        claim = claim_one(self.store, 4242, now=T0)
        self.assertEqual((claim.id, claim.attempt, claim.max_retries, claim.timeout_s),
                         (job_id, 1, 4, 7))
        self.assertEqual(claim.cwd, self.dir)
        self.assertGreaterEqual(len(claim.token), 16)
        row = self.raw("SELECT state, claim_token, worker_pid, lease_until, attempts "
                       "FROM jobs WHERE id = ?", (job_id,))[0]
        self.assertEqual(tuple(row), (queuectl.PROCESSING, claim.token, 4242,
                                      queuectl.iso(at(15)), 1))
        job, attempts = self.store.get_job(job_id)
        self.assertEqual((job["state"], job["worker_pid"]), (queuectl.PROCESSING, 4242))
        self.assertEqual([(a["number"], a["outcome"], a["worker_pid"]) for a in attempts],
                         [(1, queuectl.RUN_GOING, 4242)])
        self.assertIsNone(claim_one(self.store, 4243, now=T0))

    def test_claim_uses_config_defaults(self):
        """A job without its own limits follows the config at claim time."""
        self.add()
        self.store.set_config("max_retries", 7)
        self.store.set_config("job_timeout", 12.5)
        self.store.set_config("lease_timeout", 30)
        claim = claim_one(self.store, 1, now=T0)
        self.assertEqual((claim.max_retries, claim.timeout_s, claim.lease_s), (7, 12.5, 30))
        self.assertEqual(self.raw("SELECT lease_until FROM jobs")[0][0],
                         queuectl.iso(at(30)))

    def test_two_connections_never_share_a_claim(self):
        """Two stores on one file claim different jobs, then nothing."""
        other = self.open()
        self.add(id="a")
        self.add(id="b")
        first = claim_one(self.store, 1, now=T0)
        second = claim_one(other, 2, now=T0)
        self.assertEqual({first.id, second.id}, {"a", "b"})
        self.assertIsNone(claim_one(other, 3, now=T0))


class FencingTest(StoreTestCase):
    """A claim's token: a lost claim writes nothing; leases, take-overs, requeues."""

    def test_stale_token_finish_writes_nothing(self):
        """A lost claim's finish returns None and leaves the new claimant's job alone."""
        job_id = self.add()
        old = claim_one(self.store, 111, now=T0)
        self.assertEqual(self.store.fence(job_id, old.token, queuectl.WORKER_LOST,
                                          now=at(20)), queuectl.FAILED)
        new = claim_one(self.store, 222, now=at(30))
        self.assertEqual((new.id, new.attempt), (job_id, 2))
        self.assertNotEqual(new.token, old.token)
        before = self.dump()
        self.assertIsNone(self.store.finish(job_id, old.token, OK, now=at(31)))
        self.assertIsNone(self.store.finish(job_id, old.token, failed(), now=at(31)))
        self.assertEqual(self.dump(), before)
        job, attempts = self.store.get_job(job_id)
        self.assertEqual((job["state"], job["worker_pid"], job["attempts"]),
                         (queuectl.PROCESSING, 222, 2))
        self.assertEqual([(a["worker_pid"], a["outcome"], a["reason"]) for a in attempts],
                         [(111, queuectl.FAILED, queuectl.WORKER_LOST),
                          (222, queuectl.RUN_GOING, None)])
        self.assertEqual(self.store.finish(job_id, new.token, OK, now=at(32)),
                         queuectl.COMPLETED)

    def test_stale_token_renew_and_requeue(self):
        """renew and requeue with a stale token return False and change nothing."""
        job_id = self.add()
        old = claim_one(self.store, 111, now=T0)
        self.store.fence(job_id, old.token, queuectl.WORKER_LOST, now=at(1))
        new = claim_one(self.store, 222, now=at(10))
        before = self.dump()
        self.assertFalse(self.store.renew(job_id, old.token, 15, now=at(11)))
        self.assertFalse(self.store.requeue(job_id, old.token, "stop", now=at(11)))
        self.assertIsNone(self.store.fence(job_id, old.token, queuectl.WORKER_LOST,
                                           now=at(11)))
        self.assertFalse(self.store.take_over(job_id, old.token, "x" * 32, 333,
                                              now=at(11)))
        self.assertEqual(self.dump(), before)
        self.assertTrue(self.store.renew(job_id, new.token, 15, now=at(11)))
        self.assertEqual(self.raw("SELECT lease_until FROM jobs")[0][0],
                         queuectl.iso(at(26)))

    def test_take_over_only_expired(self):
        """take_over(only_expired=True) leaves a live lease alone, then fences it."""
        job_id = self.add()
        claim = claim_one(self.store, 1, now=T0)
        before = self.dump()
        self.assertFalse(self.store.take_over(job_id, claim.token, "n" * 32, 2,
                                              only_expired=True, now=at(10)))
        self.assertEqual(self.dump(), before)
        self.assertTrue(self.store.take_over(job_id, claim.token, "n" * 32, 2,
                                             only_expired=True, now=at(16)))
        # The old owner is fenced off; the taker holds the job, still processing.
        self.assertFalse(self.store.renew(job_id, claim.token, 15, now=at(17)))
        self.assertIsNone(self.store.finish(job_id, claim.token, OK, now=at(17)))
        job = self.get(job_id)
        self.assertEqual((job["state"], job["worker_pid"]), (queuectl.PROCESSING, 2))
        self.assertEqual(self.store.fence(job_id, "n" * 32, queuectl.WORKER_LOST,
                                          now=at(18)), queuectl.FAILED)
        _, attempts = self.store.get_job(job_id)
        self.assertEqual([(a["outcome"], a["reason"]) for a in attempts],
                         [(queuectl.FAILED, queuectl.WORKER_LOST)])

    def test_take_over_keeps_the_run_to_kill(self):
        """A second take-over still returns the first run's token and process group."""
        job_id = self.add()
        claim = claim_one(self.store, 1, 111, now=T0)
        self.assertEqual(self.store.record(started=[(job_id, claim.token, 4242, 999, None)],
                                           now=at(1)), ([], [], 0))
        first = self.store.take_over(job_id, claim.token, "a" * 32, 2, now=at(20))
        self.assertEqual(first, (claim.token, 4242, 999, queuectl.host_id()))
        # The first recoverer died mid-kill; the next one takes over from it.
        second = self.store.take_over(job_id, "a" * 32, "b" * 32, 3, now=at(40))
        self.assertEqual(second, first)
        self.assertEqual(self.store.record(started=[(job_id, claim.token, 1, 1, None)],
                                           now=at(41)), ([], [(job_id, claim.token)], 0))
        self.assertEqual(self.raw("SELECT claim_token, run_pgid FROM jobs")[0][:],
                         ("b" * 32, 4242))

    def test_a_claim_the_reclaimer_holds_itself_is_recovered(self):
        """An expired claim held by the reclaiming process (a recovery it did not
        finish) is recovered, though that process is alive and running."""
        job_id = self.add()
        me = os.getpid()
        claim = claim_one(self.store, me, queuectl.start_ticks(me), now=T0)  # expired
        self.assertTrue(queuectl.holder_running(me, queuectl.start_ticks(me)))
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)                  # recover_claim logs to fd 2
        try:
            self.assertEqual(queuectl.reclaim_expired(self.store, "test"),
                             [(job_id, claim.token)])
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
        job = self.get(job_id)
        self.assertEqual((job["state"], job["last_error"]),
                         (queuectl.FAILED, queuectl.WORKER_LOST))

    def test_requeue_restores_attempts(self):
        """requeue gives the job back as pending without using up an attempt."""
        job_id = self.add()
        claim = claim_one(self.store, 1, now=T0)
        self.assertEqual(self.get(job_id)["attempts"], 1)
        self.assertTrue(self.store.requeue(job_id, claim.token, "cold stop", now=at(1)))
        job, attempts = self.store.get_job(job_id)
        self.assertEqual((job["state"], job["attempts"], job["worker_pid"]),
                         (queuectl.PENDING, 0, None))
        self.assertEqual([(a["outcome"], a["reason"]) for a in attempts],
                         [(queuectl.INTERRUPTED, "cold stop")])
        again = claim_one(self.store, 2, now=at(2))
        self.assertEqual((again.id, again.attempt), (job_id, 1))

    def test_expired_claims(self):
        """expired_claims lists claims whose lease is in the past, and only those."""
        a = self.add(id="a")
        self.add(id="b")
        ca = claim_one(self.store, 1, now=T0)
        cb = claim_one(self.store, 2, now=at(10))
        self.assertEqual(self.store.expired_claims(now=at(14)), [])
        here = queuectl.host_id()
        self.assertEqual(self.store.expired_claims(now=at(16)),
                         [(a, ca.token, 1, None, here)])
        self.assertEqual(sorted(self.store.expired_claims(now=at(30))),
                         sorted([(a, ca.token, 1, None, here),
                                 ("b", cb.token, 2, None, here)]))
        self.assertTrue(self.store.renew(a, ca.token, 15, now=at(20)))
        self.assertEqual(self.store.expired_claims(now=at(30)),
                         [("b", cb.token, 2, None, here)])


class RetryTest(StoreTestCase):
    """What a run's end makes of its job: retry after a backoff, dead, completed."""

    def test_lowered_max_retries_ends_a_waiting_job(self):
        """A failed job whose retries a lowered max_retries used up goes dead unrun."""
        job_id = self.add()
        claim = claim_one(self.store, 1, now=T0)
        self.assertEqual(self.store.finish(job_id, claim.token, failed(), now=at(1)),
                         queuectl.FAILED)
        self.store.set_config("max_retries", 0)
        self.assertIsNone(claim_one(self.store, 1, now=at(100)))
        job, attempts = self.store.get_job(job_id)
        self.assertEqual((job["state"], job["attempts"], len(attempts)),
                         (queuectl.DEAD, 1, 1))

    def test_a_claim_ends_jobs_with_no_retry_left_and_takes_the_next(self):
        """Failed jobs ahead in line whose retries a lowered max_retries used up go
        dead, and the same claim takes the job behind them."""
        for job_id in ("a", "b"):
            self.add(id=job_id, priority=5)
            claim = claim_one(self.store, 1, now=T0)
            self.store.finish(job_id, claim.token, failed(), now=at(1))
        self.add(id="c")
        self.store.set_config("max_retries", 0)
        ended = []
        claims, _ = self.store.claim([(1, None), (2, None)], now=at(100), ended=ended)
        self.assertEqual([c.id for c in claims], ["c"])
        self.assertEqual(sorted(job_id for job_id, _ in ended), ["a", "b"])
        self.assertEqual([self.get(j)["state"] for j in "abc"],
                         [queuectl.DEAD, queuectl.DEAD, queuectl.PROCESSING])

    def test_requeue_makes_the_job_runnable_from_now(self):
        """A cold-stopped job's run_at is the requeue time, so it has not 'waited'."""
        job_id = self.add()
        claim = claim_one(self.store, 1, now=at(10))
        self.assertTrue(self.store.requeue(job_id, claim.token, "cold stop", now=at(50)))
        self.assertEqual(self.get(job_id)["run_at"], queuectl.iso(at(50)))

    def test_backoff_then_dead(self):
        """Failures wait base**k seconds; after max_retries + 1 attempts the job is dead."""
        job_id = self.add(max_retries=2)
        now = T0
        for k, delay in ((1, 2), (2, 4)):
            claim = claim_one(self.store, 1, now=now)
            self.assertEqual(claim.attempt, k)
            self.assertEqual(self.store.finish(job_id, claim.token, failed(f"exit {k}"),
                                               now=now), queuectl.FAILED)
            job = self.get(job_id)
            want = queuectl.iso(now + timedelta(seconds=delay))
            self.assertEqual((job["state"], job["attempts"], job["run_at"],
                              job["next_retry_at"], job["last_error"]),
                             (queuectl.FAILED, k, want, want, f"exit {k}"))
            self.assertIsNone(claim_one(self.store, 1, now=now + timedelta(seconds=delay - 0.01)))
            now += timedelta(seconds=delay)
        claim = claim_one(self.store, 1, now=now)
        self.assertEqual(claim.attempt, 3)
        self.assertEqual(self.store.finish(job_id, claim.token, failed("exit 9"), now=now),
                         queuectl.DEAD)
        job = self.get(job_id)
        self.assertEqual((job["state"], job["attempts"], job["last_error"],
                          job["next_retry_at"]), (queuectl.DEAD, 3, "exit 9", None))
        self.assertIsNone(claim_one(self.store, 1, now=now + timedelta(days=365)))

    def test_backoff_follows_config(self):
        """backoff_base and backoff_max from the config set the delay."""
        self.store.set_config("backoff_base", 3)
        self.store.set_config("backoff_max", 5)
        job_id = self.add(max_retries=5)
        claim = claim_one(self.store, 1, now=T0)
        self.store.finish(job_id, claim.token, failed(), now=T0)
        self.assertEqual(self.get(job_id)["run_at"], queuectl.iso(at(3)))
        claim = claim_one(self.store, 1, now=at(3))
        self.store.finish(job_id, claim.token, failed(), now=at(3))
        self.assertEqual(self.get(job_id)["run_at"], queuectl.iso(at(8)))

    def test_max_retries_zero_dies_at_once(self):
        """max_retries 0 means one attempt, then the DLQ."""
        job_id = self.add(max_retries=0)
        claim = claim_one(self.store, 1, now=T0)
        self.assertEqual(self.store.finish(job_id, claim.token, failed(), now=T0),
                         queuectl.DEAD)

    def test_success_completes(self):
        """A successful result completes the job and clears the error."""
        job_id = self.add(max_retries=3)
        claim = claim_one(self.store, 1, now=T0)
        self.store.finish(job_id, claim.token, failed(), now=T0)
        claim = claim_one(self.store, 1, now=at(2))
        self.assertEqual(self.store.finish(job_id, claim.token, OK, now=at(3)),
                         queuectl.COMPLETED)
        job = self.get(job_id)
        self.assertEqual((job["state"], job["attempts"], job["last_error"],
                          job["next_retry_at"], job["worker_pid"]),
                         (queuectl.COMPLETED, 2, None, None, None))

    def test_output_stored_per_attempt(self):
        """Each attempt keeps its own exit code, output, duration and times."""
        job_id = self.add(max_retries=3)
        claim = claim_one(self.store, 7, now=T0)
        self.store.finish(job_id, claim.token,
                          failed("exit 3", stdout="one\n", stderr="bad\n",
                                 stdout_dropped=5), now=at(1))
        claim = claim_one(self.store, 8, now=at(3))
        self.store.finish(job_id, claim.token,
                          queuectl.RunResult(exit_code=0, stdout="two\n"), now=at(5.5))
        _, attempts = self.store.get_job(job_id)
        self.assertEqual(
            [(a["number"], a["worker_pid"], a["outcome"], a["exit_code"], a["reason"],
              a["stdout"], a["stderr"], a["stdout_dropped"], a["started_at"],
              a["finished_at"], a["duration_s"]) for a in attempts],
            [(1, 7, queuectl.FAILED, 1, "exit 3", "one\n", "bad\n", 5,
              queuectl.iso(T0), queuectl.iso(at(1)), 1.0),
             (2, 8, queuectl.COMPLETED, 0, None, "two\n", "", 0,
              queuectl.iso(at(3)), queuectl.iso(at(5.5)), 2.5)])

    def test_retry_dead_resets(self):
        """retry_dead puts dead jobs back to pending with attempts 0."""
        job_id = self.add(max_retries=0)
        claim = claim_one(self.store, 1, now=T0)
        self.store.finish(job_id, claim.token, failed(), now=T0)
        self.assertEqual(self.store.retry_dead(now=at(5)), ([job_id], {}))
        job = self.get(job_id)
        self.assertEqual((job["state"], job["attempts"], job["run_at"]),
                         (queuectl.PENDING, 0, queuectl.iso(at(5))))
        self.assertEqual(self.store.retry_dead(), ([], {}))


class StoreEnqueueTest(StoreTestCase):
    """Store.enqueue: batches and ids."""

    def test_batch_is_atomic(self):
        """A duplicate id anywhere in a batch rolls back the whole batch."""
        self.add(id="x")
        before = self.dump()
        jobs = [queuectl.validate_job({"command": "true", "id": i}, T0)
                for i in ("y", "z", "x")]
        with self.assertRaises(queuectl.QueueError) as cm:
            self.store.enqueue(jobs, self.dir, T0)
        self.assertIn("duplicate job id: x", str(cm.exception))
        self.assertEqual(self.dump(), before)

    def test_generated_ids_unique(self):
        """Jobs without ids get distinct generated ids."""
        jobs = [queuectl.validate_job({"command": "true"}, T0) for _ in range(100)]
        ids, _ = self.store.enqueue(jobs, self.dir, T0)
        self.assertEqual(len(set(ids)), 100)
        self.assertEqual(len(self.store.list_jobs()), 100)


class StoreStatusTest(StoreTestCase):
    """Store.status and Store.stats: counts, the oldest runnable job, run times."""

    def oldest(self, now):
        return self.store.status(now=now)[1]

    def test_oldest_runnable_across_priorities(self):
        """status finds the longest-waiting runnable job, whatever its priority,
        and ignores jobs not due yet."""
        self.add(id="high-new", priority=9, run_at="2026-11-24T09:59:00Z")
        self.add(id="low-old", priority=-3, run_at="2026-11-24T09:10:00Z")
        self.add(id="mid", priority=2, run_at="2026-11-24T09:30:00Z")
        self.add(id="future", priority=5, run_at="2026-11-24T11:00:00Z")
        self.assertEqual(self.oldest(T0), "2026-11-24T09:10:00.000Z")
        self.assertEqual(claim_one(self.store, 1, now=T0).id, "high-new")
        self.assertEqual(self.oldest(at(3600)), "2026-11-24T09:10:00.000Z")
        self.store.delete(["low-old", "mid"])
        self.assertIsNone(self.oldest(T0))
        self.assertEqual(self.oldest(at(3600)), "2026-11-24T11:00:00.000Z")

    def test_oldest_runnable_with_many_priorities(self):
        """With more priorities than it looks up one by one, status still finds it."""
        for n in range(100):
            self.add(id=f"p{n}", priority=n,
                     run_at=queuectl.iso(at(-1000 + (n * 37) % 100)))
        claim_one(self.store, 1, now=T0)              # marks them all ready
        self.assertEqual(self.oldest(T0), queuectl.iso(at(-1000)))

    def test_stats_and_status(self):
        """stats counts runs and percentiles; status counts states and the oldest job."""
        now = queuectl.now_utc()
        for i, duration in enumerate((1.0, 3.0, 2.0)):
            self.add(id=f"ok{i}", now=now - timedelta(hours=2))
        self.add(id="bad", max_retries=0, now=now - timedelta(hours=2))
        for i, duration in enumerate((1.0, 3.0, 2.0)):
            claim = claim_one(self.store, 1, now=now - timedelta(hours=1))
            when = now - timedelta(minutes=30) if i == 2 else now
            self.store.finish(claim.id, claim.token,
                              queuectl.RunResult(exit_code=0, duration_s=duration),
                              now=when)
        claim = claim_one(self.store, 1, now=now)
        self.store.finish(claim.id, claim.token, failed(duration_s=9.0), now=now)
        stats = self.store.stats(now=now + timedelta(seconds=1))
        self.assertEqual(stats["completed"], 3)
        self.assertEqual(stats["failed_attempts"], 1)
        self.assertEqual(stats["dead"], 1)
        self.assertAlmostEqual(stats["success_rate"], 0.75)
        self.assertAlmostEqual(stats["run_time_avg_s"], 2.0)
        self.assertEqual(stats["run_time_p50_s"], 2.0)
        self.assertEqual(stats["run_time_p95_s"], 3.0)
        self.assertEqual(stats["completed_last_minute"], 2)
        self.assertEqual(stats["completed_last_hour"], 3)
        pending = self.add(id="later", now=now - timedelta(seconds=90))
        self.raw("UPDATE jobs SET run_at = ? WHERE id = ?",
                 (queuectl.iso(now - timedelta(seconds=90)), pending))
        counts, oldest, running = self.store.status(now=now)
        self.assertEqual(counts, {"pending": 1, "processing": 0, "completed": 3,
                                  "failed": 0, "dead": 1, "cancelled": 0})
        self.assertEqual(oldest, queuectl.iso(now - timedelta(seconds=90)))
        self.assertEqual(running, {})


class StoreOpenTest(StoreTestCase):
    """A database opened again."""

    def test_reopen_keeps_data(self):
        """Opening an existing database again keeps its jobs and config."""
        job_id = self.add()
        self.store.set_config("max_retries", 9)
        self.store.close()
        again = self.open(create=False)
        self.assertEqual(again.get_job(job_id)[0]["max_retries"], 9)


def in_threads(count, body):
    """Run body(i) for i in range(COUNT), each in a thread of its own, started
    together; return their results in order, or raise the first error."""
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def run(i):
        try:
            barrier.wait(timeout=30)
            results[i] = body(i)
        except BaseException as e:      # handed to the test's thread
            errors.append(e)
            barrier.abort()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


class PostgresSchemaTest(StoreTestCase):
    """PostgreSQL's own ways: the schema's version in meta, made under an advisory
    lock, in the ?schema= schema alone; claims with FOR UPDATE SKIP LOCKED."""

    store_kind = "postgres"

    def catalog(self, namespace):
        """The names of the relations and functions in NAMESPACE."""
        return sorted(tuple(row) for row in pg_sql(
            self.db, "SELECT 'relation ' || relname FROM pg_class WHERE relnamespace = "
            "(SELECT oid FROM pg_namespace WHERE nspname = ?) UNION ALL "
            "SELECT 'function ' || proname FROM pg_proc WHERE pronamespace = "
            "(SELECT oid FROM pg_namespace WHERE nspname = ?)", (namespace, namespace)))

    def test_newer_schema_version_refused_unchanged(self):
        """A schema from a newer queuectl is refused with one clear error line,
        naming the URL, and not touched."""
        self.add(id="kept")
        self.raw("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                 (str(queuectl.PG_SCHEMA_VERSION + 1),))
        before = self.dump()
        for create in (True, False):
            with self.subTest(create=create):
                with self.assertRaises(queuectl.QueueError) as cm:
                    queuectl.open_store(self.db, create=create)
                self.assertEqual(
                    str(cm.exception),
                    f"database schema version {queuectl.PG_SCHEMA_VERSION + 1} is newer "
                    f"than this queuectl understands ({queuectl.PG_SCHEMA_VERSION}); "
                    f"upgrade queuectl: {queuectl.pg_url(self.db)[2]}")
        self.assertEqual(self.dump(), before)
        self.assertEqual(self.raw("SELECT value FROM meta WHERE key = 'schema_version'")
                         [0][0], str(queuectl.PG_SCHEMA_VERSION + 1))

    def test_foreign_tables_refused_unchanged(self):
        """A schema that holds another program's tables is refused, not touched."""
        schema = queuectl.pg_url(self.db)[1]
        pg_sql(self.db, f"CREATE SCHEMA {schema}")
        pg_sql(self.db, f"CREATE TABLE {schema}.notes (body text)")
        pg_sql(self.db, f"INSERT INTO {schema}.notes VALUES ('keep me')")
        for create in (True, False):
            with self.subTest(create=create):
                with self.assertRaises(queuectl.QueueError) as cm:
                    queuectl.open_store(self.db, create=create)
                self.assertIn("holds tables that are not queuectl's", str(cm.exception))
        self.assertEqual(self.catalog(schema), [("relation notes",)])
        self.assertEqual(pg_sql(self.db, f"SELECT body FROM {schema}.notes"),
                         [("keep me",)])

    def test_stores_making_a_fresh_schema_at_once_all_succeed(self):
        """Stores that found no schema, writing at the same moment, all succeed:
        the advisory lock lets one make the schema, and the others find it made."""
        stores = [self.store] + [self.open() for _ in range(3)]
        self.assertEqual({store.version for store in stores}, {0})

        def enqueue(i):
            job = queuectl.validate_job({"command": "true", "id": f"job{i}"}, T0)
            return stores[i].enqueue([job], self.dir, T0)[0][0]
        self.assertEqual(in_threads(len(stores), enqueue), ["job0", "job1", "job2", "job3"])
        self.assertEqual([store.created for store in stores].count(True), 1)
        self.assertEqual(sorted(j["id"] for j in self.store.list_jobs()),
                         ["job0", "job1", "job2", "job3"])
        self.assertEqual(self.raw("SELECT value FROM meta WHERE key = 'schema_version'")
                         [0][0], str(queuectl.PG_SCHEMA_VERSION))
        self.assertEqual(self.store.status(now=T0)[0]["pending"], 4)

    def test_tables_live_in_the_urls_schema_alone(self):
        """The queue's tables and functions are made in the ?schema= schema;
        nothing is made in public, or in the default schema."""
        public = self.catalog("public")
        default = self.catalog(queuectl.PG_DEFAULT_SCHEMA)
        schema = queuectl.pg_url(self.db)[1]
        self.assertNotEqual(schema, queuectl.PG_DEFAULT_SCHEMA)
        self.assertEqual(self.catalog(schema), [])
        job_id = self.add()
        claim = claim_one(self.store, 1, now=T0)
        self.store.finish(job_id, claim.token, OK, now=at(1))
        self.store.set_config("max_retries", 5)
        tables = {f"relation {name}" for steps in queuectl.PG_MIGRATIONS
                  for statement in steps
                  for name in re.findall(r"CREATE TABLE (\w+)", statement)}
        made = {row[0] for row in self.catalog(schema)}
        self.assertLessEqual(tables | {"relation jobs", "relation attempts",
                                       "relation config", "function count_jobs"}, made)
        self.assertEqual(self.catalog("public"), public)
        self.assertEqual(self.catalog(queuectl.PG_DEFAULT_SCHEMA), default)

    def sql_rows(self, query):
        return [tuple(row) for row in pg_sql(self.db, query)]

    def blocked_behind(self, conn, action):
        """Run ACTION in a thread; return the thread once ACTION waits on a lock
        that CONN (a psycopg connection in a transaction) holds."""
        thread = threading.Thread(target=action)
        thread.start()
        holder = conn.info.backend_pid

        def waiting():
            rows = pg_sql(self.db, "SELECT count(*) FROM pg_stat_activity WHERE "
                          "? = ANY(pg_blocking_pids(pid))", (holder,))
            return rows[0][0] > 0
        wait_until(waiting, 10, "the other transaction to wait for the lock")
        return thread

    def test_a_job_enqueued_after_one_that_is_completing_is_not_left_waiting(self):
        """`enqueue --after X` while a run of X is being ended: the enqueue waits
        for that end, sees X completed, and its job is runnable at once."""
        first = self.add(id="x")
        claim = claim_one(self.store, 1, now=T0)
        ending = pg_connect(self.db)
        self.addCleanup(ending.close)
        ending.autocommit = False
        # A run's end, as _END_COMPLETED writes it, not committed yet.
        ending.execute("UPDATE jobs SET state = 'completed', claim_token = NULL "
                       "WHERE id = %s AND claim_token = %s", (first, claim.token))
        other = self.open()
        job = queuectl.validate_job({"command": "true", "id": "y", "after": ["x"]}, T0)
        thread = self.blocked_behind(ending, lambda: other.enqueue([job], self.dir, T0))
        ending.commit()
        thread.join(timeout=30)
        self.assertEqual(self.sql_rows("SELECT state, ready FROM jobs WHERE id = 'y'"),
                         [("pending", 1)])

    def test_a_run_that_ends_while_a_job_is_enqueued_after_it_releases_that_job(self):
        """A run of X ends while `enqueue --after X` is committing: the end waits
        for it, then finds the new job and makes it runnable."""
        first = self.add(id="x")
        claim = claim_one(self.store, 1, now=T0)
        enqueuing = pg_connect(self.db)
        self.addCleanup(enqueuing.close)
        enqueuing.autocommit = False
        # What enqueue writes for a job after x, x locked as it read it.
        enqueuing.execute("SELECT state FROM jobs WHERE id = 'x' FOR SHARE")
        enqueuing.execute(
            "INSERT INTO jobs (id, command, cwd, state, ready, run_at, created_at, "
            "updated_at) VALUES ('y', 'true', '/', 'pending', -1, %s, %s, %s)",
            (queuectl.iso(T0),) * 3)
        enqueuing.execute("INSERT INTO deps (job_id, after_id) VALUES ('y', 'x')")
        thread = self.blocked_behind(enqueuing, lambda: self.store.finish(
            first, claim.token, OK, now=at(1)))
        enqueuing.commit()
        thread.join(timeout=30)
        self.assertEqual(self.sql_rows("SELECT state FROM jobs WHERE id = 'x'"),
                         [("completed",)])
        self.assertEqual(claim_one(self.store, 2, now=at(2)).id, "y")

    def test_concurrent_claims_never_share_a_job(self):
        """Stores claiming at once, on connections of their own, take every job
        exactly once (FOR UPDATE SKIP LOCKED), and the counts agree."""
        jobs = [queuectl.validate_job({"command": "true", "id": f"j{n:03}"}, T0)
                for n in range(240)]
        self.store.enqueue(jobs, self.dir, T0)
        stores = [self.store] + [self.open() for _ in range(3)]

        def claim_all(i):
            taken = []
            while True:
                claims, _ = stores[i].claim([(100 + i, None)] * 3, now=at(1))
                if not claims:
                    return taken
                taken.extend(claim.id for claim in claims)
        taken = in_threads(len(stores), claim_all)
        every = [job_id for ids in taken for job_id in ids]
        self.assertEqual(sorted(every), [job["id"] for job in jobs])
        # They did claim side by side (without SKIP LOCKED, one took them all).
        self.assertGreaterEqual(len([ids for ids in taken if ids]), 2,
                                [len(ids) for ids in taken])
        owners = dict(self.raw("SELECT id, worker_pid FROM jobs"))
        for i, ids in enumerate(taken):
            self.assertEqual({owners[job_id] for job_id in ids}, {100 + i})
        self.assertEqual(self.raw("SELECT count(*) FROM attempts")[0][0], len(jobs))
        counts = self.store.status(now=at(1))[0]
        self.assertEqual((counts["pending"], counts["processing"]), (0, len(jobs)))


class SQLiteStoreTestCase(StoreTestCase):
    """A Store test that reads SQLite's file itself."""

    def pragma(self, name, path=None):
        conn = sqlite3.connect(path or self.db)
        try:
            return conn.execute(f"PRAGMA {name}").fetchone()[0]
        finally:
            conn.close()

    def read(self, path):
        with open(path, "rb") as f:
            return f.read()


class SQLiteFileTest(SQLiteStoreTestCase):
    """SQLite's file: its marks, WAL and syncs, its mode, files that are not ours, a
    full file."""

    def test_new_database_is_marked(self):
        """A new database carries the schema version and queuectl's application id."""
        self.assertEqual(self.pragma("user_version"), queuectl.SCHEMA_VERSION)
        self.assertEqual(self.pragma("application_id"), queuectl.APPLICATION_ID)
        self.assertEqual(self.pragma("journal_mode"), "wal")

    def test_every_connection_syncs_fully(self):
        """Each Store connection uses synchronous=FULL: in WAL, NORMAL can lose the
        last commits on power loss."""
        for create in (True, False):
            with queuectl.open_store(self.db, create=create) as store:
                self.assertEqual(store.conn.execute("PRAGMA synchronous").fetchone()[0],
                                 2)   # FULL
                self.assertEqual(
                    store.conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")

    def test_claims_are_not_synced_and_results_are(self):
        """A claim commits with synchronous=NORMAL (it acknowledges nothing); a
        recorded result, and every other write, with FULL."""
        def sync():
            return self.store.conn.execute("PRAGMA synchronous").fetchone()[0]
        job_id = self.add()
        self.assertEqual(sync(), 2)
        claim = claim_one(self.store, 1, now=T0)
        self.assertEqual(sync(), 1)                     # NORMAL
        self.assertTrue(self.store.renew(job_id, claim.token, 15, now=at(1)))
        self.assertEqual(sync(), 1)                     # a renewal alone: NORMAL
        self.store.finish(job_id, claim.token, OK, now=at(2))
        self.assertEqual(sync(), 2)                     # FULL
        claim_one(self.store, 1, now=at(3))
        self.add(id="next")
        self.assertEqual(sync(), 2)

    def test_file_mode_0600(self):
        """A new database file is readable and writable by its owner only."""
        self.assertEqual(stat.S_IMODE(os.stat(self.db).st_mode), 0o600)
        old = os.umask(0)
        try:
            path = os.path.join(self.dir, "sub", "open.db")
            self.open(path)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_newer_version_refused_unchanged(self):
        """A database from a newer queuectl is refused and not touched."""
        self.store.close()
        conn = sqlite3.connect(self.db)
        conn.execute(f"PRAGMA user_version = {queuectl.SCHEMA_VERSION + 1}")
        conn.close()
        before = self.read(self.db)
        with self.assertRaises(queuectl.QueueError) as cm:
            queuectl.open_store(self.db)
        self.assertIn("newer", str(cm.exception))
        self.assertEqual(self.read(self.db), before)
        self.assertEqual(self.pragma("user_version"), queuectl.SCHEMA_VERSION + 1)

    def test_foreign_sqlite_refused_unchanged(self):
        """Another program's SQLite database is refused and not touched."""
        path = os.path.join(self.dir, "other.sqlite")
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('keep me')")
        conn.commit()
        conn.close()
        before = self.read(path)
        for create in (True, False):
            with self.assertRaises(queuectl.QueueError) as cm:
                queuectl.open_store(path, create=create)
            self.assertIn("not a queuectl database", str(cm.exception))
        self.assertEqual(self.read(path), before)
        self.assertEqual(self.pragma("journal_mode", path), "delete")

    def test_text_file_refused_unchanged(self):
        """A file that is not SQLite at all is refused and not touched."""
        path = os.path.join(self.dir, "notes.txt")
        with open(path, "w") as f:
            f.write("my precious notes\n")
        with self.assertRaises(queuectl.QueueError) as cm:
            queuectl.open_store(path)
        self.assertIn("not a queuectl database", str(cm.exception))
        self.assertEqual(self.read(path), b"my precious notes\n")
        self.assertEqual([n for n in os.listdir(self.dir) if n.startswith("notes")],
                         ["notes.txt"])

    def test_missing_database_not_created(self):
        """create=False refuses a missing database and creates nothing."""
        path = os.path.join(self.dir, "nope", "missing.db")
        with self.assertRaises(queuectl.QueueError) as cm:
            queuectl.open_store(path, create=False)
        self.assertIn("no database", str(cm.exception))
        self.assertFalse(os.path.exists(os.path.dirname(path)))

    def test_directory_refused(self):
        """A directory is not a database."""
        with self.assertRaises(queuectl.QueueError) as cm:
            queuectl.open_store(self.dir)
        self.assertIn("directory", str(cm.exception))

    def test_full_database(self):
        """When the database is full, enqueue fails with 'full' and keeps old jobs."""
        ids = [self.add(id=f"job{i}") for i in range(5)]
        before = self.dump()
        pages = self.store.conn.execute("PRAGMA page_count").fetchone()[0]
        self.store.conn.execute(f"PRAGMA max_page_count = {pages}")
        jobs = [queuectl.validate_job({"command": "x" * 20000}, T0) for _ in range(5)]
        with self.assertRaises(queuectl.QueueError) as cm:
            self.store.enqueue(jobs, self.dir, T0)
        self.assertIn("full", str(cm.exception))
        self.assertFalse(self.store.conn.in_transaction)
        self.assertEqual(self.dump(), before)
        self.assertEqual(sorted(j["id"] for j in self.store.list_jobs()), ids)
        other = self.open()
        self.assertEqual(sorted(j["id"] for j in other.list_jobs()), ids)


class SQLiteMigrationTest(SQLiteStoreTestCase):
    """Schema migrations of SQLite's file, in place: all of one or none of it."""

    def version_zero_files(self):
        """Yield (name, path) of an empty file and of an empty-schema SQLite file."""
        empty = os.path.join(self.dir, "empty.db")
        open(empty, "wb").close()
        yield "empty file", empty
        blank = os.path.join(self.dir, "blank.db")
        conn = sqlite3.connect(blank)
        conn.execute("CREATE TABLE t (a)")
        conn.execute("DROP TABLE t")
        conn.commit()
        conn.close()
        yield "empty-schema SQLite file", blank

    def failing_migration(self):
        bad = (("CREATE TABLE jobs (id TEXT)", "THIS IS NOT SQL"),)
        return mock.patch.object(queuectl, "MIGRATIONS", bad)

    def test_version_1_database_is_migrated_with_its_jobs(self):
        """A database of schema version 1 (queuectl 1.0) is migrated in place: its
        jobs, runs and config are kept, counted, and claimable in order."""
        self.store.close()
        path = os.path.join(self.dir, "v1.db")
        conn = sqlite3.connect(path, isolation_level=None)
        for statement in queuectl.MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {queuectl.APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 1")
        rows = [("due-low", "pending", 0, "2026-11-24T09:00:00.000Z", 0),
                ("due-high", "pending", 5, "2026-11-24T09:30:00.000Z", 0),
                ("later", "pending", 9, "2026-11-24T11:00:00.000Z", 0),
                ("retry", "failed", 1, "2026-11-24T09:59:00.000Z", 1),
                ("done", "completed", 0, "2026-11-24T08:00:00.000Z", 1),
                ("gone", "dead", 0, "2026-11-24T08:00:00.000Z", 4)]
        for n, (job_id, state, priority, run_at, attempts) in enumerate(rows):
            conn.execute("INSERT INTO jobs (id, command, cwd, state, priority, attempts, "
                         "run_at, created_at, updated_at) VALUES (?, 'true', '/', ?, ?, "
                         "?, ?, ?, ?)", (job_id, state, priority, attempts, run_at,
                                         queuectl.iso(at(n - 100)), run_at))
        for job_id, outcome, duration in (("done", "completed", 0.004),
                                          ("retry", "failed", 2.0),
                                          ("gone", "failed", 30.0)):
            conn.execute("INSERT INTO attempts (job_id, number, run_token, worker_pid, "
                         "started_at, finished_at, outcome, duration_s) VALUES "
                         "(?, 1, ?, 1, ?, ?, ?, ?)", (job_id, job_id + "-run",
                                                      queuectl.iso(T0), queuectl.iso(T0),
                                                      outcome, duration))
        conn.execute("INSERT INTO config VALUES ('max_retries', '5')")
        conn.close()

        store = self.open(path, create=False)
        self.assertEqual(self.pragma("user_version", path), queuectl.SCHEMA_VERSION)
        counts, _, _ = store.status(now=T0)
        self.assertEqual(counts, {"pending": 3, "processing": 0, "completed": 1,
                                  "failed": 1, "dead": 1, "cancelled": 0})
        self.assertEqual(store.stats(now=T0)["failed_attempts"], 2)
        self.assertEqual(store.config()["max_retries"], 5)
        self.assertEqual([j["id"] for j in store.list_jobs()],
                         ["gone", "done", "retry", "later", "due-high", "due-low"])
        order = [claim_one(store, 1, now=T0).id for _ in range(3)]
        self.assertEqual(order, ["due-high", "retry", "due-low"])
        self.assertEqual(store.claim([(1, None)], now=T0),
                         ([], "2026-11-24T11:00:00.000Z"))
        counts, _, _ = store.status(now=T0)
        self.assertEqual((counts["pending"], counts["processing"], counts["failed"]),
                         (1, 3, 0))

    def test_failed_migration_leaves_no_schema(self):
        """A migration that fails half-way is rolled back: still version 0, no tables."""
        for name, path in self.version_zero_files():
            with self.subTest(name), self.failing_migration():
                with self.assertRaises(queuectl.QueueError):
                    queuectl.open_store(path)
                self.assertEqual(self.pragma("user_version", path), 0)
                self.assertEqual(self.pragma("application_id", path), 0)
                conn = sqlite3.connect(path)
                try:
                    tables = conn.execute("SELECT name FROM sqlite_master").fetchall()
                finally:
                    conn.close()
                self.assertEqual(tables, [])

    def test_failed_migration_leaves_file_unchanged(self):
        """A migration that fails leaves a version-0 file byte for byte as it was."""
        for name, path in self.version_zero_files():
            before = self.read(path)
            with self.subTest(name), self.failing_migration():
                with self.assertRaises(queuectl.QueueError):
                    queuectl.open_store(path)
                after = self.read(path)
                self.assertTrue(after == before,
                                f"file changed: {len(before)} -> {len(after)} bytes, "
                                f"header bytes 18-19 {before[18:20]!r} -> "
                                f"{after[18:20]!r} (2, 2: WAL mode)")


add_postgres_variants(globals())


if __name__ == "__main__":
    unittest.main()
