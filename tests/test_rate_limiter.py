"""The rate limiter's buckets: limiting as before, and memory bounded however many keys.

Time is the limiter's own clock argument, advanced by hand: the tests never wait.
"""

from __future__ import annotations

import tracemalloc

from app.services.security import RateLimiter, RatePolicy

BURST, PER_MINUTE = 3, 60.0  # a unit a second: a bucket is full again 3 s after its last take


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limiter(clock: Clock, max_buckets: int = 10_000) -> RateLimiter:
    return RateLimiter(RatePolicy(BURST, PER_MINUTE), max_buckets=max_buckets, clock=clock)


def test_a_key_gets_its_burst_then_waits_for_the_refill() -> None:
    clock = Clock()
    limiter = _limiter(clock)
    assert [limiter.take("a") for _ in range(BURST)] == [0.0] * BURST
    assert limiter.take("a") == 1.0
    clock.now += 0.5
    assert limiter.take("a") == 0.5
    clock.now += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("b") == 0.0  # another key has a bucket of its own


def test_many_distinct_keys_over_time_keep_only_the_recent_buckets() -> None:
    clock = Clock()
    limiter = _limiter(clock)
    for n in range(100_000):
        assert limiter.take(f"token-{n}") == 0.0
        clock.now += 0.001  # a thousand new keys a second
    # Only keys seen within the refill time (3 s) can still differ from a new bucket.
    assert len(limiter) <= 3_001


def test_memory_stays_bounded_when_every_key_is_recent() -> None:
    clock = Clock()
    limiter = _limiter(clock, max_buckets=1_000)
    tracemalloc.start()
    try:
        for n in range(1_000):
            limiter.take(f"token-{n:08d}")
        full, _ = tracemalloc.get_traced_memory()
        for n in range(1_000, 50_000):  # all at the same instant: nothing has refilled
            limiter.take(f"token-{n:08d}")
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(limiter) == 1_000
    assert after < full * 1.5, (full, after)


def test_an_active_key_stays_limited_while_idle_ones_are_dropped() -> None:
    clock = Clock()
    limiter = _limiter(clock, max_buckets=100)
    for _ in range(BURST):
        limiter.take("busy")
    for n in range(10_000):
        limiter.take(f"idle-{n}")
        if n % 50 == 0:  # the busy key comes back now and then, and is refused every time
            assert limiter.take("busy") > 0
    assert limiter.take("busy") > 0
    assert len(limiter) <= 100


def test_a_refilled_bucket_dropped_is_no_loss() -> None:
    """A key whose bucket was dropped after refilling gets the burst it would have had."""
    clock = Clock()
    limiter = _limiter(clock)
    for _ in range(BURST):
        limiter.take("a")
    assert limiter.take("a") > 0
    clock.now += BURST  # exactly refilled
    limiter.take("b")  # any take sweeps
    assert len(limiter) == 1
    assert [limiter.take("a") for _ in range(BURST)] == [0.0] * BURST
    assert limiter.take("a") > 0
