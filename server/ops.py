"""The operators' HTTP endpoint: liveness, readiness, metrics, and the admin API.

It is a quart-trio app served by hypercorn's trio worker inside the node's own trio
run, so handlers read node state directly and reach actors like sessions do.
"""

import json
import logging
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, has_request_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from protocol.errors import ErrorCode, sole_exception
from server.admin import MAX_BODY_BYTES, admin_blueprint, error_body
from server.node import Node
from server.openapi import openapi_document

log = logging.getLogger("parley.ops")


def create_ops_app(node: Node) -> QuartTrio:
    app = http_app("parley.ops")
    document = openapi_document(node.services.settings.limits)

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

    @app.get("/openapi.json")
    async def openapi() -> dict[str, Any]:
        return document

    app.register_blueprint(admin_blueprint(node))
    return app


def ops_url(address: tuple[str, int]) -> str:
    """Where ``serve_http`` serves, for the log."""
    host, port = address
    return host if host.startswith("unix:") else f"http://{host}:{port}"


def http_app(name: str) -> QuartTrio:
    """An app that reads bodies first and answers every error in the error shape."""
    app = QuartTrio(name, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES  # larger bodies: 413, never read

    @app.before_request
    async def read_body() -> None:
        # Hypercorn 0.18 leaves a kept-alive connection hanging, neither answered nor
        # closed, when a response goes out before the request's body has arrived (a 401,
        # a 404, or a GET that ignores its body): the body is read first, everywhere.
        await request.get_data()

    @app.errorhandler(404)
    async def not_found(_: Exception) -> tuple[dict[str, Any], int]:
        path = request.path if has_request_context() else websocket.path
        return error_body(ErrorCode.NOT_FOUND, f"no such endpoint: {path[:200]}"), 404

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        """Every other refusal of the HTTP layer (405, 413, 400 ...) in the error shape."""
        status = exc.code or 400
        code = ErrorCode.TOO_LARGE if status == 413 else ErrorCode.INVALID
        message = exc.description or exc.name
        if status == 405:
            message = f"{request.method} is not allowed on {request.path[:200]}"
        elif status == 413:
            message = f"the body is larger than {MAX_BODY_BYTES} bytes"
        body = Response(
            json.dumps(error_body(code, message)), status=status, content_type="application/json"
        )
        if "Allow" in (headers := exc.get_response().headers):  # a 405 says what is allowed
            body.headers["Allow"] = headers["Allow"]
        if status == 413:
            # The rest of the body stays unread, so the client must not send another
            # request on this connection (and hypercorn will not close it by itself).
            body.headers["Connection"] = "close"
        return body

    @app.errorhandler(Exception)
    async def fault(exc: Exception) -> tuple[dict[str, Any], int]:
        # A bug of ours: logged with its traceback, answered in the error shape.
        log.error("%s %s failed", request.method, request.path[:200], exc_info=exc)
        return error_body(ErrorCode.INTERNAL, "internal error; the node's log has details"), 500

    return app


async def serve_ops(
    node: Node, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the ops app until cancelled; reports the bound (host, port)."""
    app = create_ops_app(node)
    await serve_http(app, node.config.ops_host, node.config.ops_port, task_status=task_status)


async def serve_http(
    app: QuartTrio,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the operators' address until cancelled; reports the bound
    (host, port), or ("unix:PATH", 0) for a Unix socket (a ``host`` of ``unix:PATH``)."""
    config = HypercornConfig()
    if host.startswith("unix:"):
        config.bind = [host]
    else:
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    # Hypercorn's own start-up line ("Running on ... CTRL + C to quit") would repeat ours
    # and give the wrong advice; its warnings and errors still show.
    config.errorlog = logging.getLogger("parley.ops.hypercorn")
    config.errorlog.setLevel(max(logging.WARNING, logging.getLogger().level))
    config.graceful_timeout = 1.0

    async def started(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await hypercorn_serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        try:
            with sole_exception():
                binds: list[str] = await nursery.start(started)
        except OSError as exc:
            where = host if host.startswith("unix:") else f"{host}:{port}"
            raise OSError(
                f"cannot listen for operators on {where}: {exc.strerror}; another port: "
                "--ops-port N (or PARLEY_OPS_PORT)"
            ) from exc
        bound = binds[0].rsplit("//", 1)[-1]
        if bound.startswith("unix:"):
            task_status.started((bound, 0))
        else:
            bound_host, _, bound_port = bound.rpartition(":")
            task_status.started((bound_host.strip("[]"), int(bound_port)))
