"""Spike load: a steady base, a sudden crowd, and the way back.

    locust -f loadtests/locustfile.py,loadtests/spike_shape.py --headless --host ws://…

Holds ``--spike-base`` users for ``--spike-at`` seconds, jumps to ``--spike-peak`` at
``--spike-rate`` users a second (a push notification, a match that starts), holds them
``--spike-seconds``, drops back to the base for as long again, then ends. At the end of
each phase it logs the worst p99 of the watched request types (``--spike-watch``) over
that phase's second half: before, during and after the spike.
"""

import logging
from typing import Any

from locust import LoadTestShape, events

from loadtests import locust_run

log = logging.getLogger("parley.locust")


@events.init_command_line_parser.add_listener
def _options(parser: Any, **_: Any) -> None:
    parser.add_argument("--spike-base", type=int, default=100, help="users before and after")
    parser.add_argument("--spike-peak", type=int, default=1000, help="users during the spike")
    parser.add_argument("--spike-at", type=float, default=60.0, help="seconds before it")
    parser.add_argument("--spike-seconds", type=float, default=30.0, help="how long it lasts")
    parser.add_argument("--spike-rate", type=float, default=200.0, help="users/s coming in")
    parser.add_argument(
        "--spike-watch", default="deliver,chat", help="request types whose p99 is logged"
    )


class SpikeLoad(LoadTestShape):
    PHASES = ("before", "during", "after")

    def __init__(self) -> None:
        super().__init__()
        self.phase = 0
        self.since: locust_run.Snapshot | None = None

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        environment = self.runner.environment
        opts = locust_run.options(environment)
        peak_ends = opts.spike_at + opts.spike_seconds
        ends = (opts.spike_at, peak_ends, peak_ends + opts.spike_at)
        now = self.get_run_time()
        phase = next((i for i, end in enumerate(ends) if now < end), len(ends))
        if phase != self.phase:
            self.report(environment)
            self.phase, self.since = phase, None
        if phase == len(ends):
            return None
        start = ends[phase - 1] if phase else 0.0
        if self.since is None and now >= (start + ends[phase]) / 2:
            self.since = locust_run.snapshot(environment)
        users = opts.spike_peak if phase == 1 else opts.spike_base
        return users, opts.spike_rate

    def report(self, environment: Any) -> None:
        if self.since is None:
            return
        types = set(locust_run.options(environment).spike_watch.split(","))
        p99, which = locust_run.worst_p99(environment, self.since, types)
        log.info("spike, %s: worst p99 %d ms (%s)", self.PHASES[self.phase], p99, which)
