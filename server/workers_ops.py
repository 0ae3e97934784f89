"""The operators' endpoint of a ``--workers`` machine: one address for all its workers.

The supervisor serves it (``--ops-host``/``--ops-port``) and answers from its workers'
own ops endpoints, which listen on Unix sockets in a private folder. Every call to a
worker is bounded (``WORKER_TIMEOUT``, ``ADMIN_TIMEOUT``); a worker that does not answer
in time is reported as such, never waited for, and the workers are asked at once.

- ``/healthz``: 200 when the supervisor answers and every worker runs and answers its
  own ``/healthz``; 503 naming those that do not.
- ``/readyz``: the workers' readiness combined: Failed if any is Failed, not running or
  unreachable; Degraded if any is Degraded; each reason prefixed with ``worker I:``, and
  each worker's pid, restarts, status and checks under ``checks.workers``.
- ``/metrics``: every worker's samples with a ``worker="I"`` label, families merged (the
  text format wants a family's samples together), and the supervisor's own gauges:
  workers running, each worker's pid, restarts, and whether its metrics were read.
- ``/admin/...`` and ``/openapi.json``: proxied to one running worker, taking turns;
  any node of a cluster answers admin requests, and the worker checks the token. A
  worker that refuses the connection is skipped for the next; one that took the request
  and did not answer gets 504, since a retry elsewhere could do the work twice.
"""

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import httpx
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from quart import Response, request
from quart_trio import QuartTrio

from protocol.errors import ErrorCode
from server.admin import error_body
from server.ops import http_app

if TYPE_CHECKING:
    from server.workers import Supervisor, Worker

logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request to a worker

WORKER_TIMEOUT = 2.0  # seconds for a worker's /healthz, /readyz or /metrics
ADMIN_TIMEOUT = 15.0  # beyond a worker's own 10 s wait for an actor's answer
PROXIED_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]
HEADERS_IN = {"authorization", "content-type", "accept"}
HEADERS_OUT = {"content-type", "www-authenticate", "allow", "retry-after"}


class Unreachable(Exception):
    """A worker that did not answer; ``sent`` if the request may have reached it."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


async def ask(
    worker: "Worker",
    method: str,
    target: str,
    *,
    seconds: float,
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
) -> httpx.Response:
    """One request to a worker's ops endpoint, answered within ``seconds``."""
    if not worker.running:
        raise Unreachable("not running (restarting)", sent=False)
    transport = httpx.AsyncHTTPTransport(uds=worker.ops.removeprefix("unix:"))
    try:
        with trio.fail_after(seconds):
            async with httpx.AsyncClient(
                transport=transport, base_url="http://worker", timeout=seconds
            ) as client:
                return await client.request(method, target, headers=headers, content=content)
    except trio.TooSlowError:
        raise Unreachable(f"no answer in {seconds:g} s", sent=True) from None
    except httpx.ConnectError as exc:
        raise Unreachable(f"refused the connection ({exc})", sent=False) from exc
    except httpx.HTTPError as exc:
        raise Unreachable(f"{type(exc).__name__}: {exc}", sent=True) from exc


async def ask_all(
    workers: Iterable["Worker"], target: str
) -> dict[int, httpx.Response | Unreachable]:
    """``GET target`` from every worker at once."""
    answers: dict[int, httpx.Response | Unreachable] = {}

    async def one(worker: "Worker") -> None:
        try:
            answers[worker.index] = await ask(worker, "GET", target, seconds=WORKER_TIMEOUT)
        except Unreachable as exc:
            answers[worker.index] = exc

    async with trio.open_nursery() as nursery:
        for worker in workers:
            nursery.start_soon(one, worker)
    return answers


def readiness(
    supervisor: "Supervisor", answers: dict[int, httpx.Response | Unreachable]
) -> tuple[dict[str, Any], int]:
    failed = degraded = False
    reasons: list[str] = []
    workers: list[dict[str, Any]] = []
    if supervisor.stopping.is_set():
        failed = True
        reasons.append("draining: the machine is shutting down")
    for worker in supervisor.workers:
        answer = answers[worker.index]
        entry: dict[str, Any] = {
            "worker": worker.index,
            "pid": worker.pid,
            "restarts": worker.restarts,
        }
        body = _json(answer)
        if isinstance(answer, Unreachable) or body is None:
            failed = True
            why = answer if isinstance(answer, Unreachable) else "answered no readiness"
            reasons.append(f"worker {worker.index}: unreachable: {why}")
            entry.update(status="Failed", error=str(why))
        else:
            status = str(body.get("status"))
            failed = failed or status == "Failed"
            degraded = degraded or status == "Degraded"
            reasons.extend(f"worker {worker.index}: {r}" for r in body.get("reasons", []))
            entry.update(status=status, checks=body.get("checks"))
        workers.append(entry)
    status = "Failed" if failed else "Degraded" if degraded else "OK"
    body = {"status": status, "reasons": reasons, "checks": {"workers": workers}}
    return body, 503 if failed else 200


def _json(answer: httpx.Response | Unreachable) -> dict[str, Any] | None:
    if isinstance(answer, Unreachable):
        return None
    try:
        body = answer.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def merge_metrics(
    supervisor: "Supervisor", answers: dict[int, httpx.Response | Unreachable]
) -> list[Metric]:
    """The workers' families with a ``worker`` label on each sample, then our own."""
    merged: dict[str, Metric] = {}
    read: dict[int, bool] = {}
    for index, answer in sorted(answers.items()):
        read[index] = False
        if isinstance(answer, Unreachable) or answer.status_code != 200:
            continue
        try:
            families = list(text_string_to_metric_families(answer.text))
        except ValueError:
            continue
        read[index] = True
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type)
            label = {"worker": str(index)}
            into.samples.extend(s._replace(labels={**s.labels, **label}) for s in family.samples)
    workers = supervisor.workers
    pids = GaugeMetricFamily("parley_worker_pid", "Process id of each worker", labels=["worker"])
    restarts = CounterMetricFamily(
        "parley_worker_restarts", "Times each worker was restarted", labels=["worker"]
    )
    up = GaugeMetricFamily(
        "parley_worker_up", "1 if the worker's metrics were read in this scrape", labels=["worker"]
    )
    for worker in workers:
        if worker.pid is not None:
            pids.add_metric([str(worker.index)], worker.pid)
        restarts.add_metric([str(worker.index)], worker.restarts)
        up.add_metric([str(worker.index)], int(read.get(worker.index, False)))
    running = sum(w.running for w in workers)
    own = [
        GaugeMetricFamily("parley_workers", "Workers this machine runs (--workers)", len(workers)),
        GaugeMetricFamily("parley_workers_running", "Worker processes running", running),
        pids,
        restarts,
        up,
    ]
    return [*merged.values(), *own]


class _Fixed:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        return self.metrics


def supervisor_app(supervisor: "Supervisor") -> QuartTrio:
    app = http_app("parley.workers")

    @app.get("/healthz")
    async def healthz() -> tuple[dict[str, Any], int]:
        answers = await ask_all(supervisor.workers, "/healthz")
        reasons = []
        for index, answer in sorted(answers.items()):
            if isinstance(answer, Unreachable):
                reasons.append(f"worker {index}: {answer}")
            elif answer.status_code != 200:
                reasons.append(f"worker {index}: /healthz answered {answer.status_code}")
        pids = {str(w.index): w.pid for w in supervisor.workers}
        body = {"status": "Failed" if reasons else "OK", "reasons": reasons, "pids": pids}
        return body, 503 if reasons else 200

    @app.get("/readyz")
    async def readyz() -> tuple[dict[str, Any], int]:
        return readiness(supervisor, await ask_all(supervisor.workers, "/readyz"))

    @app.get("/metrics")
    async def metrics() -> Response:
        answers = await ask_all(supervisor.workers, "/metrics")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(merge_metrics(supervisor, answers)))
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    async def proxy(**_: str) -> Response | tuple[dict[str, Any], int]:
        return await _proxy(supervisor)

    app.add_url_rule("/openapi.json", "openapi", proxy, methods=["GET"])
    app.add_url_rule("/admin/<path:rest>", "admin", proxy, methods=PROXIED_METHODS)
    return app


async def _proxy(supervisor: "Supervisor") -> Response | tuple[dict[str, Any], int]:
    body = await request.get_data()
    assert isinstance(body, bytes)
    target = request.scope.get("raw_path", request.path.encode()).decode("latin-1")
    if request.query_string:
        target += "?" + request.query_string.decode("latin-1")
    headers = {k: v for k, v in request.headers.items() if k.lower() in HEADERS_IN}
    workers = supervisor.workers
    turn = supervisor.admin_turn
    supervisor.admin_turn += 1
    for worker in [workers[(turn + i) % len(workers)] for i in range(len(workers))]:
        try:
            answer = await ask(
                worker,
                request.method,
                target,
                headers=headers,
                content=body,
                seconds=ADMIN_TIMEOUT,
            )
        except Unreachable as exc:
            if not exc.sent:
                continue
            message = f"worker {worker.index} did not answer: {exc}"
            return error_body(ErrorCode.TIMEOUT, message), 504
        kept = {k: v for k, v in answer.headers.items() if k.lower() in HEADERS_OUT}
        return Response(answer.content, status=answer.status_code, headers=kept)
    return error_body(ErrorCode.TRY_LATER, "no worker is running; retry later"), 503
