"""The series cap: at most `limit` label sets per family, the rest summed into one overflow row."""
from __future__ import annotations

from typing import NamedTuple

from tcpmon.attribution.labels import OTHER


class Folded(NamedTuple):
    rows: list           # [(labels, values)]: the kept label sets by labels, then the overflow row
    folded: frozenset    # the label sets summed into the overflow row


def _add(total, values):
    if len(total) != len(values):
        raise ValueError(f"rows of one family must have as many values: {len(total)} != {len(values)}")
    for i, value in enumerate(values):
        total[i] += value


def merge(rows):
    """{labels: [summed values, age]}: rows with equal labels are one series; its age is the
    oldest (smallest) age among them."""
    merged = {}
    for labels, values, age in rows:
        entry = merged.get(labels)
        if entry is None:
            merged[labels] = [list(values), age]
        else:
            _add(entry[0], values)
            entry[1] = min(entry[1], age)
    return merged


def fold(rows, limit):
    """Keep the `limit` oldest label sets of `rows` ((labels, values, age) triples) and sum the
    others into one row whose every label is OTHER.

    Oldest first, so that a series, once exported, stays exported while newer ones fold:
    ages are cgroup ids, which only grow, so every worker and every scrape picks the same ones.
    """
    merged = merge(rows)
    if len(merged) <= limit:
        return Folded(sorted((labels, values) for labels, (values, _) in merged.items()), frozenset())
    by_age = sorted(merged.items(), key=lambda item: (item[1][1], item[0]))
    kept = sorted((labels, values) for labels, (values, _) in by_age[:limit])
    overflow = None
    for labels, (values, _) in by_age[limit:]:
        if overflow is None:
            overflow = list(values)
        else:
            _add(overflow, values)
    other = (OTHER,) * len(by_age[0][0])
    for i, (labels, values) in enumerate(kept):
        if labels == other:   # a real series spelled like the overflow one (a comm named ~other) joins it
            _add(overflow, values)
            del kept[i]
            break
    kept.append((other, overflow))
    return Folded(kept, frozenset(labels for labels, _ in by_age[limit:]))
