#!/usr/bin/env bash
# apt-get / apt-cache for one Debian architecture with a private configuration
# under .cache/apt/<debian arch>/: the host's apt state, sources and dpkg
# architectures are never touched, so amd64 hosts can fetch arm64 packages
# (kernels, a cross sysroot) without `dpkg --add-architecture`.
#
#   scripts/debian-apt.sh DEBARCH [--release SUITE] apt-get|apt-cache ARGS...
#   scripts/debian-apt.sh DEBARCH update     # refresh the package lists now
#
# Suites: bookworm, bookworm-updates, bookworm-security, bookworm-backports,
# trixie-backports and bullseye (Debian 11, for its 5.10 kernel).  --release makes SUITE's versions the candidates (for the
# backports); without it the highest bookworm version wins.  Lists are refreshed
# when older than a day unless TCPMON_APT_OFFLINE=1; a failed refresh falls back
# to the lists already cached.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
SUITES=("bookworm" "bookworm-updates" "bookworm-security" "bookworm-backports" "trixie-backports" "bullseye")
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

[ $# -ge 2 ] || { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }
debarch=$1
shift
release=""
if [ "$1" = --release ]; then
	release=${2:?--release needs a suite}
	shift 2
fi
dir=${TCPMON_APT_DIR:-$root/.cache/apt}/$debarch

mkdir -p "$dir"/{lists/partial,cache/archives/partial,sources.list.d,preferences.d}
touch "$dir/status" "$dir/preferences"
for suite in "${SUITES[@]}"; do
	mirror=http://deb.debian.org/debian
	[ "$suite" = bookworm-security ] && mirror=http://deb.debian.org/debian-security
	echo "deb [signed-by=$KEYRING] $mirror $suite main"
done >"$dir/sources.list"

opts=(-o "Dir::Etc::SourceList=$dir/sources.list" -o "Dir::Etc::SourceParts=$dir/sources.list.d"
	-o "Dir::Etc::Preferences=$dir/preferences" -o "Dir::Etc::PreferencesParts=$dir/preferences.d"
	-o "Dir::State::Lists=$dir/lists" -o "Dir::State::status=$dir/status" -o "Dir::Cache=$dir/cache"
	-o "APT::Architecture=$debarch" -o "APT::Architectures::=$debarch" -o "Debug::NoLocking=1"
	-o "APT::Sandbox::User=root" -o "Acquire::Languages=none")
[ -z "$release" ] || opts+=(-o "APT::Default-Release=$release")

refresh() {
	echo "debian-apt: apt-get update ($debarch)" >&2
	apt-get "${opts[@]}" -qq update >&2 || echo "debian-apt: apt-get update failed for $debarch: using the cached lists" >&2
}

if [ "$1" = update ]; then
	refresh
	exit 0
fi
if [ "${TCPMON_APT_OFFLINE:-0}" != 1 ] &&
	[ -z "$(find "$dir/lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
	refresh
fi
tool=$1
shift
case $tool in
apt-get | apt-cache) exec "$tool" "${opts[@]}" "$@" ;;
*) echo "debian-apt: runs apt-get or apt-cache, not $tool" >&2; exit 2 ;;
esac
