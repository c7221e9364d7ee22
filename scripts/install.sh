#!/usr/bin/env bash
# `make install`: installs tcpmon system-wide for systemd (as root).
#
#   scripts/install.sh [--units-only] [--no-start]
#
#   /opt/tcpmon/                          virtualenv of $PYTHON (default /usr/bin/python3) with tcpmon
#   /usr/local/bin/tcpmon              -> /opt/tcpmon/bin/tcpmon
#   /usr/local/lib/systemd/system/        tcpmon-load.service (loader) and tcpmon.service (exporter)
#   /usr/local/lib/sysusers.d/tcpmon.conf the exporter's user
#   /etc/default/tcpmon                   settings (an existing one is kept)
# then creates user tcpmon, reloads systemd and enables and starts tcpmon.service
# (which starts tcpmon-load.service).  --units-only skips the virtualenv;
# --no-start installs and enables without starting.
#
# DESTDIR=DIR stages all of those files under DIR and touches nothing else: no user,
# no systemctl, no root needed (the staged virtualenv's scripts name DIR's python).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
destdir=${DESTDIR:-}
python=${PYTHON:-/usr/bin/python3}
home=/opt/tcpmon
unit_dir=/usr/local/lib/systemd/system
units_only=false
start=true

die() {
	echo "install: $*" >&2
	exit 1
}

for arg in "$@"; do
	case $arg in
	--units-only) units_only=true ;;
	--no-start) start=false ;;
	*) die "unknown option '$arg': use --units-only or --no-start" ;;
	esac
done
if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
	die "run as root (or set DESTDIR to stage the files)"
fi
case $destdir in "" | /*) ;; *) destdir=$(pwd)/$destdir ;; esac

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

install_package() {
	local obj=$repo/tcpmon/data/tcpconnect.bpf.o src=$scratch/src wheel
	[ -f "$obj" ] || die "$obj is missing: run 'make build' first"
	[ -x "$python" ] || die "$python not found: install python3, python3-venv and python3-dev or set PYTHON"
	# Build the wheel from a copy, with $python itself, so its extensions match the
	# interpreter of /opt/tcpmon; nothing is written into the work tree.
	mkdir -p "$src/tcpmon/data" "$src/tcpmon/attribution" "$src/ext"
	cp -r "$repo/setup.py" "$repo/bpf" "$src/"
	cp "$repo"/ext/*.pyx "$repo"/ext/*.pxd "$src/ext/"
	find "$repo/ext" -maxdepth 1 -name '*.h' -exec cp {} "$src/ext/" \;
	cp "$repo"/tcpmon/*.py "$src/tcpmon/"
	cp "$repo"/tcpmon/attribution/*.py "$src/tcpmon/attribution/"
	cp "$obj" "$src/tcpmon/data/"
	"$python" -m venv "$scratch/build-venv" || die "$python -m venv failed: install python3-venv"
	"$scratch/build-venv/bin/pip" install -q --disable-pip-version-check cython setuptools wheel ||
		die "pip could not install the build tools (cython, setuptools, wheel)"
	"$scratch/build-venv/bin/pip" wheel -q --disable-pip-version-check --no-build-isolation --no-deps \
		-w "$scratch/dist" "$src" >&2 || die "building the tcpmon wheel failed (python3-dev and libbpf-dev needed)"
	wheel=$(echo "$scratch"/dist/tcpmon-*.whl)
	[ -f "$wheel" ] || die "no tcpmon wheel was built"
	rm -rf "$destdir$home"
	"$python" -m venv "$destdir$home"
	"$destdir$home/bin/pip" install -q --disable-pip-version-check "$wheel" ||
		die "pip could not install $wheel into $destdir$home"
	"$destdir$home/bin/tcpmon" --version >/dev/null || die "$destdir$home/bin/tcpmon does not run"
	install -d "$destdir/usr/local/bin"
	ln -sfn "$home/bin/tcpmon" "$destdir/usr/local/bin/tcpmon"
	echo "install: tcpmon $("$destdir$home/bin/tcpmon" --version | cut -d' ' -f2) in $destdir$home"
}

install_files() {
	local sd=$repo/deploy/systemd
	install -D -m 0644 "$sd/tcpmon-load.service" "$destdir$unit_dir/tcpmon-load.service"
	install -D -m 0644 "$sd/tcpmon.service" "$destdir$unit_dir/tcpmon.service"
	install -D -m 0644 "$sd/tcpmon.sysusers" "$destdir/usr/local/lib/sysusers.d/tcpmon.conf"
	if [ ! -e "$destdir/etc/default/tcpmon" ]; then
		install -D -m 0644 "$sd/tcpmon.default" "$destdir/etc/default/tcpmon"
	fi
	echo "install: units in $destdir$unit_dir"
}

activate() {
	if command -v systemd-sysusers >/dev/null; then
		systemd-sysusers /usr/local/lib/sysusers.d/tcpmon.conf
	elif ! id tcpmon >/dev/null 2>&1; then
		useradd --system --no-create-home --home-dir / --shell /usr/sbin/nologin tcpmon
	fi
	if [ ! -d /run/systemd/system ]; then
		echo "install: systemd is not running here: start with 'tcpmon load' and 'tcpmon serve' instead"
		return 0
	fi
	systemctl daemon-reload
	if $start; then
		systemctl enable --now tcpmon.service
		echo "install: tcpmon.service started: curl -s localhost:9090/metrics"
	else
		systemctl enable tcpmon.service
		echo "install: tcpmon.service enabled: systemctl start tcpmon"
	fi
}

$units_only || install_package
install_files
[ -n "$destdir" ] || activate
