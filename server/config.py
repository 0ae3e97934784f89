"""Node configuration: every option is a command-line flag and a ``PARLEY_*`` variable.

A flag beats the environment, which beats the default. ``OPTIONS`` is the one table
of them; ``parley serve --help`` prints it, README.md points at that.
"""

import argparse
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from actors.kvmap import KvQuota
from actors.quotas import QuotaSettings
from actors.services import Settings
from protocol.limits import MAX_CATEGORY_CHARS, Limits
from storage.store import StorageConfigError, check_database_url

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


@attrs.frozen
class Option:
    """A flag of ``Config``'s field of the same name, which holds its default."""

    flag: str
    help: str
    type: Callable[[str], Any] = str
    choices: Sequence[str] | None = None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def default(self) -> Any:
        return attrs.fields_dict(Config)[self.dest].default

    @property
    def env(self) -> str:
        return "PARLEY_" + self.dest.upper()


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"must be one of {', '.join(sorted(TRUE | FALSE - {''}))}")


# A type function raises ValueError saying what the value must be, without the value:
# the flag's error adds "got 'VALUE'", the variable's error starts with VAR='VALUE'.


def _integer(text: str, low: int, high: int | None, must: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(must) from None
    if value < low or (high is not None and value > high):
        raise ValueError(must)
    return value


def _number(text: str, low: float, *, strict: bool, must: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(must) from None
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ValueError(must)
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1, None, "must be a positive integer")


def non_negative_int(text: str) -> int:
    return _integer(text, 0, None, "must be an integer 0 or more")


def _positive_float(text: str) -> float:
    return _number(text, 0, strict=True, must="must be a positive number")


def _non_negative_float(text: str) -> float:
    return _number(text, 0, strict=False, must="must be a number 0 or more")


def _categories(text: str) -> str:
    names = [name.strip() for name in text.split(",")]
    if not all(0 < len(n) <= MAX_CATEGORY_CHARS and n.isprintable() for n in names):
        raise argparse.ArgumentTypeError(
            f"must be names of 1-{MAX_CATEGORY_CHARS} printable characters, comma-separated"
        )
    return ",".join(dict.fromkeys(names))


def _unset_if_empty(text: str) -> str | None:
    # PARLEY_ADMIN_TOKEN= must switch the admin API off, not accept an empty token.
    return text or None


def _port(text: str) -> int:
    return _integer(text, 0, 65535, "must be an integer 0-65535")


def _database_url(text: str) -> str:
    try:
        check_database_url(text)
    except StorageConfigError as exc:
        # Complete already, and shows the URL without its password.
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


_d = Settings()
_l = Limits()
_q = KvQuota()
_quota = QuotaSettings()

# Options shared by ``serve``, ``token``, ``chat`` and ``migrate``.
DATABASE_URL = Option(
    "--database-url",
    "where messages are stored: sqlite:///relative.db, sqlite:////absolute.db or "
    "postgresql://user:password@host:5432/database",
    _database_url,
)
DATABASE_POOL = Option(
    "--database-pool", "PostgreSQL connections this node keeps at most", positive_int
)
STATEMENT_TIMEOUT = Option(
    "--statement-timeout",
    "seconds a PostgreSQL statement (or getting a connection) may take before it fails",
    _positive_float,
)
SECRET = Option(
    "--secret",
    "HS256 key that signs session tokens, 32 bytes or more; write it --secret=VALUE, so "
    "that one starting with '-' is not taken for an option (required unless --dev)",
    _unset_if_empty,
)
DEV = Option(
    "--dev",
    "development mode: generate the secret and admin token if not given and keep them in "
    "parley-dev.json beside the database",
    _bool,
)
LOG_LEVEL = Option(
    "--log-level",
    "log verbosity",
    str.lower,
    ("debug", "info", "warning", "error"),
)

SERVE_OPTIONS: tuple[Option, ...] = (
    Option("--host", "address clients connect to"),
    Option("--port", "port of the client WebSocket endpoint (path /ws)", _port),
    Option(
        "--ops-host",
        "address of the operators' HTTP endpoint (unix:/path for a Unix socket, which "
        "ignores --ops-port)",
    ),
    Option("--ops-port", "port of /healthz, /readyz, /metrics and /admin", _port),
    DATABASE_URL,
    DATABASE_POOL,
    STATEMENT_TIMEOUT,
    Option(
        "--redis-url",
        "Redis URL (redis://[:password@]host[:port][/db] or unix:///path): run as one node "
        "of a cluster sharing this Redis and a PostgreSQL database (unset: a single node)",
        _unset_if_empty,
    ),
    Option(
        "--cluster-lease",
        "seconds a node owns its actors without renewing; a dead node's are taken over "
        "after this long",
        _positive_float,
    ),
    Option(
        "--workers",
        "node processes on this machine, sharing --port (SO_REUSEPORT: the kernel spreads "
        "connections) behind one ops endpoint; more than 1 runs them as a cluster, so it "
        "needs --redis-url and a PostgreSQL --database-url. Limits like --max-connections "
        "are per worker",
        positive_int,
    ),
    Option("--pin-workers", "pin worker i to CPU i (modulo the CPUs available)", _bool),
    SECRET,
    Option(
        "--allow-tokens-without-exp",
        "accept session tokens that have no exp claim (they never expire); off: refused",
        _bool,
    ),
    Option(
        "--admin-token",
        "bearer token for the admin API, 16 characters or more (unset or empty: admin API off)",
        _unset_if_empty,
    ),
    DEV,
    LOG_LEVEL,
    Option(
        "--max-connections",
        "client connections open at once, handshakes included; beyond, a new one is "
        "answered 503 and closed. Leave room under the open-file limit (ulimit -n) for "
        "the database, the ops endpoint and logs",
        positive_int,
    ),
    Option(
        "--max-connections-per-address",
        "client connections open at once from one IP address; beyond, a new one is "
        "answered 429 and closed (0: no limit; behind a proxy every client has the "
        "proxy's address)",
        non_negative_int,
    ),
    Option("--max-frame-bytes", "largest client frame", positive_int),
    Option("--max-text-chars", "longest message text", positive_int),
    Option("--max-data-bytes", "largest message data map, encoded", positive_int),
    Option("--max-rooms-per-session", "rooms one session may subscribe to", positive_int),
    Option("--max-history-limit", "largest history page", positive_int),
    Option("--rate", "frames per second a session may send, sustained", _positive_float),
    Option("--burst", "frames a session may send at once", positive_int),
    Option(
        "--outbox-bytes",
        "bytes queued for one client before it is closed as a slow consumer (4005)",
        positive_int,
    ),
    Option("--ping-interval", "seconds of client silence before a ping", _positive_float),
    Option(
        "--pong-timeout",
        "seconds to answer a ping before the session is closed (4004)",
        _positive_float,
    ),
    Option("--hello-timeout", "seconds to authenticate after connecting (4003)", _positive_float),
    Option(
        "--frame-timeout",
        "seconds a client frame, or a fragmented message, may take to arrive in full from "
        "its first byte before the session is closed (4004)",
        _positive_float,
    ),
    Option("--history-buffer", "recent messages each active room keeps in memory", positive_int),
    Option(
        "--large-room",
        "rooms with more members than this tell joins and leaves only to the member "
        "concerned, publish an online count instead of members' presence, and receipt "
        "counts instead of members' receipts",
        positive_int,
    ),
    Option(
        "--receipt-interval",
        "seconds over which a room coalesces receipts and online counts into one event",
        _positive_float,
    ),
    Option(
        "--receipt-store-interval",
        "seconds over which a room gathers moved receipt cursors into one store",
        _positive_float,
    ),
    Option(
        "--typing-timeout",
        "seconds after which a typing start that was not refreshed ends",
        _positive_float,
    ),
    Option(
        "--presence-grace",
        "seconds after a user's last session closes before they are announced offline",
        _non_negative_float,
    ),
    Option("--max-watches", "users one session may watch explicitly", positive_int),
    Option(
        "--max-sessions-per-user",
        "sessions one user may have open at once; a hello beyond gets error 210 and close "
        "4008 (0: no limit)",
        non_negative_int,
    ),
    Option(
        "--room-creations-per-hour",
        "rooms one user may create per hour, sustained (create, and direct with someone "
        "new); beyond, error 210",
        _positive_float,
    ),
    Option("--room-creation-burst", "rooms one user may create at once", positive_int),
    Option(
        "--rooms-per-minute",
        "distinct rooms one user may name in requests per minute, over all their sessions "
        "and reconnects; beyond, error 210",
        positive_int,
    ),
    Option("--max-blocks-per-user", "users one user may block; beyond, error 210", positive_int),
    Option("--kv-key-bytes", "longest kv key, in UTF-8 bytes", positive_int),
    Option("--kv-value-bytes", "largest kv value, CBOR-encoded", positive_int),
    Option("--kv-batch", "most writes in one kvput frame", positive_int),
    Option("--kv-max-keys", "kv keys one user may hold (quota)", positive_int),
    Option("--kv-max-bytes", "bytes of kv keys and values one user may hold (quota)", positive_int),
    Option(
        "--kv-clock-skew",
        "seconds a kv write's clock may run ahead of the server's before it is refused",
        _positive_float,
    ),
    Option(
        "--kv-tombstone-ttl",
        "seconds a kv deletion is remembered; a device offline longer resyncs in full",
        _positive_float,
    ),
    Option(
        "--kv-max-tombstones",
        "kv deletions remembered per user; beyond, the oldest are forgotten once older "
        "than --kv-tombstone-min-age",
        positive_int,
    ),
    Option(
        "--kv-tombstone-min-age",
        "seconds a kv deletion is remembered whatever the count (a sync listing must "
        "take less than this)",
        _non_negative_float,
    ),
    Option(
        "--feed-categories",
        "the categories feed posts and interests may name, comma-separated",
        _categories,
    ),
    Option(
        "--feed-interval",
        "seconds between two feedchanged events of one feed view (coalescing)",
        _positive_float,
    ),
    Option(
        "--feed-step",
        "seconds the feed ranking instant advances by (freshness is computed at it)",
        _positive_float,
    ),
    Option(
        "--feed-horizon",
        "seconds a post stays in the live feed shards; older posts stay in storage only",
        _positive_float,
    ),
    Option("--max-follows", "authors one user may follow; beyond, error 210", positive_int),
    Option(
        "--max-replay",
        "most messages a resume replays; beyond it the client refetches",
        positive_int,
    ),
    Option(
        "--ack-mode",
        "durable: sent-ack after the message is stored; sequenced: as soon as it has "
        "a seq (faster, but an ack may be lost with the process)",
        str,
        ("durable", "sequenced"),
    ),
    Option(
        "--write-queue-records",
        "records the write-behind queue holds before sends get TRY_LATER",
        positive_int,
    ),
    Option("--write-queue-bytes", "bytes the write-behind queue holds", positive_int),
    Option("--write-batch", "most records stored in one transaction", positive_int),
    Option("--actor-idle", "seconds before an idle room or user actor stops", _positive_float),
    Option(
        "--storage-probe-interval",
        "seconds between storage health checks while idle (0: off)",
        _non_negative_float,
    ),
    Option(
        "--drain-timeout",
        "seconds SIGTERM waits for storage and clients before exiting",
        _positive_float,
    ),
    Option(
        "--gc-sweep-interval",
        "seconds between full garbage-collector passes, one pause that walks every "
        "object (0: none; a pass over new objects after every million still runs)",
        _non_negative_float,
    ),
)


@attrs.frozen(kw_only=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 8080
    ops_host: str = "127.0.0.1"
    ops_port: int = 9090
    database_url: str = "sqlite:///parley.db"
    database_pool: int = 10
    statement_timeout: float = 5.0
    redis_url: str | None = None
    cluster_lease: float = 5.0
    workers: int = 1
    pin_workers: bool = False
    secret: str | None = None
    admin_token: str | None = None
    allow_tokens_without_exp: bool = False
    dev: bool = False
    log_level: str = "info"
    # 20,000 open files per process here: 1,000 left for the database pool, the ops
    # endpoint, logs, listeners and sockets being refused.
    max_connections: int = 19_000
    max_connections_per_address: int = 1000
    max_frame_bytes: int = _l.max_frame_bytes
    max_text_chars: int = _l.max_text_chars
    max_data_bytes: int = _l.max_data_bytes
    max_rooms_per_session: int = _l.max_rooms_per_session
    max_history_limit: int = _l.max_history_limit
    rate: float = _d.rate
    burst: int = _d.burst
    outbox_bytes: int = _d.outbox_bytes
    ping_interval: float = _d.ping_interval
    pong_timeout: float = _d.pong_timeout
    hello_timeout: float = _d.hello_timeout
    frame_timeout: float = _d.frame_timeout
    history_buffer: int = _d.history_buffer
    max_replay: int = _d.max_replay
    large_room: int = _d.large_room
    receipt_interval: float = _d.receipt_interval
    receipt_store_interval: float = _d.receipt_store_interval
    typing_timeout: float = _d.typing_timeout
    presence_grace: float = _d.presence_grace
    max_watches: int = _d.max_watches
    max_sessions_per_user: int = _quota.max_sessions_per_user
    room_creations_per_hour: float = _quota.room_creations_per_hour
    room_creation_burst: int = _quota.room_creation_burst
    rooms_per_minute: int = _quota.rooms_per_minute
    max_blocks_per_user: int = _quota.max_blocks_per_user
    kv_key_bytes: int = _l.kv_key_bytes
    kv_value_bytes: int = _l.kv_value_bytes
    kv_batch: int = _l.kv_batch
    kv_max_keys: int = _q.max_keys
    kv_max_bytes: int = _q.max_bytes
    kv_clock_skew: float = _q.max_skew_ms / 1000
    kv_tombstone_ttl: float = _q.tombstone_ttl_ms / 1000
    kv_max_tombstones: int = _q.max_tombstones
    kv_tombstone_min_age: float = _q.min_tombstone_age_ms / 1000
    feed_categories: str = ",".join(_l.categories)
    feed_interval: float = _d.feed_interval
    feed_step: float = _d.feed_step_ms / 1000
    feed_horizon: float = _d.feed_horizon
    max_follows: int = _d.max_follows
    ack_mode: str = "durable"
    write_queue_records: int = 100_000
    write_queue_bytes: int = 64 * 2**20
    write_batch: int = 5000
    actor_idle: float = _d.actor_idle
    storage_probe_interval: float = 5.0
    gc_sweep_interval: float = 3600.0
    drain_timeout: float = 10.0

    def settings(self) -> Settings:
        limits = Limits(
            max_frame_bytes=self.max_frame_bytes,
            max_text_chars=self.max_text_chars,
            max_data_bytes=self.max_data_bytes,
            max_rooms_per_session=self.max_rooms_per_session,
            max_history_limit=self.max_history_limit,
            default_history_limit=min(_l.default_history_limit, self.max_history_limit),
            kv_key_bytes=self.kv_key_bytes,
            kv_value_bytes=self.kv_value_bytes,
            kv_batch=self.kv_batch,
            categories=tuple(self.feed_categories.split(",")),
        )
        quota = KvQuota(
            max_keys=self.kv_max_keys,
            max_bytes=self.kv_max_bytes,
            max_skew_ms=round(self.kv_clock_skew * 1000),
            tombstone_ttl_ms=round(self.kv_tombstone_ttl * 1000),
            max_tombstones=self.kv_max_tombstones,
            min_tombstone_age_ms=round(self.kv_tombstone_min_age * 1000),
        )
        return Settings(
            limits=limits,
            history_buffer=self.history_buffer,
            max_replay=self.max_replay,
            large_room=self.large_room,
            receipt_interval=self.receipt_interval,
            receipt_store_interval=self.receipt_store_interval,
            typing_timeout=self.typing_timeout,
            presence_grace=self.presence_grace,
            max_watches=self.max_watches,
            quotas=QuotaSettings(
                max_sessions_per_user=self.max_sessions_per_user,
                room_creations_per_hour=self.room_creations_per_hour,
                room_creation_burst=self.room_creation_burst,
                rooms_per_minute=self.rooms_per_minute,
                max_blocks_per_user=self.max_blocks_per_user,
            ),
            kv_quota=quota,
            feed_interval=self.feed_interval,
            feed_step_ms=max(1, round(self.feed_step * 1000)),
            feed_horizon=self.feed_horizon,
            max_follows=self.max_follows,
            actor_idle=self.actor_idle,
            durable_acks=self.ack_mode == "durable",
            ping_interval=self.ping_interval,
            pong_timeout=self.pong_timeout,
            hello_timeout=self.hello_timeout,
            frame_timeout=self.frame_timeout,
            outbox_bytes=self.outbox_bytes,
            rate=self.rate,
            burst=self.burst,
        )


@attrs.frozen
class EnvError:
    """The default of a flag whose ``PARLEY_*`` variable is wrong: an error only if the
    command runs without the flag (which wins), reported by the command's parser."""

    message: str


def add_options(
    parser: argparse.ArgumentParser,
    options: Sequence[Option],
    environ: dict[str, str] | None = None,
) -> None:
    """Add ``options`` as flags whose defaults come from the environment."""
    env = os.environ if environ is None else environ
    for opt in options:
        default = opt.default
        if opt.env in env:
            default = _from_env(opt, env[opt.env])
        shown = "unset" if opt.default is None else repr(opt.default)
        help_text = f"{opt.help} [env {opt.env}; default {shown}]"
        if opt.type is _bool:
            parser.add_argument(
                opt.flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            parser.add_argument(
                opt.flag,
                type=opt.type,
                default=default,
                choices=opt.choices,
                help=help_text,
                metavar=None if opt.choices else opt.dest.upper(),
            )


def _from_env(opt: Option, text: str) -> Any:
    try:
        value = opt.type(text)
    except argparse.ArgumentTypeError as exc:
        return EnvError(f"{opt.env}: {exc}")
    except ValueError as exc:
        return EnvError(f"{opt.env}={text!r}: {exc}")
    if opt.choices and value not in opt.choices:
        return EnvError(f"{opt.env}={text!r}: choose from {', '.join(opt.choices)}")
    return value


def config_from_args(args: argparse.Namespace) -> Config:
    fields = {f.name for f in attrs.fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in fields})
