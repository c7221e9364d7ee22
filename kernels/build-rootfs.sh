#!/usr/bin/env bash
# The root filesystem of a foreign-arch kernel-matrix guest; prints its path.
#
#   kernels/build-rootfs.sh arm64   -> .cache/kernels/rootfs-arm64
#
# x86 guests share the host's own root; an arm64 guest cannot run the host's
# binaries, so it gets the Debian arm64 sysroot scripts/build-cross.sh makes
# (python3.11, libbpf1, coreutils, bpftool, ...) plus tcpmon's cross-built
# arm64 wheel and the pure-Python wheels it needs (the host .venv's versions,
# from PyPI) in /usr/local/lib/python3.11/dist-packages.  Rebuilt when the
# package sources or the sysroot change.  The guest mounts it read-only over
# virtio-9p, with the repository at its host path for guest_smoke.py.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
arch=${1:?usage: build-rootfs.sh arm64}
[ "$arch" = arm64 ] || { echo "build-rootfs: only arm64 guests get a built root" >&2; exit 2; }
cache=$root/.cache/kernels
rootfs=$cache/rootfs-$arch
site=usr/local/lib/python3.11/dist-packages
PURE_DEPS=(prometheus_client gunicorn packaging)
say() { echo "build-rootfs: $*" >&2; }

# What the root depends on: the package's sources, these scripts and the sysroot's package list.
key=$(cd "$root" && cat setup.py ext/*.pyx ext/*.pxd bpf/*.c bpf/*.h bpf/Makefile tcpmon/*.py \
	scripts/build-cross.sh kernels/build-rootfs.sh \
	"$root/.cache/cross/$arch/sysroot.done" 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f "$rootfs.key" ] && [ "$(cat "$rootfs.key")" = "$key" ] && [ -d "$rootfs/$site/tcpmon" ]; then
	echo "$rootfs"
	exit 0
fi

wheel=$("$root/scripts/build-cross.sh" "$arch")
sysroot=$root/.cache/cross/$arch/sysroot
say "assembling $rootfs"
rm -rf "$rootfs" "$rootfs.key"
cp -al "$sysroot" "$rootfs" # hard links: never write into an existing file below
mkdir -p "$rootfs/$site" "$rootfs"/{proc,sys,dev,tmp,run,var/tmp,etc} "$rootfs$root"
"$root/.venv/bin/python" -m zipfile -e "$wheel" "$rootfs/$site"

# The pure-Python dependencies, at the versions the host's .venv tests with.
wheels=$cache/wheels
mkdir -p "$wheels"
pins=()
for dist in "${PURE_DEPS[@]}"; do
	pins+=("$dist==$("$root/.venv/bin/python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")")
done
"$root/.venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
	--python-version 3.11 --implementation py --abi none --platform any -d "$wheels" "${pins[@]}" >&2
for pin in "${pins[@]}"; do
	name=${pin%%==*} version=${pin#*==}
	file=$(find "$wheels" -maxdepth 1 -iname "${name//-/_}-${version}-*.whl" | head -1)
	[ -n "$file" ] || { say "no wheel for $pin in $wheels"; exit 1; }
	"$root/.venv/bin/python" -m zipfile -e "$file" "$rootfs/$site"
done

rm -f "$rootfs/etc/passwd" "$rootfs/etc/group" "$rootfs/etc/hosts"
echo "root:x:0:0:root:/tmp:/bin/sh" >"$rootfs/etc/passwd"
echo "root:x:0:" >"$rootfs/etc/group"
echo "127.0.0.1 localhost" >"$rootfs/etc/hosts"
echo "$key" >"$rootfs.key"
echo "$rootfs"
