#!/usr/bin/env bash
# Checks built BPF objects: ELF64 little-endian, machine BPF, BTF and BTF.ext
# present and parseable, every program section the loader needs present with
# its program, the license and every map tcpmon pins.
#
#   scripts/check-bpf-objects.sh [OBJECT...]
#
# Without arguments it checks build/bpf/<arch>/tcpconnect.bpf.o for every arch
# that has one (and fails if none has).  Exit 0 only when every object passes;
# each failure is one line naming the object and what is wrong.
# -q: print nothing on success.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

# The loader's contract with the object, from tcpmon's own description of it
# (tcpmon/contract.py: every program in its section, every map, the .rodata size).
python=${PYTHON:-$root/.venv/bin/python}
if ! contract=$("$python" -m tcpmon.contract 2>&1); then
	echo "check-bpf-objects: cannot read the loader's contract ($python -m tcpmon.contract): ${contract##*$'\n'}: run 'make build'" >&2
	exit 2
fi
PROGRAMS=()
MAPS=()
while read -r kind a b; do
	case $kind in
	program) PROGRAMS+=("$a $b") ;;
	map) MAPS+=("$a") ;;
	rodata) RODATA_SIZE=$a ;;
	esac
done <<<"$contract"

quiet=0
if [ "${1:-}" = "-q" ]; then
	quiet=1
	shift
fi

for tool in llvm-readelf llvm-objdump bpftool; do
	if ! command -v "$tool" >/dev/null; then
		echo "check-bpf-objects: $tool not found: run 'make deps' (Debian packages llvm and bpftool)" >&2
		exit 2
	fi
done

objects=("$@")
if [ ${#objects[@]} -eq 0 ]; then
	shopt -s nullglob
	objects=("$root"/build/bpf/*/tcpconnect.bpf.o)
	shopt -u nullglob
	if [ ${#objects[@]} -eq 0 ]; then
		echo "check-bpf-objects: no objects under build/bpf/*/: run 'make build-all' first" >&2
		exit 1
	fi
fi

# check_object OBJECT: prints one line per problem, returns the number of problems.
check_object() {
	local obj=$1 problems=0 header sections btf entry section program name
	if [ ! -s "$obj" ]; then
		echo "$obj: missing or empty"
		return 1
	fi
	if ! header=$(llvm-readelf --file-header "$obj" 2>&1); then
		echo "$obj: not an ELF file: ${header##*$'\n'}"
		return 1
	fi
	grep -Eq 'Class:[[:space:]]+ELF64' <<<"$header" || { echo "$obj: not ELF64"; problems=$((problems + 1)); }
	grep -Eq 'Data:.*little endian' <<<"$header" || { echo "$obj: not little-endian (all four target arches are)"; problems=$((problems + 1)); }
	grep -Eq 'Machine:[[:space:]]+EM_BPF' <<<"$header" ||
		{ echo "$obj: ELF machine is '$(sed -n 's/^ *Machine: *//p' <<<"$header")', not EM_BPF"; problems=$((problems + 1)); }

	sections=$(llvm-objdump --section-headers "$obj" | awk 'NR > 4 && NF >= 4 { print $2 }')
	for section in .BTF .BTF.ext license .maps; do
		grep -Fxq -- "$section" <<<"$sections" || { echo "$obj: no $section section"; problems=$((problems + 1)); }
	done

	if ! btf=$(bpftool btf dump file "$obj" 2>&1); then
		echo "$obj: bpftool cannot parse its BTF: ${btf##*$'\n'}"
		return $((problems + 1))
	fi
	for entry in "${PROGRAMS[@]}"; do
		read -r section program <<<"$entry"
		grep -Fxq -- "$section" <<<"$sections" || { echo "$obj: no program section $section"; problems=$((problems + 1)); }
		grep -Fq "FUNC '$program' " <<<"$btf" || { echo "$obj: BTF has no function $program (section $section)"; problems=$((problems + 1)); }
	done
	for name in "${MAPS[@]}"; do
		grep -Fq "VAR '$name' " <<<"$btf" || { echo "$obj: BTF has no map $name"; problems=$((problems + 1)); }
	done
	rodata=$(llvm-objdump --section-headers "$obj" | awk '$2 == ".rodata" { print $3 }')
	[ -z "$rodata" ] || rodata=$((16#$rodata))
	[ "$rodata" = "$RODATA_SIZE" ] ||
		{ echo "$obj: .rodata is ${rodata:-missing} bytes, the loader sets $RODATA_SIZE (struct tcpmon_config)"; problems=$((problems + 1)); }
	return "$problems"
}

failed=0
for obj in "${objects[@]}"; do
	if out=$(check_object "$obj"); then
		[ "$quiet" -eq 1 ] || echo "ok   $obj"
	else
		failed=$((failed + 1))
		while IFS= read -r line; do echo "FAIL $line" >&2; done <<<"$out"
	fi
done
if [ "$failed" -ne 0 ]; then
	echo "check-bpf-objects: $failed of ${#objects[@]} objects failed" >&2
	exit 1
fi
