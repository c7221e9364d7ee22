"""Metric families -> Prometheus text format 0.0.4, byte for byte what prometheus-client's
`generate_latest` writes, for the small families and the process metrics of every scrape.

tcpmon's own small families are plain `Family` tuples (`write`), with no prometheus-client
objects made per scrape; `to_client` makes those objects for the OpenMetrics format, and
`generate` writes any prometheus-client collector (the other workers' process metrics).

generate_latest escapes every metric and label name on every sample (for UTF-8 names), about
half of a 10k scrape's time beyond the map read; tcpmon's names are all legacy names, which
escape to themselves, so each is checked once, and each sample's text up to its value is remembered.  A family with
any other name goes through generate_latest itself.
"""
import re
from collections import namedtuple

from prometheus_client import exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.utils import floatToGoString

Family = namedtuple("Family", "name kind help labels samples")
Family.__doc__ = """One family: kind is "counter", "gauge" or "info"; labels are the label names;
samples are (label values, value) pairs (an info family's value is 1).  A counter's name is
without the _total of its samples, an info's without its _info."""

_LEGACY_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LEGACY_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_RENAMED = {"counter": ("_total", "counter"), "info": ("_info", "gauge"), "stateset": ("", "gauge"),
            "gaugehistogram": ("", "histogram"), "unknown": ("", "untyped")}
_OPENMETRICS_ONLY = ("_created", "_gsum", "_gcount")   # moved into gauges of their own, at the end
_MAX_REMEMBERED = 4096
_heads = {}      # (family name, type, help) -> its HELP and TYPE lines
_prefixes = {}   # (sample name, labels) -> the sample line up to its value, or None: not a legacy name


def _escape(value):
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _prefix(sample):
    key = (sample.name, tuple(sorted(sample.labels.items())))
    prefix = _prefixes.get(key, False)
    if prefix is False:
        if len(_prefixes) > _MAX_REMEMBERED:
            _prefixes.clear()
        legacy = _LEGACY_NAME.match(sample.name) and all(_LEGACY_LABEL.match(k) for k, _ in key[1])
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in key[1])
        prefix = _prefixes[key] = None if not legacy else f"{sample.name}{{{text}}} " if text else f"{sample.name} "
    return prefix


def _value(value):
    """floatToGoString, with the common case (a finite number without Go's exponent) inline."""
    d = float(value)
    text = repr(d)
    if d > 0 and text.find(".") > 6 or d != d or d in (_INF, -_INF):
        return floatToGoString(d)
    return text


_INF = float("inf")


def _line(sample, prefix):
    if sample.timestamp is not None:
        return f"{prefix}{_value(sample.value)} {int(float(sample.timestamp) * 1000):d}\n"
    return f"{prefix}{_value(sample.value)}\n"


class _One:
    """A registry of one family, for generate_latest."""

    def __init__(self, metric):
        self.metric = metric

    def collect(self):
        return [self.metric]


def _remembered(cache, make, *key):
    """cache[key], made by make(*key) the first time; a cache grown past _MAX_REMEMBERED starts over."""
    text = cache.get(key)
    if text is None:
        if len(cache) > _MAX_REMEMBERED:
            cache.clear()
        text = cache[key] = make(*key)
    return text


def _make_head(name, kind, documentation):
    doc = documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


def _head(name, kind, documentation):
    return _remembered(_heads, _make_head, name, kind, documentation)


def _family(metric, out):
    prefixes = [_prefix(sample) for sample in metric.samples]
    if None in prefixes or not _LEGACY_NAME.match(metric.name):
        out.append(exposition.generate_latest(_One(metric)).decode())
        return
    suffix, kind = _RENAMED.get(metric.type, ("", metric.type))
    out.append(_head(metric.name + suffix, kind, metric.documentation))
    moved = {}
    for sample, prefix in zip(metric.samples, prefixes):
        if sample.name != metric.name and sample.name[len(metric.name):] in _OPENMETRICS_ONLY \
                and sample.name.startswith(metric.name):
            moved.setdefault(sample.name[len(metric.name):], []).append(_line(sample, prefix))
        else:
            out.append(_line(sample, prefix))
    for extra, lines in sorted(moved.items()):
        out.append(_head(metric.name + extra, "gauge", metric.documentation))
        out.extend(lines)


def generate(*collectors):
    """The text of every family the collectors (registries, or anything with collect()) yield."""
    out = []
    for collector in collectors:
        for metric in collector.collect():
            _family(metric, out)
    return "".join(out).encode("utf-8")


_SAMPLE_NAME = {"counter": ("_total", "counter"), "gauge": ("", "gauge"), "info": ("_info", "gauge")}
_sample_texts = {}   # (sample name, label names, label values) -> the sample line up to its value,
#                      labels sorted by name as generate_latest writes them


def _make_sample_text(name, labels, values):
    pairs = ",".join(f'{label}="{_escape(value)}"' for label, value in sorted(zip(labels, values)))
    return f"{name}{{{pairs}}} " if pairs else f"{name} "


def write(families, out):
    """Append the text of `families` (Family tuples, tcpmon's own legacy names) to the list `out`."""
    for family in families:
        suffix, kind = _SAMPLE_NAME[family.kind]
        name = family.name + suffix
        out.append(_head(name, kind, family.help))
        for values, value in family.samples:
            out.append(f"{_remembered(_sample_texts, _make_sample_text, name, family.labels, values)}"
                       f"{_value(value)}\n")
    return out


def to_client(family):
    """The prometheus-client family of a Family, for prometheus-client's OpenMetrics writer."""
    if family.kind == "info":
        metric = InfoMetricFamily(family.name, family.help, labels=())
        for values, _ in family.samples:
            metric.add_metric((), dict(zip(family.labels, values)))
        return metric
    kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
    metric = kind(family.name, family.help, labels=family.labels)
    for values, value in family.samples:
        metric.add_metric(values, value)
    return metric


class ClientCollector:
    """Family tuples, as a prometheus-client collector (a registry's register() takes it)."""

    def __init__(self, families):
        self.families = families   # a callable: the Family tuples of this moment

    def collect(self):
        return map(to_client, self.families())
