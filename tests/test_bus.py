"""storage/bus.py: the in-process bus."""

from storage.bus import InProcessBus


def test_subscribers_get_each_publish_until_they_unsubscribe() -> None:
    bus = InProcessBus()
    got: list[tuple[str, object]] = []
    stop_a = bus.subscribe("user:x", lambda p: got.append(("a", p)))
    stop_b = bus.subscribe("user:x", lambda p: got.append(("b", p)))
    bus.subscribe("user:y", lambda p: got.append(("y", p)))
    bus.publish("user:x", 1)
    stop_a()
    stop_a()  # twice is harmless
    bus.publish("user:x", 2)
    stop_b()
    bus.publish("user:x", 3)
    assert got == [("a", 1), ("b", 1), ("b", 2)]
    assert list(bus._subscribers) == ["user:y"]  # an empty channel is forgotten
