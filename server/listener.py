"""The client listener: accept TCP connections and run each one in the handler nursery.

Our own accept loop rather than ``trio.serve_listeners``: that one runs each handler
under two more coroutines of its own (``_run_handler`` and our handler closure), whose
frames stayed alive as long as each connection (0.5 KiB of an idle session).
``serve_connection`` is the connection's crash barrier and closes its stream itself.
The loop keeps trio's answer to running out of file descriptors or memory: log, wait
a little, accept again.
"""

import errno
import logging
import os

import trio

from actors.services import Services
from server.connection import Connection, serve_connection

log = logging.getLogger(__name__)

ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_RETRY = 0.1  # seconds


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{host}:{port}"


async def _accept_loop(
    listener: trio.SocketListener,
    services: Services,
    connections: set[Connection],
    handler_nursery: trio.Nursery,
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            log.error(
                "accept returned %s (%s); retrying in %s seconds",
                errno.errorcode[exc.errno],
                os.strerror(exc.errno),
                ACCEPT_RETRY,
            )
            await trio.sleep(ACCEPT_RETRY)
            continue
        handler_nursery.start_soon(serve_connection, stream, services, connections, _peer(stream))


async def serve_clients(
    services: Services,
    connections: set[Connection],
    listeners: list[trio.SocketListener],
    handler_nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept until cancelled; connections live on in ``handler_nursery``."""
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, services, connections, handler_nursery)
            task_status.started(listeners)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
