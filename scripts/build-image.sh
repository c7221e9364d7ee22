#!/usr/bin/env bash
# make image: builds tcpmon's image (Dockerfile) and debug image (Dockerfile.debug) with
# podman, offline, and tags them tcpmon:VERSION and tcpmon:VERSION-debug (VERSION from
# tcpmon/__init__.py; tcpmon:latest too for the host's arch).
#   TARGET_ARCH=arm64 scripts/build-image.sh   the arm64 images (tcpmon:VERSION-arm64, ...)
#                                              through qemu-user-static; ~30 min on 2 cores
#   FORCE=1                                    rebuild even if the images are up to date
#   scripts/build-image.sh --key               the images' source key, and nothing else
# An image is labelled with a key of the sources it was built from (the build context,
# the Dockerfiles, this script); when the tagged images carry the current key the build
# is skipped, so tests may call this script every run.  A missing Debian base image is
# made from the mirror apt uses here (mmdebstrap, podman import): no registry is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
KEY_LABEL=org.tcpmon.source-key

die() { echo "tcpmon: $*" >&2; exit 1; }

# What the build context sends (.dockerignore's allow-list) and what builds from it;
# tests/deploy/test_images.py checks the list against .dockerignore.
context_files() {
	find bpf ext tcpmon setup.py scripts/target-arch.sh LICENSE README.md -type f \
		! -path 'ext/*.c' ! -name '*.so' ! -path 'tcpmon/data/*.bpf.o' ! -path '*/__pycache__/*' | LC_ALL=C sort
}

source_key() {
	{ context_files; echo Dockerfile Dockerfile.debug .dockerignore scripts/build-image.sh \
		scripts/podman-conf.sh scripts/seccomp-profile.py | tr ' ' '\n'; } | xargs sha256sum | sha256sum | cut -c1-16
}

case "${1:-}" in
--key) source_key; exit 0 ;;
--context-files) context_files; exit 0 ;;
"") ;;
*) die "unknown argument '$1': scripts/build-image.sh [--key | --context-files]" ;;
esac

# The Docker platform arch, Debian arch and qemu-user binfmt handler of TARGET_ARCH (a
# BPF, Docker or uname name).
arch_names() {
	case "$1" in
	x86 | amd64 | x86_64) echo "amd64 amd64 qemu-x86_64" ;;
	arm64 | aarch64) echo "arm64 arm64 qemu-aarch64" ;;
	arm | armhf | armv7l) echo "arm armhf qemu-arm" ;;
	riscv | riscv64) echo "riscv64 riscv64 qemu-riscv64" ;;
	*) die "TARGET_ARCH '$1' has no image: make image builds for x86 (amd64), arm64, arm and riscv" ;;
	esac
}

check_engine() {
	command -v podman >/dev/null ||
		die "make image needs podman, which is not installed: apt-get install podman buildah runc mmdebstrap (scripts/apt-packages.txt, [test])"
	command -v runc >/dev/null || die "make image runs podman with runc, which is not installed: apt-get install runc"
	CONTAINERS_CONF=$(scripts/podman-conf.sh)
	export CONTAINERS_CONF
	local info
	info=$(podman info --format '{{.Host.OCIRuntime.Name}}' 2>&1) ||
		die "podman cannot run here: $(grep -m1 -i error <<<"$info" || head -n1 <<<"$info")"
}

# Cross builds run the target's binaries under qemu-user-static through binfmt_misc.
check_binfmt() {
	local qemu=$1
	[ -e /proc/sys/fs/binfmt_misc/status ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null ||
		die "binfmt_misc cannot be mounted here, so $TARGET_ARCH binaries cannot run: build on a $TARGET_ARCH machine"
	grep -qs '^enabled' "/proc/sys/fs/binfmt_misc/$qemu" && return
	{ command -v update-binfmts && [ -e "/usr/bin/$qemu-static" ]; } >/dev/null ||
		die "building for $TARGET_ARCH needs qemu-user-static and binfmt-support: make image-arm64 installs them ([cross])"
	update-binfmts --enable "$qemu" >/dev/null 2>&1 || true
	grep -qs '^enabled' "/proc/sys/fs/binfmt_misc/$qemu" ||
		die "the binfmt handler $qemu cannot be enabled here (update-binfmts --enable $qemu): build on a $TARGET_ARCH machine"
}

# The URI of the repository apt here knows by that Label (Debian, Debian-Security).
apt_repo() {
	# shellcheck disable=SC2016 # apt's format fields, not shell expansions
	apt-get indextargets --format '$(LABEL) $(REPO_URI)' | awk -v label="$1" '$1 == label {print $2; exit}'
}

# Bump when the base's recipe below changes: a base made by an older recipe is remade.
BASE_RECIPE=3

# What makes Debian's own slim images slim, for the one made here: apt keeps no .debs and no
# package caches (their docker-clean), dpkg installs no docs, man pages or translations
# (mmdebstrap applies --dpkgopt to the essential packages too, and leaves it in the image).
SLIM_DPKG=(--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
	--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
	--dpkgopt='path-exclude=/usr/share/groff/*' --dpkgopt='path-exclude=/usr/share/lintian/*'
	--dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias')
write_apt_clean() {
	local clean='rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true'
	cat >"$1" <<EOF
DPkg::Post-Invoke { "$clean"; };
APT::Update::Post-Invoke { "$clean"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
}

# The Dockerfile's Debian base, for the platform: imported from an mmdebstrap of the
# mirror apt is configured with when the engine has none.  One from a registry (no recipe
# label) is used as it is.
ensure_base() {
	local name=$1 platform=$2 debarch=$3 recipe major suite mirror security tmp
	name=docker.io/library/${name#docker.io/library/}
	# a second arch of the same base gets a name of its own
	[ "$platform" = "$HOST_PLATFORM" ] || name=$name-$platform
	BASE=$name
	if podman image exists "$name"; then
		recipe=$(podman image inspect --format '{{index .Labels "org.tcpmon.base-recipe"}}' "$name")
		if [ -z "$recipe" ] || [ "$recipe" = "$BASE_RECIPE" ]; then
			return
		fi
		podman rmi "$name" >/dev/null 2>&1 || podman untag "$name"
	fi
	command -v mmdebstrap >/dev/null || die "no base image $name and no mmdebstrap to make it: apt-get install mmdebstrap"
	major=${name##*:}
	major=${major%%.*}
	case "$major" in
	12) suite=bookworm ;;
	13) suite=trixie ;;
	14) suite=forky ;;
	*) die "base image $name: no Debian codename known for release $major (scripts/build-image.sh)" ;;
	esac
	mirror=$(apt_repo Debian)
	security=$(apt_repo Debian-Security)
	[ -n "$mirror" ] || die "no Debian mirror in apt's sources to make the base image $name from"
	tmp=$(mktemp -d)
	write_apt_clean "$tmp/docker-clean"
	echo "tcpmon: making base image $name ($suite, $debarch) from $mirror"
	# shellcheck disable=SC2016 # "$1" is the chroot, for mmdebstrap's hook shell
	if ! mmdebstrap --quiet --variant=minbase --arch="$debarch" "${SLIM_DPKG[@]}" \
		--customize-hook="copy-in $tmp/docker-clean /etc/apt/apt.conf.d" \
		--customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
		"$suite" "$tmp/rootfs.tar" "deb $mirror $suite main" ${security:+"deb $security $suite-security main"}; then
		rm -rf "$tmp"
		die "mmdebstrap of $suite ($debarch) from $mirror failed"
	fi
	podman import --quiet --arch "$platform" --change 'CMD ["bash"]' \
		--change "LABEL org.tcpmon.base-recipe=$BASE_RECIPE" "$tmp/rootfs.tar" "$name" >/dev/null
	rm -rf "$tmp"
}

current() { podman image inspect --format "{{index .Labels \"$KEY_LABEL\"}}" "$1" 2>/dev/null || true; }

# podman build as the machine needs it: offline (--pull=never), docker format (or SHELL
# is ignored), no cache (buildah#4375), the host's CA bundle for pip.
build() {
	local tag=$1 old
	shift
	old=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
	if ! podman build --quiet --no-cache --layers=false --force-rm --pull=never --format docker \
		--platform "linux/$PLATFORM" --network host \
		-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro \
		-v "$(dirname "$CONTAINERS_CONF")/pip.conf:/etc/pip.conf:ro" \
		--label "$KEY_LABEL=$KEY" -t "$tag" "$@" . >"$LOG" 2>&1; then
		# failed builds leave working containers behind (19 GB of them, once)
		buildah rm --all >/dev/null 2>&1 || true
		tail -n 20 "$LOG" >&2
		die "building $tag failed (the whole log: $LOG)"
	fi
	# the image the tag named before, now untagged
	[ -z "$old" ] || [ "$old" = "$(podman image inspect --format '{{.Id}}' "$tag")" ] ||
		podman rmi "$old" >/dev/null 2>&1 || true
}

size_mb() { podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%d MB", $1 / 1e6}'; }

main() {
	local version base_name qemu start
	version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' tcpmon/__init__.py)
	read -r PLATFORM DEBARCH qemu <<<"$(arch_names "${TARGET_ARCH:-$(uname -m)}")"
	read -r HOST_PLATFORM HOST_DEBARCH _ <<<"$(arch_names "$(uname -m)")"
	[ -n "$PLATFORM" ] && [ -n "$HOST_PLATFORM" ] || exit 1 # arch_names said why
	check_engine
	local suffix=""
	if [ "$PLATFORM" != "$HOST_PLATFORM" ]; then
		suffix=-$PLATFORM
		check_binfmt "$qemu"
	fi
	IMAGE=localhost/tcpmon:$version$suffix
	DEBUG=localhost/tcpmon:$version$suffix-debug
	KEY=$(source_key)
	mkdir -p build/containers
	LOG=$PWD/build/containers/build-$PLATFORM.log
	if [ -z "${FORCE:-}" ] && [ "$(current "$IMAGE")" = "$KEY" ] && [ "$(current "$DEBUG")" = "$KEY" ]; then
		echo "tcpmon: $IMAGE ($(size_mb "$IMAGE")) and $DEBUG ($(size_mb "$DEBUG")) are up to date (source key $KEY)"
		return
	fi
	base_name=$(sed -n 's/^ARG DEBIAN_IMAGE=//p' Dockerfile)
	# the bpf stage runs natively
	[ "$PLATFORM" = "$HOST_PLATFORM" ] || ensure_base "$base_name" "$HOST_PLATFORM" "$HOST_DEBARCH"
	ensure_base "$base_name" "$PLATFORM" "$DEBARCH"
	local build_args=()
	if [ "$PLATFORM" != "$HOST_PLATFORM" ]; then
		# both arches under the base's one name for the Dockerfile's two FROMs: a manifest list
		local list=localhost/tcpmon-base:$PLATFORM
		podman manifest exists "$list" 2>/dev/null && podman manifest rm "$list" >/dev/null
		podman manifest create "$list" >/dev/null
		podman manifest add "$list" "containers-storage:docker.io/library/$base_name" >/dev/null
		podman manifest add "$list" "containers-storage:$BASE" >/dev/null
		build_args=(--build-arg "DEBIAN_IMAGE=$list")
	fi
	start=$SECONDS
	echo "tcpmon: building $IMAGE (linux/$PLATFORM, source key $KEY)"
	build "$IMAGE" "${build_args[@]}"
	local image_time=$((SECONDS - start))
	build "$DEBUG" -f Dockerfile.debug --build-arg "RELEASE_IMAGE=$IMAGE"
	if [ -z "$suffix" ]; then podman tag "$IMAGE" localhost/tcpmon:latest; fi
	# the smoke check: the entrypoint runs
	local smoke
	smoke=$(podman run --rm --platform "linux/$PLATFORM" "$IMAGE" --version 2>&1) ||
		die "$IMAGE does not start: $smoke"
	[ "$smoke" = "tcpmon $version" ] || die "$IMAGE --version printed '$smoke', not 'tcpmon $version'"
	echo "tcpmon: built $IMAGE ($(size_mb "$IMAGE"), ${image_time}s) and $DEBUG ($(size_mb "$DEBUG"), $((SECONDS - start - image_time))s); '$smoke'"
}

main
