"""cgroup path -> (unit, container_id, pod_uid) on real-world paths, each with where it was seen."""
import pytest

from tcpmon.attribution.paths import PathLabels, labels_of_path

# (path as /proc/PID/cgroup or cgroupfs shows it, unit, container_id, pod_uid, where it comes from)
SAMPLES = [
    # Kubernetes, systemd cgroup driver
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/"
     "cri-containerd-2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36.scope",
     "", "2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36", "55c6c714-b240-4dec-9a45-57b61696ab6e",
     "containerd, burstable: netdata/netdata#4868"),
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8daa50c3a64c9ff60bb9eab7b44b56fd.slice/"
     "cri-containerd-2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5.scope",
     "", "2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5", "8daa50c3a64c9ff60bb9eab7b44b56fd",
     "static pod (config hash as uid): netdata/netdata#4868"),
    ("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod8712f785_1a3e_41ec_a00b_e2dcc77431cb.slice/"
     "docker-73051af271105c07e1f493b34856a77e665e3b0b4fc72f76c807dfbffeb881bd.scope",
     "", "73051af271105c07e1f493b34856a77e665e3b0b4fc72f76c807dfbffeb881bd", "8712f785-1a3e-41ec-a00b-e2dcc77431cb",
     "Docker, besteffort: coroot-node-agent cgroup/fixtures/proc/400/cgroup"),
    ("/kubepods.slice/kubepods-podd0d034ed_5204_11e7_9710_507b9d27b5d9.slice/"
     "docker-a91b1981b6a4ae463fccd273e3f8665fd911e9abcaa1af27de773afb17ec4344.scope",
     "", "a91b1981b6a4ae463fccd273e3f8665fd911e9abcaa1af27de773afb17ec4344", "d0d034ed-5204-11e7-9710-507b9d27b5d9",
     "guaranteed (no QoS slice): a cgroup-parent extraction test (TestCGroupParentExtraction)"),
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-poda5c1f8d5_1919_434d_add7_4afaafdaef89.slice/"
     "crio-5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c.scope",
     "", "5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c", "a5c1f8d5-1919-434d-add7-4afaafdaef89",
     "CRI-O, calico-node: opencontainers/runc#4620"),
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podea19ff5d_943a_4466_a07e_a71e9e50cc62.slice/"
     "crio-21572039dd8398ff8272b031fa5422a40165145ab37f2f8794e1e7f844fe8118.scope/container",
     "", "21572039dd8398ff8272b031fa5422a40165145ab37f2f8794e1e7f844fe8118", "ea19ff5d-943a-4466-a07e-a71e9e50cc62",
     "CRI-O with crun's container sub-cgroup: coroot-node-agent cgroup_test.go"),
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-poda5c1f8d5_1919_434d_add7_4afaafdaef89.slice/"
     "crio-conmon-5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c.scope",
     "", "", "a5c1f8d5-1919-434d-add7-4afaafdaef89",
     "CRI-O's conmon (createConmonUnitName), not a container: cri-o; id of runc#4620"),
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3e61c214bc3ed9ff81e21474dd6cba17.slice/"
     "cri-containerd-c74b0f5062f0bc726cae1e9369ad4a95deed6b298d247f0407475adb23fa3190",
     "", "c74b0f5062f0bc726cae1e9369ad4a95deed6b298d247f0407475adb23fa3190", "3e61c214bc3ed9ff81e21474dd6cba17",
     "containerd without .scope: coroot-node-agent cgroup_test.go"),
    ("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
     "kubelet-kubepods-besteffort-pod18640755_cc12_4557_b96e_0f74d5b44d1d.slice/"
     "cri-containerd-66221e7d988e193822a3e8368b61ad9aeabf6b5276df76daebb7ea33bccc0b87.scope",
     "", "66221e7d988e193822a3e8368b61ad9aeabf6b5276df76daebb7ea33bccc0b87", "18640755-cc12-4557-b96e-0f74d5b44d1d",
     "kind (kubelet --cgroup-root=/kubelet): a mountinfo test fixture"),
    ("/docker/65a1b6ad09655b3f1475ede1aa0061a97c0d1ada9f2b2acac959afbc92094463/kubelet.slice/kubelet-kubepods.slice/"
     "kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod96dd7de3_0783_4613_a707_e0effc077ef5.slice/"
     "cri-containerd-13a0f64b909e3ff2d63f196d6947927a8af997ab68f8fa9ebb6d6c7018af4ec9.scope",
     "", "13a0f64b909e3ff2d63f196d6947927a8af997ab68f8fa9ebb6d6c7018af4ec9", "96dd7de3-0783-4613-a707-e0effc077ef5",
     "kind node container around the pod: the innermost container wins (a Rust agent's comment)"),
    ("/docker/d6701ec289c56e4391acb11d07474b3139466857a305490575508a8b7a9fcf22/kubepods.slice/kubepods-besteffort.slice/"
     "kubepods-besteffort-pod2ca4a155_3599_498d_bb9d_4446693fa3ea.slice/"
     "crio-358607a37e7ada357032e7f5729c9ae6a3efdb7962acbcbe47ff6a3c5506cb1c.scope",
     "", "358607a37e7ada357032e7f5729c9ae6a3efdb7962acbcbe47ff6a3c5506cb1c", "2ca4a155-3599-498d-bb9d-4446693fa3ea",
     "minikube node, kube-proxy under CRI-O: kubernetes/minikube#11280"),
    # containerd running without systemd under a kubelet with the systemd driver: 'slice:prefix:id' names
    ("/system.slice/containerd.service/kubepods-burstable-pod4ed02c0b_0df8_4d14_a30e_fd589ee4143a.slice:"
     "cri-containerd:d4a9f9195eaf7e4a729f24151101e1de61f1398677e7b82acfb936dff0b4ce55",
     "", "d4a9f9195eaf7e4a729f24151101e1de61f1398677e7b82acfb936dff0b4ce55", "4ed02c0b-0df8-4d14-a30e-fd589ee4143a",
     "not containerd.service's unit: coroot-node-agent cgroup_test.go, containerd/containerd#5226"),
    ("/kubepods-burstable-podbd12dd3393227d950605a2444b13c27a.slice:cri-containerd:"
     "d52db56a9c80d536a91354c0951c061187ca46249e64865a12703003d8f42366",
     "", "d52db56a9c80d536a91354c0951c061187ca46249e64865a12703003d8f42366", "bd12dd3393227d950605a2444b13c27a",
     "falcosecurity/plugins container matchers.cpp"),
    # Kubernetes, cgroupfs driver
    ("/kubepods/burstable/pod6a4ce4a0-ba47-11ea-b2a7-0cc47ac5979e/"
     "17db96a24ae1e9dd57143e62b1cb0d2d35e693c65c774c7470e87b0572e07c1a",
     "", "17db96a24ae1e9dd57143e62b1cb0d2d35e693c65c774c7470e87b0572e07c1a", "6a4ce4a0-ba47-11ea-b2a7-0cc47ac5979e",
     "Docker, burstable: coroot-node-agent cgroup/fixtures/proc/300/cgroup"),
    ("/kubepods/besteffort/pod0d08203e-255a-11e9-8cd9-0007cb0b2cc8/"
     "671a50f5d60566556912f61511d0ec9e4d5c78d53fbc4676727180438bbbbc55/kube-proxy",
     "", "671a50f5d60566556912f61511d0ec9e4d5c78d53fbc4676727180438bbbbc55", "0d08203e-255a-11e9-8cd9-0007cb0b2cc8",
     "a sub-cgroup of the container: coroot-node-agent cgroup_test.go"),
    ("/kubepods/poda38c12e8-255a-11e9-8cd9-0007cb0b2cc8/"
     "32c562ed81a2622b37b80cb216859820ba51bd694f60ee4cf10d07a4011266f8",
     "", "32c562ed81a2622b37b80cb216859820ba51bd694f60ee4cf10d07a4011266f8", "a38c12e8-255a-11e9-8cd9-0007cb0b2cc8",
     "guaranteed (no QoS level): coroot-node-agent cgroup_test.go"),
    ("/kubepods/burstable/pod9729a196c4723b60ab401eaff722982d/"
     "d166c6190614efc91956b78e96d74c3fbc96ca8e91948c36de3bc5b0e7b27d48",
     "", "d166c6190614efc91956b78e96d74c3fbc96ca8e91948c36de3bc5b0e7b27d48", "9729a196c4723b60ab401eaff722982d",
     "static pod: coroot-node-agent cgroup_test.go"),
    ("/kubepods/besteffort/podac04f3f2-1f2c-11e9-b015-1ebee232acfa/"
     "605439acbd4fb18c145069289094b17f17e0cfa938f78012d4960bc797305f22",
     "", "605439acbd4fb18c145069289094b17f17e0cfa938f78012d4960bc797305f22", "ac04f3f2-1f2c-11e9-b015-1ebee232acfa",
     "containerd: falcosecurity/plugins matchers.cpp"),
    ("/kubepods/besteffort/pod63b3ebfc-2890-11e9-8154-16bf8ef8d9dc/"
     "crio-73bfe475650de66df8e2affdc98d440dcbe84f8df83b6f75a68a82eb7026136a",
     "", "73bfe475650de66df8e2affdc98d440dcbe84f8df83b6f75a68a82eb7026136a", "63b3ebfc-2890-11e9-8154-16bf8ef8d9dc",
     "CRI-O: falcosecurity/plugins matchers.cpp"),
    ("/kubepods/kubepods/besteffort/pod0e886e9a-3879-45f9-b44d-86ef9df03224/"
     "244a65edefdffe31685c42317c9054e71dc1193048cf9459e2a4dd35cbc1dba4",
     "", "244a65edefdffe31685c42317c9054e71dc1193048cf9459e2a4dd35cbc1dba4", "0e886e9a-3879-45f9-b44d-86ef9df03224",
     "nested kubepods: elastic APM agent's container-info fixtures"),
    ("/kubepods.slice/kubepods-burstable.slice", "", "", "", "a QoS slice: no pod, no container"),
    # containers outside Kubernetes
    ("/system.slice/docker-cf87ba651579c9231db817909e7865e5747bd7abcac0c57ce23cf4abbaee046b.scope",
     "", "cf87ba651579c9231db817909e7865e5747bd7abcac0c57ce23cf4abbaee046b", "",
     "Docker, systemd driver: coroot-node-agent cgroup/fixtures/proc/800/cgroup"),
    ("/docker/b43d92bf1e5c6f78bb9b7bc6f40721280299855ba692092716e3a1b6c0b86f3f",
     "", "b43d92bf1e5c6f78bb9b7bc6f40721280299855ba692092716e3a1b6c0b86f3f", "",
     "Docker, cgroupfs driver: coroot-node-agent cgroup/fixtures/proc/200/cgroup"),
    ("/docker.slice/docker-7951fb549ab99e0722a949b6c121634e1f3a36b5bacbe5392991e3b12251e6b8.scope",
     "", "7951fb549ab99e0722a949b6c121634e1f3a36b5bacbe5392991e3b12251e6b8", "",
     "Docker in docker.slice: falcosecurity/plugins matchers.cpp"),
    ("/libpod_parent/libpod-385c0860f57110274da1d8b5025e5b9f32b12c1e53c928bc1105ef677c9cda0e",
     "", "385c0860f57110274da1d8b5025e5b9f32b12c1e53c928bc1105ef677c9cda0e", "",
     "podman 4.3 + runc, cgroupfs manager: measured on this build machine"),
    ("/user.slice/user-0.slice/user@0.service/machine.slice/"
     "libpod-cf21d19260ace8544fe8b769fc2638bf2c0873dfbfff0b6253f0569b26a1d5eb.scope/container",
     "user@0.service", "cf21d19260ace8544fe8b769fc2638bf2c0873dfbfff0b6253f0569b26a1d5eb", "",
     "podman, systemd manager, crun's sub-cgroup: containers/podman#20423"),
    ("/machine.slice/libpod-conmon-385c0860f57110274da1d8b5025e5b9f32b12c1e53c928bc1105ef677c9cda0e.scope",
     "", "", "", "podman's conmon is not the container: coroot-node-agent cgroup/fixtures/proc/4300 (shape)"),
    ("/system.slice/nginx.service/libpod-payload-9687bac58d5c4d1606aa46af33d1a21c1d1652e0ac9fb3fc0fc86e3495f42869",
     "nginx.service", "9687bac58d5c4d1606aa46af33d1a21c1d1652e0ac9fb3fc0fc86e3495f42869", "",
     "a quadlet unit (podman --cgroups=split): systemctl status nginx.service in a Quadlet how-to"),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/redis.service/"
     "libpod-payload-e8c29da1a2f6c4bb032304f7dfbc5a767e026092c4a2fcbc830e58565f972f54",
     "redis.service", "e8c29da1a2f6c4bb032304f7dfbc5a767e026092c4a2fcbc830e58565f972f54", "",
     "a rootless quadlet: systemctl --user status redis.service"),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/redis.service/runtime",
     "redis.service", "", "", "the same quadlet's conmon and rootlessport"),
    ("/user.slice/user-1003.slice/user@1003.service/app.slice/app-kollektivkart.slice/kollektivkart@8000.service/"
     "libpod-payload-fdd0fbf5a81144fdfc6d8383debbd0808cd4a569dadba51e9273280bec5bab8b",
     "kollektivkart@8000.service", "fdd0fbf5a81144fdfc6d8383debbd0808cd4a569dadba51e9273280bec5bab8b", "",
     "a templated rootless quadlet: systemctl --user status"),
    ("/lxc.payload.first/system.slice/systemd-logind.service", "systemd-logind.service", "", "",
     "inside an LXC container: coroot-node-agent cgroup/fixtures/proc/3000/cgroup"),
    # bare metal: systemd units (expectations of systemd's own cg_path_get_[user_]unit tests)
    ("/system.slice/ssh.service", "ssh.service", "", "", "coroot-node-agent cgroup/fixtures/proc/550/cgroup"),
    ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service", "", "",
     "coroot-node-agent cgroup/fixtures/proc/1000/cgroup"),
    ("/system.slice/system-postgresql.slice/postgresql@9.4-main.service", "postgresql@9.4-main.service", "", "",
     "coroot-node-agent cgroup_test.go"),
    ("/system.slice/system-serial\\x2dgetty.slice", "", "", "", "a slice is not a unit: coroot-node-agent"),
    ("/runtime.slice/kubelet.service", "kubelet.service", "", "", "Talos: coroot-node-agent cgroup_test.go"),
    ("/system.slice/foobar.service/sdfdsaf", "foobar.service", "", "", "systemd test-cgroup-util.c"),
    ("/system.slice/getty@tty6.service/tty5", "getty@tty6.service", "", "", "systemd test-cgroup-util.c"),
    ("/system.slice/system-waldo.slice/_cpu.service/sdfdsaf", "cpu.service", "", "",
     "systemd escapes names like kernel files: test-cgroup-util.c"),
    ("/user.slice/user-1000.slice/user@1000.service/server.service", "server.service", "", "",
     "the user unit, as cg_path_get_user_unit: systemd test-cgroup-util.c"),
    ("/user.slice/user-1000.slice/session-2.scope/waldo.slice/foobar.service", "foobar.service", "", "",
     "systemd test-cgroup-util.c"),
    ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope", "", "", "a login session"),
    ("/user.slice/user-1000.slice/user@1000.service/init.scope", "init.scope", "", "",
     "the user's systemd: falcosecurity/plugins matchers.cpp"),
    ("/init.scope", "init.scope", "", "", "PID 1"),
    ("/", "", "", "", "the root cgroup: kernel threads and unmanaged processes"),
    ("", "", "", "", "the root cgroup, relative"),
]


@pytest.mark.parametrize("path, unit, container_id, pod_uid, source", SAMPLES, ids=[s[4] for s in SAMPLES])
def test_real_world_paths(path, unit, container_id, pod_uid, source):
    assert labels_of_path(path) == PathLabels(unit, container_id, pod_uid)
    assert labels_of_path(path.lstrip("/")) == PathLabels(unit, container_id, pod_uid)


@pytest.mark.parametrize("path", [
    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podnot_a_uid.slice",
    "/system.slice/pod8712f785-1a3e-41ec-a00b-e2dcc77431cb",                  # pod<uid> outside kubepods
    "/docker/B43D92BF1E5C6F78BB9B7BC6F40721280299855BA692092716E3A1B6C0B86F3F",  # ids are lowercase hex
    "/docker/b43d92bf1e5c6f78bb9b7bc6f40721280299855ba692092716e3a1b6c0b86f3",    # 63 digits
    "/system.slice/docker-cf87ba651579c9231db817909e7865e5747bd7abcac0c57ce23cf4abbaee046b.scope.mount",
])
def test_lookalikes_give_nothing(path):
    labels = labels_of_path(path)
    assert labels.container_id == "" and labels.pod_uid == ""


def test_a_container_in_a_pod_never_takes_a_unit_from_outside_it():
    inside = labels_of_path("/kubepods.slice/kubepods-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/"
                            "cri-containerd-2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36.scope/"
                            "init.scope")
    assert inside.unit == "init.scope"   # systemd running as the container's payload
