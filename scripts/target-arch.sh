#!/bin/sh
# Maps a platform's architecture name to tcpmon's BPF TARGET_ARCH (bpf/Makefile).
# Usage: scripts/target-arch.sh [ARCH]   (ARCH: a buildx TARGETARCH such as amd64,
# or a `uname -m` name such as x86_64; default: this machine's `uname -m`)
set -eu
arch=${1:-$(uname -m)}
case "$arch" in
	amd64 | x86_64 | x86) echo x86 ;;
	arm64 | aarch64) echo arm64 ;;
	arm | armhf | armv6l | armv7l | armv7 | armv8l) echo arm ;;
	riscv64 | riscv) echo riscv ;;
	*)
		echo "target-arch: '$arch' has no BPF target: tcpmon builds for amd64, arm64, arm and riscv64" >&2
		exit 1
		;;
esac
