"""Parsing the exporter's output with prometheus-client's own parser."""
import re

from prometheus_client.parser import text_string_to_metric_families

from tcpmon._render import comm_label


def samples(text, name):
    """{frozenset(labels.items()): value} of every sample called `name`."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = frozenset(sample.labels.items())
                assert key not in found, f"duplicate series {name}{sample.labels}"
                found[key] = sample.value
    return found


def pid_value(text, pid, comm):
    """tcp_connects_by_pid for (pid, raw comm bytes), or None when absent."""
    key = frozenset({"pid": str(pid), "comm": comm_label(comm)}.items())
    return samples(text, "tcp_connects_by_pid").get(key)


def comm_total(text, comm):
    key = frozenset({"comm": comm_label(comm)}.items())
    return samples(text, "tcpmon_connect_attempts_total").get(key)


def pids_of(text, comm):
    label = comm_label(comm)
    return {int(dict(key)["pid"]) for key in samples(text, "tcp_connects_by_pid") if dict(key)["comm"] == label}


def served_names(text):
    """Every sample name the exposition `text` declares (# TYPE), with a counter's _total
    and a histogram's _bucket, _sum and _count, whether or not it has samples yet."""
    suffixes = {"counter": ["", "_total"], "histogram": ["_bucket", "_sum", "_count"]}
    return {name + suffix for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.M)
            for suffix in suffixes.get(kind, [""])}
