"""The attribution layer's own families, for prometheus-client, from Attributor.stats()."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def families(stats, families_capped=()):
    """Metric families of one stats() snapshot. `families_capped` names the capped families
    (e.g. tcpmon_connects_total), so each shows a 0 before anything is folded."""
    folded_now = GaugeMetricFamily("tcpmon_series_overflow", "Label sets of a family summed into its "
                                   "~other series at this worker's last scrape (raise --max-series)",
                                   labels=["family"])
    folded_total = CounterMetricFamily("tcpmon_series_folded", "Label sets of a family that began to be "
                                       "summed into its ~other series, by this worker", labels=["family"])
    for family in sorted(set(families_capped) | set(stats["series_folded_total"])):
        folded_now.add_metric([family], stats["series_folded"].get(family, 0))
        folded_total.add_metric([family], stats["series_folded_total"].get(family, 0))
    yield folded_now
    yield folded_total
    yield GaugeMetricFamily("tcpmon_attribution_cgroups", "cgroup id -> path entries cached by this worker",
                            value=stats["cgroups_cached"])
    yield GaugeMetricFamily("tcpmon_attribution_cgroups_max", "Capacity of that cache (--max-cgroups)",
                            value=stats["cgroups_max"])
    yield CounterMetricFamily("tcpmon_attribution_cgroup_walks", "Walks of the cgroup2 filesystem after a "
                              "cgroup id was not in the cache", value=stats["cgroup_walks"])
    yield CounterMetricFamily("tcpmon_attribution_kubernetes_requests", "Pod lists asked of the Kubernetes API",
                              value=stats["kube_requests"])
    yield CounterMetricFamily("tcpmon_attribution_kubernetes_errors", "Pod lists that failed (names stay "
                              "empty until one works)", value=stats["kube_errors"])
