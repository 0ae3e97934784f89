"""Step load: how many sessions before the p99 passes a target.

    locust -f loadtests/locustfile.py,loadtests/step_shape.py --headless --host ws://…

Adds ``--step-users`` users every ``--step-seconds`` and, at the end of each step, takes
the p99 of every request of the watched types (``--step-watch``, by default ``deliver``
and ``chat``) over the step's second half, after the ramp. The run stops at the first
step whose worst p99 passes ``--step-p99-ms`` (100 ms), or after the step that reaches
``--step-max`` users, and says where it stood. loadtests/README.md has the recipe.
"""

import logging
from typing import Any

from locust import LoadTestShape, events

from loadtests import locust_run

log = logging.getLogger("parley.locust")


@events.init_command_line_parser.add_listener
def _options(parser: Any, **_: Any) -> None:
    parser.add_argument("--step-users", type=int, default=50, help="users added per step")
    parser.add_argument("--step-seconds", type=float, default=30.0, help="length of a step")
    parser.add_argument("--step-max", type=int, default=5000, help="stop after this many users")
    parser.add_argument("--step-p99-ms", type=float, default=100.0, help="the p99 target")
    parser.add_argument(
        "--step-watch", default="deliver,chat", help="request types whose p99 is watched"
    )


class StepLoad(LoadTestShape):
    def __init__(self) -> None:
        super().__init__()
        self.step = -1
        self.since: locust_run.Snapshot | None = None
        self.passed_under = 0  # users of the last step whose p99 met the target

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        environment = self.runner.environment
        opts = locust_run.options(environment)
        step = int(self.get_run_time() // opts.step_seconds)
        into = self.get_run_time() % opts.step_seconds
        if step != self.step:
            if self.step >= 0 and self.since is not None and self.end_of_step(self.step):
                return None
            self.step, self.since = step, None
        if self.since is None and into >= opts.step_seconds / 2:
            self.since = locust_run.snapshot(environment)
        users = (step + 1) * opts.step_users
        if users > opts.step_max:
            log.info("step load: every step up to %d users met the target", self.passed_under)
            return None
        return users, max(1.0, opts.step_users / 5)  # each step ramps in 5 s

    def end_of_step(self, step: int) -> bool:
        """Log the step's p99; True when it passed the target (the run ends)."""
        assert self.runner is not None and self.since is not None
        environment = self.runner.environment
        opts = locust_run.options(environment)
        users = (step + 1) * opts.step_users
        types = set(opts.step_watch.split(","))
        p99, which = locust_run.worst_p99(environment, self.since, types)
        log.info("step %d: %d users: worst p99 %d ms (%s)", step + 1, users, p99, which)
        if p99 <= opts.step_p99_ms:
            self.passed_under = users
            return False
        log.info(
            "step load: p99 passed %g ms at %d users (%s: %d ms); the last step under it had "
            "%d users",
            opts.step_p99_ms,
            users,
            which,
            p99,
            self.passed_under,
        )
        return True
