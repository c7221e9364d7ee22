"""Attribution: which systemd unit, container and pod a cgroup id belongs to.

    attributor = Attributor(Config(labels=parse_labels("auto"), max_series=1000))
    view = attributor.view(cgroup_ids)        # once per scrape
    view.label_names, view.labels(cgroup_id)  # the names after comm; the values, or None (leave out)
    rows, folded = attributor.cap("tcpmon_connects_total", [(labels, values, cgroup_id), ...])
    attributor.series(family, [(cgroup_id, comm, values), ...])   # view() and cap() in one

mounts.py finds the cgroup2 mount, cgroups.py maps ids to paths, paths.py paths to labels,
kube.py container ids and pod uids to names, cardinality.py caps the series; attributor.py
puts them together and metrics.py exposes its own counters.
"""
from tcpmon.attribution.attributor import DEFAULT_MAX_SERIES, Attributor, Config, LabelView, Series
from tcpmon.attribution.cgroups import DEFAULT_MAX_CGROUPS
from tcpmon.attribution.labels import LABELS, OTHER, parse_labels

__all__ = ["Attributor", "Config", "LabelView", "Series", "LABELS", "OTHER", "parse_labels", "DEFAULT_MAX_SERIES",
           "DEFAULT_MAX_CGROUPS"]
