"""Which format and coding a scrape gets: Accept with q-values (tcpmon.negotiation), compared with
client_python's choose_encoder where the two must agree, and on the real server: exact content
types, OpenMetrics 0.0.1 and 1.0.0, gzip only when accepted."""
import gzip

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from conftest import http_get
from tcpmon import negotiation

TEXT_004 = "text/plain; version=0.0.4; charset=utf-8"
OM_100 = "application/openmetrics-text; version=1.0.0; charset=utf-8"
OM_001 = "application/openmetrics-text; version=0.0.1; charset=utf-8"
PROMETHEUS_2 = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
PROMETHEUS_3 = ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
                "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
                "text/plain;version=0.0.4;q=0.3,*/*;q=0.2")


@pytest.mark.parametrize("accept, content_type", [
    (None, TEXT_004), ("", TEXT_004), ("*/*", TEXT_004), ("text/plain", TEXT_004), ("application/json", TEXT_004),
    (",;;,= ;q=", TEXT_004), ("text/plain;version=0.0.4", TEXT_004),
    ("application/openmetrics-text", OM_100), ("Application/OpenMetrics-Text; Version=1.0.0", OM_100),
    ("application/openmetrics-text; version=0.0.1", OM_001),
    ("application/openmetrics-text; version=2.0.0", TEXT_004),
    ("application/openmetrics-text; version=2.0.0, application/openmetrics-text; version=0.0.1;q=0.5", OM_001),
    ("application/openmetrics-text;q=0", TEXT_004), ("application/openmetrics-text;q=nan", TEXT_004),
    ("application/openmetrics-text;q=0.1, text/plain;version=0.0.4;q=0.9", TEXT_004),
    ("text/plain;q=0.2, application/openmetrics-text;version=1.0.0;q=0.8", OM_100),
    ("text/plain, application/openmetrics-text", TEXT_004),            # equal q: the first listed
    ("*/*, application/openmetrics-text", OM_100),                     # equal q: named before wildcard
    ("text/plain;version=1.0.0", TEXT_004),                            # 1.0.0 text: tcpmon serves 0.0.4
    (PROMETHEUS_2, OM_100), (PROMETHEUS_3, OM_100),
])
def test_choose_format(accept, content_type):
    chosen = negotiation.choose_format(accept)
    assert chosen.content_type == content_type
    assert chosen.openmetrics == content_type.startswith("application/openmetrics-text")


# Without q-values and without an explicit text/plain (which client_python never takes as a choice,
# see tcpmon/negotiation.py), client_python's choose_encoder picks the same format.
VOCABULARY = ["application/openmetrics-text", "application/openmetrics-text; version=1.0.0",
              "application/json", "*/*", "text/*", "text/html"]


@given(st.lists(st.sampled_from(VOCABULARY), max_size=5))
def test_the_same_choice_as_client_python(types):
    accept = ",".join(types)
    theirs = choose_encoder(accept)[1].startswith("application/openmetrics-text")
    assert negotiation.choose_format(accept).openmetrics == theirs, accept


@pytest.mark.parametrize("header, wanted", [
    (None, False), ("", False), ("gzip", True), ("GZIP", True), ("deflate, gzip;q=0.5", True), ("gzip;q=0", False),
    ("identity", False), ("x-gzip", True), ("br", False), ("gzip;q=0.0, identity", False)])
def test_wants_gzip(header, wanted):
    assert negotiation.wants_gzip(header) is wanted


def test_the_text_body_is_0_0_4_whatever_prometheus_client_says(exporter):
    status, headers, body = http_get(exporter.metrics + "/metrics")
    assert status == 200 and headers["Content-Type"] == TEXT_004 and "Content-Encoding" not in headers
    assert headers["Vary"] == "Accept, Accept-Encoding"
    assert any(family.name == "tcp_connects_by_pid" for family in parse_text(body.decode()))


@pytest.mark.parametrize("accept, content_type", [(PROMETHEUS_2, OM_100), (PROMETHEUS_3, OM_100),
                                                  ("application/openmetrics-text; version=0.0.1", OM_001)])
def test_prometheus_accept_headers_get_openmetrics(exporter, accept, content_type):
    status, headers, body = http_get(exporter.metrics + "/metrics", {"Accept": accept})
    assert status == 200 and headers["Content-Type"] == content_type
    assert body.endswith(b"# EOF\n")
    assert any(family.name == "tcp_connects_by_pid" for family in parse_openmetrics(body.decode()))


def _series(text):
    return {(s.name, tuple(sorted(s.labels.items()))) for f in parse_text(text) for s in f.samples
            if not s.name.startswith(("process_", "python_", "tcpmon_scrape"))}


@pytest.mark.parametrize("accept", [None, PROMETHEUS_3])
def test_gzip_when_accepted(exporter, accept):
    headers = {"Accept-Encoding": "gzip"} | ({"Accept": accept} if accept else {})
    status, reply, body = http_get(exporter.metrics + "/metrics", headers)
    assert status == 200 and reply["Content-Encoding"] == "gzip"
    assert int(reply["Content-Length"]) == len(body)
    text = gzip.decompress(body).decode()
    if accept:
        assert text.endswith("# EOF\n")
    else:
        plain = http_get(exporter.metrics + "/metrics")[2].decode()
        assert len(body) < len(plain.encode())
        assert _series(text) == _series(plain)


def test_no_gzip_when_refused(exporter):
    status, reply, body = http_get(exporter.metrics + "/metrics", {"Accept-Encoding": "gzip;q=0, identity"})
    assert status == 200 and "Content-Encoding" not in reply and body.startswith(b"# HELP")
