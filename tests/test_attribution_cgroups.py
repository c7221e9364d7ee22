"""cgroup id -> path -> labels on real cgroups this test makes and moves its processes into,
checked against the ids bpftrace's `cgroup` builtin and name_to_handle_at(2) report."""
import os
import secrets
import subprocess
import sys
import uuid

import pytest

from attribution_support import TestCgroups, bpftrace_cgroups, cgroup2_root, handle_id, unique_comm
from conftest import ROOT
from metrics import samples
from tcpmon.attribution import LABELS, Attributor, Config
from tcpmon.attribution.cgroups import GONE, PENDING, CgroupPaths, walk
from tcpmon.attribution.mounts import find_cgroup2


def _container_id():
    return secrets.token_hex(32)


def _pod_uid():
    return str(uuid.uuid4())


@pytest.fixture
def cgroups():
    made = TestCgroups()
    yield made
    made.close()
    assert not os.path.exists(os.path.join(made.root, made.top))


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _layout(cgroups):
    """{path: expected (unit, container_id, pod_uid, namespace, pod, container)} of real-looking cgroups."""
    cid1, cid2, cid3, uid1, uid2 = _container_id(), _container_id(), _container_id(), _pod_uid(), _pod_uid()
    return {
        cgroups.make(f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid1.replace('-', '_')}.slice/"
                     f"cri-containerd-{cid1}.scope"): ("", cid1, uid1, "", "", ""),
        cgroups.make(f"kubepods/burstable/pod{uid2}/{cid2}"): ("", cid2, uid2, "", "", ""),
        cgroups.make(f"system.slice/docker-{cid3}.scope"): ("", cid3, "", "", "", ""),
        cgroups.make(f"system.slice/tcpmon-test-{secrets.token_hex(2)}.service"): None,   # unit: its own name
        cgroups.make("user.slice/user-1000.slice/session-3.scope"): ("session-3.scope", "", "", "", "", ""),
    }


def test_cgroup2_is_found_in_proc_mounts():
    found = find_cgroup2()
    with open("/proc/self/mounts") as f:
        cgroup2 = [line.split()[1] for line in f if line.split()[2] == "cgroup2"]
    assert found.path in cgroup2 and found.problem is None
    assert os.stat(found.path).st_ino == 1


def test_ids_of_real_cgroups_are_what_bpftrace_sees_and_map_to_their_labels(cgroups):
    layout = _layout(cgroups)
    prefix = "tcpma" + secrets.token_hex(1)
    comms = {rel: unique_comm(prefix)[:15] for rel in layout}
    with bpftrace_cgroups(prefix) as seen:
        for rel, comm in comms.items():
            cgroups.run_in(rel, comm, connects=3)
    by_comm = {comm: cgroup_id for (comm, cgroup_id), count in seen.items() if count == 3}
    assert set(by_comm) == set(comms.values()), seen
    attributor = Attributor(Config(labels=LABELS))
    rows = [(by_comm[comm], comm, [3]) for comm in comms.values()]
    series = attributor.series("tcpmon_connects_total", rows)
    assert (series.gone, series.deferred, series.folded) == (0, 0, 0)
    got = {labels[0]: labels[1:] for labels, values in series.rows}
    for rel, comm in comms.items():
        assert by_comm[comm] == handle_id(cgroups.dir(rel)) == os.stat(cgroups.dir(rel)).st_ino
        expected = layout[rel] or (rel.rsplit("/", 1)[1], "", "", "", "", "")
        assert got[comm] == expected, rel
    assert sorted(values for _, values in series.rows) == [[3]] * len(comms)


def test_walk_maps_every_cgroup_dir_to_its_inode(cgroups):
    layout = _layout(cgroups)
    found = walk(cgroups.root)
    for rel in layout:
        assert found[handle_id(cgroups.dir(rel))] == rel
    assert found[1] == ""


def test_a_removed_cgroup_is_evicted_and_its_series_disappear(cgroups):
    rel = cgroups.make(f"system.slice/tcpmon-test-{secrets.token_hex(2)}.service")
    comm = unique_comm("tcpme")
    cgroups.run_in(rel, comm, connects=1)
    old_id = handle_id(cgroups.dir(rel))
    clock = FakeClock()
    attributor = Attributor(Config(labels=("unit",)), clock=clock)
    first = attributor.series("f", [(old_id, comm, [1])])
    assert first.rows == [((comm, rel.rsplit("/", 1)[1]), [1])]
    cgroups.remove(rel)
    # the same name again, as when systemd restarts the unit: a new cgroup, a new id
    os.mkdir(cgroups.dir(rel))
    new_id = handle_id(cgroups.dir(rel))
    assert new_id != old_id
    clock.now += 10   # past the check interval
    second = attributor.series("f", [(old_id, comm, [1]), (new_id, comm, [2])])
    assert second.gone == 1
    assert second.rows == [((comm, rel.rsplit("/", 1)[1]), [2])]
    assert attributor.stats()["cgroups_evicted"] >= 1


def test_a_cgroup_gone_before_it_was_ever_seen_is_left_out(cgroups):
    rel = cgroups.make("system.slice/tcpmon-test-short.service")
    short_lived = handle_id(cgroups.dir(rel))
    cgroups.remove(rel)
    paths = CgroupPaths(cgroups.root)
    assert paths.resolve([short_lived]) == {short_lived: GONE}
    assert paths.walks == 1
    assert paths.resolve([short_lived]) == {short_lived: GONE}
    assert paths.walks == 1   # remembered: ids are never reused


def test_many_cgroups_in_a_small_cache(cgroups):
    rels = [cgroups.make(f"kubepods/besteffort/pod{_pod_uid()}/{_container_id()}") for _ in range(120)]
    ids = {handle_id(cgroups.dir(rel)): rel for rel in rels}
    clock = FakeClock()
    paths = CgroupPaths(cgroups.root, max_entries=16, walk_interval=1.0, clock=clock)
    batches = [list(ids)[i:i + 10] for i in range(0, len(ids), 10)]
    for batch in batches:
        clock.now += 1
        assert paths.resolve(batch) == {cgroup_id: ids[cgroup_id] for cgroup_id in batch}
        assert len(paths) <= 16
    assert paths.walks == len(batches)
    # more ids than the cache holds, in one call: every one is still right, none declared gone
    clock.now += 1
    assert paths.resolve(list(ids)) == ids
    assert len(paths) == 16
    # a miss within the walk interval waits for the next scrape
    new = cgroups.make("system.slice/tcpmon-test-new.service")
    assert paths.resolve([handle_id(cgroups.dir(new))]) == {handle_id(cgroups.dir(new)): PENDING}
    clock.now += 1
    assert paths.resolve([handle_id(cgroups.dir(new))]) == {handle_id(cgroups.dir(new)): new}


def test_the_attributor_defers_rows_it_cannot_resolve_yet(cgroups):
    clock = FakeClock()
    attributor = Attributor(Config(labels=("unit",)), clock=clock)
    assert attributor.series("f", [(1, "init", [1])]).rows == [(("init", ""), [1])]
    rel = cgroups.make("system.slice/tcpmon-test-late.service")
    late = handle_id(cgroups.dir(rel))
    deferred = attributor.series("f", [(1, "init", [1]), (late, "late", [5])])
    assert (deferred.deferred, [labels for labels, _ in deferred.rows]) == (1, [("init", "")])
    clock.now += 1
    assert attributor.series("f", [(late, "late", [5])]).rows == [(("late", "tcpmon-test-late.service"), [5])]


def _in_mount_namespace(shell, code):
    """Runs python `code` after `shell` in a private mount namespace; its stdout."""
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             f'{shell} && exec "$0" -c "$1"', sys.executable, code],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


_REPORT = ("from tcpmon.attribution import Attributor, Config, LABELS; a = Attributor(Config(labels=LABELS)); "
           "s = a.series('f', [(1, 'x', [1]), (2, 'x', [2])]); print(repr((a.cgroup_root, a.label_names, s.rows)));"
           "print(a.problem)")


def test_pure_cgroup_v2_layout_is_found_at_sys_fs_cgroup():
    cgroup2_root()
    shell = ("for m in $(awk '$3 == \"cgroup2\" {print $2}' /proc/self/mounts); do umount -l $m; done; "
             "umount -l /sys/fs/cgroup 2>/dev/null; mount -t cgroup2 none /sys/fs/cgroup")
    root, problem = _in_mount_namespace(shell, _REPORT).splitlines()
    assert root.startswith("('/sys/fs/cgroup', ('unit',")
    assert problem == "None"


def test_no_cgroup2_at_all_exports_without_the_labels():
    shell = "for m in $(awk '$3 == \"cgroup2\" {print $2}' /proc/self/mounts); do umount -l $m; done; true"
    root, problem = _in_mount_namespace(shell, _REPORT).splitlines()
    assert root == "(None, (), [(('x',), [3])])"
    assert problem.startswith("no cgroup2 filesystem in /proc/self/mounts") and "without attribution labels" in problem


def test_a_cgroup_namespace_view_is_refused(cgroups):
    # what a pod sees without the host's /sys/fs/cgroup: only its own cgroup, as the root
    rel = cgroups.make("kubepods.slice/kubepods-pod" + _pod_uid().replace("-", "_") + ".slice")
    code = (f"import os; open({cgroups.dir(rel) + '/cgroup.procs'!r}, 'w').write(str(os.getpid())); "
            f"os.execvp('unshare', ['unshare', '--cgroup', '--mount', '--propagation', 'private', 'sh', '-c', "
            f"'for m in $(awk \\'$3 == \"cgroup2\" {{print $2}}\\' /proc/self/mounts); do umount -l $m; done; "
            f"mount -t cgroup2 none /sys/fs/cgroup/unified 2>/dev/null || mount -t cgroup2 none /sys/fs/cgroup; "
            f"exec \"$0\" -c \"$1\"', {sys.executable!r}, {_REPORT!r}])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    root, problem = result.stdout.strip().splitlines()
    assert root == "(None, (), [(('x',), [3])])"
    assert "shows only a part of the hierarchy" in problem and "--cgroup-root" in problem


def test_cgroup_root_flag_picks_the_mount_under_it():
    root = cgroup2_root()
    parent = os.path.dirname(root) if root.endswith("/unified") else root
    assert find_cgroup2(parent).path == root
    refused = find_cgroup2("/nonexistent")
    assert refused.path is None and "--cgroup-root /nonexistent" in refused.problem


def test_id_zero_has_no_labels_and_is_never_gone():
    series = Attributor(Config(labels=LABELS)).series("f", [(0, "x", [1])])
    assert (series.rows, series.gone) == ([(("x", "", "", "", "", "", ""), [1])], 0)


def test_an_unreadable_mounts_file_is_a_problem_not_a_crash(tmp_path):
    attributor = Attributor(Config(labels=LABELS), mounts=str(tmp_path / "missing"))
    assert attributor.label_names == () and "cannot read" in attributor.problem


def test_the_probe_s_cgroup_ids_map_to_the_cgroups_that_connected(cgroups, pin_dir):
    # the real chain: the loaded probe counts per (cgroup id, comm) in its outcomes map
    from tcpmon import maps
    from tcpmon._render import comm_label
    from tcpmon.collector import Collector
    from tcpmon.exposition import Renderer
    layout = _layout(cgroups)
    comms = {rel: unique_comm("tcpmp") for rel in layout}
    for rel, comm in comms.items():
        cgroups.run_in(rel, comm, connects=2)
    collector = Collector(pin_dir)
    try:
        snapshot = collector.snapshot()
    finally:
        collector.close()
    entries = [(key, value) for key, value in snapshot.entries(maps.OUTCOMES) if comm_label(key["comm"]) in comms.values()]
    assert {key["cgroup_id"] for key, _ in entries} == {handle_id(cgroups.dir(rel)) for rel in layout}
    # ... and the exposition labels each one's connects with its cgroup's unit, container and pod
    body = Renderer(Attributor(Config(labels=LABELS))).render(snapshot).decode()
    got = {}
    for labels, value in samples(body, "tcpmon_connects_total").items():
        labels = dict(labels)
        if labels["comm"] in comms.values():   # every result, summed: each connect ended one way
            shown = tuple(labels.get(name, "") for name in LABELS)   # an empty label is left out
            who, total = got.get(labels["comm"], (shown, 0))
            assert who == shown, "one comm and cgroup, one label set"
            got[labels["comm"]] = (who, total + value)
    for rel, comm in comms.items():
        assert got[comm] == (layout[rel] or (rel.rsplit("/", 1)[1], "", "", "", "", ""), 2), rel
    assert samples(body, "tcpmon_series_overflow")[frozenset({"family": "tcpmon_connects_total"}.items())] == 0


def test_a_unit_named_with_any_bytes_is_escaped_like_a_comm_and_the_scrape_stays_whole(cgroups, pin_dir):
    """cgroup names are bytes the kernel does not check (a delegated subtree lets users make
    them): control bytes and invalid UTF-8 come out as \\xNN, never a failed scrape."""
    from tcpmon import maps
    from tcpmon.collector import Collector
    from tcpmon.escaping import label_text
    from tcpmon.exposition import Renderer
    unit = f"bad\\{secrets.token_hex(2)}\x1b[31m\udcff\"q.service"   # \udcff: the byte 0xff, as os.fsdecode gives it
    rel = cgroups.make(f"system.slice/{unit}")
    comm = unique_comm("tcpmb")
    cgroups.run_in(rel, comm, connects=3)
    collector = Collector(pin_dir)
    try:
        snapshot = collector.snapshot()
    finally:
        collector.close()
    body = Renderer(Attributor(Config(labels=LABELS))).render(snapshot).decode()
    mine = {dict(k)["result"]: (dict(k)["unit"], v) for k, v in samples(body, "tcpmon_connects_total").items()
            if dict(k)["comm"] == comm}
    shown = label_text(unit)
    assert "\x1b" not in shown and "\\x1b" in shown and "\\xff" in shown and "\\x5c" in shown
    assert {result: who for result, (who, _) in mine.items()} == {result: shown for result in maps.RESULTS}
    assert sum(value for _, value in mine.values()) == 3
