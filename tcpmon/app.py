"""The WSGI app: /metrics on the metrics port; /liveness, /readiness, /health on the health port.

Routing is by the listening port (gunicorn's SERVER_PORT), so a scrape port
never answers health paths and the reverse.  Every failure is a status with a
one-line reason, never a traceback.  The map read, the rendering and gzip go
through `offload` (the server's native threads); health never reads a map and
never waits for a scrape.  With a web config, the metrics port also checks
basic auth and adds its headers (`tcpmon.web`).
"""
import dataclasses
import json
import logging
import time
import zlib
from functools import partial

from tcpmon import exposition, negotiation
from tcpmon.collector import _run_here
from tcpmon.errors import describe

log = logging.getLogger("tcpmon.app")

_METHODS = ("GET", "HEAD")
_GZIP_LEVEL = 1   # what Prometheus' Go client uses: most of the saving for a fraction of the CPU
_GZIP_WBITS = 16 + zlib.MAX_WBITS   # a gzip member (header and trailer), as gzip.compress writes
_SMALL_PART = 64 << 10   # body parts below this are joined with their neighbours before sending


def _reply(status, body, content_type="text/plain; charset=utf-8"):
    """(status, headers, body as a list of bytes)."""
    if isinstance(body, str):
        body = body.encode()
    return status, [("Content-Type", content_type)], [body] if isinstance(body, bytes) else body


def coalesce(parts, small=_SMALL_PART):
    """`parts` with every run of small ones joined: each part is a send, and a segment the client
    wakes up for.  A big part is never copied."""
    out, run = [], []
    for part in parts:
        if len(part) < small:
            run.append(part)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(part)
    if run:
        out.append(b"".join(run))
    return out


def encode(render, snapshot, openmetrics, compress, process_registry=None, grouped=None):
    """The /metrics body of `snapshot` as a list of bytes, gzipped when `compress`: the CPU-heavy
    part of a scrape.  The big parts are sent in turn, never joined (a copy of the whole body).
    `grouped`: the renderer's grouped_parts() of it, when they were made beside the read."""
    extra = {"process_registry": process_registry} if process_registry is not None else {}
    parts = render(snapshot, openmetrics=openmetrics, grouped=grouped, **extra)
    if not compress:
        return coalesce(parts)
    gzipper = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
    return [*map(gzipper.compress, parts), gzipper.flush()]


def _metrics(collector, renderer, offload, per_worker, environ):
    chosen = negotiation.choose_format(environ.get("HTTP_ACCEPT"))
    compress = negotiation.wants_gzip(environ.get("HTTP_ACCEPT_ENCODING"))
    if per_worker is None:   # read and render in one hand-over to a native thread
        def then(snapshot, grouped):
            return encode(renderer.render_parts, snapshot, chosen.openmetrics, compress, grouped=grouped)
        _, body = collector.snapshot_then(then, early=partial(renderer.grouped_parts, openmetrics=chosen.openmetrics))
    else:                    # every worker's counters, labelled, instead of this one's
        snapshot = collector.snapshot()
        per_worker.publish(snapshot.read_errors, snapshot.read_truncations)
        body = offload(encode, renderer.render_parts, dataclasses.replace(snapshot, read_errors=None),
                       chosen.openmetrics, compress, per_worker.registry)
    status, headers, body = _reply("200 OK", body, chosen.content_type)
    headers.append(("Vary", "Accept, Accept-Encoding"))
    if compress:
        headers.append(("Content-Encoding", "gzip"))
    return status, headers, body


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
    """The probe's pins and the last scrape's outcome: never a map read, never a wait on a scrape."""
    problem, state = collector.readiness()
    last = collector.last_scrape()
    report = {"ready": problem is None, "alive": True, "timestamp": round(time.time(), 3), "notes": notes(),
              "attach_mode": state.mode if state.attached else None,
              "map_entries": last.map_entries if last else None,
              "reason": problem,
              "last_error": last.last_error if last else None,
              "last_scrape_ok": last.ok if last else None,
              "last_scrape_age_seconds": round(last.age, 3) if last else None}
    status = "200 OK" if problem is None else "503 Service Unavailable"
    return _reply(status, json.dumps(report) + "\n", "application/json")


def _unauthorized():
    status, headers, body = _reply("401 Unauthorized", "Unauthorized\n")
    return status, headers + [("WWW-Authenticate", "Basic")], body


def _with_capacity_notes(collector, notes):
    """A map that ran full loses detail, not readiness: it is a note."""
    return collector.capacity_notes() + list(notes())


def make_app(collector, metrics_port=None, health_port=None, renderer=None, notes=lambda: [],
             offload=_run_here, web=None, per_worker=None):
    """The WSGI callable.  With equal (or unknown) ports every path is served on every port.
    `renderer` (an exposition.Renderer, or one with its render_parts and grouped_parts) makes the
    /metrics body (a list of bytes), through `offload`; `notes()` are
    what readiness and health add while ready (e.g. why attribution labels are missing).
    `web` (a tcpmon.web.WebState or None) guards the metrics port: its headers, rate limit and users.
    `per_worker` (a tcpmon.workers.PerWorker, with --workers > 1) labels per-process counters."""
    notes = partial(_with_capacity_notes, collector, notes)
    renderer = renderer or exposition.Renderer()
    metrics_routes = {"/metrics": partial(_metrics, collector, renderer, offload, per_worker), "/": _index}
    health_routes = {"/liveness": _liveness, "/readiness": partial(_readiness, collector, notes),
                     "/health": partial(_health, collector, notes)}
    all_routes = {**metrics_routes, **health_routes}
    same_port = metrics_port is None or metrics_port == health_port

    def routes_for(environ):
        if same_port:
            return all_routes
        return health_routes if environ.get("SERVER_PORT") == str(health_port) else metrics_routes

    def guard(environ, routes):
        """(refusal or None, extra headers) from the web config, for the metrics port only."""
        if web is None or (not same_port and routes is health_routes):
            return None, []
        config = web.config
        extra = list(config.headers.items())
        if not web.allow_request():
            return _reply("429 Too Many Requests", "Too Many Requests\n"), extra
        if config.users and not web.authorized(environ.get("HTTP_AUTHORIZATION")):
            return _unauthorized(), extra
        return None, extra

    def app(environ, start_response):
        routes = routes_for(environ)
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        handler = routes.get(path)
        refusal, extra = guard(environ, routes)
        if refusal:
            status, headers, body = refusal
        elif handler is None:
            status, headers, body = _reply("404 Not Found", f"{path} not found here: try {', '.join(routes)}\n")
        elif method not in _METHODS:
            status, headers, body = _reply("405 Method Not Allowed", f"{method} {path}: use GET\n")
            extra.append(("Allow", ", ".join(_METHODS)))
        else:
            try:
                status, headers, body = handler(environ)
            except Exception as exc:
                log.exception("%s failed", path)
                status, headers, body = _reply("503 Service Unavailable", f"{path} failed: {describe(exc)}\n")
        start_response(status, headers + extra + [("Content-Length", str(sum(map(len, body))))])
        return [] if method == "HEAD" else body

    return app
