"""The client listener: accept TCP connections and run each one in the handler nursery."""

import logging

import trio

from actors.services import Services
from server.connection import Connection, serve_connection

log = logging.getLogger(__name__)


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{host}:{port}"


async def serve_clients(
    services: Services,
    connections: set[Connection],
    listeners: list[trio.SocketListener],
    handler_nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept until cancelled; connections live on in ``handler_nursery``."""

    async def handle(stream: trio.SocketStream) -> None:
        await serve_connection(stream, services, connections, _peer(stream))

    try:
        await trio.serve_listeners(
            handle, listeners, handler_nursery=handler_nursery, task_status=task_status
        )
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
