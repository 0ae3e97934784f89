"""actors/token_bucket.py."""

from actors.token_bucket import TokenBucket


def test_burst_then_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)  # 0.8 tokens
    assert bucket.take(0.5)  # 1.0
    assert not bucket.take(0.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_a_cost_of_several_tokens() -> None:
    bucket = TokenBucket(rate=10.0, burst=20, now=0.0)
    assert bucket.take(0.0, 17)
    assert not bucket.take(0.0, 17)  # refused: nothing spent
    assert bucket.take(0.0, 3)
    assert not bucket.take(1.0, 17)  # 10 back
    assert bucket.take(1.7, 17)
