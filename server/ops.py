"""The operators' HTTP endpoint: liveness, readiness, metrics, and the admin API.

It is a quart-trio app served by hypercorn's trio worker inside the node's own trio
run, so handlers read node state directly and reach actors like sessions do.
"""

import logging
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response
from quart_trio import QuartTrio

from server.admin import admin_blueprint
from server.node import Node


def create_ops_app(node: Node) -> QuartTrio:
    app = QuartTrio("parley.ops")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        # Answering at all shows the event loop runs.
        return {"status": "OK"}

    @app.get("/readyz")
    async def readyz() -> tuple[dict[str, Any], int]:
        ready = node.readiness()
        body = {"status": ready.status, "reasons": list(ready.reasons), "checks": ready.checks}
        return body, ready.http_status

    @app.get("/metrics")
    async def metrics() -> Response:
        data = generate_latest(node.services.metrics.registry)
        return Response(data, content_type=CONTENT_TYPE_LATEST)

    app.register_blueprint(admin_blueprint(node))
    return app


async def serve_ops(
    node: Node, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the ops app until cancelled; reports the bound (host, port)."""
    config = HypercornConfig()
    host = node.config.ops_host
    config.bind = [
        f"[{host}]:{node.config.ops_port}" if ":" in host else f"{host}:{node.config.ops_port}"
    ]
    config.accesslog = None
    config.errorlog = logging.getLogger("parley.ops")
    config.graceful_timeout = 1.0

    async def started(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await hypercorn_serve(create_ops_app(node), config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(started)
        bound = binds[0].rsplit("//", 1)[-1]
        bound_host, _, bound_port = bound.rpartition(":")
        task_status.started((bound_host.strip("[]"), int(bound_port)))
