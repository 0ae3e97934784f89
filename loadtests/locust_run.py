"""What a Locust run of Parley needs besides its users: options, tokens, the rooms made
through the admin API, the delivery tallies merged across workers, the drain that ends
a run cleanly, and the summary that fails it.

The end of a run: writers stop and every receiver waits until it holds each of its
rooms up to the room's newest seq (asked with ``history``), so a message the server
acked but never delivered counts as lost however late in the run it was sent. In
distributed mode the master asks every worker to drain (a custom message) and waits for
each to answer with its final tallies before it stops them; Locust alone would stop
workers first and take their last statistics within half a second.
"""

import http.client
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import gevent
import jwt
from gevent.event import Event
from locust import events
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import CSV_STATS_INTERVAL_SEC, calculate_response_time_percentile

from loadtests.delivery import Counts

log = logging.getLogger("parley.locust")

# This process's tallies: ``unreported`` since the last report to the master, ``total``
# for the whole run (what this process saw, printed when it quits).
unreported = Counts()
total = Counts()
requests: dict[str, int] = {}  # "type name" -> requests fired in this process (ok + failed)
draining = Event()  # set: writers stop, receivers settle; tasks wait for the end
settlers: set[Callable[[float], None]] = set()  # each live user's settle(deadline)
_drained: dict[str, dict[str, int]] = {}  # worker id -> its final tallies (on the master)


@events.init_command_line_parser.add_listener
def _options(parser: Any, **_: Any) -> None:
    group = parser  # Locust's own add_argument: it knows is_secret
    group.add_argument(
        "--parley-secret",
        env_var="PARLEY_SECRET",
        default="",
        is_secret=True,
        help="the server's --secret: users mint their own tokens (HS256, sub = user id)",
    )
    group.add_argument(
        "--parley-token-file",
        default="",
        help="instead of a secret: a file of tokens, one per line, dealt to users in turn",
    )
    group.add_argument(
        "--parley-admin-url",
        env_var="PARLEY_ADMIN_URL",
        default="",
        help="the server's ops endpoint, e.g. http://127.0.0.1:9090 (default: the --host's "
        "host on port 9090)",
    )
    group.add_argument(
        "--parley-admin-token",
        env_var="PARLEY_ADMIN_TOKEN",
        default="",
        is_secret=True,
        help="the server's --admin-token, to create the rooms of the run",
    )
    group.add_argument(
        "--parley-dev-file",
        default="parley-dev.json",
        help="read the secret and admin token from this file of `parley serve --dev` "
        "when they are not given",
    )
    group.add_argument("--parley-prefix", default="lt", help="names of the run's users and rooms")
    group.add_argument(
        "--parley-pairs",
        type=int,
        default=500,
        help="1:1 rooms to create; chatters share them two by two up to 4 times this many users",
    )
    group.add_argument(
        "--parley-groups",
        type=int,
        default=250,
        help="group rooms to create; four chatters each up to 8 times this many users",
    )
    group.add_argument(
        "--parley-storm-every",
        type=_positive,
        default=20.0,
        help="seconds between reconnect storms (every reconnector drops at once)",
    )
    group.add_argument(
        "--parley-think",
        type=_positive,
        default=1.0,
        help="scales every user's think time (0.1: ten times as busy)",
    )
    group.add_argument("--parley-timeout", type=_positive, default=10.0, help="request timeout, s")
    group.add_argument(
        "--parley-drain", type=_positive, default=5.0, help="seconds receivers may take to settle"
    )


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def options(environment: Environment) -> Any:
    return environment.parsed_options


def ws_url(host: str) -> str:
    """``--host`` as given, with ``/ws`` added when it names no path."""
    parts = urllib.parse.urlsplit(host)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(
            f"--host must be ws://HOST:PORT or wss://HOST (the client URL), not {host!r}"
        )
    return host if parts.path not in ("", "/") else host.rstrip("/") + "/ws"


def _dev_file(environment: Environment) -> dict[str, Any]:
    path = Path(options(environment).parley_dev_file)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def worker_index(environment: Environment) -> int:
    runner = environment.runner
    return runner.worker_index if isinstance(runner, WorkerRunner) else 0


class Tokens:
    """Tokens for the run's users: minted from the secret, or dealt from a file."""

    def __init__(self, environment: Environment) -> None:
        opts = options(environment)
        self.secret = opts.parley_secret or _dev_file(environment).get("secret", "")
        self.lines: list[str] = []
        if opts.parley_token_file:
            text = Path(opts.parley_token_file).read_text()
            self.lines = [line.split()[-1] for line in text.splitlines() if line.strip()]
        elif not self.secret:
            raise SystemExit(
                "Parley users need tokens: give --parley-secret (or PARLEY_SECRET), "
                "--parley-token-file, or run beside `parley serve --dev`'s parley-dev.json"
            )
        self.dealt = worker_index(environment) * 997
        self.given: dict[str, str] = {}  # user -> the file's token it was dealt

    def token(self, user: str) -> str:
        """A token for ``user``; from a file, the next line's (whoever it names), the
        same one each time the same ``user`` asks (a person's second device)."""
        if self.lines:
            if user not in self.given:
                self.dealt += 1
                self.given[user] = self.lines[self.dealt % len(self.lines)]
            return self.given[user]
        # As server.tokens.issue_token does; importing it would bring the server's
        # packages (trio, the actors, storage) into this gevent process.
        claims = {"sub": user, "exp": int(time.time()) + 86_400}
        return jwt.encode(claims, self.secret, algorithm="HS256")


def room_names(environment: Environment) -> list[str]:
    """The rooms the run's user classes need (their ``room_kinds``)."""
    opts = options(environment)
    prefix = opts.parley_prefix
    needed = {kind for cls in environment.user_classes for kind in getattr(cls, "room_kinds", ())}
    names = []
    if "small" in needed:
        names += [f"{prefix}-pair-{i}" for i in range(opts.parley_pairs)]
        names += [f"{prefix}-group-{i}" for i in range(opts.parley_groups)]
    if "large" in needed:
        names.append(f"{prefix}-large")
    return names


def create_rooms(environment: Environment) -> None:
    """Make the run's open rooms through the admin API, 16 requests at a time; those
    that exist are kept."""
    opts = options(environment)
    admin_token = opts.parley_admin_token or _dev_file(environment).get("admin_token", "")
    url = opts.parley_admin_url
    if not url:
        host = urllib.parse.urlsplit(environment.host or "").hostname or "127.0.0.1"
        url = f"http://{host}:9090"
    target = urllib.parse.urlsplit(url)
    headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"}
    rooms = room_names(environment)
    made: list[str] = []
    errors: list[str] = []

    def create(share: list[str]) -> None:
        conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port or 80, 10)
        try:
            for room in share:
                conn.request("POST", "/admin/rooms", json.dumps({"room": room}), headers)
                answer = conn.getresponse()
                answer.read()
                if answer.status == 201:
                    made.append(room)
                elif answer.status != 409:
                    errors.append(
                        f"creating room {room} at {url}/admin/rooms: HTTP {answer.status} "
                        "(is --parley-admin-token the server's --admin-token?)"
                    )
                    return
        except OSError as exc:
            errors.append(f"creating rooms at {url}: {exc} (set --parley-admin-url)")
        finally:
            conn.close()

    if not rooms:
        return
    started = time.perf_counter()
    greenlets = [gevent.spawn(create, rooms[i::16]) for i in range(16)]
    gevent.joinall(greenlets)
    if errors:
        raise SystemExit(errors[0])  # the run cannot go on without its rooms
    log.info(
        "rooms: %d created, %d there already (%.1f s)",
        len(made),
        len(rooms) - len(made),
        time.perf_counter() - started,
    )


# --- tallies, drain and summary ---------------------------------------------------------


@events.request.add_listener
def _count(request_type: str, name: str, **_: Any) -> None:
    key = f"{request_type} {name}"
    requests[key] = requests.get(key, 0) + 1


def _take() -> dict[str, int]:
    counts = unreported.take()
    total.add(counts)
    return attrs.asdict(counts)


def drain(environment: Environment) -> None:
    """End this process's part of the run: stop writing, let receivers settle."""
    seconds = options(environment).parley_drain
    draining.set()
    gevent.sleep(min(1.0, seconds / 4))  # requests in flight get their answers
    deadline = time.monotonic() + seconds
    greenlets = [gevent.spawn(settle, deadline) for settle in list(settlers)]
    gevent.joinall(greenlets, timeout=seconds + 2)


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):

        def on_drain(environment: Environment, msg: Any, **_: Any) -> None:
            drain(environment)
            # The statistics first, so the master holds them when it hears "drained".
            runner._send_stats()
            runner.send_message("parley_drained", _take())

        runner.register_message("parley_drain", on_drain, concurrent=True)
    else:
        _drop_classes_without_tasks(environment)
    if isinstance(runner, MasterRunner):

        def on_drained(environment: Environment, msg: Any, **_: Any) -> None:
            _drained[msg.node_id] = msg.data
            total.add(Counts(**msg.data))

        runner.register_message("parley_drained", on_drained)


def is_worker(environment: Environment) -> bool:
    # Not the runner's type: a worker that joins a running test hears of it before its
    # runner is set.
    return bool(getattr(options(environment), "worker", False))


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    draining.clear()
    _drained.clear()
    for counts in (unreported, total):
        counts.take()  # a new run in the web UI starts from zero
    requests.clear()
    if not is_worker(environment):
        try:
            ws_url(environment.host or "")
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        Tokens(environment)  # no way to make tokens: say so now, not in every user
        create_rooms(environment)


def _drop_classes_without_tasks(environment: Environment) -> None:
    """``--tags kv`` leaves the other scenarios without tasks: run only those it names.
    Locust would dispatch the others anyway, and they would fail; this runs before the
    master builds its dispatcher, hence the early filtering (it only ever runs once)."""
    environment._filter_tasks_by_tags()
    kept = [cls for cls in environment.user_classes if cls.tasks]
    if kept and len(kept) < len(environment.user_classes):
        environment.user_classes[:] = kept


@events.test_stopping.add_listener
def _stopping(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        return  # the master's parley_drain did it
    if not isinstance(runner, MasterRunner):
        drain(environment)
        return
    workers = {client.id for client in runner.clients.all}
    for worker in workers:
        runner.send_message("parley_drain", None, worker)
    deadline = time.monotonic() + options(environment).parley_drain + 10
    while not workers <= set(_drained) and time.monotonic() < deadline:
        gevent.sleep(0.1)
    missing = workers - set(_drained)
    if missing:
        log.error("workers that did not drain in time: %s", ", ".join(sorted(missing)))


@events.report_to_master.add_listener
def _report(data: dict[str, Any], **_: Any) -> None:
    data["parley"] = _take()


@events.worker_report.add_listener
def _worker_report(data: dict[str, Any], **_: Any) -> None:
    if "parley" in data:
        total.add(Counts(**data["parley"]))


@events.quitting.add_listener
def _quitting(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if not isinstance(runner, MasterRunner | WorkerRunner):
        total.add(unreported.take())
    summary = attrs.asdict(total)
    if isinstance(runner, WorkerRunner):
        # What this worker saw, for checking that the master's totals add up.
        print("parley worker totals: " + json.dumps({"counts": summary, "requests": requests}))
        return
    print(
        "parley deliveries: {delivered} in order or late, {duplicated} duplicated, "
        "{reordered} reordered, {lost} lost, {unrecovered} skipped by resumes that did "
        "not recover".format(**summary)
    )
    prefix = options(environment).csv_prefix
    if prefix:
        # Locust rewrites its CSV files every second and not at exit: let it write the
        # figures as they are now that the run has drained.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)
        with open(f"{prefix}_parley.csv", "w") as out:
            out.write(",".join(summary) + "\n" + ",".join(str(v) for v in summary.values()) + "\n")
    if total.faults or total.unrecovered:
        print("parley: FAILED: deliveries were lost, duplicated, reordered or not recovered")
        environment.process_exit_code = options(environment).exit_code_on_error or 1


# --- load shapes: the p99 of a stretch of the run ----------------------------------------

Snapshot = dict[tuple[str, str], dict[int, int]]


def snapshot(environment: Environment) -> Snapshot:
    """Every entry's response-time histogram now, to diff against later."""
    return {key: dict(e.response_times) for key, e in environment.stats.entries.items()}


def worst_p99(environment: Environment, since: Snapshot, types: set[str]) -> tuple[int, str]:
    """The highest p99 among the entries of ``types`` over what they logged after
    ``since``, and which entry it was ("type name"); (0, "") if none logged enough.
    Entries with fewer than 100 samples in the window are left out: their p99 would be
    their maximum (a few joins of users that came late, say)."""
    worst, which = 0, ""
    for (name, method), entry in environment.stats.entries.items():
        if method not in types:
            continue
        before = since.get((name, method), {})
        window = {ms: n - before.get(ms, 0) for ms, n in entry.response_times.items()}
        count = sum(window.values())
        if count >= 100:
            p99 = calculate_response_time_percentile(window, count, 0.99)
            if p99 > worst:
                worst, which = p99, f"{method} {name}"
    return worst, which
