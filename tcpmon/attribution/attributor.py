"""The Attributor: rows keyed by (cgroup id, comm) in, labelled and capped series out."""
from __future__ import annotations

import functools
import logging
import threading
import time
from typing import NamedTuple

from tcpmon.attribution import cardinality, kube
from tcpmon.attribution.cgroups import DEFAULT_MAX_CGROUPS, GONE, PENDING, CgroupPaths
from tcpmon.attribution.labels import NAME_LABELS, PATH_LABELS
from tcpmon.attribution.mounts import MOUNTS, find_cgroup2
from tcpmon.attribution.paths import labels_of_path

log = logging.getLogger("tcpmon.attribution")

DEFAULT_MAX_SERIES = 1000


class Config(NamedTuple):
    labels: tuple = PATH_LABELS          # parse_labels() of --labels
    max_series: int = DEFAULT_MAX_SERIES  # label sets per family before the rest fold into ~other
    max_cgroups: int = DEFAULT_MAX_CGROUPS
    cgroup_root: str = "auto"
    kubernetes: bool = False             # names from the API (in-cluster config)
    node_name: str = ""


class Series(NamedTuple):
    rows: list      # [(labels, values)]: labels = (comm, *values of label_names), values summed
    folded: int     # label sets summed into the ~other row
    gone: int       # cgroups removed: their rows are left out
    deferred: int   # cgroups created since the last walk: their rows are left out until the next one


class LabelView:
    """The labels of one scrape's cgroup ids, as the exposition asks for them."""

    def __init__(self, label_names, labels):
        self.label_names = label_names
        self._labels = labels   # id -> label values | GONE | PENDING
        self.gone = sum(1 for verdict in labels.values() if verdict is GONE)
        self.deferred = sum(1 for verdict in labels.values() if verdict is PENDING)

    def labels(self, cgroup_id):
        """The label values of label_names for `cgroup_id`, or None: its rows are left out (the
        cgroup is gone, or new since the last walk; an id the view was not made with, too)."""
        found = self._labels.get(cgroup_id, PENDING)
        return None if found is GONE or found is PENDING else found


class Attributor:
    """Labels cgroup ids with `label_names` and caps the series of each family.

    One per worker, thread-safe. Per scrape: view(ids) resolves every id once (a removed
    cgroup's rows are left out), cap(family, rows) sums rows with equal labels and folds the
    newest label sets beyond max_series into one row labelled ~other throughout; series() does
    both for (cgroup_id, comm, values) rows.
    """

    def __init__(self, config=Config(), mounts=MOUNTS, clock=time.monotonic, serviceaccount=kube.SERVICEACCOUNT,
                 environ=None):
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._folded = {}         # family -> label sets folded at its last call
        self.folded_total = {}    # family -> label sets that began to be folded, ever
        self.problem = None       # why labels are missing (readiness detail), or None
        self._paths = self._names = None
        self.label_names = ()
        self.cgroup_root = None
        if config.labels:
            self._open_cgroups(config, mounts)
        if self.label_names and config.kubernetes and set(NAME_LABELS) & set(self.label_names):
            self._open_kube(config, serviceaccount, environ)
        self._labels_of_path = functools.lru_cache(maxsize=config.max_cgroups)(labels_of_path)

    def _open_cgroups(self, config, mounts):
        hierarchy = find_cgroup2(config.cgroup_root, mounts)
        if hierarchy.path is None:
            self.problem = hierarchy.problem
            log.warning("%s", hierarchy.problem)
            return
        self.cgroup_root = hierarchy.path
        self.label_names = config.labels
        self._paths = CgroupPaths(hierarchy.path, config.max_cgroups, clock=self._clock)

    def _open_kube(self, config, serviceaccount, environ):
        try:
            cluster = kube.ClusterConfig.in_cluster(environ, serviceaccount)
        except kube.KubeError as exc:
            self.problem = f"{exc}; namespace, pod and container stay empty"
            log.warning("%s", self.problem)
            return
        self._names = kube.PodNames(kube.PodLister(cluster, config.node_name), clock=self._clock)

    def view(self, cgroup_ids):
        """One scrape's labels of `cgroup_ids` (every id the scrape will ask about)."""
        since = self._clock()
        cgroup_ids = set(cgroup_ids)
        with self._lock:
            if not self.label_names:
                return LabelView((), {cgroup_id: () for cgroup_id in cgroup_ids})
            return LabelView(self.label_names, self._labels_of(cgroup_ids, since))

    def cap(self, family, rows, add=cardinality.add_sequences):
        """fold() of (labels, values, cgroup_id) rows at --max-series, counting what folds:
        ([(labels, values)] with the ~other row last, how many label sets are in it)."""
        with self._lock:
            result = cardinality.fold(rows, self.config.max_series, add)
            before = self._folded.get(family, frozenset())
            self.folded_total[family] = self.folded_total.get(family, 0) + len(result.folded - before)
            self._folded[family] = result.folded
        return result.rows, len(result.folded)

    def series(self, family, rows):
        """view() and cap() in one: rows of (cgroup_id, comm, values), comm being the label text
        and values a sequence of numbers as long in every row."""
        rows = list(rows)
        labels = self.view(cgroup_id for cgroup_id, _, _ in rows)
        kept = []
        for cgroup_id, comm, values in rows:
            who = labels.labels(cgroup_id)
            if who is not None:
                kept.append(((comm, *who), values, cgroup_id))
        capped, folded = self.cap(family, kept)
        return Series(capped, folded, labels.gone, labels.deferred)

    def _labels_of(self, cgroup_ids, since):
        """{id: label values in label_names order | GONE | PENDING}."""
        verdicts = self._paths.resolve(cgroup_ids, since)
        from_path = {cgroup_id: self._labels_of_path(path) for cgroup_id, path in verdicts.items()
                     if path is not GONE and path is not PENDING}
        names = {}
        if self._names is not None:
            names = self._names.names({(labels.pod_uid, labels.container_id)
                                       for labels in from_path.values() if labels.pod_uid})
        out = {}
        for cgroup_id, verdict in verdicts.items():
            if verdict is GONE or verdict is PENDING:
                out[cgroup_id] = verdict
                continue
            path_labels = from_path[cgroup_id]
            every = dict(zip(PATH_LABELS, path_labels))
            every.update(zip(NAME_LABELS, names.get((path_labels.pod_uid, path_labels.container_id), kube.NO_NAMES)))
            out[cgroup_id] = tuple(every[name] for name in self.label_names)
        return out

    def stats(self):
        """Counters and gauges of the attribution layer, for the exposition (see metrics.py)."""
        with self._lock:
            paths, names = self._paths, self._names
            return {
                "labels": self.label_names,
                "cgroup_root": self.cgroup_root,
                "problem": self.problem,
                "cgroups_cached": len(paths) if paths else 0,
                "cgroups_max": paths.max_entries if paths else 0,
                "cgroup_walks": paths.walks if paths else 0,
                "cgroups_evicted": paths.evictions if paths else 0,
                "kube_requests": names.requests if names else 0,
                "kube_errors": names.errors if names else 0,
                "kube_last_error": names.last_error if names else None,
                "series_folded": {family: len(folded) for family, folded in self._folded.items()},
                "series_folded_total": dict(self.folded_total),
            }
