"""The ``parley`` command: serve, token, chat, migrate, bench."""

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import version
from typing import Any, NoReturn

import attrs
import trio

from protocol.client import TokenSource
from protocol.limits import is_room_id
from protocol.validate import ROOM_RULE
from server import collector
from server.chat import ChatError
from server.config import (
    DATABASE_POOL,
    DATABASE_URL,
    LOG_LEVEL,
    SERVE_OPTIONS,
    STATEMENT_TIMEOUT,
    Config,
    EnvError,
    Option,
    add_options,
    config_from_args,
    non_negative_int,
    positive_int,
)
from server.tokens import (
    dev_secrets_path,
    issue_token,
    load_dev_secrets,
    token_subject,
    token_verifier,
)
from storage.store import StorageConfigError, redact_url

log = logging.getLogger("parley")

DEFAULT_TTL = 24 * 3600
CHAT_TTL = 15 * 60  # chat refreshes its tokens, so they can be short-lived
CLIENT_SECRET = Option(
    "--secret",
    "HS256 key the server checks tokens with (32 bytes or more), written --secret=VALUE; "
    "unset: the one `serve --dev` keeps beside the database",
)
MIN_SECRET_BYTES = 32
MIN_ADMIN_TOKEN_CHARS = 16
NO_SECRET = (
    "no token secret: pass --secret (or PARLEY_SECRET), or --dev to generate one for development"
)


class UsageError(Exception):
    """Bad configuration: printed without a traceback, exit status 2."""


# What a builtin type's ValueError would say instead ("invalid literal for int() ...").
_MUST: dict[object, str] = {int: "must be an integer", float: "must be a number"}


def _checked(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """``kind`` whose ValueError becomes a message naming the value, so argparse never
    shows the function's name ("invalid _port value")."""

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError as exc:
            must = _MUST.get(kind) or str(exc)
            raise argparse.ArgumentTypeError(f"{must}, got {text!r}") from None

    return parse


class Parser(argparse.ArgumentParser):
    """Errors in one line (``parley serve: --port: must be ...``), not a usage dump."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        if callable(kwargs.get("type")):
            kwargs["type"] = _checked(kwargs["type"])
        return super().add_argument(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        for value in vars(parsed).values():
            if isinstance(value, EnvError):
                self.error(value.message)
        return parsed, rest

    def error(self, message: str) -> NoReturn:
        message = message.removeprefix("argument ")
        if message.endswith(": expected one argument"):
            flag = message.partition(":")[0].split("/")[-1]
            message += f" (write a value that starts with '-' as {flag}=VALUE)"
        self.exit(2, f"{self.prog}: {message}; see {self.prog} --help\n")


USAGE_ERRORS: tuple[type[Exception], ...] = (UsageError, StorageConfigError)
RUN_ERRORS: tuple[type[Exception], ...] = (ChatError, OSError)  # exit status 1


@attrs.frozen
class Secrets:
    secret: str
    admin_token: str | None


def resolve_secrets(
    secret: str | None, admin_token: str | None, database_url: str, *, dev: bool = False
) -> Secrets:
    """The signing secret and admin token: as given, else the development ones kept
    beside the database. Only ``serve --dev`` (``dev``) generates them."""
    path = dev_secrets_path(database_url)
    if secret is None or (dev and admin_token is None):
        if dev and not path.parent.is_dir():
            raise UsageError(f"directory {path.parent} for the database does not exist")
        kept = load_dev_secrets(path, create=dev)
        if kept is not None:
            if kept.created:
                log.warning("dev mode: generated secrets in %s", kept.path)
            secret = secret or kept.secret
            if dev:
                admin_token = admin_token or kept.admin_token
    if secret is None:
        raise UsageError(
            f"no token secret: pass --secret (or PARLEY_SECRET). `parley serve --dev` keeps "
            f"its secret beside its database ({path}): run this where the server runs, or "
            "pass the server's --database-url"
        )
    if admin_token is not None and len(admin_token) < MIN_ADMIN_TOKEN_CHARS:
        raise UsageError(f"the admin token must be at least {MIN_ADMIN_TOKEN_CHARS} characters")
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise UsageError(
            f"the token secret must be at least {MIN_SECRET_BYTES} bytes (RFC 7518 for HS256); "
            "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return Secrets(secret, admin_token)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# --- commands -----------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from actors.session import frame_cost
    from server.node import serve

    config: Config = config_from_args(args)
    if args.worker is not None:
        _worker_setup(args.worker, pin=config.pin_workers)
    sqlite = config.database_url.lower().startswith("sqlite")
    if config.workers > 1 and (config.redis_url is None or sqlite):
        raise UsageError(
            f"--workers {config.workers}: the workers are nodes of one cluster, sharing Redis "
            "and a PostgreSQL database; give --redis-url redis://... and --database-url "
            "postgresql://..., or --workers 1"
        )
    if config.redis_url and sqlite:
        raise UsageError(
            "--redis-url: a cluster shares one PostgreSQL database; SQLite serves a single "
            "node. Give --database-url postgresql://..., or unset --redis-url"
        )
    if not config.dev and config.secret is None:
        raise UsageError(NO_SECRET)  # serve never falls back to the kept dev secret
    largest = frame_cost(config.max_frame_bytes)
    if config.burst < largest:
        raise UsageError(
            f"--burst {config.burst} is below the {largest} rate tokens a frame of "
            f"--max-frame-bytes takes (one, and one per full 4 KiB): such frames would "
            f"never pass; raise --burst or lower --max-frame-bytes"
        )
    secrets = resolve_secrets(
        config.secret, config.admin_token, config.database_url, dev=config.dev
    )
    if not config.dev and secrets.admin_token is None and args.worker is None:
        log.info("admin API off (no --admin-token)")
    if config.workers > 1 and args.worker is None:
        from server.workers import run_workers

        resolved = attrs.evolve(config, secret=secrets.secret, admin_token=secrets.admin_token)
        return trio.run(run_workers, resolved)
    collector.install()
    verifier = token_verifier(secrets.secret, require_exp=not config.allow_tokens_without_exp)
    trio.run(functools.partial(serve, config, verifier, secrets.admin_token, worker=args.worker))
    return 0


def _worker_setup(index: int, *, pin: bool) -> None:
    """A worker of ``serve --workers`` (server/workers.py) says which in every log line."""
    from server.workers import pin_to_cpu

    prefix = logging.Formatter(f"%(asctime)s %(levelname)-7s w{index} %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(prefix)
    if pin:
        log.info("pinned to CPU %d", pin_to_cpu(index))


def cmd_token(args: argparse.Namespace) -> int:
    secrets = resolve_secrets(args.secret, None, args.database_url)
    try:
        print(issue_token(secrets.secret, args.user, args.ttl))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from server.chat import run_chat

    if not is_room_id(args.room):
        raise UsageError(f"--room: a room id is {ROOM_RULE}")
    if not args.url.startswith(("ws://", "wss://")):
        raise UsageError(f"--url {args.url!r}: a WebSocket URL, like ws://127.0.0.1:8080/ws")
    token = args.token
    if token is not None:
        owner = token_subject(token)
        if owner is None:
            raise UsageError("--token is not a session token (make one with parley token USER)")
        if owner != args.user:
            raise UsageError(
                f"--token is {owner}'s token, not {args.user}'s: pass --user {owner}, or a "
                f"token made for {args.user}"
            )
        source: str | TokenSource = token
    else:
        # With the secret, chat makes its own short-lived tokens and refreshes them.
        secrets = resolve_secrets(args.secret, None, args.database_url)
        try:
            issue_token(secrets.secret, args.user, CHAT_TTL)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

        async def new_token() -> str:
            return issue_token(secrets.secret, args.user, CHAT_TTL)

        source = new_token
    return trio.run(
        lambda: run_chat(
            args.url, source, args.user, args.room, private=args.private, history=args.history
        )
    )


def cmd_migrate(args: argparse.Namespace) -> int:
    from storage.store import open_store

    async def migrate() -> None:
        async with open_store(
            args.database_url,
            pool_size=args.database_pool,
            statement_timeout=args.statement_timeout,
        ):
            pass

    trio.run(migrate)
    print(f"{redact_url(args.database_url)}: schema is up to date")
    return 0


# --- parser -------------------------------------------------------------------------


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = Parser(
        prog="parley",
        description="Parley: a realtime chat server (WebSocket + CBOR) on Trio.",
        epilog="An option whose help shows a PARLEY_* variable can also be set with it; "
        "the flag wins.",
    )
    parser.add_argument("--version", action="version", version=f"parley {version('parley')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run a node",
        description="Run a Parley node: clients on ws://HOST:PORT/ws, operators on "
        "http://OPS_HOST:OPS_PORT (/healthz /readyz /metrics /admin). SIGTERM drains.",
    )
    add_options(serve, SERVE_OPTIONS, environ)
    # A worker of --workers: set by its supervisor only (server/workers.py).
    serve.add_argument("--worker", type=non_negative_int, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser(
        "token",
        help="print a session token for a user",
        description="Print a signed session token (JWT, HS256) for USER, with the secret "
        "given, or the one `parley serve --dev` keeps beside its database.",
    )
    token.add_argument("user", help="user id: 1-64 of A-Z a-z 0-9 _ . @ + = ~ -")
    token.add_argument(
        "--ttl",
        type=positive_int,
        default=DEFAULT_TTL,
        help=f"lifetime in seconds [default {DEFAULT_TTL}]",
    )
    add_options(token, (CLIENT_SECRET, DATABASE_URL, LOG_LEVEL), environ)
    token.set_defaults(func=cmd_token)

    chat = sub.add_parser(
        "chat",
        help="chat in a room from the terminal",
        description="Join (or create) ROOM as USER, print what is said as [seq] user: text, "
        "send each line typed. Reconnects and resumes by itself; Ctrl-D quits.",
    )
    chat.add_argument("--user", required=True, help="who you are")
    chat.add_argument("--room", required=True, help="room to join; created if missing")
    chat.add_argument("--private", action="store_true", help="create the room as private")
    chat.add_argument(
        "--history",
        type=non_negative_int,
        default=20,
        help="messages to show on entry [default 20]",
    )
    chat.add_argument("--token", help="session token for --user [default: made with the secret]")
    env = {} if environ is None else environ
    chat.add_argument(
        "--url",
        default=env.get("PARLEY_URL", "ws://127.0.0.1:8080/ws"),
        help="server WebSocket URL [env PARLEY_URL; default 'ws://127.0.0.1:8080/ws']",
    )
    add_options(chat, (CLIENT_SECRET, DATABASE_URL, LOG_LEVEL), environ)
    chat.set_defaults(func=cmd_chat)

    migrate = sub.add_parser(
        "migrate",
        help="apply database migrations and exit",
        description="Apply pending schema migrations (serve also does it at start).",
    )
    add_options(migrate, (DATABASE_URL, DATABASE_POOL, STATEMENT_TIMEOUT, LOG_LEVEL), environ)
    migrate.set_defaults(func=cmd_migrate)

    from loadtests.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(dict(os.environ))
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "log_level", "info"))
    try:
        code: int = args.func(args)
    except BaseException as exc:
        # Trio may wrap these in exception groups; what the user needs is one line.
        leaves = list(_leaves(exc))
        if all(isinstance(e, KeyboardInterrupt) for e in leaves):
            return 130
        if not all(isinstance(e, (*USAGE_ERRORS, *RUN_ERRORS)) for e in leaves):
            raise
        for leaf in dict.fromkeys(str(e) for e in leaves):
            print(f"parley {args.command}: {leaf}", file=sys.stderr)
        log.debug("details", exc_info=exc)
        return 2 if any(isinstance(e, USAGE_ERRORS) for e in leaves) else 1
    return code


if __name__ == "__main__":
    sys.exit(main())
