"""The attribution layer's own families, as tcpmon.textformat Family tuples, from Attributor.stats()."""
from __future__ import annotations

from tcpmon.textformat import Family


def families(stats, families_capped=()):
    """Families of one stats() snapshot. `families_capped` names the capped families
    (e.g. tcpmon_connects_total), so each shows a 0 before anything is folded."""
    capped = sorted(set(families_capped) | set(stats["series_folded_total"]))
    yield Family("tcpmon_series_overflow", "gauge", "Label sets of a family summed into its "
                 "~other series at this worker's last scrape (raise --max-series)", ("family",),
                 [((family,), stats["series_folded"].get(family, 0)) for family in capped])
    yield Family("tcpmon_series_folded", "counter", "Label sets of a family that began to be "
                 "summed into its ~other series, by this worker", ("family",),
                 [((family,), stats["series_folded_total"].get(family, 0)) for family in capped])
    yield Family("tcpmon_attribution_cgroups", "gauge", "cgroup id -> path entries cached by this worker", (),
                 [((), stats["cgroups_cached"])])
    yield Family("tcpmon_attribution_cgroups_max", "gauge", "Capacity of that cache (--max-cgroups)", (),
                 [((), stats["cgroups_max"])])
    yield Family("tcpmon_attribution_cgroup_walks", "counter", "Walks of the cgroup2 filesystem after a "
                 "cgroup id was not in the cache", (), [((), stats["cgroup_walks"])])
    yield Family("tcpmon_attribution_kubernetes_requests", "counter", "Pod lists asked of the Kubernetes API",
                 (), [((), stats["kube_requests"])])
    yield Family("tcpmon_attribution_kubernetes_errors", "counter", "Pod lists that failed (names stay "
                 "empty until one works)", (), [((), stats["kube_errors"])])
