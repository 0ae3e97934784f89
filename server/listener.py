"""The client listener: accept TCP connections and run each one in the handler nursery.

Our own accept loop rather than ``trio.serve_listeners``: that one runs each handler
under two more coroutines of its own (``_run_handler`` and our handler closure), whose
frames stayed alive as long as each connection (0.5 KiB of an idle session).
``serve_connection`` is the connection's crash barrier and closes its stream itself.

Limits (``Admission``): a connection over ``--max-connections`` or
``--max-connections-per-address`` is answered at once, 503 or 429, and closed, before
anything is read from it: no task, no handshake, and its descriptor is free again
straight away. When accept itself fails for want of descriptors or memory, the loop
waits and accepts again, backing off, and logs once per episode.
"""

import errno
import logging
import os

import trio

from actors.services import Services
from protocol.wsserver import http_response
from server.connection import Admission, Connection, serve_connection

log = logging.getLogger(__name__)

ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_RETRY = 0.1  # seconds: the first wait after a failed accept, doubled after each
ACCEPT_RETRY_MAX = 1.0
# Named once: else trio formats the name anew for every connection (84 B it keeps).
TASK_NAME = f"{serve_connection.__module__}.{serve_connection.__qualname__}"
RETRY_AFTER = "10"  # seconds, told to refused clients
REFUSALS = {
    "max_connections": http_response(
        503, "the server is full; try again later\n", [("retry-after", RETRY_AFTER)]
    ),
    "per_address": http_response(
        429, "too many connections from your address\n", [("retry-after", RETRY_AFTER)]
    ),
}


def accept_backoff(pause: float) -> float:
    """The wait after a failed accept, given the previous one (0: none failed yet)."""
    return min(pause * 2, ACCEPT_RETRY_MAX) if pause else ACCEPT_RETRY


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{host}:{port}"


def _refuse(stream: trio.SocketStream, answer: bytes) -> None:
    sock = stream.socket
    try:
        # A fresh socket's send buffer takes these few bytes at once: no wait.
        os.write(sock.fileno(), answer)
    except OSError:
        pass  # gone already
    sock.close()


async def _accept_loop(
    listener: trio.SocketListener,
    services: Services,
    connections: set[Connection],
    handler_nursery: trio.Nursery,
    admission: Admission,
) -> None:
    metrics = services.metrics
    pause = 0.0
    failed = 0  # accepts failed in a row
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            name = errno.errorcode[exc.errno]
            metrics.accept_errors.labels(errno=name).inc()
            if not failed:
                log.error(
                    "accept failed: %s (%s); retrying with backoff (up to %s s), "
                    "logged again once it recovers",
                    name,
                    os.strerror(exc.errno),
                    ACCEPT_RETRY_MAX,
                )
            failed += 1
            pause = accept_backoff(pause)
            await trio.sleep(pause)
            continue
        if failed:
            log.warning("accept recovered after %d failed attempts", failed)
            failed, pause = 0, 0.0
        peer = _peer(stream)
        refused = admission.admit(peer)
        if refused is None:
            handler_nursery.start_soon(
                serve_connection, stream, services, connections, peer, admission, name=TASK_NAME
            )
        else:
            metrics.refused_by[refused].inc()
            _refuse(stream, REFUSALS[refused])


async def serve_clients(
    services: Services,
    connections: set[Connection],
    listeners: list[trio.SocketListener],
    handler_nursery: trio.Nursery,
    admission: Admission,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept until cancelled; connections live on in ``handler_nursery``."""
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(
                    _accept_loop, listener, services, connections, handler_nursery, admission
                )
            task_status.started(listeners)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
