#!/usr/bin/env bash
# Cross-builds the tcpmon package (its Cython extensions and the arch's BPF
# object) as a wheel for another Debian architecture, on an amd64 Debian host:
#
#   scripts/build-cross.sh [--no-run] [arm64|arm]   -> build/cross/<arch>/tcpmon-*.whl
#   scripts/build-cross.sh --sources                 -> the repository files the wheel is built from
#
# 1. A sysroot of the target's Debian packages (python3.11, libpython3.11-dev,
#    libbpf-dev, libc6-dev, ...) unpacked from .debs that scripts/debian-apt.sh
#    fetches into .cache/cross/<arch>/sysroot; the host's dpkg architectures
#    and apt state are left alone (no `dpkg --add-architecture`).
# 2. The project's own setup.py (bdist_wheel), run by the host's .venv Python
#    with the target's sysconfig data (_PYTHON_SYSCONFIGDATA_NAME) and the
#    Debian cross compiler (CC=<triplet>-gcc --sysroot=...).
# 3. Checks: every extension is an ELF for the target machine, _libbpf links
#    libbpf.so.1, and (unless --no-run) the target's own python3.11 under
#    qemu-user imports the package and runs `python -m tcpmon dump` (qemu-user
#    has no bpf(2), so that ends in ENOSYS; the kernel matrix's arm64 guests
#    run the same wheel for real).
#
# Needs gcc-<triplet> (e.g. gcc-aarch64-linux-gnu) and qemu-user-static.
# arm64 is what the kernel matrix's arm64 guests run; arm (armhf) builds and
# imports under qemu-user the same way but boots in no guest; riscv is refused
# (no Debian 12 port).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

# The repository files the wheel is built from (relative to the root, sorted): the
# package with every subpackage, the extensions and the BPF sources.  kernels/build-rootfs.sh
# keys its cache on these, so a file added to the package is both shipped and noticed.
sources() {
	(cd "$root" && {
		echo setup.py
		find ext -maxdepth 1 \( -name '*.pyx' -o -name '*.pxd' \) -type f
		find bpf -maxdepth 1 \( -name '*.c' -o -name '*.h' -o -name Makefile \) -type f
		find tcpmon -name '*.py' -type f -not -path '*/__pycache__/*'
	} | LC_ALL=C sort)
}
if [ "${1:-}" = --sources ]; then
	sources
	exit 0
fi
run=1
if [ "${1:-}" = --no-run ]; then
	run=0
	shift
fi
arch=${1:-arm64}
case $arch in
arm64) debarch=arm64 triplet=aarch64-linux-gnu machine=AArch64 qemu=qemu-aarch64-static plat=linux-aarch64 ;;
arm) debarch=armhf triplet=arm-linux-gnueabihf machine=ARM qemu=qemu-arm-static plat=linux-armv7l ;;
riscv)
	echo "build-cross: riscv: Debian 12 has no riscv64 port (official from Debian 13, with Python 3.13);" \
		"a trixie sysroot and a cp313 wheel would be needed" >&2
	exit 2
	;;
*) echo "build-cross: arch $arch: use arm64 or arm" >&2; exit 2 ;;
esac
# What the build needs from the target, and what the kernel-matrix guest runs with
# (libstdc++6: greenlet's manylinux wheel, under gevent, links the system's C++ runtime).
PACKAGES=(libc6-dev linux-libc-dev libpython3.11-dev libbpf-dev libelf-dev zlib1g-dev
	python3.11 python3-minimal coreutils busybox-static bpftool libstdc++6)
cache=$root/.cache/cross/$arch
sysroot=$cache/sysroot
out=$root/build/cross/$arch
say() { echo "build-cross: $*" >&2; }
die() {
	say "$*"
	exit 1
}

command -v "$triplet-gcc" >/dev/null || die "$triplet-gcc not found: apt-get install gcc-$triplet"
[ -x "$root/.venv/bin/python" ] || die "no .venv: run 'make build' first"

# --- 1. sysroot ------------------------------------------------------------
mkdir -p "$cache/debs"
# The dependency closure as apt would install it on an empty system, without recommends.
mapfile -t wanted < <("$root/scripts/debian-apt.sh" "$debarch" apt-get -s --no-install-recommends install \
	"${PACKAGES[@]}" | awk '/^Inst / { gsub(/[()]/, "", $3); print $2 "=" $3 }' | sort)
[ ${#wanted[@]} -gt 0 ] || die "apt resolved no packages for $debarch (is deb.debian.org reachable?)"
if ! cmp -s <(printf '%s\n' "${wanted[@]}") "$cache/sysroot.done" 2>/dev/null; then
	say "fetching ${#wanted[@]} $debarch packages"
	(cd "$cache/debs" && "$root/scripts/debian-apt.sh" "$debarch" apt-get -qq download "${wanted[@]}" >&2)
	rm -rf "$sysroot"
	mkdir -p "$sysroot"
	for pkg in "${wanted[@]}"; do
		name=${pkg%%=*} version=${pkg#*=}
		deb=$(find "$cache/debs" -maxdepth 1 -name "${name}_${version//:/%3a}_*.deb" | head -1)
		[ -n "$deb" ] || die "no .deb for $pkg in $cache/debs"
		dpkg-deb -x "$deb" "$sysroot"
	done
	# Debian 12 debs still ship /lib and /bin; the real systems merge them into /usr.
	for dir in bin sbin lib; do
		if [ -d "$sysroot/$dir" ] && [ ! -L "$sysroot/$dir" ]; then
			mkdir -p "$sysroot/usr/$dir"
			cp -a "$sysroot/$dir/." "$sysroot/usr/$dir/"
			rm -rf "${sysroot:?}/$dir"
		fi
		ln -sfn "usr/$dir" "$sysroot/$dir"
	done
	printf '%s\n' "${wanted[@]}" >"$cache/sysroot.done"
fi

# --- 2. the wheel -------------------------------------------------------------
src=$cache/src
rm -rf "$src" "$out"
mkdir -p "$src/tcpmon/data" "$out"
# A copy of the sources, subpackages included (setup.py lists tcpmon.attribution and any later one).
mapfile -t files < <(sources)
[ ${#files[@]} -gt 1 ] || die "no package sources found under $root"
(cd "$root" && cp --parents "${files[@]}" "$src/")
# The object `make build-all` makes, built in place (its BTF line info names the source path).
make -s -C "$root/bpf" TARGET_ARCH="$arch" >&2
cp "$root/build/bpf/$arch/tcpconnect.bpf.o" "$src/tcpmon/data/"

# (find on a sysroot without python3.11 must reach the die below, not end the script under pipefail)
sysconfigdata=$(find "$sysroot/usr/lib/python3.11" -maxdepth 1 -name "_sysconfigdata__*${triplet}*.py" 2>/dev/null | head -1 || true)
[ -n "$sysconfigdata" ] || die "no _sysconfigdata for $triplet in the sysroot"
mkdir -p "$cache/sysconfig"
cp "$sysconfigdata" "$cache/sysconfig/"
pyinc="-I$sysroot/usr/include/python3.11 -I$sysroot/usr/include/$triplet/python3.11"
say "building the wheel with $triplet-gcc"
(
	cd "$src"
	export PYTHONPATH=$cache/sysconfig
	_PYTHON_SYSCONFIGDATA_NAME=$(basename "$sysconfigdata" .py)
	export _PYTHON_SYSCONFIGDATA_NAME
	export _PYTHON_HOST_PLATFORM=$plat # the wheel's platform tag
	export CC="$triplet-gcc --sysroot=$sysroot"
	export LDSHARED="$triplet-gcc --sysroot=$sysroot -shared"
	export CFLAGS="$pyinc"
	export LDFLAGS="-L$sysroot/usr/lib/$triplet"
	"$root/.venv/bin/python" setup.py -q bdist_wheel -d "$out" >"$cache/build.log" 2>&1 ||
		{ tail -30 "$cache/build.log" >&2; die "setup.py bdist_wheel failed (log: $cache/build.log)"; }
)
wheel=$(find "$out" -name 'tcpmon-*.whl' | head -1)
[ -n "$wheel" ] || die "no wheel in $out"

# --- 3. checks ----------------------------------------------------------------
check=$cache/check
rm -rf "$check"
mkdir -p "$check"
"$root/.venv/bin/python" -m zipfile -e "$wheel" "$check"
failed=0
for so in "$check"/tcpmon/*.so; do
	if ! grep -Eq "Machine:[[:space:]]+$machine" <<<"$(readelf -h "$so" 2>&1)"; then
		say "$(basename "$so") is not a $machine ELF: $(readelf -h "$so" | sed -n 's/ *Machine: *//p')"
		failed=1
	fi
done
[ -e "$check/tcpmon/data/tcpconnect.bpf.o" ] || { say "the wheel has no BPF object"; failed=1; }
# (a here-string, not a pipe: grep -q exiting early must not turn into a pipefail failure)
grep -q 'NEEDED.*libbpf\.so\.1' <<<"$(readelf -d "$check"/tcpmon/_libbpf*.so 2>&1)" ||
	{ say "_libbpf does not link libbpf.so.1"; failed=1; }
[ "$failed" -eq 0 ] || die "$wheel failed its checks"
if [ "$run" -eq 1 ]; then
	command -v "$qemu" >/dev/null || die "$qemu not found: apt-get install qemu-user-static (or pass --no-run)"
	# The target's python imports the extensions (loading libbpf, libelf and zlib from the
	# sysroot), then its CLI reads a pin dir that does not exist and must say so.
	cd "$check" # not the repo: python puts the working directory first on sys.path
	if ! got=$(PYTHONPATH=$check QEMU_LD_PREFIX=$sysroot "$qemu" "$sysroot/usr/bin/python3.11" -c '
import platform
from tcpmon import _abi, _libbpf, _maps, _render
print(platform.machine(), "python", platform.python_version(), "ABI", _abi.ABI_VERSION, "with", len(_abi.MAPS), "maps")
' 2>&1); then
		die "the $arch python could not import the wheel: $got"
	fi
	dump=$(PYTHONPATH=$check QEMU_LD_PREFIX=$sysroot "$qemu" "$sysroot/usr/bin/python3.11" -m tcpmon dump \
		--pin-dir /sys/fs/bpf/tcpmon-cross-check-absent --json 2>&1) && die "tcpmon dump on a missing pin dir succeeded: $dump"
	# qemu-user does not emulate bpf(2): ENOSYS there is the CLI working up to the syscall.
	grep -Eq "BPF_OBJ_GET .*(tcpmon load|Function not implemented)" <<<"$dump" ||
		die "tcpmon dump on a missing pin dir: unexpected output: $dump"
	say "tcpmon dump under $qemu: $dump"
	say "ran under $qemu: $got"
fi
echo "$wheel"
