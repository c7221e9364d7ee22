"""The WSGI app: /metrics on the metrics port; /liveness, /readiness, /health on the health port.

Routing is by the listening port (gunicorn's SERVER_PORT), so a scrape port
never answers health paths and the reverse.  Every failure is a status with a
one-line reason, never a traceback.
"""
import json
import logging
import time
from functools import partial

from tcpmon import exposition
from tcpmon.errors import describe

log = logging.getLogger("tcpmon.app")

_METHODS = ("GET", "HEAD")


def _reply(status, body, content_type="text/plain; charset=utf-8"):
    if isinstance(body, str):
        body = body.encode()
    return status, [("Content-Type", content_type)], body


def _metrics(collector, render, environ):
    openmetrics = exposition.wants_openmetrics(environ.get("HTTP_ACCEPT"))
    body = render(collector.snapshot(), openmetrics=openmetrics)
    content_type = exposition.CONTENT_TYPE_OPENMETRICS if openmetrics else exposition.CONTENT_TYPE_TEXT
    return _reply("200 OK", body, content_type)


def _index(environ):
    return _reply("200 OK", "<html><head><title>tcpmon</title></head><body><h1>tcpmon</h1>"
                  "<p><a href=\"/metrics\">Metrics</a></p></body></html>\n", "text/html; charset=utf-8")


def _liveness(environ):
    return _reply("200 OK", "alive\n")


def _readiness(collector, notes, environ):
    problem = collector.readiness_problem()
    if problem:
        return _reply("503 Service Unavailable", f"not ready: {problem}\n")
    return _reply("200 OK", "ready\n" + "".join(f"note: {note}\n" for note in notes()))


def _health(collector, notes, environ):
    problem = collector.readiness_problem()
    report = {"ready": problem is None, "alive": True, "timestamp": round(time.time(), 3), "notes": notes()}
    snapshot = collector.snapshot()
    report["attach_mode"] = snapshot.probe_state.mode if snapshot.probe_state else None
    report["map_entries"] = snapshot.connects.count if snapshot.connects else None
    report["reason"] = problem
    report["last_error"] = snapshot.last_error
    status = "200 OK" if problem is None else "503 Service Unavailable"
    return _reply(status, json.dumps(report) + "\n", "application/json")


def _with_capacity_notes(collector, notes):
    """A map that ran full loses detail, not readiness: it is a note."""
    return collector.capacity_notes() + list(notes())


def make_app(collector, metrics_port=None, health_port=None, render=exposition.render, notes=lambda: []):
    """The WSGI callable.  With equal (or unknown) ports every path is served on every port.
    `render(snapshot, openmetrics=...)` makes the /metrics body; `notes()` are what readiness
    and health add while ready (e.g. why attribution labels are missing)."""
    notes = partial(_with_capacity_notes, collector, notes)
    metrics_routes = {"/metrics": partial(_metrics, collector, render), "/": _index}
    health_routes = {"/liveness": _liveness, "/readiness": partial(_readiness, collector, notes),
                     "/health": partial(_health, collector, notes)}
    all_routes = {**metrics_routes, **health_routes}

    def routes_for(environ):
        if metrics_port is None or metrics_port == health_port:
            return all_routes
        port = environ.get("SERVER_PORT")
        return health_routes if port == str(health_port) else metrics_routes

    def app(environ, start_response):
        routes = routes_for(environ)
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        handler = routes.get(path)
        extra = []
        if handler is None:
            status, headers, body = _reply("404 Not Found", f"{path} not found here: try {', '.join(routes)}\n")
        elif method not in _METHODS:
            status, headers, body = _reply("405 Method Not Allowed", f"{method} {path}: use GET\n")
            extra = [("Allow", ", ".join(_METHODS))]
        else:
            try:
                status, headers, body = handler(environ)
            except Exception as exc:
                log.exception("%s failed", path)
                status, headers, body = _reply("503 Service Unavailable", f"{path} failed: {describe(exc)}\n")
        start_response(status, headers + extra + [("Content-Length", str(len(body)))])
        return [b"" if method == "HEAD" else body]

    return app
