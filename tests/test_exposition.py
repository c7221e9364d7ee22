"""The /metrics body: hostile comms set in the kernel by real processes, both formats, promtool,
the classic line byte for byte, and property tests of the Cython renderer.

Oracles independent of tcpmon: the comm each process reads back from /proc/<pid>/comm, the
namespace's ActiveOpens delta, prometheus-client's text and OpenMetrics parsers, promtool, and
`reference_label` below (the documented escaping rule written with Python's own strict UTF-8
decoder).
"""
import array
import re
import secrets
import shutil
import struct
import subprocess
from contextlib import ExitStack

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.utils import floatToGoString

from conftest import Connector, http_get, unique_comm
from metrics import samples
from tcpmon._render import comm_label, render_comm_series, render_pid_series

OPENMETRICS_ACCEPT = {"Accept": "application/openmetrics-text; version=1.0.0"}
PID_FAMILY = "tcp_connects_by_pid"
COMM_SAMPLE = "tcpmon_connect_attempts_total"


# --- the documented label rule, independently --------------------------------------------

def reference_label(raw):
    """README: valid UTF-8 passes; a backslash, a control character or a byte that is not valid
    UTF-8 becomes the text \\xNN.  The comm ends at its first NUL and has at most 16 bytes."""
    raw = raw[:16].split(b"\0")[0]
    out, i = [], 0
    while i < len(raw):
        byte = raw[i]
        if byte < 0x80:
            out.append(f"\\x{byte:02x}" if byte == 0x5C or byte < 0x20 or byte == 0x7F else chr(byte))
            i += 1
            continue
        for size in (2, 3, 4):
            try:
                char = raw[i:i + size].decode("utf-8")  # strict: no overlongs, surrogates, > U+10FFFF
            except UnicodeDecodeError:
                continue
            if len(char) == 1:
                out.append(char)
                i += size
                break
        else:
            out.append(f"\\x{byte:02x}")
            i += 1
    return "".join(out)


def unlabel(label):
    """The raw comm back from its label: every backslash starts a \\xNN escape."""
    out, i = bytearray(), 0
    while i < len(label):
        if label[i] == "\\":
            assert label[i + 1] == "x" and re.fullmatch(r"[0-9a-f]{2}", label[i + 2:i + 4]), label
            out.append(int(label[i + 2:i + 4], 16))
            i += 4
        else:
            out += label[i].encode("utf-8")
            i += 1
    return bytes(out)


def exposition_escape(label):
    """How the text format writes a label value (backslash, double quote, newline)."""
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# --- hostile comms made by real processes ------------------------------------------------

# Connector --comm takes \xNN escapes.  Each gets a random 4-character prefix so that its
# comm_totals entry is its own; the last three are longer than the kernel's 15 bytes.
HOSTILE = {
    "double quote": r'q"u"o',
    "backslash": r"back\\sl",
    "newline": r"new\x0aline",
    "tab": r"tab\x09x",
    "control and DEL": r"\x01\x1f\x7f",
    "invalid utf-8": r"bad\xff\xfe",
    "lone continuation": r"\x80\xbf!",
    "overlong and surrogate": r"\xc0\xaf\xed\xa0\x80",
    "multi-byte utf-8": r"c\xc3\xa9\xe2\x82\xac\xf0\x9f\x90\x8d",
    "looks like an escape": r"\\xff",
    "escape target": r"\xff",
    "15-byte maximum": "0123456789abcdefghij",
    "cut inside a utf-8 char": r"0123456789\xc3\xa9",
    "all escaped, max length": r"\\\\\\\\\\\\\\\\\\\\\\",
}


@pytest.fixture(scope="module")
def hostile(exporter):
    """One live Connector per hostile comm, and one scrape in each format taken while all live."""
    with ExitStack() as stack:
        procs = {}
        for case, comm in HOSTILE.items():
            opened, refused = 1 + len(procs) % 3, len(procs) % 2
            procs[case] = (stack.enter_context(Connector(secrets.token_hex(2) + comm, opened, refused)),
                           opened + refused)
        text = exporter.scrape()
        status, headers, body = http_get(exporter.metrics + "/metrics", OPENMETRICS_ACCEPT)
        assert status == 200, body
        yield procs, text, headers, body.decode("utf-8")


def test_the_kernel_kept_the_hostile_bytes(hostile):
    procs, *_ = hostile
    for case, (proc, made) in procs.items():
        assert proc.active_opens == made, case
        assert len(proc.comm) <= 15, case
    assert len(procs["15-byte maximum"][0].comm) == 15
    assert procs["cut inside a utf-8 char"][0].comm.endswith(b"\xc3")
    assert b"\n" in procs["newline"][0].comm and b"\xff\xfe" in procs["invalid utf-8"][0].comm


def test_hostile_comms_round_trip_through_the_text_parser(hostile):
    procs, text, _, _ = hostile
    by_pid = samples(text, PID_FAMILY)          # asserts no duplicate series
    totals = samples(text, COMM_SAMPLE)
    for case, (proc, made) in procs.items():
        label = comm_label(proc.comm)
        assert label == reference_label(proc.comm), case
        assert unlabel(label) == proc.comm, case
        assert by_pid.get(frozenset({"pid": str(proc.pid), "comm": label}.items())) == made, case
        assert totals.get(frozenset({"comm": label}.items())) == made, case
    labels = [comm_label(proc.comm) for proc, _ in procs.values()]
    assert len(set(labels)) == len(labels)


def test_hostile_comms_round_trip_through_the_openmetrics_parser(hostile):
    procs, _, headers, body = hostile
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith("\n# EOF\n") and body.count("# EOF") == 1
    families = list(parse_openmetrics(body))     # raises on any OpenMetrics violation
    names = [family.name for family in families]
    assert len(names) == len(set(names))
    found = {}
    for family in families:
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in found, f"duplicate series {key}"
            found[key] = sample.value
    types = {family.name: family.type for family in families}
    assert types[PID_FAMILY] == "gauge" and types["tcpmon_connect_attempts"] == "counter"
    for case, (proc, made) in procs.items():
        label = comm_label(proc.comm)
        assert found.get((PID_FAMILY, frozenset({"pid": str(proc.pid), "comm": label}.items()))) == made, case
        assert found.get((COMM_SAMPLE, frozenset({"comm": label}.items()))) == made, case


def test_hostile_sample_lines_are_escaped_byte_for_byte(hostile):
    procs, text, _, _ = hostile
    lines = set(text.split("\n"))
    for case, (proc, made) in procs.items():
        value = exposition_escape(reference_label(proc.comm))
        assert f'{PID_FAMILY}{{comm="{value}",pid="{proc.pid}"}} {made}' in lines, case
        assert f'{COMM_SAMPLE}{{comm="{value}"}} {made}' in lines, case


def test_a_comm_and_its_label_taken_literally_are_two_series(exporter):
    """\\xff (one invalid byte) and the four characters \\xff must not share a label."""
    tag = secrets.token_hex(2)
    with Connector(tag + r"\xff", opened=2) as byte, Connector(tag + r"\\xff", opened=3) as text_comm:
        text = exporter.scrape()
    assert byte.comm != text_comm.comm
    by_pid = samples(text, PID_FAMILY)
    totals = samples(text, COMM_SAMPLE)
    assert comm_label(byte.comm) != comm_label(text_comm.comm)
    assert by_pid[frozenset({"pid": str(byte.pid), "comm": comm_label(byte.comm)}.items())] == 2
    assert by_pid[frozenset({"pid": str(text_comm.pid), "comm": comm_label(text_comm.comm)}.items())] == 3
    assert totals[frozenset({"comm": comm_label(byte.comm)}.items())] == 2
    assert totals[frozenset({"comm": comm_label(text_comm.comm)}.items())] == 3


# --- promtool -----------------------------------------------------------------------------

@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool missing: install Debian's prometheus package")
def test_promtool_accepts_a_real_scrape(hostile):
    """promtool 2.42 lints the text format only (its parser does not know OpenMetrics' `info`
    type), so the OpenMetrics body is checked by prometheus-client's parser above and by a real
    Prometheus scrape in test_prometheus.py.  Any lint finding is a failure: tcpmon's counters
    end in _total, and its only non-counter names are gauges."""
    _, text, _, _ = hostile
    result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
    assert result.stdout == b"" and result.stderr == b"", result


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool missing: install Debian's prometheus package")
def test_promtool_rejects_a_broken_body():
    """The promtool check above can fail: an unescaped quote in a label is a parse error."""
    broken = f'# TYPE {PID_FAMILY} gauge\n{PID_FAMILY}{{comm="a"b",pid="1"}} 1\n'
    result = subprocess.run(["promtool", "check", "metrics"], input=broken.encode(), capture_output=True,
                            timeout=30)
    assert result.returncode != 0


# --- the classic line ---------------------------------------------------------------------

def test_the_classic_lines_byte_for_byte(exporter):
    with Connector(unique_comm(), opened=4, refused=3) as proc:
        status, headers, body = http_get(exporter.metrics + "/metrics")
    assert status == 200
    # prometheus-client >= 0.22 labels its (0.0.4-compatible) text format version=1.0.0
    assert headers["Content-Type"] in ("text/plain; version=0.0.4; charset=utf-8",
                                       "text/plain; version=1.0.0; charset=utf-8")
    lines = body.split(b"\n")
    help_line = b"# HELP tcp_connects_by_pid Number of tcp_connect() calls observed per PID"
    type_line = b"# TYPE tcp_connects_by_pid gauge"
    assert lines[0] == help_line and lines[1] == type_line
    assert lines.count(help_line) == 1 and lines.count(type_line) == 1
    line = b'tcp_connects_by_pid{comm="%s",pid="%d"} 7' % (proc.comm, proc.pid)
    assert lines.count(line) == 1, body.decode(errors="replace")[:2000]
    # the family's samples sit right under its header, before the next family
    end = next(i for i in range(2, len(lines)) if lines[i].startswith(b"#"))
    assert lines.index(line) < end
    assert all(re.fullmatch(rb'tcp_connects_by_pid\{comm="[^\n]*",pid="[0-9]+"\} [0-9]+', sample)
               for sample in lines[2:end])


# --- the renderer on synthetic maps -------------------------------------------------------

PID_VALUE = struct.Struct("=Q16s")
SPECIAL = [b"\\", b'"', b"\n", b"\t", b"\x7f", b"\xff", b"\xc3", b"\xc3\xa9", b"\xe2\x82\xac",
           b"\xf0\x9f\x90\x8d", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\\x41", b"A", b"x"]
comm_content = st.one_of(
    st.binary(max_size=16).map(lambda raw: raw.replace(b"\0", b"")),
    st.lists(st.sampled_from(SPECIAL), max_size=8).map(lambda parts: b"".join(parts)[:16]),
    st.text(max_size=8).map(lambda text: text.encode("utf-8", "surrogatepass")[:16].replace(b"\0", b"")),
)
# Kernel comms are NUL-padded; arbitrary bytes after the NUL must not matter to a pid series.
raw_comm = st.tuples(comm_content, st.binary(min_size=16, max_size=16)).map(
    lambda pair: pair[0] + (b"\0" + pair[1] if len(pair[0]) < 16 else b"")[:16 - len(pair[0])])
u64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**53, 2**53 + 1, 2**63, 2**64 - 1]))
u32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**31, 2**32 - 1]))


def same_value(parsed_value, count):
    """The text parser gives floats; the OpenMetrics parser keeps integers exact."""
    return parsed_value == (count if isinstance(parsed_value, int) else float(count))


def parsed(body, family, kind, openmetrics=False):
    text = f"# HELP {family} h\n# TYPE {family} {kind}\n" + body.decode("utf-8")
    parse = parse_openmetrics if openmetrics else parse_text
    out = []
    for metric in parse(text + ("# EOF\n" if openmetrics else "")):
        out.extend(metric.samples)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(u32, st.tuples(u64, raw_comm), max_size=40))
@example({7: (2**64 - 1, b'a"b\\c\n\0\xff' + b"\0" * 8), 0: (0, b"\xff" * 16)})
def test_pid_series_round_trip(entries):
    keys = b"".join(struct.pack("=I", pid) for pid in entries)
    values = b"".join(PID_VALUE.pack(count, comm) for count, comm in entries.values())
    body = render_pid_series(b"tcp_connects_by_pid", keys, values, len(entries))
    expected = {(str(pid), reference_label(comm)): count for pid, (count, comm) in entries.items()}
    for openmetrics in (False, True):
        got = parsed(body, "tcp_connects_by_pid", "gauge", openmetrics)
        assert len(got) == len(entries)
        got_map = {(s.labels["pid"], s.labels["comm"]): s.value for s in got}
        assert got_map.keys() == expected.keys()
        assert all(same_value(got_map[key], count) for key, count in expected.items())
        assert all(set(s.labels) == {"comm", "pid"} and s.name == "tcp_connects_by_pid" for s in got)
    # values are exact integers, not floats: the last token of each line is the u64 itself
    lines = body.decode("utf-8").split("\n")[:-1]  # not splitlines(): U+0085, U+2028 are label text
    assert [line.rsplit(" ", 1)[1] for line in lines] == [str(count) for count, _ in entries.values()]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(comm_content, u64, max_size=40))
@example({b"\\x41": 1, b"A": 2, b"\xff": 3, b"\\xff": 4, b"": 5, b"\xff" * 16: 6})
def test_comm_series_round_trip(totals):
    keys = b"".join(struct.pack("16s", comm) for comm in totals)
    values = b"".join(struct.pack("=Q", count) for count in totals.values())
    body = render_comm_series(b"tcpmon_connect_attempts_total", keys, values, len(totals))
    for openmetrics in (False, True):
        family = "tcpmon_connect_attempts" if openmetrics else "tcpmon_connect_attempts_total"
        got = parsed(body, family, "counter", openmetrics)
        assert len(got) == len(totals)
        got_map = {s.labels["comm"]: s.value for s in got}
        assert len(got_map) == len(totals), "two comms rendered to one series"
        expected = {reference_label(comm): count for comm, count in totals.items()}
        assert got_map.keys() == expected.keys()
        assert all(same_value(got_map[label], count) for label, count in expected.items())
    lines = body.decode("utf-8").split("\n")[:-1]  # not splitlines(): U+0085, U+2028 are label text
    assert [line.rsplit(" ", 1)[1] for line in lines] == [str(count) for count in totals.values()]


def test_renderers_on_empty_and_short_buffers():
    assert render_pid_series(b"x", b"", b"", 0) == b""
    assert render_comm_series(b"x", b"", b"", 0) == b""
    with pytest.raises(ValueError):
        render_pid_series(b"x", b"\0" * 4, b"\0" * 23, 1)
    with pytest.raises(ValueError):
        render_comm_series(b"x", b"\0" * 15, b"\0" * 8, 1)
    with pytest.raises(ValueError):
        render_pid_series(b"x", b"", b"", -1)


@settings(max_examples=1000, deadline=None)
@given(comm_content)
@example(b"\\x5c")
@example(b"\xef\xbf\xbd")  # U+FFFD itself, not a replacement for a bad byte
def test_comm_label_is_the_documented_rule_and_invertible(comm):
    label = comm_label(comm)
    assert label == reference_label(comm)
    assert unlabel(label) == comm   # a left inverse: no two comms share a label
    assert comm_label(comm + b"\0" + b"junk") == label


def test_comm_label_of_every_byte_at_every_position():
    """The word-at-a-time path for plain comms against the rule, byte by byte: each of the 256
    byte values at each of the 16 positions, between plain bytes, with junk past a NUL."""
    for position in range(16):
        for byte in range(256):
            for tail in (b"", b"z" * 16, b"\0\x01\\\"\xff" * 4):
                comm = (b"p" * position + bytes([byte]) + tail)[:16]
                assert comm_label(comm) == reference_label(comm), comm


@settings(max_examples=1000, deadline=None)
@given(comm_content, comm_content)
def test_comm_label_is_injective(first, second):
    if first != second:
        assert comm_label(first) != comm_label(second)


@settings(max_examples=1000, deadline=None)
@given(comm_content)
def test_a_label_taken_literally_as_a_comm_gets_another_label(comm):
    """The adversarial pair: a process may name itself after another comm's label."""
    literal = comm_label(comm).encode("utf-8")[:16]
    if literal != comm:
        assert comm_label(literal) != comm_label(comm)


# --- the outcome families from raw entries ------------------------------------------------

OUTCOME_WIDTH = 2 + 6 + 26   # attempts, results, duration_ns, latency slots (bpf/tcpmon.h)
small_u64 = st.integers(0, 2**58)  # sums of a few entries stay below 2**64


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 4), st.lists(small_u64, min_size=OUTCOME_WIDTH, max_size=OUTCOME_WIDTH)),
                max_size=20))
def test_outcome_families_sum_per_group_and_round_trip(entries):
    from decimal import Decimal

    from tcpmon._render import render_outcomes
    labels = [f'comm="c{g}",pod="p\\\\{g}"'.encode() for g in range(5)]
    values = b"".join(struct.pack(f"={OUTCOME_WIDTH}Q", *fields) for _, fields in entries)
    groups = array.array("i", [g for g, _ in entries])
    results = [b"success", b"refused", b"timeout", b"unreachable", b"aborted", b"other"]
    bounds = [floatToGoString(2 ** (slot + 1) / 1e6).encode() for slot in range(25)]
    counters, histogram = render_outcomes(b"tcpmon_connects", b"tcpmon_connect_duration_seconds", results, bounds,
                                          values, len(entries), groups, labels)
    sums = {g: [sum(f[i] for h, f in entries if h == g) for i in range(OUTCOME_WIDTH)] for g in range(5)}
    got = {(s.labels["comm"], s.labels["result"]): s.value
           for s in parsed(counters, "tcpmon_connects_total", "counter")}
    wanted = {(f"c{g}", r.decode()): sums[g][1 + i] for g in range(5) for i, r in enumerate(results)}
    assert got.keys() == wanted.keys() and all(same_value(got[key], n) for key, n in wanted.items())
    samples_ = parsed(histogram, "tcpmon_connect_duration_seconds", "histogram")
    for g in range(5):
        mine = [s for s in samples_ if s.labels["comm"] == f"c{g}" and s.labels["pod"] == f"p\\{g}"]
        buckets = [s.value for s in mine if s.name.endswith("_bucket")]
        slots = sums[g][8:]
        cumulative = [sum(slots[:i + 1]) for i in range(25)] + [sums[g][1]]
        assert len(buckets) == 26 and all(same_value(v, n) for v, n in zip(buckets, cumulative))
        assert len([s for s in mine if s.name.endswith("_sum")]) == 1
        line = next(l for l in histogram.decode().splitlines() if l.startswith("tcpmon_connect_duration_seconds_sum")
                    and f'comm="c{g}"' in l)
        assert Decimal(line.rsplit(" ", 1)[1]) == Decimal(sums[g][7]) / 10**9  # exact nanoseconds
        (count,) = [s.value for s in mine if s.name.endswith("_count")]
        assert same_value(count, sums[g][1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 2), small_u64), max_size=30))
def test_grouped_counters_sum_per_group(entries):
    from tcpmon._render import render_grouped_counters
    labels = [b'comm="a",remote="10.0.0.1"', b'comm="b",remote="::1"', b'comm="\\\\x1b"']
    values = b"".join(struct.pack("=Q", count) for _, count in entries)
    body = render_grouped_counters(b"x_total", values, 8, len(entries), array.array("i", [g for g, _ in entries]), labels)
    got = [s.value for s in parsed(body, "x_total", "counter")]
    wanted = [sum(c for g, c in entries if g == group) for group in range(3)]
    assert len(got) == 3 and all(same_value(value, n) for value, n in zip(got, wanted))


def test_grouped_renderers_refuse_short_buffers():
    from tcpmon._render import render_grouped_counters
    with pytest.raises(ValueError):
        render_grouped_counters(b"x", b"\0" * 8, 8, 2, array.array("i", [0, 0]), [b'a="b"'])
    with pytest.raises(ValueError):
        render_grouped_counters(b"x", b"\0" * 16, 8, 2, array.array("i", [0]), [b'a="b"'])



# --- tcpmon's own small families and this process's metrics -------------------------------

def test_the_small_families_are_written_as_prometheus_client_writes_them(pin_dir):
    """tcpmon.textformat writes tcpmon's small families itself; prometheus-client's writer,
    handed the same families as its own objects, is the oracle, byte for byte."""
    from prometheus_client.exposition import generate_latest
    from tcpmon import exposition, textformat
    from tcpmon.collector import Collector
    with Connector(unique_comm("small"), refused=3):
        collector = Collector(pin_dir)
        try:
            snapshot = collector.snapshot()
        finally:
            collector.close()
    small = exposition._SnapshotFamilies(snapshot, exposition.Renderer().attribution)
    ours = "".join(textformat.write(small.families(), [])).encode()
    assert ours == generate_latest(textformat.ClientCollector(small.families))
    families = {family.name: family for family in parse_text(ours.decode())}
    assert {"tcpmon_map_entries", "tcpmon_map_update_failures", "tcpmon_probe_attached", "tcpmon_build_info",
            "tcpmon_scrape_duration_seconds", "tcpmon_probe_missed_runs"} <= families.keys()
    assert families["tcpmon_map_entries"].samples and families["tcpmon_probe_attached"].samples[0].value == 1


def test_this_process_metrics_are_prometheus_clients_process_platform_and_gc_collectors():
    """tcpmon.processmetrics reads /proc/self once per scrape; prometheus-client's own collectors,
    read right beside it, are the oracle: the same families, types, help and label sets, and
    values that agree (exactly where they can't move between the two reads)."""
    from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
    from prometheus_client.exposition import generate_latest
    from tcpmon import processmetrics, textformat
    reference = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=reference)
    theirs = {family.name: family for family in parse_text(generate_latest(reference).decode())}
    ours = {family.name: family for family in
            parse_text("".join(textformat.write(processmetrics.families(), [])))}
    assert ours.keys() == theirs.keys()
    for name, family in theirs.items():
        mine = ours[name]
        assert (mine.type, mine.documentation) == (family.type, family.documentation), name
        assert [s.name for s in mine.samples] == [s.name for s in family.samples], name
        assert [s.labels for s in mine.samples if not name.startswith("python_gc")] == \
               [s.labels for s in family.samples if not name.startswith("python_gc")], name
    value = {name: family.samples[0].value for name, family in ours.items()}
    reference_value = {name: family.samples[0].value for name, family in theirs.items()}
    for exact in ("process_start_time_seconds", "process_max_fds", "python_info"):
        assert value[exact] == pytest.approx(reference_value[exact], abs=0.02), exact
    for close in ("process_virtual_memory_bytes", "process_resident_memory_bytes"):
        assert value[close] == pytest.approx(reference_value[close], rel=0.1), close
    assert value["process_cpu_seconds"] == pytest.approx(reference_value["process_cpu_seconds"], abs=0.5)
    assert abs(value["process_open_fds"] - reference_value["process_open_fds"]) <= 2
