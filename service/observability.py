"""Operations: JSON-lines logs with a request id, and Prometheus-text metrics.

Every HTTP request gets an id: the client's ``X-Request-ID`` when it is 1-128 characters of
``[A-Za-z0-9._-]``, else a new UUID4 hex. The id is echoed in the response header, attached to
every log line written while the request runs (also from worker threads started for it,
through :data:`request_id_var`), and stored with jobs in their logs.

Metrics follow the Prometheus exposition format (text 0.0.4): request counts by method, route
template and status, latency sum / count per route, and gauges supplied by the app (queue depth,
running inferences, jobs by state).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOGGER_NAME = "uumamba_service"
logger = logging.getLogger(LOGGER_NAME)

#: The current request's id ("-" outside a request).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC ISO 8601), ``level``, ``logger``, ``msg``,
    ``request_id`` and the fields passed as ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: int = logging.INFO, library: bool = False) -> None:
    """Send the service's and uvicorn's server logs to stderr as JSON lines.

    Idempotent; the root logger is left alone (uvicorn's access log is replaced by the
    middleware's one line per request). ``library``: the ``uumamba`` library's notes and
    warnings (e.g. an implausible upload) too, instead of any plain-text handler the CLI
    attached — for the server process itself (``uumamba serve``), not for an embedding app.
    """
    names = (LOGGER_NAME, "uvicorn.error") + (("uumamba",) if library else ())
    if library:
        lib = logging.getLogger("uumamba")
        for h in [h for h in lib.handlers if not getattr(h, "_uumamba_json", False)]:
            lib.removeHandler(h)
    for name in names:
        target = logging.getLogger(name)
        if any(getattr(h, "_uumamba_json", False) for h in target.handlers):
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._uumamba_json = True  # type: ignore[attr-defined]
        target.addHandler(handler)
        target.setLevel(level)
        target.propagate = False


class Metrics:
    """Thread-safe request counters and latency sums, plus gauges read at scrape time,
    rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = {}
        self._latency: dict[str, list[float]] = {}
        self._gauges: dict[str, tuple[str, Callable[[], float | dict[str, float]], str]] = {}

    def add_gauge(self, name: str, help_text: str, fn: Callable[[], float | dict[str, float]],
                  label: str = "") -> None:
        """Register a gauge read at scrape time; ``fn`` returns a value or ``{label value: value}``."""
        self._gauges[name] = (help_text, fn, label)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request and its latency (seconds)."""
        with self._lock:
            key = (method, route, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            total = self._latency.setdefault(route, [0.0, 0])
            total[0] += seconds
            total[1] += 1

    def render(self) -> str:
        """The exposition text (``text/plain; version=0.0.4``)."""
        lines = ["# HELP uumamba_http_requests_total HTTP requests by method, route and status.",
                 "# TYPE uumamba_http_requests_total counter"]
        with self._lock:
            requests = sorted(self._requests.items())
            latency = sorted(self._latency.items())
        for (method, route, status), n in requests:
            lines.append(f'uumamba_http_requests_total{{method="{method}",route="{_esc(route)}",status="{status}"}} {n}')
        lines += ["# HELP uumamba_http_request_duration_seconds Request latency by route.",
                  "# TYPE uumamba_http_request_duration_seconds summary"]
        for route, (total, count) in latency:
            lines.append(f'uumamba_http_request_duration_seconds_sum{{route="{_esc(route)}"}} {total:.6f}')
            lines.append(f'uumamba_http_request_duration_seconds_count{{route="{_esc(route)}"}} {int(count)}')
        for name, (help_text, fn, label) in self._gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            value = fn()
            if isinstance(value, dict):
                for key, v in sorted(value.items()):
                    lines.append(f'{name}{{{label}="{_esc(key)}"}} {v}')
            else:
                lines.append(f"{name} {value}")
        return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class RequestContextMiddleware:
    """ASGI middleware: request id (echoed in ``X-Request-ID``), one access log line, metrics.

    Pure ASGI (not ``BaseHTTPMiddleware``) so streamed bodies and file responses are not
    buffered. The route label is the matched path template (``/v1/jobs/{job_id}``), or
    ``unmatched`` so unknown paths cannot inflate the metric's label set.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope["method"], template, status, elapsed)
            logger.info("request", extra={"fields": {
                "method": scope["method"], "path": scope["path"], "route": template,
                "status": status, "duration_ms": round(elapsed * 1000, 2),
                "client": (scope.get("client") or ("-",))[0],
            }})
            request_id_var.reset(token)
