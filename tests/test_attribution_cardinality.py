"""The series cap and the label choice: what is kept, what folds into ~other, what is counted."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpmon.attribution import LABELS, OTHER, Attributor, Config, parse_labels
from tcpmon.attribution.cardinality import fold
from tcpmon.attribution.labels import PATH_LABELS
from tcpmon.attribution.metrics import families


def test_rows_with_the_same_labels_are_summed():
    result = fold([(("curl", "a"), [1, 2], 7), (("curl", "a"), [10, 20], 3), (("wget", "a"), [5, 5], 9)], limit=10)
    assert result.rows == [(("curl", "a"), [11, 22]), (("wget", "a"), [5, 5])]
    assert result.folded == frozenset()


def test_beyond_the_limit_the_newest_fold_into_one_other_row():
    rows = [(("c", f"unit{i}.service"), [i, 1], 100 + i) for i in range(5)]
    result = fold(reversed(rows), limit=3)
    assert result.rows == [(("c", "unit0.service"), [0, 1]), (("c", "unit1.service"), [1, 1]),
                           (("c", "unit2.service"), [2, 1]), ((OTHER, OTHER), [3 + 4, 2])]
    assert result.folded == {("c", "unit3.service"), ("c", "unit4.service")}


def test_age_is_the_oldest_cgroup_behind_a_label_set():
    # unit-b's series started in an old cgroup: it stays when a newer label set comes
    rows = [(("c", "unit-a"), [1], 50), (("c", "unit-b"), [1], 90), (("c", "unit-b"), [1], 10)]
    assert fold(rows, limit=1).rows == [(("c", "unit-b"), [2]), ((OTHER, OTHER), [1])]


def test_a_comm_named_like_the_overflow_joins_it():
    rows = [((OTHER,), [1], 1), (("a",), [1], 2), (("b",), [1], 3)]
    assert fold(rows, limit=2).rows == [(("a",), [1]), ((OTHER,), [2])]


def test_rows_of_one_family_must_have_as_many_values():
    with pytest.raises(ValueError, match="as many values"):
        fold([(("a",), [1], 1), (("a",), [1, 2], 2)], limit=5)


@given(st.lists(st.tuples(st.sampled_from("abcdefg"), st.sampled_from("xyz"), st.integers(0, 50),
                          st.integers(0, 10**6)), max_size=60),
       st.integers(1, 25))
def test_folding_never_loses_or_invents_counts(rows, limit):
    triples = [((comm, unit), [count, 1], age) for comm, unit, count, age in rows]
    result = fold(triples, limit)
    labels = [labels for labels, _ in result.rows]
    assert len(labels) == len(set(labels)) <= limit + 1
    assert [sum(values[i] for _, values in result.rows) for i in (0, 1)] == \
           [sum(values[i] for _, values, _ in triples) for i in (0, 1)]
    if result.folded:
        assert labels[-1] == (OTHER, OTHER)
        assert len(labels) == limit + 1
    else:
        assert len(labels) == len({labels for labels, _, _ in triples})


def test_every_worker_folds_the_same_label_sets():
    rows = [(("c", f"u{i}"), [1], (i * 7919) % 101) for i in range(30)]
    assert fold(rows, 10) == fold(list(reversed(rows)), 10)


@pytest.mark.parametrize("text, kubernetes, labels", [
    ("auto", False, PATH_LABELS),
    ("auto", True, LABELS),
    ("all", False, LABELS),
    ("none", True, ()),
    ("", True, ()),
    ("pod,namespace", True, ("namespace", "pod")),
    (" unit , container_id ", False, ("unit", "container_id")),
])
def test_labels_flag(text, kubernetes, labels):
    assert parse_labels(text, kubernetes) == labels


def test_an_unknown_label_names_the_choices():
    with pytest.raises(ValueError, match="unknown attribution label 'image': use auto, all, none or some of unit,"):
        parse_labels("pod,image")


def test_without_labels_rows_merge_by_comm_and_nothing_is_walked():
    attributor = Attributor(Config(labels=()))
    series = attributor.series("f", [(1, "a", [1]), (2, "a", [2]), (3, "b", [4])])
    assert series.rows == [(("a",), [3]), (("b",), [4])]
    assert attributor.label_names == () and attributor.stats()["cgroup_walks"] == 0


def test_folded_label_sets_are_counted_when_they_begin_to_fold():
    attributor = Attributor(Config(labels=(), max_series=2))
    rows = [(i, f"c{i}", [1]) for i in range(1, 5)]
    first = attributor.series("tcpmon_connects_total", rows)
    assert first.folded == 2 and first.rows[-1] == ((OTHER,), [2])
    attributor.series("tcpmon_connects_total", rows)               # the same two stay folded: not counted again
    attributor.series("tcpmon_connects_total", rows + [(9, "c9", [1])])
    attributor.series("tcpmon_connect_duration_seconds", rows[:2])
    stats = attributor.stats()
    assert stats["series_folded_total"] == {"tcpmon_connects_total": 3, "tcpmon_connect_duration_seconds": 0}
    assert stats["series_folded"] == {"tcpmon_connects_total": 3, "tcpmon_connect_duration_seconds": 0}
    by_name = {(family.name, family.kind): {values[0]: value for values, value in family.samples}
               for family in families(stats, ["tcpmon_connects_total"]) if family.labels == ("family",)}
    assert by_name[("tcpmon_series_folded", "counter")] == {"tcpmon_connects_total": 3,
                                                            "tcpmon_connect_duration_seconds": 0}
    assert by_name[("tcpmon_series_overflow", "gauge")]["tcpmon_connects_total"] == 3


def test_the_exposition_folds_label_sets_beyond_the_cap_into_one_other_series():
    from metrics import samples
    from tcpmon import maps
    from tcpmon.collector import MapRead, Snapshot
    from tcpmon.exposition import Renderer
    entries = [(5, b"curl", 2), (6, b"curl", 3), (7, b"wget", 4), (8, b"nc", 1)]  # (cgroup id, comm, successes)
    keys = b"".join(maps.OUTCOMES.key.pack(cgroup_id=cg, comm=maps.comm_key(comm)) for cg, comm, _ in entries)
    values = b"".join(maps.OUTCOMES.value.pack(attempts=n, results=(n, 0, 0, 0, 0, 0),
                                               latency=(0, n) + (0,) * (maps.LATENCY_SLOTS - 2))
                      for _, _, n in entries)
    read = MapRead(keys, values, len(entries), 16, maps.OUTCOMES.value_size)
    renderer = Renderer(Attributor(Config(labels=(), max_series=2)))
    body = renderer.render(Snapshot(reads={maps.OUTCOMES.name: read})).decode()
    successes = {dict(k)["comm"]: v for k, v in samples(body, "tcpmon_connects_total").items()
                 if dict(k)["result"] == "success"}
    # curl (cgroups 5 and 6, one label set) and wget are the oldest two; nc folds into ~other
    assert successes == {"curl": 5, "wget": 4, OTHER: 1}
    buckets = {dict(k)["comm"]: v for k, v in samples(body, "tcpmon_connect_duration_seconds_bucket").items()
               if dict(k)["le"] == "4e-06"}
    assert buckets == {"curl": 5, "wget": 4, OTHER: 1}
    folded = samples(body, "tcpmon_series_overflow")
    assert folded[frozenset({"family": "tcpmon_connects_total"}.items())] == 1
