#!/usr/bin/env bash
# The kernel matrix (`make test-kernels`): boots every kernel in kernels/matrix.conf
# under qemu (TCG: no KVM needed) and runs kernels/guest_smoke.py inside it, which
# loads tcpmon with each attach mode, makes N connects from a known comm, and
# checks `tcpmon dump --json` and `tcpmon serve`'s /metrics both say exactly N.
#
#   kernels/run-matrix.sh [--quick] [--only LABEL,...] [--modes MODE,...]
#                         [--bpf-object PATH] [--output FILE] [--runs DIR] [--offline]
#                         [--timeout SECONDS] [--list]
#
# --quick    only the entries flagged quick (one x86 6.1 guest), for `make test`
# --only     only these labels
# --modes    attach modes to try (default: kprobe,fentry,tp_btf,tracepoint,auto;
#            with --quick: kprobe,tracepoint, the two perf-event links)
# --bpf-object  load this BPF object instead of the package's (e.g. a deliberately
#            broken one, to see the matrix fail); it must lie outside /tmp, which
#            the guest mounts over
# --runs     where each guest's console log, setup log (the stderr of fetching the
#            kernel and building its initramfs and root) and results go
#            (default .cache/kernels/runs)
# --output   where the markdown table goes (default: docs/KERNELS.md for the full
#            matrix, .cache/kernels/quick.md with --quick or --only)
# --offline  no apt: use the kernels already in .cache/kernels/
# --timeout  seconds per guest before it counts as hung (default 1200)
#
# Kernels are Debian packages fetched with a private apt configuration (the host's
# apt state and architectures are untouched); they, the initramfs images and the
# arm64 root filesystem are cached under .cache/kernels/.  x86 guests share the
# host's root read-only over virtio-9p and run the host's .venv; other arches get
# a root built by kernels/build-rootfs.sh.  Guests have no network device.
# Exit status: 0 when every must-work mode counted exactly, 1 on any mismatch,
# 2 on a usage or setup error.
set -euo pipefail

# bash reads a script as it runs it: run from a copy so that editing this file
# during a (13-minute) matrix cannot derail the run.
if [ -z "${TCPMON_MATRIX_SELF:-}" ]; then
	self=$(mktemp "${TMPDIR:-/tmp}/run-matrix.XXXXXX")
	cp "$0" "$self"
	TCPMON_MATRIX_SELF=$self TCPMON_MATRIX_ROOT=$(cd "$(dirname "$0")/.." && pwd) exec bash "$self" "$@"
fi
trap 'rm -f "$TCPMON_MATRIX_SELF"' EXIT
root=$TCPMON_MATRIX_ROOT
here=$root/kernels
cache=${TCPMON_KERNEL_CACHE:-$root/.cache/kernels}
modes="" bpf_object="" runs_dir=""
quick=0 offline=0 list=0 only="" output="" timeout=1200
NEEDED_MODULES=(virtio_pci 9pnet_virtio 9p)

die() {
	echo "run-matrix: $*" >&2
	exit 2
}
note() { echo "run-matrix: $*" >&2; }

while [ $# -gt 0 ]; do
	case $1 in
	--quick) quick=1 ;;
	--offline) offline=1 ;;
	--list) list=1 ;;
	--only) only=${2:?--only needs labels}; shift ;;
	--modes) modes=${2:?--modes needs a list}; shift ;;
	--bpf-object) bpf_object=${2:?--bpf-object needs a path}; shift ;;
	--runs) runs_dir=${2:?--runs needs a directory}; shift ;;
	--output) output=${2:?--output needs a file}; shift ;;
	--timeout) timeout=${2:?--timeout needs seconds}; shift ;;
	-h | --help) sed -n '2,/^set -euo/p' "$root/kernels/run-matrix.sh" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument $1 (see --help)" ;;
	esac
	shift
done

debian_arch() {
	case $1 in
	x86) echo amd64 ;;
	arm64) echo arm64 ;;
	*) die "arch $1: the matrix boots x86 and arm64 guests only" ;;
	esac
}

# --- the entries to run -------------------------------------------------------
entries=()
while read -r label arch release package must flags; do
	case $label in '' | '#'*) continue ;; esac
	[ -n "$flags" ] || die "matrix.conf: entry $label has fewer than six columns"
	if [ -n "$only" ]; then
		[[ ",$only," == *",$label,"* ]] || continue
	elif [ "$quick" -eq 1 ]; then
		[[ ",$flags," == *",quick,"* ]] || continue
	fi
	[ "$must" != - ] || must=""   # "-": no mode has to work (the row documents what does not)
	entries+=("$label $arch $release $package ${must:--}")
done <"$here/matrix.conf"
[ ${#entries[@]} -gt 0 ] || die "no matrix.conf entry matches ${only:+--only $only}${only:---quick}"
if [ "$list" -eq 1 ]; then
	printf '%s\n' "${entries[@]}"
	exit 0
fi
if [ -z "$modes" ]; then
	modes=kprobe,fentry,tp_btf,tracepoint,auto
	[ "$quick" -eq 1 ] && modes=kprobe,tracepoint
fi
if [ -n "$bpf_object" ]; then
	bpf_object=$(realpath "$bpf_object")
	[ -f "$bpf_object" ] || die "--bpf-object $bpf_object: no such file"
	[[ $bpf_object == "$root"/* || $bpf_object != /tmp/* ]] ||
		die "--bpf-object $bpf_object: the guest mounts a tmpfs over /tmp; put it in the repository or elsewhere"
fi
[ -z "$runs_dir" ] || runs_dir=$(realpath -m "$runs_dir")
if [ -z "$output" ]; then
	if [ "$quick" -eq 1 ] || [ -n "$only" ]; then
		output=$cache/quick.md
	else
		output=$root/docs/KERNELS.md
	fi
fi

# --- host prerequisites ---------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "needs root (9p shares of the whole root, reading root-only files)"
for tool in apt-get apt-cache dpkg-deb depmod cpio gzip timeout python3; do
	command -v "$tool" >/dev/null || die "$tool not found: run 'make deps'"
done
[ -x "$root/.venv/bin/python" ] || die "no $root/.venv: run 'make build' first"
mkdir -p "$cache"

# --- apt: scripts/debian-apt.sh keeps a private configuration per Debian arch ---
dapt() { # DEBARCH RELEASE apt-get|apt-cache ARGS...
	local debarch=$1 release=$2
	shift 2
	if [ "$release" = - ]; then
		TCPMON_APT_OFFLINE=$offline "$root/scripts/debian-apt.sh" "$debarch" "$@"
	else
		TCPMON_APT_OFFLINE=$offline "$root/scripts/debian-apt.sh" "$debarch" --release "$release" "$@"
	fi
}

# The linux-image/binary/modules packages a kernel (meta)package needs, itself included.
kernel_closure() { # DEBARCH RELEASE PACKAGE
	local queue=("$3") seen=" " pkg dep
	while [ ${#queue[@]} -gt 0 ]; do
		pkg=${queue[0]}
		queue=("${queue[@]:1}")
		[[ $seen == *" $pkg "* ]] && continue
		seen+="$pkg "
		echo "$pkg"
		while read -r dep; do
			queue+=("$dep")
		done < <(dapt "$1" "$2" apt-cache depends --no-recommends --no-suggests --no-conflicts \
			--no-breaks --no-replaces --no-enhances "$pkg" 2>/dev/null |
			sed -n -E 's/^ *\|?Depends: (linux-(image|binary|modules)-[^ <>]+)$/\1/p')
	done
}

# Downloads (once) and unpacks a kernel; prints the directory holding boot/ and lib/modules/.
fetch_kernel() { # LABEL ARCH RELEASE PACKAGE
	local label=$1 debarch release=$3 package=$4 dir debs uris pkgs=() url file
	debarch=$(debian_arch "$2")
	dir=$cache/$label
	debs=$cache/debs/$debarch
	mkdir -p "$dir" "$debs"
	if [ "$offline" -eq 0 ]; then
		mapfile -t pkgs < <(kernel_closure "$debarch" "$release" "$package")
		# --print-uris: 'URL' FILE SIZE HASH per package; fetch the files not cached yet.
		uris=$(cd "$debs" && dapt "$debarch" "$release" apt-get download --print-uris "${pkgs[@]}" 2>/dev/null) ||
			uris=""
		if [ -n "$uris" ]; then
			: >"$dir/debs.txt.new"
			while read -r url file _; do
				url=${url//\'/}
				[ -s "$debs/$file" ] || { note "downloading $file" && (cd "$debs" && dapt "$debarch" "$release" \
					apt-get -qq download "${file%%_*}" >&2); }
				echo "$file" >>"$dir/debs.txt.new"
			done <<<"$uris"
			mv "$dir/debs.txt.new" "$dir/debs.txt"
		fi
	fi
	[ -s "$dir/debs.txt" ] || die "$label: no kernel packages for $package ($release, $debarch) and none cached"
	if [ ! -f "$dir/tree.done" ] || ! cmp -s "$dir/debs.txt" "$dir/tree.done"; then
		note "$label: unpacking $(tr '\n' ' ' <"$dir/debs.txt")"
		rm -rf "$dir/tree"
		mkdir -p "$dir/tree"
		while read -r file; do
			dpkg-deb -x "$debs/$file" "$dir/tree"
		done <"$dir/debs.txt"
		cp "$dir/debs.txt" "$dir/tree.done"
	fi
	echo "$dir/tree"
}

kernel_release() { # TREE
	local rel
	# one of the two dirs is absent (find exits 1): not a failure under pipefail, the test below is
	rel=$(find "$1/lib/modules" "$1/usr/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | head -1 || true)
	[ -n "$rel" ] || die "$1: no lib/modules/<release>"
	echo "$rel"
}

modules_root() { # TREE RELEASE: where modules.dep lives (/lib or /usr/lib on merged-/usr packages)
	if [ -d "$1/usr/lib/modules/$2" ]; then echo "$1/usr/lib/modules/$2"; else echo "$1/lib/modules/$2"; fi
}

# The .ko files (relative to the modules dir) to insmod, dependencies first.
module_load_order() { # MODDIR NAME...
	local moddir=$1 name line deps dep order=" "
	shift
	for name in "$@"; do
		line=$(grep -E "(^|/)${name}\.ko(\.xz|\.zst|\.gz)?:" "$moddir/modules.dep" || true)
		if [ -z "$line" ]; then
			# Newer packages ship only modules.builtin.bin: a module they lack is taken as built in.
			if [ -f "$moddir/modules.builtin" ] && ! grep -Eq "(^|/)${name}\.ko$" "$moddir/modules.builtin"; then
				die "$moddir: module $name is neither built in nor in modules.dep"
			fi
			continue
		fi
		read -r -a deps <<<"${line#*:}"
		# modules.dep lists dependencies so that loading from the last one back works
		for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
			dep=${deps[i]}
			[[ $order == *" $dep "* ]] || order+="$dep "
		done
		line=${line%%:*}
		[[ $order == *" $line "* ]] || order+="$line "
	done
	printf '%s\n' "$order" | tr ' ' '\n' | sed '/^$/d'
}

busybox_for() { # ARCH: a static busybox for the guest
	local debarch dir file
	if [ "$1" = x86 ]; then
		if [ ! -x /bin/busybox ] || readelf -l /bin/busybox 2>/dev/null | grep -q INTERP; then
			die "needs a static /bin/busybox: apt-get install busybox-static"
		fi
		echo /bin/busybox
		return
	fi
	debarch=$(debian_arch "$1")
	dir=$cache/busybox-$debarch
	if [ ! -x "$dir/bin/busybox" ]; then
		[ "$offline" -eq 0 ] || die "no cached busybox for $debarch (run without --offline)"
		mkdir -p "$dir.deb"
		(cd "$dir.deb" && dapt "$debarch" - apt-get -qq download busybox-static >&2)
		file=$(find "$dir.deb" -name 'busybox-static_*.deb' | head -1)
		dpkg-deb -x "$file" "$dir"
	fi
	echo "$dir/bin/busybox"
}

# Builds (once per kernel, init script and busybox) the initramfs; prints its path.
build_initramfs() { # LABEL ARCH TREE
	local label=$1 arch=$2 tree=$3 dir rel moddir busybox key stage ko order name
	dir=$cache/$label
	rel=$(kernel_release "$tree")
	moddir=$(modules_root "$tree" "$rel")
	busybox=$(busybox_for "$arch")
	# Debian 13 packages leave modules.dep to the installer (and ship no modules.order).
	[ -f "$moddir/modules.dep" ] || depmod -b "${moddir%/lib/modules/*}" "$rel" 2>/dev/null ||
		die "depmod failed for $rel"
	order=$(module_load_order "$moddir" "${NEEDED_MODULES[@]}")
	key=$({ sha256sum "$here/guest-init.sh" "$busybox" | cut -d' ' -f1; echo "$rel $order"; cat "$dir/debs.txt"; } |
		sha256sum | cut -d' ' -f1)
	if [ -f "$dir/initramfs.gz" ] && [ "$(cat "$dir/initramfs.key" 2>/dev/null)" = "$key" ]; then
		echo "$dir/initramfs.gz"
		return
	fi
	stage=$(mktemp -d "$cache/stage.XXXXXX")
	mkdir -p "$stage"/{bin,sbin,proc,sys,dev,modules,newroot,results}
	cp "$busybox" "$stage/bin/busybox"
	for applet in sh mount umount insmod mkdir ip chroot poweroff sleep sync uname cat; do
		ln -s busybox "$stage/bin/$applet"
	done
	install -m 0755 "$here/guest-init.sh" "$stage/init"
	: >"$stage/modules.list"
	while read -r ko; do
		[ -n "$ko" ] || continue
		name=$(basename "$ko")
		name=${name%.xz} name=${name%.zst} name=${name%.gz}
		# busybox insmod wants plain .ko files
		case $ko in
		*.xz) xz -dc "$moddir/$ko" ;;
		*.zst) zstd -qdc "$moddir/$ko" ;;
		*.gz) gzip -dc "$moddir/$ko" ;;
		*) cat "$moddir/$ko" ;;
		esac >"$stage/modules/$name"
		echo "$name" >>"$stage/modules.list"
	done <<<"$order"
	(cd "$stage" && find . -print0 | sort -z | cpio --null -o -H newc --quiet --owner=0:0) | gzip -1 >"$dir/initramfs.gz.new"
	rm -rf "$stage"
	mv "$dir/initramfs.gz.new" "$dir/initramfs.gz"
	echo "$key" >"$dir/initramfs.key"
	echo "$dir/initramfs.gz"
}

kernel_image() { # TREE
	local image
	# boot/vmlinuz-<release>, or (Debian 13+ packages) usr/lib/modules/<release>/vmlinuz
	image=$(find "$1/boot" "$1/usr/lib/modules" "$1/lib/modules" -maxdepth 2 \
		\( -name 'vmlinuz-*' -o -name 'vmlinuz' \) 2>/dev/null | head -1 || true)
	[ -n "$image" ] || die "$1: no boot/vmlinuz-* or lib/modules/*/vmlinuz"
	echo "$image"
}

# Boots one guest; the smoke's results land in RUNDIR/results.jsonl.
boot() { # LABEL ARCH TREE INITRAMFS RUNDIR
	local label=$1 arch=$2 tree=$3 initramfs=$4 rundir=$5 image qemu share python pythonpath=""
	# The repository has a share of its own, mounted over the guest's tmpfs dirs, so
	# a checkout under /tmp (as CI's may be) stays visible in the guest.
	local repo_tag=repo
	local -a machine extra=(-virtfs "local,path=$root,mount_tag=repo,security_model=none,readonly=on")
	image=$(kernel_image "$tree")
	case $arch in
	x86)
		qemu="qemu-system-x86_64"
		machine=(-machine q35 -cpu max -append "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init")
		share=/
		python=$root/.venv/bin/python
		pythonpath=$root
		;;
	arm64)
		qemu="qemu-system-aarch64"
		machine=(-machine virt -cpu "max,pauth-impdef=on"
			-append "console=ttyAMA0 panic=-1 quiet loglevel=3 rdinit=/init")
		share=$("$here/build-rootfs.sh" arm64)
		python=/usr/bin/python3
		;;
	esac
	command -v "$qemu" >/dev/null || die "$qemu not found: apt-get install qemu-system-${arch/x86/x86}"
	cat >"$rundir/job.env" <<-EOF
		TCPMON_PYTHON='$python'
		TCPMON_PYTHONPATH='$pythonpath'
		TCPMON_SMOKE='$root/kernels/guest_smoke.py'
		TCPMON_SMOKE_ARGS='--modes $modes${bpf_object:+ --bpf-object $bpf_object}'
		TCPMON_REPO='$root'
		TCPMON_REPO_TAG='$repo_tag'
	EOF
	local started rc=0
	started=$(date +%s)
	timeout -k 10 "$timeout" "$qemu" -accel tcg,thread=multi "${machine[@]}" -smp 2 -m 1536 \
		-nodefaults -no-user-config -display none -no-reboot -nic none \
		-chardev "file,id=console,path=$rundir/console.log" -serial chardev:console \
		-kernel "$image" -initrd "$initramfs" \
		-virtfs "local,path=$share,mount_tag=rootfs,security_model=none,readonly=on,multidevs=remap" \
		-virtfs "local,path=$rundir,mount_tag=results,security_model=none" \
		"${extra[@]}" >"$rundir/qemu.log" 2>&1 || rc=$?
	{
		echo "qemu_rc=$rc"
		echo "boot_seconds=$(($(date +%s) - started))"
		echo "packages=$(tr '\n' ' ' <"$cache/$label/debs.txt")"
		echo "qemu=$("$qemu" --version | head -1)"
	} >>"$rundir/meta.env"
	[ "$rc" -eq 124 ] && note "$label: guest hung for ${timeout}s (console: $rundir/console.log)"
	return 0
}

runs=()
started_all=$(date +%s)
for entry in "${entries[@]}"; do
	read -r label arch release package must <<<"$entry"
	[ "$must" != - ] || must=""
	suite=${release/#-/bookworm}
	note "$label: $package ($suite, $arch)"
	rundir=${runs_dir:-$cache/runs}/$label
	rm -rf "$rundir"
	mkdir -p "$rundir"
	printf '%s\n' "label=$label" "arch=$arch" "must=$must" "modes=$modes" "suite=$suite" \
		"git=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)" >"$rundir/meta.env"
	t0=$(date +%s)
	# One kernel that cannot be fetched or booted fails its row, not the whole matrix.
	# (errexit only works in a subshell that is not the operand of || or if.)
	# Its stderr goes to the terminal and to setup.log: a failed step's reason is the
	# tail of that log (report.py puts it in the row and the failure log).
	set +e
	{ (
		set -e
		# without it a failing command inside $(fetch_kernel ...) would not stop the function
		shopt -s inherit_errexit
		# A command that fails without a word still names itself (once: the innermost one).
		set -E
		trap 'rc=$?; [ -e "$rundir/.failed" ] || { : >"$rundir/.failed"
			echo "run-matrix: $label: line $LINENO: '"'"'$BASH_COMMAND'"'"' exited $rc" >&2; }' ERR
		die() {
			echo "run-matrix: $*" >&2
			echo "setup_error=$*" >>"$rundir/meta.env"
			exit 2
		}
		tree=$(fetch_kernel "$label" "$arch" "$release" "$package")
		release=$(kernel_release "$tree")
		echo "release=$release" >>"$rundir/meta.env"
		initramfs=$(build_initramfs "$label" "$arch" "$tree")
		boot "$label" "$arch" "$tree" "$initramfs" "$rundir"
	) 2>&1 1>&3 3>&- | tee "$rundir/setup.log" >&2; } 3>&1
	rc=$? # the subshell's (pipefail; tee exits 0), once tee has written all of setup.log
	set -e
	if [ "$rc" -ne 0 ] && ! grep -q '^setup_error=' "$rundir/meta.env"; then
		echo "setup_error=preparing the guest failed (exit $rc)" >>"$rundir/meta.env"
	fi
	if [ "$rc" -ne 0 ]; then
		note "$label: setup failed (exit $rc); the last lines of its stderr ($rundir/setup.log):"
		tail -n 5 "$rundir/setup.log" | sed 's/^/    /' >&2
	fi
	note "$label: guest finished in $(($(date +%s) - t0))s"
	runs+=("$rundir")
done
note "all guests finished in $(($(date +%s) - started_all))s"
mkdir -p "$(dirname "$output")"
python3 "$here/report.py" --output "$output" "${runs[@]}"
