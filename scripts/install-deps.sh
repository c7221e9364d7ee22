#!/usr/bin/env bash
# Installs the missing Debian packages of the given groups of scripts/apt-packages.txt
# (run, test, cross; default: run).  Runs apt-get only when something is missing,
# so a second run costs a second.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
groups=("${@:-run}")
wanted=()
group=""
while read -r line; do
	line=${line%%#*}
	line=${line//[[:space:]]/}
	case $line in
	"") ;;
	\[*\]) group=${line:1:-1} ;;
	*) [[ " ${groups[*]} " == *" $group "* ]] && wanted+=("$line") ;;
	esac
done <"$here/apt-packages.txt"
for group in "${groups[@]}"; do
	grep -qx "\[$group\]" "$here/apt-packages.txt" ||
		{ echo "tcpmon: no package group '$group' in scripts/apt-packages.txt" >&2; exit 2; }
done
missing=()
for pkg in "${wanted[@]}"; do
	dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
	echo "tcpmon: missing Debian packages: ${missing[*]}: run 'make' as root or 'apt-get install ${missing[*]}'" >&2
	exit 1
fi
echo "tcpmon: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
