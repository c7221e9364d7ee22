"""Attribution: which systemd unit, container and pod a cgroup id belongs to.

    attributor = Attributor(Config(labels=parse_labels("auto"), max_series=1000))
    series = attributor.series("tcpmon_connects_total", [(cgroup_id, comm, values), ...])
    attributor.label_names   # the attribution label names after comm, in LABELS order
    series.rows              # [((comm, *label values), summed values)], ~other row last

mounts.py finds the cgroup2 mount, cgroups.py maps ids to paths, paths.py paths to labels,
kube.py container ids and pod uids to names, cardinality.py caps the series; attributor.py
puts them together and metrics.py exposes its own counters.
"""
from tcpmon.attribution.attributor import DEFAULT_MAX_SERIES, Attributor, Config, Series
from tcpmon.attribution.cgroups import DEFAULT_MAX_CGROUPS
from tcpmon.attribution.labels import LABELS, OTHER, parse_labels

__all__ = ["Attributor", "Config", "Series", "LABELS", "OTHER", "parse_labels", "DEFAULT_MAX_SERIES",
           "DEFAULT_MAX_CGROUPS"]
