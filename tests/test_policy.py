"""The batching policy, driven by a fake clock: no sleeping."""

from __future__ import annotations

from engine import policy
from engine.policy import AdaptiveLimit, Backoff, CircuitBreaker, decide_cut

MS = 1_000_000


def test_cuts_on_size_as_soon_as_limit_reached():
    assert decide_cut(857, 857, oldest_ns=0, window_ns=10 * MS, now_ns=1, draining=False) == (policy.SIZE, 0)


def test_cuts_on_time_when_oldest_window_expires():
    assert decide_cut(3, 857, oldest_ns=0, window_ns=10 * MS, now_ns=10 * MS, draining=False) == (policy.TIME, 0)


def test_waits_exactly_the_time_left_in_the_window():
    assert decide_cut(3, 857, oldest_ns=100, window_ns=10 * MS, now_ns=4 * MS, draining=False) == (None, 6 * MS + 100)


def test_drain_cuts_immediately_and_empty_never_cuts():
    assert decide_cut(1, 857, 0, 10 * MS, 0, draining=True) == (policy.DRAIN, 0)
    assert decide_cut(0, 857, 0, 10 * MS, 99 * MS, draining=True)[0] is None


def adaptive(**kw):
    base = dict(initial=500, minimum=50, maximum=1000, factor=0.1, error_rate_threshold=0.01, latency_threshold_s=0.1)
    base.update(kw)
    return AdaptiveLimit(**base)


def test_adaptive_grows_when_demand_exceeds_limit_and_latency_is_fine():
    a = adaptive()
    assert a.observe(failed_fraction=0, latency_s=0.01, size_triggered=True) == 550
    assert a.observe(failed_fraction=0, latency_s=0.01, size_triggered=False) == 550


def test_adaptive_shrinks_on_latency_or_errors_within_bounds():
    a = adaptive()
    assert a.observe(failed_fraction=0, latency_s=0.5, size_triggered=True) == 450
    for _ in range(100):
        a.observe(failed_fraction=1.0, latency_s=0.01, size_triggered=True)
    assert a.limit == 50


def test_adaptive_off_keeps_max():
    a = adaptive(enabled=False, maximum=857)
    assert a.observe(failed_fraction=1.0, latency_s=9, size_triggered=False) == 857


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_breaker_opens_after_threshold_and_half_opens_after_timeout():
    clock = Clock()
    b = CircuitBreaker(failure_threshold=5, recovery_timeout_s=30, test_count=3, clock=clock)
    for _ in range(4):
        b.failure()
    assert b.allow()
    b.failure()
    assert not b.allow() and b.retry_in() == 30
    clock.t = 30
    assert b.allow() and b.state == policy.HALF_OPEN
    b.success()
    b.success()
    assert b.state == policy.HALF_OPEN
    b.success()
    assert b.state == policy.CLOSED


def test_breaker_reopens_on_failure_while_half_open():
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, recovery_timeout_s=1, test_count=3, clock=clock)
    b.failure()
    clock.t = 1
    assert b.allow()
    b.failure()
    assert b.state == policy.OPEN and not b.allow()


def test_backoff_doubles_to_max_and_resets_after_stable_run():
    clock = Clock()
    back = Backoff(initial=0.1, maximum=0.5, stable_s=10, clock=clock)
    assert [back.next_delay() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    back.started_now()
    clock.t = 11
    assert back.next_delay() == 0.1


def test_the_commit_lead_is_a_high_estimate_capped_at_half_the_window():
    from engine.policy import CommitLead

    lead = CommitLead(enabled=True)
    assert lead.lead_ns(10 * MS) == 0  # nothing measured yet: the whole window
    for _ in range(200):
        lead.observe(0.002)
    assert 2 * MS <= lead.lead_ns(10 * MS) < 2.2 * MS  # steady 2 ms commits
    for _ in range(200):
        lead.observe(0.001 if _ % 2 else 0.003)  # same mean, spread: a higher lead
    assert lead.lead_ns(10 * MS) > 3 * MS
    for _ in range(400):
        lead.observe(0.5)  # a slow database cannot shrink the window below half
    assert lead.lead_ns(10 * MS) == 5 * MS
    assert CommitLead(enabled=False).lead_ns(10 * MS) == 0
