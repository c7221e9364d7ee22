"""The series cap: at most `limit` label sets per family, the rest summed into one overflow row."""
from __future__ import annotations

from typing import NamedTuple

from tcpmon.attribution.labels import OTHER


class Folded(NamedTuple):
    rows: list           # [(labels, values)]: the kept label sets by labels, then the overflow row
    folded: frozenset    # the label sets summed into the overflow row


def add_sequences(total, values):
    """The default `add`: element-wise sums of equally long sequences of numbers."""
    if len(total) != len(values):
        raise ValueError(f"rows of one family must have as many values: {len(total)} != {len(values)}")
    return [a + b for a, b in zip(total, values)]


def merge(rows, add=add_sequences):
    """{labels: [summed values, age]}: rows with equal labels are one series, `add` sums their
    values; the age of a label set is the oldest (smallest) age among its rows."""
    merged = {}
    for labels, values, age in rows:
        entry = merged.get(labels)
        if entry is None:
            merged[labels] = [values, age]
        else:
            entry[0] = add(entry[0], values)
            entry[1] = min(entry[1], age)
    return merged


def fold(rows, limit, add=add_sequences):
    """Keep the `limit` oldest label sets of `rows` ((labels, values, age) triples) and sum the
    others into one row whose every label is OTHER.

    Oldest first, so that a series, once exported, stays exported while newer ones fold:
    ages are cgroup ids, which only grow, so every worker and every scrape picks the same ones.
    `add(a, b)` returns the sum of two rows' values (default: element-wise, for sequences).
    """
    merged = merge(rows, add)
    if len(merged) <= limit:
        return Folded(sorted(((labels, values) for labels, (values, _) in merged.items()), key=_by_labels),
                      frozenset())
    by_age = sorted(merged.items(), key=lambda item: (item[1][1], item[0]))
    kept = sorted(((labels, values) for labels, (values, _) in by_age[:limit]), key=_by_labels)
    overflow = None
    for _, (values, _) in by_age[limit:]:
        overflow = values if overflow is None else add(overflow, values)
    other = (OTHER,) * len(by_age[0][0])
    for i, (labels, values) in enumerate(kept):
        if labels == other:   # a real series spelled like the overflow one (a comm named ~other) joins it
            overflow = add(overflow, values)
            del kept[i]
            break
    kept.append((other, overflow))
    return Folded(kept, frozenset(labels for labels, _ in by_age[limit:]))


def _by_labels(row):
    return row[0]
