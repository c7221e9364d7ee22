#!/usr/bin/env bash
# Prints how tcpmon's four architectures map onto each other's names and the
# state of each BPF object (what `make arch-info` runs):
#
#   arch   uname -m  debian   docker platform  TARGET_ARCH  object                             status
#
# status: missing (not built), stale (older than a BPF source), ok (passes
# scripts/check-bpf-objects.sh), BROKEN (fails it; the reason follows the table)
# or built (checker tools missing).  "(host)" marks the machine's own arch.
# Exit status is 0 unless an object is BROKEN.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

# arch  uname -m  debian arch  docker platform  __TARGET_ARCH_* (from bpf/Makefile)
ARCH_TABLE=(
	"x86    x86_64   amd64   linux/amd64   x86"
	"arm64  aarch64  arm64   linux/arm64   arm64"
	"arm    armv7l   armhf   linux/arm/v7  arm"
	"riscv  riscv64  riscv64 linux/riscv64 riscv"
)
SOURCES=(bpf/tcpconnect.bpf.c bpf/tcpmon.h bpf/kernel_types.h bpf/Makefile)

host_arch=$(uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/' -e 's/armv.*/arm/' -e 's/riscv64/riscv/')
can_check=1
for tool in llvm-readelf llvm-objdump bpftool; do
	command -v "$tool" >/dev/null || can_check=0
done

fmt="%-11s %-9s %-8s %-14s %-12s %-34s %s\n"
# shellcheck disable=SC2059 # the format is a constant
printf "$fmt" arch "uname -m" debian "docker" TARGET_ARCH object status
broken=()
for row in "${ARCH_TABLE[@]}"; do
	read -r arch uname debian docker target <<<"$row"
	obj=build/bpf/$arch/tcpconnect.bpf.o
	if [ ! -e "$root/$obj" ]; then
		status=missing
	else
		status=ok
		for src in "${SOURCES[@]}"; do
			if [ "$root/$src" -nt "$root/$obj" ]; then
				status="stale ($src is newer)"
				break
			fi
		done
		if [ "$can_check" -eq 0 ]; then
			[ "$status" = ok ] && status="built (install llvm and bpftool to check)"
		elif ! why=$("$root/scripts/check-bpf-objects.sh" -q "$root/$obj" 2>&1); then
			status=BROKEN
			broken+=("$why")
		fi
	fi
	label=$arch
	[ "$arch" = "$host_arch" ] && label="$arch(host)"
	# shellcheck disable=SC2059
	printf "$fmt" "$label" "$uname" "$debian" "$docker" "$target" "$obj" "$status"
done
if [ ${#broken[@]} -ne 0 ]; then
	printf '%s\n' "${broken[@]}" >&2
	exit 1
fi
