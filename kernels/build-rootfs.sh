#!/usr/bin/env bash
# The root filesystem of a foreign-arch kernel-matrix guest; prints its path.
#
#   kernels/build-rootfs.sh arm64   -> .cache/kernels/rootfs-arm64
#
# x86 guests share the host's own root; an arm64 guest cannot run the host's
# binaries, so it gets the Debian arm64 sysroot scripts/build-cross.sh makes
# (python3.11, libbpf1, coreutils, bpftool, ...) plus tcpmon's cross-built
# arm64 wheel and the wheels of its whole runtime closure (gevent, greenlet,
# PyYAML, gunicorn, ...; kernels/runtime_deps.py: the host .venv's versions,
# aarch64 wheels from PyPI) in /usr/local/lib/python3.11/dist-packages.
# Rebuilt when a file that goes into the root, a pin or the sysroot changes.  The guest mounts it read-only over
# virtio-9p, with the repository at its host path for guest_smoke.py.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
arch=${1:?usage: build-rootfs.sh arm64}
[ "$arch" = arm64 ] || { echo "build-rootfs: only arm64 guests get a built root" >&2; exit 2; }
cache=$root/.cache/kernels
rootfs=$cache/rootfs-$arch
site=usr/local/lib/python3.11/dist-packages
say() { echo "build-rootfs: $*" >&2; }

py=$root/.venv/bin/python
[ -x "$py" ] || { say "no $root/.venv: run 'make build' first"; exit 1; }
# The runtime dependencies (gevent, PyYAML, ... and theirs) at the host .venv's versions.
pins=$("$py" "$root/kernels/runtime_deps.py" --machine aarch64) || { say "cannot list tcpmon's runtime dependencies"; exit 1; }

# What the root is made of: every file the wheel is built from (scripts/build-cross.sh
# --sources), these scripts, the pinned dependencies and the sysroot's package list.
# A file that is not there yet (the sysroot's list on a cold cache) counts as absent,
# explicitly: cat under pipefail would end the script without a word.
key_of() {
	local file
	{
		for file in $("$root/scripts/build-cross.sh" --sources) scripts/build-cross.sh scripts/debian-apt.sh \
			kernels/build-rootfs.sh kernels/runtime_deps.py ".cache/cross/$arch/sysroot.done"; do
			if [ -f "$root/$file" ]; then
				echo "$file $(sha256sum <"$root/$file" | cut -d' ' -f1)"
			else
				echo "$file absent"
			fi
		done
		echo "$pins"
	} | sha256sum | cut -d' ' -f1
}
key=$(key_of)
if [ -f "$rootfs.key" ] && [ "$(cat "$rootfs.key")" = "$key" ] && [ -d "$rootfs/$site/tcpmon" ]; then
	echo "$rootfs"
	exit 0
fi

wheel=$("$root/scripts/build-cross.sh" "$arch") || { say "scripts/build-cross.sh $arch failed (its messages are above)"; exit 1; }
sysroot=$root/.cache/cross/$arch/sysroot
say "assembling $rootfs"
rm -rf "$rootfs" "$rootfs.key"
mkdir -p "$cache"
cp -al "$sysroot" "$rootfs" # hard links: never write into an existing file below
mkdir -p "$rootfs/$site" "$rootfs"/{proc,sys,dev,tmp,run,var/tmp,etc} "$rootfs$root"
"$py" -m zipfile -e "$wheel" "$rootfs/$site"

# The dependencies' wheels for the guest (CPython 3.11 on glibc 2.36, aarch64: Debian 12),
# from PyPI, cached per pin so that a rebuild needs no network.
wheels=$cache/wheels-$arch
platforms=(--platform manylinux2014_aarch64) # pip does not widen a manylinux tag to older glibcs: list them
for glibc in $(seq 17 36); do platforms+=(--platform "manylinux_2_${glibc}_aarch64"); done
while read -r pin; do
	dir=$wheels/$pin
	if [ -z "$(find "$dir" -maxdepth 1 -name '*.whl' 2>/dev/null)" ]; then
		mkdir -p "$dir"
		"$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
			--python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}" \
			-d "$dir" "$pin" >&2 || { say "no aarch64 wheel for $pin from PyPI (pip download failed)"; exit 1; }
	fi
	file=$(find "$dir" -maxdepth 1 -name '*.whl' | head -1)
	[ -n "$file" ] || { say "no wheel for $pin in $dir"; exit 1; }
	"$py" -m zipfile -e "$file" "$rootfs/$site"
done <<<"$pins"

# The guest's python must import what the smoke runs (tcpmon serve: gevent, gunicorn, PyYAML):
# a missing library fails here, in one line, not in every mode of a booted guest.
if command -v qemu-aarch64-static >/dev/null; then
	got=$(cd "$rootfs" && PYTHONPATH=$rootfs/$site QEMU_LD_PREFIX=$rootfs qemu-aarch64-static "$rootfs/usr/bin/python3.11" \
		-c 'import tcpmon.cli, tcpmon.server, tcpmon.web' 2>&1) ||
		{ say "the arm64 root cannot import tcpmon's server: $(tail -1 <<<"$got") (in $rootfs)"; exit 1; }
fi

rm -f "$rootfs/etc/passwd" "$rootfs/etc/group" "$rootfs/etc/hosts"
echo "root:x:0:0:root:/tmp:/bin/sh" >"$rootfs/etc/passwd"
echo "root:x:0:" >"$rootfs/etc/group"
echo "127.0.0.1 localhost" >"$rootfs/etc/hosts"
# The key as of now: on a cold cache the sysroot's package list exists only since build-cross ran.
key_of >"$rootfs.key"
echo "$rootfs"
