#!/bin/sh
# /init of the kernel-matrix initramfs (busybox sh, PID 1 in the qemu guest).
#
# Loads the virtio/9p modules listed in /modules.list, mounts the read-only
# root shared by the host (9p tag "rootfs") at /newroot, a writable 9p share
# (tag "results") carrying job.env in and results out, and tmpfs over every
# directory the smoke writes to, then runs the smoke chrooted in /newroot and
# powers off.  The guest has no network device; only loopback comes up.
# shellcheck shell=sh
export PATH=/bin:/sbin

say() { echo "tcpmon-guest: $*"; }
finish() {
	say "TCPMON-GUEST-DONE rc=$1"
	sync
	poweroff -f
	sleep 60
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do
	[ -n "$module" ] || continue
	insmod "/modules/$module" || say "insmod $module failed"
done </modules.list

mkdir -p /newroot /results
# msize: bigger 9p messages cut the round trips of Python's many small reads.
ninep=trans=virtio,version=9p2000.L,msize=512000
if ! mount -t 9p -o "$ninep,cache=loose,ro" rootfs /newroot; then
	say "cannot mount the shared root (9p tag rootfs)"
	finish 90
fi
if ! mount -t 9p -o "$ninep" results /results; then
	say "cannot mount the results share (9p tag results)"
	finish 91
fi
# job.env (kernels/run-matrix.sh writes it): TCPMON_PYTHON, TCPMON_PYTHONPATH,
# TCPMON_SMOKE, TCPMON_SMOKE_ARGS, TCPMON_REPO, TCPMON_REPO_TAG
# shellcheck disable=SC1091
. /results/job.env

mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t bpf bpf /newroot/sys/fs/bpf
mount -t tracefs tracefs /newroot/sys/kernel/tracing 2>/dev/null || say "no tracefs"
mount -t debugfs debugfs /newroot/sys/kernel/debug 2>/dev/null || true
for dir in tmp run var/tmp; do
	[ -d "/newroot/$dir" ] && mount -t tmpfs tmpfs "/newroot/$dir"
done
if [ -n "${TCPMON_REPO_TAG:-}" ]; then
	mkdir -p "/newroot$TCPMON_REPO" 2>/dev/null # exists already unless under a tmpfs above
	mount -t 9p -o "$ninep,cache=loose,ro" "$TCPMON_REPO_TAG" "/newroot$TCPMON_REPO" ||
		say "cannot mount the repository share ($TCPMON_REPO_TAG)"
fi
mkdir -p /newroot/tmp/results
mount --bind /results /newroot/tmp/results
ip link set lo up

say "kernel $(uname -r) $(uname -m), running the smoke"
# The chroot sees only what the shared root has: env -i drops the initramfs PATH.
# shellcheck disable=SC2086 # TCPMON_SMOKE_ARGS is a list of words
chroot /newroot /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/tmp \
	LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 ${TCPMON_PYTHONPATH:+PYTHONPATH=$TCPMON_PYTHONPATH} \
	"$TCPMON_PYTHON" "$TCPMON_SMOKE" --results /tmp/results $TCPMON_SMOKE_ARGS
rc=$?
umount /newroot/tmp/results 2>/dev/null
finish "$rc"
