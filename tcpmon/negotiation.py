"""Which exposition format and content coding a scrape gets, from its Accept and Accept-Encoding.

Accept is read as client_python's choose_encoder reads it (OpenMetrics 1.0.0 when asked for, text
0.0.4 otherwise), with the q-values a Prometheus server sends honoured as client_golang does: the
most preferred type tcpmon can serve wins; at equal q a named type beats a wildcard, then the one
listed first does (so "text/plain, application/openmetrics-text" is text, where client_python,
which never takes text/plain 0.0.4 as a choice, would serve OpenMetrics).  OpenMetrics 0.0.1, which
Prometheus 2 asks for second, gets the 1.0.0 body (valid 0.0.1 too) under its own version.  The content types are spelled out here rather
than taken from prometheus-client, whose CONTENT_TYPE_LATEST became text 1.0.0 in 0.22 although
the body tcpmon serves is 0.0.4.
"""
from dataclasses import dataclass

CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_VERSIONS = ("1.0.0", "0.0.1")   # the 1.0 body is also valid 0.0.1 (the draft Prometheus 2 asks for)
_TEXT_VERSIONS = ("0.0.4",)
_GZIP = ("gzip", "x-gzip")


@dataclass(frozen=True)
class Format:
    openmetrics: bool
    content_type: str


TEXT = Format(False, CONTENT_TYPE_TEXT)


def openmetrics_type(version="1.0.0"):
    return f"application/openmetrics-text; version={version}; charset=utf-8"


def _entries(header):
    """[(q, position, media type, {param: value})] of a comma-separated header, q=0 dropped."""
    entries = []
    for position, item in enumerate((header or "").split(",")):
        kind, *params = item.split(";")
        kind = kind.strip().lower()
        if not kind:
            continue
        values = {}
        for param in params:
            key, _, value = param.partition("=")
            values[key.strip().lower()] = value.strip().strip('"')
        try:
            q = float(values.pop("q", "1"))
        except ValueError:
            q = 0.0
        if q > 0:          # NaN is not > 0: dropped too
            entries.append((q, position, kind, values))
    # as Go's goautoneg (client_golang) sorts: by q, then a named type before a wildcard, then order
    entries.sort(key=lambda entry: (-entry[0], entry[2].count("*"), entry[1]))
    return entries


def _servable(kind, params):
    version = params.get("version")
    if kind == "application/openmetrics-text":
        if version is None:
            return Format(True, openmetrics_type())
        if version in OPENMETRICS_VERSIONS:
            return Format(True, openmetrics_type(version))
        return None
    if kind == "text/plain" and (version is None or version in _TEXT_VERSIONS):
        return TEXT
    if kind in ("*/*", "text/*"):
        return TEXT
    return None


def choose_format(accept):
    """The Format for an Accept header; text 0.0.4 when nothing listed can be served."""
    for _, _, kind, params in _entries(accept):
        chosen = _servable(kind, params)
        if chosen:
            return chosen
    return TEXT


def wants_gzip(accept_encoding):
    """True when the client accepts gzip (q > 0), as Prometheus' scraper says it does."""
    return any(kind in _GZIP for _, _, kind, _ in _entries(accept_encoding))
